//! `memtrace top`: a live, full-screen view of one agent's workers, like
//! htop for a prefork server.
//!
//! A [`Model`] is updated from the agent's JSON by plain functions
//! ([`Model::apply_status`], [`Model::on_key`]) and drawn by [`render`]; both
//! are unit-tested with ratatui's `TestBackend`. Only [`run`] touches the
//! terminal and the network: a fetcher thread makes the blocking HTTP calls,
//! so q answers at once even while the agent is slow to reply.
use std::{
    collections::{HashMap, VecDeque},
    io::IsTerminal as _,
    sync::mpsc::{self, Receiver, Sender, TryRecvError},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style, Stylize as _},
    text::{Line, Span},
    widgets::{
        Block, Borders, Cell, Paragraph, RenderDirection, Row, Sparkline, Table, TableState,
    },
};
use serde_json::Value;

use super::{
    client::{Client, ClientError, human_secs},
    interrupt,
};

/// Refreshes of RSS kept per worker for its sparkline.
pub const HISTORY_LEN: usize = 60;
/// Requests the detail pane lists.
pub const DETAIL_REQUESTS: usize = 8;
/// REQ/S is measured over this much of the recent past: over one short
/// refresh it jumps between 0 and twice the truth.
pub const RATE_WINDOW: Duration = Duration::from_secs(5);
const MB: f64 = 1024.0 * 1024.0;
const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(
        "memtrace top needs a terminal (stdout is not one); `memtrace status` prints a one-shot table"
    )]
    NotATerminal,
    #[error("--interval must be between 0.1 and 3600 seconds, not {0}")]
    BadInterval(f64),
    #[error("cannot drive the terminal: {0}")]
    Terminal(#[from] std::io::Error),
    #[error("the thread calling the agent stopped unexpectedly")]
    FetcherStopped,
}

/// The table's order; `s` cycles through them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortKey {
    #[default]
    Rss,
    Slope,
    ReqRate,
    Pid,
}

impl SortKey {
    pub fn next(self) -> Self {
        match self {
            Self::Rss => Self::Slope,
            Self::Slope => Self::ReqRate,
            Self::ReqRate => Self::Pid,
            Self::Pid => Self::Rss,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Rss => "RSS",
            Self::Slope => "SLOPE",
            Self::ReqRate => "REQ/S",
            Self::Pid => "PID",
        }
    }

    /// Largest first, except pids, smallest first.
    fn arrow(self) -> &'static str {
        if self == Self::Pid { "▲" } else { "▼" }
    }

    /// The table column this key sorts by.
    fn column(self) -> usize {
        match self {
            Self::Rss => 3,
            Self::Slope => 6,
            Self::ReqRate => 8,
            Self::Pid => 0,
        }
    }
}

/// One live worker, as the last refresh saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerRow {
    pub pid: u32,
    pub role: String,
    pub name: String,
    pub rss_bytes: u64,
    pub pss_bytes: Option<u64>,
    pub uss_bytes: Option<u64>,
    pub requests_seen: u64,
    pub requests_in_flight: u64,
    pub leak_detections: u64,
    /// Live processes below it, and their resident bytes.
    pub children: u64,
    pub children_rss_bytes: u64,
    /// From `requests_seen` over the last refreshes (up to [`RATE_WINDOW`]).
    pub req_per_sec: Option<f64>,
    /// The agent's `leak_detector` object, as served.
    pub detector: Value,
}

impl WorkerRow {
    fn from_json(w: &Value) -> Option<Self> {
        Some(Self {
            pid: u32::try_from(w["pid"].as_u64()?).ok()?,
            role: w["role"].as_str().unwrap_or("-").to_string(),
            name: w["name"].as_str().unwrap_or("-").to_string(),
            rss_bytes: w["rss_bytes"].as_u64().unwrap_or(0),
            pss_bytes: w["pss_bytes"].as_u64(),
            uss_bytes: w["uss_bytes"].as_u64(),
            requests_seen: w["requests_seen"].as_u64().unwrap_or(0),
            requests_in_flight: w["requests_in_flight"].as_u64().unwrap_or(0),
            leak_detections: w["leak_detections"].as_u64().unwrap_or(0),
            children: w["children"]["count"].as_u64().unwrap_or(0),
            children_rss_bytes: w["children"]["rss_bytes"].as_u64().unwrap_or(0),
            req_per_sec: None,
            detector: w["leak_detector"].clone(),
        })
    }

    /// The robust slope in MB/request; None on the time axis (MB/s there,
    /// which the MB/h column shows) and before the first check.
    pub fn slope_mb_per_request(&self) -> Option<f64> {
        if self.detector["axis"] == "seconds" {
            return None;
        }
        self.detector["robust_slope"].as_f64()
    }

    fn limit_hit(&self) -> bool {
        self.detector["soft_limit_fired"] == true
    }
}

/// One refresh's figures for one worker.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample {
    at: Instant,
    rss_bytes: u64,
    requests_seen: u64,
}

/// Requests per second since the oldest sample inside [`RATE_WINDOW`] (or
/// the previous one, when refreshes are further apart).
fn request_rate(history: &VecDeque<Sample>, at: Instant, seen: u64) -> Option<f64> {
    let since = history
        .iter()
        .find(|s| at.saturating_duration_since(s.at) <= RATE_WINDOW)
        .or(history.back())?;
    let dt = at.saturating_duration_since(since.at).as_secs_f64();
    (dt > 0.0).then(|| seen.saturating_sub(since.requests_seen) as f64 / dt)
}

/// Everything the screen shows.
#[derive(Clone, Debug)]
pub struct Model {
    url: String,
    interval_secs: f64,
    /// The `agent` object of the last good status (Null before one).
    agent: Value,
    /// Live workers, in the current sort order.
    workers: Vec<WorkerRow>,
    /// The last [`HISTORY_LEN`] refreshes, oldest first, per pid.
    history: HashMap<u32, VecDeque<Sample>>,
    last_refresh_unix: Option<f64>,
    error: Option<String>,
    /// Seconds the pending refresh has waited, once that is unusually long.
    waiting_secs: Option<f64>,
    sort: SortKey,
    selected: Option<u32>,
    detail: bool,
    /// The last requests fetched for the detail pane, with their pid.
    requests: Option<(u32, Result<Value, String>)>,
    /// The detail pane shows the worker's routes instead of its requests.
    show_routes: bool,
    /// The last routes fetched for the detail pane, with their pid.
    routes: Option<(u32, Result<Value, String>)>,
}

/// What a key asks `run` to do besides redrawing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    None,
    Quit,
    Refresh,
    /// Fetch this worker's recent requests for the detail pane.
    Requests(u32),
}

impl Model {
    pub fn new(url: &str, interval_secs: f64) -> Self {
        Self {
            url: url.to_string(),
            interval_secs,
            agent: Value::Null,
            workers: Vec::new(),
            history: HashMap::new(),
            last_refresh_unix: None,
            error: None,
            waiting_secs: None,
            sort: SortKey::default(),
            selected: None,
            detail: false,
            requests: None,
            show_routes: false,
            routes: None,
        }
    }

    pub fn workers(&self) -> &[WorkerRow] {
        &self.workers
    }

    pub fn sort(&self) -> SortKey {
        self.sort
    }

    pub fn selected_pid(&self) -> Option<u32> {
        self.selected
    }

