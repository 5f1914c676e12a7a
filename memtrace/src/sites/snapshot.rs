//! Allocation-site snapshots and diffs: the kernel's user stacks of heap
//! allocations still live (malloc probes), of sampled page faults and of
//! mmap/brk calls, symbolized while the processes are alive, plus
//! per-mapping sizes from /proc/PID/smaps. Collection costs a uprobe pair
//! per malloc and a stack walk per allocation or sampled fault, so it only
//! runs between `snapshot` and `stop`.
use std::{
    collections::{BTreeMap, HashMap},
    sync::mpsc,
    thread,
    time::{SystemTime, UNIX_EPOCH},
};

use memtrace_common::{SITE_BRK, SITE_FAULT, SITE_MALLOC, SITE_MMAP};
use serde::Serialize;

use super::{
    python::PYTHON_MODULE,
    symbolize::{Frame, Symbolizer, Unresolved},
    view::{Naming, SiteView, ViewSpec},
};
use crate::model::procinfo::{self, MappingUsage};

/// Frames kept per site in the output.
const STACK_FRAMES_SHOWN: usize = 16;

/// What a site's bytes measure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SiteKind {
    /// Heap blocks allocated here (malloc, calloc, realloc) and not freed:
    /// what tracemalloc would report.
    Malloc,
    /// Pages first touched here (sampled faults, weighted): resident growth.
    Fault,
    /// mmap(2) called from here: address space mapped.
    #[default]
    Mmap,
    /// brk(2) growth asked from here (malloc's heap).
    Brk,
}

impl SiteKind {
    pub fn from_kernel(kind: u32) -> Option<Self> {
        match kind {
            SITE_FAULT => Some(Self::Fault),
            SITE_MMAP => Some(Self::Mmap),
            SITE_BRK => Some(Self::Brk),
            SITE_MALLOC => Some(Self::Malloc),
            _ => None,
        }
    }
}

/// One kernel site, symbolized. Heap sites' values are estimates, already
/// scaled from the sampled blocks ([`scale_heap_sample`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RawSite {
    pub pid: u32,
    pub kind: SiteKind,
    /// Live bytes (heap), bytes touched (faults) or asked for (mmap, brk).
    pub bytes: u64,
    /// Live blocks (heap), pages (faults) or calls (mmap, brk).
    pub objects: u64,
    /// Kernel samples behind the values.
    pub samples: u64,
    /// Heap: every block allocated, freed or not; 0 for other kinds.
    pub alloc_bytes: u64,
    pub alloc_objects: u64,
    pub frames: Vec<Frame>,
}

/// Go's `scaleHeapSample`: `count` blocks of `size` bytes in all were
/// sampled at a mean interval of `rate` bytes, each with probability
/// 1 - exp(-s/rate) for its size s; dividing by it gives unbiased estimates
/// (exact when a site's blocks share one size, as they mostly do).
pub fn scale_heap_sample(count: u64, size: u64, rate: u64) -> (u64, u64) {
    if count == 0 || size == 0 {
        return (0, 0);
    }
    if rate <= 1 {
        return (count, size);
    }
    let avg = size as f64 / count as f64;
    let scale = 1.0 / (1.0 - (-avg / rate as f64).exp());
    (
        (count as f64 * scale).round() as u64,
        (size as f64 * scale).round() as u64,
    )
}

/// A call stack that allocated, summed over the selected workers.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Site {
    /// Innermost function (or its address when unresolved).
    pub function: String,
    /// Source file:line of the innermost frame, when debug info has it.
    pub location: Option<String>,
    /// The binary or library of the innermost frame.
    pub module: Option<String>,
    /// When the innermost frame is in a system library (libc's malloc,
    /// memset), the first frame of the application's own code.
    pub caller: Option<String>,
    pub kind: SiteKind,
    /// Heap: estimated live bytes (sampled, scaled).
    pub bytes: u64,
    /// Heap: estimated live blocks; faults: pages; mmap/brk: calls.
    pub objects: u64,
    /// Kernel samples behind the estimate.
    pub samples: u64,
    /// Heap: estimated bytes allocated since collection began, freed or not.
    pub alloc_bytes: u64,
    pub alloc_objects: u64,
    pub pids: Vec<u32>,
    /// App view: the innermost Python frame, in a few words, when the site
    /// is named after an outer frame of the application
    /// (`json/encoder.py:258 iterencode`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// Innermost first: the largest stack of the site's (a view groups
    /// several stacks under one frame).
    pub stack: Vec<String>,
    /// The frames of that stack.
    #[serde(skip)]
    pub frames: Vec<Frame>,
}

/// Libraries whose frames are not "the code that allocated".
fn is_system_library(module: &str) -> bool {
    let file = module.rsplit('/').next().unwrap_or(module);
    [
        "libc.so",
        "libc-",
        "ld-linux",
        "ld-musl",
        "libpthread",
        "libm.so",
        "libdl",
        "libstdc++",
        "libgcc_s",
    ]
    .iter()
    .any(|p| file.starts_with(p))
}

