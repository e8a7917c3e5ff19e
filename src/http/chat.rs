//! `POST /v1/chat/completions`: the conversation rendered with the model's chat template, then
//! generated like a completion; plain (`chat.completion`) or streaming
//! (`chat.completion.chunk`: a first delta with `role: "assistant"` per choice, content deltas,
//! one chunk with `finish_reason` per choice).

use super::error::ApiError;
use super::generation::{self, ChoiceEvent};
use super::logprobs::chat_logprobs;
use super::request::ChatRequest;
use super::response::{
    ChatChoice, ChatChunk, ChatChunkChoice, ChatDelta, ChatMessageOut, ChatResponse, UsageOut,
};
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
    path = "/v1/chat/completions",
    request_body = ChatRequest,
    responses(
        (status = 200, description = "A chat completion, or an SSE stream of `chat.completion.chunk` frames ending with `data: [DONE]` when `stream` is true", body = ChatResponse),
        (status = 400, body = super::response::ErrorResponse),
        (status = 401, body = super::response::ErrorResponse),
        (status = 404, body = super::response::ErrorResponse),
        (status = 413, body = super::response::ErrorResponse),
        (status = 429, body = super::response::ErrorResponse),
        (status = 503, body = super::response::ErrorResponse),
    ),
    security(("bearer" = []))
)]
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let handler = serve(state, headers, body, id.clone());
    in_request_span(&id, "/v1/chat/completions", handler).await
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
        |r: &ChatRequest| &r.unknown,
        |req, kv| validate::chat(req, &state.model, &state.limits, kv),
    )?;
    let model = state.model.name.clone();
    if plan.stream {
        let n = plan.n;
        let ch = Chunker {
            state,
            plan,
            id,
            model,
            created: unix_now(),
        };
        return Ok(sse_response(gen, n, ch));
    }
    let results = gen.collect().await?;
    let tok = &state.model.tokenizer;
    let usages: Vec<_> = results.iter().map(|r| r.usage).collect();
    let choices = results
        .into_iter()
        .enumerate()
        .map(|(index, r)| ChatChoice {
            index,
            logprobs: plan.logprobs.map(|_| chat_logprobs(tok, &r.tokens)),
            message: ChatMessageOut {
                role: "assistant",
                content: r.text,
            },
            finish_reason: Some(r.reason),
        })
        .collect();
    Ok(Json(ChatResponse {
        id,
        object: "chat.completion",
        created: unix_now(),
        model,
        choices,
        usage: generation::total_usage(&usages, plan.n),
    })
    .into_response())
}

struct Chunker {
    state: Arc<AppState>,
    plan: Plan,
    id: String,
    model: String,
    created: u64,
}

impl Chunker {
    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<UsageOut>) -> Event {
        data(&ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        })
    }

    fn one(&self, index: usize, delta: ChatDelta, finish: Option<&'static str>) -> ChatChunkChoice {
        ChatChunkChoice {
            index,
            delta,
            logprobs: None,
            finish_reason: finish,
        }
    }
}

impl ChunkFormat for Chunker {
    fn prelude(&mut self, choices: usize) -> Vec<Event> {
        (0..choices)
            .map(|index| {
                let delta = ChatDelta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                };
                self.chunk(vec![self.one(index, delta, None)], None)
            })
            .collect()
    }

    fn on(&mut self, ev: ChoiceEvent) -> Vec<Event> {
        match ev {
            ChoiceEvent::Text { index, release } => {
                let mut c = self.one(
                    index,
                    ChatDelta {
                        role: None,
                        content: Some(release.text),
                    },
                    None,
                );
                if self.plan.logprobs.is_some() {
                    c.logprobs = Some(chat_logprobs(&self.state.model.tokenizer, &release.tokens));
                }
                vec![self.chunk(vec![c], None)]
            }
            ChoiceEvent::Done { index, reason, .. } => {
                vec![self.chunk(
                    vec![self.one(index, ChatDelta::default(), Some(reason))],
                    None,
                )]
            }
            ChoiceEvent::PromptLogprobs { .. } | ChoiceEvent::Failed { .. } => Vec::new(),
        }
    }

    fn usage(&mut self, usage: UsageOut) -> Option<Event> {
        self.plan
            .include_usage
            .then(|| self.chunk(Vec::new(), Some(usage)))
    }
}
