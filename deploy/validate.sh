#!/usr/bin/env bash
# Validates everything under deploy/: the Kubernetes manifests, the systemd
# unit, the Grafana dashboard, the Prometheus scrape jobs and the two settings
# examples.
#
#   bash deploy/validate.sh          (from any directory; root for apt installs)
#
# Tools it brings in when missing (PyPI and Debian's apt only):
#   - a Python virtualenv (with the system's site-packages visible, so what is
#     installed already is not installed again) at
#     ${MEMTRACE_VALIDATE_VENV:-~/.cache/memtrace-deploy-validate/venv} holding
#     PyYAML, kubernetes-validate (bundles the Kubernetes OpenAPI schemas:
#     works offline) and promql-parser (the PromQL parser of the Rust crate
#     `promql-parser`, to parse the dashboard's queries);
#   - systemd-analyze (apt package `systemd`);
#   - promtool and prometheus 2.42 from Debian's `prometheus` package, fetched
#     with `apt-get download` and unpacked into
#     ~/.cache/memtrace-deploy-validate/prometheus (not installed: no service,
#     no user); a prometheus/promtool already on PATH is used instead.
# Optional: a built agent (MEMTRACE_BIN, or target/{dist,release,debug}/memtrace)
# is asked to load the settings examples; without one that check is skipped.
# As root with cargo and buildah, `cargo xtask dist` builds the DaemonSet's
# image (deploy/container/Containerfile), which is then checked in its
# oci-archive and, with podman, run.
#
#   bash deploy/validate.sh --live   also runs the agent (root, eBPF) on a local
#                                    test server, scrapes it with a local
#                                    Prometheus and runs every dashboard query;
#                                    the agent runs under an emulation of the
#                                    systemd unit's sandbox (see the live stage)
#
# Exits non-zero if any check fails; the last line counts passes and failures.
set -euo pipefail

LIVE=0
for arg in "$@"; do
    case "$arg" in
        --live) LIVE=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

DEPLOY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$DEPLOY")"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/memtrace-deploy-validate"
WORK="$(mktemp -d)"
# Processes this script starts (live stage), stopped by pid on exit.
STARTED=()
stop_started() {
    local p
    for p in "${STARTED[@]+"${STARTED[@]}"}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for p in "${STARTED[@]+"${STARTED[@]}"}"; do
        wait "$p" 2>/dev/null || true
    done
    STARTED=()
}
trap 'stop_started; rm -rf "$WORK"' EXIT

# Versions installed when the tool is missing (an installed one is used as is).
KUBERNETES_VALIDATE_VERSION=1.37.0
PROMQL_PARSER_VERSION=0.12.0
# Kubernetes versions the manifests are validated against (both shipped by
# kubernetes-validate 1.37.0, which ships 1.25 to 1.37).
K8S_VERSIONS=(1.29.0 1.37.0)

passed=0
failed=0
skipped=0
section() { printf '\n== %s\n' "$*"; }
pass() { printf '  PASS  %s\n' "$*"; passed=$((passed + 1)); }
fail() { printf '  FAIL  %s\n' "$*"; failed=$((failed + 1)); }
skip() { printf '  SKIP  %s\n' "$*"; skipped=$((skipped + 1)); }
# check DESCRIPTION COMMAND...: runs the command, output indented.
check() {
    local what="$1"
    shift
    local out rc=0
    out="$("$@" 2>&1)" || rc=$?
    if [ -n "$out" ]; then printf '%s\n' "$out" | sed 's/^/        /'; fi
    if [ "$rc" -eq 0 ]; then pass "$what"; else fail "$what (exit $rc)"; fi
}

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || { echo "apt-get not available" >&2; return 1; }
    if [ "$APT_UPDATED" -eq 0 ]; then
        $SUDO apt-get update -qq >/dev/null
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

# ---------------------------------------------------------------- tools
section "Tools"
if ! command -v python3 >/dev/null 2>&1; then
    echo "  installing python3 (apt)"
    apt_install python3 python3-venv
fi
VENV="${MEMTRACE_VALIDATE_VENV:-$CACHE/venv}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "  creating virtualenv $VENV"
    mkdir -p "$(dirname "$VENV")"
    if ! python3 -m venv --system-site-packages "$VENV" >/dev/null 2>&1; then
        rm -rf "$VENV"
        apt_install python3-venv
        python3 -m venv --system-site-packages "$VENV"
    fi
fi
PY="$VENV/bin/python"
pip_ensure() { # MODULE REQUIREMENT
    if ! "$PY" -c "import $1" >/dev/null 2>&1; then
        echo "  installing $2 (pip)"
        "$PY" -m pip install --quiet --disable-pip-version-check "$2"
    fi
}
pip_ensure yaml pyyaml
pip_ensure kubernetes_validate "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
pip_ensure promql_parser "promql-parser==$PROMQL_PARSER_VERSION"
if ! "$PY" -c "import tomllib" >/dev/null 2>&1; then pip_ensure tomli tomli; fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "  installing systemd (apt) for systemd-analyze"
    apt_install systemd || true
fi
# promtool/prometheus: on PATH, or unpacked from Debian's package.
PROMTOOL="$(command -v promtool || true)"
PROMETHEUS="$(command -v prometheus || true)"
if [ -z "$PROMTOOL" ] || [ -z "$PROMETHEUS" ]; then
    PROMDIR="$CACHE/prometheus"
    if [ ! -x "$PROMDIR/usr/bin/promtool" ] || [ ! -x "$PROMDIR/usr/bin/prometheus" ]; then
        echo "  fetching Debian's prometheus package (apt-get download, unpacked, not installed)"
        mkdir -p "$WORK/deb"
        chmod 0777 "$WORK/deb"
        if ! (cd "$WORK/deb" && apt-get download -qq prometheus >/dev/null 2>&1); then
            $SUDO apt-get update -qq >/dev/null && APT_UPDATED=1
            (cd "$WORK/deb" && apt-get download -qq prometheus >/dev/null 2>&1) || true
        fi
        deb="$(ls "$WORK"/deb/prometheus_*.deb 2>/dev/null | head -n1 || true)"
        if [ -n "$deb" ]; then
            rm -rf "$PROMDIR"
            mkdir -p "$PROMDIR"
            dpkg-deb -x "$deb" "$PROMDIR"
        fi
    fi
    if [ -x "$PROMDIR/usr/bin/promtool" ]; then
        PROMTOOL="$PROMDIR/usr/bin/promtool"
        PROMETHEUS="$PROMDIR/usr/bin/prometheus"
    fi
fi
"$PY" - <<'EOF'
import importlib.metadata as m, sys
print(f"  python {sys.version.split()[0]} ({sys.executable})")
for d in ("PyYAML", "kubernetes-validate", "promql-parser"):
    print(f"  {d} {m.version(d)}")
EOF
if command -v systemd-analyze >/dev/null 2>&1; then
    echo "  $(systemd-analyze --version | head -n1)"
else
    echo "  systemd-analyze: not available"
fi
if [ -n "$PROMTOOL" ]; then
    echo "  promtool $("$PROMTOOL" --version 2>&1 | head -n1 | sed 's/^promtool, //') ($PROMTOOL)"
else
    echo "  promtool: not available"
fi

# The settings, embedded: the agent's `memtrace agent --help`, one per line:
# TOML key, environment variable, kind of value, default ("-": none).
cat >"$WORK/memtrace_settings.py" <<'EOF'
import ipaddress, math, re, signal

