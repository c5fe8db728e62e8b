//! `tandem-operator`: the TandemPool controller (`run`), and the CRD it
//! serves (`crd`, the source of `deploy/crd.yaml`).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kube::CustomResourceExt;
use tandem_operator::controller::{serve_metrics, Controller, Counters, Leader};
use tandem_operator::crd::TandemPool;

#[derive(Debug, Parser)]
#[command(
    name = "tandem-operator",
    version,
    about = "Roll node pools to a tandem version, a few nodes at a time"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller (KUBECONFIG, or the in-cluster service account).
    Run {
        /// Namespace of the leader-election Lease.
        #[arg(long, env = "POD_NAMESPACE", default_value = "tandem-system")]
        namespace: String,
        /// This replica's name in the Lease (default: host name and pid).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Where `/metrics` (Prometheus text) and `/healthz` are served.
        #[arg(long, default_value = "0.0.0.0:9464")]
        metrics_addr: std::net::SocketAddr,
        /// Time between decision rounds, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// How long a Lease holds without renewal, in seconds.
        #[arg(long, default_value_t = 15)]
        lease_seconds: u64,
    },
    /// Print the TandemPool CustomResourceDefinition (YAML).
    Crd,
}

fn identity(given: Option<String>) -> String {
    given.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    })
}

async fn run(
    namespace: String,
    identity: String,
    metrics: std::net::SocketAddr,
    interval: Duration,
    lease: Duration,
) -> Result<()> {
    let mut config = kube::Config::infer()
        .await
        .context("finding the Kubernetes API (KUBECONFIG or the in-cluster service account)")?;
    // kube retries a 429 by itself; a PodDisruptionBudget's refusal of an
    // eviction is a 429 that the drain must see (and wait on within its
    // own timeout), not one to retry inside a call.
    config.default_retry = false;
    let client = kube::Client::try_from(config).context("connecting to the Kubernetes API")?;
    let counters = Arc::new(Counters::default());
    tokio::spawn({
        let counters = counters.clone();
        async move {
            if let Err(e) = serve_metrics(metrics, counters).await {
                tracing::error!("metrics on {metrics}: {e}");
            }
        }
    });
    let leader = Leader::new(
        client.clone(),
        &namespace,
        "tandem-operator",
        &identity,
        lease,
    );
    let controller = Controller::new(client, &identity, counters.clone());
    let mut leading = false;
    loop {
        let started = Instant::now();
        match leader.try_hold(&counters).await {
            Ok(true) => {
                if !leading {
                    tracing::info!(
                        "{identity} holds the lease {namespace}/tandem-operator; acting"
                    );
                    leading = true;
                }
                if let Err(e) = controller.round().await {
                    tracing::warn!("{e}");
                }
                // A round longer than the lease may overlap a new leader:
                // stop rather than act on.
                if started.elapsed() >= lease {
                    anyhow::bail!(
                        "a round took {:?}, longer than the lease; stopping",
                        started.elapsed()
                    );
                }
            }
            Ok(false) => {
                if leading {
                    anyhow::bail!("lost the lease {namespace}/tandem-operator to another replica");
                }
            }
            Err(e) => {
                tracing::warn!("{e}");
                if leading {
                    anyhow::bail!("cannot renew the lease: {e}");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd => serde_yaml::to_string(&TandemPool::crd())
            .context("encoding the CRD")
            .map(|y| print!("{y}")),
        Command::Run {
            namespace,
            identity: id,
            metrics_addr,
            interval_ms,
            lease_seconds,
        } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")
            .and_then(|rt| {
                rt.block_on(run(
                    namespace,
                    identity(id),
                    metrics_addr,
                    Duration::from_millis(interval_ms.max(50)),
                    Duration::from_secs(lease_seconds.max(3)),
                ))
            }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem-operator: {e:#}");
            ExitCode::FAILURE
        }
    }
}
