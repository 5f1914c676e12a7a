//! The debug token and the state every handler gets: the backend, and the
//! token it must be called with.
use std::sync::Arc;

use axum::http::{HeaderMap, header};
use subtle::ConstantTimeEq as _;

use super::{backend::Backend, error::ApiError};

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
    pub(super) fn authorize(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
    ) -> Result<(), ApiError> {
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
    pub(super) async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Backend) -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let backend = self.backend.clone();
        tokio::task::spawn_blocking(move || f(backend.as_ref()))
            .await
            .map_err(|_| ApiError::Unavailable("the request could not be completed".into()))
    }
}
