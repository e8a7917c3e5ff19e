//! Runs a validated [`Plan`] on the engine: one engine request per choice, each followed by a
//! task that turns its token events into text (incremental detokenization, stop strings) and
//! forwards them, tagged with the choice index, into one channel that the response (plain or
//! streaming) reads. Dropping the [`Generation`] (the client went away) aborts every choice, so
//! their KV blocks are freed at the engine's next step.

use super::error::ApiError;
use super::limits::ConcurrencyGuard;
use super::state::AppState;
use super::text::{Release, TextStream};
use super::validate::Plan;
use crate::engine::sampler::Sampled;
use crate::engine::{EngineEvent, EngineHandle, Usage};
use crate::model::tokenizer::IncrementalDecoder;
use crate::types::{FinishReason, RequestId, TenantId};
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::Instrument;

/// What the response sees of one choice, in order: at most one `PromptLogprobs`, any number of
/// `Text`, then exactly one `Done` or `Failed`.
#[derive(Debug)]
pub enum ChoiceEvent {
    PromptLogprobs {
        index: usize,
        lps: Vec<Sampled>,
    },
    Text {
        index: usize,
        release: Release,
    },
    Done {
        index: usize,
        reason: &'static str,
        usage: Usage,
    },
    Failed {
        index: usize,
        error: ApiError,
    },
}

pub struct Generation {
    pub events: mpsc::UnboundedReceiver<ChoiceEvent>,
    pub choices: usize,
    ids: Vec<RequestId>,
    engine: EngineHandle,
    _guard: ConcurrencyGuard,
}

impl Drop for Generation {
    fn drop(&mut self) {
        // Finished requests ignore the abort; running ones free their blocks.
        for &id in &self.ids {
            self.engine.abort(id);
        }
    }
}

/// Submits every choice of `plan` for `tenant`. A refusal at submission (queue full, shutting
/// down) aborts the choices already submitted and is returned as the response's error.
pub fn start(
    state: &Arc<AppState>,
    plan: &Plan,
    tenant: TenantId,
    guard: ConcurrencyGuard,
) -> Result<Generation, ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let reqs = plan.engine_requests(tenant);
    let mut ids = Vec::with_capacity(reqs.len());
    let mut subs = Vec::with_capacity(reqs.len());
    for req in reqs {
        match state.engine.submit(req) {
            Ok(sub) => {
                ids.push(sub.id);
                subs.push(sub);
            }
            Err(e) => {
                for &id in &ids {
                    state.engine.abort(id);
                }
                let e = ApiError::from(e);
                state.count_rejection(Some(tenant), &e);
                return Err(e);
            }
        }
    }
    for (index, sub) in subs.into_iter().enumerate() {
        let prompt = &plan.prompts[index / plan.n].ids;
        let decoder = IncrementalDecoder::with_context(&state.model.tokenizer, prompt, true)
            .map_err(|e| {
                tracing::error!(%e, "decoder context");
                ApiError::Internal
            })?;
        let text = TextStream::new(decoder, plan.stops.clone());
        let hidden: Vec<u32> = if plan.stop.ignore_eos {
            Vec::new()
        } else {
            plan.stop.stop_ids.clone()
        };
        let choice = Choice {
            index,
            id: sub.id,
            tenant,
        };
        tokio::spawn(
            follow(state.clone(), choice, sub.events, text, hidden, tx.clone())
                .instrument(tracing::Span::current()),
        );
    }
    tracing::debug!(requests = ?ids.iter().map(|r| r.0).collect::<Vec<_>>(), "submitted");
    Ok(Generation {
        events: rx,
        choices: ids.len(),
        ids,
        engine: state.engine.clone(),
        _guard: guard,
    })
}

/// Which engine request a choice is.
struct Choice {
    index: usize,
    id: RequestId,
    tenant: TenantId,
}