fn frame_location(f: &Frame) -> Option<String> {
    let file = f.file.as_deref()?;
    if f.module.as_deref() == Some(PYTHON_MODULE) {
        return Some(format!("{file}:{}", f.line.unwrap_or(0)));
    }
    let short = file.rsplit('/').next().unwrap_or(file);
    Some(match f.line {
        Some(line) => format!("{short}:{line}"),
        None => short.to_string(),
    })
}

/// A stack's identity across processes: the kind and the frames as a site
/// shows them (functions with offsets or lines, modules), not addresses
/// (exec'd workers have their own address layout). Stacks that print the
/// same are one site: a Python site is its Python lines, however many
/// native paths led to the allocation under them.
pub fn signature(kind: SiteKind, frames: &[Frame]) -> String {
    let mut sig = format!("{kind:?}");
    for f in frames.iter().take(STACK_FRAMES_SHOWN) {
        sig.push('|');
        sig.push_str(&shown(f));
    }
    sig
}

/// A frame as sites show it; Python frames with their file's full path,
/// as tracemalloc does (`views.py` alone names a file in every app).
fn shown(f: &Frame) -> String {
    if f.module.as_deref() == Some(PYTHON_MODULE)
        && let (Some(function), Some(file)) = (&f.function, &f.file)
    {
        return format!("{file}:{} {function}", f.line.unwrap_or(0));
    }
    f.display()
}

/// A site's identity in a view: the whole stack, or its naming frame.
fn view_key(kind: SiteKind, frames: &[Frame], naming: Naming) -> String {
    match frames.get(naming.name).filter(|_| naming.by_name) {
        Some(f) => format!("{kind:?}|{}", shown(f)),
        None => signature(kind, frames),
    }
}

impl Site {
    fn new(raw: &RawSite, naming: Naming, spec: &ViewSpec) -> Self {
        let innermost = raw.frames.get(naming.name);
        let function = innermost.map_or_else(
            || "[unknown]".to_string(),
            |f| {
                f.function
                    .clone()
                    .unwrap_or_else(|| format!("{:#x}", f.addr))
            },
        );
        let in_system = naming.name == 0
            && innermost
                .and_then(|f| f.module.as_deref())
                .is_some_and(is_system_library);
        let caller = in_system
            .then(|| {
                raw.frames
                    .iter()
                    .find(|f| !f.module.as_deref().is_some_and(is_system_library))
                    .map(Frame::display)
            })
            .flatten();
        Self {
            function,
            location: innermost.and_then(frame_location),
            module: innermost.and_then(|f| f.module.clone()),
            caller,
            kind: raw.kind,
            bytes: 0,
            objects: 0,
            samples: 0,
            alloc_bytes: 0,
            alloc_objects: 0,
            pids: Vec::new(),
            via: naming
                .via
                .and_then(|i| raw.frames.get(i))
                .map(|f| spec.app.short(raw.pid, f)),
            stack: raw
                .frames
                .iter()
                .take(STACK_FRAMES_SHOWN)
                .map(shown)
                .collect(),
            frames: raw
                .frames
                .iter()
                .take(STACK_FRAMES_SHOWN)
                .cloned()
                .collect(),
        }
    }
}

/// Mapping totals by name over the selected workers.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MappingTotal {
    pub name: String,
    pub rss_bytes: u64,
    pub anonymous_bytes: u64,
    pub size_bytes: u64,
    pub regions: u64,
}

/// The state at one instant: sites (cumulative since collection began) and
/// mappings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub taken_unix: f64,
    pub view: SiteView,
    pub pids: Vec<u32>,
    pub sites: HashMap<String, Site>,
    pub mappings: BTreeMap<u32, Vec<MappingUsage>>,
}

impl Snapshot {
    /// Sites grouped as `spec`'s view groups them; a site shows the
    /// stack of its largest member.
    pub fn build(
        pids: Vec<u32>,
        raw: Vec<RawSite>,
        mappings: BTreeMap<u32, Vec<MappingUsage>>,
        spec: &ViewSpec,
    ) -> Self {
        let mut sites: HashMap<String, Site> = HashMap::new();
        let mut members: Vec<&RawSite> = raw.iter().filter(|r| pids.contains(&r.pid)).collect();
        members.sort_by_key(|r| std::cmp::Reverse(r.bytes));
        for r in members {
            let naming = spec.naming(r.pid, &r.frames);
            let site = sites
                .entry(view_key(r.kind, &r.frames, naming))
                .or_insert_with(|| Site::new(r, naming, spec));
            site.bytes += r.bytes;
            site.objects += r.objects;
            site.samples += r.samples;
            site.alloc_bytes += r.alloc_bytes;
            site.alloc_objects += r.alloc_objects;
            if !site.pids.contains(&r.pid) {
                site.pids.push(r.pid);
                site.pids.sort_unstable();
            }
        }
        Self {
            taken_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            view: spec.view,
            pids,
            sites,
            mappings,
        }
    }

    fn top(&self, kinds: &[SiteKind], limit: usize) -> Vec<Site> {
        let mut v: Vec<Site> = self
            .sites
            .values()
            .filter(|s| kinds.contains(&s.kind))
            .cloned()
            .collect();
        v.sort_by(|a, b| {
            b.bytes
                .cmp(&a.bytes)
                .then_with(|| a.function.cmp(&b.function))
        });
        v.truncate(limit);
        v
    }

