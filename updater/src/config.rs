//! The engine's configuration: TOML with drop-ins. Files are read in this
//! order, later ones overriding earlier ones key by key (tables merge,
//! everything else replaces): `/usr/lib/tandem/config.d/*.toml` (shipped in
//! the image), then `/etc/tandem/config.d/*.toml` (the node's), each folder
//! in file-name order. Every path the engine writes or runs comes from here,
//! so tests point it at their own files.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The folders read, in order, under a root (`/` on a node).
pub const CONFIG_DIRS: [&str; 2] = ["usr/lib/tandem/config.d", "etc/tandem/config.d"];

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("configuration is not valid: {0}")]
    Invalid(String),
}

/// The whole configuration, with defaults for everything but the index.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: Server,
    pub slots: Slots,
    pub keys: Keys,
    pub schedule: Schedule,
    pub reboot: Reboot,
    pub system: System,
    pub download: Download,
    pub apply: Apply,
    pub health: Health,
    pub metrics: Metrics,
    /// Where the engine keeps its state (`/var/lib/tandem`).
    pub state_dir: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: Server::default(),
            slots: Slots::default(),
            keys: Keys::default(),
            schedule: Schedule::default(),
            reboot: Reboot::default(),
            system: System::default(),
            download: Download::default(),
            apply: Apply::default(),
            health: Health::default(),
            metrics: Metrics::default(),
            state_dir: PathBuf::from("/var/lib/tandem"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// URL of the channel's signed index (`https://`, `http://`, `file://`).
    pub index_url: Option<String>,
    /// Tried in order when the index URL fails; each replaces the index URL's folder.
    pub mirrors: Vec<String>,
    /// Proxy URL; unset means the usual environment variables.
    pub proxy: Option<String>,
    /// PEM file of CA certificates trusted for `https://` besides the
    /// system's store (a private update server).
    pub ca_file: Option<PathBuf>,
    /// The channel the index must say it is for (`stable`, `beta`, ...);
    /// unset accepts the index's own.
    pub channel: Option<String>,
}

/// Where the engine learns about the running system.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct System {
    /// The kernel command line, naming the booted slot.
    pub cmdline: PathBuf,
    /// The booted image's os-release (`VERSION_ID`, else `VERSION`).
    pub os_release: PathBuf,
    /// The machine id, for the phased rollout bucket.
    pub machine_id: PathBuf,
    /// The kernel's id of this boot: one assessment per boot.
    pub boot_id: PathBuf,
}

impl Default for System {
    fn default() -> Self {
        System {
            cmdline: PathBuf::from("/proc/cmdline"),
            os_release: PathBuf::from("/usr/lib/os-release"),
            machine_id: PathBuf::from("/etc/machine-id"),
            boot_id: PathBuf::from("/proc/sys/kernel/random/boot_id"),
        }
    }
}

/// Timeouts and retries of downloads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Download {
    pub connect_timeout_seconds: u64,
    /// Longest wait for a response or the next bytes of a body.
    pub read_timeout_seconds: u64,
    /// Rounds over the URL and its mirrors, in a row without progress,
    /// before a download fails.
    pub attempts: u32,
    /// The first wait between rounds; it doubles up to `backoff_max_seconds`.
    pub backoff_initial_ms: u64,
    pub backoff_max_seconds: u64,
}

impl Default for Download {
    fn default() -> Self {
        Download {
            connect_timeout_seconds: 15,
            read_timeout_seconds: 60,
            attempts: 6,
            backoff_initial_ms: 1000,
            backoff_max_seconds: 60,
        }
    }
}

/// How payloads are applied.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Apply {
    /// Decompression threads; 0 means one per core.
    pub threads: usize,
    /// A checkpoint after this many more MiB of the slot are written.
    pub checkpoint_mib: u64,
}

