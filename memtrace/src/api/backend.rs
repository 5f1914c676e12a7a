//! What the API needs from the agent: the [`Backend`] trait the handlers
//! call, and the errors a backend call can give.
use super::{
    error::ApiError,
    status::{StatusView, WorkerStatus},
};
use crate::{
    model::{requests::RequestRecord, routes::RoutesView},
    sites::{
        render::{ProfileFormat, Rendered},
        snapshot::{DiffView, SnapshotView},
        view::SiteOptions,
    },
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
    /// A query the parser let through that the backend cannot use.
    #[error("{0}")]
    BadRequest(String),
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::UnknownPid(_) => ApiError::NotFound(e.to_string()),
            BackendError::NoBaseline => ApiError::BadRequest(e.to_string()),
            BackendError::Unavailable(m) => ApiError::Unavailable(m),
            BackendError::BadRequest(m) => ApiError::BadRequest(m),
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
    /// Requests and memory per route of one worker.
    fn routes(&self, pid: u32) -> Result<RoutesView, BackendError>;
    /// Turns allocation-site collection on (for `pid`, or every worker) and
    /// keeps the current state as the baseline.
    fn snapshot(
        &self,
        pid: Option<u32>,
        limit: usize,
        sites: &SiteOptions,
    ) -> Result<SnapshotView, BackendError>;
    /// Growth since the baseline, which becomes the current state.
    fn diff(
        &self,
        pid: Option<u32>,
        limit: usize,
        sites: &SiteOptions,
    ) -> Result<DiffView, BackendError>;
    /// As `snapshot`, rendered in another format.
    fn snapshot_profile(
        &self,
        pid: Option<u32>,
        format: ProfileFormat,
        sites: &SiteOptions,
    ) -> Result<Rendered, BackendError>;
    /// As `diff`, rendered in another format.
    fn diff_profile(
        &self,
        pid: Option<u32>,
        format: ProfileFormat,
        sites: &SiteOptions,
    ) -> Result<Rendered, BackendError>;
    /// `GET /debug/pprof/heap`: the sites collected so far as a pprof
    /// profile; starts collection when it is off, leaves the baseline alone.
    fn heap_profile(&self, pid: Option<u32>) -> Result<Rendered, BackendError>;
    /// Turns collection off (programs detached) and drops the baseline.
    fn stop(&self) -> Result<StopView, BackendError>;
    /// Prometheus text exposition.
    fn metrics(&self) -> String;
}
