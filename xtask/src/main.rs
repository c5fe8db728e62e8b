//! `cargo xtask`: the project's own tasks.
//!
//! - `cargo xtask test`: installs the Debian packages the tests need (when
//!   run as root), then runs every test in the workspace, the VM tests last.
//! - `cargo xtask cluster-build`: builds (once, cached) the Kubernetes
//!   control plane the cluster tests run against, and prints the
//!   `TANDEM_CONTROL_PLANE` to set for running them by hand.
//! - `cargo xtask fleet-bench`: tandem-operator rolling 1,000 simulated
//!   nodes on the real control plane (time against the ideal, API requests
//!   per node, peak RSS, and the halt at a 20% failure rate).
//! - `cargo xtask vm-test`: only the VM tests (`qemu-tests/`): eight boot
//!   scenarios (four of the generic layout, four of the ACL layout) in QEMU
//!   with OVMF, systemd-boot and real reboots.
//! - `cargo xtask lint`: `cargo fmt --check` and `cargo clippy -D warnings`.
//! - `cargo xtask bench`: tandem's payloads against zstd, lz4 and xdelta3
//!   on a real Debian security update (see `bench.rs`).
//! - `cargo xtask demo`: tandem's main job in a VM: an update to slot B
//!   booted and kept, then an update whose health check fails, rolled back.
//! - `cargo xtask fuzz [--seconds N] [TARGET...]`: every fuzz target
//!   (cargo-fuzz, libFuzzer) for a bounded time, the saved crashes
//!   replayed, and the planted bug found (`fuzz.rs`).
//! - `cargo xtask man [--out DIR]`: the manuals and shell completions,
//!   generated from the programs' clap definitions (default `target/man`).
//! - `cargo xtask install [--prefix DIR]`: the release binaries, manuals
//!   and completions under DIR (default `/usr/local`).
//! - `cargo xtask demo-disk`: the same loop on a disk image with the reboot
//!   simulated (no VM): payloads, the daemon, GRUB's gptprio rules.

mod bench;
mod cluster;
mod fuzz;
mod install;
mod vm;

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use bootconfig::backend::GptPrioBackend;
use bootconfig::gpt::GptDisk;
use bootconfig::slots::find_slots;
use bootconfig::{BootBackend, SlotLayout};

/// Debian packages the tests and the demo run: sgdisk, cgpt, bootctl,
/// GnuPG (payload signatures made and checked by gpg), mkfs.ext4, the
/// Prometheus reference parser (the metrics test reads tandem's metrics
/// with it), openssl and curl (the cluster tests' certificates and the API
/// server's readiness), mkfs.erofs, man.
pub(crate) const PACKAGES: [&str; 17] = [
    "gdisk",
    "cgpt",
    "systemd-boot",
    "gnupg",
    "e2fsprogs",
    "dbus-daemon",
    "util-linux",
    "python3-prometheus-client",
    "openssl",
    "curl",
    // veritysetup checks tandem's verity code; objcopy and systemd's EFI
    // stub make the test UKIs.
    "cryptsetup-bin",
    "binutils",
    "systemd-boot-efi",
    // mkfs.erofs makes the lz4hc erofs images the erofs reader and the
    // erofs operation are tested on.
    "erofs-utils",
    // `man` reads the generated manuals in the install test.
    "man-db",
    // The status document is checked against its JSON Schema by an
    // independent validator.
    "python3-jsonschema",
    // socat terminates TLS in front of the test HTTP server (HTTPS tests).
    "socat",
];

