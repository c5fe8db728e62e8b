//! The test images: a Debian root made once by `image/base.sh`
//! (debootstrap), four slot images made from it (versions 1.0.0 to
//! 4.0.0), their signed payloads and index on a release disk, and a
//! bootable A/B disk running 1.0.0 from slot A.
//!
//! Everything is cached under one folder, keyed by a hash of its inputs:
//! the base by `base.sh`, the rest by the base, the binaries, the files
//! installed in the images and this file's layout constants. Nothing is
//! mounted; the ESP is filled with `mcopy` and the filesystems are made
//! with `mkfs.ext4 -d`.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use bootconfig::backend::BlsBackend;
use bootconfig::bls::EntriesDir;
use bootconfig::gpt::GptDisk;
use bootconfig::{bootfiles, BootBackend, SlotLayout, SlotName};

/// The versions built, in order: 1.0.0 and 2.0.0 are good, 3.0.0 fails
/// its health check, 4.0.0 never reaches userspace.
pub const VERSIONS: [&str; 4] = ["1.0.0", "2.0.0", "3.0.0", "4.0.0"];

/// Layout of the test disk, in MiB. A slot holds a whole root.
const ESP_MIB: u64 = 64;
const SLOT_MIB: u64 = 256;
const VAR_MIB: u64 = 64;
/// Bumped whenever what this file builds changes in a way the hashed
/// inputs do not show.
const LAYOUT: &str = "tandem-vm-layout-1";
const FLATCAR_USR_TYPE: &str = "5DFBF5F4-2848-4BAC-AA5E-0D9A20B745A6";
/// Fixed GUIDs, so that the disk is the same on every build.
const DISK_GUID: &str = "7A1D0E11-0000-4000-8000-000000000000";
const PART_GUIDS: [&str; 4] = [
    "7A1D0E11-0000-4000-8000-000000000001",
    "7A1D0E11-0000-4000-8000-000000000002",
    "7A1D0E11-0000-4000-8000-000000000003",
    "7A1D0E11-0000-4000-8000-000000000004",
];
const FS_UUID: &str = "7a1d0e11-0000-4000-8000-0000000000f5";

/// Where the freshly built tandem binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub tandemd: PathBuf,
    pub updatectl: PathBuf,
    pub tandem_release: PathBuf,
}

impl Binaries {
    /// The binaries in a cargo target folder (`target/debug`).
    pub fn in_dir(dir: &Path) -> Result<Binaries> {
        let bins = Binaries {
            tandemd: dir.join("tandemd"),
            updatectl: dir.join("updatectl"),
            tandem_release: dir.join("tandem-release"),
        };
        for path in [&bins.tandemd, &bins.updatectl, &bins.tandem_release] {
            if !path.is_file() {
                bail!(
                    "{} is missing: build it first (cargo build -p updater -p release --bins; cargo xtask vm-test does)",
                    path.display()
                );
            }
        }
        Ok(bins)
    }
}

/// What the tests boot.
#[derive(Debug, Clone)]
pub struct Built {
    /// The A/B disks by the version in slot A (1.0.0 and 2.0.0), good;
    /// slot B empty. Copy one before use.
    pub disks: Vec<(String, PathBuf)>,
    /// The read-only release disk: `stable.json`, its signature, payloads.
    pub release_disk: PathBuf,
    /// The slot images, by version.
    pub images: Vec<(String, PathBuf)>,
    /// The ACL-layout disk and its release (dm-verity, UKIs).
    pub acl: crate::acl::AclBuilt,
}

fn by_version(list: &[(String, PathBuf)], version: &str, what: &str) -> Result<PathBuf> {
    list.iter()
        .find(|(v, _)| v == version)
        .map(|(_, p)| p.clone())
        .with_context(|| format!("no {what} {version}"))
}

impl Built {
    /// The slot image of a version.
    pub fn image(&self, version: &str) -> Result<PathBuf> {
        by_version(&self.images, version, "slot image")
    }

    /// The A/B disk with a version in slot A.
    pub fn disk(&self, version: &str) -> Result<PathBuf> {
        by_version(&self.disks, version, "test disk starting from")
    }
}

