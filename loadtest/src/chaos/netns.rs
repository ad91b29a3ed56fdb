//! Real network faults between nodes (`--net netns`): every node runs in its own Linux
//! network namespace, wired to a bridge in the root namespace, and the nemesis cuts links
//! with iptables and degrades them with `tc`.
//!
//! # Address plan ([`NetPlan`])
//!
//! For a run whose prefix is `habar-<runid8>` and subnet `10.77.<k>.0/24`:
//!
//! - node N runs in namespace `habar-<runid8>-nN`, on a veth end `hb<runid6>cN` (address
//!   `10.77.<k>.N/24`, loopback up), listening on `10.77.<k>.N:7001`;
//! - the veth's other end `hb<runid6>hN` is attached to the bridge `hb<runid6>br` in the root
//!   namespace, which has `10.77.<k>.254/24`: the tester (root namespace) reaches every node,
//!   and the nodes reach each other, through it;
//! - if bridged traffic goes through the root namespace's iptables
//!   (`net.bridge.bridge-nf-call-iptables = 1`, and Docker's `FORWARD` policy `DROP`), one
//!   rule `FORWARD -i <bridge> -o <bridge> -m comment --comment habar-<runid8> -j ACCEPT` lets
//!   the nodes talk.
//!
//! `k` is chosen per run among the `10.77.x` subnets no local address uses ([`pick_subnet`]).
//!
//! # Faults ([`NetNs`])
//!
//! - **cuts** (partitions): for each cut pair (a, b), node a's namespace drops everything
//!   from and to b (`INPUT -s b -j DROP`, `OUTPUT -d b -j DROP`) and b's drops a's. The
//!   namespaces' filter tables are rewritten whole by `iptables-restore` ([`ruleset`]), so
//!   healing is writing them back empty. The tester's address (`.254`) is never cut.
//! - **slow link**: `tc qdisc replace dev <veth in ns> root netem delay 50ms 20ms`;
//!   undone by `tc qdisc del dev <veth> root`.
//! - **lossy link**: `netem loss 10% delay 5ms`, undone the same way.
//!
//! Kernels without `sch_netem` (checked once at setup): a lossy link drops 10% of the node's
//! outgoing packets with iptables (`-m statistic --mode random`, no added delay), and a slow
//! link is a token bucket (`tbf rate 1mbit`): queueing delay under load instead of a fixed
//! delay. The fault record says which was used.
//!
//! # Cleanup
//!
//! [`NetNs`]'s `Drop` deletes the namespaces (which deletes the veth pairs and every rule
//! and qdisc inside), the bridge and the root `FORWARD` rule. Setup first removes leftovers
//! of a previous run with the same prefix (a tester killed by SIGKILL cannot clean up).

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::Command;
use std::process::Stdio;

use anyhow::Context;

/// The port every node listens on (inside its own namespace).
pub const NODE_PORT: u16 = 7001;
/// Loss ratio of a lossy link, percent.
pub const LOSS_PERCENT: u32 = 10;

/// Names and addresses of one run's network: a pure function of the run id, the subnet
/// and the node count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetPlan {
    /// `habar-<runid8>`: namespaces are `<prefix>-nN`; the iptables comment.
    pub prefix: String,
    /// `hb<runid6>`: interface names (at most 15 bytes: `hb` + 6 + `br`/`hN`/`cN`).
    pub link_prefix: String,
    /// The third octet of `10.77.<k>.0/24`.
    pub subnet: u8,
    pub nodes: u64,
}

impl NetPlan {
    pub fn new(run_id: u64, subnet: u8, nodes: u64) -> NetPlan {
        let hex = format!("{run_id:016x}");
        NetPlan { prefix: format!("habar-{}", &hex[..8]), link_prefix: format!("hb{}", &hex[..6]), subnet, nodes }
    }

    pub fn ids(&self) -> impl Iterator<Item = u64> {
        1..=self.nodes
    }

    pub fn netns(&self, id: u64) -> String {
        format!("{}-n{id}", self.prefix)
    }

    pub fn bridge(&self) -> String {
        format!("{}br", self.link_prefix)
    }

