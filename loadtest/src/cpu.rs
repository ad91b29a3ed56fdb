//! CPU time of the processes a run loads (`--spawn`'s nodes, the tester itself), from
//! `/proc/<pid>/stat`, over the measured window: "µs of CPU per acknowledged envelope" is a
//! figure that the noise of a shared machine moves far less than throughput, and it says how
//! far a build is from a target (100,000 envelopes/s on 2 cores is 20 µs per envelope for
//! everything).

use std::time::Duration;

use serde::Serialize;

/// The name the tester's own process is watched and reported under; every other watched
/// process is a node.
pub const TESTER: &str = "habar-load";

/// One watched process's CPU in the measured window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProcessCpu {
    pub name: String,
    /// User plus system time, seconds.
    pub cpu_secs: f64,
    /// `cpu_secs` over the window's length: cores kept busy on average.
    pub cores: f64,
}

/// User plus system CPU time `pid` has used so far; `None` if it is gone or unreadable.
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let ticks = stat_cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    // SAFETY: sysconf has no preconditions.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_sec = u64::try_from(per_sec).ok().filter(|&t| t > 0)?;
    Some(Duration::from_nanos(ticks.saturating_mul(1_000_000_000 / per_sec)))
}

/// utime + stime of a `/proc/<pid>/stat` line, in clock ticks. The command name (field 2)
/// is in parentheses and may hold spaces and parentheses itself, so fields are counted from
/// the last `)`: state is the first after it, utime the 12th, stime the 13th.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Samples taken at the start of the measured window, to subtract at its end.
#[derive(Debug, Clone)]
pub struct Start {
    at: std::time::Instant,
    each: Vec<(String, u32, Option<Duration>)>,
}

/// Samples each `(name, pid)` now.
pub fn start(procs: &[(String, u32)]) -> Start {
    Start { at: std::time::Instant::now(), each: procs.iter().map(|(n, p)| (n.clone(), *p, process_cpu(*p))).collect() }
}

/// Each process's CPU since `start` (processes unreadable at either end are left out).
pub fn since(start: &Start) -> Vec<ProcessCpu> {
    let secs = start.at.elapsed().as_secs_f64().max(1e-3);
    start
        .each
        .iter()
        .filter_map(|(name, pid, before)| {
            let used = process_cpu(*pid)?.checked_sub((*before)?)?.as_secs_f64();
            Some(ProcessCpu { name: name.clone(), cpu_secs: used, cores: used / secs })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Property: utime and stime are found whatever the command name holds.
    #[test]
    fn cpu_ticks_are_counted_from_the_last_parenthesis() {
        let line = "4242 (habar (n1) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9 0 1234 1 2\n";
        assert_eq!(stat_cpu_ticks(line), Some(325));
        assert_eq!(stat_cpu_ticks("4242 (short) S 1 2"), None, "a truncated line is no figure");
        assert_eq!(stat_cpu_ticks("no parenthesis"), None);
    }

    /// Property: the tester's own process is readable, and CPU it burns shows up.
    #[test]
    fn burning_cpu_shows_in_this_process() {
        let me = std::process::id();
        let s = start(&[("self".into(), me), ("gone".into(), u32::MAX)]);
        let mut x = 0u64;
        let t = std::time::Instant::now();
        // Until a clock tick of CPU time has passed (at most 10 s, so a broken reading fails).
        while process_cpu(me) == s.each[0].2 && t.elapsed() < Duration::from_secs(10) {
            for i in 0..100_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
        }
        std::hint::black_box(x);
        let got = since(&s);
        assert_eq!(got.len(), 1, "the process that does not exist is left out: {got:?}");
        assert_eq!(got[0].name, "self");
        assert!(got[0].cpu_secs > 0.0 && got[0].cores > 0.0, "{got:?}");
    }
}
