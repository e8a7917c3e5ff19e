//! The engine's front door: [`Engine`] owns the loop thread; [`EngineHandle`] (cheap to clone,
//! `Send + Sync`) submits and aborts requests from any thread or async task without blocking.
//!
//! Backpressure is explicit: the command channel is bounded and a submit that would push the
//! queue past `max_waiting` fails at once with [`EngineError::Overloaded`]; nothing is buffered
//! without bound and nothing is dropped silently. Each request's events flow through its own
//! unbounded channel, whose length is bounded by the request's `max_tokens + 1`; dropping the
//! receiver aborts the request (its blocks are freed within a step).

use super::paged::PagedKv;
use super::request::{EngineError, EngineEvent, EngineRequest};
use super::scheduler::SchedulerStats;
use super::worker::{Command, Worker};
use crate::backend::Backend;
use crate::config::EngineSection;
use crate::kv::KvStats;
use crate::metrics::Metrics;
use crate::model::llama::Llama;
use crate::types::{RequestId, TenantId};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// A snapshot of the engine for metrics and health checks, refreshed after every step.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    pub scheduler: SchedulerStats,
    pub kv: Option<KvStats>,
    /// Tokens computed by forward passes (prompt chunks and decode rows) since start.
    pub tokens_computed: u64,
    /// Tokens sampled since start.
    pub tokens_generated: u64,
    /// Seconds spent in forward passes / in whole steps (schedule, copies, forward, sampling,
    /// events) since start: their ratio shows the per-step overhead around the model.
    pub forward_seconds: f64,
    pub step_seconds: f64,
    /// Bytes of one exact (filling) block: what a "free block" is in the mixed pool.
    pub block_bytes: usize,
}

/// State shared by the handles and the loop thread.
pub(super) struct Shared {
    next_id: AtomicU64,
    /// Submits not yet taken off the channel by the loop.
    pub in_channel: AtomicUsize,
    /// Requests waiting for admission inside the scheduler (set by the loop every iteration).
    pub waiting: AtomicUsize,
    pub max_waiting: usize,
    /// False once shutdown began: new submits are refused.
    pub accepting: AtomicBool,
    /// Aborts to apply before the next step (a mutex, not the bounded channel, so an abort can
    /// never be refused or block).
    pub aborts: Mutex<Vec<RequestId>>,
    pub stats: Mutex<EngineStats>,
    /// Why the engine stopped for good, once it has (see [`EngineError::Failed`]).
    failure: Mutex<Option<String>>,
    /// Woken when `failure` is set.
    failed: tokio::sync::Notify,
    /// When the step in progress began, in milliseconds after `epoch` plus one; 0 between
    /// steps. Read by the watchdog (`engine.step_timeout_secs`).
    step_began: AtomicU64,
    epoch: Instant,
    /// Set when the loop thread ends: the watchdog stops.
    stopped: AtomicBool,
}

impl Shared {
    /// Records that the engine stopped for good (the first cause wins): new submits are
    /// refused with [`EngineError::Failed`] and [`EngineHandle::failed`] resolves.
    pub fn fail(&self, cause: &str) {
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            tracing::error!(
                cause,
                "the engine failed: refusing requests until restarted"
            );
            *f = Some(cause.to_string());
        }
        self.accepting.store(false, Ordering::Release);
        drop(f);
        self.failed.notify_waiters();
    }

    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn step_begins(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64 + 1;
        self.step_began.store(ms, Ordering::Release);
    }

    pub fn step_ends(&self) {
        self.step_began.store(0, Ordering::Release);
    }

    pub fn loop_ended(&self) {
        self.stopped.store(true, Ordering::Release);
    }

    /// How long the step in progress has run, if one is.
    fn step_running_for(&self) -> Option<std::time::Duration> {
        match self.step_began.load(Ordering::Acquire) {
            0 => None,
            began => Some(
                self.epoch
                    .elapsed()
                    .saturating_sub(std::time::Duration::from_millis(began - 1)),
            ),
        }
    }
}

