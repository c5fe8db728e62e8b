//! `cargo xtask fleet-bench`: tandem-operator (its release binary) rolling
//! a pool of simulated nodes on the real control plane. The nodes' agents,
//! kubelets and reboots are SIMULATED in this one process: the simulated
//! agent answers stage at once, and finalize with a reboot of a fixed
//! length (NotReady, then Ready at the target, its commit reported), failing
//! a given share of nodes (commit `RevertedToPrevious`).
//!
//! Prints: the time to roll the pool against the ideal (waves x the
//! simulated reboot), the operator's API requests per node and its peak
//! RSS; then a second pool at a 20% failure rate and where it halted.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::BTreeMap;

use futures_util::StreamExt;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use tandem_agent::protocol::{
    commit_id, parse_request, Code, RequestOperation, StatusOperation, UpdateStatus,
    REQUEST_ANNOTATION, SCHEMA_VERSION, STATUS_ANNOTATION, VERSION_LABEL,
};
use tandem_cluster_tests::{grant_roles, install_crds, repo_root, start_operator, ControlPlane};
use tandem_operator::crd::TandemPool;
use tandem_testkit::fleetlock::free_port;

struct Args {
    nodes: usize,
    reboot: Duration,
    failure_rate: f64,
    halt_nodes: usize,
}

fn args() -> Args {
    let mut a = Args {
        nodes: 1000,
        reboot: Duration::from_secs(5),
        failure_rate: 0.2,
        halt_nodes: 200,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let v = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--nodes" => a.nodes = v.parse().expect("--nodes N"),
            "--reboot-seconds" => a.reboot = Duration::from_secs(v.parse().expect("--reboot-seconds N")),
            "--failure-rate" => a.failure_rate = v.parse().expect("--failure-rate 0.2"),
            "--halt-nodes" => a.halt_nodes = v.parse().expect("--halt-nodes N"),
            other => panic!("unknown argument {other}; use --nodes, --reboot-seconds, --failure-rate, --halt-nodes"),
        }
    }
    a
}

fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .unwrap()
        .to_string()
}

/// A stable share of nodes fails: by a hash of the name.
fn fails(name: &str, rate: f64) -> bool {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % 10_000) as f64 / 10_000.0 < rate
}

fn status_for(
    req: &tandem_agent::protocol::UpdateRequest,
    op: StatusOperation,
    code: Code,
) -> String {
    serde_json::to_string(&UpdateStatus {
        schema_version: SCHEMA_VERSION.into(),
        node_update_id: req.node_update_id.clone(),
        operation_id: if op == StatusOperation::Commit {
            commit_id(&req.operation_id)
        } else {
            req.operation_id.clone()
        },
        operation: op,
        code,
        message: "simulated agent".into(),
        from_version: Some("1.0.0".into()),
        to_version: req.target_version.clone(),
        started_utc: now(),
        finished_utc: Some(now()),
    })
    .unwrap()
}

async fn set_ready(nodes: &Api<Node>, name: &str, ready: bool) {
    let t = now();
    let patch = serde_json::json!({"status": {"conditions": [{"type": "Ready",
        "status": if ready { "True" } else { "False" }, "reason": "Simulated",
        "lastHeartbeatTime": t, "lastTransitionTime": t}]}});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .unwrap();
}