    fn selected_index(&self) -> Option<usize> {
        let pid = self.selected?;
        self.workers.iter().position(|w| w.pid == pid)
    }

    /// The pid whose requests the detail pane shows, when it is open.
    pub fn detail_pid(&self) -> Option<u32> {
        self.selected.filter(|_| self.detail)
    }

    /// Takes a `?action=status` answer received at `at` (monotonic, for
    /// rates) and `unix` (wall clock, for the header).
    pub fn apply_status(&mut self, body: &Value, at: Instant, unix: f64) {
        let old_index = self.selected_index();
        let mut workers: Vec<WorkerRow> = body["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|w| w["alive"] != false)
            .filter_map(WorkerRow::from_json)
            .collect();
        for w in &mut workers {
            let history = self.history.entry(w.pid).or_default();
            // A smaller count is a new process under a reused pid, or a
            // restarted agent: its past is not this one's.
            if history
                .back()
                .is_some_and(|s| s.requests_seen > w.requests_seen)
            {
                history.clear();
            }
            w.req_per_sec = request_rate(history, at, w.requests_seen);
            history.push_back(Sample {
                at,
                rss_bytes: w.rss_bytes,
                requests_seen: w.requests_seen,
            });
            while history.len() > HISTORY_LEN {
                history.pop_front();
            }
        }
        self.history
            .retain(|pid, _| workers.iter().any(|w| w.pid == *pid));
        self.workers = workers;
        self.sort_workers();
        // The selection follows its worker; when that one is gone, the row
        // that took its place is selected.
        if self.selected_index().is_none() {
            self.selected = match old_index {
                Some(i) if !self.workers.is_empty() => {
                    Some(self.workers[i.min(self.workers.len() - 1)].pid)
                }
                _ => self.workers.first().map(|w| w.pid),
            };
        }
        self.agent = body["agent"].clone();
        self.last_refresh_unix = Some(unix);
        self.error = None;
        self.waiting_secs = None;
    }

    /// RSS bytes at the last refreshes, oldest first.
    fn rss_history(&self, pid: u32) -> Vec<u64> {
        self.history
            .get(&pid)
            .map(|h| h.iter().map(|s| s.rss_bytes).collect())
            .unwrap_or_default()
    }

    /// A failed refresh: the last data stays on screen, marked stale.
    pub fn apply_error(&mut self, message: impl Into<String>) {
        self.error = Some(message.into());
    }

    /// A failed fetch keeps the requests already shown for that worker: the
    /// header says the agent is unreachable, and a worker that exited
    /// leaves the table anyway.
    pub fn apply_requests(&mut self, pid: u32, result: Result<Value, String>) {
        if result.is_err() && matches!(&self.requests, Some((p, Ok(_))) if *p == pid) {
            return;
        }
        self.requests = Some((pid, result));
    }

    /// Like `apply_requests`, for the routes view.
    pub fn apply_routes(&mut self, pid: u32, result: Result<Value, String>) {
        if result.is_err() && matches!(&self.routes, Some((p, Ok(_))) if *p == pid) {
            return;
        }
        self.routes = Some((pid, result));
    }

    pub fn showing_routes(&self) -> bool {
        self.show_routes
    }

    /// How long the refresh under way has waited, when that is news.
    pub fn set_waiting(&mut self, secs: Option<f64>) {
        self.waiting_secs = secs;
    }

    fn sort_workers(&mut self) {
        let sort = self.sort;
        // Missing values sort last whatever the direction.
        let desc = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => b.total_cmp(&a),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        };
        self.workers.sort_by(|a, b| {
            match sort {
                SortKey::Rss => b.rss_bytes.cmp(&a.rss_bytes),
                SortKey::Slope => desc(a.slope_mb_per_request(), b.slope_mb_per_request()),
                SortKey::ReqRate => desc(a.req_per_sec, b.req_per_sec),
                SortKey::Pid => std::cmp::Ordering::Equal,
            }
            .then(a.pid.cmp(&b.pid))
        });
    }

    fn move_selection(&mut self, by: isize) {
        if self.workers.is_empty() {
            return;
        }
        let last = self.workers.len() - 1;
        let i = match self.selected_index() {
            Some(i) => i.saturating_add_signed(by).min(last),
            None => 0,
        };
        self.selected = Some(self.workers[i].pid);
    }

    /// Applies a key; returns what else `run` must do.
    pub fn on_key(&mut self, key: KeyEvent) -> Action {
        let before = self.detail_pid();
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => return Action::Quit,
            // Raw mode turns Ctrl-C into a key; it means quit here too.
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                return Action::Quit;
            }
            KeyCode::Char('s') => {
                self.sort = self.sort.next();
                self.sort_workers();
            }
            KeyCode::Char('r') => return Action::Refresh,
            KeyCode::Char('o') => self.show_routes = !self.show_routes,
            KeyCode::Up | KeyCode::Char('k') => self.move_selection(-1),
            KeyCode::Down | KeyCode::Char('j') => self.move_selection(1),
            KeyCode::Home => self.move_selection(isize::MIN),
            KeyCode::End => self.move_selection(isize::MAX),
            KeyCode::Enter => {
                self.detail = !self.detail;
                if self.detail && self.selected.is_none() {
                    self.move_selection(0);
                }
            }
            _ => {}
        }
        match self.detail_pid() {
            Some(pid) if before != Some(pid) => Action::Requests(pid),
            _ => Action::None,
        }
    }
}

// ---------------------------------------------------------------- rendering

/// Table columns and their widths; the RSS history takes the rest.
const COLUMNS: [(&str, u16); 12] = [
    ("PID", 7),
    ("ROLE", 7),
    ("NAME", 15),
    ("RSS MB", 8),
    ("PSS MB", 8),
    ("USS MB", 8),
    ("SLOPE MB/req", 13),
    ("MB/h", 8),
    ("REQ/S", 7),
    ("INFL", 4),
    ("TO LIMIT", 9),
    ("CHILDREN", 10),
];

fn mb(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "-".into(), |b| format!("{:.1}", b as f64 / MB))
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |f| format!("{f:.digits$}"))
}

fn count(v: &Value) -> String {
    v.as_u64().map_or_else(|| "-".into(), |n| n.to_string())
}

