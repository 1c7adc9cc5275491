//! `authinfo-proxy`: the merchant's signing proxy. Parses the command line, reads the
//! environment, and maps every error to an exit code; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use authinfod::proxy::{self, config};
use clap::{Parser, Subcommand};

/// EX_CONFIG: the configuration (or a file it names) is invalid.
const EXIT_CONFIG: u8 = 78;
/// EX_UNAVAILABLE: the running proxy cannot be reached.
const EXIT_UNAVAILABLE: u8 = 69;

#[derive(Debug, Parser)]
#[command(
    name = "authinfo-proxy",
    version,
    about = "The merchant's signing proxy: authenticates terminals and signs their own calls to WeChat Pay, Alipay and Alibaba Cloud.",
    after_help = "Exit codes: 0 ok, 1 failure, 2 usage, 69 proxy unreachable, 78 bad config."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve terminals (HTTPS) and the admin listener; SIGHUP reloads the registry.
    Serve {
        #[arg(long, short, default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate a config file (keys loaded, permissions checked) and its registry; list every problem.
    CheckConfig {
        #[arg(default_value = config::DEFAULT_CONFIG_PATH)]
        file: PathBuf,
    },
    /// Print the merchant's fleet as WeChat Pay lists it (from the running proxy's cache).
    Devices {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Page WeChat Pay's list now, within its limits and the merchant's daily budget: the
        /// running proxy does it (admin listener) when it answers, else this command on the
        /// proxy's store.
        #[arg(long)]
        live: bool,
        #[arg(long, short, default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Download WeChat Pay's platform certificates now (with `[wechatpay] apiv3_key_file`), verify
    /// them and print each serial and validity; changes nothing the running proxy keeps.
    Certificates {
        /// Also write them as one PEM file (what `[wechatpay] platform_certificates` reads).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, short, default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Run the simulated platforms and write a ready proxy config, registry and terminal config
    /// (with fresh keys) into DIR, for trying `serve` and `authinfod run` against them.
    Sandbox {
        #[arg(long)]
        dir: PathBuf,
        /// Where the simulated platforms listen.
        #[arg(long, default_value = "127.0.0.1:8600")]
        listen: String,
        /// Where the written proxy config makes the proxy listen.
        #[arg(long, default_value = "127.0.0.1:8443")]
        proxy_listen: String,
        /// Extra devices in the simulated WeChat Pay fleet list.
        #[arg(long, default_value_t = 250)]
        devices: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(&config),
        Command::CheckConfig { file } => check_config(&file),
        Command::Devices { json, live, config } => devices(&config, json, live),
        Command::Certificates { out, config } => certificates(&config, out.as_deref()),
        Command::Sandbox {
            dir,
            listen,
            proxy_listen,
            devices,
        } => sandbox(&dir, &listen, &proxy_listen, devices),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("authinfo-proxy: {}", authinfod::error_chain(err.as_ref()));
            let config_error = err.downcast_ref::<config::ConfigError>().is_some()
                || err
                    .downcast_ref::<proxy::registry::RegistryError>()
                    .is_some()
                || err
                    .downcast_ref::<proxy::ProxyError>()
                    .is_some_and(proxy::ProxyError::is_config);
            ExitCode::from(if config_error { EXIT_CONFIG } else { 1 })
        }
    }
}

fn init_logging(default: &str) {
    let journal = std::env::var("JOURNAL_STREAM").ok();
    let filter = std::env::var("RUST_LOG").ok();
    authinfod::logging::init(
        authinfod::logging::detect(journal.as_deref()),
        filter.as_deref(),
        default,
        "authinfo-proxy",
    );
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Resolves on SIGTERM or SIGINT, after logging which.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    let reason = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = reason, "stopping");
}

fn serve(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    init_logging("info");
    let config = config::load(path)?;
    runtime()?.block_on(proxy::run(config, shutdown_signal()))?;
    Ok(ExitCode::SUCCESS)
}

