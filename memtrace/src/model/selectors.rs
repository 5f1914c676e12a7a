//! Which processes to trace: by name, executable path, command line or pid.
//! A process that matches is traced with every descendant it forks.
use std::path::{Path, PathBuf};

use regex::Regex;

use super::{
    cgroups::{self, Placement},
    procinfo::ProcessView,
};

#[derive(Clone, Debug, Default)]
pub struct Selectors {
    /// Process names (comm, as `ps -o comm` shows; compared on the kernel's
    /// first 15 bytes), the executable's file name, or the name a process
    /// title gives (`gunicorn: worker [app]`, `php-fpm: pool www`).
    pub names: Vec<String>,
    /// Executable paths (/proc/PID/exe, symlinks resolved).
    pub exes: Vec<PathBuf>,
    /// Regular expression over the command line, arguments joined by spaces.
    pub cmdline: Option<Regex>,
    /// Process ids.
    pub pids: Vec<u32>,
    /// Cgroup v2 subtrees (`/kubepods.slice/...`): only processes inside
    /// one are selected; alone, every process inside is.
    pub cgroups: Vec<String>,
    /// Container ids, or prefixes of them: as `cgroups`, for the container's
    /// cgroup.
    pub containers: Vec<String>,
}

/// Why a process was selected, for the logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MatchReason {
    Name(String),
    Exe(PathBuf),
    Cmdline,
    Pid,
    Cgroup(String),
    Container(String),
}

impl std::fmt::Display for MatchReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Name(n) => write!(f, "name {n}"),
            Self::Exe(p) => write!(f, "exe {}", p.display()),
            Self::Cmdline => write!(f, "cmdline"),
            Self::Pid => write!(f, "pid"),
            Self::Cgroup(c) => write!(f, "cgroup {c}"),
            Self::Container(c) => write!(f, "container {c}"),
        }
    }
}

/// The kernel keeps 15 bytes of a process name.
const COMM_MAX: usize = 15;

fn comm_matches(comm: &str, name: &str) -> bool {
    let n = name.as_bytes();
    let n = &n[..n.len().min(COMM_MAX)];
    comm.as_bytes() == n
}

/// The program a process title names: servers that set their title
/// (gunicorn and Celery through setproctitle, php-fpm, nginx, PostgreSQL)
/// write `NAME: role ...` over their arguments, and the kernel's comm then
/// becomes the title's first 15 bytes (`gunicorn: worke`).
fn title_name(cmdline: &[String]) -> Option<&str> {
    let first = cmdline.first()?.split_whitespace().next()?;
    let name = first.strip_suffix(':')?;
    let name = name.rsplit('/').next().unwrap_or(name);
    (!name.is_empty()).then_some(name)
}

impl Selectors {
    pub fn is_empty(&self) -> bool {
        !self.selects_processes() && !self.restricts_placement()
    }

    /// Whether a name, executable, command line or pid selector is given.
    pub fn selects_processes(&self) -> bool {
        !(self.names.is_empty()
            && self.exes.is_empty()
            && self.cmdline.is_none()
            && self.pids.is_empty())
    }

    /// Whether selection is limited to some cgroups or containers.
    pub fn restricts_placement(&self) -> bool {
        !(self.cgroups.is_empty() && self.containers.is_empty())
    }

    /// Whether a process placed there is inside a selected cgroup or
    /// container, and which.
    pub fn placement_matches(&self, p: &Placement) -> Option<MatchReason> {
        if let Some(c) = self
            .cgroups
            .iter()
            .find(|c| cgroups::in_subtree(&p.cgroup, c))
        {
            return Some(MatchReason::Cgroup(c.clone()));
        }
        let id = p.container_id.as_deref()?;
        self.containers
            .iter()
            .find(|c| id.starts_with(c.as_str()))
            .map(|c| MatchReason::Container(c.clone()))
    }

