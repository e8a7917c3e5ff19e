//! The scheduler: a pure state machine (no I/O, no device, no clock of its own) that decides
//! which tokens run in each step.
//!
//! There is no prefill or decode phase: every sequence has `computed` tokens catching up with
//! its `tokens`, within a per-step token budget (`max_batched_tokens`) and a cap on running
//! sequences. A long prompt is therefore computed in chunks next to running decodes, and the
//! time of one step (the inter-token latency of every stream) stays bounded by the budget.
//!
//! Each step ([`Scheduler::schedule`]):
//! 1. requests that waited past `max_queue_time` without ever being admitted are refused;
//! 2. running sequences, oldest first, get their next chunk (one token when decoding). When the
//!    pool says "not now", a victim is preempted by recompute (its blocks freed, its full blocks
//!    left in the prefix cache, the request requeued at its old place); see `Scheduler::victim`;
//! 3. waiting requests are admitted from the tenant with the lowest virtual token counter
//!    (`fair`), best priority first, while budget, running slots and KV allow. A request whose
//!    prompt starts with the same full block as a prompt still being computed (same cache scope)
//!    waits for it, so concurrent identical prefixes (`n > 1`, shared system prompts) are
//!    computed once and then hit the prefix cache.
//!
//! After the forward pass, [`Scheduler::update`] commits the computed KV, samples where a
//! sequence caught up, applies the stop conditions and frees finished sequences' blocks.
//! Events for the caller accumulate in an outbox ([`Scheduler::take_outputs`]).

use super::fair::{FairQueue, WaitKey, OUTPUT_PRICE, PROMPT_PRICE};
use super::paged::KvClasses;
use super::request::{EngineError, EngineEvent, EngineRequest};
use super::sampler::{Sampled, Sampler};
use super::sequence::Sequence;
use crate::kv::policy::KvPolicy;
use crate::kv::{Alloc, KvPool};
use crate::model::llama::StepOutput;
use crate::types::{FinishReason, RequestId, TenantId};
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_batched_tokens: usize,
    pub max_running: usize,
    /// `None`: a request may wait for admission indefinitely.
    pub max_queue_time: Option<Duration>,
    /// The model's context length (prompt + generated tokens at most).
    pub max_context: usize,
    /// The pool's tokens per block (prefix sharing works in whole blocks).
    pub block_size: usize,
    /// Fair-share weights; tenants not listed weigh 1.
    pub weights: Vec<(TenantId, f64)>,
    /// Each KV policy's block weights in the pool.
    pub classes: KvClasses,
}

/// One sequence's share of a step: compute `tokens[start..start + len]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Scheduled {
    pub id: RequestId,
    pub start: usize,
    pub len: usize,
    /// The block table covering `start + len` positions.
    pub table: Vec<u32>,
    /// The chunk reaches the end of the known tokens: sample the next one from its last row.
    pub sample: bool,
    /// Every row's logits are needed (prompt logprobs), not only the last one's.
    pub all_logits: bool,
    /// The next token is the plain argmax of the logits ([`Sampler::plain_greedy`], nothing
    /// banned): the backend picks it where the logits are.
    pub greedy: bool,
    /// The next token is the dense temperature draw of the logits ([`Sampler::dense_draw`],
    /// nothing banned) with this `(1 / temperature, uniform)`: the backend draws it where the
    /// logits are. The uniform is the sequence's next one, peeked, not used up: `update` uses
    /// it up when the token comes back (a step that is retried or a sequence preempted before
    /// its token leaves the stream as it was).
    pub draw: Option<(f32, f64)>,
    /// The sequence's KV policy (how the forward seals and reads its blocks).
    pub policy: KvPolicy,
}

/// What one forward pass computes.
#[derive(Debug, Default)]
pub struct Step {
    pub entries: Vec<Scheduled>,
}

impl Step {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn num_tokens(&self) -> usize {
        self.entries.iter().map(|e| e.len).sum()
    }
}

