//! Property-based ("fuzz") tests of every parser that reads outside input:
//! HTTP query strings, tracefs `format` files, ring-buffer records from the
//! kernel, the configuration (TOML file and flags), probe targets, signal
//! names, symbol suggestions and process selectors.
//!
//! The main property everywhere is that a parser returns `Ok` or a clean
//! error for any input, never panics; the others check each parser's
//! contract on generated well-formed input.
//!
//! The tests read no environment variable of their own and set none: the
//! configuration is built from `AgentArgs::default()`, a temporary file and
//! flags, so `MEMTRACE_*` variables in the environment cannot change what
//! is checked.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use clap::Parser as _;
use memtrace::{
    api::query::{
        Action, DEFAULT_LIMIT, DebugQuery, ListQuery, MAX_LIMIT, MAX_QUERY_LEN, QueryError,
        lenient_token, parse_debug, parse_limit, parse_list, parse_pid, parse_pprof,
        parse_token_only,
    },
    cli::{
        args::{Cli, Command},
        settings::{AgentArgs, ConfigError, ResolvedAgent, parse_probe_target},
    },
    judge::softlimit::parse_signal,
    kernel::{
        events::{DecodeError, KernelEvent, c_str, decode},
        tracefs::{Field, parse_format},
        uprobes::nearest,
    },
    model::{
        procinfo::ProcessView,
        selectors::{MatchReason, Selectors},
    },
};
use proptest::{
    collection::{btree_map, btree_set, vec},
    option,
    prelude::*,
    sample::select,
};

/// Proptest settings: `cases` per test, and no regression files written
/// into the source tree.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Any text, newlines included, up to `max` chars.
fn any_text(max: usize) -> impl Strategy<Value = String> {
    vec(any::<char>(), 0..=max).prop_map(|v| v.into_iter().collect())
}

/// `fragment` repeated to about `max_bytes` bytes at most.
fn repeated(
    fragment: impl Strategy<Value = String>,
    max_bytes: usize,
) -> impl Strategy<Value = String> {
    (fragment, 1..=max_bytes).prop_map(|(f, n)| {
        let f = if f.is_empty() { "x".to_string() } else { f };
        f.repeat(n.div_ceil(f.len()))
    })
}

// ---------------------------------------------------------------------------
// HTTP query strings (`memtrace::api::query`)
// ---------------------------------------------------------------------------
//
// The raw query string of a request to the debug and REST APIs: whatever a
// client (or an attacker) puts after the `?`.

/// The three strict query parsers, with the parameter names each accepts.
#[derive(Clone, Copy, Debug)]
enum QueryParser {
    Debug,
    List,
    TokenOnly,
    Pprof,
}

impl QueryParser {
    const ALL: [Self; 4] = [Self::Debug, Self::List, Self::TokenOnly, Self::Pprof];

    fn valid(self) -> &'static [&'static str] {
        match self {
            Self::Debug => &[
                "action",
                "limit",
                "pid",
                "token",
                "format",
                "view",
                "still_growing",
                "hide",
                "app_path",
            ],
            Self::List => &["limit", "token"],
            Self::TokenOnly => &["token"],
            Self::Pprof => &["pid", "token"],
        }
    }

    fn run(self, raw: &str) -> Result<(), QueryError> {
        match self {
            Self::Debug => parse_debug(raw).map(drop),
            Self::List => parse_list(raw).map(drop),
            Self::TokenOnly => parse_token_only(raw).map(drop),
            Self::Pprof => parse_pprof(raw).map(drop),
        }
    }
}

fn query_parser() -> impl Strategy<Value = QueryParser> {
    select(QueryParser::ALL.to_vec())
}

/// Bytes form_urlencoded passes through literally in a query.
fn is_literal(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~*!:/,;@$()'".contains(&b)
}

/// Encodes `s` for a query, one choice per byte from `modes`: `%XX`, `%xx`,
/// the byte itself when it is safe, `+` for a space. Decoding gives `s` back.
fn encode_with(s: &str, modes: &[u8]) -> String {
    let mut out = String::new();
    for (i, b) in s.bytes().enumerate() {
        match (b, modes.get(i).copied().unwrap_or(0) % 4) {
            (b' ', 1) => out.push('+'),
            (b, 1 | 2) if is_literal(b) => out.push(char::from(b)),
            (b, 3) => write!(out, "%{b:02x}").unwrap(),
            (b, _) => write!(out, "%{b:02X}").unwrap(),
        }
    }
    out
}

/// A text and one of its query encodings: `(decoded, encoded)`.
fn encoded(text: impl Strategy<Value = String>) -> impl Strategy<Value = (String, String)> {
    text.prop_flat_map(|s| {
        let n = s.len();
        (Just(s), vec(any::<u8>(), n))
    })
    .prop_map(|(s, modes)| {
        let e = encode_with(&s, &modes);
        (s, e)
    })
}

/// Joins `name=value` segments with `&`, adding empty segments (`&&`, a
/// leading or trailing `&`) as `seps` says; form_urlencoded skips those.
fn join_segments(segments: &[String], seps: u64) -> String {
    let mut out = String::new();
    if seps & 1 != 0 {
        out.push('&');
    }
    for (i, s) in segments.iter().enumerate() {
        if i > 0 {
            out.push('&');
            if seps >> (1 + i % 60) & 1 != 0 {
                out.push('&');
            }
        }
        out.push_str(s);
    }
    if seps >> 63 != 0 {
        out.push('&');
    }
    out
}

/// Pieces that query strings are made of, and ways they go wrong.
fn query_fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(vec![
            "&", "=", "&&", "==", "+", "%", "%2", "%%", "%ZZ", "%zz", "%FF", "%C3", "%C3%28", "%E2%82",
            "%F0%9F%98", "%00", "%26", "%3D", "%2B", "action", "limit", "pid", "token", "action=",
            "limit=", "pid=", "token=", "status", "snapshot", "diff", "stop", "0", "-1", "1e3",
            "18446744073709551616", "99999999999999999999999", "4294967296", " ", "\t", "\n", "#", "?",
            ";", "é", "\u{0}", "\u{feff}", "\u{202e}", "Ω≈ç√",
        ])
        .prop_map(str::to_string),
        1 => "[a-z0-9]{1,8}",
        1 => "%[0-9A-Fa-f]{0,2}",
        1 => "%[G-Zg-z]{1,2}",
        1 => any::<char>().prop_map(String::from),
    ]
}

/// Arbitrary query strings, from short random text to ~10 KB of fragments.
fn query_garbage() -> impl Strategy<Value = String> {
    prop_oneof![
        any_text(64),
        vec(query_fragment(), 0..64).prop_map(|v| v.concat()),
        vec(query_fragment(), 0..2000).prop_map(|v| v.concat()),
        repeated(query_fragment(), 10_000),
        any_text(10_000),
    ]
}

/// Longest Display text of a query error: errors never echo big input.
const MAX_ERROR_LEN: usize = 200;

fn check_error_len(e: &QueryError) -> Result<(), TestCaseError> {
    let text = e.to_string();
    prop_assert!(!text.is_empty());
    prop_assert!(
        text.len() <= MAX_ERROR_LEN,
        "error of {} bytes: {text}",
        text.len()
    );
    Ok(())
}

const ACTIONS: [(&str, Action); 4] = [
    ("status", Action::Status),
    ("snapshot", Action::Snapshot),
    ("diff", Action::Diff),
    ("stop", Action::Stop),
];

