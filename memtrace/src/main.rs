use std::process::ExitCode;

use clap::Parser as _;
use memtrace::{
    agent::Agent,
    cli::{Cli, Command},
    logging,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Agent(args) => run_agent(*args),
    }
}

fn run_agent(args: memtrace::cli::AgentArgs) -> ExitCode {
    let resolved = match args.with_config_file().and_then(|a| a.resolve()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("memtrace: {e}");
            return ExitCode::from(2);
        }
    };
    logging::init(resolved.log_format, &resolved.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("memtrace: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Handlers first: a SIGTERM during start-up must stop us cleanly too.
        let shutdown = match shutdown_signal() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("memtrace: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        let agent = match Agent::start(resolved.settings) {
            Ok(agent) => agent,
            Err(e) => {
                tracing::error!(error = %e, "memtrace cannot start");
                eprintln!("memtrace: {e}");
                return ExitCode::FAILURE;
            }
        };
        agent.run(shutdown).await;
        ExitCode::SUCCESS
    })
}

/// Installs SIGINT and SIGTERM handlers; the future completes on either.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; stopping"),
            _ = int.recv() => tracing::info!("SIGINT received; stopping"),
        }
    })
}
