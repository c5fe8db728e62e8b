//! A slot's boot files: the kernel, initrd and command line that live inside
//! the slot's (verified) ext4/ext2 image, read without mounting it, and
//! their copies on the ESP that a BLS entry points at.
//!
//! Where the files are in an image is decided by [`choose`], a pure
//! function over directory listings; [`read_from_image`] does the reading
//! and [`install`] the atomic writes to the ESP.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ext4_view::{Ext4, Ext4Error, Ext4Read};

use crate::{version, SlotName};

/// Why a slot's boot files could not be found, read or installed.
#[derive(Debug, thiserror::Error)]
pub enum BootFilesError {
    #[error(
        "the slot image is not a filesystem tandem can read boot files from (ext4 or ext2): {0}"
    )]
    NotExt4(String),
    #[error("reading {path} in the slot image: {error}")]
    Read { path: String, error: String },
    #[error("the slot image has no kernel: looked for /usr/lib/modules/*/vmlinuz, /lib/modules/*/vmlinuz and /boot/vmlinuz-*")]
    NoKernel,
    #[error("{path}: {action}: {error}")]
    Io {
        path: PathBuf,
        action: &'static str,
        error: io::Error,
    },
}

/// Where the kernel and initrd are in an image. Paths are absolute within
/// the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub kernel_version: String,
    pub kernel: String,
    pub initrd: Option<String>,
}

/// One kernel version's files: a modules folder's names, or `/boot`'s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The folder, absolute within the image (`/usr/lib/modules/6.1.0-1`).
    pub dir: String,
    pub names: Vec<String>,
}

/// Picks the kernel to boot from listings of `*/modules/VERSION` folders
/// (kernel-install layout: `vmlinuz` and `initrd` in the folder) and of
/// `/boot` (Debian layout: `vmlinuz-VERSION`, `initrd.img-VERSION`; Fedora's
/// `initramfs-VERSION.img`). The newest version wins. Pure.
pub fn choose(modules: &[Listing], boot: &[String]) -> Result<Located, BootFilesError> {
    let mut found: Vec<Located> = Vec::new();
    for listing in modules {
        if listing.names.iter().any(|n| n == "vmlinuz") {
            let version = listing
                .dir
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string();
            found.push(Located {
                kernel_version: version,
                kernel: format!("{}/vmlinuz", listing.dir),
                initrd: listing
                    .names
                    .iter()
                    .any(|n| n == "initrd")
                    .then(|| format!("{}/initrd", listing.dir)),
            });
        }
    }
    if found.is_empty() {
        for name in boot {
            let Some(version) = name.strip_prefix("vmlinuz-") else {
                continue;
            };
            let initrd = [
                format!("initrd.img-{version}"),
                format!("initramfs-{version}.img"),
            ]
            .into_iter()
            .find(|candidate| boot.contains(candidate))
            .map(|n| format!("/boot/{n}"));
            found.push(Located {
                kernel_version: version.to_string(),
                kernel: format!("/boot/{name}"),
                initrd,
            });
        }
    }
    found
        .into_iter()
        .max_by(|a, b| version::compare(&a.kernel_version, &b.kernel_version))
        .ok_or(BootFilesError::NoKernel)
}

/// The value of `NAME` (or `PRETTY_NAME` when it has none) in an
/// os-release text, unquoted. Pure.
pub fn os_name(os_release: &str) -> Option<String> {
    let value = |key: &str| {
        os_release.lines().find_map(|line| {
            let rest = line.trim().strip_prefix(key)?.strip_prefix('=')?;
            let unquoted = rest.trim().trim_matches(|c| c == '"' || c == '\'');
            (!unquoted.is_empty()).then(|| unquoted.to_string())
        })
    };
    value("NAME").or_else(|| value("PRETTY_NAME"))
}

/// A slot's boot files, read from its image.
#[derive(Clone, PartialEq, Eq)]
pub struct BootFiles {
    pub located: Located,
    pub kernel: Vec<u8>,
    pub initrd: Option<Vec<u8>>,
    /// The image's kernel command line (`/etc/kernel/cmdline` or
    /// `/usr/lib/kernel/cmdline`), without the root argument tandem adds.
    pub cmdline: String,
    /// The image's OS name from its os-release, for the entry title.
    pub os_name: Option<String>,
}

