//! Test helpers that drive real tools: disk images partitioned by `sgdisk`,
//! gptprio bits read back by `cgpt`, ESPs listed by `bootctl`.
//!
//! A missing tool is a test failure with a clear message, never a skip:
//! `cargo xtask test` installs them (as root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

pub mod dbus;
pub mod fleetlock;
pub mod http;
pub mod tls;

/// The Flatcar `/usr` partition type.
pub const USR_TYPE: &str = "5DFBF5F4-2848-4BAC-AA5E-0D9A20B745A6";
/// Sectors of one GPT copy's entry array (128 entries of 128 bytes).
const ENTRY_SECTORS: u64 = 32;
const SECTOR: u64 = 512;

/// A folder under the system temp dir, removed when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("tandem-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs a tool and returns its output; panics with the tool's stderr when
/// it is missing or fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} ({e}): install it (cargo xtask test does, as root)")
        });
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// A GPT disk image as ACL/Flatcar lays one out, shrunk: an ESP (1),
/// `USR-A` (3), `USR-B` (4) and an unrelated partition after them (9).
/// Every partition is filled with a byte pattern so that byte comparisons
/// would see any stray write.
#[derive(Debug)]
pub struct DiskImage {
    pub path: PathBuf,
}

impl DiskImage {
    /// A 64 MiB image with slot A as a shipped image has it: priority 1,
    /// successful (what Flatcar's image builder writes), B empty.
    pub fn flatcar(dir: &Path) -> DiskImage {
        let image = Self::with_labels(dir, "USR-A", "USR-B");
        image.cgpt_add(3, &["-P", "1", "-S", "1"]);
        image
    }

    /// An image with the two slot partitions labelled as given.
    pub fn with_labels(dir: &Path, label_a: &str, label_b: &str) -> DiskImage {
        let path = dir.join("disk.img");
        let file = fs::File::create(&path).unwrap();
        file.set_len(64 << 20).unwrap();
        drop(file);
        let p = path.to_str().unwrap();
        run(
            "sgdisk",
            &[
                "-o",
                "-n",
                "1:2048:+8M",
                "-t",
                "1:EF00",
                "-c",
                "1:EFI-SYSTEM",
                "-n",
                "3:0:+16M",
                "-t",
                &format!("3:{USR_TYPE}"),
                "-c",
                &format!("3:{label_a}"),
                "-n",
                "4:0:+16M",
                "-t",
                &format!("4:{USR_TYPE}"),
                "-c",
                &format!("4:{label_b}"),
                "-n",
                "9:0:0",
                "-t",
                "9:8300",
                "-c",
                "9:ROOT",
                p,
            ],
        );
        let image = DiskImage { path };
        image.fill_partitions();
        image
    }

    fn fill_partitions(&self) {
        use std::os::unix::fs::FileExt;
        let file = fs::OpenOptions::new().write(true).open(&self.path).unwrap();
        for number in [1, 3, 4, 9] {
            let start = self.cgpt_field(number, "-b").parse::<u64>().unwrap() * SECTOR;
            let size = self.cgpt_field(number, "-s").parse::<u64>().unwrap() * SECTOR;
            let block: Vec<u8> = (0..4096u32).map(|i| (i * 31 + number) as u8).collect();
            let pattern = block.repeat((size / 4096) as usize);
            file.write_all_at(&pattern, start).unwrap();
        }
    }

    pub fn path_str(&self) -> &str {
        self.path.to_str().unwrap()
    }

    pub fn bytes(&self) -> Vec<u8> {
        fs::read(&self.path).unwrap()
    }

    /// `cgpt add -i N ARGS… IMAGE`.
    pub fn cgpt_add(&self, number: u32, args: &[&str]) {
        let n = number.to_string();
        let mut all = vec!["add", "-i", &n];
        all.extend_from_slice(args);
        all.push(self.path_str());
        run("cgpt", &all);
    }

    /// One field of `cgpt show -i N -FLAG IMAGE`.
    pub fn cgpt_field(&self, number: u32, flag: &str) -> String {
        let n = number.to_string();
        stdout(&run("cgpt", &["show", "-i", &n, flag, self.path_str()]))
    }

    /// (priority, tries, successful) as `cgpt` reads them.
    pub fn cgpt_prio(&self, number: u32) -> (u8, u8, bool) {
        let field = |flag| self.cgpt_field(number, flag).parse::<u8>().unwrap();
        (field("-P"), field("-T"), field("-S") == 1)
    }

