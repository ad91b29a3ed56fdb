//! The end-of-run table.

use std::fmt::Write;

use crate::cpu::ProcessCpu;
use crate::run::Report;
use crate::scenario::Mode;
use crate::stats::Summary;

fn row(out: &mut String, name: &str, s: &Summary) {
    let _ = writeln!(
        out,
        "{name:<9} {:>11} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>9.2}",
        s.count, s.per_sec, s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms
    );
}

/// "CPU in the measured window: n1 0.61, ..., habar-load 0.10 cores; 171 µs per acknowledged
/// envelope (nodes 160)"; the per-envelope part only when something was acknowledged (the
/// tester's own CPU, named [`crate::cpu::TESTER`], is left out of the nodes' figure); `None` when no
/// process was watched.
fn cpu_line(cpu: &[ProcessCpu], acknowledged: u64) -> Option<String> {
    if cpu.is_empty() {
        return None;
    }
    let each: Vec<String> = cpu.iter().map(|p| format!("{} {:.2}", p.name, p.cores)).collect();
    let mut line = format!("CPU in the measured window: {} cores", each.join(", "));
    if acknowledged > 0 {
        let per = |secs: f64| secs * 1e6 / acknowledged as f64;
        let all: f64 = cpu.iter().map(|p| p.cpu_secs).sum();
        let nodes: f64 = cpu.iter().filter(|p| p.name != crate::cpu::TESTER).map(|p| p.cpu_secs).sum();
        line.push_str(&format!("; {:.0} µs per acknowledged envelope", per(all)));
        if nodes > 0.0 {
            line.push_str(&format!(" (nodes {:.0})", per(nodes)));
        }
    }
    Some(line)
}

/// The human-readable summary of a run.
pub fn table(r: &Report) -> String {
    let s = &r.scenario;
    let mut out = String::new();
    let how = match s.mode {
        Mode::Closed => format!("closed loop, {} publishers x {} in flight", s.publishers, s.in_flight),
        Mode::Open if s.phases.is_empty() => format!("open loop at {}/s", s.rate),
        Mode::Open => format!("open loop, {} phases", s.phases.len()),
        Mode::Ramp => format!("ramp from {}/s by {}/s, p99 bound {} ms", s.ramp_start, s.ramp_step, s.slo_p99_ms),
    };
    let _ = writeln!(
        out,
        "scenario {} ({how}); {} conversations ({:?}), {}..{} B ciphertext, {} per publish",
        s.name, s.conversations, s.popularity, s.ciphertext_min_bytes, s.ciphertext_max_bytes, s.envelopes_per_publish
    );
    let _ = writeln!(
        out,
        "measured {:.1} s after {:.1} s warm-up on {} CPUs ({})",
        r.measured_secs, s.warmup_secs, r.machine.cpus, r.machine.cpu_model
    );
    if let Some(steal) = r.machine.cpu_steal_pct {
        let _ = writeln!(
            out,
            "CPU steal from start to end of load: {steal:.1}% of all CPU time (the hypervisor gave it to others)"
        );
    }
    match r.machine.damon_pageout {
        Some(true) => {
            let _ = writeln!(
                out,
                "note: the kernel's DAMON page reclaim (pageout) is on; it stalls processes now and then (docs/BENCHMARKS.md)"
            );
        }
        None => {
            let _ = writeln!(out, "note: could not tell whether the kernel's DAMON page reclaim is on (needs root)");
        }
        Some(false) => {}
    }
    let _ = writeln!(
        out,
        "{:<9} {:>11} {:>10} {:>8} {:>8} {:>8} {:>9} {:>9}",
        "", "count", "per s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
    );
    row(&mut out, "publish", &r.publish);
    if r.read.count > 0 {
        row(&mut out, "read", &r.read);
    }
    if r.end_to_end.count > 0 {
        row(&mut out, "e2e", &r.end_to_end);
    }
    if r.client_publish_requests > 0 && r.publish.count > 0 {
        let _ = writeln!(
            out,
            "client batching: {} publish requests ({:.1} envelopes per request)",
            r.client_publish_requests,
            r.publish.count as f64 / r.client_publish_requests as f64
        );
    }
    if r.errors.is_empty() {
        let _ = writeln!(out, "errors: none");
    } else {
        let list: Vec<String> = r.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(out, "errors: {}", list.join(", "));
    }
    if let Some(ramp) = &r.ramp {
        for st in &ramp.steps {
            let _ = writeln!(
                out,
                "ramp {:>9.0}/s: p99 {:>8.2} ms, {} errors, {}",
                st.rate,
                st.p99_ms,
                st.errors,
                if st.held { "held" } else { "missed" }
            );
        }
        let _ = writeln!(out, "capacity at p99 <= {} ms: {:.0} envelopes/s", ramp.slo_p99_ms, ramp.capacity);
    }
    if let Some(line) = cpu_line(&r.cpu, r.publish.count) {
        let _ = writeln!(out, "{line}");
    }
    if !r.peak_rss.is_empty() {
        let list: Vec<String> = r.peak_rss.iter().map(|(id, b)| format!("n{id} {} MiB", b >> 20)).collect();
        let _ = writeln!(out, "peak RSS per node: {}", list.join(", "));
    }
    if let Some(v) = &r.verify {
        let _ = writeln!(
            out,
            "verify: {} acknowledged in {} conversations: {} lost, {} duplicated, {} out of order, {} gaps ({} unacknowledged present): {}",
            v.acknowledged,
            v.conversations,
            v.lost,
            v.duplicated,
            v.out_of_order,
            v.gaps,
            v.unacknowledged_present,
            if v.ok() { "OK" } else { "FAILED" }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, cpu_secs: f64, cores: f64) -> ProcessCpu {
        ProcessCpu { name: name.into(), cpu_secs, cores }
    }

    /// Property: CPU per envelope is all watched CPU over the acknowledged envelopes, the
    /// nodes' share leaves the tester out, and nothing is divided by zero.
    #[test]
    fn cpu_per_envelope_counts_every_process_and_the_nodes_apart() {
        let cpu = [p("n1", 3.0, 0.6), p("n2", 2.0, 0.4), p("habar-load", 1.0, 0.2)];
        assert_eq!(
            cpu_line(&cpu, 10_000).as_deref(),
            Some("CPU in the measured window: n1 0.60, n2 0.40, habar-load 0.20 cores; 600 µs per acknowledged envelope (nodes 500)")
        );
        assert_eq!(
            cpu_line(&cpu[2..], 10_000).as_deref(),
            Some("CPU in the measured window: habar-load 0.20 cores; 100 µs per acknowledged envelope"),
            "no nodes watched (--endpoints): no nodes' figure"
        );
        assert_eq!(
            cpu_line(&cpu, 0).as_deref(),
            Some("CPU in the measured window: n1 0.60, n2 0.40, habar-load 0.20 cores")
        );
        assert_eq!(cpu_line(&[], 10_000), None);
    }
}
