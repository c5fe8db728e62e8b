//! tandem-operator end to end: a real kube-apiserver (and the disruption
//! controller), the operator as its binary with the shipped RBAC
//! (`deploy/operator.yaml`) and CRD (`deploy/crd.yaml`), and on every node
//! the real tandem-agent against a real tandemd on a private dbus-daemon
//! with a disk image. Simulated, and named so: each node's kubelet (its
//! Ready condition, pods Ready, evicted pods removed) and its reboot
//! (tandemd's reboot action is a recorder; the harness then reboots the
//! disk image as the updater's tests do and flips Ready).
//!
//! The invariants are checked from a watch of the Nodes, not from the
//! operator's logs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../updater/tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{in_days, releases, Node as TandemNode, Releases};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use tandem_cluster_tests::{
    eventually, grant_roles, install_crds, repo_root, start_agent, start_operator, ControlPlane,
    Kubelet, Process,
};
use tandem_operator::crd::{NodeState, Phase, TandemPool, STATE_ANNOTATION};
use tandem_testkit::fleetlock::free_port;
use tandem_testkit::http::HttpServer;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// 2.0.0's health check fails on this node: tandemd rolls back.
    HealthFails,
    /// The node never comes back after its reboot.
    NeverReady,
}

struct Member {
    name: String,
    tandem: Arc<Mutex<TandemNode>>,
    _agent: Process,
}

struct Fleet {
    cp: ControlPlane,
    admin: kube::Client,
    kubelet: Kubelet,
    _rel: Releases,
    _server: HttpServer,
    members: Vec<Member>,
    stop: Arc<AtomicBool>,
    /// Most nodes cordoned or NotReady at once, as a watch saw it.
    max_unavailable_seen: Arc<Mutex<usize>>,
    /// Every node a watch ever saw cordoned, in order.
    cordoned_ever: Arc<Mutex<Vec<String>>>,
}

