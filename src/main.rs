//! rtcam command line: parse arguments, load config, set up logging, run the service, exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rtcam::config::{Config, SYSTEM_CONFIG_PATH, Sources};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    version,
    about = "Camera appliance: V4L2 → H.264 → WebRTC viewers, signaled over MQTT"
)]
struct Cli {
    /// Config file layered over the built-in defaults and /etc/rtcam/rtcam.toml.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the default).
    Run,
    /// Print the effective configuration, or what is wrong with it: its values, and the files
    /// and addresses they name, checked as `run` checks them.
    CheckConfig {
        /// Do not read the files the configuration names (password, certificates, TURN
        /// credentials, web.root): for image builds that install them later.
        #[arg(long)]
        no_files: bool,
    },
    /// Record N frames from the configured camera to an H.264 (Annex-B) file, then print a
    /// one-line JSON summary. Capture settings come from the configuration
    /// (e.g. RTCAM__CAPTURE__FORMAT=YUYV); camera failures are reported and retried.
    Record {
        /// Encoded frames to record.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        frames: u64,
        /// Output file (raw H.264 Annex-B, e.g. clip.h264; plays with ffplay/VLC).
        #[arg(long, short)]
        output: PathBuf,
        /// Set a camera control first, validated like `set-control` (repeatable).
        #[arg(long = "control", value_name = "NAME=VALUE", value_parser = rtcam::record::parse_control)]
        controls: Vec<(String, i64)>,
        /// Fail when the frames have not arrived within this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Tests: after this many frames a second subscriber joins, as a new viewer does,
        /// and records to --join-output (its preroll from the GOP cache included).
        #[arg(long, hide = true, requires = "join_output")]
        join_at: Option<u64>,
        #[arg(long, hide = true, requires = "join_at")]
        join_output: Option<PathBuf>,
    },
    /// Print the device's public identity key (auth.identity_key_path), the key viewers pin.
    Identity {
        /// Create the key file if it does not exist yet (run as the service's user).
        #[arg(long)]
        create: bool,
    },
    /// Owner keys and viewer credentials (docs/protocol.md §9).
    Token {
        #[command(subcommand)]
        command: rtcam::token::TokenCommand,
    },
    /// List the cameras, media-controller pipelines and encoders found here, and which camera
    /// format and encoder the configuration makes rtcam use, and why.
    Probe,
    /// Test helper (the VM tests): writes an H.264 clip into a V4L2 output device such as
    /// v4l2loopback, one access unit per buffer, paced, in a loop; prints its plan as JSON.
    #[command(hide = true)]
    FeedH264 {
        /// The loopback device.
        #[arg(long)]
        device: PathBuf,
        /// A raw Annex-B H.264 file starting with an IDR.
        #[arg(long)]
        clip: PathBuf,
        /// The clip's picture size, WIDTHxHEIGHT.
        #[arg(long, value_parser = parse_size)]
        size: (u32, u32),
        #[arg(long, default_value_t = 30)]
        fps: u32,
        /// After every N access units an extra buffer of garbage (0: none).
        #[arg(long, default_value_t = 0)]
        garbage_every: u32,
        /// Stop after this many seconds.
        #[arg(long, default_value_t = 120)]
        seconds: u64,
    },
    /// Diagnostic (the VM tests): camera -> V4L2 M2M encoder -> decoder with vicodec (FWHT);
    /// prints a JSON summary and writes the streams and decoded pictures.
    #[command(hide = true)]
    M2mCheck {
        /// The camera node (single-planar YU12, e.g. vivid).
        #[arg(long, default_value = "/dev/video0")]
        camera: PathBuf,
        /// Picture sizes, one segment each (repeatable), e.g. 640x480.
        #[arg(long = "size", value_parser = parse_size, required = true)]
        sizes: Vec<(u32, u32)>,
        /// Frames per size.
        #[arg(long, default_value_t = 30)]
        frames: u32,
        /// Keyframe interval (V4L2_CID_MPEG_VIDEO_GOP_SIZE).
        #[arg(long, default_value_t = 10)]
        gop: u32,
        /// "dmabuf" (import the camera's buffers) or "mmap" (copy into the encoder's).
        #[arg(long, default_value = "dmabuf", value_parser = ["dmabuf", "mmap"])]
        input: String,
        #[arg(long)]
        output_dir: PathBuf,
    },
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s
        .split_once('x')
        .ok_or_else(|| format!("{s:?}: expected WIDTHxHEIGHT"))?;
    Ok((
        w.parse().map_err(|e| format!("{s:?}: {e}"))?,
        h.parse().map_err(|e| format!("{s:?}: {e}"))?,
    ))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let sources = Sources {
        system_file: Some(PathBuf::from(SYSTEM_CONFIG_PATH)),
        explicit_file: cli.config,
        env: std::env::vars().collect(),
    };
    let config = match Config::load(&sources) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rtcam: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig { no_files } => {
            let files = match no_files {
                true => rtcam::preflight::Files::Skip,
                false => rtcam::preflight::Files::Check,
            };
            if let Err(e) = rtcam::preflight::check(&config, files) {
                eprintln!("rtcam: configuration error: {e}");
                return ExitCode::from(2);
            }
            print!("{}", config.to_toml());
            ExitCode::SUCCESS
        }
        Command::Run => run(config),
        Command::Identity { create } => print_outcome(rtcam::token::identity(&config, create)),
        Command::Token { command } => print_outcome(rtcam::token::run(&config, &command)),
        Command::Probe => {
            print!("{}", rtcam::probe::report(&config));
            ExitCode::SUCCESS
        }
        Command::FeedH264 {
            device,
            clip,
            size,
            fps,
            garbage_every,
            seconds,
        } => {
            let options = rtcam::feed_h264::FeedOptions {
                device,
                clip,
                width: size.0,
                height: size.1,
                fps,
                garbage_every,
                duration: std::time::Duration::from_secs(seconds),
            };
            match rtcam::feed_h264::run(&options) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("rtcam feed-h264: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::M2mCheck {
            camera,
            sizes,
            frames,
            gop,
            input,
            output_dir,
        } => {
            rtcam::logging::init(&config.log.level, rtcam::config::LogTarget::Stderr);
            let options = rtcam::m2m_check::CheckOptions {
                camera,
                sizes,
                frames,
                gop,
                dmabuf: input == "dmabuf",
                output_dir,
            };
            match rtcam::m2m_check::run(&options) {
                Ok(summary) => match serde_json::to_string(&summary) {
                    Ok(line) => {
                        println!("{line}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("rtcam: cannot print the summary: {e}");
                        ExitCode::FAILURE
                    }
                },
                Err(e) => {
                    eprintln!("rtcam m2m-check: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Record {
            frames,
            output,
            controls,
            timeout,
            join_at,
            join_output,
        } => record(
            config,
            rtcam::record::RecordOptions {
                frames,
                output,
                controls,
                timeout: std::time::Duration::from_secs(timeout),
                join: join_at.zip(join_output).map(|(after_frames, output)| {
                    rtcam::record::JoinOptions {
                        after_frames,
                        output,
                    }
                }),
            },
        ),
    }
}

/// Prints a key/credential command's result: stdout, notes on stderr, or the error.
fn print_outcome(outcome: anyhow::Result<rtcam::token::Outcome>) -> ExitCode {
    match outcome {
        Ok(out) => {
            eprint!("{}", out.stderr);
            print!("{}", out.stdout);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rtcam: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn record(config: Config, options: rtcam::record::RecordOptions) -> ExitCode {
    // A command-line tool: log to stderr whatever the service's log target is.
    rtcam::logging::init(&config.log.level, rtcam::config::LogTarget::Stderr);
    let frames = options.frames;
    let summary = block_on_until_signal(|cancel| async move {
        rtcam::record::record(&config, &options, cancel).await
    });
    let Some(summary) = summary else {
        return ExitCode::FAILURE;
    };
    match serde_json::to_string(&summary) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("rtcam: cannot print the summary: {e}"),
    }
    if summary.complete {
        ExitCode::SUCCESS
    } else {
        eprintln!("rtcam: recorded {} of {frames} frames", summary.frames);
        ExitCode::FAILURE
    }
}

fn run(config: Config) -> ExitCode {
    rtcam::logging::init(&config.log.level, config.log.target);
    match block_on_until_signal(|cancel| rtcam::app::run(config, cancel)) {
        Some(()) => ExitCode::SUCCESS,
        None => ExitCode::FAILURE,
    }
}

/// Runs `work` on the async runtime with a cancellation token that SIGINT or SIGTERM fires;
/// `None` (reported) when the runtime cannot start or `work` fails.
fn block_on_until_signal<T, F>(work: impl FnOnce(CancellationToken) -> F) -> Option<T>
where
    F: std::future::Future<Output = anyhow::Result<T>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rtcam: cannot start the async runtime: {e}");
            return None;
        }
    };
    let cancel = CancellationToken::new();
    let result = runtime.block_on(async {
        let signals = tokio::spawn(shutdown_on_signal(cancel.clone()));
        let result = work(cancel).await;
        signals.abort();
        result
    });
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("rtcam: {e:#}");
            None
        }
    }
}

/// SIGINT or SIGTERM cancels the root token.
async fn shutdown_on_signal(cancel: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        tracing::error!("cannot install the SIGTERM handler");
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
        _ = term.recv() => tracing::info!("SIGTERM"),
    }
    cancel.cancel();
}
