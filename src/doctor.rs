//! `moeshard doctor`: checks a host before it joins a cluster and prints a pass/warn/fail table
//! (or JSON). Exits non-zero when any check fails.
//!
//! The checks are plain functions from what was measured to a [`Check`], so the thresholds are
//! tested without a machine to measure; `cmd_doctor` only gathers the measurements.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Result, anyhow, bail};
use clap::Args;
use moeshard_coordinator::serve::client;
use moeshard_coordinator::serve::host::{HostMemory, memory};
use moeshard_proto::auth::ClusterKey;
use moeshard_proto::{PROTOCOL_VERSION, Transport};
use serde::Serialize;

#[derive(Args)]
pub(crate) struct DoctorArgs {
    /// The checkpoint this host will serve: its weight files must be readable, and the model's
    /// size is checked against memory and disk.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Bytes the model needs on disk, when it is not here yet (checked against the free space of
    /// --dir).
    #[arg(long, conflicts_with = "model")]
    model_bytes: Option<u64>,
    /// Where the model will be stored (default: the current directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Bytes of experts this host will offer as a worker (checked against its memory).
    #[arg(long)]
    capacity: Option<u64>,
    /// The coordinator's HTTP address (`host:port` of `moeshard serve`): asked for /health, and
    /// its clock compared with ours.
    #[arg(long)]
    coordinator: Option<String>,
    /// Workers to reach (comma-separated host:port): connect and say hello.
    #[arg(long, value_delimiter = ',')]
    workers: Vec<String>,
    /// Wire transport of the workers.
    #[arg(long, default_value = "grpc", value_parser = ["grpc", "quic"])]
    transport: String,
    /// The address this host's worker will listen on: checks it can be bound.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// The cluster key file: must exist, be readable by this user only, and hold a key.
    #[arg(long)]
    cluster_key_file: Option<PathBuf>,
    /// Seconds to wait for each remote host.
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
    /// Check only the coordinator and workers named (no CPU, memory, disk or clock checks): a
    /// liveness probe for containers.
    #[arg(long)]
    only_peers: bool,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Status {
    Pass,
    Warn,
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
}

fn check(name: impl Into<String>, status: Status, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        status,
        detail: detail.into(),
    }
}

fn gib(b: u64) -> String {
    let (div, unit) = match b {
        b if b >= 1 << 30 => (1u64 << 30, "GiB"),
        b if b >= 1 << 20 => (1 << 20, "MiB"),
        _ => (1 << 10, "KiB"),
    };
    format!("{:.1} {unit}", b as f64 / div as f64)
}

/// The kernel paths this CPU runs and the one the engine will use.
pub(crate) fn check_cpu(available: &[&str], best: &str, arch: &str, threads: usize) -> Check {
    let detail = format!(
        "{arch}, {threads} threads; kernels: {best} (available: {})",
        available.join(", ")
    );
    match (arch, best) {
        (_, "Avx512") | (_, "Avx2") | (_, "Neon") => check("cpu", Status::Pass, detail),
        ("x86_64", _) => check(
            "cpu",
            Status::Warn,
            format!("{detail}; no AVX2+FMA+F16C: the scalar kernels are several times slower"),
        ),
        _ => check(
            "cpu",
            Status::Warn,
            format!("{detail}; no SIMD path for this CPU: scalar kernels"),
        ),
    }
}

/// Memory against what this host will hold (`need`: the capacity offered, else the model).
pub(crate) fn check_memory(mem: Option<HostMemory>, need: Option<(u64, &str)>) -> Check {
    let Some(m) = mem else {
        return check(
            "memory",
            Status::Warn,
            "cannot read this host's memory (/proc/meminfo)",
        );
    };
    let base = format!(
        "{} total, {} available",
        gib(m.total_bytes),
        gib(m.available_bytes)
    );
    const MIN_AVAILABLE: u64 = 512 << 20;
    if m.available_bytes < MIN_AVAILABLE {
        return check(
            "memory",
            Status::Fail,
            format!("{base}: less than 512 MiB available"),
        );
    }
    match need {
        Some((need, what)) if need > m.total_bytes => check(
            "memory",
            Status::Fail,
            format!(
                "{base}: {what} is {}, more than this host's memory",
                gib(need)
            ),
        ),
        Some((need, what)) if need > m.available_bytes => check(
            "memory",
            Status::Warn,
            format!(
                "{base}: {what} is {}; the weights are memory-mapped, so what does not fit \
                 is read from disk again (slow)",
                gib(need)
            ),
        ),
        Some((need, what)) => check(
            "memory",
            Status::Pass,
            format!("{base}; {what} is {}", gib(need)),
        ),
        None => check("memory", Status::Pass, base),
    }
}

