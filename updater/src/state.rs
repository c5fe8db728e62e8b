//! What the engine keeps in its state folder (`/var/lib/tandem`), written
//! atomically (temporary file, fsync, rename, fsync of the folder) so a
//! power cut leaves the old or the new version, never a torn one:
//!
//! - `state.json`: the state machine's state, the update under way (enough
//!   to resume it), the staged update, the last check and error, and the
//!   highest index serial accepted per channel;
//! - `checkpoint.json`: the applier's checkpoint of the update under way;
//! - `history.json`: the last [`HISTORY_LIMIT`] events;
//! - `lock`: held (flock) by whichever engine runs, `tandemd` or
//!   `updatectl --offline`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use bootconfig::SlotName;
use payload::format::{ImageRef, Sha256Hex};
use serde::{Deserialize, Serialize};

use crate::machine::{Rest, UpdateState};

pub const STATE_FORMAT: u32 = 1;
/// Events kept in `history.json`; older ones are dropped.
pub const HISTORY_LIMIT: usize = 500;

/// Why the state folder could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("{path}: not a state file this tandem understands: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "{path} is held by another tandem engine (tandemd, or updatectl --offline); stop it first"
    )]
    Locked { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |error| StateError::Io {
        path: path.to_owned(),
        error,
    }
}

/// Which kind of payload a source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PayloadKind {
    Delta,
    Full,
    /// Named by a person (`--payload`), not by an index.
    Given,
}

impl PayloadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PayloadKind::Delta => "delta",
            PayloadKind::Full => "full",
            PayloadKind::Given => "given",
        }
    }
}

/// One payload the update may be made from, with what the index says of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadSource {
    pub kind: PayloadKind,
    /// The URL, then its mirrors.
    pub urls: Vec<String>,
    pub size: Option<u64>,
    pub sha256: Option<Sha256Hex>,
    pub manifest_sha256: Option<Sha256Hex>,
}

/// The update under way: everything needed to resume it after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// The version being installed; `None` for a given payload until its
    /// head is read.
    pub version: Option<String>,
    /// The slot being written (never the booted one).
    pub slot: SlotName,
    /// Payloads in order of preference (delta, then full).
    pub candidates: Vec<PayloadSource>,
    /// Index into `candidates` of the one in use.
    pub current: usize,
    pub allow_downgrade: bool,
    pub started: String,
    /// Stage only: written and verified, not set to boot next.
    #[serde(default)]
    pub stage_only: bool,
    /// Set once the payload is written and read back whole, before the
    /// boot files and the flip: a daemon restarted after that reads the
    /// slot back against it instead of downloading the payload again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written: Option<WrittenSlot>,
}

/// What a finished apply left in the slot (see [`Job::written`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrittenSlot {
    pub version: String,
    /// Each component written (`usr`, `verity`, `uki`, ...) and the image
    /// the payload signed for it: size and segmented SHA-256.
    pub components: Vec<(String, ImageRef)>,
    pub downloaded_bytes: u64,
    pub resumed_requests: u64,
}

/// An update written and verified (stage), then set to boot next
/// (finalize).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    pub version: String,
    pub slot: SlotName,
    pub time: String,
    /// Set to boot next. `false` while it is only staged: the slot's boot
    /// state is cleared, so an unplanned reboot boots the running image.
    /// (State files from before stage and finalize were split only knew
    /// finalized updates.)
    #[serde(default = "yes")]
    pub finalized: bool,
    /// What the slot holds, read back again before it is finalized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageRef>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRecord {
    pub time: String,
    /// `up-to-date` or `update-available`.
    pub outcome: String,
    /// The version found, if any.
    pub version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorRecord {
    pub time: String,
    pub message: String,
}

/// `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Persisted {
    pub format_version: u32,
    pub state: UpdateState,
    pub job: Option<Job>,
    pub staged: Option<Staged>,
    pub last_check: Option<CheckRecord>,
    pub last_error: Option<ErrorRecord>,
    /// Highest serial accepted, per channel: a lower one is refused.
    pub accepted_serial: BTreeMap<String, u64>,
    /// The update booted into and not yet assessed (it was `staged`).
    #[serde(default)]
    pub trial: Option<Staged>,
    /// Versions rolled back, with why: never installed again by tandem
    /// itself, only when a person names them.
    #[serde(default)]
    pub blocked: BTreeMap<String, String>,
    /// The last boot assessment (or manual mark), with the boot it was for.
    #[serde(default)]
    pub assessment: Option<Assessment>,
    /// A fleetlock reboot slot is held (taken before the reboot, given back
    /// once the node is healthy again).
    #[serde(default)]
    pub fleetlock_held: bool,
    /// The version each slot holds, as far as tandem knows.
    #[serde(default)]
    pub versions: BTreeMap<SlotName, String>,
    /// Counters for the metrics (`failures/download`, `rollbacks/health`,
    /// ...); they survive restarts, unlike the bounded history.
    #[serde(default)]
    pub counters: BTreeMap<String, u64>,
}

