//! `updatectl slots`: the low-level, daemon-free view of a disk's A/B slots
//! and the boot transitions on them, like `cgpt` or `bootctl`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use bootconfig::backend::{BlsBackend, GptPrioBackend};
use bootconfig::bls::EntriesDir;
use bootconfig::gpt::{CopyHealth, GptDisk};
use bootconfig::gptprio::SlotStatus;
use bootconfig::{cmdline, slots, BootBackend, HashArea, Slot, SlotBoot, SlotLayout, SlotName};
use serde::Serialize;

/// Version of the `updatectl slots --json` document; bumped on any
/// incompatible change.
pub const SLOTS_JSON_VERSION: u32 = 1;

/// Where the slots are and which backend keeps their boot state.
#[derive(Debug, Clone)]
pub struct Target {
    /// The disk; `None` means the disk holding the booted slot.
    pub disk: Option<PathBuf>,
    /// An ESP to use the BLS backend with; `None` means gptprio.
    pub esp: Option<PathBuf>,
    pub layout: SlotLayout,
    /// With an ESP: the slots boot UKIs (type #2 entries) tandem installs.
    pub ukis: bool,
    /// With gptprio (no `esp`): the ESP holding the slots' kernels at
    /// `flatcar/vmlinuz-a|b`, as on Flatcar, which tandem installs.
    pub kernels: Option<PathBuf>,
    /// Where the kernel command line is read from (`/proc/cmdline`).
    pub cmdline: PathBuf,
    /// The booted slot as the caller knows it; overrides the command line.
    pub booted: Option<SlotName>,
}

/// A boot transition asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    SetNext { slot: SlotName, tries: u8 },
    MarkGood(SlotName),
    MarkBad(SlotName),
    Cancel,
}

/// One slot in the report.
#[derive(Debug, Clone, Serialize)]
pub struct SlotReport {
    #[serde(flatten)]
    pub slot: Slot,
    pub booted: bool,
    pub boot: SlotBoot,
    /// Flatcar's layout: the slot's kernel on the ESP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<SlotKernel>,
}

/// A slot's kernel at `flatcar/vmlinuz-a|b`.
#[derive(Debug, Clone, Serialize)]
pub struct SlotKernel {
    pub path: PathBuf,
    /// Whether the file is there.
    pub present: bool,
    /// The dm-verity root hash the kernel image carries, if any.
    pub usrhash: Option<String>,
}

fn slot_kernel(esp: &Path, slot: SlotName) -> SlotKernel {
    let path = bootconfig::flatcar::KernelDir::new(esp).kernel(slot);
    let bytes = read_head(&path, 1024);
    SlotKernel {
        present: bytes.is_some(),
        usrhash: bytes.and_then(|b| bootconfig::flatcar::kernel_usrhash(&b)),
        path,
    }
}

/// The first `len` bytes of a file, or fewer if it is shorter.
fn read_head(path: &Path, len: u64) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(len).read_to_end(&mut bytes))
        .ok()?;
    Some(bytes)
}

/// What `updatectl slots` shows, and its `--json` document.
#[derive(Debug, Clone, Serialize)]
pub struct SlotsReport {
    pub format_version: u32,
    pub disk: PathBuf,
    pub backend: &'static str,
    pub esp: Option<PathBuf>,
    /// gptprio on Flatcar's layout: the ESP of the slots' kernels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernels: Option<PathBuf>,
    pub gpt_primary: CopyHealth,
    pub gpt_backup: CopyHealth,
    /// The slot the kernel was booted from, when the command line names one
    /// of this disk's slots.
    pub booted: Option<SlotName>,
    /// The slot the bootloader picks next, if it picks a slot.
    pub next_boot: Option<SlotName>,
    pub slots: Vec<SlotReport>,
}

fn read_cmdline(path: &Path) -> Result<String> {
    fs::read_to_string(path)
        .with_context(|| format!("cannot read the kernel command line {}", path.display()))
}

/// The whole disk that holds the booted slot, found from the command line's
/// PARTUUID through `/dev/disk/by-partuuid` and sysfs.
pub fn booted_disk(cmdline_path: &Path) -> Result<PathBuf> {
    let line = read_cmdline(cmdline_path)?;
    let partuuid = cmdline::booted_partuuid(&line).ok_or_else(|| {
        anyhow!(
            "cannot tell the booted slot from {} (no mount.usr=, verity.usr=, systemd.verity_usr_data=, usr= or root= naming a PARTUUID); pass --disk",
            cmdline_path.display()
        )
    })?;
    let link = PathBuf::from(format!("/dev/disk/by-partuuid/{partuuid}"));
    let partition = fs::canonicalize(&link).with_context(|| {
        format!(
            "booted partition {partuuid}: cannot resolve {}; pass --disk",
            link.display()
        )
    })?;
    let name = partition
        .file_name()
        .ok_or_else(|| anyhow!("{} has no device name", partition.display()))?;
    let sys = fs::canonicalize(Path::new("/sys/class/block").join(name))
        .with_context(|| format!("cannot find {} in /sys/class/block", partition.display()))?;
    if !sys.join("partition").exists() {
        bail!("{} is not a partition; pass --disk", partition.display());
    }
    let disk_name = sys
        .parent()
        .and_then(Path::file_name)
        .ok_or_else(|| anyhow!("cannot find the disk of {}", partition.display()))?;
    Ok(Path::new("/dev").join(disk_name))
}

