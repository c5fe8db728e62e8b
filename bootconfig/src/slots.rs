//! Finding the two slots of a disk: by GPT label, checked by type GUID.

use serde::Serialize;

use crate::gpt::PartitionEntry;
use crate::guid::{Guid, FLATCAR_USR_TYPE};
use crate::SlotName;

/// How slots are recognised on a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotLayout {
    /// GPT partition labels of slot A and slot B.
    pub labels: [String; 2],
    /// The partition type GUID both slots must have.
    pub type_guid: Guid,
}

impl Default for SlotLayout {
    /// ACL/Flatcar: `USR-A` and `USR-B` of the Flatcar `/usr` type.
    fn default() -> Self {
        SlotLayout {
            labels: ["USR-A".to_string(), "USR-B".to_string()],
            type_guid: FLATCAR_USR_TYPE,
        }
    }
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
        let offset = entry.first_lba.checked_mul(sector_size);
        let size = entry
            .last_lba
            .checked_sub(entry.first_lba)
            .and_then(|n| n.checked_add(1))
            .and_then(|n| n.checked_mul(sector_size));
        match (offset, size) {
            (Some(offset), Some(size))
                if offset.checked_add(size).is_some_and(|end| end <= disk_size) =>
            {
                Ok(Slot {
                    name: slot,
                    partition_number: entry.number,
                    label: label.clone(),
                    partuuid: entry.unique_guid,
                    type_guid: entry.type_guid,
                    offset,
                    size,
                    attributes: entry.attributes,
                })
            }
            _ => Err(SlotError::OutOfDisk {
                number: entry.number,
                label: label.clone(),
            }),
        }
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
