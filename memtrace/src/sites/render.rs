//! A snapshot or a diff in a format other tools read: pprof, folded stacks
//! or a flame graph SVG.
use std::collections::HashMap;

use super::{
    flame,
    pprof::{ProfileData, ProfileSource},
    snapshot::RawSite,
    view::ViewSpec,
};
use crate::model::procinfo::CodeMapping;

/// The formats besides the API's JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProfileFormat {
    /// Gzipped profile.proto.
    Pprof,
    /// `root;...;leaf bytes` lines (a diff: `stack before after`).
    Folded,
    /// A flame graph (a diff: a differential one).
    Svg,
}

impl ProfileFormat {
    pub const NAMES: &'static [&'static str] = &["json", "pprof", "folded", "svg"];

    /// `json` is None: the API's own answer.
    pub fn parse(s: &str) -> Result<Option<Self>, String> {
        match s {
            "json" => Ok(None),
            "pprof" => Ok(Some(Self::Pprof)),
            "folded" => Ok(Some(Self::Folded)),
            "svg" => Ok(Some(Self::Svg)),
            other => Err(format!(
                "unknown format `{other}`; valid: {}",
                Self::NAMES.join(", ")
            )),
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Pprof => "application/octet-stream",
            Self::Folded => "text/plain; charset=utf-8",
            Self::Svg => "image/svg+xml",
        }
    }
}

/// What a rendering needs besides the sites.
#[derive(Clone, Debug, Default)]
pub struct ProfileMeta {
    /// Worker names by pid (the `worker` label).
    pub names: HashMap<u32, String>,
    /// Executable mappings of the workers.
    pub mappings: Vec<CodeMapping>,
    /// Mean bytes between heap samples.
    pub period: u64,
    pub time_nanos: i64,
    pub duration_nanos: i64,
}

/// A rendered profile and its media type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error(transparent)]
    Flame(#[from] flame::FlameError),
}

fn comment(source: ProfileSource, diff: bool) -> String {
    let what = match source {
        ProfileSource::Heap => {
            "memtrace heap tier: live heap blocks (malloc, calloc, realloc minus free) allocated since collection began, sampled by bytes and scaled"
        }
        ProfileSource::Faults => {
            "memtrace growth tier: pages first touched since collection began (sampled page faults, weighted)"
        }
    };
    if diff {
        format!("{what}; growth since the previous snapshot or diff")
    } else {
        what.to_string()
    }
}

fn pprof(mut data: ProfileData<'_>, meta: &ProfileMeta, diff: bool) -> Rendered {
    data.comment = comment(data.source, diff);
    data.names = meta.names.clone();
    data.mappings = meta.mappings.clone();
    data.period = meta.period;
    data.time_nanos = meta.time_nanos;
    data.duration_nanos = meta.duration_nanos;
    Rendered {
        content_type: ProfileFormat::Pprof.content_type(),
        body: data.to_pprof_gz(),
    }
}

fn title(source: ProfileSource, diff: bool) -> &'static str {
    match (source, diff) {
        (ProfileSource::Heap, false) => "memtrace: live heap by allocating stack",
        (ProfileSource::Heap, true) => "memtrace: heap growth by allocating stack",
        (ProfileSource::Faults, false) => "memtrace: pages first touched by stack",
        (ProfileSource::Faults, true) => "memtrace: page growth by stack",
    }
}

/// The sites of `source`'s kind with the frames the view draws (pprof
/// keeps every frame: its own `-focus` and `-hide` do the rest).
fn flame_sites(sites: &[RawSite], source: ProfileSource, spec: &ViewSpec) -> Vec<RawSite> {
    sites
        .iter()
        .filter(|s| s.kind == source.kind())
        .map(|s| RawSite {
            frames: spec.flame_frames(s.pid, &s.frames),
            ..s.clone()
        })
        .collect()
}

/// One snapshot's sites of `source`'s kind.
pub fn snapshot(
    format: ProfileFormat,
    source: ProfileSource,
    sites: &[RawSite],
    meta: &ProfileMeta,
    spec: &ViewSpec,
) -> Result<Rendered, RenderError> {
    let of_kind = flame_sites(sites, source, spec);
    let of_kind: Vec<&RawSite> = of_kind.iter().collect();
    Ok(match format {
        ProfileFormat::Pprof => pprof(ProfileData::snapshot(source, sites), meta, false),
        ProfileFormat::Folded => Rendered {
            content_type: format.content_type(),
            body: flame::folded(&of_kind).into_bytes(),
        },
        ProfileFormat::Svg => Rendered {
            content_type: format.content_type(),
            body: flame::svg(&flame::folded(&of_kind), title(source, false))?,
        },
    })
}

/// Growth from `before` to `after`.
pub fn diff(
    format: ProfileFormat,
    source: ProfileSource,
    before: &[RawSite],
    after: &[RawSite],
    meta: &ProfileMeta,
    spec: &ViewSpec,
) -> Result<Rendered, RenderError> {
    let (b, a) = (
        flame_sites(before, source, spec),
        flame_sites(after, source, spec),
    );
    let b: Vec<&RawSite> = b.iter().collect();
    let a: Vec<&RawSite> = a.iter().collect();
    Ok(match format {
        ProfileFormat::Pprof => pprof(ProfileData::diff(source, before, after), meta, true),
        ProfileFormat::Folded => Rendered {
            content_type: format.content_type(),
            body: flame::folded_diff(&b, &a).into_bytes(),
        },
        ProfileFormat::Svg => Rendered {
            content_type: format.content_type(),
            body: flame::svg(&flame::folded_diff(&b, &a), title(source, true))?,
        },
    })
}
