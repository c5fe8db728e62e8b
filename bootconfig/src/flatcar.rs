//! Flatcar's kernels on the ESP: GRUB (gptprio) picks slot A or B from the
//! GPT attributes and loads `flatcar/vmlinuz-a` or `flatcar/vmlinuz-b`
//! from the ESP. Flatcar's build writes the slot's dm-verity root hash
//! into the kernel image itself, as 64 lowercase hex digits at a fixed
//! offset (0x40 in an x86 bzImage, 512 in an arm64 Image), and Flatcar's
//! GRUB appends `verity.usrhash=` with it to the command line. So the
//! kernel is the slot's boot artifact: it is updated with the slot and
//! names the root hash the slot's tree must have.
//!
//! A new kernel is written to a hidden staging file beside the installed
//! one (`flatcar/.vmlinuz-b.new`), verified there, and renamed into place
//! only once the slot passed every check; the slot is unbootable (gptprio
//! priority 0) all that time, so a crash leaves either kernel whole.

use std::fs;
use std::path::{Path, PathBuf};

use crate::bls::BlsError;
use crate::ukidir::{io_err, place, sync_dir};
use crate::SlotName;

/// The folder of the ESP Flatcar keeps its kernels in.
pub const KERNEL_DIR: &str = "flatcar";

/// Where the root hash sits in an x86 bzImage (Flatcar's GRUB:
/// `VERITY_HASH_OFFSET`).
pub const X86_HASH_OFFSET: usize = 0x40;
/// Where it sits in an arm64 Image.
pub const ARM64_HASH_OFFSET: usize = 512;
/// The arm64 Image header's magic, at byte 0x38.
const ARM64_MAGIC: &[u8; 4] = b"ARM\x64";

/// The dm-verity root hash a Flatcar kernel image carries, if it carries
/// one: 64 lowercase hex digits at the architecture's offset. Pure.
pub fn kernel_usrhash(image: &[u8]) -> Option<String> {
    let offset = if image.get(0x38..0x3c) == Some(ARM64_MAGIC.as_slice()) {
        ARM64_HASH_OFFSET
    } else {
        X86_HASH_OFFSET
    };
    let hash = image.get(offset..offset + 64)?;
    hash.iter()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        .then(|| String::from_utf8_lossy(hash).into_owned())
}

/// Writes `hash` (64 hex digits) into a kernel image where Flatcar's GRUB
/// reads it, as Flatcar's image build does. For images and tests.
pub fn embed_usrhash(image: &mut [u8], hash: &str) -> Result<(), String> {
    let hash = hash.to_ascii_lowercase();
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{hash:?} is not a SHA-256 root hash"));
    }
    let offset = if image.get(0x38..0x3c) == Some(ARM64_MAGIC.as_slice()) {
        ARM64_HASH_OFFSET
    } else {
        X86_HASH_OFFSET
    };
    let at = image
        .get_mut(offset..offset + 64)
        .ok_or_else(|| format!("the kernel image is shorter than {} bytes", offset + 64))?;
    at.copy_from_slice(hash.as_bytes());
    Ok(())
}

/// An ESP's `flatcar/` folder of slot kernels.
#[derive(Debug, Clone)]
pub struct KernelDir {
    esp: PathBuf,
}

fn letter(slot: SlotName) -> &'static str {
    match slot {
        SlotName::A => "a",
        SlotName::B => "b",
    }
}

impl KernelDir {
    pub fn new(esp: &Path) -> Self {
        KernelDir {
            esp: esp.to_path_buf(),
        }
    }

    pub fn dir(&self) -> PathBuf {
        self.esp.join(KERNEL_DIR)
    }

    /// `flatcar/vmlinuz-a` or `-b`, the kernel GRUB boots for the slot.
    pub fn kernel(&self, slot: SlotName) -> PathBuf {
        self.dir().join(format!("vmlinuz-{}", letter(slot)))
    }

    /// The hidden file a new kernel for the slot is written to.
    pub fn staging(&self, slot: SlotName) -> PathBuf {
        self.dir().join(format!(".vmlinuz-{}.new", letter(slot)))
    }

    /// The slot's installed kernel, if it has one.
    pub fn installed(&self, slot: SlotName) -> Option<PathBuf> {
        let path = self.kernel(slot);
        path.is_file().then_some(path)
    }

    /// Renames a verified staged kernel into place as the slot's kernel,
    /// with fsyncs of the file and the folder. Returns what it did.
    pub fn install(&self, slot: SlotName, staged: &Path) -> Result<Vec<String>, BlsError> {
        let to = self.kernel(slot);
        fs::create_dir_all(self.dir()).map_err(io_err(&self.dir(), "cannot create"))?;
        place(staged, &to)?;
        sync_dir(&self.dir())?;
        Ok(vec![format!("installed {}", to.display())])
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const HASH: &str = "4f1e0d6c2b3a49587f6e5d4c3b2a19087f6e5d4c3b2a19084f1e0d6c2b3a4958";

    #[test]
    fn the_root_hash_is_read_where_flatcars_grub_reads_it() {
        let mut x86 = vec![0u8; 4096];
        x86[..2].copy_from_slice(b"MZ");
        assert_eq!(kernel_usrhash(&x86), None);
        embed_usrhash(&mut x86, HASH).unwrap();
        assert_eq!(&x86[0x40..0x80], HASH.as_bytes());
        assert_eq!(kernel_usrhash(&x86).as_deref(), Some(HASH));

        let mut arm = vec![0u8; 4096];
        arm[0x38..0x3c].copy_from_slice(ARM64_MAGIC);
        embed_usrhash(&mut arm, &HASH.to_uppercase()).unwrap();
        assert_eq!(&arm[512..576], HASH.as_bytes());
        assert_eq!(kernel_usrhash(&arm).as_deref(), Some(HASH));

        // Upper-case or short hashes are not what GRUB passes on.
        x86[0x40] = b'A';
        assert_eq!(kernel_usrhash(&x86), None);
        assert_eq!(kernel_usrhash(&x86[..100]), None);
        assert!(embed_usrhash(&mut x86, "abc").is_err());
        assert!(embed_usrhash(&mut [0u8; 64], HASH).is_err());
    }

    #[test]
    fn a_staged_kernel_is_renamed_into_place() {
        let esp = std::env::temp_dir().join(format!("tandem-flatcar-{}", std::process::id()));
        let _ = fs::remove_dir_all(&esp);
        let dir = KernelDir::new(&esp);
        assert_eq!(dir.installed(SlotName::B), None);
        fs::create_dir_all(dir.dir()).unwrap();
        fs::write(dir.kernel(SlotName::A), b"old a").unwrap();
        fs::write(dir.staging(SlotName::B), b"new b").unwrap();
        dir.install(SlotName::B, &dir.staging(SlotName::B)).unwrap();
        assert_eq!(fs::read(dir.kernel(SlotName::B)).unwrap(), b"new b");
        assert!(!dir.staging(SlotName::B).exists());
        assert_eq!(fs::read(dir.kernel(SlotName::A)).unwrap(), b"old a");
        assert_eq!(dir.installed(SlotName::B), Some(dir.kernel(SlotName::B)));
        assert!(dir.staging(SlotName::B).ends_with("flatcar/.vmlinuz-b.new"));
        fs::remove_dir_all(&esp).unwrap();
    }
}
