//! Reading and rewriting a GUID partition table, on a block device or an
//! image file.
//!
//! tandem only ever changes partition attribute words, so this module keeps
//! the partition-entry array as raw bytes, patches attributes in memory, and
//! rewrites both GPT copies (entries first, then the header that carries
//! their CRC) in one explicit [`GptDisk::write`]. At every instant of that
//! write one copy is intact, so a crash leaves either the old or the new
//! table readable. A corrupt copy is repaired from the sound one on write;
//! a disk with no sound copy, or smaller than its GPT says, is refused.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::guid::Guid;

const SIGNATURE: &[u8; 8] = b"EFI PART";
const MIN_HEADER_SIZE: usize = 92;
const MIN_ENTRY_SIZE: u32 = 128;
/// The largest entry array accepted (the usual one is 16 KiB). Bounds what a
/// damaged or hostile header can make us allocate.
const MAX_ENTRIES_BYTES: u64 = 1 << 20;
/// Sector sizes tried, in order, when a disk is opened.
const SECTOR_SIZES: [u64; 2] = [512, 4096];
/// Byte offset of the attribute word inside a partition entry.
const ATTRIBUTES_OFFSET: usize = 48;

/// What went wrong with a GPT disk. Every variant names the disk.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error("{path}: {action}: {error}")]
    Io {
        path: PathBuf,
        action: &'static str,
        error: io::Error,
    },
    #[error("{path}: {size} bytes is too small to hold a GPT")]
    TooSmall { path: PathBuf, size: u64 },
    #[error("{path}: no valid GPT (primary: {primary}; backup: {backup})")]
    NoValidGpt {
        path: PathBuf,
        primary: String,
        backup: String,
    },
    #[error(
        "{path}: the disk is smaller than its GPT says (backup header at LBA {backup_lba}, \
         last LBA {last_lba}): truncated image or wrong device"
    )]
    Truncated {
        path: PathBuf,
        backup_lba: u64,
        last_lba: u64,
    },
    #[error("{path}: cannot rebuild the {which} GPT copy: {reason}")]
    Unrepairable {
        path: PathBuf,
        which: &'static str,
        reason: String,
    },
    #[error("{path}: no partition number {number}")]
    NoSuchPartition { path: PathBuf, number: u32 },
    #[error("{path}: opened read-only, cannot write")]
    ReadOnly { path: PathBuf },
    #[error("{path}: the GPT does not read back as written: {reason}")]
    VerifyFailed { path: PathBuf, reason: String },
}

/// One used entry of the partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionEntry {
    /// 1-based partition number (index in the entry array plus one).
    pub number: u32,
    pub type_guid: Guid,
    /// The partition's unique GUID: its PARTUUID.
    pub unique_guid: Guid,
    pub first_lba: u64,
    pub last_lba: u64,
    pub attributes: u64,
    /// The partition name (GPT label), decoded from UTF-16LE.
    pub name: String,
}

/// The fields of a GPT header that tandem reads or rewrites.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    header_size: usize,
    my_lba: u64,
    alternate_lba: u64,
    first_usable_lba: u64,
    last_usable_lba: u64,
    disk_guid: Guid,
    entries_lba: u64,
    num_entries: u32,
    entry_size: u32,
    entries_crc32: u32,
}

impl Header {
    fn entries_bytes(&self) -> u64 {
        u64::from(self.num_entries) * u64::from(self.entry_size)
    }

    /// The fields both copies must agree on.
    fn shared_fields(&self) -> (u64, u64, Guid, u32, u32) {
        (
            self.first_usable_lba,
            self.last_usable_lba,
            self.disk_guid,
            self.num_entries,
            self.entry_size,
        )
    }
}

/// A header sector and the entry array it describes, both checked.
#[derive(Debug, Clone)]
struct GptCopy {
    header: Header,
    sector: Vec<u8>,
    entries: Vec<u8>,
}

/// What was found of each GPT copy when the disk was opened.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "state", content = "reason")]
pub enum CopyHealth {
    Sound,
    Corrupt(String),
    /// Sound on its own, but its entries or layout differ from the primary.
    Differs(String),
}

