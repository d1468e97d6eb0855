//! Logging setup: journald when running under systemd with a journal, else stderr.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogTarget;

/// Third-party log lines that come with every viewer or client and ask nothing of the
/// operator, and the level each target is held to (config/default.toml says why for each).
const QUIET_TARGETS: [(&str, &str); 4] = [
    ("rtc_dtls::config", "error"),
    ("rtc_ice::agent", "error"),
    ("rtc_sctp::endpoint", "error"),
    ("rumqttd", "off"),
];

/// webrtc-rs's SCTP logs an ABORT from the viewer as an ERROR ("handle_inbound got err: abort
/// chunk, ..."), but aiortc and browsers end every association that way when they close, even
/// after a `bye`: routine, and rtcam logs the session's end itself. Only that one line is
/// dropped; any other error of `rtc_sctp::association` is kept.
const PEER_ABORT_TARGET: &str = "rtc_sctp::association";
const PEER_ABORT_MESSAGE: &str = "handle_inbound got err: abort chunk";

/// Drops webrtc-rs's ERROR for an SCTP association the viewer ended with an ABORT (see
/// [`PEER_ABORT_MESSAGE`]) before any layer writes it.
struct PeerAbortIsNoError;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for PeerAbortIsNoError {
    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        !is_peer_abort(event)
    }
}

fn is_peer_abort(event: &tracing::Event<'_>) -> bool {
    /// The message, and the `log` crate's target: rtc-sctp logs through `log`, whose records
    /// reach tracing (tracing-log, installed by `try_init`) as events of target `log`
    /// carrying the real target in a `log.target` field.
    #[derive(Default)]
    struct Fields {
        abort_message: bool,
        log_target: Option<String>,
    }
    impl tracing::field::Visit for Fields {
        fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
            if field.name() == "log.target" {
                self.log_target = Some(value.to_owned());
            }
        }
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                self.abort_message = format!("{value:?}").starts_with(PEER_ABORT_MESSAGE);
            }
        }
    }
    let meta = event.metadata();
    if *meta.level() != tracing::Level::ERROR
        || (meta.target() != PEER_ABORT_TARGET && meta.target() != "log")
    {
        return false;
    }
    let mut fields = Fields::default();
    event.record(&mut fields);
    let target = match fields.log_target.as_deref() {
        Some(real) if meta.target() == "log" => real,
        _ => meta.target(),
    };
    target == PEER_ABORT_TARGET && fields.abort_message
}

/// The filter actually installed: `level` plus the [`QUIET_TARGETS`] it does not decide
/// itself, so that an operator's plain `log.level = "info"` keeps a normal run free of
/// WARN and ERROR lines too. `level` decides a quiet target when it names that target, or
/// names a target containing it at `debug` or `trace` (someone debugging `rtc_ice` sees all
/// of `rtc_ice::agent`).
pub(crate) fn effective_filter(level: &str) -> String {
    let directives: Vec<(&str, &str)> = level
        .split(',')
        .filter_map(|d| d.split_once('='))
        .map(|(target, lvl)| {
            let target = target.split('[').next().unwrap_or(target).trim();
            (target, lvl.trim())
        })
        .collect();
    let mut filter = level.to_owned();
    for (quiet, quiet_level) in QUIET_TARGETS {
        let decided = directives.iter().any(|&(target, lvl)| {
            target == quiet
                || (!target.is_empty()
                    && quiet.starts_with(target)
                    && matches!(lvl.to_ascii_lowercase().as_str(), "debug" | "trace"))
        });
        if !decided {
            filter.push_str(&format!(",{quiet}={quiet_level}"));
        }
    }
    filter
}

