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

fn acl_vm(name: &str, built: &Built, options: VmOptions) -> Result<Vm> {
    Vm::on_disk(
        &run_dir(name),
        &built.acl.disk,
        &built.acl.release_disk,
        options,
    )
}

/// Flips one byte of the VM's disk (powered off) at `offset` into the
/// partition labelled `label`: the host side of the corruption scenarios.
fn corrupt(vm: &Vm, label: &str, offset: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let (start, size) = crate::acl::partition(vm.disk_path(), label)?;
    if offset >= size {
        bail!("offset {offset} is outside {label}");
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(vm.disk_path())?;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, start + offset)?;
    file.write_all_at(&[byte[0] ^ 0x5a], start + offset)?;
    file.sync_all()?;
    Ok(())
}

/// Syncs the guest's disk, then cuts the power.
fn sync_and_cut(vm: &mut Vm) -> Result<()> {
    vm.run_ok("sync")?;
    vm.power_cut()
}

/// *ACL update*: 1.0.0 on USR-A through dm-verity, `updatectl apply
/// 2.0.0` (a delta of usr, verity tree and UKI), the reboot into USR-B.
pub fn acl_update(built: &Built, options: VmOptions, say: &dyn Fn(&str)) -> Result<Run> {
    let mut vm = acl_vm("acl-update", built, options)?;
    say("Booting the ACL-layout node (1.0.0 in USR-A, /usr through dm-verity) ...");
    vm.start()?;
    let before = vm.wait_report(1, "the first boot", |_| true)?;
    vm.send("updatectl apply 2.0.0")?;
    let after = vm.wait_report(2, "a boot after the update", |r| {
        r.boot_id != before.boot_id
    })?;
    let boots = crate::vm::parse_boot_lines(&vm.console());
    Ok(Run {
        before,
        after,
        boots,
        dir: vm.dir.clone(),
    })
}

/// What a refused finalize left: the run, and `updatectl finalize`'s exit
/// code and output.
#[derive(Debug)]
pub struct RefusedRun {
    pub run: Run,
    pub finalize: (i32, String),
}

/// *ACL tree corrupted*: stage 2.0.0, power off, the host flips a byte of
/// HASH-B's tree, power on: `updatectl finalize` is refused and the node
/// keeps booting A.
pub fn acl_tree_corrupted(built: &Built, say: &dyn Fn(&str)) -> Result<RefusedRun> {
    let mut vm = acl_vm("acl-tree-corrupted", built, VmOptions::default())?;
    vm.start()?;
    let before = vm.wait_report(1, "the first boot", |_| true)?;
    let (rc, out) = vm.run("updatectl stage 2.0.0", Duration::from_secs(300))?;
    if rc != 0 {
        bail!("updatectl stage failed ({rc}): {out}");
    }
    sync_and_cut(&mut vm)?;
    // Past the superblock and the two upper levels (1 + 4 blocks for
    // 256 MiB): a level-0 hash block.
    say("Staged; the host flips a byte of HASH-B's tree");
    corrupt(&vm, "HASH-B", 10 * 4096 + 100)?;
    vm.start()?;
    let second = vm.wait_report(2, "the boot after the corruption", |r| {
        r.boot_id != before.boot_id
    })?;
    let finalize = vm.run("updatectl finalize", Duration::from_secs(300))?;
    vm.send("reboot")?;
    let after = vm.wait_report(3, "a boot after the refused finalize", |r| {
        r.boot_id != before.boot_id && r.boot_id != second.boot_id
    })?;
    let boots = crate::vm::parse_boot_lines(&vm.console());
    Ok(RefusedRun {
        run: Run {
            before,
            after,
            boots,
            dir: vm.dir.clone(),
        },
        finalize,
    })
}

/// *ACL USR corrupted*: stage and finalize 2.0.0 (set to boot, one try),
/// power off, the host flips a byte of USR-B's first block; verity fails
/// that boot, its try is spent, systemd-boot falls back to A.
#[derive(Debug)]
pub struct CorruptedBootRun {
    pub run: Run,
    /// The console of the failed boot.
    pub between: String,
}

pub fn acl_usr_corrupted(built: &Built, say: &dyn Fn(&str)) -> Result<CorruptedBootRun> {
    let mut vm = acl_vm("acl-usr-corrupted", built, VmOptions::default())?;
    vm.start()?;
    let before = vm.wait_report(1, "the first boot", |_| true)?;
    let (rc, out) = vm.run(
        "updatectl stage 2.0.0 && updatectl finalize --no-reboot",
        Duration::from_secs(300),
    )?;
    if rc != 0 {
        bail!("stage and finalize failed ({rc}): {out}");
    }
    sync_and_cut(&mut vm)?;
    say("Set to boot; the host flips a byte of USR-B's ext4 superblock");
    corrupt(&vm, "USR-B", 1024 + 56)?;
    vm.start()?;
    let after = vm.wait_report(2, "a boot of 1.0.0 after 2.0.0's failed try", |r| {
        r.boot_id != before.boot_id
    })?;
    let console = vm.console();
    Ok(CorruptedBootRun {
        between: console_after(&console, &before.boot_id),
        run: Run {
            before,
            after,
            boots: crate::vm::parse_boot_lines(&console),
            dir: vm.dir.clone(),
        },
    })
}

/// *ACL power cut*: apply 2.0.0 on a throttled disk and cut the power
/// while the UKI (the last component) is written; the ESP still boots A,
/// and the resumed update then boots B.
pub fn acl_power_cut(built: &Built, write_limit: u64, say: &dyn Fn(&str)) -> Result<PowerCutRun> {
    let options = VmOptions {
        write_limit: Some(write_limit),
        ..VmOptions::default()
    };
    let mut vm = acl_vm("acl-power-cut", built, options)?;
    vm.start()?;
    let before = vm.wait_report(1, "the first boot", |_| true)?;
    // The full payload: its UKI is written, not patched from A's.
    vm.send("updatectl apply --payload /srv/release/full-2.0.0.tpl >/dev/null 2>&1 &")?;
    let deadline = Instant::now() + vm.accel.boot_timeout() * 3;
    let progress_at_cut = loop {
        let status = vm.status()?;
        let progress = &status["progress"];
        let (_, list) = vm.run("ls -a /efi/EFI/Linux", Duration::from_secs(30))?;
        let writing_uki = list.contains(".tandem-slot-b.efi.new")
            && progress["fraction"].as_f64().unwrap_or(0.0) >= 0.95;
        if writing_uki {
            break status.clone();
        }
        if status["staged"].is_object() {
            bail!("the update finished before the power cut; lower the write limit");
        }
        if Instant::now() > deadline {
            bail!("never saw the UKI being written: {status}");
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    say(&format!(
        "Power cut while the UKI is written: {}",
        progress_at_cut["progress"]
    ));
    vm.power_cut()?;
    vm.options.write_limit = None;
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
