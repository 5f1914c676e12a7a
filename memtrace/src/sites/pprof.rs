//! Allocation sites as pprof profiles (`profile.proto`, gzipped), the format
//! `go tool pprof`, Pyroscope/Alloy and Parca read: a sample per (worker,
//! stack) with the worker's pid and name as labels, values already scaled
//! from the kernel's samples, functions with file and line where the debug
//! info has them, mappings with build ids. The messages are written by hand
//! with prost's derive, field numbers as in
//! github.com/google/pprof/proto/profile.proto, so no protoc at build time.
use std::{collections::HashMap, io::Write as _};

use flate2::{Compression, write::GzEncoder};
use prost::Message as _;

use super::{
    snapshot::{RawSite, SiteKind, signature},
    symbolize::Frame,
};
use crate::model::procinfo::CodeMapping;

#[derive(Clone, PartialEq, prost::Message)]
pub struct Profile {
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    #[prost(message, repeated, tag = "3")]
    pub mapping: Vec<Mapping>,
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    #[prost(int64, tag = "12")]
    pub period: i64,
    #[prost(int64, repeated, tag = "13")]
    pub comment: Vec<i64>,
    #[prost(int64, tag = "14")]
    pub default_sample_type: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueType {
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Label {
    #[prost(int64, tag = "1")]
    pub key: i64,
    #[prost(int64, tag = "2")]
    pub str: i64,
    #[prost(int64, tag = "3")]
    pub num: i64,
    #[prost(int64, tag = "4")]
    pub num_unit: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Mapping {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub memory_start: u64,
    #[prost(uint64, tag = "3")]
    pub memory_limit: u64,
    #[prost(uint64, tag = "4")]
    pub file_offset: u64,
    #[prost(int64, tag = "5")]
    pub filename: i64,
    #[prost(int64, tag = "6")]
    pub build_id: i64,
    #[prost(bool, tag = "7")]
    pub has_functions: bool,
    #[prost(bool, tag = "8")]
    pub has_filenames: bool,
    #[prost(bool, tag = "9")]
    pub has_line_numbers: bool,
    #[prost(bool, tag = "10")]
    pub has_inline_frames: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Location {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub mapping_id: u64,
    #[prost(uint64, tag = "3")]
    pub address: u64,
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
    #[prost(bool, tag = "5")]
    pub is_folded: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Line {
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    #[prost(int64, tag = "2")]
    pub line: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Function {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "2")]
    pub name: i64,
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    #[prost(int64, tag = "4")]
    pub filename: i64,
    #[prost(int64, tag = "5")]
    pub start_line: i64,
}

/// Which sites a profile holds. Kinds are not mixed: a heap block and the
/// pages it touched are the same memory counted twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProfileSource {
    /// Live heap blocks (heap tier): inuse and alloc values, as Go's heap profile.
    Heap,
    /// Pages first touched (growth tier): inuse_space is resident bytes,
    /// inuse_objects pages.
    Faults,
}

impl ProfileSource {
    pub fn kind(self) -> SiteKind {
        match self {
            Self::Heap => SiteKind::Malloc,
            Self::Faults => SiteKind::Fault,
        }
    }

    /// Sample types in value order; the last is the default, as in Go's.
    fn sample_types(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::Heap => &[
                ("alloc_objects", "count"),
                ("alloc_space", "bytes"),
                ("inuse_objects", "count"),
                ("inuse_space", "bytes"),
            ],
            Self::Faults => &[("inuse_objects", "count"), ("inuse_space", "bytes")],
        }
    }

    fn values(self, s: &RawSite) -> Vec<i64> {
        match self {
            Self::Heap => vec![
                s.alloc_objects as i64,
                s.alloc_bytes as i64,
                s.objects as i64,
                s.bytes as i64,
            ],
            Self::Faults => vec![s.objects as i64, s.bytes as i64],
        }
    }
}

/// (pid, innermost-first frames, values in sample-type order).
type SampleRow<'a> = (u32, &'a [Frame], Vec<i64>);

/// A location's identity: address and what it resolved to.
type LocationKey = (u64, Option<String>, Option<String>, Option<u32>);

/// One profile's content: a value vector per (worker, stack).
pub struct ProfileData<'a> {
    pub source: ProfileSource,
    pub samples: Vec<SampleRow<'a>>,
    /// Worker names by pid, for the `worker` label.
    pub names: HashMap<u32, String>,
    /// Executable mappings of the workers (the first pid with a path wins).
    pub mappings: Vec<CodeMapping>,
    /// Mean bytes between heap samples (the heap profile's period).
    pub period: u64,
    pub time_nanos: i64,
    pub duration_nanos: i64,
    pub comment: String,
}

