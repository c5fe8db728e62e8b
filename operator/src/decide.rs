//! The rollout's decisions: which nodes to stage, to start, to hold, to
//! release, and when the pool halts. A pure function of the observed pool,
//! its nodes and the time; the controller reads the API, calls [`decide`],
//! and carries out the plan (each node's new record written first, in the
//! same patch as the request it goes with).

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use tandem_agent::protocol::{commit_id, Code, UpdateStatus};

use crate::crd::{
    Condition, Counts, Failure, MaintenanceWindow, NodeState, OnTimeout, Phase, TandemPoolSpec,
    TandemPoolStatus,
};

/// A node as the controller observed it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeView {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ready: bool,
    pub unschedulable: bool,
    pub state: Option<NodeState>,
    /// The agent's `acl.azure.com/update-status`.
    pub agent: Option<UpdateStatus>,
    /// The agent's `tandem.dev/booted-version` label.
    pub booted_version: Option<String>,
    /// Pods a drain must still see gone (not DaemonSet-owned, not mirror
    /// pods, not finished); those already terminating count.
    pub pods_left: usize,
    /// The pods matching the health gate's selector are all Ready.
    pub gated_pods_ready: bool,
    /// A person asked for a failed node to be tried again.
    pub retry: bool,
}

/// The pool as observed.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolView {
    pub name: String,
    pub spec: TandemPoolSpec,
    pub status: TandemPoolStatus,
    /// A person asked for the halt to be cleared.
    pub clear_halt: bool,
}

/// One thing to do to a node. A node's actions are done in order, and a
/// [`NodeAction::Record`] first, in one patch with the request it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeAction {
    /// Write the node's `tandem.dev/state`.
    Record(NodeState),
    /// Write the agent's request annotation (stage or finalize).
    Request(String),
    Cordon,
    /// Evict the pods still on the node (a 429 is waited on).
    Evict,
    Uncordon,
    /// Leave it cordoned and label it quarantined.
    Quarantine,
    /// Forget the record (and the retry annotation): the node starts over.
    Forget,
}

/// A Kubernetes Event to emit for a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventNote {
    pub node: String,
    pub reason: String,
    pub message: String,
    pub warning: bool,
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub actions: Vec<(String, Vec<NodeAction>)>,
    pub status: TandemPoolStatus,
    pub events: Vec<EventNote>,
    /// The clear-halt annotation was acted on: remove it.
    pub halt_cleared: bool,
}

fn parse_duration(what: &str, text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{what} {text:?}: {e}"))
}

/// The spec's durations, checked.
struct Times {
    soak: Duration,
    drain: Duration,
    ready: Duration,
}

fn times(spec: &TandemPoolSpec) -> Result<Times, String> {
    Ok(Times {
        soak: parse_duration("soak", spec.soak.as_deref().unwrap_or("0s"))?,
        drain: parse_duration("drain.timeout", &spec.drain.timeout)?,
        ready: parse_duration("health.readyTimeout", &spec.health.ready_timeout)?,
    })
}