impl Fleet {
    async fn new(nodes: &[(&str, Fault)]) -> Fleet {
        let cp = ControlPlane::start();
        let admin = cp.client("admin").await;
        grant_roles(
            &admin,
            &repo_root().join("deploy/agent.yaml"),
            "tandem:agents",
        )
        .await;
        grant_roles(
            &admin,
            &repo_root().join("deploy/operator.yaml"),
            "tandem:operators",
        )
        .await;
        install_crds(&admin, &repo_root().join("deploy/crd.yaml")).await;
        let kubelet = Kubelet::new(admin.clone());
        let rel = releases();
        let server = HttpServer::serve(&rel.www);
        rel.publish(1, vec![rel.release("2.0.0", false)], in_days(7), None);
        let stop = Arc::new(AtomicBool::new(false));
        let mut members = Vec::new();
        for (name, fault) in nodes {
            kubelet
                .create_node(name, serde_json::json!({"pool": "a"}))
                .await;
            let mut t = TandemNode::new(&server, &rel);
            t.configure("60-kubernetes", "[reboot]\nstrategy = \"kubernetes\"\n");
            if *fault == Fault::HealthFails {
                t.health_script("50-fails", "echo the kubelet did not come up; exit 1");
            }
            t.start();
            t.wait_health();
            let agent = start_agent(&cp, name, t.bus.address(), &t.dir.path().join("agent.log"));
            let tandem = Arc::new(Mutex::new(t));
            spawn_reboots(
                name,
                *fault,
                Arc::downgrade(&tandem),
                kubelet.clone(),
                stop.clone(),
            );
            members.push(Member {
                name: (*name).to_owned(),
                tandem,
                _agent: agent,
            });
        }
        // The kubelets remove the pods that evictions marked for deletion.
        {
            let kubelet = kubelet.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    kubelet.reap_terminating().await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
        let fleet = Fleet {
            cp,
            admin,
            kubelet,
            _rel: rel,
            _server: server,
            members,
            stop,
            max_unavailable_seen: Arc::default(),
            cordoned_ever: Arc::default(),
        };
        fleet.watch_nodes();
        fleet
    }

    /// Records, from a watch, the most nodes cordoned or NotReady at once.
    fn watch_nodes(&self) {
        let nodes: Api<Node> = Api::all(self.admin.clone());
        let max = self.max_unavailable_seen.clone();
        let ever = self.cordoned_ever.clone();
        tokio::spawn(async move {
            let mut now: BTreeMap<String, bool> = BTreeMap::new();
            let mut events = watcher(nodes, watcher::Config::default())
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(e) = events.next().await {
                let Ok(n) = e else { continue };
                let name = n.metadata.name.clone().unwrap_or_default();
                let cordoned = n
                    .spec
                    .as_ref()
                    .and_then(|s| s.unschedulable)
                    .unwrap_or(false);
                let ready = n
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                now.insert(name.clone(), cordoned || !ready);
                if cordoned {
                    let mut ever = ever.lock().unwrap();
                    if !ever.contains(&name) {
                        ever.push(name);
                    }
                }
                let count = now.values().filter(|v| **v).count();
                let mut max = max.lock().unwrap();
                *max = (*max).max(count);
            }
        });
    }

    async fn create_pool(&self, spec: serde_json::Value) {
        let pools: Api<TandemPool> = Api::all(self.admin.clone());
        let pool: TandemPool = serde_json::from_value(serde_json::json!({
            "apiVersion": "tandem.dev/v1alpha1", "kind": "TandemPool",
            "metadata": {"name": "pool-a"}, "spec": spec,
        }))
        .unwrap();
        pools.create(&PostParams::default(), &pool).await.unwrap();
    }

    async fn condition(&self, type_: &str) -> Option<(String, String, String)> {
        let pools: Api<TandemPool> = Api::all(self.admin.clone());
        let p = pools.get("pool-a").await.ok()?;
        p.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status, c.reason, c.message))
    }

    async fn wait_condition(&self, type_: &str, limit: Duration) -> (String, String, String) {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(c) = self.condition(type_).await {
                if c.0 == "True" {
                    return c;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{type_} not True after {limit:?}: {:?}\n{}\n--- operator ---\n{}",
                self.condition(type_).await,
                self.summary().await,
                self.cp.log("operator")
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn state(&self, node: &str) -> Option<NodeState> {
        let nodes: Api<Node> = Api::all(self.admin.clone());
        let n = nodes.get(node).await.ok()?;
        serde_json::from_str(n.metadata.annotations?.get(STATE_ANNOTATION)?).ok()
    }

    async fn summary(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            let s = self.state(&m.name).await;
            let t = m.tandem.lock().unwrap();
            out.push_str(&format!(
                "{}: {:?} {:?} reboots {:?}\n",
                m.name,
                s.as_ref().map(|s| s.phase),
                s.and_then(|s| s.reason),
                t.reboots()
            ));
        }
        out
    }

    /// Waits until `node`'s record is at `phase`; on timeout shows the
    /// nodes and the operator's log.
    async fn wait_phase(&self, node: &str, phase: Phase, limit: Duration) -> NodeState {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(s) = self.state(node).await.filter(|s| s.phase == phase) {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{node} not {phase:?} after {limit:?}\n{}\n--- operator ---\n{}",
                self.summary().await,
                self.cp.log("operator")
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn member(&self, name: &str) -> &Member {
        self.members.iter().find(|m| m.name == name).unwrap()
    }

    fn booted(&self, name: &str) -> String {
        let t = self.member(name).tandem.lock().unwrap();
        t.status()["booted_version"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    async fn cordoned(&self, name: &str) -> bool {
        let nodes: Api<Node> = Api::all(self.admin.clone());
        nodes
            .get(name)
            .await
            .unwrap()
            .spec
            .and_then(|s| s.unschedulable)
            .unwrap_or(false)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The harness's part of a node's reboot: when tandemd's reboot action
/// was called, the node goes NotReady, the disk image reboots (GRUB's
/// rule, tandemd started again), and the node is Ready again (or, for
/// `NeverReady`, stays down).
/// The thread holds the node weakly: dropping the fleet stops its tandemd
/// and bus.
fn spawn_reboots(
    name: &str,
    fault: Fault,
    tandem: std::sync::Weak<Mutex<TandemNode>>,
    kubelet: Kubelet,
    stop: Arc<AtomicBool>,
) {
    let name = name.to_owned();
    let handle = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        let mut handled = 0;
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
            let Some(tandem) = tandem.upgrade() else {
                return;
            };
            let asked = tandem.lock().unwrap().reboots().len();
            if asked <= handled {
                continue;
            }
            handled = asked;
            handle.block_on(kubelet.set_ready(&name, false));
            if fault == Fault::NeverReady {
                tandem.lock().unwrap().stop();
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
            tandem.lock().unwrap().reboot(["1.0.0", "2.0.0"]);
            handle.block_on(kubelet.set_ready(&name, true));
        }
    });
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn six_nodes_roll_two_at_a_time_through_operator_crashes() {
    let n = names("node-", 6);
    let nodes: Vec<(&str, Fault)> = n.iter().map(|s| (s.as_str(), Fault::None)).collect();
    let fleet = Fleet::new(&nodes).await;
    // A person cordoned node-6 before the rollout.
    let api: Api<Node> = Api::all(fleet.admin.clone());
    api.patch(
        "node-6",
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({"spec": {"unschedulable": true}})),
    )
    .await
    .unwrap();
    fleet
        .create_pool(serde_json::json!({
            "nodeSelector": {"pool": "a"}, "targetVersion": "2.0.0",
            "maxUnavailable": 2, "canary": 1, "soak": "1s", "maxFailures": 2,
            "drain": {"timeout": "60s"}, "health": {"readyTimeout": "90s"},
        }))
        .await;
    // Two replicas: only the Lease holder acts. One of them is killed and
    // started again every two seconds, at whatever step it is.
    let mut steady = start_operator(&fleet.cp, "op-b", free_port());
    let done = Arc::new(AtomicBool::new(false));
    let crasher = {
        let done = done.clone();
        let cp_dir = fleet.cp.dir.path().to_owned();
        let kubeconfig = fleet.cp.kubeconfig("tandem-operator");
        std::thread::spawn(move || {
            let mut restarts = 0;
            while !done.load(Ordering::SeqCst) {
                let mut p = Process::spawn(
                    std::process::Command::new(tandem_cluster_tests::workspace_bin(
                        "tandem-operator",
                    ))
                    .args([
                        "run",
                        "--interval-ms",
                        "300",
                        "--lease-seconds",
                        "5",
                        "--identity=op-a",
                    ])
                    .arg(format!("--metrics-addr=127.0.0.1:{}", free_port()))
                    .env("KUBECONFIG", &kubeconfig)
                    .env("POD_NAMESPACE", "tandem-system"),
                    &cp_dir.join("operator.log"),
                );
                std::thread::sleep(Duration::from_millis(1500 + 300 * (restarts % 4)));
                p.kill();
                restarts += 1;
            }
            restarts
        })
    };
    fleet
        .wait_condition("UpToDate", Duration::from_secs(240))
        .await;
    done.store(true, Ordering::SeqCst);
    let restarts = crasher.join().unwrap();
    assert!(restarts >= 3, "the operator was restarted {restarts} times");
    for name in &n {
        assert_eq!(
            fleet.booted(name),
            "2.0.0",
            "{name}\n{}",
            fleet.summary().await
        );
        let s = fleet.state(name).await.unwrap();
        assert_eq!(s.phase, Phase::Done, "{name}");
    }
    let max = *fleet.max_unavailable_seen.lock().unwrap();
    assert!(
        max <= 2,
        "a watch saw {max} nodes cordoned or NotReady at once"
    );
    assert_eq!(max, 2, "the rollout never used its two slots");
    // Every node but the person's was uncordoned; the person's stays.
    for name in &n[..5] {
        assert!(!fleet.cordoned(name).await, "{name} left cordoned");
    }
    assert!(
        fleet.cordoned("node-6").await,
        "a person's cordon was lifted"
    );
    assert!(!fleet.state("node-6").await.unwrap().cordoned_by_tandem);
    let (_, _, message) = fleet.condition("Progressing").await.unwrap();
    assert!(message.contains("6 of 6"), "{message}");
    steady.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_health_check_and_a_node_that_never_returns_halt_the_pool() {
    let fleet = Fleet::new(&[
        ("h1", Fault::HealthFails),
        ("h2", Fault::NeverReady),
        ("h3", Fault::None),
        ("h4", Fault::None),
        ("h5", Fault::None),
        ("h6", Fault::None),
    ])
    .await;
    fleet
        .create_pool(serde_json::json!({
            "nodeSelector": {"pool": "a"}, "targetVersion": "2.0.0",
            "maxUnavailable": 1, "canary": 0, "soak": "1s", "maxFailures": 2,
            "health": {"readyTimeout": "15s"},
        }))
        .await;
    let _op = start_operator(&fleet.cp, "op", free_port());
    let (_, reason, message) = fleet
        .wait_condition("Halted", Duration::from_secs(180))
        .await;
    assert_eq!(reason, "TooManyFailures");
    assert!(
        message.contains("h1") && message.contains("h2"),
        "{message}"
    );
    let h1 = fleet.state("h1").await.unwrap();
    assert_eq!(h1.phase, Phase::Failed);
    assert!(h1.reason.as_deref().unwrap().contains("reverted"), "{h1:?}");
    let h2 = fleet.state("h2").await.unwrap();
    assert!(
        h2.reason.as_deref().unwrap().contains("not back Ready"),
        "{h2:?}"
    );
    // tandemd rolled h1 back by itself.
    assert_eq!(fleet.booted("h1"), "1.0.0");
    // Nothing new starts while halted. Nodes take slots in name order
    // among those staged, so a healthy node that staged before h1 may have
    // gone first: it must then have finished on the target.
    let at_halt = fleet.cordoned_ever.lock().unwrap().clone();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let ever = fleet.cordoned_ever.lock().unwrap().clone();
    assert_eq!(ever, at_halt, "a node was cordoned after the halt");
    assert!(
        ever.iter().any(|n| n == "h1") && ever.iter().any(|n| n == "h2"),
        "nodes cordoned: {ever:?}"
    );
    let healthy = ["h3", "h4", "h5", "h6"];
    let went: Vec<&str> = healthy
        .into_iter()
        .filter(|n| ever.iter().any(|e| e == n))
        .collect();
    for name in &went {
        assert_eq!(fleet.booted(name), "2.0.0", "{name}");
        assert_eq!(fleet.state(name).await.unwrap().phase, Phase::Done);
    }
    for name in healthy.into_iter().filter(|n| !went.contains(n)) {
        assert_eq!(fleet.booted(name), "1.0.0", "{name}");
        assert!(
            fleet
                .member(name)
                .tandem
                .lock()
                .unwrap()
                .reboots()
                .is_empty(),
            "{name} rebooted"
        );
        let s = fleet.state(name).await.unwrap();
        assert_eq!(s.phase, Phase::Staged, "{name}");
    }
    let (degraded, _, _) = fleet.condition("Degraded").await.unwrap();
    assert_eq!(degraded, "True");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pdb_blocks_a_drain_which_times_out_without_a_reboot() {
    let fleet = Fleet::new(&[("p1", Fault::None), ("p2", Fault::None)]).await;
    // A pod on p1 guarded by a PDB that allows no disruption, and a free
    // pod on p2 that its drain evicts.
    fleet
        .kubelet
        .create_pod(
            "default",
            "guarded",
            "p1",
            serde_json::json!({"app": "guarded"}),
        )
        .await;
    fleet
        .kubelet
        .create_pod("default", "free", "p2", serde_json::json!({"app": "free"}))
        .await;
    let pdbs: Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> =
        Api::namespaced(fleet.admin.clone(), "default");
    let pdb = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "guarded"},
        "spec": {"maxUnavailable": 0, "selector": {"matchLabels": {"app": "guarded"}}},
    }))
    .unwrap();
    pdbs.create(&PostParams::default(), &pdb).await.unwrap();
    // The disruption controller has computed the budget.
    eventually("the PDB's status", Duration::from_secs(30), || async {
        let p = pdbs.get("guarded").await.ok()?;
        (p.status?.observed_generation? >= 1).then_some(())
    })
    .await;
    fleet
        .create_pool(serde_json::json!({
            "nodeSelector": {"pool": "a"}, "targetVersion": "2.0.0",
            "maxUnavailable": 1, "canary": 0, "soak": "1s",
            "drain": {"timeout": "6s"}, "health": {"readyTimeout": "60s"},
        }))
        .await;
    let metrics_port = free_port();
    let _op = start_operator(&fleet.cp, "op", metrics_port);
    fleet
        .wait_phase("p1", Phase::Failed, Duration::from_secs(120))
        .await;
    let p1 = fleet.state("p1").await.unwrap();
    assert!(
        p1.reason.as_deref().unwrap().contains("drain timed out"),
        "{p1:?}"
    );
    assert!(!fleet.cordoned("p1").await, "p1 was left cordoned");
    assert!(
        fleet
            .member("p1")
            .tandem
            .lock()
            .unwrap()
            .reboots()
            .is_empty(),
        "p1 was rebooted"
    );
    assert_eq!(fleet.booted("p1"), "1.0.0");
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(fleet.admin.clone(), "default");
    assert!(
        pods.get("guarded").await.is_ok(),
        "the guarded pod was removed"
    );
    // p2 goes on (one failure is below maxFailures): its pod is evicted.
    fleet
        .wait_phase("p2", Phase::Done, Duration::from_secs(120))
        .await;
    assert_eq!(fleet.booted("p2"), "2.0.0");
    assert!(pods.get("free").await.is_err(), "p2's pod was not evicted");
    let (degraded, _, _) = fleet.condition("Degraded").await.unwrap();
    assert_eq!(degraded, "True");
    let (halted, _, _) = fleet.condition("Halted").await.unwrap();
    assert_eq!(halted, "False");
    // The refused evictions show in the operator's metrics.
    let metrics = std::process::Command::new("curl")
        .args(["-sf", &format!("http://127.0.0.1:{metrics_port}/metrics")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&metrics.stdout);
    let refused: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("tandem_operator_evictions_refused_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(refused >= 1, "{text}");
    assert!(
        text.contains("tandem_operator_nodes{pool=\"pool-a\",state=\"failed\"} 1"),
        "{text}"
    );
    // Events were written for the nodes' steps.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(fleet.admin.clone());
    let reasons: BTreeSet<String> = events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    for r in [
        "Staging",
        "Staged",
        "Draining",
        "DrainFailed",
        "Finalizing",
        "Rebooting",
        "Soaking",
        "Updated",
    ] {
        assert!(reasons.contains(r), "no {r} event: {reasons:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_closed_maintenance_window_stages_but_disrupts_nothing() {
    let fleet = Fleet::new(&[("w1", Fault::None), ("w2", Fault::None)]).await;
    // A one-hour window twelve hours from now.
    let start = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(12))
        .unwrap()
        .to_zoned_datetime(jiff::tz::TimeZone::UTC);
    fleet
        .create_pool(serde_json::json!({
            "nodeSelector": {"pool": "a"}, "targetVersion": "2.0.0", "maxUnavailable": 2,
            "maintenanceWindows": [{"start": format!("{:02}:{:02}", start.hour(), start.minute()),
                                    "length": "1h", "timeZone": "UTC"}],
        }))
        .await;
    let _op = start_operator(&fleet.cp, "op", free_port());
    for name in ["w1", "w2"] {
        fleet
            .wait_phase(name, Phase::Staged, Duration::from_secs(60))
            .await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    for name in ["w1", "w2"] {
        assert_eq!(fleet.state(name).await.unwrap().phase, Phase::Staged);
        assert!(fleet
            .member(name)
            .tandem
            .lock()
            .unwrap()
            .reboots()
            .is_empty());
        assert_eq!(fleet.booted(name), "1.0.0");
    }
    assert!(fleet.cordoned_ever.lock().unwrap().is_empty());
    let (_, reason, _) = fleet.condition("Progressing").await.unwrap();
    assert_eq!(reason, "OutsideMaintenanceWindow");
}