/// HH:MM:SS in UTC: the clock the agent's log lines are stamped with, so
/// what the screen shows can be matched with them.
pub fn clock(unix: f64) -> String {
    let secs = unix.max(0.0) as u64 % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Samples as block characters scaled between their minimum and maximum;
/// a range under 1 MiB (or 2 % of the peak) is noise and draws flat.
pub fn sparkline_text(samples: &[u64]) -> String {
    let (Some(&lo), Some(&hi)) = (samples.iter().min(), samples.iter().max()) else {
        return String::new();
    };
    let range = (hi - lo).max(1 << 20).max(hi / 50) as f64;
    samples
        .iter()
        .map(|&v| BARS[(((v - lo) as f64 / range) * 7.0).round() as usize])
        .collect()
}

/// Lays out groups of items: each group starts a line, its items follow
/// one another `gap` apart and wrap to a new line when the next would not
/// fit, so a narrow terminal loses no part of the header.
fn flow(groups: Vec<(usize, Vec<Span<'static>>)>, width: u16) -> Vec<Line<'static>> {
    let width = usize::from(width.max(1));
    let mut lines = Vec::new();
    for (gap, items) in groups {
        let mut line: Vec<Span> = Vec::new();
        let mut used = 0;
        for item in items {
            if used > 0 && used + gap + item.width() > width {
                lines.push(Line::from(std::mem::take(&mut line)));
                used = 0;
            }
            if used > 0 {
                line.push(Span::raw(" ".repeat(gap)));
                used += gap;
            }
            used += item.width();
            line.push(item);
        }
        lines.push(Line::from(line));
    }
    lines
}

fn header(model: &Model, width: u16) -> Vec<Line<'static>> {
    let a = &model.agent;
    let title = vec![
        Span::styled("memtrace top", Style::new().bold()),
        Span::raw(format!("agent {}", a["version"].as_str().unwrap_or("?"))),
        Span::raw(format!("up {}", human_secs(&a["uptime_secs"]))),
        Span::raw(format!(
            "tracing {}",
            a["selectors"].as_str().unwrap_or("?")
        )),
        Span::styled(model.url.clone(), Style::new().fg(Color::DarkGray)),
    ];
    let drops = a["kernel"]["ringbuf_drops"].as_u64().unwrap_or(0);
    let counters = vec![
        Span::raw(format!("workers {} live", count(&a["workers_alive"]))),
        Span::raw(format!("events {}", count(&a["events_received"]))),
        Span::styled(
            format!("ring-buffer drops {}", count(&a["kernel"]["ringbuf_drops"])),
            if drops > 0 {
                Style::new().fg(Color::Yellow).bold()
            } else {
                Style::new()
            },
        ),
        Span::raw(format!(
            "collection {}",
            if a["collection_active"] == true {
                "on"
            } else {
                "off"
            }
        )),
        Span::raw(format!(
            "soft-limit actions {}",
            count(&a["soft_limit"]["actions_taken"])
        )),
    ];
    let refreshed = model
        .last_refresh_unix
        .map_or_else(|| "never".into(), clock);
    let state = match (&model.error, model.waiting_secs) {
        // What the data on screen is worth comes first; the message, word
        // by word, wraps over as many lines as it needs.
        (Some(e), _) => {
            let red = Style::new().fg(Color::Red);
            let mut items = vec![
                Span::styled("ERROR", red.bold()),
                Span::styled(
                    format!(
                        "(data from {refreshed}, retrying every {}s):",
                        model.interval_secs
                    ),
                    red,
                ),
            ];
            items.extend(
                e.split_whitespace()
                    .map(|word| Span::styled(word.to_string(), red)),
            );
            (1, items)
        }
        (None, waiting) => {
            let mut items = vec![
                Span::raw(format!(
                    "refreshed {refreshed}, every {}s",
                    model.interval_secs
                )),
                Span::styled(
                    format!("sort: {} {}", model.sort.label(), model.sort.arrow()),
                    Style::new().fg(Color::Cyan).bold(),
                ),
            ];
            if let Some(w) = waiting {
                items.push(Span::styled(
                    format!("the agent has not answered for {w:.0}s"),
                    Style::new().fg(Color::Yellow),
                ));
            }
            (3, items)
        }
    };
    flow(vec![(2, title), (3, counters), state], width)
}

/// Worker columns left out first, in this order, when the terminal is narrow.
const OPTIONAL_COLUMNS: [usize; 5] = [1, 11, 4, 5, 7];
const HISTORY_MIN_WIDTH: u16 = 8;

/// The columns of a table that fit in `width`: all of them, or fewer by
/// leaving out the `optional` ones in order.
fn fit_columns(widths: &[u16], optional: &[usize], width: u16) -> Vec<usize> {
    // Each column and the space after it, but the last.
    let mut needed = widths.iter().map(|w| w + 1).sum::<u16>().saturating_sub(1);
    let mut hidden = Vec::new();
    for &i in optional {
        if width >= needed {
            break;
        }
        hidden.push(i);
        needed -= widths[i] + 1;
    }
    (0..widths.len()).filter(|i| !hidden.contains(i)).collect()
}

/// The worker columns that fit in `width` (the history column is the last index).
fn visible_columns(width: u16) -> Vec<usize> {
    let widths: Vec<u16> = COLUMNS
        .iter()
        .map(|(_, w)| *w)
        .chain([HISTORY_MIN_WIDTH])
        .collect();
    // The highlight symbol takes 2.
    fit_columns(&widths, &OPTIONAL_COLUMNS, width.saturating_sub(2))
}

fn worker_cells(model: &Model, w: &WorkerRow) -> Vec<Cell<'static>> {
    let d = &w.detector;
    let slope = match w.slope_mb_per_request() {
        Some(s) => format!("{s:.3}"),
        // A master serves no request: it is not warming up, it has no slope.
        None if d["warming_up"] == true && w.requests_seen > 0 => "warm-up".into(),
        None => "-".into(),
    };
    let per_hour = d["slope_mb_per_hour"].as_f64().map_or_else(
        || "-".into(),
        |h| {
            if h.abs() >= 100.0 {
                format!("{h:.0}")
            } else {
                format!("{h:.1}")
            }
        },
    );
    let to_limit = if w.limit_hit() {
        Cell::from("LIMIT HIT").style(Style::new().fg(Color::Red).bold())
    } else {
        let secs = d["forecast_seconds_to_limit"].as_f64();
        let cell = Cell::from(human_secs(&d["forecast_seconds_to_limit"]));
        match secs {
            Some(s) if s < 3600.0 => cell.style(Style::new().fg(Color::Yellow)),
            _ => cell,
        }
    };
    let history = sparkline_text(&model.rss_history(w.pid));
    let slope_style = match w.slope_mb_per_request() {
        Some(s) if d["slope_threshold"].as_f64().is_some_and(|t| s > t) => {
            Style::new().fg(Color::Yellow)
        }
        _ => Style::new(),
    };
    vec![
        Cell::from(w.pid.to_string()),
        Cell::from(w.role.clone()),
        Cell::from(w.name.clone()),
        Cell::from(mb(Some(w.rss_bytes))),
        Cell::from(mb(w.pss_bytes)),
        Cell::from(mb(w.uss_bytes)),
        Cell::from(slope).style(slope_style),
        Cell::from(per_hour),
        Cell::from(opt(w.req_per_sec, 1)),
        Cell::from(w.requests_in_flight.to_string()),
        to_limit,
        // How many processes it left running, and their memory.
        if w.children == 0 {
            Cell::from("-")
        } else {
            Cell::from(format!(
                "{} {:.0}M",
                w.children,
                w.children_rss_bytes as f64 / MB
            ))
            .style(Style::new().fg(Color::Yellow))
        },
        // Right-aligned: a narrow cell drops the oldest samples, not the newest.
        Cell::from(Line::from(history).right_aligned()).style(Style::new().fg(Color::Green)),
    ]
}

fn workers_table(frame: &mut Frame, area: Rect, model: &Model) {
    let block = Block::new()
        .borders(Borders::TOP)
        .title(format!(" {} live ", model.workers.len()));
    if model.workers.is_empty() {
        let text = if model.agent.is_null() {
            "waiting for the agent..."
        } else {
            "no live process matches the agent's selectors"
        };
        frame.render_widget(Paragraph::new(text).block(block), area);
        return;
    }
    let columns = visible_columns(area.width);
    let mut titles: Vec<String> = COLUMNS.iter().map(|(t, _)| t.to_string()).collect();
    titles.push("RSS HISTORY".into());
    titles[model.sort.column()].push_str(model.sort.arrow());
    let header =
        Row::new(columns.iter().map(|&i| titles[i].clone())).style(Style::new().bold().reversed());
    // The history gets what is left, up to one cell per kept refresh.
    let fixed: u16 = columns
        .iter()
        .filter_map(|&i| COLUMNS.get(i))
        .map(|(_, w)| w + 1)
        .sum();
    let history_width = area
        .width
        .saturating_sub(fixed + 2)
        .clamp(HISTORY_MIN_WIDTH, HISTORY_LEN as u16);
    let widths = columns
        .iter()
        .map(|&i| Constraint::Length(COLUMNS.get(i).map_or(history_width, |(_, w)| *w)));
    let rows: Vec<Row> = model
        .workers
        .iter()
        .map(|w| {
            let mut cells: Vec<Option<Cell>> =
                worker_cells(model, w).into_iter().map(Some).collect();
            let row = Row::new(columns.iter().filter_map(|&i| cells[i].take()));
            if w.limit_hit() {
                row.style(Style::new().fg(Color::Red))
            } else {
                row
            }
        })
        .collect();
    let table = Table::new(rows, widths)
        .header(header)
        .block(block)
        .column_spacing(1)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .highlight_symbol("> ");
    let mut state = TableState::default().with_selected(model.selected_index());
    frame.render_stateful_widget(table, area, &mut state);
}

fn detector_lines(w: &WorkerRow) -> Vec<Line<'static>> {
    let d = &w.detector;
    let unit = if d["axis"] == "seconds" {
        "MB/s"
    } else {
        "MB/req"
    };
    let interval = match (
        d["slope_lower_bound"].as_f64(),
        d["slope_upper_bound"].as_f64(),
    ) {
        (Some(lo), Some(hi)) => format!("{lo:.3} .. {hi:.3} {unit}"),
        (Some(lo), None) => format!("above {lo:.3} {unit}"),
        _ => "-".into(),
    };
    let to_limit = if w.limit_hit() {
        "LIMIT HIT".to_string()
    } else {
        format!(
            "{} requests, {}",
            opt(d["forecast_requests_to_limit"].as_f64(), 0),
            human_secs(&d["forecast_seconds_to_limit"])
        )
    };
    let kv = |k: &str, v: String| {
        Line::from(vec![
            Span::styled(format!("{k:<16}"), Style::new().fg(Color::DarkGray)),
            Span::raw(v),
        ])
    };
    vec![
        kv("leak detections", w.leak_detections.to_string()),
        kv(
            "robust slope",
            format!("{} {unit}", opt(d["robust_slope"].as_f64(), 3)),
        ),
        kv("99% interval", interval),
        kv(
            "slope per hour",
            format!("{} MB/h", opt(d["slope_mb_per_hour"].as_f64(), 1)),
        ),
        kv(
            "warming up",
            if d["warming_up"] == true { "yes" } else { "no" }.into(),
        ),
        kv(
            "samples",
            format!(
                "{} (window {}/{})",
                count(&d["request_count"]),
                count(&d["window_size"]),
                count(&d["window_capacity"])
            ),
        ),
        kv(
            "high-water mark",
            format!("{} MB", opt(d["high_water_mark"].as_f64(), 1)),
        ),
        kv(
            "soft limit",
            format!(
                "{} MB{}",
                opt(d["soft_limit_mb"].as_f64(), 0),
                if w.limit_hit() { ", fired" } else { "" }
            ),
        ),
        kv("to limit", to_limit),
    ]
}