    /// The PARTUUID of a partition, lower case, as `cgpt` reads it.
    pub fn partuuid(&self, number: u32) -> String {
        self.cgpt_field(number, "-u").to_lowercase()
    }

    /// Byte ranges of the two GPT copies: LBA 1 to the end of the primary
    /// entry array, and the backup entry array plus header at the end.
    pub fn gpt_ranges(&self) -> [Range<usize>; 2] {
        let len = fs::metadata(&self.path).unwrap().len();
        [
            SECTOR as usize..((2 + ENTRY_SECTORS) * SECTOR) as usize,
            (len - (ENTRY_SECTORS + 1) * SECTOR) as usize..len as usize,
        ]
    }
}

/// Byte ranges (merged) where two buffers differ.
pub fn differing_ranges(a: &[u8], b: &[u8]) -> Vec<Range<usize>> {
    assert_eq!(a.len(), b.len(), "sizes differ");
    let mut ranges: Vec<Range<usize>> = Vec::new();
    for i in (0..a.len()).filter(|&i| a[i] != b[i]) {
        match ranges.last_mut() {
            Some(last) if last.end == i => last.end = i + 1,
            _ => ranges.push(i..i + 1),
        }
    }
    ranges
}

/// Asserts that `after` differs from `before` only inside the GPT copies.
pub fn assert_only_gpt_changed(image: &DiskImage, before: &[u8], after: &[u8]) {
    let allowed = image.gpt_ranges();
    let outside: Vec<Range<usize>> = differing_ranges(before, after)
        .into_iter()
        .filter(|r| !allowed.iter().any(|a| a.start <= r.start && r.end <= a.end))
        .collect();
    assert!(
        outside.is_empty(),
        "bytes changed outside the GPT copies: {outside:?}"
    );
}

/// A folder bind-mounted onto itself, so that `bootctl --esp-path` accepts
/// it as the root of a mount (with `SYSTEMD_RELAX_ESP_CHECKS=1`). Needs root.
#[derive(Debug)]
pub struct BindMount {
    dir: TempDir,
}

