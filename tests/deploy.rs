//! deploy/ through its validators (installed by .ci/run; every schema is bundled with its
//! package, so nothing is fetched at validation time): the Kubernetes manifests against the
//! Kubernetes OpenAPI schemas (kubernetes-validate, strict), the compose file against the
//! compose-spec schema (check-jsonschema), the Dockerfile through hadolint, the systemd units
//! through `systemd-analyze verify`. Each validator is also shown a broken copy, so a validator
//! that accepts anything fails the test. And every moeshard command line in deploy/ is parsed by
//! the real binary.
#![allow(clippy::unwrap_used)] // a test fails loudly on any unexpected error

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (.ci/run installs it): {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const K8S: [&str; 3] = ["secret.yaml", "workers.yaml", "coordinator.yaml"];

#[test]
fn kubernetes_manifests_pass_the_schema_validator() {
    let files: Vec<String> = K8S
        .iter()
        .map(|f| deploy().join("k8s").join(f).display().to_string())
        .collect();
    let mut args = vec!["--strict", "-k", "1.33.0"];
    args.extend(files.iter().map(String::as_str));
    let out = run("kubernetes-validate", &args);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for resource in [
        "secret/moeshard-cluster-key",
        "service/moeshard-workers",
        "statefulset/moeshard-worker",
        "deployment/moeshard-coordinator",
        "persistentvolumeclaim/moeshard-coordinator-models",
        "service/moeshard",
    ] {
        assert!(
            t.contains(&format!("passed for resource {resource}")),
            "{t}"
        );
    }
    // The kustomization lists exactly these files.
    let k = std::fs::read_to_string(deploy().join("k8s/kustomization.yaml")).unwrap();
    for f in K8S {
        assert!(
            k.contains(&format!("- {f}")),
            "{f} missing from kustomization.yaml"
        );
    }

    // A misspelt field and a wrong type are caught.
    let dir = tempfile::tempdir().unwrap();
    let workers = std::fs::read_to_string(deploy().join("k8s/workers.yaml")).unwrap();
    for (from, to) in [
        ("serviceName:", "serviceNmae:"),
        ("replicas: 4", "replicas: four"),
    ] {
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, workers.replacen(from, to, 1)).unwrap();
        let out = run(
            "kubernetes-validate",
            &["--strict", "-k", "1.33.0", bad.to_str().unwrap()],
        );
        assert!(!out.status.success(), "{to} passed: {}", text(&out));
    }
}

