//! Simulated wechatpay. (to be written)

use std::sync::Arc;

use super::SandboxState;

/// The simulator's routes.
pub fn router(state: Arc<SandboxState>) -> axum::Router {
    let _ = state;
    axum::Router::new()
}
