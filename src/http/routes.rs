//! The small endpoints (models, health, readiness, metrics, tokenize, detokenize, the 404
//! fallback) and the steps every generation endpoint takes first: authenticate, parse the
//! body, admit under the tenant's limits.

use super::error::ApiError;
use super::generation::{self, Generation};
use super::limits::ConcurrencyGuard;
use super::prompt::render_chat;
use super::request::{DetokenizeRequest, TokenizeRequest};
use super::response::{DetokenizeResponse, ModelCard, ModelList, TokenizeResponse};
use super::state::AppState;
use super::validate::Plan;
use crate::engine::KvChoice;
use crate::types::TenantId;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One SSE `data:` frame holding `v` as JSON.
pub fn data<T: Serialize>(v: &T) -> Event {
    Event::default().data(serde_json::to_string(v).unwrap_or_default())
}

/// The presented API key: `Authorization: Bearer KEY` or `x-api-key: KEY`.
fn api_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        if let Some(k) = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
        {
            return Some(k.trim());
        }
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// The API key's tenant, recorded on the current request span; a refusal counts as a
/// rejection (reason `auth`, tenant `other`).
pub fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<TenantId, ApiError> {
    let tenant = state
        .tenancy
        .authenticate(api_key(headers))
        .map_err(|e| ApiError::Unauthorized(e.to_string()))
        .inspect_err(|e| state.count_rejection(None, e))?;
    tracing::Span::current().record("tenant", state.metrics.tenant(tenant));
    Ok(tenant)
}

/// Runs one generation request's handler inside the request's span: its response id and, once
/// authenticated, its tenant (never any prompt text); an error answer is logged there as a
/// refusal. The engine's per-step spans are separate (debug level).
pub async fn in_request_span(
    id: &str,
    endpoint: &'static str,
    handler: impl std::future::Future<Output = Result<Response, ApiError>>,
) -> Result<Response, ApiError> {
    let span = tracing::info_span!("request", id, endpoint, tenant = tracing::field::Empty);
    handler
        .instrument(span.clone())
        .await
        .inspect_err(|e| span.in_scope(|| log_refused(e)))
}

/// Logs a request that ends with an error before any response was streamed.
fn log_refused(e: &ApiError) {
    tracing::info!(
        status = e.status().as_u16(),
        reason = e.rejection_reason(),
        "request refused"
    );
}

/// A body that could not be read: over the size limit is 413, anything else 400.
pub fn body_error(e: BytesRejection, state: &AppState) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge {
            limit: state.limits.max_body_bytes,
        }
    } else {
        ApiError::Invalid {
            message: format!("could not read the request body: {e}"),
            param: None,
        }
    }
}

/// JSON body → `T`; a body over the size limit is 413, anything malformed 400 (never 422).
pub fn parse_body<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    state: &AppState,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| body_error(e, state))?;
    super::validate::json_body(&body)
}

/// The way in of every generation request: authenticate, parse the body (fields it does not
/// know, `unknown`, are logged at debug and ignored), turn it into a plan (`to_plan`: the
/// endpoint's validation, given the tenant's KV choice), admit it under the tenant's limits and
/// start its choices on the engine.
pub fn accept<T: DeserializeOwned>(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    unknown: fn(&T) -> &BTreeMap<String, serde_json::Value>,
    to_plan: impl FnOnce(
        &T,
        &dyn Fn(Option<&str>) -> Result<KvChoice, ApiError>,
    ) -> Result<Plan, ApiError>,
) -> Result<(Plan, Generation), ApiError> {
    let tenant = authenticate(state, headers)?;
    let req: T = parse_body(body, state)?;
    let unknown = unknown(&req);
    if !unknown.is_empty() {
        tracing::debug!(fields = ?unknown.keys().collect::<Vec<_>>(), "ignoring unknown fields");
    }
    let plan = to_plan(&req, &|p| state.kv_choice(tenant, p))
        .inspect_err(|e| state.count_rejection(Some(tenant), e))?;
    let guard = admit(state, tenant, &plan)?;
    let gen = generation::start(state, &plan, tenant, guard)?;
    Ok((plan, gen))
}

/// Refuses work while draining, then charges the tenant's limits for the whole request.
fn admit(state: &AppState, tenant: TenantId, plan: &Plan) -> Result<ConcurrencyGuard, ApiError> {
    let admitted = if state.is_draining() {
        Err(ApiError::Unavailable {
            message: "the server is shutting down".into(),
            code: "draining",
            retry_after_secs: 5,
        })
    } else {
        state
            .limiter
            .admit(tenant, plan.token_cost(), Instant::now())
    };
    admitted.inspect_err(|e| state.count_rejection(Some(tenant), e))
}