/// The detail pane's request columns (LEVEL takes the rest).
const REQUEST_COLUMNS: [(&str, u16); 7] = [
    ("REQUEST", 15),
    ("ROUTE", 18),
    ("MS", 8),
    ("RSS MB", 7),
    ("DELTA MB", 8),
    ("FAULTS", 6),
    ("LEVEL", 8),
];

fn requests_view(frame: &mut Frame, area: Rect, model: &Model, pid: u32) {
    let block = Block::new()
        .borders(Borders::LEFT)
        .title(format!(" last {DETAIL_REQUESTS} requests "));
    let body = match &model.requests {
        Some((p, Ok(body))) if *p == pid => body,
        Some((p, Err(e))) if *p == pid => {
            let text = Paragraph::new(e.clone())
                .style(Style::new().fg(Color::Red))
                .wrap(ratatui::widgets::Wrap { trim: true });
            frame.render_widget(text.block(block), area);
            return;
        }
        _ => {
            frame.render_widget(Paragraph::new("loading...").block(block), area);
            return;
        }
    };
    let widths: Vec<u16> = REQUEST_COLUMNS.iter().map(|(_, w)| *w).collect();
    let inner_width = block.inner(area).width;
    // FAULTS, MS, ROUTE, then RSS MB make way on a narrow terminal.
    let columns = fit_columns(&widths, &[5, 2, 1, 3], inner_width);
    let last = REQUEST_COLUMNS.len() - 1;
    let level_width = inner_width.saturating_sub(
        columns
            .iter()
            .filter(|&&i| i != last)
            .map(|&i| widths[i] + 1)
            .sum(),
    );
    let rows: Vec<Vec<Cell>> = body["requests"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let mut level = r["level"].as_str().unwrap_or("-").to_string();
            if level.len() > usize::from(level_width) {
                level = match level.as_str() {
                    "high_memory_usage" => "high mem".into(),
                    "spike_detected" => "spike".into(),
                    _ => level,
                };
            }
            let style = if level == "normal" {
                Style::new()
            } else {
                Style::new().fg(Color::Yellow)
            };
            vec![
                Cell::from(r["request_id"].as_str().unwrap_or("?").to_string()),
                Cell::from(r["route"].as_str().unwrap_or("-").to_string()),
                Cell::from(opt(r["duration_ms"].as_f64(), 2)),
                Cell::from(mb(r["rss_after_bytes"].as_u64())),
                Cell::from(format!(
                    "{:+.2}",
                    r["delta_bytes"].as_f64().unwrap_or(0.0) / MB
                )),
                Cell::from(count(&r["faults"])),
                Cell::from(level).style(style),
            ]
        })
        .collect();
    if rows.is_empty() {
        frame.render_widget(Paragraph::new("no request recorded yet").block(block), area);
        return;
    }
    let table = Table::new(
        rows.into_iter().map(|cells| {
            let mut cells: Vec<Option<Cell>> = cells.into_iter().map(Some).collect();
            Row::new(columns.iter().filter_map(|&i| cells[i].take()))
        }),
        columns.iter().map(|&i| {
            if i == last {
                Constraint::Min(widths[i])
            } else {
                Constraint::Length(widths[i])
            }
        }),
    )
    .header(Row::new(columns.iter().map(|&i| REQUEST_COLUMNS[i].0)).bold())
    .block(block);
    frame.render_widget(table, area);
}

