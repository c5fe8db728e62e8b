//! The ACL-layout test disk: ESP, USR-A, HASH-A, USR-B, HASH-B, VAR, as
//! Azure Container Linux lays out its disk (by label and type; the numbers
//! are this disk's own). Each slot's tree comes from `veritysetup format`,
//! each UKI is systemd's EFI stub with the kernel, initrd, os-release and
//! a command line naming the slot's verity partitions and root hash
//! (`objcopy`, unsigned for the test), and `/usr` (here the whole root)
//! is opened through dm-verity by the initrd from that command line.
//!
//! bookworm's systemd-stub (252) predates UKI addons, so the slot's verity
//! arguments sit in the UKI's own `.cmdline`, one UKI per version and
//! slot, where ACL keeps them in a per-slot addon; tandem handles both
//! (see the updater's tests for addons).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use bootconfig::gpt::GptDisk;
use bootconfig::ukidir::UkiDir;

use crate::build::{copy_file, mib, run, slot_image, write_file, Binaries};

const ESP_MIB: u64 = 64;
const USR_MIB: u64 = 256;
const HASH_MIB: u64 = 8;
const VAR_MIB: u64 = 64;
const FLATCAR_USR_TYPE: &str = "5DFBF5F4-2848-4BAC-AA5E-0D9A20B745A6";
const USR_VERITY_TYPE: &str = "77FF5F63-E7B6-4633-ACF4-1565B864C0E6";
const DISK_GUID: &str = "7A1D0E11-0000-4000-8000-000000000100";
/// ESP, USR-A, HASH-A, USR-B, HASH-B, VAR.
const PART_GUIDS: [&str; 6] = [
    "7a1d0e11-0000-4000-8000-000000000101",
    "7a1d0e11-0000-4000-8000-000000000102",
    "7a1d0e11-0000-4000-8000-000000000103",
    "7a1d0e11-0000-4000-8000-000000000104",
    "7a1d0e11-0000-4000-8000-000000000105",
    "7a1d0e11-0000-4000-8000-000000000106",
];
/// Fixed salt and UUID, so that the trees are the same on every build.
const SALT: &str = "7a1d0e11000040008000000000000000";
const VERITY_UUID: &str = "7a1d0e11-0000-4000-8000-0000000000ee";

/// What the ACL scenarios boot.
#[derive(Debug, Clone)]
pub struct AclBuilt {
    /// 1.0.0 in USR-A (its tree in HASH-A, its UKI good on the ESP).
    pub disk: PathBuf,
    /// `stable.json` with 2.0.0: a full payload and a delta from 1.0.0,
    /// each of usr, verity and uki, made for slot B.
    pub release_disk: PathBuf,
    /// The root hashes of 1.0.0 and 2.0.0.
    pub root_hashes: [String; 2],
}

/// The parts of one version's slot.
struct SlotParts {
    image: PathBuf,
    hash: PathBuf,
    root: String,
}

fn usr_hash_guids(slot: usize) -> (&'static str, &'static str) {
    (PART_GUIDS[1 + 2 * slot], PART_GUIDS[2 + 2 * slot])
}

/// A UKI of `version` for `slot` (0 = A): the base's kernel and initrd,
/// the version's os-release, the slot's verity arguments.
fn make_uki(set: &Path, base: &Path, version: &str, slot: usize, root: &str) -> Result<PathBuf> {
    let find = |prefix: &str| -> Result<PathBuf> {
        fs::read_dir(base.join("boot"))?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            })
            .with_context(|| format!("no {prefix}* in the base root's /boot"))
    };
    let (kernel, initrd) = (find("vmlinuz-")?, find("initrd.img-")?);
    let (usr, hash) = usr_hash_guids(slot);
    let cmdline = set.join(format!("uki-{version}-{slot}.cmdline"));
    write_file(
        &cmdline,
        &format!(
            "root=/dev/mapper/usr ro console=ttyS0 panic=5 systemd.gpt_auto=0 loglevel=4 systemd.verity_usr_data=PARTUUID={usr} systemd.verity_usr_hash=PARTUUID={hash} usrhash={root}"
        ),
    )?;
    let osrel = set.join(format!("uki-{version}.osrel"));
    write_file(
        &osrel,
        &format!(
            "NAME=\"tandem test node\"\nPRETTY_NAME=\"tandem test node {version}\"\nID=tandem-test\nVERSION_ID={version}\n"
        ),
    )?;
    let out = set.join(format!("uki-{version}-{slot}.efi"));
    let section = |name: &str, path: &Path, vma: &str| -> Vec<String> {
        vec![
            "--add-section".into(),
            format!("{name}={}", path.display()),
            "--change-section-vma".into(),
            format!("{name}={vma}"),
        ]
    };
    let mut args = Vec::new();
    args.extend(section(".osrel", &osrel, "0x20000"));
    args.extend(section(".cmdline", &cmdline, "0x30000"));
    args.extend(section(".linux", &kernel, "0x2000000"));
    args.extend(section(".initrd", &initrd, "0x3000000"));
    run(Command::new("objcopy")
        .args(&args)
        .arg("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
        .arg(&out))?;
    Ok(out)
}