    /// The veth end in the root namespace, attached to the bridge.
    pub fn host_veth(&self, id: u64) -> String {
        format!("{}h{id}", self.link_prefix)
    }

    /// The veth end inside node `id`'s namespace.
    pub fn node_veth(&self, id: u64) -> String {
        format!("{}c{id}", self.link_prefix)
    }

    pub fn addr(&self, id: u64) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, id as u8)
    }

    /// The bridge's address: the tester's side.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, 254)
    }

    pub fn listen(&self, id: u64) -> String {
        format!("{}:{NODE_PORT}", self.addr(id))
    }

    /// `1=10.77.k.1:7001,2=...`
    pub fn initial_cluster(&self) -> String {
        self.ids().map(|id| format!("{id}={}", self.listen(id))).collect::<Vec<_>>().join(",")
    }

    /// The root `FORWARD` rule letting bridged node-to-node traffic through, as arguments
    /// after `-I FORWARD 1` / `-D FORWARD`.
    pub fn forward_rule(&self) -> Vec<String> {
        let br = self.bridge();
        ["-i", &br, "-o", &br, "-m", "comment", "--comment", &self.prefix, "-j", "ACCEPT"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }
}

/// The subnet `k` to use: `preferred` if no local address is in `10.77.<preferred>.0/24`,
/// else the next free one (wrapping within 1..=250); None if all are taken.
pub fn pick_subnet(used: &BTreeSet<u8>, preferred: u8) -> Option<u8> {
    let start = (preferred as u16 % 250) + 1;
    (0..250u16).map(|i| ((start - 1 + i) % 250 + 1) as u8).find(|k| !used.contains(k))
}

/// The third octets of every `10.77.x.y` address in `ip -o -4 addr show` output.
pub fn used_subnets(ip_addr_output: &str) -> BTreeSet<u8> {
    ip_addr_output
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("10.77."))
        .filter_map(|rest| rest.split('.').next()?.parse::<u8>().ok())
        .collect()
}

/// A set of cut links, each as (smaller id, larger id).
pub type Cuts = BTreeSet<(u64, u64)>;

fn pair(a: u64, b: u64) -> (u64, u64) {
    (a.min(b), a.max(b))
}

/// Cuts between every node of `a` and every node of `b`.
pub fn split(a: &[u64], b: &[u64]) -> Cuts {
    a.iter().flat_map(|x| b.iter().filter(move |y| *y != x).map(move |y| pair(*x, *y))).collect()
}

/// Cuts isolating `node` from every other node of `all`.
pub fn isolate(node: u64, all: &[u64]) -> Cuts {
    split(&[node], all)
}

/// The peers `node` must not talk to under `cuts`.
pub fn blocked_peers(node: u64, cuts: &Cuts) -> Vec<u64> {
    cuts.iter()
        .filter_map(|&(a, b)| {
            if a == node {
                Some(b)
            } else if b == node {
                Some(a)
            } else {
                None
            }
        })
        .collect()
}

/// The `iptables-restore` input replacing a node's filter table: drop everything from
/// and to each blocked peer, and (when `loss_percent` is set) a random share of its
/// outgoing packets. With nothing blocked and no loss, an empty (all-accept) table.
pub fn ruleset(plan: &NetPlan, blocked: &[u64], loss_percent: Option<u32>) -> String {
    let mut s = String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for peer in blocked {
        let a = plan.addr(*peer);
        s.push_str(&format!("-A INPUT -s {a}/32 -j DROP\n-A OUTPUT -d {a}/32 -j DROP\n"));
    }
    if let Some(p) = loss_percent {
        s.push_str(&format!("-A OUTPUT -m statistic --mode random --probability {:.4} -j DROP\n", p as f64 / 100.0));
    }
    s.push_str("COMMIT\n");
    s
}

/// A degraded link: what the nemesis asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkFault {
    /// Delay 50 ms ± 20 ms on every packet the node sends.
    Slow,
    /// 10% of the packets the node sends are lost (plus 5 ms delay with netem).
    Lossy,
}

