//! The kubelet's pod list, read by a thread of its own (a fetch blocks for
//! seconds when the kubelet is slow) every [`REFRESH`], and pod names and
//! namespaces given to the workers whose cgroups name a pod or container.
use std::{
    sync::{Arc, Mutex, mpsc},
    thread,
    time::Duration,
};

use tracing::{info, warn};

use super::state::State;
use crate::model::{
    cgroups::Placement,
    kubelet::{self, KubeletSettings, PodIndex},
};

/// How often the pod list is read again.
pub const REFRESH: Duration = Duration::from_secs(30);

/// Reads the pod list until dropped.
pub struct PodWatcher {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl PodWatcher {
    pub fn start(settings: KubeletSettings, pods: Arc<Mutex<Option<PodIndex>>>) -> Self {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = thread::Builder::new()
            .name("memtrace-kubelet".into())
            .spawn(move || {
                let mut failing = None;
                loop {
                    match kubelet::fetch(&settings) {
                        Ok(index) => {
                            if failing != Some(false) {
                                info!(url = %settings.url, pods = index.len(), "kubelet pod list read");
                            }
                            failing = Some(false);
                            *pods.lock().unwrap_or_else(|e| e.into_inner()) = Some(index);
                        }
                        Err(e) => {
                            // Once per outage, not at every retry.
                            if failing != Some(true) {
                                warn!(
                                    url = %settings.url,
                                    error = %e,
                                    "the kubelet cannot be reached: pods have no names or namespaces until it can (retrying every 30 s)"
                                );
                            }
                            failing = Some(true);
                        }
                    }
                    match stopped.recv_timeout(REFRESH) {
                        Err(mpsc::RecvTimeoutError::Timeout) => continue,
                        _ => break,
                    }
                }
            })
            .expect("spawn the kubelet thread");
        Self {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for PodWatcher {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Names a placement's pod and container from the pod list.
pub fn name_pod(pods: &PodIndex, p: &mut Placement) {
    if let Some((pod, container)) = p.container_id.as_deref().and_then(|id| pods.container(id)) {
        p.pod_name = Some(pod.name.clone());
        p.pod_namespace = Some(pod.namespace.clone());
        p.container_name = Some(container.to_string());
        p.pod_uid.get_or_insert_with(|| pod.uid.clone());
    } else if let Some(pod) = p.pod_uid.as_deref().and_then(|uid| pods.pod(uid)) {
        p.pod_name = Some(pod.name.clone());
        p.pod_namespace = Some(pod.namespace.clone());
    }
}

impl State {
    /// Gives pod names to live workers that have a pod or container and no
    /// name yet.
    pub(super) fn name_pods(&mut self) {
        let pods = self.pods.clone();
        let pods = pods.lock().unwrap_or_else(|e| e.into_inner());
        let Some(index) = pods.as_ref() else {
            return;
        };
        for w in self.registry.alive_mut() {
            if let Some(p) = w.placement.as_mut()
                && p.pod_name.is_none()
                && (p.pod_uid.is_some() || p.container_id.is_some())
            {
                name_pod(index, p);
            }
        }
    }
}
