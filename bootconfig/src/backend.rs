//! The one small interface both boot backends implement, and the two
//! implementations: [`GptPrioBackend`] (GRUB gptprio bits in the GPT) and
//! [`BlsBackend`] (systemd-boot entries with boot counting).
//!
//! Each transition is decided by a pure function (in [`crate::gptprio`] or
//! [`crate::bls`]) and then written in one step.

use std::path::PathBuf;

use serde::Serialize;

use crate::bls::{self, BlsEntry, BlsError, BootCounter, EntriesDir, EntryStatus, NewEntry};
use crate::bootfiles::{self, BootFiles, BootFilesError};
use crate::cmdline;
use crate::flatcar::KernelDir;
use crate::gpt::{GptDisk, GptError, PartitionEntry};
use crate::gptprio::{self, GptPrio, SlotPair, SlotStatus, TransitionError};
use crate::slots::{Slot, SlotError};
use crate::ukidir::UkiDir;
use crate::SlotName;

/// Why a boot-selection operation failed. Nothing was written when it did,
/// except where an I/O error says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Gpt(#[from] GptError),
    #[error(transparent)]
    Bls(#[from] BlsError),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error(transparent)]
    BootFiles(#[from] BootFilesError),
    #[error("slot {slot} has no boot entry in {dir}")]
    NoEntry { slot: SlotName, dir: PathBuf },
    #[error("slot {slot} has {count} boot entries in {dir}; expected one")]
    ManyEntries {
        slot: SlotName,
        count: usize,
        dir: PathBuf,
    },
    #[error("the {backend} backend does not install UKIs")]
    NoUkis { backend: &'static str },
    #[error("the {backend} backend keeps no slot kernels on an ESP")]
    NoKernels { backend: &'static str },
    #[error(
        "refusing: systemd-boot would still boot {winner} first, not slot {slot}'s entry {entry}"
    )]
    WouldNotBootFirst {
        slot: SlotName,
        entry: String,
        winner: String,
    },
}

/// A slot's boot state, as its backend records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "backend", rename_all = "kebab-case")]
pub enum SlotBoot {
    Gptprio {
        priority: u8,
        tries: u8,
        successful: bool,
        status: SlotStatus,
    },
    Bls {
        /// The entry's file name; `None` when the slot has no entry.
        entry: Option<String>,
        version: Option<String>,
        tries_left: Option<u32>,
        tries_done: Option<u32>,
        status: SlotStatus,
    },
}

impl SlotBoot {
    pub fn status(&self) -> SlotStatus {
        match self {
            SlotBoot::Gptprio { status, .. } | SlotBoot::Bls { status, .. } => *status,
        }
    }
}

/// A bootloader family's view of the two slots.
pub trait BootBackend {
    /// The backend's name in config and output: `gptprio` or `bls`.
    fn name(&self) -> &'static str;
    fn slot_boot(&self, slot: SlotName) -> SlotBoot;
    /// The slot the bootloader picks on the next boot, if it is a slot.
    fn next_boot(&self) -> Option<SlotName>;
    /// Makes the slot unbootable before anything is written to it.
    fn clear(&mut self, slot: SlotName) -> Result<Vec<String>, BootError>;
    /// Boots the slot next, on trial, with `tries` attempts.
    fn set_next(&mut self, slot: SlotName, tries: u8) -> Result<Vec<String>, BootError>;
    fn mark_good(&mut self, slot: SlotName) -> Result<Vec<String>, BootError>;
    /// Never boots the slot again until it is set next; the other boots first.
    fn mark_bad(&mut self, slot: SlotName) -> Result<Vec<String>, BootError>;
    /// Undoes a set next of the slot.
    fn cancel(&mut self, slot: SlotName) -> Result<Vec<String>, BootError>;
    /// Whether a written slot's kernel must be installed (by [`install`])
    /// before the slot can be set next. gptprio's GRUB reads it from the
    /// slot itself.
    ///
    /// [`install`]: BootBackend::install
    fn installs_boot_files(&self) -> bool {
        false
    }
    /// Installs a written and verified slot's boot files and boot entry,
    /// with no tries left: the slot boots only once set next.
    fn install(
        &mut self,
        _slot: SlotName,
        _version: &str,
        _files: &BootFiles,
        _root_arg: &str,
    ) -> Result<Vec<String>, BootError> {
        Ok(Vec::new())
    }
    /// Whether the slot boots a UKI that comes with its payload (type #2
    /// entries) rather than a kernel read from the slot.
    fn boots_ukis(&self) -> bool {
        false
    }
    /// Where a slot's new UKI and addon are written before
    /// [`install_uki`](BootBackend::install_uki) places them.
    fn uki_staging(&self, _slot: SlotName) -> Option<(PathBuf, PathBuf)> {
        None
    }
    /// The slot's installed UKI and addon, if it has an entry.
    fn uki_files(&self, _slot: SlotName) -> Option<(PathBuf, Option<PathBuf>)> {
        None
    }
    /// Installs a written and verified slot's UKI (and addon) as its
    /// entry, with no tries left: the slot boots only once set next.
    fn install_uki(
        &mut self,
        _slot: SlotName,
        _uki: &std::path::Path,
        _addon: Option<&std::path::Path>,
    ) -> Result<Vec<String>, BootError> {
        Err(BootError::NoUkis {
            backend: self.name(),
        })
    }
    /// For gptprio on Flatcar's layout: where a slot's new kernel is
    /// written before [`install_kernel`](BootBackend::install_kernel)
    /// places it at `flatcar/vmlinuz-a|b`.
    fn kernel_staging(&self, _slot: SlotName) -> Option<PathBuf> {
        None
    }
    /// The slot's installed Flatcar kernel, if it has one.
    fn kernel_file(&self, _slot: SlotName) -> Option<PathBuf> {
        None
    }
    /// Installs a written and verified slot's staged kernel; the slot
    /// boots it only once set next.
    fn install_kernel(
        &mut self,
        _slot: SlotName,
        _staged: &std::path::Path,
    ) -> Result<Vec<String>, BootError> {
        Err(BootError::NoKernels {
            backend: self.name(),
        })
    }
}

/// gptprio: the state lives in the slots' GPT attribute words.
#[derive(Debug)]
pub struct GptPrioBackend {
    disk: GptDisk,
    slots: [Slot; 2],
    /// Flatcar's layout: the slots' kernels on an ESP.
    kernels: Option<KernelDir>,
}

impl GptPrioBackend {
    /// The backend over an open disk (opened for update to change anything).
    pub fn new(disk: GptDisk, slots: [Slot; 2]) -> Self {
        GptPrioBackend {
            disk,
            slots,
            kernels: None,
        }
    }

    /// The backend for Flatcar's layout: each slot boots its kernel at
    /// `flatcar/vmlinuz-a|b` on this ESP, which tandem installs.
    pub fn with_kernels(mut self, esp: &std::path::Path) -> Self {
        self.kernels = Some(KernelDir::new(esp));
        self
    }

    fn pair(&self) -> SlotPair {
        SlotPair {
            a: GptPrio::from_attributes(self.slots[0].attributes),
            b: GptPrio::from_attributes(self.slots[1].attributes),
        }
    }

    /// The whole table as `gptprio.next` sees it, with the partitions.
    fn candidates(&self) -> (Vec<gptprio::Candidate>, Vec<PartitionEntry>) {
        let partitions = self.disk.partitions();
        let table = partitions
            .iter()
            .map(|p| gptprio::Candidate {
                is_slot_type: p.type_guid == self.slots[0].type_guid,
                prio: GptPrio::from_attributes(p.attributes),
            })
            .collect();
        (table, partitions)
    }

    /// Does on the disk what GRUB's `gptprio.next` does at a boot: picks
    /// the partition, spends one of its tries, writes the table back.
    /// Returns the partition booted. For tests and demos that need the
    /// bootloader's side; tandem itself never calls it on a node.
    pub fn simulate_grub_boot(&mut self) -> Result<Option<PartitionEntry>, BootError> {
        let (mut table, partitions) = self.candidates();
        let Some(chosen) = gptprio::gptprio_next(&mut table) else {
            return Ok(None);
        };
        let booted = &partitions[chosen];
        let word = table[chosen].prio.attributes();
        if word != booted.attributes {
            self.disk.set_attributes(booted.number, word)?;
            self.disk.write()?;
            if let Some(slot) = self
                .slots
                .iter_mut()
                .find(|s| s.partition_number == booted.number)
            {
                slot.attributes = word;
            }
        }
        Ok(Some(booted.clone()))
    }

    /// Writes a new pair: changed attribute words, then both GPT copies.
    fn store(&mut self, pair: SlotPair) -> Result<Vec<String>, BootError> {
        for slot in SlotName::BOTH {
            let word = pair.get(slot).attributes();
            self.disk
                .set_attributes(self.slots[slot.index()].partition_number, word)?;
        }
        let repairs = self.disk.write()?;
        for slot in SlotName::BOTH {
            self.slots[slot.index()].attributes = pair.get(slot).attributes();
        }
        Ok(repairs)
    }
}

impl BootBackend for GptPrioBackend {
    fn name(&self) -> &'static str {
        "gptprio"
    }

    fn slot_boot(&self, slot: SlotName) -> SlotBoot {
        let word = self.pair().get(slot);
        SlotBoot::Gptprio {
            priority: word.priority(),
            tries: word.tries(),
            successful: word.successful(),
            status: word.status(),
        }
    }

    fn next_boot(&self) -> Option<SlotName> {
        // Ask GRUB's rule over the whole table: another partition of the
        // slot type could outrank both slots.
        let (mut table, partitions) = self.candidates();
        let chosen = partitions[gptprio::gptprio_next(&mut table)?].number;
        self.slots
            .iter()
            .find(|s| s.partition_number == chosen)
            .map(|s| s.name)
    }

    fn clear(&mut self, slot: SlotName) -> Result<Vec<String>, BootError> {
        let pair = self.pair().clear(slot);
        self.store(pair)
    }

    fn set_next(&mut self, slot: SlotName, tries: u8) -> Result<Vec<String>, BootError> {
        let pair = self.pair().set_next(slot, tries)?;
        self.store(pair)
    }

    fn mark_good(&mut self, slot: SlotName) -> Result<Vec<String>, BootError> {
        let pair = self.pair().mark_good(slot);
        self.store(pair)
    }

    fn mark_bad(&mut self, slot: SlotName) -> Result<Vec<String>, BootError> {
        let pair = self.pair().mark_bad(slot)?;
        self.store(pair)
    }

    fn cancel(&mut self, slot: SlotName) -> Result<Vec<String>, BootError> {
        let pair = self.pair().cancel(slot)?;
        self.store(pair)
    }

    fn kernel_staging(&self, slot: SlotName) -> Option<PathBuf> {
        Some(self.kernels.as_ref()?.staging(slot))
    }

    fn kernel_file(&self, slot: SlotName) -> Option<PathBuf> {
        self.kernels.as_ref()?.installed(slot)
    }

    fn install_kernel(
        &mut self,
        slot: SlotName,
        staged: &std::path::Path,
    ) -> Result<Vec<String>, BootError> {
        let Some(kernels) = &self.kernels else {
            return Err(BootError::NoKernels { backend: "gptprio" });
        };
        Ok(kernels.install(slot, staged)?)
    }
}

