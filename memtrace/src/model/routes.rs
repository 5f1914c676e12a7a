//! Routes: a request's method and path (from the kernel's capture of the
//! HTTP/1.x request line) with ids collapsed, and per route and worker the
//! requests and memory they account for. A worker keeps at most
//! `max_routes` routes; requests of any further route are counted under
//! [`OTHER_ROUTE`], and how many went there because of the cap is reported.
use std::collections::{HashMap, VecDeque};

use memtrace_common::{LINE_DONE, LINE_PATH, LINE_TRUNCATED, RequestLine};
use serde::Serialize;

use crate::judge::routes::{KeptPerRequest, carrier, kept_per_request};

/// Where requests of routes beyond the cap are counted.
pub const OTHER_ROUTE: &str = "other";
/// What a collapsed path segment becomes.
pub const ID_SEGMENT: &str = ":id";
/// Requests per route the slope and the median are computed over.
pub const ROUTE_WINDOW: usize = 200;
/// Default `--max-routes`.
pub const DEFAULT_MAX_ROUTES: usize = 100;

/// Method and path of one request, as the kernel kept them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HttpLine {
    pub method: String,
    /// The path, query string never included (the kernel stops before `?`).
    pub path: String,
    /// The path was longer than the kernel keeps, or its end never came.
    pub truncated: bool,
}

impl HttpLine {
    /// Decodes the kernel's capture; None when there is no HTTP line.
    pub fn from_kernel(line: &RequestLine) -> Option<Self> {
        let truncated = match line.state {
            LINE_DONE => false,
            // Still being read when the response went out, or cut at the cap.
            LINE_PATH | LINE_TRUNCATED => true,
            _ => return None,
        };
        let len = (line.len as usize).min(line.bytes.len());
        Self::parse(&line.bytes[..len], truncated)
    }

    /// "METHOD path" bytes; None when there is no space after a method.
    pub fn parse(bytes: &[u8], truncated: bool) -> Option<Self> {
        let space = bytes.iter().position(|&b| b == b' ')?;
        let (method, path) = (&bytes[..space], &bytes[space + 1..]);
        if method.is_empty() || !method.iter().all(u8::is_ascii_uppercase) {
            return None;
        }
        Some(Self {
            method: String::from_utf8_lossy(method).into_owned(),
            path: String::from_utf8_lossy(path).into_owned(),
            truncated,
        })
    }

    /// "GET /orders/:id".
    pub fn route(&self) -> String {
        let mut out = String::with_capacity(self.method.len() + self.path.len() + 5);
        out.push_str(&self.method);
        out.push(' ');
        push_normalised(&mut out, &self.path, self.truncated);
        out
    }
}

/// Collapses ids in `path` so that routes stay few: numbers, UUIDs, hex ids
/// and long tokens mixing letters and digits become `:id`; a segment with
/// bytes that are not printable ASCII too. An absolute-form target
/// (`http://host/p`) keeps its path. A truncated path loses its last, partial
/// segment and ends in `/…`.
pub fn normalise_path(path: &str, truncated: bool) -> String {
    let mut out = String::with_capacity(path.len() + 4);
    push_normalised(&mut out, path, truncated);
    out
}

/// `normalise_path`, appended to `out` (one allocation per request line).
fn push_normalised(out: &mut String, path: &str, truncated: bool) {
    let path = match path.find("://") {
        Some(i) => path[i + 3..].find('/').map_or("/", |j| &path[i + 3 + j..]),
        None => path,
    };
    if !path.starts_with('/') {
        // "*" (OPTIONS *) or garbage after a method: one bucket for all.
        out.push_str(if path == "*" { "*" } else { "/:invalid" });
        return;
    }
    // A truncated path's last segment is partial: dropped.
    let whole = if truncated {
        path.rfind('/').map_or("", |i| &path[..i])
    } else {
        path
    };
    let start = out.len();
    if !whole.is_empty() {
        for segment in whole[1..].split('/') {
            out.push('/');
            out.push_str(if is_id(segment) { ID_SEGMENT } else { segment });
        }
    }
    if truncated {
        out.push_str("/…");
    }
    if out.len() == start {
        out.push('/');
    }
}

/// Whether a path segment names one thing among many (an id, a token).
pub fn is_id(segment: &str) -> bool {
    let b = segment.as_bytes();
    if b.is_empty() {
        return false;
    }
    if !b.iter().all(|c| c.is_ascii_graphic()) {
        return true;
    }
    let digits = b.iter().filter(|c| c.is_ascii_digit()).count();
    let hex = b.iter().all(u8::is_ascii_hexdigit);
    let alnum = |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'~');
    digits == b.len()
        || is_uuid(b)
        || (hex && b.len() >= 8 && digits > 0)
        || (b.len() >= 16 && digits > 0 && b.iter().all(alnum))
        || b.len() > 64
}

