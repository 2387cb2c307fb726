//! Worker processes started on loopback for one run (`--local-workers N`).
//!
//! Each is `EXE worker --model DIR --listen 127.0.0.1:0 --exit-with-parent`: it prints its address
//! line on stdout, which is read here, and exits when its stdin (a pipe held by this process)
//! reaches end of file. So the workers go away when [`LocalWorkers`] is dropped (they are killed)
//! and also when this process dies any other way, Ctrl-C and SIGKILL included (the pipe closes).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use moeshard_proto::auth::ClusterKey;
use moeshard_proto::{Transport, parse_listening_line};
use tracing::{info, warn};

use crate::{CoordinatorError, Result};

/// How to start local workers.
#[derive(Clone, Debug)]
pub struct LocalWorkersConfig {
    /// The `moeshard` binary (usually `std::env::current_exe()`).
    pub exe: PathBuf,
    /// The model directory every worker serves.
    pub model: PathBuf,
    /// The wire.
    pub transport: Transport,
    /// One entry per worker: the capacity it offers (`None`: the default, every expert).
    pub capacities: Vec<Option<u64>>,
    /// How long a worker may take to print its address.
    pub startup_timeout: Duration,
    /// Send the workers' stderr (their logs) to /dev/null instead of this process's stderr.
    pub quiet: bool,
    /// More arguments for every worker's command line (e.g. `--synthetic`).
    pub extra_args: Vec<String>,
    /// A cluster key file the workers require of their peers (`--cluster-key-file`).
    pub cluster_key_file: Option<PathBuf>,
    /// Delete `cluster_key_file` once the workers have read it (a generated key).
    delete_key_file: bool,
}

impl LocalWorkersConfig {
    /// `n` workers with default capacities.
    pub fn new(exe: PathBuf, model: PathBuf, transport: Transport, n: usize) -> Self {
        LocalWorkersConfig {
            exe,
            model,
            transport,
            capacities: vec![None; n],
            startup_timeout: Duration::from_secs(30),
            quiet: false,
            extra_args: Vec::new(),
            cluster_key_file: None,
            delete_key_file: false,
        }
    }

    /// Makes a fresh random cluster key for these workers (in a file readable by this user only,
    /// deleted once they have read it) and returns it for the coordinator.
    pub fn with_generated_key(&mut self) -> Result<ClusterKey> {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "moeshard-cluster-key-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let key = ClusterKey::generate_file(&path).map_err(|e| CoordinatorError::LocalWorker {
            index: 0,
            msg: e.to_string(),
        })?;
        self.cluster_key_file = Some(path);
        self.delete_key_file = true;
        Ok(key)
    }
}

struct LocalWorker {
    child: Child,
    addr: SocketAddr,
}

/// Running local worker processes; killed on drop.
pub struct LocalWorkers {
    workers: Vec<LocalWorker>,
}

impl LocalWorkers {
    /// Starts the workers and waits until each has printed its address.
    pub fn start(cfg: &LocalWorkersConfig) -> Result<Self> {
        let r = Self::start_inner(cfg);
        if cfg.delete_key_file
            && let Some(p) = &cfg.cluster_key_file
        {
            // Every worker has read it by now (they print their address after loading the key),
            // or failed.
            let _ = std::fs::remove_file(p);
        }
        r
    }

    fn start_inner(cfg: &LocalWorkersConfig) -> Result<Self> {
        let mut started = Vec::with_capacity(cfg.capacities.len());
        // Start all first, then read their lines: they load in parallel.
        for (index, capacity) in cfg.capacities.iter().enumerate() {
            let mut cmd = Command::new(&cfg.exe);
            cmd.arg("worker")
                .arg("--model")
                .arg(&cfg.model)
                .args([
                    "--listen",
                    "127.0.0.1:0",
                    "--transport",
                    cfg.transport.name(),
                ])
                .arg("--exit-with-parent")
                .args(&cfg.extra_args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(if cfg.quiet {
                    Stdio::null()
                } else {
                    Stdio::inherit()
                });
            if let Some(c) = capacity {
                cmd.arg("--capacity").arg(c.to_string());
            }
            if let Some(k) = &cfg.cluster_key_file {
                cmd.arg("--cluster-key-file").arg(k);
            }
            let mut child = cmd.spawn().map_err(|e| CoordinatorError::LocalWorker {
                index,
                msg: format!("cannot start {}: {e}", cfg.exe.display()),
            })?;
            let (tx, rx) = mpsc::channel();
            if let Some(stdout) = child.stdout.take() {
                std::thread::spawn(move || {
                    let mut lines = BufReader::new(stdout).lines();
                    let first = lines.next().and_then(|l| l.ok());
                    let _ = tx.send(first);
                    // Keep draining so the worker never blocks on a full pipe.
                    for _ in lines {}
                });
            }
            started.push((child, rx));
        }
        let deadline = Instant::now() + cfg.startup_timeout;
        let mut workers = Vec::with_capacity(started.len());
        let mut failure = None;
        for (index, (mut child, rx)) in started.into_iter().enumerate() {
            if failure.is_some() {
                kill(&mut child);
                continue;
            }
            let wait = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(wait);
            let parsed = match &line {
                Ok(Some(l)) => parse_listening_line(l),
                _ => None,
            };
            match parsed {
                Some((addr, _)) => {
                    info!(index, %addr, pid = child.id(), "local worker started");
                    workers.push(LocalWorker { child, addr });
                }
                None => {
                    let msg = match line {
                        Err(_) => format!("printed no address within {:?}", cfg.startup_timeout),
                        Ok(Some(l)) => format!("printed {l:?} instead of its address"),
                        Ok(None) => match child.try_wait() {
                            Ok(Some(status)) => format!("exited at start ({status})"),
                            _ => "closed its stdout at start".to_string(),
                        },
                    };
                    kill(&mut child);
                    failure = Some(CoordinatorError::LocalWorker { index, msg });
                }
            }
        }
        let me = LocalWorkers { workers };
        match failure {
            Some(e) => Err(e), // dropping `me` stops the ones that started
            None => Ok(me),
        }
    }

    /// The workers' addresses, `127.0.0.1:PORT`.
    pub fn addrs(&self) -> Vec<String> {
        self.workers.iter().map(|w| w.addr.to_string()).collect()
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Process id of worker `i`.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.workers.get(i).map(|w| w.child.id())
    }

    /// Kills worker `i` at once (SIGKILL), as a crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(w) = self.workers.get_mut(i) {
            kill(&mut w.child);
        }
    }
}

fn kill(child: &mut Child) {
    if let Err(e) = child.kill() {
        // Already exited: nothing to stop.
        if e.kind() != std::io::ErrorKind::InvalidInput {
            warn!(pid = child.id(), "cannot kill a local worker: {e}");
        }
    }
    let _ = child.wait();
}

impl Drop for LocalWorkers {
    fn drop(&mut self) {
        for w in &mut self.workers {
            kill(&mut w.child);
        }
    }
}
