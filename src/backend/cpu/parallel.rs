//! The CPU backend's fork/join: `for_each(n, f)` runs `f(0..n)` on the calling thread plus
//! helpers that run as jobs on rayon's global pool (no threads of our own).
//!
//! Why not `par_iter`: the engine calls the backend from its own thread, outside the pool, and
//! rayon's "cold" entry (inject the job, block on a latch, wake the caller) plus waking parked
//! workers costs ~20 µs per call on the 2-vCPU VM we measured — more than a decode matvec of a
//! 576×576 matrix takes, and a decode token makes ~150 such calls. Here the caller starts on
//! chunk 0 at once and claims chunks dynamically, so a helper that wakes late costs nothing
//! but its share; and a helper lingers (spinning, ≤ `LINGER`) after its job for the next one,
//! so the back-to-back ops of a forward pass find it awake.
//!
//! Invariant that makes the borrowed closure safe to share: `for_each` returns only after every
//! claimed chunk has finished, and a chunk index ≥ `n` is never passed to `f`; a helper that
//! arrives late finds no chunk left and never touches `f`.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long an idle helper keeps polling for the next job before returning to rayon.
const LINGER: Duration = Duration::from_micros(300);

type Task = dyn Fn(usize) + Sync;

struct Job {
    next: AtomicUsize,
    done: AtomicUsize,
    n: usize,
    /// Borrowed from the caller's stack; valid while any claimed chunk is unfinished.
    f: *const Task,
    /// Set by the first chunk that panics: later chunks are skipped (but still counted done)
    /// and the caller re-raises the panic once every claimed chunk has finished.
    cancelled: AtomicBool,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `f` points at a `Sync` closure that outlives every use (see the module invariant).
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

impl Job {
    /// Claims and runs chunks until none are left. Every claimed index < n counts as done
    /// exactly once, run or skipped.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n {
                return;
            }
            if !self.cancelled.load(Ordering::Relaxed) {
                // SAFETY: i < n was claimed, so the caller is still waiting in `for_each`.
                let r = catch_unwind(AssertUnwindSafe(|| unsafe { (*self.f)(i) }));
                if let Err(p) = r {
                    self.cancelled.store(true, Ordering::Relaxed);
                    self.panic
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(p);
                }
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

/// The job board helpers poll: the latest job and a counter bumped on each post.
struct Board {
    epoch: AtomicU64,
    job: Mutex<Option<Arc<Job>>>,
    /// Helpers running or lingering.
    live: AtomicUsize,
}

static BOARD: Board = Board {
    epoch: AtomicU64::new(0),
    job: Mutex::new(None),
    live: AtomicUsize::new(0),
};

fn helper() {
    let mut seen = 0;
    let mut idle_since = Instant::now();
    loop {
        let e = BOARD.epoch.load(Ordering::Acquire);
        if e != seen {
            seen = e;
            let job = BOARD.job.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(job) = job {
                job.work();
            }
            idle_since = Instant::now();
            continue;
        }
        if idle_since.elapsed() > LINGER {
            break;
        }
        for _ in 0..64 {
            std::hint::spin_loop();
        }
    }
    BOARD.live.fetch_sub(1, Ordering::AcqRel);
}

/// Runs `f(i)` for every `i < n`, in parallel over up to `rayon::current_num_threads()`
/// threads (the caller included). Chunks are claimed in increasing order.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    let threads = rayon::current_num_threads();
    if n <= 1 || threads <= 1 {
        (0..n).for_each(f);
        return;
    }
    let f: &(dyn Fn(usize) + Sync + '_) = &f;
    // SAFETY: only the lifetime is erased; see the module invariant.
    let f: *const Task =
        unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync + '_), &'static Task>(f) };
    let job = Arc::new(Job {
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        n,
        f,
        cancelled: AtomicBool::new(false),
        panic: Mutex::new(None),
    });
    *BOARD.job.lock().unwrap_or_else(|p| p.into_inner()) = Some(job.clone());
    BOARD.epoch.fetch_add(1, Ordering::AcqRel);
    let want = (threads - 1).min(n - 1);
    while BOARD.live.load(Ordering::Acquire) < want {
        BOARD.live.fetch_add(1, Ordering::AcqRel);
        rayon::spawn(helper);
    }
    job.work();
    let mut spins = 0u32;
    while job.done.load(Ordering::Acquire) < n {
        spins += 1;
        if spins < 1 << 14 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    let panic = job.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(p) = panic {
        resume_unwind(p);
    }
}

/// Raw pointer wrapper for disjoint writes from `for_each` chunks.
#[derive(Clone, Copy)]
pub struct SendPtr<T>(pub *mut T);
// SAFETY: users write disjoint elements from different chunks (stated at each use).
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    /// Closures call this rather than read `.0`: edition-2021 closures would capture the bare
    /// field and lose the `Send`/`Sync` wrapper.
    pub fn get(self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_every_chunk_once() {
        for n in [0, 1, 2, 3, 17, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            for_each(n, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "n = {n}"
            );
        }
    }

    #[test]
    fn concurrent_callers_and_nesting() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..50 {
                        for_each(8, |_| {
                            for_each(3, |_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            })
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 50 * 8 * 3);
    }

    #[test]
    fn panic_in_any_chunk_propagates_to_the_caller() {
        let r = catch_unwind(|| {
            for_each(64, |i| {
                if i == 5 {
                    panic!("boom");
                }
                std::thread::sleep(Duration::from_micros(50));
            })
        });
        assert!(r.is_err());
        // The board still works afterwards.
        let c = AtomicUsize::new(0);
        for_each(10, |_| {
            c.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(c.load(Ordering::Relaxed), 10);
    }
}