fn slot_parts(
    base: &Path,
    set: &Path,
    version: &str,
    bins: &Binaries,
    keyring: &Path,
) -> Result<SlotParts> {
    let image = set.join(format!("acl-root-{version}.img"));
    slot_image(base, set, version, bins, keyring, &image, "vm-acl.toml")?;
    let hash = set.join(format!("acl-hash-{version}.img"));
    let _ = fs::remove_file(&hash);
    let out = run(Command::new("veritysetup")
        .arg("format")
        .arg(format!("--salt={SALT}"))
        .arg(format!("--uuid={VERITY_UUID}"))
        .arg(&image)
        .arg(&hash))?;
    let root = out
        .lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .map(|h| h.trim().to_string())
        .with_context(|| format!("no root hash in veritysetup's output: {out}"))?;
    Ok(SlotParts { image, hash, root })
}

/// Builds the ACL disk and its release disk into `set`.
pub fn build(
    base: &Path,
    set: &Path,
    bins: &Binaries,
    key: &Path,
    keyring: &Path,
) -> Result<AclBuilt> {
    let v1 = slot_parts(base, set, "1.0.0", bins, keyring)?;
    let v2 = slot_parts(base, set, "2.0.0", bins, keyring)?;
    let uki1 = make_uki(set, base, "1.0.0", 0, &v1.root)?;
    let uki2 = make_uki(set, base, "2.0.0", 1, &v2.root)?;

    // The release: 2.0.0 for slot B, full and as a delta from 1.0.0 in A.
    let www = set.join("www-acl");
    fs::create_dir_all(&www)?;
    let full = www.join("full-2.0.0.tpl");
    let delta = www.join("delta-1.0.0-2.0.0.tpl");
    run(Command::new(&bins.tandem_release)
        .args(["full", "-q", "--version", "2.0.0"])
        .args(crate::build::FAST_PAYLOADS)
        .arg("--image")
        .arg(&v2.image)
        .arg("--verity-hash")
        .arg(&v2.hash)
        .arg("--uki")
        .arg(&uki2)
        .arg("--key")
        .arg(key)
        .arg("-o")
        .arg(&full))?;
    run(Command::new(&bins.tandem_release)
        .args([
            "delta",
            "-q",
            "--version",
            "2.0.0",
            "--source-version",
            "1.0.0",
        ])
        .args(crate::build::FAST_PAYLOADS)
        .arg("--image")
        .arg(&v2.image)
        .arg("--verity-hash")
        .arg(&v2.hash)
        .arg("--uki")
        .arg(&uki2)
        .arg("--source")
        .arg(&v1.image)
        .arg("--source-verity-hash")
        .arg(&v1.hash)
        .arg("--source-uki")
        .arg(&uki1)
        .arg("--key")
        .arg(key)
        .arg("-o")
        .arg(&delta))?;
    let index = www.join("stable.json");
    let _ = fs::remove_file(&index);
    run(Command::new(&bins.tandem_release)
        .args(["index", "add", "--index"])
        .arg(&index)
        .arg("--full")
        .arg(&full)
        .arg("--delta")
        .arg(&delta))?;
    run(Command::new(&bins.tandem_release)
        .args(["index", "sign", "--index"])
        .arg(&index)
        .arg("--key")
        .arg(key)
        .args(["--expires-in-days", "3650"]))?;
    let bytes: u64 = fs::read_dir(&www)?
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    let release_disk = set.join("release-acl.img");
    let _ = fs::remove_file(&release_disk);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-L", "tandem-release", "-d"])
        .arg(&www)
        .arg(&release_disk)
        .arg(format!(
            "{}M",
            bytes / (1 << 20) + 16 + bytes / (1 << 20) / 10
        )))?;

    let disk = set.join("acl-disk-1.0.0.img");
    acl_disk(set, &v1, &uki1, &disk)?;
    for path in [&v1.image, &v2.image] {
        fs::remove_file(path)?;
    }
    Ok(AclBuilt {
        disk,
        release_disk,
        root_hashes: [v1.root, v2.root],
    })
}