SETTINGS = [
    # toml key, env var, kind, default
    ("process-name", "MEMTRACE_PROCESS_NAME", "names", None),
    ("exe", "MEMTRACE_EXE", "paths", None),
    ("cmdline", "MEMTRACE_CMDLINE", "regex", None),
    ("pid", "MEMTRACE_PID", "pids", None),
    ("cgroup", "MEMTRACE_CGROUP", "paths", None),
    ("container", "MEMTRACE_CONTAINER", "names", None),
    ("request-mode", "MEMTRACE_REQUEST_MODE", "enum:none|uprobe|accept|socket", "none"),
    ("request-fn", "MEMTRACE_REQUEST_FN", "probe", None),
    ("request-begin", "MEMTRACE_REQUEST_BEGIN", "probe", None),
    ("request-end", "MEMTRACE_REQUEST_END", "probe", None),
    ("high-memory-mb", "MEMTRACE_HIGH_MEMORY_MB", "float", 5),
    ("spike-mb", "MEMTRACE_SPIKE_MB", "float", 10),
    ("request-history", "MEMTRACE_REQUEST_HISTORY", "int:1:", 1000),
    ("leak-window-size", "MEMTRACE_LEAK_WINDOW_SIZE", "int:2:", 200),
    ("leak-check-interval", "MEMTRACE_LEAK_CHECK_INTERVAL", "int:1:", 50),
    ("leak-slope-threshold", "MEMTRACE_LEAK_SLOPE_THRESHOLD", "float", 0.1),
    ("leak-warmup-requests", "MEMTRACE_LEAK_WARMUP_REQUESTS", "int:0:", 20),
    ("leak-sample-interval-secs", "MEMTRACE_LEAK_SAMPLE_INTERVAL_SECS", "int:1:", 10),
    ("leak-time-slope-mb-per-hour", "MEMTRACE_LEAK_TIME_SLOPE_MB_PER_HOUR", "float", 60),
    ("soft-limit-mb", "MEMTRACE_SOFT_LIMIT_MB", "float", 450),
    ("soft-limit-action", "MEMTRACE_SOFT_LIMIT_ACTION", "enum:signal|log", None),
    ("soft-limit-target", "MEMTRACE_SOFT_LIMIT_TARGET", "enum:parent|worker", None),
    ("soft-limit-signal", "MEMTRACE_SOFT_LIMIT_SIGNAL", "signal", None),
    ("soft-limit-min-interval-secs", "MEMTRACE_SOFT_LIMIT_MIN_INTERVAL_SECS", "float", 30),
    ("soft-limit-jitter-secs", "MEMTRACE_SOFT_LIMIT_JITTER_SECS", "float", 5),
    ("soft-limit-drain-timeout-secs", "MEMTRACE_SOFT_LIMIT_DRAIN_TIMEOUT_SECS", "float", 10),
    ("soft-limit-metric", "MEMTRACE_SOFT_LIMIT_METRIC", "enum:rss|pss|uss", "rss"),
    ("soft-limit-exit-timeout-secs", "MEMTRACE_SOFT_LIMIT_EXIT_TIMEOUT_SECS", "float", None),
    ("soft-limit-escalate-signal", "MEMTRACE_SOFT_LIMIT_ESCALATE_SIGNAL", "signal", None),
    ("listen", "MEMTRACE_LISTEN", "listen", "127.0.0.1:9464"),
    ("log-format", "MEMTRACE_LOG_FORMAT", "enum:json|pretty", "pretty"),
    ("log-level", "MEMTRACE_LOG_LEVEL", "str", "info"),
    ("summary-interval-secs", "MEMTRACE_SUMMARY_INTERVAL_SECS", "int:0:", 30),
    ("ring-buffer-bytes", "MEMTRACE_RING_BUFFER_BYTES", "pow2", 4194304),
    ("poll-interval-ms", "MEMTRACE_POLL_INTERVAL_MS", "int:1:1000", 100),
    ("rss-step-bytes", "MEMTRACE_RSS_STEP_BYTES", "int:1:", 262144),
    ("refresh-interval-ms", "MEMTRACE_REFRESH_INTERVAL_MS", "int:10:60000", 1000),
    ("rescan-interval-secs", "MEMTRACE_RESCAN_INTERVAL_SECS", "int:1:3600", 5),
    ("fault-sample-period", "MEMTRACE_FAULT_SAMPLE_PERIOD", "int:1:", 4),
    ("collect", "MEMTRACE_COLLECT", "enum:growth|heap", "heap"),
    ("heap-sample-bytes", "MEMTRACE_HEAP_SAMPLE_BYTES", "int:0:1099511627776", 524288),
    ("heap-max-live", "MEMTRACE_HEAP_MAX_LIVE", "int:1:262144", 65536),
    ("no-mount-tracefs", "MEMTRACE_NO_MOUNT_TRACEFS", "bool", False),
    ("kubelet-url", "MEMTRACE_KUBELET_URL", "str", None),
    ("kubelet-token-file", "MEMTRACE_KUBELET_TOKEN_FILE", "path", None),
    ("kubelet-insecure-tls", "MEMTRACE_KUBELET_INSECURE_TLS", "bool", False),
]
# Environment only: not TOML keys.
ENV_ONLY = {"MEMTRACE_CONFIG": "path", "MEMTRACE_DEBUG_TOKEN": "token"}
TOML_KINDS = {t: k for t, _, k, _ in SETTINGS}
ENV_KINDS = {e: k for _, e, k, _ in SETTINGS} | ENV_ONLY
TOML_TO_ENV = {t: e for t, e, _, _ in SETTINGS}
DEFAULTS = {t: d for t, _, _, d in SETTINGS}
# The kebab-case TOML keys, from the env names (a consistency check of the table).
assert all(e == "MEMTRACE_" + t.upper().replace("-", "_") for t, e, _, _ in SETTINGS)

SIGNALS = {s.name[3:] for s in signal.Signals if s.name.startswith("SIG") and not s.name.startswith("SIG_")}


def _int(v, lo, hi, what):
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{what}: {v!r} is not an integer")
    if lo is not None and v < lo or hi is not None and v > hi:
        raise ValueError(f"{what}: {v} out of range {lo}..{hi if hi is not None else ''}")


def check_value(kind, v, what, from_env):
    """Raises ValueError when v (a str from the environment, or a TOML value) is not valid."""
    if kind in ("names", "paths", "pids"):
        items = v.split(",") if from_env else v
        if not isinstance(items, list) or not items:
            raise ValueError(f"{what}: {v!r} is not a non-empty list")
        for it in items:
            if kind == "pids":
                _int(int(it) if from_env else it, 1, None, what)
            elif not isinstance(it, str) or not it:
                raise ValueError(f"{what}: empty or non-string item in {v!r}")
            elif kind == "names" and "/" in it:
                raise ValueError(f"{what}: {it!r} is a path, not a process name")
            elif kind == "paths" and not it.startswith("/"):
                raise ValueError(f"{what}: {it!r} is not an absolute path")
        return
    if kind == "bool":
        if from_env and v not in ("true", "false") or not from_env and not isinstance(v, bool):
            raise ValueError(f"{what}: {v!r} is not true or false")
        return
    if kind.startswith("int:") or kind == "pow2":
        if from_env:
            if not re.fullmatch(r"[0-9]+", v):
                raise ValueError(f"{what}: {v!r} is not an unsigned integer")
            v = int(v)
        if kind == "pow2":
            _int(v, 4096, 2**32 - 1, what)
            if v & (v - 1):
                raise ValueError(f"{what}: {v} is not a power of two")
            return
        _, lo, hi = kind.split(":")
        _int(v, int(lo) if lo else None, int(hi) if hi else None, what)
        return
    if kind == "float":
        if from_env:
            v = float(v)
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{what}: {v!r} is not a number")
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{what}: {v!r} is not a finite number >= 0")
        return
    if not isinstance(v, str):
        raise ValueError(f"{what}: {v!r} is not a string")
    if kind.startswith("enum:"):
        if v not in kind[5:].split("|"):
            raise ValueError(f"{what}: {v!r} is not one of {kind[5:]}")
    elif kind == "probe":
        binary, sep, symbol = v.rpartition(":")
        if not sep or not binary or not symbol:
            raise ValueError(f"{what}: {v!r} is not BINARY:SYMBOL")
    elif kind == "regex":
        re.compile(v)  # Python's dialect; close enough for a syntax check
    elif kind == "signal":
        name = v.upper().removeprefix("SIG")
        if not (v.isdigit() and 1 <= int(v) <= 64) and name not in SIGNALS:
            raise ValueError(f"{what}: {v!r} is not a signal name or number")
    elif kind == "listen":
        if v in ("off", "none", ""):
            return
        host, sep, port = v.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{what}: {v!r} is not ADDRESS:PORT or off")
        ipaddress.ip_address(host[1:-1] if host.startswith("[") else host)
    elif kind == "path":
        if not v.startswith("/"):
            raise ValueError(f"{what}: {v!r} is not an absolute path")
    elif kind in ("str", "token"):
        if kind == "str" and not v:
            raise ValueError(f"{what}: empty")
    else:
        raise AssertionError(kind)


METRICS = {
    # name: labels besides Prometheus' own instance and job
    "memtrace_worker_rss_bytes": {"pid", "name", "role"},
    "memtrace_worker_rss_type_bytes": {"pid", "name", "role", "type"},
    "memtrace_worker_pss_bytes": {"pid", "name", "role"},
    "memtrace_worker_uss_bytes": {"pid", "name", "role"},
    "memtrace_worker_leak_slope_bytes_per_request": {"pid", "name", "role"},
    "memtrace_worker_leak_slope_bytes_per_hour": {"pid", "name", "role"},
    "memtrace_worker_forecast_seconds_to_limit": {"pid", "name", "role"},
    "memtrace_worker_requests_total": {"pid", "name", "role"},
    "memtrace_worker_requests_in_flight": {"pid", "name", "role"},
    "memtrace_worker_page_faults_total": {"pid", "name", "role"},
    "memtrace_worker_data_bytes": {"pid", "name", "role"},
    "memtrace_worker_python_gc_objects": {"pid", "name", "role", "generation"},
    "memtrace_worker_python_gc_collections_total": {"pid", "name", "role", "generation"},
    "memtrace_worker_python_gc_collected_total": {"pid", "name", "role", "generation"},
    "memtrace_worker_python_gc_uncollectable_total": {"pid", "name", "role", "generation"},
    "memtrace_worker_mmap_bytes_total": {"pid", "name", "role"},
    "memtrace_worker_brk_grow_bytes_total": {"pid", "name", "role"},
    "memtrace_worker_leak_detections_total": {"pid", "name", "role"},
    "memtrace_worker_soft_limit_fired": {"pid", "name", "role"},
    "memtrace_soft_limit_actions_total": {"outcome"},
    "memtrace_ringbuf_drops_total": set(),
    "memtrace_events_total": set(),
    "memtrace_workers": set(),
    "memtrace_collection_active": set(),
}
EOF
export PYTHONPATH="$WORK"

