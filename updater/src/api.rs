//! The engine's API types: requests, reports and the status document
//! (`updatectl status --json`, D-Bus `GetStatus`; schema in
//! `updater/status.schema.json`).

use std::collections::BTreeMap;

use bootconfig::gptprio::SlotStatus;
use bootconfig::SlotName;
use serde::{Deserialize, Serialize};

use crate::engine::RebootStatus;
use crate::machine::UpdateState;
use crate::state::{Assessment, CheckRecord, ErrorRecord, PayloadKind, Staged};

/// Version of the status document (`updatectl status --json`, D-Bus
/// `GetStatus`); bumped on any incompatible change.
pub const STATUS_FORMAT: u32 = 1;

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
