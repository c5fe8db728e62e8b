//! Finding the two slots of a disk: by GPT label, checked by type GUID.

use serde::Serialize;

use crate::gpt::PartitionEntry;
use crate::guid::{
    Guid, FLATCAR_USR_TYPE, USR_VERITY_ARM64, USR_VERITY_SIG_ARM64, USR_VERITY_SIG_X86_64,
    USR_VERITY_X86_64,
};
use crate::SlotName;

/// Where each slot's dm-verity hash tree is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HashLayout {
    /// Found on the disk: partitions labelled like the slots with `USR`
    /// replaced by `HASH` (`HASH-A`, `HASH-B`; ACL's layout) and, if
    /// present, `HASH-SIG-A`/`HASH-SIG-B`; otherwise no hash tree.
    #[default]
    Auto,
    /// No hash tree: the slot is the whole image (the generic layout).
    None,
    /// Hash partitions with these labels, which must exist.
    Partitions { labels: [String; 2] },
    /// The tree inside each slot at this byte offset (Flatcar: after the
    /// filesystem, its root hash inside the signed kernel).
    InSlot { offset: u64 },
}

/// How slots are recognised on a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotLayout {
    /// GPT partition labels of slot A and slot B.
    pub labels: [String; 2],
    /// The partition type GUID both slots must have.
    pub type_guid: Guid,
    /// Where the slots' hash trees are.
    pub hash: HashLayout,
}

impl Default for SlotLayout {
    /// ACL/Flatcar: `USR-A` and `USR-B` of the Flatcar `/usr` type, hash
    /// partitions found if the disk has them.
    fn default() -> Self {
        SlotLayout {
            labels: ["USR-A".to_string(), "USR-B".to_string()],
            type_guid: FLATCAR_USR_TYPE,
            hash: HashLayout::Auto,
        }
    }
}

/// A partition that belongs to a slot (its hash tree or signature).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Part {
    pub partition_number: u32,
    pub label: String,
    pub partuuid: Guid,
    pub type_guid: Guid,
    pub offset: u64,
    pub size: u64,
}

/// Where a slot's hash tree is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum HashArea {
    /// Its own partition (ACL: `HASH-A`, DPS usr-verity type).
    Partition(Part),
    /// Inside the slot, from this byte offset to the slot's end.
    InSlot { offset: u64 },
}

/// One slot's partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Slot {
    pub name: SlotName,
    pub partition_number: u32,
    pub label: String,
    pub partuuid: Guid,
    pub type_guid: Guid,
    /// Byte offset of the partition on the disk.
    pub offset: u64,
    /// Size of the partition in bytes.
    pub size: u64,
    /// The raw GPT attribute word.
    #[serde(skip)]
    pub attributes: u64,
    /// The slot's dm-verity hash tree, if it has one.
    pub hash: Option<HashArea>,
    /// The partition holding the root hash's signature, if there is one.
    pub hash_sig: Option<Part>,
}

impl Slot {
    /// Bytes of the slot that hold its image: all of it, or what comes
    /// before a hash tree kept inside it.
    pub fn image_size(&self) -> u64 {
        match self.hash {
            Some(HashArea::InSlot { offset }) => offset.min(self.size),
            _ => self.size,
        }
    }

    /// The hash area as (byte offset on the disk, length).
    pub fn hash_range(&self) -> Option<(u64, u64)> {
        match &self.hash {
            Some(HashArea::Partition(p)) => Some((p.offset, p.size)),
            Some(HashArea::InSlot { offset }) => {
                Some((self.offset + offset, self.size.saturating_sub(*offset)))
            }
            None => None,
        }
    }
}