# ---------------------------------------------------------------- Kubernetes
section "Kubernetes: deploy/kubernetes/daemonset.yaml"
K8S="$DEPLOY/kubernetes/daemonset.yaml"
check "every YAML document parses (PyYAML safe_load_all)" "$PY" - "$K8S" <<'EOF'
import sys, yaml
docs = list(yaml.safe_load_all(open(sys.argv[1])))
for i, d in enumerate(docs):
    if not isinstance(d, dict):
        sys.exit(f"document {i} is {type(d).__name__}, not a mapping")
    print(f"{d.get('kind')}/{d.get('metadata', {}).get('name')}")
EOF
for v in "${K8S_VERSIONS[@]}"; do
    check "OpenAPI schemas of Kubernetes $v, strict (kubernetes-validate --strict -k $v)" \
        "$PY" -m kubernetes_validate --strict --no-warn -k "$v" "$K8S"
done
check "structure: objects, RBAC for the kubelet, hostPID, privileged, probes, annotations, env, volumes" "$PY" - "$K8S" <<'EOF'
import sys, yaml
from memtrace_settings import ENV_KINDS, check_value
docs = list(yaml.safe_load_all(open(sys.argv[1])))
errors = []
def expect(cond, msg):
    if not cond:
        errors.append(msg)
by_kind = {d["kind"]: d for d in docs}
expect(sorted(by_kind) == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "Namespace", "ServiceAccount"],
       f"objects: {sorted(by_kind)}")
expect(len(by_kind) == len(docs), "an object kind appears twice")
ns = by_kind["Namespace"]["metadata"]["name"]
expect(ns == "memtrace", "namespace is not memtrace")
CLUSTER_SCOPED = ("Namespace", "ClusterRole", "ClusterRoleBinding")
for d in docs:
    if d["kind"] in CLUSTER_SCOPED:
        expect("namespace" not in d["metadata"], f"{d['kind']} is cluster-scoped but has a namespace")
    else:
        expect(d["metadata"].get("namespace") == ns, f"{d['kind']} is not in namespace {ns}")
# The kubelet's pod list: the ServiceAccount may GET /pods from its node's kubelet.
sa = by_kind["ServiceAccount"]
expect(sa.get("automountServiceAccountToken") is True, "ServiceAccount: automountServiceAccountToken is not true")
role = by_kind["ClusterRole"]
expect(role.get("rules") == [{"apiGroups": [""], "resources": ["nodes/proxy"], "verbs": ["get"]}],
       f"ClusterRole rules are not exactly get on nodes/proxy: {role.get('rules')}")
binding = by_kind["ClusterRoleBinding"]
expect(binding.get("roleRef") == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"]},
       "ClusterRoleBinding does not refer to the ClusterRole")
expect(binding.get("subjects") == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": ns}],
       "ClusterRoleBinding's subject is not the ServiceAccount")
cm = by_kind["ConfigMap"]
for k, v in cm["data"].items():
    expect(isinstance(v, str), f"ConfigMap {k}: value is not a string")
    if k not in ENV_KINDS or k == "MEMTRACE_DEBUG_TOKEN":
        errors.append(f"ConfigMap key {k} is not a memtrace setting")
        continue
    try:
        check_value(ENV_KINDS[k], v, k, from_env=True)
    except ValueError as e:
        errors.append(f"ConfigMap: {e}")
expect(cm["data"].get("MEMTRACE_PROCESS_NAME") == "gunicorn", "ConfigMap lacks MEMTRACE_PROCESS_NAME: gunicorn")
ds = by_kind["DaemonSet"]
tpl = ds["spec"]["template"]
spec = tpl["spec"]
sel = ds["spec"]["selector"]["matchLabels"]
expect(all(tpl["metadata"]["labels"].get(k) == v for k, v in sel.items()), "selector does not match template labels")
ann = tpl["metadata"].get("annotations", {})
expect(ann.get("prometheus.io/scrape") == "true", "prometheus.io/scrape")
expect(ann.get("prometheus.io/port") == "9464", "prometheus.io/port")
expect(ann.get("prometheus.io/path") == "/metrics", "prometheus.io/path")
expect(spec.get("hostPID") is True, "hostPID is not true")
expect(spec.get("serviceAccountName") == by_kind["ServiceAccount"]["metadata"]["name"], "serviceAccountName")
expect(spec.get("automountServiceAccountToken") is True, "pod: automountServiceAccountToken is not true (the kubelet token)")
expect(spec.get("terminationGracePeriodSeconds") == 15, "terminationGracePeriodSeconds != 15")
expect({"operator": "Exists"} in spec.get("tolerations", []), "no toleration of every taint")
(c,) = spec["containers"]
expect(c["image"] == "ghcr.io/example/memtrace:0.1.0", "image")
args = c.get("args", [])
expect(args[:1] == ["agent"], "args do not start with agent")
expect("--log-format" in args and args[args.index("--log-format") + 1] == "json", "--log-format json")
expect("--listen" in args and args[args.index("--listen") + 1] == "0.0.0.0:9464", "--listen 0.0.0.0:9464")
expect(c.get("securityContext", {}).get("privileged") is True, "not privileged")
ports = {p["name"]: p for p in c["ports"]}
expect(ports.get("metrics", {}).get("containerPort") == 9464, "port metrics 9464")
expect(all("hostPort" not in p for p in c["ports"]), "a hostPort is set")
for probe in ("livenessProbe", "readinessProbe"):
    g = c.get(probe, {}).get("httpGet", {})
    expect(g.get("path") == "/healthz" and g.get("port") in (9464, "metrics"), f"{probe} is not GET /healthz on 9464")