fn is_uuid(b: &[u8]) -> bool {
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Requests and memory of one route in one worker.
#[derive(Clone, Debug, Default)]
pub struct RouteStats {
    pub requests: u64,
    /// Sum of the requests' RSS deltas (bytes).
    pub delta_sum: i64,
    /// Requests whose RSS grew.
    pub grew: u64,
    /// Requests whose deltas overlapped others' (async servers).
    pub interleaved: u64,
    /// The last `ROUTE_WINDOW` deltas, oldest first.
    pub recent: VecDeque<i64>,
    /// What its requests left behind, by `Kept`: child processes started
    /// and alive at their ends, descriptors opened and not closed, asyncio
    /// tasks still alive.
    pub kept: [i64; 3],
    /// The window's figures, kept when its worker exited and the window
    /// went (see [`RouteTable::freeze`]).
    frozen: Option<WindowFigures>,
}

/// What a route's window of recent deltas says.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct WindowFigures {
    median: f64,
    kept_per_request: Option<KeptPerRequest>,
    len: usize,
}

impl WindowFigures {
    fn of(recent: &VecDeque<i64>) -> Self {
        let window: Vec<i64> = recent.iter().copied().collect();
        let mut sorted = window.clone();
        sorted.sort_unstable();
        let median = match sorted.len() {
            0 => 0.0,
            n if n % 2 == 1 => sorted[n / 2] as f64,
            n => (sorted[n / 2 - 1] as f64 + sorted[n / 2] as f64) / 2.0,
        };
        Self {
            median,
            kept_per_request: kept_per_request(&window),
            len: window.len(),
        }
    }
}

/// Resources a request can leave behind, besides memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kept {
    Children = 0,
    Fds = 1,
    Tasks = 2,
}

impl RouteStats {
    fn record(&mut self, delta: i64, interleaved: bool) {
        self.requests += 1;
        self.delta_sum += delta;
        self.grew += u64::from(delta > 0);
        self.interleaved += u64::from(interleaved);
        if self.recent.len() == ROUTE_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(delta);
    }

    pub fn kept_per_request(&self) -> Option<KeptPerRequest> {
        match &self.frozen {
            Some(f) => f.kept_per_request,
            None => kept_per_request(&self.recent.iter().copied().collect::<Vec<_>>()),
        }
    }

    fn figures(&self) -> WindowFigures {
        self.frozen
            .unwrap_or_else(|| WindowFigures::of(&self.recent))
    }

    /// Keeps the window's figures and gives its room back.
    fn freeze(&mut self) {
        if self.frozen.is_none() {
            self.frozen = Some(WindowFigures::of(&self.recent));
        }
        self.recent = VecDeque::new();
    }
}

/// The route carrying a worker's growth, as the leak alarm names it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LeakRoute {
    pub route: String,
    pub kept_per_request: KeptPerRequest,
}

/// One route of one worker, as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RouteView {
    /// "GET /orders/:id", or "other".
    pub route: String,
    pub requests: u64,
    pub mean_delta_bytes: f64,
    /// Median over the last `window` requests.
    pub median_delta_bytes: f64,
    /// Share of requests whose RSS grew (0..1).
    pub grew_share: f64,
    /// Bytes kept per request (see `judge::routes`), over the last `window`
    /// requests; null with fewer than 5.
    pub kept_per_request: Option<KeptPerRequest>,
    pub window: usize,
    /// Share of requests whose deltas overlapped other requests' (async
    /// servers): their per-route figures are approximate.
    pub interleaved_share: f64,
}

/// A worker's routes.
#[derive(Clone, Debug)]
pub struct RouteTable {
    max_routes: usize,
    routes: HashMap<String, RouteStats>,
    other: RouteStats,
    /// Requests counted under "other" because the table was full.
    pub overflowed: u64,
    /// Requests without a method and path (not HTTP/1.x, capture off,
    /// another request mode).
    pub without_path: u64,
}

/// A worker's routes, as the API shows them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RoutesView {
    pub max_routes: usize,
    /// Busiest first; "other" last when it has requests.
    pub routes: Vec<RouteView>,
    pub overflowed_requests: u64,
    pub requests_without_path: u64,
}

impl RouteTable {
    pub fn new(max_routes: usize) -> Self {
        Self {
            max_routes,
            routes: HashMap::new(),
            other: RouteStats::default(),
            overflowed: 0,
            without_path: 0,
        }
    }

