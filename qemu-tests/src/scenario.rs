//! The four scenarios. Each boots a fresh copy of a test disk, drives the
//! guest through its agent (`updatectl apply VERSION`) or by cutting the
//! power, and returns what the guest printed: reports, early boot lines and
//! console text. The tests assert on those; the demo narrates them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::build::Built;
use crate::vm::{BootLine, Report, Vm, VmOptions};

/// Where scenario runs keep their disk copy, console and logs:
/// `$TANDEM_VM_RUNS`, else `/var/tmp/tandem-vm-runs`, one folder each.
pub fn run_dir(name: &str) -> PathBuf {
    std::env::var_os("TANDEM_VM_RUNS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/tandem-vm-runs"))
        .join(name)
}

fn vm(name: &str, built: &Built, version: &str, options: VmOptions) -> Result<Vm> {
    Vm::new(&run_dir(name), built, version, options)
}

/// The console text after the end of a boot's report.
fn console_after(text: &str, boot_id: &str) -> String {
    let marker = format!("TANDEM-REPORT-END boot_id={boot_id}");
    text.find(&marker)
        .map(|at| text[at + marker.len()..].to_string())
        .unwrap_or_default()
}

/// What a scenario's guest printed: the first boot's report, the last
/// one the scenario waited for, and every early boot line.
#[derive(Debug)]
pub struct Run {
    pub before: Report,
    pub after: Report,
    pub boots: Vec<BootLine>,
    pub dir: PathBuf,
}

/// *update*: 1.0.0 on A, `updatectl apply 2.0.0`, the immediate reboot,
/// systemd-boot boots B, health passes.
pub fn update(built: &Built, options: VmOptions, say: &dyn Fn(&str)) -> Result<Run> {
    let mut vm = vm("update", built, "1.0.0", options)?;
    say(&format!(
        "Booting the test node (1.0.0 in slot A) with {:?} ...",
        vm.accel
    ));
    vm.start()?;
    let before = vm.wait_report(1, "the first boot", |_| true)?;
    say(&format!(
        "Booted {} from slot {}. Asking it: updatectl apply 2.0.0",
        before.version,
        before.slot()
    ));
    vm.send("updatectl apply 2.0.0")?;
    say("tandemd writes 2.0.0 into slot B, verifies it, installs its kernel on the ESP, sets it next and reboots ...");
    let after = vm.wait_report(2, "a boot after the update", |r| {
        r.boot_id != before.boot_id
    })?;
    say(&format!(
        "Booted {} from slot {}; health: {}",
        after.version,
        after.slot(),
        after.status["health"].as_str().unwrap_or("?")
    ));
    let boots = crate::vm::parse_boot_lines(&vm.console());
    Ok(Run {
        before,
        after,
        boots,
        dir: vm.dir.clone(),
    })
}

/// *health failure*: 2.0.0 on A, apply 3.0.0, which boots and fails its
/// check; tandem marks it bad and reboots into 2.0.0.
pub fn health_failure(built: &Built, options: VmOptions, say: &dyn Fn(&str)) -> Result<Run> {
    let mut vm = vm("health-failure", built, "2.0.0", options)?;
    say("Booting the test node (2.0.0 in slot A) ...");
    vm.start()?;
    let before = vm.wait_report(1, "the first boot", |_| true)?;
    say(&format!(
        "Booted {} from slot {}. Asking it: updatectl apply 3.0.0 (its health check fails)",
        before.version,
        before.slot()
    ));
    vm.send("updatectl apply 3.0.0")?;
    vm.wait_boot_lines(2, "3.0.0 reaching userspace", |lines| {
        lines.iter().any(|l| l.version == "3.0.0")
    })?;
    say("3.0.0 booted; its health check runs ...");
    let after = vm.wait_report(3, "a boot of 2.0.0 after 3.0.0's", |r| {
        r.boot_id != before.boot_id && r.version == "2.0.0"
    })?;
    say(&format!(
        "Back on {} in slot {}.",
        after.version,
        after.slot()
    ));
    let boots = crate::vm::parse_boot_lines(&vm.console());
    Ok(Run {
        before,
        after,
        boots,
        dir: vm.dir.clone(),
    })
}