res = c.get("resources", {})
expect(res.get("requests") == {"cpu": "20m", "memory": "32Mi"}, "resources.requests")
expect(res.get("limits") == {"memory": "128Mi"}, "resources.limits")
cms = [e["configMapRef"]["name"] for e in c.get("envFrom", []) if "configMapRef" in e]
expect(cms == [cm["metadata"]["name"]], "envFrom does not use the ConfigMap")
env_list = c.get("env", [])
env = {e["name"]: e for e in env_list}
expect(len(env) == len(env_list), "an env variable appears twice")
# NODE_IP, from the downward API, only builds the kubelet URL.
NODE_IP = {"name": "NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}
for name, e in env.items():
    if name == "NODE_IP":
        expect(e == NODE_IP, f"env NODE_IP is not the downward API's status.hostIP: {e}")
        continue
    expect(name in ENV_KINDS, f"env {name} is not a memtrace setting")
    if "value" in e and name in ENV_KINDS:
        try:
            check_value(ENV_KINDS[name], e["value"], name, from_env=True)
        except ValueError as err:
            errors.append(f"env: {err}")
kubelet = {
    "MEMTRACE_KUBELET_URL": "https://$(NODE_IP):10250",
    "MEMTRACE_KUBELET_TOKEN_FILE": "/var/run/secrets/kubernetes.io/serviceaccount/token",
    "MEMTRACE_KUBELET_INSECURE_TLS": "true",
}
for name, value in kubelet.items():
    expect(env.get(name, {}).get("value") == value, f"env {name} is not {value!r}")
names = [e["name"] for e in env_list]
# Kubernetes expands $(NODE_IP) only when NODE_IP is defined earlier in the list.
expect("NODE_IP" in names and "MEMTRACE_KUBELET_URL" in names and names.index("NODE_IP") < names.index("MEMTRACE_KUBELET_URL"),
       "NODE_IP is not defined before MEMTRACE_KUBELET_URL")
tok = env.get("MEMTRACE_DEBUG_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
expect(tok.get("optional") is True and tok.get("name") and tok.get("key"), "MEMTRACE_DEBUG_TOKEN is not an optional secretKeyRef")
vols = {v["name"]: v for v in spec.get("volumes", [])}
mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
for m in mounts.values():
    expect(m["name"] in vols, f"mount {m['mountPath']} uses undefined volume {m['name']}")
for v in vols:
    expect(any(m["name"] == v for m in mounts.values()), f"volume {v} is not mounted")
for path, ro in (("/sys/kernel/tracing", False), ("/sys/kernel/btf", True), ("/sys/kernel/debug", True)):
    m = mounts.get(path)
    expect(m is not None and vols[m["name"]].get("hostPath", {}).get("path") == path, f"{path} is not the host's")
    if m and ro:
        expect(m.get("readOnly") is True, f"{path} is not readOnly")
expect("/sys/fs/bpf" not in mounts and "/proc" not in mounts, "/sys/fs/bpf or /proc mounted")
if errors:
    sys.exit("\n".join(errors))
print("Namespace, ServiceAccount, ClusterRole, ClusterRoleBinding, ConfigMap, DaemonSet: all expectations hold")
EOF

# ---------------------------------------------------------------- systemd
section "systemd: deploy/systemd/memtrace.service"
UNIT="$DEPLOY/systemd/memtrace.service"
check "unit structure: sections, ExecStart, EnvironmentFile, Restart, capabilities, no hiding of /proc or /sys" "$PY" - "$UNIT" <<'EOF'
import re, sys
sections, errors, cur = {}, [], None
for n, raw in enumerate(open(sys.argv[1]), 1):
    line = raw.rstrip("\n")
    if not line.strip() or line.lstrip().startswith(("#", ";")):
        continue
    if m := re.fullmatch(r"\[([A-Za-z]+)\]", line):
        cur = sections.setdefault(m[1], {})
        continue
    m = re.fullmatch(r"([A-Za-z]+)=(.*)", line)
    if not m or cur is None:
        errors.append(f"line {n}: not KEY=VALUE inside a section: {line!r}")
        continue
    cur.setdefault(m[1], []).append(m[2])
svc = sections.get("Service", {})
def one(key):
    v = svc.get(key, [])
    return v[0] if len(v) == 1 else None
expect = {
    "ExecStart": "/usr/local/bin/memtrace agent",
    "EnvironmentFile": "-/etc/memtrace/memtrace.env",
    "Restart": "on-failure",
    "KillSignal": "SIGTERM",
    "TimeoutStopSec": "15",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "PrivateTmp": "yes",
}
for k, v in expect.items():
    if one(k) != v:
        errors.append(f"[Service] {k}={one(k)!r}, expected {v!r}")
if svc.get("ProtectHome", [""])[0] not in ("yes", "read-only", "tmpfs"):
    errors.append("ProtectHome is not set")
caps = set(" ".join(svc.get("CapabilityBoundingSet", [])).split())
want = {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_KILL", "CAP_SYS_RESOURCE", "CAP_DAC_READ_SEARCH"}
if caps != want:
    errors.append(f"CapabilityBoundingSet {sorted(caps)} != {sorted(want)}")
for bad, ok in (("ProtectKernelTunables", {"no", "false"}), ("ProtectProc", {"default"}), ("ProcSubset", {"all"}),
                ("PrivateDevices", {"no", "false"}), ("PrivateUsers", {"no", "false"}), ("PrivateNetwork", {"no", "false"}),
                ("InaccessiblePaths", set()), ("TemporaryFileSystem", set()), ("SystemCallFilter", set())):
    for name, sec in sections.items():
        for v in sec.get(bad, []):
            if v not in ok:
                errors.append(f"[{name}] {bad}={v} would hide or break what eBPF tracing needs")
if sections.get("Install", {}).get("WantedBy") != ["multi-user.target"]:
    errors.append("[Install] WantedBy=multi-user.target missing")
if errors:
    sys.exit("\n".join(errors))
print(f"sections {sorted(sections)}; {sum(len(v) for v in svc.values())} [Service] settings")
EOF
if command -v systemd-analyze >/dev/null 2>&1; then
    # 1. The unit as shipped. systemd-analyze exits 0 even for unknown keys and
    #    unparsable values (it prints "..., ignoring"), so any output about the
    #    unit fails the check. The one message allowed: the binary is not
    #    installed on this machine.
    mkdir -p "$WORK/unit"
    cp "$UNIT" "$WORK/unit/memtrace.service"
    # systemd-analyze also loads other units installed on this machine and
    # complains about their files too (Debian's unicorn.service does).
    # Lines that name an installed unit's file are not about memtrace.service:
    # they are shown, marked, and set aside.
    OTHER_UNITS='^/(usr/)?lib/systemd/|^/etc/systemd/|^/run/systemd/'
    about_memtrace() { grep -v '^$' | grep -v -E "$OTHER_UNITS" || true; }
    show_verify_output() {
        printf '%s\n' "$1" | grep -v '^$' | sed -E "\\#$OTHER_UNITS#s#\$#   [another installed unit: ignored]#"
    }
    verify_shipped() {
        local out rc=0
        out="$(cd "$WORK/unit" && systemd-analyze verify ./memtrace.service 2>&1)" || rc=$?
        [ -n "$out" ] && show_verify_output "$out"
        local rest
        rest="$(printf '%s\n' "$out" | about_memtrace | grep -v 'Command /usr/local/bin/memtrace is not executable: No such file or directory' || true)"
        if [ -n "$rest" ]; then return 1; fi
        if [ "$rc" -ne 0 ] && [ -x /usr/local/bin/memtrace ]; then return 1; fi
        if [ "$rc" -ne 0 ]; then echo "(only complaint: /usr/local/bin/memtrace is not installed here)"; fi
        return 0
    }
    check "systemd-analyze verify memtrace.service (as shipped)" verify_shipped
    # 2. The same unit with ExecStart pointing at a placeholder executable, so
    #    that verify runs to the end and must print nothing at all.
    mkdir -p "$WORK/bin" "$WORK/placeholder"
    printf '#!/bin/sh\nexit 0\n' >"$WORK/bin/memtrace"
    chmod 0755 "$WORK/bin/memtrace"
    sed "s#^ExecStart=/usr/local/bin/memtrace #ExecStart=$WORK/bin/memtrace #" "$UNIT" >"$WORK/placeholder/memtrace.service"
    verify_placeholder() {
        local changed
        changed="$(diff "$UNIT" "$WORK/placeholder/memtrace.service" | grep -c '^>' || true)"
        if [ "$changed" -ne 1 ]; then echo "expected exactly the ExecStart line to change, got $changed"; return 1; fi
        local out rc=0
        out="$(cd "$WORK/placeholder" && systemd-analyze verify ./memtrace.service 2>&1)" || rc=$?
        [ -n "$out" ] && show_verify_output "$out"
        if [ -n "$(printf '%s\n' "$out" | about_memtrace)" ] || [ "$rc" -ne 0 ]; then return 1; fi
        echo "no warnings about memtrace.service (ExecStart=$WORK/bin/memtrace agent, every other line as shipped)"
    }
    check "systemd-analyze verify, ExecStart -> placeholder binary: no output about memtrace.service" verify_placeholder
    # Informational: systemd's own exposure score for the hardening.
    if score="$(cd "$WORK/placeholder" && systemd-analyze security --offline=true ./memtrace.service 2>/dev/null | tail -n1)"; then
        echo "        info: systemd-analyze security --offline=true: ${score#→ }"
    fi
else
    skip "systemd-analyze could not be installed: only the structural check above ran"
fi

# ---------------------------------------------------------------- settings examples
section "Settings: deploy/memtrace.env.example and deploy/memtrace.toml.example"
ENVF="$DEPLOY/memtrace.env.example"
TOMLF="$DEPLOY/memtrace.toml.example"
check "env example: only comments, blank lines and known MEMTRACE_*=VALUE; values valid; every setting present" "$PY" - "$ENVF" <<'EOF'
import re, sys
from memtrace_settings import ENV_KINDS, check_value
errors, active, mentioned = [], {}, set()
for n, raw in enumerate(open(sys.argv[1]), 1):
    line = raw.rstrip("\n")
    if not line.strip():
        continue
    if line.startswith("#"):
        # A commented-out setting must still name a real one.
        if m := re.match(r"#\s*(MEMTRACE_[A-Z0-9_]+)=", line):
            if m[1] not in ENV_KINDS:
                errors.append(f"line {n}: commented {m[1]} is not a memtrace setting")
            mentioned.add(m[1])
        continue
    m = re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line)
    if not m:
        errors.append(f"line {n}: not a comment, blank or KEY=VALUE: {line!r}")
        continue
    key, value = m[1], m[2]
    if not key.startswith("MEMTRACE_") or key not in ENV_KINDS:
        errors.append(f"line {n}: {key} is not a memtrace setting")
        continue
    if key in active:
        errors.append(f"line {n}: {key} set twice")
    if value != value.strip() or (value and value[0] in "\"'"):
        errors.append(f"line {n}: {key}: surrounding spaces or quotes")
    if value == "" and key != "MEMTRACE_DEBUG_TOKEN":
        errors.append(f"line {n}: {key}= is empty: comment it out instead (empty is not unset)")
    elif value:
        try:
            check_value(ENV_KINDS[key], value, key, from_env=True)
        except ValueError as e:
            errors.append(f"line {n}: {e}")
    active[key] = value
    mentioned.add(key)
missing = set(ENV_KINDS) - mentioned
if missing:
    errors.append(f"settings not documented: {sorted(missing)}")
if errors:
    sys.exit("\n".join(errors))
print(f"{len(active)} active settings, {len(mentioned) - len(active)} commented out, all {len(ENV_KINDS)} documented")
EOF
check "TOML example: parses (tomllib), only known keys, value types, every key present, same values as the env example" "$PY" - "$TOMLF" "$ENVF" <<'EOF'
import re, sys
try:
    import tomllib
except ImportError:
    import tomli as tomllib
from memtrace_settings import ENV_KINDS, TOML_KINDS, TOML_TO_ENV, check_value
text = open(sys.argv[1]).read()
errors = []
data = tomllib.loads(text)
for k, v in data.items():
    if k not in TOML_KINDS:
        errors.append(f"{k}: not a key the agent accepts")
        continue
    try:
        check_value(TOML_KINDS[k], v, k, from_env=False)
    except ValueError as e:
        errors.append(str(e))
# Keys that are commented out must be real keys too, and parse once uncommented.
commented = {}
for n, line in enumerate(text.splitlines(), 1):
    if m := re.match(r"#\s*([a-z][a-z0-9-]*)\s*=", line):
        try:
            (k, v), = tomllib.loads(line.lstrip("# ")).items()
        except Exception as e:
            errors.append(f"line {n}: commented setting does not parse: {e}")
            continue
        if k not in TOML_KINDS:
            errors.append(f"line {n}: commented {k} is not a key the agent accepts")
            continue
        try:
            check_value(TOML_KINDS[k], v, k, from_env=False)
        except ValueError as e:
            errors.append(f"line {n}: {e}")
        commented[k] = v
missing = set(TOML_KINDS) - set(data) - set(commented)
if missing:
    errors.append(f"keys not documented: {sorted(missing)}")
# Same active values as the env example.
env = {}
for line in open(sys.argv[2]):
    if m := re.fullmatch(r"(MEMTRACE_[A-Z0-9_]+)=(.*)", line.rstrip("\n")):
        env[m[1]] = m[2]
for k, v in data.items():
    e = TOML_TO_ENV.get(k)
    if e is None:
        continue  # reported above
    if e not in env:
        errors.append(f"{k} is set in the TOML example but {e} is not active in the env example")
        continue
    ev = env[e]
    same = (str(v).lower() == ev) if isinstance(v, bool) else (
        float(ev) == float(v) if isinstance(v, (int, float)) else ev == (",".join(map(str, v)) if isinstance(v, list) else v))
    if not same:
        errors.append(f"{k} = {v!r} but {e}={ev}")
for e in env:
    if e not in ("MEMTRACE_DEBUG_TOKEN", "MEMTRACE_CONFIG") and e.removeprefix("MEMTRACE_").lower().replace("_", "-") not in data:
        errors.append(f"{e} is active in the env example but not in the TOML example")
if errors:
    sys.exit("\n".join(errors))
print(f"{len(data)} keys set, {len(commented)} commented out, all {len(TOML_KINDS)} documented; values match the env example")
EOF

# The agent itself, when a built binary is at hand: it must accept both
# examples. `--listen bogus` makes it stop right after reading and checking
# every setting (the listen address is the last one it resolves) instead of
# starting to trace; flags win over the environment and the file.
BIN="${MEMTRACE_BIN:-}"
if [ -z "$BIN" ]; then
    # The release of `cargo xtask dist` first: the image stage below
    # rebuilds it in place, so the live stage runs the current sources.
    for b in "$REPO/target/dist/memtrace" "$REPO/target/release/memtrace" "$REPO/target/debug/memtrace"; do
        if [ -x "$b" ]; then BIN="$b"; break; fi
    done
fi
if [ -n "$BIN" ] && [ -x "$BIN" ]; then
    echo "  agent binary: $BIN ($(date -r "$BIN" '+%Y-%m-%d %H:%M'))"
    agent_accepts() { # describes itself; runs the agent with env from $1 (a file of KEY=VALUE)
        local envfile="$1"
        shift
        local -a envs=()
        while IFS= read -r line; do
            case "$line" in '#'* | '') continue ;; esac
            envs+=("$line")
        done <"$envfile"
        local out rc=0
        out="$(cd "$WORK" && env -i PATH="$PATH" "${envs[@]}" timeout -s TERM 20 "$BIN" agent "$@" --listen bogus 2>&1)" || rc=$?
        printf '%s\n' "$out" | head -n 5
        [ "$rc" -eq 2 ] && printf '%s' "$out" | grep -q -- '--listen: `bogus`'
    }
    # The env example as systemd reads it (KEY=VALUE, no shell), then with
    # its commented selection examples switched on.
    check "agent accepts deploy/memtrace.env.example ($BIN)" agent_accepts "$ENVF"
    sed -n 's/^# \(MEMTRACE_\(PROCESS_NAME\|EXE\|CMDLINE\|PID\)=.*\)/\1/p' "$ENVF" | awk -F= '!seen[$1]++' >"$WORK/selection.env"
    cat "$ENVF" "$WORK/selection.env" >"$WORK/with-selection.env"
    check "agent accepts the env example with its selection examples uncommented" agent_accepts "$WORK/with-selection.env"
    : >"$WORK/empty.env"
    check "agent accepts deploy/memtrace.toml.example (--config)" agent_accepts "$WORK/empty.env" --config "$TOMLF"
    sed 's/^# \(process-name = \["gunicorn"\]\|exe = \|cmdline = \|pid = \)/\1/' "$TOMLF" >"$WORK/with-selection.toml"
    check "agent accepts the TOML example with its selection examples uncommented" agent_accepts "$WORK/empty.env" --config "$WORK/with-selection.toml"
    # The kubelet settings are commented out in both examples (unset by
    # default): switched on, with a selector so that the agent has work.
    { sed -n 's/^# \(MEMTRACE_KUBELET_[A-Z_]*=.*\)/\1/p' "$ENVF"; echo MEMTRACE_PROCESS_NAME=gunicorn; } >"$WORK/kubelet.env"
    sed 's/^# \(kubelet-[a-z-]* = \|process-name = \["gunicorn"\]\)/\1/' "$TOMLF" >"$WORK/with-kubelet.toml"
    check_kubelet_examples() {
        [ "$(grep -c '^MEMTRACE_KUBELET_' "$WORK/kubelet.env")" -eq 3 ] || { echo "expected 3 MEMTRACE_KUBELET_* examples in $ENVF"; return 1; }
        [ "$(grep -c '^kubelet-' "$WORK/with-kubelet.toml")" -eq 3 ] || { echo "expected 3 kubelet-* examples in $TOMLF"; return 1; }
        agent_accepts "$WORK/kubelet.env" && agent_accepts "$WORK/empty.env" --config "$WORK/with-kubelet.toml"
    }
    check "agent accepts both examples' kubelet settings uncommented" check_kubelet_examples
    # The ConfigMap, and the container's own variables with $(NODE_IP)
    # expanded as the kubelet would (to a documentation address).
    "$PY" - "$DEPLOY/kubernetes/daemonset.yaml" >"$WORK/configmap.env" <<'EOF'
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d["kind"] == "ConfigMap":
        for k, v in d["data"].items():
            print(f"{k}={v}")
    if d["kind"] == "DaemonSet":
        for e in d["spec"]["template"]["spec"]["containers"][0].get("env", []):
            if "value" in e:
                print(f"{e['name']}={e['value'].replace('$(NODE_IP)', '192.0.2.1')}")
EOF
    check "agent accepts the Kubernetes ConfigMap's settings and the container's kubelet variables" agent_accepts "$WORK/configmap.env" --log-format json
else
    skip "agent check: no built memtrace binary (set MEMTRACE_BIN, or cargo xtask build)"
fi

# ---------------------------------------------------------------- image
section "Image: deploy/container/Containerfile (the DaemonSet's image)"
IMAGE_REF="$("$PY" - "$K8S" <<'EOF'
import sys, yaml
ds = next(d for d in yaml.safe_load_all(open(sys.argv[1])) if d["kind"] == "DaemonSet")
print(ds["spec"]["template"]["spec"]["containers"][0]["image"])
EOF
)"
VERSION="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$REPO/Cargo.toml")"
check "the DaemonSet's image $IMAGE_REF carries the workspace version $VERSION" test "${IMAGE_REF##*:}" = "$VERSION"
ARCHIVE="$REPO/target/dist/memtrace-$VERSION.oci.tar"
if [ "$(id -u)" -eq 0 ] && command -v cargo >/dev/null 2>&1 && command -v buildah >/dev/null 2>&1; then
    # The whole release (the image needs the static binary); incremental.
    check "cargo xtask dist builds it with buildah, no registry ($ARCHIVE)" \
        bash -c "cd '$REPO' && cargo xtask dist >'$WORK/dist.log' 2>&1 || { tail -n 20 '$WORK/dist.log'; exit 1; }; sed -n '/target\/dist:/,\$p' '$WORK/dist.log'"
