//! Pod names and namespaces from the node's kubelet: its `/pods` endpoint
//! lists the pods it runs, with their uids and container ids, which a
//! traced process's cgroup path also carries. The kubelet's list rather than
//! the API server's: it is node-local, needs one permission (`get` on
//! `nodes/proxy`), and has static pods under the uid their cgroups use.
//!
//! [`fetch`] blocks for up to [`FETCH_TIMEOUT`]: call it from a blocking
//! thread (`tokio::task::spawn_blocking`), not from the runtime.
use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

/// How to reach this node's kubelet.
#[derive(Clone, Debug, PartialEq)]
pub struct KubeletSettings {
    /// Base URL, e.g. `https://10.0.0.7:10250` (the node's IP, the kubelet's
    /// authenticated port); `/pods` is appended.
    pub url: String,
    /// File holding a bearer token (the pod's projected service-account
    /// token), read again at every fetch because it rotates.
    pub token_file: Option<PathBuf>,
    /// Accept any server certificate: kubelets usually serve a self-signed one.
    pub insecure_tls: bool,
}

/// One pod the kubelet runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub name: String,
    pub namespace: String,
    /// As the kubelet gives it: lowercase, with dashes.
    pub uid: String,
}

/// The kubelet's pods, by uid and by container id.
#[derive(Clone, Debug, Default)]
pub struct PodIndex {
    pods: Vec<PodInfo>,
    /// Normalised uid → index in `pods`.
    by_uid: HashMap<String, usize>,
    /// Bare container id → (index in `pods`, container name).
    by_container: HashMap<String, (usize, String)>,
}

/// Longest a fetch may take, connection and answer included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest pod list read: a full node (110 pods) is a few MB.
const MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;
/// What of an unexpected answer is quoted in an error.
const QUOTED_CHARS: usize = 120;

/// What went wrong talking to the kubelet; each message says what to change.
/// The settings are named by their flags (`--kubelet-url`, ...), which are
/// also `MEMTRACE_KUBELET_*` variables and TOML keys.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error(
        "--kubelet-url `{url}` is not an http:// or https:// URL: give the kubelet's base URL, e.g. https://NODE_IP:10250"
    )]
    BadUrl { url: String },
    #[error(
        "cannot read the kubelet token file {}: {source} (mount the service account token, automountServiceAccountToken: true, or fix --kubelet-token-file)",
        path.display()
    )]
    TokenFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the kubelet token file {} is empty (is the service account token mounted there?)",
        path.display()
    )]
    EmptyToken { path: PathBuf },
    #[error(
        "cannot reach the kubelet at {url}: {message} (check --kubelet-url: the node's IP, e.g. the downward API's status.hostIP, and the kubelet's port, 10250; and that pods may reach the node on it)"
    )]
    Unreachable { url: String, message: String },
    #[error(
        "the kubelet at {url} did not answer within {} s (check --kubelet-url: is that the kubelet's port, 10250?)",
        FETCH_TIMEOUT.as_secs()
    )]
    Timeout { url: String },
    #[error(
        "TLS with the kubelet at {url} failed: {message} (a refused certificate: kubelets usually serve a self-signed one, so set --kubelet-insecure-tls; a corrupt message: the port does not speak TLS, use http://)"
    )]
    Tls { url: String, message: String },
    #[error("the kubelet at {url} serves HTTPS: use https:// in --kubelet-url")]
    NeedsHttps { url: String },
    #[error(
        "the kubelet at {url} refused the pod list ({status}): the service account needs `get` on `nodes/proxy` (or, from Kubernetes 1.33, the narrower `nodes/pods`) from a ClusterRole bound to it, as in deploy/kubernetes/, and its token in --kubelet-token-file"
    )]
    Unauthorized { url: String, status: u16 },
    #[error("the kubelet at {url} answered {status} to GET /pods: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("reading the kubelet's answer from {url} failed: {message}")]
    Read { url: String, message: String },
    #[error(
        "the answer is not a kubelet pod list ({detail}): --kubelet-url must be the kubelet's own (https://NODE_IP:10250), whose /pods gives a PodList"
    )]
    NotPodList { detail: String },
}