/// An event for one request's caller.
#[derive(Debug, Clone)]
pub struct Output {
    pub id: RequestId,
    pub event: EngineEvent,
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    seqs: HashMap<RequestId, Sequence>,
    /// Running sequences in admission order (the oldest get their tokens first).
    running: Vec<RequestId>,
    fair: FairQueue,
    outbox: Vec<Output>,
    /// First admissions since the last [`Scheduler::take_admissions`].
    admissions: Vec<Admission>,
    arrivals: u64,
    preemptions: u64,
    steps: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self {
            fair: FairQueue::new(&cfg.weights),
            cfg,
            seqs: HashMap::new(),
            running: Vec::new(),
            outbox: Vec::new(),
            admissions: Vec::new(),
            arrivals: 0,
            preemptions: 0,
            steps: 0,
        }
    }

    /// Queues a request. Errors are the request's own (bad tenant, empty or too long prompt).
    pub fn add(
        &mut self,
        id: RequestId,
        req: EngineRequest,
        pool: &KvPool,
        now: Instant,
    ) -> Result<(), EngineError> {
        if !pool.has_tenant(req.tenant) {
            return Err(EngineError::Invalid("unknown tenant".into()));
        }
        if req.prompt.is_empty() {
            return Err(EngineError::Invalid("the prompt is empty".into()));
        }
        if req.stop.max_tokens == 0 {
            return Err(EngineError::Invalid("max_tokens must be at least 1".into()));
        }
        if self.seqs.contains_key(&id) {
            return Err(EngineError::Invalid("duplicate request id".into()));
        }
        let prompt_len = req.prompt.len();
        if prompt_len >= self.cfg.max_context {
            return Err(EngineError::ContextLength {
                needed: prompt_len + 1,
                max: self.cfg.max_context,
            });
        }
        let key = WaitKey {
            priority: req.priority,
            arrival: self.arrivals,
            id,
        };
        self.arrivals += 1;
        let seq = Sequence {
            tenant: req.tenant,
            scope: pool.scope(req.tenant, req.cache_salt.as_deref()),
            key,
            arrived: now,
            max_tokens: req.stop.max_tokens.min(self.cfg.max_context - prompt_len),
            tokens: req.prompt,
            prompt_len,
            stop: req.stop,
            sampler: Sampler::new(&req.sampling),
            blocks: None,
            computed: 0,
            cached_tokens: None,
            preemptions: 0,
            prompt_logprobs: req.prompt_logprobs,
            prompt_lps: Vec::new(),
            kv: req.kv,
            kv_fallback: false,
        };
        self.fair.push(seq.tenant, key);
        self.seqs.insert(id, seq);
        Ok(())
    }

    /// Ends a request wherever it is, freeing its blocks at once; emits `Finished(Abort)`.
    pub fn abort(&mut self, id: RequestId, pool: &mut KvPool) -> bool {
        let Some(seq) = self.seqs.get(&id) else {
            return false;
        };
        let event = EngineEvent::Finished {
            reason: FinishReason::Abort,
            usage: seq.usage(&self.cfg.classes),
            preemptions: seq.preemptions,
        };
        self.remove(id, pool);
        self.outbox.push(Output { id, event });
        true
    }

    /// Fails a request with `err` (e.g. its forward pass failed), freeing its blocks.
    pub fn fail(&mut self, id: RequestId, err: EngineError, pool: &mut KvPool) {
        if self.remove(id, pool) {
            self.outbox.push(Output {
                id,
                event: EngineEvent::Error(err),
            });
        }
    }

    /// Drops the sequence from wherever it is (running or waiting) and frees its blocks.
    fn remove(&mut self, id: RequestId, pool: &mut KvPool) -> bool {
        let Some(mut seq) = self.seqs.remove(&id) else {
            return false;
        };
        if let Some(blocks) = seq.blocks.take() {
            pool.free(blocks);
            self.running.retain(|r| *r != id);
            self.fair.running_changed(seq.tenant, false);
        } else {
            self.fair.remove(seq.tenant, &seq.key);
        }
        true
    }

    pub fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.outbox)
    }

    /// First admissions since the last call (for metrics: queue time, fallbacks).
    pub fn take_admissions(&mut self) -> Vec<Admission> {
        std::mem::take(&mut self.admissions)
    }

    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    pub fn num_waiting(&self) -> usize {
        self.fair.num_waiting()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Steps planned so far (after `schedule`, the number of the step it planned).
    pub fn num_steps(&self) -> u64 {
        self.steps
    }

    /// The known tokens of a live request (prompt + generated).
    pub fn tokens(&self, id: RequestId) -> &[u32] {
        self.seqs.get(&id).map_or(&[], |s| &s.tokens)
    }

    /// Plans the next forward pass (see the module docs). Reserves every planned chunk's
    /// blocks in `pool`; the caller performs `pool.take_copies()` before the forward.
    pub fn schedule(&mut self, pool: &mut KvPool, now: Instant) -> Step {
        self.expire(now, pool);
        let mut plan = Vec::new();
        let mut budget = self.cfg.max_batched_tokens;

        for id in self.running.clone() {
            if budget == 0 {
                break;
            }
            if !self.running.contains(&id) {
                continue; // preempted for an older sequence in this step
            }
            self.grow(id, &mut plan, &mut budget, pool);
        }

        let mut blocked: Vec<TenantId> = Vec::new();
        'admit: while budget > 0 && self.running.len() < self.cfg.max_running {
            for t in self.fair.tenants_by_counter() {
                if blocked.contains(&t) {
                    continue;
                }
                let candidate = self
                    .fair
                    .waiting_of(t)
                    .find(|k| !self.waits_for_shared_prefix(k.id))
                    .copied();
                let Some(key) = candidate else {
                    blocked.push(t);
                    continue;
                };
                if !self.admit(key.id, &mut plan, &mut budget, pool) {
                    blocked.push(t);
                }
                continue 'admit;
            }
            break;
        }
        if !plan.is_empty() {
            self.steps += 1;
        }
        Step { entries: plan }
    }

    /// Refuses requests that waited too long without ever being admitted. Preempted requests
    /// are exempt: they were admitted once and already stream tokens.
    fn expire(&mut self, now: Instant, pool: &mut KvPool) {
        let Some(limit) = self.cfg.max_queue_time else {
            return;
        };
        let expired: Vec<(RequestId, Duration)> = self
            .fair
            .all_waiting()
            .filter_map(|(_, k)| {
                let s = &self.seqs[&k.id];
                let waited = now.saturating_duration_since(s.arrived);
                (s.cached_tokens.is_none() && waited > limit).then_some((k.id, waited))
            })
            .collect();
        for (id, waited) in expired {
            let err = EngineError::QueueTimeout {
                waited_ms: waited.as_millis() as u64,
            };
            self.fail(id, err, pool);
        }
    }

    /// Gives a running sequence its next chunk, preempting others if the pool is short.
    fn grow(
        &mut self,
        id: RequestId,
        plan: &mut Vec<Scheduled>,
        budget: &mut usize,
        pool: &mut KvPool,
    ) {
        // A prefill chunk's blocks all weigh their filling (exact) size until sealed: when a
        // whole chunk does not fit and nobody can be preempted, a smaller chunk may.
        let mut cap = usize::MAX;
        let bs = self.cfg.block_size;
        loop {
            let seq = &self.seqs[&id];
            let n = seq.uncomputed().min(*budget).min(cap);
            let total = seq.computed + n;
            let blocks = seq.blocks.as_ref().expect("running sequence has blocks");
            let extra = pool.units_needed(blocks, total);
            let tenant = seq.tenant;
            match pool.reserve(
                self.seqs.get_mut(&id).unwrap().blocks.as_mut().unwrap(),
                total,
            ) {
                Alloc::Granted => {
                    self.push_entry(id, n, plan, budget, pool);
                    return;
                }
                Alloc::Never => {
                    self.fail(id, EngineError::KvQuota { tokens: total }, pool);
                    return;
                }
                Alloc::NotNow => match self.victim(id, tenant, extra, pool, false) {
                    Some(v) => self.preempt(v, plan, budget, pool),
                    None if n > bs => cap = (n / 2).max(bs) / bs * bs,
                    None => {
                        self.preempt(id, plan, budget, pool);
                        return;
                    }
                },
            }
        }
    }

    /// Tries to admit a waiting request. Returns false if the pool cannot take it now (it
    /// stays queued at its place).
    fn admit(
        &mut self,
        id: RequestId,
        plan: &mut Vec<Scheduled>,
        budget: &mut usize,
        pool: &mut KvPool,
    ) -> bool {
        let seq = self.seqs.get_mut(&id).expect("waiting sequence exists");
        let (tenant, key) = (seq.tenant, seq.key);
        let class = self.cfg.classes.class(&seq.kv.policy);
        let (blocks, cached) = match pool.start_as(tenant, &seq.scope, seq.cache_lookup(), class) {
            Ok(x) => x,
            Err(e) => {
                self.fail(id, EngineError::Invalid(e.to_string()), pool);
                return true;
            }
        };
        seq.computed = cached;
        seq.blocks = Some(blocks);
        // Tokens of the first chunk: shrunk (down to one block) when a whole chunk of blocks
        // at their filling weight does not fit now but a smaller one does.
        let mut cap = usize::MAX;
        let bs = self.cfg.block_size;
        loop {
            let seq = self.seqs.get_mut(&id).unwrap();
            let n = seq.uncomputed().min(*budget).min(cap);
            let total = seq.computed + n;
            let blocks = seq.blocks.as_mut().unwrap();
            let extra = pool.units_needed(blocks, total);
            match pool.reserve(blocks, total) {
                Alloc::Granted => break,
                Alloc::Never => {
                    if let Some(n) = self.admit_fallback(id, *budget, pool) {
                        cap = n;
                        break;
                    }
                    let seq = self.seqs.get_mut(&id).unwrap();
                    let b = seq.blocks.take().unwrap();
                    seq.computed = 0;
                    pool.free(b);
                    self.fail(id, EngineError::KvQuota { tokens: total }, pool);
                    return true;
                }
                Alloc::NotNow => match self.victim(id, tenant, extra, pool, true) {
                    Some(v) => self.preempt(v, plan, budget, pool),
                    None if n > bs => cap = (n / 2).max(bs) / bs * bs,
                    None => {
                        if let Some(n) = self.admit_fallback(id, *budget, pool) {
                            cap = n;
                            break;
                        }
                        let seq = self.seqs.get_mut(&id).unwrap();
                        let b = seq.blocks.take().unwrap();
                        seq.computed = 0;
                        pool.free(b);
                        return false;
                    }
                },
            }
        }
        let seq = self.seqs.get_mut(&id).unwrap();
        let first = seq.cached_tokens.is_none();
        if first {
            seq.cached_tokens = Some(seq.computed);
            self.admissions.push(Admission {
                id,
                fallback: seq.kv_fallback.then_some(seq.kv.policy),
            });
        }
        let prompt_len = seq.prompt_len;
        self.fair.remove(tenant, &key);
        self.fair.running_changed(tenant, true);
        if first {
            self.fair.charge(tenant, prompt_len, PROMPT_PRICE);
        }
        self.running.push(id);
        let n = self.seqs[&id].uncomputed().min(*budget).min(cap);
        self.push_entry(id, n, plan, budget, pool);
        true
    }

    fn push_entry(
        &mut self,
        id: RequestId,
        n: usize,
        plan: &mut Vec<Scheduled>,
        budget: &mut usize,
        pool: &KvPool,
    ) {
        let seq = &self.seqs[&id];
        let blocks = seq.blocks.as_ref().unwrap();
        let sample = seq.computed + n == seq.tokens.len();
        let unbanned = seq.banned().is_empty();
        let draw = match seq.sampler.dense_draw() {
            Some(inv_t) if sample && unbanned => Some((inv_t, seq.sampler.peek_uniform())),
            _ => None,
        };
        plan.push(Scheduled {
            id,
            start: seq.computed,
            len: n,
            table: pool.block_table(blocks),
            sample,
            all_logits: seq.wants_prompt_logits(),
            greedy: seq.sampler.plain_greedy() && unbanned,
            draw,
            policy: seq.kv.policy,
        });
        *budget -= n;
    }

    /// Preempts by recompute: frees the sequence's blocks (its full blocks stay in the prefix
    /// cache, so the recompute is mostly prefix hits), drops it from this step's plan and puts
    /// it back in its tenant's queue at its original place.
    fn preempt(
        &mut self,
        id: RequestId,
        plan: &mut Vec<Scheduled>,
        budget: &mut usize,
        pool: &mut KvPool,
    ) {
        if let Some(i) = plan.iter().position(|e| e.id == id) {
            *budget += plan.remove(i).len;
        }
        let seq = self.seqs.get_mut(&id).expect("preempted sequence exists");
        if let Some(b) = seq.blocks.take() {
            pool.free(b);
        }
        seq.computed = 0;
        seq.preemptions += 1;
        let (tenant, key) = (seq.tenant, seq.key);
        self.running.retain(|r| *r != id);
        self.fair.running_changed(tenant, false);
        self.fair.push(tenant, key);
        self.preemptions += 1;
    }

    /// Applies a forward pass's results: sequence `i` of `out` belongs to `step.entries[i]`
    /// (its logits rows, or its greedy token). Commits KV, samples, checks stop conditions.
    pub fn update(&mut self, step: &Step, out: &StepOutput, pool: &mut KvPool) {
        // The rows first, every sequence's in parallel (see `rows`); then, in step order, what
        // touches the pool, the fair queue and the outbox.
        let mut drawn = rows::read_rows(&mut self.seqs, step, out);
        for (i, e) in step.entries.iter().enumerate() {
            let Some(seq) = self.seqs.get_mut(&e.id) else {
                continue;
            };
            seq.computed = e.start + e.len;
            let blocks = seq.blocks.as_mut().expect("scheduled sequence is running");
            if let Err(err) = pool.commit(blocks, &seq.tokens[..seq.computed]) {
                tracing::error!(request = e.id.0, %err, "kv commit failed");
                self.fail(e.id, EngineError::Internal, pool);
                continue;
            }
            if seq.prompt_logprobs.is_some() && !seq.wants_prompt_logits() {
                // Complete: sent once; the sequence never asks for prompt logits again.
                seq.prompt_logprobs = None;
                let lps = std::mem::take(&mut seq.prompt_lps);
                self.outbox.push(Output {
                    id: e.id,
                    event: EngineEvent::PromptLogprobs(lps),
                });
            }
            if !e.sample {
                continue;
            }
            let sampled = match out.token(i) {
                // What the sampler would pick (see `Scheduled::greedy` and `draw`), with nothing
                // to report; a draw's uniform is used up now.
                Some(token) => {
                    if e.draw.is_some() {
                        seq.sampler.commit_uniform();
                    }
                    Sampled {
                        token,
                        logprob: None,
                        top_logprobs: Vec::new(),
                    }
                }
                None => drawn[i].take().expect("a sampling entry's row was read"),
            };
            seq.tokens.push(sampled.token);
            let tenant = seq.tenant;
            let finish = seq.finish_reason();
            self.fair.charge(tenant, 1, OUTPUT_PRICE);
            self.outbox.push(Output {
                id: e.id,
                event: EngineEvent::Token(sampled),
            });
            if let Some(reason) = finish {
                let seq = &self.seqs[&e.id];
                let event = EngineEvent::Finished {
                    reason,
                    usage: seq.usage(&self.cfg.classes),
                    preemptions: seq.preemptions,
                };
                self.remove(e.id, pool);
                self.outbox.push(Output { id: e.id, event });
            }
        }
    }
}

#[path = "scheduler_policy.rs"]
mod policy;
#[path = "scheduler_rows.rs"]
mod rows;
#[path = "scheduler_stats.rs"]
mod stats;
pub use stats::{Admission, SchedulerStats, TenantLoad};
#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