fn check_config(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let config = config::load(path)?;
    let registry = proxy::registry::Registry::load(&config.registry)?;
    println!(
        "{} is valid: listen {}, admin {}, {} enrolled device(s), WeChat Pay {} (mchid {}, serial {}, answers verified with {}), Alipay {}, Alibaba Cloud {}, fleet sync {}, egress {}, trust {:?}",
        path.display(),
        config.listen,
        config.admin_listen,
        registry.len(),
        config.wechatpay.base_url,
        config.wechatpay.mchid,
        config.wechatpay.merchant_serial,
        {
            let configured = config
                .wechatpay
                .platform_keys
                .serials()
                .collect::<Vec<_>>()
                .join(", ");
            match (configured.is_empty(), config.wechatpay.apiv3_key.is_some()) {
                (true, _) => "platform certificates downloaded with the APIv3 key".to_owned(),
                (false, true) => {
                    format!("{configured} and platform certificates downloaded with the APIv3 key")
                }
                (false, false) => configured,
            }
        },
        if config.alipay.is_some() {
            "configured"
        } else {
            "not configured"
        },
        if config.aliyun.is_some() {
            "configured"
        } else {
            "not configured"
        },
        if config.fleet.enabled { "on" } else { "off" },
        config.upstream.egress.redacted(),
        config.upstream.trust,
    );
    Ok(ExitCode::SUCCESS)
}

fn devices(path: &std::path::Path, json: bool, live: bool) -> anyhow::Result<ExitCode> {
    let config = config::load(path)?;
    let snapshot = runtime()?.block_on(async {
        if live {
            init_logging("warn");
            let admin = config.admin_listen;
            proxy::fleet_live(config, admin)
                .await
                .map_err(anyhow::Error::from)
        } else {
            let url = format!("http://{}/fleet", config.admin_listen);
            proxy::admin_fleet(config.admin_listen)
                .await
                .with_context(|| format!("cannot ask the running proxy at {url} (is it running? --live pages WeChat Pay directly)"))
        }
    });
    let snapshot = match snapshot {
        Ok(s) => s,
        // The running proxy is the one to ask and cannot be reached: its cache (without
        // --live), or its store held by a process that does not answer (with --live).
        Err(e)
            if !live
                || matches!(
                    e.downcast_ref::<proxy::ProxyError>(),
                    Some(proxy::ProxyError::StoreBusy { .. })
                ) =>
        {
            eprintln!("authinfo-proxy: {}", authinfod::error_chain(e.as_ref()));
            return Ok(ExitCode::from(EXIT_UNAVAILABLE));
        }
        Err(e) => return Err(e),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&snapshot)?);
    } else {
        print!("{}", proxy::fleet::render_table(&snapshot));
    }
    Ok(ExitCode::SUCCESS)
}

fn certificates(path: &std::path::Path, out: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    init_logging("warn");
    let config = config::load(path)?;
    let report = runtime()?.block_on(proxy::certificates_now(config))?;
    print!(
        "{}",
        proxy::certificates::render_table(&report.certificates, &report.verification)
    );
    if !report.store_read {
        println!(
            "(a running proxy holds its store: the certificates it downloaded before were not consulted)"
        );
    }
    if let Some(out) = out {
        let bundle: String = report.certificates.iter().map(|c| c.pem.as_str()).collect();
        std::fs::write(out, bundle).with_context(|| format!("cannot write {}", out.display()))?;
        println!("written to {}", out.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn sandbox(
    dir: &std::path::Path,
    listen: &str,
    proxy_listen: &str,
    devices: usize,
) -> anyhow::Result<ExitCode> {
    init_logging("info");
    runtime()?.block_on(authinfod::demo::lab::run_standalone_sandbox(
        dir,
        listen,
        proxy_listen,
        devices,
        shutdown_signal(),
    ))?;
    Ok(ExitCode::SUCCESS)
}
