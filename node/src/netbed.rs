//! A multi-host test bed: hosts in network namespaces, joined by a switch in
//! this process that gives every link its own delay, jitter, loss and rate.
//!
//! The kernel here has no netem, so a link cannot be slowed in the kernel.
//! Instead each WAN host gets a TUN device (created here, then moved into
//! its namespace) holding an address in `10.99.0.0/16`. Every packet a host
//! sends to another WAN address comes out of its TUN into the switch thread, which
//! holds it for the link's delay (plus jitter, behind the link's queue at its
//! rate), drops it with the link's loss rate, and writes it into the
//! destination's TUN. A topology is a few lines:
//!
//! ```no_run
//! # use nomoat_node::netbed::{Bed, Link, Nat};
//! # fn main() -> anyhow::Result<()> {
//! let bed = Bed::builder()
//!     .hosts(&["s1", "s2", "client"])
//!     .nat_host("home", Nat::Symmetric)
//!     .default_link(Link::delay_ms(25))
//!     .link("client", "s2", Link::delay_ms(100).loss(0.01))
//!     .block_udp("client", "s1")
//!     .build()?;
//! let out = bed.command("client", "ip").args(["addr"]).output()?;
//! # Ok(()) }
//! ```
//!
//! * A **NAT host** sits behind a router namespace of its own (`NAME-nat`)
//!   that holds its TUN and masquerades its private `192.168.N.0/24`, with no
//!   port forwarding: [`Nat::Cone`] keeps a mapping per source port (Linux
//!   masquerade), [`Nat::Symmetric`] picks a fresh random port per
//!   destination (`fully-random`), as strict home routers and carrier NATs do.
//! * A **LAN host** is on a kernel bridge (`10.98.0.0/24`, multicast
//!   included, no delay): for mDNS.
//!
//! The bed needs root (namespaces, TUN, nftables); it removes everything it
//! made when dropped, killing what still runs inside, and removes what a
//! crashed run of another process left behind. The multi-host tests and
//! `nomoat bench wan` run on it; nothing else in nomoat uses it.

#![allow(unsafe_code)]

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One direction of a link between two WAN hosts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// One-way delay.
    pub delay: Duration,
    /// Extra delay drawn uniformly from `0..=jitter` per packet (a link
    /// never reorders: a packet leaves no earlier than the one before it).
    pub jitter: Duration,
    /// Share of packets dropped, `0.0..=1.0`.
    pub loss: f64,
    /// Bits per second; `None` for no limit. Packets queue behind each
    /// other at this rate; a packet that would wait more than
    /// [`MAX_QUEUE_DELAY`] is dropped (a router's full buffer).
    pub rate_bps: Option<u64>,
}

/// The longest a packet waits in a rate-limited link's queue.
pub const MAX_QUEUE_DELAY: Duration = Duration::from_millis(250);

impl Link {
    /// A link with no delay, loss or rate limit.
    pub const IDEAL: Link = Link {
        delay: Duration::ZERO,
        jitter: Duration::ZERO,
        loss: 0.0,
        rate_bps: None,
    };

    /// A link of `ms` milliseconds one way.
    pub fn delay_ms(ms: u64) -> Self {
        Self {
            delay: Duration::from_millis(ms),
            ..Self::IDEAL
        }
    }

    /// This link with loss `p`.
    pub fn loss(self, p: f64) -> Self {
        Self {
            loss: p.clamp(0.0, 1.0),
            ..self
        }
    }

    /// This link with up to `ms` milliseconds of jitter.
    pub fn jitter_ms(self, ms: u64) -> Self {
        Self {
            jitter: Duration::from_millis(ms),
            ..self
        }
    }

    /// This link limited to `mbit` megabits per second.
    pub fn rate_mbit(self, mbit: f64) -> Self {
        Self {
            rate_bps: Some((mbit * 1e6) as u64),
            ..self
        }
    }
}

/// How a NAT host's router maps its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// One mapping per source address and port, kept across destinations
    /// (Linux masquerade keeps the port when it can): hole punching works.
    Cone,
    /// A new random port for each destination (`fully-random`): what the
    /// host's peers observe is not what a third peer will see, so hole
    /// punching fails and a relay must carry the traffic.
    Symmetric,
}

#[derive(Debug, Clone)]
enum Kind {
    Wan,
    Nat(Nat),
    Lan,
}

#[derive(Debug, Clone)]
struct HostSpec {
    name: String,
    kind: Kind,
}