else
    skip "building the image: needs root, cargo and buildah (cargo xtask setup installs buildah); checking $ARCHIVE if present"
fi
if [ -f "$ARCHIVE" ]; then
    check "the archive: one linux/amd64 image, entrypoint the binary, args agent, labels, one layer with only the static binary" \
        "$PY" - "$ARCHIVE" "$VERSION" <<'EOF'
import io, json, struct, sys, tarfile
archive, version = sys.argv[1:3]
ar = tarfile.open(archive)
def blob(digest):
    return ar.extractfile("blobs/" + digest.replace(":", "/")).read()
errors = []
def expect(cond, msg):
    if not cond:
        errors.append(msg)
index = json.loads(ar.extractfile("index.json").read())
expect(len(index["manifests"]) == 1, f"{len(index['manifests'])} manifests")
m = index["manifests"][0]
ref = m.get("annotations", {}).get("org.opencontainers.image.ref.name", "")
expect(ref.endswith(f"memtrace:{version}") or ref == version, f"ref name {ref!r}")
manifest = json.loads(blob(m["digest"]))
config = json.loads(blob(manifest["config"]["digest"]))
c = config.get("config", {})
expect(config.get("architecture") == "amd64" and config.get("os") == "linux", f"platform {config.get('os')}/{config.get('architecture')}")
expect(c.get("Entrypoint") == ["/usr/bin/memtrace"], f"entrypoint {c.get('Entrypoint')}")
expect(c.get("Cmd") == ["agent"], f"cmd {c.get('Cmd')}")
labels = c.get("Labels", {})
expect(labels.get("org.opencontainers.image.version") == version, f"version label {labels.get('org.opencontainers.image.version')!r}")
expect(labels.get("org.opencontainers.image.revision", "unknown") != "unknown", "no revision label")
layers = manifest["layers"]
expect(len(layers) == 1, f"{len(layers)} layers")
layer = tarfile.open(fileobj=io.BytesIO(blob(layers[0]["digest"])), mode="r:*")
files = {t.name.lstrip("./"): t for t in layer.getmembers() if t.isfile()}
expect(list(files) == ["usr/bin/memtrace"], f"files in the layer: {sorted(files)}")
if "usr/bin/memtrace" in files:
    elf = layer.extractfile(files["usr/bin/memtrace"]).read()
    expect(elf[:4] == b"\x7fELF" and elf[4] == 2, "not a 64-bit ELF")
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    types = [struct.unpack_from("<I", elf, phoff + i * phentsize)[0] for i in range(phnum)]
    expect(3 not in types, "the binary has an interpreter (PT_INTERP): not static")
    expect(files["usr/bin/memtrace"].mode & 0o111, "the binary is not executable")