/// `tc` arguments after `qdisc replace dev <dev> root` for `fault`, with netem or (without)
/// the fallback qdisc; None when the fallback is not a qdisc (loss by iptables).
pub fn qdisc_args(fault: LinkFault, netem: bool) -> Option<Vec<&'static str>> {
    match (fault, netem) {
        (LinkFault::Slow, true) => Some(vec!["netem", "delay", "50ms", "20ms"]),
        (LinkFault::Lossy, true) => Some(vec!["netem", "loss", "10%", "delay", "5ms"]),
        (LinkFault::Slow, false) => Some(vec!["tbf", "rate", "1mbit", "burst", "32kbit", "latency", "400ms"]),
        (LinkFault::Lossy, false) => None,
    }
}

/// What is missing to run `--net netns` (root, `ip`, `iptables`, `iptables-restore`, `tc`);
/// empty if nothing.
pub fn missing_requirements() -> Vec<String> {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (network namespaces need CAP_NET_ADMIN: run as root)".to_string());
    }
    for (tool, pkg) in
        [("ip", "iproute2"), ("tc", "iproute2"), ("iptables", "iptables"), ("iptables-restore", "iptables")]
    {
        if !on_path(tool) {
            missing.push(format!("`{tool}` (Debian package {pkg})"));
        }
    }
    missing
}

fn on_path(tool: &str) -> bool {
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&dirs).chain(["/usr/sbin", "/sbin"].iter().map(Into::into)).any(|d| d.join(tool).is_file())
}

/// Runs `prog args`, failing with its stderr unless it exits 0.
fn run(prog: &str, args: &[&str]) -> anyhow::Result<String> {
    run_input(prog, args, None)
}

