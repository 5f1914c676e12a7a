//! The routes: which handler serves which path, and the few that need no
//! module of their own (`/healthz`, `/metrics`, `/openapi.json`, fallbacks).
use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::json;

use super::{auth::ApiState, debug, error::ApiError, rest};

/// The whole API.
pub fn app(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/debug/memory/", get(debug::debug_memory))
        .route("/debug/memory", get(debug::debug_memory))
        .route("/debug/pprof/heap", get(debug::pprof_heap))
        .route("/v1/workers", get(rest::workers))
        .route("/v1/workers/{pid}", get(rest::worker))
        .route("/v1/workers/{pid}/requests", get(rest::requests))
        .route("/v1/workers/{pid}/routes", get(rest::routes))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// OpenMetrics to scrapers that ask for it (Prometheus does), the classic
/// text format (0.0.4) to the rest: curl, `promtool check metrics`, older
/// scrapers.
async fn metrics(
    State(state): State<ApiState>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let body = state.call(|b| b.metrics()).await?;
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    Ok(if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            super::metrics::to_classic_text(&body),
        )
            .into_response()
    })
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