if errors:
    sys.exit("\n".join(errors))
print(f"{ref}: linux/amd64, {manifest['layers'][0]['size']} bytes compressed, entrypoint /usr/bin/memtrace agent, revision {labels['org.opencontainers.image.revision']}, static")
EOF
    if [ "$(id -u)" -eq 0 ] && command -v podman >/dev/null 2>&1; then
        image_runs() {
            local img rc=0 out
            img="$(podman load -q -i "$ARCHIVE" | sed -n 's/^Loaded image: //p' | tail -n1)"
            [ -n "$img" ] || { echo "podman load gave no image"; return 1; }
            # runc: bookworm's crun refuses hosts with hybrid cgroups.
            # Limits no higher than ours: where root lacks CAP_SYS_RESOURCE
            # (a container), podman's defaults cannot be set.
            local -a limits=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=4096:4096)
            out="$(podman --runtime runc run --rm "${limits[@]}" "$img" --version 2>&1)" || rc=$?
            printf '%s\n' "$out" | head -n 2
            if [ "$rc" -ne 0 ] || ! printf '%s' "$out" | grep -q "^memtrace $VERSION\$"; then podman rmi -f "$img" >/dev/null 2>&1; return 1; fi
            # The DaemonSet's args with the ConfigMap's settings: read and
            # accepted (`--listen bogus` stops it there, as above).
            "$PY" - "$K8S" >"$WORK/pod.env" <<'EOF'
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d["kind"] == "ConfigMap":
        for k, v in d["data"].items():
            print(f"{k}={v}")
EOF
            # Its --listen value swapped for `bogus` (a flag given twice is
            # an error).
            args="$("$PY" -c 'import sys, yaml
ds = next(d for d in yaml.safe_load_all(open(sys.argv[1])) if d["kind"] == "DaemonSet")
a = ds["spec"]["template"]["spec"]["containers"][0]["args"]
a[a.index("--listen") + 1] = "bogus"
print(" ".join(a))' "$K8S")"
            rc=0
            # shellcheck disable=SC2086
            out="$(podman --runtime runc run --rm "${limits[@]}" --env-file "$WORK/pod.env" "$img" $args 2>&1)" || rc=$?
            podman rmi -f "$img" >/dev/null 2>&1
            printf '%s\n' "$out" | head -n 3
            [ "$rc" -eq 2 ] && printf '%s' "$out" | grep -q -- '--listen: `bogus`'
        }
        check "the image runs with podman: --version, and the DaemonSet's args with the ConfigMap accepted" image_runs
    else
        skip "running the image: needs root and podman"
    fi
else
    skip "image checks: $ARCHIVE not built"
fi

# ---------------------------------------------------------------- Grafana
section "Grafana: deploy/grafana/memtrace-dashboard.json"
DASH="$DEPLOY/grafana/memtrace-dashboard.json"
check "valid JSON (python -m json.tool)" "$PY" -m json.tool "$DASH" /dev/null
check "queries: PromQL parses, metric names and labels exist, counters under rate/increase, every panel has a datasource" "$PY" - "$DASH" <<'EOF'
import json, re, sys
import promql_parser as pp
from memtrace_settings import METRICS
d = json.load(open(sys.argv[1]))
errors = []
def expect(cond, msg):
    if not cond:
        errors.append(msg)
expect(d.get("schemaVersion", 0) >= 36, "schemaVersion < 36")
expect(d.get("uid") and d.get("title"), "uid/title missing")
# Template variables.
tv = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
ds_vars = [n for n, v in tv.items() if v["type"] == "datasource" and v.get("query") == "prometheus"]
expect(len(ds_vars) == 1, f"expected one Prometheus datasource variable, got {ds_vars}")
ds_ref = "${%s}" % ds_vars[0] if ds_vars else None
expect(any(i.get("name") == ds_vars[0] and i.get("pluginId") == "prometheus" for i in d.get("__inputs", [])) if ds_vars else False,
       "no __inputs entry for the datasource")
def var_query(name):
    q = tv.get(name, {}).get("query")
    return q.get("query") if isinstance(q, dict) else q
expect(var_query("instance") == "label_values(memtrace_workers, instance)", f"instance variable: {var_query('instance')!r}")
nq = var_query("name") or ""
expect(re.fullmatch(r"label_values\(memtrace_worker_rss_bytes(\{[^}]*\})?, name\)", nq), f"name variable: {nq!r}")
for n in ("instance", "name"):
    expect(tv.get(n, {}).get("datasource", {}).get("uid") == ds_ref, f"variable {n} does not use {ds_ref}")
# Panels, rows' nested panels included.
panels = []
for p in d.get("panels", []):
    panels.append(p)
    panels.extend(p.get("panels", []))
