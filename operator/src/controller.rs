//! The controller: each round reads the pools and the Nodes (a quorum
//! list, never a cache that may lag its own writes), the pods of the nodes
//! being drained, asks [`crate::decide::decide`] and carries out the plan.
//! Only the Lease holder acts; the slot holders are the Nodes' own
//! records, so a restart or a new leader starts from what the API says.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, EvictParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, ResourceExt};
use serde_json::json;
use tandem_agent::protocol::{UpdateStatus, REQUEST_ANNOTATION, STATUS_ANNOTATION, VERSION_LABEL};

use crate::crd::{
    NodeState, TandemPool, CLEAR_HALT_ANNOTATION, QUARANTINE_LABEL, RETRY_ANNOTATION,
    STATE_ANNOTATION,
};
use crate::decide::{decide, NodeAction, NodeView, Plan, PoolView};

/// Nodes whose actions run at once in a round.
const PARALLEL: usize = 32;

/// Why a round failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("lost the lease {0}: another replica acts now")]
    LostLease(String),
}

fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ControlError {
    let what = what.into();
    move |source| ControlError::Api { what, source }
}

/// Counters for the metrics endpoint.
#[derive(Debug, Default)]
pub struct Counters {
    pub api_requests: AtomicU64,
    pub rounds: AtomicU64,
    pub evictions_refused: AtomicU64,
    /// The last round's text for `/metrics` (pool gauges).
    pub pools: std::sync::Mutex<String>,
}

impl Counters {
    fn request(&self) {
        self.api_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let pools = self.pools.lock().map(|p| p.clone()).unwrap_or_default();
        format!(
            "# HELP tandem_operator_api_requests_total Requests this operator sent to the API server.\n\
             # TYPE tandem_operator_api_requests_total counter\n\
             tandem_operator_api_requests_total {}\n\
             # HELP tandem_operator_rounds_total Decision rounds run as leader.\n\
             # TYPE tandem_operator_rounds_total counter\n\
             tandem_operator_rounds_total {}\n\
             # HELP tandem_operator_evictions_refused_total Evictions refused (a PodDisruptionBudget's 429), waited on.\n\
             # TYPE tandem_operator_evictions_refused_total counter\n\
             tandem_operator_evictions_refused_total {}\n{pools}",
            self.api_requests.load(Ordering::Relaxed),
            self.rounds.load(Ordering::Relaxed),
            self.evictions_refused.load(Ordering::Relaxed),
        )
    }
}

fn pool_metrics(name: &str, plan: &Plan) -> String {
    let c = &plan.status.counts;
    let halted = plan
        .status
        .conditions
        .iter()
        .any(|x| x.type_ == "Halted" && x.status == "True");
    let mut out = String::new();
    for (state, n) in [
        ("up-to-date", c.up_to_date),
        ("pending", c.pending),
        ("staging", c.staging),
        ("staged", c.staged),
        ("disrupted", c.disrupted),
        ("failed", c.failed),
    ] {
        out.push_str(&format!(
            "tandem_operator_nodes{{pool=\"{name}\",state=\"{state}\"}} {n}\n"
        ));
    }
    out.push_str(&format!(
        "tandem_operator_pool_halted{{pool=\"{name}\"}} {}\n",
        u8::from(halted)
    ));
    out
}

/// A Lease held for leader election (`coordination.k8s.io/v1`).
#[derive(Debug)]
pub struct Leader {
    leases: Api<Lease>,
    name: String,
    pub identity: String,
    duration: Duration,
}

fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

