//! Which server a worker belongs to, and how that server retires one worker
//! gracefully. Every prefork server has its own way: SIGHUP to gunicorn's
//! master reloads *every* worker, while SIGTERM to one gunicorn worker lets
//! it finish its request and the master replaces it alone. The facts per
//! server are in shared/research/ecosystem.md §3 and were checked here on
//! Debian's gunicorn, uWSGI and PHP-FPM.
use std::{fmt, time::Duration};

use nix::sys::signal::Signal;
use serde::Serialize;

/// Who receives the signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SoftLimitTarget {
    /// The worker's parent (the master), as the plan did: on most servers
    /// this restarts every worker.
    Parent,
    /// The worker itself: retires that worker alone.
    Worker,
}

/// A server memtrace knows how to recycle one worker of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerKind {
    Gunicorn,
    Uwsgi,
    PhpFpm,
    ApachePrefork,
    Puma,
    Unicorn,
    /// A master whose children run its own executable: a prefork server
    /// memtrace has no preset for.
    GenericPrefork,
    /// Not recognised, or a process without a traced master.
    Unknown,
}

impl fmt::Display for ServerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Gunicorn => "gunicorn",
            Self::Uwsgi => "uwsgi",
            Self::PhpFpm => "php-fpm",
            Self::ApachePrefork => "apache-prefork",
            Self::Puma => "puma",
            Self::Unicorn => "unicorn",
            Self::GenericPrefork => "generic-prefork",
            Self::Unknown => "unknown",
        })
    }
}

/// How a server retires one worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preset {
    /// The graceful one-worker signal; None: the server has none memtrace
    /// trusts, so it only logs unless told what to send.
    pub signal: Option<Signal>,
    pub target: SoftLimitTarget,
    /// How long the worker may take to leave: the server's own grace period
    /// (gunicorn's graceful_timeout, uWSGI's worker-reload-mercy) and a margin.
    pub exit_timeout: Duration,
    /// The master starts a replacement when a worker leaves.
    pub respawns: bool,
    /// Why there is no signal, when there is none.
    pub no_signal_because: Option<&'static str>,
}

impl ServerKind {
    pub fn preset(self) -> Preset {
        let preset = |signal, secs, respawns| Preset {
            signal,
            target: SoftLimitTarget::Worker,
            exit_timeout: Duration::from_secs(secs),
            respawns,
            no_signal_because: None,
        };
        match self {
            // Worker SIGTERM: finish the request, exit; the arbiter respawns
            // (graceful_timeout 30 s, then SIGKILL from the arbiter).
            Self::Gunicorn => preset(Some(Signal::SIGTERM), 35, true),
            // Worker SIGHUP: gracefully_kill, the master respawns it
            // (worker-reload-mercy 60 s).
            Self::Uwsgi => preset(Some(Signal::SIGHUP), 65, true),
            // Child SIGQUIT: soft quit after the request; pm respawns.
            Self::PhpFpm => preset(Some(Signal::SIGQUIT), 60, true),
            // httpd documents signals to the parent only (all children).
            // SIGUSR1 to one prefork child retires it after its request
            // (checked here: replaced in about 2 s), but that is not
            // documented and event-MPM children, which look the same in
            // /proc, ignore it: acting takes an explicit choice.
            Self::ApachePrefork => Preset {
                no_signal_because: Some(
                    "Apache documents no graceful signal for one child; SIGUSR1 to a \
                     prefork child retires it after its request (event-MPM children ignore it)",
                ),
                ..preset(None, 35, false)
            },
            // Worker SIGTERM, as the master's own WorkerHandle#term.
            Self::Puma => preset(Some(Signal::SIGTERM), 35, true),
            // Worker SIGQUIT: graceful; SIGTERM would be immediate.
            Self::Unicorn => preset(Some(Signal::SIGQUIT), 65, true),
            Self::GenericPrefork => preset(Some(Signal::SIGTERM), 30, true),
            Self::Unknown => Preset {
                no_signal_because: Some("the server is not recognised"),
                ..preset(None, 30, false)
            },
        }
    }
}

