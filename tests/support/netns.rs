//! Network namespaces for the link tests: made with `ip netns`, joined by a veth pair, shaped with
//! `iptables` inside the terminal's namespace, and entered per thread with `setns(2)` (nix's
//! safe wrapper: a thread's network namespace is its own, and the threads it starts inherit it),
//! so that one test process runs the proxy in one namespace and the daemon in another.
//!
//! Everything made here carries the test process's id in its name; [`Link`] removes its
//! namespaces (and with them the veth pair and every rule) when dropped, and [`sweep`] removes
//! what a killed test run left behind.

use std::net::Ipv4Addr;
use std::process::Command;

/// The prefix of every namespace the link tests make (`a18-<pid>-<n>-p` / `-t`).
const PREFIX: &str = "a18-";

/// Runs a command; its standard output, or a sentence with its status and standard error.
pub fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace made by this process.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `ip netns add NAME`, with its loopback up.
    pub fn create(name: &str) -> Result<Self, String> {
        run("ip", &["netns", "add", name])?;
        let ns = Self { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `ip netns exec NAME PROGRAM ARGS`.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, String> {
        exec(&self.name, program, args)
    }

    /// `iptables -w ARGS` inside the namespace.
    pub fn iptables(&self, args: &[&str]) -> Result<String, String> {
        iptables(&self.name, args)
    }

    /// Runs `f` on a new thread that has entered this namespace: every socket it (and any
    /// thread it starts, a tokio runtime's workers included) opens lives here.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter(&path).unwrap_or_else(|e| panic!("{e}"));
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "delete", &self.name]);
    }
}

/// `ip netns exec NAME PROGRAM ARGS`.
pub fn exec(name: &str, program: &str, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["netns", "exec", name, program];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// `iptables -w ARGS` inside namespace `name` (`-w`: the xtables lock is shared by every
/// namespace, and tests shape links at the same time).
pub fn iptables(name: &str, args: &[&str]) -> Result<String, String> {
    let mut all = vec!["-w"];
    all.extend_from_slice(args);
    exec(name, "iptables", &all)
}

/// Moves the calling thread into the namespace mounted at `path`.
pub fn enter(path: &str) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open {path}: {e}"))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("setns {path}: {e}"))
}

/// Two namespaces, the proxy's and the terminal's, joined by a veth pair on `10.18.<n>.0/24`.
#[derive(Debug)]
pub struct Link {
    pub proxy: Netns,
    pub terminal: Netns,
    pub proxy_ip: Ipv4Addr,
    pub terminal_ip: Ipv4Addr,
}

impl Link {
    /// Makes link number `n` (1-250) of this process.
    pub fn create(n: u8) -> Result<Self, String> {
        let pid = std::process::id();
        let proxy = Netns::create(&format!("{PREFIX}{pid}-{n}-p"))?;
        let terminal = Netns::create(&format!("{PREFIX}{pid}-{n}-t"))?;
        // Interface names have at most 15 characters.
        let (vp, vt) = (
            format!("a18p{n}x{}", pid % 100_000),
            format!("a18t{n}x{}", pid % 100_000),
        );
        run(
            "ip",
            &["link", "add", &vp, "type", "veth", "peer", "name", &vt],
        )?;
        run("ip", &["link", "set", &vp, "netns", &proxy.name])?;
        run("ip", &["link", "set", &vt, "netns", &terminal.name])?;
        let proxy_ip = Ipv4Addr::new(10, 18, n, 1);
        let terminal_ip = Ipv4Addr::new(10, 18, n, 2);
        proxy.ip(&["addr", "add", &format!("{proxy_ip}/24"), "dev", &vp])?;
        terminal.ip(&["addr", "add", &format!("{terminal_ip}/24"), "dev", &vt])?;
        proxy.ip(&["link", "set", &vp, "up"])?;
        terminal.ip(&["link", "set", &vt, "up"])?;
        Ok(Self {
            proxy,
            terminal,
            proxy_ip,
            terminal_ip,
        })
    }
}

/// Removes the namespaces of link test runs whose process is gone.
pub fn sweep() {
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run("ip", &["netns", "delete", name]);
        }
    }
}

/// Why the link tests cannot run here, if they cannot: they need root, `ip netns`, a veth pair,
/// `iptables` with the `connbytes`, `recent`, `length` matches and the `NFQUEUE` target, and
/// `ss -K`.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("not root (ip netns and iptables need CAP_NET_ADMIN)".into());
    }
    sweep();
    let probe = || -> Result<(), String> {
        let link = Link::create(250)?;
        let t = &link.terminal;
        let proxy = link.proxy_ip.to_string();
        for rule in [
            vec![
                "-A",
                "INPUT",
                "-s",
                &proxy,
                "-m",
                "connbytes",
                "--connbytes",
                "1:",
                "--connbytes-dir",
                "reply",
                "--connbytes-mode",
                "bytes",
                "-m",
                "recent",
                "--name",
                "probe",
                "--set",
                "-j",
                "DROP",
            ],
            vec![
                "-A",
                "INPUT",
                "-m",
                "length",
                "--length",
                "577:65535",
                "-j",
                "DROP",
            ],
            vec![
                "-A",
                "OUTPUT",
                "-d",
                &proxy,
                "-j",
                "NFQUEUE",
                "--queue-num",
                "9",
                "--queue-bypass",
            ],
        ] {
            t.iptables(&rule)?;
        }
        t.exec("ss", &["-K", "dst", &proxy])?;
        Ok(())
    };
    probe().err()
}
