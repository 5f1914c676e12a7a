//! `memtrace status|snapshot|diff|stop|requests`: a client of the agent's
//! API that prints tables people read at 3 a.m., or the JSON as is.
use std::time::Duration;

use serde_json::Value;

/// Where the agent listens unless told otherwise.
pub const DEFAULT_URL: &str = "http://127.0.0.1:9464";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the agent at {url}: {message} (is `memtrace agent` running, with --listen on that address?)"
    )]
    Unreachable { url: String, message: String },
    #[error(
        "the agent refused the request (403): set MEMTRACE_DEBUG_TOKEN to the agent's token (an agent without one serves no debug endpoints)"
    )]
    Forbidden,
    #[error("the agent answered {status}: {message}")]
    Api { status: u16, message: String },
    #[error("the agent's answer is not JSON: {0}")]
    BadAnswer(String),
}

/// A blocking client of one agent.
pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

impl Client {
    pub fn new(url: &str, token: Option<String>) -> Self {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            .build();
        Self {
            agent: config.into(),
            base: url.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
        }
    }

    /// The agent's base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// GETs a path and returns the body as bytes (profiles); API errors
    /// (JSON bodies) become ClientError.
    pub fn get_bytes(&self, path_and_query: &str) -> Result<Vec<u8>, ClientError> {
        let url = format!("{}{}", self.base, path_and_query);
        let mut req = self.agent.get(&url);
        if let Some(t) = &self.token {
            req = req.header("X-Debug-Token", t);
        }
        let mut resp = req.call().map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            message: e.to_string(),
        })?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        if status == 403 {
            return Err(ClientError::Forbidden);
        }
        if status >= 400 {
            let message = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
            return Err(ClientError::Api { status, message });
        }
        Ok(body)
    }

    /// `snapshot` or `diff` rendered by the agent (`pprof`, `folded`, `svg`).
    pub fn debug_profile(
        &self,
        action: &str,
        pid: Option<u32>,
        format: &str,
        sites: &str,
    ) -> Result<Vec<u8>, ClientError> {
        let mut q = format!("/debug/memory/?action={action}&format={format}{sites}");
        if let Some(p) = pid {
            q.push_str(&format!("&pid={p}"));
        }
        self.get_bytes(&q)
    }

    /// GETs a path and returns the JSON body; API errors become ClientError.
    pub fn get(&self, path_and_query: &str) -> Result<Value, ClientError> {
        let url = format!("{}{}", self.base, path_and_query);
        let mut req = self.agent.get(&url);
        if let Some(t) = &self.token {
            req = req.header("X-Debug-Token", t);
        }
        let mut resp = req.call().map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            message: e.to_string(),
        })?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        if status == 403 {
            return Err(ClientError::Forbidden);
        }
        let body: Value = serde_json::from_str(&text)
            .map_err(|_| ClientError::BadAnswer(text.chars().take(200).collect()))?;
        if status >= 400 {
            let message = body["error"].as_str().unwrap_or("no message").to_string();
            return Err(ClientError::Api { status, message });
        }
        Ok(body)
    }

    /// `snapshot` or `diff` as JSON, with the site options' query
    /// (`&view=...`).
    pub fn debug_sites(
        &self,
        action: &str,
        pid: Option<u32>,
        limit: usize,
        sites: &str,
    ) -> Result<Value, ClientError> {
        let mut q = format!("/debug/memory/?action={action}&limit={limit}{sites}");
        if let Some(p) = pid {
            q.push_str(&format!("&pid={p}"));
        }
        self.get(&q)
    }

    pub fn debug(
        &self,
        action: &str,
        pid: Option<u32>,
        limit: Option<usize>,
    ) -> Result<Value, ClientError> {
        let mut q = format!("/debug/memory/?action={action}");
        if let Some(p) = pid {
            q.push_str(&format!("&pid={p}"));
        }
        if let Some(l) = limit {
            q.push_str(&format!("&limit={l}"));
        }
        self.get(&q)
    }
}

fn mb(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".into(), |b| format!("{:.1}", b / (1024.0 * 1024.0)))
}

