//! Metrics off the terminal: Prometheus cannot scrape a Unix socket, so the metrics page is also
//! written to a file for node_exporter's textfile collector and, when asked, served on a
//! loopback TCP port (`GET /metrics` only).
//!
//! Owns: the textfile's atomic rewrite (a temporary file beside it, then a rename, so the
//! collector never reads half a page) on every change the state announces and at least every
//! [`TEXTFILE_EVERY`], and the loopback listener. It must not compute metrics: the page is
//! [`super::api::metrics_page`], the same the socket serves.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use tokio_util::sync::CancellationToken;

use super::state::State;

/// The textfile is rewritten at least this often (ages and uptime change without events).
pub const TEXTFILE_EVERY: Duration = Duration::from_secs(60);

/// Why the textfile could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the metrics textfile {path}")]
pub struct TextfileError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Writes `page` to `path` atomically (a temporary file beside it, fsynced and renamed over
/// it, as the store writes its copies). The file is readable by everyone (node_exporter runs as
/// its own user); nothing in it is secret.
pub fn write_textfile(path: &Path, page: &str) -> Result<(), TextfileError> {
    crate::terminal::store::write_atomically_with_mode(path, page.as_bytes(), 0o644).map_err(
        |source| TextfileError {
            path: path.to_owned(),
            source,
        },
    )
}

/// Keeps the textfile at `path` current until `shutdown`: at once, on every change, and at
/// least every [`TEXTFILE_EVERY`]. A failed write is logged (once until a write succeeds again)
/// and retried at the next occasion; it never stops the daemon.
pub async fn keep_textfile(state: Arc<State>, path: PathBuf, shutdown: CancellationToken) {
    let mut changes = state.watch_changes();
    let mut ticker = tokio::time::interval(TEXTFILE_EVERY);
    let mut failing = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
            _ = changes.changed() => {}
        }
        match write_textfile(&path, &super::api::metrics_page(&state)) {
            Ok(()) => failing = false,
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(error = %crate::error_chain(&error), "metrics textfile not written; retrying at the next change or minute");
            }
            Err(_) => {}
        }
    }
}

/// Serves `GET /metrics` on a loopback TCP listener until `shutdown`; other paths get 404.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    shutdown: CancellationToken,
) {
    let limits = crate::serve::Http1Limits {
        header_read_timeout: Duration::from_secs(10),
        max_head: 8 * 1024,
        keep_alive: true,
        half_close: true,
    };
    crate::serve::accept_loop(
        &listener,
        &shutdown,
        None,
        Duration::from_secs(2),
        |tcp, _| -> Option<crate::serve::Connection> {
            let (state, shutdown) = (state.clone(), shutdown.clone());
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let state = state.clone();
                    async move {
                        let mut response = if req.uri().path() == "/metrics" {
                            let mut r = hyper::Response::new(Full::new(bytes::Bytes::from(
                                super::api::metrics_page(&state),
                            )));
                            r.headers_mut().insert(
                                http::header::CONTENT_TYPE,
                                http::HeaderValue::from_static(crate::prometheus::CONTENT_TYPE),
                            );
                            r
                        } else {
                            let mut r = hyper::Response::new(Full::new(bytes::Bytes::from_static(
                                b"only /metrics here\n",
                            )));
                            *r.status_mut() = http::StatusCode::NOT_FOUND;
                            r
                        };
                        response.headers_mut().insert(
                            http::header::CACHE_CONTROL,
                            http::HeaderValue::from_static("no-store"),
                        );
                        Ok::<_, Infallible>(response)
                    }
                });
            Some(Box::pin(async move {
                crate::serve::http1(tcp, service, limits, &shutdown).await;
            }))
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_textfile_is_replaced_whole_and_readable_by_the_collector() {
        let (dir, path) = crate::test_support::temp_path("authinfod.prom");
        write_textfile(&path, "a 1\n").expect("write");
        write_textfile(&path, "a 2\n").expect("rewrite");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "a 2\n");
        let mode = crate::test_support::mode_of(&path);
        assert_eq!(mode, 0o644);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name() != "authinfod.prom")
            .collect();
        assert!(
            leftovers.is_empty(),
            "no temporary file left: {leftovers:?}"
        );
        let err = write_textfile(&dir.path().join("missing/x.prom"), "a 1\n").unwrap_err();
        assert!(err.to_string().contains("missing/x.prom"), "{err}");
    }
}