fn main() -> std::process::ExitCode {
    let task = env::args().nth(1).unwrap_or_default();
    let result = match task.as_str() {
        "test" => test(),
        "lint" => lint(),
        "demo" => vm::demo(),
        "demo-disk" => demo(),
        "vm-test" => vm::vm_test(),
        "cluster-build" => cluster::build_task(),
        "fleet-bench" => cluster::fleet_bench(),
        "bench" => run_bench(),
        "fuzz" => fuzz::fuzz_task(&env::args().skip(2).collect::<Vec<_>>()),
        "man" => install::man_task(&env::args().skip(2).collect::<Vec<_>>()),
        "install" => install::install_task(&env::args().skip(2).collect::<Vec<_>>()),
        _ => Err(anyhow::anyhow!(
            "unknown task {task:?}; usage: cargo xtask test | vm-test | cluster-build | fleet-bench | lint | demo | demo-disk | bench | fuzz | man | install"
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

pub(crate) fn cargo() -> Command {
    Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".to_string()))
}

pub(crate) fn run(command: &mut Command) -> Result<()> {
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

pub(crate) fn is_root() -> bool {
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
pub(crate) fn ensure_packages(packages: &[&str]) -> Result<()> {
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
/// The workspace's target folder (`CARGO_TARGET_DIR`, else `target/`).
pub(crate) fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

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
    let control_plane = cluster::build()?;
    // The cluster tests run the binaries of other crates (tandemd,
    // updatectl, tandem-agent): built first, as they ship.
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    run(cargo()
        .args(["test", "--workspace", "--all-targets"])
        .env("TANDEM_CONTROL_PLANE", &control_plane))?;
    vm::vm_test()
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
    ]))?;
    // The VM scenarios are `test = false` (see qemu-tests/Cargo.toml), so
    // `--all-targets` leaves them out: named here.
    let mut vm_tests = vec!["clippy", "--workspace"];
    for name in vm::VM_TESTS {
        vm_tests.extend(["--test", name]);
    }
    vm_tests.extend(["--", "-D", "warnings"]);
    run(cargo().args(vm_tests))
}

pub(crate) fn say(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

/// Runs `updatectl` and shows its command line and output.
fn updatectl(bin: &Path, args: &[&str]) -> Result<()> {
    println!("$ updatectl {}", args.join(" "));
    run(Command::new(bin)
        .args(args)
        .args(["--cmdline", "/dev/null"]))
}

/// Runs `tandem-release` and shows its command line and output.
fn release(tool: &Path, args: &[&str]) -> Result<()> {
    println!("$ tandem-release {}", args.join(" "));
    run(Command::new(tool).args(args))
}

/// A loop device over one partition of a disk image; detached on drop.
struct LoopPartition(String);

impl LoopPartition {
    fn attach(image: &Path, number: u32) -> Result<LoopPartition> {
        let field = |flag: &str| -> Result<u64> {
            output(
                Command::new("cgpt")
                    .args(["show", "-i", &number.to_string(), flag])
                    .arg(image),
            )?
            .trim()
            .parse::<u64>()
            .context("cgpt printed no number")
        };
        let (start, size) = (field("-b")? * 512, field("-s")? * 512);
        let device = output(
            Command::new("losetup")
                .args(["--find", "--show", "--offset", &start.to_string()])
                .args(["--sizelimit", &size.to_string()])
                .arg(image),
        )
        .context("attaching a loop device (needs root)")?;
        Ok(LoopPartition(device.trim().to_owned()))
    }
}

impl Drop for LoopPartition {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Two versions of a /usr tree, as ext4 images the size of a slot.
fn make_usr_images(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let tree = dir.join("usr-tree");
    fs::create_dir_all(tree.join("lib/modules/6.1.0-50")).context("creating the tree")?;
    fs::create_dir_all(tree.join("bin")).context("creating the tree")?;
    let write = |path: PathBuf, bytes: Vec<u8>| {
        fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
    };
    for i in 0..24u64 {
        let module = tandem_testkit::text(i, 60_000 + i as usize * 3000);
        write(tree.join(format!("lib/modules/6.1.0-50/mod{i}.ko")), module)?;
    }
    write(
        tree.join("bin/containerd"),
        tandem_testkit::noise(1, 3 << 20),
    )?;
    write(tree.join("bin/runc"), tandem_testkit::noise(2, 1 << 20))?;
    let mkfs = |image: &Path| {
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-L", "usr"])
            .args(["-U", "6b8f1c2e-3d4a-4b5c-9e6f-7a8b9c0d1e2f"])
            .args([
                "-E",
                "hash_seed=0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0,root_owner=0:0",
            ])
            .arg("-d")
            .arg(&tree)
            .arg(image)
            .arg("16M")
            .env("E2FSPROGS_FAKE_TIME", "1700000000"))
    };
    let v1 = dir.join("usr-4230.2.0.img");
    mkfs(&v1)?;
    // The next release: a new kernel's modules (moved, a few edited), a new runc.
    fs::rename(
        tree.join("lib/modules/6.1.0-50"),
        tree.join("lib/modules/6.1.0-56"),
    )
    .context("renaming the modules")?;
    for i in (0..24u64).step_by(4) {
        let path = tree.join(format!("lib/modules/6.1.0-56/mod{i}.ko"));
        let mut module = fs::read(&path).context("reading a module")?;
        module.splice(500..500, b" security fix ".iter().copied());
        write(path, module)?;
    }
    write(tree.join("bin/runc"), tandem_testkit::noise(3, 1 << 20))?;
    let v2 = dir.join("usr-4230.2.1.img");
    mkfs(&v2)?;
    Ok((v1, v2))
}

/// Returns the 4230.2.0 image, for the daemon's part of the demo.
fn payload_demo(tool: &Path, dir: &Path, disk: &Path) -> Result<PathBuf> {
    say("Release engineering: two /usr images (ext4), a signing key, a full and a delta payload");
    let (v1, v2) = make_usr_images(dir)?;
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let (key, keyring) = (p("release.key.asc"), p("keyring.asc"));
    let (v1s, v2s) = (v1.to_string_lossy(), v2.to_string_lossy());
    release(
        tool,
        &[
            "keygen",
            "--user-id",
            "ACL release <release@example.invalid>",
            "--secret",
            &key,
            "--public",
            &keyring,
        ],
    )?;
    release(
        tool,
        &[
            "full",
            "--image",
            &v1s,
            "--version",
            "4230.2.0",
            "--key",
            &key,
            "-o",
            &p("4230.2.0.tpl"),
            "-q",
        ],
    )?;
    release(
        tool,
        &[
            "full",
            "--image",
            &v2s,
            "--version",
            "4230.2.1",
            "--key",
            &key,
            "-o",
            &p("4230.2.1.tpl"),
            "-q",
        ],
    )?;
    release(
        tool,
        &[
            "delta",
            "--source",
            &v1s,
            "--source-version",
            "4230.2.0",
            "--image",
            &v2s,
            "--version",
            "4230.2.1",
            "--key",
            &key,
            "-o",
            &p("4230.2.0-4230.2.1.tpl"),
            "-q",
        ],
    )?;
    release(
        tool,
        &["verify", &p("4230.2.0-4230.2.1.tpl"), "--keyring", &keyring],
    )?;

    say("The node was installed with 4230.2.0 in slot A (the full payload, written through a loop device)");
    let slot_a = LoopPartition::attach(disk, 3)?;
    let slot_b = LoopPartition::attach(disk, 4)?;
    release(
        tool,
        &[
            "apply",
            &p("4230.2.0.tpl"),
            "--keyring",
            &keyring,
            "--target",
            &slot_a.0,
            "-q",
        ],
    )?;

    say("A tampered delta is refused before anything is written to slot B");
    let mut tampered = fs::read(p("4230.2.0-4230.2.1.tpl")).context("reading the delta")?;
    tampered[100] ^= 1;
    fs::write(p("tampered.tpl"), tampered).context("writing the tampered delta")?;
    println!(
        "$ tandem-release apply tampered.tpl --keyring keyring.asc --source {} --target {}",
        slot_a.0, slot_b.0
    );
    let refused = Command::new(tool)
        .args([
            "apply",
            &p("tampered.tpl"),
            "--keyring",
            &keyring,
            "--source",
            &slot_a.0,
            "--target",
            &slot_b.0,
            "-q",
        ])
        .status()
        .context("running tandem-release")?;
    if refused.success() {
        bail!("the tampered payload was applied");
    }

    say("Running A, the node streams the delta into slot B; interrupted after 2 MiB, then resumed");
    let checkpoint = p("apply.checkpoint");
    let apply = |extra: &[&str]| -> Result<()> {
        let mut args = vec![
            "apply",
            &p("4230.2.0-4230.2.1.tpl"),
            "--keyring",
            &keyring,
            "--source",
            &slot_a.0,
            "--target",
            &slot_b.0,
            "--checkpoint",
            &checkpoint,
            "-q",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        release(tool, &args)
    };
    apply(&["--stop-after", "2097152", "--threads", "1"])?;
    apply(&[])?;
    let written = fs::read(&slot_b.0).context("reading slot B")?;
    let expected = fs::read(&v2).context("reading the new image")?;
    if written[..expected.len()] != expected[..] {
        bail!("slot B does not hold 4230.2.1");
    }
    println!(
        "  slot B now holds 4230.2.1, byte for byte; sizes: full {} KiB, delta {} KiB",
        fs::metadata(p("4230.2.1.tpl"))
            .map(|m| m.len() / 1024)
            .unwrap_or(0),
        fs::metadata(p("4230.2.0-4230.2.1.tpl"))
            .map(|m| m.len() / 1024)
            .unwrap_or(0)
    );
    Ok(v1)
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
    vm::build_binaries()?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no workspace")?;
    let bin = root.join("target/debug/updatectl");
    let work = env::temp_dir().join(format!("tandem-demo-{}", std::process::id()));
    fs::create_dir_all(&work)?;
    let tool = root.join("target/debug/tandem-release");
    let result = demo_on(&bin, &tool, &work);
    let _ = fs::remove_dir_all(&work);
    result
}

fn demo_on(bin: &Path, tool: &Path, dir: &Path) -> Result<()> {
    say("A node's disk as ACL/Flatcar lays it out (made by sgdisk)");
    // The tests' image: ESP, USR-A, USR-B, ROOT; A good at priority 1
    // as the image builder ships it, B empty.
    let made = tandem_testkit::DiskImage::flatcar(dir);
    let image = made.path_str();
    let image_path = made.path.as_path();
    updatectl(bin, &["slots", "--disk", image])?;

    let v1 = payload_demo(tool, dir, image_path)?;

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

    daemon_demo(bin, tool, dir, &v1)?;
    println!(
        "\nThe next issue boots all of this for real in a VM (firmware, bootloader, kernel, reboots)."
    );
    Ok(())
}

/// The whole update the daemon's way: a signed index served on 127.0.0.1,
/// tandemd on a private D-Bus, `updatectl apply` from the shell.
fn daemon_demo(bin: &Path, tool: &Path, dir: &Path, v1: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    say("A fresh node: 4230.2.0 in slot A of a new disk");
    let node = dir.join("node");
    fs::create_dir_all(&node)?;
    let disk = tandem_testkit::DiskImage::flatcar(&node);
    let offset = output(
        Command::new("cgpt")
            .args(["show", "-i", "3", "-b"])
            .arg(&disk.path),
    )?
    .trim()
    .parse::<u64>()
    .context("cgpt printed no number")?
        * 512;
    let image = fs::read(v1).context("reading the 4230.2.0 image")?;
    fs::OpenOptions::new()
        .write(true)
        .open(&disk.path)?
        .write_all_at(&image, offset)
        .context("writing slot A")?;

    say("The release server: a signed index with the full payload and the delta, on 127.0.0.1");
    let www = dir.join("www");
    fs::create_dir_all(&www)?;
    for name in ["4230.2.1.tpl", "4230.2.0-4230.2.1.tpl"] {
        fs::copy(dir.join(name), www.join(name)).with_context(|| format!("copying {name}"))?;
    }
    let w = |name: &str| www.join(name).to_string_lossy().into_owned();
    release(
        tool,
        &[
            "index",
            "add",
            "--index",
            &w("stable.json"),
            "--full",
            &w("4230.2.1.tpl"),
            "--delta",
            &w("4230.2.0-4230.2.1.tpl"),
        ],
    )?;
    let key = dir.join("release.key.asc").to_string_lossy().into_owned();
    release(
        tool,
        &["index", "sign", "--index", &w("stable.json"), "--key", &key],
    )?;
    let server = tandem_testkit::http::HttpServer::serve(&www);

    say("The node's configuration (/etc/tandem/config.d/50-demo.toml)");
    let root = node.join("root");
    let conf_dir = root.join("etc/tandem/config.d");
    let keys = root.join("etc/tandem/keys.d");
    fs::create_dir_all(&conf_dir)?;
    fs::create_dir_all(&keys)?;
    fs::copy(dir.join("keyring.asc"), keys.join("release.asc"))?;
    fs::write(
        node.join("cmdline"),
        format!("mount.usr=PARTUUID={} ro\n", disk.partuuid(3)),
    )?;
    fs::write(
        node.join("os-release"),
        "NAME=\"Azure Container Linux\"\nVERSION_ID=4230.2.0\n",
    )?;
    fs::write(
        node.join("machine-id"),
        "5e1ec7ed5e1ec7ed5e1ec7ed5e1ec7ed\n",
    )?;
    let conf = format!(
        "state_dir = \"{state}\"\n[server]\nindex_url = \"{index}\"\n[slots]\ndisk = \"{disk}\"\n[keys]\ndirs = [\"{keys}\"]\n[system]\ncmdline = \"{n}/cmdline\"\nos_release = \"{n}/os-release\"\nmachine_id = \"{n}/machine-id\"\nboot_id = \"{n}/boot_id\"\n[schedule]\nmode = \"off\"\n[apply]\ncheckpoint_mib = 4\n[reboot]\nstrategy = \"immediate\"\n# The demo records the reboot instead of rebooting this machine.\ncommand = [\"sh\", \"-c\", \"echo \\\"reboot asked for: $TANDEM_REBOOT_REASON\\\" >> {n}/reboots\"]\nrequired_file = \"{n}/reboot-required\"\n[health]\ndirs = [\"{root}/etc/tandem/health.d\"]\ndeadline_seconds = 60\n",
        state = node.join("state").display(),
        index = server.url("stable.json"),
        disk = disk.path.display(),
        keys = keys.display(),
        n = node.display(),
        root = root.display(),
    );
    fs::write(conf_dir.join("50-demo.toml"), &conf)?;
    fs::write(node.join("boot_id"), "demo-boot-1\n")?;
    let health_d = root.join("etc/tandem/health.d");
    fs::create_dir_all(&health_d)?;
    {
        use std::os::unix::fs::PermissionsExt;
        let check = health_d.join("50-containerd");
        fs::write(
            &check,
            "#!/bin/sh\n# A stand-in for a real node check (containerd answers, pods run).\necho \"containers fine on $TANDEM_VERSION (slot $TANDEM_SLOT)\"\n",
        )?;
        fs::set_permissions(&check, fs::Permissions::from_mode(0o755))?;
    }
    print!("{conf}");

    say("tandemd on a private system bus (with the shipped D-Bus policy)");
    let bus_dir = node.join("bus");
    fs::create_dir_all(&bus_dir)?;
    let bus = tandem_testkit::dbus::DbusDaemon::start(&bus_dir);
    let tandemd = bin.with_file_name("tandemd");
    let log = node.join("tandemd.log");
    let start = || -> Result<std::process::Child> {
        Command::new(&tandemd)
            .arg("--root")
            .arg(&root)
            .env("DBUS_SYSTEM_BUS_ADDRESS", bus.address())
            .stderr(
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)?,
            )
            .spawn()
            .with_context(|| format!("starting {}", tandemd.display()))
    };
    let mut daemon = start()?;
    let ctl = |args: &[&str]| -> Result<()> {
        println!("$ updatectl {}", args.join(" "));
        run(Command::new(bin)
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", bus.address()))
    };
    let wait_up = || -> Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !Command::new(bin)
            .arg("status")
            .env("DBUS_SYSTEM_BUS_ADDRESS", bus.address())
            .output()?
            .status
            .success()
        {
            if std::time::Instant::now() > deadline {
                bail!("tandemd did not come up: {}", fs::read_to_string(&log)?);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Ok(())
    };
    let mut result = (|| -> Result<()> {
        wait_up()?;
        ctl(&["status"])?;
        let disk_path = disk.path.to_string_lossy().into_owned();
        updatectl(bin, &["slots", "--disk", &disk_path])?;
        say("updatectl apply: check the index, stream the delta into B, verify, set B next");
        ctl(&["check"])?;
        ctl(&["apply"])?;
        ctl(&["status"])?;
        updatectl(bin, &["slots", "--disk", &disk_path])?;
        cgpt(&disk_path, "4", "USR-B")?;
        std::thread::sleep(std::time::Duration::from_secs(1));
        println!("Strategy immediate; the reboot action (a recorder here) was called:");
        print!(
            "{}",
            fs::read_to_string(node.join("reboots")).unwrap_or_default()
        );
        Ok(())
    })();
    let _ = daemon.kill();
    let _ = daemon.wait();
    if result.is_ok() {
        result = (|| -> Result<()> {
            say("The reboot (simulated): GRUB picks B and spends its try; tandemd starts on B");
            let staged = Command::new(bin)
                .args(["status", "--json", "--offline", "--root"])
                .arg(&root)
                .output()?;
            let status: serde_json::Value = serde_json::from_slice(&staged.stdout)
                .context("reading the status before the reboot")?;
            let version = status["staged"]["version"]
                .as_str()
                .ok_or_else(|| anyhow!("nothing was staged"))?
                .to_owned();
            let booted = grub_boot(&disk.path)?;
            let number = if booted == "USR-B" { 4 } else { 3 };
            fs::write(
                node.join("cmdline"),
                format!("mount.usr=PARTUUID={} ro\n", disk.partuuid(number)),
            )?;
            fs::write(
                node.join("os-release"),
                format!("NAME=\"Azure Container Linux\"\nVERSION_ID={version}\n"),
            )?;
            fs::write(node.join("boot_id"), "demo-boot-2\n")?;
            daemon = start()?;
            wait_up()?;
            say("tandemd assesses the new boot: health checks pass, slot B is marked good");
            ctl(&["health", "--wait"])?;
            ctl(&["status"])?;
            let disk_path = disk.path.to_string_lossy().into_owned();
            cgpt(&disk_path, "4", "USR-B")?;
            ctl(&["history"])?;
            ctl(&["metrics"])?;
            say("What the daemon logged");
            print!("{}", fs::read_to_string(&log)?);
            Ok(())
        })();
        let _ = daemon.kill();
        let _ = daemon.wait();
    }
    result
}