    /// Counts a request of `route` (None: no path) that changed RSS by
    /// `delta` bytes.
    pub fn record(&mut self, route: Option<&str>, delta: i64, interleaved: bool) {
        let Some(route) = route else {
            self.without_path += 1;
            return;
        };
        let full = self.routes.len() >= self.max_routes;
        match self.routes.get_mut(route) {
            Some(stats) => stats.record(delta, interleaved),
            None if full => {
                self.overflowed += 1;
                self.other.record(delta, interleaved);
            }
            None => {
                let mut stats = RouteStats::default();
                stats.record(delta, interleaved);
                self.routes.insert(route.to_string(), stats);
            }
        }
    }

    /// Counts `n` of `kind` a request of `route` left behind.
    pub fn record_kept(&mut self, route: Option<&str>, kind: Kept, n: i64) {
        let Some(route) = route.filter(|_| n != 0) else {
            return;
        };
        let stats = match self.routes.get_mut(route) {
            Some(stats) => stats,
            None => &mut self.other,
        };
        stats.kept[kind as usize] += n;
    }

    /// The route whose requests left the most of `kind` behind, with how
    /// many per request.
    pub fn kept_route(&self, kind: Kept) -> Option<(String, f64)> {
        let kept = |s: &RouteStats| s.kept[kind as usize];
        self.iter()
            .filter(|(_, s)| kept(s) > 0 && s.requests > 0)
            .max_by(|a, b| kept(a.1).cmp(&kept(b.1)).then_with(|| b.0.cmp(a.0)))
            .map(|(name, s)| (name.to_string(), kept(s) as f64 / s.requests as f64))
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn max_routes(&self) -> usize {
        self.max_routes
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn get(&self, route: &str) -> Option<&RouteStats> {
        if route == OTHER_ROUTE {
            return Some(&self.other);
        }
        self.routes.get(route)
    }

    /// Every route with its stats, "other" included when it has requests.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &RouteStats)> {
        self.routes
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .chain((self.other.requests > 0).then_some((OTHER_ROUTE, &self.other)))
    }

    /// The route carrying most of the worker's growth (bytes kept per
    /// request times its requests), with its bytes kept per request.
    pub fn leak_route(&self) -> Option<LeakRoute> {
        self.carrier().map(|(route, kept_per_request)| LeakRoute {
            route,
            kept_per_request,
        })
    }

    pub fn carrier(&self) -> Option<(String, KeptPerRequest)> {
        let kept: Vec<(&str, KeptPerRequest, u64)> = self
            .iter()
            .filter_map(|(name, s)| Some((name, s.kept_per_request()?, s.requests)))
            .collect();
        carrier(kept).map(|(name, k)| (name.to_string(), k))
    }

    /// For a worker that exited: each route keeps its counts and what its
    /// window said (median, bytes kept per request), not the window (1.6 KB
    /// a route, up to `max_routes` routes, for each of the exited workers
    /// kept).
    pub fn freeze(&mut self) {
        for stats in self.routes.values_mut() {
            stats.freeze();
        }
        self.other.freeze();
        self.routes.shrink_to_fit();
    }

    pub fn view(&self) -> RoutesView {
        let mut routes: Vec<RouteView> = self.iter().map(|(name, s)| route_view(name, s)).collect();
        routes.sort_by(|a, b| {
            (
                a.route == OTHER_ROUTE,
                std::cmp::Reverse(a.requests),
                &a.route,
            )
                .cmp(&(
                    b.route == OTHER_ROUTE,
                    std::cmp::Reverse(b.requests),
                    &b.route,
                ))
        });
        RoutesView {
            max_routes: self.max_routes,
            routes,
            overflowed_requests: self.overflowed,
            requests_without_path: self.without_path,
        }
    }
}

fn route_view(name: &str, s: &RouteStats) -> RouteView {
    let figures = s.figures();
    let per = |x: u64| {
        if s.requests == 0 {
            0.0
        } else {
            x as f64 / s.requests as f64
        }
    };
    RouteView {
        route: name.to_string(),
        requests: s.requests,
        mean_delta_bytes: if s.requests == 0 {
            0.0
        } else {
            s.delta_sum as f64 / s.requests as f64
        },
        median_delta_bytes: figures.median,
        grew_share: per(s.grew),
        kept_per_request: figures.kept_per_request,
        window: figures.len,
        interleaved_share: per(s.interleaved),
    }
}

impl Default for RouteTable {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_ROUTES)
    }
}

#[cfg(test)]
mod tests {
    use memtrace_common::{LINE_CAP, LINE_METHOD, LINE_NONE, LINE_NOT_HTTP};

