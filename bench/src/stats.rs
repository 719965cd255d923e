//! Measuring helpers shared by the generator's processes: one clock for all of them, the latency histogram, the
//! table of commit times, /proc readings and the open-files limit.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;

/// Microseconds on a clock every generator process shares.
///
/// `Instant` (CLOCK_MONOTONIC on Linux) cannot be compared across processes through std, and `SystemTime` alone
/// can step. So each process reads the wall clock once, at its first call, and advances it with its own
/// monotonic clock: within a process the result never goes backwards, and across processes started within
/// milliseconds of each other it differs only by a wall-clock step between their first calls (none in practice
/// during a bench run). No libc call, no new crate.
pub fn now_us() -> u64 {
    static ANCHOR: OnceLock<(Instant, u64)> = OnceLock::new();
    let (at, wall_us) = ANCHOR.get_or_init(|| {
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0);
        (Instant::now(), wall)
    });
    wall_us + at.elapsed().as_micros() as u64
}

/// Latency histogram in microseconds, 3 significant digits (0.1 % resolution), values clamped to one hour.
///
/// The bounds are fixed rather than auto-resizing because `saturating_record` never resizes; 1 µs to 1 h at 3
/// digits is ~190 KiB, one per process.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|e| panic!("histogram bounds are constant: {e}"))
}

/// The histogram as (value µs, count) pairs, the compact form a worker process sends to the parent.
pub fn histogram_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect()
}

/// Percentile (0..=1) in milliseconds; 0 when nothing was recorded.
pub fn percentile_ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    let us = if q >= 1.0 { h.max() } else { h.value_at_quantile(q) };
    us as f64 / 1000.0
}

/// The distribution as `[upper_bound_ms, count]` buckets for a chart: log-spaced on the Renard R10 series (10
/// bounds per decade: 1, 1.25, 1.6, 2, 2.5, 3.15, 4, 5, 6.3, 8), from 10 µs up, only from the first to the last
/// non-empty bucket (empty ones in between are kept so the chart's x axis stays continuous).
pub fn log_buckets_ms(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    const R10: [f64; 10] = [1.0, 1.25, 1.6, 2.0, 2.5, 3.15, 4.0, 5.0, 6.3, 8.0];
    // Upper bounds in µs: 10 µs .. 1 h (the histogram's clamp), well past any latency a run can see.
    let mut bounds = Vec::new();
    let mut decade = 10.0;
    while decade <= 1e9 {
        bounds.extend(R10.iter().map(|m| m * decade));
        decade *= 10.0;
    }
    let mut counts = vec![0u64; bounds.len() + 1];
    for v in h.iter_recorded() {
        let value = v.value_iterated_to() as f64;
        let i = bounds.partition_point(|&b| b < value);
        counts[i] += v.count_at_value();
    }
    let first = counts.iter().position(|&c| c > 0);
    let last = counts.iter().rposition(|&c| c > 0);
    let (Some(first), Some(last)) = (first, last) else { return Vec::new() };
    (first..=last)
        .map(|i| {
            // The overflow bucket (past 1 h) has no finite bound; the histogram clamps there anyway.
            let bound_us = bounds.get(i).copied().unwrap_or(3.6e9);
            // Round away float noise from the multiplications (0.0125 not 0.012500000000000002).
            ((bound_us / 1000.0 * 1e6).round() / 1e6, counts[i])
        })
        .collect()
}

/// Commit (or wakeup, or backlog t0) time of every event id the producers wrote, for the latency join.
///
/// Event ids are an identity column, so a run's ids are nearly dense: a plain vector indexed by `id - min` is the
/// fastest lookup for tens of millions of deliveries. A hash map is the fallback if they are not.
pub enum CommitTable {
    Dense { min: i64, at_us: Vec<u64> },
    Sparse(HashMap<i64, u64>),
}

impl CommitTable {
    pub fn new(pairs: &[(i64, u64)]) -> CommitTable {
        let (Some(min), Some(max)) = (pairs.iter().map(|p| p.0).min(), pairs.iter().map(|p| p.0).max()) else {
            return CommitTable::Sparse(HashMap::new());
        };
        let span = (max - min) as u64 + 1;
        if span <= 4 * pairs.len() as u64 + 1_000_000 {
            // 0 means "not written by this run": a real time is microseconds since 1970, never 0.
            let mut at_us = vec![0u64; span as usize];
            for &(id, at) in pairs {
                at_us[(id - min) as usize] = at;
            }
            CommitTable::Dense { min, at_us }
        } else {
            CommitTable::Sparse(pairs.iter().copied().collect())
        }
    }

