//! Boot Loader Specification type #1 entries with systemd-boot's boot
//! counting: `loader/entries/ID[+LEFT[-DONE]].conf`.
//!
//! Parsing, naming and systemd-boot's ordering are pure; [`EntriesDir`]
//! does the file I/O, every write as temp file, fsync, rename, fsync of
//! the folder.

use std::cmp::Ordering;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::version;

/// A boot counter in an entry's file name: `+LEFT` or `+LEFT-DONE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BootCounter {
    pub left: u32,
    pub done: u32,
}

/// An entry file name taken apart: `STEM[+LEFT[-DONE]].conf` (type #1)
/// or `STEM[+LEFT[-DONE]].efi` (type #2, a UKI in `EFI/Linux/`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryName {
    pub stem: String,
    pub counter: Option<BootCounter>,
    /// `.conf` or `.efi`.
    #[serde(skip)]
    pub suffix: &'static str,
}

impl EntryName {
    /// Parses a file name; `None` when it is not a `.conf` or `.efi`
    /// entry. Pure.
    pub fn parse(file_name: &str) -> Option<EntryName> {
        let (base, suffix) = match file_name.strip_suffix(".conf") {
            Some(base) => (base, ".conf"),
            None => (file_name.strip_suffix(".efi")?, ".efi"),
        };
        if base.is_empty() || base.starts_with('.') {
            return None;
        }
        // systemd takes the last '+' and accepts the counter only when the
        // rest is digits, optionally '-' and digits.
        let counter = base.rfind('+').and_then(|plus| {
            let (left, done) = match base[plus + 1..].split_once('-') {
                Some((left, done)) => (left, Some(done)),
                None => (&base[plus + 1..], None),
            };
            let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
            if !digits(left) || !done.is_none_or(digits) {
                return None;
            }
            Some((
                plus,
                BootCounter {
                    left: left.parse().ok()?,
                    done: done.map_or(Some(0), |d| d.parse().ok())?,
                },
            ))
        });
        Some(match counter {
            Some((plus, counter)) => EntryName {
                stem: base[..plus].to_string(),
                counter: Some(counter),
                suffix,
            },
            None => EntryName {
                stem: base.to_string(),
                counter: None,
                suffix,
            },
        })
    }

    /// The file name for this stem and counter.
    pub fn file_name(&self) -> String {
        let (stem, suffix) = (&self.stem, self.suffix);
        match self.counter {
            None => format!("{stem}{suffix}"),
            Some(BootCounter { left, done: 0 }) => format!("{stem}+{left}{suffix}"),
            Some(BootCounter { left, done }) => format!("{stem}+{left}-{done}{suffix}"),
        }
    }

    /// The entry's id as systemd-boot sees it: the file name without counter.
    pub fn id(&self) -> String {
        format!("{}{}", self.stem, self.suffix)
    }
}

/// What the state of an entry's boot counting means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryStatus {
    /// No counter: blessed, or never counted.
    Good,
    /// Counting, with tries left.
    Trying,
    /// Counter at zero: systemd-boot sorts it last.
    Bad,
}

/// A parsed entry file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlsEntry {
    pub file_name: String,
    pub name: EntryName,
    pub title: Option<String>,
    pub version: Option<String>,
    pub sort_key: Option<String>,
    pub machine_id: Option<String>,
    pub linux: Option<String>,
    pub initrd: Vec<String>,
    /// All `options` lines joined with spaces, as systemd-boot does.
    pub options: String,
}

