//! `memtrace check`: what this kernel can serve, feature by feature, for
//! people (a table) and scripts (`--format json`). Each program a feature
//! needs is loaded (not attached), so the verifier has its say too.
use serde::Serialize;

use crate::kernel::{
    features::{FeatureRow, KernelFeatures},
    loader::{self, LoadError},
    preflight::{self, PreflightError},
    tracefs::Tracefs,
};

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    Tracefs(#[from] crate::kernel::tracefs::TracefsError),
    #[error(transparent)]
    Features(#[from] crate::kernel::features::FeaturesError),
    #[error(transparent)]
    Load(#[from] LoadError),
}

/// A program the verifier refused.
#[derive(Clone, Debug, Serialize)]
pub struct Refused {
    pub feature: &'static str,
    pub program: &'static str,
    pub error: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub kernel: String,
    /// Capabilities hidden on purpose (`MEMTRACE_HIDE_KERNEL_FEATURES`).
    pub hidden: Vec<String>,
    pub features: Vec<FeatureRow>,
    pub refused: Vec<Refused>,
}

impl CheckReport {
    /// Whether the agent can start at all (process tracking works).
    pub fn agent_can_start(&self) -> bool {
        self.features
            .iter()
            .any(|r| r.feature == "process tracking" && r.works)
    }
}

/// Probes the kernel and loads every program it should be able to run.
pub fn check() -> Result<CheckReport, CheckError> {
    preflight::check_privileges()?;
    let tracefs = Tracefs::ensure(true)?;
    let features = KernelFeatures::probe(&tracefs)?;
    let mut rows = features.report();
    let mut refused = Vec::new();
    for loader::Verdict {
        feature,
        program,
        refused: error,
    } in loader::verify(&features)?
    {
        let Some(error) = error else { continue };
        if let Some(row) = rows.iter_mut().find(|r| r.feature == feature)
            && row.works
        {
            row.works = false;
            row.why_not = Some(format!("the kernel's verifier refused {program}: {error}"));
        }
        refused.push(Refused {
            feature,
            program,
            error,
        });
    }
    // Path capture is part of socket mode.
    let socket_off = rows
        .iter()
        .any(|r| r.feature == "request mode socket" && !r.works);
    if socket_off
        && let Some(row) = rows
            .iter_mut()
            .find(|r| r.feature == "http path capture" && r.works)
    {
        row.works = false;
        row.why_not = Some("socket request mode is off on this kernel".into());
    }
    Ok(CheckReport {
        kernel: features.release.clone(),
        hidden: features.hidden.clone(),
        features: rows,
        refused,
    })
}

/// The table for people.
pub fn render(report: &CheckReport) -> String {
    let mut out = format!("kernel {}\n", report.kernel);
    if !report.hidden.is_empty() {
        out += &format!("hidden on purpose: {}\n", report.hidden.join(", "));
    }
    let width = report
        .features
        .iter()
        .map(|r| r.feature.len())
        .max()
        .unwrap_or(0);
    for row in &report.features {
        let (mark, text) = if row.works {
            ("yes", row.how.as_str())
        } else {
            ("no ", row.why_not.as_deref().unwrap_or(""))
        };
        out += &format!("{:width$}  {mark}  {text}\n", row.feature);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_one_line_per_feature_with_the_reason() {
        let report = CheckReport {
            kernel: "6.1.0-test".into(),
            hidden: vec![],
            features: vec![
                FeatureRow {
                    feature: "request mode socket",
                    works: false,
                    how: String::new(),
                    why_not: Some("needs Linux 6.3".into()),
                },
                FeatureRow {
                    feature: "process tracking",
                    works: true,
                    how: "group_dead".into(),
                    why_not: None,
                },
            ],
            refused: vec![],
        };
        let text = render(&report);
        assert_eq!(
            text,
            "kernel 6.1.0-test\nrequest mode socket  no   needs Linux 6.3\nprocess tracking     yes  group_dead\n"
        );
        assert!(report.agent_can_start());
    }
}
