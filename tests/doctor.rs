//! `moeshard doctor` against real processes: a worker it says hello to over QUIC and gRPC, a
//! coordinator whose /health and clock it reads, and the ways a host fails its checks.
#![allow(clippy::unwrap_used)] // a test fails loudly on any unexpected error

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use moeshard_proto::parse_listening_line;
use serde_json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen3_moe_tiny")
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `moeshard ARGS` and returns it with the first stdout line that `pick` accepts.
fn start(args: &[&str], pick: fn(&str) -> Option<String>) -> (Proc, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_moeshard"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start moeshard");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(v) = pick(&line) {
                let _ = tx.send(v);
            }
        }
    });
    let v = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the process printed its address");
    (Proc(child), v)
}

/// A worker on loopback that requires the cluster key in `key`.
fn worker(transport: &str, key: &Path) -> (Proc, String) {
    let f = fixture();
    start(
        &[
            "worker",
            "--model",
            f.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--transport",
            transport,
            "--cluster-key-file",
            key.to_str().unwrap(),
        ],
        |l| parse_listening_line(l).map(|(a, _)| a.to_string()),
    )
}

fn doctor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moeshard"))
        .arg("doctor")
        .args(args)
        .output()
        .expect("run moeshard doctor")
}

fn key_file(dir: &Path, contents: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(format!("key-{mode:o}-{}", contents.len()));
    std::fs::write(&p, contents).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

fn checks(out: &Output) -> Vec<Value> {
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    v["checks"].as_array().expect("checks").clone()
}

fn status_of<'a>(checks: &'a [Value], name: &str) -> &'a str {
    checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {checks:?}"))["status"]
        .as_str()
        .unwrap()
}

#[test]
fn a_healthy_host_passes_and_reaches_its_peers() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(
        dir.path(),
        "c2VjcmV0LWtleS1vZi10aGUtY2x1c3Rlci0zMi1ieXRlcw==\n",
        0o600,
    );
    let (_q, quic) = worker("quic", &key);
    let (_g, grpc) = worker("grpc", &key);
    let f = fixture();
    let (_s, http) = start(
        &[
            "serve",
            "--model",
            f.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        |l| l.strip_prefix("listening on ").map(str::to_string),
    );
    let out = doctor(&[
        "--model",
        f.to_str().unwrap(),
        "--workers",
        &quic,
        "--transport",
        "quic",
        "--coordinator",
        &http,
        "--cluster-key-file",
        key.to_str().unwrap(),
        "--json",
    ]);
    let c = checks(&out);
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "{c:?}");
    assert_eq!(status_of(&c, "cpu"), "pass");
    assert_eq!(status_of(&c, "model"), "pass");
    assert_eq!(status_of(&c, &format!("worker {quic}")), "pass");
    assert_eq!(status_of(&c, &format!("coordinator {http}")), "pass");
    assert_eq!(status_of(&c, "cluster key"), "pass");
    // Compared with the coordinator's clock (same host: no skew).
    let clock = c.iter().find(|x| x["name"] == "clock").unwrap();
    assert_eq!(clock["status"], "pass");
    assert!(
        clock["detail"]
            .as_str()
            .unwrap()
            .contains("coordinator's clock"),
        "{clock}"
    );
    assert_ne!(status_of(&c, "memory"), "fail");
    assert_ne!(status_of(&c, "disk"), "fail");

    // The table form, over gRPC, as a container probe would run it (with the key, as the
    // manifests in deploy/ do).
    let out = doctor(&[
        "--only-peers",
        "--workers",
        &grpc,
        "--transport",
        "grpc",
        "--cluster-key-file",
        key.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.starts_with("CHECK"), "{text}");
    assert!(text.contains(&format!("worker {grpc}")), "{text}");
    assert!(text.contains("hello over grpc"), "{text}");
    assert!(
        !text.contains("cpu"),
        "--only-peers checks only the peers: {text}"
    );
    assert!(text.ends_with("1 passed, 0 warnings, 0 failed\n"), "{text}");

    // Without the key, or with another one, the keyed workers refuse the probe: a failure that
    // says why.
    let other = key_file(dir.path(), &"another-cluster-key-".repeat(3), 0o600);
    for (transport, addr) in [("quic", &quic), ("grpc", &grpc)] {
        for key_args in [vec![], vec!["--cluster-key-file", other.to_str().unwrap()]] {
            let mut args = vec![
                "--only-peers",
                "--workers",
                addr.as_str(),
                "--transport",
                transport,
                "--timeout",
                "5",
                "--json",
            ];
            args.extend(&key_args);
            let out = doctor(&args);
            let c = checks(&out);
            assert!(!out.status.success(), "{transport} {key_args:?}: {c:?}");
            let w = c
                .iter()
                .find(|x| x["name"] == format!("worker {addr}"))
                .unwrap();
            assert_eq!(w["status"], "fail", "{w}");
            let detail = w["detail"].as_str().unwrap();
            assert!(
                detail.contains("cluster-key-file") || detail.contains("TLS"),
                "{transport} {key_args:?}: {detail}"
            );
        }
    }

    // --only-peers with an unreadable key fails on the key, not silently without it.
    let out = doctor(&[
        "--only-peers",
        "--workers",
        &grpc,
        "--cluster-key-file",
        dir.path().join("missing.key").to_str().unwrap(),
        "--json",
    ]);
    let c = checks(&out);
    assert!(!out.status.success());
    assert_eq!(status_of(&c, "cluster key"), "fail");
}

