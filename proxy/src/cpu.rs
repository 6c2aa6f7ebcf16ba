//! A bounded blocking section for CPU-heavy work.
//!
//! Validating a token (a GT subgroup check, about 0.5 ms) or decoding and
//! re-encoding a header (about 0.45 ms per row) on an async worker thread
//! would stall every other call that worker serves: with two cores, one
//! 256-token batch would hold a worker for over 100 ms. [`run`] moves such
//! work to tokio's blocking thread pool, and at most [`limit`] sections run
//! at once (one fewer than the cores, at least one), so CPU-heavy calls
//! queue among themselves while the workers keep answering reads.
//!
//! A section must be pure computation: holding a permit while waiting for
//! anything else (a database lock, a connection) could starve other
//! sections.

use std::sync::{Arc, OnceLock};

use tokio::sync::Semaphore;

use crate::error::{ProxyError, Result};

/// How many sections may run at once in this process: the available
/// parallelism minus one (left to the async workers), at least one.
pub fn limit() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_sub(1)
        .max(1)
}

fn permits() -> &'static Arc<Semaphore> {
    static PERMITS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    PERMITS.get_or_init(|| Arc::new(Semaphore::new(limit())))
}

/// Run `f` on the blocking thread pool once one of the [`limit`] permits is
/// free (waiting asynchronously), and return its result.
///
/// Errors: [`ProxyError::Internal`] if `f` panicked.
pub async fn run<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let permit = Arc::clone(permits())
        .acquire_owned()
        .await
        .map_err(|_| ProxyError::Internal("the CPU section is closed".into()))?;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        f()
    })
    .await
    .map_err(|e| ProxyError::Internal(format!("a CPU task failed: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_most_limit_sections_run_at_once() {
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..(4 * limit() + 2) {
            let (running, peak) = (Arc::clone(&running), Arc::clone(&peak));
            tasks.push(tokio::spawn(run(move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
                running.fetch_sub(1, Ordering::SeqCst);
                i * 2
            })));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap().unwrap(), i * 2);
        }
        assert!(peak.load(Ordering::SeqCst) <= limit());
        assert!(peak.load(Ordering::SeqCst) >= 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn workers_stay_free_while_sections_run() {
        // Saturate the sections with long work; a plain async task still
        // gets scheduled promptly.
        let mut busy = Vec::new();
        for _ in 0..(2 * limit()) {
            busy.push(tokio::spawn(run(|| {
                std::thread::sleep(Duration::from_millis(300));
            })));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t = std::time::Instant::now();
        tokio::spawn(async {}).await.unwrap();
        assert!(t.elapsed() < Duration::from_millis(100));
        for b in busy {
            b.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn a_panic_is_an_internal_error() {
        match run(|| panic!("boom")).await {
            Err(ProxyError::Internal(_)) => {}
            other => panic!("expected an internal error, got {other:?}"),
        }
        // The permit came back.
        assert_eq!(run(|| 7).await.unwrap(), 7);
    }
}