/// A well-formed debug query and what it must parse to.
fn debug_query() -> impl Strategy<Value = (String, DebugQuery)> {
    (
        option::of(select(ACTIONS.to_vec())),
        option::of((1u64..=1_000_000_000_000, 0usize..3)),
        option::of((1u32..=u32::MAX, 0usize..3)),
        option::of(encoded(any_text(200))),
        vec(any::<u8>(), 96),
        any::<u64>(),
    )
        .prop_flat_map(|(action, limit, pid, token, modes, seps)| {
            let mut segments = Vec::new();
            let mut modes = modes.chunks(32).map(<[u8]>::to_vec);
            let mut pair = |name: &str, value: &str| {
                let m = modes.next().unwrap_or_default();
                segments.push(format!(
                    "{}={}",
                    encode_with(name, &m),
                    encode_with(value, &m[8..])
                ));
            };
            if let Some((name, _)) = action {
                pair("action", name);
            }
            if let Some((n, zeros)) = limit {
                pair("limit", &format!("{}{n}", "0".repeat(zeros)));
            }
            if let Some((p, zeros)) = pid {
                pair("pid", &format!("{}{p}", "0".repeat(zeros)));
            }
            if let Some((_, enc)) = &token {
                segments.push(format!("token={enc}"));
            }
            let expected = DebugQuery {
                action: action.map_or(Action::Status, |(_, a)| a),
                limit: limit.map_or(DEFAULT_LIMIT, |(n, _)| n.min(MAX_LIMIT as u64) as usize),
                pid: pid.map(|(p, _)| p),
                token: token.map(|(t, _)| t),
                format: None,
                sites: Default::default(),
            };
            (Just(segments).prop_shuffle(), Just(expected), Just(seps))
        })
        .prop_map(|(segments, expected, seps)| (join_segments(&segments, seps), expected))
}

/// Parameter names that are almost valid, and arbitrary ones.
fn near_miss_name() -> impl Strategy<Value = String> {
    prop_oneof![
        select(vec![
            "", "Token", "TOKEN", "token ", " token", "tokens", "toke", "token\0", "actions",
            "Action", "limit[]", "pid=", "pid ", "lim it", "callback", "_", "é", "token%",
            "%74oken",
        ])
        .prop_map(str::to_string),
        any_text(40),
    ]
}

proptest! {
    #![proptest_config(config(1024))]

    /// Any query string: every parser returns, and its error is short.
    #[test]
    fn query_parsers_never_panic(raw in query_garbage()) {
        for parser in QueryParser::ALL {
            if let Err(e) = parser.run(&raw) {
                check_error_len(&e)?;
            }
        }
        let token = lenient_token(&raw);
        if raw.len() > MAX_QUERY_LEN {
            prop_assert_eq!(token, None);
            for parser in QueryParser::ALL {
                prop_assert_eq!(parser.run(&raw), Err(QueryError::TooLong(raw.len())));
            }
        }
    }

    /// Longer than MAX_QUERY_LEN is TooLong, even when well-formed.
    #[test]
    fn long_queries_are_too_long(
        base in query_garbage(),
        filler in select(vec!["token=x&", "&", "=", "a", "%41", "é"]),
        extra in 0usize..6000,
    ) {
        let mut raw = base;
        while raw.len() <= MAX_QUERY_LEN + extra {
            raw.push_str(filler);
        }
        prop_assert!(raw.len() > MAX_QUERY_LEN);
        for parser in QueryParser::ALL {
            let r = parser.run(&raw);
            prop_assert_eq!(&r, &Err(QueryError::TooLong(raw.len())));
            check_error_len(&r.unwrap_err())?;
        }
        prop_assert_eq!(lenient_token(&raw), None);
    }

    /// Right at the limit a query is still parsed.
    #[test]
    fn queries_at_the_limit_are_parsed(cut in 0usize..16) {
        let len = MAX_QUERY_LEN - cut;
        let raw = format!("token={}", "a".repeat(len - "token=".len()));
        prop_assert_eq!(raw.len(), len);
        prop_assert_eq!(parse_token_only(&raw), Ok(Some("a".repeat(len - 6))));
        prop_assert_eq!(lenient_token(&raw), Some("a".repeat(len - 6)));
    }

    /// A well-formed debug query parses back to its values; the limit is
    /// capped at MAX_LIMIT. Names and values may be percent-encoded.
    #[test]
    fn debug_query_round_trips((raw, expected) in debug_query()) {
        prop_assume!(raw.len() <= MAX_QUERY_LEN);
        prop_assert_eq!(parse_debug(&raw), Ok(expected.clone()));
        prop_assert_eq!(lenient_token(&raw), expected.token.clone());
    }

    /// The same for the REST API's `limit` and `token`, and `token` alone.
    #[test]
    fn list_and_token_queries_round_trip(
        limit in option::of(1u64..=1_000_000_000_000),
        token in option::of(encoded(any_text(200))),
        limit_first in any::<bool>(),
        seps in any::<u64>(),
    ) {
        let mut segments = Vec::new();
        if let Some(n) = limit {
            segments.push(format!("limit={n}"));
        }
        if let Some((_, enc)) = &token {
            segments.push(format!("token={enc}"));
        }
        if !limit_first {
            segments.reverse();
        }
        let raw = join_segments(&segments, seps);
        prop_assume!(raw.len() <= MAX_QUERY_LEN);
        let token = token.map(|(t, _)| t);
        prop_assert_eq!(
            parse_list(&raw),
            Ok(ListQuery {
                limit: limit.map_or(DEFAULT_LIMIT, |n| n.min(MAX_LIMIT as u64) as usize),
                token: token.clone(),
            })
        );
        if limit.is_none() {
            prop_assert_eq!(parse_token_only(&raw), Ok(token));
        }
    }

    /// A name outside the parser's set is Unknown, wherever it is and whatever
    /// the other (distinct, valid) parameters hold.
    #[test]
    fn unknown_names_are_refused(
        parser in query_parser(),
        present in btree_set(0usize..4, 0..4),
        values in vec(encoded(any_text(40)), 4),
        (name, enc_name) in encoded(near_miss_name()),
        (_, enc_value) in encoded(any_text(40)),
        at in any::<prop::sample::Index>(),
        seps in any::<u64>(),
    ) {
        let valid = parser.valid();
        prop_assume!(!valid.contains(&name.as_str()));
        let mut segments: Vec<String> = present
            .iter()
            .filter(|&&i| i < valid.len())
            .map(|&i| format!("{}={}", valid[i], values[i].1))
            .collect();
        segments.insert(at.index(segments.len() + 1), format!("{enc_name}={enc_value}"));
        let raw = join_segments(&segments, seps);
        prop_assume!(raw.len() <= MAX_QUERY_LEN);
        let r = parser.run(&raw);
        prop_assert_eq!(&r, &Err(QueryError::Unknown { name, valid }));
        check_error_len(&r.unwrap_err())?;
    }

    /// A valid name given twice is Repeated, whatever the values.
    #[test]
    fn repeated_names_are_refused(
        parser in query_parser(),
        present in btree_set(0usize..4, 1..=4),
        twice in any::<prop::sample::Index>(),
        values in vec(encoded(any_text(40)), 5),
        order in Just((0..5).collect::<Vec<usize>>()).prop_shuffle(),
        seps in any::<u64>(),
    ) {
        let valid = parser.valid();
        let mut names: Vec<&str> = present
            .iter()
            .filter(|&&i| i < valid.len())
            .map(|&i| valid[i])
            .collect();
        if names.is_empty() {
            names.push(valid[0]);
        }
        let dup = names[twice.index(names.len())];
        names.push(dup);
        let mut segments: Vec<(usize, String)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (order[i], format!("{n}={}", values[i].1)))
            .collect();
        segments.sort();
        let segments: Vec<String> = segments.into_iter().map(|(_, s)| s).collect();
        let raw = join_segments(&segments, seps);
        prop_assume!(raw.len() <= MAX_QUERY_LEN);
        let r = parser.run(&raw);
        prop_assert_eq!(&r, &Err(QueryError::Repeated(dup.to_string())));
        check_error_len(&r.unwrap_err())?;
    }

    /// `parse_limit(Some(s))` accepts exactly the (trimmed) all-digit
    /// strings with a nonzero value, and caps them at MAX_LIMIT.
    #[test]
    fn limits(s in prop_oneof![
        "[0-9]{1,30}",
        "[ \t]{0,2}[+-]?[0-9]{0,6}[ \t]{0,2}",
        "0{0,20}[0-9]{0,5}",
        select(vec!["", " ", "0", "00", "-0", "+1", "1.5", "1e3", "0x10", "١٢", "１", "\u{3000}7"])
            .prop_map(str::to_string),
        any_text(16),
        repeated("[0-9]", 10_000),
    ]) {
        let r = parse_limit(Some(&s));
        let digits = s.trim();
        let all_digits = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
        let significant = digits.trim_start_matches('0');
        if all_digits && !significant.is_empty() {
            let expected = if significant.len() > 4 {
                MAX_LIMIT
            } else {
                significant.parse::<usize>().unwrap().min(MAX_LIMIT)
            };
            prop_assert_eq!(r, Ok(expected));
        } else {
            prop_assert_eq!(&r, &Err(QueryError::BadLimit(s.clone())));
            check_error_len(&r.unwrap_err())?;
        }
    }

    #[test]
    fn every_positive_limit_is_accepted_and_capped(n in 1u64..=u64::MAX) {
        let r = parse_limit(Some(&n.to_string()));
        prop_assert_eq!(r, Ok(n.min(MAX_LIMIT as u64) as usize));
    }

    /// `parse_pid` accepts a positive u32 (trimmed, optional `+`) only.
    #[test]
    fn pids(s in prop_oneof![
        "[ ]?[+-]?[0-9]{1,12}[ ]?",
        any_text(16),
        repeated("[0-9]", 10_000),
    ]) {
        match parse_pid(&s) {
            Ok(p) => {
                prop_assert!(p > 0);
                let t = s.trim();
                let digits = t.strip_prefix('+').unwrap_or(t);
                prop_assert!(digits.bytes().all(|b| b.is_ascii_digit()), "{:?}", s);
                prop_assert_eq!(digits.trim_start_matches('0'), p.to_string());
            }
            Err(e) => {
                prop_assert_eq!(&e, &QueryError::BadPid(s.clone()));
                check_error_len(&e)?;
            }
        }
    }

    #[test]
    fn every_pid_is_accepted(p in 1u32..=u32::MAX, big in (u32::MAX as u64 + 1)..=u64::MAX) {
        prop_assert_eq!(parse_pid(&p.to_string()), Ok(p));
        prop_assert!(parse_pid(&big.to_string()).is_err());
        prop_assert!(parse_pid("0").is_err());
    }
}