fn acl_disk(set: &Path, v1: &SlotParts, uki: &Path, disk: &Path) -> Result<()> {
    let _ = fs::remove_file(disk);
    let total = mib(2) + mib(ESP_MIB) + 2 * (mib(USR_MIB) + mib(HASH_MIB)) + mib(VAR_MIB);
    fs::File::create(disk)?.set_len(total)?;
    let parts = [
        (ESP_MIB, "EF00", "EFI-SYSTEM"),
        (USR_MIB, FLATCAR_USR_TYPE, "USR-A"),
        (HASH_MIB, USR_VERITY_TYPE, "HASH-A"),
        (USR_MIB, FLATCAR_USR_TYPE, "USR-B"),
        (HASH_MIB, USR_VERITY_TYPE, "HASH-B"),
        (VAR_MIB, "8300", "VAR"),
    ];
    let mut args: Vec<String> = vec!["-o".into(), "-U".into(), DISK_GUID.into()];
    for (i, (size, code, label)) in parts.iter().enumerate() {
        let n = i + 1;
        args.extend([
            "-n".into(),
            format!("{n}:0:+{size}M"),
            "-t".into(),
            format!("{n}:{code}"),
            "-c".into(),
            format!("{n}:{label}"),
            "-u".into(),
            format!("{n}:{}", PART_GUIDS[i]),
        ]);
    }
    run(Command::new("sgdisk").args(&args).arg(disk))?;
    let gpt = GptDisk::open(disk)?;
    let start_of = |label: &str| -> Result<u64> {
        gpt.partitions()
            .iter()
            .find(|p| p.name == label)
            .map(|p| p.first_lba * gpt.sector_size())
            .with_context(|| format!("no partition {label}"))
    };
    let dd = |from: &Path, at: u64| {
        run(Command::new("dd")
            .arg(format!("if={}", from.display()))
            .arg(format!("of={}", disk.display()))
            .args(["bs=1M", "conv=notrunc,sparse"])
            .arg(format!("seek={}", at >> 20)))
    };
    dd(&v1.image, start_of("USR-A")?)?;
    dd(&v1.hash, start_of("HASH-A")?)?;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-L", "var", "-E"])
        .arg(format!("offset={}", start_of("VAR")?))
        .arg(disk)
        .arg(format!("{}", mib(VAR_MIB) / 4096)))?;

    // The ESP: systemd-boot, loader.conf, and slot A's UKI installed by
    // tandem's own code, marked good.
    let esp = set.join("esp-acl");
    if esp.exists() {
        fs::remove_dir_all(&esp)?;
    }
    copy_file(
        Path::new("/usr/lib/systemd/boot/efi/systemd-bootx64.efi"),
        &esp.join("EFI/BOOT/BOOTX64.EFI"),
        0o644,
    )?;
    write_file(
        &esp.join("loader/loader.conf"),
        "timeout 0\nconsole-mode keep\neditor no\n",
    )?;
    let ukis = UkiDir::new(&esp);
    let (staged, _) = ukis.staging_paths("tandem-slot-a");
    copy_file(uki, &staged, 0o644)?;
    let name = ukis.install("tandem-slot-a", &staged, None, None)?;
    if name != "tandem-slot-a.efi" {
        bail!("slot A's UKI installed as {name}");
    }
    let esp_img = set.join("esp-acl.img");
    let _ = fs::remove_file(&esp_img);
    run(Command::new("mkfs.vfat")
        .args(["-F", "32", "-n", "ESP", "-C"])
        .arg(&esp_img)
        .arg(format!("{}", mib(ESP_MIB) / 1024)))?;
    let mut copy = Command::new("mcopy");
    copy.arg("-s").arg("-i").arg(&esp_img);
    for entry in fs::read_dir(&esp)?.flatten() {
        copy.arg(entry.path());
    }
    copy.arg("::/");
    run(&mut copy)?;
    dd(&esp_img, start_of("EFI-SYSTEM")?)?;
    fs::remove_file(&esp_img)?;
    fs::remove_dir_all(&esp)?;
    Ok(())
}

/// Byte offset and size of a partition of a disk image, by label.
pub fn partition(disk: &Path, label: &str) -> Result<(u64, u64)> {
    let gpt = GptDisk::open(disk)?;
    let p = gpt
        .partitions()
        .into_iter()
        .find(|p| p.name == label)
        .with_context(|| format!("{}: no partition {label}", disk.display()))?;
    let sector = gpt.sector_size();
    Ok((
        p.first_lba * sector,
        (p.last_lba - p.first_lba + 1) * sector,
    ))
}