impl PodIndex {
    /// Indexes a kubelet `/pods` answer (a `PodList`). Missing fields are
    /// tolerated (a pod without a uid is found by its containers only, a
    /// container without an id yet is left out); anything that is not a
    /// PodList is an error.
    pub fn from_json(body: &[u8]) -> Result<Self, KubeletError> {
        let not_json = |e: serde_json::Error| KubeletError::NotPodList {
            detail: format!("{e}; it begins {}", quote(body)),
        };
        let value: serde_json::Value = serde_json::from_slice(body).map_err(not_json)?;
        if !value.is_object() {
            return Err(KubeletError::NotPodList {
                detail: format!("it is not a JSON object; it begins {}", quote(body)),
            });
        }
        let list: PodList = serde_json::from_value(value).map_err(not_json)?;
        match list.kind.as_deref() {
            Some("PodList") => {}
            Some(other) => {
                let why = list.message.map(|m| format!(": {m}")).unwrap_or_default();
                return Err(KubeletError::NotPodList {
                    detail: format!("it is a {other}{why}"),
                });
            }
            None if list.items.is_none() => {
                return Err(KubeletError::NotPodList {
                    detail: format!("no `kind` and no `items`; it begins {}", quote(body)),
                });
            }
            None => {}
        }
        let mut index = Self::default();
        for pod in list.items.into_iter().flatten() {
            let at = index.pods.len();
            let metadata = pod.metadata.unwrap_or_default();
            let uid = metadata.uid.unwrap_or_default().trim().to_ascii_lowercase();
            if !uid.is_empty() {
                index.by_uid.insert(normalise_uid(&uid), at);
            }
            let status = pod.status.unwrap_or_default();
            for container in status
                .container_statuses
                .into_iter()
                .chain(status.init_container_statuses)
                .chain(status.ephemeral_container_statuses)
                .flatten()
            {
                let id = bare_container_id(container.container_id.as_deref().unwrap_or_default());
                if !id.is_empty() {
                    index
                        .by_container
                        .insert(id.to_string(), (at, container.name.unwrap_or_default()));
                }
            }
            index.pods.push(PodInfo {
                name: metadata.name.unwrap_or_default(),
                namespace: metadata.namespace.unwrap_or_default(),
                uid,
            });
        }
        Ok(index)
    }

    /// The pod with this uid, given with dashes (the API's form) or with
    /// underscores (cgroup paths under the systemd driver:
    /// `kubepods-burstable-pod<uid_with_underscores>.slice`).
    pub fn pod(&self, uid: &str) -> Option<&PodInfo> {
        self.by_uid
            .get(&normalise_uid(uid))
            .map(|&at| &self.pods[at])
    }

    /// The pod and container name of a container id, bare (as in cgroup
    /// paths) or with its runtime's prefix (`containerd://...`).
    pub fn container(&self, id: &str) -> Option<(&PodInfo, &str)> {
        self.by_container
            .get(bare_container_id(id))
            .map(|(at, name)| (&self.pods[*at], name.as_str()))
    }

    /// Pods listed.
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }
}

/// Whether `url` can name a kubelet: http:// or https:// and a host.
pub fn check_url(url: &str) -> Result<(), KubeletError> {
    let base = url.trim_end_matches('/');
    let scheme_ok = ["http://", "https://"].iter().any(|s| {
        base.get(..s.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(s))
            && base.len() > s.len()
    });
    if scheme_ok {
        Ok(())
    } else {
        Err(KubeletError::BadUrl { url: url.into() })
    }
}