/// BLS: the state lives in the slots' entry file names on the ESP. A slot's
/// entry is the one whose options name the slot's PARTUUID.
#[derive(Debug)]
pub struct BlsBackend {
    dir: EntriesDir,
    /// Type #2 entries, read beside the type #1 ones, when the ESP's
    /// slots boot UKIs.
    ukis: Option<UkiDir>,
    slots: [Slot; 2],
    entries: Vec<BlsEntry>,
    default_pattern: Option<String>,
}

impl BlsBackend {
    /// Reads the entries of the ESP mounted at `esp`.
    pub fn open(dir: EntriesDir, slots: [Slot; 2]) -> Result<Self, BootError> {
        Self::open_with(dir, None, slots)
    }

    /// Reads both kinds of entries of the ESP; tandem installs UKIs
    /// (type #2) for the slots.
    pub fn open_ukis(esp: &std::path::Path, slots: [Slot; 2]) -> Result<Self, BootError> {
        Self::open_with(EntriesDir::new(esp), Some(UkiDir::new(esp)), slots)
    }

    fn open_with(
        dir: EntriesDir,
        ukis: Option<UkiDir>,
        slots: [Slot; 2],
    ) -> Result<Self, BootError> {
        let default_pattern = dir.default_pattern()?;
        let mut backend = BlsBackend {
            dir,
            ukis,
            slots,
            entries: Vec::new(),
            default_pattern,
        };
        backend.entries = backend.read_all()?;
        // Two entries for one slot is ambiguous: say so now rather than
        // show the slot as having none.
        for slot in SlotName::BOTH {
            backend.entry_index(slot)?;
        }
        Ok(backend)
    }

