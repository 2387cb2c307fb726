//! `moeshard manifest` and `moeshard verify`: weight integrity of a checkpoint directory.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use moeshard_engine::fingerprint::model_fingerprint;
use moeshard_engine::safetensors::Checkpoint;
use moeshard_worker::manifest::{self, MANIFEST_FILE};
use rayon::prelude::*;

#[derive(Args)]
pub(crate) struct ManifestArgs {
    /// The checkpoint directory (a copy known to be good).
    dir: PathBuf,
    /// Where to write the manifest (default: DIR/moeshard.manifest.json, where workers find it).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct VerifyArgs {
    /// The checkpoint directory to check.
    dir: PathBuf,
    /// The manifest to check against (default: DIR/moeshard.manifest.json).
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// SHA-256 sums of the checkpoint's files, `sha256sum` style (`HEX  FILE` per line, file
    /// names relative to DIR), e.g. as published by the Hugging Face Hub.
    #[arg(long)]
    sha256: Option<PathBuf>,
}

fn bar(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn open(dir: &Path) -> Result<(Checkpoint, String)> {
    let ckpt = Checkpoint::open(dir)
        .with_context(|| format!("opening the checkpoint in {}", dir.display()))?;
    let fp = model_fingerprint(dir, &ckpt)?;
    Ok((ckpt, fp))
}

/// `moeshard manifest DIR [--out FILE]`.
pub(crate) fn cmd_manifest(a: ManifestArgs) -> Result<()> {
    let (ckpt, fp) = open(&a.dir)?;
    let pb = bar(manifest::total_bytes(&ckpt), "hashing");
    let m = manifest::build(&a.dir, &ckpt, &fp, &|n| pb.inc(n))?;
    pb.finish_and_clear();
    let out = a.out.unwrap_or_else(|| a.dir.join(MANIFEST_FILE));
    let mut text = serde_json::to_string_pretty(&m)?;
    text.push('\n');
    std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "{}: {} tensors, model fingerprint {}",
        out.display(),
        m.tensors.len(),
        m.model_fingerprint
    );
    Ok(())
}

/// `moeshard verify DIR [--manifest FILE] [--sha256 FILE]`.
pub(crate) fn cmd_verify(a: VerifyArgs) -> Result<()> {
    let mut failures = Vec::new();
    let mut checked = Vec::new();
    if let Some(sums) = &a.sha256 {
        let bad = verify_sha256(&a.dir, sums)?;
        checked.push("SHA-256 of every listed file");
        failures.extend(bad);
    }
    let path = a
        .manifest
        .clone()
        .unwrap_or_else(|| a.dir.join(MANIFEST_FILE));
    if a.manifest.is_some() || path.is_file() {
        let m = manifest::load(&path)?;
        let (ckpt, fp) = open(&a.dir)?;
        if m.model_fingerprint != fp {
            failures.push(format!(
                "the model differs from the manifest's: fingerprint {fp}, the manifest has {} \
                 (config or tensor index changed)",
                m.model_fingerprint
            ));
        }
        let pb = bar(manifest::total_bytes(&ckpt), "verifying");
        let bad = manifest::verify(&ckpt, &m, None, &|n| pb.inc(n))?;
        pb.finish_and_clear();
        checked.push("BLAKE3 of every tensor against the manifest");
        failures.extend(bad.iter().map(ToString::to_string));
    } else if a.sha256.is_none() {
        bail!(
            "nothing to verify against: no {} (make one with `moeshard manifest` from a good \
             copy, or pass --manifest or --sha256)",
            path.display()
        );
    }
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("MISMATCH {f}");
        }
        bail!(
            "{}: {} mismatches ({})",
            a.dir.display(),
            failures.len(),
            checked.join("; ")
        );
    }
    println!("{}: OK ({})", a.dir.display(), checked.join("; "));
    Ok(())
}

/// Checks the files listed in a `sha256sum`-style file; returns the mismatches.
fn verify_sha256(dir: &Path, sums: &Path) -> Result<Vec<String>> {
    let meta = std::fs::metadata(sums).with_context(|| format!("reading {}", sums.display()))?;
    if meta.len() > 16 << 20 {
        bail!(
            "{}: {} bytes is too big for a list of sums",
            sums.display(),
            meta.len()
        );
    }
    let text =
        std::fs::read_to_string(sums).with_context(|| format!("reading {}", sums.display()))?;
    let mut wanted = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (hex, name) = line
            .split_once(char::is_whitespace)
            .map(|(h, n)| (h, n.trim().trim_start_matches('*')))
            .with_context(|| format!("{}:{}: not `HEX  FILE`", sums.display(), i + 1))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("{}:{}: {hex:?} is not a SHA-256", sums.display(), i + 1);
        }
        let path = dir.join(name);
        if !path.starts_with(dir) || name.split('/').any(|c| c == "..") {
            bail!(
                "{}:{}: {name:?} is outside {}",
                sums.display(),
                i + 1,
                dir.display()
            );
        }
        wanted.push((name.to_string(), hex.to_ascii_lowercase(), path));
    }
    let total: u64 = wanted
        .iter()
        .filter_map(|(_, _, p)| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let pb = bar(total, "sha256");
    let bad: Vec<String> = wanted
        .par_iter()
        .filter_map(
            |(name, want, path)| match sha256_file(path, &|n| pb.inc(n)) {
                Ok(got) if &got == want => None,
                Ok(got) => Some(format!("file {name}: SHA-256 {got}, expected {want}")),
                Err(e) => Some(format!("file {name}: {e:#}")),
            },
        )
        .collect();
    pb.finish_and_clear();
    Ok(bad)
}

fn sha256_file(path: &Path, progress: &(dyn Fn(u64) + Sync)) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        progress(n as u64);
    }
    Ok(ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
