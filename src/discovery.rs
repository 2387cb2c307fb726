//! Finding workers on the local network by mDNS (DNS-SD over multicast, RFC 6762/6763).
//!
//! `moeshard worker --join auto` announces `_moeshard._udp.local.` with its port and a TXT record
//! naming its transport and protocol version. `moeshard serve --discover` browses for that
//! service and admits every worker it resolves through the same connect + hello as a `--workers`
//! entry (so the same model check, and the same authentication once the wire has it). Admission
//! re-places the experts over the new set of workers while the server runs; a worker that says
//! goodbye (its announcement is withdrawn), or stops answering health checks, is removed and its
//! experts re-placed on the others. An announcement proves nothing by itself: only the hello
//! that follows decides.
//!
//! The pure part (which announced address to dial, when a failing worker is dropped) is plain
//! functions; the thread around it is thin.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};
use moeshard_coordinator::ClusterMembership;
use moeshard_proto::{PROTOCOL_VERSION, Transport};
use tracing::{debug, info, warn};

/// The DNS-SD service type of moeshard workers.
pub(crate) const SERVICE: &str = "_moeshard._udp.local.";

/// The mDNS port: 5353, or `MOESHARD_MDNS_PORT` (tests on a shared host use their own port so
/// they meet neither each other nor a system responder).
fn mdns_port() -> u16 {
    std::env::var("MOESHARD_MDNS_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(5353)
}

fn daemon() -> Result<ServiceDaemon> {
    ServiceDaemon::new_with_port(mdns_port()).map_err(|e| anyhow!("cannot start mDNS: {e}"))
}

/// A worker's announcement; withdrawn (with a goodbye packet) when dropped.
pub(crate) struct Announcement {
    daemon: ServiceDaemon,
    fullname: String,
}

fn host_label() -> String {
    let raw = std::fs::read_to_string("/etc/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "host".into());
    let label: String = raw
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(30)
        .collect();
    if label.is_empty() {
        "host".into()
    } else {
        label
    }
}

/// Announces the worker listening on `addr`. An unspecified address (0.0.0.0) announces every
/// address of the host, and follows them as they change.
pub(crate) fn announce(addr: SocketAddr, transport: Transport) -> Result<Announcement> {
    let daemon = daemon()?;
    let label = host_label();
    let instance = format!("moeshard-{label}-{}-{}", addr.port(), std::process::id());
    // A host name of its own: workers sharing one (containers of one image, namespaces of one
    // machine) would share its address records, and one's goodbye would withdraw the other's.
    let host = format!("{instance}.local.");
    let version = PROTOCOL_VERSION.to_string();
    let props = [("transport", transport.name()), ("proto", version.as_str())];
    let info = if addr.ip().is_unspecified() {
        ServiceInfo::new(SERVICE, &instance, &host, "", addr.port(), &props[..])
            .map(ServiceInfo::enable_addr_auto)
    } else {
        ServiceInfo::new(
            SERVICE,
            &instance,
            &host,
            addr.ip(),
            addr.port(),
            &props[..],
        )
    }
    .map_err(|e| anyhow!("cannot describe the mDNS service: {e}"))?;
    let fullname = info.get_fullname().to_string();
    daemon
        .register(info)
        .map_err(|e| anyhow!("cannot announce {fullname} by mDNS: {e}"))?;
    info!(%fullname, %addr, "announced by mDNS");
    Ok(Announcement { daemon, fullname })
}

impl Drop for Announcement {
    fn drop(&mut self) {
        // Wait briefly for the goodbye to be sent, so coordinators drop us at once rather than
        // at their next failed health check.
        if let Ok(rx) = self.daemon.unregister(&self.fullname) {
            let _ = rx.recv_timeout(Duration::from_secs(2));
        }
        if let Ok(rx) = self.daemon.shutdown() {
            let _ = rx.recv_timeout(Duration::from_secs(1));
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    info!("signal received: withdrawing the announcement");
}

/// The address to dial among those a worker announced: IPv4 before IPv6, others' before
/// loopback (a loopback address only reaches a worker on this very host).
pub(crate) fn pick_addr(addrs: &[IpAddr], port: u16) -> Option<SocketAddr> {
    // Link-local IPv6 addresses need the interface's scope, which an address string drops.
    let link_local =
        |ip: &IpAddr| matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
    let mut v: Vec<IpAddr> = addrs.iter().copied().filter(|ip| !link_local(ip)).collect();
    v.sort_by_key(|ip| (ip.is_loopback(), ip.is_ipv6(), *ip));
    v.first().map(|&ip| SocketAddr::new(ip, port))
}

/// What the browser learned about one announced worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Announced {
    /// The DNS-SD instance name.
    pub fullname: String,
    /// Where to dial it.
    pub addr: SocketAddr,
}

/// Reads a resolved service: `None` when it is not a worker of our transport and protocol.
fn announced(
    fullname: &str,
    addrs: &[IpAddr],
    port: u16,
    transport: Option<&str>,
    proto: Option<&str>,
    ours: Transport,
) -> Option<Announced> {
    if transport != Some(ours.name()) {
        debug!(
            fullname,
            ?transport,
            "ignoring a worker of another transport"
        );
        return None;
    }
    if proto != Some(PROTOCOL_VERSION.to_string().as_str()) {
        debug!(
            fullname,
            ?proto,
            "ignoring a worker of another protocol version"
        );
        return None;
    }
    Some(Announced {
        fullname: fullname.to_string(),
        addr: pick_addr(addrs, port)?,
    })
}

/// Browses for workers.
pub(crate) struct Browser {
    daemon: ServiceDaemon,
    events: mdns_sd::Receiver<ServiceEvent>,
    transport: Transport,
}

/// A change the browser saw.
#[derive(Debug)]
pub(crate) enum Change {
    Up(Announced),
    Down(String),
}

impl Browser {
    pub(crate) fn start(transport: Transport) -> Result<Self> {
        let daemon = daemon()?;
        let events = daemon
            .browse(SERVICE)
            .map_err(|e| anyhow!("cannot browse mDNS for {SERVICE}: {e}"))?;
        Ok(Browser {
            daemon,
            events,
            transport,
        })
    }

    /// The next change within `wait`.
    pub(crate) fn next(&self, wait: Duration) -> Option<Change> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = self.events.recv_timeout(left).ok()?;
            match ev {
                ServiceEvent::ServiceResolved(s) => {
                    let addrs: Vec<IpAddr> = s.addresses.iter().map(|a| a.to_ip_addr()).collect();
                    let found = announced(
                        &s.fullname,
                        &addrs,
                        s.port,
                        s.txt_properties.get_property_val_str("transport"),
                        s.txt_properties.get_property_val_str("proto"),
                        self.transport,
                    );
                    if let Some(a) = found {
                        return Some(Change::Up(a));
                    }
                }
                ServiceEvent::ServiceRemoved(_, fullname) => return Some(Change::Down(fullname)),
                _ => {}
            }
        }
    }

    /// Collects announced workers for up to `wait`, returning early once `want` are known.
    pub(crate) fn collect(&self, wait: Duration, want: usize) -> Vec<Announced> {
        let deadline = Instant::now() + wait;
        let mut found: BTreeMap<String, Announced> = BTreeMap::new();
        while found.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.next(left) {
                Some(Change::Up(a)) => {
                    found.insert(a.fullname.clone(), a);
                }
                Some(Change::Down(name)) => {
                    found.remove(&name);
                }
                None => break,
            }
        }
        found.into_values().collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Ok(rx) = self.daemon.shutdown() {
            let _ = rx.recv_timeout(Duration::from_secs(1));
        }
    }
}