impl BlsEntry {
    /// Parses an entry's text. Unknown keys are ignored, as the spec asks. Pure.
    pub fn parse(name: EntryName, file_name: &str, text: &str) -> BlsEntry {
        let mut entry = BlsEntry {
            file_name: file_name.to_string(),
            name,
            title: None,
            version: None,
            sort_key: None,
            machine_id: None,
            linux: None,
            initrd: Vec::new(),
            options: String::new(),
        };
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line
                .split_once(|c: char| c.is_whitespace())
                .map_or((line, ""), |(k, v)| (k, v.trim()));
            let value = value.to_string();
            match key {
                "title" => entry.title = Some(value),
                "version" => entry.version = Some(value),
                "sort-key" => entry.sort_key = Some(value),
                "machine-id" => entry.machine_id = Some(value),
                "linux" => entry.linux = Some(value),
                "initrd" => entry.initrd.push(value),
                "options" => {
                    if !entry.options.is_empty() {
                        entry.options.push(' ');
                    }
                    entry.options.push_str(&value);
                }
                _ => {}
            }
        }
        entry
    }

    pub fn status(&self) -> EntryStatus {
        match self.name.counter {
            None => EntryStatus::Good,
            Some(BootCounter { left: 0, .. }) => EntryStatus::Bad,
            Some(_) => EntryStatus::Trying,
        }
    }

    fn tries_left(&self) -> Option<u32> {
        self.name.counter.map(|c| c.left)
    }
}

/// What tandem writes for a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    pub title: String,
    pub version: String,
    /// All tandem entries share one sort key, so systemd-boot orders them
    /// by version, newest first.
    pub sort_key: String,
    pub linux: String,
    pub initrd: Vec<String>,
    pub options: String,
}

impl NewEntry {
    /// The entry file's text. Pure.
    pub fn render(&self) -> String {
        let mut text = format!(
            "title {}\nversion {}\nsort-key {}\nlinux {}\n",
            self.title, self.version, self.sort_key, self.linux
        );
        for initrd in &self.initrd {
            text.push_str(&format!("initrd {initrd}\n"));
        }
        text.push_str(&format!("options {}\n", self.options));
        text
    }
}

/// systemd-boot's entry order (`boot_entry_compare`): entries with no tries
/// left last; entries with a sort key before those without; then by sort
/// key, machine id, version (newest first); then by id (newest first); then
/// more tries left, fewer done. Pure.
pub fn compare_entries(a: &BlsEntry, b: &BlsEntry) -> Ordering {
    let spent = |e: &BlsEntry| e.tries_left() == Some(0);
    spent(a)
        .cmp(&spent(b))
        .then_with(|| a.sort_key.is_none().cmp(&b.sort_key.is_none()))
        .then_with(|| match (&a.sort_key, &b.sort_key) {
            (Some(ka), Some(kb)) => ka
                .cmp(kb)
                .then_with(|| a.machine_id.cmp(&b.machine_id))
                .then_with(|| {
                    version::compare(
                        a.version.as_deref().unwrap_or(""),
                        b.version.as_deref().unwrap_or(""),
                    )
                    .reverse()
                }),
            _ => Ordering::Equal,
        })
        .then_with(|| version::compare(&a.name.id(), &b.name.id()).reverse())
        .then_with(|| match (a.name.counter, b.name.counter) {
            (Some(ca), Some(cb)) => cb.left.cmp(&ca.left).then(ca.done.cmp(&cb.done)),
            _ => Ordering::Equal,
        })
}

/// Entries in the order systemd-boot shows them. Pure.
pub fn boot_order(entries: &[BlsEntry]) -> Vec<&BlsEntry> {
    let mut sorted: Vec<&BlsEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| compare_entries(a, b));
    sorted
}

/// A glob as systemd-boot's `default` pattern takes it (`*`, `?`,
/// case-insensitive). Pure. Iterative, going back only to the last `*`:
/// at most pattern x text steps, whatever the pattern (a recursive match
/// takes exponential time on `*a*a*a...`; the fuzz target `bls` found it).
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0usize, 0usize);
    // Where the last `*` was, and the text it has taken up to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(b'?') => {
                p += 1;
                t += 1;
            }
            Some(c) if c.eq_ignore_ascii_case(&text[t]) => {
                p += 1;
                t += 1;
            }
            _ => match star {
                // The last `*` takes one more byte, and the rest is tried
                // again from there.
                Some((sp, st)) => {
                    star = Some((sp, st + 1));
                    p = sp + 1;
                    t = st + 1;
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// The entry systemd-boot boots without a menu choice or EFI variables:
/// the first whose id matches loader.conf's `default` pattern, else the
/// first in boot order. Pure.
pub fn default_entry<'a>(
    entries: &'a [BlsEntry],
    default_pattern: Option<&str>,
) -> Option<&'a BlsEntry> {
    let order = boot_order(entries);
    default_pattern
        .and_then(|pattern| {
            order
                .iter()
                .find(|e| glob_match(pattern.as_bytes(), e.name.id().as_bytes()))
                .copied()
        })
        .or_else(|| order.first().copied())
}