impl Default for Apply {
    fn default() -> Self {
        Apply {
            threads: 0,
            checkpoint_mib: 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Slots {
    /// The disk holding the slots; unset means the disk of the booted slot.
    pub disk: Option<PathBuf>,
    pub label_a: String,
    pub label_b: String,
    /// `gptprio` (GRUB), `bls` (systemd-boot, type #1 entries with the
    /// slot's own kernel) or `uki` (systemd-boot, the payload's UKIs).
    pub boot_backend: BootBackendKind,
    /// The ESP: for `bls` and `uki`, where the entries are; for `gptprio`,
    /// set on Flatcar's layout, where each slot's kernel is
    /// (`flatcar/vmlinuz-a|b`, installed by tandem from the payload's
    /// `kernel`, whose embedded root hash gates the slot).
    pub esp: Option<PathBuf>,
    /// For `bls`: the kernel argument that names the slot's PARTUUID in the
    /// entries tandem writes: `mount.usr` for a /usr slot, `root` for a
    /// root slot.
    pub root_arg: String,
    /// Where the slots' dm-verity hash trees are: `auto` (HASH-A/HASH-B
    /// partitions of the DPS usr-verity type if the disk has them, as
    /// ACL's layout does), `none`, `partitions` (labels `hash_label_a`/`_b`,
    /// which must exist) or `in-slot` (Flatcar: at `hash_offset` bytes
    /// into each slot).
    pub hash: HashKind,
    pub hash_label_a: String,
    pub hash_label_b: String,
    pub hash_offset: Option<u64>,
}

/// `slots.hash`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HashKind {
    Auto,
    None,
    Partitions,
    InSlot,
}

impl Slots {
    /// The slot layout this configuration describes.
    pub fn layout(&self) -> bootconfig::SlotLayout {
        use bootconfig::HashLayout;
        bootconfig::SlotLayout {
            labels: [self.label_a.clone(), self.label_b.clone()],
            hash: match self.hash {
                HashKind::Auto => HashLayout::Auto,
                HashKind::None => HashLayout::None,
                HashKind::Partitions => HashLayout::Partitions {
                    labels: [self.hash_label_a.clone(), self.hash_label_b.clone()],
                },
                HashKind::InSlot => HashLayout::InSlot {
                    offset: self.hash_offset.unwrap_or(0),
                },
            },
            ..bootconfig::SlotLayout::default()
        }
    }
}

impl Default for Slots {
    fn default() -> Self {
        Slots {
            disk: None,
            label_a: "USR-A".into(),
            label_b: "USR-B".into(),
            boot_backend: BootBackendKind::Gptprio,
            esp: None,
            root_arg: "mount.usr".into(),
            hash: HashKind::Auto,
            hash_label_a: "HASH-A".into(),
            hash_label_b: "HASH-B".into(),
            hash_offset: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootBackendKind {
    Gptprio,
    Bls,
    /// systemd-boot with UKIs (type #2 entries) that come with the
    /// payload: ACL's layout.
    Uki,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Keys {
    /// Folders of trusted certificates (`*.asc`, `*.gpg`, `*.pgp`).
    pub dirs: Vec<PathBuf>,
}

impl Default for Keys {
    fn default() -> Self {
        Keys {
            dirs: vec![
                PathBuf::from("/usr/share/tandem/keys.d"),
                PathBuf::from("/etc/tandem/keys.d"),
            ],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AutoMode {
    /// Never check on its own.
    Off,
    /// Check and report, do not download.
    Check,
    /// Check, download, apply and stage for the next boot.
    Stage,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Schedule {
    pub mode: AutoMode,
    /// Seconds between checks.
    pub interval_seconds: u64,
    /// Up to this many seconds added at random to each interval.
    pub jitter_seconds: u64,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            mode: AutoMode::Stage,
            interval_seconds: 3600,
            jitter_seconds: 600,
        }
    }
}

/// When a staged update may reboot the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RebootStrategy {
    /// Stage, write `reboot.required_file` (kured's signal) and wait.
    Off,
    /// Reboot as soon as the update is staged.
    Immediate,
    /// Reboot in the next weekly maintenance window (`reboot.windows`).
    Window,
    /// Reboot once a fleetlock server grants a slot (`reboot.fleetlock_url`).
    Fleetlock,
    /// Leave the reboot to the Kubernetes operator, as `off` does, and tell
    /// it over D-Bus (`RebootRequired`).
    Kubernetes,
}

impl RebootStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            RebootStrategy::Off => "off",
            RebootStrategy::Immediate => "immediate",
            RebootStrategy::Window => "window",
            RebootStrategy::Fleetlock => "fleetlock",
            RebootStrategy::Kubernetes => "kubernetes",
        }
    }
}

/// One weekly maintenance window: on each of `days`, from `start` (local
/// time in `reboot.time_zone`) for `length_minutes`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// `Mon`, `Tue`, ... `Sun` (or the full names).
    pub days: Vec<String>,
    /// `HH:MM`, 24-hour.
    pub start: String,
    pub length_minutes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Reboot {
    pub strategy: RebootStrategy,
    /// The command that reboots the node; empty means logind's
    /// `RebootWithFlags` with inhibitors respected. Tests point it at a
    /// recorder.
    pub command: Vec<String>,
    /// Written when an update waits for a reboot (kured watches it).
    pub required_file: PathBuf,
    /// For `window`.
    pub windows: Vec<Window>,
    /// For `window`: an IANA name (`Europe/Berlin`), `UTC` or `localtime`.
    pub time_zone: String,
    /// For `fleetlock`: the server's base URL (`/v1/pre-reboot` is added).
    pub fleetlock_url: Option<String>,
    pub fleetlock_group: String,
    /// First wait before asking again when the lock is refused, the server
    /// is down or logind is inhibited; it doubles up to ten minutes.
    pub retry_seconds: u64,
}

impl Default for Reboot {
    fn default() -> Self {
        Reboot {
            strategy: RebootStrategy::Immediate,
            command: Vec::new(),
            required_file: PathBuf::from("/run/reboot-required"),
            windows: Vec::new(),
            time_zone: "UTC".into(),
            fleetlock_url: None,
            fleetlock_group: "default".into(),
            retry_seconds: 30,
        }
    }
}

/// The boot assessment: what must hold for a new image to be marked good.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    /// Every check must pass within this many seconds of the start.
    pub deadline_seconds: u64,
    /// systemd units that must be active (asked of systemd over D-Bus).
    pub units: Vec<String>,
    /// Folders of executables that must exit 0; a name in a later folder
    /// replaces the same name in an earlier one (a link to `/dev/null`
    /// turns it off).
    pub dirs: Vec<PathBuf>,
    /// The longest one executable may run.
    pub script_timeout_seconds: u64,
    /// URLs that must answer 2xx (asked again until the deadline).
    pub http: Vec<String>,
    /// Wait between tries of a unit or URL that is not there yet.
    pub retry_seconds: u64,
    /// Reboot into the other slot when a check fails (through the reboot
    /// action, whatever the strategy: a sick node should not wait).
    pub reboot_on_failure: bool,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            deadline_seconds: 600,
            units: Vec::new(),
            dirs: vec![
                PathBuf::from("/usr/lib/tandem/health.d"),
                PathBuf::from("/etc/tandem/health.d"),
            ],
            script_timeout_seconds: 120,
            http: Vec::new(),
            retry_seconds: 5,
            reboot_on_failure: true,
        }
    }
}

/// Prometheus metrics.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// A textfile-collector file (node_exporter's
    /// `--collector.textfile.directory`), rewritten atomically on changes.
    pub textfile: Option<PathBuf>,
}

