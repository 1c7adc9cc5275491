//! Integration tests: one binary, one module per topic (ripgrep style). They drive the real
//! daemon, proxy and sandbox over real sockets and TLS.

mod support;

mod crash;
mod daemon;
mod health;
mod proxy;
mod store;