    /// Whether the kernel alone can recognise new matches at exec (names).
    /// Other selectors need every exec reported to the agent.
    pub fn needs_exec_reports(&self) -> bool {
        !self.exes.is_empty() || self.cmdline.is_some()
    }

    /// Resolves exe selectors to their canonical paths, as /proc/PID/exe shows
    /// them. A path that does not exist is kept as given (it may appear later).
    pub fn canonicalize(mut self) -> Self {
        self.exes = self
            .exes
            .into_iter()
            .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
            .collect();
        self
    }

    /// Whether a process is selected: by a process selector, inside a
    /// selected cgroup or container when those are given (read from /proc).
    pub fn matches(&self, p: &ProcessView) -> Option<MatchReason> {
        if !self.restricts_placement() {
            return self.matches_process(p);
        }
        let inside = cgroups::placement(p.pid).and_then(|pl| self.placement_matches(&pl))?;
        if self.selects_processes() {
            self.matches_process(p)
        } else {
            Some(inside)
        }
    }

    fn matches_process(&self, p: &ProcessView) -> Option<MatchReason> {
        if self.pids.contains(&p.pid) {
            return Some(MatchReason::Pid);
        }
        let exe_name = p
            .exe
            .as_deref()
            .and_then(Path::file_name)
            .and_then(|n| n.to_str());
        let title = title_name(&p.cmdline);
        for name in &self.names {
            if comm_matches(&p.comm, name)
                || exe_name == Some(name.as_str())
                || title == Some(name.as_str())
            {
                return Some(MatchReason::Name(name.clone()));
            }
        }
        if let Some(exe) = &p.exe
            && let Some(sel) = self.exes.iter().find(|s| *s == exe)
        {
            return Some(MatchReason::Exe(sel.clone()));
        }
        if let Some(re) = &self.cmdline
            && !p.cmdline.is_empty()
            && re.is_match(&p.cmdline.join(" "))
        {
            return Some(MatchReason::Cmdline);
        }
        None
    }