/// Free disk space where the model will be, against its size when it is not there yet.
pub(crate) fn check_disk(free: Option<u64>, dir: &Path, missing_bytes: Option<u64>) -> Check {
    let Some(free) = free else {
        return check(
            "disk",
            Status::Warn,
            format!("cannot read the free space of {}", dir.display()),
        );
    };
    let base = format!("{} free in {}", gib(free), dir.display());
    match missing_bytes {
        Some(need) if need > free => check(
            "disk",
            Status::Fail,
            format!("{base}: the model needs {}", gib(need)),
        ),
        Some(need) if need.saturating_add(need / 10) > free => check(
            "disk",
            Status::Warn,
            format!(
                "{base}: the model needs {}, less than 10% to spare",
                gib(need)
            ),
        ),
        Some(need) => check(
            "disk",
            Status::Pass,
            format!("{base}; the model needs {}", gib(need)),
        ),
        None => check("disk", Status::Pass, base),
    }
}

/// The system clock, and its offset from the coordinator's when that is known.
pub(crate) fn check_clock(now_unix: u64, skew_s: Option<f64>) -> Check {
    // 2024-01-01 and 2100-01-01.
    const EARLIEST: u64 = 1_704_067_200;
    const LATEST: u64 = 4_102_444_800;
    if !(EARLIEST..LATEST).contains(&now_unix) {
        return check(
            "clock",
            Status::Fail,
            format!(
                "the system clock says {now_unix} s since 1970, which cannot be right: \
                 set it (NTP) before joining"
            ),
        );
    }
    match skew_s {
        None => check(
            "clock",
            Status::Pass,
            "system clock plausible (no coordinator to compare with)",
        ),
        Some(s) if s.abs() > 60.0 => check(
            "clock",
            Status::Fail,
            format!("{s:+.0} s off the coordinator's clock: logs and certificates will disagree"),
        ),
        Some(s) if s.abs() > 2.0 => check(
            "clock",
            Status::Warn,
            format!("{s:+.0} s off the coordinator's clock (run NTP)"),
        ),
        Some(s) => check(
            "clock",
            Status::Pass,
            format!(
                "within {:.0} s of the coordinator's clock",
                s.abs().max(1.0)
            ),
        ),
    }
}

/// Least key material a cluster key file must hold.
pub(crate) const MIN_KEY_BYTES: usize = 32;
/// Largest cluster key file read.
pub(crate) const MAX_KEY_FILE_BYTES: u64 = 64 << 10;

/// The cluster key file: present, a file, private, readable, long enough.
pub(crate) fn check_key_file(path: &Path) -> Check {
    let name = "cluster key";
    let shown = path.display();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return check(name, Status::Fail, format!("{shown}: {e}")),
    };
    if !meta.is_file() {
        return check(name, Status::Fail, format!("{shown} is not a regular file"));
    }
    if meta.len() > MAX_KEY_FILE_BYTES {
        return check(
            name,
            Status::Fail,
            format!(
                "{shown} is {} bytes; a key file is at most {MAX_KEY_FILE_BYTES}",
                meta.len()
            ),
        );
    }
    let mut text = Vec::new();
    if let Err(e) = std::fs::File::open(path).and_then(|f| {
        f.take(MAX_KEY_FILE_BYTES + 1)
            .read_to_end(&mut text)
            .map(|_| ())
    }) {
        return check(name, Status::Fail, format!("cannot read {shown}: {e}"));
    }
    let key_len = text.trim_ascii().len();
    if key_len < MIN_KEY_BYTES {
        return check(
            name,
            Status::Fail,
            format!(
                "{shown} holds {key_len} bytes of key; at least {MIN_KEY_BYTES} are needed \
                 (e.g. `head -c 32 /dev/urandom | base64 > FILE`)"
            ),
        );
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            return check(
                name,
                Status::Fail,
                format!("{shown} is readable by every user (mode {mode:o}): chmod 600 it"),
            );
        }
        if mode & 0o070 != 0 {
            return check(
                name,
                Status::Warn,
                format!("{shown} is open to its group (mode {mode:o}): chmod 600 it"),
            );
        }
        check(
            name,
            Status::Pass,
            format!("{shown}: {key_len} bytes of key, mode {mode:o}"),
        )
    }
    #[cfg(not(unix))]
    check(
        name,
        Status::Pass,
        format!("{shown}: {key_len} bytes of key"),
    )
}