/// Installs the global subscriber. `level` is a tracing filter (validated by the config).
pub fn init(level: &str, target: LogTarget) {
    let filter =
        EnvFilter::try_new(effective_filter(level)).unwrap_or_else(|_| EnvFilter::new("info"));
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
                    .with(PeerAbortIsNoError)
                    .with(layer)
                    .try_init();
                return;
            }
            Err(e) => eprintln!("rtcam: journald unavailable ({e}); logging to stderr"),
        }
    }
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(PeerAbortIsNoError)
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

    /// Counts the events that reach the layers after [`super::PeerAbortIsNoError`].
    struct Count(std::sync::Arc<std::sync::atomic::AtomicUsize>);
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Count {
        fn on_event(
            &self,
            _event: &tracing::Event<'_>,
            _ctx: tracing_subscriber::layer::Context<'_, S>,
        ) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Runs `events` with [`super::PeerAbortIsNoError`] installed; `count()` says how many
    /// events got past it so far.
    fn behind_the_filter(events: impl FnOnce(&dyn Fn() -> usize)) {
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let subscriber = tracing_subscriber::registry()
            .with(super::PeerAbortIsNoError)
            .with(Count(seen.clone()));
        let count = || seen.load(std::sync::atomic::Ordering::Relaxed);
        tracing::subscriber::with_default(subscriber, || events(&count));
    }

    #[test]
    fn a_viewer_ending_sctp_with_an_abort_is_not_logged_as_an_error() {
        behind_the_filter(|count| {
            // The line as rtc-sctp 0.21 writes it (`Error::ErrAbortChunk` formatted after it).
            let err = "abort chunk, with following errors: ";
            tracing::error!(target: "rtc_sctp::association", "handle_inbound got err: {}", err);
            assert_eq!(count(), 0, "the viewer's ABORT is routine");
            // Any other error of the association, or the same words elsewhere, still shows.
            tracing::error!(target: "rtc_sctp::association", "handle_inbound got err: {}", "bad chunk");
            assert_eq!(count(), 1);
            tracing::error!(target: "rtcam::viewer", "handle_inbound got err: {}", err);
            assert_eq!(count(), 2);
            tracing::warn!(target: "rtc_sctp::association", "handle_inbound got err: {}", err);
            assert_eq!(count(), 3);
        });
    }

    #[test]
    fn the_abort_is_dropped_when_it_comes_through_the_log_crate_as_rtc_sctp_writes_it() {
        // rtc-sctp logs with `log`; `try_init` bridges it to tracing (tracing-log 0.2's
        // `dispatch_record`): the event's own target is `log`, the real one is the
        // `log.target` field, the message the `message` field. These events have that shape.
        // Without this the line reached the journal (the systemd VM test caught it once).
        behind_the_filter(|count| {
            let err = "abort chunk, with following errors: ";
            let sctp = "rtc_sctp::association";
            tracing::event!(target: "log", Level::ERROR, log.target = sctp, "handle_inbound got err: {}", err);
            assert_eq!(count(), 0, "the viewer's ABORT through log is routine too");
            tracing::event!(target: "log", Level::ERROR, log.target = sctp, "handle_inbound got err: bad chunk");
            assert_eq!(count(), 1);
            let endpoint = "rtc_sctp::endpoint";
            tracing::event!(target: "log", Level::ERROR, log.target = endpoint, "handle_inbound got err: {}", err);
            assert_eq!(count(), 2);
            tracing::error!(target: "log", "handle_inbound got err: {}", err);
            assert_eq!(count(), 3, "no log.target: not rtc-sctp's");
            tracing::event!(target: "log", Level::WARN, log.target = sctp, "handle_inbound got err: {}", err);
            assert_eq!(count(), 4);
        });
    }

    #[test]
    fn a_plain_level_is_kept_quiet_where_it_does_not_decide() {
        let f = super::effective_filter("info");
        assert_eq!(
            f,
            "info,rtc_dtls::config=error,rtc_ice::agent=error,rtc_sctp::endpoint=error,rumqttd=off"
        );
        let subscriber = tracing_subscriber::registry().with(EnvFilter::new(&f));
        tracing::subscriber::with_default(subscriber, || {
            assert!(tracing::enabled!(target: "rtcam::app", Level::INFO));
            assert!(tracing::enabled!(target: "rtc_ice::candidate", Level::INFO));
            assert!(!tracing::enabled!(target: "rtc_ice::agent", Level::WARN));
            assert!(!tracing::enabled!(target: "rumqttd::server::broker", Level::ERROR));
        });
        // Named, or debugged through a containing target: the operator's choice stands.
        let f = super::effective_filter("info,rtc_ice=debug,rtc_sctp::endpoint=warn");
        assert_eq!(
            f,
            "info,rtc_ice=debug,rtc_sctp::endpoint=warn,rtc_dtls::config=error,rumqttd=off"
        );
        // A containing target at warn does not decide: the three stay error-only.
        let f = super::effective_filter("info,rtc=warn");
        assert!(f.ends_with(",rtc_sctp::endpoint=error,rumqttd=off"), "{f}");
        // The shipped default names all four: nothing is added.
        let config = crate::config::Config::load(&crate::config::Sources::default())
            .expect("built-in defaults load");
        assert_eq!(super::effective_filter(&config.log.level), config.log.level);
    }

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