    pub fn get(&self, id: i64) -> Option<u64> {
        match self {
            CommitTable::Dense { min, at_us } => {
                let i = usize::try_from(id.checked_sub(*min)?).ok()?;
                at_us.get(i).copied().filter(|&at| at != 0)
            }
            CommitTable::Sparse(map) => map.get(&id).copied(),
        }
    }

    /// Commit times as the file the parent hands its worker processes: (id i64, µs u64) little-endian pairs.
    pub fn encode(pairs: &[(i64, u64)]) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(pairs.len() * 16);
        for &(id, at) in pairs {
            bytes.extend_from_slice(&id.to_le_bytes());
            bytes.extend_from_slice(&at.to_le_bytes());
        }
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Vec<(i64, u64)> {
        bytes
            .chunks_exact(16)
            .map(|c| {
                let (id, at) = c.split_at(8);
                let id = i64::from_le_bytes(id.try_into().unwrap_or_default());
                let at = u64::from_le_bytes(at.try_into().unwrap_or_default());
                (id, at)
            })
            .collect()
    }
}

/// Resident set size of the given processes, KiB.
pub fn server_rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .sum::<u64>()
}

/// User + system CPU seconds of the given processes.
pub fn server_cpu(pids: &[u32]) -> f64 {
    let ticks_per_s = 100.0; // USER_HZ on Linux
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name (which may contain spaces) start after the last ')'.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks_per_s)
        })
        .sum()
}

/// (soft, hard) RLIMIT_NOFILE of this process, from /proc/self/limits.
fn nofile_limits() -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut numbers = line["Max open files".len()..].split_whitespace();
    let parse = |s: Option<&str>| -> Option<u64> {
        match s? {
            "unlimited" => Some(u64::MAX),
            n => n.parse().ok(),
        }
    };
    Some((parse(numbers.next())?, parse(numbers.next())?))
}

/// Raise the soft open-files limit to the hard one and return the soft limit now in force.
///
/// std has no setrlimit and the brief allows no new crate for it, so this asks util-linux's `prlimit` to change
/// this very process (permitted for one's own processes up to the hard limit). Worker processes inherit the
/// raised limit. Without `prlimit` the limit stays as it is; scripts/bench raises it with `ulimit` anyway.
pub fn raise_nofile_limit() -> Option<u64> {
    let (soft, hard) = nofile_limits()?;
    if soft < hard {
        let hard_arg = if hard == u64::MAX { "unlimited".to_owned() } else { hard.to_string() };
        let _ = std::process::Command::new("prlimit")
            .arg("--pid")
            .arg(std::process::id().to_string())
            .arg(format!("--nofile={hard_arg}:{hard_arg}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    nofile_limits().map(|(soft, _)| soft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_table_dense_and_sparse_agree() {
        let pairs = vec![(10, 100), (12, 120), (11, 110)];
        let dense = CommitTable::new(&pairs);
        assert!(matches!(dense, CommitTable::Dense { .. }));
        assert_eq!(dense.get(11), Some(110));
        assert_eq!(dense.get(9), None);
        assert_eq!(dense.get(13), None);
        let sparse = CommitTable::new(&[(1, 5), (50_000_000, 6)]);
        assert!(matches!(sparse, CommitTable::Sparse(_)));
        assert_eq!(sparse.get(50_000_000), Some(6));
        assert_eq!(CommitTable::decode(&CommitTable::encode(&pairs)), pairs);
    }

    #[test]
    fn buckets_cover_the_recorded_range() {
        let mut h = new_histogram();
        h.saturating_record(5); // below the first bound: the 0.01 ms bucket
        h.saturating_record(1_000); // 1 ms
        h.saturating_record(1_100); // 1.25 ms bucket
        let buckets = log_buckets_ms(&h);
        assert_eq!(buckets.first(), Some(&(0.01, 1)));
        assert_eq!(buckets.last(), Some(&(1.25, 1)));
        assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), 3);
        assert_eq!(percentile_ms(&h, 1.0), 1.1);
    }
}