fn num(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        _ => "-".into(),
    }
}

fn float(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map_or_else(|| "-".into(), |f| format!("{f:.digits$}"))
}

/// Human form of a duration in seconds: 45s, 12m, 3.5h.
pub fn human_secs(v: &Value) -> String {
    let Some(s) = v.as_f64() else {
        return "-".into();
    };
    if s < 120.0 {
        format!("{s:.0}s")
    } else if s < 7200.0 {
        format!("{:.0}m", s / 60.0)
    } else {
        format!("{:.1}h", s / 3600.0)
    }
}

/// Lays out rows under a header, each column as wide as its widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            out.push_str(&format!("{cell:<w$}"));
        }
        out.trim_end().to_string()
    };
    let mut out = line(header.iter().map(|s| s.to_string()).collect());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.clone()));
        out.push('\n');
    }
    out
}

/// "off", or the tier on, with its sampling and what did not fit.
fn collection_state(agent: &Value) -> String {
    if agent["collection_active"] != true {
        return "off".into();
    }
    let tier = agent["collect_tier"].as_str().unwrap_or("?");
    if tier != "heap" {
        return format!("on ({tier} tier)");
    }
    let sampling = match agent["heap_sample_bytes"].as_u64() {
        Some(0 | 1) => "every allocation".to_string(),
        Some(b) if b % 1024 == 0 => format!("1 per {} KiB", b / 1024),
        Some(b) => format!("1 per {b} bytes"),
        None => "?".into(),
    };
    let dropped = agent["kernel"]["live_allocs_dropped"].as_u64().unwrap_or(0);
    if dropped > 0 {
        format!("on (heap tier, {sampling}; {dropped} sampled blocks dropped: live-block cap full)")
    } else {
        format!("on (heap tier, {sampling})")
    }
}