/// Weight files of a checkpoint directory (or the file itself), with their sizes; each must be
/// readable.
fn model_files(model: &Path) -> Result<Vec<(PathBuf, u64)>> {
    let files: Vec<PathBuf> = if model.is_file() {
        vec![model.to_path_buf()]
    } else {
        let mut v: Vec<PathBuf> = std::fs::read_dir(model)
            .map_err(|e| anyhow!("cannot list {}: {e}", model.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|x| x == "safetensors" || x == "gguf")
            })
            .collect();
        v.sort();
        v
    };
    if files.is_empty() {
        bail!("no *.safetensors or *.gguf file in {}", model.display());
    }
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let mut head = [0u8; 8];
        std::fs::File::open(&f)
            .and_then(|mut h| h.read_exact(&mut head))
            .map_err(|e| anyhow!("cannot read {}: {e}", f.display()))?;
        let len = std::fs::metadata(&f)
            .map_err(|e| anyhow!("{}: {e}", f.display()))?
            .len();
        out.push((f, len));
    }
    Ok(out)
}

/// Free bytes of the file system holding `dir` (`None` when it cannot be asked).
fn free_bytes(dir: &Path) -> Option<u64> {
    // `df -P -k` is POSIX and avoids an unsafe statvfs call.
    let out = std::process::Command::new("df")
        .args(["-P", "-k"])
        .arg(dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().nth(1)?;
    let kb: u64 = line.split_whitespace().nth(3)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Parses an HTTP `Date` header (IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`) to Unix seconds.
pub(crate) fn parse_http_date(s: &str) -> Option<u64> {
    let mut it = s.split_whitespace().skip(1);
    let day: u64 = it.next()?.parse().ok()?;
    let month = match it.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = it.next()?.parse().ok()?;
    let mut hms = it.next()?.split(':').map(|x| x.parse::<u64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if it.next()? != "GMT" || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    // Days from 1970-01-01 to the civil date (proleptic Gregorian).
    let (y, mo) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * mo as i64 + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days)
        .ok()
        .map(|d| d * 86_400 + h * 3600 + m * 60 + sec)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Asks the coordinator's /health; returns the check and the clock offset (coordinator minus
/// ours, seconds) from its Date header.
fn check_coordinator(addr: &str, timeout: Duration) -> (Check, Option<f64>) {
    let name = format!("coordinator {addr}");
    let before = now_unix();
    match client::get(addr, "/health", timeout) {
        Ok(r) => {
            let skew = r
                .header("date")
                .and_then(parse_http_date)
                .map(|t| t as f64 - (before as f64 + now_unix() as f64) / 2.0);
            let status = r.status;
            let body = r.text().unwrap_or_default();
            if status == 200 {
                (
                    check(name, Status::Pass, format!("/health: {}", body.trim())),
                    skew,
                )
            } else {
                (
                    check(
                        name,
                        Status::Fail,
                        format!("/health answered {status}: {}", body.trim()),
                    ),
                    skew,
                )
            }
        }
        Err(e) => (
            check(name, Status::Fail, format!("cannot reach it: {e}")),
            None,
        ),
    }
}

/// The listening address can be bound (TCP for gRPC, UDP for QUIC).
fn check_listen(addr: SocketAddr, transport: Transport) -> Check {
    let name = format!("listen {addr}");
    let r = match transport {
        Transport::Grpc => TcpListener::bind(addr).map(drop),
        Transport::Quic => UdpSocket::bind(addr).map(drop),
    };
    match r {
        Ok(()) => check(
            name,
            Status::Pass,
            format!("{} port can be bound", transport.name()),
        ),
        Err(e) => check(name, Status::Fail, format!("cannot bind: {e}")),
    }
}

/// Says hello to each worker.
fn check_workers(
    workers: &[String],
    transport: Transport,
    timeout: Duration,
    fingerprint: Option<&str>,
    key: Option<&ClusterKey>,
) -> Vec<Check> {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            return vec![check(
                "workers",
                Status::Fail,
                format!("cannot start a runtime: {e}"),
            )];
        }
    };
    let id = format!("doctor/pid{}", std::process::id());
    workers
        .iter()
        .map(|addr| {
            let name = format!("worker {addr}");
            let started = std::time::Instant::now();
            match runtime.block_on(moeshard_coordinator::probe_worker_with_key(
                addr, transport, timeout, &id, key,
            )) {
                Err(e) => check(name, Status::Fail, e.to_string()),
                Ok(h) if h.protocol_version != PROTOCOL_VERSION => check(
                    name,
                    Status::Fail,
                    format!(
                        "speaks protocol {}, this binary {PROTOCOL_VERSION}",
                        h.protocol_version
                    ),
                ),
                Ok(h) if fingerprint.is_some_and(|f| f != h.model_fingerprint) => check(
                    name,
                    Status::Fail,
                    format!(
                        "serves another model (fingerprint {}, --model has {})",
                        h.model_fingerprint,
                        fingerprint.unwrap_or_default()
                    ),
                ),
                Ok(h) => check(
                    name,
                    Status::Pass,
                    format!(
                        "hello over {} in {:.1} ms: {} offers {}",
                        transport.name(),
                        started.elapsed().as_secs_f64() * 1e3,
                        h.worker_id,
                        gib(h.capacity_bytes)
                    ),
                ),
            }
        })
        .collect()
}

/// Runs every check the arguments ask for.
pub(crate) fn run_checks(a: &DoctorArgs) -> Result<Vec<Check>> {
    let timeout = Duration::try_from_secs_f64(a.timeout)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| anyhow!("--timeout must be a positive number of seconds"))?;
    let transport: Transport = a.transport.parse().map_err(|e: String| anyhow!(e))?;
    let mut checks = Vec::new();
    // The workers are probed with the cluster key when one is given, as the coordinator would
    // reach them. A key that cannot be read is reported by the key check below (or here, when
    // --only-peers skips that check).
    let (key, key_err) = match &a.cluster_key_file {
        Some(p) if !a.workers.is_empty() => match ClusterKey::from_file(p) {
            Ok(k) => (Some(k), None),
            Err(e) => (None, Some(e)),
        },
        _ => (None, None),
    };
    if a.only_peers {
        if a.coordinator.is_none() && a.workers.is_empty() {
            bail!("--only-peers needs --coordinator or --workers");
        }
        if let Some(c) = &a.coordinator {
            checks.push(check_coordinator(c, timeout).0);
        }
        if let Some(e) = key_err {
            checks.push(check(
                "cluster key",
                Status::Fail,
                format!("cannot prove it to the workers: {e}"),
            ));
        }
        checks.extend(check_workers(
            &a.workers,
            transport,
            timeout,
            None,
            key.as_ref(),
        ));
        return Ok(checks);
    }

    let available: Vec<String> = moeshard_engine::kernels::available_paths()
        .iter()
        .map(|p| format!("{p:?}"))
        .collect();
    let available: Vec<&str> = available.iter().map(String::as_str).collect();
    let best = format!("{:?}", moeshard_engine::kernels::best_path());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    checks.push(check_cpu(
        &available,
        &best,
        std::env::consts::ARCH,
        threads,
    ));

    let mut model_bytes = a.model_bytes;
    let mut fingerprint = None;
    if let Some(model) = &a.model {
        match model_files(model) {
            Ok(files) => {
                let total: u64 = files.iter().map(|(_, n)| n).sum();
                model_bytes = Some(total);
                checks.push(check(
                    "model",
                    Status::Pass,
                    format!(
                        "{}: {} weight files, {}, readable",
                        model.display(),
                        files.len(),
                        gib(total)
                    ),
                ));
                if !a.workers.is_empty() {
                    fingerprint = moeshard_engine::safetensors::Checkpoint::open(model)
                        .ok()
                        .and_then(|c| {
                            moeshard_engine::fingerprint::model_fingerprint(model, &c).ok()
                        });
                }
            }
            Err(e) => checks.push(check("model", Status::Fail, e.to_string())),
        }
    }
    let need = match (a.capacity, model_bytes) {
        (Some(c), _) => Some((c, "the capacity offered")),
        (None, Some(m)) => Some((m, "the model")),
        (None, None) => None,
    };
    checks.push(check_memory(memory(), need));
    let dir = a
        .dir
        .clone()
        .or_else(|| a.model.clone())
        .unwrap_or_else(|| PathBuf::from("."));
    // The model is already on disk when --model names it; only --model-bytes asks for space.
    checks.push(check_disk(free_bytes(&dir), &dir, a.model_bytes));

    let mut skew = None;
    if let Some(c) = &a.coordinator {
        let (c, s) = check_coordinator(c, timeout);
        checks.push(c);
        skew = s;
    }
    checks.push(check_clock(now_unix(), skew));
    if let Some(l) = a.listen {
        checks.push(check_listen(l, transport));
    }
    checks.extend(check_workers(
        &a.workers,
        transport,
        timeout,
        fingerprint.as_deref(),
        key.as_ref(),
    ));
    if let Some(k) = &a.cluster_key_file {
        checks.push(check_key_file(k));
    }
    Ok(checks)
}

/// The report as a table.
pub(crate) fn table(checks: &[Check]) -> String {
    let w = checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut s = format!("{:<w$}  STATUS  DETAIL\n", "CHECK");
    for c in checks {
        s.push_str(&format!(
            "{:<w$}  {:<6}  {}\n",
            c.name,
            c.status.label(),
            c.detail
        ));
    }
    let n = |st| checks.iter().filter(|c| c.status == st).count();
    s.push_str(&format!(
        "{} passed, {} warnings, {} failed\n",
        n(Status::Pass),
        n(Status::Warn),
        n(Status::Fail)
    ));
    s
}

/// `moeshard doctor`.
pub(crate) fn cmd_doctor(a: DoctorArgs) -> Result<()> {
    let checks = run_checks(&a)?;
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    let text = if a.json {
        let n = |st| checks.iter().filter(|c| c.status == st).count();
        serde_json::to_string_pretty(&serde_json::json!({
            "checks": checks,
            "pass": n(Status::Pass),
            "warn": n(Status::Warn),
            "fail": failed,
        }))? + "\n"
    } else {
        table(&checks)
    };
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()?;
    }
    if failed > 0 {
        bail!("{failed} of {} checks failed", checks.len());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cpu_paths() {
        assert_eq!(
            check_cpu(&["Scalar", "Avx2"], "Avx2", "x86_64", 8).status,
            Status::Pass
        );
        assert_eq!(
            check_cpu(&["Scalar"], "Scalar", "x86_64", 8).status,
            Status::Warn
        );
        assert_eq!(
            check_cpu(&["Scalar", "Neon"], "Neon", "aarch64", 8).status,
            Status::Pass
        );
    }

    #[test]
    fn memory_thresholds() {
        let m = |total: u64, avail: u64| {
            Some(HostMemory {
                total_bytes: total << 30,
                available_bytes: avail << 30,
                process_rss_bytes: None,
            })
        };
        assert_eq!(
            check_memory(m(64, 60), Some((40 << 30, "x"))).status,
            Status::Pass
        );
        assert_eq!(
            check_memory(m(64, 30), Some((40 << 30, "x"))).status,
            Status::Warn
        );
        assert_eq!(
            check_memory(m(32, 30), Some((40 << 30, "x"))).status,
            Status::Fail
        );
        assert_eq!(check_memory(m(32, 0), None).status, Status::Fail);
        assert_eq!(check_memory(None, None).status, Status::Warn);
    }

    #[test]
    fn disk_thresholds() {
        let d = Path::new("/m");
        assert_eq!(check_disk(Some(100), d, Some(101)).status, Status::Fail);
        assert_eq!(check_disk(Some(105), d, Some(100)).status, Status::Warn);
        assert_eq!(check_disk(Some(200), d, Some(100)).status, Status::Pass);
        assert_eq!(check_disk(Some(1), d, None).status, Status::Pass);
        assert_eq!(check_disk(None, d, Some(1)).status, Status::Warn);
    }

    #[test]
    fn clock_checks() {
        let now = 1_800_000_000;
        assert_eq!(check_clock(now, None).status, Status::Pass);
        assert_eq!(check_clock(0, None).status, Status::Fail);
        assert_eq!(check_clock(now, Some(0.5)).status, Status::Pass);
        assert_eq!(check_clock(now, Some(-10.0)).status, Status::Warn);
        assert_eq!(check_clock(now, Some(600.0)).status, Status::Fail);
    }

    #[test]
    fn http_dates() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(
            parse_http_date("Thu, 26 Nov 2026 12:00:00 GMT"),
            Some(1_795_694_400)
        );
        assert_eq!(parse_http_date("Thu, 26 Foo 2026 12:00:00 GMT"), None);
        assert_eq!(parse_http_date("garbage"), None);
        assert_eq!(parse_http_date("Thu, 26 Nov 2026 25:00:00 GMT"), None);
    }

    #[test]
    fn table_lists_every_check() {
        let t = table(&[
            check("cpu", Status::Pass, "ok"),
            check("cluster key", Status::Fail, "missing"),
        ]);
        assert!(t.contains("cluster key  FAIL    missing"), "{t}");
        assert!(t.ends_with("1 passed, 0 warnings, 1 failed\n"), "{t}");
    }
}
