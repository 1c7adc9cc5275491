//! The terminal daemon.

pub mod config;
pub mod health;
pub mod metrics;
pub mod proxy_client;
pub mod refresher;
pub mod state;
pub mod store;