/// A disk's slots, opened, with the backend that keeps their boot state.
pub struct Opened {
    pub disk_path: PathBuf,
    pub backend: Box<dyn BootBackend>,
    pub slots: [Slot; 2],
    pub primary: CopyHealth,
    pub backup: CopyHealth,
    pub booted: Option<SlotName>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("disk_path", &self.disk_path)
            .field("backend", &self.backend.name())
            .field("slots", &self.slots)
            .field("booted", &self.booted)
            .finish_non_exhaustive()
    }
}

/// Opens the disk and finds its slots; `for_update` opens it writable.
pub fn open(target: &Target, for_update: bool) -> Result<Opened> {
    let disk_path = match &target.disk {
        Some(path) => path.clone(),
        None => booted_disk(&target.cmdline)?,
    };
    let disk = if for_update {
        GptDisk::open_for_update(&disk_path)
    } else {
        GptDisk::open(&disk_path)
    }?;
    let found = slots::find_slots(
        &disk.partitions(),
        disk.sector_size(),
        disk.size_bytes(),
        &target.layout,
    )
    .with_context(|| format!("{}: cannot find the A/B slots", disk_path.display()))?;
    // The booted slot is only known when the command line names one of
    // this disk's slots; a missing /proc/cmdline is not an error with --disk.
    let booted = match (target.booted, &target.disk, read_cmdline(&target.cmdline)) {
        (Some(slot), _, _) => Some(slot),
        (None, _, Ok(line)) => cmdline::booted_slot(&line, &found),
        (None, Some(_), Err(_)) => None,
        (None, None, Err(e)) => return Err(e),
    };
    let primary = disk.primary_health().clone();
    let backup = disk.backup_health().clone();
    let backend: Box<dyn BootBackend> = match &target.esp {
        None => {
            let gptprio = GptPrioBackend::new(disk, found.clone());
            Box::new(match &target.kernels {
                Some(esp) => gptprio.with_kernels(esp),
                None => gptprio,
            })
        }
        Some(esp) if target.ukis => Box::new(BlsBackend::open_ukis(esp, found.clone())?),
        Some(esp) => Box::new(BlsBackend::open(EntriesDir::new(esp), found.clone())?),
    };
    Ok(Opened {
        disk_path,
        backend,
        slots: found,
        primary,
        backup,
        booted,
    })
}

/// The report of an opened disk.
pub fn report_of(target: &Target, opened: &Opened) -> SlotsReport {
    SlotsReport {
        format_version: SLOTS_JSON_VERSION,
        disk: opened.disk_path.clone(),
        backend: opened.backend.name(),
        esp: target.esp.clone(),
        kernels: target.kernels.clone(),
        gpt_primary: opened.primary.clone(),
        gpt_backup: opened.backup.clone(),
        booted: opened.booted,
        next_boot: opened.backend.next_boot(),
        slots: opened
            .slots
            .iter()
            .map(|slot| SlotReport {
                slot: slot.clone(),
                booted: opened.booted == Some(slot.name),
                boot: opened.backend.slot_boot(slot.name),
                kernel: target
                    .kernels
                    .as_deref()
                    .map(|esp| slot_kernel(esp, slot.name)),
            })
            .collect(),
    }
}

/// Reads the slots and their boot state without writing anything.
pub fn report(target: &Target) -> Result<SlotsReport> {
    let opened = open(target, false)?;
    Ok(report_of(target, &opened))
}

/// The slot `cancel` applies to: the one on trial that is not booted. Pure.
fn cancel_target(opened: &Opened) -> Result<SlotName> {
    let trying: Vec<SlotName> = SlotName::BOTH
        .into_iter()
        .filter(|&s| {
            Some(s) != opened.booted && opened.backend.slot_boot(s).status() == SlotStatus::Trying
        })
        .collect();
    match trying.as_slice() {
        [one] => Ok(*one),
        [] => bail!("nothing to cancel: no slot other than the booted one is set to boot on trial"),
        _ => bail!("both slots are on trial; say which to mark bad instead of cancel"),
    }
}

