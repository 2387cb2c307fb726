//! Cluster-key authentication with real processes, over both transports: a coordinator with the
//! wrong key, or none, is refused at the TLS handshake (before any request reaches the worker)
//! with a clear error; with the right key the output is the single-process one, to the byte; and
//! a worker without the key is refused by a coordinator that has one.

#![allow(clippy::unwrap_used)] // test set-up: a failure should stop the test loudly

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{bin, fixture, run};

const TRANSPORTS: [&str; 2] = ["grpc", "quic"];

/// A worker process whose stderr (its logs at info level) is collected when it is stopped.
struct Worker {
    child: Child,
    addr: String,
}

impl Worker {
    fn start(dir: &Path, transport: &str, key: Option<&Path>) -> Worker {
        let mut cmd = Command::new(bin());
        cmd.arg("worker")
            .arg("--model")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0", "--transport", transport])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(k) = key {
            cmd.arg("--cluster-key-file").arg(k);
        }
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let (addr, _) = moeshard_proto::parse_listening_line(&line)
            .unwrap_or_else(|| panic!("no address line: {line:?}"));
        Worker {
            child,
            addr: addr.to_string(),
        }
    }

    /// Kills the worker and returns its logs.
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        err
    }
}

fn write_key(dir: &Path, name: &str, secret: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{secret}\n")).unwrap();
    p
}

/// `moeshard logits` of the fixture's first tokens; returns (ok, .npy bytes, stderr).
fn logits(dir: &Path, extra: &[&str]) -> (bool, Vec<u8>, String) {
    let mut args = vec!["--connect-timeout", "5"];
    args.extend_from_slice(extra);
    common::logits_npy(dir, "1,2,3,4,5", &args)
}

fn error_line(stderr: &str) -> &str {
    stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in {stderr}"))
}

#[test]
fn only_a_coordinator_with_the_cluster_key_is_served() {
    let dir = fixture("qwen3_moe_tiny");
    let keys = tempfile::tempdir().unwrap();
    let good = write_key(keys.path(), "good", "correct horse battery staple 0123");
    let bad = write_key(keys.path(), "bad", "correct horse battery staple 0124");
    let (ok, single, err) = logits(&dir, &[]);
    assert!(ok, "{err}");
    for transport in TRANSPORTS {
        let w = Worker::start(&dir, transport, Some(&good));
        let addr = w.addr.clone();
        let base = ["--workers", addr.as_str(), "--transport", transport];
        // The wrong key, then no key at all: refused, naming the worker and the key.
        for (what, key) in [("a wrong key", Some(&bad)), ("no key", None)] {
            let mut args = base.to_vec();
            if let Some(k) = key {
                args.extend(["--cluster-key-file", k.to_str().unwrap()]);
            }
            let (ok, _, stderr) = logits(&dir, &args);
            assert!(!ok, "{transport}: a coordinator with {what} was served");
            let e = error_line(&stderr);
            assert!(
                e.contains(&addr) && e.contains("TLS authentication failed"),
                "{transport}, {what}: unclear error: {stderr}"
            );
        }
        // The right key: served, and the output is the single-process one.
        let mut args = base.to_vec();
        args.extend(["--cluster-key-file", good.to_str().unwrap()]);
        let (ok, got, stderr) = logits(&dir, &args);
        assert!(ok, "{transport}: the right key was refused: {stderr}");
        assert!(
            got == single,
            "{transport}: logits differ from single-process"
        );
        let logs = w.stop();
        // The refused peers never got as far as a request: the worker logged exactly one hello
        // (the good coordinator's), and refusals.
        let hellos = logs
            .lines()
            .filter(|l| l.contains(" hello") && l.contains("coordinator"))
            .count();
        assert_eq!(hellos, 1, "{transport}: worker logs:\n{logs}");
        assert!(
            logs.contains("cluster key"),
            "{transport}: the refusal is not logged:\n{logs}"
        );
    }
}

#[test]
fn a_worker_without_the_key_is_refused_by_a_coordinator_with_one() {
    let dir = fixture("qwen3_moe_tiny");
    let keys = tempfile::tempdir().unwrap();
    let key = write_key(keys.path(), "k", "0123456789abcdef0123456789abcdef");
    for transport in TRANSPORTS {
        let w = Worker::start(&dir, transport, None);
        let (ok, _, stderr) = logits(
            &dir,
            &[
                "--workers",
                &w.addr,
                "--transport",
                transport,
                "--cluster-key-file",
                key.to_str().unwrap(),
            ],
        );
        assert!(!ok, "{transport}: an unauthenticated worker was used");
        let e = error_line(&stderr);
        assert!(e.contains(&w.addr), "{transport}: {stderr}");
        w.stop();
    }
}

#[test]
fn a_short_or_missing_key_file_is_a_clear_error() {
    let dir = fixture("qwen3_moe_tiny");
    let keys = tempfile::tempdir().unwrap();
    let short = write_key(keys.path(), "short", "tiny");
    let (ok, _, stderr) = run(&[
        "worker",
        "--model",
        dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--cluster-key-file",
        short.to_str().unwrap(),
    ]);
    assert!(!ok);
    let e = error_line(&stderr);
    assert!(
        e.contains("short") && e.contains("at least 16 bytes"),
        "{stderr}"
    );
    let missing = keys.path().join("missing");
    let (ok, _, stderr) = logits(
        &dir,
        &[
            "--local-workers",
            "1",
            "--cluster-key-file",
            missing.to_str().unwrap(),
        ],
    );
    assert!(!ok);
    assert!(error_line(&stderr).contains("missing"), "{stderr}");
}
