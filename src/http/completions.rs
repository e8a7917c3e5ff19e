//! `POST /v1/completions`: plain and streaming (`text_completion` objects either way).

use super::error::ApiError;
use super::generation::{self, ChoiceEvent, Generation};
use super::request::CompletionRequest;
use super::response::{CompletionChoice, CompletionLogprobs, CompletionResponse, UsageOut};
use super::routes::{accept, data, in_request_span, unix_now};
use super::state::AppState;
use super::stream::{sse_response, ChunkFormat};
use super::validate::{self, Plan};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::sync::Arc;

#[utoipa::path(
    post,
    path = "/v1/completions",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "A completion, or an SSE stream of `data: {chunk}` frames ending with `data: [DONE]` when `stream` is true", body = CompletionResponse),
        (status = 400, body = super::response::ErrorResponse),
        (status = 401, body = super::response::ErrorResponse),
        (status = 404, body = super::response::ErrorResponse),
        (status = 413, body = super::response::ErrorResponse),
        (status = 429, body = super::response::ErrorResponse),
        (status = 503, body = super::response::ErrorResponse),
    ),
    security(("bearer" = []))
)]
pub async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let handler = serve(state, headers, body, id.clone());
    in_request_span(&id, "/v1/completions", handler).await
}

async fn serve(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    id: String,
) -> Result<Response, ApiError> {
    let (plan, gen) = accept(
        &state,
        &headers,
        body,
        |r: &CompletionRequest| &r.unknown,
        |req, kv| validate::completion(req, &state.model, &state.limits, kv),
    )?;
    let model = state.model.name.clone();
    if plan.stream {
        return Ok(stream(state, plan, gen, id, model));
    }
    let results = gen.collect().await?;
    let tok = &state.model.tokenizer;
    let mut choices = Vec::with_capacity(results.len());
    let usages: Vec<_> = results.iter().map(|r| r.usage).collect();
    for (index, r) in results.into_iter().enumerate() {
        let prompt = &plan.prompts[index / plan.n];
        let mut text = String::new();
        let mut lps = plan.logprobs.map(|_| CompletionLogprobs::default());
        if plan.echo {
            text.push_str(&prompt.text);
            if let Some(l) = lps.as_mut() {
                l.push_prompt(tok, &prompt.ids, r.prompt_lps.as_deref().unwrap_or(&[]));
            }
        }
        if let Some(l) = lps.as_mut() {
            l.push_generated(tok, &r.tokens, text.len());
        }
        text.push_str(&r.text);
        choices.push(CompletionChoice {
            index,
            text,
            logprobs: lps,
            finish_reason: Some(r.reason),
        });
    }
    Ok(Json(CompletionResponse {
        id,
        object: "text_completion",
        created: unix_now(),
        model,
        choices,
        usage: Some(generation::total_usage(&usages, plan.n)),
    })
    .into_response())
}

/// Turns choice events into `text_completion` chunks.
struct Chunker {
    state: Arc<AppState>,
    plan: Plan,
    id: String,
    model: String,
    created: u64,
}

impl Chunker {
    fn chunk(
        &self,
        index: usize,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish: Option<&'static str>,
    ) -> Event {
        let c = CompletionResponse {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices: vec![CompletionChoice {
                index,
                text,
                logprobs,
                finish_reason: finish,
            }],
            usage: None,
        };
        data(&c)
    }

    /// Byte length of the echoed prompt before a choice's generated text.
    fn echo_len(&self, index: usize) -> usize {
        if self.plan.echo {
            self.plan.prompts[index / self.plan.n].text.len()
        } else {
            0
        }
    }
}

impl ChunkFormat for Chunker {
    fn prelude(&mut self, choices: usize) -> Vec<Event> {
        // Echo without logprobs: the prompt text opens each choice (with logprobs it comes
        // with the prompt logprobs instead).
        if !self.plan.echo || self.plan.logprobs.is_some() {
            return Vec::new();
        }
        (0..choices)
            .map(|index| {
                let text = self.plan.prompts[index / self.plan.n].text.clone();
                self.chunk(index, text, None, None)
            })
            .collect()
    }

    fn on(&mut self, ev: ChoiceEvent) -> Vec<Event> {
        let tok = &self.state.model.tokenizer;
        match ev {
            ChoiceEvent::PromptLogprobs { index, lps } => {
                let prompt = &self.plan.prompts[index / self.plan.n];
                let mut l = CompletionLogprobs::default();
                l.push_prompt(tok, &prompt.ids, &lps);
                vec![self.chunk(index, prompt.text.clone(), Some(l), None)]
            }
            ChoiceEvent::Text { index, release } => {
                let l = self.plan.logprobs.map(|_| {
                    let mut l = CompletionLogprobs::default();
                    l.push_generated(tok, &release.tokens, self.echo_len(index));
                    l
                });
                vec![self.chunk(index, release.text, l, None)]
            }
            ChoiceEvent::Done { index, reason, .. } => {
                vec![self.chunk(index, String::new(), None, Some(reason))]
            }
            ChoiceEvent::Failed { .. } => Vec::new(),
        }
    }

    fn usage(&mut self, usage: UsageOut) -> Option<Event> {
        self.plan.include_usage.then(|| {
            data(&CompletionResponse {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: vec![],
                usage: Some(usage),
            })
        })
    }
}

fn stream(
    state: Arc<AppState>,
    plan: Plan,
    gen: Generation,
    id: String,
    model: String,
) -> Response {
    let n = plan.n;
    let ch = Chunker {
        state,
        id,
        model,
        created: unix_now(),
        plan,
    };
    sse_response(gen, n, ch)
}
