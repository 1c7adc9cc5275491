//! `authinfod`: the terminal daemon and its client commands. Parses the command line, reads
//! the environment, and maps every error to an exit code; the work is in the library.

use std::io::{IsTerminal as _, Read as _};
use std::process::ExitCode;

use anyhow::Context as _;
use authinfod::terminal::{self, client, config, keygen};
use clap::Parser as _;

// The clap definitions, in their own file so that examples/gen-docs.rs can include them too.
#[path = "authinfod/cli.rs"]
mod cli;
use cli::{Cli, Command, SocketArgs, exit};

fn main() -> ExitCode {
    // The store's probe: the daemon runs its own binary as a child that only opens sled, after a
    // start died inside sled's open (terminal::store). Not a subcommand: nobody else runs it.
    if let Some(state_dir) = std::env::var_os(terminal::store::PROBE_ENV) {
        let parent = std::env::var(terminal::store::PROBE_PARENT_ENV)
            .ok()
            .and_then(|p| p.parse().ok());
        return ExitCode::from(terminal::store::probe_child(
            std::path::Path::new(&state_dir),
            parent,
        ));
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run(&config),
        Command::CheckConfig { file } => check_config(&file),
        Command::Keygen {
            out,
            force,
            device_id,
        } => match keygen::keygen(&out, force) {
            Ok(public) => {
                print!("{}", keygen::enrolment_text(&public, device_id.as_deref()));
                eprintln!("wrote the private key to {} (mode 0600)", out.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => Err(anyhow::Error::new(e)),
        },
        Command::Status { json, socket } => client_command(socket, |addr| status(addr, json)),
        Command::Get { socket } => client_command(socket, get),
        Command::Refresh { wait, socket } => {
            client_command(socket, move |addr| refresh(addr, wait))
        }
        Command::PutRawData { raw_data, socket } => {
            let raw = match raw_data {
                Some(r) => r,
                None => {
                    if std::io::stdin().is_terminal() {
                        eprintln!("reading raw_data from standard input (end with Ctrl-D)");
                    }
                    let mut s = String::new();
                    if let Err(e) = std::io::stdin().read_to_string(&mut s) {
                        eprintln!("authinfod: cannot read standard input: {e}");
                        return ExitCode::from(exit::FAILURE);
                    }
                    s
                }
            };
            client_command(socket, move |addr| put_raw_data(addr, raw))
        }
        #[cfg(feature = "merchant")]
        Command::Demo { duration } => demo(&duration),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("authinfod: {}", authinfod::error_chain(err.as_ref()));
            ExitCode::from(exit_code(&err))
        }
    }
}

/// The one function from error to exit code.
fn exit_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<config::ConfigError>().is_some() {
        return exit::CONFIG;
    }
    if let Some(e) = err.downcast_ref::<terminal::DaemonError>() {
        return if e.is_config() {
            exit::CONFIG
        } else {
            exit::FAILURE
        };
    }
    if let Some(client::ClientError::Connect { .. }) = err.downcast_ref::<client::ClientError>() {
        return exit::UNAVAILABLE;
    }
    exit::FAILURE
}

/// Logs to journald or stderr; `RUST_LOG` overrides `default`.
fn init_logging(identifier: &str, default: &str) {
    let journal = std::env::var("JOURNAL_STREAM").ok();
    let filter = std::env::var("RUST_LOG").ok();
    authinfod::logging::init(
        authinfod::logging::detect(journal.as_deref()),
        filter.as_deref(),
        default,
        identifier,
    );
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run(config_path: &std::path::Path) -> anyhow::Result<ExitCode> {
    // Everything the daemon creates (store, socket before its chmod) is private by default.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    init_logging("authinfod", "info");
    let config = config::load(config_path)?;
    // A panic inside sled's open aborts this (release) build; the next start must know.
    terminal::store::record_panics_while_opening(&config.state_dir);
    let options = terminal::RunOptions {
        notifier: terminal::systemd::Notifier::new(std::env::var_os("NOTIFY_SOCKET")),
        watchdog: watchdog_period(),
        // Without it (no /proc), deaths inside sled's open are counted instead.
        store_probe: std::env::current_exe().ok(),
        ..terminal::RunOptions::default()
    };
    runtime()?.block_on(async {
        let daemon = terminal::Daemon::start(config, options).await?;
        daemon.run(shutdown_signal()).await;
        Ok(ExitCode::SUCCESS)
    })
}

/// systemd's watchdog period, when it is enabled for this process.
fn watchdog_period() -> Option<std::time::Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    match std::env::var("WATCHDOG_PID").ok() {
        Some(pid) if pid.parse::<u32>().ok() != Some(std::process::id()) => None,
        _ => Some(std::time::Duration::from_micros(usec)),
    }
}

