//! API errors: a status and a JSON body with a message for the user, never
//! internals (no paths, no kernel error text) and never a token.
use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::json;

use super::query::QueryError;

#[derive(Debug)]
pub enum ApiError {
    /// Token missing, wrong, or the endpoint disabled (no token configured).
    Forbidden,
    BadRequest(String),
    UriTooLong(String),
    NotFound(String),
    /// Something the agent could not do right now (e.g. attach programs);
    /// the detail goes to the agent's log, not to the client.
    Unavailable(String),
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::TooLong(_) => Self::UriTooLong(e.to_string()),
            other => Self::BadRequest(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            Self::Forbidden => (StatusCode::FORBIDDEN, "Forbidden".to_string()),
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            Self::UriTooLong(m) => (StatusCode::URI_TOO_LONG, m),
            Self::NotFound(m) => (StatusCode::NOT_FOUND, m),
            Self::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
        };
        (status, Json(json!({ "error": message }))).into_response()
    }
}