/// Applies a transition; returns the notes (GPT repairs) and the new state.
pub fn apply(target: &Target, action: Action) -> Result<(Vec<String>, SlotsReport)> {
    let mut opened = open(target, true)?;
    let disk = opened.disk_path.display().to_string();
    let notes = match action {
        Action::SetNext { slot, tries } => opened.backend.set_next(slot, tries),
        Action::MarkGood(slot) => opened.backend.mark_good(slot),
        Action::MarkBad(slot) => opened.backend.mark_bad(slot),
        Action::Cancel => {
            let slot = cancel_target(&opened)?;
            opened.backend.cancel(slot)
        }
    }
    .with_context(|| format!("{disk}: {}", describe(action)))?;
    Ok((notes, report_of(target, &opened)))
}

fn describe(action: Action) -> String {
    match action {
        Action::SetNext { slot, tries } => format!("set-next {slot} (tries {tries})"),
        Action::MarkGood(slot) => format!("mark-good {slot}"),
        Action::MarkBad(slot) => format!("mark-bad {slot}"),
        Action::Cancel => "cancel".to_string(),
    }
}

fn health_word(health: &CopyHealth) -> String {
    match health {
        CopyHealth::Sound => "sound".to_string(),
        CopyHealth::Corrupt(why) => format!("CORRUPT ({why})"),
        CopyHealth::Differs(why) => format!("DIFFERS ({why})"),
    }
}

fn status_word(status: SlotStatus) -> &'static str {
    match status {
        SlotStatus::Good => "good",
        SlotStatus::Trying => "trying",
        SlotStatus::Unbootable => "unbootable",
    }
}

/// The human-readable table. Pure.
pub fn render(report: &SlotsReport) -> String {
    let mut out = format!(
        "disk:    {}\nbackend: {}",
        report.disk.display(),
        report.backend
    );
    if let Some(esp) = &report.esp {
        out.push_str(&format!(" (ESP {})", esp.display()));
    }
    if let Some(esp) = &report.kernels {
        out.push_str(&format!(" (kernels in {}/flatcar)", esp.display()));
    }
    out.push('\n');
    if report.gpt_primary != CopyHealth::Sound || report.gpt_backup != CopyHealth::Sound {
        out.push_str(&format!(
            "GPT:     primary {}, backup {}; the next change rewrites both\n",
            health_word(&report.gpt_primary),
            health_word(&report.gpt_backup)
        ));
    }
    out.push('\n');
    for s in &report.slots {
        let marker = if s.booted { " (booted)" } else { "" };
        out.push_str(&format!(
            "slot {}{marker}\n  partition: {} {:?}\n  partuuid:  {}\n  offset:    {} bytes, size {} bytes\n",
            s.slot.name, s.slot.partition_number, s.slot.label, s.slot.partuuid, s.slot.offset, s.slot.size
        ));
        match &s.slot.hash {
            Some(HashArea::Partition(p)) => out.push_str(&format!(
                "  hash:      partition {} {:?} ({}, {} bytes)\n",
                p.partition_number, p.label, p.partuuid, p.size
            )),
            Some(HashArea::InSlot { offset }) => out.push_str(&format!(
                "  hash:      inside the slot from byte {offset}\n"
            )),
            None => {}
        }
        if let Some(p) = &s.slot.hash_sig {
            out.push_str(&format!(
                "  hash-sig:  partition {} {:?} ({})\n",
                p.partition_number, p.label, p.partuuid
            ));
        }
        if let Some(k) = &s.kernel {
            let what = match (k.present, &k.usrhash) {
                (false, _) => "missing".to_string(),
                (true, Some(h)) => format!("usrhash {h}"),
                (true, None) => "no usrhash".to_string(),
            };
            out.push_str(&format!("  kernel:    {} ({what})\n", k.path.display()));
        }
        match &s.boot {
            SlotBoot::Gptprio {
                priority,
                tries,
                successful,
                status,
            } => out.push_str(&format!(
                "  gptprio:   priority {priority}, tries {tries}, successful {} -> {}\n",
                u8::from(*successful),
                status_word(*status)
            )),
            SlotBoot::Bls {
                entry,
                version,
                tries_left,
                tries_done,
                status,
            } => {
                let entry = entry.as_deref().unwrap_or("(no entry)");
                let version = version.as_deref().unwrap_or("-");
                let counter = match (tries_left, tries_done) {
                    (Some(left), Some(done)) => format!(", {left} tries left, {done} done"),
                    _ => String::new(),
                };
                out.push_str(&format!(
                    "  entry:     {entry} (version {version}{counter}) -> {}\n",
                    status_word(*status)
                ));
            }
        }
    }
    let next = report
        .next_boot
        .map_or("no slot".to_string(), |s| format!("slot {s}"));
    out.push_str(&format!("\nboots next: {next}\n"));
    out
}