/// Resolves on SIGTERM or SIGINT, after logging which. SIGHUP (which would otherwise kill the
/// process) is logged and ignored: the config is read once, at start.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    let reason = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => tracing::info!(
                "SIGHUP ignored: config changes take effect on restart (systemctl restart authinfod)"
            ),
        }
    };
    tracing::info!(signal = reason, "stopping");
}

fn check_config(file: &std::path::Path) -> anyhow::Result<ExitCode> {
    let config = config::load(file)?;
    println!(
        "{} is valid: device {}, proxy {}, socket {}, refresh every {}",
        file.display(),
        config.device_id,
        config.proxy.url,
        config.socket.address,
        authinfod::units::format_duration(config.refresh.interval)
    );
    Ok(ExitCode::SUCCESS)
}

fn client_command<F, Fut>(socket: SocketArgs, f: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(config::SocketAddress) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<ExitCode>>,
{
    let address = match socket.socket {
        Some(s) => {
            config::SocketAddress::parse(&s).map_err(|e| anyhow::anyhow!("--socket: {e}"))?
        }
        None => config::client_socket(&socket.config),
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(f(address))
}

async fn status(address: config::SocketAddress, json: bool) -> anyhow::Result<ExitCode> {
    let doc = client::status(&address).await?;
    if json {
        println!("{}", serde_json::to_string(&doc)?);
    } else {
        print!("{}", client::render_status(&doc));
    }
    Ok(ExitCode::SUCCESS)
}

async fn get(address: config::SocketAddress) -> anyhow::Result<ExitCode> {
    let Some(doc) = client::authinfo(&address).await? else {
        eprintln!("authinfod: no authinfo has been fetched yet");
        return Ok(ExitCode::from(exit::NO_AUTHINFO));
    };
    println!("{}", doc.authinfo);
    if doc.state == terminal::doc::Freshness::Expired {
        eprintln!("authinfod: warning: this authinfo is expired");
        return Ok(ExitCode::from(exit::NO_AUTHINFO));
    }
    Ok(ExitCode::SUCCESS)
}

async fn refresh(address: config::SocketAddress, wait: bool) -> anyhow::Result<ExitCode> {
    if !wait {
        client::request_refresh(&address).await?;
        println!("refresh requested");
        return Ok(ExitCode::SUCCESS);
    }
    match client::refresh_and_wait(&address).await {
        Ok(done) => {
            println!(
                "refreshed: authinfo {} ({}), expires {}",
                done.fingerprint,
                done.state.as_str(),
                done.expires_at
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(client::ClientError::Refused { code, message, .. }) => {
            eprintln!("authinfod: refresh failed ({code}): {message}");
            Ok(ExitCode::from(exit::NO_AUTHINFO))
        }
        Err(e) => Err(e.into()),
    }
}

async fn put_raw_data(address: config::SocketAddress, raw: String) -> anyhow::Result<ExitCode> {
    let accepted = client::put_raw_data(&address, raw.trim()).await?;
    println!(
        "raw_data accepted{}{}",
        if accepted.refresh_triggered {
            "; refresh triggered"
        } else {
            ""
        },
        if accepted.persisted {
            ""
        } else {
            "; NOT persisted: the store is not persisting (see authinfod status)"
        }
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "merchant")]
fn demo(duration: &str) -> anyhow::Result<ExitCode> {
    let duration = authinfod::units::parse_duration(duration)
        .map_err(|e| anyhow::anyhow!("--duration: {e}"))?;
    // The story is the output; only warnings and errors of the parts are logged beside it.
    init_logging("authinfod-demo", "warn");
    let mut out = std::io::stdout();
    runtime()?.block_on(authinfod::demo::run(duration, shutdown_signal(), &mut out))?;
    Ok(ExitCode::SUCCESS)
}
