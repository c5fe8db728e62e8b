//! The decisions, run against a simulated pool (no cluster): every
//! combination of pool size, maxUnavailable, canary, node faults, window
//! and operator crashes mid-plan, with the rollout's invariants checked
//! after every step.

use super::*;
use crate::crd::{DrainSpec, HealthSpec, IntOrPercent, TandemPoolSpec};
use tandem_agent::protocol::{parse_request, StatusOperation, SCHEMA_VERSION};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    StageFails,
    /// A PDB keeps its pod: evictions are refused forever.
    DrainBlocked,
    /// Boots, fails its health check, tandemd rolls back.
    HealthFails,
    /// Never Ready again after the reboot.
    NeverReady,
}

#[derive(Debug, Clone)]
struct SimNode {
    view: NodeView,
    fault: Fault,
    /// Ticks until the reboot is over.
    rebooting: Option<u32>,
    /// The finalize to commit once back.
    finalize: Option<(String, String)>,
    /// A person cordoned it before the rollout.
    person_cordoned: bool,
    /// The agent was asked to finalize while pods were left.
    finalized_undrained: bool,
}

struct Sim {
    nodes: Vec<SimNode>,
    pool: PoolView,
    now: Timestamp,
    rng: u64,
    crash_one_in: u64,
    max_seen_unavailable: usize,
    max_seen_disrupted_before_canary: usize,
    started_after_halt: bool,
    halted_at: Option<usize>,
    failures_at_halt: usize,
}

const T0: i64 = 1_800_000_000;

fn spec(max: IntOrPercent, canary: u32, max_failures: u32) -> TandemPoolSpec {
    TandemPoolSpec {
        node_selector: [("pool".to_owned(), "a".to_owned())].into(),
        target_version: "2.0.0".into(),
        max_unavailable: max,
        canary,
        soak: Some("20s".into()),
        max_failures,
        paused: false,
        maintenance_windows: Vec::new(),
        drain: DrainSpec {
            timeout: "60s".into(),
            ..DrainSpec::default()
        },
        health: HealthSpec {
            ready_timeout: "120s".into(),
            ..HealthSpec::default()
        },
    }
}

fn status(s: &UpdateRequestLite, op: StatusOperation, code: Code) -> UpdateStatus {
    UpdateStatus {
        schema_version: SCHEMA_VERSION.into(),
        node_update_id: s.id.clone(),
        operation_id: if op == StatusOperation::Commit {
            commit_id(&s.op_id)
        } else {
            s.op_id.clone()
        },
        operation: op,
        code,
        message: format!("{code:?}"),
        from_version: Some("1.0.0".into()),
        to_version: Some("2.0.0".into()),
        started_utc: "2027-01-15T08:00:00Z".into(),
        finished_utc: Some("2027-01-15T08:00:00Z".into()),
    }
}

struct UpdateRequestLite {
    id: String,
    op_id: String,
}

