//! Unified Kernel Images and their addons: PE files whose sections carry
//! the kernel (`.linux`), initrd (`.initrd`), command line (`.cmdline`),
//! os-release (`.osrel`) and kernel release (`.uname`). tandem reads only
//! the small text sections, never re-signs and never rewrites a UKI: the
//! file is shipped as signed.
//!
//! Parsing is pure over the header bytes plus the sections read at their
//! offsets ([`read_uki`] does the I/O).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Why a file is not a UKI or addon tandem can read.
#[derive(Debug, thiserror::Error)]
pub enum UkiError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        #[source]
        error: io::Error,
    },
    #[error("{path}: not a PE image ({why})")]
    NotPe { path: PathBuf, why: &'static str },
    #[error("{path}: section {section} is not valid UTF-8 text")]
    NotText { path: PathBuf, section: String },
}

/// A section header: name and where its bytes are in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub file_offset: u64,
    /// The section's meaningful length: the smaller of its virtual size
    /// and its raw size (the rest of the raw data is padding).
    pub len: u64,
}

/// Most header bytes read to find the section table.
const HEADER_BYTES: usize = 64 * 1024;

/// The section table of a PE image, from its first bytes. Pure.
pub fn sections(header: &[u8]) -> Result<Vec<Section>, &'static str> {
    let u16_at = |at: usize| -> Option<u16> {
        Some(u16::from_le_bytes(header.get(at..at + 2)?.try_into().ok()?))
    };
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(header.get(at..at + 4)?.try_into().ok()?))
    };
    if header.get(..2) != Some(b"MZ") {
        return Err("no MZ header");
    }
    let pe = u32_at(0x3c).ok_or("truncated DOS header")? as usize;
    if header.get(pe..pe + 4) != Some(b"PE\0\0") {
        return Err("no PE signature");
    }
    let coff = pe + 4;
    let count = usize::from(u16_at(coff + 2).ok_or("truncated COFF header")?);
    let optional = usize::from(u16_at(coff + 16).ok_or("truncated COFF header")?);
    let table = coff + 20 + optional;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let at = table + i * 40;
        let raw = header
            .get(at..at + 40)
            .ok_or("section table beyond the headers")?;
        let name_bytes: Vec<u8> = raw[..8].iter().copied().take_while(|&b| b != 0).collect();
        let virtual_size = u32_at(at + 8).ok_or("truncated section")?;
        let raw_size = u32_at(at + 16).ok_or("truncated section")?;
        let raw_offset = u32_at(at + 20).ok_or("truncated section")?;
        let len = if virtual_size == 0 {
            raw_size
        } else {
            virtual_size.min(raw_size)
        };
        out.push(Section {
            name: String::from_utf8_lossy(&name_bytes).into_owned(),
            file_offset: u64::from(raw_offset),
            len: u64::from(len),
        });
    }
    Ok(out)
}

/// What tandem reads from a UKI or an addon.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UkiInfo {
    pub cmdline: Option<String>,
    pub os_release: Option<String>,
    pub uname: Option<String>,
    /// Whether it has a kernel (`.linux`): a UKI, not an addon.
    pub has_kernel: bool,
}

impl UkiInfo {
    /// An os-release field, unquoted.
    pub fn os_release_field(&self, key: &str) -> Option<String> {
        self.os_release.as_deref().and_then(|text| {
            text.lines().find_map(|line| {
                let value = line.trim().strip_prefix(key)?.strip_prefix('=')?;
                Some(value.trim_matches(|c| c == '"' || c == '\'').to_string())
            })
        })
    }

    /// The version systemd-boot sorts by: IMAGE_VERSION, else VERSION_ID,
    /// else VERSION.
    pub fn version(&self) -> Option<String> {
        ["IMAGE_VERSION", "VERSION_ID", "VERSION"]
            .iter()
            .find_map(|k| self.os_release_field(k))
    }

    /// The sort key systemd-boot gives a type #2 entry: IMAGE_ID, else ID.
    pub fn sort_key(&self) -> Option<String> {
        ["IMAGE_ID", "ID"]
            .iter()
            .find_map(|k| self.os_release_field(k))
    }

    /// PRETTY_NAME, else NAME.
    pub fn title(&self) -> Option<String> {
        ["PRETTY_NAME", "NAME"]
            .iter()
            .find_map(|k| self.os_release_field(k))
    }
}

fn text_section(
    file: &File,
    path: &Path,
    section: &Section,
    size: u64,
) -> Result<String, UkiError> {
    let end = section.file_offset.checked_add(section.len);
    if end.is_none_or(|end| end > size) || section.len > (1 << 20) {
        return Err(UkiError::NotPe {
            path: path.to_path_buf(),
            why: "a text section lies outside the file or is over 1 MiB",
        });
    }
    let mut bytes = vec![0u8; section.len as usize];
    file.read_exact_at(&mut bytes, section.file_offset)
        .map_err(|error| UkiError::Io {
            path: path.to_path_buf(),
            error,
        })?;
    while bytes.last() == Some(&0) {
        bytes.pop();
    }
    String::from_utf8(bytes).map_err(|_| UkiError::NotText {
        path: path.to_path_buf(),
        section: section.name.clone(),
    })
}