/// Fails the engine when one step runs longer than `limit`. A device that stopped answering
/// never returns from a synchronisation, so the loop itself cannot notice: without this, its
/// requests would wait forever and `/health` would stay 200. Ends with the loop.
fn watchdog(shared: Arc<Shared>, limit: std::time::Duration) {
    let tick = (limit / 4).clamp(
        std::time::Duration::from_millis(10),
        std::time::Duration::from_secs(1),
    );
    while !shared.stopped.load(Ordering::Acquire) {
        std::thread::sleep(tick);
        if let Some(t) = shared.step_running_for().filter(|t| *t > limit) {
            shared.fail(&format!(
                "a step has run for {:.1} s, past engine.step_timeout_secs = {}: the device \
                 or the engine hangs",
                t.as_secs_f64(),
                limit.as_secs()
            ));
            return;
        }
    }
}

/// A submitted request: its id (for [`EngineHandle::abort`]) and its event stream.
pub struct Submission {
    pub id: RequestId,
    pub events: UnboundedReceiver<EngineEvent>,
}

/// Submits and aborts requests. Clone freely.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Command>,
    shared: Arc<Shared>,
}

impl EngineHandle {
    /// Queues `req`. Fails at once when the queue is full or the engine is shutting down;
    /// otherwise every outcome (tokens, finish, error) arrives on the returned stream.
    pub fn submit(&self, req: EngineRequest) -> Result<Submission, EngineError> {
        let sh = &self.shared;
        if !sh.accepting.load(Ordering::Acquire) {
            return Err(match self.failure() {
                Some(_) => EngineError::Failed,
                None => EngineError::Shutdown,
            });
        }
        let queued = sh.in_channel.load(Ordering::Acquire) + sh.waiting.load(Ordering::Acquire);
        if queued >= sh.max_waiting {
            return Err(EngineError::Overloaded(format!(
                "{queued} requests are already waiting"
            )));
        }
        let id = RequestId(sh.next_id.fetch_add(1, Ordering::Relaxed));
        let (events_tx, events) = unbounded_channel();
        sh.in_channel.fetch_add(1, Ordering::AcqRel);
        let cmd = Command::Submit {
            id,
            req: Box::new(req),
            events: events_tx,
            at: Instant::now(),
        };
        match self.tx.try_send(cmd) {
            Ok(()) => Ok(Submission { id, events }),
            Err(e) => {
                sh.in_channel.fetch_sub(1, Ordering::AcqRel);
                Err(match e {
                    TrySendError::Full(_) => {
                        EngineError::Overloaded("the engine's queue is full".into())
                    }
                    TrySendError::Disconnected(_) => EngineError::Shutdown,
                })
            }
        }
    }

    /// Ends a request (queued or running); its blocks are freed before the next step and its
    /// stream gets a final `Finished(Abort)`. Unknown or finished ids are ignored.
    pub fn abort(&self, id: RequestId) {
        self.shared.aborts.lock().expect("aborts lock").push(id);
        // Wake an idle loop; if the channel is full the loop is busy and will see the abort.
        let _ = self.tx.try_send(Command::Wake);
    }

    /// Why the engine stopped for good, once it has: its device failed or its loop panicked.
    /// Requests then get [`EngineError::Failed`]; the server reports it on `/health` and exits.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure()
    }

    /// Resolves with the cause when the engine fails for good (never, for a healthy engine).
    pub async fn failed(&self) -> String {
        loop {
            // Created before the check: a `notify_waiters` between the two still wakes it.
            let woken = self.shared.failed.notified();
            if let Some(cause) = self.failure() {
                return cause;
            }
            woken.await;
        }
    }

    /// The latest snapshot (refreshed after each step).
    pub fn stats(&self) -> EngineStats {
        self.shared.stats.lock().expect("stats lock").clone()
    }

    /// Requests that are queued or running.
    pub fn waiting(&self) -> usize {
        self.shared.in_channel.load(Ordering::Acquire) + self.shared.waiting.load(Ordering::Acquire)
    }

    /// Runs the KV pool's invariant check on the loop thread and returns the pool's numbers.
    /// Blocks until the current step ends: for tests and diagnostics, not for hot paths.
    pub fn check_kv(&self) -> Result<KvStats, String> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Command::CheckKv(tx))
            .map_err(|_| "engine stopped".to_string())?;
        rx.recv().map_err(|_| "engine stopped".to_string())?
    }
}