impl Sim {
    fn new(
        n: usize,
        spec: TandemPoolSpec,
        faults: &[(usize, Fault)],
        crash_one_in: u64,
        seed: u64,
    ) -> Sim {
        let nodes = (0..n)
            .map(|i| {
                let fault = faults
                    .iter()
                    .find(|(j, _)| *j == i)
                    .map_or(Fault::None, |f| f.1);
                SimNode {
                    view: NodeView {
                        name: format!("node-{i}"),
                        labels: [("pool".to_owned(), "a".to_owned())].into(),
                        ready: true,
                        unschedulable: false,
                        booted_version: Some("1.0.0".into()),
                        pods_left: 2,
                        gated_pods_ready: true,
                        ..NodeView::default()
                    },
                    fault,
                    rebooting: None,
                    finalize: None,
                    person_cordoned: false,
                    finalized_undrained: false,
                }
            })
            .collect();
        Sim {
            nodes,
            pool: PoolView {
                name: "pool-a".into(),
                spec,
                status: TandemPoolStatus::default(),
                clear_halt: false,
            },
            now: Timestamp::from_second(T0).unwrap(),
            rng: seed | 1,
            crash_one_in,
            max_seen_unavailable: 0,
            max_seen_disrupted_before_canary: 0,
            started_after_halt: false,
            halted_at: None,
            failures_at_halt: 0,
        }
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn views(&self) -> Vec<NodeView> {
        self.nodes.iter().map(|n| n.view.clone()).collect()
    }

    fn node(&mut self, name: &str) -> &mut SimNode {
        self.nodes.iter_mut().find(|n| n.view.name == name).unwrap()
    }

    fn apply(&mut self, name: &str, action: &NodeAction) {
        let target = self.pool.spec.target_version.clone();
        let n = self.node(name);
        match action {
            NodeAction::Record(s) => n.view.state = Some(s.clone()),
            NodeAction::Request(text) => {
                let r = parse_request(text).unwrap();
                let lite = UpdateRequestLite {
                    id: r.node_update_id.clone(),
                    op_id: r.operation_id.clone(),
                };
                match r.operation {
                    tandem_agent::protocol::RequestOperation::Stage => {
                        let code = if n.fault == Fault::StageFails {
                            Code::OperationFailed
                        } else {
                            Code::Success
                        };
                        n.view.agent = Some(status(&lite, StatusOperation::Stage, code));
                    }
                    tandem_agent::protocol::RequestOperation::Finalize => {
                        if n.view.pods_left > 0 {
                            n.finalized_undrained = true;
                        }
                        n.view.agent =
                            Some(status(&lite, StatusOperation::Finalize, Code::Success));
                        n.view.ready = false;
                        n.rebooting = Some(3);
                        n.finalize = Some((lite.id, lite.op_id));
                    }
                    tandem_agent::protocol::RequestOperation::Rollback => unreachable!(),
                }
            }
            NodeAction::Cordon => n.view.unschedulable = true,
            NodeAction::Evict => {
                if n.fault != Fault::DrainBlocked {
                    n.view.pods_left = 0;
                }
            }
            NodeAction::Uncordon => n.view.unschedulable = false,
            NodeAction::Quarantine => {
                n.view
                    .labels
                    .insert("tandem.dev/quarantined".into(), "true".into());
            }
            NodeAction::Forget => n.view.state = None,
        }
        let _ = target;
    }

    /// The world moves on by 10 s: reboots finish, commits are reported.
    fn tick_world(&mut self) {
        self.now = self
            .now
            .checked_add(jiff::SignedDuration::from_secs(10))
            .unwrap();
        for n in &mut self.nodes {
            if let Some(left) = n.rebooting {
                if left > 1 {
                    n.rebooting = Some(left - 1);
                    continue;
                }
                n.rebooting = None;
                let Some((id, op_id)) = n.finalize.take() else {
                    continue;
                };
                let lite = UpdateRequestLite { id, op_id };
                match n.fault {
                    Fault::NeverReady => {}
                    Fault::HealthFails => {
                        n.view.ready = true;
                        n.view.agent = Some(status(
                            &lite,
                            StatusOperation::Commit,
                            Code::RevertedToPrevious,
                        ));
                    }
                    _ => {
                        n.view.ready = true;
                        n.view.booted_version = Some("2.0.0".into());
                        n.view.agent = Some(status(&lite, StatusOperation::Commit, Code::Success));
                        // Pods come back once it is schedulable again.
                        n.view.pods_left = 2;
                    }
                }
            }
        }
    }

    /// One round of the operator (possibly dying mid-plan), then checks.
    fn round(&mut self) -> Plan {
        let plan = decide(&self.pool, &self.views(), self.now);
        let halted_before = self.halted_at.is_some();
        let mut flat: Vec<(String, NodeAction)> = Vec::new();
        for (node, acts) in &plan.actions {
            for a in acts {
                flat.push((node.clone(), a.clone()));
            }
        }
        let mut cut = if self.crash_one_in > 0 && self.random().is_multiple_of(self.crash_one_in) {
            (self.random() as usize) % (flat.len() + 1)
        } else {
            flat.len()
        };
        // A record and the request after it are one patch: never split.
        if cut > 0
            && cut < flat.len()
            && matches!(flat[cut - 1].1, NodeAction::Record(_))
            && matches!(flat[cut].1, NodeAction::Request(_))
        {
            cut += 1;
        }
        for (node, a) in &flat[..cut] {
            if halted_before {
                if let NodeAction::Record(s) = a {
                    if s.phase == Phase::Draining || s.phase == Phase::Staging {
                        self.started_after_halt = true;
                    }
                }
            }
            self.apply(node, a);
        }
        if cut == flat.len() {
            // The status is written last: a crash loses it, nothing else.
            self.pool.status = plan.status.clone();
            if plan
                .status
                .conditions
                .iter()
                .any(|c| c.type_ == "Halted" && c.status == "True")
                && self.halted_at.is_none()
            {
                self.halted_at = Some(0);
                self.failures_at_halt = plan.status.failures.len();
            }
        }
        self.check();
        plan
    }

    fn check(&mut self) {
        let max = self
            .pool
            .spec
            .max_unavailable
            .resolve(self.nodes.len())
            .unwrap();
        let persons = self.nodes.iter().filter(|n| n.person_cordoned).count();
        // What a watch of the Nodes sees: cordoned or not Ready.
        let unavailable = self
            .nodes
            .iter()
            .filter(|n| n.view.unschedulable || !n.view.ready)
            .count();
        assert!(
            unavailable <= max.max(persons),
            "{unavailable} nodes unavailable, maxUnavailable {max}: {:#?}",
            self.views()
        );
        self.max_seen_unavailable = self.max_seen_unavailable.max(unavailable);
        let done = self
            .nodes
            .iter()
            .filter(|n| {
                n.view
                    .state
                    .as_ref()
                    .is_some_and(|s| s.phase == Phase::Done)
            })
            .count();
        if done < self.pool.spec.canary as usize {
            let disrupted = self
                .nodes
                .iter()
                .filter(|n| n.view.state.as_ref().is_some_and(|s| s.phase.holds_slot()))
                .count();
            assert!(
                disrupted <= 1,
                "{disrupted} nodes in flight before the canary finished"
            );
            self.max_seen_disrupted_before_canary =
                self.max_seen_disrupted_before_canary.max(disrupted);
        }
        for n in &self.nodes {
            assert!(
                !n.finalized_undrained,
                "{} was finalized with pods left",
                n.view.name
            );
            if n.fault == Fault::DrainBlocked {
                assert!(
                    n.finalize.is_none() && n.rebooting.is_none(),
                    "a blocked drain led to a reboot"
                );
            }
        }
    }

    fn run(&mut self, rounds: usize) {
        for _ in 0..rounds {
            self.round();
            self.tick_world();
        }
    }

    fn phase(&self, i: usize) -> Option<Phase> {
        self.nodes[i].view.state.as_ref().map(|s| s.phase)
    }
}

#[test]
fn every_combination_keeps_the_invariants() {
    let faults = [
        Fault::None,
        Fault::StageFails,
        Fault::DrainBlocked,
        Fault::HealthFails,
        Fault::NeverReady,
    ];
    let mut runs = 0;
    for n in [1usize, 2, 3, 6] {
        for max in [
            IntOrPercent::Count(1),
            IntOrPercent::Count(2),
            IntOrPercent::Percent("50%".into()),
        ] {
            for canary in [0u32, 1, 2] {
                for f1 in faults {
                    for f2 in faults {
                        for crash in [0u64, 3] {
                            for person in [false, true] {
                                let mut placed = vec![(0, f1)];
                                if n > 2 {
                                    placed.push((n - 1, f2));
                                } else if f2 != Fault::None {
                                    continue;
                                }
                                let seed = runs as u64 * 7919 + 1;
                                let mut sim =
                                    Sim::new(n, spec(max.clone(), canary, 2), &placed, crash, seed);
                                if person && n > 1 {
                                    sim.nodes[1].view.unschedulable = true;
                                    sim.nodes[1].person_cordoned = true;
                                }
                                sim.run(400);
                                runs += 1;
                                let failing: Vec<usize> = placed
                                    .iter()
                                    .filter(|(_, f)| *f != Fault::None)
                                    .map(|(i, _)| *i)
                                    .collect();
                                let halted = sim.halted_at.is_some();
                                assert!(
                                    !sim.started_after_halt,
                                    "a node was started after the halt"
                                );
                                let blocked_by_person =
                                    person && n > 1 && max.resolve(n).unwrap() <= 1;
                                // Nodes unavailable for good (a person's
                                // cordon, a node that never came back) use
                                // up maxUnavailable: the rest cannot start.
                                let gone = usize::from(person && n > 1)
                                    + placed
                                        .iter()
                                        .filter(|(_, f)| *f == Fault::NeverReady)
                                        .count();
                                let stuck = max.resolve(n).unwrap() <= gone;
                                if failing.len() >= 2 && !stuck {
                                    assert!(halted, "n={n} {placed:?}: two failures did not halt");
                                    assert!(sim.failures_at_halt <= 2);
                                }
                                if failing.is_empty() && !blocked_by_person {
                                    // Everything updated, every slot freed.
                                    for (i, node) in sim.nodes.iter().enumerate() {
                                        assert_eq!(
                                            node.view.booted_version.as_deref(),
                                            Some("2.0.0"),
                                            "node {i}: n={n} max={max:?} canary={canary} crash={crash} person={person} {:?}",
                                            sim.pool.status.conditions
                                        );
                                        assert_eq!(
                                            sim.phase(i),
                                            Some(Phase::Done),
                                            "n={n} max={max:?} canary={canary} crash={crash} person={person} {:?}",
                                            node.view.state
                                        );
                                        assert_eq!(
                                            node.view.unschedulable, node.person_cordoned,
                                            "node {i}'s cordon"
                                        );
                                    }
                                    let up = sim
                                        .pool
                                        .status
                                        .conditions
                                        .iter()
                                        .find(|c| c.type_ == "UpToDate")
                                        .unwrap();
                                    assert_eq!(up.status, "True");
                                }
                                for i in &failing {
                                    if !halted || sim.phase(*i).is_some() {
                                        // A failed node is recorded, and let go
                                        // unless a person had cordoned it.
                                        if sim.phase(*i) == Some(Phase::Failed)
                                            && sim.nodes[*i].fault != Fault::NeverReady
                                            && !sim.nodes[*i].person_cordoned
                                        {
                                            assert!(
                                                !sim.nodes[*i].view.unschedulable,
                                                "failed node {i} left cordoned"
                                            );
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(runs > 1000, "{runs}");
}

#[test]
fn max_unavailable_is_reached_but_not_passed() {
    let mut sim = Sim::new(6, spec(IntOrPercent::Count(2), 1, 2), &[], 0, 1);
    sim.run(400);
    assert_eq!(sim.max_seen_unavailable, 2);
    assert_eq!(sim.max_seen_disrupted_before_canary, 1);
}

#[test]
fn a_person_cordon_stays_and_counts_as_unavailable() {
    let mut sim = Sim::new(3, spec(IntOrPercent::Count(1), 0, 2), &[], 0, 1);
    sim.nodes[2].view.unschedulable = true;
    sim.nodes[2].person_cordoned = true;
    let plan = sim.round();
    // Capacity 1 is taken by the cordoned node: nothing starts.
    assert!(plan
        .actions
        .iter()
        .all(|(_, a)| !a.contains(&NodeAction::Cordon)));
    sim.run(400);
    assert!(sim.nodes[2].view.unschedulable);
    assert_eq!(sim.nodes[2].view.booted_version.as_deref(), Some("1.0.0"));
    // With room for it, it is updated and stays cordoned.
    let mut sim = Sim::new(3, spec(IntOrPercent::Count(2), 0, 2), &[], 0, 1);
    sim.nodes[2].view.unschedulable = true;
    sim.nodes[2].person_cordoned = true;
    sim.run(400);
    assert_eq!(sim.nodes[2].view.booted_version.as_deref(), Some("2.0.0"));
    assert!(sim.nodes[2].view.unschedulable);
    assert!(!sim.nodes[2].view.state.as_ref().unwrap().cordoned_by_tandem);
}

#[test]
fn a_blocked_drain_times_out_without_a_reboot_and_counts() {
    let mut sim = Sim::new(
        2,
        spec(IntOrPercent::Count(1), 0, 2),
        &[(0, Fault::DrainBlocked)],
        0,
        1,
    );
    sim.run(400);
    let s = sim.nodes[0].view.state.clone().unwrap();
    assert_eq!(s.phase, Phase::Failed);
    assert!(s.reason.unwrap().contains("drain timed out"));
    assert!(!sim.nodes[0].view.unschedulable);
    assert_eq!(sim.nodes[0].view.booted_version.as_deref(), Some("1.0.0"));
    // The other node went on.
    assert_eq!(sim.nodes[1].view.booted_version.as_deref(), Some("2.0.0"));
    let degraded = sim
        .pool
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(degraded.status, "True");
    // Quarantine instead: left cordoned and labelled.
    let mut q = spec(IntOrPercent::Count(1), 0, 2);
    q.drain.on_timeout = OnTimeout::Quarantine;
    let mut sim = Sim::new(2, q, &[(0, Fault::DrainBlocked)], 0, 1);
    sim.run(400);
    assert!(sim.nodes[0].view.unschedulable);
    assert!(sim.nodes[0]
        .view
        .labels
        .contains_key("tandem.dev/quarantined"));
}

#[test]
fn two_failures_halt_and_a_person_clears_it() {
    // maxUnavailable 2: after the clear, the node that never came back
    // (still NotReady) takes one of the two.
    let mut sim = Sim::new(
        6,
        spec(IntOrPercent::Count(2), 0, 2),
        &[(0, Fault::HealthFails), (1, Fault::NeverReady)],
        0,
        1,
    );
    sim.run(400);
    let halted = sim
        .pool
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Halted")
        .unwrap();
    assert_eq!(halted.status, "True", "{halted:?}");
    assert!(
        halted.message.contains("node-0") && halted.message.contains("node-1"),
        "{}",
        halted.message
    );
    // Nobody was started after the halt (one in flight before it may
    // have finished), and the rest wait.
    assert!(!sim.started_after_halt);
    let waiting = (2..6)
        .filter(|i| sim.phase(*i) == Some(Phase::Staged))
        .count();
    assert!(
        waiting >= 2,
        "{:?}",
        (2..6).map(|i| sim.phase(i)).collect::<Vec<_>>()
    );
    // Cleared: the rest of the pool goes on.
    sim.pool.clear_halt = true;
    let plan = sim.round();
    assert!(plan.halt_cleared);
    sim.pool.clear_halt = false;
    sim.run(400);
    for i in 2..6 {
        assert_eq!(
            sim.nodes[i].view.booted_version.as_deref(),
            Some("2.0.0"),
            "node {i}"
        );
    }
}

#[test]
fn a_closed_window_or_a_pause_starts_no_disruption_but_stages() {
    let mut closed = spec(IntOrPercent::Count(2), 0, 2);
    // 03:00-04:00 UTC; the simulation runs at 2027-01-15 08:00 UTC.
    closed.maintenance_windows = vec![MaintenanceWindow {
        days: Vec::new(),
        start: "03:00".into(),
        length: "1h".into(),
        time_zone: "UTC".into(),
    }];
    let mut sim = Sim::new(3, closed.clone(), &[], 0, 1);
    sim.run(50);
    for i in 0..3 {
        assert_eq!(sim.phase(i), Some(Phase::Staged), "node {i}");
        assert!(!sim.nodes[i].view.unschedulable);
    }
    let p = sim
        .pool
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Progressing")
        .unwrap();
    assert_eq!(p.reason, "OutsideMaintenanceWindow");
    // The window opens (08:00 for 1h): the rollout goes.
    sim.pool.spec.maintenance_windows[0].start = "08:00".into();
    sim.run(100);
    assert!((0..3).all(|i| sim.phase(i) == Some(Phase::Done)));

    let mut paused = spec(IntOrPercent::Count(2), 0, 2);
    paused.paused = true;
    let mut sim = Sim::new(2, paused, &[], 0, 1);
    sim.run(50);
    assert!((0..2).all(|i| sim.phase(i).is_none()));
}

#[test]
fn windows_cross_midnight_and_follow_time_zones() {
    let w = |start: &str, len: &str, tz: &str, days: &[&str]| MaintenanceWindow {
        days: days.iter().map(|d| (*d).to_owned()).collect(),
        start: start.into(),
        length: len.into(),
        time_zone: tz.into(),
    };
    let at = |s: &str| s.parse::<Timestamp>().unwrap();
    // Friday 2027-01-15.
    assert!(window_open(
        &[w("23:00", "3h", "UTC", &["Thu"])],
        at("2027-01-15T01:30:00Z")
    )
    .unwrap());
    assert!(!window_open(
        &[w("23:00", "3h", "UTC", &["Thu"])],
        at("2027-01-15T02:30:00Z")
    )
    .unwrap());
    assert!(!window_open(
        &[w("23:00", "3h", "UTC", &["Fri"])],
        at("2027-01-15T01:30:00Z")
    )
    .unwrap());
    // 09:00 in Berlin is 08:00 UTC in winter.
    assert!(window_open(
        &[w("09:00", "1h", "Europe/Berlin", &[])],
        at("2027-01-15T08:30:00Z")
    )
    .unwrap());
    assert!(!window_open(
        &[w("09:00", "1h", "Europe/Berlin", &[])],
        at("2027-01-15T09:30:00Z")
    )
    .unwrap());
    assert!(window_open(&[w("25:00", "1h", "UTC", &[])], at("2027-01-15T09:30:00Z")).is_err());
    assert!(window_open(
        &[w("09:00", "1h", "Mars/Base", &[])],
        at("2027-01-15T09:30:00Z")
    )
    .is_err());
}

#[test]
fn the_plan_is_the_same_for_the_same_observation_and_bad_specs_do_nothing() {
    let sim = Sim::new(4, spec(IntOrPercent::Count(2), 1, 2), &[], 0, 1);
    let a = decide(&sim.pool, &sim.views(), sim.now);
    let b = decide(&sim.pool, &sim.views(), sim.now);
    assert_eq!(a, b);
    let mut bad = sim.pool.clone();
    bad.spec.drain.timeout = "soon".into();
    let plan = decide(&bad, &sim.views(), sim.now);
    assert!(plan.actions.is_empty());
    let p = plan
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Progressing")
        .unwrap();
    assert_eq!(p.reason, "InvalidSpec");
    assert!(p.message.contains("drain.timeout"), "{}", p.message);
    bad.spec.max_unavailable = IntOrPercent::Percent("ten".into());
    bad.spec.drain.timeout = "1m".into();
    assert!(decide(&bad, &sim.views(), sim.now).actions.is_empty());
}

#[test]
fn percentages_round_down_but_never_to_zero_and_ids_are_uuids() {
    assert_eq!(IntOrPercent::Percent("10%".into()).resolve(1000), Some(100));
    assert_eq!(IntOrPercent::Percent("10%".into()).resolve(5), Some(1));
    assert_eq!(IntOrPercent::Percent("33%".into()).resolve(10), Some(3));
    assert_eq!(IntOrPercent::Count(3).resolve(2), Some(3));
    assert_eq!(IntOrPercent::Percent("x".into()).resolve(2), None);
    let id = update_id(&["pool", "2.0.0", "node-1", "t"]);
    assert!(tandem_agent::protocol::is_uuid(&id), "{id}");
    assert_ne!(id, update_id(&["pool", "2.0.0", "node-2", "t"]));
}

#[test]
fn a_release_that_fails_everywhere_halts_within_max_failures() {
    let faults: Vec<(usize, Fault)> = (0..10).map(|i| (i, Fault::HealthFails)).collect();
    // Even with room for five at once, no more than maxFailures nodes are
    // in flight before anything has succeeded.
    let mut sim = Sim::new(10, spec(IntOrPercent::Count(5), 0, 2), &faults, 0, 1);
    sim.run(400);
    assert!(sim.halted_at.is_some());
    let failed = (0..10)
        .filter(|i| sim.phase(*i) == Some(Phase::Failed))
        .count();
    assert_eq!(
        failed,
        2,
        "{:?}",
        (0..10).map(|i| sim.phase(i)).collect::<Vec<_>>()
    );
}

#[test]
fn the_slot_of_a_deleted_node_is_freed() {
    let mut sim = Sim::new(
        3,
        spec(IntOrPercent::Count(1), 0, 2),
        &[(0, Fault::DrainBlocked)],
        0,
        1,
    );
    // node-0 takes the only slot and cannot drain.
    for _ in 0..3 {
        sim.round();
        sim.tick_world();
    }
    assert_eq!(sim.phase(0), Some(Phase::Draining));
    let plan = decide(&sim.pool, &sim.views(), sim.now);
    assert!(plan
        .actions
        .iter()
        .all(|(n, a)| n == "node-0" || !a.contains(&NodeAction::Cordon)));
    // The Node object is deleted (its record with it): the slot is free.
    sim.nodes.remove(0);
    let plan = decide(&sim.pool, &sim.views(), sim.now);
    let started: Vec<&String> = plan
        .actions
        .iter()
        .filter(|(_, a)| a.contains(&NodeAction::Cordon))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(started, ["node-1"]);
}
