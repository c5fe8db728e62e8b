//! tandem-agent against a real kube-apiserver and a real tandemd: the agent
//! runs as its binary with the shipped RBAC (`deploy/agent.yaml`), tandemd
//! as a process on a private dbus-daemon with a GPT disk image, payloads
//! over HTTP on 127.0.0.1. The node's kubelet and its reboot are
//! simulated: the test flips the Node's Ready condition and reboots the
//! disk image as `updater/tests/health.rs` does (GRUB's gptprio rule, a new
//! boot id, tandemd started again).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../updater/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{bin, in_days, releases, Node as TandemNode};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use tandem_agent::protocol::{
    Code, StatusOperation, UpdateStatus, REQUEST_ANNOTATION, STATUS_ANNOTATION, VERSION_LABEL,
};
use tandem_cluster_tests::{eventually, grant_roles, repo_root, ControlPlane, Kubelet};
use tandem_testkit::http::HttpServer;

const NODE: &str = "node-1";
const UPDATE: &str = "6b1f6a55-3f1e-4e0b-9a53-7d1c4d2a9e01";
const WAIT: Duration = Duration::from_secs(60);

struct Agent {
    child: Child,
}

impl Agent {
    fn start(cp: &ControlPlane, node: &TandemNode) -> Agent {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.path().join("agent.log"))
            .unwrap();
        let child = Command::new(bin("tandem-agent"))
            .args(["--node", NODE, "--poll-seconds", "1"])
            .env("KUBECONFIG", cp.kubeconfig("tandem-agent"))
            .env("DBUS_SYSTEM_BUS_ADDRESS", node.bus.address())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Agent { child }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

fn request(op: &str, id: &str, target: Option<&str>) -> String {
    let mut v = serde_json::json!({"schemaVersion": "1.0", "nodeUpdateId": UPDATE,
        "operationId": id, "operation": op});
    if let Some(t) = target {
        v["targetVersion"] = t.into();
    }
    v.to_string()
}

async fn ask(nodes: &Api<Node>, text: &str) {
    let patch = serde_json::json!({"metadata": {"annotations": {REQUEST_ANNOTATION: text}}});
    nodes
        .patch(NODE, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

async fn status_of(nodes: &Api<Node>) -> Option<UpdateStatus> {
    let node = nodes.get(NODE).await.ok()?;
    let text = node.metadata.annotations?.get(STATUS_ANNOTATION)?.clone();
    Some(serde_json::from_str(&text).unwrap())
}

async fn wait_status(
    nodes: &Api<Node>,
    id: &str,
    code: Code,
    agent_log: &std::path::Path,
) -> UpdateStatus {
    let limit = WAIT;
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(s) = status_of(nodes).await {
            if s.operation_id == id && s.code == code {
                return s;
            }
            assert!(
                s.operation_id != id || !s.code.is_final() || s.code == code,
                "{id}: got {s:?}, wanted {code:?}\n{}",
                std::fs::read_to_string(agent_log).unwrap_or_default()
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {id} {code:?}; last {:?}\n{}",
            status_of(nodes).await,
            std::fs::read_to_string(agent_log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn label_of(nodes: &Api<Node>) -> Option<String> {
    nodes
        .get(NODE)
        .await
        .ok()?
        .metadata
        .labels?
        .get(VERSION_LABEL)
        .cloned()
}

/// Every value the status annotation took, as a watch of the Node saw it.
fn record_statuses(nodes: Api<Node>) -> Arc<Mutex<Vec<String>>> {
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let out = seen.clone();
    tokio::spawn(async move {
        let config = watcher::Config::default().fields(&format!("metadata.name={NODE}"));
        let mut events = watcher(nodes, config)
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(event) = events.next().await {
            let Ok(node) = event else { continue };
            let value = node
                .metadata
                .annotations
                .and_then(|a| a.get(STATUS_ANNOTATION).cloned());
            if let Some(v) = value {
                let mut seen = out.lock().unwrap();
                if seen.last() != Some(&v) {
                    seen.push(v);
                }
            }
        }
    });
    seen
}

/// Each status is exactly the protocol's shape: the ten keys, known
/// operations and codes, RFC 3339 times.
fn assert_conformant(text: &str) {
    let v: serde_json::Value = serde_json::from_str(text).unwrap();
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    let mut keys: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "code",
            "finishedUtc",
            "fromVersion",
            "message",
            "nodeUpdateId",
            "operation",
            "operationId",
            "schemaVersion",
            "startedUtc",
            "toVersion"
        ],
        "{text}"
    );
    let s: UpdateStatus = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(s.schema_version, "1.0");
    s.started_utc
        .parse::<k8s_openapi::jiff::Timestamp>()
        .unwrap();
    match (&s.finished_utc, s.code) {
        (None, Code::InProgress) => {}
        (Some(t), c) if c != Code::InProgress => {
            t.parse::<k8s_openapi::jiff::Timestamp>().unwrap();
        }
        other => panic!("finishedUtc and code disagree: {other:?} in {text}"),
    }
}

fn history_count(node: &TandemNode, kind: &str) -> usize {
    node.history().iter().filter(|e| e["kind"] == kind).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_stages_finalizes_and_commits_once_per_request() {
    let mut cp = ControlPlane::start();
    let admin = cp.client("admin").await;
    let roles = grant_roles(
        &admin,
        &repo_root().join("deploy/agent.yaml"),
        "tandem:agents",
    )
    .await;
    assert_eq!(roles, ["tandem-agent"]);
    let kubelet = Kubelet::new(admin.clone());
    kubelet
        .create_node(NODE, serde_json::json!({"pool": "a"}))
        .await;
    // The agent's rights are only the shipped ones: it cannot read pods.
    let as_agent = cp.client("tandem-agent").await;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::all(as_agent);
    assert!(pods.list(&Default::default()).await.is_err());

    let rel = releases();
    let server = HttpServer::serve(&rel.www);
    rel.publish(1, vec![rel.release("2.0.0", false)], in_days(7), None);
    let mut node = TandemNode::new(&server, &rel);
    node.configure("60-kubernetes", "[reboot]\nstrategy = \"kubernetes\"\n");
    node.start();
    node.wait_health();
    let agent_log = node.dir.path().join("agent.log");
    let nodes: Api<Node> = Api::all(admin.clone());
    let seen = record_statuses(nodes.clone());
    let mut agent = Agent::start(&cp, &node);
    eventually("the version label", WAIT, || async {
        (label_of(&nodes).await.as_deref() == Some("1.0.0")).then_some(())
    })
    .await;

    // Stage: written and verified, not set to boot.
    ask(&nodes, &request("stage", "op-stage", Some("2.0.0"))).await;
    let s = wait_status(&nodes, "op-stage", Code::Success, &agent_log).await;
    assert_eq!(s.operation, StatusOperation::Stage);
    assert_eq!(
        (s.from_version.as_deref(), s.to_version.as_deref()),
        (Some("1.0.0"), Some("2.0.0"))
    );
    assert!(node.slot_bytes(4, rel.v2.len()) == rel.v2);
    assert_eq!(
        node.disk.cgpt_prio(4),
        (0, 0, false),
        "a stage set B to boot"
    );
    assert_eq!(history_count(&node, "staged"), 1);

    // The same request again (the annotation written anew) is not run again.
    let patch = serde_json::json!({"metadata": {"annotations": {REQUEST_ANNOTATION: null}}});
    nodes
        .patch(NODE, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    ask(&nodes, &request("stage", "op-stage", Some("2.0.0"))).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        status_of(&nodes).await.unwrap(),
        s,
        "a repeated request was answered again"
    );
    assert_eq!(history_count(&node, "download-started"), 1);

    // A malformed request: InvalidRequest, and tandemd is not touched.
    let events = node.history().len();
    ask(&nodes, r#"{"schemaVersion":"1.0","nodeUpdateId":"6b1f6a55-3f1e-4e0b-9a53-7d1c4d2a9e01","operationId":"op-bad","operation":"finalize","force":true}"#).await;
    let bad = wait_status(&nodes, "op-bad", Code::InvalidRequest, &agent_log).await;
    assert!(bad.message.contains("unknown field"), "{}", bad.message);
    assert_eq!(node.history().len(), events);
    assert_eq!(node.disk.cgpt_prio(4), (0, 0, false));

    // The API server goes away and comes back: the agent's watch reconnects.
    cp.restart_apiserver(Duration::from_secs(2));
    // Finalize: set next and the reboot action called, once.
    ask(&nodes, &request("finalize", "op-fin", Some("2.0.0"))).await;
    let f = wait_status(&nodes, "op-fin", Code::Success, &agent_log).await;
    assert_eq!(f.operation, StatusOperation::Finalize);
    assert_eq!(node.reboots().len(), 1, "{:?}", node.reboots());
    let (prio_b, tries_b, _) = node.disk.cgpt_prio(4);
    assert!(prio_b > node.disk.cgpt_prio(3).0 && tries_b == 1);

    // The agent restarts before the reboot: nothing is asked twice.
    agent.kill();
    let mut agent = Agent::start(&cp, &node);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(node.reboots().len(), 1, "{:?}", node.reboots());
    assert_eq!(status_of(&nodes).await.unwrap(), f);

    // The reboot, simulated: NotReady, the disk boots B, tandemd starts
    // again and its health checks pass; Ready.
    kubelet.set_ready(NODE, false).await;
    assert_eq!(node.reboot(["1.0.0", "2.0.0"]), "B");
    kubelet.set_ready(NODE, true).await;
    let c = wait_status(&nodes, "op-fin.commit", Code::Success, &agent_log).await;
    assert_eq!(c.operation, StatusOperation::Commit);
    assert_eq!(
        (c.from_version.as_deref(), c.to_version.as_deref()),
        (Some("1.0.0"), Some("2.0.0"))
    );
    assert!(node.disk.cgpt_prio(4).2, "B not marked good");
    eventually("the version label", WAIT, || async {
        (label_of(&nodes).await.as_deref() == Some("2.0.0")).then_some(())
    })
    .await;

    // A finalize for what is booted is AlreadyAtTarget; staging it too.
    ask(&nodes, &request("finalize", "op-fin-2", Some("2.0.0"))).await;
    wait_status(&nodes, "op-fin-2", Code::AlreadyAtTarget, &agent_log).await;
    assert_eq!(node.reboots().len(), 1);
    agent.kill();

    // The agent patched nothing but its status annotation and its label.
    let n = nodes.get(NODE).await.unwrap();
    let annotations: BTreeMap<String, String> = n.metadata.annotations.unwrap_or_default();
    let ours: Vec<&String> = annotations
        .keys()
        .filter(|k| k.starts_with("acl.azure.com/") || k.starts_with("tandem.dev/"))
        .collect();
    assert_eq!(ours, [REQUEST_ANNOTATION, STATUS_ANNOTATION]);
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() >= 6, "{seen:?}");
    for text in &seen {
        assert_conformant(text);
    }
    let codes: Vec<(String, Code)> = seen
        .iter()
        .map(|t| {
            let s: UpdateStatus = serde_json::from_str(t).unwrap();
            (s.operation_id, s.code)
        })
        .collect();
    // Each status must have been seen: a missing one is a failure, not a
    // `None` that compares below everything.
    let first = |id: &str, code| {
        codes
            .iter()
            .position(|c| c.0 == id && c.1 == code)
            .unwrap_or_else(|| panic!("no {id} {code:?} among {codes:?}"))
    };
    // Each operation went InProgress, then its outcome, in order.
    assert!(first("op-stage", Code::InProgress) < first("op-stage", Code::Success));
    assert!(first("op-stage", Code::Success) < first("op-fin", Code::InProgress));
    assert!(first("op-fin", Code::Success) < first("op-fin.commit", Code::Success));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_health_check_after_finalize_is_reported_reverted() {
    let cp = ControlPlane::start();
    let admin = cp.client("admin").await;
    grant_roles(
        &admin,
        &repo_root().join("deploy/agent.yaml"),
        "tandem:agents",
    )
    .await;
    let kubelet = Kubelet::new(admin.clone());
    kubelet.create_node(NODE, serde_json::json!({})).await;
    let rel = releases();
    let server = HttpServer::serve(&rel.www);
    rel.publish(1, vec![rel.release("2.0.0", false)], in_days(7), None);
    let mut node = TandemNode::new(&server, &rel);
    node.configure("60-kubernetes", "[reboot]\nstrategy = \"kubernetes\"\n");
    node.start();
    node.wait_health();
    let agent_log = node.dir.path().join("agent.log");
    let nodes: Api<Node> = Api::all(admin.clone());
    let _agent = Agent::start(&cp, &node);

    ask(&nodes, &request("stage", "s", Some("2.0.0"))).await;
    wait_status(&nodes, "s", Code::Success, &agent_log).await;
    ask(&nodes, &request("finalize", "f", Some("2.0.0"))).await;
    wait_status(&nodes, "f", Code::Success, &agent_log).await;
    // 2.0.0's health check fails on its first boot.
    node.health_script("50-fails", "echo kubelet did not come up; exit 1");
    assert_eq!(node.reboot(["1.0.0", "2.0.0"]), "B");
    let c = wait_status(&nodes, "f.commit", Code::RevertedToPrevious, &agent_log).await;
    assert!(c.message.contains("failed"), "{}", c.message);
    // tandemd rolled back by itself: B marked bad, A next, a reboot asked.
    assert_eq!(node.disk.cgpt_prio(4).0, 0);
    assert_eq!(node.reboots().len(), 2, "{:?}", node.reboots());
    // Back on A after the rollback's reboot: the commit stays as it was.
    std::fs::remove_file(node.root.join("etc/tandem/health.d/50-fails")).unwrap();
    assert_eq!(node.reboot(["1.0.0", "2.0.0"]), "A");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(status_of(&nodes).await.unwrap(), c);
}
