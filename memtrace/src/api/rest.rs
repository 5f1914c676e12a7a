//! The JSON REST API: `/v1/workers`, `/v1/workers/{pid}`,
//! `/v1/workers/{pid}/requests?limit=N`, `/v1/workers/{pid}/routes`, behind
//! the debug token.
use axum::{
    Json,
    extract::{Path, RawQuery, State},
    http::HeaderMap,
};
use serde_json::{Value, json};

use super::{
    auth::ApiState,
    error::ApiError,
    query::{self, MAX_QUERY_LEN, QueryError},
};

/// Checks the query's length and the token, then parses with `parse`.
/// Authorization comes first: strangers learn nothing about their query.
fn authorized<T>(
    state: &ApiState,
    headers: &HeaderMap,
    raw: Option<String>,
    parse: impl Fn(&str) -> Result<T, QueryError>,
) -> Result<T, ApiError> {
    let raw = raw.unwrap_or_default();
    if raw.len() > MAX_QUERY_LEN {
        return Err(QueryError::TooLong(raw.len()).into());
    }
    state.authorize(headers, query::lenient_token(&raw).as_deref())?;
    parse(&raw).map_err(ApiError::from)
}

fn parse_pid(s: &str) -> Result<u32, ApiError> {
    query::parse_pid(s).map_err(ApiError::from)
}

pub(super) async fn workers(
    State(state): State<ApiState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    authorized(&state, &headers, raw, query::parse_token_only)?;
    let workers = state.call(|b| b.workers()).await?;
    Ok(Json(json!({ "workers": workers })))
}

pub(super) async fn worker(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(pid): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    authorized(&state, &headers, raw, query::parse_token_only)?;
    let pid = parse_pid(&pid)?;
    let worker = state.call(move |b| b.worker(pid)).await??;
    Ok(Json(json!(worker)))
}

pub(super) async fn requests(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(pid): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let q = authorized(&state, &headers, raw, query::parse_list)?;
    let pid = parse_pid(&pid)?;
    let limit = q.limit;
    let requests = state.call(move |b| b.requests(pid, limit)).await??;
    Ok(Json(json!({ "pid": pid, "requests": requests })))
}

pub(super) async fn routes(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(pid): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    authorized(&state, &headers, raw, query::parse_token_only)?;
    let pid = parse_pid(&pid)?;
    let routes = state.call(move |b| b.routes(pid)).await??;
    Ok(Json(json!({ "pid": pid, "routes": routes })))
}
