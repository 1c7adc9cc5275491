//! Log lines captured from the current thread's tracing events, for tests that assert what an
//! operator reads (tokio tests run the test and the parts it starts on one thread).

use std::sync::{Arc, Mutex};

/// The lines one test captured.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }

    pub fn clear(&self) {
        self.0.lock().expect("lock").clear();
    }

    /// The captured lines that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

thread_local! {
    /// Where this thread's log lines go, while a test captures them.
    static SINK: std::cell::RefCell<Option<Captured>> = const { std::cell::RefCell::new(None) };
}

/// Writes to the capturing test's buffer, if the current thread has one.
struct ThreadSink;

impl std::io::Write for ThreadSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        SINK.with(|s| {
            if let Some(c) = &*s.borrow() {
                c.0.lock().expect("lock").extend_from_slice(buf);
            }
        });
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Stops capturing on drop.
pub struct CaptureGuard;

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        SINK.with(|s| s.borrow_mut().take());
    }
}

/// Captures this thread's INFO and higher log lines. One global subscriber serves every test
/// (thread-local subscribers race with tracing's global callsite-interest cache when tests run
/// in parallel); it writes each line to the buffer of the thread that logged it. `#[tokio::test]`
/// runs the test and the parts it starts on that one thread.
pub fn capture() -> (Captured, CaptureGuard) {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(|| ThreadSink)
            .try_init();
    });
    let captured = Captured::default();
    SINK.with(|s| *s.borrow_mut() = Some(captured.clone()));
    (captured, CaptureGuard)
}
