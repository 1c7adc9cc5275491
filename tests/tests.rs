//! Integration tests: one binary, one module per topic (ripgrep style). They drive the real
//! daemon, proxy and sandbox over real sockets and TLS.

mod support;

mod certificates;
mod cluster;
mod crash;
mod daemon;
mod egress;
mod health;
mod journal;
mod link;
#[cfg(feature = "pkcs11")]
mod pkcs11;
mod proxy;
mod socket;
mod store;
mod terminals;
