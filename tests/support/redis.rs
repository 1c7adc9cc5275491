//! A real `redis-server` (Debian's package, installed by scripts/setup) for the cluster tests:
//! started on a free loopback port in a temporary directory, without persistence, stopped (and
//! restarted empty on the same port) by the test, killed on drop. [`RedisServer::start_with`]
//! adds arguments (a TLS port, users and passwords); the plain port stays open for the test's
//! own raw checks, and a server that requires a password answers those `NOAUTH`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A running `redis-server`.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    /// More `redis-server` arguments, given again on every restart.
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one on a free port under `dir`.
    pub async fn start(dir: &Path) -> Self {
        Self::start_with(dir, Vec::new()).await
    }

    /// Starts one on a free port under `dir` with `extra` arguments.
    pub async fn start_with(dir: &Path, extra: Vec<String>) -> Self {
        let mut server = Self {
            port: super::free_port(),
            dir: dir.to_owned(),
            extra,
            child: None,
        };
        server.restart().await;
        server
    }

    /// The URL a replica's `[cluster] redis_url` gives.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts it (again, empty: no persistence) on its port and waits until it answers.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::File::create(self.dir.join(format!("redis-{}.log", self.port)))
            .expect("redis log");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--maxmemory-policy", "noeviction"])
            .args(&self.extra)
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::from(log))
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/setup installs it)");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + super::GENEROUS;
        while self.ping().await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server on port {} never answered",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills it (as a crash would) and waits for it to be gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `PING` over a raw connection: the server's own answer, independent of the code under test
    /// (`NOAUTH` from one that requires a password is an answer too).
    pub async fn ping(&self) -> std::io::Result<()> {
        let answer = self.command(&["PING"]).await?;
        if answer.starts_with("+PONG") || answer.starts_with("-NOAUTH") {
            Ok(())
        } else {
            Err(std::io::Error::other(answer))
        }
    }

    /// One command in RESP over a raw connection; the reply as text.
    pub async fn command(&self, args: &[&str]) -> std::io::Result<String> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
        exchange(&mut stream, args).await
    }

    /// [`Self::command`] after `AUTH user password` on the same connection.
    pub async fn command_as(
        &self,
        user: &str,
        password: &str,
        args: &[&str],
    ) -> std::io::Result<String> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
        let auth = exchange(&mut stream, &["AUTH", user, password]).await?;
        if !auth.starts_with("+OK") {
            return Err(std::io::Error::other(format!("AUTH: {auth}")));
        }
        exchange(&mut stream, args).await
    }
}

/// Sends one command and reads its reply (one read: the replies the tests read are small).
async fn exchange(stream: &mut tokio::net::TcpStream, args: &[&str]) -> std::io::Result<String> {
    let mut request = format!("*{}\r\n", args.len());
    for a in args {
        request.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    stream.write_all(request.as_bytes()).await?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("no answer"))??;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
