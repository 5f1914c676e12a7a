//! `GET /debug/memory/?action=status|snapshot|diff|stop`, the plan's
//! endpoint, served from the kernel's counters (snapshot and diff also as
//! `&format=pprof|folded|svg`), and `GET /debug/pprof/heap`, the path Go's
//! and Pyroscope's scrapers read. Both need the debug token.
use axum::{
    Json,
    extract::{RawQuery, State},
    http::{HeaderMap, header},
    response::{IntoResponse, Response},
};

use crate::sites::render::Rendered;

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
    let (pid, limit, sites) = (q.pid, q.limit, q.sites);
    if let Some(format) = q.format {
        let rendered = match q.action {
            Action::Diff => {
                state
                    .call(move |b| b.diff_profile(pid, format, &sites))
                    .await??
            }
            _ => {
                state
                    .call(move |b| b.snapshot_profile(pid, format, &sites))
                    .await??
            }
        };
        return Ok(profile_response(rendered));
    }
    let body = match q.action {
        Action::Status => {
            let status = state.call(move |b| b.status(pid)).await??;
            Json(status).into_response()
        }
        Action::Snapshot => {
            let view = state
                .call(move |b| b.snapshot(pid, limit, &sites))
                .await??;
            Json(view).into_response()
        }
        Action::Diff => {
            let view = state.call(move |b| b.diff(pid, limit, &sites)).await??;
            Json(view).into_response()
        }
        Action::Stop => {
            let view = state.call(|b| b.stop()).await??;
            Json(view).into_response()
        }
    };
    Ok(body)
}

pub(super) async fn pprof_heap(
    State(state): State<ApiState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let raw = raw.unwrap_or_default();
    if raw.len() > MAX_QUERY_LEN {
        return Err(QueryError::TooLong(raw.len()).into());
    }
    state.authorize(&headers, query::lenient_token(&raw).as_deref())?;
    let q = query::parse_pprof(&raw)?;
    let pid = q.pid;
    let rendered = state.call(move |b| b.heap_profile(pid)).await??;
    Ok(profile_response(rendered))
}

fn profile_response(r: Rendered) -> Response {
    ([(header::CONTENT_TYPE, r.content_type)], r.body).into_response()
}