impl<'a> ProfileData<'a> {
    /// The sites of a snapshot.
    pub fn snapshot(source: ProfileSource, sites: &'a [RawSite]) -> Self {
        let samples = sites
            .iter()
            .filter(|s| s.kind == source.kind())
            .map(|s| (s.pid, s.frames.as_slice(), source.values(s)))
            .filter(|(_, _, v)| v.iter().any(|&x| x != 0))
            .collect();
        Self::empty(source, samples)
    }

    /// Growth from `before` to `after`, per worker and stack (negative where
    /// a site shrank): a profile of growth, also usable as `-diff_base`.
    pub fn diff(source: ProfileSource, before: &'a [RawSite], after: &'a [RawSite]) -> Self {
        let kind = source.kind();
        let key = |s: &RawSite| (s.pid, signature(s.kind, &s.frames));
        let mut by_key: HashMap<(u32, String), SampleRow<'a>> = HashMap::new();
        // Several kernel sites may print the same (one Python line reached
        // through several native paths): their values add up.
        for s in after.iter().filter(|s| s.kind == kind) {
            let entry = by_key.entry(key(s)).or_insert_with(|| {
                let zeros = vec![0; source.sample_types().len()];
                (s.pid, s.frames.as_slice(), zeros)
            });
            for (v, a) in entry.2.iter_mut().zip(source.values(s)) {
                *v += a;
            }
        }
        for s in before.iter().filter(|s| s.kind == kind) {
            let entry = by_key.entry(key(s)).or_insert_with(|| {
                let zeros = vec![0; source.sample_types().len()];
                (s.pid, s.frames.as_slice(), zeros)
            });
            for (v, b) in entry.2.iter_mut().zip(source.values(s)) {
                *v -= b;
            }
        }
        let mut samples: Vec<_> = by_key
            .into_values()
            .filter(|(_, _, v)| v.iter().any(|&x| x != 0))
            .collect();
        samples.sort_by(|a, b| b.2.last().cmp(&a.2.last()));
        Self::empty(source, samples)
    }

    fn empty(source: ProfileSource, samples: Vec<SampleRow<'a>>) -> Self {
        Self {
            source,
            samples,
            names: HashMap::new(),
            mappings: Vec::new(),
            period: 0,
            time_nanos: 0,
            duration_nanos: 0,
            comment: String::new(),
        }
    }

    /// The profile message.
    pub fn to_profile(&self) -> Profile {
        let mut b = Builder::default();
        b.string(""); // index 0 is always the empty string
        let mut profile = Profile {
            sample_type: self
                .source
                .sample_types()
                .iter()
                .map(|(t, u)| ValueType {
                    r#type: b.string(t),
                    unit: b.string(u),
                })
                .collect(),
            time_nanos: self.time_nanos,
            duration_nanos: self.duration_nanos,
            period_type: Some(ValueType {
                r#type: b.string("space"),
                unit: b.string("bytes"),
            }),
            period: self.period as i64,
            ..Profile::default()
        };
        profile.default_sample_type = profile.sample_type.last().map_or(0, |t| t.r#type);
        if !self.comment.is_empty() {
            profile.comment.push(b.string(&self.comment));
        }
        for m in &self.mappings {
            b.mapping(m);
        }
        let (pid_key, worker_key) = (b.string("pid"), b.string("worker"));
        let (bytes_key, bytes_unit) = (b.string("bytes"), b.string("bytes"));
        for (pid, frames, values) in &self.samples {
            let location_id = frames.iter().map(|f| b.location(f)).collect();
            let mut label = vec![Label {
                key: pid_key,
                num: i64::from(*pid),
                ..Label::default()
            }];
            if let Some(name) = self.names.get(pid) {
                label.push(Label {
                    key: worker_key,
                    str: b.string(name),
                    ..Label::default()
                });
            }
            // Go's heap profiles label each sample with its block size.
            if self.source == ProfileSource::Heap && values[0] > 0 && values[1] > 0 {
                label.push(Label {
                    key: bytes_key,
                    num: values[1] / values[0],
                    num_unit: bytes_unit,
                    ..Label::default()
                });
            }
            profile.sample.push(Sample {
                location_id,
                value: values.clone(),
                label,
            });
        }
        profile.mapping = b.mappings;
        profile.location = b.locations;
        profile.function = b.functions;
        profile.string_table = b.strings;
        profile
    }

    /// The gzipped encoding `go tool pprof` reads.
    pub fn to_pprof_gz(&self) -> Vec<u8> {
        let raw = self.to_profile().encode_to_vec();
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        // Writing to a Vec cannot fail.
        let _ = gz.write_all(&raw);
        gz.finish().unwrap_or_default()
    }
}

/// Interns strings, functions, locations and mappings.
#[derive(Default)]
struct Builder {
    strings: Vec<String>,
    string_ids: HashMap<String, i64>,
    functions: Vec<Function>,
    function_ids: HashMap<(String, String), u64>,
    locations: Vec<Location>,
    location_ids: HashMap<LocationKey, u64>,
    mappings: Vec<Mapping>,
    /// Mapping id by path.
    mapping_ids: HashMap<String, u64>,
}

impl Builder {
    fn string(&mut self, s: &str) -> i64 {
        if let Some(&id) = self.string_ids.get(s) {
            return id;
        }
        let id = self.strings.len() as i64;
        self.strings.push(s.to_string());
        self.string_ids.insert(s.to_string(), id);
        id
    }