/// The simulated agents, kubelets and reboots of every node, until the
/// pool is up to date or halted.
async fn simulate(
    nodes: Api<Node>,
    prefix: String,
    reboot: Duration,
    rate: f64,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut rebooting: BTreeMap<String, (Instant, tandem_agent::protocol::UpdateRequest)> =
        BTreeMap::new();
    let mut answered: BTreeMap<String, String> = BTreeMap::new();
    let mut answers = Vec::new();
    while !*stop.borrow() {
        let list = nodes.list(&ListParams::default()).await.unwrap();
        for n in list.items.iter().filter(|n| {
            n.metadata
                .name
                .as_ref()
                .is_some_and(|x| x.starts_with(&prefix))
        }) {
            let name = n.metadata.name.clone().unwrap();
            let Some(text) = n
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(REQUEST_ANNOTATION))
            else {
                continue;
            };
            if answered.get(&name) == Some(text) {
                continue;
            }
            let Ok(req) = parse_request(text) else {
                continue;
            };
            answered.insert(name.clone(), text.clone());
            if req.operation == RequestOperation::Finalize {
                rebooting.insert(name.clone(), (Instant::now() + reboot, req.clone()));
            }
            answers.push((name, req));
        }
        // Each simulated agent answers by itself: side by side.
        futures_util::stream::iter(answers.drain(..))
            .map(|(name, req)| {
                let nodes = nodes.clone();
                async move {
                    let op = match req.operation {
                        RequestOperation::Stage => StatusOperation::Stage,
                        _ => StatusOperation::Finalize,
                    };
                    let patch = serde_json::json!({"metadata": {"annotations": {
                        STATUS_ANNOTATION: status_for(&req, op, Code::Success)}}});
                    nodes
                        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .unwrap();
                    if req.operation == RequestOperation::Finalize {
                        set_ready(&nodes, &name, false).await;
                    }
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<()>>()
            .await;
        let due: Vec<String> = rebooting
            .iter()
            .filter(|(_, (at, _))| *at <= Instant::now())
            .map(|(n, _)| n.clone())
            .collect();
        let back: Vec<_> = due
            .into_iter()
            .map(|n| {
                let r = rebooting.remove(&n).unwrap().1;
                (n, r)
            })
            .collect();
        futures_util::stream::iter(back)
            .map(|(name, req)| {
                let nodes = nodes.clone();
                async move {
                    set_ready(&nodes, &name, true).await;
                    let failed = fails(&name, rate);
                    let code = if failed { Code::RevertedToPrevious } else { Code::Success };
                    let version = if failed { "1.0.0" } else { req.target_version.as_deref().unwrap_or("2.0.0") };
                    let patch = serde_json::json!({"metadata": {
                        "labels": {VERSION_LABEL: version},
                        "annotations": {STATUS_ANNOTATION: status_for(&req, StatusOperation::Commit, code)}}});
                    nodes.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<()>>()
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn create_nodes(nodes: &Api<Node>, prefix: &str, count: usize, pool: &str) {
    futures_util::stream::iter(0..count)
        .map(|i| async move {
            let name = format!("{prefix}{i:04}");
            let node: Node = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "labels": {"pool": pool, VERSION_LABEL: "1.0.0"}}}))
            .unwrap();
            nodes.create(&PostParams::default(), &node).await.unwrap();
            set_ready(nodes, &name, true).await;
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn scrape(port: u16) -> String {
    let out = std::process::Command::new("curl")
        .args(["-sf", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn operator_peak_rss_kib() -> u64 {
    // The operator is this process's only child named tandem-operator.
    let me = std::process::id().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let fields: Vec<&str> = stat.split_whitespace().collect();
        if fields.len() > 3 && fields[1].starts_with("(tandem-operat") && fields[3] == me {
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
            return status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0);
        }
    }
    0
}

async fn pool_condition(
    pools: &Api<TandemPool>,
    name: &str,
    type_: &str,
) -> Option<(String, String)> {
    let p = pools.get(name).await.ok()?;
    p.status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status, c.message))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    let cp = ControlPlane::start();
    let admin = cp.client("admin").await;
    grant_roles(
        &admin,
        &repo_root().join("deploy/operator.yaml"),
        "tandem:operators",
    )
    .await;
    install_crds(&admin, &repo_root().join("deploy/crd.yaml")).await;
    let nodes: Api<Node> = Api::all(admin.clone());
    let pools: Api<TandemPool> = Api::all(admin.clone());
    println!("fleet-bench: {} simulated nodes (agents, kubelets and reboots simulated in this process), reboot {:?}", a.nodes, a.reboot);
    create_nodes(&nodes, "n", a.nodes, "roll").await;
    let port = free_port();
    let mut op = start_operator(&cp, "bench", port);
    let (tx, rx) = tokio::sync::watch::channel(false);
    let sim = tokio::spawn(simulate(
        nodes.clone(),
        "n".into(),
        a.reboot,
        0.0,
        rx.clone(),
    ));
    let max_unavailable = (a.nodes / 10).max(1);
    let pool: TandemPool = serde_json::from_value(serde_json::json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "TandemPool", "metadata": {"name": "roll"},
        "spec": {"nodeSelector": {"pool": "roll"}, "targetVersion": "2.0.0", "maxUnavailable": "10%",
                 "canary": 1, "soak": "0s", "maxFailures": 2}}))
    .unwrap();
    let started = Instant::now();
    pools.create(&PostParams::default(), &pool).await.unwrap();
    let mut shown = Instant::now();
    loop {
        if pool_condition(&pools, "roll", "UpToDate")
            .await
            .is_some_and(|c| c.0 == "True")
        {
            break;
        }
        if shown.elapsed() >= Duration::from_secs(10) {
            shown = Instant::now();
            let c = pools
                .get("roll")
                .await
                .ok()
                .and_then(|p| p.status)
                .unwrap_or_default()
                .counts;
            println!(
                "  {:>4.0} s: {} of {} up to date, {} disrupted",
                started.elapsed().as_secs_f64(),
                c.up_to_date,
                c.total,
                c.disrupted
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "the roll took over 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let took = started.elapsed();
    let metrics = scrape(port);
    let rss = operator_peak_rss_kib();
    let requests = metric(&metrics, "tandem_operator_api_requests_total");
    let waves = 1 + (a.nodes - 1).div_ceil(max_unavailable);
    let ideal = a.reboot * waves as u32;
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| nodes | {} |", a.nodes);
    println!("| maxUnavailable (10%) | {max_unavailable} |");
    println!("| waves (1 canary + the rest) | {waves} |");
    println!("| ideal: waves x reboot | {:.1} s |", ideal.as_secs_f64());
    println!("| time to roll the pool | {:.1} s |", took.as_secs_f64());
    println!(
        "| roll / ideal | {:.2}x |",
        took.as_secs_f64() / ideal.as_secs_f64()
    );
    println!("| operator API requests | {requests} |");
    println!(
        "| API requests per node | {:.1} |",
        requests / a.nodes as f64
    );
    println!("| operator peak RSS | {:.1} MiB |", rss as f64 / 1024.0);
    op.kill();
    tx.send_replace(true);
    let _ = sim.await;

    // The halt: a fresh pool at the given failure rate.
    println!();
    println!(
        "fleet-bench: halt run, {} nodes, failure rate {:.0}%, maxFailures 2",
        a.halt_nodes,
        a.failure_rate * 100.0
    );
    create_nodes(&nodes, "h", a.halt_nodes, "halt").await;
    let port = free_port();
    let mut op = start_operator(&cp, "bench-halt", port);
    let (tx, rx) = tokio::sync::watch::channel(false);
    let sim = tokio::spawn(simulate(
        nodes.clone(),
        "h".into(),
        a.reboot,
        a.failure_rate,
        rx,
    ));
    let pool: TandemPool = serde_json::from_value(serde_json::json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "TandemPool", "metadata": {"name": "halt"},
        "spec": {"nodeSelector": {"pool": "halt"}, "targetVersion": "2.0.0", "maxUnavailable": "10%",
                 "canary": 1, "soak": "0s", "maxFailures": 2}}))
    .unwrap();
    let started = Instant::now();
    pools.create(&PostParams::default(), &pool).await.unwrap();
    let message = loop {
        if let Some((s, m)) = pool_condition(&pools, "halt", "Halted").await {
            if s == "True" {
                break m;
            }
        }
        if pool_condition(&pools, "halt", "UpToDate")
            .await
            .is_some_and(|c| c.0 == "True")
        {
            break "never halted: every node updated".into();
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "no halt in 15 minutes"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let halted_after = started.elapsed();
    // In-flight nodes finish; count what happened after they did.
    tokio::time::sleep(a.reboot * 2).await;
    let p = pools.get("halt").await.unwrap();
    let counts = p.status.clone().unwrap_or_default().counts;
    let failures = p.status.unwrap_or_default().failures.len();
    let started_nodes = nodes
        .list(&ListParams::default().labels("pool=halt"))
        .await
        .unwrap()
        .items
        .iter()
        .filter(|n| {
            n.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("tandem.dev/state"))
                .is_some_and(|s| {
                    [
                        "\"Draining\"",
                        "\"Finalizing\"",
                        "\"Rebooting\"",
                        "\"Soaking\"",
                        "\"Done\"",
                        "\"Failed\"",
                    ]
                    .iter()
                    .any(|p| s.contains(p))
                })
        })
        .count();
    println!();
    println!("| halt run | value |");
    println!("|---|---|");
    println!("| halted after | {:.1} s |", halted_after.as_secs_f64());
    println!("| Halted condition | {message} |");
    println!(
        "| nodes started (took a slot) | {started_nodes} of {} |",
        a.halt_nodes
    );
    println!("| failures recorded (in-flight nodes finish) | {failures} |");
    println!("| updated | {} |", counts.up_to_date);
    op.kill();
    tx.send_replace(true);
    let _ = sim.await;
}
