//! Weight integrity end to end: `moeshard manifest` and `moeshard verify` (BLAKE3 per tensor,
//! SHA-256 per file), and workers that refuse to serve a tampered tensor, naming it, over both
//! transports.

#![allow(clippy::unwrap_used)] // test set-up: a failure should stop the test loudly

mod common;

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use common::{bin, copy_fixture, fixture, run};
use moeshard_engine::safetensors::Checkpoint;

const NAME: &str = "qwen3_moe_tiny";
/// An expert tensor every worker of a one-worker cluster is assigned.
const TENSOR: &str = "model.layers.2.mlp.experts.3.up_proj.weight";

/// Flips one byte in the middle of `tensor` in the checkpoint at `dir`.
fn flip_byte(dir: &Path, tensor: &str) {
    let ckpt = Checkpoint::open(dir).unwrap();
    let (path, info) = ckpt.info(tensor).unwrap();
    let (path, at) = (path.to_path_buf(), (info.start + info.len / 2) as u64);
    drop(ckpt);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0x01;
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&b).unwrap();
}

fn manifest(dir: &Path) {
    let (ok, out, err) = run(&["manifest", dir.to_str().unwrap()]);
    assert!(ok, "manifest failed: {err}");
    assert!(out.contains("moeshard.manifest.json"), "{out}");
}