/// What systemd-boot does on one boot, as a pure function: picks the
/// default entry and, when it counts, spends one try (renaming `+L-D` to
/// `+(L-1)-(D+1)`). Returns the index of the entry booted.
pub fn boot_next(entries: &mut [BlsEntry], default_pattern: Option<&str>) -> Option<usize> {
    let chosen = default_entry(entries, default_pattern)?.file_name.clone();
    let index = entries.iter().position(|e| e.file_name == chosen)?;
    let entry = &mut entries[index];
    if let Some(counter) = entry.name.counter.filter(|c| c.left > 0) {
        entry.name.counter = Some(BootCounter {
            left: counter.left - 1,
            done: counter.done.saturating_add(1),
        });
        entry.file_name = entry.name.file_name();
    }
    Some(index)
}

/// The value of `default` in a loader.conf text. Pure.
pub fn loader_default(loader_conf: &str) -> Option<String> {
    loader_conf.lines().rev().find_map(|line| {
        let (key, value) = line.trim().split_once(|c: char| c.is_whitespace())?;
        (key == "default").then(|| value.trim().to_string())
    })
}

/// A failed BLS operation, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum BlsError {
    #[error("{path}: {action}: {error}")]
    Io {
        path: PathBuf,
        action: &'static str,
        error: io::Error,
    },
    #[error("not a valid entry stem {0:?} (letters, digits, '-', '_', '.', no '+')")]
    BadStem(String),
    #[error(transparent)]
    Uki(#[from] crate::uki::UkiError),
}

/// The `loader/entries` folder of an ESP (or XBOOTLDR) and its loader.conf.
#[derive(Debug, Clone)]
pub struct EntriesDir {
    esp: PathBuf,
}

impl EntriesDir {
    /// The entries folder under an ESP mounted (or unpacked) at `esp`.
    pub fn new(esp: &Path) -> Self {
        EntriesDir {
            esp: esp.to_path_buf(),
        }
    }

    pub fn esp(&self) -> PathBuf {
        self.esp.clone()
    }

    pub fn dir(&self) -> PathBuf {
        self.esp.join("loader").join("entries")
    }