ids = [p.get("id") for p in panels]
expect(len(ids) == len(set(ids)), "duplicate panel ids")
subst = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m", "$instance": ".*", "$name": ".*"}
used = set()
n_exprs = 0
for p in panels:
    title = p.get("title")
    ds = p.get("datasource")
    expect(isinstance(ds, dict) and ds.get("uid") == ds_ref and ds.get("type") == "prometheus", f"panel {title!r}: datasource {ds!r}")
    expect("gridPos" in p, f"panel {title!r}: no gridPos")
    if p["type"] != "row":
        expect(p.get("targets"), f"panel {title!r}: no query")
    for t in p.get("targets", []):
        n_exprs += 1
        expect(t.get("datasource", {}).get("uid") == ds_ref, f"panel {title!r} {t.get('refId')}: target datasource")
        expr = t.get("expr", "")
        expect('instance=~"$instance"' in expr, f"panel {title!r}: not filtered by $instance")
        q = expr
        for k, v in subst.items():
            q = q.replace(k, v)
        if "$" in q:
            errors.append(f"panel {title!r}: unknown variable in {expr!r}")
            continue
        try:
            ast = pp.parse(q)
        except Exception as e:
            errors.append(f"panel {title!r}: PromQL does not parse: {e}: {expr!r}")
            continue
        selectors, by_labels = [], []
        def visit(n):
            if isinstance(n, pp.VectorSelector):
                selectors.append(n)
            elif isinstance(n, pp.AggregateExpr) and n.modifier is not None:
                by_labels.extend(n.modifier.labels)
        pp.walk(ast, visit)
        names = set()
        for s in selectors:
            names.add(s.name)
            if s.name not in METRICS:
                errors.append(f"panel {title!r}: unknown metric {s.name!r}")
                continue
            for m in s.matchers.matchers:
                if m.name not in METRICS[s.name] | {"instance", "job"}:
                    errors.append(f"panel {title!r}: {s.name} has no label {m.name!r}")
        have = set.union({"instance", "job"}, *(METRICS.get(n, set()) for n in names))
        for l in by_labels:
            if l not in have:
                errors.append(f"panel {title!r}: grouping by {l!r}, which {sorted(names)} do not carry")
        # Every memtrace_* word in the text, not only what the parser saw.
        for name in re.findall(r"\bmemtrace_[a-z_]+", expr):
            if name not in METRICS:
                errors.append(f"panel {title!r}: unknown metric {name!r}")
            used.add(name)
            if name.endswith("_total") and not re.search(r"\b(rate|irate|increase)\(\s*" + name + r"\b", expr):
                errors.append(f"panel {title!r}: counter {name} not under rate()/increase()")
for n in ("instance", "name"):
    for name in re.findall(r"\bmemtrace_[a-z_]+", var_query(n) or ""):
        expect(name in METRICS, f"variable {n}: unknown metric {name}")
unused = set(METRICS) - used
expect(not unused, f"metrics without a panel: {sorted(unused)}")
if errors:
    sys.exit("\n".join(errors))
print(f"{len(panels)} panels, {n_exprs} queries, {len(used)} of {len(METRICS)} metrics used, datasource {ds_ref}")
EOF

if [ -n "$PROMTOOL" ]; then
    # The real Prometheus parser: every query as a recording rule.
    "$PY" - "$DASH" >"$WORK/dashboard-rules.yml" <<'EOF'
import json, sys, yaml
d = json.load(open(sys.argv[1]))
subst = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m", "$instance": ".*", "$name": ".*"}
rules = []
for p in d["panels"] + [q for p in d["panels"] for q in p.get("panels", [])]:
    for t in p.get("targets", []):
        expr = t["expr"]
        for k, v in subst.items():
            expr = expr.replace(k, v)
        rules.append({"record": f"dashboard:panel_{p['id']}_{t['refId'].lower()}", "expr": expr})
yaml.safe_dump({"groups": [{"name": "memtrace-dashboard", "rules": rules}]}, sys.stdout, sort_keys=False)
EOF
    check "every dashboard query parses with Prometheus' own parser (promtool check rules)" \
        "$PROMTOOL" check rules "$WORK/dashboard-rules.yml"
else
    skip "promtool check rules: promtool not available"
fi

# ---------------------------------------------------------------- Prometheus
section "Prometheus: deploy/prometheus/scrape-configs.yml"
SCRAPE="$DEPLOY/prometheus/scrape-configs.yml"
if [ -n "$PROMTOOL" ]; then
    # Debian's Prometheus is built without Kubernetes service discovery, so
    # the kubernetes_sd_configs block is swapped for a static target here
    # (everything else, relabelling included, is checked by promtool) and
    # checked by the relabelling simulation below.
    "$PY" - "$SCRAPE" >"$WORK/scrape-configs.yml" <<'EOF'
import sys, yaml
d = yaml.safe_load(open(sys.argv[1]))
for job in d["scrape_configs"]:
    if "kubernetes_sd_configs" in job:
        job.pop("kubernetes_sd_configs")
        job["static_configs"] = [{"targets": ["127.0.0.1:9464"]}]
yaml.safe_dump(d, sys.stdout, sort_keys=False)
EOF
    check "promtool check config (kubernetes_sd_configs swapped for a static target)" \
        "$PROMTOOL" check config "$WORK/scrape-configs.yml"
else
    skip "promtool check config: promtool not available"
fi
check "Kubernetes job: SD block and relabelling, simulated on a DaemonSet pod's metadata" "$PY" - "$SCRAPE" "$K8S" <<'EOF'
import re, sys, yaml
d = yaml.safe_load(open(sys.argv[1]))
ds = next(x for x in yaml.safe_load_all(open(sys.argv[2])) if x["kind"] == "DaemonSet")
ann = ds["spec"]["template"]["metadata"]["annotations"]
jobs = {j["job_name"]: j for j in d["scrape_configs"]}
(job,) = [j for j in jobs.values() if "kubernetes_sd_configs" in j]
sd = job["kubernetes_sd_configs"][0]
errors = []
if sd.get("role") != "pod":
    errors.append("kubernetes_sd_configs role is not pod")
if ds["metadata"]["namespace"] not in sd.get("namespaces", {}).get("names", [ds["metadata"]["namespace"]]):
    errors.append("the DaemonSet's namespace is not discovered")

def meta(name):
    return "__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)

def relabel(labels, rules):
    """Prometheus' keep/drop/replace, regexes anchored, $N in replacements."""
    for r in rules:
        action = r.get("action", "replace")
        value = r.get("separator", ";").join(labels.get(l, "") for l in r.get("source_labels", []))
        m = re.fullmatch(r.get("regex", "(.*)"), value)
        if action == "keep" and not m or action == "drop" and m:
            return None
        if action == "replace" and m:
            rep = re.sub(r"\$\{?(\d+)\}?", lambda g: m.group(int(g[1])) or "", r.get("replacement", "$1"))
            if rep:
                labels[r["target_label"]] = rep
            else:
                labels.pop(r["target_label"], None)
        elif action not in ("keep", "drop", "replace"):
            raise AssertionError(f"simulation does not know action {action}")
    return labels

pod = {"__address__": "10.1.2.3", "__metrics_path__": "/metrics", "__scheme__": "http",
       "__meta_kubernetes_pod_node_name": "node-a", "__meta_kubernetes_pod_name": "memtrace-x7k2p"}
pod.update({meta(k): v for k, v in ann.items()})
got = relabel(dict(pod), job["relabel_configs"])
want = {"__address__": "10.1.2.3:9464", "__metrics_path__": "/metrics", "instance": "node-a", "pod": "memtrace-x7k2p"}
if got is None:
    errors.append("the DaemonSet's pod is dropped")
else:
    for k, v in want.items():
        if got.get(k) != v:
            errors.append(f"{k} = {got.get(k)!r}, expected {v!r}")
# A container port already in __address__ is replaced by the annotation's.
got2 = relabel(dict(pod, __address__="10.1.2.3:8080"), job["relabel_configs"])
if not got2 or got2["__address__"] != "10.1.2.3:9464":
    errors.append(f"address with a port: {got2 and got2['__address__']!r}")
# A pod without the scrape annotation is not scraped.
if relabel({k: v for k, v in pod.items() if k != meta("prometheus.io/scrape")}, job["relabel_configs"]) is not None:
    errors.append("a pod without prometheus.io/scrape is kept")
if errors:
    sys.exit("\n".join(errors))
print(f"pod 10.1.2.3 on node-a -> {got['__address__']}{got['__metrics_path__']}, instance={got['instance']}")
EOF

# ---------------------------------------------------------------- live
if [ "$LIVE" -eq 1 ]; then
    section "Live: the agent on a test server, scraped by Prometheus, every dashboard query"
    live() {
        if [ "$(id -u)" -ne 0 ]; then echo "needs root (the agent loads eBPF programs)"; return 1; fi
        if [ -z "$BIN" ] || [ ! -x "$BIN" ]; then echo "needs a built agent (MEMTRACE_BIN or cargo xtask build)"; return 1; fi
        if [ -z "$PROMETHEUS" ]; then echo "needs prometheus"; return 1; fi
        # check() runs this in a subshell: stop what it starts when it ends,
        # however it ends.
        trap stop_started EXIT
        local ports wport aport pport
        ports="$("$PY" -c 'import socket
ss = [socket.socket() for _ in range(3)]
for s in ss: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))')"
        read -r wport aport pport <<<"$ports"
        # A small sync HTTP server to trace (accept() to close() = one request).
        (cd "$WORK" && exec "$PY" -m http.server --bind 127.0.0.1 "$wport" >"$WORK/server.log" 2>&1) &
        local wpid=$!
        STARTED+=("$wpid")
        # The agent, configured by the env example (as systemd would) plus
        # flags, in an emulation of the unit's sandbox: the unit's
        # CapabilityBoundingSet and NoNewPrivileges (setpriv), and in a private
        # mount namespace (unshare) every mount read-only but /proc, /sys and
        # /dev (ProtectSystem=strict, ProtectHome=read-only), /sys/fs/cgroup
        # read-only (ProtectControlGroups), fresh /tmp and /var/tmp
        # (PrivateTmp), no kernel log (ProtectKernelLogs) or modules
        # (ProtectKernelModules), LimitMEMLOCK and UMask. The seccomp-based
        # settings are not emulated.
        local -a envs=()
        while IFS= read -r line; do
            case "$line" in '#'* | '') continue ;; esac
            envs+=("$line")
        done <"$ENVF"
        local caps
        caps="$(sed -n 's/^CapabilityBoundingSet=//p' "$UNIT" | tr ' ' '\n' | sed '/^$/d; s/^CAP_//' | tr 'A-Z' 'a-z' | sed 's/^/+/' | paste -sd, -)"
        grep -q '^NoNewPrivileges=yes' "$UNIT" || { echo "the unit lost NoNewPrivileges=yes: update this emulation"; return 1; }
        echo "sandbox: bounding set $caps, no_new_privs"
        local sandbox='