/// An open GPT disk: the table as read, changed in memory, written back by
/// [`GptDisk::write`].
#[derive(Debug)]
pub struct GptDisk {
    path: PathBuf,
    file: File,
    writable: bool,
    sector_size: u64,
    last_lba: u64,
    /// The copy the table was taken from (primary when it is sound).
    source: GptCopy,
    primary_health: CopyHealth,
    backup_health: CopyHealth,
    /// Where the backup header lives (the primary's alternate LBA, or the
    /// disk's last LBA when only the backup was found).
    backup_lba: u64,
    /// Where each sound copy keeps its entry array; `None` for a corrupt copy.
    primary_entries_lba: Option<u64>,
    backup_entries_lba: Option<u64>,
    entries: Vec<u8>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(word)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(word)
}

fn guid_at(b: &[u8], at: usize) -> Guid {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&b[at..at + 16]);
    Guid::from_disk_bytes(bytes)
}

fn header_crc(sector: &[u8], header_size: usize) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&sector[..16]);
    hasher.update(&[0u8; 4]);
    hasher.update(&sector[20..header_size]);
    hasher.finalize()
}

/// Parses and checks a header sector that should sit at `lba`. Pure.
fn parse_header(sector: &[u8], lba: u64, last_lba: u64) -> Result<Header, String> {
    if &sector[..8] != SIGNATURE {
        return Err(format!("no GPT signature at LBA {lba}"));
    }
    let header_size = u32_at(sector, 12) as usize;
    if header_size < MIN_HEADER_SIZE || header_size > sector.len() {
        return Err(format!("header size {header_size} out of range"));
    }
    let stored_crc = u32_at(sector, 16);
    let computed_crc = header_crc(sector, header_size);
    if stored_crc != computed_crc {
        return Err(format!(
            "header CRC mismatch (stored {stored_crc:#010x}, computed {computed_crc:#010x})"
        ));
    }
    let header = Header {
        header_size,
        my_lba: u64_at(sector, 24),
        alternate_lba: u64_at(sector, 32),
        first_usable_lba: u64_at(sector, 40),
        last_usable_lba: u64_at(sector, 48),
        disk_guid: guid_at(sector, 56),
        entries_lba: u64_at(sector, 72),
        num_entries: u32_at(sector, 80),
        entry_size: u32_at(sector, 84),
        entries_crc32: u32_at(sector, 88),
    };
    if header.my_lba != lba {
        return Err(format!(
            "header says it is at LBA {}, found at {lba}",
            header.my_lba
        ));
    }
    if header.entry_size < MIN_ENTRY_SIZE || !header.entry_size.is_multiple_of(8) {
        return Err(format!("entry size {} is invalid", header.entry_size));
    }
    if header.entries_bytes() == 0 || header.entries_bytes() > MAX_ENTRIES_BYTES {
        return Err(format!(
            "entry array of {} bytes is out of range",
            header.entries_bytes()
        ));
    }
    if header.first_usable_lba > header.last_usable_lba || header.last_usable_lba >= last_lba {
        return Err(format!(
            "usable range {}..={} does not fit the disk",
            header.first_usable_lba, header.last_usable_lba
        ));
    }
    Ok(header)
}

/// Decodes the used entries of an entry array. Pure.
fn parse_entries(header: &Header, raw: &[u8]) -> Vec<PartitionEntry> {
    raw.chunks_exact(header.entry_size as usize)
        .zip(1u32..)
        .filter_map(|(entry, number)| {
            let type_guid = guid_at(entry, 0);
            if type_guid.is_nil() {
                return None;
            }
            let units: Vec<u16> = entry[56..128]
                .chunks_exact(2)
                .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
                .take_while(|&unit| unit != 0)
                .collect();
            Some(PartitionEntry {
                number,
                type_guid,
                unique_guid: guid_at(entry, 16),
                first_lba: u64_at(entry, 32),
                last_lba: u64_at(entry, 40),
                attributes: u64_at(entry, ATTRIBUTES_OFFSET),
                name: String::from_utf16_lossy(&units),
            })
        })
        .collect()
}