/// The repository's root (this crate's parent).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The default cache: `$TANDEM_VM_CACHE`, else `$XDG_CACHE_HOME` or
/// `~/.cache`, else `/var/tmp`, then `tandem-qemu-tests`.
pub fn default_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("TANDEM_VM_CACHE") {
        return PathBuf::from(dir);
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
        .join("tandem-qemu-tests")
}

/// Runs a command; its output is shown only when it fails.
pub fn run(command: &mut Command) -> Result<String> {
    let shown = format!("{command:?}");
    let output = command
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    if !output.status.success() {
        bail!(
            "{shown} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn hash_files(parts: &mut String, paths: &[PathBuf]) -> Result<()> {
    for path in paths {
        let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        let _ = writeln!(parts, "{name} {}", payload::digest::sha256(&bytes));
    }
    Ok(())
}

fn short_hash(text: &str) -> String {
    payload::digest::sha256(text.as_bytes()).to_string()[..16].to_string()
}

fn files_dir() -> PathBuf {
    repo_root().join("qemu-tests/image/files")
}

fn units_dir() -> PathBuf {
    repo_root().join("systemd-units")
}

/// Builds what is missing from the cache and returns the paths.
pub fn build(cache: &Path, bins: &Binaries, say: &dyn Fn(&str)) -> Result<Built> {
    fs::create_dir_all(cache).with_context(|| format!("cannot create {}", cache.display()))?;
    let base = base_root(cache, say)?;
    let mut inputs = format!("{LAYOUT}\nbase {}\n", base.display());
    hash_files(
        &mut inputs,
        &[
            bins.tandemd.clone(),
            bins.updatectl.clone(),
            bins.tandem_release.clone(),
        ],
    )?;
    let mut image_files: Vec<PathBuf> = fs::read_dir(files_dir())
        .context("cannot list qemu-tests/image/files")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    image_files.sort();
    image_files.extend(
        [
            "tandemd.service",
            "tandem-health.service",
            "org.tandem.Update1.conf",
        ]
        .iter()
        .map(|n| units_dir().join(n)),
    );
    image_files.push(repo_root().join("qemu-tests/src/build.rs"));
    image_files.push(repo_root().join("qemu-tests/src/acl.rs"));
    hash_files(&mut inputs, &image_files)?;
    let set = cache.join(format!("set-{}", short_hash(&inputs)));
    let mut built = Built {
        acl: crate::acl::AclBuilt {
            disk: set.join("acl-disk-1.0.0.img"),
            release_disk: set.join("release-acl.img"),
            root_hashes: Default::default(),
        },
        disks: ["1.0.0", "2.0.0"]
            .iter()
            .map(|v| (v.to_string(), set.join(format!("disk-{v}.img"))))
            .collect(),
        release_disk: set.join("release.img"),
        images: VERSIONS
            .iter()
            .map(|v| (v.to_string(), set.join(format!("root-{v}.img"))))
            .collect(),
    };
    let acl_done = set.join("acl-done");
    if set.join("done").exists() && acl_done.exists() {
        say(&format!("test images: cached in {}", set.display()));
        let roots = fs::read_to_string(&acl_done)?;
        let mut roots = roots.lines().map(str::to_string);
        built.acl.root_hashes = [
            roots.next().unwrap_or_default(),
            roots.next().unwrap_or_default(),
        ];
        return Ok(built);
    }
    // Old sets are stale: their inputs changed. Keep the cache small.
    for entry in fs::read_dir(cache)?.flatten() {
        if entry.file_name().to_string_lossy().starts_with("set-") {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    fs::create_dir_all(&set)?;
    say(&format!("test images: building in {}", set.display()));
    let key = set.join("key.asc");
    let keyring = set.join("keyring.asc");
    run(Command::new(&bins.tandem_release).args([
        "keygen",
        "--user-id",
        "tandem VM tests <vm-tests@tandem.invalid>",
        "--secret",
        &path_str(&key)?,
        "--public",
        &path_str(&keyring)?,
    ]))?;
    for (version, image) in &built.images {
        say(&format!("slot image {version}"));
        slot_image(&base, &set, version, bins, &keyring, image, "vm.toml")?;
    }
    say("payloads and the signed index");
    release_disk(&set, &built, bins, &key)?;
    for (version, disk) in &built.disks {
        say(&format!("the A/B disk ({version} in slot A)"));
        ab_disk(&set, &built.image(version)?, version, disk)?;
    }
    say("the ACL-layout disk: hash partitions, UKIs, dm-verity");
    let acl = crate::acl::build(&base, &set, bins, &key, &keyring)?;
    fs::write(&acl_done, acl.root_hashes.join("\n"))?;
    fs::write(set.join("done"), inputs)?;
    Ok(Built { acl, ..built })
}

fn path_str(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_string)
        .with_context(|| format!("not UTF-8: {}", path.display()))
}

/// The debootstrapped root, cached by the hash of `base.sh`.
fn base_root(cache: &Path, say: &dyn Fn(&str)) -> Result<PathBuf> {
    let script = repo_root().join("qemu-tests/image/base.sh");
    let mirror = std::env::var("TANDEM_VM_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".to_string());
    let text = fs::read_to_string(&script).context("cannot read qemu-tests/image/base.sh")?;
    let dir = cache.join(format!("base-{}", short_hash(&format!("{text}\n{mirror}"))));
    if dir.join("etc/os-release").exists() && dir.with_extension("done").exists() {
        return Ok(dir);
    }
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    say(&format!(
        "Debian root: debootstrap from {mirror} (once; about a minute)"
    ));
    run(Command::new("sh").arg(&script).arg(&dir).arg(&mirror))?;
    fs::write(dir.with_extension("done"), "")?;
    Ok(dir)
}

pub(crate) fn copy_file(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

pub(crate) fn write_file(to: &Path, text: &str) -> Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(to, text).with_context(|| format!("cannot write {}", to.display()))
}

/// One version's slot image: the base root with tandem, its units and
/// config, the test units, the version stamp and the version's quirk.
pub(crate) fn slot_image(
    base: &Path,
    set: &Path,
    version: &str,
    bins: &Binaries,
    keyring: &Path,
    image: &Path,
    config: &str,
) -> Result<()> {
    let root = set.join(format!("root-{version}"));
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    run(Command::new("cp").arg("-a").arg(base).arg(&root))?;
    let files = files_dir();
    let units = units_dir();
    for (bin, name) in [(&bins.tandemd, "tandemd"), (&bins.updatectl, "updatectl")] {
        let to = root.join("usr/bin").join(name);
        run(Command::new("strip").arg("-o").arg(&to).arg(bin))?;
    }
    for unit in ["tandemd.service", "tandem-health.service"] {
        copy_file(
            &units.join(unit),
            &root.join("usr/lib/systemd/system").join(unit),
            0o644,
        )?;
    }
    copy_file(
        &units.join("org.tandem.Update1.conf"),
        &root.join("usr/share/dbus-1/system.d/org.tandem.Update1.conf"),
        0o644,
    )?;
    copy_file(
        keyring,
        &root.join("usr/share/tandem/keys.d/release.asc"),
        0o644,
    )?;
    copy_file(
        &files.join(config),
        &root.join("usr/lib/tandem/config.d/50-vm.toml"),
        0o644,
    )?;
    copy_file(&files.join("fstab"), &root.join("etc/fstab"), 0o644)?;
    for script in ["tandem-vm-boot", "tandem-vm-report", "tandem-vm-agent"] {
        copy_file(
            &files.join(script),
            &root.join("usr/libexec").join(script),
            0o755,
        )?;
        let unit = format!("{script}.service");
        copy_file(
            &files.join(&unit),
            &root.join("usr/lib/systemd/system").join(&unit),
            0o644,
        )?;
    }
    write_file(
        &root.join("usr/lib/os-release"),
        &format!(
            "NAME=\"tandem test node\"\nPRETTY_NAME=\"tandem test node {version}\"\nID=tandem-test\nID_LIKE=debian\nVERSION_ID={version}\n"
        ),
    )?;
    // panic=5: a kernel or initrd that cannot go on reboots, so systemd-boot
    // spends the entry's try and falls back.
    write_file(
        &root.join("etc/kernel/cmdline"),
        "ro console=ttyS0 panic=5 systemd.gpt_auto=0 loglevel=4\n",
    )?;
    write_file(&root.join("etc/hostname"), "tandem-vm\n")?;
    // Empty: systemd makes a machine id for each boot of a read-only root.
    write_file(&root.join("etc/machine-id"), "")?;
    for dir in ["efi", "srv/release", "var"] {
        fs::create_dir_all(root.join(dir))?;
    }
    run(Command::new("systemctl")
        .arg(format!("--root={}", root.display()))
        .args([
            "enable",
            "tandemd.service",
            "tandem-health.service",
            "tandem-vm-boot.service",
            "tandem-vm-report.service",
            "tandem-vm-agent.service",
        ]))?;
    // No login prompt on the serial console: agetty's hangup of ttyS0 as
    // it starts cut a report short once (its later lines were lost).
    run(Command::new("systemctl")
        .arg(format!("--root={}", root.display()))
        .args(["mask", "serial-getty@ttyS0.service"]))?;
    // tandem-health.service is RequiredBy boot-complete.target; have the
    // boot reach it (systemd-boot's bless generator is not in the image).
    fs::create_dir_all(root.join("etc/systemd/system/multi-user.target.wants"))?;
    let wants = root.join("etc/systemd/system/multi-user.target.wants/boot-complete.target");
    if !wants.exists() {
        std::os::unix::fs::symlink("/usr/lib/systemd/system/boot-complete.target", &wants)?;
    }
    match version {
        "3.0.0" => copy_file(
            &files.join("50-vm-fails"),
            &root.join("usr/lib/tandem/health.d/50-vm-fails"),
            0o755,
        )?,
        "4.0.0" => {
            // No init at all: the initrd finds nothing to run and panics.
            for gone in ["usr/sbin/init", "usr/bin/sh", "usr/bin/dash"] {
                let path = root.join(gone);
                if path.exists() || path.is_symlink() {
                    fs::remove_file(&path)?;
                }
            }
        }
        _ => {}
    }
    let _ = fs::remove_file(image);
    run(Command::new("mkfs.ext4")
        .env("E2FSPROGS_FAKE_TIME", "1767225600")
        .args(["-q", "-F", "-b", "4096", "-L", "tandem-root", "-U", FS_UUID])
        .arg("-E")
        .arg(format!("hash_seed={FS_UUID},root_owner=0:0"))
        .arg("-d")
        .arg(&root)
        .arg(image)
        .arg(format!("{SLOT_MIB}M")))?;
    fs::remove_dir_all(&root)?;
    Ok(())
}

/// Full payloads of every version, deltas 1→2, 2→3 and 2→4, the index
/// signed for ten years, all on an ext4 disk labelled `tandem-release`.
/// How the test releases' payloads are made: zstd level 3 and no bsdiff
/// operations. The VM tests are about boots, not payload size (the payload
/// tests and the benchmark are), and at the default -19 making the sets'
/// payloads was most of a cold run's image build.
pub(crate) const FAST_PAYLOADS: [&str; 4] = ["--level", "3", "--no-bsdiff", "--no-recompress"];

fn release_disk(set: &Path, built: &Built, bins: &Binaries, key: &Path) -> Result<()> {
    let www = set.join("www");
    fs::create_dir_all(&www)?;
    let image = |v: &str| built.image(v);
    let index = www.join("stable.json");
    let _ = fs::remove_file(&index);
    for version in VERSIONS {
        let full = www.join(format!("full-{version}.tpl"));
        run(Command::new(&bins.tandem_release)
            .arg("full")
            .args(FAST_PAYLOADS)
            .arg("--image")
            .arg(image(version)?)
            .args(["--version", version, "--key"])
            .arg(key)
            .arg("-o")
            .arg(&full))?;
        let source = match version {
            "1.0.0" => None,
            "2.0.0" => Some("1.0.0"),
            _ => Some("2.0.0"),
        };
        let mut add = Command::new(&bins.tandem_release);
        add.args(["index", "add", "--index"])
            .arg(&index)
            .arg("--full")
            .arg(&full);
        if let Some(source) = source {
            let delta = www.join(format!("delta-{source}-{version}.tpl"));
            run(Command::new(&bins.tandem_release)
                .args(["delta", "--source"])
                .arg(image(source)?)
                .args(FAST_PAYLOADS)
                .args(["--source-version", source, "--image"])
                .arg(image(version)?)
                .args(["--version", version, "--key"])
                .arg(key)
                .arg("-o")
                .arg(&delta))?;
            add.arg("--delta").arg(&delta);
        }
        run(&mut add)?;
    }
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
    let mib = bytes / (1 << 20) + 16 + bytes / (1 << 20) / 10;
    let _ = fs::remove_file(&built.release_disk);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-L", "tandem-release", "-d"])
        .arg(&www)
        .arg(&built.release_disk)
        .arg(format!("{mib}M")))?;
    Ok(())
}

pub(crate) fn mib(n: u64) -> u64 {
    n << 20
}

/// An A/B disk: GPT, ESP with systemd-boot and slot A's kernel and entry
/// (installed by tandem's own code), `version` in slot A, an empty VAR.
fn ab_disk(set: &Path, image: &Path, version: &str, disk: &Path) -> Result<()> {
    let _ = fs::remove_file(disk);
    let total = mib(1) + mib(ESP_MIB) + 2 * mib(SLOT_MIB) + mib(VAR_MIB) + mib(1);
    fs::File::create(disk)?.set_len(total)?;
    let part = |n: usize, size: u64, code: &str, label: &str| -> Vec<String> {
        vec![
            "-n".into(),
            format!("{}:0:+{size}M", n + 1),
            "-t".into(),
            format!("{}:{code}", n + 1),
            "-c".into(),
            format!("{}:{label}", n + 1),
            "-u".into(),
            format!("{}:{}", n + 1, PART_GUIDS[n]),
        ]
    };
    let mut args: Vec<String> = vec!["-o".into(), "-U".into(), DISK_GUID.into()];
    args.extend(part(0, ESP_MIB, "EF00", "EFI-SYSTEM"));
    args.extend(part(1, SLOT_MIB, FLATCAR_USR_TYPE, "ROOT-A"));
    args.extend(part(2, SLOT_MIB, FLATCAR_USR_TYPE, "ROOT-B"));
    args.extend(part(3, VAR_MIB, "8300", "VAR"));
    run(Command::new("sgdisk").args(&args).arg(disk))?;

    let gpt = GptDisk::open(disk)?;
    let layout = SlotLayout {
        labels: ["ROOT-A".into(), "ROOT-B".into()],
        ..SlotLayout::default()
    };
    let slots = bootconfig::slots::find_slots(
        &gpt.partitions(),
        gpt.sector_size(),
        gpt.size_bytes(),
        &layout,
    )?;
    let start_of = |label: &str| -> Result<u64> {
        gpt.partitions()
            .iter()
            .find(|p| p.name == label)
            .map(|p| p.first_lba * gpt.sector_size())
            .with_context(|| format!("no partition {label}"))
    };
    let (esp_at, var_at) = (start_of("EFI-SYSTEM")?, start_of("VAR")?);
    run(Command::new("dd")
        .arg(format!("if={}", image.display()))
        .arg(format!("of={}", disk.display()))
        .args(["bs=1M", "conv=notrunc,sparse"])
        .arg(format!("seek={}", slots[0].offset >> 20)))?;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-L", "var", "-E"])
        .arg(format!("offset={var_at}"))
        .arg(disk)
        .arg(format!("{}", mib(VAR_MIB) / 4096)))?;

    // The ESP's files, in a folder first: systemd-boot, loader.conf, and
    // slot A's kernel, initrd and entry as tandem installs them.
    let esp = set.join("esp");
    if esp.exists() {
        fs::remove_dir_all(&esp)?;
    }
    copy_file(
        Path::new("/usr/lib/systemd/boot/efi/systemd-bootx64.efi"),
        &esp.join("EFI/BOOT/BOOTX64.EFI"),
        0o644,
    )
    .context("systemd-boot is missing: install Debian's systemd-boot-efi")?;
    write_file(
        &esp.join("loader/loader.conf"),
        "timeout 0\nconsole-mode keep\neditor no\n",
    )?;
    let files = bootfiles::read_from_image(disk, slots[0].offset, slots[0].size)?;
    let mut backend = BlsBackend::open(EntriesDir::new(&esp), slots.clone())?;
    backend.install(SlotName::A, version, &files, "root")?;
    backend.mark_good(SlotName::A)?;
    let esp_img = set.join("esp.img");
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
    run(Command::new("dd")
        .arg(format!("if={}", esp_img.display()))
        .arg(format!("of={}", disk.display()))
        .args(["bs=1M", "conv=notrunc"])
        .arg(format!("seek={}", esp_at >> 20)))?;
    fs::remove_file(&esp_img)?;
    fs::remove_dir_all(&esp)?;
    Ok(())
}
