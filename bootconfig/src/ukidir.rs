//! Boot Loader Specification type #2 entries: signed UKIs in the ESP's
//! `EFI/Linux/`, named `STEM[+LEFT[-DONE]].efi` for systemd-boot's boot
//! counting, each with its addons in `STEM.efi.extra.d/` (the drop-in
//! folder's name carries no counter, so renames never touch it).
//!
//! An entry's version, sort key and title come from the UKI's `.osrel`,
//! its options from its `.cmdline` with the addons' appended, as
//! systemd-boot and systemd-stub take them. Every write is crash-safe:
//! the addon is placed before the UKI (a UKI never boots without its
//! addon), each through a temporary name, fsync and rename, and an old
//! entry's UKI goes before its addon.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use crate::bls::{BlsEntry, BlsError, BootCounter, EntryName};
use crate::uki::{self, UkiInfo};

/// The file name an addon gets in a slot's drop-in folder.
pub const ADDON_NAME: &str = "tandem.addon.efi";

/// The `EFI/Linux` folder of an ESP.
#[derive(Debug, Clone)]
pub struct UkiDir {
    esp: PathBuf,
}

pub(crate) fn io_err(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> BlsError {
    let path = path.to_path_buf();
    move |error| BlsError::Io {
        path,
        action,
        error,
    }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), BlsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "cannot sync"))
}

/// Moves `from` to `to` atomically: a rename on the same filesystem, else
/// a copy to a temporary name beside `to`, fsync, rename.
pub(crate) fn place(from: &Path, to: &Path) -> Result<(), BlsError> {
    match fs::rename(from, to) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(18) => {
            let name = to.file_name().map(|n| n.to_string_lossy().into_owned());
            let temp = to.with_file_name(format!(".{}.tmp", name.unwrap_or_default()));
            fs::copy(from, &temp).map_err(io_err(&temp, "cannot copy"))?;
            File::open(&temp)
                .and_then(|f| f.sync_all())
                .map_err(io_err(&temp, "cannot sync"))?;
            fs::rename(&temp, to).map_err(io_err(to, "cannot rename into place"))?;
            let _ = fs::remove_file(from);
        }
        Err(e) => return Err(io_err(to, "cannot rename into place")(e)),
    }
    File::open(to)
        .and_then(|f| f.sync_all())
        .map_err(io_err(to, "cannot sync"))
}

/// A type #2 entry as systemd-boot sees it. Pure.
pub fn entry_of(file_name: &str, name: EntryName, uki: &UkiInfo, addons: &[UkiInfo]) -> BlsEntry {
    BlsEntry {
        file_name: file_name.to_string(),
        name,
        title: uki.title(),
        version: uki.version(),
        sort_key: uki.sort_key(),
        machine_id: None,
        linux: None,
        initrd: Vec::new(),
        options: uki::combined_cmdline(uki, addons),
    }
}

impl UkiDir {
    pub fn new(esp: &Path) -> UkiDir {
        UkiDir {
            esp: esp.to_path_buf(),
        }
    }

    pub fn dir(&self) -> PathBuf {
        self.esp.join("EFI").join("Linux")
    }

    /// A stem's addon folder.
    pub fn extra_dir(&self, stem: &str) -> PathBuf {
        self.dir().join(format!("{stem}.efi.extra.d"))
    }

    /// Where a slot's new UKI and addon are written before they are
    /// placed: hidden names systemd-boot does not list.
    pub fn staging_paths(&self, stem: &str) -> (PathBuf, PathBuf) {
        let dir = self.dir();
        (
            dir.join(format!(".{stem}.efi.new")),
            dir.join(format!(".{stem}.addon.efi.new")),
        )
    }

