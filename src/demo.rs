//! `authinfod demo`: the whole chain in one process. (Lands with the proxy.)

/// Why the demo stopped early.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("the demo needs the proxy, which has not landed yet")]
    NotYet,
}

/// Runs the demo.
pub async fn run(
    _duration: std::time::Duration,
    _shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DemoError> {
    Err(DemoError::NotYet)
}
