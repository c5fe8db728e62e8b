//! The VM parts of `cargo xtask`: `vm-test` (the four boot scenarios in
//! QEMU) and `demo` (the update and health-failure scenarios, narrated).

use std::time::Instant;

use anyhow::{bail, Result};
use tandem_qemu_tests::scenario;
use tandem_qemu_tests::vm::{Accel, BootLine, Report, VmOptions};

use crate::{cargo, ensure_packages, is_root, run, say};

/// Debian packages the VM tests and the demo need: QEMU, OVMF, systemd-boot
/// (the EFI binary), debootstrap for the test roots, mtools and dosfstools
/// for the ESP, binutils to strip the binaries put in the images (and
/// objcopy the UKIs), cryptsetup-bin for the ACL disk's hash trees.
pub const VM_PACKAGES: [&str; 8] = [
    "qemu-system-x86",
    "ovmf",
    "systemd-boot-efi",
    "debootstrap",
    "mtools",
    "dosfstools",
    "binutils",
    "cryptsetup-bin",
];

/// The VM test targets of `qemu-tests/` (`test = false` there: a plain
/// `cargo test` does not boot VMs).
pub const VM_TESTS: [&str; 2] = ["scenarios", "acl"];

/// Builds `tandemd`, `updatectl` and `tandem-release` (debug), with the
/// rest of the workspace's programs: the same package selection as every
/// other cargo call of `cargo xtask`, so the dependencies are compiled
/// once, with one set of features, not once per selection.
pub fn build_binaries() -> Result<()> {
    run(cargo().args(["build", "--quiet", "--workspace", "--bins"]))
}

fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} builds Debian roots with debootstrap and chroot: run it as root");
    }
    Ok(())
}

/// `cargo xtask vm-test`: the scenarios (the generic layout's and the ACL
/// layout's), two VMs at a time.
pub fn vm_test() -> Result<()> {
    require_root("the VM tests")?;
    ensure_packages(&VM_PACKAGES)?;
    build_binaries()?;
    let started = Instant::now();
    let mut args = vec!["test", "--workspace"];
    for name in VM_TESTS {
        args.extend(["--test", name]);
    }
    args.extend(["--", "--test-threads=2"]);
    run(cargo().args(args))?;
    eprintln!(
        "xtask: VM tests passed in {}s ({:?})",
        started.elapsed().as_secs(),
        Accel::detect()
    );
    Ok(())
}

fn path_of(boots: &[BootLine]) -> String {
    boots
        .iter()
        .map(|b| format!("{} ({})", b.version, b.device))
        .collect::<Vec<_>>()
        .join(" -> ")
}

fn summary_line(report: &Report) -> String {
    format!(
        "{} on slot {} (health {}), entries: {}",
        report.version,
        report.slot(),
        report.status["health"].as_str().unwrap_or("?"),
        report.entries.join(" ")
    )
}

/// `cargo xtask demo`: builds the test images if they are not cached,
/// then runs the update and the health-failure scenarios with the guest's
/// console shown.
pub fn demo() -> Result<()> {
    require_root("the demo")?;
    ensure_packages(&crate::PACKAGES)?;
    ensure_packages(&VM_PACKAGES)?;
    say("Building tandemd, updatectl and tandem-release");
    build_binaries()?;
    say("Test images: Debian slot images 1.0.0 to 4.0.0, signed payloads, an A/B disk (cached)");
    let built = scenario::built_for_tests()?;
    let accel = Accel::detect();
    println!(
        "QEMU runs with {accel:?}{}",
        if accel == Accel::Tcg {
            " (no usable KVM: each boot takes about 40 s)"
        } else {
            ""
        }
    );
    let shown = VmOptions {
        echo_console: true,
        ..VmOptions::default()
    };
    say("Scenario 1, update: 1.0.0 in slot A is updated to 2.0.0 in slot B");
    let update = scenario::update(&built, shown.clone(), &say)?;
    say("Scenario 2, health failure: from 2.0.0, 3.0.0 boots but fails its health check");
    let failure = scenario::health_failure(&built, shown, &say)?;

    say("Summary");
    println!("update:");
    println!("  boots:  {}", path_of(&update.boots));
    println!("  before: {}", summary_line(&update.before));
    println!("  after:  {}", summary_line(&update.after));
    println!("health failure:");
    println!("  boots:  {}", path_of(&failure.boots));
    println!("  before: {}", summary_line(&failure.before));
    println!("  after:  {}", summary_line(&failure.after));
    for event in failure.after.events("health-failed") {
        println!(
            "  failed check: {} {}",
            event["message"].as_str().unwrap_or_default(),
            event["output"]
                .as_str()
                .unwrap_or_default()
                .replace('\n', " | ")
        );
    }
    for event in failure.after.events("rollback") {
        println!(
            "  rollback: {}",
            event["message"].as_str().unwrap_or_default()
        );
    }
    println!("  blocked: {}", failure.after.status["blocked"]);
    println!(
        "\nConsoles and disks: {} and {}",
        update.dir.display(),
        failure.dir.display()
    );
    Ok(())
}
