use std::process::ExitCode;

use clap::{CommandFactory as _, Parser as _};
use memtrace::{
    agent::Agent,
    cli::{
        args::{CheckFormat, Cli, ClientArgs, Command, OutputArgs, OutputFormat},
        check,
        client::{self, Client},
        demo, demo_server, logging,
        settings::{AgentArgs, DEBUG_TOKEN_ENV},
        top,
    },
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Agent(args) => run_agent(*args),
        Command::Status { client, pid } => run_client(
            &client,
            |c| c.debug("status", pid, None),
            client::render_status,
        ),
        Command::Snapshot {
            client,
            pid,
            limit,
            sites,
            output,
        } => run_sites(
            &client,
            &output,
            "snapshot",
            pid,
            (limit, &sites.query(false)),
            client::render_snapshot,
        ),
        Command::Diff {
            client,
            pid,
            limit,
            sites,
            still_growing,
            output,
        } => run_sites(
            &client,
            &output,
            "diff",
            pid,
            (limit, &sites.query(still_growing)),
            client::render_diff,
        ),
        Command::Stop { client } => run_client(
            &client,
            |c| c.debug("stop", None, None),
            |_| "allocation-site collection stopped; programs detached\n".to_string(),
        ),
        Command::Requests { client, pid, limit } => run_client(
            &client,
            |c| c.get(&format!("/v1/workers/{pid}/requests?limit={limit}")),
            client::render_requests,
        ),
        Command::Routes { client, pid } => run_client(
            &client,
            |c| c.get(&format!("/v1/workers/{pid}/routes")),
            client::render_routes,
        ),
        Command::Top { client, interval } => {
            let c = Client::new(&client.url, std::env::var(DEBUG_TOKEN_ENV).ok());
            match top::run(c, interval) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Demo(args) => {
            let options = match args.options() {
                Ok(o) => o,
                Err(e) => return usage_error(e),
            };
            logging::init(logging::LogFormat::Pretty, "warn");
            match demo::run(&options) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::DemoServer {
            port,
            workers,
            leak_kb,
        } => match demo_server::run(port, workers, leak_kb * 1024) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Command::Check { format } => run_check(format),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "memtrace",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::ManPages { dir } => match clap_mangen::generate_to(Cli::command(), &dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(format_args!(
                "cannot write man pages to {}: {e}",
                dir.display()
            )),
        },
    }
}

/// `memtrace check`: exits non-zero only when the agent could not start.
fn run_check(format: CheckFormat) -> ExitCode {
    logging::init(logging::LogFormat::Pretty, "error");
    let report = match check::check() {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    match format {
        CheckFormat::Table => print!("{}", check::render(&report)),
        CheckFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        ),
    }
    if report.agent_can_start() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("memtrace: {e}");
    ExitCode::FAILURE
}

fn usage_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("memtrace: {e}");
    ExitCode::from(2)
}

/// Calls the agent's API and prints a table, or the JSON.
fn run_client(
    args: &ClientArgs,
    call: impl FnOnce(&Client) -> Result<serde_json::Value, client::ClientError>,
    render: impl FnOnce(&serde_json::Value) -> String,
) -> ExitCode {
    let c = Client::new(&args.url, std::env::var(DEBUG_TOKEN_ENV).ok());
    match call(&c) {
        Ok(body) if args.json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&body).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Ok(body) => {
            print!("{}", render(&body));
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// `snapshot` and `diff`: tables, JSON, or a profile the agent renders,
/// to standard output or a file.
fn run_sites(
    args: &ClientArgs,
    output: &OutputArgs,
    action: &str,
    pid: Option<u32>,
    (limit, sites): (usize, &str),
    render: impl FnOnce(&serde_json::Value) -> String,
) -> ExitCode {
    use std::io::{IsTerminal as _, Write as _};
    let Some(format) = output.format.api_name() else {
        let mut args = args.clone();
        args.json |= output.format == OutputFormat::Json;
        let Some(path) = &output.output else {
            return run_client(&args, |c| c.debug_sites(action, pid, limit, sites), render);
        };
        let c = Client::new(&args.url, std::env::var(DEBUG_TOKEN_ENV).ok());
        return match c.debug_sites(action, pid, limit, sites) {
            Ok(body) => {
                let text = if args.json {
                    serde_json::to_string_pretty(&body).unwrap_or_default() + "\n"
                } else {
                    render(&body)
                };
                write_output(path, text.as_bytes())
            }
            Err(e) => fail(e),
        };
    };
    if output.output.is_none() && format == "pprof" && std::io::stdout().is_terminal() {
        return usage_error("a pprof profile is binary: write it to a file with -o FILE");
    }
    // A file that cannot be written fails before the agent moves its
    // baseline; one created for the check goes again if the call fails.
    let mut created = false;
    if let Some(path) = &output.output {
        created = !path.exists();
        if let Err(e) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            return usage_error(format_args!("cannot write {}: {e}", path.display()));
        }
    }
    let c = Client::new(&args.url, std::env::var(DEBUG_TOKEN_ENV).ok());
    match c.debug_profile(action, pid, format, sites) {
        Ok(body) => match &output.output {
            Some(path) => write_output(path, &body),
            None => match std::io::stdout().write_all(&body) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(format_args!("cannot write to standard output: {e}")),
            },
        },
        Err(e) => {
            if let Some(path) = output.output.as_ref().filter(|_| created) {
                let _ = std::fs::remove_file(path);
            }
            fail(e)
        }
    }
}

fn write_output(path: &std::path::Path, body: &[u8]) -> ExitCode {
    match std::fs::write(path, body) {
        Ok(()) => {
            eprintln!("memtrace: wrote {} ({} bytes)", path.display(), body.len());
            ExitCode::SUCCESS
        }
        Err(e) => fail(format_args!("cannot write {}: {e}", path.display())),
    }
}

fn run_agent(args: AgentArgs) -> ExitCode {
    // Before any thread: the allocator of a process that runs for months.
    memtrace::agent::heap::tune();
    let resolved = match args.with_config_file().and_then(|a| a.resolve()) {
        Ok(r) => r,
        Err(e) => return usage_error(e),
    };
    logging::init(resolved.log_format, &resolved.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format_args!("cannot start the async runtime: {e}")),
    };
    runtime.block_on(async move {
        // Handlers first: a SIGTERM during start-up must stop us cleanly too.
        let shutdown = match shutdown_signal() {
            Ok(s) => s,
            Err(e) => return fail(format_args!("cannot install signal handlers: {e}")),
        };
        let agent = match Agent::start(resolved.settings) {
            Ok(agent) => agent,
            Err(e) => {
                tracing::error!(error = %e, "memtrace cannot start");
                return fail(e);
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