fn detail_pane(frame: &mut Frame, area: Rect, model: &Model) {
    let Some(w) = model.selected_index().and_then(|i| model.workers.get(i)) else {
        let block = Block::bordered().title(" details ");
        frame.render_widget(Paragraph::new("no worker selected").block(block), area);
        return;
    };
    let block = Block::bordered().title(format!(
        " worker {} {} ({}), Enter closes ",
        w.pid, w.name, w.role
    ));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let [spark_area, rest] =
        Layout::vertical([Constraint::Length(5), Constraint::Min(0)]).areas(inner);
    let samples = model.rss_history(w.pid);
    let lo = samples.iter().copied().min().unwrap_or(0);
    let hi = samples.iter().copied().max().unwrap_or(0);
    // The baseline sits below the minimum so the lowest sample still shows,
    // and growth fills the height instead of a sliver on top of a tall bar.
    let base = lo.saturating_sub((hi - lo).max(1 << 20) / 8);
    let data: Vec<u64> = samples.iter().rev().map(|v| v - base).collect();
    let spark = Sparkline::default()
        .block(Block::new().borders(Borders::BOTTOM).title(format!(
            " RSS over the last {} refreshes: {:.1} .. {:.1} MB, now {:.1} MB ",
            samples.len(),
            lo as f64 / MB,
            hi as f64 / MB,
            w.rss_bytes as f64 / MB
        )))
        .data(&data)
        .max(hi - base)
        // Newest at the right edge; a narrow pane drops the oldest.
        .direction(RenderDirection::RightToLeft)
        .style(Style::new().fg(Color::Green));
    frame.render_widget(spark, spark_area);
    let [left, right] =
        Layout::horizontal([Constraint::Length(38), Constraint::Min(0)]).areas(rest);
    frame.render_widget(
        Paragraph::new(detector_lines(w)).block(Block::new().title(" leak detector ")),
        left,
    );
    if model.show_routes {
        routes_view(frame, right, model, w.pid);
    } else {
        requests_view(frame, right, model, w.pid);
    }
}

/// The detail pane's routes: busiest first, bytes kept per request.
fn routes_view(frame: &mut Frame, area: Rect, model: &Model, pid: u32) {
    let block = Block::new().borders(Borders::LEFT).title(" routes ");
    let body = match &model.routes {
        Some((p, Ok(body))) if *p == pid => &body["routes"],
        Some((p, Err(e))) if *p == pid => {
            let text = Paragraph::new(e.clone())
                .style(Style::new().fg(Color::Red))
                .wrap(ratatui::widgets::Wrap { trim: true });
            frame.render_widget(text.block(block), area);
            return;
        }
        _ => {
            frame.render_widget(Paragraph::new("loading...").block(block), area);
            return;
        }
    };
    let kib = |v: &Value| {
        v.as_f64()
            .map_or_else(|| "-".to_string(), |b| format!("{:+.1}", b / 1024.0))
    };
    let rows: Vec<Row> = body["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let kept = r["kept_per_request"]["bytes"].as_f64().unwrap_or(0.0);
            // A route keeping a page or more per request stands out.
            let style = if kept >= 4096.0 {
                Style::new().fg(Color::Yellow)
            } else {
                Style::new()
            };
            Row::new(vec![
                Cell::from(r["route"].as_str().unwrap_or("?").to_string()),
                Cell::from(count(&r["requests"])),
                Cell::from(kib(&r["kept_per_request"]["bytes"])),
                Cell::from(kib(&r["median_delta_bytes"])),
                Cell::from(format!(
                    "{:.0}%",
                    r["grew_share"].as_f64().unwrap_or(0.0) * 100.0
                )),
            ])
            .style(style)
        })
        .collect();
    if rows.is_empty() {
        let text = match body["requests_without_path"].as_u64() {
            Some(n) if n > 0 => {
                format!("no route: {n} requests without an HTTP/1.x path (socket mode names them)")
            }
            _ => "no route recorded yet (socket mode, HTTP/1.x)".to_string(),
        };
        frame.render_widget(Paragraph::new(text).block(block), area);
        return;
    }
    let overflowed = body["overflowed_requests"].as_u64().unwrap_or(0);
    let block = if overflowed > 0 {
        block.title(format!(
            " routes ({overflowed} requests over --max-routes) "
        ))
    } else {
        block
    };
    let table = Table::new(
        rows,
        [
            Constraint::Min(16),
            Constraint::Length(7),
            Constraint::Length(10),
            Constraint::Length(10),
            Constraint::Length(5),
        ],
    )
    .header(Row::new(["ROUTE", "REQS", "KEPT KiB", "MEDIAN KiB", "GREW"]).bold())
    .block(block);
    frame.render_widget(table, area);
}

fn footer(model: &Model) -> Line<'static> {
    let key = |k: &str| Span::styled(k.to_string(), Style::new().reversed());
    Line::from(vec![
        key("q"),
        Span::raw(" quit  "),
        key("s"),
        Span::raw(format!(" sort: {}  ", model.sort.label())),
        key("↑↓jk"),
        Span::raw(" select  "),
        key("Enter"),
        Span::raw(if model.detail {
            " close details  "
        } else {
            " details  "
        }),
        key("o"),
        Span::raw(if model.show_routes {
            " requests  "
        } else {
            " routes  "
        }),
        key("r"),
        Span::raw(" refresh"),
    ])
}

/// Draws the whole screen from the model.
pub fn render(frame: &mut Frame, model: &Model) {
    let detail_height = if model.detail { 17 } else { 0 };
    let head_lines = header(model, frame.area().width);
    let [head, table, detail, foot] = Layout::vertical([
        Constraint::Length(head_lines.len() as u16),
        Constraint::Min(3),
        Constraint::Length(detail_height),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(head_lines), head);
    workers_table(frame, table, model);
    if model.detail {
        detail_pane(frame, detail, model);
    }
    frame.render_widget(Paragraph::new(footer(model)), foot);
}

// ---------------------------------------------------------------- the loop

/// What the fetcher thread is asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Job {
    status: bool,
    requests: Option<u32>,
}

impl Job {
    /// Jobs queued while a call ran (a key held down, a slow agent) become one.
    fn merge(self, later: Job) -> Job {
        Job {
            status: self.status || later.status,
            requests: later.requests.or(self.requests),
        }
    }
}

