//! The HTTP API: the plan's `/debug/memory/?action=status|snapshot|diff|stop`,
//! a JSON REST API beside it, `/healthz`, `/metrics` and `/openapi.json`.
//!
//! Handlers talk to a [`Backend`], so the router is tested with a fake one,
//! with no socket and no root; the agent's real backend is in
//! [`crate::backend`].
mod debug;
mod error;
pub mod query;
mod rest;

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
pub use error::ApiError;
use serde_json::json;
use subtle::ConstantTimeEq as _;

use crate::{
    requests::RequestRecord,
    snapshot::{DiffView, SnapshotView},
    status::{StatusView, WorkerStatus},
};

/// Failures of backend operations a client can cause or must know about.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BackendError {
    #[error("no traced process with pid {0}")]
    UnknownPid(u32),
    #[error("no snapshot to compare with: call ?action=snapshot first")]
    NoBaseline,
    /// The detail is logged by the backend; the client gets this text.
    #[error("{0}")]
    Unavailable(String),
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::UnknownPid(_) => ApiError::NotFound(e.to_string()),
            BackendError::NoBaseline => ApiError::BadRequest(e.to_string()),
            BackendError::Unavailable(m) => ApiError::Unavailable(m),
        }
    }
}

/// `?action=stop`
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StopView {
    pub status: &'static str,
    pub collection_active: bool,
    pub programs_detached: usize,
}

/// What the API needs from the agent. Calls may block (they read /proc and
/// kernel maps); handlers run them on the blocking pool.
pub trait Backend: Send + Sync + 'static {
    fn status(&self, pid: Option<u32>) -> Result<StatusView, BackendError>;
    fn workers(&self) -> Vec<WorkerStatus>;
    fn worker(&self, pid: u32) -> Result<WorkerStatus, BackendError>;
    fn requests(&self, pid: u32, limit: usize) -> Result<Vec<RequestRecord>, BackendError>;
    /// Turns allocation-site collection on (for `pid`, or every worker) and
    /// keeps the current state as the baseline.
    fn snapshot(&self, pid: Option<u32>, limit: usize) -> Result<SnapshotView, BackendError>;
    /// Growth since the baseline, which becomes the current state.
    fn diff(&self, pid: Option<u32>, limit: usize) -> Result<DiffView, BackendError>;
    /// Turns collection off (programs detached) and drops the baseline.
    fn stop(&self) -> Result<StopView, BackendError>;
    /// Prometheus text exposition.
    fn metrics(&self) -> String;
}

/// A secret that never shows in Debug output or logs.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// None for an unset or empty token: the protected endpoints are off.
    pub fn new(value: Option<String>) -> Option<Self> {
        value.filter(|v| !v.is_empty()).map(Self)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

#[derive(Clone)]
pub struct ApiState {
    backend: Arc<dyn Backend>,
    token: Option<Token>,
}

impl ApiState {
    pub fn new(backend: Arc<dyn Backend>, token: Option<Token>) -> Self {
        Self { backend, token }
    }

    /// The token a request carries: `X-Debug-Token`, `Authorization: Bearer`,
    /// or the `token` query parameter, compared in constant time.
    fn authorize(&self, headers: &HeaderMap, query_token: Option<&str>) -> Result<(), ApiError> {
        let Some(expected) = &self.token else {
            return Err(ApiError::Forbidden);
        };
        let from_header = headers
            .get("x-debug-token")
            .and_then(|v| v.to_str().ok())
            .or_else(|| {
                headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
            });
        let given = from_header.or(query_token).ok_or(ApiError::Forbidden)?;
        let ok: bool = given.as_bytes().ct_eq(expected.expose().as_bytes()).into();
        if ok { Ok(()) } else { Err(ApiError::Forbidden) }
    }

    /// Runs a backend call on the blocking pool.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Backend) -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let backend = self.backend.clone();
        tokio::task::spawn_blocking(move || f(backend.as_ref()))
            .await
            .map_err(|_| ApiError::Unavailable("the request could not be completed".into()))
    }
}

/// The whole API.
pub fn app(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/debug/memory/", get(debug::debug_memory))
        .route("/debug/memory", get(debug::debug_memory))
        .route("/v1/workers", get(rest::workers))
        .route("/v1/workers/{pid}", get(rest::worker))
        .route("/v1/workers/{pid}/requests", get(rest::requests))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn metrics(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let body = state.call(|b| b.metrics()).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response())
}

/// The OpenAPI 3 description of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint; see /openapi.json".into())
}

async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(json!({ "error": "only GET is supported" })),
    )
        .into_response()
}

#[cfg(test)]
mod tests;