    use super::*;

    fn kernel_line(state: u32, text: &[u8]) -> RequestLine {
        let mut line = RequestLine {
            state,
            len: text.len() as u32,
            ..RequestLine::default()
        };
        line.bytes[..text.len()].copy_from_slice(text);
        line
    }

    #[test]
    fn ids_collapse() {
        for (path, route) in [
            ("/orders/12345", "/orders/:id"),
            ("/orders/12345/items/7", "/orders/:id/items/:id"),
            (
                "/users/3f2b8c1e-9a4d-4c1b-8e2f-0a1b2c3d4e5f/avatar",
                "/users/:id/avatar",
            ),
            ("/blobs/5f2b9c1a77", "/blobs/:id"),
            ("/t/AbC123xYz456QwE789", "/t/:id"),
            ("/health", "/health"),
            ("/v1/quote", "/v1/quote"),
            ("/", "/"),
            ("/static/app.css", "/static/app.css"),
            ("/deadbeef", "/deadbeef"),
            ("http://example.com/orders/9", "/orders/:id"),
            ("*", "*"),
            ("garbage", "/:invalid"),
        ] {
            assert_eq!(normalise_path(path, false), route, "{path}");
        }
    }

    #[test]
    fn a_truncated_path_loses_its_partial_segment() {
        assert_eq!(normalise_path("/a/b/partia", true), "/a/b/…");
    }

    #[test]
    fn kernel_lines_decode() {
        let done = kernel_line(LINE_DONE, b"GET /orders/42");
        let line = HttpLine::from_kernel(&done).unwrap();
        assert_eq!(
            (line.method.as_str(), line.path.as_str()),
            ("GET", "/orders/42")
        );
        assert_eq!(line.route(), "GET /orders/:id");
        let cut = kernel_line(LINE_TRUNCATED, &[b'a'; LINE_CAP]);
        assert!(
            HttpLine::from_kernel(&cut).is_none(),
            "no method: not a line"
        );
        let mut long = b"GET /files/".to_vec();
        long.resize(LINE_CAP, b'x');
        let line = HttpLine::from_kernel(&kernel_line(LINE_TRUNCATED, &long)).unwrap();
        assert!(line.truncated);
        assert_eq!(line.route(), "GET /files/…");
        for state in [LINE_NONE, LINE_METHOD, LINE_NOT_HTTP] {
            assert!(HttpLine::from_kernel(&kernel_line(state, b"GET /x")).is_none());
        }
        // Garbage after a method-like token keeps no bytes as a route.
        let junk = kernel_line(LINE_DONE, b"GET \x01\xff\x02");
        assert_eq!(
            HttpLine::from_kernel(&junk).unwrap().route(),
            "GET /:invalid"
        );
    }

    #[test]
    fn distinct_paths_stay_within_the_cap_and_are_counted() {
        let mut table = RouteTable::new(3);
        for i in 0..1000 {
            // Each a distinct route that no id rule collapses.
            let route = format!("GET /page-{}", ["a", "b", "c", "d", "e"][i % 5]);
            table.record(Some(&route), 0, false);
        }
        table.record(None, 0, false);
        assert_eq!(table.len(), 3);
        let view = table.view();
        assert_eq!(view.routes.len(), 4);
        assert_eq!(view.routes.last().unwrap().route, OTHER_ROUTE);
        assert_eq!(view.overflowed_requests, 400);
        assert_eq!(view.routes.iter().map(|r| r.requests).sum::<u64>(), 1000);
        assert_eq!(view.requests_without_path, 1);
    }

    #[test]
    fn per_route_figures() {
        let mut table = RouteTable::new(10);
        for i in 0..100 {
            table.record(Some("GET /leak"), 32 * 1024, false);
            let noise = if i % 10 == 0 { 4096 } else { 0 };
            table.record(Some("GET /health"), noise, false);
        }
        let view = table.view();
        let leak = view.routes.iter().find(|r| r.route == "GET /leak").unwrap();
        assert_eq!(leak.requests, 100);
        assert_eq!(leak.grew_share, 1.0);
        assert_eq!(leak.median_delta_bytes, 32.0 * 1024.0);
        let kept = leak.kept_per_request.unwrap().bytes;
        assert!((kept - 32.0 * 1024.0).abs() < 1.0, "{kept}");
        let health = view
            .routes
            .iter()
            .find(|r| r.route == "GET /health")
            .unwrap();
        assert!((health.grew_share - 0.1).abs() < 1e-9);
        assert_eq!(health.median_delta_bytes, 0.0);
    }
}