    /// Both kinds of entries, as systemd-boot lists them together.
    fn read_all(&self) -> Result<Vec<BlsEntry>, BootError> {
        let mut entries = self.dir.read()?;
        if let Some(ukis) = &self.ukis {
            entries.extend(ukis.read()?);
        }
        Ok(entries)
    }

    fn set_counter(&self, entry: &BlsEntry, counter: Option<BootCounter>) -> Result<(), BootError> {
        match (&self.ukis, entry.name.suffix) {
            (Some(ukis), ".efi") => ukis.set_counter(entry, counter)?,
            _ => self.dir.set_counter(entry, counter)?,
        };
        Ok(())
    }

    fn remove_entry(&self, entry: &BlsEntry) -> Result<(), BootError> {
        match (&self.ukis, entry.name.suffix) {
            (Some(ukis), ".efi") => ukis.remove(entry)?,
            _ => self.dir.remove(entry)?,
        };
        Ok(())
    }

    /// The slot an entry boots, by the PARTUUID in its options.
    fn slot_of(&self, entry: &BlsEntry) -> Option<SlotName> {
        let partuuid = cmdline::booted_partuuid(&entry.options)?;
        self.slots
            .iter()
            .find(|s| s.partuuid == partuuid)
            .map(|s| s.name)
    }