/// What detection reads of a process: its name (comm), executable path and
/// command line (arguments joined by spaces, or a process title).
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerProcess<'a> {
    pub comm: &'a str,
    pub exe: Option<&'a str>,
    pub cmdline: &'a str,
}

/// The server a worker belongs to, from the worker and its traced master.
pub fn detect(worker: &ServerProcess, master: Option<&ServerProcess>) -> ServerKind {
    let known = std::iter::once(worker)
        .chain(master)
        .find_map(|p| named_server(p));
    if let Some(kind) = known {
        // A known server's master alone does not make a worker of it: an
        // unrelated child (a shell a worker started) is not one.
        return match master {
            Some(m) if named_server(worker).is_none() && !same_program(worker, m) => {
                ServerKind::Unknown
            }
            Some(_) => kind,
            None if named_server(worker).is_some() => kind,
            None => ServerKind::Unknown,
        };
    }
    match master {
        Some(m) if same_program(worker, m) => ServerKind::GenericPrefork,
        _ => ServerKind::Unknown,
    }
}

fn same_program(a: &ServerProcess, b: &ServerProcess) -> bool {
    matches!((a.exe, b.exe), (Some(x), Some(y)) if x == y)
}

fn basename(s: &str) -> &str {
    s.rsplit('/').next().unwrap_or(s)
}