/// `memtrace status`
pub fn render_status(body: &Value) -> String {
    let agent = &body["agent"];
    let mut out = format!(
        "memtrace {} (pid {}), up {}, tracing {}: {} live, {} exited; events {}, drops {}, collection {}\n\n",
        agent["version"].as_str().unwrap_or("?"),
        num(&agent["pid"]),
        human_secs(&agent["uptime_secs"]),
        agent["selectors"].as_str().unwrap_or("?"),
        num(&agent["workers_alive"]),
        num(&agent["workers_exited"]),
        num(&agent["events_received"]),
        num(&agent["kernel"]["ringbuf_drops"]),
        collection_state(agent),
    );
    // What this kernel cannot serve, before the table (`memtrace check`).
    if let Some(off) = agent["kernel_unavailable"]
        .as_array()
        .filter(|o| !o.is_empty())
    {
        for line in off.iter().filter_map(Value::as_str) {
            out += &format!(
                "kernel {}: {line}\n",
                agent["kernel_release"].as_str().unwrap_or("?")
            );
        }
        out.push('\n');
    }
    let workers = body["workers"].as_array().cloned().unwrap_or_default();
    // Where each worker runs, shown only when some run in a container.
    let place = |w: &Value| {
        let p = &w["placement"];
        match (p["pod_namespace"].as_str(), p["pod_name"].as_str()) {
            (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
            _ => p["pod_uid"]
                .as_str()
                .map(|u| format!("pod {}", &u[..u.len().min(8)]))
                .or_else(|| {
                    p["container_id"]
                        .as_str()
                        .map(|c| c[..c.len().min(12)].to_string())
                })
                .unwrap_or_else(|| "-".into()),
        }
    };
    let with_place = workers.iter().any(|w| place(w) != "-");
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            let d = &w["leak_detector"];
            let mut row = vec![
                num(&w["pid"]),
                num(&w["ppid"]),
                w["role"].as_str().unwrap_or("-").into(),
                w["name"].as_str().unwrap_or("-").into(),
            ];
            if with_place {
                row.push(place(w));
            }
            row.extend([
                mb(&w["rss_bytes"]),
                mb(&w["rss"]["anon"]),
                mb(&w["rss"]["file"]),
                mb(&w["pss_bytes"]),
                mb(&w["uss_bytes"]),
                num(&w["requests_seen"]),
                num(&w["requests_in_flight"]),
                float(&d["robust_slope"], 3),
                human_secs(&d["forecast_seconds_to_limit"]),
                // What the soft limit did, when it acted.
                match w["soft_limit"]["state"].as_str() {
                    Some(state) => state.to_string(),
                    None if d["soft_limit_fired"] == true => "yes".into(),
                    None => "no".into(),
                },
                // Processes it started and left running, and their memory.
                match w["children"]["count"].as_u64() {
                    Some(n) if n > 0 => format!("{n} ({} MB)", mb(&w["children"]["rss_bytes"])),
                    _ => "-".into(),
                },
            ]);
            row
        })
        .collect();
    let mut header = vec!["PID", "PPID", "ROLE", "NAME"];
    if with_place {
        header.push("POD/CONTAINER");
    }
    header.extend([
        "RSS_MB",
        "ANON_MB",
        "FILE_MB",
        "PSS_MB",
        "USS_MB",
        "REQS",
        "INFL",
        "SLOPE_MB/REQ",
        "TO_LIMIT",
        "LIMIT_HIT",
        "CHILDREN",
    ]);
    out.push_str(&table(&header, &rows));
    // Processes the workers left running, by name; orphans of dead ones.
    for w in &workers {
        let c = &w["children"];
        if let Some(names) = c["names"].as_object().filter(|n| !n.is_empty()) {
            let names: Vec<String> = names.iter().map(|(k, v)| format!("{v} {k}")).collect();
            out.push_str(&format!(
                "\nworker {} runs {} processes: {} ({} MB, oldest {})\n",
                num(&w["pid"]),
                num(&c["count"]),
                names.join(", "),
                mb(&c["rss_bytes"]),
                human_secs(&c["oldest_age_secs"]),
            ));
        }
    }
    if agent["orphans_total"].as_u64().unwrap_or(0) > 0 {
        out.push_str(&format!(
            "\n{} orphans: processes dead workers left running\n",
            num(&agent["orphans_total"])
        ));
    }
    // The endpoint that carries a detected leak (socket mode, HTTP).
    for w in &workers {
        let r = &w["leak_route"];
        if let Some(route) = r["route"].as_str() {
            out.push_str(&format!(
                "\nworker {} leaks in {route}: {} kept per request\n",
                num(&w["pid"]),
                kib(&r["kept_per_request"]["bytes"]),
            ));
        }
    }
    out
}

/// Bytes as KiB with a sign, for per-request figures.
fn kib(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".into(), |b| format!("{:+.1} KiB", b / 1024.0))
}

