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
//!
//! Where each part lives: this file holds the engine's state, its
//! operations' bookkeeping and the status; `engine/find.rs` step 1 and
//! the check; `engine/stage.rs` steps 2 to 5; `engine/verity.rs` the
//! hash partition; `engine/boot.rs` the assessment, rollback and reboots.
//! The API types are in [`crate::api`].

mod boot;
mod find;
mod stage;
mod verity;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bootconfig::gptprio::SlotStatus;
use bootconfig::SlotName;
use payload::index::{format_time, IndexError};
use payload::{ApplyError, ComponentPaths, Keyring};

use crate::api::{Operation, OperationResult, Progress, SlotView, Status, STATUS_FORMAT};
use crate::config::{BootBackendKind, Config};
use crate::fetch::{FetchError, FetchPolicy, Fetcher};
use crate::machine::{self, BadTransition, Event, UpdateState};
use crate::slotctl::{self, Target};
use crate::state::{ErrorRecord, HistoryEvent, Persisted, StateDir, StateError};

pub use boot::RebootStatus;
pub use find::{index_urls, payload_urls};

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
        // Structured for the journal (`crate::log`): the kind selects the
        // MESSAGE_ID.
        let v = version.unwrap_or("");
        match kind {
            "failed" | "health-failed" | "rollback" | "refused" | "marked-bad" => {
                tracing::warn!(tandem_event = kind, tandem_version = v, "{kind}: {message}")
            }
            _ => tracing::info!(tandem_event = kind, tandem_version = v, "{kind}: {message}"),
        }
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
            ca_file: self.config.server.ca_file.clone(),
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
}