fn run_input(prog: &str, args: &[&str], input: Option<&str>) -> anyhow::Result<String> {
    let mut cmd = Command::new(prog);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().with_context(|| format!("running `{prog}`"))?;
    if let Some(text) = input {
        let mut stdin = child.stdin.take().context("no stdin")?;
        stdin.write_all(text.as_bytes()).with_context(|| format!("writing to `{prog}`"))?;
    }
    let out = child.wait_with_output().with_context(|| format!("waiting for `{prog}`"))?;
    if !out.status.success() {
        anyhow::bail!(
            "`{prog} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Best effort (cleanup): ignore failures.
fn try_run(prog: &str, args: &[&str]) {
    let _ = run(prog, args);
}

/// One run's live network: created by [`NetNs::setup`], removed on drop.
pub struct NetNs {
    pub plan: NetPlan,
    /// Whether the kernel has `sch_netem`.
    pub netem: bool,
    forward_rule: bool,
    cuts: Cuts,
    loss: BTreeSet<u64>,
    qdiscs: BTreeSet<u64>,
    torn_down: bool,
}

impl NetNs {
    /// Checks the requirements, removes leftovers with the same prefix, picks a subnet and
    /// builds the namespaces, veths and bridge for `nodes` nodes.
    pub fn setup(run_id: u64, nodes: u64) -> anyhow::Result<NetNs> {
        anyhow::ensure!((1..=9).contains(&nodes), "--nodes {nodes} is outside 1..=9");
        let missing = missing_requirements();
        anyhow::ensure!(missing.is_empty(), "--net netns needs: {}", missing.join("; "));
        let probe = NetPlan::new(run_id, 0, nodes);
        let removed = cleanup_leftovers(&probe.prefix, &probe.link_prefix);
        if !removed.is_empty() {
            eprintln!("habar-chaos: removed leftovers of an earlier run: {}", removed.join(", "));
        }
        let used = used_subnets(&run("ip", &["-o", "-4", "addr", "show"])?);
        let subnet = pick_subnet(&used, (run_id >> 40) as u8).context("every 10.77.x.0/24 subnet is in use")?;
        let plan = NetPlan::new(run_id, subnet, nodes);
        let mut net = NetNs {
            plan,
            netem: false,
            forward_rule: false,
            cuts: Cuts::new(),
            loss: BTreeSet::new(),
            qdiscs: BTreeSet::new(),
            torn_down: false,
        };
        // On error `net` drops here and removes whatever was created.
        net.build().context("setting up the nodes' network namespaces")?;
        Ok(net)
    }

    fn build(&mut self) -> anyhow::Result<()> {
        let p = self.plan.clone();
        let br = p.bridge();
        run("ip", &["link", "add", &br, "type", "bridge"])?;
        run("ip", &["addr", "add", &format!("{}/24", p.gateway()), "dev", &br])?;
        run("ip", &["link", "set", &br, "up"])?;
        for id in p.ids() {
            let (ns, h, c) = (p.netns(id), p.host_veth(id), p.node_veth(id));
            run("ip", &["netns", "add", &ns])?;
            run("ip", &["link", "add", &h, "type", "veth", "peer", "name", &c])?;
            run("ip", &["link", "set", &c, "netns", &ns])?;
            run("ip", &["link", "set", &h, "master", &br])?;
            run("ip", &["link", "set", &h, "up"])?;
            run("ip", &["-n", &ns, "addr", "add", &format!("{}/24", p.addr(id)), "dev", &c])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            run("ip", &["-n", &ns, "link", "set", &c, "up"])?;
        }
        let nf = std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables").unwrap_or_default();
        if nf.trim() == "1" {
            let rule = p.forward_rule();
            let mut args = vec!["-w", "-I", "FORWARD", "1"];
            args.extend(rule.iter().map(String::as_str));
            run("iptables", &args)?;
            self.forward_rule = true;
        }
        // Probe netem on node 1's loopback.
        let ns1 = p.netns(1);
        self.netem =
            run("ip", &["netns", "exec", &ns1, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "0ms"])
                .is_ok();
        if self.netem {
            run("ip", &["netns", "exec", &ns1, "tc", "qdisc", "del", "dev", "lo", "root"])?;
        }
        // Every filter table starts empty (this also checks iptables works in a namespace).
        self.write_rules(&p.ids().collect::<Vec<_>>())?;
        Ok(())
    }

    /// Rewrites the filter tables of `nodes` from the current cuts and losses.
    fn write_rules(&self, nodes: &[u64]) -> anyhow::Result<()> {
        for &id in nodes {
            let blocked = blocked_peers(id, &self.cuts);
            let loss = self.loss.contains(&id).then_some(LOSS_PERCENT);
            let rules = ruleset(&self.plan, &blocked, loss);
            let ns = self.plan.netns(id);
            run_input("ip", &["netns", "exec", &ns, "iptables-restore", "-w"], Some(&rules))
                .with_context(|| format!("iptables in {ns}"))?;
        }
        Ok(())
    }

    /// Replaces the set of cut links (empty: every link heals).
    pub fn set_cuts(&mut self, cuts: Cuts) -> anyhow::Result<()> {
        let touched: BTreeSet<u64> = self.cuts.iter().chain(cuts.iter()).flat_map(|&(a, b)| [a, b]).collect();
        self.cuts = cuts;
        self.write_rules(&touched.into_iter().collect::<Vec<_>>())
    }

    pub fn cuts(&self) -> &Cuts {
        &self.cuts
    }

    /// Degrades node `id`'s link; returns how (for the fault record).
    pub fn degrade(&mut self, id: u64, fault: LinkFault) -> anyhow::Result<String> {
        let dev = self.plan.node_veth(id);
        let ns = self.plan.netns(id);
        match qdisc_args(fault, self.netem) {
            Some(q) => {
                let mut args = vec!["netns", "exec", &ns, "tc", "qdisc", "replace", "dev", &dev, "root"];
                args.extend(q.iter().copied());
                run("ip", &args)?;
                self.qdiscs.insert(id);
                Ok(format!("tc qdisc {} on {dev}", q.join(" ")))
            }
            None => {
                self.loss.insert(id);
                self.write_rules(&[id])?;
                Ok(format!("no netem in this kernel: iptables drops {LOSS_PERCENT}% of its outgoing packets"))
            }
        }
    }

    /// Restores node `id`'s link (removes its qdisc and loss rule).
    pub fn restore(&mut self, id: u64) -> anyhow::Result<()> {
        if self.qdiscs.remove(&id) {
            let (ns, dev) = (self.plan.netns(id), self.plan.node_veth(id));
            run("ip", &["netns", "exec", &ns, "tc", "qdisc", "del", "dev", &dev, "root"])?;
        }
        if self.loss.remove(&id) {
            self.write_rules(&[id])?;
        }
        Ok(())
    }

    /// Heals everything: no cut, no loss, no qdisc on any node (best effort on the qdiscs
    /// the bookkeeping does not know of).
    pub fn heal_all(&mut self) -> anyhow::Result<()> {
        self.cuts.clear();
        self.loss.clear();
        self.qdiscs.clear();
        for id in self.plan.ids() {
            let (ns, dev) = (self.plan.netns(id), self.plan.node_veth(id));
            try_run("ip", &["netns", "exec", &ns, "tc", "qdisc", "del", "dev", &dev, "root"]);
        }
        self.write_rules(&self.plan.ids().collect::<Vec<_>>())
    }

    /// The command prefix running a program in node `id`'s namespace (`ip netns exec <ns>`:
    /// ip enters the namespace and execs the program, so the child *is* the program).
    pub fn exec_prefix(&self, id: u64) -> Vec<String> {
        vec!["netns".into(), "exec".into(), self.plan.netns(id)]
    }

    /// Removes everything this run created. Idempotent; also run on drop.
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        if self.forward_rule {
            let rule = self.plan.forward_rule();
            let mut args = vec!["-w", "-D", "FORWARD"];
            args.extend(rule.iter().map(String::as_str));
            try_run("iptables", &args);
        }
        for id in self.plan.ids() {
            try_run("ip", &["netns", "del", &self.plan.netns(id)]);
            // Gone with the namespace, unless setup failed before moving it there.
            if link_exists(&self.plan.host_veth(id)) {
                try_run("ip", &["link", "del", &self.plan.host_veth(id)]);
            }
        }
        try_run("ip", &["link", "del", &self.plan.bridge()]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn link_exists(name: &str) -> bool {
    run("ip", &["link", "show", "dev", name]).is_ok()
}

/// Removes namespaces named `<prefix>-n*`, links named `<link_prefix>*` and root
/// `FORWARD` rules commented `<prefix>`: what a run with this prefix leaves when it is
/// killed. Returns what it removed.
pub fn cleanup_leftovers(prefix: &str, link_prefix: &str) -> Vec<String> {
    let mut removed = Vec::new();
    if let Ok(list) = run("ip", &["netns", "list"]) {
        for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if ns.strip_prefix(prefix).is_some_and(|rest| rest.starts_with("-n"))
                && run("ip", &["netns", "del", ns]).is_ok()
            {
                removed.push(format!("netns {ns}"));
            }
        }
    }
    if let Ok(links) = run("ip", &["-o", "link", "show"]) {
        // `7: hbxxxxxxbr: <...` or `8: hbxxxxxxh1@if2: <...`
        let names: Vec<String> = links
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with(link_prefix))
            .collect();
        // Veths first (deleting one end deletes its peer), then the bridge.
        for name in names.iter().filter(|n| !n.ends_with("br")).chain(names.iter().filter(|n| n.ends_with("br"))) {
            if link_exists(name) && run("ip", &["link", "del", name]).is_ok() {
                removed.push(format!("link {name}"));
            }
        }
    }
    if let Ok(rules) = run("iptables", &["-w", "-S", "FORWARD"]) {
        for rule in rules.lines().filter(|l| l.starts_with("-A FORWARD") && l.contains(&format!("--comment {prefix}")))
        {
            let mut args: Vec<&str> = vec!["-w", "-D"];
            args.extend(rule.split_whitespace().skip(1));
            if run("iptables", &args).is_ok() {
                removed.push(format!("iptables rule `{rule}`"));
            }
        }
    }
    removed
}

/// Node `id`'s blocked peers for every node, as a map (for notes and tests).
pub fn blocked_map(cuts: &Cuts, nodes: &[u64]) -> BTreeMap<u64, Vec<u64>> {
    nodes.iter().map(|&n| (n, blocked_peers(n, cuts))).filter(|(_, b)| !b.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> NetPlan {
        NetPlan::new(0x1234_5678_9abc_def0, 42, 3)
    }

    #[test]
    fn address_plan() {
        let p = plan();
        assert_eq!(p.prefix, "habar-12345678");
        assert_eq!(p.netns(2), "habar-12345678-n2");
        assert_eq!(p.bridge(), "hb123456br");
        assert_eq!(p.host_veth(3), "hb123456h3");
        assert_eq!(p.node_veth(3), "hb123456c3");
        assert!(p.bridge().len() <= 15 && p.host_veth(9).len() <= 15);
        assert_eq!(p.listen(1), "10.77.42.1:7001");
        assert_eq!(p.gateway().to_string(), "10.77.42.254");
        assert_eq!(p.initial_cluster(), "1=10.77.42.1:7001,2=10.77.42.2:7001,3=10.77.42.3:7001");
        assert_eq!(
            p.forward_rule().join(" "),
            "-i hb123456br -o hb123456br -m comment --comment habar-12345678 -j ACCEPT"
        );
    }

    #[test]
    fn subnets_avoid_addresses_in_use() {
        let out = "1: lo    inet 127.0.0.1/8 scope host lo\n7: br    inet 10.77.5.254/24 scope global br\n\
                   9: x    inet 10.77.6.1/24 scope global x\n";
        let used = used_subnets(out);
        assert_eq!(used, BTreeSet::from([5, 6]));
        assert_eq!(pick_subnet(&used, 4), Some(7));
        assert_eq!(pick_subnet(&used, 9), Some(10));
        assert_eq!(pick_subnet(&BTreeSet::new(), 249), Some(250));
        assert_eq!(pick_subnet(&BTreeSet::new(), 250), Some(1));
        assert_eq!(pick_subnet(&(1..=250).collect(), 3), None);
        assert!((0..=255u8).all(|p| pick_subnet(&BTreeSet::new(), p).is_some_and(|k| (1..=250).contains(&k))));
    }

    #[test]
    fn cuts_and_blocked_peers() {
        let all = [1, 2, 3, 4, 5];
        let iso = isolate(3, &all);
        assert_eq!(iso, Cuts::from([(1, 3), (2, 3), (3, 4), (3, 5)]));
        assert_eq!(blocked_peers(3, &iso), vec![1, 2, 4, 5]);
        assert_eq!(blocked_peers(1, &iso), vec![3]);
        // A bridge: {1,2} and {4,5} cannot talk, 3 talks to everyone.
        let br = split(&[1, 2], &[4, 5]);
        assert_eq!(br.len(), 4);
        assert!(blocked_peers(3, &br).is_empty());
        assert_eq!(blocked_peers(4, &br), vec![1, 2]);
        assert_eq!(blocked_map(&br, &all).keys().copied().collect::<Vec<_>>(), vec![1, 2, 4, 5]);
    }

    #[test]
    fn rulesets() {
        let p = plan();
        let empty = ruleset(&p, &[], None);
        assert_eq!(empty, "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n");
        let cut = ruleset(&p, &[2, 3], None);
        assert!(cut.contains("-A INPUT -s 10.77.42.2/32 -j DROP\n-A OUTPUT -d 10.77.42.2/32 -j DROP\n"));
        assert!(cut.contains("-A INPUT -s 10.77.42.3/32 -j DROP\n"));
        assert!(!cut.contains("10.77.42.254"), "the tester is never cut");
        let lossy = ruleset(&p, &[], Some(10));
        assert!(lossy.contains("-A OUTPUT -m statistic --mode random --probability 0.1000 -j DROP\n"));
    }

    #[test]
    fn qdiscs() {
        assert_eq!(qdisc_args(LinkFault::Slow, true), Some(vec!["netem", "delay", "50ms", "20ms"]));
        assert_eq!(qdisc_args(LinkFault::Lossy, true), Some(vec!["netem", "loss", "10%", "delay", "5ms"]));
        assert_eq!(qdisc_args(LinkFault::Lossy, false), None);
        assert!(qdisc_args(LinkFault::Slow, false).is_some_and(|q| q[0] == "tbf"));
    }
}
