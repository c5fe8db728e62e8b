//! The `TandemPool` custom resource (`tandem.dev/v1alpha1`, cluster
//! scoped, with a status subresource) and the per-node record the operator
//! keeps on each Node (`tandem.dev/state`), so that what it holds (the
//! disruption slots, who cordoned a node) lives in the API, not in memory.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The annotation on a Node with the operator's record of it.
pub const STATE_ANNOTATION: &str = "tandem.dev/state";
/// A person's annotation on a failed Node: try it again.
pub const RETRY_ANNOTATION: &str = "tandem.dev/retry";
/// A person's annotation on a halted pool: clear the halt.
pub const CLEAR_HALT_ANNOTATION: &str = "tandem.dev/clear-halt";
/// The label on a node left cordoned after a drain timed out.
pub const QUARANTINE_LABEL: &str = "tandem.dev/quarantined";

/// A pool of nodes updated to one version, a few at a time.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "tandem.dev",
    version = "v1alpha1",
    kind = "TandemPool",
    plural = "tandempools",
    shortname = "tpool",
    status = "TandemPoolStatus",
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetVersion"}"#,
    printcolumn = r#"{"name":"UpToDate","type":"integer","jsonPath":".status.counts.upToDate"}"#,
    printcolumn = r#"{"name":"Total","type":"integer","jsonPath":".status.counts.total"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.counts.failed"}"#,
    printcolumn = r#"{"name":"Halted","type":"string","jsonPath":".status.conditions[?(@.type==\"Halted\")].status"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TandemPoolSpec {
    /// Labels a Node must have to be in the pool.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// The version every node of the pool is updated to.
    #[schemars(length(min = 1, max = 64))]
    pub target_version: String,
    /// Nodes disrupted (cordoned, drained, rebooting, soaking) at once,
    /// counting nodes that are not Ready: a count, or a percentage of the
    /// pool ("10%", rounded down, at least 1).
    #[serde(default = "one")]
    pub max_unavailable: IntOrPercent,
    /// The first nodes of a rollout are updated alone, one at a time.
    #[serde(default = "one_u32")]
    pub canary: u32,
    /// How long a node must stay Ready after its commit before its slot is
    /// freed ("10m"; default "0s").
    #[serde(default)]
    pub soak: Option<String>,
    /// Failures after which the pool halts.
    #[serde(default = "two")]
    #[schemars(range(min = 1))]
    pub max_failures: u32,
    /// No new node is started while paused; nodes in flight finish.
    #[serde(default)]
    pub paused: bool,
    /// When disruption may start (none: always). Staging is allowed
    /// outside them; nodes in flight finish.
    #[serde(default)]
    #[schemars(length(max = 16))]
    pub maintenance_windows: Vec<MaintenanceWindow>,
    #[serde(default)]
    pub drain: DrainSpec,
    #[serde(default)]
    pub health: HealthSpec,
}

fn one() -> IntOrPercent {
    IntOrPercent::Count(1)
}

fn one_u32() -> u32 {
    1
}

fn two() -> u32 {
    2
}

/// A count or a percentage, as Kubernetes' `maxUnavailable`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum IntOrPercent {
    Count(u32),
    Percent(String),
}

impl JsonSchema for IntOrPercent {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "IntOrPercent".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "x-kubernetes-int-or-string": true,
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": "^[0-9]+%$"}
            ]
        })
    }
}

impl IntOrPercent {
    /// The count for a pool of `total` nodes (a percentage rounds down, at
    /// least 1). `None` for a malformed percentage.
    pub fn resolve(&self, total: usize) -> Option<usize> {
        match self {
            IntOrPercent::Count(n) => Some(*n as usize),
            IntOrPercent::Percent(p) => {
                let pct: usize = p.strip_suffix('%')?.parse().ok()?;
                Some((total * pct / 100).max(1))
            }
        }
    }
}

/// A weekly window: on `days`, from `start` for `length`, in `timeZone`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.days.all(d, d in ['Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat', 'Sun'])",
    "message": "days are Mon, Tue, Wed, Thu, Fri, Sat or Sun"
}]))]
pub struct MaintenanceWindow {
    /// `Mon`..`Sun`; empty: every day.
    #[serde(default)]
    #[schemars(length(max = 7), inner(length(max = 3)))]
    pub days: Vec<String>,
    /// `HH:MM`.
    #[schemars(regex(pattern = r"^[0-2][0-9]:[0-5][0-9]$"))]
    pub start: String,
    /// "4h", "90m".
    pub length: String,
    /// An IANA name or `UTC`.
    #[serde(default = "utc")]
    pub time_zone: String,
}