    pub fn mapping_totals(&self) -> Vec<MappingTotal> {
        let mut by_name: BTreeMap<&str, MappingTotal> = BTreeMap::new();
        for m in self.mappings.values().flatten() {
            let t = by_name.entry(&m.name).or_insert_with(|| MappingTotal {
                name: m.name.clone(),
                ..Default::default()
            });
            t.rss_bytes += m.rss;
            t.anonymous_bytes += m.anonymous;
            t.size_bytes += m.size;
            t.regions += m.regions;
        }
        let mut v: Vec<MappingTotal> = by_name.into_values().collect();
        v.sort_by(|a, b| {
            b.rss_bytes
                .cmp(&a.rss_bytes)
                .then_with(|| a.name.cmp(&b.name))
        });
        v
    }

    pub fn view(&self, limit: usize) -> SnapshotView {
        let mut mappings = self.mapping_totals();
        mappings.truncate(limit);
        let shown: Vec<&Site> = self.sites.values().collect();
        SnapshotView {
            taken_unix: self.taken_unix,
            view: self.view,
            unresolved: UnresolvedCount::of(&shown),
            pids: self.pids.clone(),
            top_allocations: self.top(&[SiteKind::Malloc], limit),
            top_page_faults: self.top(&[SiteKind::Fault], limit),
            top_mapping_calls: self.top(&[SiteKind::Mmap, SiteKind::Brk], limit),
            mappings,
        }
    }
}

/// `?action=snapshot`
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SnapshotView {
    pub taken_unix: f64,
    /// How Python sites are grouped and named.
    pub view: SiteView,
    /// Python frames of these sites that could not be read, and why.
    pub unresolved: UnresolvedCount,
    pub pids: Vec<u32>,
    /// Live heap bytes by allocating stack (allocated since collection
    /// began and not freed), largest first.
    pub top_allocations: Vec<Site>,
    /// Where resident memory was first touched (sampled page faults).
    pub top_page_faults: Vec<Site>,
    /// Where mmap and brk were called from, by bytes asked for.
    pub top_mapping_calls: Vec<Site>,
    /// Resident memory by mapping over the selected workers.
    pub mappings: Vec<MappingTotal>,
}

/// Python frames that stayed addresses, by reason.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct UnresolvedCount {
    /// Frames (in the sites' stacks) with no name.
    pub frames: u64,
    pub by_reason: BTreeMap<Unresolved, u64>,
}