#[test]
fn a_bad_host_fails_with_reasons_and_a_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let world = key_file(dir.path(), &"k".repeat(40), 0o644);
    let short = key_file(dir.path(), "short", 0o600);
    let group = key_file(dir.path(), &"g".repeat(40), 0o640);
    // A port with nothing behind it.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let empty = tempfile::tempdir().unwrap();
    let cases: Vec<(Vec<String>, String, &str, &str)> = vec![
        (
            vec!["--cluster-key-file".into(), world.display().to_string()],
            "cluster key".into(),
            "fail",
            "readable by every user",
        ),
        (
            vec!["--cluster-key-file".into(), short.display().to_string()],
            "cluster key".into(),
            "fail",
            "at least 32",
        ),
        (
            vec![
                "--cluster-key-file".into(),
                dir.path().join("absent").display().to_string(),
            ],
            "cluster key".into(),
            "fail",
            "No such file",
        ),
        (
            vec![
                "--workers".into(),
                closed.clone(),
                "--timeout".into(),
                "2".into(),
            ],
            format!("worker {closed}"),
            "fail",
            "unreachable",
        ),
        (
            vec!["--model".into(), empty.path().display().to_string()],
            "model".into(),
            "fail",
            "no *.safetensors",
        ),
        (
            vec![
                "--model-bytes".into(),
                (1u64 << 62).to_string(),
                "--dir".into(),
                dir.path().display().to_string(),
            ],
            "disk".into(),
            "fail",
            "the model needs",
        ),
    ];
    for (args, name, want, says) in cases {
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        a.push("--json");
        let out = doctor(&a);
        let c = checks(&out);
        assert!(!out.status.success(), "{args:?} should fail: {c:?}");
        let got = c
            .iter()
            .find(|x| x["name"] == name.as_str())
            .unwrap_or_else(|| panic!("no check {name}"));
        assert_eq!(got["status"], want, "{args:?}: {got}");
        assert!(
            got["detail"].as_str().unwrap().contains(says),
            "{args:?}: {got}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("checks failed"), "{err}");
    }
    // A group-readable key is a warning, not a failure.
    let out = doctor(&["--cluster-key-file", group.to_str().unwrap(), "--json"]);
    let c = checks(&out);
    assert_eq!(status_of(&c, "cluster key"), "warn");
}