/// The server a process names in its comm, executable or command line.
fn named_server(p: &ServerProcess) -> Option<ServerKind> {
    let comm = p.comm.to_ascii_lowercase();
    let exe = p.exe.map(basename).unwrap_or("").to_ascii_lowercase();
    let words: Vec<String> = p
        .cmdline
        .split_whitespace()
        .map(|w| basename(w.trim_end_matches(':')).to_ascii_lowercase())
        .collect();
    let first = words.first().map(String::as_str).unwrap_or("");
    // An interpreter's script or module: `python3 /usr/bin/gunicorn`,
    // `python -m gunicorn`, `ruby /usr/bin/puma`.
    let script = match first {
        f if f.starts_with("python") || f.starts_with("ruby") => words
            .iter()
            .skip(1)
            .find(|w| !w.starts_with('-'))
            .map(String::as_str)
            .unwrap_or(""),
        _ => "",
    };
    let program = [comm.as_str(), exe.as_str(), first, script];
    let is = |names: &[&str]| {
        program.iter().any(|p| {
            names
                .iter()
                .any(|n| p == n || p.starts_with(&format!("{n}:")))
        })
    };
    if is(&["gunicorn"])
        || comm.starts_with("gunicorn:")
        || words.windows(2).any(|w| w[0] == "-m" && w[1] == "gunicorn")
    {
        Some(ServerKind::Gunicorn)
    } else if program.iter().any(|p| p.starts_with("uwsgi")) {
        Some(ServerKind::Uwsgi)
    } else if program.iter().any(|p| p.starts_with("php-fpm")) {
        Some(ServerKind::PhpFpm)
    } else if is(&["apache2", "httpd"]) {
        Some(ServerKind::ApachePrefork)
    } else if is(&["puma"]) {
        Some(ServerKind::Puma)
    } else if is(&["unicorn", "unicorn_rails"]) {
        Some(ServerKind::Unicorn)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p<'a>(comm: &'a str, exe: &'a str, cmdline: &'a str) -> ServerProcess<'a> {
        ServerProcess {
            comm,
            exe: Some(exe),
            cmdline,
        }
    }

    #[test]
    fn gunicorn_with_and_without_process_titles() {
        let master = p(
            "gunicorn",
            "/usr/bin/python3.11",
            "/usr/bin/python3 /usr/bin/gunicorn --workers 2 app:app",
        );
        let worker = master;
        assert_eq!(detect(&worker, Some(&master)), ServerKind::Gunicorn);
        // setproctitle: comm is the title's first 15 bytes.
        let master = p(
            "gunicorn: maste",
            "/usr/bin/python3.11",
            "gunicorn: master [wsgi_app:app]",
        );
        let worker = p(
            "gunicorn: worke",
            "/usr/bin/python3.11",
            "gunicorn: worker [wsgi_app:app]",
        );
        assert_eq!(detect(&worker, Some(&master)), ServerKind::Gunicorn);
        let venv = p(
            "python",
            "/srv/venv/bin/python3.12",
            "/srv/venv/bin/python -m gunicorn app:app",
        );
        assert_eq!(detect(&venv, Some(&venv)), ServerKind::Gunicorn);
    }

    #[test]
    fn uwsgi_php_fpm_apache_puma_unicorn() {
        let uwsgi = p(
            "uwsgi",
            "/usr/bin/uwsgi-core",
            "uwsgi --master --processes 2 --plugin python3",
        );
        assert_eq!(detect(&uwsgi, Some(&uwsgi)), ServerKind::Uwsgi);
        let titled = p("uWSGI worker 1", "/usr/bin/uwsgi-core", "uWSGI worker 1");
        assert_eq!(detect(&titled, Some(&uwsgi)), ServerKind::Uwsgi);

        let fpm_master = p(
            "php-fpm8.2",
            "/usr/sbin/php-fpm8.2",
            "php-fpm: master process (/etc/php/8.2/fpm/php-fpm.conf)",
        );
        let fpm_worker = p("php-fpm8.2", "/usr/sbin/php-fpm8.2", "php-fpm: pool www");
        assert_eq!(detect(&fpm_worker, Some(&fpm_master)), ServerKind::PhpFpm);

        let apache = p("apache2", "/usr/sbin/apache2", "/usr/sbin/apache2 -k start");
        assert_eq!(detect(&apache, Some(&apache)), ServerKind::ApachePrefork);

        let puma_master = p(
            "ruby",
            "/usr/bin/ruby3.1",
            "puma 5.6.5 (tcp://127.0.0.1:9292) [app]",
        );
        let puma_worker = p(
            "ruby",
            "/usr/bin/ruby3.1",
            "puma: cluster worker 0: 4242 [app]",
        );
        assert_eq!(detect(&puma_worker, Some(&puma_master)), ServerKind::Puma);

        let unicorn = p(
            "ruby",
            "/usr/bin/ruby3.1",
            "unicorn worker[0] -c unicorn.rb config.ru",
        );
        assert_eq!(detect(&unicorn, Some(&unicorn)), ServerKind::Unicorn);
    }

    #[test]
    fn generic_prefork_and_unknown() {
        let master = p(
            "leaky_server",
            "/tmp/fixtures/leaky_server",
            "leaky_server 2",
        );
        assert_eq!(detect(&master, Some(&master)), ServerKind::GenericPrefork);
        // A single process, no traced master.
        assert_eq!(detect(&master, None), ServerKind::Unknown);
        // A child running another program under a known server's master.
        let shell = p("sh", "/usr/bin/dash", "sh -c date");
        let g = p(
            "gunicorn",
            "/usr/bin/python3.11",
            "/usr/bin/python3 /usr/bin/gunicorn app:app",
        );
        assert_eq!(detect(&shell, Some(&g)), ServerKind::Unknown);
        // A python that is not gunicorn.
        let py = p("python3", "/usr/bin/python3.11", "python3 worker.py");
        assert_eq!(detect(&py, None), ServerKind::Unknown);
    }

    #[test]
    fn presets_retire_one_worker() {
        use ServerKind::*;
        for (kind, signal) in [
            (Gunicorn, Signal::SIGTERM),
            (Uwsgi, Signal::SIGHUP),
            (PhpFpm, Signal::SIGQUIT),
            (Puma, Signal::SIGTERM),
            (Unicorn, Signal::SIGQUIT),
            (GenericPrefork, Signal::SIGTERM),
        ] {
            let p = kind.preset();
            assert_eq!(p.signal, Some(signal), "{kind}");
            // Never the master: that would restart the whole pool.
            assert_eq!(p.target, SoftLimitTarget::Worker, "{kind}");
        }
        assert_eq!(Unknown.preset().signal, None);
        assert_eq!(ApachePrefork.preset().signal, None);
        assert!(
            ApachePrefork
                .preset()
                .no_signal_because
                .unwrap()
                .contains("USR1")
        );
    }
}
