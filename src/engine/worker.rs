//! The engine loop, on its own OS thread: take commands → schedule → copy-on-write copies →
//! one batched forward pass → sample and update → send events. Tokio never runs here, and this
//! thread never waits on a client: events go into per-request channels that cannot fill up.

use super::handle::{EngineStats, Shared};
use super::observe::Recorder;
use super::paged::PagedKv;
use super::request::{EngineError, EngineEvent, EngineRequest};
use super::scheduler::{Output, Scheduler, SchedulerConfig, Step};
use crate::backend::Backend;
use crate::config::EngineSection;
use crate::kv::KvStats;
use crate::metrics::Metrics;
use crate::model::llama::{Llama, LogitsFor, SeqStep, StepOutput};
use crate::types::{RequestId, TenantId};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// How long an engine with waiting-but-unschedulable requests sleeps between attempts (queue
/// timeouts and aborts are checked at this rate).
const BLOCKED_POLL: Duration = Duration::from_millis(5);

pub(super) enum Command {
    Submit {
        id: RequestId,
        req: Box<EngineRequest>,
        events: UnboundedSender<EngineEvent>,
        at: Instant,
    },
    /// Look at the abort list now.
    Wake,
    CheckKv(Sender<Result<KvStats, String>>),
    /// Finish what was accepted, then exit.
    Drain,
}

pub(super) struct Worker<B: Backend> {
    model: Arc<Llama<B>>,
    kv: PagedKv<B>,
    sched: Scheduler,
    rx: Receiver<Command>,
    shared: Arc<Shared>,
    senders: HashMap<RequestId, UnboundedSender<EngineEvent>>,
    recorder: Recorder,
    draining: bool,
    tokens_computed: u64,
    tokens_generated: u64,
    forward_time: Duration,
    step_time: Duration,
}

impl<B: Backend> Worker<B> {
    pub(super) fn new(
        model: Arc<Llama<B>>,
        kv: PagedKv<B>,
        cfg: &EngineSection,
        weights: Vec<(TenantId, f64)>,
        rx: Receiver<Command>,
        shared: Arc<Shared>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let sched = Scheduler::new(SchedulerConfig {
            max_batched_tokens: cfg.max_batched_tokens,
            max_running: cfg.max_running,
            max_queue_time: (cfg.max_queue_ms > 0).then(|| Duration::from_millis(cfg.max_queue_ms)),
            max_context: model.config().max_position_embeddings,
            block_size: kv.pool.block_size(),
            weights,
            classes: kv.classes.clone(),
        });
        Self {
            model,
            kv,
            sched,
            rx,
            shared,
            senders: HashMap::new(),
            recorder: Recorder::new(metrics),
            draining: false,
            tokens_computed: 0,
            tokens_generated: 0,
            forward_time: Duration::ZERO,
            step_time: Duration::ZERO,
        }
    }