    fn io(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> BlsError {
        let path = path.to_path_buf();
        move |error| BlsError::Io {
            path,
            action,
            error,
        }
    }

    /// loader.conf's `default` pattern, if it has one.
    pub fn default_pattern(&self) -> Result<Option<String>, BlsError> {
        let path = self.esp.join("loader").join("loader.conf");
        match fs::read_to_string(&path) {
            Ok(text) => Ok(loader_default(&text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Self::io(&path, "cannot read")(e)),
        }
    }

    /// Every entry in the folder (none when the folder does not exist).
    pub fn read(&self) -> Result<Vec<BlsEntry>, BlsError> {
        let dir = self.dir();
        let listing = match fs::read_dir(&dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Self::io(&dir, "cannot list")(e)),
        };
        let mut entries = Vec::new();
        for item in listing {
            let item = item.map_err(Self::io(&dir, "cannot list"))?;
            let file_name = item.file_name().to_string_lossy().into_owned();
            let Some(name) = EntryName::parse(&file_name).filter(|n| n.suffix == ".conf") else {
                continue;
            };
            let path = item.path();
            let text = fs::read_to_string(&path).map_err(Self::io(&path, "cannot read"))?;
            entries.push(BlsEntry::parse(name, &file_name, &text));
        }
        entries.sort_by(|a, b| a.file_name.cmp(&b.file_name));
        Ok(entries)
    }

    /// Writes an entry under `stem` with `counter`, replacing any entry of
    /// the same stem (whatever its counter). Temp file, fsync, rename, then
    /// the old names removed and the folder synced.
    pub fn write(
        &self,
        stem: &str,
        counter: Option<BootCounter>,
        entry: &NewEntry,
    ) -> Result<String, BlsError> {
        let valid = !stem.is_empty()
            && !stem.starts_with('.')
            && stem
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
        if !valid {
            return Err(BlsError::BadStem(stem.to_string()));
        }
        let dir = self.dir();
        fs::create_dir_all(&dir).map_err(Self::io(&dir, "cannot create"))?;
        let name = EntryName {
            stem: stem.to_string(),
            counter,
            suffix: ".conf",
        };
        let final_name = name.file_name();
        let temp = dir.join(format!(".{final_name}.tmp"));
        {
            let mut file = File::create(&temp).map_err(Self::io(&temp, "cannot create"))?;
            file.write_all(entry.render().as_bytes())
                .map_err(Self::io(&temp, "cannot write"))?;
            file.sync_all().map_err(Self::io(&temp, "cannot sync"))?;
        }
        let target = dir.join(&final_name);
        fs::rename(&temp, &target).map_err(Self::io(&target, "cannot rename into place"))?;
        for old in self.read()? {
            if old.name.stem == stem && old.file_name != final_name {
                let path = dir.join(&old.file_name);
                fs::remove_file(&path).map_err(Self::io(&path, "cannot remove"))?;
            }
        }
        self.sync_dir()?;
        Ok(final_name)
    }

    /// Renames an entry to a new counter (the boot-counting transitions).
    pub fn set_counter(
        &self,
        entry: &BlsEntry,
        counter: Option<BootCounter>,
    ) -> Result<String, BlsError> {
        let dir = self.dir();
        let name = EntryName {
            stem: entry.name.stem.clone(),
            counter,
            suffix: entry.name.suffix,
        };
        let new_name = name.file_name();
        if new_name != entry.file_name {
            let target = dir.join(&new_name);
            fs::rename(dir.join(&entry.file_name), &target)
                .map_err(Self::io(&target, "cannot rename"))?;
            self.sync_dir()?;
        }
        Ok(new_name)
    }

    /// Removes an entry.
    pub fn remove(&self, entry: &BlsEntry) -> Result<(), BlsError> {
        let path = self.dir().join(&entry.file_name);
        fs::remove_file(&path).map_err(Self::io(&path, "cannot remove"))?;
        self.sync_dir()
    }

    fn sync_dir(&self) -> Result<(), BlsError> {
        let dir = self.dir();
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(Self::io(&dir, "cannot sync"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(file_name: &str, version: &str) -> BlsEntry {
        let name = EntryName::parse(file_name).unwrap();
        BlsEntry::parse(
            name,
            file_name,
            &format!("title T\nversion {version}\nsort-key tandem\nlinux /l\n"),
        )
    }

    #[test]
    fn parses_and_renders_counters() {
        let cases = [
            ("a.conf", "a", None),
            ("a+3.conf", "a", Some((3, 0))),
            ("a+2-1.conf", "a", Some((2, 1))),
            ("a+0-3.conf", "a", Some((0, 3))),
            ("a+b.conf", "a+b", None),
            ("x+1+2.conf", "x+1", Some((2, 0))),
            ("a+1-.conf", "a+1-", None),
        ];
        for (file, stem, counter) in cases {
            let name = EntryName::parse(file).unwrap();
            assert_eq!(name.stem, stem, "{file}");
            assert_eq!(name.counter.map(|c| (c.left, c.done)), counter, "{file}");
            assert_eq!(name.file_name(), file, "{file} round trip");
        }
        assert_eq!(EntryName::parse("a+3.conf").unwrap().id(), "a.conf");
        assert!(EntryName::parse("a.txt").is_none());
        assert!(EntryName::parse(".conf").is_none());
    }

    #[test]
    fn parses_entry_text() {
        let name = EntryName::parse("x.conf").unwrap();
        let e = BlsEntry::parse(name, "x.conf", "# c\ntitle  Azure Linux 2 \nlinux /a/k\ninitrd /a/i1\ninitrd /a/i2\noptions a=1\noptions b\nunknown z\n");
        assert_eq!(e.title.as_deref(), Some("Azure Linux 2"));
        assert_eq!(e.initrd, ["/a/i1", "/a/i2"]);
        assert_eq!(e.options, "a=1 b");
    }

    #[test]
    fn orders_like_systemd_boot() {
        let good_old = entry("tandem-a.conf", "1.0");
        let new_trying = entry("tandem-b+3.conf", "2.0");
        let entries = [good_old.clone(), new_trying.clone()];
        let order: Vec<&str> = boot_order(&entries)
            .iter()
            .map(|e| e.file_name.as_str())
            .collect();
        assert_eq!(
            order,
            ["tandem-b+3.conf", "tandem-a.conf"],
            "newest version first"
        );
        let bad_new = entry("tandem-b+0-3.conf", "2.0");
        let entries = [bad_new, good_old.clone()];
        assert_eq!(
            default_entry(&entries, None).unwrap().file_name,
            "tandem-a.conf",
            "bad entries last"
        );
        let no_key = BlsEntry {
            sort_key: None,
            ..entry("zzz.conf", "9")
        };
        let entries = [no_key, good_old];
        assert_eq!(
            default_entry(&entries, None).unwrap().file_name,
            "tandem-a.conf",
            "sort keys first"
        );
        assert_eq!(
            default_entry(&entries, Some("ZZZ*")).unwrap().file_name,
            "zzz.conf",
            "loader.conf default wins"
        );
    }

    #[test]
    fn boots_spend_tries_then_fall_back() {
        let mut entries = vec![
            entry("tandem-a.conf", "1.0"),
            entry("tandem-b+2.conf", "2.0"),
        ];
        let booted: Vec<String> = (0..4)
            .map(|_| {
                let i = boot_next(&mut entries, None).unwrap();
                entries[i].name.stem.clone()
            })
            .collect();
        assert_eq!(booted, ["tandem-b", "tandem-b", "tandem-a", "tandem-a"]);
        assert_eq!(entries[1].file_name, "tandem-b+0-2.conf");
    }

    #[test]
    fn globs_match_like_a_recursive_matcher_and_in_bounded_time() {
        // The recursive definition, as the oracle on small inputs.
        fn oracle(p: &[u8], t: &[u8]) -> bool {
            match (p.split_first(), t.split_first()) {
                (None, None) => true,
                (Some((b'*', rest)), _) => oracle(rest, t) || (!t.is_empty() && oracle(p, &t[1..])),
                (Some((b'?', rest)), Some((_, tr))) => oracle(rest, tr),
                (Some((a, rest)), Some((b, tr))) => a.eq_ignore_ascii_case(b) && oracle(rest, tr),
                _ => false,
            }
        }
        let alphabet = [b'a', b'B', b'*', b'?', b'b'];
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize
        };
        for _ in 0..20_000 {
            let p: Vec<u8> = (0..next() % 7).map(|_| alphabet[next() % 5]).collect();
            let t: Vec<u8> = (0..next() % 7)
                .map(|_| alphabet[next() % 2 + 3 * (next() % 2)])
                .collect();
            let t: Vec<u8> = t.into_iter().filter(|c| *c != b'*' && *c != b'?').collect();
            assert_eq!(
                glob_match(&p, &t),
                oracle(&p, &t),
                "{:?} {:?}",
                String::from_utf8_lossy(&p),
                String::from_utf8_lossy(&t)
            );
        }
        assert!(glob_match(b"tandem-*", b"TANDEM-slot-b"));
        assert!(!glob_match(b"tandem-?", b"tandem-"));
        // What the fuzzer found: stars that the recursive matcher explores
        // in exponential time. This returns at once.
        let pattern = "*a".repeat(40) + "*b";
        assert!(!glob_match(pattern.as_bytes(), "a".repeat(4000).as_bytes()));
        let pattern = "*?".repeat(30) + "+1.conf";
        assert!(!glob_match(pattern.as_bytes(), "*?".repeat(30).as_bytes()));
    }

    #[test]
    fn reads_loader_default() {
        assert_eq!(
            loader_default("timeout 3\ndefault tandem-*\n"),
            Some("tandem-*".into())
        );
        assert_eq!(loader_default("timeout 3\n"), None);
    }
}
