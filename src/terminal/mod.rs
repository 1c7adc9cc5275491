//! The terminal daemon.
