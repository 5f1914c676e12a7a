//! `GET /debug/memory/?action=status|snapshot|diff|stop`, the plan's
//! endpoint, served from the kernel's counters.
use axum::{
    Json,
    extract::{RawQuery, State},
    http::HeaderMap,
    response::{IntoResponse, Response},
};

use super::{
    auth::ApiState,
    error::ApiError,
    query::{self, Action, MAX_QUERY_LEN, QueryError},
};

pub(super) async fn debug_memory(
    State(state): State<ApiState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let raw = raw.unwrap_or_default();
    if raw.len() > MAX_QUERY_LEN {
        return Err(QueryError::TooLong(raw.len()).into());
    }
    state.authorize(&headers, query::lenient_token(&raw).as_deref())?;
    let q = query::parse_debug(&raw)?;
    let (pid, limit) = (q.pid, q.limit);
    let body = match q.action {
        Action::Status => {
            let status = state.call(move |b| b.status(pid)).await??;
            Json(status).into_response()
        }
        Action::Snapshot => {
            let view = state.call(move |b| b.snapshot(pid, limit)).await??;
            Json(view).into_response()
        }
        Action::Diff => {
            let view = state.call(move |b| b.diff(pid, limit)).await??;
            Json(view).into_response()
        }
        Action::Stop => {
            let view = state.call(|b| b.stop()).await??;
            Json(view).into_response()
        }
    };
    Ok(body)
}