    fn mapping(&mut self, m: &CodeMapping) {
        if self.mapping_ids.contains_key(&m.path) {
            // One mapping per file: its first executable segment.
            return;
        }
        let id = self.mappings.len() as u64 + 1;
        let mapping = Mapping {
            id,
            memory_start: m.start,
            memory_limit: m.limit,
            file_offset: m.file_offset,
            filename: self.string(&m.path),
            build_id: m.build_id.as_deref().map_or(0, |b| self.string(b)),
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: false,
        };
        self.mappings.push(mapping);
        self.mapping_ids.insert(m.path.clone(), id);
    }

    /// The mapping of a frame's module; symbolizers may name it through
    /// /proc/PID/root, so a suffix match counts.
    fn mapping_of(&self, module: Option<&str>) -> u64 {
        let Some(module) = module else { return 0 };
        if let Some(&id) = self.mapping_ids.get(module) {
            return id;
        }
        self.mapping_ids
            .iter()
            .find(|(path, _)| module.ends_with(path.as_str()))
            .map_or(0, |(_, &id)| id)
    }

    fn function(&mut self, name: &str, file: &str) -> u64 {
        let key = (name.to_string(), file.to_string());
        if let Some(&id) = self.function_ids.get(&key) {
            return id;
        }
        let id = self.functions.len() as u64 + 1;
        let function = Function {
            id,
            name: self.string(name),
            system_name: self.string(name),
            filename: self.string(file),
            start_line: 0,
        };
        self.functions.push(function);
        self.function_ids.insert(key, id);
        id
    }