/// Fetches and indexes the kubelet's pod list: `GET {url}/pods`, with the
/// token file's token as a bearer token (never in an error or a log). Blocks
/// up to [`FETCH_TIMEOUT`]; each call opens a new connection.
pub fn fetch(settings: &KubeletSettings) -> Result<PodIndex, KubeletError> {
    check_url(&settings.url)?;
    let base = settings.url.trim_end_matches('/');
    let token = settings.token_file.as_deref().map(read_token).transpose()?;
    let tls = ureq::tls::TlsConfig::builder()
        .disable_verification(settings.insecure_tls)
        .build();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(FETCH_TIMEOUT))
        .http_status_as_error(false)
        // The kubelet is on the node: never through a cluster-wide HTTP(S)_PROXY.
        .proxy(None)
        // /pods does not redirect; a redirect would be somewhere else.
        .max_redirects(0)
        .tls_config(tls)
        .build()
        .into();
    let url = format!("{base}/pods");
    let mut request = agent.get(&url).header("Accept", "application/json");
    if let Some(token) = &token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let mut response = request.call().map_err(|e| call_error(base, e))?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_BODY_BYTES)
        .read_to_vec()
        .map_err(|e| match e {
            ureq::Error::Timeout(_) => KubeletError::Timeout { url: base.into() },
            e => KubeletError::Read {
                url: base.into(),
                message: e.to_string(),
            },
        })?;
    match status {
        200 => PodIndex::from_json(&body),
        // Go's answer to plain HTTP on a TLS port.
        400 if body.windows(12).any(|w| w == b"HTTPS server") => {
            Err(KubeletError::NeedsHttps { url: base.into() })
        }
        401 | 403 => Err(KubeletError::Unauthorized {
            url: base.into(),
            status,
        }),
        _ => Err(KubeletError::Status {
            url: base.into(),
            status,
            body: quote(&body),
        }),
    }
}

fn read_token(path: &Path) -> Result<String, KubeletError> {
    let text = std::fs::read_to_string(path).map_err(|source| KubeletError::TokenFile {
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(KubeletError::EmptyToken {
            path: path.to_path_buf(),
        });
    }
    Ok(token.to_string())
}

/// Sorts a failed call into what the user should check.
fn call_error(url: &str, error: ureq::Error) -> KubeletError {
    let url = url.to_string();
    match error {
        ureq::Error::Timeout(_) => KubeletError::Timeout { url },
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) | ureq::Error::Pem(_) => KubeletError::Tls {
            url,
            message: error.to_string(),
        },
        // rustls fails a handshake (a refused certificate too) inside the
        // stream, as an InvalidData I/O error; plain TCP never does.
        ureq::Error::Io(e) if e.kind() == io::ErrorKind::InvalidData => KubeletError::Tls {
            url,
            message: e.to_string(),
        },
        other => KubeletError::Unreachable {
            url,
            message: other.to_string(),
        },
    }
}