/// Reads a UKI's or addon's text sections without reading its kernel.
pub fn read_uki(path: &Path) -> Result<UkiInfo, UkiError> {
    let io_err = |error| UkiError::Io {
        path: path.to_path_buf(),
        error,
    };
    let file = File::open(path).map_err(io_err)?;
    let size = file.metadata().map_err(io_err)?.len();
    let mut header = vec![0u8; HEADER_BYTES.min(size as usize)];
    file.read_exact_at(&mut header, 0).map_err(io_err)?;
    let table = sections(&header).map_err(|why| UkiError::NotPe {
        path: path.to_path_buf(),
        why,
    })?;
    let mut info = UkiInfo::default();
    for section in &table {
        let slot = match section.name.as_str() {
            ".cmdline" => &mut info.cmdline,
            ".osrel" => &mut info.os_release,
            ".uname" => &mut info.uname,
            ".linux" => {
                info.has_kernel = true;
                continue;
            }
            _ => continue,
        };
        *slot = Some(text_section(&file, path, section, size)?.trim().to_string());
    }
    Ok(info)
}

/// The verity root hash a command line names for `/usr`: `usrhash=` (ACL,
/// systemd), else `verity.usrhash=` (Flatcar). The last value wins. Pure.
pub fn usrhash(cmdline: &str) -> Option<String> {
    ["usrhash", "verity.usrhash"].iter().find_map(|key| {
        cmdline
            .split_whitespace()
            .rev()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_string)
    })
}

/// The command line a UKI boots with its addons: systemd-stub appends
/// each addon's `.cmdline` to the UKI's. Pure.
pub fn combined_cmdline(uki: &UkiInfo, addons: &[UkiInfo]) -> String {
    std::iter::once(uki)
        .chain(addons)
        .filter_map(|i| i.cmdline.as_deref())
        .filter(|c| !c.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal PE image with the given sections' contents.
    fn pe(sections_in: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = vec![0u8; 0x40];
        out[..2].copy_from_slice(b"MZ");
        out[0x3c..0x40].copy_from_slice(&0x40u32.to_le_bytes());
        out.extend_from_slice(b"PE\0\0");
        let mut coff = [0u8; 20];
        coff[2..4].copy_from_slice(&(sections_in.len() as u16).to_le_bytes());
        coff[16..18].copy_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&coff);
        let table_end = out.len() + 40 * sections_in.len();
        let mut data_at = table_end.next_multiple_of(512);
        let mut data = Vec::new();
        for (name, bytes) in sections_in {
            let mut raw = [0u8; 40];
            raw[..name.len()].copy_from_slice(name.as_bytes());
            raw[8..12].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
            let padded = bytes.len().next_multiple_of(512);
            raw[16..20].copy_from_slice(&(padded as u32).to_le_bytes());
            raw[20..24].copy_from_slice(&(data_at as u32).to_le_bytes());
            out.extend_from_slice(&raw);
            let mut piece = bytes.to_vec();
            piece.resize(padded, 0);
            data.extend_from_slice(&piece);
            data_at += padded;
        }
        out.resize(table_end.next_multiple_of(512), 0);
        out.extend_from_slice(&data);
        out
    }

    #[test]
    fn reads_the_text_sections() {
        let dir = std::env::temp_dir().join(format!("tandem-uki-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.efi");
        let bytes = pe(&[
            (
                ".osrel",
                b"ID=acl\nVERSION_ID=\"4230.2.1\"\nPRETTY_NAME=\"ACL 4230.2.1\"\n",
            ),
            (
                ".cmdline",
                b"console=ttyS0 usrhash=ab12 mount.usr=/dev/mapper/usr\0",
            ),
            (".uname", b"6.6.1"),
            (".linux", b"\x7fELF"),
        ]);
        std::fs::write(&path, bytes).unwrap();
        let info = read_uki(&path).unwrap();
        assert_eq!(info.version().as_deref(), Some("4230.2.1"));
        assert_eq!(info.sort_key().as_deref(), Some("acl"));
        assert_eq!(info.title().as_deref(), Some("ACL 4230.2.1"));
        assert_eq!(info.uname.as_deref(), Some("6.6.1"));
        assert!(info.has_kernel);
        assert_eq!(
            usrhash(info.cmdline.as_deref().unwrap()).as_deref(),
            Some("ab12")
        );
        std::fs::write(&path, b"not a PE file at all").unwrap();
        assert!(matches!(read_uki(&path), Err(UkiError::NotPe { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn usrhash_prefers_the_last_and_knows_flatcar() {
        assert_eq!(usrhash("usrhash=1 x usrhash=2").as_deref(), Some("2"));
        assert_eq!(usrhash("verity.usrhash=9").as_deref(), Some("9"));
        assert_eq!(usrhash("roothash=1"), None);
    }
}