impl Leader {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Leader {
        Leader {
            leases: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    /// Takes or renews the lease; `Ok(false)` while another holder's lease
    /// is still valid.
    pub async fn try_hold(&self, counters: &Counters) -> Result<bool, ControlError> {
        counters.request();
        let current = self
            .leases
            .get_opt(&self.name)
            .await
            .map_err(api(format!("reading lease {}", self.name)))?;
        let seconds = i32::try_from(self.duration.as_secs()).unwrap_or(15);
        let Some(mut lease) = current else {
            let lease: Lease = serde_json::from_value(json!({
                "metadata": {"name": self.name},
                "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": seconds,
                         "acquireTime": now_micro(), "renewTime": now_micro(), "leaseTransitions": 0},
            }))
            .map_err(|e| ControlError::LostLease(e.to_string()))?;
            counters.request();
            return match self.leases.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(api("creating the lease")(e)),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let expired = spec.renew_time.as_ref().is_none_or(|t| {
            let age = k8s_openapi::jiff::Timestamp::now().duration_since(t.0);
            age.as_secs() > i64::from(spec.lease_duration_seconds.unwrap_or(seconds))
        });
        if !ours && !expired {
            return Ok(false);
        }
        if !ours {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(now_micro());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(now_micro());
        counters.request();
        // The resourceVersion read above makes this a compare-and-swap:
        // of two replicas racing, one gets a 409.
        match self
            .leases
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(api("renewing the lease")(e)),
        }
    }
}

/// The controller's handles.
pub struct Controller {
    pub client: Client,
    pub pools: Api<TandemPool>,
    pub nodes: Api<Node>,
    pub recorder: Recorder,
    pub counters: Arc<Counters>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").finish_non_exhaustive()
    }
}

/// Pods a drain must see gone: not owned by a DaemonSet, not mirror pods,
/// not finished.
fn must_leave(p: &Pod) -> bool {
    let daemon = p
        .metadata
        .owner_references
        .as_ref()
        .is_some_and(|o| o.iter().any(|r| r.kind == "DaemonSet"));
    let mirror = p
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"));
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    let finished = matches!(phase, Some("Succeeded" | "Failed"));
    !daemon && !mirror && !finished
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn node_view(n: &Node) -> NodeView {
    let annotations = n.metadata.annotations.clone().unwrap_or_default();
    NodeView {
        name: n.name_any(),
        labels: n.metadata.labels.clone().unwrap_or_default(),
        ready: n
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
        unschedulable: n
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false),
        state: annotations
            .get(STATE_ANNOTATION)
            .and_then(|s| serde_json::from_str::<NodeState>(s).ok()),
        agent: annotations
            .get(STATUS_ANNOTATION)
            .and_then(|s| serde_json::from_str::<UpdateStatus>(s).ok()),
        booted_version: n
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(VERSION_LABEL))
            .cloned(),
        pods_left: 0,
        gated_pods_ready: true,
        retry: annotations.contains_key(RETRY_ANNOTATION),
    }
}

impl Controller {
    pub fn new(client: Client, identity: &str, counters: Arc<Counters>) -> Controller {
        let reporter = Reporter {
            controller: "tandem-operator".into(),
            instance: Some(identity.into()),
        };
        Controller {
            pools: Api::all(client.clone()),
            nodes: Api::all(client.clone()),
            recorder: Recorder::new(client.clone(), reporter),
            client,
            counters,
        }
    }

    async fn pods_on(&self, node: &str) -> Result<Vec<Pod>, ControlError> {
        let pods: Api<Pod> = Api::all(self.client.clone());
        self.counters.request();
        Ok(pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .map_err(api(format!("listing the pods of {node}")))?
            .items)
    }

    /// One round over every pool.
    pub async fn round(&self) -> Result<(), ControlError> {
        self.counters.rounds.fetch_add(1, Ordering::Relaxed);
        self.counters.request();
        let pools = self
            .pools
            .list(&ListParams::default())
            .await
            .map_err(api("listing TandemPools"))?;
        if pools.items.is_empty() {
            return Ok(());
        }
        self.counters.request();
        let nodes = self
            .nodes
            .list(&ListParams::default())
            .await
            .map_err(api("listing Nodes"))?;
        let mut metrics = String::new();
        for pool in &pools.items {
            let plan = self.pool_round(pool, &nodes.items).await?;
            metrics.push_str(&pool_metrics(&pool.name_any(), &plan));
        }
        if let Ok(mut m) = self.counters.pools.lock() {
            *m = metrics;
        }
        Ok(())
    }