/// Describes a bed; [`build`](Self::build) makes it.
#[derive(Debug, Clone)]
pub struct BedBuilder {
    hosts: Vec<HostSpec>,
    default: Link,
    links: HashMap<(String, String), Link>,
    no_udp: HashSet<(String, String)>,
    seed: u64,
}

/// What a host is, once built.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its network namespace.
    pub ns: String,
    /// Its own address: on the WAN, behind its NAT, or on the LAN.
    pub ip: Ipv4Addr,
    /// The WAN address its packets leave from (its router's, behind a NAT).
    pub public_ip: Option<Ipv4Addr>,
    /// Index of its WAN port on the switch.
    port: Option<usize>,
}

/// Counters of one direction of a link.
#[derive(Debug, Default)]
pub struct LinkCounters {
    /// Packets delivered.
    pub delivered: AtomicU64,
    /// Bytes delivered.
    pub bytes: AtomicU64,
    /// Packets dropped by loss, a full queue or a block.
    pub dropped: AtomicU64,
    /// UDP packets dropped because UDP is blocked on the link.
    pub udp_blocked: AtomicU64,
}

/// Per-link settings the switch reads for every packet; changeable while
/// the bed runs.
#[derive(Debug)]
struct Links {
    /// `links[from][to]`, by switch port.
    table: Vec<Vec<Link>>,
    no_udp: Vec<Vec<bool>>,
}

/// A running bed. Dropping it stops the switch, kills every process in its
/// namespaces and deletes them.
#[derive(Debug)]
pub struct Bed {
    hosts: HashMap<String, Host>,
    namespaces: Vec<String>,
    links: Arc<Mutex<Links>>,
    counters: Arc<Vec<Vec<LinkCounters>>>,
    ports: Vec<String>,
    stop: Arc<AtomicBool>,
    switch: Option<JoinHandle<()>>,
}

/// The first address of the WAN and its prefix length.
const WAN: ([u8; 2], u8) = ([10, 99], 16);
/// The LAN bridge's subnet.
const LAN: [u8; 3] = [10, 98, 0];
/// Prefix of every namespace a bed makes.
const NS_PREFIX: &str = "nmt";

static BED_SEQ: AtomicU32 = AtomicU32::new(0);

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {cmd:?} (is iproute2 installed?)"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

fn in_ns(ns: &str, args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(["netns", "exec", ns]).args(args))
}

fn sh_in_ns(ns: &str, script: &str) -> Result<String> {
    in_ns(ns, &["sh", "-c", script])
}