    pub(super) fn run(mut self) {
        tracing::debug!("engine loop started");
        // The forward pass catches its own panics; one anywhere else (scheduling, copies, the
        // store) leaves the loop's state unknown, so the engine stops for good and says so
        // instead of leaving its requests without an answer.
        if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.serve())) {
            self.fail_all(&format!("the engine loop panicked: {}", panic_message(&*p)));
        }
        self.shared.loop_ended();
        tracing::debug!("engine loop stopped");
    }

    fn serve(&mut self) {
        loop {
            // The watchdog failed the engine while a step ran too long (see `watchdog`).
            if let Some(cause) = self.shared.failure() {
                self.fail_all(&cause);
                return;
            }
            if self.sched.is_idle() {
                if self.draining {
                    break;
                }
                match self.rx.recv() {
                    Ok(cmd) => self.command(cmd),
                    Err(_) => break, // every handle is gone and nothing is in flight
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => self.command(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.draining = true;
                        break;
                    }
                }
            }
            self.apply_aborts();
            let t_step = Instant::now();
            let step = self.sched.schedule(&mut self.kv.pool, Instant::now());
            let scheduled_at = Instant::now();
            for a in self.sched.take_admissions() {
                self.recorder.admitted(&a, scheduled_at);
            }
            self.shared
                .waiting
                .store(self.sched.num_waiting(), Ordering::Release);
            if step.is_empty() {
                self.dispatch();
                self.publish();
                if !self.sched.is_idle() {
                    match self.rx.recv_timeout(BLOCKED_POLL) {
                        Ok(cmd) => self.command(cmd),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => self.draining = true,
                    }
                }
                continue;
            }
            let _span = tracing::debug_span!(
                "step",
                step = self.sched.num_steps(),
                seqs = step.entries.len(),
                tokens = step.num_tokens()
            )
            .entered();
            self.shared.step_begins();
            self.kv.sync_store(self.model.backend());
            let executed = self.execute(&step);
            self.shared.step_ends();
            if let Err(cause) = executed {
                self.fail_all(&cause);
                return;
            }
            self.dispatch();
            self.step_time += t_step.elapsed();
            self.publish();
        }
    }

    /// The engine cannot go on (its device is lost, or the loop panicked): every request it
    /// holds or that waits in the channel gets [`EngineError::Failed`], and the handle refuses
    /// new ones. Touches only the channels, not the scheduler or the store, whose state may be
    /// half-updated.
    fn fail_all(&mut self, cause: &str) {
        self.shared.fail(cause);
        let event = EngineEvent::Error(EngineError::Failed);
        let now = Instant::now();
        for (id, tx) in std::mem::take(&mut self.senders) {
            self.recorder.event(id, &event, now);
            let _ = tx.send(event.clone());
        }
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Command::Submit { events, .. } => {
                    self.shared.in_channel.fetch_sub(1, Ordering::AcqRel);
                    let _ = events.send(event.clone());
                }
                Command::CheckKv(reply) => {
                    let _ = reply.send(Err("the engine failed".into()));
                }
                Command::Wake | Command::Drain => {}
            }
        }
        self.shared.waiting.store(0, Ordering::Release);
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Submit {
                id,
                req,
                events,
                at,
            } => {
                self.shared.in_channel.fetch_sub(1, Ordering::AcqRel);
                let (tenant, prompt_tokens) = (req.tenant, req.prompt.len());
                match self.sched.add(id, *req, &self.kv.pool, at) {
                    Ok(()) => {
                        self.recorder.submitted(id, tenant, prompt_tokens, at);
                        // Counted as waiting at once, so `in_channel + waiting` never dips
                        // between taking the command and the next schedule.
                        self.shared.waiting.fetch_add(1, Ordering::AcqRel);
                        self.senders.insert(id, events);
                    }
                    Err(e) => {
                        tracing::debug!(request = id.0, %e, "refused");
                        let _ = events.send(EngineEvent::Error(e));
                    }
                }
            }
            Command::Wake => {}
            Command::CheckKv(reply) => {
                let pool = &self.kv.pool;
                let _ = reply.send(pool.check_invariants().map(|()| pool.stats()));
            }
            Command::Drain => self.draining = true,
        }
    }

    /// Applies queued aborts and aborts requests whose receiver is gone (client disconnected).
    fn apply_aborts(&mut self) {
        let mut ids = std::mem::take(&mut *self.shared.aborts.lock().expect("aborts lock"));
        ids.extend(
            self.senders
                .iter()
                .filter(|(_, tx)| tx.is_closed())
                .map(|(id, _)| *id),
        );
        for id in ids {
            self.sched.abort(id, &mut self.kv.pool);
        }
    }

    /// One batched forward pass. If it fails (an error or a caught panic), each sequence is
    /// retried alone so that only the request that causes the failure fails (rewriting a
    /// slot's KV with the same values is harmless).
    ///
    /// `Err(cause)` when a failure left the device unusable ([`Backend::device_status`]):
    /// nothing more can run, so nothing is retried.
    fn execute(&mut self, step: &Step) -> Result<(), String> {
        let t = step.num_tokens() as u64;
        let t0 = Instant::now();
        let result = self.forward(&step.entries);
        self.forward_time += t0.elapsed();
        match result {
            Ok(logits) => {
                self.tokens_computed += t;
                self.sched.update(step, &logits, &mut self.kv.pool);
            }
            Err(err) => {
                tracing::error!(%err, seqs = step.entries.len(), "batched forward failed");
                self.model.backend().device_status()?;
                tracing::info!("the device is usable: retrying each sequence alone");
                for e in &step.entries {
                    let one = Step {
                        entries: vec![e.clone()],
                    };
                    match self.forward(&one.entries) {
                        Ok(logits) => {
                            self.tokens_computed += e.len as u64;
                            self.sched.update(&one, &logits, &mut self.kv.pool);
                        }
                        Err(err) => {
                            tracing::error!(request = e.id.0, %err, "forward failed");
                            self.model.backend().device_status()?;
                            self.sched
                                .fail(e.id, EngineError::Internal, &mut self.kv.pool);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn forward(
        &mut self,
        entries: &[super::scheduler::Scheduled],
    ) -> Result<StepOutput, crate::error::RunError> {
        let steps: Vec<SeqStep<'_>> = entries
            .iter()
            .map(|e| SeqStep {
                tokens: &self.sched.tokens(e.id)[e.start..e.start + e.len],
                start_pos: e.start,
                block_table: &e.table,
                logits: if e.all_logits {
                    LogitsFor::All
                } else if e.sample && e.greedy {
                    LogitsFor::Argmax
                } else if let (true, Some((inv_t, u01))) = (e.sample, e.draw) {
                    LogitsFor::Draw { inv_t, u01 }
                } else if e.sample {
                    LogitsFor::Last
                } else {
                    LogitsFor::None
                },
                policy: e.policy,
            })
            .collect();
        // Backend ops are infallible by signature and panic on device errors: a panic here
        // must fail this step's requests, not kill the loop (which would leave every other
        // request without an answer). The store may hold partial writes of this step; the
        // retry in `execute` rewrites them and a failed sequence's blocks are freed.
        let (model, store) = (&self.model, &mut self.kv.store);
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.forward_step(&steps, store)
        }))
        .unwrap_or_else(|p| Err(crate::error::RunError::Panicked(panic_message(&*p))))
    }

    /// Sends the scheduler's events. A closed receiver aborts its request (and the abort's own
    /// final event goes nowhere).
    fn dispatch(&mut self) {
        loop {
            let outputs = self.sched.take_outputs();
            if outputs.is_empty() {
                break;
            }
            let now = Instant::now();
            for Output { id, event } in outputs {
                self.recorder.event(id, &event, now);
                let terminal =
                    matches!(event, EngineEvent::Finished { .. } | EngineEvent::Error(_));
                if matches!(event, EngineEvent::Token(_)) {
                    self.tokens_generated += 1;
                }
                let delivered = self
                    .senders
                    .get(&id)
                    .is_some_and(|tx| tx.send(event).is_ok());
                if terminal {
                    self.senders.remove(&id);
                } else if !delivered {
                    self.senders.remove(&id);
                    self.sched.abort(id, &mut self.kv.pool);
                }
            }
        }
    }

    fn publish(&self) {
        let stats = EngineStats {
            scheduler: self.sched.stats(),
            kv: Some(self.kv.pool.stats()),
            tokens_computed: self.tokens_computed,
            tokens_generated: self.tokens_generated,
            forward_seconds: self.forward_time.as_secs_f64(),
            step_seconds: self.step_time.as_secs_f64(),
            block_bytes: self.kv.classes.filling_bytes(),
        };
        *self.shared.stats.lock().expect("stats lock") = stats;
    }
}

/// A caught panic's message (`panic!` with a literal or a formatted string).
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}