/// Owns the loop thread. Dropping it drains: new submits are refused, queued and running
/// requests finish, then the thread exits.
pub struct Engine {
    handle: EngineHandle,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// Starts the loop thread over `model` and `kv`. `weights` are the tenants' fair-share
    /// weights (see [`PagedKv::weights`]). Its metrics go to a registry of its own (see
    /// [`Engine::start_with_metrics`]).
    pub fn start<B>(
        model: Arc<Llama<B>>,
        kv: PagedKv<B>,
        cfg: &EngineSection,
        weights: Vec<(TenantId, f64)>,
    ) -> Self
    where
        B: Backend + 'static,
        Llama<B>: Send + Sync,
        B::KvStore: Send,
    {
        let metrics = Arc::new(Metrics::new(kv.tenant_names().to_vec()));
        Self::start_with_metrics(model, kv, cfg, weights, metrics)
    }

    /// [`Engine::start`] for tools and benchmarks: one default tenant (id 0, weight 1) over a
    /// pool of exactly `blocks` filling blocks of the default block size.
    pub fn single_tenant<B>(
        model: Arc<Llama<B>>,
        blocks: usize,
        cfg: &EngineSection,
    ) -> Result<Self, crate::config::ConfigError>
    where
        B: Backend + 'static,
        Llama<B>: Send + Sync,
        B::KvStore: Send,
    {
        let kv = PagedKv::with_blocks(
            &model,
            &crate::config::KvSection::default(),
            &[crate::config::TenantConfig::default()],
            blocks,
        )?;
        Ok(Self::start(model, kv, cfg, vec![(TenantId(0), 1.0)]))
    }

    /// [`Engine::start`], recording into `metrics` (the server's registry).
    pub fn start_with_metrics<B>(
        model: Arc<Llama<B>>,
        kv: PagedKv<B>,
        cfg: &EngineSection,
        weights: Vec<(TenantId, f64)>,
        metrics: Arc<Metrics>,
    ) -> Self
    where
        B: Backend + 'static,
        Llama<B>: Send + Sync,
        B::KvStore: Send,
    {
        let shared = Arc::new(Shared {
            next_id: AtomicU64::new(0),
            in_channel: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            max_waiting: cfg.max_waiting,
            accepting: AtomicBool::new(true),
            aborts: Mutex::new(Vec::new()),
            stats: Mutex::new(EngineStats::default()),
            failure: Mutex::new(None),
            failed: tokio::sync::Notify::new(),
            step_began: AtomicU64::new(0),
            epoch: Instant::now(),
            stopped: AtomicBool::new(false),
        });
        if cfg.step_timeout_secs > 0 {
            let (sh, limit) = (
                shared.clone(),
                std::time::Duration::from_secs(cfg.step_timeout_secs),
            );
            std::thread::Builder::new()
                .name("kvserve-watchdog".into())
                .spawn(move || watchdog(sh, limit))
                .expect("spawn the engine watchdog");
        }
        let (tx, rx) = mpsc::sync_channel(cfg.max_waiting + 16);
        let worker = Worker::new(model, kv, cfg, weights, rx, shared.clone(), metrics);
        let thread = std::thread::Builder::new()
            .name("kvserve-engine".into())
            .spawn(move || worker.run())
            .expect("spawn the engine thread");
        Self {
            handle: EngineHandle { tx, shared },
            thread: Some(thread),
        }
    }

    pub fn handle(&self) -> EngineHandle {
        self.handle.clone()
    }

    /// Refuses new requests, lets every accepted one finish, and joins the loop thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.handle.shared.accepting.store(false, Ordering::Release);
        let _ = self.handle.tx.send(Command::Drain);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the engine thread panicked");
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}
