//! Log assertions: the one helper that captures what the code under test logs, for every test
//! module that checks a log line (levels, fields, rate limits).

use std::sync::{Arc, Mutex};

/// Log lines captured from the current thread's tracing events (tokio tests run on one thread).
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }

    pub fn clear(&self) {
        self.0.lock().expect("lock").clear();
    }

    /// The captured lines about `check`.
    pub fn lines_for(&self, check: &str) -> Vec<String> {
        self.lines_with(&format!("check=\"{check}\""))
    }

    /// The captured lines containing `text`.
    pub fn lines_with(&self, text: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains(text))
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