/// `memtrace routes PID`
pub fn render_routes(body: &Value) -> String {
    let routes = &body["routes"];
    let rows: Vec<Vec<String>> = routes["routes"]
        .as_array()
        .map(|v| {
            v.iter()
                .map(|r| {
                    vec![
                        r["route"].as_str().unwrap_or("?").into(),
                        num(&r["requests"]),
                        kib(&r["kept_per_request"]["bytes"]),
                        kib(&r["mean_delta_bytes"]),
                        kib(&r["median_delta_bytes"]),
                        format!("{:.0}%", r["grew_share"].as_f64().unwrap_or(0.0) * 100.0),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = table(
        &["ROUTE", "REQS", "KEPT/REQ", "MEAN", "MEDIAN", "GREW"],
        &rows,
    );
    let overflowed = routes["overflowed_requests"].as_u64().unwrap_or(0);
    if overflowed > 0 {
        out.push_str(&format!(
            "\n{overflowed} requests counted under \"other\": the worker has {} routes (--max-routes)\n",
            num(&routes["max_routes"])
        ));
    }
    let without = routes["requests_without_path"].as_u64().unwrap_or(0);
    if without > 0 {
        out.push_str(&format!(
            "{without} requests without an HTTP/1.x path (other protocols, TLS, --no-http-paths, or not socket mode)\n"
        ));
    }
    out
}

fn render_sites(title: &str, sites: &Value, bytes_key: &str) -> String {
    let rows: Vec<Vec<String>> = sites
        .as_array()
        .map(|v| {
            v.iter()
                .map(|s| {
                    let mut place = match (s["location"].as_str(), s["module"].as_str()) {
                        (Some(l), _) => l.to_string(),
                        (None, Some(m)) => m.rsplit('/').next().unwrap_or(m).to_string(),
                        _ => "?".into(),
                    };
                    if let Some(via) = s["via"].as_str() {
                        place.push_str(&format!("  via {via}"));
                    }
                    // An unresolved frame says why.
                    let unresolved = s["stack"][0]
                        .as_str()
                        .filter(|f| f.ends_with(')') && f.starts_with("0x"))
                        .and_then(|f| f.rfind(" (").map(|at| format!(" {}", &f[at..])))
                        .unwrap_or_default();
                    let stopped = if s["stopped"] == true {
                        " (stopped growing)"
                    } else {
                        ""
                    };
                    let caller = s["caller"]
                        .as_str()
                        .map(|c| format!(" <- {c}"))
                        .unwrap_or_default();
                    // Diffs: count growth, as tracemalloc's count_diff.
                    let count = if bytes_key == "growth_bytes" {
                        format!("{:+}", s["growth_objects"].as_i64().unwrap_or(0))
                    } else {
                        num(&s["objects"])
                    };
                    vec![
                        mb(&s[bytes_key]),
                        count,
                        num(&s["samples"]),
                        format!("{}{caller}{stopped}", s["function"].as_str().unwrap_or("?")),
                        format!("{place}{unresolved}"),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    if rows.is_empty() {
        return format!("{title}: none yet\n");
    }
    format!(
        "{title}\n{}",
        table(&["MB", "COUNT", "SAMPLES", "FUNCTION", "WHERE"], &rows)
    )
}

fn render_mappings(title: &str, maps: &Value, key: &str) -> String {
    let rows: Vec<Vec<String>> = maps
        .as_array()
        .map(|v| {
            v.iter()
                .map(|m| vec![mb(&m[key]), m["name"].as_str().unwrap_or("?").to_string()])
                .collect()
        })
        .unwrap_or_default();
    format!("{title}\n{}", table(&["MB", "MAPPING"], &rows))
}

/// `memtrace snapshot`
pub fn render_snapshot(body: &Value) -> String {
    format!(
        "collection on for pids {}; this snapshot is the baseline for `memtrace diff`\n{}\n\n{}\n{}\n{}\n{}",
        body["pids"],
        view_line(body),
        render_sites(
            "Live heap by allocating stack",
            &body["top_allocations"],
            "bytes"
        ),
        render_sites("Pages first touched", &body["top_page_faults"], "bytes"),
        render_sites("mmap/brk calls", &body["top_mapping_calls"], "bytes"),
        render_mappings("Resident memory by mapping", &body["mappings"], "rss_bytes"),
    )
}

/// The view and the Python frames left unresolved, for the header.
fn view_line(body: &Value) -> String {
    let mut line = format!(
        "Python sites by {}",
        match body["view"].as_str() {
            Some("lineno") => "innermost line (tracemalloc's lineno)",
            Some("traceback") => "whole stack (tracemalloc's traceback)",
            _ => "the application's innermost frame (--view app)",
        }
    );
    if body["still_growing"] == true {
        line.push_str("; sites that stopped growing left out");
    }
    let unresolved = body["unresolved"]["frames"].as_u64().unwrap_or(0);
    if unresolved > 0 {
        let why: Vec<String> = body["unresolved"]["by_reason"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{v} {}", k.replace('_', " ")))
                    .collect()
            })
            .unwrap_or_default();
        line.push_str(&format!(
            "; {unresolved} Python frames unresolved ({})",
            why.join(", ")
        ));
    }
    line
}

/// `memtrace diff`
pub fn render_diff(body: &Value) -> String {
    let secs =
        body["taken_unix"].as_f64().unwrap_or(0.0) - body["since_unix"].as_f64().unwrap_or(0.0);
    format!(
        "growth over {secs:.0}s for pids {}\n{}\n\n{}\n{}\n{}\n{}",
        body["pids"],
        view_line(body),
        render_sites(
            "Live heap growth by allocating stack",
            &body["growth"],
            "growth_bytes"
        ),
        render_sites("Pages first touched", &body["fault_growth"], "growth_bytes"),
        render_sites(
            "mmap/brk calls",
            &body["mapping_call_growth"],
            "growth_bytes"
        ),
        render_mappings("Growth by mapping", &body["mappings"], "growth_bytes"),
    )
}

/// `memtrace requests PID`
pub fn render_requests(body: &Value) -> String {
    let rows: Vec<Vec<String>> = body["requests"]
        .as_array()
        .map(|v| {
            v.iter()
                .map(|r| {
                    vec![
                        r["request_id"].as_str().unwrap_or("?").into(),
                        r["route"].as_str().unwrap_or("-").into(),
                        float(&r["duration_ms"], 2),
                        mb(&r["rss_after_bytes"]),
                        format!(
                            "{:+.2}",
                            r["delta_bytes"].as_f64().unwrap_or(0.0) / (1024.0 * 1024.0)
                        ),
                        num(&r["faults"]),
                        mb(&r["mmap_bytes"]),
                        mb(&r["brk_grow_bytes"]),
                        // Processes it started and left running.
                        match r["children_delta"].as_i64() {
                            Some(0) | None => "-".into(),
                            Some(n) => format!("{n:+} ({} MB)", mb(&r["children_rss_delta_bytes"])),
                        },
                        // Descriptors it left open; "?" when not counted.
                        match r["fd_delta"].as_i64() {
                            Some(0) => "-".into(),
                            Some(n) => format!("{n:+}"),
                            None => "?".into(),
                        },
                        // Objects gc.garbage gained, and collections run.
                        match (
                            r["gc_uncollectable_delta"].as_i64(),
                            r["gc_collections_delta"].as_i64(),
                        ) {
                            (Some(0), Some(0)) => "-".into(),
                            (Some(u), Some(c)) => format!("{u:+}/{c}"),
                            _ => "?".into(),
                        },
                        r["level"].as_str().unwrap_or("-").into(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &[
            "REQUEST",
            "ROUTE",
            "MS",
            "RSS_MB",
            "DELTA_MB",
            "FAULTS",
            "MMAP_MB",
            "BRK_MB",
            "CHILDREN",
            "FDS",
            "GC_UNCOLL/RUNS",
            "LEVEL",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn requests_name_the_children_they_left() {
        let body = json!({"requests": [
            {"request_id": "7-1", "route": "GET /render", "duration_ms": 25.0,
             "rss_after_bytes": 1048576, "delta_bytes": 0, "faults": 3,
             "children_delta": 1, "children_rss_delta_bytes": 20971520, "fd_delta": 1,
             "gc_uncollectable_delta": 2, "gc_collections_delta": 1, "level": "normal"},
            {"request_id": "7-2", "route": "GET /ok", "duration_ms": 1.0,
             "rss_after_bytes": 1048576, "delta_bytes": 0, "faults": 0,
             "children_delta": 0, "children_rss_delta_bytes": 0, "fd_delta": null,
             "gc_uncollectable_delta": 0, "gc_collections_delta": 0, "level": "normal"}]});
        let out = render_requests(&body);
        assert!(out.contains("CHILDREN"), "{out}");
        assert!(out.contains("+1 (20.0 MB)"), "{out}");
        let render = out.lines().find(|l| l.starts_with("7-1")).unwrap();
        assert!(
            render.contains(" +1 ") && render.contains(" +2/1 "),
            "{out}"
        );
        let ok = out.lines().find(|l| l.starts_with("7-2")).unwrap();
        assert!(ok.contains(" ? "), "not counted is not 0: {out}");
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "LONGER"], &[vec!["wide-cell".into(), "x".into()]]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "A          LONGER");
        assert_eq!(lines[1], "wide-cell  x");
    }

    #[test]
    fn status_table_shows_pods_and_recycles_when_there_are_some() {
        let body = json!({
            "agent": {"version": "0.1.0", "pid": 1, "uptime_secs": 5.0, "selectors": "name=gunicorn",
                      "workers_alive": 1, "workers_exited": 0, "events_received": 1,
                      "kernel": {"ringbuf_drops": 0}, "collection_active": false},
            "workers": [
                {"pid": 11, "ppid": 10, "role": "worker", "name": "gunicorn", "rss_bytes": 1048576,
                 "rss": {"anon": 0, "file": 0}, "requests_seen": 0, "requests_in_flight": 0,
                 "leak_detector": {"soft_limit_fired": true},
                 "soft_limit": {"state": "replaced", "signal": "SIGTERM"},
                 "placement": {"cgroup": "/kubepods.slice/x", "pod_name": "shop-1", "pod_namespace": "prod"}}
            ]
        });
        let out = render_status(&body);
        assert!(
            out.lines()
                .next_back()
                .is_some_and(|l| l.contains("prod/shop-1") && l.contains("replaced")),
            "{out}"
        );
        assert!(out.contains("POD/CONTAINER"), "{out}");
        // Without containers, no such column.
        let mut plain = body.clone();
        plain["workers"][0]["placement"] = json!({"cgroup": "/user.slice"});
        assert!(!render_status(&plain).contains("POD/CONTAINER"));
    }

    #[test]
    fn status_names_what_the_kernel_cannot_serve() {
        let body = json!({
            "agent": {"version": "0.1.0", "pid": 1, "uptime_secs": 5.0, "selectors": "name=srv",
                      "workers_alive": 0, "workers_exited": 0, "events_received": 0,
                      "kernel": {"ringbuf_drops": 0}, "collection_active": false,
                      "kernel_release": "5.10.0-46-amd64",
                      "kernel_unavailable": ["HTTP path capture is off: needs 5.15"]},
            "workers": []
        });
        let out = render_status(&body);
        assert_eq!(
            out.lines().nth(2),
            Some("kernel 5.10.0-46-amd64: HTTP path capture is off: needs 5.15"),
            "{out}"
        );
        let mut none = body.clone();
        none["agent"]["kernel_unavailable"] = json!([]);
        assert!(!render_status(&none).contains("kernel 5.10"));
    }

    #[test]
    fn status_table_has_a_row_per_worker() {
        let body = json!({
            "agent": {"version": "0.1.0", "pid": 1, "uptime_secs": 65.0, "selectors": "name=srv",
                      "workers_alive": 2, "workers_exited": 0, "events_received": 10,
                      "kernel": {"ringbuf_drops": 0}, "collection_active": false},
            "workers": [
                {"pid": 10, "ppid": 1, "role": "master", "name": "srv", "rss_bytes": 1048576,
                 "rss": {"anon": 524288, "file": 524288}, "requests_seen": 0, "requests_in_flight": 0,
                 "leak_detector": {"robust_slope": null, "soft_limit_fired": false}},
                {"pid": 11, "ppid": 10, "role": "worker", "name": "srv", "rss_bytes": 10485760,
                 "rss": {"anon": 9437184, "file": 1048576}, "pss_bytes": 5242880, "uss_bytes": 4194304,
                 "requests_seen": 42, "requests_in_flight": 1,
                 "leak_detector": {"robust_slope": 0.5, "forecast_seconds_to_limit": 30.0, "soft_limit_fired": true}}
            ]
        });
        let out = render_status(&body);
        assert!(out.contains("up 65s"), "{out}");
        let row = out.lines().find(|l| l.starts_with("11")).unwrap();
        for cell in [
            "worker", "10.0", "9.0", "5.0", "4.0", "42", "0.500", "30s", "yes",
        ] {
            assert!(row.contains(cell), "{cell} missing in {row}");
        }
    }

    #[test]
    fn status_names_the_collection_tier_and_dropped_samples() {
        let agent = |v: Value| json!({"agent": v, "workers": []});
        let line = |v: Value| render_status(&agent(v)).lines().next().unwrap().to_string();
        assert!(line(json!({"collection_active": false})).ends_with("collection off"));
        assert!(
            line(json!({"collection_active": true, "collect_tier": "growth"}))
                .ends_with("collection on (growth tier)")
        );
        let heap = line(json!({"collection_active": true, "collect_tier": "heap",
            "heap_sample_bytes": 524288, "kernel": {"live_allocs_dropped": 0}}));
        assert!(
            heap.ends_with("collection on (heap tier, 1 per 512 KiB)"),
            "{heap}"
        );
        let full = line(json!({"collection_active": true, "collect_tier": "heap",
            "heap_sample_bytes": 1, "kernel": {"live_allocs_dropped": 7}}));
        assert!(
            full.contains("every allocation; 7 sampled blocks dropped"),
            "{full}"
        );
    }

    #[test]
    fn diff_lists_growth() {
        let body = json!({"since_unix": 100.0, "taken_unix": 160.0, "pids": [11],
            "growth": [{"function": "leak_memory", "location": "handler.c:20", "growth_bytes": 13107200, "growth_objects": 200, "samples": 200}],
            "fault_growth": [], "mapping_call_growth": [],
            "mappings": [{"name": "[heap]", "growth_bytes": 13107200}]});
        let out = render_diff(&body);
        assert!(out.contains("growth over 60s"));
        assert!(
            out.contains("12.5") && out.contains("leak_memory") && out.contains("handler.c:20"),
            "{out}"
        );
        assert!(out.contains("+200"), "count growth: {out}");
        assert!(out.contains("[heap]"));
    }

    #[test]
    fn diff_names_the_app_line_via_the_library_and_marks_stopped_sites() {
        let body = json!({"since_unix": 100.0, "taken_unix": 160.0, "pids": [11],
            "view": "app", "still_growing": false,
            "unresolved": {"frames": 2, "by_reason": {"code_freed": 2}},
            "growth": [
                {"function": "quote", "location": "/srv/shop/views.py:42",
                 "via": "json/encoder.py:258 iterencode", "growth_bytes": 1048576,
                 "growth_objects": 10, "samples": 10, "stopped": false,
                 "stack": ["/usr/lib/python3.11/json/encoder.py:258 iterencode"]},
                {"function": "warm", "location": "/srv/shop/cache.py:9",
                 "growth_bytes": 0, "growth_objects": 0, "samples": 3, "stopped": true,
                 "stack": ["0x24d7f600 [python] (code object freed before it was read)"]}],
            "fault_growth": [], "mapping_call_growth": [], "mappings": []});
        let out = render_diff(&body);
        assert!(
            out.contains("/srv/shop/views.py:42  via json/encoder.py:258 iterencode"),
            "{out}"
        );
        assert!(out.contains("warm (stopped growing)"), "{out}");
        assert!(
            out.contains(":9  (code object freed before it was read)"),
            "{out}"
        );
        assert!(
            out.contains("2 Python frames unresolved (2 code freed)"),
            "{out}"
        );
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_secs(&json!(45.0)), "45s");
        assert_eq!(human_secs(&json!(720.0)), "12m");
        assert_eq!(human_secs(&json!(12600.0)), "3.5h");
        assert_eq!(human_secs(&Value::Null), "-");
    }
}

#[cfg(test)]
mod route_tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn routes_table_names_routes_and_overflow() {
        let body = json!({"pid": 7, "routes": {
        "max_routes": 2,
        "overflowed_requests": 5,
        "requests_without_path": 0,
        "routes": [
            {"route": "GET /quote", "requests": 100, "kept_per_request": {"bytes": 31744.0},
             "mean_delta_bytes": 32000.0, "median_delta_bytes": 32768.0, "grew_share": 0.97},
            {"route": "other", "requests": 5, "kept_per_request": null,
             "mean_delta_bytes": 0.0, "median_delta_bytes": 0.0, "grew_share": 0.0}
        ]}});
        let out = render_routes(&body);
        assert!(out.contains("GET /quote"), "{out}");
        assert!(out.contains("+31.0 KiB"), "{out}");
        assert!(out.contains("97%"), "{out}");
        assert!(out.contains("5 requests counted under \"other\""), "{out}");
    }
}
