//! `authinfo-proxy`: the merchant's signing proxy. Parses the command line, reads the
//! environment, and maps every error to an exit code; the work is in the library.

use std::process::ExitCode;

use anyhow::Context as _;
use authinfod::proxy::{self, config};
use clap::Parser as _;

// The clap definitions, in their own file so that examples/gen-docs.rs can include them too.
#[path = "authinfo-proxy/cli.rs"]
mod cli;
use cli::{Cli, Command, exit};

#[path = "shared/mod.rs"]
mod shared;
use shared::runtime;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(&config),
        Command::CheckConfig { file } => check_config(&file),
        Command::Devices { json, live, config } => devices(&config, json, live),
        Command::Terminals {
            json,
            at_risk,
            config,
        } => terminals(&config, json, at_risk),
        Command::Certificates { out, config } => certificates(&config, out.as_deref()),
        Command::Sandbox {
            dir,
            listen,
            proxy_listen,
            devices,
            authinfo_per_minute,
            simulate_terminals,
        } => sandbox(authinfod::demo::lab::StandaloneOptions {
            listen,
            proxy_listen,
            devices,
            simulate_terminals: usize::from(simulate_terminals),
            authinfo_limit: authinfo_per_minute.map(|requests| authinfod::sandbox::AuthinfoLimit {
                requests,
                window: std::time::Duration::from_secs(60),
            }),
            ..authinfod::demo::lab::StandaloneOptions::new(&dir)
        }),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("authinfo-proxy: {}", authinfod::error_chain(err.as_ref()));
            // The config file and the registry fail with the same error type.
            let config_error = err.downcast_ref::<config::ConfigError>().is_some()
                || err
                    .downcast_ref::<proxy::ProxyError>()
                    .is_some_and(proxy::ProxyError::is_config);
            ExitCode::from(if config_error {
                exit::CONFIG
            } else {
                exit::FAILURE
            })
        }
    }
}

/// The proxy's log filter is `$RUST_LOG` only; it is not reloaded, so the control is dropped.
fn init_logging(default: &str) {
    shared::init_logging("authinfo-proxy", default);
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
    for warning in config.key_warnings() {
        eprintln!("authinfo-proxy: warning: {warning}");
    }
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
            proxy::admin_fleet(config.admin_listen, config.admin_token.as_ref())
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
            return Ok(ExitCode::from(exit::UNAVAILABLE));
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

fn terminals(path: &std::path::Path, json: bool, at_risk: bool) -> anyhow::Result<ExitCode> {
    let config = config::load(path)?;
    let url = format!("http://{}/terminals", config.admin_listen);
    let answer = runtime()?.block_on(proxy::admin_terminals(
        config.admin_listen,
        config.admin_token.as_ref(),
        at_risk,
    ));
    let list = match answer {
        Ok(list) => list,
        Err(e) => {
            eprintln!(
                "authinfo-proxy: cannot ask the running proxy at {url} (is it running?): {}",
                authinfod::error_chain(&e)
            );
            return Ok(ExitCode::from(exit::UNAVAILABLE));
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print!(
            "{}",
            proxy::terminals::doc::render_table(&list.terminals, &list.summary)
        );
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

fn sandbox(options: authinfod::demo::lab::StandaloneOptions) -> anyhow::Result<ExitCode> {
    init_logging("info");
    runtime()?.block_on(authinfod::demo::lab::run_standalone_sandbox(
        &options,
        shutdown_signal(),
    ))?;
    Ok(ExitCode::SUCCESS)
}