enum Fetched {
    Status {
        result: Result<Value, String>,
        at: Instant,
        unix: f64,
    },
    Requests {
        pid: u32,
        result: Result<Value, String>,
    },
    Routes {
        pid: u32,
        result: Result<Value, String>,
    },
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn fetch_loop(client: &Client, jobs: &Receiver<Job>, results: &Sender<Fetched>) {
    while let Ok(first) = jobs.recv() {
        let job = jobs.try_iter().fold(first, Job::merge);
        if job.status {
            let result = client
                .debug("status", None, None)
                .map_err(|e| e.to_string());
            let fetched = Fetched::Status {
                result,
                at: Instant::now(),
                unix: unix_now(),
            };
            if results.send(fetched).is_err() {
                return;
            }
        }
        if let Some(pid) = job.requests {
            let result = client
                .get(&format!(
                    "/v1/workers/{pid}/requests?limit={DETAIL_REQUESTS}"
                ))
                .map_err(|e| e.to_string());
            if results.send(Fetched::Requests { pid, result }).is_err() {
                return;
            }
            let result = client
                .get(&format!("/v1/workers/{pid}/routes"))
                .map_err(|e| e.to_string());
            if results.send(Fetched::Routes { pid, result }).is_err() {
                return;
            }
        }
    }
}

/// Restores the terminal however `run` ends; ratatui's panic hook restores
/// it before a panic message is printed.
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// Runs the live view until q.
pub fn run(client: Client, interval_secs: f64) -> Result<(), TopError> {
    if !(interval_secs.is_finite() && (0.1..=3600.0).contains(&interval_secs)) {
        return Err(TopError::BadInterval(interval_secs));
    }
    if !std::io::stdout().is_terminal() {
        return Err(TopError::NotATerminal);
    }
    let interval = Duration::from_secs_f64(interval_secs);
    let mut model = Model::new(client.url(), interval_secs);
    // The first call fails fast, before the screen is taken: a wrong URL or a
    // missing token will not fix itself, and the client's message (what to
    // set, where the agent should be) stays in the shell after we exit, where
    // a full-screen error would vanish. Later failures are passing (an agent
    // restarting) and are shown in the header while we retry.
    let first = client.debug("status", None, None)?;
    model.apply_status(&first, Instant::now(), unix_now());

    let (job_tx, job_rx) = mpsc::channel::<Job>();
    let (result_tx, result_rx) = mpsc::channel::<Fetched>();
    // Detached: a call blocked on a hung agent must not delay q.
    thread::Builder::new()
        .name("top-fetch".into())
        .spawn(move || fetch_loop(&client, &job_rx, &result_tx))?;

    interrupt::catch_stop_signals();
    let _guard = TerminalGuard;
    let mut terminal = ratatui::try_init()?;
    let mut next_refresh = Instant::now() + interval;
    let mut pending_since: Option<Instant> = None;
    let mut last_draw: Option<Instant> = None;
    let mut dirty = true;
    let send = |job: Job| job_tx.send(job).map_err(|_| TopError::FetcherStopped);
    loop {
        loop {
            match result_rx.try_recv() {
                Ok(Fetched::Status { result, at, unix }) => {
                    pending_since = None;
                    match result {
                        Ok(body) => model.apply_status(&body, at, unix),
                        Err(e) => model.apply_error(e),
                    }
                    dirty = true;
                }
                Ok(Fetched::Requests { pid, result }) => {
                    model.apply_requests(pid, result);
                    dirty = true;
                }
                Ok(Fetched::Routes { pid, result }) => {
                    model.apply_routes(pid, result);
                    dirty = true;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Err(TopError::FetcherStopped),
            }
        }
        let now = Instant::now();
        if pending_since.is_none() && now >= next_refresh {
            send(Job {
                status: true,
                requests: model.detail_pid(),
            })?;
            pending_since = Some(now);
            next_refresh = now + interval;
        }
        // A reply is overdue after two intervals (and at least 2 s): say so.
        let overdue = (2.0 * interval_secs).max(2.0);
        model.set_waiting(
            pending_since
                .map(|t| t.elapsed().as_secs_f64())
                .filter(|w| *w > overdue),
        );
        if dirty || last_draw.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            terminal.draw(|frame| render(frame, &model))?;
            last_draw = Some(Instant::now());
            dirty = false;
        }
        if interrupt::stop_requested() {
            return Ok(());
        }
        if !event::poll(Duration::from_millis(50))? {
            continue;
        }
        match event::read()? {
            Event::Key(key) if key.kind == KeyEventKind::Press => {
                dirty = true;
                match model.on_key(key) {
                    Action::Quit => return Ok(()),
                    Action::Refresh => {
                        send(Job {
                            status: true,
                            requests: model.detail_pid(),
                        })?;
                        pending_since.get_or_insert_with(Instant::now);
                        next_refresh = Instant::now() + interval;
                    }
                    Action::Requests(pid) => send(Job {
                        status: false,
                        requests: Some(pid),
                    })?,
                    Action::None => {}
                }
            }
            Event::Resize(..) => dirty = true,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use ratatui::{Terminal, backend::TestBackend, buffer::Buffer};
    use serde_json::json;

    use super::*;

    fn worker(pid: u32, rss_mb: u64, seen: u64, slope: Option<f64>, fired: bool) -> Value {
        json!({
            "pid": pid, "ppid": 1, "role": "worker", "name": "mt-demo-server", "alive": true,
            "rss_bytes": rss_mb << 20, "rss": {"file": 0, "anon": rss_mb << 20, "shmem": 0, "swap": 0},
            "pss_bytes": (rss_mb << 20) / 2, "uss_bytes": null,
            "requests_seen": seen, "requests_in_flight": 1, "faults": 10, "leak_detections": 1,
            "leak_detector": {
                "robust_slope": slope, "slope_lower_bound": slope, "slope_upper_bound": slope,
                "slope_mb_per_hour": slope.map(|s| s * 3600.0), "slope_threshold": 0.1,
                "forecast_requests_to_limit": 30.0, "forecast_seconds_to_limit": 90.0,
                "soft_limit_mb": 80.0, "soft_limit_fired": fired, "warming_up": slope.is_none(),
                "request_count": seen, "window_size": 20, "window_capacity": 60,
                "high_water_mark": rss_mb as f64, "axis": "requests"
            }
        })
    }

    fn status(workers: Vec<Value>) -> Value {
        json!({
            "agent": {"version": "9.8.7", "uptime_secs": 65.0, "selectors": "name=mt-demo-server",
                      "workers_alive": workers.len(), "events_received": 1234,
                      "kernel": {"ringbuf_drops": 0}, "collection_active": false,
                      "soft_limit": {"actions_taken": 3}},
            "workers": workers,
        })
    }

    fn model_with(workers: Vec<Value>) -> Model {
        let mut m = Model::new("http://127.0.0.1:9464", 0.5);
        m.apply_status(&status(workers), Instant::now(), 3600.0 * 3.0 + 61.0);
        m
    }

    fn draw(model: &Model, width: u16, height: u16) -> Buffer {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|f| render(f, model)).unwrap();
        terminal.backend().buffer().clone()
    }

    fn text(buf: &Buffer) -> String {
        let width = buf.area.width as usize;
        buf.content
            .chunks(width)
            .map(|row| row.iter().map(|c| c.symbol()).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn press(model: &mut Model, code: KeyCode) -> Action {
        model.on_key(KeyEvent::from(code))
    }

    #[test]
    fn live_workers_come_sorted_by_rss() {
        let mut dead = worker(30, 500, 0, None, false);
        dead["alive"] = json!(false);
        let m = model_with(vec![
            worker(10, 20, 5, None, false),
            worker(11, 40, 5, None, false),
            dead,
        ]);
        let pids: Vec<u32> = m.workers().iter().map(|w| w.pid).collect();
        assert_eq!(pids, [11, 10]);
        assert_eq!(m.selected_pid(), Some(11));
    }

    #[test]
    fn request_rate_comes_from_the_count_between_refreshes() {
        let t0 = Instant::now();
        let mut m = Model::new("u", 1.0);
        m.apply_status(&status(vec![worker(10, 20, 100, None, false)]), t0, 0.0);
        assert_eq!(m.workers()[0].req_per_sec, None, "no rate from one sample");
        m.apply_status(
            &status(vec![
                worker(10, 21, 110, None, false),
                worker(12, 5, 50, None, false),
            ]),
            t0 + Duration::from_secs(2),
            2.0,
        );
        let rate = |m: &Model, pid| {
            m.workers()
                .iter()
                .find(|w| w.pid == pid)
                .unwrap()
                .req_per_sec
        };
        assert_eq!(rate(&m, 10), Some(5.0));
        assert_eq!(rate(&m, 12), None, "a new worker has no rate yet");
        // A smaller count is another process under the same pid.
        m.apply_status(
            &status(vec![worker(10, 21, 3, None, false)]),
            t0 + Duration::from_secs(3),
            3.0,
        );
        assert_eq!(rate(&m, 10), None);
    }

    #[test]
    fn request_rate_is_smoothed_over_the_window() {
        // One request every second, refreshed every half second: single
        // deltas read 0 and 2 by turns; the window reads 1.
        let t0 = Instant::now();
        let mut m = Model::new("u", 0.5);
        for i in 0..30u64 {
            m.apply_status(
                &status(vec![worker(10, 20, i / 2, None, false)]),
                t0 + Duration::from_millis(500 * i),
                0.0,
            );
            if i >= 12 {
                let rate = m.workers()[0].req_per_sec.unwrap();
                assert!((rate - 1.0).abs() <= 0.11, "refresh {i}: {rate}");
            }
        }
        // Refreshes further apart than the window still get a rate.
        let mut m = Model::new("u", 10.0);
        for i in 0..3u64 {
            m.apply_status(
                &status(vec![worker(10, 20, 40 * i, None, false)]),
                t0 + Duration::from_secs(10 * i),
                0.0,
            );
        }
        assert_eq!(m.workers()[0].req_per_sec, Some(4.0));
    }

    #[test]
    fn history_is_capped_and_dropped_with_its_worker() {
        let t0 = Instant::now();
        let mut m = Model::new("u", 1.0);
        for i in 0..(HISTORY_LEN as u64 + 10) {
            m.apply_status(
                &status(vec![
                    worker(10, 20 + i, i, None, false),
                    worker(11, 20, i, None, false),
                ]),
                t0 + Duration::from_secs(i),
                i as f64,
            );
        }
        let rss = m.rss_history(10);
        assert_eq!(rss.len(), HISTORY_LEN);
        assert_eq!(rss.last(), Some(&((20 + HISTORY_LEN as u64 + 9) << 20)));
        m.apply_status(&status(vec![worker(11, 20, 100, None, false)]), t0, 100.0);
        assert!(!m.history.contains_key(&10));
        assert_eq!(m.workers().len(), 1);
    }

    #[test]
    fn sparkline_text_scales_growth_and_flattens_noise() {
        let growth: Vec<u64> = (0..8).map(|i| (10 + i) << 20).collect();
        assert_eq!(sparkline_text(&growth), "▁▂▃▄▅▆▇█");
        assert_eq!(
            sparkline_text(&[10 << 20, (10 << 20) + 4096, 10 << 20]),
            "▁▁▁"
        );
        assert_eq!(sparkline_text(&[]), "");
    }

    #[test]
    fn o_shows_the_routes_of_the_selected_worker() {
        let mut m = model_with(vec![worker(10, 30, 10, Some(1.0), false)]);
        assert_eq!(press(&mut m, KeyCode::Enter), Action::Requests(10));
        m.apply_routes(
            10,
            Ok(json!({"pid": 10, "routes": {
            "max_routes": 100, "overflowed_requests": 3, "requests_without_path": 0,
            "routes": [
                {"route": "GET /quote", "requests": 120, "kept_per_request": {"bytes": 31744.0},
                 "median_delta_bytes": 32768.0, "grew_share": 0.98},
                {"route": "GET /health", "requests": 400, "kept_per_request": {"bytes": 0.0},
                 "median_delta_bytes": 0.0, "grew_share": 0.01}
            ]}})),
        );
        assert!(!text(&draw(&m, 180, 30)).contains("GET /quote"));
        assert_eq!(press(&mut m, KeyCode::Char('o')), Action::None);
        assert!(m.showing_routes());
        let screen = text(&draw(&m, 180, 30));
        for needle in [
            "GET /quote",
            "+31.0",
            "98%",
            "GET /health",
            "3 requests over --max-routes",
            "o requests",
        ] {
            assert!(screen.contains(needle), "{needle:?} missing in\n{screen}");
        }
    }

    #[test]
    fn clock_is_utc_hours_minutes_seconds() {
        assert_eq!(clock(3600.0 * 27.0 + 62.5), "03:01:02 UTC");
    }

    #[test]
    fn screen_shows_agent_workers_and_sort() {
        let m = model_with(vec![
            worker(4242, 30, 10, Some(1.004), false),
            worker(4343, 81, 10, Some(0.5), true),
        ]);
        let screen = text(&draw(&m, 180, 20));
        for needle in [
            "agent 9.8.7",
            "up 65s",
            "name=mt-demo-server",
            "http://127.0.0.1:9464",
            "workers 2 live",
            "events 1234",
            "ring-buffer drops 0",
            "collection off",
            "soft-limit actions 3",
            "refreshed 03:01:01 UTC, every 0.5s",
            "sort: RSS ▼",
            "RSS MB▼",
            "4242",
            "4343",
            "mt-demo-server",
            "1.004",
            "LIMIT HIT",
            "90s",
            "q quit",
        ] {
            assert!(screen.contains(needle), "{needle:?} missing in\n{screen}");
        }
        // Sorted by RSS: the 81 MB worker first.
        assert!(screen.find("4343").unwrap() < screen.find("4242").unwrap());
    }

    #[test]
    fn s_cycles_the_sort_and_the_screen_says_so() {
        let mut m = model_with(vec![
            worker(10, 30, 10, Some(1.0), false),
            worker(11, 50, 10, Some(0.2), false),
            worker(12, 10, 10, None, false),
        ]);
        let order = |m: &Model| m.workers().iter().map(|w| w.pid).collect::<Vec<_>>();
        assert_eq!(order(&m), [11, 10, 12]);
        assert_eq!(press(&mut m, KeyCode::Char('s')), Action::None);
        assert_eq!(m.sort(), SortKey::Slope);
        assert_eq!(order(&m), [10, 11, 12], "no slope sorts last");
        let screen = text(&draw(&m, 180, 20));
        assert!(screen.contains("sort: SLOPE ▼"), "{screen}");
        assert!(screen.contains("SLOPE MB/req▼"), "{screen}");
        press(&mut m, KeyCode::Char('s'));
        assert_eq!(m.sort(), SortKey::ReqRate);
        press(&mut m, KeyCode::Char('s'));
        assert_eq!(m.sort(), SortKey::Pid);
        assert_eq!(order(&m), [10, 11, 12]);
        assert!(text(&draw(&m, 180, 20)).contains("sort: PID ▲"));
        press(&mut m, KeyCode::Char('s'));
        assert_eq!(m.sort(), SortKey::Rss);
    }

    #[test]
    fn selection_moves_and_follows_its_worker() {
        let mut m = model_with(vec![
            worker(10, 30, 10, None, false),
            worker(11, 50, 10, None, false),
            worker(12, 10, 10, None, false),
        ]);
        assert_eq!(m.selected_pid(), Some(11));
        press(&mut m, KeyCode::Down);
        press(&mut m, KeyCode::Char('j'));
        press(&mut m, KeyCode::Char('j'));
        assert_eq!(m.selected_pid(), Some(12), "stops at the last row");
        press(&mut m, KeyCode::Char('k'));
        assert_eq!(m.selected_pid(), Some(10));
        // Re-sorting keeps the same worker selected.
        press(&mut m, KeyCode::Char('s'));
        press(&mut m, KeyCode::Char('s'));
        press(&mut m, KeyCode::Char('s'));
        assert_eq!(m.selected_pid(), Some(10));
        // Sorted by pid now: select the middle row; when it exits, the row
        // that took its place is selected.
        press(&mut m, KeyCode::Char('j'));
        assert_eq!(m.selected_pid(), Some(11));
        m.apply_status(
            &status(vec![
                worker(10, 30, 10, None, false),
                worker(12, 10, 10, None, false),
            ]),
            Instant::now(),
            0.0,
        );
        assert_eq!(m.selected_pid(), Some(12));
    }

    #[test]
    fn quit_keys_and_refresh() {
        let mut m = model_with(vec![worker(10, 30, 10, None, false)]);
        assert_eq!(press(&mut m, KeyCode::Char('q')), Action::Quit);
        assert_eq!(press(&mut m, KeyCode::Esc), Action::Quit);
        assert_eq!(
            m.on_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Action::Quit
        );
        assert_eq!(press(&mut m, KeyCode::Char('r')), Action::Refresh);
    }

    #[test]
    fn enter_opens_details_with_sparkline_detector_and_requests() {
        let t0 = Instant::now();
        let mut m = Model::new("u", 1.0);
        for i in 0..10 {
            m.apply_status(
                &status(vec![
                    worker(10, 20 + i, i, Some(1.004), false),
                    worker(11, 5, i, None, false),
                ]),
                t0 + Duration::from_secs(i),
                i as f64,
            );
        }
        assert_eq!(press(&mut m, KeyCode::Enter), Action::Requests(10));
        assert_eq!(m.detail_pid(), Some(10));
        assert!(text(&draw(&m, 160, 40)).contains("loading..."));
        m.apply_requests(
            10,
            Ok(json!({"pid": 10, "requests": [
                {"request_id": "10-9", "duration_ms": 0.97, "rss_after_bytes": 29u64 << 20,
                 "delta_bytes": 1u64 << 20, "faults": 257, "level": "normal"},
                {"request_id": "10-8", "duration_ms": 0.65, "rss_after_bytes": 28u64 << 20,
                 "delta_bytes": 1u64 << 20, "faults": 256, "level": "spike_detected"}
            ]})),
        );
        let buf = draw(&m, 160, 40);
        let screen = text(&buf);
        for needle in [
            "worker 10 mt-demo-server (worker)",
            "RSS over the last 10 refreshes: 20.0 .. 29.0 MB, now 29.0 MB",
            "leak detector",
            "1.004 MB/req",
            "warming up      no",
            "80 MB",
            "10-9",
            "10-8",
            "+1.00",
            "spike_detected",
            "close details",
        ] {
            assert!(screen.contains(needle), "{needle:?} missing in\n{screen}");
        }
        // The Sparkline widget drew bars, full height for the newest sample.
        assert!(screen.contains('█'), "{screen}");
        // Moving the selection asks for the other worker's requests.
        // A failed fetch keeps what was shown for that worker.
        m.apply_requests(10, Err("cannot reach the agent".into()));
        assert!(text(&draw(&m, 160, 40)).contains("10-9"));
        assert_eq!(press(&mut m, KeyCode::Down), Action::Requests(11));
        assert!(text(&draw(&m, 160, 40)).contains("loading..."));
        m.apply_requests(11, Err("the agent answered 404: no traced process".into()));
        assert!(text(&draw(&m, 160, 40)).contains("404: no traced process"));
        assert_eq!(press(&mut m, KeyCode::Enter), Action::None);
        assert_eq!(m.detail_pid(), None);
        assert!(!text(&draw(&m, 160, 40)).contains("leak detector"));
    }

    #[test]
    fn an_error_is_shown_in_red_and_cleared_by_the_next_refresh() {
        let mut m = model_with(vec![worker(4242, 30, 10, None, false)]);
        m.apply_error("cannot reach the agent at http://127.0.0.1:9464: connection refused");
        let buf = draw(&m, 180, 20);
        let screen = text(&buf);
        assert!(
            screen.contains(
                "ERROR (data from 03:01:01 UTC, retrying every 0.5s): cannot reach the agent at http://127.0.0.1:9464"
            ),
            "{screen}"
        );
        assert!(screen.contains("4242"), "the last data stays: {screen}");
        let line = screen.lines().position(|l| l.contains("ERROR")).unwrap();
        let col = screen.lines().nth(line).unwrap().find("ERROR").unwrap();
        assert_eq!(buf[(col as u16, line as u16)].fg, Color::Red);
        m.apply_status(
            &status(vec![worker(4242, 31, 12, None, false)]),
            Instant::now(),
            0.0,
        );
        assert!(!text(&draw(&m, 180, 20)).contains("ERROR"));
    }

    #[test]
    fn a_slow_agent_is_reported() {
        let mut m = model_with(vec![worker(1, 30, 10, None, false)]);
        m.set_waiting(Some(12.0));
        assert!(text(&draw(&m, 180, 20)).contains("the agent has not answered for 12s"));
    }

    #[test]
    fn on_80_columns_the_header_wraps_and_the_details_fit() {
        let mut m = model_with(vec![worker(4242, 30, 10, Some(1.004), false)]);
        press(&mut m, KeyCode::Enter);
        m.apply_requests(
            4242,
            Ok(
                json!({"requests": [{"request_id": "4242-17", "duration_ms": 0.5,
                "rss_after_bytes": 30u64 << 20, "delta_bytes": 1u64 << 20, "faults": 257,
                "level": "high_memory_usage"}]}),
            ),
        );
        let error = "cannot reach the agent at http://127.0.0.1:9464: io: Connection refused \
                     (os error 111) (is `memtrace agent` running, with --listen on that address?)";
        m.apply_error(error);
        let screen = text(&draw(&m, 80, 40));
        let words: Vec<&str> = screen.split_whitespace().collect();
        for needle in ["soft-limit actions 3", "4242-17", "+1.00", "high mem"] {
            assert!(screen.contains(needle), "{needle:?} missing in\n{screen}");
        }
        // Every word of the error is on screen, in order.
        let at = words.iter().position(|w| *w == "ERROR").unwrap();
        let shown = words[at..].join(" ");
        assert!(shown.contains(error), "{screen}");
    }

    #[test]
    fn a_narrow_terminal_keeps_the_key_columns_and_the_newest_samples() {
        let t0 = Instant::now();
        let mut m = Model::new("u", 1.0);
        for i in 0..HISTORY_LEN as u64 {
            m.apply_status(
                &status(vec![worker(10, 20 + i, i, Some(1.0), false)]),
                t0 + Duration::from_secs(i),
                0.0,
            );
        }
        let wide = text(&draw(&m, 130, 10));
        assert!(wide.contains("PSS MB") && wide.contains("ROLE"), "{wide}");
        let screen = text(&draw(&m, 80, 24));
        for column in [
            "PID",
            "NAME",
            "RSS MB▼",
            "SLOPE MB/req",
            "REQ/S",
            "INFL",
            "TO LIMIT",
            "RSS HIST",
        ] {
            assert!(screen.contains(column), "{column:?} missing in\n{screen}");
        }
        assert!(!screen.contains("PSS MB"), "{screen}");
        for width in [130, 80] {
            let screen = text(&draw(&m, width, 10));
            let row = screen.lines().find(|l| l.contains("> 10")).unwrap();
            assert!(row.trim_end().ends_with('█'), "{row}");
            assert!(row.contains("1.000"), "{row}");
        }
    }

    #[test]
    fn jobs_merge() {
        let a = Job {
            status: true,
            requests: Some(1),
        };
        let b = Job {
            status: false,
            requests: Some(2),
        };
        assert_eq!(
            a.merge(b),
            Job {
                status: true,
                requests: Some(2)
            }
        );
        assert_eq!(b.merge(Job::default()).requests, Some(2));
    }
}