fn utc() -> String {
    "UTC".into()
}

/// What happens to a node whose drain timed out.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum OnTimeout {
    /// Uncordon it (if tandem cordoned it) and count a failure.
    #[default]
    Skip,
    /// Leave it cordoned and labelled `tandem.dev/quarantined`, and count a
    /// failure.
    Quarantine,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainSpec {
    /// How long evictions are tried (a PodDisruptionBudget's 429 is waited
    /// on, never forced); default "30m", as AKS.
    #[serde(default = "thirty_minutes")]
    pub timeout: String,
    #[serde(default)]
    pub on_timeout: OnTimeout,
    /// The pods' termination grace period for the eviction; default: the
    /// pod's own.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub grace_period_seconds: Option<i64>,
}

impl Default for DrainSpec {
    fn default() -> Self {
        DrainSpec {
            timeout: thirty_minutes(),
            on_timeout: OnTimeout::Skip,
            grace_period_seconds: None,
        }
    }
}

fn thirty_minutes() -> String {
    "30m".into()
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthSpec {
    /// How long a finalized node may take to come back Ready with the
    /// agent's commit; default "15m".
    #[serde(default = "fifteen_minutes")]
    pub ready_timeout: String,
    /// Pods on the node matching these labels must be Ready again before
    /// the soak starts.
    #[serde(default)]
    pub pod_selector: BTreeMap<String, String>,
}

impl Default for HealthSpec {
    fn default() -> Self {
        HealthSpec {
            ready_timeout: fifteen_minutes(),
            pod_selector: BTreeMap::new(),
        }
    }
}

fn fifteen_minutes() -> String {
    "15m".into()
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TandemPoolStatus {
    #[serde(default)]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub counts: Counts,
    /// The failed nodes of this target, with why.
    #[serde(default)]
    pub failures: Vec<Failure>,
    /// Failures forgotten by a person's clear-halt (they do not count).
    #[serde(default)]
    pub cleared_failures: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Progressing`, `Halted`, `Degraded`, `UpToDate`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True` or `False`.
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    pub total: u32,
    pub up_to_date: u32,
    pub pending: u32,
    pub staging: u32,
    pub staged: u32,
    /// Holding a slot: draining, finalizing, rebooting or soaking.
    pub disrupted: u32,
    pub failed: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Failure {
    pub node: String,
    pub reason: String,
    pub time: String,
}

/// Where a node is in its update, as the operator records it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// A stage was asked of the agent.
    Staging,
    /// The target is written and verified on the node; waiting for a slot.
    Staged,
    /// Holding a slot: cordoned, pods being evicted.
    Draining,
    /// A finalize (set next, reboot) was asked of the agent.
    Finalizing,
    /// Waiting for the node to be Ready again with the agent's commit.
    Rebooting,
    /// Committed; must stay Ready for the soak before its slot is freed.
    Soaking,
    Done,
    Failed,
}

impl Phase {
    /// Whether the node holds one of the pool's disruption slots.
    pub fn holds_slot(self) -> bool {
        matches!(
            self,
            Phase::Draining | Phase::Finalizing | Phase::Rebooting | Phase::Soaking
        )
    }
}

/// `tandem.dev/state` on a Node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    pub pool: String,
    pub target: String,
    pub phase: Phase,
    /// When the phase began (RFC 3339).
    pub since: String,
    /// The agent requests' `nodeUpdateId`.
    pub node_update_id: String,
    /// tandem cordoned the node (it was schedulable before): only then
    /// does tandem uncordon it.
    #[serde(default)]
    pub cordoned_by_tandem: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn deploy_crd_yaml_is_what_the_types_generate() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crd.yaml");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let body: String = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        let generated = serde_yaml::to_string(&TandemPool::crd()).unwrap_or_default();
        assert!(
            body == generated,
            "deploy/crd.yaml is stale: regenerate it with `tandem-operator crd` (see the README)"
        );
    }

    #[test]
    fn specs_take_their_defaults() {
        let spec: TandemPoolSpec =
            serde_json::from_value(serde_json::json!({"targetVersion": "2.0.0"}))
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(spec.max_unavailable, IntOrPercent::Count(1));
        assert_eq!((spec.canary, spec.max_failures), (1, 2));
        assert_eq!(spec.drain.timeout, "30m");
        assert_eq!(spec.drain.on_timeout, OnTimeout::Skip);
        let pct: TandemPoolSpec = serde_json::from_value(
            serde_json::json!({"targetVersion": "2", "maxUnavailable": "10%"}),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pct.max_unavailable, IntOrPercent::Percent("10%".into()));
    }
}
