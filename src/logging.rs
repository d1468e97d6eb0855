//! Logging setup: journald when running under systemd with a journal, else stderr.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogTarget;

/// Installs the global subscriber. `level` is a tracing filter (validated by the config).
pub fn init(level: &str, target: LogTarget) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let use_journald = match target {
        LogTarget::Journald => true,
        LogTarget::Stderr => false,
        LogTarget::Auto => under_journal,
    };
    if use_journald {
        match tracing_journald::layer() {
            Ok(layer) => {
                let _ = tracing_subscriber::registry()
                    .with(filter)
                    .with(layer)
                    .try_init();
                return;
            }
            Err(e) => eprintln!("rtcam: journald unavailable ({e}); logging to stderr"),
        }
    }
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(
                    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
                ),
        )
        .try_init();
}

#[cfg(test)]
mod tests {
    use tracing::Level;
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn default_level_keeps_rtcam_info_and_quietens_the_webrtc_stack() {
        let config = crate::config::Config::load(&crate::config::Sources::default())
            .expect("built-in defaults load");
        let subscriber = tracing_subscriber::registry().with(EnvFilter::new(&config.log.level));
        tracing::subscriber::with_default(subscriber, || {
            assert!(tracing::enabled!(target: "rtcam::app", Level::INFO));
            assert!(!tracing::enabled!(target: "rtcam::app", Level::DEBUG));
            assert!(!tracing::enabled!(target: "rtc::peer_connection", Level::INFO));
            assert!(!tracing::enabled!(target: "rtc_ice::agent", Level::INFO));
            assert!(!tracing::enabled!(target: "webrtc::peer_connection", Level::INFO));
            // Real warnings of the stack stay on; the three noisy targets only show errors,
            // and the demo broker is silent.
            assert!(tracing::enabled!(target: "rtc_ice::candidate", Level::WARN));
            assert!(tracing::enabled!(target: "webrtc::peer_connection", Level::WARN));
            assert!(!tracing::enabled!(target: "rtc_ice::agent", Level::WARN));
            assert!(tracing::enabled!(target: "rtc_ice::agent", Level::ERROR));
            assert!(!tracing::enabled!(target: "rtc_dtls::config", Level::WARN));
            assert!(tracing::enabled!(target: "rtc_dtls::config", Level::ERROR));
            assert!(!tracing::enabled!(target: "rtc_sctp::endpoint", Level::WARN));
            assert!(tracing::enabled!(target: "rtc_sctp::endpoint", Level::ERROR));
            assert!(!tracing::enabled!(target: "rumqttd::server::broker", Level::ERROR));
        });
    }
}