/// A header sector for one copy: the template with its location fields and
/// CRCs set. Bytes past the header (to the end of the sector) are kept.
fn build_header_sector(
    template: &GptCopy,
    my_lba: u64,
    alternate_lba: u64,
    entries_lba: u64,
    entries_crc32: u32,
) -> Vec<u8> {
    let mut sector = template.sector.clone();
    sector[24..32].copy_from_slice(&my_lba.to_le_bytes());
    sector[32..40].copy_from_slice(&alternate_lba.to_le_bytes());
    sector[72..80].copy_from_slice(&entries_lba.to_le_bytes());
    sector[88..92].copy_from_slice(&entries_crc32.to_le_bytes());
    let crc = header_crc(&sector, template.header.header_size);
    sector[16..20].copy_from_slice(&crc.to_le_bytes());
    sector
}

impl GptDisk {
    /// Opens a disk to read its table. Takes a shared lock for the reads.
    pub fn open(path: &Path) -> Result<Self, GptError> {
        Self::open_with(path, false)
    }

    /// Opens a disk to change its table. Holds an exclusive `flock` on it
    /// until dropped, which also keeps udev from probing it meanwhile. Any
    /// other open of the same disk, in this process too, waits for the drop.
    pub fn open_for_update(path: &Path) -> Result<Self, GptError> {
        Self::open_with(path, true)
    }