/// A disk whose slots are missing or not what the layout says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error("no partition labelled {label:?} (slot {slot})")]
    Missing { slot: SlotName, label: String },
    #[error("{count} partitions are labelled {label:?}; slot {slot} must be exactly one")]
    Duplicate {
        slot: SlotName,
        label: String,
        count: usize,
    },
    #[error("partition {number} ({label:?}) has type {found}, expected {expected}")]
    WrongType {
        number: u32,
        label: String,
        found: Guid,
        expected: Guid,
    },
    #[error("partition {number} ({label:?}) lies outside the disk or is empty")]
    OutOfDisk { number: u32, label: String },
    #[error("both slots have the same PARTUUID {0}")]
    SamePartuuid(Guid),
    #[error("the hash tree offset {offset} lies outside slot {slot} ({size} bytes) or is not a multiple of 4096")]
    BadHashOffset {
        slot: SlotName,
        offset: u64,
        size: u64,
    },
}

/// The DPS types a hash partition may have.
const HASH_TYPES: [Guid; 2] = [USR_VERITY_X86_64, USR_VERITY_ARM64];
const HASH_SIG_TYPES: [Guid; 2] = [USR_VERITY_SIG_X86_64, USR_VERITY_SIG_ARM64];

/// The label of a slot's companion: `USR-A` → `HASH-A` (`prefix` `HASH`),
/// `ROOT-B` → `HASH-B`; a label without `-` gets `prefix-` in front. Pure.
fn companion_label(slot_label: &str, prefix: &str) -> String {
    match slot_label.rsplit_once('-') {
        Some((_, suffix)) => format!("{prefix}-{suffix}"),
        None => format!("{prefix}-{slot_label}"),
    }
}

/// Finds one partition by label; `None` when absent and not required.
fn find_part(
    partitions: &[PartitionEntry],
    sector_size: u64,
    disk_size: u64,
    slot: SlotName,
    label: &str,
    types: &[Guid],
    required: bool,
) -> Result<Option<Part>, SlotError> {
    let matching: Vec<&PartitionEntry> = partitions.iter().filter(|p| p.name == label).collect();
    let entry = match matching.as_slice() {
        [] if required => {
            return Err(SlotError::Missing {
                slot,
                label: label.to_string(),
            })
        }
        [] => return Ok(None),
        [one] => *one,
        many => {
            return Err(SlotError::Duplicate {
                slot,
                label: label.to_string(),
                count: many.len(),
            })
        }
    };
    if !types.contains(&entry.type_guid) {
        return Err(SlotError::WrongType {
            number: entry.number,
            label: label.to_string(),
            found: entry.type_guid,
            expected: types[0],
        });
    }
    let (offset, size) = extent(entry, sector_size, disk_size).ok_or(SlotError::OutOfDisk {
        number: entry.number,
        label: label.to_string(),
    })?;
    Ok(Some(Part {
        partition_number: entry.number,
        label: label.to_string(),
        partuuid: entry.unique_guid,
        type_guid: entry.type_guid,
        offset,
        size,
    }))
}

/// A partition's byte offset and size, if it lies on the disk.
fn extent(entry: &PartitionEntry, sector_size: u64, disk_size: u64) -> Option<(u64, u64)> {
    let offset = entry.first_lba.checked_mul(sector_size)?;
    let size = entry
        .last_lba
        .checked_sub(entry.first_lba)?
        .checked_add(1)?
        .checked_mul(sector_size)?;
    offset
        .checked_add(size)
        .is_some_and(|end| end <= disk_size)
        .then_some((offset, size))
}

