//! Query strings of the API, parsed strictly: a parameter given twice, an
//! unknown one, a limit that is not a positive integer or a query that is
//! too long is a 400 with a message, never a crash (the plan's version died
//! on `limit=abc`).
use std::fmt;

use crate::sites::{
    render::ProfileFormat,
    view::{SiteOptions, SiteView, hide_regex},
};

/// Longer query strings are refused (414) before they are parsed.
pub const MAX_QUERY_LEN: usize = 4096;
/// Rows returned when no limit is given.
pub const DEFAULT_LIMIT: usize = 20;
/// Larger limits are capped to this.
pub const MAX_LIMIT: usize = 1000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueryError {
    TooLong(usize),
    Repeated(String),
    Unknown {
        name: String,
        valid: &'static [&'static str],
    },
    BadLimit(String),
    BadPid(String),
    UnknownAction(String),
    BadFormat(String),
    FormatNotFor(&'static str),
    BadView(String),
    BadBool {
        name: &'static str,
        value: String,
    },
    BadHide(String),
    NotFor {
        name: &'static str,
        action: &'static str,
    },
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLong(n) => write!(
                f,
                "query string of {n} bytes is longer than {MAX_QUERY_LEN}"
            ),
            Self::Repeated(p) => write!(f, "parameter `{p}` is given more than once"),
            Self::Unknown { name, valid } => {
                write!(
                    f,
                    "unknown parameter `{}`; valid: {}",
                    truncate(name),
                    valid.join(", ")
                )
            }
            Self::BadLimit(v) => {
                write!(f, "limit must be a positive integer, not `{}`", truncate(v))
            }
            Self::BadPid(v) => write!(f, "pid must be a process id, not `{}`", truncate(v)),
            Self::BadFormat(v) => write!(
                f,
                "unknown format `{}`; valid: {}",
                truncate(v),
                ProfileFormat::NAMES.join(", ")
            ),
            Self::FormatNotFor(action) => {
                write!(f, "format applies to snapshot and diff, not to {action}")
            }
            Self::BadView(v) => write!(
                f,
                "unknown view `{}`; valid: {}",
                truncate(v),
                SiteView::NAMES.join(", ")
            ),
            Self::BadBool { name, value } => {
                write!(f, "{name} must be true or false, not `{}`", truncate(value))
            }
            Self::BadHide(e) => write!(f, "{}", truncate(e)),
            Self::NotFor { name, action } => {
                write!(f, "{name} applies to snapshot and diff, not to {action}")
            }
            Self::UnknownAction(a) => write!(
                f,
                "unknown action `{}`; valid actions: {}",
                truncate(a),
                Action::NAMES.join(", ")
            ),
        }
    }
}

/// Echoed input is cut short so an error never repeats a huge value.
fn truncate(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        s.to_string()
    } else {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}

/// The actions of `/debug/memory/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Status,
    Snapshot,
    Diff,
    Stop,
}

impl Action {
    pub const NAMES: &'static [&'static str] = &["status", "snapshot", "diff", "stop"];

    fn parse(s: &str) -> Result<Self, QueryError> {
        match s {
            "status" => Ok(Self::Status),
            "snapshot" => Ok(Self::Snapshot),
            "diff" => Ok(Self::Diff),
            "stop" => Ok(Self::Stop),
            other => Err(QueryError::UnknownAction(other.to_string())),
        }
    }
}

/// Decoded `name=value` pairs, each name at most once.
fn pairs(raw: &str, valid: &'static [&'static str]) -> Result<Vec<(String, String)>, QueryError> {
    if raw.len() > MAX_QUERY_LEN {
        return Err(QueryError::TooLong(raw.len()));
    }
    let mut out: Vec<(String, String)> = Vec::new();
    for (name, value) in form_urlencoded::parse(raw.as_bytes()) {
        if !valid.contains(&name.as_ref()) {
            return Err(QueryError::Unknown {
                name: name.into_owned(),
                valid,
            });
        }
        if out.iter().any(|(n, _)| n == &name) {
            return Err(QueryError::Repeated(name.into_owned()));
        }
        out.push((name.into_owned(), value.into_owned()));
    }
    Ok(out)
}