/// Whether this process may build a bed (it runs as root).
pub fn is_root() -> bool {
    // The effective uid, from the kernel's own view of this process.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Deletes the namespaces that beds of processes no longer running left.
fn remove_stale() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            kill_all_in(name);
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// Kills every process in namespace `ns` but this one (which is there
/// after [`Bed::enter`]).
fn kill_all_in(ns: &str) {
    let me = std::process::id().to_string();
    if let Ok(pids) = ip(&["netns", "pids", ns]) {
        for pid in pids.split_whitespace().filter(|p| *p != me) {
            let _ = Command::new("kill").args(["-9", pid]).output();
        }
    }
}

impl Bed {
    /// A new description: no hosts, ideal links, seed 1.
    pub fn builder() -> BedBuilder {
        BedBuilder {
            hosts: Vec::new(),
            default: Link::IDEAL,
            links: HashMap::new(),
            no_udp: HashSet::new(),
            seed: 1,
        }
    }

    /// The host called `name`.
    ///
    /// # Panics
    ///
    /// When the bed has no such host (a mistake in the test).
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .get(name)
            .unwrap_or_else(|| panic!("the bed has no host {name}"))
    }

    /// The address `name` is reached at by the others: its WAN address,
    /// its router's for a NAT host, its LAN address for a LAN host.
    pub fn ip(&self, name: &str) -> Ipv4Addr {
        let h = self.host(name);
        h.public_ip.unwrap_or(h.ip)
    }

    /// `program` to be run inside host `name`'s namespace.
    pub fn command(&self, name: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host(name).ns]).arg(program);
        c
    }

    /// Moves the calling thread into host `name`'s network namespace:
    /// sockets it opens from now on, and threads it starts (a runtime's
    /// workers), are on that host. Child processes start there too.
    ///
    /// # Errors
    ///
    /// When the namespace cannot be opened or entered.
    pub fn enter(&self, name: &str) -> Result<()> {
        use std::os::fd::AsFd;
        let path = format!("/var/run/netns/{}", self.host(name).ns);
        let f = File::open(&path).with_context(|| format!("opening {path}"))?;
        rustix::thread::move_into_link_name_space(
            f.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .with_context(|| format!("entering the namespace of {name}"))?;
        Ok(())
    }

    /// Forgets every mapping of NAT host `name`'s router (`conntrack -F`),
    /// as a home router does when it reboots or its table overflows: the
    /// host's next packets leave from new ports (a new random one behind a
    /// symmetric NAT), and packets to the old ones are dropped.
    ///
    /// # Errors
    ///
    /// When `name` is not behind a NAT, or `conntrack` fails (install
    /// conntrack).
    pub fn reset_nat(&self, name: &str) -> Result<()> {
        if self.host(name).public_ip.is_none() {
            bail!("{name} is not behind a NAT");
        }
        let router = format!("{}-nat", self.host(name).ns);
        in_ns(&router, &["conntrack", "-F"]).context("flushing the NAT table")?;
        Ok(())
    }

    fn ports_of(&self, a: &str, b: &str) -> (usize, usize) {
        let port = |n: &str| {
            self.host(n)
                .port
                .unwrap_or_else(|| panic!("{n} is not on the WAN"))
        };
        (port(a), port(b))
    }

    /// Sets both directions of the link between WAN hosts `a` and `b`.
    pub fn set_link(&self, a: &str, b: &str, link: Link) {
        let (i, j) = self.ports_of(a, b);
        let mut l = self.links.lock().unwrap_or_else(|p| p.into_inner());
        l.table[i][j] = link;
        l.table[j][i] = link;
    }

    /// Sets every link of the bed.
    pub fn set_all_links(&self, link: Link) {
        let mut l = self.links.lock().unwrap_or_else(|p| p.into_inner());
        for row in &mut l.table {
            for cell in row.iter_mut() {
                *cell = link;
            }
        }
    }

    /// Blocks (or unblocks) UDP in both directions between `a` and `b`.
    pub fn set_udp_blocked(&self, a: &str, b: &str, blocked: bool) {
        let (i, j) = self.ports_of(a, b);
        let mut l = self.links.lock().unwrap_or_else(|p| p.into_inner());
        l.no_udp[i][j] = blocked;
        l.no_udp[j][i] = blocked;
    }

    /// The counters of the direction `from` → `to`.
    pub fn counters(&self, from: &str, to: &str) -> &LinkCounters {
        let (i, j) = self.ports_of(from, to);
        &self.counters[i][j]
    }

    /// The names of the WAN ports, by switch port (a NAT host's port is its
    /// router's).
    pub fn wan_hosts(&self) -> &[String] {
        &self.ports
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.switch.take() {
            let _ = t.join();
        }
        for ns in &self.namespaces {
            kill_all_in(ns);
        }
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

impl BedBuilder {
    /// A WAN host.
    pub fn host(mut self, name: &str) -> Self {
        self.hosts.push(HostSpec {
            name: name.into(),
            kind: Kind::Wan,
        });
        self
    }

    /// Several WAN hosts.
    pub fn hosts(mut self, names: &[&str]) -> Self {
        for n in names {
            self = self.host(n);
        }
        self
    }

    /// A host behind a home router of kind `nat` on the WAN.
    pub fn nat_host(mut self, name: &str, nat: Nat) -> Self {
        self.hosts.push(HostSpec {
            name: name.into(),
            kind: Kind::Nat(nat),
        });
        self
    }

    /// A host on the LAN bridge only.
    pub fn lan_host(mut self, name: &str) -> Self {
        self.hosts.push(HostSpec {
            name: name.into(),
            kind: Kind::Lan,
        });
        self
    }

    /// The link between every two WAN hosts not set otherwise.
    pub fn default_link(mut self, link: Link) -> Self {
        self.default = link;
        self
    }

    /// Both directions of the link between `a` and `b` (a NAT host's link
    /// is its router's).
    pub fn link(mut self, a: &str, b: &str, link: Link) -> Self {
        self.links.insert((a.into(), b.into()), link);
        self.links.insert((b.into(), a.into()), link);
        self
    }

    /// No UDP between `a` and `b`, both ways (a firewall that lets only TCP
    /// through).
    pub fn block_udp(mut self, a: &str, b: &str) -> Self {
        self.no_udp.insert((a.into(), b.into()));
        self.no_udp.insert((b.into(), a.into()));
        self
    }

    /// The seed of the loss and jitter draws.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Makes the namespaces, devices, routes and NAT rules, and starts the
    /// switch.
    ///
    /// # Errors
    ///
    /// When not root, when `ip` or `nft` is missing, or when a step fails;
    /// what was made is removed again.
    pub fn build(self) -> Result<Bed> {
        if !is_root() {
            bail!(
                "the network test bed needs root (network namespaces, TUN devices, \
                 nftables); run the tests as root"
            );
        }
        remove_stale();
        let seq = BED_SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let mut bed = Bed {
            hosts: HashMap::new(),
            namespaces: Vec::new(),
            links: Arc::new(Mutex::new(Links {
                table: Vec::new(),
                no_udp: Vec::new(),
            })),
            counters: Arc::new(Vec::new()),
            ports: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            switch: None,
        };
        let new_ns = |bed: &mut Bed, name: &str| -> Result<String> {
            let ns = format!("{NS_PREFIX}{pid}x{seq}-{name}");
            ip(&["netns", "add", &ns])?;
            bed.namespaces.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            // IPv4 only: the switch routes IPv4 packets.
            sh_in_ns(
                &ns,
                "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; \
                 echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6",
            )?;
            Ok(ns)
        };
        let mut tuns: Vec<File> = Vec::new();
        let mut by_ip: HashMap<Ipv4Addr, usize> = HashMap::new();
        let mut lan_ns: Option<String> = None;
        for (i, spec) in self.hosts.iter().enumerate() {
            let ns = new_ns(&mut bed, &spec.name)?;
            let dev = |tag: &str| format!("{tag}{pid:x}.{seq}.{i}");
            match spec.kind {
                Kind::Wan | Kind::Nat(_) => {
                    let port = tuns.len();
                    let wan_ip = Ipv4Addr::new(WAN.0[0], WAN.0[1], 0, port as u8 + 1);
                    // A NAT host's TUN is its router's.
                    let wan_ns = match spec.kind {
                        Kind::Nat(_) => new_ns(&mut bed, &format!("{}-nat", spec.name))?,
                        _ => ns.clone(),
                    };
                    let tun_name = dev("t");
                    let tun = open_tun(&tun_name)?;
                    ip(&["link", "set", &tun_name, "netns", &wan_ns])?;
                    let cidr = format!("{wan_ip}/{}", WAN.1);
                    ip(&["-n", &wan_ns, "addr", "add", &cidr, "dev", &tun_name])?;
                    ip(&["-n", &wan_ns, "link", "set", &tun_name, "up"])?;
                    tuns.push(tun);
                    by_ip.insert(wan_ip, port);
                    bed.ports.push(spec.name.clone());
                    let host_ip = match spec.kind {
                        Kind::Nat(nat) => nat_router(&wan_ns, &ns, &tun_name, &dev("v"), i, nat)?,
                        _ => wan_ip,
                    };
                    bed.hosts.insert(
                        spec.name.clone(),
                        Host {
                            ns,
                            ip: host_ip,
                            public_ip: (host_ip != wan_ip).then_some(wan_ip),
                            port: Some(port),
                        },
                    );
                }
                Kind::Lan => {
                    let bridge_ns = match &lan_ns {
                        Some(b) => b.clone(),
                        None => {
                            let b = new_ns(&mut bed, "lan")?;
                            ip(&["-n", &b, "link", "add", "br0", "type", "bridge"])?;
                            ip(&["-n", &b, "link", "set", "br0", "up"])?;
                            lan_ns = Some(b.clone());
                            b
                        }
                    };
                    let (a, b) = (dev("la"), dev("lb"));
                    ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
                    ip(&["link", "set", &a, "netns", &bridge_ns])?;
                    ip(&["-n", &bridge_ns, "link", "set", &a, "master", "br0"])?;
                    ip(&["-n", &bridge_ns, "link", "set", &a, "up"])?;
                    ip(&["link", "set", &b, "netns", &ns])?;
                    let host_ip = Ipv4Addr::new(LAN[0], LAN[1], LAN[2], i as u8 + 1);
                    ip(&[
                        "-n",
                        &ns,
                        "addr",
                        "add",
                        &format!("{host_ip}/24"),
                        "dev",
                        &b,
                    ])?;
                    ip(&["-n", &ns, "link", "set", &b, "multicast", "on", "up"])?;
                    ip(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", &b])?;
                    bed.hosts.insert(
                        spec.name.clone(),
                        Host {
                            ns,
                            ip: host_ip,
                            public_ip: None,
                            port: None,
                        },
                    );
                }
            }
        }
        let n = tuns.len();
        let mut table = vec![vec![self.default; n]; n];
        let mut no_udp = vec![vec![false; n]; n];
        for ((a, b), link) in &self.links {
            let (i, j) = (bed.host(a).port, bed.host(b).port);
            let (Some(i), Some(j)) = (i, j) else {
                bail!("link {a} - {b}: both must be WAN or NAT hosts");
            };
            table[i][j] = *link;
        }
        for (a, b) in &self.no_udp {
            let (i, j) = (bed.host(a).port, bed.host(b).port);
            let (Some(i), Some(j)) = (i, j) else {
                bail!("blocked UDP {a} - {b}: both must be WAN or NAT hosts");
            };
            no_udp[i][j] = true;
        }
        *bed.links.lock().unwrap_or_else(|p| p.into_inner()) = Links { table, no_udp };
        bed.counters = Arc::new(
            (0..n)
                .map(|_| (0..n).map(|_| LinkCounters::default()).collect())
                .collect(),
        );
        let switch = Switch {
            tuns,
            by_ip,
            links: bed.links.clone(),
            counters: bed.counters.clone(),
            stop: bed.stop.clone(),
            rng: StdRng::seed_from_u64(self.seed),
        };
        bed.switch = Some(
            std::thread::Builder::new()
                .name("netbed-switch".into())
                .spawn(move || switch.run())?,
        );
        Ok(bed)
    }
}

/// Joins a NAT host to its router: a veth pair on `192.168.(i+1).0/24`, a
/// default route through the router, forwarding, and masquerade out of
/// the router's TUN. Returns the host's private address.
fn nat_router(
    router: &str,
    host: &str,
    tun: &str,
    veth: &str,
    i: usize,
    nat: Nat,
) -> Result<Ipv4Addr> {
    let net = i as u8 + 1;
    let (r_ip, h_ip) = (
        Ipv4Addr::new(192, 168, net, 1),
        Ipv4Addr::new(192, 168, net, 2),
    );
    let (a, b) = (format!("{veth}a"), format!("{veth}b"));
    ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
    ip(&["link", "set", &a, "netns", router])?;
    ip(&["link", "set", &b, "netns", host])?;
    ip(&[
        "-n",
        router,
        "addr",
        "add",
        &format!("{r_ip}/24"),
        "dev",
        &a,
    ])?;
    ip(&["-n", router, "link", "set", &a, "up"])?;
    ip(&["-n", host, "addr", "add", &format!("{h_ip}/24"), "dev", &b])?;
    ip(&["-n", host, "link", "set", &b, "up"])?;
    ip(&[
        "-n",
        host,
        "route",
        "add",
        "default",
        "via",
        &r_ip.to_string(),
    ])?;
    sh_in_ns(router, "echo 1 > /proc/sys/net/ipv4/ip_forward")?;
    let how = match nat {
        Nat::Cone => "masquerade",
        Nat::Symmetric => "masquerade fully-random",
    };
    let rules = format!(
        "table ip nat {{\n chain post {{\n  type nat hook postrouting priority 100;\n  \
         oifname \"{tun}\" {how}\n }}\n}}\n\
         table ip filter {{\n chain forwarding {{\n  type filter hook forward priority 0; policy drop;\n  \
         ct state established,related accept\n  iifname \"{a}\" accept\n }}\n}}\n"
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", router, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running nft (install nftables)")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft in {router} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(h_ip)
}

/// `TUNSETIFF`: attach the open `/dev/net/tun` to a new device.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// The kernel's `struct ifreq`, as `TUNSETIFF` reads it: a name, the
/// flags, and padding to the union's size.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates TUN device `name` (in this process's namespace), non-blocking,
/// without packet information headers: each read is one IP packet.
fn open_tun(name: &str) -> Result<File> {
    if name.len() >= libc::IFNAMSIZ {
        bail!("device name {name} is too long");
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .context("opening /dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TUN | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `file` is an open descriptor of /dev/net/tun and `req` is a
    // live, properly laid out `struct ifreq` that TUNSETIFF reads and writes
    // for the duration of the call only.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
    if rc < 0 {
        bail!("TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    }
    Ok(file)
}

/// A packet waiting for its delivery time.
struct Held {
    at: Instant,
    seq: u64,
    to: usize,
    from: usize,
    packet: Vec<u8>,
}

impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    /// Earliest first in a max-heap.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// The userspace switch: reads every TUN, holds each packet for its link,
/// writes it to the destination's TUN.
struct Switch {
    tuns: Vec<File>,
    by_ip: HashMap<Ipv4Addr, usize>,
    links: Arc<Mutex<Links>>,
    counters: Arc<Vec<Vec<LinkCounters>>>,
    stop: Arc<AtomicBool>,
    rng: StdRng,
}

/// The most packets held at once (beyond it, new ones are dropped).
const MAX_HELD: usize = 1 << 16;

impl Switch {
    fn run(mut self) {
        let n = self.tuns.len();
        let mut held: BinaryHeap<Held> = BinaryHeap::new();
        // Per directed link: when its queue is free, and the last delivery.
        let mut busy_until = vec![vec![Instant::now(); n]; n];
        let mut last_at = vec![vec![Instant::now(); n]; n];
        let mut seq = 0u64;
        let mut buf = vec![0u8; 65536];
        let mut fds: Vec<libc::pollfd> = self
            .tuns
            .iter()
            .map(|f| libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        while !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            while held.peek().is_some_and(|h| h.at <= now) {
                let Some(h) = held.pop() else { break };
                let c = &self.counters[h.from][h.to];
                if (&self.tuns[h.to]).write(&h.packet).is_ok() {
                    c.delivered.fetch_add(1, Ordering::Relaxed);
                    c.bytes.fetch_add(h.packet.len() as u64, Ordering::Relaxed);
                } else {
                    c.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            let wait = held
                .peek()
                .map(|h| h.at.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_millis(50))
                .min(Duration::from_millis(50));
            let ts = libc::timespec {
                tv_sec: wait.as_secs() as libc::time_t,
                tv_nsec: wait.subsec_nanos() as libc::c_long,
            };
            for f in &mut fds {
                f.revents = 0;
            }
            // SAFETY: `fds` is a live array of `n` pollfd structs; the
            // timeout is a valid timespec; no signal mask is changed.
            let ready = unsafe {
                libc::ppoll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    &ts,
                    std::ptr::null(),
                )
            };
            if ready <= 0 {
                continue;
            }
            for from in 0..n {
                if fds[from].revents & libc::POLLIN == 0 {
                    continue;
                }
                // Drain what is queued on this port, a bounded batch at a time.
                for _ in 0..256 {
                    let len = match (&self.tuns[from]).read(&mut buf) {
                        Ok(len) if len > 0 => len,
                        _ => break,
                    };
                    let packet = &buf[..len];
                    // IPv4 only, with a destination on the WAN.
                    if len < 20 || packet[0] >> 4 != 4 {
                        continue;
                    }
                    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
                    let Some(&to) = self.by_ip.get(&dst) else {
                        continue;
                    };
                    let c = &self.counters[from][to];
                    let (link, blocked) = {
                        let l = self.links.lock().unwrap_or_else(|p| p.into_inner());
                        (l.table[from][to], l.no_udp[from][to])
                    };
                    if blocked && packet[9] == 17 {
                        c.udp_blocked.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if held.len() >= MAX_HELD
                        || (link.loss > 0.0 && self.rng.random::<f64>() < link.loss)
                    {
                        c.dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let now = Instant::now();
                    let mut depart = now;
                    if let Some(rate) = link.rate_bps.filter(|&r| r > 0) {
                        let start = busy_until[from][to].max(now);
                        if start - now > MAX_QUEUE_DELAY {
                            c.dropped.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        depart = start + Duration::from_secs_f64(len as f64 * 8.0 / rate as f64);
                        busy_until[from][to] = depart;
                    }
                    let jitter = if link.jitter.is_zero() {
                        Duration::ZERO
                    } else {
                        link.jitter.mul_f64(self.rng.random::<f64>())
                    };
                    let at = (depart + link.delay + jitter).max(last_at[from][to]);
                    last_at[from][to] = at;
                    seq += 1;
                    held.push(Held {
                        at,
                        seq,
                        to,
                        from,
                        packet: packet.to_vec(),
                    });
                }
            }
        }
    }
}