/// Consecutive failed health checks after which a worker is removed.
pub(crate) const FAILURES_TO_REMOVE: u32 = 2;

/// Counts failed health checks; says which workers to remove now.
#[derive(Debug, Default)]
pub(crate) struct Strikes {
    failures: BTreeMap<String, u32>,
}

impl Strikes {
    /// Takes one round of health results; returns the workers that just reached the limit.
    pub(crate) fn round(&mut self, results: &[(String, Result<(), String>)]) -> Vec<String> {
        let present: BTreeSet<&String> = results.iter().map(|(a, _)| a).collect();
        self.failures.retain(|a, _| present.contains(a));
        let mut out = Vec::new();
        for (addr, r) in results {
            match r {
                Ok(()) => {
                    self.failures.remove(addr);
                }
                Err(_) => {
                    let n = self.failures.entry(addr.clone()).or_default();
                    *n += 1;
                    if *n == FAILURES_TO_REMOVE {
                        out.push(addr.clone());
                    }
                }
            }
        }
        out
    }
}

/// The thread that keeps the cluster's workers in step with the network: admits announced
/// workers, removes those that leave or fail their health checks. Stops when dropped.
pub(crate) struct Discovery {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How often the members are asked whether they are alive.
const HEALTH_EVERY: Duration = Duration::from_secs(2);
/// How long a health check may take.
const HEALTH_DEADLINE: Duration = Duration::from_secs(2);
/// Most announced workers remembered (a bound against a flood of announcements).
const MAX_KNOWN: usize = 4096;

impl Discovery {
    pub(crate) fn start(
        browser: Browser,
        membership: ClusterMembership,
        known: Vec<Announced>,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("moeshard-discovery".into())
                .spawn(move || run(browser, membership, known, &stop))
                .context("starting the discovery thread")?
        };
        Ok(Discovery {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(browser: Browser, m: ClusterMembership, known: Vec<Announced>, stop: &AtomicBool) {
    // fullname -> address, of the workers seen announced.
    let mut names: BTreeMap<String, SocketAddr> =
        known.into_iter().map(|a| (a.fullname, a.addr)).collect();
    let mut strikes = Strikes::default();
    let mut next_health = Instant::now() + HEALTH_EVERY;
    while !stop.load(Ordering::Relaxed) {
        match browser.next(Duration::from_millis(250)) {
            Some(Change::Up(a)) => {
                if names.len() >= MAX_KNOWN && !names.contains_key(&a.fullname) {
                    warn!(fullname = %a.fullname, "too many announced workers; ignoring");
                    continue;
                }
                names.insert(a.fullname.clone(), a.addr);
                let addr = a.addr.to_string();
                match m.admit(&addr) {
                    Ok(true) => info!(worker = %addr, "discovered worker joined"),
                    Ok(false) => {}
                    Err(e) => warn!(worker = %addr, "not admitted: {e}"),
                }
            }
            Some(Change::Down(fullname)) => {
                if let Some(addr) = names.remove(&fullname) {
                    let addr = addr.to_string();
                    match m.remove(&addr) {
                        Ok(true) => info!(worker = %addr, "worker left (mDNS goodbye)"),
                        Ok(false) => {}
                        Err(e) => warn!(worker = %addr, "cannot remove: {e}"),
                    }
                }
            }
            None => {}
        }
        if Instant::now() >= next_health {
            next_health = Instant::now() + HEALTH_EVERY;
            let results = m.health(HEALTH_DEADLINE);
            for addr in strikes.round(&results) {
                match m.remove(&addr) {
                    Ok(true) => warn!(worker = %addr, "worker removed: it stopped answering"),
                    Ok(false) => {}
                    Err(e) => warn!(worker = %addr, "cannot remove an unanswering worker: {e}"),
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn picks_a_reachable_address() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let got = pick_addr(&[ip("127.0.0.1"), ip("fe80::1"), ip("10.0.0.7")], 7000);
        assert_eq!(got, Some("10.0.0.7:7000".parse().unwrap()));
        let got = pick_addr(&[ip("127.0.0.1")], 7000);
        assert_eq!(got, Some("127.0.0.1:7000".parse().unwrap()));
        assert_eq!(pick_addr(&[], 7000), None);
        // Link-local IPv6 alone is not dialable.
        assert_eq!(pick_addr(&[ip("fe80::1")], 7000), None);
        assert_eq!(
            pick_addr(&[ip("fe80::1"), ip("fd00::2")], 7000),
            Some("[fd00::2]:7000".parse().unwrap())
        );
    }

    #[test]
    fn reads_only_our_workers() {
        let ip = ["10.0.0.2".parse().unwrap()];
        let v = PROTOCOL_VERSION.to_string();
        let ok = announced("w", &ip, 7, Some("quic"), Some(&v), Transport::Quic);
        assert_eq!(ok.map(|a| a.addr.to_string()), Some("10.0.0.2:7".into()));
        assert!(announced("w", &ip, 7, Some("grpc"), Some(&v), Transport::Quic).is_none());
        assert!(announced("w", &ip, 7, Some("quic"), Some("999"), Transport::Quic).is_none());
        assert!(announced("w", &ip, 7, None, Some(&v), Transport::Quic).is_none());
        assert!(announced("w", &[], 7, Some("quic"), Some(&v), Transport::Quic).is_none());
    }

    #[test]
    fn removes_after_consecutive_failures_only() {
        let mut s = Strikes::default();
        let ok = |a: &str| (a.to_string(), Ok(()));
        let bad = |a: &str| (a.to_string(), Err("down".to_string()));
        assert!(s.round(&[bad("a"), ok("b")]).is_empty());
        // A success in between starts the count again.
        assert!(s.round(&[ok("a"), ok("b")]).is_empty());
        assert!(s.round(&[bad("a"), ok("b")]).is_empty());
        assert_eq!(s.round(&[bad("a"), bad("b")]), vec!["a".to_string()]);
        // Reported once, not at every later round.
        assert!(s.round(&[bad("a"), ok("b")]).is_empty());
        // Workers no longer members are forgotten.
        assert!(s.round(&[ok("b")]).is_empty());
        assert!(s.failures.is_empty());
    }
}