impl UnresolvedCount {
    fn of(sites: &[&Site]) -> Self {
        let mut count = Self::default();
        for why in sites
            .iter()
            .flat_map(|s| &s.frames)
            .filter_map(|f| f.unresolved)
        {
            count.frames += 1;
            *count.by_reason.entry(why).or_default() += 1;
        }
        count
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SiteGrowth {
    #[serde(flatten)]
    pub site: Site,
    pub bytes_before: u64,
    pub growth_bytes: i64,
    /// Blocks (heap), pages (faults) or calls (mmap, brk) at the baseline,
    /// and their growth: tracemalloc's count and count growth.
    pub objects_before: u64,
    pub growth_objects: i64,
    /// Grew in an earlier diff and not in this one (warm-up, a cache that
    /// filled up): listed after the sites still growing.
    pub stopped: bool,
    /// When it last grew (the end of that diff), for stopped sites.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_grew_unix: Option<f64>,
    /// Its growth over the earlier diffs since the snapshot.
    pub earlier_growth_bytes: u64,
}

/// Per site (by its key in the view), the growth of each diff since the
/// snapshot: what tells a site that stopped growing.
#[derive(Clone, Debug, Default)]
pub struct GrowthHistory {
    grew: HashMap<String, (f64, u64)>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MappingGrowth {
    pub name: String,
    pub rss_before: u64,
    pub rss_after: u64,
    pub growth_bytes: i64,
    pub anonymous_growth_bytes: i64,
}

/// `?action=diff`
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DiffView {
    pub since_unix: f64,
    pub taken_unix: f64,
    /// How Python sites are grouped and named.
    pub view: SiteView,
    /// Python frames of the listed sites that could not be read, and why.
    pub unresolved: UnresolvedCount,
    /// Sites that stopped growing were left out (`still_growing`).
    pub still_growing: bool,
    pub pids: Vec<u32>,
    /// Growth of live heap bytes by allocating stack, largest first.
    pub growth: Vec<SiteGrowth>,
    /// Pages first touched since the baseline, by stack.
    pub fault_growth: Vec<SiteGrowth>,
    /// Growth of mmap/brk calls by stack.
    pub mapping_call_growth: Vec<SiteGrowth>,
    /// Growth by mapping ([heap], [anon], libraries), largest first.
    pub mappings: Vec<MappingGrowth>,
}

/// Growth of the sites of `kinds`: those that grew, largest first, then
/// those that grew in an earlier diff and not in this one (unless
/// `still_growing`), by their earlier growth. Records this diff's growth.
fn site_growth(
    before: &Snapshot,
    after: &Snapshot,
    kinds: &[SiteKind],
    history: &mut GrowthHistory,
    still_growing: bool,
) -> Vec<SiteGrowth> {
    let mut grown = Vec::new();
    let mut stopped = Vec::new();
    for (key, s) in after.sites.iter().filter(|(_, s)| kinds.contains(&s.kind)) {
        let (bytes_before, objects_before) = before
            .sites
            .get(key)
            .map_or((0, 0), |b| (b.bytes, b.objects));
        let growth_bytes = s.bytes as i64 - bytes_before as i64;
        let earlier = history.grew.get(key).copied();
        let row = SiteGrowth {
            site: s.clone(),
            bytes_before,
            growth_bytes,
            objects_before,
            growth_objects: s.objects as i64 - objects_before as i64,
            stopped: false,
            last_grew_unix: None,
            earlier_growth_bytes: earlier.map_or(0, |(_, b)| b),
        };
        if growth_bytes > 0 {
            let total = row.earlier_growth_bytes + growth_bytes as u64;
            history.grew.insert(key.clone(), (after.taken_unix, total));
            grown.push(row);
        } else if let Some((when, _)) = earlier {
            stopped.push(SiteGrowth {
                stopped: true,
                last_grew_unix: Some(when),
                ..row
            });
        }
    }
    grown.sort_by(|a, b| {
        b.growth_bytes
            .cmp(&a.growth_bytes)
            .then_with(|| a.site.function.cmp(&b.site.function))
    });
    if !still_growing {
        stopped.sort_by(|a, b| {
            b.earlier_growth_bytes
                .cmp(&a.earlier_growth_bytes)
                .then_with(|| a.site.function.cmp(&b.site.function))
        });
        grown.extend(stopped);
    }
    grown
}

/// Growth from `before` to `after`.
pub fn diff(
    before: &Snapshot,
    after: &Snapshot,
    limit: usize,
    history: &mut GrowthHistory,
    still_growing: bool,
) -> DiffView {
    let before_maps: HashMap<String, MappingTotal> = before
        .mapping_totals()
        .into_iter()
        .map(|m| (m.name.clone(), m))
        .collect();
    let after_maps = after.mapping_totals();
    let mut names: Vec<String> = after_maps.iter().map(|m| m.name.clone()).collect();
    for name in before_maps.keys() {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    let after_by: HashMap<&str, &MappingTotal> =
        after_maps.iter().map(|m| (m.name.as_str(), m)).collect();
    let mut mappings: Vec<MappingGrowth> = names
        .iter()
        .map(|name| {
            let b = before_maps.get(name);
            let a = after_by.get(name.as_str());
            let rss_before = b.map_or(0, |m| m.rss_bytes);
            let rss_after = a.map_or(0, |m| m.rss_bytes);
            MappingGrowth {
                name: name.clone(),
                rss_before,
                rss_after,
                growth_bytes: rss_after as i64 - rss_before as i64,
                anonymous_growth_bytes: a.map_or(0, |m| m.anonymous_bytes) as i64
                    - b.map_or(0, |m| m.anonymous_bytes) as i64,
            }
        })
        .collect();
    mappings.sort_by(|a, b| {
        b.growth_bytes
            .cmp(&a.growth_bytes)
            .then_with(|| a.name.cmp(&b.name))
    });
    mappings.truncate(limit);
    let mut lists = [
        &[SiteKind::Malloc][..],
        &[SiteKind::Fault],
        &[SiteKind::Mmap, SiteKind::Brk],
    ]
    .map(|kinds| site_growth(before, after, kinds, history, still_growing));
    // Only sites that still exist can show as stopped: the rest go, or the
    // history would keep every site of every worker that ever exited (a
    // recycled worker's Python frames whose code objects were freed are
    // named by address, new with each worker).
    history.grew.retain(|key, _| after.sites.contains_key(key));
    let listed: Vec<&Site> = lists.iter().flatten().map(|g| &g.site).collect();
    let unresolved = UnresolvedCount::of(&listed);
    for list in &mut lists {
        list.truncate(limit);
    }
    let [growth, fault_growth, mapping_call_growth] = lists;
    DiffView {
        since_unix: before.taken_unix,
        taken_unix: after.taken_unix,
        view: after.view,
        unresolved,
        still_growing,
        pids: after.pids.clone(),
        growth,
        fault_growth,
        mapping_call_growth,
        mappings,
    }
}

/// Reads the per-mapping usage of each pid (skipping any that exited).
pub fn read_mappings(pids: &[u32]) -> BTreeMap<u32, Vec<MappingUsage>> {
    pids.iter()
        .filter_map(|&p| procinfo::mappings(p).map(|m| (p, m)))
        .collect()
}

/// blazesym's symbolizer cannot move between threads, so it lives on one
/// of its own and is asked through a channel; its frame cache survives
/// snapshots, what blazesym parsed is released after each.
pub struct SymbolizerService {
    jobs: mpsc::Sender<Job>,
}

enum Job {
    Symbolize {
        pid: u32,
        addrs: Vec<u64>,
        reply: mpsc::Sender<Vec<Frame>>,
    },
    Forget(u32),
    /// Drop what blazesym parsed; answer when done.
    Release(mpsc::Sender<()>),
}

impl SymbolizerService {
    pub fn spawn() -> Self {
        let (jobs, rx) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("memtrace-symbolizer".into())
            .spawn(move || {
                let mut symbolizer = Symbolizer::new();
                for job in rx {
                    match job {
                        Job::Symbolize { pid, addrs, reply } => {
                            // A process gone meanwhile keeps its raw addresses.
                            let frames =
                                symbolizer
                                    .symbolize_cached(pid, &addrs)
                                    .unwrap_or_else(|_| {
                                        addrs.iter().map(|&addr| Frame::unresolved(addr)).collect()
                                    });
                            let _ = reply.send(frames);
                        }
                        Job::Forget(pid) => symbolizer.forget(pid),
                        Job::Release(done) => {
                            symbolizer.release_parsed();
                            let _ = done.send(());
                        }
                    }
                }
            })
            .expect("spawn the symbolizer thread");
        Self { jobs }
    }

    /// Symbolizes one stack of a live process. The kernel gives the faulting
    /// instruction first, then return addresses: those are looked up one byte
    /// back, inside the call instruction, so the line is the call's.
    pub fn stack(&self, pid: u32, ips: &[u64]) -> Vec<Frame> {
        let lookup: Vec<u64> = ips
            .iter()
            .enumerate()
            .map(|(i, &ip)| if i == 0 { ip } else { ip.saturating_sub(1) })
            .collect();
        let (reply, rx) = mpsc::channel();
        let job = Job::Symbolize {
            pid,
            addrs: lookup,
            reply,
        };
        if self.jobs.send(job).is_err() {
            return ips.iter().map(|&a| Frame::unresolved(a)).collect();
        }
        let mut frames = rx
            .recv()
            .unwrap_or_else(|_| ips.iter().map(|&a| Frame::unresolved(a)).collect());
        // Report the addresses the kernel gave.
        for (f, &ip) in frames.iter_mut().zip(ips) {
            f.addr = ip;
        }
        frames
    }

    pub fn forget(&self, pid: u32) {
        let _ = self.jobs.send(Job::Forget(pid));
    }

    /// Drops what blazesym parsed (see [`Symbolizer::release_parsed`]) and
    /// returns once it is freed, so that the heap can be trimmed after.
    pub fn release(&self) {
        let (done, rx) = mpsc::channel();
        if self.jobs.send(Job::Release(done)).is_ok() {
            let _ = rx.recv();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(func: &str, module: &str, line: u32) -> Frame {
        Frame {
            addr: 0x1000,
            function: Some(func.into()),
            offset: Some(0x10),
            file: Some(format!("/src/{func}.c")),
            line: Some(line),
            module: Some(module.into()),
            unresolved: None,
        }
    }

    fn raw(pid: u32, kind: SiteKind, bytes: u64, frames: Vec<Frame>) -> RawSite {
        RawSite {
            pid,
            kind,
            bytes,
            objects: bytes / 4096,
            samples: bytes / 4096,
            frames,
            ..RawSite::default()
        }
    }

    fn leak_stack() -> Vec<Frame> {
        vec![
            frame("leak_memory", "/app/libh.so", 20),
            frame("handle_request", "/app/libh.so", 40),
        ]
    }

    fn scratch_stack() -> Vec<Frame> {
        vec![
            frame("scratch_buffer", "/app/libh.so", 30),
            frame("handle_request", "/app/libh.so", 41),
        ]
    }

    fn py_frame(func: &str, line: u32) -> Frame {
        Frame {
            addr: 0x7f00_0000 + u64::from(line),
            function: Some(func.into()),
            offset: None,
            file: Some("/srv/shop/views.py".into()),
            line: Some(line),
            module: Some(PYTHON_MODULE.into()),
            unresolved: None,
        }
    }

    #[test]
    fn stacks_that_print_the_same_are_one_site() {
        // One Python line reached through two native paths (already hidden),
        // and from two code objects at other addresses (another worker).
        let a = vec![py_frame("CartView.post", 42), py_frame("dispatch", 17)];
        let mut b = a.clone();
        for f in &mut b {
            f.addr += 0x1000;
        }
        let other_line = vec![py_frame("CartView.post", 43), py_frame("dispatch", 17)];
        let snap = Snapshot::build(
            vec![1, 2],
            vec![
                raw(1, SiteKind::Malloc, 4096, a),
                raw(2, SiteKind::Malloc, 8192, b),
                raw(1, SiteKind::Malloc, 4096, other_line),
            ],
            BTreeMap::new(),
            &ViewSpec::default(),
        );
        assert_eq!(snap.sites.len(), 2, "{:?}", snap.sites.keys());
        let top = &snap.view(10).top_allocations[0];
        assert_eq!(top.bytes, 12288);
        assert_eq!(top.pids, [1, 2]);
        assert_eq!(top.function, "CartView.post");
        assert_eq!(top.location.as_deref(), Some("/srv/shop/views.py:42"));
        assert_eq!(
            top.stack,
            [
                "/srv/shop/views.py:42 CartView.post",
                "/srv/shop/views.py:17 dispatch"
            ]
        );
    }

    #[test]
    fn diffs_count_objects_like_compare_to() {
        let stack = vec![py_frame("leak", 7)];
        let mut before = raw(1, SiteKind::Malloc, 1000, stack.clone());
        before.objects = 10;
        let mut after = raw(1, SiteKind::Malloc, 5000, stack);
        after.objects = 50;
        let b = Snapshot::build(vec![1], vec![before], BTreeMap::new(), &ViewSpec::default());
        let a = Snapshot::build(vec![1], vec![after], BTreeMap::new(), &ViewSpec::default());
        let g = &diff(&b, &a, 10, &mut GrowthHistory::default(), false).growth[0];
        assert_eq!(
            (g.growth_bytes, g.objects_before, g.growth_objects),
            (4000, 10, 40)
        );
    }

    fn py_at(file: &str, func: &str, line: u32) -> Frame {
        Frame {
            file: Some(file.into()),
            ..py_frame(func, line)
        }
    }

    /// A view's leak through two library paths, and a cache at its own line.
    fn app_sites(leak: u64, cache: u64) -> Vec<RawSite> {
        let json = |line| {
            vec![
                py_at("/usr/lib/python3.11/json/encoder.py", "iterencode", line),
                py_at("/srv/shop/views.py", "quote", 42),
                py_at(
                    "/usr/lib/python3/dist-packages/django/core/handlers/base.py",
                    "_get_response",
                    197,
                ),
            ]
        };
        vec![
            raw(1, SiteKind::Malloc, leak * 3 / 4, json(258)),
            raw(1, SiteKind::Malloc, leak / 4, json(260)),
            raw(
                1,
                SiteKind::Malloc,
                cache,
                vec![py_at("/srv/shop/views.py", "warm_cache", 60)],
            ),
        ]
    }

    fn spec(view: SiteView) -> ViewSpec {
        let mut spec = ViewSpec {
            view,
            ..ViewSpec::default()
        };
        spec.app
            .stdlib
            .insert(1, vec!["/usr/lib/python3.11/".into()]);
        spec
    }

    #[test]
    fn the_app_view_sums_library_paths_under_the_app_line() {
        let snap = Snapshot::build(
            vec![1],
            app_sites(40_000, 1_000),
            BTreeMap::new(),
            &spec(SiteView::App),
        );
        let top = &snap.view(10).top_allocations[0];
        assert_eq!(top.bytes, 40_000);
        assert_eq!(top.location.as_deref(), Some("/srv/shop/views.py:42"));
        assert_eq!(top.function, "quote");
        assert_eq!(top.via.as_deref(), Some("json/encoder.py:258 iterencode"));
        assert_eq!(
            top.stack[0],
            "/usr/lib/python3.11/json/encoder.py:258 iterencode"
        );
        let lineno = Snapshot::build(
            vec![1],
            app_sites(40_000, 1_000),
            BTreeMap::new(),
            &spec(SiteView::Lineno),
        );
        let top = &lineno.view(10).top_allocations[0];
        assert_eq!((top.bytes, top.via.as_deref()), (30_000, None));
        assert_eq!(
            top.location.as_deref(),
            Some("/usr/lib/python3.11/json/encoder.py:258")
        );
    }

    #[test]
    fn sites_that_stopped_growing_are_marked_after_two_diffs() {
        let s = spec(SiteView::App);
        let build =
            |leak, cache| Snapshot::build(vec![1], app_sites(leak, cache), BTreeMap::new(), &s);
        let mut history = GrowthHistory::default();
        let first = diff(&build(0, 0), &build(40_000, 8_000), 10, &mut history, false);
        assert!(
            first.growth.iter().all(|g| !g.stopped),
            "{:?}",
            first.growth
        );
        assert_eq!(first.growth.len(), 2);
        let second = diff(
            &build(40_000, 8_000),
            &build(80_000, 8_000),
            10,
            &mut history,
            false,
        );
        let names: Vec<(&str, bool)> = second
            .growth
            .iter()
            .map(|g| (g.site.function.as_str(), g.stopped))
            .collect();
        assert_eq!(names, [("quote", false), ("warm_cache", true)]);
        assert_eq!(second.growth[1].earlier_growth_bytes, 8_000);
        assert!(second.growth[1].last_grew_unix.is_some());
        let third = diff(
            &build(80_000, 8_000),
            &build(90_000, 8_000),
            10,
            &mut history,
            true,
        );
        assert_eq!(
            third.growth.len(),
            1,
            "still growing only: {:?}",
            third.growth
        );
        assert!(third.still_growing);
    }

    #[test]
    fn the_growth_history_keeps_only_sites_that_still_exist() {
        let s = ViewSpec::default();
        // Each recycled worker's leaking site is named by the address of a
        // code object freed before it was read: a new site each time.
        let worker = |pid: u32, bytes| {
            let freed = Frame {
                unresolved: Some(Unresolved::CodeFreed),
                ..Frame::unresolved_in(0x1000 * u64::from(pid), Some(PYTHON_MODULE.into()))
            };
            Snapshot::build(
                vec![pid],
                vec![raw(pid, SiteKind::Malloc, bytes, vec![freed])],
                BTreeMap::new(),
                &s,
            )
        };
        let mut history = GrowthHistory::default();
        for pid in 1..=100 {
            let grown = diff(&worker(pid, 0), &worker(pid, 4096), 10, &mut history, false);
            assert_eq!(grown.growth.len(), 1);
            assert!(history.grew.len() <= 1, "{} sites kept", history.grew.len());
        }
        // A site that is still there and stopped growing shows as stopped.
        let stopped = diff(
            &worker(100, 4096),
            &worker(100, 4096),
            10,
            &mut history,
            false,
        );
        assert!(stopped.growth.iter().all(|g| g.stopped) && stopped.growth.len() == 1);
    }

    #[test]
    fn unresolved_frames_are_counted_with_their_reason() {
        let freed = Frame {
            unresolved: Some(Unresolved::CodeFreed),
            ..Frame::unresolved_in(0x24d7_f600, Some(PYTHON_MODULE.into()))
        };
        let snap = Snapshot::build(
            vec![1],
            vec![raw(
                1,
                SiteKind::Fault,
                8192,
                vec![freed, py_frame("main", 3)],
            )],
            BTreeMap::new(),
            &ViewSpec::default(),
        );
        let view = snap.view(10);
        assert_eq!(view.unresolved.frames, 1);
        assert_eq!(view.unresolved.by_reason[&Unresolved::CodeFreed], 1);
        let site = &view.top_page_faults[0];
        assert_eq!(site.function, "main", "named by the app frame");
        assert_eq!(
            site.via.as_deref(),
            Some("0x24d7f600 [python] (code object freed before it was read)")
        );
    }

    /// xorshift64*: a reproducible stand-in for bpf_get_prandom_u32.
    struct Rng(u64);
    impl Rng {
        fn next_u32(&mut self) -> u32 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
        }
    }

    #[test]
    fn sample_intervals_are_exponential_with_the_mean_asked() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mean = 512 * 1024u64;
        let n = 400_000;
        let draws: Vec<u64> = (0..n)
            .map(|_| memtrace_common::heap_sample_interval(rng.next_u32(), mean))
            .collect();
        let avg = draws.iter().sum::<u64>() as f64 / n as f64;
        assert!(
            (avg / mean as f64 - 1.0).abs() < 0.01,
            "mean interval {avg}"
        );
        // Exponential: P(X > mean) = 1/e, P(X > 3 mean) = e^-3.
        let above = |k: f64| {
            draws
                .iter()
                .filter(|&&d| d as f64 > k * mean as f64)
                .count() as f64
                / n as f64
        };
        assert!(
            (above(1.0) - (-1.0f64).exp()).abs() < 0.005,
            "{}",
            above(1.0)
        );
        assert!(
            (above(3.0) - (-3.0f64).exp()).abs() < 0.003,
            "{}",
            above(3.0)
        );
        // The integer -ln matches the real one closely over the whole range.
        for r in [0u32, 1, 1000, 1 << 20, 1 << 31, u32::MAX - 1, u32::MAX] {
            let u = (r as f64 + 1.0) / 4_294_967_296.0;
            let exact = -u.ln();
            let approx = memtrace_common::neg_ln_q16(r) as f64 / 65536.0;
            assert!(
                (approx - exact).abs() < 2e-4 * exact.max(1.0),
                "r={r}: {approx} vs {exact}"
            );
        }
    }

    /// One run of the kernel's sampling decision (same countdown, same
    /// integer draw) over a stream of allocations, scaled as the agent
    /// scales: the estimated bytes of a 1 MiB-per-request leak and of many
    /// small blocks of mixed sizes.
    fn sampled_run(seed: u64, rate: u64) -> (f64, f64, f64, f64) {
        let mut rng = Rng(seed);
        let mut countdown = 0u64;
        let mut sample = |size: u64, rng: &mut Rng| {
            if countdown == 0 {
                countdown = memtrace_common::heap_sample_interval(rng.next_u32(), rate);
            }
            if countdown > size {
                countdown -= size;
                return false;
            }
            countdown = memtrace_common::heap_sample_interval(rng.next_u32(), rate);
            true
        };
        let (mut leak, mut small) = ((0u64, 0u64), (0u64, 0u64));
        let (mut leak_truth, mut small_truth) = (0u64, 0u64);
        for _ in 0..64 {
            for _ in 0..400 {
                let size = 16 + u64::from(rng.next_u32() % 4096);
                small_truth += size;
                if sample(size, &mut rng) {
                    small = (small.0 + 1, small.1 + size);
                }
            }
            let size = 1 << 20;
            leak_truth += size;
            if sample(size, &mut rng) {
                leak = (leak.0 + 1, leak.1 + size);
            }
        }
        let leak_est = scale_heap_sample(leak.0, leak.1, rate).1 as f64;
        let small_est = scale_heap_sample(small.0, small.1, rate).1 as f64;
        (leak_est, leak_truth as f64, small_est, small_truth as f64)
    }

    #[test]
    fn sampled_estimates_are_unbiased_over_20_runs() {
        let rate = memtrace_common::DEFAULT_HEAP_SAMPLE_BYTES;
        let runs: Vec<_> = (1..=20u64)
            .map(|i| sampled_run(i * 0x1234_5678_9abc, rate))
            .collect();
        let leak: Vec<f64> = runs.iter().map(|r| r.0 / r.1).collect();
        let small: Vec<f64> = runs.iter().map(|r| r.2 / r.3).collect();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        for r in &leak {
            assert!(
                (r - 1.0).abs() <= 0.15,
                "a run's leak estimate is off by more than 15%: {leak:?}"
            );
        }
        assert!(
            (mean(&leak) - 1.0).abs() <= 0.05,
            "leak mean {} over {leak:?}",
            mean(&leak)
        );
        assert!(
            (mean(&small) - 1.0).abs() <= 0.05,
            "small mean {} over {small:?}",
            mean(&small)
        );
        // Every allocation sampled: exact.
        let exact = sampled_run(7, 1);
        assert_eq!((exact.0, exact.2), (exact.1, exact.3));
    }

    #[test]
    fn heap_samples_scale_like_go() {
        // Every allocation sampled: nothing to scale.
        assert_eq!(scale_heap_sample(3, 300, 1), (3, 300));
        // Blocks of the rate's size are sampled with probability 1 - 1/e.
        let (n, b) = scale_heap_sample(100, 100 * 512 * 1024, 512 * 1024);
        let p = 1.0 - (-1.0f64).exp();
        assert_eq!(n, (100.0 / p).round() as u64);
        assert_eq!(b, (100.0 * 512.0 * 1024.0 / p).round() as u64);
        // Blocks far above the rate are always sampled.
        assert_eq!(scale_heap_sample(2, 2 << 30, 512 * 1024), (2, 2 << 30));
        assert_eq!(scale_heap_sample(0, 0, 512 * 1024), (0, 0));
    }

    #[test]
    fn same_stack_in_two_workers_is_one_site() {
        let s = Snapshot::build(
            vec![1, 2],
            vec![
                raw(1, SiteKind::Malloc, 8192, leak_stack()),
                raw(2, SiteKind::Malloc, 4096, leak_stack()),
                raw(3, SiteKind::Malloc, 1 << 30, leak_stack()), // not selected
            ],
            BTreeMap::new(),
            &ViewSpec::default(),
        );
        let v = s.view(10);
        assert_eq!(v.top_allocations.len(), 1);
        let site = &v.top_allocations[0];
        assert_eq!(site.bytes, 12288);
        assert_eq!(site.pids, vec![1, 2]);
        assert_eq!(site.function, "leak_memory");
        assert_eq!(site.location.as_deref(), Some("leak_memory.c:20"));
        assert_eq!(site.caller, None);
    }

    #[test]
    fn diff_ranks_growth_and_mappings() {
        let maps = |heap: u64| {
            BTreeMap::from([(
                1,
                vec![MappingUsage {
                    name: "[heap]".into(),
                    rss: heap,
                    anonymous: heap,
                    size: heap,
                    regions: 1,
                }],
            )])
        };
        let before = Snapshot::build(
            vec![1],
            vec![
                raw(1, SiteKind::Malloc, 4096, leak_stack()),
                raw(1, SiteKind::Malloc, 40960, scratch_stack()),
            ],
            maps(1 << 20),
            &ViewSpec::default(),
        );
        let after = Snapshot::build(
            vec![1],
            vec![
                raw(1, SiteKind::Malloc, 4096 * 101, leak_stack()),
                raw(1, SiteKind::Malloc, 45056, scratch_stack()),
            ],
            maps(1 << 21),
            &ViewSpec::default(),
        );
        let d = diff(&before, &after, 10, &mut GrowthHistory::default(), false);
        assert_eq!(d.growth[0].site.function, "leak_memory");
        assert_eq!(d.growth[0].growth_bytes, 409600);
        assert_eq!(d.growth[1].growth_bytes, 4096);
        assert_eq!(d.mappings[0].name, "[heap]");
        assert_eq!(d.mappings[0].growth_bytes, 1 << 20);
    }

    #[test]
    fn a_libc_leaf_names_the_application_caller() {
        let frames = vec![
            frame("__memset_avx2", "/usr/lib/x86_64-linux-gnu/libc.so.6", 1),
            frame("fill_cache", "/app/server", 12),
        ];
        let s = Snapshot::build(
            vec![1],
            vec![raw(1, SiteKind::Fault, 4096, frames)],
            BTreeMap::new(),
            &ViewSpec::default(),
        );
        let site = &s.view(1).top_page_faults[0];
        assert_eq!(site.function, "__memset_avx2");
        assert!(site.caller.as_deref().unwrap().contains("fill_cache"));
    }

    #[test]
    fn kinds_are_listed_apart() {
        let s = Snapshot::build(
            vec![1],
            vec![
                raw(1, SiteKind::Brk, 1 << 20, leak_stack()),
                raw(1, SiteKind::Fault, 4096, leak_stack()),
                raw(1, SiteKind::Malloc, 4096, leak_stack()),
            ],
            BTreeMap::new(),
            &ViewSpec::default(),
        );
        let v = s.view(10);
        assert_eq!(v.top_allocations.len(), 1);
        assert_eq!(v.top_page_faults.len(), 1);
        assert_eq!(v.top_mapping_calls.len(), 1);
        assert_eq!(v.top_mapping_calls[0].kind, SiteKind::Brk);
    }

    #[test]
    fn symbolizes_this_process() {
        let service = SymbolizerService::spawn();
        let ip = symbolizes_this_process as *const () as u64;
        let frames = service.stack(std::process::id(), &[ip, ip + 8]);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].addr, ip);
        assert_eq!(frames[1].addr, ip + 8);
        assert!(
            frames[0]
                .function
                .as_deref()
                .is_some_and(|f| f.contains("symbolizes_this_process")),
            "{frames:?}"
        );
    }
}
