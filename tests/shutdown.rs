//! The whole service starts (embedded broker, test pattern) and stops promptly on cancellation.

use std::time::Duration;

use rtcam::config::{Config, Sources};
use tokio_util::sync::CancellationToken;

mod common;
use common::free_port;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_shuts_down_cleanly_on_cancel() {
    let (mqtt, ws) = (free_port(), free_port());
    let env = vec![
        (
            "RTCAM__CAPTURE__SOURCE".to_string(),
            "test-pattern".to_string(),
        ),
        ("RTCAM__MQTT__HOST".into(), "127.0.0.1".into()),
        ("RTCAM__MQTT__PORT".into(), mqtt.to_string()),
        ("RTCAM__BROKER__ENABLED".into(), "true".into()),
        ("RTCAM__BROKER__LISTEN".into(), format!("127.0.0.1:{mqtt}")),
        ("RTCAM__BROKER__WS_LISTEN".into(), format!("127.0.0.1:{ws}")),
        ("RTCAM__WEBRTC__BIND_ADDRESSES".into(), "127.0.0.1".into()),
    ];
    let config = Config::load(&Sources {
        env,
        ..Default::default()
    })
    .unwrap();
    let cancel = CancellationToken::new();
    let service = tokio::spawn(rtcam::app::run(config, cancel.clone()));
    // Let it connect to its broker and settle.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !service.is_finished(),
        "service must keep running until cancelled"
    );
    cancel.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), service)
        .await
        .expect("service stops within 10 s of cancellation")
        .expect("service task did not panic");
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn broker_enabled_without_feature_or_port_clash_is_a_clear_error() {
    // Occupy the broker port so the embedded broker cannot start.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let env = vec![
        (
            "RTCAM__CAPTURE__SOURCE".to_string(),
            "test-pattern".to_string(),
        ),
        ("RTCAM__BROKER__ENABLED".into(), "true".into()),
        ("RTCAM__BROKER__LISTEN".into(), format!("127.0.0.1:{port}")),
    ];
    let config = Config::load(&Sources {
        env,
        ..Default::default()
    })
    .unwrap();
    let err = rtcam::app::run(config, CancellationToken::new())
        .await
        .expect_err("port in use");
    let text = format!("{err:#}");
    assert!(
        text.contains(&port.to_string()) || text.contains("embedded broker"),
        "{text}"
    );
}

#[tokio::test]
async fn run_refuses_what_check_config_refuses() {
    let env = vec![
        (
            "RTCAM__CAPTURE__SOURCE".to_string(),
            "test-pattern".to_string(),
        ),
        (
            "RTCAM__MQTT__PASSWORD_FILE".into(),
            "/nonexistent/rtcam-mqtt-password".into(),
        ),
    ];
    let config = Config::load(&Sources {
        env,
        ..Default::default()
    })
    .unwrap();
    let checked = rtcam::preflight::check(&config, rtcam::preflight::Files::Check)
        .expect_err("check-config refuses a missing password file");
    let err = rtcam::app::run(config, CancellationToken::new())
        .await
        .expect_err("run refuses it too");
    let text = format!("{err:#}");
    assert!(text.contains("mqtt.password_file"), "{text}");
    assert_eq!(text, checked.to_string(), "the same error as check-config");
}