/// *never boots*: 2.0.0 on A, apply 4.0.0, which panics before userspace;
/// systemd-boot falls back once its try is spent.
#[derive(Debug)]
pub struct NeverBootsRun {
    pub before: Report,
    pub after: Report,
    pub boots: Vec<BootLine>,
    /// The console between the first report and the last.
    pub between: String,
    /// `updatectl apply` (the newest, 4.0.0) asked afterwards: exit code
    /// and output.
    pub apply_again: (i32, String),
    /// `updatectl status --json` after that.
    pub status_after: Value,
    pub dir: PathBuf,
}

pub fn never_boots(built: &Built, options: VmOptions, say: &dyn Fn(&str)) -> Result<NeverBootsRun> {
    let mut vm = vm("never-boots", built, "2.0.0", options)?;
    say("Booting the test node (2.0.0 in slot A) ...");
    vm.start()?;
    let before = vm.wait_report(1, "the first boot", |_| true)?;
    say("Asking it: updatectl apply 4.0.0 (it has no init)");
    vm.send("updatectl apply 4.0.0")?;
    let after = vm.wait_report(3, "a boot of 2.0.0 after 4.0.0's try", |r| {
        r.boot_id != before.boot_id
    })?;
    let console = vm.console();
    let between = console_after(&console, &before.boot_id);
    say("Back on 2.0.0; asking it to apply the newest release again");
    let apply_again = vm.run("updatectl apply", Duration::from_secs(300))?;
    let status_after = vm.status()?;
    Ok(NeverBootsRun {
        before,
        after,
        boots: crate::vm::parse_boot_lines(&console),
        between,
        apply_again,
        status_after,
        dir: vm.dir.clone(),
    })
}

/// *power cut*: 1.0.0 on A, apply 2.0.0 on a disk throttled to
/// `write_limit` bytes/s, QEMU killed once the guest reports the write
/// past `cut_at` of the slot; then powered on again unthrottled.
#[derive(Debug)]
pub struct PowerCutRun {
    pub before: Report,
    /// The guest's progress (`updatectl status --json`) last seen before
    /// the cut.
    pub progress_at_cut: Value,
    pub after: Report,
    pub boots: Vec<BootLine>,
    pub dir: PathBuf,
}

pub fn power_cut(
    built: &Built,
    write_limit: u64,
    cut_at: f64,
    say: &dyn Fn(&str),
) -> Result<PowerCutRun> {
    let options = VmOptions {
        write_limit: Some(write_limit),
        ..VmOptions::default()
    };
    let mut vm = vm("power-cut", built, "1.0.0", options)?;
    say("Booting the test node (1.0.0 in slot A) on a slow disk ...");
    vm.start()?;
    let before = vm.wait_report(1, "the first boot", |_| true)?;
    vm.send("updatectl apply 2.0.0 >/dev/null 2>&1 &")?;
    let deadline = Instant::now() + vm.accel.boot_timeout() * 2;
    let progress_at_cut = loop {
        let status = vm.status()?;
        let progress = &status["progress"];
        if progress["phase"] == "writing" && progress["fraction"].as_f64().unwrap_or(0.0) >= cut_at
        {
            break progress.clone();
        }
        if status["staged"].is_object() {
            bail!("the update finished before the power cut; lower the write limit");
        }
        if Instant::now() > deadline {
            bail!("the write never got past {cut_at}: {status}");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    say(&format!("Power cut at {progress_at_cut}"));
    vm.power_cut()?;
    vm.options.write_limit = None;
    say("Powering on again ...");
    vm.start()?;
    let after = vm.wait_report(3, "a boot of 2.0.0 after the power cut", |r| {
        r.version == "2.0.0"
    })?;
    let boots = crate::vm::parse_boot_lines(&vm.console());
    Ok(PowerCutRun {
        before,
        progress_at_cut,
        after,
        boots,
        dir: vm.dir.clone(),
    })
}

/// The built images for the tests: binaries from this workspace's
/// `target/debug` (or `TANDEM_BIN_DIR`), the default cache.
pub fn built_for_tests() -> Result<Built> {
    let bin_dir = std::env::var_os("TANDEM_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::build::repo_root().join("target/debug"));
    let bins = crate::build::Binaries::in_dir(&bin_dir)?;
    crate::build::build(&crate::build::default_cache(), &bins, &|s| eprintln!("{s}"))
        .context("building the VM test images")
}
