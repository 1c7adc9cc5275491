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

#[path = "shared/mod.rs"]
mod shared;
use shared::{init_logging, runtime};

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
        Command::Run {
            config,
            once: false,
        } => run(&config),
        Command::Run { config, once: true } => run_once(&config),
        Command::CheckConfig { file } => check_config(&file),
        Command::Keygen {
            out,
            pkcs11,
            force,
            device_id,
        } => keygen(
            out.as_deref(),
            pkcs11.as_deref(),
            force,
            device_id.as_deref(),
        ),
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

/// `keygen`: a key file at `out`, or a key inside the token the `pkcs11` URI names (clap
/// requires exactly one).
fn keygen(
    out: Option<&std::path::Path>,
    pkcs11: Option<&str>,
    force: bool,
    device_id: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let (public, made) = match (out, pkcs11) {
        (Some(out), _) => (
            keygen::keygen(out, force)?,
            format!("wrote the private key to {} (mode 0600)", out.display()),
        ),
        (None, Some(uri)) => {
            let (public, uri) = keygen::keygen_in_token(uri, force)?;
            (
                public,
                format!(
                    "generated the private key inside the token (sensitive, not extractable); in authinfod.toml:\nkey_file = \"{uri}\""
                ),
            )
        }
        (None, None) => anyhow::bail!("give --out FILE or --pkcs11 URI"),
    };
    print!("{}", keygen::enrolment_text(&public, device_id));
    eprintln!("{made}");
    Ok(ExitCode::SUCCESS)
}

/// The one function from error to exit code.
fn exit_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<config::ConfigError>().is_some() {
        return exit::CONFIG;
    }
    // keygen --pkcs11 with a URI or token that cannot be used: fixing the URI (or the token
    // setup it names) is the cure, as for a config.
    if let Some(e) = err.downcast_ref::<keygen::KeygenError>() {
        return if e.is_config() {
            exit::CONFIG
        } else {
            exit::FAILURE
        };
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

fn run(config_path: &std::path::Path) -> anyhow::Result<ExitCode> {
    // Everything the daemon creates (store, socket before its chmod) is private by default.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let log = init_logging("authinfod", config::DEFAULT_LOG_LEVEL);
    // The key opened here is the daemon's: a PKCS#11 token is logged in to once per start.
    let (config, key) = config::load_for_run(config_path)?;
    // Checked by the config already; `$RUST_LOG`, when set, wins.
    if let Err(error) = log.apply(&config.log_level) {
        tracing::warn!(%error, "log_level not applied");
    }
    // A panic inside sled's open aborts this (release) build; the next start must know.
    terminal::store::record_panics_while_opening(&config.state_dir);
    let options = terminal::RunOptions {
        notifier: terminal::systemd::Notifier::new(std::env::var_os("NOTIFY_SOCKET")),
        watchdog: watchdog_period(),
        log,
        // Without it (no /proc), deaths inside sled's open are counted instead.
        store_probe: std::env::current_exe().ok(),
        ..terminal::RunOptions::default()
    };
    runtime()?.block_on(async {
        // Before the socket is bound and READY=1 sent: SIGHUP's default action would kill us.
        let signals = Signals::install();
        let daemon = terminal::Daemon::start_with_key(config, key, options).await?;
        let reloader = daemon.reloader();
        daemon.run(signals.until_stopped(Some(reloader))).await;
        Ok(ExitCode::SUCCESS)
    })
}

fn run_once(config_path: &std::path::Path) -> anyhow::Result<ExitCode> {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    init_logging("authinfod", "warn");
    let (config, key) = config::load_for_run(config_path)?;
    let report = runtime()?.block_on(terminal::run_once_with_key(
        config,
        key,
        terminal::RunOptions::default(),
    ))?;
    for (check, result) in &report.health {
        match result {
            Ok(()) => println!("health {}: ok", check.name()),
            Err(_) => println!("health {}: not fetched (see the log above)", check.name()),
        }
    }
    let fetched = report.refresh == terminal::refresher::Outcome::Fetched;
    match (&report.held, report.record.as_deref()) {
        (Some(held), _) if fetched => {
            println!(
                "authinfo {} fetched and stored, valid until {}",
                held.fingerprint,
                authinfod::units::rfc3339(held.held.expires_at)
            );
            Ok(ExitCode::SUCCESS)
        }
        (_, record) => {
            let why = record
                .and_then(|r| r.error.clone())
                .unwrap_or_else(|| "the refresh did not run".into());
            let code = record.and_then(|r| r.code.clone()).unwrap_or_default();
            eprintln!("authinfod: the refresh failed ({code}): {why}");
            Ok(ExitCode::from(exit::NO_AUTHINFO))
        }
    }
}

/// systemd's watchdog period, when it is enabled for this process.
fn watchdog_period() -> Option<std::time::Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    match std::env::var("WATCHDOG_PID").ok() {
        Some(pid) if pid.parse::<u32>().ok() != Some(std::process::id()) => None,
        _ => Some(std::time::Duration::from_micros(usec)),
    }
}

/// The signals the daemon acts on: SIGTERM and SIGINT stop it, SIGHUP reloads the config.
struct Signals(
    Option<(
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
    )>,
);

impl Signals {
    fn install() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(term), Ok(int), Ok(hup)) => Self(Some((term, int, hup))),
            _ => {
                tracing::error!("cannot install signal handlers; stop with SIGKILL");
                Self(None)
            }
        }
    }

    /// Resolves on SIGTERM or SIGINT, after logging which; each SIGHUP reloads the config
    /// (`systemctl reload authinfod`).
    async fn until_stopped(self, reloader: Option<std::sync::Arc<terminal::reload::Reloader>>) {
        let Some((mut term, mut int, mut hup)) = self.0 else {
            return std::future::pending().await;
        };
        let reason = loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = hup.recv() => match &reloader {
                    Some(reloader) => drop(reloader.reload_and_log()),
                    None => tracing::info!("SIGHUP ignored: nothing to reload"),
                },
            }
        };
        tracing::info!(signal = reason, "stopping");
    }
}

fn check_config(file: &std::path::Path) -> anyhow::Result<ExitCode> {
    // The file, and what `run` checks at start (the key, the state directory): a config that
    // passes here starts.
    let (config, key) = config::load_for_run(file)?;
    for warning in key.warnings() {
        eprintln!("authinfod: warning: key_file: {warning}");
    }
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
    let result = if wait {
        client::refresh_and_wait(&address).await.map(Some)
    } else {
        client::request_refresh(&address).await.map(|()| None)
    };
    match result {
        Ok(None) => {
            println!("refresh requested");
            Ok(ExitCode::SUCCESS)
        }
        Ok(Some(done)) => {
            println!(
                "refreshed: authinfo {} ({}), expires {}",
                done.fingerprint,
                done.state.as_str(),
                done.expires_at
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(client::ClientError::Refused {
            status: 429,
            message,
            retry_after_seconds,
            ..
        }) => {
            let now = authinfod::units::unix_now();
            eprintln!(
                "authinfod: {}",
                client::render_refresh_held(&message, retry_after_seconds, now)
            );
            Ok(ExitCode::from(exit::TEMPFAIL))
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
    // The signal handlers need the runtime's reactor: installed inside it.
    runtime()?.block_on(async {
        let stopped = Signals::install().until_stopped(None);
        authinfod::demo::run(duration, stopped, &mut out).await
    })?;
    Ok(ExitCode::SUCCESS)
}