impl std::fmt::Debug for BootFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootFiles")
            .field("located", &self.located)
            .field("kernel_bytes", &self.kernel.len())
            .field("initrd_bytes", &self.initrd.as_ref().map(Vec::len))
            .field("cmdline", &self.cmdline)
            .field("os_name", &self.os_name)
            .finish()
    }
}

/// A byte range of a disk or image file, read as a filesystem.
struct RangeRead {
    file: File,
    offset: u64,
    len: u64,
}

impl Ext4Read for RangeRead {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        if start_byte
            .checked_add(dst.len() as u64)
            .is_none_or(|end| end > self.len)
        {
            return Err(format!(
                "read of {} bytes at {start_byte} goes past the slot's end ({} bytes)",
                dst.len(),
                self.len
            )
            .into());
        }
        self.file.read_exact_at(dst, self.offset + start_byte)?;
        Ok(())
    }
}

fn read_error(path: &str) -> impl FnOnce(Ext4Error) -> BootFilesError + '_ {
    move |error| BootFilesError::Read {
        path: path.to_string(),
        error: error.to_string(),
    }
}

/// The names in a folder of the image; an absent folder is empty.
fn list(fs: &Ext4, dir: &str) -> Result<Vec<String>, BootFilesError> {
    if !fs.exists(dir).map_err(read_error(dir))? {
        return Ok(Vec::new());
    }
    let mut names = Vec::new();
    for entry in fs.read_dir(dir).map_err(read_error(dir))? {
        let entry = entry.map_err(read_error(dir))?;
        let name = entry.file_name();
        let name = name.as_str().unwrap_or_default();
        if name != "." && name != ".." && !name.is_empty() {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

fn read_first(fs: &Ext4, paths: &[&str]) -> Result<Option<String>, BootFilesError> {
    for path in paths {
        if fs.exists(*path).map_err(read_error(path))? {
            return fs.read_to_string(*path).map(Some).map_err(read_error(path));
        }
    }
    Ok(None)
}

/// Reads the boot files from the filesystem in `len` bytes at `offset` of
/// `disk` (a slot partition of a disk, or an image file), without mounting.
pub fn read_from_image(disk: &Path, offset: u64, len: u64) -> Result<BootFiles, BootFilesError> {
    let file = File::open(disk).map_err(|error| BootFilesError::Io {
        path: disk.to_path_buf(),
        action: "cannot open",
        error,
    })?;
    let fs = Ext4::load(Box::new(RangeRead { file, offset, len }))
        .map_err(|e| BootFilesError::NotExt4(e.to_string()))?;
    let mut modules = Vec::new();
    // An image of /usr has its modules at /lib/modules.
    for parent in ["/usr/lib/modules", "/lib/modules"] {
        for version in list(&fs, parent)? {
            let dir = format!("{parent}/{version}");
            let names = list(&fs, &dir)?;
            modules.push(Listing { dir, names });
        }
    }
    let located = choose(&modules, &list(&fs, "/boot")?)?;
    let kernel = fs
        .read(located.kernel.as_str())
        .map_err(read_error(&located.kernel))?;
    let initrd = match &located.initrd {
        Some(path) => Some(fs.read(path.as_str()).map_err(read_error(path))?),
        None => None,
    };
    let cmdline = read_first(
        &fs,
        &[
            "/etc/kernel/cmdline",
            "/usr/lib/kernel/cmdline",
            "/lib/kernel/cmdline",
        ],
    )?
    .map(|text| text.split_whitespace().collect::<Vec<_>>().join(" "))
    .unwrap_or_default();
    let os_name = read_first(
        &fs,
        &["/etc/os-release", "/usr/lib/os-release", "/lib/os-release"],
    )?
    .and_then(|text| os_name(&text));
    Ok(BootFiles {
        located,
        kernel,
        initrd,
        cmdline,
        os_name,
    })
}

/// The ESP folder holding a slot's boot files, relative to the ESP's root.
pub fn slot_dir(slot: SlotName) -> String {
    format!("tandem/slot-{}", slot.to_string().to_lowercase())
}

/// The stem of the BLS entry tandem writes for a slot.
pub fn entry_stem(slot: SlotName) -> String {
    format!("tandem-slot-{}", slot.to_string().to_lowercase())
}

/// Where [`install`] put the files, as BLS `linux`/`initrd` paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub linux: String,
    pub initrd: Option<String>,
}

fn io(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> BootFilesError {
    let path = path.to_path_buf();
    move |error| BootFilesError::Io {
        path,
        action,
        error,
    }
}

fn write_synced(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), BootFilesError> {
    let temp = dir.join(format!(".{name}.tmp"));
    let target = dir.join(name);
    {
        let mut file = File::create(&temp).map_err(io(&temp, "cannot create"))?;
        file.write_all(bytes).map_err(io(&temp, "cannot write"))?;
        file.sync_all().map_err(io(&temp, "cannot sync"))?;
    }
    fs::rename(&temp, &target).map_err(io(&target, "cannot rename into place"))
}

/// Copies a slot's kernel and initrd to `ESP/tandem/slot-X/` (temp file,
/// fsync, rename, folder fsync). Only that slot's folder is touched; the
/// other slot's files stay.
pub fn install(esp: &Path, slot: SlotName, files: &BootFiles) -> Result<Installed, BootFilesError> {
    let relative = slot_dir(slot);
    let dir = esp.join(&relative);
    fs::create_dir_all(&dir).map_err(io(&dir, "cannot create"))?;
    write_synced(&dir, "vmlinuz", &files.kernel)?;
    let initrd = match &files.initrd {
        Some(bytes) => {
            write_synced(&dir, "initrd", bytes)?;
            Some(format!("/{relative}/initrd"))
        }
        None => {
            let stale = dir.join("initrd");
            if stale.exists() {
                fs::remove_file(&stale).map_err(io(&stale, "cannot remove"))?;
            }
            None
        }
    };
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io(&dir, "cannot sync"))?;
    Ok(Installed {
        linux: format!("/{relative}/vmlinuz"),
        initrd,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn debian_boot_layout() {
        let boot = names(&[
            "System.map-6.1.0-9-cloud-amd64",
            "config-6.1.0-9-cloud-amd64",
            "initrd.img-6.1.0-9-cloud-amd64",
            "vmlinuz-6.1.0-9-cloud-amd64",
            "vmlinuz-6.1.0-10-cloud-amd64",
        ]);
        let got = choose(&[], &boot).unwrap();
        // The newest wins, even without an initrd.
        assert_eq!(got.kernel, "/boot/vmlinuz-6.1.0-10-cloud-amd64");
        assert_eq!(got.initrd, None);
        let got = choose(&[], &boot[..4]).unwrap();
        assert_eq!(got.kernel_version, "6.1.0-9-cloud-amd64");
        assert_eq!(
            got.initrd.as_deref(),
            Some("/boot/initrd.img-6.1.0-9-cloud-amd64")
        );
    }

    #[test]
    fn kernel_install_layout_first() {
        let modules = [
            Listing {
                dir: "/usr/lib/modules/6.6.1".into(),
                names: names(&["kernel", "modules.dep", "vmlinuz", "initrd"]),
            },
            Listing {
                dir: "/usr/lib/modules/6.5.0".into(),
                names: names(&["kernel", "vmlinuz"]),
            },
            Listing {
                dir: "/usr/lib/modules/7.0.0-extra".into(),
                names: names(&["kernel"]),
            },
        ];
        let boot = names(&["vmlinuz-9.9"]);
        let got = choose(&modules, &boot).unwrap();
        assert_eq!(got.kernel, "/usr/lib/modules/6.6.1/vmlinuz");
        assert_eq!(got.initrd.as_deref(), Some("/usr/lib/modules/6.6.1/initrd"));
        assert!(matches!(
            choose(&modules[2..], &[]),
            Err(BootFilesError::NoKernel)
        ));
    }

    #[test]
    fn os_release_name() {
        let text =
            "PRETTY_NAME=\"Azure Container Linux 2.0\"\nNAME=\"Azure Container Linux\"\nID=acl\n";
        assert_eq!(os_name(text).as_deref(), Some("Azure Container Linux"));
        assert_eq!(
            os_name("PRETTY_NAME='Debian 12'\n").as_deref(),
            Some("Debian 12")
        );
        assert_eq!(os_name("ID=x\n"), None);
    }
}
