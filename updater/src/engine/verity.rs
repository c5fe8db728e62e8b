//! The slot's parts and the dm-verity gate: which part of the disk each
//! payload component goes to, and the check, before a slot is set to
//! boot, that its hash tree matches its data and that the tree's root hash
//! is the one its boot artifact names. A slot without a hash tree (the
//! generic layout) passes; a slot with one passes only if both hold.

use std::path::Path;

use bootconfig::Slot;
use payload::verity::{self, Area};
use payload::{ByteRange, ComponentPaths};

use super::EngineError;

/// Where each component the slot can take is written, and what a delta
/// reads: `usr` into the slot, `verity` into its hash area when it has
/// one. Pure.
pub(super) fn component_paths(disk: &Path, target: &Slot, source: &Slot) -> Vec<ComponentPaths> {
    let range = |(offset, len): (u64, u64)| ByteRange { offset, len };
    let mut paths = vec![ComponentPaths {
        component: "usr".into(),
        target: disk.to_path_buf(),
        target_range: Some(range((target.offset, target.image_size()))),
        source: Some(disk.to_path_buf()),
        source_range: Some(range((source.offset, source.image_size()))),
    }];
    if let Some(hash) = target.hash_range() {
        paths.push(ComponentPaths {
            component: "verity".into(),
            target: disk.to_path_buf(),
            target_range: Some(range(hash)),
            source: source.hash_range().map(|_| disk.to_path_buf()),
            source_range: source.hash_range().map(range),
        });
    }
    paths
}

/// The root hash a Flatcar kernel file carries (`None` when it carries
/// none).
pub(super) fn kernel_usrhash(path: &Path) -> Result<Option<String>, EngineError> {
    use std::io::Read;
    let mut head = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(1024).read_to_end(&mut head))
        .map_err(|e| EngineError::System(format!("reading the kernel {}: {e}", path.display())))?;
    Ok(bootconfig::flatcar::kernel_usrhash(&head))
}

/// The gate. `usrhash` is the root hash the slot's boot artifact names
/// (`usrhash=` of its command line), if it names one. Returns the root
/// hash checked, `None` for a slot without a hash tree.
pub(super) fn check_slot(
    disk: &Path,
    slot: &Slot,
    usrhash: Option<&str>,
) -> Result<Option<String>, EngineError> {
    let Some((hash_offset, hash_len)) = slot.hash_range() else {
        return Ok(None);
    };
    let Some(expected) = usrhash else {
        return Err(EngineError::Refused(format!(
            "slot {} has a dm-verity hash tree but its boot artifact names no usrhash=: tandem cannot check what the boot will check, so the slot is not set to boot",
            slot.name
        )));
    };
    let file = std::fs::File::open(disk).map_err(|e| {
        EngineError::System(format!(
            "opening {} to check slot {}: {e}",
            disk.display(),
            slot.name
        ))
    })?;
    let data = Area {
        file: &file,
        offset: slot.offset,
        len: slot.image_size(),
    };
    let hash = Area {
        file: &file,
        offset: hash_offset,
        len: hash_len,
    };
    let verified = verity::verify_root(data, hash, expected).map_err(|e| {
        EngineError::Refused(format!(
            "slot {}: dm-verity check failed, the slot is not set to boot: {e}",
            slot.name
        ))
    })?;
    Ok(Some(verified.root_hash_hex()))
}
