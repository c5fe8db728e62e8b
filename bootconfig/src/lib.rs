//! A/B slots and boot selection.
//!
//! - [`gpt`]: read and rewrite a GUID partition table (block device or image).
//! - [`slots`]: find the two slots on a disk by label and type.
//! - [`cmdline`]: which slot the kernel was booted from.
//! - [`gptprio`]: GRUB `gptprio.next` rules over GPT attribute bits.
//! - [`bls`]: Boot Loader Specification entries with systemd-boot boot counting.
//! - [`bootfiles`]: a slot's kernel, initrd and command line, read from its
//!   image and installed on the ESP.
//! - [`uki`]: Unified Kernel Images and addons: their command line and
//!   os-release, read from the PE sections.
//! - [`ukidir`]: type #2 entries (UKIs in `EFI/Linux/`) with boot counting.
//! - [`flatcar`]: Flatcar's slot kernels on the ESP (`flatcar/vmlinuz-a|b`),
//!   which carry the slot's dm-verity root hash.
//! - [`backend`]: the one small interface both boot backends implement.
//!
//! Decisions (transitions, boot order) are pure functions over data; the I/O
//! sits in [`gpt::GptDisk`], [`bls::EntriesDir`] and the backends.

pub mod backend;
pub mod bls;
pub mod bootfiles;
pub mod cmdline;
pub mod flatcar;
pub mod gpt;
pub mod gptprio;
pub mod guid;
pub mod slots;
pub mod uki;
pub mod ukidir;
pub mod version;

use std::fmt;
use std::str::FromStr;

pub use backend::{BootBackend, BootError, SlotBoot};
pub use guid::{Guid, FLATCAR_USR_TYPE};
pub use slots::{HashArea, HashLayout, Part};
pub use slots::{Slot, SlotLayout};

/// One of the two A/B slots.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum SlotName {
    A,
    B,
}

impl SlotName {
    /// Both slots, in table order.
    pub const BOTH: [SlotName; 2] = [SlotName::A, SlotName::B];

    pub const fn other(self) -> SlotName {
        match self {
            SlotName::A => SlotName::B,
            SlotName::B => SlotName::A,
        }
    }

    pub const fn index(self) -> usize {
        match self {
            SlotName::A => 0,
            SlotName::B => 1,
        }
    }
}

impl fmt::Display for SlotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SlotName::A => "A",
            SlotName::B => "B",
        })
    }
}

/// Text that names no slot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a slot name (want A or B): {0:?}")]
pub struct ParseSlotError(pub String);

impl FromStr for SlotName {
    type Err = ParseSlotError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "A" | "a" => Ok(SlotName::A),
            "B" | "b" => Ok(SlotName::B),
            _ => Err(ParseSlotError(text.to_string())),
        }
    }
}
