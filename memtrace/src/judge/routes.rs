//! Bytes a route keeps per request: Theil–Sen over the route's cumulative
//! RSS growth (the sum of its requests' deltas) against its request count.
//!
//! Why not the mean or median delta: RSS grows in pages and heap chunks, so
//! a route that keeps 1 KiB per request shows +4 KiB on one request in four
//! and 0 on the others: the median says 0, the mean swings with one large
//! outlier (a heap arena or a GC pass that fell on this route). The slope of
//! the cumulative series is the growth per request, and Theil–Sen's median
//! of pairwise slopes ignores a few steps that do not repeat.
use serde::Serialize;

use super::detector::{RobustSlope, theil_sen};

/// A route's bytes kept per request, with Sen's confidence interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct KeptPerRequest {
    pub bytes: f64,
    /// Interval at `confidence`; unbounded (null) with few samples.
    pub lower_bytes: f64,
    pub upper_bytes: f64,
    pub samples: usize,
    pub confidence: f64,
}

/// Fewer requests than this: no estimate (one pair says nothing robust).
pub const MIN_SAMPLES: usize = 5;

/// The robust slope of the running sum of `deltas` (bytes, in request
/// order) over the request index.
pub fn kept_per_request(deltas: &[i64]) -> Option<KeptPerRequest> {
    if deltas.len() < MIN_SAMPLES {
        return None;
    }
    let xs: Vec<f64> = (1..=deltas.len()).map(|i| i as f64).collect();
    let ys: Vec<f64> = deltas
        .iter()
        .scan(0.0, |sum, d| {
            *sum += *d as f64;
            Some(*sum)
        })
        .collect();
    let RobustSlope {
        slope,
        lower,
        upper,
        samples,
        confidence,
    } = theil_sen(&xs, &ys)?;
    Some(KeptPerRequest {
        bytes: slope,
        lower_bytes: lower,
        upper_bytes: upper,
        samples,
        confidence,
    })
}

/// Of routes given as (name, bytes kept per request, requests in the
/// window), the one carrying most of the growth: the largest positive
/// bytes-per-request times requests, among those whose interval excludes 0
/// when one does.
pub fn carrier<'a>(
    routes: impl IntoIterator<Item = (&'a str, KeptPerRequest, u64)>,
) -> Option<(&'a str, KeptPerRequest)> {
    let mut best: Option<(&str, KeptPerRequest, f64, bool)> = None;
    for (name, kept, requests) in routes {
        if kept.bytes <= 0.0 {
            continue;
        }
        let share = kept.bytes * requests as f64;
        let significant = kept.lower_bytes > 0.0;
        let better = match best {
            None => true,
            Some((_, _, s, sig)) => (significant, share) > (sig, s),
        };
        if better {
            best = Some((name, kept, share, significant));
        }
    }
    best.map(|(name, kept, _, _)| (name, kept))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_leak_is_its_bytes_per_request() {
        let deltas = vec![31_000; 50];
        let k = kept_per_request(&deltas).unwrap();
        assert!((k.bytes - 31_000.0).abs() < 1e-6, "{k:?}");
    }

    #[test]
    fn page_steps_average_out_where_the_median_delta_is_zero() {
        // 1 KiB per request, seen as a 4 KiB page every fourth request.
        let deltas: Vec<i64> = (0..200)
            .map(|i| if i % 4 == 3 { 4096 } else { 0 })
            .collect();
        let k = kept_per_request(&deltas).unwrap();
        assert!((k.bytes - 1024.0).abs() < 100.0, "{k:?}");
    }

    #[test]
    fn a_rare_large_step_does_not_make_a_leak() {
        // An arena of 1 MiB fell on one request of an otherwise flat route.
        let mut deltas = vec![0i64; 100];
        deltas[40] = 1 << 20;
        deltas[70] = -(1 << 20);
        let k = kept_per_request(&deltas).unwrap();
        assert!(k.bytes.abs() < 1.0, "{k:?}");
    }

    #[test]
    fn too_few_requests_give_no_estimate() {
        assert!(kept_per_request(&[1, 2, 3]).is_none());
    }

    #[test]
    fn the_carrier_is_the_route_with_most_growth() {
        let k = |bytes: f64, lower: f64| KeptPerRequest {
            bytes,
            lower_bytes: lower,
            upper_bytes: bytes * 2.0,
            samples: 100,
            confidence: 0.99,
        };
        let routes = vec![
            ("GET /health", k(10.0, -5.0), 1000),
            ("GET /quote", k(31_000.0, 30_000.0), 100),
            ("GET /", k(-5.0, -10.0), 1000),
        ];
        assert_eq!(carrier(routes).unwrap().0, "GET /quote");
        assert!(carrier(vec![("GET /", k(-1.0, -2.0), 5)]).is_none());
    }
}