fn get<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// A positive integer; very large ones are capped, not refused.
pub fn parse_limit(value: Option<&str>) -> Result<usize, QueryError> {
    let Some(v) = value else {
        return Ok(DEFAULT_LIMIT);
    };
    let digits = v.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(QueryError::BadLimit(v.to_string()));
    }
    match digits.parse::<u64>() {
        Ok(0) => Err(QueryError::BadLimit(v.to_string())),
        Ok(n) => Ok((n.min(MAX_LIMIT as u64)) as usize),
        // All digits but more than u64 holds: a large limit, capped.
        Err(_) => Ok(MAX_LIMIT),
    }
}

pub fn parse_pid(value: &str) -> Result<u32, QueryError> {
    match value.trim().parse::<u32>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(QueryError::BadPid(value.to_string())),
    }
}

/// `/debug/memory/?action=...&limit=...&pid=...&token=...`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebugQuery {
    pub action: Action,
    pub limit: usize,
    pub pid: Option<u32>,
    pub token: Option<String>,
    /// snapshot and diff: another format than JSON.
    pub format: Option<ProfileFormat>,
    /// snapshot and diff: how Python sites are grouped and named.
    pub sites: SiteOptions,
}

fn parse_bool(name: &'static str, value: &str) -> Result<bool, QueryError> {
    match value {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(QueryError::BadBool {
            name,
            value: value.to_string(),
        }),
    }
}

pub fn parse_debug(raw: &str) -> Result<DebugQuery, QueryError> {
    const VALID: &[&str] = &[
        "action",
        "limit",
        "pid",
        "token",
        "format",
        "view",
        "still_growing",
        "hide",
        "app_path",
    ];
    let p = pairs(raw, VALID)?;
    // The plan's default.
    let action = get(&p, "action").map_or(Ok(Action::Status), Action::parse)?;
    let format = get(&p, "format")
        .map(|f| ProfileFormat::parse(f).map_err(|_| QueryError::BadFormat(f.to_string())))
        .transpose()?
        .flatten();
    match (action, format) {
        (Action::Status, Some(_)) => return Err(QueryError::FormatNotFor("status")),
        (Action::Stop, Some(_)) => return Err(QueryError::FormatNotFor("stop")),
        _ => {}
    }
    let other = match action {
        Action::Status => Some("status"),
        Action::Stop => Some("stop"),
        Action::Snapshot | Action::Diff => None,
    };
    for name in ["view", "still_growing", "hide", "app_path"] {
        if let (Some(action), Some(_)) = (other, get(&p, name)) {
            return Err(QueryError::NotFor { name, action });
        }
    }
    let hide = get(&p, "hide").map(str::to_string);
    if let Some(h) = &hide {
        hide_regex(h).map_err(QueryError::BadHide)?;
    }
    let sites = SiteOptions {
        view: get(&p, "view")
            .map(|v| v.parse().map_err(|_| QueryError::BadView(v.to_string())))
            .transpose()?
            .unwrap_or_default(),
        still_growing: get(&p, "still_growing")
            .map(|v| parse_bool("still_growing", v))
            .transpose()?
            .unwrap_or(false),
        hide,
        app_path: get(&p, "app_path").map(str::to_string),
    };
    Ok(DebugQuery {
        action,
        limit: parse_limit(get(&p, "limit"))?,
        pid: get(&p, "pid").map(parse_pid).transpose()?,
        token: get(&p, "token").map(str::to_string),
        format,
        sites,
    })
}

/// `/debug/pprof/heap?pid=...&token=...`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PprofQuery {
    pub pid: Option<u32>,
    pub token: Option<String>,
}

pub fn parse_pprof(raw: &str) -> Result<PprofQuery, QueryError> {
    const VALID: &[&str] = &["pid", "token"];
    let p = pairs(raw, VALID)?;
    Ok(PprofQuery {
        pid: get(&p, "pid").map(parse_pid).transpose()?,
        token: get(&p, "token").map(str::to_string),
    })
}

/// Queries of the REST API: `?limit=N&token=...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListQuery {
    pub limit: usize,
    pub token: Option<String>,
}

pub fn parse_list(raw: &str) -> Result<ListQuery, QueryError> {
    const VALID: &[&str] = &["limit", "token"];
    let p = pairs(raw, VALID)?;
    Ok(ListQuery {
        limit: parse_limit(get(&p, "limit"))?,
        token: get(&p, "token").map(str::to_string),
    })
}

