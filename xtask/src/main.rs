//! `cargo xtask`: the project's own tasks.
//!
//! - `cargo xtask test`: installs the Debian packages the tests need (when
//!   run as root), then runs every test in the workspace.
//! - `cargo xtask lint`: `cargo fmt --check` and `cargo clippy -D warnings`.
//! - `cargo xtask bench`: tandem's payloads against zstd, lz4 and xdelta3
//!   on a real Debian security update (see `bench.rs`).
//! - `cargo xtask demo`: tandem's main job so far, on a disk image it makes:
//!   an A/B slot flip, a failed trial boot falling back, a good one kept.

mod bench;

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use bootconfig::backend::GptPrioBackend;
use bootconfig::gpt::GptDisk;
use bootconfig::slots::find_slots;
use bootconfig::{BootBackend, SlotLayout};

/// Debian packages the tests and the demo run: sgdisk, cgpt, bootctl,
/// GnuPG (payload signatures made and checked by gpg), mkfs.ext4.
const PACKAGES: [&str; 5] = ["gdisk", "cgpt", "systemd-boot", "gnupg", "e2fsprogs"];

fn main() -> std::process::ExitCode {
    let task = env::args().nth(1).unwrap_or_default();
    let result = match task.as_str() {
        "test" => test(),
        "lint" => lint(),
        "demo" => demo(),
        "bench" => run_bench(),
        _ => Err(anyhow::anyhow!(
            "unknown task {task:?}; usage: cargo xtask test | lint | demo | bench"
        )),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn cargo() -> Command {
    Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".to_string()))
}

fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}

fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs the missing packages as root; otherwise says what is missing.
fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        eprintln!(
            "xtask: missing Debian packages {missing:?}; run as root to install them, or: apt-get install {}",
            missing.join(" ")
        );
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The repository root (xtask lives one level below it).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn run_bench() -> Result<()> {
    if !is_root() {
        bail!("the benchmark builds its images with debootstrap and chroot: run it as root");
    }
    ensure_packages(&bench::PACKAGES)?;
    let cache = match env::var_os("TANDEM_BENCH_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(|| PathBuf::from("/var/tmp"))
            .join("tandem-bench"),
    };
    bench::bench(&repo_root(), &cache)
}

fn test() -> Result<()> {
    ensure_packages(&PACKAGES)?;
    run(cargo().args(["test", "--workspace", "--all-targets"]))
}

fn lint() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}

fn say(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

/// Runs `updatectl` and shows its command line and output.
fn updatectl(bin: &Path, args: &[&str]) -> Result<()> {
    println!("$ updatectl {}", args.join(" "));
    run(Command::new(bin)
        .args(args)
        .args(["--cmdline", "/dev/null"]))
}

/// What `cgpt` reads for a slot partition: the independent check.
fn cgpt(image: &str, number: &str, label: &str) -> Result<()> {
    let field = |flag: &str| -> Result<String> {
        Ok(
            output(Command::new("cgpt").args(["show", "-i", number, flag, image]))?
                .trim()
                .to_string(),
        )
    };
    println!(
        "  cgpt reads {label}: priority={} tries={} successful={}",
        field("-P")?,
        field("-T")?,
        field("-S")?
    );
    Ok(())
}

/// One boot as GRUB's `gptprio.next` does it: pick, spend a try, write back.
fn grub_boot(image: &Path) -> Result<String> {
    let disk = GptDisk::open_for_update(image)?;
    let slots = find_slots(
        &disk.partitions(),
        disk.sector_size(),
        disk.size_bytes(),
        &SlotLayout::default(),
    )?;
    let mut backend = GptPrioBackend::new(disk, slots);
    let before = backend.next_boot();
    let Some(booted) = backend.simulate_grub_boot()? else {
        bail!("GRUB would find nothing to boot");
    };
    drop(backend); // releases the disk's exclusive lock before reading again
    let after = GptDisk::open(image)?
        .partitions()
        .into_iter()
        .find(|p| p.number == booted.number)
        .map(|p| p.attributes);
    let spent = after != Some(booted.attributes);
    println!(
        "  (GRUB gptprio.next boots {}{})",
        booted.name,
        if spent { " and spends a try" } else { "" }
    );
    if before.map(|s| s.to_string()) != booted.name.strip_prefix("USR-").map(str::to_string) {
        bail!(
            "updatectl predicted {before:?}, GRUB's rule booted {}",
            booted.name
        );
    }
    Ok(booted.name)
}

fn demo() -> Result<()> {
    ensure_packages(&PACKAGES)?;
    run(cargo().args([
        "build",
        "--quiet",
        "--package",
        "updater",
        "--bin",
        "updatectl",
    ]))?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no workspace")?;
    let bin = root.join("target/debug/updatectl");
    let work = env::temp_dir().join(format!("tandem-demo-{}", std::process::id()));
    fs::create_dir_all(&work)?;
    let result = demo_on(&bin, &work);
    let _ = fs::remove_dir_all(&work);
    result
}

fn demo_on(bin: &Path, dir: &Path) -> Result<()> {
    say("A node's disk as ACL/Flatcar lays it out (made by sgdisk)");
    // The tests' image: ESP, USR-A, USR-B, ROOT; A good at priority 1
    // as the image builder ships it, B empty.
    let made = tandem_testkit::DiskImage::flatcar(dir);
    let image = made.path_str();
    let image_path = made.path.as_path();
    updatectl(bin, &["slots", "--disk", image])?;

    say("Stage an update in B: set it next, on trial (1 try)");
    updatectl(bin, &["slots", "set-next", "B", "--disk", image])?;
    cgpt(image, "4", "USR-B")?;

    say("Reboot into B, which never gets marked good (say it hangs)");
    let first = grub_boot(image_path)?;
    say("Reboot again: its try is spent, so GRUB falls back to A");
    let second = grub_boot(image_path)?;
    if (first.as_str(), second.as_str()) != ("USR-B", "USR-A") {
        bail!("expected B then A, GRUB's rules gave {first} then {second}");
    }
    updatectl(bin, &["slots", "--disk", image])?;

    say("Stage B again; this time it boots and the health check passes");
    updatectl(bin, &["slots", "set-next", "B", "--disk", image])?;
    let third = grub_boot(image_path)?;
    updatectl(bin, &["slots", "mark-good", "B", "--disk", image])?;
    cgpt(image, "4", "USR-B")?;
    let fourth = grub_boot(image_path)?;

    say("Summary");
    println!("  boot 1: {first} (trial)   boot 2: {second} (fallback)");
    println!("  boot 3: {third} (trial)   boot 4: {fourth} (marked good, stays)");
    cgpt(image, "3", "USR-A")?;
    cgpt(image, "4", "USR-B")?;
    println!("\nNext issues grow this into a whole update: signed payloads streamed into B,\nthe daemon, health checks and real reboots in a VM.");
    Ok(())
}