/// Finds slot A and slot B among a disk's partitions. Pure.
pub fn find_slots(
    partitions: &[PartitionEntry],
    sector_size: u64,
    disk_size: u64,
    layout: &SlotLayout,
) -> Result<[Slot; 2], SlotError> {
    let find = |slot: SlotName| -> Result<Slot, SlotError> {
        let label = &layout.labels[slot.index()];
        let matching: Vec<&PartitionEntry> =
            partitions.iter().filter(|p| &p.name == label).collect();
        let entry = match matching.as_slice() {
            [] => {
                return Err(SlotError::Missing {
                    slot,
                    label: label.clone(),
                })
            }
            [one] => *one,
            many => {
                return Err(SlotError::Duplicate {
                    slot,
                    label: label.clone(),
                    count: many.len(),
                })
            }
        };
        if entry.type_guid != layout.type_guid {
            return Err(SlotError::WrongType {
                number: entry.number,
                label: label.clone(),
                found: entry.type_guid,
                expected: layout.type_guid,
            });
        }
        let (offset, size) =
            extent(entry, sector_size, disk_size).ok_or_else(|| SlotError::OutOfDisk {
                number: entry.number,
                label: label.clone(),
            })?;
        let part = |prefix: &str, types: &[Guid], required: bool| {
            find_part(
                partitions,
                sector_size,
                disk_size,
                slot,
                &companion_label(label, prefix),
                types,
                required,
            )
        };
        let (hash, hash_sig) = match &layout.hash {
            HashLayout::None => (None, None),
            HashLayout::Auto => {
                let hash = part("HASH", &HASH_TYPES, false)?;
                let sig = match hash {
                    Some(_) => part("HASH-SIG", &HASH_SIG_TYPES, false)?,
                    None => None,
                };
                (hash.map(HashArea::Partition), sig)
            }
            HashLayout::Partitions { labels } => {
                let hash = find_part(
                    partitions,
                    sector_size,
                    disk_size,
                    slot,
                    &labels[slot.index()],
                    &HASH_TYPES,
                    true,
                )?;
                (
                    hash.map(HashArea::Partition),
                    part("HASH-SIG", &HASH_SIG_TYPES, false)?,
                )
            }
            HashLayout::InSlot { offset } => {
                if *offset == 0 || *offset >= size || offset % 4096 != 0 {
                    return Err(SlotError::BadHashOffset {
                        slot,
                        offset: *offset,
                        size,
                    });
                }
                (Some(HashArea::InSlot { offset: *offset }), None)
            }
        };
        Ok(Slot {
            name: slot,
            partition_number: entry.number,
            label: label.clone(),
            partuuid: entry.unique_guid,
            type_guid: entry.type_guid,
            offset,
            size,
            attributes: entry.attributes,
            hash,
            hash_sig,
        })
    };
    let a = find(SlotName::A)?;
    let b = find(SlotName::B)?;
    if a.partuuid == b.partuuid {
        return Err(SlotError::SamePartuuid(a.partuuid));
    }
    Ok([a, b])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(number: u32, name: &str, type_guid: Guid, first: u64, last: u64) -> PartitionEntry {
        let mut unique = [0u8; 16];
        unique[0] = number as u8;
        PartitionEntry {
            number,
            type_guid,
            unique_guid: Guid::from_disk_bytes(unique),
            first_lba: first,
            last_lba: last,
            attributes: 0,
            name: name.to_string(),
        }
    }

    #[test]
    fn finds_both_slots_with_offsets() {
        let other: Guid = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b".parse().unwrap();
        let parts = [
            part(1, "EFI-SYSTEM", other, 2048, 4095),
            part(3, "USR-A", FLATCAR_USR_TYPE, 4096, 8191),
            part(4, "USR-B", FLATCAR_USR_TYPE, 8192, 12287),
        ];
        let [a, b] = find_slots(&parts, 512, 1 << 30, &SlotLayout::default()).unwrap();
        assert_eq!(
            (a.partition_number, a.offset, a.size),
            (3, 4096 * 512, 4096 * 512)
        );
        assert_eq!((b.name, b.partition_number), (SlotName::B, 4));
    }

    #[test]
    fn finds_acl_hash_partitions_and_flatcar_trees() {
        let esp: Guid = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b".parse().unwrap();
        // ACL's order: USR-A, HASH-A, HASH-SIG-A, USR-B, ... (numbers vary).
        let parts = [
            part(1, "EFI-SYSTEM", esp, 2048, 4095),
            part(2, "USR-A", FLATCAR_USR_TYPE, 4096, 8191),
            part(3, "HASH-A", USR_VERITY_X86_64, 8192, 8319),
            part(4, "HASH-SIG-A", USR_VERITY_SIG_X86_64, 8320, 8327),
            part(5, "USR-B", FLATCAR_USR_TYPE, 8328, 12423),
            part(6, "HASH-B", USR_VERITY_X86_64, 12424, 12551),
            part(7, "HASH-SIG-B", USR_VERITY_SIG_X86_64, 12552, 12559),
        ];
        let [a, b] = find_slots(&parts, 512, 1 << 30, &SlotLayout::default()).unwrap();
        match (&a.hash, &b.hash) {
            (Some(HashArea::Partition(ha)), Some(HashArea::Partition(hb))) => {
                assert_eq!((ha.partition_number, hb.partition_number), (3, 6));
                assert_eq!(a.hash_range(), Some((8192 * 512, 128 * 512)));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(b.hash_sig.as_ref().map(|p| p.partition_number), Some(7));
        assert_eq!(a.image_size(), a.size);
        // The same disk with verity turned off in the config.
        let plain = SlotLayout {
            hash: HashLayout::None,
            ..SlotLayout::default()
        };
        let [a, _] = find_slots(&parts, 512, 1 << 30, &plain).unwrap();
        assert_eq!((a.hash, a.hash_sig), (None, None));
        // A hash partition of the wrong type is an error, not ignored.
        let mut wrong = parts.clone();
        wrong[2].type_guid = FLATCAR_USR_TYPE;
        assert!(matches!(
            find_slots(&wrong, 512, 1 << 30, &SlotLayout::default()),
            Err(SlotError::WrongType { number: 3, .. })
        ));
        // Flatcar: no hash partitions, the tree inside the slot.
        let flatcar = SlotLayout {
            hash: HashLayout::InSlot { offset: 1 << 20 },
            ..SlotLayout::default()
        };
        let [a, _] = find_slots(&parts, 512, 1 << 30, &flatcar).unwrap();
        assert_eq!(a.image_size(), 1 << 20);
        assert_eq!(
            a.hash_range(),
            Some((4096 * 512 + (1 << 20), 4096 * 512 - (1 << 20)))
        );
        let outside = SlotLayout {
            hash: HashLayout::InSlot { offset: 1 << 30 },
            ..SlotLayout::default()
        };
        assert!(matches!(
            find_slots(&parts, 512, 1 << 30, &outside),
            Err(SlotError::BadHashOffset { .. })
        ));
        assert_eq!(companion_label("ROOT-B", "HASH"), "HASH-B");
        assert_eq!(companion_label("usr", "HASH"), "HASH-usr");
    }

    #[test]
    fn explains_what_is_wrong() {
        let layout = SlotLayout::default();
        let wrong: Guid = "0fc63daf-8483-4772-8e79-3d69d8477de4".parse().unwrap();
        let only_b = [part(4, "USR-B", FLATCAR_USR_TYPE, 10, 20)];
        assert!(matches!(
            find_slots(&only_b, 512, 1 << 20, &layout),
            Err(SlotError::Missing {
                slot: SlotName::A,
                ..
            })
        ));
        let typed = [
            part(3, "USR-A", wrong, 10, 20),
            part(4, "USR-B", FLATCAR_USR_TYPE, 30, 40),
        ];
        assert!(matches!(
            find_slots(&typed, 512, 1 << 20, &layout),
            Err(SlotError::WrongType { number: 3, .. })
        ));
        let twice = [
            part(3, "USR-A", FLATCAR_USR_TYPE, 10, 20),
            part(5, "USR-A", FLATCAR_USR_TYPE, 50, 60),
            part(4, "USR-B", FLATCAR_USR_TYPE, 30, 40),
        ];
        assert!(matches!(
            find_slots(&twice, 512, 1 << 20, &layout),
            Err(SlotError::Duplicate { count: 2, .. })
        ));
        let outside = [
            part(3, "USR-A", FLATCAR_USR_TYPE, 10, 20),
            part(4, "USR-B", FLATCAR_USR_TYPE, 30, 4000),
        ];
        assert!(matches!(
            find_slots(&outside, 512, 4000 * 512, &layout),
            Err(SlotError::OutOfDisk { number: 4, .. })
        ));
    }
}
