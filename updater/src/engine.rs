//! The engine: thin I/O around the pure parts (the state machine in
//! [`crate::machine`], the release choice in `payload::index`). `tandemd`
//! and `updatectl --offline` both drive it; one operation runs at a time.
//!
//! Order of an update, each step persisted before the next:
//! 1. fetch the index and its signature (mirrors in order), verify them,
//!    remember the serial; choose the release and its payloads;
//! 2. record the job (so a restart resumes it);
//! 3. stream the payload into the inactive slot: the applier checks the
//!    signature, the manifest, the index's manifest hash and the source,
//!    and only then is the slot's boot state cleared and the first byte
//!    written; a delta whose source does not match falls back to the full
//!    payload;
//! 4. read the slot back and compare with the manifest; install the
//!    slot's boot files (its entry cannot boot yet);
//! 5. unless only staging: set the slot to boot next (one try).
//!
//! `stage` is steps 1 to 4; `finalize` reads the staged slot back once
//! more and does step 5; `apply` is both. The commit (marking the slot
//! good) is the boot assessment after the reboot (`engine/boot.rs`).

mod boot;
mod verity;

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bootconfig::gptprio::SlotStatus;
use bootconfig::{version, SlotName};
use payload::apply::{ApplyProgress, Phase};
use payload::digest::Sha256Stream;
use payload::format::{ImageRef, Sha256Hex};
use payload::index::{self, format_time, Choice, IndexError, PayloadChoice, ReleaseIndex};
use payload::{ApplyError, ApplyOptions, ApplyOutcome, ComponentPaths, Keyring};
use serde::{Deserialize, Serialize};

use crate::config::{BootBackendKind, Config};
use crate::fetch::{self, FetchError, FetchPolicy, Fetcher, RangeReader, Url};
use crate::machine::{self, BadTransition, Event, UpdateState};
use crate::slotctl::{self, Target};
use crate::state::{
    Assessment, CheckRecord, ErrorRecord, HistoryEvent, Job, PayloadKind, PayloadSource, Persisted,
    Staged, StateDir, StateError,
};

pub use boot::RebootStatus;

/// Version of the status document (`updatectl status --json`, D-Bus
/// `GetStatus`); bumped on any incompatible change.
pub const STATUS_FORMAT: u32 = 1;
/// The largest index or signature fetched.
const MAX_INDEX_BYTES: u64 = 16 << 20;

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("busy: {0} is under way")]
    Busy(String),
    #[error("no index URL configured (server.index_url)")]
    NoIndexUrl,
    #[error("index {url}: {error}")]
    Index { url: String, error: IndexError },
    #[error("{0}")]
    Fetch(FetchError),
    #[error("{0}")]
    Apply(ApplyError),
    #[error("slots: {0}")]
    Slots(String),
    #[error("{0}")]
    System(String),
    #[error("state: {0}")]
    State(StateError),
    #[error("cancelled")]
    Cancelled,
    #[error("no update is staged")]
    NotStaged,
    #[error("{version} was rolled back ({reason}); tandem does not install it again by itself: run `updatectl apply {version}` to try it again")]
    Blocked { version: String, reason: String },
    #[error("{0}")]
    Refused(String),
    #[error("engine bug: {0}")]
    Bug(BadTransition),
}

impl From<StateError> for EngineError {
    fn from(e: StateError) -> Self {
        EngineError::State(e)
    }
}

impl From<BadTransition> for EngineError {
    fn from(e: BadTransition) -> Self {
        EngineError::Bug(e)
    }
}

impl From<FetchError> for EngineError {
    fn from(e: FetchError) -> Self {
        match e {
            FetchError::Cancelled => EngineError::Cancelled,
            e => EngineError::Fetch(e),
        }
    }
}

/// What an update should install.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "kebab-case")]
pub enum Wanted {
    /// The newest release this node may take.
    Latest,
    /// A given version from the index.
    Version(String),
    /// A given payload (URL or absolute path), no index.
    Payload(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateRequest {
    pub wanted: Wanted,
    pub allow_downgrade: bool,
    /// Write and verify only; leave the boot entries for `finalize`.
    #[serde(default)]
    pub stage_only: bool,
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    pub booted_version: String,
    pub channel: String,
    pub serial: u64,
    /// The version an update would install; `None` when up to date.
    pub available: Option<String>,
    /// The payload kinds it would use, preferred first.
    pub payloads: Vec<PayloadKind>,
    /// Why `available` will not be installed without being named: it was
    /// rolled back on this node.
    #[serde(default)]
    pub blocked: Option<String>,
}

/// The outcome of an update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum UpdateOutcome {
    UpToDate {
        version: String,
    },
    Staged {
        version: String,
        slot: SlotName,
        payload: PayloadKind,
        /// Payload bytes received in this run (a resume receives less).
        downloaded_bytes: u64,
        resumed_requests: u64,
        /// Set to boot next (`false` after a stage only).
        finalized: bool,
    },
}

/// The slots as the status shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotView {
    pub slot: SlotName,
    pub partition: String,
    pub status: SlotStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// `verifying-source`, `writing` or `reading-back`.
    pub phase: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub downloaded_bytes: u64,
    /// 0.0 to 1.0 of the slot written.
    pub fraction: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    pub id: u64,
    /// `check` or `update`.
    pub kind: String,
    pub started: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationResult {
    pub id: u64,
    pub kind: String,
    pub ok: bool,
    /// A one-line summary, or the error.
    pub message: String,
    pub time: String,
}

/// The status document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub format_version: u32,
    pub state: UpdateState,
    pub booted_version: Option<String>,
    pub booted: Option<SlotView>,
    pub other: Option<SlotView>,
    pub next_boot: Option<SlotName>,
    pub staged: Option<Staged>,
    /// The version being installed, while an update is under way.
    pub installing: Option<String>,
    pub progress: Option<Progress>,
    pub last_check: Option<CheckRecord>,
    pub last_error: Option<ErrorRecord>,
    /// Why the slots could not be read, if they could not.
    pub slots_error: Option<String>,
    pub operation: Option<Operation>,
    pub last_result: Option<OperationResult>,
    /// The update booted into and being assessed.
    pub trial: Option<Staged>,
    /// `pending`, `running`, `not-needed` (the booted slot was good),
    /// `not-assessed` (the start's assessment was cancelled or could not
    /// run), or this boot's assessment: `passed`, `failed`, `marked-good`,
    /// `marked-bad`.
    pub health: String,
    /// The last assessment (this boot's or an earlier one).
    pub assessment: Option<Assessment>,
    /// Versions tandem will not install by itself, with why.
    pub blocked: BTreeMap<String, String>,
    /// What the reboot strategy is doing about a staged update.
    pub reboot: Option<RebootStatus>,
    /// An update waits for a reboot.
    pub reboot_required: bool,
    /// Counts of failures, rollbacks and updates (for the metrics).
    pub counters: BTreeMap<String, u64>,
}