/// The drop-in files under `root`, in the order they apply.
pub fn drop_in_files(root: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let mut files = Vec::new();
    for dir in CONFIG_DIRS {
        let dir = root.join(dir);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(ConfigError::Read { path: dir, error }),
        };
        let mut here: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        here.sort();
        files.extend(here);
    }
    Ok(files)
}

/// Merges `over` into `base`: tables key by key, anything else replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Parses and merges TOML documents (name, text) in order.
pub fn from_documents(docs: &[(PathBuf, String)]) -> Result<Config, ConfigError> {
    let mut merged = toml::Table::new();
    for (path, text) in docs {
        let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.clone(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        merge(&mut merged, table);
    }
    let config: Config = toml::Value::Table(merged)
        .try_into()
        .map_err(|e: toml::de::Error| {
            ConfigError::Invalid(e.to_string().trim().replace('\n', " "))
        })?;
    if !bootconfig::cmdline::ROOT_ARGS.contains(&config.slots.root_arg.as_str()) {
        return Err(ConfigError::Invalid(format!(
            "slots.root_arg = {:?}: want one of {}",
            config.slots.root_arg,
            bootconfig::cmdline::ROOT_ARGS.join(", ")
        )));
    }
    if config.slots.boot_backend != BootBackendKind::Gptprio && config.slots.esp.is_none() {
        return Err(ConfigError::Invalid(format!(
            "slots.boot_backend = {:?} needs slots.esp",
            config.slots.boot_backend
        )));
    }
    if (config.slots.hash == HashKind::InSlot) != config.slots.hash_offset.is_some() {
        return Err(ConfigError::Invalid(
            "slots.hash = \"in-slot\" needs slots.hash_offset, and slots.hash_offset is only for it".into(),
        ));
    }
    crate::reboot::validate(&config.reboot).map_err(ConfigError::Invalid)?;
    Ok(config)
}

/// Reads every drop-in under `root` (`/` on a node).
pub fn load(root: &Path) -> Result<Config, ConfigError> {
    let mut docs = Vec::new();
    for path in drop_in_files(root)? {
        let text = std::fs::read_to_string(&path).map_err(|error| ConfigError::Read {
            path: path.clone(),
            error,
        })?;
        docs.push((path, text));
    }
    from_documents(&docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(name: &str, text: &str) -> (PathBuf, String) {
        (PathBuf::from(name), text.to_owned())
    }

    #[test]
    fn defaults_then_drop_ins_override_key_by_key() {
        assert_eq!(from_documents(&[]).unwrap(), Config::default());
        let config = from_documents(&[
            doc(
                "usr/10-image.toml",
                "[server]\nindex_url = \"https://updates.example/stable.json\"\n[schedule]\nmode = \"stage\"\ninterval_seconds = 7200\n",
            ),
            doc("etc/50-node.toml", "[schedule]\nmode = \"check\"\n"),
        ])
        .unwrap();
        assert_eq!(
            config.server.index_url.as_deref(),
            Some("https://updates.example/stable.json")
        );
        assert_eq!(config.schedule.mode, AutoMode::Check);
        assert_eq!(config.schedule.interval_seconds, 7200);
        assert_eq!(config.slots.label_a, "USR-A");
    }

    #[test]
    fn unknown_keys_bad_values_and_syntax_are_errors_naming_the_file() {
        let err = from_documents(&[doc("a.toml", "[server]\nindex_ulr = \"x\"\n")]).unwrap_err();
        assert!(err.to_string().contains("index_ulr"), "{err}");
        let err = from_documents(&[doc("b.toml", "[schedule]\nmode = \"often\"\n")]).unwrap_err();
        assert!(err.to_string().contains("often"), "{err}");
        let err = from_documents(&[doc("c.toml", "[server\n")]).unwrap_err();
        assert!(err.to_string().starts_with("c.toml"), "{err}");
        let err =
            from_documents(&[doc("d.toml", "[slots]\nboot_backend = \"bls\"\n")]).unwrap_err();
        assert!(err.to_string().contains("needs slots.esp"), "{err}");
        let err = from_documents(&[doc("d.toml", "[slots]\nhash = \"in-slot\"\n")]).unwrap_err();
        assert!(err.to_string().contains("needs slots.hash_offset"), "{err}");
        // The shipped example parses, key for key.
        let example = include_str!("../../systemd-units/50-example.toml");
        from_documents(&[doc("50-example.toml", example)]).unwrap();
        let err =
            from_documents(&[doc("d.toml", "[slots]\nboot_backend = \"uki\"\n")]).unwrap_err();
        assert!(err.to_string().contains("needs slots.esp"), "{err}");
        let flatcar = from_documents(&[doc(
            "d.toml",
            "[slots]\nhash = \"in-slot\"\nhash_offset = 1048576\n",
        )])
        .unwrap();
        assert_eq!(
            flatcar.slots.layout().hash,
            bootconfig::HashLayout::InSlot { offset: 1 << 20 }
        );
        let err = from_documents(&[doc("e.toml", "[slots]\nroot_arg = \"init\"\n")]).unwrap_err();
        assert!(
            err.to_string()
                .contains("mount.usr, verity.usr, systemd.verity_usr_data, usr, root"),
            "{err}"
        );
        let ok = from_documents(&[doc("f.toml", "[slots]\nroot_arg = \"root\"\n")]).unwrap();
        assert_eq!(ok.slots.root_arg, "root");
    }

    #[test]
    fn drop_ins_are_read_from_both_folders_in_order() {
        let root = std::env::temp_dir().join(format!("tandem-config-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for dir in CONFIG_DIRS {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        std::fs::write(
            root.join("usr/lib/tandem/config.d/20-b.toml"),
            "state_dir = \"/usr-b\"\n",
        )
        .unwrap();
        std::fs::write(
            root.join("usr/lib/tandem/config.d/10-a.toml"),
            "state_dir = \"/usr-a\"\n[reboot]\ncommand = [\"/bin/true\"]\n",
        )
        .unwrap();
        std::fs::write(root.join("etc/tandem/config.d/README"), "ignored").unwrap();
        let config = load(&root).unwrap();
        assert_eq!(config.state_dir, PathBuf::from("/usr-b"));
        assert_eq!(config.reboot.command, vec!["/bin/true".to_string()]);
        std::fs::write(
            root.join("etc/tandem/config.d/90-node.toml"),
            "state_dir = \"/etc-wins\"\n",
        )
        .unwrap();
        assert_eq!(load(&root).unwrap().state_dir, PathBuf::from("/etc-wins"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
