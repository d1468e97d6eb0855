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
    /// Print the effective configuration, or what is wrong with it.
    CheckConfig,
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
        Command::CheckConfig => {
            print!("{}", config.to_toml());
            ExitCode::SUCCESS
        }
        Command::Run => run(config),
    }
}

fn run(config: Config) -> ExitCode {
    rtcam::logging::init(&config.log.level, config.log.target);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rtcam: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cancel = CancellationToken::new();
    let result = runtime.block_on(async {
        tokio::spawn(shutdown_on_signal(cancel.clone()));
        rtcam::service::run(config, cancel).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("rtcam: {e:#}");
            ExitCode::FAILURE
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