/// Pod uids compare lowercase, with dashes.
fn normalise_uid(uid: &str) -> String {
    uid.trim()
        .chars()
        .map(|c| {
            if c == '_' {
                '-'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

/// `containerd://abc`, `cri-o://abc`, `docker://abc` → `abc`.
pub fn bare_container_id(id: &str) -> &str {
    let id = id.trim();
    id.split_once("://").map_or(id, |(_, bare)| bare)
}

/// The start of a body, printable, for an error message.
fn quote(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(QUOTED_CHARS * 4)]);
    let mut quoted: String = text
        .chars()
        .take(QUOTED_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > QUOTED_CHARS {
        quoted.push('…');
    }
    format!("`{}`", quoted.trim())
}

// The few fields of the kubelet's PodList that are read. Each may be
// missing or null; `kind` and `message` tell a PodList from a Status.
#[derive(Deserialize, Default)]
#[serde(default)]
struct PodList {
    kind: Option<String>,
    message: Option<String>,
    items: Option<Vec<Pod>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Pod {
    metadata: Option<PodMetadata>,
    status: Option<PodStatus>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PodMetadata {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct PodStatus {
    container_statuses: Option<Vec<ContainerStatus>>,
    init_container_statuses: Option<Vec<ContainerStatus>>,
    ephemeral_container_statuses: Option<Vec<ContainerStatus>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ContainerStatus {
    name: Option<String>,
    #[serde(rename = "containerID")]
    container_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead, BufReader, Write},
        net::TcpListener,
        sync::mpsc,
        thread,
    };

    use super::*;

    const WEB_UID: &str = "6f0c4d1e-2b7a-4c55-9a3e-0d1f2e3c4b5a";
    const WEB_ID: &str = "3b5e0d9c8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c";
    const SIDECAR_ID: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
    const INIT_ID: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
    const PROXY_UID: &str = "c3a1e2b4-5d6f-4a7b-8c9d-0e1f2a3b4c5d";
    const PROXY_ID: &str = "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b1a0f9e8d";

    /// The shape of the kubelet's `GET /pods` (a v1 PodList, every field the
    /// kubelet sends, trimmed to two pods): a gunicorn Deployment's pod with
    /// an init container and a sidecar, and a kube-proxy DaemonSet pod.
    fn recorded_pod_list() -> String {
        format!(
            r#"{{"kind":"PodList","apiVersion":"v1","metadata":{{}},"items":[
{{"metadata":{{"name":"shop-web-7d9c8b6f5-x2k4q","generateName":"shop-web-7d9c8b6f5-","namespace":"shop",
  "uid":"{WEB_UID}","resourceVersion":"48213","creationTimestamp":"2025-03-02T09:14:07Z",
  "labels":{{"app":"shop-web","pod-template-hash":"7d9c8b6f5"}},
  "annotations":{{"kubernetes.io/config.seen":"2025-03-02T09:14:07.531Z","kubernetes.io/config.source":"api"}},
  "ownerReferences":[{{"apiVersion":"apps/v1","kind":"ReplicaSet","name":"shop-web-7d9c8b6f5","uid":"1d2e3f40-5a6b-4c7d-8e9f-0a1b2c3d4e5f","controller":true,"blockOwnerDeletion":true}}],
  "managedFields":[{{"manager":"kube-controller-manager","operation":"Update","apiVersion":"v1","time":"2025-03-02T09:14:07Z","fieldsType":"FieldsV1","fieldsV1":{{"f:metadata":{{}}}}}}]}},
 "spec":{{"volumes":[{{"name":"kube-api-access-8zq5m","projected":{{"sources":[{{"serviceAccountToken":{{"expirationSeconds":3607,"path":"token"}}}}],"defaultMode":420}}}}],
  "initContainers":[{{"name":"migrate","image":"registry.example.com/shop/web:1.42.0","command":["python","manage.py","migrate"],"resources":{{}},"terminationMessagePath":"/dev/termination-log","terminationMessagePolicy":"File","imagePullPolicy":"IfNotPresent"}}],
  "containers":[{{"name":"web","image":"registry.example.com/shop/web:1.42.0","command":["gunicorn","-w","4","shop.wsgi"],"ports":[{{"containerPort":8000,"protocol":"TCP"}}],"resources":{{"limits":{{"memory":"1Gi"}},"requests":{{"cpu":"250m","memory":"512Mi"}}}},"imagePullPolicy":"IfNotPresent"}},
   {{"name":"statsd","image":"prom/statsd-exporter:v0.26.0","resources":{{}},"imagePullPolicy":"IfNotPresent"}}],
  "restartPolicy":"Always","terminationGracePeriodSeconds":30,"dnsPolicy":"ClusterFirst","serviceAccountName":"default","serviceAccount":"default",
  "nodeName":"worker-3","securityContext":{{}},"schedulerName":"default-scheduler","priority":0,"enableServiceLinks":true,"preemptionPolicy":"PreemptLowerPriority"}},
 "status":{{"phase":"Running",
  "conditions":[{{"type":"Initialized","status":"True","lastProbeTime":null,"lastTransitionTime":"2025-03-02T09:14:12Z"}},{{"type":"Ready","status":"True","lastProbeTime":null,"lastTransitionTime":"2025-03-02T09:14:15Z"}}],
  "hostIP":"10.0.4.13","hostIPs":[{{"ip":"10.0.4.13"}}],"podIP":"10.244.3.17","podIPs":[{{"ip":"10.244.3.17"}}],"startTime":"2025-03-02T09:14:07Z",
  "initContainerStatuses":[{{"name":"migrate","state":{{"terminated":{{"exitCode":0,"reason":"Completed","startedAt":"2025-03-02T09:14:09Z","finishedAt":"2025-03-02T09:14:11Z","containerID":"containerd://{INIT_ID}"}}}},
   "lastState":{{}},"ready":true,"restartCount":0,"image":"registry.example.com/shop/web:1.42.0","imageID":"registry.example.com/shop/web@sha256:5f4e3d2c1b0a","containerID":"containerd://{INIT_ID}","started":false}}],
  "containerStatuses":[{{"name":"statsd","state":{{"running":{{"startedAt":"2025-03-02T09:14:13Z"}}}},"lastState":{{}},"ready":true,"restartCount":0,"image":"docker.io/prom/statsd-exporter:v0.26.0","imageID":"docker.io/prom/statsd-exporter@sha256:0a1b2c3d","containerID":"containerd://{SIDECAR_ID}","started":true}},
   {{"name":"web","state":{{"running":{{"startedAt":"2025-03-02T09:14:12Z"}}}},"lastState":{{}},"ready":true,"restartCount":0,"image":"registry.example.com/shop/web:1.42.0","imageID":"registry.example.com/shop/web@sha256:5f4e3d2c1b0a","containerID":"containerd://{WEB_ID}","started":true}}],
  "qosClass":"Burstable"}}}},
{{"metadata":{{"name":"kube-proxy-8kq2w","generateName":"kube-proxy-","namespace":"kube-system","uid":"{PROXY_UID}","resourceVersion":"1187",
  "creationTimestamp":"2025-02-27T16:02:51Z","labels":{{"controller-revision-hash":"64b9dfc6c7","k8s-app":"kube-proxy","pod-template-generation":"1"}},
  "annotations":{{"kubernetes.io/config.seen":"2025-02-27T16:02:51.118Z","kubernetes.io/config.source":"api"}},
  "ownerReferences":[{{"apiVersion":"apps/v1","kind":"DaemonSet","name":"kube-proxy","uid":"7a8b9c0d-1e2f-4a3b-8c4d-5e6f7a8b9c0d","controller":true,"blockOwnerDeletion":true}}]}},
 "spec":{{"containers":[{{"name":"kube-proxy","image":"registry.k8s.io/kube-proxy:v1.31.2","command":["/usr/local/bin/kube-proxy","--config=/var/lib/kube-proxy/config.conf"],"resources":{{}},"securityContext":{{"privileged":true}}}}],
  "restartPolicy":"Always","nodeName":"worker-3","hostNetwork":true,"serviceAccountName":"kube-proxy","priorityClassName":"system-node-critical","priority":2000001000}},
 "status":{{"phase":"Running","hostIP":"10.0.4.13","podIP":"10.0.4.13","startTime":"2025-02-27T16:02:51Z",
  "containerStatuses":[{{"name":"kube-proxy","state":{{"running":{{"startedAt":"2025-02-27T16:02:53Z"}}}},"lastState":{{}},"ready":true,"restartCount":0,"image":"registry.k8s.io/kube-proxy:v1.31.2","imageID":"registry.k8s.io/kube-proxy@sha256:62c9f8a1","containerID":"containerd://{PROXY_ID}","started":true}}],
  "qosClass":"BestEffort"}}}}
]}}"#
        )
    }

    #[test]
    fn a_recorded_pod_list_is_indexed_by_uid_and_container() {
        let index = PodIndex::from_json(recorded_pod_list().as_bytes()).unwrap();
        assert_eq!(index.len(), 2);
        let web = index.pod(WEB_UID).unwrap();
        assert_eq!(
            web,
            &PodInfo {
                name: "shop-web-7d9c8b6f5-x2k4q".into(),
                namespace: "shop".into(),
                uid: WEB_UID.into(),
            }
        );
        assert_eq!(index.pod(PROXY_UID).unwrap().name, "kube-proxy-8kq2w");
        assert_eq!(index.pod(PROXY_UID).unwrap().namespace, "kube-system");
        for (id, pod, container) in [
            (WEB_ID, "shop-web-7d9c8b6f5-x2k4q", "web"),
            (SIDECAR_ID, "shop-web-7d9c8b6f5-x2k4q", "statsd"),
            (INIT_ID, "shop-web-7d9c8b6f5-x2k4q", "migrate"),
            (PROXY_ID, "kube-proxy-8kq2w", "kube-proxy"),
        ] {
            let (p, c) = index.container(id).unwrap();
            assert_eq!((p.name.as_str(), c), (pod, container), "{id}");
            // With the runtime's prefix, as the API gives it.
            assert_eq!(
                index.container(&format!("containerd://{id}")).unwrap().1,
                container
            );
        }
        assert!(index.pod("00000000-0000-0000-0000-000000000000").is_none());
        assert!(index.container(&WEB_ID[..12]).is_none());
        assert!(index.container("").is_none());
    }

    #[test]
    fn a_pod_uid_from_a_systemd_cgroup_path_has_underscores() {
        let index = PodIndex::from_json(recorded_pod_list().as_bytes()).unwrap();
        // kubepods-burstable-pod6f0c4d1e_2b7a_4c55_9a3e_0d1f2e3c4b5a.slice
        let from_cgroup = WEB_UID.replace('-', "_");
        assert_eq!(
            index.pod(&from_cgroup).unwrap().name,
            "shop-web-7d9c8b6f5-x2k4q"
        );
        assert_eq!(index.pod(&WEB_UID.to_uppercase()).unwrap().uid, WEB_UID);
    }

    #[test]
    fn other_runtimes_prefixes_are_stripped() {
        let body = r#"{"kind":"PodList","items":[{"metadata":{"name":"a","namespace":"n","uid":"u-1"},
            "status":{"containerStatuses":[{"name":"crio","containerID":"cri-o://abc123"},
                                           {"name":"docker","containerID":"docker://def456"}],
                      "ephemeralContainerStatuses":[{"name":"debugger-x7","containerID":"containerd://fed789"}]}}]}"#;
        let index = PodIndex::from_json(body.as_bytes()).unwrap();
        assert_eq!(index.container("abc123").unwrap().1, "crio");
        assert_eq!(index.container("def456").unwrap().1, "docker");
        assert_eq!(index.container("fed789").unwrap().1, "debugger-x7");
        assert_eq!(index.pod("u_1").unwrap().name, "a");
    }

    #[test]
    fn missing_and_null_fields_are_tolerated() {
        let body = r#"{"kind":"PodList","apiVersion":"v1","items":[
            {},
            {"metadata":null,"status":null},
            {"metadata":{"name":"pending","namespace":"ns","uid":"u-2"},
             "status":{"phase":"Pending","containerStatuses":[{"name":"app","state":{"waiting":{"reason":"ContainerCreating"}}}],
                       "initContainerStatuses":null}},
            {"metadata":{"uid":"u-3"},"status":{"containerStatuses":[{"containerID":"containerd://c3"}]}}
        ]}"#;
        let index = PodIndex::from_json(body.as_bytes()).unwrap();
        assert_eq!(index.len(), 4);
        assert_eq!(index.pod("u-2").unwrap().name, "pending");
        assert!(
            index.container("").is_none(),
            "a container without an id is not indexed"
        );
        let (pod, name) = index.container("c3").unwrap();
        assert_eq!((pod.uid.as_str(), pod.name.as_str(), name), ("u-3", "", ""));
        // A node with no pods: items empty, null, or (kind given) absent.
        for empty in [
            r#"{"kind":"PodList","items":[]}"#,
            r#"{"kind":"PodList","items":null}"#,
            r#"{"kind":"PodList"}"#,
            r#"{"items":[]}"#,
        ] {
            assert!(
                PodIndex::from_json(empty.as_bytes()).unwrap().is_empty(),
                "{empty}"
            );
        }
    }

    #[test]
    fn what_is_not_a_pod_list_is_a_clear_error() {
        let status = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"pods is forbidden","reason":"Forbidden","code":403}"#;
        for (body, says) in [
            ("{\"kind\":\"PodList\",\"items\":[", "EOF while parsing"),
            (
                "<html><body>404 page not found</body></html>",
                "it begins `<html>",
            ),
            ("", "EOF while parsing"),
            ("[]", "not a JSON object"),
            ("null", "not a JSON object"),
            ("{}", "no `kind` and no `items`"),
            (status, "it is a Status: pods is forbidden"),
            (r#"{"kind":"PodList","items":{"a":1}}"#, "invalid type"),
            (
                r#"{"kind":"PodList","items":[{"metadata":{"uid":7}}]}"#,
                "invalid type",
            ),
            ("\u{0}\u{1}\u{ff}", "expected value"),
        ] {
            let error = PodIndex::from_json(body.as_bytes()).unwrap_err();
            assert!(
                matches!(error, KubeletError::NotPodList { .. }),
                "{body}: {error:?}"
            );
            let message = error.to_string();
            assert!(message.contains(says), "{body}: {message}");
            assert!(message.contains("https://NODE_IP:10250"), "{message}");
        }
        // Bytes that are not UTF-8 are quoted without a panic.
        assert!(PodIndex::from_json(&[0xff, 0xfe, b'{']).is_err());
    }

    /// A stand-in for the kubelet's `/pods`: answers `responses` connections
    /// in turn with (status line, body) and sends each request's head back.
    fn kubelet(responses: Vec<(&'static str, String)>) -> (String, mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (heads, received) = mpsc::channel();
        thread::spawn(move || {
            for (status, body) in responses {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream);
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let mut stream = reader.into_inner();
                write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
                heads.send(head).unwrap();
            }
        });
        (url, received)
    }

    fn settings(url: &str, token_file: Option<PathBuf>) -> KubeletSettings {
        KubeletSettings {
            url: url.into(),
            token_file,
            insecure_tls: false,
        }
    }

    fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
        head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    #[test]
    fn fetch_sends_the_current_token_and_indexes_the_answer() {
        let dir = std::env::temp_dir().join(format!("memtrace-kubelet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token_file = dir.join("token");
        std::fs::write(&token_file, "eyJhbGciOiJSUzI1NiJ9.first\n").unwrap();
        let (url, heads) = kubelet(vec![
            ("200 OK", recorded_pod_list()),
            (
                "200 OK",
                r#"{"kind":"PodList","apiVersion":"v1","metadata":{},"items":[]}"#.into(),
            ),
        ]);
        // A trailing slash, as a user may write it.
        let settings = settings(&format!("{url}/"), Some(token_file.clone()));

        let index = fetch(&settings).unwrap();
        let head = heads.recv().unwrap();
        assert!(head.starts_with("GET /pods HTTP/1.1\r\n"), "{head}");
        assert_eq!(
            header(&head, "authorization"),
            Some("Bearer eyJhbGciOiJSUzI1NiJ9.first")
        );
        assert_eq!(index.container(WEB_ID).unwrap().1, "web");

        // Projected tokens rotate: the file is read again at each fetch.
        std::fs::write(&token_file, "eyJhbGciOiJSUzI1NiJ9.second").unwrap();
        assert!(fetch(&settings).unwrap().is_empty());
        let head = heads.recv().unwrap();
        assert_eq!(
            header(&head, "authorization"),
            Some("Bearer eyJhbGciOiJSUzI1NiJ9.second")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fetch_without_a_token_file_sends_no_authorization() {
        let (url, heads) = kubelet(vec![("200 OK", recorded_pod_list())]);
        assert_eq!(fetch(&settings(&url, None)).unwrap().len(), 2);
        let head = heads.recv().unwrap();
        assert_eq!(header(&head, "authorization"), None, "{head}");
    }

    #[test]
    fn a_refusal_names_the_permission_to_grant() {
        let forbidden = r#"Forbidden (user=system:serviceaccount:memtrace:memtrace, verb=get, resource=nodes, subresource(s)=[proxy])"#;
        let (url, _heads) = kubelet(vec![
            ("403 Forbidden", forbidden.into()),
            ("401 Unauthorized", "Unauthorized".into()),
        ]);
        for status in [403, 401] {
            let error = fetch(&settings(&url, None)).unwrap_err();
            assert!(
                matches!(&error, KubeletError::Unauthorized { status: s, .. } if *s == status),
                "{error:?}"
            );
            assert!(
                error.to_string().contains("`get` on `nodes/proxy`"),
                "{error}"
            );
        }
    }

    #[test]
    fn another_status_or_a_wrong_body_is_an_error() {
        let (url, _heads) = kubelet(vec![
            ("500 Internal Server Error", "boom".into()),
            ("200 OK", "<html>not the kubelet</html>".into()),
        ]);
        let error = fetch(&settings(&url, None)).unwrap_err();
        assert!(
            matches!(error, KubeletError::Status { status: 500, .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("`boom`"), "{error}");
        let error = fetch(&settings(&url, None)).unwrap_err();
        assert!(
            matches!(error, KubeletError::NotPodList { .. }),
            "{error:?}"
        );
    }

    #[test]
    fn plain_http_to_the_tls_port_asks_for_https() {
        // What Go's TLS server answers to plain HTTP on the kubelet's port.
        let (url, _heads) = kubelet(vec![(
            "400 Bad Request",
            "Client sent an HTTP request to an HTTPS server.\n".into(),
        )]);
        let error = fetch(&settings(&url, None)).unwrap_err();
        assert!(
            matches!(error, KubeletError::NeedsHttps { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("use https://"), "{error}");
    }

    /// `openssl s_server -WWW` as a kubelet with a self-signed certificate:
    /// it serves the file `pods` of its directory as `GET /pods`.
    struct SelfSignedKubelet {
        server: std::process::Child,
        dir: PathBuf,
        url: String,
    }

    impl SelfSignedKubelet {
        /// None when the `openssl` command is missing.
        fn start(pods: &str) -> Option<Self> {
            use std::process::{Command, Stdio};
            Command::new("openssl").arg("version").output().ok()?;
            let dir =
                std::env::temp_dir().join(format!("memtrace-kubelet-tls-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("pods"), pods).unwrap();
            let made = Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                ])
                .args([
                    "-nodes",
                    "-keyout",
                    "key.pem",
                    "-out",
                    "cert.pem",
                    "-days",
                    "1",
                    "-subj",
                    "/CN=kubelet",
                ])
                .current_dir(&dir)
                .output()
                .unwrap();
            assert!(made.status.success(), "openssl req: {made:?}");
            let mut server = Command::new("openssl")
                .args([
                    "s_server",
                    "-accept",
                    "127.0.0.1:0",
                    "-cert",
                    "cert.pem",
                    "-key",
                    "key.pem",
                    "-WWW",
                ])
                .current_dir(&dir)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            // It prints `ACCEPT 127.0.0.1:PORT` once it listens.
            let stdout = server.stdout.take().unwrap();
            let (port_tx, port_rx) = mpsc::channel();
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(port) = line.strip_prefix("ACCEPT 127.0.0.1:") {
                        let _ = port_tx.send(port.trim().to_string());
                    }
                }
            });
            let Ok(port) = port_rx.recv_timeout(Duration::from_secs(10)) else {
                let _ = server.kill();
                panic!("openssl s_server did not say which port it listens on");
            };
            Some(Self {
                server,
                dir,
                url: format!("https://127.0.0.1:{port}"),
            })
        }
    }

    impl Drop for SelfSignedKubelet {
        fn drop(&mut self) {
            let _ = self.server.kill();
            let _ = self.server.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn a_self_signed_kubelet_needs_insecure_tls() {
        let Some(kubelet) = SelfSignedKubelet::start(&recorded_pod_list()) else {
            eprintln!(
                "not run: needs the `openssl` command to serve TLS with a self-signed certificate"
            );
            return;
        };
        let mut settings = settings(&kubelet.url, None);
        let error = fetch(&settings).unwrap_err();
        assert!(matches!(error, KubeletError::Tls { .. }), "{error:?}");
        assert!(
            error.to_string().contains("--kubelet-insecure-tls"),
            "{error}"
        );

        settings.insecure_tls = true;
        let index = fetch(&settings).unwrap();
        assert_eq!(index.container(WEB_ID).unwrap().1, "web");
    }

    #[test]
    fn a_closed_port_is_unreachable() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // The listener is dropped: nothing listens on the port now.
        let error = fetch(&settings(&format!("http://127.0.0.1:{port}"), None)).unwrap_err();
        assert!(
            matches!(error, KubeletError::Unreachable { .. }),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
        assert!(message.contains("10250"), "{message}");
    }

    #[test]
    fn an_unreadable_or_empty_token_file_is_named() {
        // Checked before any connection: the URL need not answer.
        let missing = PathBuf::from("/nonexistent/memtrace/token");
        let error = fetch(&settings("http://127.0.0.1:1", Some(missing.clone()))).unwrap_err();
        assert!(matches!(error, KubeletError::TokenFile { .. }), "{error:?}");
        assert!(
            error.to_string().contains("/nonexistent/memtrace/token"),
            "{error}"
        );
        assert!(
            error.to_string().contains("automountServiceAccountToken"),
            "{error}"
        );

        let empty =
            std::env::temp_dir().join(format!("memtrace-kubelet-empty-{}", std::process::id()));
        std::fs::write(&empty, "\n").unwrap();
        let error = fetch(&settings("http://127.0.0.1:1", Some(empty.clone()))).unwrap_err();
        std::fs::remove_file(&empty).unwrap();
        assert!(
            matches!(error, KubeletError::EmptyToken { .. }),
            "{error:?}"
        );
    }

    #[test]
    fn a_url_that_is_not_http_is_refused() {
        for url in ["10.0.4.13:10250", "ftp://10.0.4.13", "https://", ""] {
            let error = fetch(&settings(url, None)).unwrap_err();
            assert!(
                matches!(error, KubeletError::BadUrl { .. }),
                "{url}: {error:?}"
            );
        }
    }
}