    fn entry_index(&self, slot: SlotName) -> Result<Option<usize>, BootError> {
        let found: Vec<usize> = (0..self.entries.len())
            .filter(|&i| self.slot_of(&self.entries[i]) == Some(slot))
            .collect();
        match found.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(*one)),
            many => Err(BootError::ManyEntries {
                slot,
                count: many.len(),
                dir: self.dir.dir(),
            }),
        }
    }

    fn required_entry(&self, slot: SlotName) -> Result<usize, BootError> {
        self.entry_index(slot)?.ok_or_else(|| BootError::NoEntry {
            slot,
            dir: self.dir.dir(),
        })
    }

    fn status_of(entry: Option<&BlsEntry>) -> SlotStatus {
        match entry.map(BlsEntry::status) {
            Some(EntryStatus::Good) => SlotStatus::Good,
            Some(EntryStatus::Trying) => SlotStatus::Trying,
            Some(EntryStatus::Bad) | None => SlotStatus::Unbootable,
        }
    }

    fn rename(
        &mut self,
        index: usize,
        counter: Option<BootCounter>,
    ) -> Result<Vec<String>, BootError> {
        self.set_counter(&self.entries[index], counter)?;
        self.entries = self.read_all()?;
        Ok(Vec::new())
    }

    /// Refuses a transition that leaves the other slot as the only hope
    /// when it has no usable entry.
    fn require_other_bootable(&self, slot: SlotName) -> Result<(), BootError> {
        let other = slot.other();
        let entry = self.entry_index(other)?.map(|i| &self.entries[i]);
        if Self::status_of(entry) == SlotStatus::Unbootable {
            return Err(TransitionError::NothingWouldBoot {
                target: slot,
                other,
                why: "without a usable boot entry",
            }
            .into());
        }
        Ok(())
    }
}

