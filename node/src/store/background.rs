//! A small pool of low-priority threads that verify and store fetched
//! chunks.
//!
//! Hashing and durably writing a chunk costs a fifth to a half of the CPU
//! that receiving it over QUIC does. A node often fetches while it serves
//! (a rebalancing move fetches its next span next to the one it runs), so
//! this bulk work runs below the network and compute threads (nice
//! +[`NICE`] on Linux) and takes the cycles they leave. The fetcher bounds
//! how much received data may wait for these threads
//! ([`MAX_UNSTORED_BYTES`](crate::weights::fetch::MAX_UNSTORED_BYTES)).

use std::future::Future;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Threads in the pool: enough that some keep hashing while others wait
/// for the disk to flush.
pub const THREADS: usize = 4;

/// How much lower the pool's threads are scheduled than the rest of the
/// process (Linux nice levels; 10 gives about a tenth of the CPU weight of
/// a normal thread when both want the same core).
pub const NICE: i32 = 10;

type Job = Box<dyn FnOnce() + Send>;

fn pool() -> &'static mpsc::Sender<Job> {
    static POOL: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = std::sync::Arc::new(Mutex::new(rx));
        for i in 0..THREADS {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("nomoat-store-{i}"))
                .spawn(move || {
                    lower_priority();
                    loop {
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!("cannot start a store thread: {e}");
            }
        }
        tx
    })
}

/// Starts `f` on a low-priority pool thread at once; the returned future
/// gives its result. A panic in `f` is resumed in whoever awaits it.
pub fn spawn<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> impl Future<Output = T> + Send + 'static {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(r);
    });
    // If the pool's threads could not start, the job runs on the blocking pool.
    let unsent = pool().send(job).err().map(|mpsc::SendError(job)| job);
    let fallback = unsent.map(tokio::task::spawn_blocking);
    async move {
        if let Some(handle) = fallback {
            if let Err(e) = handle.await {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        match rx.await {
            Ok(Ok(t)) => t,
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => panic!("a store thread dropped a job without running it"),
        }
    }
}

/// Lowers the calling thread's scheduling priority (on Linux nice is per
/// thread). Lowering one's own priority needs no privilege.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), NICE) {
        tracing::debug!("cannot lower the store threads' priority: {e}");
    }
}

/// CPU time the calling thread has used; `None` where the platform has no
/// per-thread clock.
pub fn thread_cpu_time() -> Option<Duration> {
    #[cfg(unix)]
    {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        Some(Duration::new(t.tv_sec as u64, t.tv_nsec as u32))
    }
    #[cfg(not(unix))]
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_on_the_low_priority_threads_and_return_their_result() {
        let (name, nice) = spawn(|| {
            let name = std::thread::current().name().map(str::to_owned);
            #[cfg(target_os = "linux")]
            let nice =
                rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
            #[cfg(not(target_os = "linux"))]
            let nice = NICE;
            (name, nice)
        })
        .await;
        assert!(name.unwrap().starts_with("nomoat-store-"));
        assert_eq!(nice, NICE);
        // Several at once, each with its own result.
        let jobs: Vec<_> = (0..16u64).map(|i| spawn(move || i * i)).collect();
        let got = futures::future::join_all(jobs).await;
        assert_eq!(got, (0..16u64).map(|i| i * i).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_panicking_job_panics_its_caller_and_the_pool_goes_on() {
        let caller = tokio::spawn(spawn(|| -> u32 { panic!("boom") }));
        assert!(caller.await.unwrap_err().is_panic());
        assert_eq!(spawn(|| 7).await, 7);
    }

    #[test]
    fn thread_cpu_time_counts_work_not_sleep() {
        let a = thread_cpu_time().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let b = thread_cpu_time().unwrap();
        assert!(
            b - a < Duration::from_millis(25),
            "sleeping counted as CPU time"
        );
        // Busy work advances it (bounded in wall time on a loaded machine).
        let (mut x, t) = (0u64, std::time::Instant::now());
        while thread_cpu_time().unwrap() - b < Duration::from_millis(10) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "busy work not counted"
            );
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
    }
}