impl BindMount {
    pub fn new(tag: &str) -> BindMount {
        let dir = TempDir::new(tag);
        let p = dir.path().to_str().unwrap().to_string();
        let output = Command::new("mount")
            .args(["--bind", &p, &p])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "mount --bind {p} failed (this test needs root): {}",
            String::from_utf8_lossy(&output.stderr)
        );
        BindMount { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `bootctl --esp-path=DIR --no-variables list`.
    pub fn bootctl_list(&self) -> String {
        let output = Command::new("bootctl")
            .arg(format!("--esp-path={}", self.path().display()))
            .args(["--no-variables", "--no-pager", "list"])
            .env("SYSTEMD_RELAX_ESP_CHECKS", "1")
            .output()
            .expect("cannot run bootctl: install systemd-boot (cargo xtask test does, as root)");
        assert!(
            output.status.success(),
            "bootctl list failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// `bootctl list` taken apart: one map of field to value per entry.
pub fn bootctl_entries(listing: &str) -> Vec<std::collections::BTreeMap<String, String>> {
    listing
        .split("\n\n")
        .map(|block| {
            block
                .lines()
                .filter_map(|line| {
                    let (key, value) = line.split_once(':')?;
                    Some((key.trim().to_string(), value.trim().to_string()))
                })
                .collect::<std::collections::BTreeMap<_, _>>()
        })
        .filter(|fields| fields.contains_key("title"))
        .collect()
}

/// The BLS entry tandem writes for a slot running `version`: shared sort
/// key, kernel and initrd under `/tandem/VERSION/`, `mount.usr=` naming the
/// slot's PARTUUID.
pub fn slot_entry(version: &str, slot_partuuid: &str) -> bootconfig::bls::NewEntry {
    bootconfig::bls::NewEntry {
        title: format!("Azure Container Linux {version}"),
        version: version.to_string(),
        sort_key: "tandem".to_string(),
        linux: format!("/tandem/{version}/vmlinuz"),
        initrd: vec![format!("/tandem/{version}/initrd")],
        options: format!("mount.usr=PARTUUID={slot_partuuid} console=ttyS0"),
    }
}

/// Deterministic incompressible bytes (xorshift64).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Compressible text-like bytes: words from a small vocabulary.
pub fn text(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: [&str; 12] = [
        "container",
        "kernel",
        "module",
        "update",
        "slot",
        "verity",
        "systemd",
        "node ",
        "image",
        "delta",
        "\n",
        "0x1f2e ",
    ];
    let picks = noise(seed, len);
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        out.extend_from_slice(WORDS[usize::from(picks[i % picks.len()]) % WORDS.len()].as_bytes());
        out.push(b' ');
        i += 1;
    }
    out.truncate(len);
    out
}

/// A source and a target image (8 MiB each) that differ the way OS
/// releases do: most blocks unchanged, a file moved elsewhere, a file
/// edited with bytes inserted (so its tail shifts), new bytes, blocks that
/// became zero and zeros that became data.
pub fn image_pair() -> (Vec<u8>, Vec<u8>) {
    const MIB: usize = 1 << 20;
    let mut source = vec![0u8; 8 * MIB];
    source[..2 * MIB].copy_from_slice(&text(1, 2 * MIB));
    source[2 * MIB..3 * MIB].copy_from_slice(&noise(2, MIB));
    let edited_file = text(3, 512 * 1024);
    source[3 * MIB..3 * MIB + 512 * 1024].copy_from_slice(&edited_file);
    source[4 * MIB..5 * MIB].copy_from_slice(&noise(4, MIB));
    source[6 * MIB..7 * MIB].copy_from_slice(&text(5, MIB));

    let mut target = source.clone();
    // The noise file moves from 2 MiB to 7 MiB; new noise takes its place.
    target[7 * MIB..8 * MIB].copy_from_slice(&source[2 * MIB..3 * MIB]);
    target[2 * MIB..3 * MIB].copy_from_slice(&noise(6, MIB));
    // The edited file: 100 bytes inserted, a few changed.
    let mut edited = edited_file[..1000].to_vec();
    edited.extend_from_slice(&[b'+'; 100]);
    edited.extend_from_slice(&edited_file[1000..]);
    edited[300_000] ^= 0xff;
    edited.truncate(512 * 1024);
    target[3 * MIB..3 * MIB + 512 * 1024].copy_from_slice(&edited);
    // A region zeroed, and a zero region filled.
    target[4 * MIB..4 * MIB + 256 * 1024].fill(0);
    target[5 * MIB..5 * MIB + 64 * 1024].copy_from_slice(&text(7, 64 * 1024));
    // Single changed bytes in otherwise identical blocks.
    target[100_000] ^= 1;
    target[6 * MIB + 12_345] ^= 1;
    (source, target)
}

/// systemd's EFI stub from Debian's `systemd-boot-efi`, the base of the
/// test UKIs.
pub const EFI_STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

/// A UKI made the way `ukify` does before it signs: `objcopy` adds the
/// `.osrel`, `.cmdline` and (for a UKI, not an addon) `.linux` sections
/// to systemd's stub. Unsigned: the tests check what tandem reads and
/// writes, not Secure Boot. An "addon" here is the same stub without a
/// kernel: bookworm's systemd 252 ships no addon stub, and tandem reads
/// an addon only for its `.cmdline`.
pub fn make_uki(
    dir: &Path,
    name: &str,
    os_release: &str,
    cmdline: &str,
    kernel: Option<&[u8]>,
) -> PathBuf {
    let out = dir.join(name);
    let osrel = dir.join(format!("{name}.osrel"));
    let cmd = dir.join(format!("{name}.cmdline"));
    fs::write(&osrel, os_release).unwrap();
    fs::write(&cmd, cmdline).unwrap();
    let mut args: Vec<String> = vec![
        "--add-section".into(),
        format!(".osrel={}", osrel.display()),
        "--change-section-vma".into(),
        ".osrel=0x20000".into(),
        "--add-section".into(),
        format!(".cmdline={}", cmd.display()),
        "--change-section-vma".into(),
        ".cmdline=0x30000".into(),
    ];
    if let Some(kernel) = kernel {
        let linux = dir.join(format!("{name}.linux"));
        fs::write(&linux, kernel).unwrap();
        args.extend([
            "--add-section".into(),
            format!(".linux={}", linux.display()),
            "--change-section-vma".into(),
            ".linux=0x2000000".into(),
        ]);
    }
    args.extend([EFI_STUB.to_string(), out.display().to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run("objcopy", &refs);
    out
}

/// `veritysetup format` of `data` into a new `hash` file; returns the
/// root hash it printed.
pub fn veritysetup_format(data: &Path, hash: &Path) -> String {
    let out = run(
        "veritysetup",
        &["format", data.to_str().unwrap(), hash.to_str().unwrap()],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|| panic!("no root hash in veritysetup's output:\n{text}"))
}