bin=$1 caps=$2
shift 2
awk "{print \$2}" /proc/self/mounts | sort -u | while read -r m; do
    case "$m" in /proc | /proc/* | /sys | /sys/* | /dev | /dev/*) continue ;; esac
    mount -o remount,bind,ro "$m" 2>/dev/null || echo "sandbox: cannot make $m read-only" >&2
done
if mountpoint -q /sys/fs/cgroup; then mount -o remount,bind,ro /sys/fs/cgroup || true; fi
case "$bin" in /tmp/* | /var/tmp/*) echo "sandbox: binary under /tmp: PrivateTmp not emulated" >&2 ;;
    *) mount -t tmpfs -o mode=1777 tmpfs /tmp && mount -t tmpfs -o mode=1777 tmpfs /var/tmp ;; esac
for p in /proc/kmsg /dev/kmsg; do if [ -e "$p" ]; then mount --bind /dev/null "$p" || true; fi; done
for d in /usr/lib/modules /lib/modules; do if [ -d "$d" ]; then mount -t tmpfs -o mode=000 tmpfs "$d" || true; fi; done
if touch /.memtrace-sandbox-probe 2>/dev/null; then rm -f /.memtrace-sandbox-probe; echo "sandbox: / is writable" >&2; exit 97; fi
ulimit -l unlimited 2>/dev/null || echo "sandbox: LimitMEMLOCK=infinity not emulated (cannot raise the hard limit here), memlock $(ulimit -l)" >&2
umask 0077
exec setpriv --bounding-set "-all,$caps" --nnp -- "$bin" "$@"
'
        (cd "$WORK" && exec env -i PATH="$PATH" "${envs[@]}" unshare --mount --propagation private -- \
            sh -c "$sandbox" sandbox "$BIN" "$caps" agent --pid "$wpid" --request-mode accept \
            --listen "127.0.0.1:$aport" --log-format json --summary-interval-secs 0 \
            --leak-sample-interval-secs 1 --mmap-counters >"$WORK/agent.log" 2>&1) &
        local apid=$!
        STARTED+=("$apid")
        # Prometheus with the memtrace job of scrape-configs.yml, aimed at it.
        "$PY" - "$SCRAPE" "127.0.0.1:$aport" >"$WORK/prometheus.yml" <<'EOF'
import sys, yaml
d = yaml.safe_load(open(sys.argv[1]))
job = next(j for j in d["scrape_configs"] if j["job_name"] == "memtrace")
job.pop("file_sd_configs", None)
job["static_configs"] = [{"targets": [sys.argv[2]]}]
yaml.safe_dump({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": [job]}, sys.stdout)
EOF
        "$PROMETHEUS" --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
            --web.listen-address="127.0.0.1:$pport" --log.level=warn >"$WORK/prometheus.log" 2>&1 &
        local ppid_=$!
        STARTED+=("$ppid_")
        local rc=0
        "$PY" - "$DASH" "$wport" "$aport" "$pport" "$apid" <<'EOF' || rc=$?
import json, sys, time, urllib.parse, urllib.request
from memtrace_settings import METRICS
dash, wport, aport, pport = sys.argv[1:5]
def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()
def prom(path, **params):
    return json.loads(get(f"http://127.0.0.1:{pport}{path}?" + urllib.parse.urlencode(params, doseq=True)))
def wait(what, cond, secs=60):
    end = time.time() + secs
    while time.time() < end:
        try:
            if cond():
                return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"timed out waiting for {what}")
wait("the agent's /healthz", lambda: json.loads(get(f"http://127.0.0.1:{aport}/healthz"))["status"] == "ok")
wait("Prometheus", lambda: get(f"http://127.0.0.1:{pport}/-/ready") is not None)
# Bounded traffic: 150 requests over about 10 s, to 127.0.0.1 only.
for i in range(150):
    get(f"http://127.0.0.1:{wport}/")
    time.sleep(0.06)
wait("15 successful scrapes", lambda: float(prom("/api/v1/query", query='sum_over_time(up{job="memtrace"}[1m])')["data"]["result"][0]["value"][1]) >= 15)
errors = []
# Every series the dashboard knows is exported (the leak slopes and the
# forecast appear only once a worker has a trend).
optional = {"memtrace_worker_leak_slope_bytes_per_request", "memtrace_worker_leak_slope_bytes_per_hour",
            "memtrace_worker_forecast_seconds_to_limit"}
names = set(prom("/api/v1/label/__name__/values", **{"match[]": '{job="memtrace"}'})["data"])
exported = {n for n in names if n.startswith("memtrace_")}
missing = set(METRICS) - exported - optional
extra = exported - set(METRICS)
if missing:
    errors.append(f"series the dashboard uses that Prometheus did not get: {sorted(missing)}")
print(f"scraped {len(exported)} memtrace series names" + (f"; not on the dashboard: {sorted(extra)}" if extra else ""))
d = json.load(open(dash))
for name, q in (("instance", "memtrace_workers"), ("name", "memtrace_worker_rss_bytes")):
    vals = prom(f"/api/v1/label/{name}/values", **{"match[]": q})["data"]
    print(f"variable {name}: {vals}")
    if not vals:
        errors.append(f"variable {name}: no values")
subst = {"$__rate_interval": "30s", "$__range": "1m", "$__interval": "1s", "$instance": ".*", "$name": ".*"}
for p in d["panels"] + [q for p in d["panels"] for q in p.get("panels", [])]:
    for t in p.get("targets", []):
        expr = t["expr"]
        for k, v in subst.items():
            expr = expr.replace(k, v)
        r = prom("/api/v1/query", query=expr)
        if r.get("status") != "success":
            errors.append(f"{p['title']!r}: {r.get('error')}")
            continue
        res = r["data"]["result"]
        may_be_empty = any(op in expr for op in (" > 0", " == 1")) or any(m in expr for m in optional)
        sample = ", ".join(f"{s['metric'].get('name', s['metric'].get('type', s['metric'].get('outcome', '')))}={float(s['value'][1]):.4g}" for s in res[:3])
        print(f"{len(res):3d} series  {p['title']}: {sample}")
        if not res and not may_be_empty:
            errors.append(f"{p['title']!r}: no data: {expr}")
status = open(f"/proc/{sys.argv[5]}/status").read()
print("agent " + ", ".join(l.replace("\t", " ") for l in status.splitlines() if l.startswith(("CapBnd", "CapEff", "NoNewPrivs"))))
reqs = prom("/api/v1/query", query="sum(memtrace_worker_requests_total)")["data"]["result"]
print(f"requests counted by the agent: {reqs and reqs[0]['value'][1]} (150 sent)")
if errors:
    sys.exit("\n".join(errors))
EOF
        # SIGTERM, as systemd and the kubelet stop it: a clean exit in time.
        kill -TERM "$apid"
        local waited=0
        while kill -0 "$apid" 2>/dev/null && [ "$waited" -lt 150 ]; do sleep 0.1; waited=$((waited + 1)); done
        if kill -0 "$apid" 2>/dev/null; then echo "agent still running 15 s after SIGTERM"; rc=1; fi
        local arc=0
        wait "$apid" || arc=$?
        echo "agent exited $arc after SIGTERM ($((waited / 10)).$((waited % 10)) s): $(grep -o '"message":"[^"]*stopped[^"]*"' "$WORK/agent.log" | tail -n1)"
        [ "$arc" -eq 0 ] || rc=1
        grep '^sandbox:' "$WORK/agent.log" || true
        if [ "$rc" -ne 0 ]; then
            echo "--- agent log (tail)"; tail -n 5 "$WORK/agent.log"
            echo "--- prometheus log (tail)"; tail -n 5 "$WORK/prometheus.log"
        fi
        return "$rc"
    }
    check "sandboxed agent + Prometheus: every dashboard query answers, SIGTERM stops the agent cleanly" live
fi

# ---------------------------------------------------------------- summary
printf '\ndeploy validation: %d passed, %d failed, %d skipped\n' "$passed" "$failed" "$skipped"
[ "$failed" -eq 0 ]