/// The token parameter, read leniently (other parameters may be malformed),
/// so that authorization is decided before the query is judged. A token
/// given twice is no token.
pub fn lenient_token(raw: &str) -> Option<String> {
    if raw.len() > MAX_QUERY_LEN {
        return None;
    }
    let mut tokens = form_urlencoded::parse(raw.as_bytes())
        .filter(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned());
    let first = tokens.next()?;
    tokens.next().is_none().then_some(first)
}

/// Just the token, for endpoints with no other parameter.
pub fn parse_token_only(raw: &str) -> Result<Option<String>, QueryError> {
    const VALID: &[&str] = &["token"];
    let p = pairs(raw, VALID)?;
    Ok(get(&p, "token").map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_to_status() {
        let q = parse_debug("").unwrap();
        assert_eq!(q.action, Action::Status);
        assert_eq!(q.limit, DEFAULT_LIMIT);
        assert_eq!(q.pid, None);
        assert_eq!(q.token, None);
    }

    #[test]
    fn parses_everything() {
        let q = parse_debug("action=diff&limit=5&pid=42&token=s%20t&format=pprof").unwrap();
        assert_eq!(
            q,
            DebugQuery {
                action: Action::Diff,
                limit: 5,
                pid: Some(42),
                token: Some("s t".into()),
                format: Some(ProfileFormat::Pprof),
                sites: SiteOptions::default(),
            }
        );
        let q = parse_debug("action=diff&view=lineno&still_growing=1&hide=%5Edjango&app_path=/srv")
            .unwrap();
        assert_eq!(
            q.sites,
            SiteOptions {
                view: SiteView::Lineno,
                still_growing: true,
                hide: Some("^django".into()),
                app_path: Some("/srv".into()),
            }
        );
    }

    #[test]
    fn site_options_are_checked() {
        let e = parse_debug("action=diff&view=nope")
            .unwrap_err()
            .to_string();
        assert!(e.contains("app, lineno, traceback"), "{e}");
        assert!(matches!(
            parse_debug("action=diff&still_growing=maybe"),
            Err(QueryError::BadBool { .. })
        ));
        assert!(matches!(
            parse_debug("action=diff&hide=("),
            Err(QueryError::BadHide(_))
        ));
        assert!(matches!(
            parse_debug("action=status&view=app"),
            Err(QueryError::NotFor { .. })
        ));
    }

    #[test]
    fn limits() {
        assert!(matches!(
            parse_limit(Some("abc")),
            Err(QueryError::BadLimit(_))
        ));
        assert!(matches!(
            parse_limit(Some("-1")),
            Err(QueryError::BadLimit(_))
        ));
        assert!(matches!(
            parse_limit(Some("0")),
            Err(QueryError::BadLimit(_))
        ));
        assert!(matches!(
            parse_limit(Some("")),
            Err(QueryError::BadLimit(_))
        ));
        assert!(matches!(
            parse_limit(Some("1.5")),
            Err(QueryError::BadLimit(_))
        ));
        assert_eq!(parse_limit(Some("1000000000")), Ok(MAX_LIMIT));
        assert_eq!(
            parse_limit(Some("99999999999999999999999999")),
            Ok(MAX_LIMIT)
        );
        assert_eq!(parse_limit(Some("7")), Ok(7));
    }

    #[test]
    fn refuses_repeats_unknowns_and_long_queries() {
        assert_eq!(
            parse_debug("action=status&action=stop"),
            Err(QueryError::Repeated("action".into()))
        );
        assert!(matches!(
            parse_debug("foo=1"),
            Err(QueryError::Unknown { .. })
        ));
        let long = format!("token={}", "a".repeat(MAX_QUERY_LEN));
        assert!(matches!(parse_debug(&long), Err(QueryError::TooLong(_))));
        let e = parse_debug("action=explode").unwrap_err().to_string();
        assert!(e.contains("status, snapshot, diff, stop"), "{e}");
        assert!(matches!(parse_debug("pid=abc"), Err(QueryError::BadPid(_))));
        assert!(matches!(parse_debug("pid=0"), Err(QueryError::BadPid(_))));
    }

    #[test]
    fn echoed_values_are_truncated() {
        let e = parse_debug(&format!("action={}", "x".repeat(500)))
            .unwrap_err()
            .to_string();
        assert!(e.len() < 200, "{e}");
    }
}