    /// A one-line description for "waiting for ..." messages.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        parts.extend(self.names.iter().map(|n| format!("name={n}")));
        parts.extend(self.exes.iter().map(|e| format!("exe={}", e.display())));
        if let Some(re) = &self.cmdline {
            parts.push(format!("cmdline=/{}/", re.as_str()));
        }
        parts.extend(self.pids.iter().map(|p| format!("pid={p}")));
        let mut text = parts.join(", ");
        let inside: Vec<String> = self
            .cgroups
            .iter()
            .map(|c| format!("cgroup={c}"))
            .chain(self.containers.iter().map(|c| format!("container={c}")))
            .collect();
        if !inside.is_empty() {
            let inside = inside.join(" or ");
            text = if text.is_empty() {
                inside
            } else {
                format!("{text} inside {inside}")
            };
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(pid: u32, comm: &str, exe: &str, cmdline: &[&str]) -> ProcessView {
        ProcessView {
            pid,
            ppid: 1,
            comm: comm.into(),
            exe: Some(exe.into()),
            cmdline: cmdline.iter().map(|s| s.to_string()).collect(),
            start_time: 1,
        }
    }

    #[test]
    fn matches_by_name_exe_cmdline_and_pid() {
        let s = Selectors {
            names: vec!["gunicorn".into()],
            exes: vec!["/usr/sbin/php-fpm8.2".into()],
            cmdline: Some(Regex::new(r"uwsgi .*--ini").unwrap()),
            pids: vec![42],
            ..Default::default()
        };
        let g = view(
            10,
            "gunicorn",
            "/usr/bin/python3.11",
            &["/usr/bin/python3", "/usr/bin/gunicorn"],
        );
        assert_eq!(s.matches(&g), Some(MatchReason::Name("gunicorn".into())));
        let php = view(
            11,
            "php-fpm8.2",
            "/usr/sbin/php-fpm8.2",
            &["php-fpm: pool www"],
        );
        assert!(matches!(s.matches(&php), Some(MatchReason::Exe(_))));
        let u = view(
            12,
            "uwsgi",
            "/usr/bin/uwsgi",
            &["uwsgi", "--ini", "app.ini"],
        );
        assert_eq!(s.matches(&u), Some(MatchReason::Cmdline));
        let p = view(42, "x", "/bin/x", &[]);
        assert_eq!(s.matches(&p), Some(MatchReason::Pid));
        let other = view(13, "bash", "/usr/bin/bash", &["bash"]);
        assert_eq!(s.matches(&other), None);
    }

    #[test]
    fn long_names_compare_on_the_kernels_15_bytes() {
        let s = Selectors {
            names: vec!["my-very-long-server-name".into()],
            ..Default::default()
        };
        let p = view(1, "my-very-long-se", "/opt/x", &[]);
        assert!(s.matches(&p).is_some());
        let q = view(1, "my-very-long", "/opt/x", &[]);
        assert!(s.matches(&q).is_none());
    }

    #[test]
    fn name_also_matches_the_executable_file_name() {
        let s = Selectors {
            names: vec!["python3.11".into()],
            ..Default::default()
        };
        let p = view(1, "gunicorn", "/usr/bin/python3.11", &[]);
        assert!(s.matches(&p).is_some());
    }

    #[test]
    fn name_also_matches_a_process_title() {
        let s = Selectors {
            names: vec!["gunicorn".into(), "php-fpm".into()],
            ..Default::default()
        };
        // gunicorn with setproctitle: comm is the title's first 15 bytes.
        let worker = view(
            1,
            "gunicorn: worke",
            "/usr/bin/python3.11",
            &["gunicorn: worker [wsgi_app:app]"],
        );
        assert_eq!(
            s.matches(&worker),
            Some(MatchReason::Name("gunicorn".into()))
        );
        let master = view(
            2,
            "gunicorn: maste",
            "/usr/bin/python3.11",
            &["gunicorn: master [wsgi_app:app]"],
        );
        assert!(s.matches(&master).is_some());
        let php = view(
            3,
            "php-fpm8.2",
            "/usr/sbin/php-fpm8.2",
            &["php-fpm: pool www"],
        );
        assert_eq!(s.matches(&php), Some(MatchReason::Name("php-fpm".into())));
        // Only a title (`NAME:`) counts, not any first argument.
        let shebang = view(
            4,
            "app.py",
            "/usr/bin/python3.11",
            &["/usr/bin/gunicorn", "app"],
        );
        assert_eq!(s.matches(&shebang), None);
        let other = view(5, "bash", "/usr/bin/bash", &["gunicorn-like: x"]);
        assert_eq!(s.matches(&other), None);
    }

    #[test]
    fn cgroups_and_containers_restrict_or_select() {
        let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let inside = cgroups::parse_path(&format!(
            "/kubepods.slice/kubepods-podx.slice/cri-containerd-{id}.scope"
        ));
        let outside = cgroups::parse_path("/system.slice/nginx.service");
        let s = Selectors {
            names: vec!["gunicorn".into()],
            cgroups: vec!["/kubepods.slice".into()],
            ..Default::default()
        };
        assert!(s.selects_processes() && s.restricts_placement() && !s.is_empty());
        assert_eq!(
            s.placement_matches(&inside),
            Some(MatchReason::Cgroup("/kubepods.slice".into()))
        );
        assert_eq!(s.placement_matches(&outside), None);
        assert_eq!(s.describe(), "name=gunicorn inside cgroup=/kubepods.slice");
        let c = Selectors {
            containers: vec![id[..8].into()],
            ..Default::default()
        };
        assert!(!c.selects_processes() && !c.is_empty());
        assert_eq!(
            c.placement_matches(&inside),
            Some(MatchReason::Container(id[..8].into()))
        );
        assert_eq!(c.placement_matches(&outside), None);
        assert_eq!(c.describe(), format!("container={}", &id[..8]));
    }
}