impl BootBackend for BlsBackend {
    fn name(&self) -> &'static str {
        if self.ukis.is_some() {
            "uki"
        } else {
            "bls"
        }
    }

    fn slot_boot(&self, slot: SlotName) -> SlotBoot {
        let entry = self
            .entry_index(slot)
            .ok()
            .flatten()
            .map(|i| &self.entries[i]);
        SlotBoot::Bls {
            entry: entry.map(|e| e.file_name.clone()),
            version: entry.and_then(|e| e.version.clone()),
            tries_left: entry.and_then(|e| e.name.counter).map(|c| c.left),
            tries_done: entry.and_then(|e| e.name.counter).map(|c| c.done),
            status: Self::status_of(entry),
        }
    }

    fn next_boot(&self) -> Option<SlotName> {
        bls::default_entry(&self.entries, self.default_pattern.as_deref())
            .and_then(|e| self.slot_of(e))
    }

    fn clear(&mut self, slot: SlotName) -> Result<Vec<String>, BootError> {
        if let Some(index) = self.entry_index(slot)? {
            self.remove_entry(&self.entries[index])?;
            self.entries = self.read_all()?;
        }
        Ok(Vec::new())
    }

    fn set_next(&mut self, slot: SlotName, tries: u8) -> Result<Vec<String>, BootError> {
        if tries == 0 {
            return Err(TransitionError::BadTries(tries).into());
        }
        let index = self.required_entry(slot)?;
        let counter = BootCounter {
            left: u32::from(tries),
            done: 0,
        };
        // Decide on the renamed list before touching the disk.
        let mut planned = self.entries.clone();
        planned[index].name.counter = Some(counter);
        planned[index].file_name = planned[index].name.file_name();
        let winner_of = |planned: &[BlsEntry]| {
            bls::default_entry(planned, self.default_pattern.as_deref())
                .map(|e| e.file_name.clone())
        };
        let mut demote = None;
        if winner_of(&planned).as_deref() != Some(planned[index].file_name.as_str()) {
            // systemd-boot boots the newest version first. To boot an
            // older slot (a rollback), the other slot's entry is demoted:
            // its counter set spent (+0), which systemd-boot sorts last
            // but still boots when this slot's tries run out (the newest
            // of the spent entries first). The assessment blesses it again
            // if the node comes back to it.
            if let Some(other) = self.entry_index(slot.other())? {
                let done = planned[other].name.counter.map_or(0, |c| c.done);
                let spent = BootCounter { left: 0, done };
                planned[other].name.counter = Some(spent);
                planned[other].file_name = planned[other].name.file_name();
                demote = Some((self.entries[other].name.stem.clone(), spent));
            }
        }
        let winner = winner_of(&planned);
        if winner.as_deref() != Some(planned[index].file_name.as_str()) {
            return Err(BootError::WouldNotBootFirst {
                slot,
                entry: planned[index].file_name.clone(),
                winner: winner.unwrap_or_default(),
            });
        }
        // The slot's tries first: a crash before the demotion leaves the
        // old order, which boots the running slot.
        let mut notes = self.rename(index, Some(counter))?;
        if let Some((stem, spent)) = demote {
            if let Some(i) = self.entries.iter().position(|e| e.name.stem == stem) {
                let name = self.entries[i].file_name.clone();
                self.rename(i, Some(spent))?;
                notes.push(format!(
                    "slot {}'s entry {name} is demoted (no tries left) so that systemd-boot boots slot {slot}'s older version first; it still boots if slot {slot} fails",
                    slot.other()
                ));
            }
        }
        Ok(notes)
    }

    fn mark_good(&mut self, slot: SlotName) -> Result<Vec<String>, BootError> {
        let index = self.required_entry(slot)?;
        self.rename(index, None)
    }

    fn mark_bad(&mut self, slot: SlotName) -> Result<Vec<String>, BootError> {
        let index = self.required_entry(slot)?;
        self.require_other_bootable(slot)?;
        let done = self.entries[index].name.counter.map_or(0, |c| c.done);
        self.rename(index, Some(BootCounter { left: 0, done }))
    }

    fn cancel(&mut self, slot: SlotName) -> Result<Vec<String>, BootError> {
        let index = self.required_entry(slot)?;
        if self.entries[index].status() != EntryStatus::Trying {
            return Err(TransitionError::NothingToCancel(format!(
                "slot {slot}'s entry {} is not counting boots",
                self.entries[index].file_name
            ))
            .into());
        }
        self.require_other_bootable(slot)?;
        let done = self.entries[index].name.counter.map_or(0, |c| c.done);
        self.rename(index, Some(BootCounter { left: 0, done }))
    }

    fn installs_boot_files(&self) -> bool {
        // With UKIs the kernel comes with the payload, not from the slot.
        self.ukis.is_none()
    }

    fn install(
        &mut self,
        slot: SlotName,
        version: &str,
        files: &BootFiles,
        root_arg: &str,
    ) -> Result<Vec<String>, BootError> {
        // Any old entry of the slot goes first, so nothing points at the
        // files while they are replaced.
        self.clear(slot)?;
        let installed = bootfiles::install(&self.dir.esp(), slot, files)?;
        let partuuid = self.slots[slot.index()].partuuid;
        let entry = slot_entry(
            slot,
            version,
            files,
            &installed,
            &format!("{root_arg}=PARTUUID={partuuid}"),
        );
        self.dir.write(
            &bootfiles::entry_stem(slot),
            Some(BootCounter { left: 0, done: 0 }),
            &entry,
        )?;
        self.entries = self.read_all()?;
        Ok(Vec::new())
    }

    fn boots_ukis(&self) -> bool {
        self.ukis.is_some()
    }

    fn uki_staging(&self, slot: SlotName) -> Option<(PathBuf, PathBuf)> {
        let ukis = self.ukis.as_ref()?;
        Some(ukis.staging_paths(&bootfiles::entry_stem(slot)))
    }

    fn uki_files(&self, slot: SlotName) -> Option<(PathBuf, Option<PathBuf>)> {
        let ukis = self.ukis.as_ref()?;
        let index = self.entry_index(slot).ok().flatten()?;
        let entry = &self.entries[index];
        (entry.name.suffix == ".efi").then(|| ukis.files_of(entry))
    }

    fn install_uki(
        &mut self,
        slot: SlotName,
        uki: &std::path::Path,
        addon: Option<&std::path::Path>,
    ) -> Result<Vec<String>, BootError> {
        let Some(ukis) = self.ukis.clone() else {
            return Err(BootError::NoUkis { backend: "bls" });
        };
        // Any old entry of the slot goes first (type #1 too).
        self.clear(slot)?;
        let name = ukis.install(
            &bootfiles::entry_stem(slot),
            uki,
            addon,
            Some(BootCounter { left: 0, done: 0 }),
        )?;
        self.entries = self.read_all()?;
        if self.entry_index(slot)?.is_none() {
            // The UKI does not name this slot's PARTUUID: it could never
            // be told apart, so it does not stay on the ESP.
            if let Some(entry) = self.entries.iter().find(|e| e.file_name == name).cloned() {
                self.remove_entry(&entry)?;
                self.entries = self.read_all()?;
            }
            return Err(BootError::NoEntry {
                slot,
                dir: ukis.dir(),
            });
        }
        // Leftovers of interrupted writes go: one operation runs at a
        // time, so no other staging file is in use.
        let removed = ukis.sweep(&[])?;
        Ok(removed
            .iter()
            .map(|p| format!("removed leftover {}", p.display()))
            .collect())
    }
}

/// The entry that boots a slot's installed files: one sort key for all of
/// tandem's entries, so systemd-boot orders them by version. Pure.
pub fn slot_entry(
    slot: SlotName,
    version: &str,
    files: &BootFiles,
    installed: &bootfiles::Installed,
    root: &str,
) -> NewEntry {
    let name = files.os_name.as_deref().unwrap_or("tandem");
    let options = if files.cmdline.is_empty() {
        root.to_string()
    } else {
        format!("{root} {}", files.cmdline)
    };
    NewEntry {
        title: format!("{name} {version} (slot {slot})"),
        version: version.to_string(),
        sort_key: "tandem".to_string(),
        linux: installed.linux.clone(),
        initrd: installed.initrd.iter().cloned().collect(),
        options,
    }
}