/// Every KV policy this server accepts as `kv_policy`, with bytes per token and the latest
/// measured quality.
#[utoipa::path(get, path = "/v1/kv_policies", responses((status = 200, body = super::kv::KvPolicyList), (status = 401, body = super::response::ErrorResponse)), security(("bearer" = [])))]
pub async fn kv_policies(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authenticate(&state, &headers) {
        return e.into_response();
    }
    Json(state.kv.list().clone()).into_response()
}

#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelList), (status = 401, body = super::response::ErrorResponse)), security(("bearer" = [])))]
pub async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authenticate(&state, &headers) {
        return e.into_response();
    }
    Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: state.model.name.clone(),
            object: "model",
            created: state.model.created,
            owned_by: "kvserve",
            max_model_len: state.model.max_context,
        }],
    })
    .into_response()
}

/// Liveness: 200 while the process can serve, 503 `failed` once its engine failed for good
/// (the device is lost or the engine loop panicked; the server exits shortly after, see
/// `server.failure_exit_secs`). The cause is in the server's log, not here.
#[utoipa::path(get, path = "/health", responses((status = 200, description = "alive"), (status = 503, description = "the engine failed; the server is about to exit")))]
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.engine.failure().is_some() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "failed"})),
        )
            .into_response();
    }
    Json(serde_json::json!({"status": "ok"})).into_response()
}

/// Readiness: 200 while serving, 503 while loading, draining or failed.
#[utoipa::path(get, path = "/ready", responses((status = 200, description = "serving"), (status = 503, description = "loading, draining or failed")))]
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.is_ready() {
        Json(serde_json::json!({"status": "ready"})).into_response()
    } else {
        let status = if state.engine.failure().is_some() {
            "failed"
        } else if state.is_draining() {
            "draining"
        } else {
            "loading"
        };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            Json(serde_json::json!({"status": status})),
        )
            .into_response()
    }
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let stats = state.engine.stats();
    let healthy = state.engine.failure().is_none();
    let text = state.metrics.render(|m| {
        stats.record(m);
        m.engine_healthy.set(i64::from(healthy));
    });
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[utoipa::path(post, path = "/tokenize", request_body = TokenizeRequest, responses((status = 200, body = TokenizeResponse), (status = 400, body = super::response::ErrorResponse), (status = 401, body = super::response::ErrorResponse), (status = 404, body = super::response::ErrorResponse), (status = 413, body = super::response::ErrorResponse)), security(("bearer" = [])))]
pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    authenticate(&state, &headers)?;
    let req: TokenizeRequest = parse_body(body, &state)?;
    let (model, tokens) = match req {
        TokenizeRequest::Chat {
            model,
            messages,
            add_generation_prompt,
        } => {
            let text = render_chat(
                &messages,
                add_generation_prompt,
                &state.model,
                &state.limits,
            )?;
            (model, state.model.tokenizer.encode(&text, false))
        }
        TokenizeRequest::Prompt {
            model,
            prompt,
            add_special_tokens,
        } => (
            model,
            state
                .model
                .tokenizer
                .encode(&prompt, add_special_tokens.unwrap_or(true)),
        ),
    };
    check_model(&state, model.as_deref())?;
    let tokens = tokens.map_err(|e| ApiError::invalid("prompt", e.to_string()))?;
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        tokens,
        max_model_len: state.model.max_context,
    }))
}

#[utoipa::path(post, path = "/detokenize", request_body = DetokenizeRequest, responses((status = 200, body = DetokenizeResponse), (status = 400, body = super::response::ErrorResponse), (status = 401, body = super::response::ErrorResponse), (status = 404, body = super::response::ErrorResponse), (status = 413, body = super::response::ErrorResponse)), security(("bearer" = [])))]
pub async fn detokenize(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    authenticate(&state, &headers)?;
    let req: DetokenizeRequest = parse_body(body, &state)?;
    check_model(&state, req.model.as_deref())?;
    if let Some(bad) = req
        .tokens
        .iter()
        .find(|&&t| t as usize >= state.model.vocab_size)
    {
        return Err(ApiError::invalid(
            "tokens",
            format!("token id {bad} is outside the vocabulary"),
        ));
    }
    let prompt = state
        .model
        .tokenizer
        .decode(&req.tokens, false)
        .map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
    Ok(Json(DetokenizeResponse { prompt }))
}

fn check_model(state: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != state.model.name => Err(ApiError::NotFound {
            message: format!(
                "the model `{m}` does not exist; this server serves `{}`",
                state.model.name
            ),
            code: "model_not_found",
        }),
        _ => Ok(()),
    }
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound {
        message: "no such route".into(),
        code: "not_found",
    }
}