#[test]
fn verify_passes_a_good_copy_and_names_a_flipped_tensor() {
    let copy = copy_fixture(NAME);
    let dir = copy.path();
    manifest(dir);
    let text = std::fs::read_to_string(dir.join("moeshard.manifest.json")).unwrap();
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(m["format"], "moeshard-manifest/1");
    assert_eq!(m["tensors"][TENSOR]["blake3"].as_str().unwrap().len(), 64);
    let (ok, out, err) = run(&["verify", dir.to_str().unwrap()]);
    assert!(ok, "a good copy failed: {err}");
    assert!(out.contains("OK"), "{out}");

    flip_byte(dir, TENSOR);
    let (ok, _, err) = run(&["verify", dir.to_str().unwrap()]);
    assert!(!ok, "a flipped byte passed");
    assert!(err.contains(&format!("MISMATCH tensor {TENSOR}")), "{err}");
    // Exactly one tensor is named.
    assert_eq!(err.matches("MISMATCH").count(), 1, "{err}");

    // A manifest given explicitly, from the untouched fixture's copy, says the same.
    let good = copy_fixture(NAME);
    manifest(good.path());
    let other = good.path().join("moeshard.manifest.json");
    let (ok, _, err) = run(&[
        "verify",
        dir.to_str().unwrap(),
        "--manifest",
        other.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains(TENSOR), "{err}");
    // With nothing to check against, verify says so rather than passing.
    let bare = copy_fixture(NAME);
    let (ok, _, err) = run(&["verify", bare.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("nothing to verify against"), "{err}");
}

fn sha256_hex(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    ring::digest::digest(&ring::digest::SHA256, &bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn verify_checks_sha256_sums_of_files() {
    let copy = copy_fixture(NAME);
    let dir = copy.path();
    let sums = dir.join("SHA256SUMS");
    let mut text = String::new();
    for f in ["model.safetensors", "config.json"] {
        text.push_str(&format!("{}  {f}\n", sha256_hex(&dir.join(f))));
    }
    std::fs::write(&sums, text).unwrap();
    let (ok, out, err) = run(&[
        "verify",
        dir.to_str().unwrap(),
        "--sha256",
        sums.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("SHA-256"), "{out}");
    flip_byte(dir, TENSOR);
    let (ok, _, err) = run(&[
        "verify",
        dir.to_str().unwrap(),
        "--sha256",
        sums.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("file model.safetensors: SHA-256") && !err.contains("config.json"),
        "{err}"
    );
}

/// Starts a worker on `dir`; returns it and its address.
fn worker(dir: &Path, transport: &str) -> (std::process::Child, String) {
    let mut child = Command::new(bin())
        .arg("worker")
        .arg("--model")
        .arg(dir)
        .args(["--listen", "127.0.0.1:0", "--transport", transport])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let (addr, _) = moeshard_proto::parse_listening_line(&line).unwrap();
    (child, addr.to_string())
}

fn logits(model: &Path, extra: &[&str]) -> (bool, Vec<u8>, String) {
    common::logits_npy(model, "1,2,3,4,5", extra)
}

#[test]
fn a_worker_refuses_to_serve_a_tampered_tensor_naming_it() {
    let good = copy_fixture(NAME);
    manifest(good.path());
    let bad = copy_fixture(NAME);
    std::fs::copy(
        good.path().join("moeshard.manifest.json"),
        bad.path().join("moeshard.manifest.json"),
    )
    .unwrap();
    flip_byte(bad.path(), TENSOR);
    let (ok, single, err) = logits(&fixture(NAME), &[]);
    assert!(ok, "{err}");
    for transport in ["grpc", "quic"] {
        // The good copy with its manifest serves, and gives the single-process bytes.
        let (mut w, addr) = worker(good.path(), transport);
        let (ok, got, err) = logits(
            &fixture(NAME),
            &["--workers", &addr, "--transport", transport],
        );
        let _ = w.kill();
        let _ = w.wait();
        assert!(ok, "{transport}: a verified worker failed: {err}");
        assert!(got == single, "{transport}: logits differ");
        // The tampered copy: the coordinator's model is the same (same fingerprint), but the
        // worker refuses the assignment that includes the damaged tensor.
        let (mut w, addr) = worker(bad.path(), transport);
        let (ok, _, err) = logits(
            &fixture(NAME),
            &["--workers", &addr, "--transport", transport],
        );
        let _ = w.kill();
        let _ = w.wait();
        assert!(!ok, "{transport}: a tampered tensor was served");
        let e = err.lines().rev().find(|l| l.starts_with("error:")).unwrap();
        assert!(
            e.contains(&addr) && e.contains(TENSOR) && e.contains("refusing to serve"),
            "{transport}: {err}"
        );
    }
}

/// The coordinator checks what it computes with itself: the dense tensors always, every expert
/// when they run in-process. A flipped byte in either stops the load with the tensor's name; a
/// good copy runs and gives the same logits as the fixture.
#[test]
fn the_coordinator_refuses_a_tampered_dense_or_local_tensor() {
    let (ok, want, err) = logits(&fixture(NAME), &[]);
    assert!(ok, "{err}");
    let good = copy_fixture(NAME);
    manifest(good.path());
    let (ok, got, err) = logits(good.path(), &[]);
    assert!(ok, "a good copy with a manifest failed: {err}");
    assert!(got == want);

    const DENSE: &str = "model.layers.1.self_attn.o_proj.weight";
    for (tensor, extra) in [
        (DENSE, &[][..]),
        (DENSE, &["--local-workers", "1"][..]),
        (TENSOR, &[][..]),
    ] {
        let bad = copy_fixture(NAME);
        manifest(bad.path());
        flip_byte(bad.path(), tensor);
        let (ok, _, err) = logits(bad.path(), extra);
        assert!(!ok, "{tensor} {extra:?}: a tampered tensor was used");
        assert!(
            err.contains(tensor) && err.contains("does not match"),
            "{tensor} {extra:?}: {err}"
        );
    }

    // An explicit manifest of another model is refused by its fingerprint.
    let other = copy_fixture("mixtral_tiny");
    manifest(other.path());
    let (ok, _, err) = logits(
        good.path(),
        &[
            "--manifest",
            other
                .path()
                .join("moeshard.manifest.json")
                .to_str()
                .unwrap(),
        ],
    );
    assert!(!ok);
    assert!(err.contains("is for model"), "{err}");
}