    async fn pool_round(&self, pool: &TandemPool, nodes: &[Node]) -> Result<Plan, ControlError> {
        let name = pool.name_any();
        let mut views: Vec<NodeView> = nodes.iter().map(node_view).collect();
        let gate = &pool.spec.health.pod_selector;
        use crate::crd::Phase;
        let wanted: Vec<usize> = views
            .iter()
            .enumerate()
            .filter(|(_, v)| {
                v.state
                    .as_ref()
                    .filter(|s| s.pool == name)
                    .is_some_and(|s| {
                        s.phase == Phase::Draining
                            || (!gate.is_empty()
                                && matches!(s.phase, Phase::Rebooting | Phase::Soaking))
                    })
            })
            .map(|(i, _)| i)
            .collect();
        let listed: Vec<(usize, Result<Vec<Pod>, ControlError>)> =
            futures_util::stream::iter(wanted)
                .map(|i| {
                    let node = views[i].name.clone();
                    async move { (i, self.pods_on(&node).await) }
                })
                .buffer_unordered(PARALLEL)
                .collect()
                .await;
        for (i, pods) in listed {
            let pods = pods?;
            let v = &mut views[i];
            v.pods_left = pods.iter().filter(|p| must_leave(p)).count();
            let gated: Vec<&Pod> = pods
                .iter()
                .filter(|p| {
                    let labels = p.metadata.labels.clone().unwrap_or_default();
                    gate.iter().all(|(k, val)| labels.get(k) == Some(val))
                })
                .collect();
            v.gated_pods_ready =
                gate.is_empty() || (!gated.is_empty() && gated.iter().all(|p| pod_ready(p)));
        }
        let view = PoolView {
            name: name.clone(),
            spec: pool.spec.clone(),
            status: pool.status.clone().unwrap_or_default(),
            clear_halt: pool.annotations().contains_key(CLEAR_HALT_ANNOTATION),
        };
        let plan = decide(&view, &views, jiff::Timestamp::now());
        let by_name: BTreeMap<String, &Node> = nodes.iter().map(|n| (n.name_any(), n)).collect();
        // Nodes are independent: their actions run side by side (each
        // node's in order), so a wave of a hundred nodes is one round.
        let results: Vec<Result<(), ControlError>> = futures_util::stream::iter(&plan.actions)
            .map(|(node, actions)| self.carry_out(node, actions, pool))
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>, _>>()?;
        let events = futures_util::stream::iter(&plan.events)
            .map(|e| self.note(e, &name, by_name.get(&e.node).copied()))
            .buffer_unordered(PARALLEL);
        events.collect::<Vec<()>>().await;
        let mut status = plan.status.clone();
        status.observed_generation = pool.metadata.generation;
        if pool.status.as_ref() != Some(&status) {
            self.counters.request();
            self.pools
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"status": status})),
                )
                .await
                .map_err(api(format!("writing the status of {name}")))?;
        }
        if plan.halt_cleared {
            self.counters.request();
            self.pools
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(
                        &json!({"metadata": {"annotations": {CLEAR_HALT_ANNOTATION: null}}}),
                    ),
                )
                .await
                .map_err(api(format!("removing {CLEAR_HALT_ANNOTATION} from {name}")))?;
        }
        Ok(plan)
    }

    /// A Kubernetes Event on the node, and the same line in the log.
    async fn note(&self, e: &crate::decide::EventNote, pool: &str, node: Option<&Node>) {
        tracing::info!("{pool}/{}: {}: {}", e.node, e.reason, e.message);
        let Some(n) = node else { return };
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(e.node.clone()),
            uid: n.metadata.uid.clone(),
            ..ObjectReference::default()
        };
        self.counters.request();
        let event = Event {
            type_: if e.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: e.reason.clone(),
            note: Some(format!("pool {pool}: {}", e.message)),
            action: e.reason.clone(),
            secondary: None,
        };
        if let Err(err) = self.recorder.publish(&event, &reference).await {
            tracing::warn!("event for {}: {err}", e.node);
        }
    }

    async fn patch_node(&self, node: &str, patch: serde_json::Value) -> Result<(), ControlError> {
        self.counters.request();
        self.nodes
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(api(format!("patching node {node}")))?;
        Ok(())
    }

    /// A node's actions in order; a record and the request after it go in
    /// one patch, so a request is never written without its record.
    async fn carry_out(
        &self,
        node: &str,
        actions: &[NodeAction],
        pool: &TandemPool,
    ) -> Result<(), ControlError> {
        let mut i = 0;
        while i < actions.len() {
            match &actions[i] {
                NodeAction::Record(state) => {
                    let text = serde_json::to_string(state).unwrap_or_default();
                    let mut annotations = json!({STATE_ANNOTATION: text});
                    if let Some(NodeAction::Request(r)) = actions.get(i + 1) {
                        annotations[REQUEST_ANNOTATION] = json!(r);
                        i += 1;
                    }
                    self.patch_node(node, json!({"metadata": {"annotations": annotations}}))
                        .await?;
                }
                NodeAction::Request(r) => {
                    self.patch_node(
                        node,
                        json!({"metadata": {"annotations": {REQUEST_ANNOTATION: r}}}),
                    )
                    .await?;
                }
                NodeAction::Cordon => {
                    self.patch_node(node, json!({"spec": {"unschedulable": true}}))
                        .await?;
                }
                NodeAction::Uncordon => {
                    self.patch_node(node, json!({"spec": {"unschedulable": null}}))
                        .await?;
                }
                NodeAction::Quarantine => {
                    self.patch_node(
                        node,
                        json!({"metadata": {"labels": {QUARANTINE_LABEL: "true"}}}),
                    )
                    .await?;
                }
                NodeAction::Forget => {
                    self.patch_node(
                        node,
                        json!({"metadata": {"annotations": {STATE_ANNOTATION: null, RETRY_ANNOTATION: null}}}),
                    )
                    .await?;
                }
                NodeAction::Evict => self.evict(node, pool).await?,
            }
            i += 1;
        }
        Ok(())
    }

    /// Asks the Eviction API to evict every pod that must leave. A refusal
    /// (429: a PodDisruptionBudget) is waited on, never forced; the drain's
    /// timeout is the record's.
    async fn evict(&self, node: &str, pool: &TandemPool) -> Result<(), ControlError> {
        let mut params = EvictParams::default();
        if let Some(g) = pool.spec.drain.grace_period_seconds {
            params.delete_options = Some(
                kube::api::DeleteParams::default()
                    .grace_period(u32::try_from(g.max(0)).unwrap_or(0)),
            );
        }
        for p in self.pods_on(node).await? {
            if !must_leave(&p) || p.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let ns = p.namespace().unwrap_or_default();
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            self.counters.request();
            let asked =
                tokio::time::timeout(Duration::from_secs(10), pods.evict(&p.name_any(), &params))
                    .await;
            let Ok(asked) = asked else {
                tracing::warn!(
                    "{node}: the eviction of {ns}/{} did not answer in 10 s",
                    p.name_any()
                );
                continue;
            };
            match asked {
                Ok(_) => tracing::info!("{node}: evicted {ns}/{}", p.name_any()),
                Err(kube::Error::Api(s)) if s.code == 429 => {
                    self.counters
                        .evictions_refused
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        "{node}: eviction of {ns}/{} refused for now: {}",
                        p.name_any(),
                        s.message
                    );
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(api(format!("evicting {ns}/{}", p.name_any()))(e)),
            }
        }
        Ok(())
    }
}

/// Serves `/metrics` on `addr` until the process ends.
pub async fn serve_metrics(
    addr: std::net::SocketAddr,
    counters: Arc<Counters>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(addr).await?;
    loop {
        let (mut sock, _) = listener.accept().await?;
        let counters = counters.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = sock.read(&mut buf).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]);
            let (code, body) = if head.starts_with("GET /metrics") {
                ("200 OK", counters.render())
            } else if head.starts_with("GET /healthz") {
                ("200 OK", "ok\n".to_owned())
            } else {
                ("404 Not Found", "not found\n".to_owned())
            };
            let reply = format!(
                "HTTP/1.1 {code}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(reply.as_bytes()).await;
        });
    }
}