    fn location(&mut self, f: &Frame) -> u64 {
        let key = (f.addr, f.function.clone(), f.file.clone(), f.line);
        if let Some(&id) = self.location_ids.get(&key) {
            return id;
        }
        let id = self.locations.len() as u64 + 1;
        let mapping_id = self.mapping_of(f.module.as_deref());
        let name = frame_name(f);
        let function_id = self.function(&name, f.file.as_deref().unwrap_or(""));
        self.locations.push(Location {
            id,
            mapping_id,
            address: f.addr,
            line: vec![Line {
                function_id,
                line: f.line.map_or(0, i64::from),
            }],
            is_folded: false,
        });
        self.location_ids.insert(key, id);
        id
    }
}

/// A frame's function name, or where it is when unresolved.
pub fn frame_name(f: &Frame) -> String {
    match (&f.function, &f.module) {
        (Some(name), _) => name.clone(),
        (None, Some(module)) => {
            let file = module.rsplit('/').next().unwrap_or(module);
            format!("[{file}] {:#x}", f.addr)
        }
        (None, None) => format!("{:#x}", f.addr),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    fn frame(func: &str, line: u32, addr: u64) -> Frame {
        Frame {
            addr,
            function: Some(func.into()),
            offset: Some(0x10),
            file: Some(format!("/src/{func}.c")),
            line: Some(line),
            module: Some("/app/libh.so".into()),
            unresolved: None,
        }
    }

    fn heap_site(pid: u32, bytes: u64, frames: Vec<Frame>) -> RawSite {
        RawSite {
            pid,
            kind: SiteKind::Malloc,
            bytes,
            objects: bytes / 1024,
            samples: 1,
            alloc_bytes: 2 * bytes,
            alloc_objects: 2 * bytes / 1024,
            frames,
        }
    }

    fn decode(gz: &[u8]) -> Profile {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut raw)
            .expect("gzip");
        Profile::decode(raw.as_slice()).expect("profile.proto")
    }

    fn leak() -> Vec<Frame> {
        vec![
            frame("leak_memory", 20, 0x1010),
            frame("handle_request", 40, 0x1100),
        ]
    }

    #[test]
    fn heap_profile_round_trips_with_labels_lines_and_mappings() {
        let sites = vec![
            heap_site(7, 4096, leak()),
            heap_site(8, 8192, leak()),
            RawSite {
                kind: SiteKind::Fault,
                ..heap_site(7, 1 << 20, leak())
            },
        ];
        let mut data = ProfileData::snapshot(ProfileSource::Heap, &sites);
        data.names.insert(7, "leaky_server".into());
        data.period = 512 * 1024;
        data.mappings = vec![CodeMapping {
            start: 0x1000,
            limit: 0x2000,
            file_offset: 0,
            path: "/app/libh.so".into(),
            build_id: Some("abcd".into()),
        }];
        let p = decode(&data.to_pprof_gz());
        let s = |i: i64| p.string_table[i as usize].as_str();
        assert_eq!(s(0), "");
        let types: Vec<&str> = p.sample_type.iter().map(|t| s(t.r#type)).collect();
        assert_eq!(
            types,
            [
                "alloc_objects",
                "alloc_space",
                "inuse_objects",
                "inuse_space"
            ]
        );
        assert_eq!(s(p.default_sample_type), "inuse_space");
        assert_eq!(p.period, 512 * 1024);
        // The fault site is not in a heap profile.
        assert_eq!(p.sample.len(), 2);
        let first = &p.sample[0];
        assert_eq!(first.value, vec![8, 8192, 4, 4096]);
        assert_eq!(first.location_id.len(), 2);
        let label = |smp: &Sample, key: &str| {
            smp.label
                .iter()
                .find(|l| s(l.key) == key)
                .map(|l| (l.num, s(l.str).to_string()))
        };
        assert_eq!(label(first, "pid"), Some((7, String::new())));
        assert_eq!(label(first, "worker").unwrap().1, "leaky_server");
        assert_eq!(label(&p.sample[1], "worker"), None);
        assert_eq!(label(first, "bytes").map(|l| l.0), Some(1024));
        // Two stacks share their locations and functions.
        assert_eq!(p.location.len(), 2);
        assert_eq!(p.function.len(), 2);
        let leaf = &p.location[(first.location_id[0] - 1) as usize];
        assert_eq!(leaf.line[0].line, 20);
        let f = &p.function[(leaf.line[0].function_id - 1) as usize];
        assert_eq!(
            (s(f.name), s(f.filename)),
            ("leak_memory", "/src/leak_memory.c")
        );
        assert_eq!(leaf.mapping_id, 1);
        assert_eq!(s(p.mapping[0].build_id), "abcd");
        assert_eq!(s(p.mapping[0].filename), "/app/libh.so");
    }

    #[test]
    fn diff_profile_holds_growth_per_worker_and_stack() {
        let other = vec![frame("scratch", 30, 0x1200)];
        let before = vec![
            heap_site(7, 4096, leak()),
            heap_site(7, 1024, other.clone()),
        ];
        let after = vec![heap_site(7, 4096 * 11, leak()), heap_site(7, 1024, other)];
        let data = ProfileData::diff(ProfileSource::Heap, &before, &after);
        assert_eq!(data.samples.len(), 1, "unchanged sites are left out");
        assert_eq!(data.samples[0].2[3], 40960);
        assert_eq!(
            data.samples[0].1[0].function.as_deref(),
            Some("leak_memory")
        );
        let p = data.to_profile();
        assert_eq!(p.sample[0].value[3], 40960);
    }

    #[test]
    fn diff_profile_adds_sites_that_print_the_same() {
        // Two kernel sites of one Python line (two native paths): the diff
        // is their sum after minus their sum before, not the last one's.
        let before = vec![heap_site(7, 4096, leak()), heap_site(7, 4096, leak())];
        let after = vec![
            heap_site(7, 4096 * 3, leak()),
            heap_site(7, 4096 * 2, leak()),
        ];
        let data = ProfileData::diff(ProfileSource::Heap, &before, &after);
        assert_eq!(data.samples.len(), 1);
        assert_eq!(data.samples[0].2[3], 4096 * 3);
    }

    #[test]
    fn fault_profiles_have_two_sample_types() {
        let sites = vec![RawSite {
            kind: SiteKind::Fault,
            ..heap_site(7, 1 << 20, leak())
        }];
        let p = ProfileData::snapshot(ProfileSource::Faults, &sites).to_profile();
        assert_eq!(p.sample_type.len(), 2);
        assert_eq!(p.sample[0].value, vec![1024, 1 << 20]);
    }
}