/// One `&`-separated piece of a query, for the lenient token model.
#[derive(Clone, Debug)]
enum Segment {
    /// `name=value`: a pair, even when both are empty.
    Pair {
        name: String,
        raw: String,
        value: String,
    },
    /// `name` without `=`: a pair with an empty value, unless empty.
    Bare { name: String, raw: String },
}

impl Segment {
    /// The decoded pair, if form_urlencoded sees one.
    fn pair(&self) -> Option<(&str, &str)> {
        match self {
            Self::Pair { name, value, .. } => Some((name, value)),
            Self::Bare { name, raw } => (!raw.is_empty()).then_some((name.as_str(), "")),
        }
    }

    fn raw(&self) -> &str {
        match self {
            Self::Pair { raw, .. } | Self::Bare { raw, .. } => raw,
        }
    }
}

fn segment_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("token".to_string()),
        1 => select(vec!["action", "limit", "pid"]).prop_map(str::to_string),
        2 => near_miss_name(),
    ]
}

fn segment() -> impl Strategy<Value = Segment> {
    prop_oneof![
        4 => (encoded(segment_name()), encoded(any_text(30))).prop_map(|((name, n), (value, v))| {
            Segment::Pair { raw: format!("{n}={v}"), name, value }
        }),
        1 => encoded(segment_name()).prop_map(|(name, raw)| Segment::Bare { name, raw }),
    ]
}

proptest! {
    #![proptest_config(config(1024))]

    /// `lenient_token` returns the token iff exactly one pair is named
    /// `token` (after decoding), whatever the other pairs are.
    #[test]
    fn lenient_token_needs_exactly_one_token(segments in vec(segment(), 0..8), seps in any::<u64>()) {
        let raw = join_segments(&segments.iter().map(|s| s.raw().to_string()).collect::<Vec<_>>(), seps);
        let tokens: Vec<&str> = segments
            .iter()
            .filter_map(Segment::pair)
            .filter(|(n, _)| *n == "token")
            .map(|(_, v)| v)
            .collect();
        let expected = match tokens.as_slice() {
            [one] if raw.len() <= MAX_QUERY_LEN => Some(one.to_string()),
            _ => None,
        };
        prop_assert_eq!(lenient_token(&raw), expected);
    }
}

// ---------------------------------------------------------------------------
// tracefs `format` files (`memtrace::kernel::tracefs::parse_format`)
// ---------------------------------------------------------------------------
//
// The text of /sys/kernel/tracing/events/*/*/format, which differs between
// kernels; memtrace reads field offsets from it instead of a table.

/// A generated field declaration.
#[derive(Clone, Debug)]
struct GenField {
    ty: &'static str,
    star: bool,
    array: Option<u8>,
    field: Field,
}

fn gen_field() -> impl Strategy<Value = GenField> {
    (
        select(vec![
            "int",
            "unsigned int",
            "unsigned long",
            "long",
            "char",
            "unsigned short",
            "unsigned char",
            "const char *",
            "__data_loc char[]",
            "u64",
            "pid_t",
            "struct mm_struct *",
        ]),
        any::<bool>(),
        option::of(0u8..=64),
        any::<u32>(),
        any::<u32>(),
        any::<bool>(),
    )
        .prop_map(|(ty, star, array, offset, size, signed)| GenField {
            ty,
            star,
            array,
            field: Field {
                offset,
                size,
                signed,
            },
        })
}

fn field_line(name: &str, f: &GenField, indent: &str, ws: &str) -> String {
    let star = if f.star { "*" } else { "" };
    let array = f.array.map(|n| format!("[{n}]")).unwrap_or_default();
    format!(
        "{indent}field:{} {star}{name}{array};{ws}offset:{};{ws}size:{};{ws}signed:{};",
        f.ty,
        f.field.offset,
        f.field.size,
        u8::from(f.field.signed)
    )
}

/// Lines that are not well-formed field descriptions.
fn garbage_line() -> impl Strategy<Value = String> {
    prop_oneof![
        select(vec![
            "",
            "format:",
            "name: rss_stat",
            "ID: 520",
            "field:",
            "field:int ;offset:1;size:4;",
            "field:int x;offset:abc;size:4;",
            "field:int y;offset:-1;size:4;signed:1;",
            "field:int z;offset:4294967296;size:4;",
            "field:int w;size:4;",
            "field:int v;offset:4;",
            "field:v;offset:4;size:4;",
            "field:int a-b;offset:4;size:4;",
            "field:int é;offset:4;size:4;",
            "\tfield:int ;\toffset:;\tsize:;\tsigned:;",
            ";;;;",
            "offset:1;size:2;",
            "print fmt: \"mm_id=%u curr=%d\", REC->mm_id, REC->curr",
        ])
        .prop_map(str::to_string),
        "[^\n]{0,80}",
        "field:[a-z *\\[\\]]{0,12};[a-z:0-9; ]{0,30}",
    ]
}