#[test]
fn the_compose_file_passes_the_compose_spec_schema() {
    let file = deploy().join("compose.yaml");
    let out = run(
        "check-jsonschema",
        &[
            "--builtin-schema",
            "vendor.compose-spec",
            file.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("compose.yaml");
    let compose = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&bad, compose.replacen("restart:", "restrat:", 1)).unwrap();
    let out = run(
        "check-jsonschema",
        &[
            "--builtin-schema",
            "vendor.compose-spec",
            bad.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success(), "a misspelt key passed");
}

#[test]
fn the_dockerfile_passes_hadolint() {
    let file = deploy().join("Dockerfile");
    let out = run("hadolint", &[file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let d = std::fs::read_to_string(&file).unwrap();
    // Multi-stage, slim runtime, non-root, the same locked release build as CI's.
    assert_eq!(
        d.matches("\nFROM ").count() + usize::from(d.starts_with("FROM ")),
        2
    );
    assert!(d.contains("FROM debian:bookworm-slim"));
    assert!(d.contains("USER 10001"));
    assert!(d.contains("cargo build --release --locked --bin moeshard"));
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("Dockerfile");
    std::fs::write(&bad, d.replace("USER 10001:10001\n", "") + "RUN cd /tmp\n").unwrap();
    let out = run("hadolint", &[bad.to_str().unwrap()]);
    assert!(!out.status.success(), "hadolint accepted `RUN cd`");
}

#[test]
fn the_systemd_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    for unit in ["moeshard-worker.service", "moeshard-coordinator.service"] {
        // Point the unit at the binary under test; keep the rest as shipped.
        let text_ = std::fs::read_to_string(deploy().join("systemd").join(unit)).unwrap();
        let local = text_.replace("/usr/local/bin/moeshard", env!("CARGO_BIN_EXE_moeshard"));
        let path = dir.path().join(unit);
        std::fs::write(&path, local).unwrap();
        let out = run("systemd-analyze", &["verify", path.to_str().unwrap()]);
        let t = text(&out);
        assert!(out.status.success(), "{unit}: {t}");
        assert!(!t.contains(unit), "{unit}: {t}");
    }
    let bad = dir.path().join("moeshard-bad.service");
    std::fs::write(&bad, "[Service]\nExecStart=relative/path\n").unwrap();
    let out = run("systemd-analyze", &["verify", bad.to_str().unwrap()]);
    assert!(
        !out.status.success() || text(&out).contains("moeshard-bad.service"),
        "a bad unit passed"
    );
}

/// The items of YAML block lists under `args:` / `command:` keys (one `- word` per line).
fn block_lists(yaml: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for l in yaml.lines() {
        let t = l.trim();
        if let Some(words) = current.as_mut() {
            if let Some(w) = t.strip_prefix("- ") {
                words.push(w.trim().trim_matches('"').to_string());
                continue;
            }
            out.extend(current.take());
        }
        if t == "args:" || t == "command:" {
            current = Some(Vec::new());
        }
    }
    out.extend(current);
    out
}

/// The moeshard command lines in deploy/: each parses (clap's errors exit with status 2), and
/// every coordinator, worker and peer probe proves the cluster key the deployment mounts.
#[test]
fn every_command_line_in_deploy_parses() {
    let read = |f: &str| std::fs::read_to_string(deploy().join(f)).unwrap();
    let mut lines: Vec<Vec<String>> = Vec::new();
    // Inline JSON-style arrays: ["moeshard", "doctor", ...] and ["worker", ...].
    for f in ["compose.yaml", "k8s/workers.yaml"] {
        for l in read(f).lines() {
            let Some(start) = l.find('[') else { continue };
            let inner = &l[start + 1..l.rfind(']').unwrap_or(l.len())];
            let words: Vec<String> = inner
                .split(',')
                .map(|w| w.trim().trim_matches('"').to_string())
                .collect();
            match words.first().map(String::as_str) {
                Some("moeshard") => lines.push(words[1..].to_vec()),
                Some("CMD") if words.get(1).is_some_and(|w| w == "moeshard") => {
                    lines.push(words[2..].to_vec())
                }
                Some("worker") | Some("serve") => lines.push(words),
                _ => {}
            }
        }
    }
    // Block lists: the coordinators' arguments in compose and Kubernetes, the workers' in the
    // StatefulSet.
    for f in ["compose.yaml", "k8s/workers.yaml", "k8s/coordinator.yaml"] {
        lines.extend(
            block_lists(&read(f))
                .into_iter()
                .filter(|w| matches!(w.first().map(String::as_str), Some("serve" | "worker"))),
        );
    }
    // The systemd environment files, completed the way the units' ExecStart lines do.
    for (f, model) in [
        ("systemd/worker.env", "/srv/models/m"),
        ("systemd/coordinator.env", "/srv/models/m"),
    ] {
        for l in read(f).lines() {
            let Some((var, value)) = l.split_once('=') else {
                continue;
            };
            let cmd = match var {
                "MOESHARD_SERVE_ARGS" => "serve",
                "MOESHARD_WORKER_ARGS" => "worker",
                "MOESHARD_DOCTOR_ARGS" => "doctor",
                _ => continue,
            };
            let mut words = vec![cmd.to_string(), "--model".to_string(), model.to_string()];
            words.extend(value.split_whitespace().map(str::to_string));
            if cmd == "doctor" {
                // The sample hosts do not exist here: do not wait long for them.
                words.extend(["--timeout".to_string(), "0.5".to_string()]);
            }
            lines.push(words);
        }
    }
    let count = |cmd: &str| lines.iter().filter(|w| w[0] == cmd).count();
    assert!(
        count("serve") >= 3 && count("worker") >= 3 && count("doctor") >= 6,
        "found only {lines:?}"
    );
    for args in &lines {
        let proves_key = args.iter().any(|w| w == "--cluster-key-file");
        let reaches_workers = args[0] != "doctor" || args.iter().any(|w| w == "--workers");
        assert!(
            proves_key || !reaches_workers,
            "{args:?} does not pass the cluster key its deployment mounts"
        );
        // `--help` after the arguments: clap checks every flag and its value first.
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        if a.first() == Some(&"doctor") {
            // Parsed and run (nothing listens here, or something else does): whatever it finds,
            // it is not a usage error.
            let out = run(env!("CARGO_BIN_EXE_moeshard"), &a);
            assert_ne!(out.status.code(), Some(2), "{a:?}: {}", text(&out));
            continue;
        }
        a.push("--help");
        let out = run(env!("CARGO_BIN_EXE_moeshard"), &a);
        assert!(out.status.success(), "{a:?}: {}", text(&out));
    }
}

/// The resources in deploy/k8s follow the plan of deploy/k8s/plan-cluster.toml: each worker's
/// --capacity holds its planned experts.
#[test]
fn the_worker_capacity_covers_the_plan() {
    let out = run(
        env!("CARGO_BIN_EXE_moeshard"),
        &[
            "plan",
            "--model",
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples/configs/qwen3-235b-a22b.json")
                .display()
                .to_string(),
            "--cluster",
            &deploy().join("k8s/plan-cluster.toml").display().to_string(),
            "--quant",
            "q4_k",
            "--concurrency",
            "16",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text_ = plan.to_string();
    // The experts of every node together, spread over the four workers.
    let total: f64 = plan["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("no nodes in {text_}"))
        .iter()
        .map(|n| n["expert_bytes"].as_f64().unwrap_or_else(|| panic!("{n}")))
        .sum();
    let workers = std::fs::read_to_string(deploy().join("k8s/workers.yaml")).unwrap();
    let capacity: f64 = workers
        .split("- --capacity")
        .nth(1)
        .and_then(|rest| rest.split('"').nth(1))
        .and_then(|v| v.parse().ok())
        .expect("--capacity in workers.yaml");
    assert!(
        4.0 * capacity >= total,
        "4 x {capacity} < {total} bytes of experts"
    );
    assert!(4.0 * capacity < 1.25 * total, "capacity far above the plan");
}