/// A boot's assessment: the health checks' outcome, or a person's mark.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assessment {
    /// The kernel's boot id: one assessment per boot.
    pub boot_id: Option<String>,
    pub slot: SlotName,
    pub version: Option<String>,
    /// `passed`, `failed`, `marked-good` or `marked-bad`.
    pub result: String,
    pub started: String,
    pub finished: String,
    pub checks: Vec<crate::health::CheckResult>,
}

impl Persisted {
    /// What waits while nothing is under way.
    pub fn rest(&self) -> Rest {
        match &self.staged {
            None => Rest::Nothing,
            Some(s) if s.finalized => Rest::NeedReboot,
            Some(_) => Rest::Staged,
        }
    }
}

impl Default for Persisted {
    fn default() -> Self {
        Persisted {
            format_version: STATE_FORMAT,
            state: UpdateState::Idle,
            job: None,
            staged: None,
            last_check: None,
            last_error: None,
            accepted_serial: BTreeMap::new(),
            trial: None,
            blocked: BTreeMap::new(),
            assessment: None,
            fleetlock_held: false,
            versions: BTreeMap::new(),
            counters: BTreeMap::new(),
        }
    }
}

/// The files of one state folder.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: &Path) -> StateDir {
        StateDir {
            dir: dir.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn checkpoint_file(&self) -> PathBuf {
        self.dir.join("checkpoint.json")
    }

    pub fn history_file(&self) -> PathBuf {
        self.dir.join("history.json")
    }

    /// Creates the folder (mode 0700) and takes its lock for as long as the
    /// returned file lives.
    pub fn lock(&self) -> Result<File, StateError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io_err(&self.dir))?;
        let path = self.dir.join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        match file.try_lock() {
            Ok(()) => Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => Err(StateError::Locked { path }),
            Err(std::fs::TryLockError::Error(error)) => Err(StateError::Io { path, error }),
        }
    }

    /// The saved state; the default when there is none yet.
    pub fn load(&self) -> Result<Persisted, StateError> {
        let path = self.state_file();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Persisted::default()),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let state: Persisted = serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if state.format_version != STATE_FORMAT {
            return Err(StateError::Corrupt {
                path,
                message: format!("format_version {}", state.format_version),
            });
        }
        Ok(state)
    }

    pub fn store(&self, state: &Persisted) -> Result<(), StateError> {
        let path = self.state_file();
        let mut bytes = serde_json::to_vec_pretty(state).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        bytes.push(b'\n');
        payload::files::write_atomic(&path, &bytes).map_err(io_err(&path))
    }

    /// The history, oldest first.
    pub fn history(&self) -> Result<Vec<HistoryEvent>, StateError> {
        let path = self.history_file();
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| StateError::Corrupt {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Appends an event, dropping the oldest beyond [`HISTORY_LIMIT`].
    /// With `collapse`, an event that repeats the last one (kind, version
    /// and message) is not added again, so a retry every minute (a refused
    /// lock, a blocked version) does not push the rest out.
    pub fn record(&self, event: HistoryEvent, collapse: bool) -> Result<(), StateError> {
        let path = self.history_file();
        // A damaged history is replaced rather than blocking updates.
        let mut events = self.history().unwrap_or_default();
        if collapse
            && events.last().is_some_and(|l| {
                l.kind == event.kind && l.version == event.version && l.message == event.message
            })
        {
            return Ok(());
        }
        events.push(event);
        let excess = events.len().saturating_sub(HISTORY_LIMIT);
        events.drain(..excess);
        let bytes = serde_json::to_vec_pretty(&events).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        payload::files::write_atomic(&path, &bytes).map_err(io_err(&path))
    }
}

/// One line of `updatectl history`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEvent {
    pub time: String,
    /// `check`, `download-started`, `resumed`, `fallback`, `staged`,
    /// `cancelled`, `refused`, `failed`, `reboot`, `booted`, `health-passed`,
    /// `health-failed`, `marked-good`, `marked-bad`, `rollback`,
    /// `fleetlock`.
    pub kind: String,
    pub version: Option<String>,
    pub message: String,
    /// What a failed health check printed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_the_lock_is_exclusive() {
        let dir = std::env::temp_dir().join(format!("tandem-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sd = StateDir::new(&dir);
        assert_eq!(sd.load().unwrap(), Persisted::default());
        let lock = sd.lock().unwrap();
        assert!(matches!(sd.lock(), Err(StateError::Locked { .. })));
        let mut state = Persisted {
            state: UpdateState::Downloading,
            ..Persisted::default()
        };
        state.accepted_serial.insert("stable".into(), 7);
        sd.store(&state).unwrap();
        assert_eq!(sd.load().unwrap(), state);
        drop(lock);
        sd.lock().unwrap();
        for i in 0..HISTORY_LIMIT + 3 {
            sd.record(
                HistoryEvent {
                    time: String::new(),
                    kind: "check".into(),
                    version: None,
                    message: i.to_string(),
                    output: None,
                },
                false,
            )
            .unwrap();
        }
        let events = sd.history().unwrap();
        assert_eq!(events.len(), HISTORY_LIMIT);
        assert_eq!(events[0].message, "3");
        std::fs::write(sd.state_file(), "{\"format_version\": 9}").unwrap();
        assert!(matches!(sd.load(), Err(StateError::Corrupt { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
