//! A TCP relay that can cut the network on request: what the demo and the tests put between
//! the daemon and the proxy to play a network loss.
//!
//! Owns: one listening socket that forwards every connection to a target. While cut, new
//! connections are closed at once (the client sees a reset) and live ones are dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A running relay.
#[derive(Debug)]
pub struct NetCut {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    cut_tx: watch::Sender<bool>,
    shutdown: CancellationToken,
}

impl NetCut {
    /// Relays `listener`'s connections to `target`.
    pub fn start(listener: TcpListener, target: SocketAddr) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let (cut_tx, cut_rx) = watch::channel(false);
        let shutdown = CancellationToken::new();
        let (flag, token) = (cut.clone(), shutdown.clone());
        tokio::spawn(async move {
            // No drain: live connections end when they see `token` themselves.
            crate::serve::accept_loop(&listener, &token, None, Duration::ZERO, |inbound, _| {
                if flag.load(Ordering::SeqCst) {
                    // Dropping the connection closes it at once.
                    return None;
                }
                let mut cut_rx = cut_rx.clone();
                let token = token.clone();
                Some(Box::pin(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut inbound, mut outbound) = (inbound, outbound);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.wait_for(|cut| *cut) => {}
                        () = token.cancelled() => {}
                    }
                }))
            })
            .await;
        });
        Ok(Self {
            addr,
            cut,
            cut_tx,
            shutdown,
        })
    }

    /// Cuts the network: live connections drop, new ones are refused.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.cut_tx.send_replace(true);
    }

    /// Restores the network.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
        self.cut_tx.send_replace(false);
    }

    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
}

impl Drop for NetCut {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn relays_until_cut_then_refuses_until_restored() {
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let echo_addr = echo.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let relay = NetCut::start(
            TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            echo_addr,
        )
        .expect("relay");
        let roundtrip = || async {
            let mut s = TcpStream::connect(relay.addr).await.ok()?;
            s.write_all(b"ping").await.ok()?;
            let mut buf = [0; 4];
            s.read_exact(&mut buf).await.ok()?;
            Some(buf)
        };
        assert_eq!(roundtrip().await, Some(*b"ping"));
        relay.cut();
        assert!(relay.is_cut());
        assert_eq!(roundtrip().await, None);
        relay.restore();
        assert_eq!(roundtrip().await, Some(*b"ping"));
    }
}