/// Follows one choice until it ends or the response is gone.
async fn follow(
    state: Arc<AppState>,
    choice: Choice,
    mut events: mpsc::UnboundedReceiver<EngineEvent>,
    mut text: TextStream,
    hidden: Vec<u32>,
    tx: mpsc::UnboundedSender<ChoiceEvent>,
) {
    let Choice { index, id, tenant } = choice;
    let tok = &state.model.tokenizer;
    // Tokens up to and including the one that completed a stop string.
    let mut completion_tokens = 0usize;
    loop {
        let ev = tokio::select! {
            biased;
            _ = tx.closed() => return, // the response is gone; dropping `events` aborts
            ev = events.recv() => ev,
            // A hung step never sends again (see `engine.step_timeout_secs`): the failure
            // ends the choice instead.
            _ = state.engine.failed() => None,
        };
        // The engine dropped the request without a last event, or hangs: a failure says why
        // (anything else is a bug, logged by the engine, and a 500 below).
        let ev = match ev {
            None if state.engine.failure().is_some() => {
                Some(EngineEvent::Error(crate::engine::EngineError::Failed))
            }
            ev => ev,
        };
        let out = match ev {
            Some(EngineEvent::PromptLogprobs(lps)) => ChoiceEvent::PromptLogprobs { index, lps },
            Some(EngineEvent::Token(s)) => {
                if text.stopped() {
                    continue; // generated before the abort landed
                }
                completion_tokens += 1;
                let is_hidden = hidden.contains(&s.token);
                match text.push(tok, s, is_hidden) {
                    Ok(release) => {
                        if text.stopped() {
                            state.engine.abort(id);
                        }
                        if release.is_empty() {
                            continue;
                        }
                        ChoiceEvent::Text { index, release }
                    }
                    Err(e) => {
                        tracing::error!(request = id.0, %e, "detokenization failed");
                        state.engine.abort(id);
                        let _ = tx.send(ChoiceEvent::Failed {
                            index,
                            error: ApiError::Internal,
                        });
                        return;
                    }
                }
            }
            Some(EngineEvent::Finished { reason, usage, .. }) => {
                match text.finish(tok) {
                    Ok(release) if !release.is_empty() => {
                        let _ = tx.send(ChoiceEvent::Text { index, release });
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(request = id.0, %e, "detokenization failed"),
                }
                let reason = if text.stopped() {
                    "stop"
                } else {
                    match reason {
                        FinishReason::Stop => "stop",
                        FinishReason::Length => "length",
                        // Aborted without a stop string: only the server aborts (drain timeout).
                        FinishReason::Abort => "abort",
                    }
                };
                let usage = Usage {
                    completion_tokens,
                    ..usage
                };
                tracing::info!(
                    choice = index,
                    request = id.0,
                    reason,
                    prompt_tokens = usage.prompt_tokens,
                    cached_tokens = usage.cached_tokens,
                    completion_tokens,
                    kv_policy = %usage.kv_policy,
                    "choice finished"
                );
                let _ = tx.send(ChoiceEvent::Done {
                    index,
                    reason,
                    usage,
                });
                return;
            }
            Some(EngineEvent::Error(e)) => {
                if let Some(r) = ApiError::engine_rejection_reason(&e) {
                    state.metrics.reject(Some(tenant), r);
                }
                let error = ApiError::from(e);
                tracing::info!(
                    choice = index,
                    request = id.0,
                    status = error.status().as_u16(),
                    "choice failed"
                );
                ChoiceEvent::Failed { index, error }
            }
            None => ChoiceEvent::Failed {
                index,
                error: ApiError::Internal,
            },
        };
        let terminal = matches!(out, ChoiceEvent::Failed { .. });
        if tx.send(out).is_err() || terminal {
            return;
        }
    }
}

/// One choice, complete (the non-streaming responses).
#[derive(Debug, Default)]
pub struct ChoiceResult {
    pub text: String,
    pub tokens: Vec<super::text::TextToken>,
    pub prompt_lps: Option<Vec<Sampled>>,
    pub reason: &'static str,
    pub usage: Usage,
}

impl Generation {
    /// Waits for every choice. The first failure fails the whole response (the other choices
    /// are aborted when `self` drops).
    pub async fn collect(mut self) -> Result<Vec<ChoiceResult>, ApiError> {
        let mut out: Vec<ChoiceResult> =
            (0..self.choices).map(|_| ChoiceResult::default()).collect();
        let mut open = self.choices;
        while open > 0 {
            let Some(ev) = self.events.recv().await else {
                return Err(ApiError::Internal);
            };
            match ev {
                ChoiceEvent::PromptLogprobs { index, lps } => out[index].prompt_lps = Some(lps),
                ChoiceEvent::Text { index, release } => {
                    out[index].text.push_str(&release.text);
                    out[index].tokens.extend(release.tokens);
                }
                ChoiceEvent::Done {
                    index,
                    reason,
                    usage,
                } => {
                    out[index].reason = reason;
                    out[index].usage = usage;
                    open -= 1;
                }
                ChoiceEvent::Failed { error, .. } => return Err(error),
            }
        }
        Ok(out)
    }
}

/// OpenAI's `usage` over a response: each prompt counted once (its cached tokens are the least
/// any of its choices got, i.e. what the prompt really reused), completions summed.
pub fn total_usage(usages: &[Usage], n: usize) -> super::response::UsageOut {
    let mut u = super::response::UsageOut::default();
    for group in usages.chunks(n.max(1)) {
        u.prompt_tokens += group[0].prompt_tokens;
        u.prompt_tokens_details.cached_tokens +=
            group.iter().map(|g| g.cached_tokens).min().unwrap_or(0);
        u.completion_tokens += group.iter().map(|g| g.completion_tokens).sum::<usize>();
    }
    u.total_tokens = u.prompt_tokens + u.completion_tokens;
    if let Some(first) = usages.first() {
        let bytes: usize = usages.iter().map(|g| g.kv_bytes).sum();
        let bf16: usize = usages.iter().map(|g| g.kv_bytes_bf16).sum();
        u.kv = Some(super::response::KvUsageOut {
            policy: first.kv_policy.to_string(),
            bytes,
            bytes_saved_vs_bf16: bf16.saturating_sub(bytes),
            fallback: usages.iter().any(|g| g.kv_fallback),
        });
    }
    u
}