/// Whether `now` falls in one of the windows (none: always). Pure.
pub fn window_open(windows: &[MaintenanceWindow], now: Timestamp) -> Result<bool, String> {
    if windows.is_empty() {
        return Ok(true);
    }
    for w in windows {
        let tz = jiff::tz::TimeZone::get(&w.time_zone)
            .map_err(|e| format!("time zone {:?}: {e}", w.time_zone))?;
        let (h, m) = w
            .start
            .split_once(':')
            .and_then(|(h, m)| Some((h.parse::<i8>().ok()?, m.parse::<i8>().ok()?)))
            .filter(|(h, m)| (0..24).contains(h) && (0..60).contains(m))
            .ok_or_else(|| format!("window start {:?} is not HH:MM", w.start))?;
        let length = parse_duration("window length", &w.length)?;
        let length = jiff::SignedDuration::try_from(length).map_err(|e| e.to_string())?;
        let local = now.to_zoned_datetime(tz.clone());
        // A window that began today or yesterday (it may cross midnight).
        for back in [0u8, 1] {
            let day = if back == 0 {
                local.date()
            } else {
                local.date().yesterday().map_err(|e| e.to_string())?
            };
            let name = format!("{:?}", day.weekday());
            if !w.days.is_empty()
                && !w
                    .days
                    .iter()
                    .any(|d| name.to_lowercase().starts_with(&d.to_lowercase()))
            {
                continue;
            }
            let start = day
                .at(h, m, 0, 0)
                .to_zoned_datetime(tz.clone())
                .map_err(|e| e.to_string())?
                .timestamp();
            let end = start.checked_add(length).map_err(|e| e.to_string())?;
            if start <= now && now < end {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// A UUID-shaped id, the same for the same inputs. Pure.
pub fn update_id(parts: &[&str]) -> String {
    let hash = |seed: u64| {
        let mut h = seed;
        for p in parts {
            for b in p.bytes().chain([0]) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        h
    };
    let a = hash(0xcbf2_9ce4_8422_2325);
    let b = hash(0x6c62_272e_07bb_0142);
    let x = (u128::from(a) << 64) | u128::from(b);
    let s = format!("{x:032x}");
    format!(
        "{}-{}-8{}-{}-{}",
        &s[0..8],
        &s[8..12],
        &s[13..16],
        &s[16..20],
        &s[20..32]
    )
}

pub fn stage_op(id: &str) -> String {
    format!("{id}-stage")
}

pub fn finalize_op(id: &str) -> String {
    format!("{id}-finalize")
}

/// The request annotation's value for `op` (`stage` or `finalize`).
pub fn request_text(state: &NodeState, op: &str) -> String {
    let op_id = if op == "stage" {
        stage_op(&state.node_update_id)
    } else {
        finalize_op(&state.node_update_id)
    };
    serde_json::json!({
        "schemaVersion": "1.0",
        "nodeUpdateId": state.node_update_id,
        "operationId": op_id,
        "operation": op,
        "targetVersion": state.target,
    })
    .to_string()
}

fn elapsed(since: &str, now: Timestamp) -> Duration {
    since
        .parse::<Timestamp>()
        .ok()
        .and_then(|t| Duration::try_from(now.duration_since(t)).ok())
        .unwrap_or_default()
}

fn selected(spec: &TandemPoolSpec, n: &NodeView) -> bool {
    spec.node_selector
        .iter()
        .all(|(k, v)| n.labels.get(k) == Some(v))
}

/// The agent's answer to `op_id`, if it is final.
fn answer<'a>(n: &'a NodeView, op_id: &str) -> Option<&'a UpdateStatus> {
    n.agent
        .as_ref()
        .filter(|s| s.operation_id == op_id && s.code.is_final())
}

struct Ctx<'a> {
    pool: &'a str,
    target: &'a str,
    now_text: String,
}

impl Ctx<'_> {
    fn state(&self, old: &NodeState, phase: Phase, reason: Option<String>) -> NodeState {
        NodeState {
            phase,
            since: self.now_text.clone(),
            reason,
            ..old.clone()
        }
    }
}

/// The plan for the pool at `now`. Pure.
pub fn decide(pool: &PoolView, nodes: &[NodeView], now: Timestamp) -> Plan {
    let spec = &pool.spec;
    let ctx = Ctx {
        pool: &pool.name,
        target: &spec.target_version,
        now_text: now.round(jiff::Unit::Second).unwrap_or(now).to_string(),
    };
    let mut nodes: Vec<&NodeView> = nodes.iter().filter(|n| selected(spec, n)).collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let total = nodes.len();
    let mut plan = Plan {
        actions: Vec::new(),
        status: TandemPoolStatus {
            observed_generation: pool.status.observed_generation,
            ..TandemPoolStatus::default()
        },
        events: Vec::new(),
        halt_cleared: false,
    };
    let checked = times(spec).and_then(|t| {
        let max = spec.max_unavailable.resolve(total).ok_or_else(|| {
            format!(
                "maxUnavailable {:?} is not a count or N%",
                spec.max_unavailable
            )
        })?;
        Ok((t, max, window_open(&spec.maintenance_windows, now)?))
    });
    let (t, max_unavailable, window) = match checked {
        Ok(v) => v,
        Err(why) => {
            plan.status.conditions = conditions(
                &pool.status,
                &ctx,
                [
                    ("Progressing", false, "InvalidSpec", why.clone()),
                    ("Halted", false, "InvalidSpec", why.clone()),
                    ("Degraded", true, "InvalidSpec", why.clone()),
                    ("UpToDate", false, "InvalidSpec", why),
                ],
            );
            return plan;
        }
    };
    // A node's record counts when it is this pool's and for this target,
    // or for an earlier target while it still holds a slot (it finishes).
    let current = |n: &NodeView| -> Option<NodeState> {
        n.state
            .clone()
            .filter(|s| s.pool == pool.name && (s.target == *ctx.target || s.phase.holds_slot()))
    };
    let failures: Vec<Failure> = nodes
        .iter()
        .filter_map(|n| {
            current(n)
                .filter(|s| s.phase == Phase::Failed && s.target == *ctx.target)
                .map(|s| Failure {
                    node: n.name.clone(),
                    reason: s.reason.unwrap_or_default(),
                    time: s.since,
                })
        })
        .collect();
    let mut cleared = pool.status.cleared_failures.min(failures.len() as u32);
    if pool.clear_halt {
        cleared = failures.len() as u32;
        plan.halt_cleared = true;
    }
    let counted = failures.len() as u32 - cleared;
    let halted = counted >= spec.max_failures;
    let holders = nodes
        .iter()
        .filter(|n| current(n).is_some_and(|s| s.phase.holds_slot()))
        .count();
    // Unavailable: the slot holders, and any other node not Ready or
    // cordoned (by a person, or quarantined).
    let unavailable = holders
        + nodes
            .iter()
            .filter(|n| {
                !current(n).is_some_and(|s| s.phase.holds_slot()) && (!n.ready || n.unschedulable)
            })
            .count();
    let done = nodes
        .iter()
        .filter(|n| current(n).is_some_and(|s| s.phase == Phase::Done && s.target == *ctx.target))
        .count();
    // Until `canary` nodes are done, one node at a time holds a slot.
    let canary = done < spec.canary as usize;
    // Trust grows with success: the nodes in flight never exceed the
    // failures still allowed plus the nodes already done, so a bad release
    // halts the pool after about maxFailures failures, not after a whole
    // wave of maxUnavailable nodes failed at once.
    let budget = (spec.max_failures.saturating_sub(counted)) as usize + done;
    let capacity = max_unavailable;
    let mut taken = unavailable;
    let mut holding = holders;
    let may_stage = !spec.paused && !halted;
    let may_start = may_stage && window;
    let mut counts = Counts {
        total: total as u32,
        ..Counts::default()
    };
    for n in &nodes {
        let mut acts = Vec::new();
        let mut note = |reason: &str, message: String, warning: bool| {
            plan.events.push(EventNote {
                node: n.name.clone(),
                reason: reason.into(),
                message,
                warning,
            })
        };
        // The node is let go before the record says so: a crash between
        // the two repeats the release, never leaves a cordon behind.
        let fail = |s: &NodeState, why: String, acts: &mut Vec<NodeAction>| {
            if s.phase.holds_slot() {
                if spec.drain.on_timeout == OnTimeout::Quarantine && s.phase == Phase::Draining {
                    acts.push(NodeAction::Quarantine);
                } else if s.cordoned_by_tandem {
                    acts.push(NodeAction::Uncordon);
                }
                // A person's cordon stays.
            }
            acts.push(NodeAction::Record(ctx.state(s, Phase::Failed, Some(why))));
        };
        let at_target = n.booted_version.as_deref() == Some(ctx.target);
        match current(n) {
            None => {
                if at_target {
                    counts.up_to_date += 1;
                } else if may_stage {
                    let id = update_id(&[ctx.pool, ctx.target, &n.name, &ctx.now_text]);
                    let s = NodeState {
                        pool: pool.name.clone(),
                        target: ctx.target.to_owned(),
                        phase: Phase::Staging,
                        since: ctx.now_text.clone(),
                        node_update_id: id,
                        cordoned_by_tandem: false,
                        reason: None,
                    };
                    acts.push(NodeAction::Record(s.clone()));
                    acts.push(NodeAction::Request(request_text(&s, "stage")));
                    note(
                        "Staging",
                        format!("staging {} (not disruptive)", ctx.target),
                        false,
                    );
                    counts.staging += 1;
                } else {
                    counts.pending += 1;
                }
            }
            Some(s) => match s.phase {
                Phase::Staging => {
                    counts.staging += 1;
                    match answer(n, &stage_op(&s.node_update_id)) {
                        Some(a) if matches!(a.code, Code::Success | Code::AlreadyAtTarget) => {
                            acts.push(NodeAction::Record(ctx.state(&s, Phase::Staged, None)));
                            note(
                                "Staged",
                                format!("{} staged: {}", ctx.target, a.message),
                                false,
                            );
                        }
                        Some(a) => {
                            let why = format!("stage failed ({:?}): {}", a.code, a.message);
                            note("UpdateFailed", why.clone(), true);
                            fail(&s, why, &mut acts);
                        }
                        None => {}
                    }
                }
                Phase::Staged => {
                    counts.staged += 1;
                    if may_start && taken < capacity && holding < budget && !(canary && holding > 0)
                    {
                        taken += 1;
                        holding += 1;
                        let mut next = ctx.state(&s, Phase::Draining, None);
                        next.cordoned_by_tandem = !n.unschedulable;
                        acts.push(NodeAction::Record(next));
                        acts.push(NodeAction::Cordon);
                        acts.push(NodeAction::Evict);
                        note(
                            "Draining",
                            format!(
                                "slot {taken} of {capacity} taken; cordoned{}, draining",
                                if n.unschedulable {
                                    " already by someone else"
                                } else {
                                    ""
                                }
                            ),
                            false,
                        );
                    }
                }
                Phase::Draining => {
                    counts.disrupted += 1;
                    if s.cordoned_by_tandem && !n.unschedulable {
                        // The record was written, the cordon not yet (or
                        // someone uncordoned it): cordon before anything.
                        acts.push(NodeAction::Cordon);
                        acts.push(NodeAction::Evict);
                    } else if n.pods_left == 0 {
                        let next = ctx.state(&s, Phase::Finalizing, None);
                        acts.push(NodeAction::Record(next.clone()));
                        acts.push(NodeAction::Request(request_text(&next, "finalize")));
                        note(
                            "Finalizing",
                            "drained; finalize and reboot asked".into(),
                            false,
                        );
                    } else if elapsed(&s.since, now) >= t.drain {
                        let why = format!(
                            "the drain timed out after {} with {} pods left; the node was not rebooted",
                            spec.drain.timeout, n.pods_left
                        );
                        note("DrainFailed", why.clone(), true);
                        fail(&s, why, &mut acts);
                    } else {
                        acts.push(NodeAction::Evict);
                    }
                }
                Phase::Finalizing => {
                    counts.disrupted += 1;
                    let op = finalize_op(&s.node_update_id);
                    // The agent may have gone on to the commit already.
                    let answered = answer(n, &op).or_else(|| answer(n, &commit_id(&op)));
                    let committed = answered.is_some_and(|a| a.operation_id != op);
                    match answered {
                        Some(a)
                            if committed
                                || matches!(a.code, Code::Success | Code::AlreadyAtTarget) =>
                        {
                            acts.push(NodeAction::Record(ctx.state(&s, Phase::Rebooting, None)));
                            note("Rebooting", a.message.clone(), false);
                        }
                        Some(a) => {
                            let why = format!("finalize failed ({:?}): {}", a.code, a.message);
                            note("UpdateFailed", why.clone(), true);
                            fail(&s, why, &mut acts);
                        }
                        None if elapsed(&s.since, now) >= t.ready => {
                            let why = format!(
                                "no answer to finalize within {}",
                                spec.health.ready_timeout
                            );
                            note("UpdateFailed", why.clone(), true);
                            fail(&s, why, &mut acts);
                        }
                        None => {}
                    }
                }
                Phase::Rebooting => {
                    counts.disrupted += 1;
                    let commit = answer(n, &commit_id(&finalize_op(&s.node_update_id)));
                    match commit {
                        Some(a) if a.code != Code::Success => {
                            let why = format!("the update was reverted: {}", a.message);
                            note("UpdateReverted", why.clone(), true);
                            fail(&s, why, &mut acts);
                        }
                        Some(_) if n.ready && n.gated_pods_ready => {
                            acts.push(NodeAction::Record(ctx.state(&s, Phase::Soaking, None)));
                            note(
                                "Soaking",
                                format!("{} committed and Ready; soaking", ctx.target),
                                false,
                            );
                        }
                        _ if elapsed(&s.since, now) >= t.ready => {
                            let why = format!(
                                "not back Ready with its commit within {} (Ready: {})",
                                spec.health.ready_timeout, n.ready
                            );
                            note("UpdateFailed", why.clone(), true);
                            fail(&s, why, &mut acts);
                        }
                        _ => {}
                    }
                }
                Phase::Soaking => {
                    counts.disrupted += 1;
                    if !n.ready {
                        let why = "became NotReady during the soak".to_owned();
                        note("UpdateFailed", why.clone(), true);
                        fail(&s, why, &mut acts);
                    } else if elapsed(&s.since, now) >= t.soak {
                        if s.cordoned_by_tandem {
                            acts.push(NodeAction::Uncordon);
                        }
                        acts.push(NodeAction::Record(ctx.state(&s, Phase::Done, None)));
                        note(
                            "Updated",
                            format!("{} healthy; slot freed", ctx.target),
                            false,
                        );
                    }
                }
                Phase::Done => counts.up_to_date += 1,
                Phase::Failed => {
                    counts.failed += 1;
                    if n.retry {
                        acts.push(NodeAction::Forget);
                        note("Retry", "a person asked for another try".into(), false);
                    }
                }
            },
        }
        if !acts.is_empty() {
            plan.actions.push((n.name.clone(), acts));
        }
    }
    let up_to_date = counts.up_to_date == counts.total;
    let in_flight = counts.staging + counts.staged + counts.disrupted + counts.pending > 0;
    let names: Vec<&str> = failures.iter().map(|f| f.node.as_str()).collect();
    plan.status.conditions = conditions(
        &pool.status,
        &ctx,
        [
            (
                "Progressing",
                in_flight && !halted && !spec.paused,
                if halted {
                    "Halted"
                } else if spec.paused {
                    "Paused"
                } else if !window {
                    "OutsideMaintenanceWindow"
                } else if in_flight {
                    "RollingOut"
                } else {
                    "Idle"
                },
                format!(
                    "{} of {} nodes at {}",
                    counts.up_to_date, counts.total, ctx.target
                ),
            ),
            (
                "Halted",
                halted,
                if halted {
                    "TooManyFailures"
                } else {
                    "BelowMaxFailures"
                },
                format!(
                    "{counted} failures of {} allowed{}",
                    spec.max_failures,
                    if names.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", names.join(", "))
                    }
                ),
            ),
            (
                "Degraded",
                !failures.is_empty(),
                if failures.is_empty() {
                    "NoFailures"
                } else {
                    "NodesFailed"
                },
                format!("{} nodes failed", failures.len()),
            ),
            (
                "UpToDate",
                up_to_date,
                if up_to_date {
                    "AllNodesAtTarget"
                } else {
                    "NodesBehind"
                },
                format!(
                    "{} of {} nodes at {}",
                    counts.up_to_date, counts.total, ctx.target
                ),
            ),
        ],
    );
    plan.status.counts = counts;
    plan.status.failures = failures;
    plan.status.cleared_failures = cleared;
    plan
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;

fn conditions<const N: usize>(
    old: &TandemPoolStatus,
    ctx: &Ctx<'_>,
    new: [(&str, bool, &str, String); N],
) -> Vec<Condition> {
    new.into_iter()
        .map(|(type_, on, reason, message)| {
            let status = if on { "True" } else { "False" };
            let since = old
                .conditions
                .iter()
                .find(|c| c.type_ == type_ && c.status == status)
                .map_or_else(|| ctx.now_text.clone(), |c| c.last_transition_time.clone());
            Condition {
                type_: type_.into(),
                status: status.into(),
                reason: reason.into(),
                message,
                last_transition_time: since,
            }
        })
        .collect()
}
