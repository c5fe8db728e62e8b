//! The Kubernetes control plane for the cluster tests (`cluster-tests/`):
//! etcd, kube-apiserver and kube-controller-manager, built once from their
//! Go modules by `cluster-tests/controlplane/build.sh` and cached outside
//! the repository, keyed by the script (which pins the versions) and the
//! Go toolchain.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::{output, repo_root, run};

const BINARIES: [&str; 3] = ["etcd", "kube-apiserver", "kube-controller-manager"];

/// `$TANDEM_CLUSTER_CACHE`, else `$XDG_CACHE_HOME` or `~/.cache`, else
/// `/var/tmp`, then `tandem-cluster`.
fn cache_root() -> PathBuf {
    if let Some(dir) = env::var_os("TANDEM_CLUSTER_CACHE") {
        return PathBuf::from(dir);
    }
    env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
        .join("tandem-cluster")
}

fn complete(bin: &Path) -> bool {
    BINARIES.iter().all(|b| bin.join(b).is_file()) && bin.join(".complete").is_file()
}

/// Builds the control plane unless it is cached; returns its `bin/`.
pub fn build() -> Result<PathBuf> {
    let script = repo_root().join("cluster-tests/controlplane/build.sh");
    let text = fs::read(&script).with_context(|| format!("cannot read {}", script.display()))?;
    let go = output(Command::new("go").arg("version")).context(
        "the Go toolchain builds the tests' Kubernetes control plane: install Go (it is on this project's machines)",
    )?;
    let mut key = text.clone();
    key.extend_from_slice(go.trim().as_bytes());
    let digest = payload::digest::sha256(&key).to_string();
    let out = cache_root().join(format!("controlplane-{}", &digest[..16]));
    let bin = out.join("bin");
    if complete(&bin) {
        return Ok(bin);
    }
    eprintln!(
        "xtask: building etcd, kube-apiserver and kube-controller-manager from their Go modules into {} (once; a few minutes)",
        out.display()
    );
    let started = Instant::now();
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    run(Command::new("bash").arg(&script).arg(&out))
        .context("building the Kubernetes control plane")?;
    if !BINARIES.iter().all(|b| bin.join(b).is_file()) {
        bail!(
            "{} ran but left no binaries in {}",
            script.display(),
            bin.display()
        );
    }
    fs::write(bin.join(".complete"), go.trim())
        .with_context(|| format!("cannot write {}", bin.display()))?;
    eprintln!(
        "xtask: control plane built in {}s",
        started.elapsed().as_secs()
    );
    Ok(bin)
}

/// `cargo xtask cluster-build`.
pub fn build_task() -> Result<()> {
    let bin = build()?;
    println!("export TANDEM_CONTROL_PLANE={}", bin.display());
    Ok(())
}

/// `cargo xtask fleet-bench [ARGS]`: tandem-operator (release) rolling
/// 1,000 simulated nodes on the real control plane; see
/// `cluster-tests/src/bin/fleet-bench.rs`.
pub fn fleet_bench() -> Result<()> {
    crate::ensure_packages(&["openssl", "curl"])?;
    let bin = build()?;
    run(crate::cargo().args([
        "build",
        "--release",
        "-p",
        "tandem-operator",
        "-p",
        "tandem-cluster-tests",
        "--bin",
        "tandem-operator",
        "--bin",
        "fleet-bench",
    ]))?;
    let target = crate::target_dir();
    run(Command::new(target.join("release/fleet-bench"))
        .args(env::args().skip(2))
        .env("TANDEM_CONTROL_PLANE", &bin))
}