/// The right to run one operation; from [`Engine::begin`].
#[derive(Debug)]
pub struct Ticket {
    pub id: u64,
    kind: String,
}

/// What changes while the engine runs and is not persisted.
#[derive(Debug, Default)]
struct Live {
    progress: Option<Progress>,
    operation: Option<Operation>,
    last_result: Option<OperationResult>,
    booted_version: Option<String>,
    booted: Option<SlotView>,
    other: Option<SlotView>,
    next_boot: Option<SlotName>,
    slots_error: Option<String>,
    /// Whether the booted slot is marked good.
    booted_good: bool,
    boot_id: Option<String>,
    /// `pending` until the start's assessment is done, `running` during it.
    health: HealthPhase,
    reboot: boot::RebootLive,
    metrics_written: String,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum HealthPhase {
    #[default]
    Pending,
    Running,
    Done,
}

pub type Observer = Box<dyn Fn(&Status) + Send + Sync>;

/// The engine. Holds the state folder's lock for its whole life.
pub struct Engine {
    config: Config,
    dir: StateDir,
    persisted: Mutex<Persisted>,
    live: Mutex<Live>,
    observer: Observer,
    cancel: Arc<AtomicBool>,
    /// Set while the daemon shuts down: work stops, but the job is kept.
    stopping: AtomicBool,
    busy: AtomicBool,
    next_id: AtomicU64,
    _lock: std::fs::File,
}

fn now_text() -> String {
    format_time(SystemTime::now())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not stop updates: the data is still whole
    // (every writer replaces it in one assignment).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `VERSION_ID=`, else `VERSION=`, of an os-release file. Pure.
pub fn os_release_version(text: &str) -> Option<String> {
    let value = |key: &str| {
        text.lines().find_map(|l| {
            let v = l.trim().strip_prefix(key)?.strip_prefix('=')?;
            let v = v.trim().trim_matches('"').trim_matches('\'');
            (!v.is_empty()).then(|| v.to_owned())
        })
    };
    value("VERSION_ID").or_else(|| value("VERSION"))
}

/// The index URL, then each mirror's copy of it (a mirror replaces the
/// index URL's folder). Pure.
pub fn index_urls(index_url: &Url, mirrors: &[Url]) -> Vec<Url> {
    let name = index_url
        .path_segments()
        .and_then(|mut s| s.next_back())
        .unwrap_or("")
        .to_owned();
    let mut urls = vec![index_url.clone()];
    for m in mirrors {
        if let Ok(u) = as_folder(m).join(&name) {
            if !urls.contains(&u) {
                urls.push(u);
            }
        }
    }
    urls
}

/// A payload's URL as the index names it, resolved against each index URL
/// (a relative URL lives beside the index, on every mirror). Pure.
pub fn payload_urls(index_urls: &[Url], relative: &str) -> Vec<Url> {
    let mut urls = Vec::new();
    for base in index_urls {
        if let Ok(u) = base.join(relative) {
            if !urls.contains(&u) {
                urls.push(u);
            }
        }
    }
    urls
}

fn as_folder(url: &Url) -> Url {
    let mut u = url.clone();
    if !u.path().ends_with('/') {
        let path = format!("{}/", u.path());
        u.set_path(&path);
    }
    u
}

/// The payload sources for a choice, in order. Pure.
fn sources_of(payloads: &[PayloadChoice], index_urls: &[Url]) -> Vec<PayloadSource> {
    payloads
        .iter()
        .map(|p| {
            let (kind, url, size, sha256, manifest) = match p {
                PayloadChoice::Delta(d) => (
                    PayloadKind::Delta,
                    &d.url,
                    d.size,
                    d.sha256,
                    d.manifest_sha256,
                ),
                PayloadChoice::Full(f) => (
                    PayloadKind::Full,
                    &f.url,
                    f.size,
                    f.sha256,
                    f.manifest_sha256,
                ),
            };
            PayloadSource {
                kind,
                urls: payload_urls(index_urls, url)
                    .iter()
                    .map(Url::to_string)
                    .collect(),
                size: Some(size),
                sha256: Some(sha256),
                manifest_sha256: Some(manifest),
            }
        })
        .collect()
}

/// Where the slots are, read once at the start of an update.
#[derive(Debug, Clone)]
struct SlotsOnDisk {
    disk: PathBuf,
    slots: [bootconfig::Slot; 2],
}

/// A payload reader that hashes what it reads, until it skips.
struct HashingReader {
    inner: RangeReader,
    hasher: Option<Sha256Stream>,
}

impl std::io::Read for HashingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

impl payload::PayloadReader for HashingReader {
    fn skip_forward(&mut self, n: u64) -> std::io::Result<u64> {
        // What is skipped is not hashed; the manifest hash vouches for it.
        self.hasher = None;
        self.inner.skip_forward(n)
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("state_dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Takes the state folder's lock and loads the state. A state left
    /// mid-check is reset; one left mid-update keeps its job to resume.
    pub fn open(config: Config, observer: Observer) -> Result<Engine, EngineError> {
        let dir = StateDir::new(&config.state_dir);
        let lock_file = dir.lock()?;
        let mut persisted = dir.load()?;
        if persisted.state.is_busy() || persisted.state == UpdateState::ReportingError {
            persisted.state = if persisted.job.is_some() {
                UpdateState::Downloading
            } else {
                UpdateState::resting(persisted.rest())
            };
            dir.store(&persisted)?;
        }
        let engine = Engine {
            config,
            dir,
            persisted: Mutex::new(persisted),
            live: Mutex::new(Live::default()),
            observer,
            cancel: Arc::new(AtomicBool::new(false)),
            stopping: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            _lock: lock_file,
        };
        lock(&engine.live).boot_id = engine.boot_id();
        engine.refresh_slots();
        Ok(engine)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether an update was under way when the engine last stopped.
    pub fn has_pending_job(&self) -> bool {
        lock(&self.persisted).job.is_some()
    }

    /// Asks the operation under way to stop at its next checkpoint.
    pub fn cancel(&self) -> bool {
        let running = lock(&self.live).operation.is_some();
        if running {
            self.cancel.store(true, Ordering::SeqCst);
        }
        running
    }

    pub fn status(&self) -> Status {
        let p = lock(&self.persisted).clone();
        let live = lock(&self.live);
        let this_boot = p
            .assessment
            .as_ref()
            .filter(|a| a.boot_id.is_some() && a.boot_id == live.boot_id);
        let health = match (live.health, this_boot) {
            (HealthPhase::Running, _) => "running".to_owned(),
            (_, Some(a)) => a.result.clone(),
            (_, None) if live.booted_good => "not-needed".to_owned(),
            (HealthPhase::Done, None) => "not-assessed".to_owned(),
            (HealthPhase::Pending, None) => "pending".to_owned(),
        };
        let reboot_required = p.staged.as_ref().is_some_and(|s| s.finalized) && p.job.is_none();
        Status {
            format_version: STATUS_FORMAT,
            state: p.state,
            booted_version: live.booted_version.clone(),
            booted: live.booted.clone(),
            other: live.other.clone(),
            next_boot: live.next_boot,
            staged: p.staged,
            installing: p.job.as_ref().and_then(|j| j.version.clone()),
            progress: live.progress.clone(),
            last_check: p.last_check,
            last_error: p.last_error,
            slots_error: live.slots_error.clone(),
            operation: live.operation.clone(),
            last_result: live.last_result.clone(),
            trial: p.trial,
            health,
            assessment: p.assessment,
            blocked: p.blocked,
            reboot: live.reboot.status.clone(),
            reboot_required,
            counters: p.counters,
        }
    }

    pub fn history(&self) -> Result<Vec<HistoryEvent>, EngineError> {
        Ok(self.dir.history()?)
    }

    fn notify(&self) {
        (self.observer)(&self.status());
    }

    /// Rewrites the textfile-collector file when the metrics changed. The
    /// metrics come from the persisted state and the slots, so this runs
    /// when those change, not on every progress tick.
    fn write_metrics(&self) {
        let Some(path) = &self.config.metrics.textfile else {
            return;
        };
        let text = crate::metrics::render(&self.status(), &self.config);
        let mut live = lock(&self.live);
        if live.metrics_written == text {
            return;
        }
        match payload::files::write_atomic(path, text.as_bytes()) {
            Ok(()) => live.metrics_written = text,
            Err(e) => tracing::warn!("cannot write the metrics to {}: {e}", path.display()),
        }
    }

    /// The metrics in Prometheus' text format.
    pub fn metrics(&self) -> String {
        crate::metrics::render(&self.status(), &self.config)
    }

    fn record(&self, kind: &str, version: Option<&str>, message: String) {
        self.record_event(kind, version, message, None, false);
    }

    fn record_with_output(
        &self,
        kind: &str,
        version: Option<&str>,
        message: String,
        output: Option<String>,
    ) {
        self.record_event(kind, version, message, output, false);
    }

    /// Records an event unless it repeats the last one (for retries).
    fn record_once(&self, kind: &str, version: Option<&str>, message: String) {
        self.record_event(kind, version, message, None, true);
    }

    fn record_event(
        &self,
        kind: &str,
        version: Option<&str>,
        message: String,
        output: Option<String>,
        collapse: bool,
    ) {
        tracing::info!("{kind}: {message}");
        let event = HistoryEvent {
            time: now_text(),
            kind: kind.to_owned(),
            version: version.map(str::to_owned),
            message,
            output,
        };
        if let Err(e) = self.dir.record(event, collapse) {
            tracing::warn!("cannot record history: {e}");
        }
    }

    /// Changes the persisted state (and anything else with it) in one write.
    fn update(&self, f: impl FnOnce(&mut Persisted)) -> Result<(), EngineError> {
        {
            let mut p = lock(&self.persisted);
            let mut next = p.clone();
            f(&mut next);
            if next != *p {
                self.dir.store(&next)?;
                *p = next;
            }
        }
        self.write_metrics();
        self.notify();
        Ok(())
    }

    fn advance(&self, event: Event) -> Result<(), EngineError> {
        let from = lock(&self.persisted).state;
        let to = machine::next(from, event)?;
        self.update(|p| p.state = to)
    }

    fn target(&self) -> Target {
        let layout = self.config.slots.layout();
        Target {
            disk: self.config.slots.disk.clone(),
            esp: match self.config.slots.boot_backend {
                BootBackendKind::Gptprio => None,
                BootBackendKind::Bls | BootBackendKind::Uki => self.config.slots.esp.clone(),
            },
            ukis: self.config.slots.boot_backend == BootBackendKind::Uki,
            kernels: match self.config.slots.boot_backend {
                BootBackendKind::Gptprio => self.config.slots.esp.clone(),
                BootBackendKind::Bls | BootBackendKind::Uki => None,
            },
            layout,
            cmdline: self.config.system.cmdline.clone(),
            booted: None,
        }
    }

    /// The boot artifacts a payload brings for the ESP: for the UKI
    /// backend its `uki` and `addon`, for gptprio on Flatcar's layout its
    /// `kernel`. They go to the slot's staging files on the ESP (created
    /// empty when missing and kept when a resumed apply already wrote to
    /// them); a delta reads the other slot's installed files.
    fn esp_paths(&self, slot: SlotName) -> Result<Vec<ComponentPaths>, EngineError> {
        let o = slotctl::open(&self.target(), false)
            .map_err(|e| EngineError::Slots(format!("{e:#}")))?;
        let mut files: Vec<(&str, PathBuf, Option<PathBuf>)> = Vec::new();
        if let Some((uki, addon)) = o.backend.uki_staging(slot) {
            let installed = o.backend.uki_files(slot.other());
            files.push(("uki", uki, installed.as_ref().map(|(u, _)| u.clone())));
            files.push(("addon", addon, installed.and_then(|(_, a)| a)));
        }
        if let Some(kernel) = o.backend.kernel_staging(slot) {
            files.push(("kernel", kernel, o.backend.kernel_file(slot.other())));
        }
        let mut paths = Vec::new();
        for (name, path, source) in files {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| EngineError::System(format!("creating {}: {e}", dir.display())))?;
            }
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| EngineError::System(format!("creating {}: {e}", path.display())))?;
            paths.push(ComponentPaths {
                component: name.into(),
                target: path,
                target_range: None,
                source,
                source_range: None,
            });
        }
        Ok(paths)
    }

    fn booted_version(&self) -> Result<String, EngineError> {
        let path = &self.config.system.os_release;
        let text = std::fs::read_to_string(path)
            .map_err(|e| EngineError::System(format!("{}: {e}", path.display())))?;
        os_release_version(&text).ok_or_else(|| {
            EngineError::System(format!(
                "{}: no VERSION_ID or VERSION to tell the booted version",
                path.display()
            ))
        })
    }

    fn machine_id(&self) -> Result<String, EngineError> {
        let path = &self.config.system.machine_id;
        let text = std::fs::read_to_string(path)
            .map_err(|e| EngineError::System(format!("{}: {e}", path.display())))?;
        Ok(text.trim().to_owned())
    }

    /// Re-reads the slots and the booted version for the status.
    pub fn refresh_slots(&self) {
        let version = self.booted_version();
        let report = slotctl::report(&self.target());
        {
            let mut live = lock(&self.live);
            live.booted_version = version.ok();
            live.booted_good = report.as_ref().is_ok_and(|r| {
                r.slots
                    .iter()
                    .any(|s| s.booted && s.boot.status() == SlotStatus::Good)
            });
            match report {
                Ok(r) => {
                    let view = |s: &slotctl::SlotReport| SlotView {
                        slot: s.slot.name,
                        partition: s.slot.label.clone(),
                        status: s.boot.status(),
                    };
                    live.booted = r.slots.iter().find(|s| s.booted).map(view);
                    live.other = r
                        .slots
                        .iter()
                        .find(|s| r.booted.is_some() && !s.booted)
                        .map(view);
                    live.next_boot = r.next_boot;
                    live.slots_error = None;
                }
                Err(e) => {
                    live.booted = None;
                    live.other = None;
                    live.next_boot = None;
                    live.slots_error = Some(format!("{e:#}"));
                }
            }
        }
        self.write_metrics();
        self.notify();
    }

    fn fetcher(&self) -> Result<Fetcher, EngineError> {
        let d = &self.config.download;
        let policy = FetchPolicy {
            connect_timeout: Duration::from_secs(d.connect_timeout_seconds.max(1)),
            read_timeout: Duration::from_secs(d.read_timeout_seconds.max(1)),
            attempts: d.attempts.max(1),
            backoff_initial: Duration::from_millis(d.backoff_initial_ms),
            backoff_max: Duration::from_secs(d.backoff_max_seconds),
            proxy: self.config.server.proxy.clone(),
        };
        Ok(Fetcher::new(policy, self.cancel.clone())?)
    }

    fn keyring(&self) -> Result<Keyring, EngineError> {
        let dirs = &self.config.keys.dirs;
        let keyring = Keyring::from_dirs(dirs).map_err(|e| {
            EngineError::System(format!("trusted keys in {}: {e}", show_paths(dirs)))
        })?;
        if keyring.fingerprints().is_empty() {
            return Err(EngineError::System(format!(
                "no trusted keys in {}",
                show_paths(dirs)
            )));
        }
        Ok(keyring)
    }

    /// Starts an operation (`check` or `update`): only one runs at a time.
    /// The ticket's id comes back in the status's `last_result`.
    pub fn begin(&self, kind: &str) -> Result<Ticket, EngineError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(EngineError::Busy("shutting down".into()));
        }
        if self
            .busy
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            let what = lock(&self.live)
                .operation
                .as_ref()
                .map_or_else(|| "another operation".to_owned(), |o| o.kind.clone());
            return Err(EngineError::Busy(what));
        }
        self.cancel.store(false, Ordering::SeqCst);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.live).operation = Some(Operation {
            id,
            kind: kind.to_owned(),
            started: now_text(),
        });
        self.notify();
        Ok(Ticket {
            id,
            kind: kind.to_owned(),
        })
    }

    /// Stops work for a shutdown: the update under way stops at its next
    /// checkpoint and stays recorded, so the next start resumes it.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Whether an operation is under way.
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst)
    }

    /// Runs `f` as the ticket's operation, recording its result.
    fn operate<T>(
        &self,
        ticket: Ticket,
        summary: impl Fn(&T) -> String,
        f: impl FnOnce() -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let Ticket { id, kind } = ticket;
        let kind = kind.as_str();
        let result = f();
        {
            let mut live = lock(&self.live);
            live.operation = None;
            live.progress = None;
            live.last_result = Some(OperationResult {
                id,
                kind: kind.to_owned(),
                ok: result.is_ok(),
                message: match &result {
                    Ok(v) => summary(v),
                    Err(e) => e.to_string(),
                },
                time: now_text(),
            });
        }
        self.busy.store(false, Ordering::SeqCst);
        self.refresh_slots();
        result
    }

    /// Records a failure: the error, the history, the state machine.
    fn failed(&self, error: &EngineError, version: Option<&str>) {
        let message = error.to_string();
        let kind = match error {
            EngineError::Index { .. } | EngineError::Apply(ApplyError::Refused(_)) => "refused",
            EngineError::Apply(ApplyError::Payload(_)) => "refused",
            EngineError::Blocked { .. } | EngineError::Refused(_) => "refused",
            EngineError::Cancelled => "cancelled",
            _ => "failed",
        };
        if matches!(error, EngineError::Blocked { .. }) {
            self.record_once(kind, version, message.clone());
        } else {
            self.record(kind, version, message.clone());
        }
        let cancelled = matches!(error, EngineError::Cancelled);
        let stopping = self.stopping.load(Ordering::SeqCst);
        let result = self.update(|p| {
            if !cancelled {
                *p.counters.entry(format!("failures/{kind}")).or_default() += 1;
            }
            if stopping && p.job.is_some() {
                // Keep the job: the next start resumes it.
                return;
            }
            p.job = None;
            let rest = p.rest();
            let to = if cancelled {
                machine::next(p.state, Event::Cancelled { rest })
            } else {
                p.last_error = Some(ErrorRecord {
                    time: now_text(),
                    message,
                });
                machine::next(p.state, Event::Failed)
                    .and_then(|s| machine::next(s, Event::ErrorReported { rest }))
            };
            // A failure before any work started leaves the state as it was.
            if let Ok(to) = to {
                p.state = to;
            }
        });
        if let Err(e) = result {
            tracing::error!("cannot record the failure: {e}");
        }
    }

    /// Fetches and verifies the index; remembers its serial.
    fn fetch_index(
        &self,
        fetcher: &Fetcher,
        keyring: &Keyring,
    ) -> Result<(ReleaseIndex, Vec<Url>), EngineError> {
        let index_url = self
            .config
            .server
            .index_url
            .as_deref()
            .ok_or(EngineError::NoIndexUrl)?;
        let index_url = fetch::parse_url(index_url)?;
        let mirrors = self
            .config
            .server
            .mirrors
            .iter()
            .map(|m| fetch::parse_url(m))
            .collect::<Result<Vec<_>, _>>()?;
        let urls = index_urls(&index_url, &mirrors);
        let (bytes, from) = fetcher.get_small(&urls, MAX_INDEX_BYTES)?;
        let sig_url = Url::parse(&format!("{from}.sig"))
            .map_err(|e| FetchError::BadUrl(format!("{from}.sig: {e}")))?;
        let (signature, _) = fetcher.get_small(&[sig_url], 1 << 20)?;
        let index_err = |error| EngineError::Index {
            url: from.to_string(),
            error,
        };
        // Serials are remembered per channel, which is known only once the
        // index is read: the serial check follows.
        let index = index::verify_index(&bytes, &signature, keyring, SystemTime::now(), None)
            .map_err(index_err)?;
        if let Some(want) = &self.config.server.channel {
            if &index.channel != want {
                return Err(EngineError::System(format!(
                    "index {from} is for channel {}, this node follows {want}",
                    index.channel
                )));
            }
        }
        let last = lock(&self.persisted)
            .accepted_serial
            .get(&index.channel)
            .copied();
        if let Some(last) = last {
            if index.serial < last {
                return Err(index_err(IndexError::OlderSerial {
                    got: index.serial,
                    last,
                }));
            }
        }
        let channel = index.channel.clone();
        let serial = index.serial;
        self.update(|p| {
            p.accepted_serial.insert(channel, serial);
        })?;
        // Payload URLs resolve against the copy that answered first.
        let mut bases = vec![from.clone()];
        bases.extend(urls.into_iter().filter(|u| *u != from));
        Ok((index, bases))
    }

    /// Checks for an update without installing it.
    pub fn check(&self) -> Result<CheckReport, EngineError> {
        let ticket = self.begin("check")?;
        self.check_with(ticket)
    }

    pub fn check_with(&self, ticket: Ticket) -> Result<CheckReport, EngineError> {
        self.operate(
            ticket,
            |r: &CheckReport| match &r.available {
                Some(v) => format!("update available: {v}"),
                None => format!("up to date at {}", r.booted_version),
            },
            || {
                self.advance(Event::CheckStarted)?;
                let result = self.choose(None, false).map(|(r, _)| r);
                match &result {
                    Ok(r) => {
                        let staged = lock(&self.persisted).staged.clone();
                        // What is staged already is not news.
                        let news = r
                            .available
                            .as_ref()
                            .filter(|v| staged.as_ref().is_none_or(|s| &s.version != *v));
                        let event = if news.is_some() {
                            Event::UpdateFound
                        } else {
                            Event::UpToDate {
                                rest: lock(&self.persisted).rest(),
                            }
                        };
                        self.advance(event)?;
                        self.record_check(r.available.as_deref())?;
                    }
                    Err(e) => self.failed(e, None),
                }
                result
            },
        )
    }

    fn record_check(&self, available: Option<&str>) -> Result<(), EngineError> {
        let record = CheckRecord {
            time: now_text(),
            outcome: if available.is_some() {
                "update-available"
            } else {
                "up-to-date"
            }
            .into(),
            version: available.map(str::to_owned),
        };
        self.record(
            "check",
            available,
            match available {
                Some(v) => format!("update available: {v}"),
                None => "up to date".into(),
            },
        );
        self.update(|p| p.last_check = Some(record))
    }

    fn choose(
        &self,
        wanted: Option<String>,
        allow_downgrade: bool,
    ) -> Result<(CheckReport, Vec<PayloadSource>), EngineError> {
        let fetcher = self.fetcher()?;
        let keyring = self.keyring()?;
        let (index, bases) = self.fetch_index(&fetcher, &keyring)?;
        let booted = self.booted_version()?;
        let machine_id = self.machine_id()?;
        let request = index::Request {
            version: wanted,
            allow_downgrade,
        };
        let cmp = |a: &str, b: &str| version::compare(a, b);
        let choice = index::choose(
            &index,
            &booted,
            &machine_id,
            SystemTime::now(),
            &request,
            &cmp,
        )
        .map_err(|error| EngineError::Index {
            url: bases.first().map(Url::to_string).unwrap_or_default(),
            error,
        })?;
        let (available, sources) = match choice {
            Choice::UpToDate => (None, Vec::new()),
            Choice::Update { version, payloads } => (Some(version), sources_of(&payloads, &bases)),
        };
        Ok((
            CheckReport {
                booted_version: booted,
                channel: index.channel,
                serial: index.serial,
                blocked: available
                    .as_ref()
                    .and_then(|v| lock(&self.persisted).blocked.get(v).cloned()),
                available,
                payloads: sources.iter().map(|s| s.kind).collect(),
            },
            sources,
        ))
    }

    /// Installs an update into the inactive slot and sets it next.
    pub fn update_now(&self, request: &UpdateRequest) -> Result<UpdateOutcome, EngineError> {
        let ticket = self.begin("update")?;
        self.update_with(ticket, request)
    }

    pub fn update_with(
        &self,
        ticket: Ticket,
        request: &UpdateRequest,
    ) -> Result<UpdateOutcome, EngineError> {
        self.operate(ticket, summarize_outcome, || {
            let result = self.update_inner(request);
            if let Err(e) = &result {
                let version = lock(&self.persisted)
                    .job
                    .as_ref()
                    .and_then(|j| j.version.clone());
                self.failed(e, version.as_deref());
            }
            result
        })
    }

    /// Resumes the update a restart interrupted, if there is one.
    pub fn resume(&self) -> Option<Result<UpdateOutcome, EngineError>> {
        let job = lock(&self.persisted).job.clone()?;
        let ticket = match self.begin("update") {
            Ok(t) => t,
            Err(e) => return Some(Err(e)),
        };
        Some(self.operate(ticket, summarize_outcome, || {
            self.record(
                "resumed",
                job.version.as_deref(),
                format!("resuming the update into slot {}", job.slot),
            );
            let result = self.run_job(job.clone());
            if let Err(e) = &result {
                self.failed(e, job.version.as_deref());
            }
            result
        }))
    }

    fn update_inner(&self, request: &UpdateRequest) -> Result<UpdateOutcome, EngineError> {
        let (version, candidates) = match &request.wanted {
            Wanted::Payload(url) => {
                let url = fetch::parse_url(url)?;
                let source = PayloadSource {
                    kind: PayloadKind::Given,
                    urls: vec![url.to_string()],
                    size: None,
                    sha256: None,
                    manifest_sha256: None,
                };
                (None, vec![source])
            }
            Wanted::Latest | Wanted::Version(_) => {
                self.advance(Event::CheckStarted)?;
                let wanted = match &request.wanted {
                    Wanted::Version(v) => Some(v.clone()),
                    _ => None,
                };
                let (report, sources) = self.choose(wanted, request.allow_downgrade)?;
                let Some(version) = report.available.clone() else {
                    let rest = lock(&self.persisted).rest();
                    self.advance(Event::UpToDate { rest })?;
                    self.record_check(None)?;
                    return Ok(UpdateOutcome::UpToDate {
                        version: report.booted_version,
                    });
                };
                if let (Wanted::Latest, Some(reason)) = (&request.wanted, &report.blocked) {
                    let rest = lock(&self.persisted).rest();
                    self.advance(Event::UpToDate { rest })?;
                    return Err(EngineError::Blocked {
                        version,
                        reason: reason.clone(),
                    });
                }
                let staged = lock(&self.persisted).staged.clone();
                if let Some(s) = staged.filter(|s| s.version == version) {
                    tracing::info!("{version} is already staged in slot {}", s.slot);
                    let rest = lock(&self.persisted).rest();
                    self.advance(Event::UpToDate { rest })?;
                    let finalized = s.finalized || !request.stage_only;
                    if finalized && !s.finalized {
                        self.finalize_staged(&s)?;
                    }
                    return Ok(UpdateOutcome::Staged {
                        finalized,
                        version,
                        slot: s.slot,
                        payload: PayloadKind::Full,
                        downloaded_bytes: 0,
                        resumed_requests: 0,
                    });
                }
                self.advance(Event::UpdateFound)?;
                self.record_check(Some(&version))?;
                (Some(version), sources)
            }
        };
        // Read only, and let go at once: the disk's lock is shared.
        let opened = slotctl::open(&self.target(), false)
            .map_err(|e| EngineError::Slots(format!("{e:#}")))?;
        let booted = opened.booted.ok_or_else(|| {
            EngineError::Slots(format!(
                "cannot tell the booted slot from {}",
                self.config.system.cmdline.display()
            ))
        })?;
        // The other slot is the way back while the booted one is on trial:
        // it is not overwritten until the booted slot is marked good.
        let booted_status = opened.backend.slot_boot(booted).status();
        drop(opened);
        if booted_status != SlotStatus::Good {
            return Err(EngineError::Refused(format!(
                "the booted slot {booted} is not marked good yet (its health is being assessed, or it failed); slot {} is the way back and is not overwritten until then (updatectl mark-good marks it by hand)",
                booted.other()
            )));
        }
        let job = Job {
            version: version.clone(),
            slot: booted.other(),
            candidates,
            current: 0,
            allow_downgrade: request.allow_downgrade,
            started: now_text(),
            stage_only: request.stage_only,
        };
        self.update(|p| {
            p.job = Some(job.clone());
        })?;
        self.record(
            "download-started",
            version.as_deref(),
            format!(
                "installing into slot {} from {}",
                job.slot,
                job.candidates
                    .first()
                    .and_then(|c| c.urls.first())
                    .map_or("nowhere", String::as_str)
            ),
        );
        self.run_job(job)
    }

    /// Steps 3 to 5 for a recorded job.
    fn run_job(&self, mut job: Job) -> Result<UpdateOutcome, EngineError> {
        let from = lock(&self.persisted).state;
        if from != UpdateState::Downloading {
            self.advance(Event::ApplyStarted)?;
        }
        // The disk is locked only while its table is read or written, not
        // for the whole download.
        let opened = slotctl::open(&self.target(), false)
            .map_err(|e| EngineError::Slots(format!("{e:#}")))?;
        let layout = SlotsOnDisk {
            disk: opened.disk_path.clone(),
            slots: opened.slots.clone(),
        };
        let booted = opened.booted;
        drop(opened);
        let booted = booted.ok_or_else(|| {
            EngineError::Slots(format!(
                "cannot tell the booted slot from {}",
                self.config.system.cmdline.display()
            ))
        })?;
        if booted == job.slot {
            return Err(EngineError::Slots(format!(
                "slot {} is booted now; the update meant for it is dropped",
                job.slot
            )));
        }
        let booted_version = self.booted_version()?;
        let keyring = self.keyring()?;
        let fetcher = self.fetcher()?;
        loop {
            let Some(source) = job.candidates.get(job.current).cloned() else {
                return Err(EngineError::System("no payload left to try".into()));
            };
            match self.apply_one(&job, &source, &layout, &keyring, &fetcher, &booted_version) {
                Ok((written, downloaded, resumed)) => {
                    return self.finish(&job, &source, written, downloaded, resumed)
                }
                Err(EngineError::Apply(e)) if job.current + 1 < job.candidates.len() => {
                    // A delta this node cannot use, found before writing:
                    // the next candidate is the full payload.
                    let why = match &e {
                        ApplyError::WrongSource {
                            expected, found, ..
                        } => format!(
                            "slot {booted} is not the delta's source (SHA-256 {found}, the delta needs {expected})"
                        ),
                        e if e.is_unknown_format() => {
                            format!("this tandem cannot read the delta ({e})")
                        }
                        _ => return Err(EngineError::Apply(e)),
                    };
                    self.record(
                        "fallback",
                        job.version.as_deref(),
                        format!("{why}; using the full payload"),
                    );
                    job.current += 1;
                    let next = job.clone();
                    self.update(|p| p.job = Some(next))?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Streams one payload into the slot; returns the version written, the
    /// bytes received and the requests that resumed a range.
    fn apply_one(
        &self,
        job: &Job,
        source: &PayloadSource,
        layout: &SlotsOnDisk,
        keyring: &Keyring,
        fetcher: &Fetcher,
        booted_version: &str,
    ) -> Result<(Written, u64, u64), EngineError> {
        let urls = source
            .urls
            .iter()
            .map(|u| fetch::parse_url(u))
            .collect::<Result<Vec<_>, _>>()?;
        let reader = fetcher.open(urls, source.size);
        let stats = reader.stats();
        let mut reader = HashingReader {
            inner: reader,
            hasher: source.sha256.map(|_| Sha256Stream::default()),
        };
        let mut paths = verity::component_paths(
            &layout.disk,
            &layout.slots[job.slot.index()],
            &layout.slots[job.slot.other().index()],
        );
        paths.extend(self.esp_paths(job.slot)?);
        let written_version: Arc<Mutex<Option<Written>>> = Arc::default();
        let cleared = Arc::new(AtomicBool::new(false));
        let vet: payload::apply::Vet = {
            let cleared = cleared.clone();
            let job = job.clone();
            let source = source.clone();
            let booted_version = booted_version.to_owned();
            let written_version = written_version.clone();
            let target = self.target();
            Arc::new(move |m: &payload::Manifest, sha: &Sha256Hex| {
                vet_manifest(&job, &source, &booted_version, m, sha)?;
                let image = m
                    .components
                    .iter()
                    .find(|c| c.name == "usr")
                    .map(|c| c.target.clone());
                let names = m.components.iter().map(|c| c.name.clone()).collect();
                *lock(&written_version) = Some((m.target_version.clone(), image, names));
                // Only now, with every check passed, does the boot state
                // change: a half-written slot must never boot.
                let notes = slotctl::open(&target, true)
                    .map_err(|e| format!("{e:#}"))?
                    .backend
                    .clear(job.slot)
                    .map_err(|e| format!("clearing slot {}'s boot state: {e}", job.slot))?;
                notes.iter().for_each(|n| tracing::warn!("{n}"));
                cleared.store(true, Ordering::SeqCst);
                Ok(())
            })
        };
        let applied = self.run_apply(&mut reader, keyring, paths, vet, &stats);
        if cleared.load(Ordering::SeqCst) {
            // The slot that held a staged update no longer boots.
            self.update(|p| p.staged = None)?;
        }
        applied?;
        let version = lock(&written_version)
            .clone()
            .ok_or_else(|| EngineError::System("the payload named no version".into()))?;
        if let (Some(want), Some(hasher)) = (source.sha256, reader.hasher.take()) {
            // Read to the end so trailing bytes count too.
            let mut rest = Vec::new();
            std::io::Read::read_to_end(&mut reader.inner, &mut rest)
                .map_err(|e| EngineError::System(format!("reading the payload's end: {e}")))?;
            let mut hasher = hasher;
            hasher.update(&rest);
            let got = hasher.finish();
            if got != want {
                return Err(EngineError::Apply(ApplyError::Refused(format!(
                    "the payload's SHA-256 is {got}, the index says {want}"
                ))));
            }
        }
        Ok((
            version,
            stats.received.load(Ordering::Relaxed),
            stats.resumed.load(Ordering::Relaxed),
        ))
    }

    fn finish(
        &self,
        job: &Job,
        source: &PayloadSource,
        (version, image, components): Written,
        downloaded: u64,
        resumed: u64,
    ) -> Result<UpdateOutcome, EngineError> {
        self.advance(Event::Verified)?;
        let finalized = !job.stage_only;
        {
            let mut o = slotctl::open(&self.target(), true)
                .map_err(|e| EngineError::Slots(format!("{e:#}")))?;
            let slot = o.slots[job.slot.index()].clone();
            // Read from the slot just verified, so the kernel booted is the
            // one the payload's signature covers.
            let files = if o.backend.installs_boot_files() {
                Some(
                    bootconfig::bootfiles::read_from_image(
                        &o.disk_path,
                        slot.offset,
                        slot.image_size(),
                    )
                    .map_err(|e| {
                        EngineError::Slots(format!("slot {}'s boot files: {e}", job.slot))
                    })?,
                )
            } else {
                None
            };
            // The UKI backend boots the payload's UKI and addon, written and
            // verified in the slot's staging files.
            let ukis = match o.backend.uki_staging(job.slot) {
                Some((uki, addon)) => {
                    if !components.iter().any(|c| c == "uki") {
                        return Err(EngineError::Refused(format!(
                            "the payload for {version} has no UKI, and slot {} boots one (slots.boot_backend = \"uki\"); it is not set to boot",
                            job.slot
                        )));
                    }
                    let addon = components.iter().any(|c| c == "addon").then_some(addon);
                    Some((uki, addon))
                }
                None => None,
            };
            // gptprio on Flatcar's layout boots the payload's kernel,
            // written and verified in the slot's staging file.
            let kernel = match o.backend.kernel_staging(job.slot) {
                Some(_) if !components.iter().any(|c| c == "kernel") => {
                    return Err(EngineError::Refused(format!(
                        "the payload for {version} has no kernel, and slot {} boots its own from the ESP (flatcar/vmlinuz-a|b, slots.esp with gptprio); it is not set to boot",
                        job.slot
                    )));
                }
                staged => staged,
            };
            let usrhash = match &ukis {
                Some((uki, addon)) => {
                    let read = |p: &std::path::Path| {
                        bootconfig::uki::read_uki(p).map_err(|e| {
                            EngineError::Refused(format!("slot {}'s UKI: {e}", job.slot))
                        })
                    };
                    let addons = addon
                        .as_deref()
                        .map(read)
                        .transpose()?
                        .into_iter()
                        .collect::<Vec<_>>();
                    bootconfig::uki::usrhash(&bootconfig::uki::combined_cmdline(
                        &read(uki)?,
                        &addons,
                    ))
                }
                None => match &kernel {
                    Some(k) => verity::kernel_usrhash(k)?,
                    None => files
                        .as_ref()
                        .and_then(|f| bootconfig::uki::usrhash(&f.cmdline)),
                },
            };
            if let Some(root) = verity::check_slot(&o.disk_path, &slot, usrhash.as_deref())? {
                tracing::info!(
                    "slot {}: dm-verity tree matches its data, root hash {root} as its boot entry names",
                    job.slot
                );
            }
            if let Some((uki, addon)) = &ukis {
                let notes = o
                    .backend
                    .install_uki(job.slot, uki, addon.as_deref())
                    .map_err(|e| {
                        EngineError::Slots(format!("installing slot {}'s UKI: {e}", job.slot))
                    })?;
                notes.iter().for_each(|n| tracing::info!("{n}"));
                tracing::info!("installed slot {}'s UKI and its entry", job.slot);
            }
            if let Some(k) = &kernel {
                let notes = o.backend.install_kernel(job.slot, k).map_err(|e| {
                    EngineError::Slots(format!("installing slot {}'s kernel: {e}", job.slot))
                })?;
                notes.iter().for_each(|n| tracing::info!("{n}"));
            }
            if let Some(files) = files {
                let notes = o
                    .backend
                    .install(job.slot, &version, &files, &self.config.slots.root_arg)
                    .map_err(|e| {
                        EngineError::Slots(format!(
                            "installing slot {}'s boot files: {e}",
                            job.slot
                        ))
                    })?;
                notes.iter().for_each(|n| tracing::warn!("{n}"));
                tracing::info!(
                    "installed kernel {} of slot {} and its boot entry",
                    files.located.kernel_version,
                    job.slot
                );
            }
            if finalized {
                let notes = o.backend.set_next(job.slot, 1).map_err(|e| {
                    EngineError::Slots(format!("setting slot {} next: {e}", job.slot))
                })?;
                notes.iter().for_each(|n| tracing::warn!("{n}"));
            }
        }
        let staged = Staged {
            version: version.clone(),
            slot: job.slot,
            time: now_text(),
            finalized,
            image,
        };
        self.update(|p| {
            p.staged = Some(staged);
            p.job = None;
            p.versions.insert(job.slot, version.clone());
            p.blocked.remove(&version);
            *p.counters.entry("staged".into()).or_default() += 1;
        })?;
        self.advance(Event::Staged { finalized })?;
        self.record(
            "staged",
            Some(&version),
            format!(
                "{version} written to slot {} from the {} payload ({downloaded} bytes received, {resumed} resumed requests), verified, and {}",
                job.slot,
                source.kind.as_str(),
                if finalized {
                    "set to boot next"
                } else {
                    "left for finalize (not set to boot)"
                }
            ),
        );
        Ok(UpdateOutcome::Staged {
            finalized,
            version,
            slot: job.slot,
            payload: source.kind,
            downloaded_bytes: downloaded,
            resumed_requests: resumed,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn run_apply(
        &self,
        reader: &mut HashingReader,
        keyring: &Keyring,
        paths: Vec<ComponentPaths>,
        vet: payload::apply::Vet,
        stats: &fetch::FetchStats,
    ) -> Result<(), EngineError> {
        let threads = match self.config.apply.threads {
            0 => payload::digest::worker_count(),
            n => n,
        };
        let opts = ApplyOptions {
            threads,
            checkpoint: Some(self.dir.checkpoint_file()),
            checkpoint_every: self.config.apply.checkpoint_mib.max(1) << 20,
            vet: Some(vet),
            skip_unused_paths: true,
        };
        let mut written = false;
        let mut last_note: Option<Instant> = None;
        let mut control = |p: &ApplyProgress| {
            if p.phase == Phase::VerifyingTarget && !written {
                written = true;
                if let Err(e) = self.advance(Event::Written) {
                    tracing::error!("{e}");
                }
            }
            if last_note.is_none_or(|t| t.elapsed() >= Duration::from_millis(200))
                || p.phase != Phase::Writing
            {
                last_note = Some(Instant::now());
                self.progress(p, stats.received.load(Ordering::Relaxed));
            }
            if self.cancel.load(Ordering::SeqCst) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        // Downloads show progress between operations too: a ticker adds
        // the bytes received while a long blob streams in.
        let finished = AtomicBool::new(false);
        let outcome = std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut seen = 0;
                while !finished.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(250));
                    let received = stats.received.load(Ordering::Relaxed);
                    if received != seen {
                        seen = received;
                        let changed = {
                            let mut live = lock(&self.live);
                            match live.progress.as_mut() {
                                Some(p) => {
                                    p.downloaded_bytes = received;
                                    true
                                }
                                None => false,
                            }
                        };
                        if changed {
                            self.notify();
                        }
                    }
                }
            });
            let outcome = payload::apply(reader, keyring, &paths, &opts, &mut control);
            finished.store(true, Ordering::SeqCst);
            outcome
        });
        match outcome {
            Ok(ApplyOutcome::Complete(report)) => {
                if !written {
                    self.advance(Event::Written)?;
                }
                tracing::info!(
                    "applied {} operations ({} bytes), resumed at operation {}",
                    report.operations,
                    report.bytes_written,
                    report.resumed_at_op
                );
                if report.resumed_at_op > 0 {
                    self.record(
                        "checkpoint",
                        Some(&report.target_version),
                        format!(
                            "continued from the checkpoint at operation {} of {}",
                            report.resumed_at_op, report.operations
                        ),
                    );
                }
                Ok(())
            }
            Ok(ApplyOutcome::Stopped(_)) => Err(EngineError::Cancelled),
            // A download stopped by cancel surfaces as a read error.
            Err(_) if self.cancel.load(Ordering::SeqCst) => Err(EngineError::Cancelled),
            Err(e) => Err(EngineError::Apply(e)),
        }
    }

    fn progress(&self, p: &ApplyProgress, downloaded: u64) {
        let phase = match p.phase {
            Phase::VerifyingSource => "verifying-source",
            Phase::Writing => "writing",
            Phase::VerifyingTarget => "reading-back",
        };
        let fraction = if p.total_bytes == 0 {
            0.0
        } else {
            p.done_bytes as f64 / p.total_bytes as f64
        };
        lock(&self.live).progress = Some(Progress {
            phase: phase.into(),
            done_bytes: p.done_bytes,
            total_bytes: p.total_bytes,
            downloaded_bytes: downloaded,
            fraction,
        });
        self.notify();
    }
}

/// The checks of a payload's verified head against what was asked for.
fn vet_manifest(
    job: &Job,
    source: &PayloadSource,
    booted_version: &str,
    m: &payload::Manifest,
    sha: &Sha256Hex,
) -> Result<(), String> {
    if let Some(want) = source.manifest_sha256 {
        if *sha != want {
            return Err(format!(
                "the payload's manifest has SHA-256 {sha}, the index says {want}"
            ));
        }
    }
    if let Some(v) = &job.version {
        if &m.target_version != v {
            return Err(format!(
                "the payload makes version {}, the update is for {v}",
                m.target_version
            ));
        }
    }
    if !job.allow_downgrade
        && version::compare(&m.target_version, booted_version) == std::cmp::Ordering::Less
    {
        return Err(format!(
            "the payload makes {}, older than the booted {booted_version}; pass --allow-downgrade to install it",
            m.target_version
        ));
    }
    Ok(())
}

/// What an apply wrote: the version and, for a one-component payload, the
/// image (size and digest) that finalize reads back.
/// What a payload wrote: its version, its `usr` image, its components.
type Written = (String, Option<ImageRef>, Vec<String>);

fn summarize_outcome(o: &UpdateOutcome) -> String {
    match o {
        UpdateOutcome::UpToDate { version } => format!("up to date at {version}"),
        UpdateOutcome::Staged {
            version,
            slot,
            finalized: true,
            ..
        } => format!("{version} staged in slot {slot}; reboot to use it"),
        UpdateOutcome::Staged { version, slot, .. } => format!(
            "{version} staged in slot {slot}, not set to boot; `updatectl finalize` sets it next"
        ),
    }
}

fn show_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_gives_version_id_first() {
        assert_eq!(
            os_release_version("NAME=\"ACL\"\nVERSION=4230.2.1 (LTS)\nVERSION_ID=4230.2.1\n"),
            Some("4230.2.1".into())
        );
        assert_eq!(os_release_version("VERSION=\"2.0\"\n"), Some("2.0".into()));
        assert_eq!(os_release_version("NAME=x\n"), None);
    }

    #[test]
    fn mirrors_replace_the_index_folder_and_payloads_follow() {
        let index = Url::parse("https://a.example/acl/stable/index.json").unwrap();
        let mirrors = [
            Url::parse("https://b.example/mirror").unwrap(),
            Url::parse("file:///srv/updates/").unwrap(),
        ];
        let urls = index_urls(&index, &mirrors);
        let shown: Vec<String> = urls.iter().map(Url::to_string).collect();
        assert_eq!(
            shown,
            [
                "https://a.example/acl/stable/index.json",
                "https://b.example/mirror/index.json",
                "file:///srv/updates/index.json"
            ]
        );
        let payloads: Vec<String> = payload_urls(&urls, "p/2.0.tpl")
            .iter()
            .map(Url::to_string)
            .collect();
        assert_eq!(
            payloads,
            [
                "https://a.example/acl/stable/p/2.0.tpl",
                "https://b.example/mirror/p/2.0.tpl",
                "file:///srv/updates/p/2.0.tpl"
            ]
        );
        // An absolute URL stays itself, once.
        assert_eq!(payload_urls(&urls, "https://cdn.example/x.tpl").len(), 1);
    }
}