    /// Every type #2 entry (none when the folder does not exist). Files
    /// that are not PE images are skipped, as systemd-boot skips them.
    pub fn read(&self) -> Result<Vec<BlsEntry>, BlsError> {
        let dir = self.dir();
        let listing = match fs::read_dir(&dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir, "cannot list")(e)),
        };
        let mut entries = Vec::new();
        for item in listing {
            let item = item.map_err(io_err(&dir, "cannot list"))?;
            let file_name = item.file_name().to_string_lossy().into_owned();
            let Some(name) = EntryName::parse(&file_name).filter(|n| n.suffix == ".efi") else {
                continue;
            };
            if file_name.starts_with('.') || !item.path().is_file() {
                continue;
            }
            let info = match uki::read_uki(&item.path()) {
                Ok(info) if info.has_kernel => info,
                Ok(_) | Err(uki::UkiError::NotPe { .. }) => continue,
                Err(e) => return Err(BlsError::Uki(e)),
            };
            let addons = self.addons(&name.stem)?;
            entries.push(entry_of(&file_name, name, &info, &addons));
        }
        entries.sort_by(|a, b| a.file_name.cmp(&b.file_name));
        Ok(entries)
    }

    /// The addons of a stem, in file-name order (as systemd-stub loads them).
    fn addons(&self, stem: &str) -> Result<Vec<UkiInfo>, BlsError> {
        let dir = self.extra_dir(stem);
        let mut paths: Vec<PathBuf> = match fs::read_dir(&dir) {
            Ok(listing) => listing
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.to_string_lossy().ends_with(".addon.efi"))
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir, "cannot list")(e)),
        };
        paths.sort();
        paths
            .iter()
            .map(|p| uki::read_uki(p).map_err(BlsError::Uki))
            .collect()
    }

    /// The files of an entry: its UKI and its addons.
    pub fn files_of(&self, entry: &BlsEntry) -> (PathBuf, Option<PathBuf>) {
        let addon = self.extra_dir(&entry.name.stem).join(ADDON_NAME);
        (
            self.dir().join(&entry.file_name),
            addon.is_file().then_some(addon),
        )
    }

    /// Renames an entry to a new counter.
    pub fn set_counter(
        &self,
        entry: &BlsEntry,
        counter: Option<BootCounter>,
    ) -> Result<String, BlsError> {
        let name = EntryName {
            stem: entry.name.stem.clone(),
            counter,
            suffix: ".efi",
        };
        let new_name = name.file_name();
        if new_name != entry.file_name {
            let dir = self.dir();
            let target = dir.join(&new_name);
            fs::rename(dir.join(&entry.file_name), &target)
                .map_err(io_err(&target, "cannot rename"))?;
            sync_dir(&dir)?;
        }
        Ok(new_name)
    }

    /// Removes an entry: the UKI first (nothing boots it any more), then
    /// its addon folder.
    pub fn remove(&self, entry: &BlsEntry) -> Result<(), BlsError> {
        let dir = self.dir();
        let path = dir.join(&entry.file_name);
        fs::remove_file(&path).map_err(io_err(&path, "cannot remove"))?;
        sync_dir(&dir)?;
        self.remove_extra(&entry.name.stem)
    }

    fn remove_extra(&self, stem: &str) -> Result<(), BlsError> {
        let extra = self.extra_dir(stem);
        match fs::remove_dir_all(&extra) {
            Ok(()) => sync_dir(&self.dir()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&extra, "cannot remove")(e)),
        }
    }

    /// Installs a stem's entry from staged files: any old entry of the
    /// stem goes (UKI, then addons), the addon is placed, then the UKI
    /// under its counter. A crash at any point leaves either no entry for
    /// the stem or a complete one.
    pub fn install(
        &self,
        stem: &str,
        uki_file: &Path,
        addon_file: Option<&Path>,
        counter: Option<BootCounter>,
    ) -> Result<String, BlsError> {
        let dir = self.dir();
        fs::create_dir_all(&dir).map_err(io_err(&dir, "cannot create"))?;
        for old in self.read()? {
            if old.name.stem == stem {
                self.remove(&old)?;
            }
        }
        self.remove_extra(stem)?;
        if let Some(addon) = addon_file {
            let extra = self.extra_dir(stem);
            fs::create_dir_all(&extra).map_err(io_err(&extra, "cannot create"))?;
            place(addon, &extra.join(ADDON_NAME))?;
            sync_dir(&extra)?;
            sync_dir(&dir)?;
        }
        let name = EntryName {
            stem: stem.to_string(),
            counter,
            suffix: ".efi",
        }
        .file_name();
        place(uki_file, &dir.join(&name))?;
        sync_dir(&dir)?;
        Ok(name)
    }

    /// Removes leftovers that are no entry's: staging files of an
    /// interrupted write and addon folders whose UKI is gone, so the ESP
    /// never fills. Returns what it removed.
    pub fn sweep(&self, keep_staging: &[PathBuf]) -> Result<Vec<PathBuf>, BlsError> {
        let dir = self.dir();
        let stems: Vec<String> = self.read()?.into_iter().map(|e| e.name.stem).collect();
        let listing = match fs::read_dir(&dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir, "cannot list")(e)),
        };
        let mut removed = Vec::new();
        for item in listing.flatten() {
            let path = item.path();
            let name = item.file_name().to_string_lossy().into_owned();
            let stale_temp = name.starts_with('.')
                && (name.ends_with(".tmp") || name.ends_with(".new"))
                && !keep_staging.contains(&path);
            let orphan = name
                .strip_suffix(".efi.extra.d")
                .is_some_and(|stem| !stems.iter().any(|s| s == stem));
            if stale_temp {
                fs::remove_file(&path).map_err(io_err(&path, "cannot remove"))?;
                removed.push(path);
            } else if orphan {
                fs::remove_dir_all(&path).map_err(io_err(&path, "cannot remove"))?;
                removed.push(path);
            }
        }
        if !removed.is_empty() {
            sync_dir(&dir)?;
        }
        Ok(removed)
    }
}