    fn open_with(path: &Path, writable: bool) -> Result<Self, GptError> {
        let io_err = |action: &'static str| {
            let path = path.to_path_buf();
            move |error| GptError::Io {
                path,
                action,
                error,
            }
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(io_err("cannot open"))?;
        if writable {
            file.lock().map_err(io_err("cannot lock"))?;
        } else {
            file.lock_shared().map_err(io_err("cannot lock"))?;
        }
        // Works for block devices too, where metadata().len() is 0.
        let size = file.seek(SeekFrom::End(0)).map_err(io_err("cannot size"))?;
        let mut first_failure = None;
        for sector_size in SECTOR_SIZES {
            if size < sector_size * 4 {
                continue;
            }
            let last_lba = size / sector_size - 1;
            let primary = read_copy(&file, path, sector_size, 1, last_lba)?;
            let backup_lba = match &primary {
                Ok(copy) => copy.header.alternate_lba,
                Err(_) => last_lba,
            };
            if backup_lba > last_lba {
                return Err(GptError::Truncated {
                    path: path.to_path_buf(),
                    backup_lba,
                    last_lba,
                });
            }
            let backup = read_copy(&file, path, sector_size, backup_lba, last_lba)?;
            let primary_entries_lba = primary.as_ref().ok().map(|c| c.header.entries_lba);
            let backup_entries_lba = backup.as_ref().ok().map(|c| c.header.entries_lba);
            let (source, primary_health, backup_health) = match (primary, backup) {
                (Ok(primary), Ok(backup)) => {
                    let backup_health = compare_copies(&primary, &backup);
                    (primary, CopyHealth::Sound, backup_health)
                }
                (Ok(primary), Err(why)) => (primary, CopyHealth::Sound, CopyHealth::Corrupt(why)),
                (Err(why), Ok(backup)) => (backup, CopyHealth::Corrupt(why), CopyHealth::Sound),
                (Err(primary_why), Err(backup_why)) => {
                    first_failure.get_or_insert((primary_why, backup_why));
                    continue;
                }
            };
            let entries = source.entries.clone();
            return Ok(GptDisk {
                path: path.to_path_buf(),
                file,
                writable,
                sector_size,
                last_lba,
                source,
                primary_health,
                backup_health,
                backup_lba,
                primary_entries_lba,
                backup_entries_lba,
                entries,
            });
        }
        match first_failure {
            Some((primary, backup)) => Err(GptError::NoValidGpt {
                path: path.to_path_buf(),
                primary,
                backup,
            }),
            None => Err(GptError::TooSmall {
                path: path.to_path_buf(),
                size,
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn sector_size(&self) -> u64 {
        self.sector_size
    }

    /// The disk's size in bytes.
    pub fn size_bytes(&self) -> u64 {
        (self.last_lba + 1) * self.sector_size
    }

    pub fn disk_guid(&self) -> Guid {
        self.source.header.disk_guid
    }

    pub fn primary_health(&self) -> &CopyHealth {
        &self.primary_health
    }

    pub fn backup_health(&self) -> &CopyHealth {
        &self.backup_health
    }

    /// What the next [`GptDisk::write`] will repair, one sentence each.
    pub fn pending_repairs(&self) -> Vec<String> {
        let mut repairs = Vec::new();
        for (which, other, health) in [
            ("primary", "backup", &self.primary_health),
            ("backup", "primary", &self.backup_health),
        ] {
            match health {
                CopyHealth::Sound => {}
                CopyHealth::Corrupt(why) => repairs.push(format!(
                    "{which} GPT is corrupt ({why}); rebuilt from the {other}"
                )),
                CopyHealth::Differs(why) => repairs.push(format!(
                    "{which} GPT differs ({why}); rewritten from the {other}"
                )),
            }
        }
        repairs
    }

    /// The used partition entries, in table order.
    pub fn partitions(&self) -> Vec<PartitionEntry> {
        parse_entries(&self.source.header, &self.entries)
    }

    /// Changes one partition's attribute word in memory.
    pub fn set_attributes(&mut self, number: u32, attributes: u64) -> Result<(), GptError> {
        let entry_size = self.source.header.entry_size as usize;
        let in_use = self
            .partitions()
            .iter()
            .any(|partition| partition.number == number);
        let index = number.checked_sub(1).map(|i| i as usize);
        match index {
            Some(index) if in_use => {
                let at = index * entry_size + ATTRIBUTES_OFFSET;
                self.entries[at..at + 8].copy_from_slice(&attributes.to_le_bytes());
                Ok(())
            }
            _ => Err(GptError::NoSuchPartition {
                path: self.path.clone(),
                number,
            }),
        }
    }

    /// Writes both GPT copies from the in-memory table, repairing a corrupt
    /// copy, syncs, and reads the disk back to check. Returns the repairs made.
    pub fn write(&mut self) -> Result<Vec<String>, GptError> {
        if !self.writable {
            return Err(GptError::ReadOnly {
                path: self.path.clone(),
            });
        }
        let header = &self.source.header;
        let entry_sectors = header.entries_bytes().div_ceil(self.sector_size);
        let unrepairable = |which: &'static str, reason: String| GptError::Unrepairable {
            path: self.path.clone(),
            which,
            reason,
        };
        // A corrupt copy gets its entry array where the UEFI spec's usual
        // layout puts it: right after the primary header, right before the backup.
        let primary_entries_lba = self.primary_entries_lba.unwrap_or(2);
        if primary_entries_lba < 2 || primary_entries_lba + entry_sectors > header.first_usable_lba
        {
            return Err(unrepairable(
                "primary",
                format!(
                    "its entry array would overlap the first usable LBA {}",
                    header.first_usable_lba
                ),
            ));
        }
        let backup_entries_lba = self
            .backup_entries_lba
            .unwrap_or(self.backup_lba.saturating_sub(entry_sectors));
        if backup_entries_lba <= header.last_usable_lba
            || backup_entries_lba + entry_sectors > self.backup_lba
        {
            return Err(unrepairable(
                "backup",
                format!(
                    "its entry array would overlap the last usable LBA {}",
                    header.last_usable_lba
                ),
            ));
        }
        let entries_crc = crc32fast::hash(&self.entries);
        let primary_sector = build_header_sector(
            &self.source,
            1,
            self.backup_lba,
            primary_entries_lba,
            entries_crc,
        );
        let backup_sector = build_header_sector(
            &self.source,
            self.backup_lba,
            1,
            backup_entries_lba,
            entries_crc,
        );
        let repairs = self.pending_repairs();
        let ss = self.sector_size;
        // Entries before the header that vouches for them, one copy at a time.
        self.write_at(primary_entries_lba * ss, &self.entries)?;
        self.write_at(ss, &primary_sector)?;
        self.sync()?;
        self.write_at(backup_entries_lba * ss, &self.entries)?;
        self.write_at(self.backup_lba * ss, &backup_sector)?;
        self.sync()?;
        self.verify_written()?;
        self.primary_health = CopyHealth::Sound;
        self.backup_health = CopyHealth::Sound;
        Ok(repairs)
    }

    fn write_at(&self, offset: u64, bytes: &[u8]) -> Result<(), GptError> {
        self.file
            .write_all_at(bytes, offset)
            .map_err(|error| GptError::Io {
                path: self.path.clone(),
                action: "cannot write the GPT",
                error,
            })
    }

    fn sync(&self) -> Result<(), GptError> {
        self.file.sync_all().map_err(|error| GptError::Io {
            path: self.path.clone(),
            action: "cannot sync",
            error,
        })
    }

    fn verify_written(&mut self) -> Result<(), GptError> {
        let fail = |reason: String| GptError::VerifyFailed {
            path: self.path.clone(),
            reason,
        };
        let primary = read_copy(&self.file, &self.path, self.sector_size, 1, self.last_lba)?
            .map_err(|why| fail(format!("primary: {why}")))?;
        let backup = read_copy(
            &self.file,
            &self.path,
            self.sector_size,
            self.backup_lba,
            self.last_lba,
        )?
        .map_err(|why| fail(format!("backup: {why}")))?;
        if primary.entries != self.entries || backup.entries != self.entries {
            return Err(fail("entry array differs from what was written".into()));
        }
        self.primary_entries_lba = Some(primary.header.entries_lba);
        self.backup_entries_lba = Some(backup.header.entries_lba);
        self.source = primary;
        Ok(())
    }
}

/// Compares a sound backup with the sound primary. Pure.
fn compare_copies(primary: &GptCopy, backup: &GptCopy) -> CopyHealth {
    if primary.header.shared_fields() != backup.header.shared_fields() {
        CopyHealth::Differs("its header fields differ from the primary's".into())
    } else if backup.header.alternate_lba != 1 {
        CopyHealth::Differs(format!(
            "it points at LBA {} for the primary",
            backup.header.alternate_lba
        ))
    } else if primary.entries != backup.entries {
        CopyHealth::Differs("its partition entries differ from the primary's".into())
    } else {
        CopyHealth::Sound
    }
}

/// Reads one GPT copy. The outer error is I/O; the inner one says why the
/// copy is not sound.
fn read_copy(
    file: &File,
    path: &Path,
    sector_size: u64,
    lba: u64,
    last_lba: u64,
) -> Result<Result<GptCopy, String>, GptError> {
    let read = |offset: u64, len: usize| -> Result<Vec<u8>, GptError> {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset)
            .map_err(|error| GptError::Io {
                path: path.to_path_buf(),
                action: "cannot read the GPT",
                error,
            })?;
        Ok(buf)
    };
    let sector = read(lba * sector_size, sector_size as usize)?;
    let header = match parse_header(&sector, lba, last_lba) {
        Ok(header) => header,
        Err(why) => return Ok(Err(why)),
    };
    let entries_len = header.entries_bytes();
    let entries_end = header.entries_lba * sector_size + entries_len;
    if header.entries_lba == 0 || entries_end > (last_lba + 1) * sector_size {
        return Ok(Err(format!(
            "entry array at LBA {} runs past the end of the disk",
            header.entries_lba
        )));
    }
    let entries = read(header.entries_lba * sector_size, entries_len as usize)?;
    let crc = crc32fast::hash(&entries);
    if crc != header.entries_crc32 {
        return Ok(Err(format!(
            "entry array CRC mismatch (stored {:#010x}, computed {crc:#010x})",
            header.entries_crc32
        )));
    }
    Ok(Ok(GptCopy {
        header,
        sector,
        entries,
    }))
}
