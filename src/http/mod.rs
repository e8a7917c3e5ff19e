//! The OpenAI-compatible HTTP API (axum): routes, auth, validation, text, SSE and the one error
//! mapping. Only this layer sees JSON or text; it hands the engine token ids (DESIGN §1).

pub mod chat;
pub mod completions;
pub mod conn;
pub mod error;
pub mod generation;
pub mod kv;
pub mod limits;
pub mod logprobs;
pub mod openapi;
pub mod prompt;
pub mod request;
pub mod response;
pub mod routes;
pub mod state;
pub mod stream;
pub mod text;
pub mod validate;

pub use error::ApiError;
pub use state::{AppState, ModelInfo};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(title = "kvserve", description = "OpenAI-compatible multi-tenant LLM inference server"),
    paths(
        completions::completions,
        chat::chat_completions,
        routes::models,
        routes::kv_policies,
        routes::health,
        routes::ready,
        routes::metrics,
        routes::tokenize,
        routes::detokenize,
    ),
    components(schemas(response::ChatChunk)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

async fn openapi_json(State(state): State<Arc<AppState>>) -> Response {
    Json(openapi::document(
        &state.limits,
        &state.model.name,
        state.model.vocab_size,
    ))
    .into_response()
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Counts every response by route (bounded: matched routes only) and status.
async fn count_responses(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", |p| match p.as_str() {
            "/v1/completions" => "/v1/completions",
            "/v1/chat/completions" => "/v1/chat/completions",
            "/v1/models" => "/v1/models",
            "/tokenize" => "/tokenize",
            "/detokenize" => "/detokenize",
            _ => "other",
        });
    let resp = next.run(req).await;
    state
        .metrics
        .http_requests
        .with_label_values(&[route, resp.status().as_str()])
        .inc();
    resp
}

/// Reads the whole request body within `server.body_read_timeout_secs` of the headers (408
/// otherwise): a client trickling its body cannot hold a connection and a task forever. Bodies
/// are small JSON documents the handlers buffer anyway, so nothing streams past this.
async fn body_deadline(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    use axum::extract::FromRequest;
    let secs = state.limits.body_read_timeout_secs;
    let (parts, body) = req.into_parts();
    let read = axum::body::Bytes::from_request(Request::from_parts(parts.clone(), body), &());
    match tokio::time::timeout(Duration::from_secs(secs), read).await {
        Ok(Ok(bytes)) => next.run(Request::from_parts(parts, bytes.into())).await,
        Ok(Err(rejection)) => routes::body_error(rejection, &state).into_response(),
        Err(_) => {
            tracing::info!(secs, "request body not received in time");
            ApiError::RequestTimeout { secs }.into_response()
        }
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/models", get(routes::models))
        .route("/v1/kv_policies", get(routes::kv_policies))
        .route("/health", get(routes::health))
        .route("/ready", get(routes::ready))
        .route("/metrics", get(routes::metrics))
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .route("/openapi.json", get(openapi_json))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), body_deadline))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_responses,
        ))
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .with_state(state)
}

/// What the listening socket answers while the model loads (the port is open from the start,
/// so orchestrators see a live process): `/health` 200, `/ready` and everything else 503
/// `loading` with `Retry-After`. Returns once `loaded` resolves, after the connections it
/// accepted are answered.
pub async fn serve_loading(
    listener: TcpListener,
    loaded: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    async fn loading() -> ApiError {
        ApiError::Unavailable {
            message: "the model is loading".into(),
            code: "loading",
            retry_after_secs: 5,
        }
    }
    let app = Router::new()
        .route(
            "/health",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route(
            "/ready",
            get(|| async {
                (
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    [(axum::http::header::RETRY_AFTER, "5")],
                    Json(serde_json::json!({"status": "loading"})),
                )
            }),
        )
        .fallback(loading);
    let timeouts = conn::ConnTimeouts::from_config(&crate::config::ServerSection::default());
    conn::serve(listener, app, timeouts, loaded).await;
    Ok(())
}

/// Serves until `shutdown` resolves, then drains: `/ready` turns 503, new generations get 503,
/// no new connections are accepted, and in-flight requests (streams included) get
/// `drain_timeout_secs` to finish before this returns.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state.clone());
    let drain = Duration::from_secs(state.limits.drain_timeout_secs);
    let (began_tx, began_rx) = tokio::sync::oneshot::channel::<()>();
    let st = state.clone();
    let timeouts = conn::ConnTimeouts::from_config(&state.limits);
    let server = conn::serve(listener, app, timeouts, async move {
        shutdown.await;
        st.start_draining();
        tracing::info!("draining: finishing in-flight requests");
        let _ = began_tx.send(());
    });
    let deadline = async move {
        if began_rx.await.is_ok() {
            tokio::time::sleep(drain).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = server => Ok(()),
        () = deadline => {
            tracing::warn!(secs = drain.as_secs(), "drain timeout: exiting with requests in flight");
            Ok(())
        }
    }
}