/// Pieces of format files, for the never-panics test.
fn format_fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        select(vec![
            "field:",
            ";",
            "offset:",
            "size:",
            "signed:",
            "[",
            "]",
            "*",
            " ",
            "\t",
            "\n",
            "\r\n",
            "0",
            "1",
            "4294967295",
            "4294967296",
            "-1",
            "int",
            "char",
            "__data_loc",
            "é",
            "\u{0}",
        ])
        .prop_map(str::to_string),
        "[a-z0-9_]{1,6}",
        any::<char>().prop_map(String::from),
    ]
}

proptest! {
    #![proptest_config(config(1024))]

    /// Any text: parse_format returns, and every name it reports is a C
    /// identifier-like word.
    #[test]
    fn parse_format_never_panics(text in prop_oneof![
        any_text(2000),
        vec(format_fragment(), 0..3000).prop_map(|v| v.concat()),
        repeated(format_fragment(), 10_000),
    ]) {
        let f = parse_format(&text);
        for name in f.fields.keys() {
            prop_assert!(!name.is_empty());
            prop_assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'), "{:?}", name);
        }
    }

    /// Well-formed field lines are all found, with their offset, size and
    /// sign, wherever garbage lines are put between them.
    #[test]
    fn parse_format_finds_every_field(
        (lines, garbage) in (
            btree_map("[a-z_][a-z0-9_]{0,20}", gen_field(), 0..24),
            vec(garbage_line(), 0..12),
        )
            .prop_flat_map(|(fields, garbage)| {
                let lines: Vec<(Option<(String, GenField)>, String)> = fields
                    .into_iter()
                    .map(|(n, f)| (Some((n, f)), String::new()))
                    .chain(garbage.iter().map(|g| (None, g.clone())))
                    .collect();
                (Just(lines).prop_shuffle(), Just(garbage))
            }),
        indent in select(vec!["\t", "", "  "]),
        ws in select(vec!["\t", "", " "]),
        crlf in any::<bool>(),
    ) {
        let eol = if crlf { "\r\n" } else { "\n" };
        let mut text = format!("name: test{eol}ID: 1{eol}format:{eol}");
        for (field, garbage) in &lines {
            match field {
                Some((name, f)) => text.push_str(&field_line(name, f, indent, ws)),
                None => text.push_str(garbage),
            }
            text.push_str(eol);
        }
        text.push_str(&format!("{eol}print fmt: \"x\"{eol}"));
        let parsed = parse_format(&text);
        // Names the garbage itself declares (none, but for a freak random line).
        let polluted = parse_format(&garbage.join("\n")).fields;
        for (name, f) in lines.iter().filter_map(|(f, _)| f.as_ref()) {
            if !polluted.contains_key(name) {
                prop_assert_eq!(parsed.fields.get(name), Some(&f.field), "field {}", name);
            }
        }
        for name in parsed.fields.keys() {
            prop_assert!(
                polluted.contains_key(name)
                    || lines.iter().any(|(f, _)| f.as_ref().is_some_and(|(n, _)| n == name)),
                "invented field {}",
                name
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Ring-buffer records (`memtrace::kernel::events`)
// ---------------------------------------------------------------------------
//
// The bytes the eBPF programs write to the ring buffer: trusted in principle,
// but a mismatch between agent and programs, or a truncated record, must be
// an error and not undefined behaviour.

const KNOWN_KINDS: [u32; 6] = [
    memtrace_common::EVENT_FORK,
    memtrace_common::EVENT_EXEC,
    memtrace_common::EVENT_EXIT,
    memtrace_common::EVENT_RSS,
    memtrace_common::EVENT_REQUEST,
    memtrace_common::EVENT_REQUEST_SHORT,
];

/// Size of the record of a known kind.
fn record_size(kind: u32) -> usize {
    match kind {
        memtrace_common::EVENT_RSS => size_of::<memtrace_common::RssEvent>(),
        memtrace_common::EVENT_REQUEST => size_of::<memtrace_common::RequestEvent>(),
        memtrace_common::EVENT_REQUEST_SHORT => memtrace_common::REQUEST_SHORT_BYTES,
        _ => size_of::<memtrace_common::ProcessEvent>(),
    }
}

/// A record: a kind (mostly a known one), then arbitrary bytes, at an
/// arbitrary alignment in its buffer.
fn record() -> impl Strategy<Value = (Vec<u8>, usize)> {
    let kind = prop_oneof![3 => select(KNOWN_KINDS.to_vec()), 1 => any::<u32>()];
    let max = KNOWN_KINDS.iter().map(|&k| record_size(k)).max().unwrap() + 16;
    (kind, vec(any::<u8>(), 0..max), 0usize..8).prop_map(|(kind, rest, misalign)| {
        let mut buf = vec![0xAA; misalign];
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&rest);
        (buf, misalign)
    })
}

proptest! {
    #![proptest_config(config(2048))]

    /// Any bytes: decode returns; shorter than 4 bytes is Short.
    #[test]
    fn decode_never_panics(bytes in prop_oneof![vec(any::<u8>(), 0..8), vec(any::<u8>(), 0..4096)]) {
        let r = decode(&bytes);
        if bytes.len() < 4 {
            prop_assert_eq!(r.unwrap_err(), DecodeError::Short(bytes.len()));
        }
    }

    /// A record is decoded as its kind says when it is long enough, Short
    /// when it is not, and UnknownKind for another kind; at any alignment.
    #[test]
    fn decode_follows_the_kind((buf, misalign) in record(), cut in any::<prop::sample::Index>()) {
        let full = &buf[misalign..];
        // Also every truncation of it.
        let bytes = &full[..cut.index(full.len() + 1)];
        let r = decode(bytes);
        if bytes.len() < 4 {
            prop_assert_eq!(r.unwrap_err(), DecodeError::Short(bytes.len()));
            return Ok(());
        }
        let kind = u32::from_ne_bytes(bytes[..4].try_into().unwrap());
        if !KNOWN_KINDS.contains(&kind) {
            prop_assert_eq!(r.unwrap_err(), DecodeError::UnknownKind(kind));
            return Ok(());
        }
        if bytes.len() < record_size(kind) {
            prop_assert_eq!(r.unwrap_err(), DecodeError::Short(bytes.len()));
            return Ok(());
        }
        let tgid = u32::from_ne_bytes(bytes[4..8].try_into().unwrap());
        let (decoded_kind, decoded_tgid) = match r.unwrap() {
            KernelEvent::Fork(e) => {
                prop_assert_eq!(kind, memtrace_common::EVENT_FORK);
                (e.kind, e.tgid)
            }
            KernelEvent::Exec(e) => {
                prop_assert_eq!(kind, memtrace_common::EVENT_EXEC);
                (e.kind, e.tgid)
            }
            KernelEvent::Exit(e) => {
                prop_assert_eq!(kind, memtrace_common::EVENT_EXIT);
                (e.kind, e.tgid)
            }
            KernelEvent::Rss(e) => {
                prop_assert_eq!(kind, memtrace_common::EVENT_RSS);
                (e.kind, e.tgid)
            }
            KernelEvent::Request(e) => {
                prop_assert!(
                    kind == memtrace_common::EVENT_REQUEST
                        || kind == memtrace_common::EVENT_REQUEST_SHORT
                );
                if kind == memtrace_common::EVENT_REQUEST_SHORT {
                    prop_assert_eq!(e.line.state, memtrace_common::LINE_NONE);
                }
                (e.kind, e.tgid)
            }
        };
        prop_assert_eq!((decoded_kind, decoded_tgid), (kind, tgid));
    }

    /// Kernel strings (comm, filename): no NUL in the result, which is the
    /// input up to its first NUL, decoded lossily.
    #[test]
    fn c_str_stops_at_the_first_nul(bytes in prop_oneof![
        vec(any::<u8>(), 0..64),
        vec(prop_oneof![Just(0u8), any::<u8>()], 0..4096),
        any_text(64).prop_map(String::into_bytes),
    ]) {
        let s = c_str(&bytes);
        prop_assert!(!s.contains('\0'));
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let prefix = &bytes[..end];
        match std::str::from_utf8(prefix) {
            Ok(text) => prop_assert_eq!(s.as_str(), text),
            Err(_) => {
                prop_assert!(s.contains(char::REPLACEMENT_CHARACTER), "{:?}", s);
                prop_assert!(s.len() <= 3 * prefix.len());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Configuration (`memtrace::cli::settings`): the TOML file and the flags
// ---------------------------------------------------------------------------
//
// The file named by `--config`, which an operator writes by hand, and the
// command line. Files are written under the temporary directory, one per
// case; AgentArgs start from `Default`, so no environment variable is read
// except MEMTRACE_DEBUG_TOKEN by resolve(), which only sets the API token.

/// Every key of the config file (the long flags without `--`).
const KEYS: &[&str] = &[
    "process-name",
    "exe",
    "cmdline",
    "pid",
    "request-mode",
    "request-fn",
    "request-begin",
    "request-end",
    "high-memory-mb",
    "spike-mb",
    "request-history",
    "leak-window-size",
    "leak-check-interval",
    "leak-slope-threshold",
    "leak-warmup-requests",
    "leak-sample-interval-secs",
    "leak-time-slope-mb-per-hour",
    "soft-limit-mb",
    "soft-limit-action",
    "soft-limit-target",
    "soft-limit-signal",
    "soft-limit-min-interval-secs",
    "soft-limit-jitter-secs",
    "soft-limit-drain-timeout-secs",
    "listen",
    "log-format",
    "log-level",
    "summary-interval-secs",
    "ring-buffer-bytes",
    "poll-interval-ms",
    "rss-step-bytes",
    "refresh-interval-ms",
    "rescan-interval-secs",
    "fault-sample-period",
    "no-mount-tracefs",
];

static NEXT_FILE: AtomicU64 = AtomicU64::new(0);

/// A config file in the temporary directory, removed when dropped.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(contents: &[u8]) -> Self {
        let path = std::env::temp_dir().join(format!(
            "memtrace-parsers-{}-{}.toml",
            std::process::id(),
            NEXT_FILE.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).expect("writes a temporary config file");
        Self(path)
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `args` with the file `contents` under them, resolved.
fn load_under(mut args: AgentArgs, contents: &[u8]) -> Result<ResolvedAgent, ConfigError> {
    let file = TempConfig::new(contents);
    args.config = Some(file.0.clone());
    args.with_config_file()?.resolve()
}

fn load(contents: &[u8]) -> Result<ResolvedAgent, ConfigError> {
    load_under(AgentArgs::default(), contents)
}

/// A TOML basic string holding `s`.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => write!(out, "\\u{:04X}", u32::from(c)).unwrap(),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// TOML values of every type, valid and wrong for any key.
fn toml_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        select(vec![
            "0",
            "1",
            "-1",
            "-0",
            "+5",
            "4096",
            "1000",
            "1001",
            "65536",
            "4294967296",
            "9223372036854775807",
            "-9223372036854775808",
            "99999999999999999999",
            "0x10",
            "0o7",
            "0b1",
            "1_000",
            "0.0",
            "-0.0",
            "1.5",
            "-3.5",
            "1e308",
            "1e-300",
            "5e+22",
            "nan",
            "+nan",
            "-nan",
            "inf",
            "+inf",
            "-inf",
            "true",
            "false",
            "\"\"",
            "''",
            "\"gunicorn\"",
            "\"a/b\"",
            "\"off\"",
            "\"none\"",
            "\"127.0.0.1:9464\"",
            "\"[::1]:80\"",
            "\"localhost\"",
            "\"HUP\"",
            "\"sigterm\"",
            "\"9\"",
            "\"0\"",
            "\"NOPE\"",
            "\"uprobe\"",
            "\"accept\"",
            "\"none\"",
            "\"json\"",
            "\"pretty\"",
            "\"log\"",
            "\"signal\"",
            "\"parent\"",
            "\"worker\"",
            "\"/bin/x:sym\"",
            "\":\"",
            "\"(\"",
            "\"a{99999}{99999}\"",
            "\"/\"",
            "[]",
            "[1, 2]",
            "[0]",
            "[\"a\", \"b\"]",
            "[\"\"]",
            "[1, \"a\"]",
            "{}",
            "{ a = 1 }",
            "1979-05-27T07:32:00Z",
            "07:32:00",
            "'''multi\nline'''",
            "\"\"\"x\"\"\"",
        ])
        .prop_map(str::to_string),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:?}")),
        any_text(30).prop_map(|s| toml_string(&s)),
        "[a-z/]{0,8}:[a-z_]{0,8}".prop_map(|s| toml_string(&s)),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            vec(("[a-z-]{1,8}", inner), 0..3).prop_map(|v| {
                let body: Vec<String> = v.iter().map(|(k, x)| format!("{k} = {x}")).collect();
                format!("{{ {} }}", body.join(", "))
            }),
        ]
    })
}

/// Config files: real keys (sometimes twice, or unknown ones) with values
/// of any type, garbage lines, table headers, deep nesting, raw bytes.
fn toml_document() -> impl Strategy<Value = Vec<u8>> {
    let key = prop_oneof![
        8 => select(KEYS.to_vec()).prop_map(str::to_string),
        1 => select(vec!["config", "process_name", "Process-Name", "agent", "\"listen\"", "a.b"])
            .prop_map(str::to_string),
        1 => "[a-z-]{1,12}",
    ];
    let line = prop_oneof![
        10 => (key, toml_value()).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => select(vec!["[agent]", "[[x]]", "# comment", "", "=", "key", "[", "]"])
            .prop_map(str::to_string),
        1 => "[^\n]{0,40}",
        1 => (1usize..200).prop_map(|n| format!("deep = {}1{}", "[".repeat(n), "]".repeat(n))),
    ];
    prop_oneof![
        8 => vec(line, 0..12).prop_map(|v| v.join("\n").into_bytes()),
        1 => any_text(2000).prop_map(String::into_bytes),
        1 => vec(any::<u8>(), 0..256),
        1 => repeated(query_fragment(), 10_000).prop_map(String::into_bytes),
    ]
}

/// Settings that are all valid.
#[derive(Clone, Debug)]
struct ValidSettings {
    names: Vec<String>,
    pids: Vec<u32>,
    poll_ms: Option<u64>,
    ring_shift: Option<u32>,
    window: (usize, usize),
    rss_step: u64,
    refresh_ms: u64,
    rescan_secs: u64,
    soft_limit_mb: f64,
    slope: f64,
    signal: &'static str,
    listen: Option<String>,
    log_level: String,
}

/// Signal names accepted by `--soft-limit-signal`, in some of their spellings.
const SIGNALS: &[(&str, &str)] = &[
    ("HUP", "SIGHUP"),
    ("hup", "SIGHUP"),
    ("SIGTERM", "SIGTERM"),
    ("term", "SIGTERM"),
    ("USR1", "SIGUSR1"),
    ("SigUsr2", "SIGUSR2"),
    ("INT", "SIGINT"),
    ("QUIT", "SIGQUIT"),
    ("WINCH", "SIGWINCH"),
    ("9", "SIGKILL"),
    (" 15 ", "SIGTERM"),
    ("1", "SIGHUP"),
];

fn valid_settings() -> impl Strategy<Value = ValidSettings> {
    (
        (
            vec("[a-z][a-z0-9_.-]{0,20}", 0..4),
            vec(1u32..=u32::MAX, 0..4),
            option::of(1u64..=1000),
            option::of(12u32..=30),
            (2usize..=1000).prop_flat_map(|w| (Just(w), 1..=w)),
            1u64..=i64::MAX as u64,
        ),
        (
            10u64..=60_000,
            1u64..=3600,
            0.001f64..1e6,
            1e-6f64..1e3,
            select(SIGNALS.iter().map(|(s, _)| *s).collect::<Vec<_>>()),
            option::of(prop_oneof![
                Just("off".to_string()),
                (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| format!(
                    "{}.{}.{}.{}:{port}",
                    ip[0], ip[1], ip[2], ip[3]
                )),
            ]),
            any_text(40),
        ),
    )
        .prop_map(
            |(
                (names, pids, poll_ms, ring_shift, window, rss_step),
                (refresh_ms, rescan_secs, soft_limit_mb, slope, signal, listen, log_level),
            )| ValidSettings {
                names,
                pids,
                poll_ms,
                ring_shift,
                window,
                rss_step,
                refresh_ms,
                rescan_secs,
                soft_limit_mb,
                slope,
                signal,
                listen,
                log_level,
            },
        )
}

impl ValidSettings {
    /// The settings as TOML lines, in the order given by `order`.
    fn to_toml(&self, order: &[usize]) -> String {
        let strings = |v: &[String]| {
            let items: Vec<String> = v.iter().map(|s| toml_string(s)).collect();
            format!("[{}]", items.join(", "))
        };
        let mut lines = vec![
            format!("process-name = {}", strings(&self.names)),
            format!("pid = {:?}", self.pids),
            format!("leak-window-size = {}", self.window.0),
            format!("leak-check-interval = {}", self.window.1),
            format!("rss-step-bytes = {}", self.rss_step),
            format!("refresh-interval-ms = {}", self.refresh_ms),
            format!("rescan-interval-secs = {}", self.rescan_secs),
            format!("soft-limit-mb = {:?}", self.soft_limit_mb),
            format!("leak-slope-threshold = {:?}", self.slope),
            format!("soft-limit-signal = {}", toml_string(self.signal)),
            format!("log-level = {}", toml_string(&self.log_level)),
        ];
        if let Some(ms) = self.poll_ms {
            lines.push(format!("poll-interval-ms = {ms}"));
        }
        if let Some(shift) = self.ring_shift {
            lines.push(format!("ring-buffer-bytes = {}", 1u32 << shift));
        }
        if let Some(listen) = &self.listen {
            lines.push(format!("listen = {}", toml_string(listen)));
        }
        let mut ordered: Vec<(usize, String)> = lines
            .into_iter()
            .enumerate()
            .map(|(i, l)| (order.get(i).copied().unwrap_or(i), l))
            .collect();
        ordered.sort();
        ordered.into_iter().map(|(_, l)| l + "\n").collect()
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// Any config file: reading and resolving it returns, and an error has
    /// a message.
    #[test]
    fn config_files_never_panic(doc in toml_document()) {
        match load(&doc) {
            Ok(_) => {}
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    /// Every real key with a value of any type, alone: a clean result.
    #[test]
    fn every_key_with_any_value(key in select(KEYS.to_vec()), value in toml_value()) {
        let doc = format!("{key} = {value}\n");
        if let Err(e) = load(doc.as_bytes()) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    /// Valid settings in a file resolve to exactly those settings.
    #[test]
    fn valid_config_files_resolve_to_their_values(
        s in valid_settings(),
        order in Just((0..14).collect::<Vec<usize>>()).prop_shuffle(),
    ) {
        let doc = s.to_toml(&order);
        let r = load(doc.as_bytes());
        prop_assert!(r.is_ok(), "{:?}\n{}", r.err().map(|e| e.to_string()), doc);
        let r = r.unwrap();
        let set = &r.settings;
        prop_assert_eq!(&set.selectors.names, &s.names);
        prop_assert_eq!(&set.selectors.pids, &s.pids);
        prop_assert_eq!(
            set.poll_interval,
            Duration::from_millis(s.poll_ms.unwrap_or(memtrace::agent::DEFAULT_POLL_INTERVAL_MS))
        );
        prop_assert_eq!(
            set.load.ring_buffer_bytes,
            s.ring_shift.map_or(memtrace_common::DEFAULT_RING_BYTES, |k| 1 << k)
        );
        prop_assert_eq!(
            (set.detector.window_size, set.detector.check_interval),
            s.window
        );
        prop_assert_eq!(set.load.rss_step_bytes, s.rss_step);
        prop_assert_eq!(set.refresh_interval, Duration::from_millis(s.refresh_ms));
        prop_assert_eq!(set.rescan_interval, Duration::from_secs(s.rescan_secs));
        prop_assert_eq!(set.detector.soft_limit_mb, s.soft_limit_mb);
        prop_assert_eq!(set.timed_detector.soft_limit_mb, s.soft_limit_mb);
        prop_assert_eq!(set.detector.slope_threshold_mb, s.slope);
        let signal = SIGNALS.iter().find(|(n, _)| *n == s.signal).unwrap().1;
        prop_assert_eq!(set.soft_limit.signal.map(|s| s.as_str()), Some(signal));
        match s.listen.as_deref() {
            None => prop_assert_eq!(set.listen, Some("127.0.0.1:9464".parse().unwrap())),
            Some("off") => prop_assert_eq!(set.listen, None),
            Some(addr) => prop_assert_eq!(set.listen, Some(addr.parse().unwrap())),
        }
        prop_assert_eq!(&r.log_level, &s.log_level);
    }

    /// A setting given both as a flag and in the file takes the flag's
    /// value; a setting only in the file takes the file's.
    #[test]
    fn flags_beat_the_file(
        (flag_poll, file_poll) in (1u64..=1000, 1u64..=1000),
        (flag_names, file_names) in (vec("[a-z][a-z0-9_]{0,10}", 1..4), vec("[a-z][a-z0-9_]{0,10}", 1..4)),
        (flag_window, file_window) in (2usize..=1000, 2usize..=1000),
        (flag_ring, file_ring) in (12u32..=30, 12u32..=30),
        (flag_signal, file_signal) in (0..SIGNALS.len(), 0..SIGNALS.len()),
        file_rss_step in 1u64..=i64::MAX as u64,
        equals_sign in any::<bool>(),
        comma_names in any::<bool>(),
    ) {
        let mut argv: Vec<String> = Vec::new();
        let mut flag = |name: &str, value: String| {
            if equals_sign {
                argv.push(format!("--{name}={value}"));
            } else {
                argv.push(format!("--{name}"));
                argv.push(value);
            }
        };
        flag("poll-interval-ms", flag_poll.to_string());
        flag("leak-window-size", flag_window.to_string());
        flag("ring-buffer-bytes", (1u32 << flag_ring).to_string());
        flag("soft-limit-signal", SIGNALS[flag_signal].0.to_string());
        if comma_names {
            flag("process-name", flag_names.join(","));
        } else {
            for n in &flag_names {
                argv.push("-n".into());
                argv.push(n.clone());
            }
        }
        let parsed = agent_args(&argv);
        prop_assert!(parsed.is_ok(), "{:?}: {}", argv, parsed.unwrap_err());
        let parsed = parsed.unwrap();
        // Flags win over MEMTRACE_* variables in clap, so these hold whatever
        // the environment; only they are carried over, so that the rest of
        // the environment plays no part below.
        prop_assert_eq!(parsed.poll_interval_ms, Some(flag_poll));
        prop_assert_eq!(parsed.leak_window_size, Some(flag_window));
        prop_assert_eq!(parsed.ring_buffer_bytes, Some(1u32 << flag_ring));
        prop_assert_eq!(parsed.soft_limit_signal.as_deref(), Some(SIGNALS[flag_signal].0));
        prop_assert_eq!(&parsed.process_name, &flag_names);
        let args = AgentArgs {
            poll_interval_ms: parsed.poll_interval_ms,
            leak_window_size: parsed.leak_window_size,
            ring_buffer_bytes: parsed.ring_buffer_bytes,
            soft_limit_signal: parsed.soft_limit_signal,
            process_name: parsed.process_name,
            ..AgentArgs::default()
        };
        let names: Vec<String> = file_names.iter().map(|n| toml_string(n)).collect();
        let doc = format!(
            "poll-interval-ms = {file_poll}\nprocess-name = [{}]\nleak-window-size = {file_window}\n\
             leak-check-interval = 1\nring-buffer-bytes = {}\nsoft-limit-signal = {}\n\
             rss-step-bytes = {file_rss_step}\n",
            names.join(", "),
            1u32 << file_ring,
            toml_string(SIGNALS[file_signal].0),
        );
        let r = load_under(args, doc.as_bytes());
        prop_assert!(r.is_ok(), "{:?}\n{}", r.err().map(|e| e.to_string()), doc);
        let set = r.unwrap().settings;
        prop_assert_eq!(set.poll_interval, Duration::from_millis(flag_poll));
        prop_assert_eq!(&set.selectors.names, &flag_names);
        prop_assert_eq!(set.detector.window_size, flag_window);
        prop_assert_eq!(set.load.ring_buffer_bytes, 1u32 << flag_ring);
        prop_assert_eq!(set.soft_limit.signal.map(|s| s.as_str()), Some(SIGNALS[flag_signal].1));
        prop_assert_eq!(set.detector.check_interval, 1);
        prop_assert_eq!(set.load.rss_step_bytes, file_rss_step);
    }
}

/// `memtrace agent ARGS...`, as clap parses it.
fn agent_args(args: &[String]) -> Result<AgentArgs, clap::Error> {
    let argv = ["memtrace".to_string(), "agent".to_string()]
        .into_iter()
        .chain(args.iter().cloned());
    Cli::try_parse_from(argv).map(|cli| match cli.command {
        Command::Agent(a) => *a,
        other => panic!("`memtrace agent` parsed as {other:?}"),
    })
}

/// Command-line words: the real flags and values of every kind.
fn cli_word() -> impl Strategy<Value = String> {
    let flags: Vec<String> = KEYS
        .iter()
        .map(|k| format!("--{k}"))
        .chain(
            [
                "-n",
                "-p",
                "--",
                "-",
                "--help",
                "-h",
                "--version",
                "--config",
                "--nope",
                "-x",
            ]
            .map(String::from),
        )
        .collect();
    prop_oneof![
        4 => select(flags),
        2 => (select(KEYS.to_vec()), toml_value()).prop_map(|(k, v)| format!("--{k}={v}")),
        2 => toml_value(),
        1 => select(vec!["0", "1", "-1", "1000", "1001", "4096", "off", "a,b", ",", ",,", "", "=", "true", "false"])
            .prop_map(str::to_string),
        1 => any_text(20),
    ]
}

proptest! {
    #![proptest_config(config(1024))]

    /// Any command line: clap returns, and a parsed one resolves or fails
    /// with a message (the config file is not read here).
    #[test]
    fn command_lines_never_panic(
        words in vec(cli_word(), 0..10),
        subcommand in prop_oneof![
            4 => Just(Some("agent")),
            1 => Just(None),
            1 => select(vec!["status", "snapshot", "diff", "stop", "requests", "top", "demo", "completions", "nope"])
                .prop_map(Some),
        ],
    ) {
        let argv = std::iter::once("memtrace".to_string())
            .chain(subcommand.map(str::to_string))
            .chain(words.iter().cloned());
        match Cli::try_parse_from(argv) {
            Ok(Cli { command: Command::Agent(args) }) => {
                let mut args = *args;
                args.config = None;
                if let Err(e) = args.resolve() {
                    prop_assert!(!e.to_string().is_empty());
                }
            }
            Ok(_) => {}
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}

// ---------------------------------------------------------------------------
// Probe targets (`memtrace::cli::settings::parse_probe_target`)
// ---------------------------------------------------------------------------
//
// The value of `--request-fn`, `--request-begin` and `--request-end` (or
// their config keys): `BINARY:SYMBOL` as the user typed it.

proptest! {
    #![proptest_config(config(1024))]

    /// `BINARY:SYMBOL`: Ok iff there is a `:` with text on both sides of
    /// the last one, which splits the two.
    #[test]
    fn probe_targets(s in prop_oneof![
        "[a-z/.:]{0,20}",
        "[:]{0,4}[a-z]{0,3}[:]{0,4}",
        any_text(40),
        repeated("[a-z:]{1,3}", 10_000),
    ]) {
        let r = parse_probe_target(&s);
        match s.rsplit_once(':') {
            Some((binary, symbol)) if !binary.is_empty() && !symbol.is_empty() => {
                let t = r.unwrap();
                prop_assert_eq!(t.binary, PathBuf::from(binary));
                prop_assert_eq!(t.symbol.as_str(), symbol);
            }
            _ => prop_assert!(!r.unwrap_err().is_empty()),
        }
    }
}

// ---------------------------------------------------------------------------
// Signals (`memtrace::judge::softlimit::parse_signal`)
// ---------------------------------------------------------------------------
//
// The value of `--soft-limit-signal` / `soft-limit-signal`: a name in any
// case, with or without `SIG`, or a number.

/// Linux signal names (nix names them all on Linux).
const SIGNAL_NAMES: &[&str] = &[
    "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2",
    "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG",
    "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "PWR", "SYS",
];

fn signal_text() -> impl Strategy<Value = String> {
    prop_oneof![
        (
            select(SIGNAL_NAMES.to_vec()),
            any::<bool>(),
            any::<u32>(),
            "[ \t]{0,2}",
            "[ \t]{0,2}"
        )
            .prop_map(|(name, sig, case, pre, post)| {
                let full = if sig {
                    format!("SIG{name}")
                } else {
                    name.to_string()
                };
                let cased: String = full
                    .chars()
                    .enumerate()
                    .map(|(i, c)| {
                        if case >> (i % 32) & 1 != 0 {
                            c.to_ascii_lowercase()
                        } else {
                            c
                        }
                    })
                    .collect();
                format!("{pre}{cased}{post}")
            }),
        (-100i64..100).prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        select(vec![
            "",
            "SIG",
            "sig",
            "SIGSIGHUP",
            "+1",
            "0x1",
            "RTMIN",
            "SIGRTMIN+1",
            "HUP\0",
            "ＨＵＰ"
        ])
        .prop_map(str::to_string),
        any_text(16),
        repeated("[A-Z]{1,4}", 10_000),
    ]
}

proptest! {
    #![proptest_config(config(1024))]

    /// Any text: parse_signal returns; a signal it gives parses again to
    /// itself from its name, its name without `SIG` and its number.
    #[test]
    fn signals_round_trip(s in signal_text()) {
        match parse_signal(&s) {
            Ok(sig) => {
                let name = sig.as_str();
                prop_assert_eq!(parse_signal(name), Ok(sig));
                prop_assert_eq!(parse_signal(name.strip_prefix("SIG").unwrap()), Ok(sig));
                prop_assert_eq!(parse_signal(&(sig as i32).to_string()), Ok(sig));
            }
            Err(e) => prop_assert!(!e.is_empty()),
        }
    }

    /// Every Linux signal name is understood, in any case, with or without `SIG`.
    #[test]
    fn signal_names_are_understood(name in select(SIGNAL_NAMES.to_vec()), sig in any::<bool>(), lower in any::<bool>()) {
        let mut text = if sig { format!("SIG{name}") } else { name.to_string() };
        if lower {
            text = text.to_lowercase();
        }
        let r = parse_signal(&text);
        prop_assert!(r.is_ok(), "{}: {:?}", text, r);
        prop_assert_eq!(r.unwrap().as_str(), format!("SIG{name}"));
    }
}

// ---------------------------------------------------------------------------
// Symbol suggestions (`memtrace::kernel::uprobes::nearest`)
// ---------------------------------------------------------------------------
//
// The symbol of `--request-fn` (typed by a user) against the function names
// of an ELF file (whatever the binary contains).

fn symbol_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-cA-C_]{0,8}",
        2 => "[a-z_]{0,24}",
        1 => select(vec!["handle_request", "handle", "request", "malloc@@GLIBC_2.2.5", "é", ""])
            .prop_map(str::to_string),
        1 => any_text(24),
    ]
}

/// Whether `name`, besides an exact match, ties with it for first place:
/// a name equal to `wanted` but for ASCII case, or one of at least 4 bytes
/// contained in it (case-insensitively), which sorts first when shorter.
fn ties_with_exact(wanted: &str, name: &str) -> bool {
    let (w, l) = (wanted.to_ascii_lowercase(), name.to_ascii_lowercase());
    name != wanted && (l == w || (l.len() >= 4 && w.contains(&l)))
}

proptest! {
    #![proptest_config(config(1024))]

    /// nearest returns at most n names, all from the list, without
    /// duplicates (given none); an exact match comes first unless another
    /// name ties with it.
    #[test]
    fn nearest_suggests_names_from_the_list(
        wanted in symbol_name(),
        names in btree_set(symbol_name(), 0..40),
        include_exact in any::<bool>(),
        n in 0usize..8,
    ) {
        let mut names: Vec<String> = names.into_iter().collect();
        if include_exact && !names.contains(&wanted) {
            names.push(wanted.clone());
        }
        let near = nearest(&wanted, &names, n);
        prop_assert!(near.len() <= n);
        let distinct: BTreeSet<&String> = near.iter().collect();
        prop_assert_eq!(distinct.len(), near.len());
        for s in &near {
            prop_assert!(names.contains(s), "{:?} not in the list", s);
        }
        if n > 0 && names.contains(&wanted) && !names.iter().any(|x| ties_with_exact(&wanted, x)) {
            prop_assert_eq!(&near[0], &wanted);
        }
    }

    /// The brief's stronger contract: an exact match always comes first.
    #[test]
    fn nearest_puts_an_exact_match_first(
        wanted in symbol_name(),
        names in btree_set(symbol_name(), 0..40),
        n in 1usize..8,
    ) {
        let mut names: Vec<String> = names.into_iter().collect();
        if !names.contains(&wanted) {
            names.push(wanted.clone());
        }
        let near = nearest(&wanted, &names, n);
        prop_assert_eq!(near.first(), Some(&wanted));
    }
}

// ---------------------------------------------------------------------------
// Process selectors (`memtrace::model::selectors::Selectors::matches`)
// ---------------------------------------------------------------------------
//
// The comm, executable path and command line of any process on the machine,
// which its owner chooses freely, against the user's selectors.

fn comm() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{0,15}",
        any_text(15),
        select(vec![
            "",
            "gunicorn",
            "my-very-long-se",
            "é",
            "\u{FFFD}",
            "a\0b"
        ])
        .prop_map(str::to_string),
    ]
}

fn selectors() -> impl Strategy<Value = Selectors> {
    (
        vec(prop_oneof![comm(), "[a-z]{10,30}", any_text(40)], 0..4),
        vec(any_text(30).prop_map(PathBuf::from), 0..3),
        option::of(prop_oneof![
            select(vec![
                "",
                ".*",
                "^$",
                "uwsgi .*--ini",
                "(?i)GUNICORN",
                "\\bx\\b",
                "é+",
                "a{0,1000}"
            ])
            .prop_map(str::to_string),
            any_text(12),
        ]),
        vec(any::<u32>(), 0..3),
    )
        .prop_map(|(names, exes, cmdline, pids)| Selectors {
            names,
            exes,
            cmdline: cmdline.and_then(|re| regex::Regex::new(&re).ok()),
            pids,
            ..Selectors::default()
        })
}

fn process_view() -> impl Strategy<Value = ProcessView> {
    (
        any::<u32>(),
        any::<u32>(),
        comm(),
        option::of(prop_oneof![any_text(60), "(/[a-z]{1,6}){1,4}"].prop_map(PathBuf::from)),
        vec(prop_oneof![any_text(20), "[a-z-]{0,10}"], 0..6),
        any::<u64>(),
    )
        .prop_map(|(pid, ppid, comm, exe, cmdline, start_time)| ProcessView {
            pid,
            ppid,
            comm,
            exe,
            cmdline,
            start_time,
        })
}

proptest! {
    #![proptest_config(config(1024))]

    /// Any process against any selectors: matches returns, and a reason it
    /// gives is true.
    #[test]
    fn selectors_never_panic(s in selectors(), mut p in process_view(), pick in any::<prop::sample::Index>(), how in 0u8..4) {
        // Sometimes make the process match one selector on purpose.
        match how {
            0 if !s.pids.is_empty() => p.pid = s.pids[pick.index(s.pids.len())],
            1 if !s.names.is_empty() => {
                let name = &s.names[pick.index(s.names.len())];
                let bytes = &name.as_bytes()[..name.len().min(15)];
                if let Ok(comm) = std::str::from_utf8(bytes) {
                    p.comm = comm.to_string();
                }
            }
            2 if !s.exes.is_empty() => p.exe = Some(s.exes[pick.index(s.exes.len())].clone()),
            _ => {}
        }
        let reason = s.matches(&p);
        match &reason {
            None => {
                prop_assert!(!s.pids.contains(&p.pid));
                prop_assert!(p.exe.as_ref().is_none_or(|e| !s.exes.contains(e)));
            }
            Some(MatchReason::Pid) => prop_assert!(s.pids.contains(&p.pid)),
            Some(MatchReason::Name(n)) => {
                prop_assert!(s.names.contains(n));
                let comm_match = p.comm.as_bytes() == &n.as_bytes()[..n.len().min(15)];
                let exe_match = p
                    .exe
                    .as_deref()
                    .and_then(|e| e.file_name())
                    .is_some_and(|f| f == n.as_str());
                // A process title `NAME: ...` (setproctitle).
                let title_match = p.cmdline.first().is_some_and(|a| {
                    a.split_whitespace()
                        .next()
                        .and_then(|w| w.strip_suffix(':'))
                        .is_some_and(|w| w.rsplit('/').next() == Some(n.as_str()))
                });
                prop_assert!(comm_match || exe_match || title_match);
            }
            Some(MatchReason::Exe(e)) => {
                prop_assert!(s.exes.contains(e));
                prop_assert_eq!(Some(e), p.exe.as_ref());
            }
            Some(MatchReason::Cmdline) => {
                prop_assert!(!p.cmdline.is_empty());
                prop_assert!(s.cmdline.as_ref().unwrap().is_match(&p.cmdline.join(" ")));
            }
            Some(MatchReason::Cgroup(_) | MatchReason::Container(_)) => {
                prop_assert!(false, "no cgroup or container selector was given: {reason:?}");
            }
        }
        let _ = s.describe();
        if s.is_empty() {
            prop_assert_eq!(reason, None);
        }
    }
}
