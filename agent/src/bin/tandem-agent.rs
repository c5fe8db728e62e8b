//! `tandem-agent`: watches its own Node and answers the update requests
//! in its annotations through tandemd. See the crate docs.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use tandem_agent::decide::{decide, Action, Step, Tandem};
use tandem_agent::protocol::{
    version_label, Code, UpdateStatus, REQUEST_ANNOTATION, STATUS_ANNOTATION, VERSION_LABEL,
};
use tandem_agent::tandemd::{self, CallError};

#[derive(Debug, Parser)]
#[command(
    name = "tandem-agent",
    version,
    about = "Bridge tandemd and this node's update annotations"
)]
struct Args {
    /// This node's name (the Node object watched and patched).
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// How often tandemd is asked for its status, in seconds.
    #[arg(long, default_value_t = 2)]
    poll_seconds: u64,
}

/// The node's annotations and labels that the agent reads.
#[derive(Debug, Default)]
struct Seen {
    request: Option<String>,
    status: Option<UpdateStatus>,
    label: Option<String>,
}

fn seen(node: &Node) -> Seen {
    let annotations = node.metadata.annotations.as_ref();
    let get = |k: &str| annotations.and_then(|a| a.get(k)).cloned();
    Seen {
        request: get(REQUEST_ANNOTATION),
        // A status this agent cannot read is treated as none: the request
        // is then answered afresh.
        status: get(STATUS_ANNOTATION).and_then(|s| serde_json::from_str(&s).ok()),
        label: node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(VERSION_LABEL))
            .cloned(),
    }
}

fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

struct Agent {
    nodes: Api<Node>,
    name: String,
    poll: Duration,
}

impl Agent {
    /// Patches only this agent's own annotation.
    async fn report(&self, status: &UpdateStatus) -> Result<()> {
        let text = serde_json::to_string(status).context("encoding the status")?;
        let patch = serde_json::json!({"metadata": {"annotations": {STATUS_ANNOTATION: text}}});
        self.nodes
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("patching node {}'s {STATUS_ANNOTATION}", self.name))?;
        tracing::info!(
            "{} {} {:?}: {}",
            tandem_agent::protocol::op_name(status.operation),
            status.operation_id,
            status.code,
            status.message
        );
        Ok(())
    }

    /// Reports until the API server takes it: a final status must not be
    /// lost, or the operation would look unfinished.
    async fn report_surely(&self, status: &UpdateStatus) {
        let mut wait = Duration::from_millis(500);
        while let Err(e) = self.report(status).await {
            tracing::warn!("{e:#}; trying again in {wait:?}");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(30));
        }
    }

    async fn label(&self, version: &str) -> Result<()> {
        let patch =
            serde_json::json!({"metadata": {"labels": {VERSION_LABEL: version_label(version)}}});
        self.nodes
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("labelling node {}", self.name))?;
        Ok(())
    }

    /// One round over a fresh read of the node and of tandemd: the step
    /// `decide` gives. Returns whether something is still awaited.
    async fn round(&self, tandem: &Tandem) -> Result<bool> {
        // A quorum read, never a watch event: a queued event can be older
        // than what this agent wrote last, and deciding on it could run an
        // operation a second time.
        let node = self
            .nodes
            .get(&self.name)
            .await
            .with_context(|| format!("reading node {}", self.name))?;
        let seen = seen(&node);
        if let Some(v) = &tandem.booted_version {
            if seen.label.as_deref() != Some(version_label(v).as_str()) {
                self.label(v).await?;
            }
        }
        match decide(
            seen.request.as_deref(),
            seen.status.as_ref(),
            tandem,
            &now(),
        ) {
            Step::Idle => Ok(false),
            Step::Wait(what) => {
                tracing::debug!("waiting for {what}");
                Ok(true)
            }
            Step::Report(status) => self.report(&status).await.map(|()| true),
            Step::Run(status, action) => {
                // Recorded before it runs: a restart sees it and never
                // runs a finalize twice.
                self.report(&status).await?;
                let result = match &action {
                    Action::Stage(v) => tandemd::stage(v, self.poll).await,
                    Action::Finalize => tandemd::finalize().await,
                    Action::Rollback => tandemd::rollback().await,
                };
                let (code, message) = match result {
                    Ok(m) => (Code::Success, m),
                    Err(CallError::Failed(m)) => (Code::OperationFailed, m),
                    Err(e @ (CallError::Unreachable(_) | CallError::Busy(_))) => {
                        // Left in progress: the next rounds find out from
                        // tandemd what became of it.
                        tracing::warn!("{e}; looking again");
                        return Ok(true);
                    }
                };
                let done = UpdateStatus {
                    code,
                    message,
                    finished_utc: Some(now()),
                    ..status
                };
                self.report_surely(&done).await;
                Ok(true)
            }
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let client = kube::Client::try_default().await.context(
        "connecting to the Kubernetes API (KUBECONFIG or the in-cluster service account)",
    )?;
    let agent = Agent {
        nodes: Api::all(client),
        name: args.node.clone(),
        poll: Duration::from_secs(args.poll_seconds.max(1)),
    };
    // Only this node: the API server filters by field selector, and the
    // watcher reconnects (with backoff) after any error.
    let config = watcher::Config::default().fields(&format!("metadata.name={}", args.node));
    let mut events = watcher(agent.nodes.clone(), config)
        .default_backoff()
        .applied_objects()
        .boxed();
    let mut tick = tokio::time::interval(agent.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!("watching node {}", args.node);
    // The node is read again when it changed (a watch event), when
    // tandemd's state changed, or while a step is awaited; an idle node
    // costs the API server nothing but the watch.
    let mut dirty = true;
    let mut last: Option<Tandem> = None;
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(_)) => dirty = true,
                Some(Err(e)) => tracing::warn!("watching node {}: {e}", args.node),
                None => anyhow::bail!("the watch of node {} ended", args.node),
            },
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        let tandem = match tandemd::status().await {
            Ok(doc) => Tandem::from_status(&doc),
            Err(e) => {
                tracing::debug!("{e}");
                continue;
            }
        };
        if last.as_ref() != Some(&tandem) {
            dirty = true;
        }
        last = Some(tandem.clone());
        if !dirty {
            continue;
        }
        dirty = match agent.round(&tandem).await {
            Ok(awaited) => awaited,
            Err(e) => {
                tracing::warn!("{e:#}");
                true
            }
        };
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .init();
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tandem-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
