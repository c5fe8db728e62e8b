//! `tandemd`: the update engine behind `org.tandem.Update1` on the system
//! bus. Methods that change anything are for root only (the bus policy in
//! `systemd-units/` says so, and the daemon checks the caller's uid too);
//! anyone may read the status and history.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tokio::sync::watch;
use updater::api::{Status, UpdateRequest, Wanted};
use updater::cli::tandemd::{Args, LogTarget};
use updater::config::{self, AutoMode};
use updater::engine::{Engine, EngineError};
use updater::health::UnitProbe;
use updater::notify::notify;
use updater::reboot::{CommandRebooter, Rebooter};
use zbus::fdo;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::ObjectPath;

struct Update1 {
    engine: Arc<Engine>,
    /// The reboot action, for `Finalize` with a reboot.
    rebooter: Arc<dyn Rebooter>,
    /// Wakes the reboot strategy after something was staged.
    wake: Arc<tokio::sync::Notify>,
}

fn failed(e: EngineError) -> fdo::Error {
    match e {
        EngineError::Busy(_) => fdo::Error::LimitsExceeded(e.to_string()),
        e => fdo::Error::Failed(e.to_string()),
    }
}

/// Runs a blocking engine call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> fdo::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| fdo::Error::Failed(e.to_string()))?
        .map_err(failed)
}

/// Units' states, asked of systemd (`org.freedesktop.systemd1`) on the
/// system bus, from the engine's blocking threads.
struct SystemdUnits {
    runtime: tokio::runtime::Handle,
}

/// A proxy for a system service's object, on a new system bus connection.
async fn system_proxy(
    destination: &'static str,
    path: ObjectPath<'static>,
    interface: &'static str,
) -> Result<zbus::Proxy<'static>, String> {
    let conn = zbus::Connection::system()
        .await
        .map_err(|e| format!("the system bus: {e}"))?;
    zbus::Proxy::new(&conn, destination, path, interface)
        .await
        .map_err(|e| format!("{destination}: {e}"))
}

impl UnitProbe for SystemdUnits {
    fn active_state(&self, unit: &str) -> Result<String, String> {
        self.runtime.block_on(async {
            let manager = system_proxy(
                "org.freedesktop.systemd1",
                ObjectPath::from_static_str_unchecked("/org/freedesktop/systemd1"),
                "org.freedesktop.systemd1.Manager",
            )
            .await?;
            let path: zbus::zvariant::OwnedObjectPath = manager
                .call("LoadUnit", &(unit,))
                .await
                .map_err(|e| format!("systemd LoadUnit: {e}"))?;
            let unit = system_proxy(
                "org.freedesktop.systemd1",
                path.into_inner(),
                "org.freedesktop.systemd1.Unit",
            )
            .await?;
            unit.get_property::<String>("ActiveState")
                .await
                .map_err(|e| format!("systemd ActiveState: {e}"))
        })
    }
}

/// Reboots through logind (`RebootWithFlags` with
/// `SD_LOGIND_ROOT_CHECK_INHIBITORS`), refusing while a shutdown inhibitor
/// blocks, as `systemctl reboot --check-inhibitors=yes` does.
struct LogindRebooter {
    runtime: tokio::runtime::Handle,
}

const SD_LOGIND_ROOT_CHECK_INHIBITORS: u64 = 1;

impl Rebooter for LogindRebooter {
    fn reboot(&self, why: &str) -> Result<(), String> {
        tracing::info!("asking logind to reboot: {why}");
        self.runtime.block_on(async {
            let logind = system_proxy(
                "org.freedesktop.login1",
                ObjectPath::from_static_str_unchecked("/org/freedesktop/login1"),
                "org.freedesktop.login1.Manager",
            )
            .await?;
            let inhibitors: Vec<(String, String, String, String, u32, u32)> = logind
                .call("ListInhibitors", &())
                .await
                .map_err(|e| format!("logind ListInhibitors: {e}"))?;
            if let Some((_, who, why, ..)) = inhibitors.iter().find(|(what, _, _, mode, ..)| {
                what.split(':').any(|w| w == "shutdown") && mode == "block"
            }) {
                return Err(format!("a shutdown inhibitor blocks it: {who} ({why})"));
            }
            logind
                .call::<_, _, ()>("RebootWithFlags", &(SD_LOGIND_ROOT_CHECK_INHIBITORS,))
                .await
                .map_err(|e| format!("logind RebootWithFlags: {e}"))
        })
    }
}

fn rebooter(config: &config::Config) -> Arc<dyn Rebooter> {
    if config.reboot.command.is_empty() {
        Arc::new(LogindRebooter {
            runtime: tokio::runtime::Handle::current(),
        })
    } else {
        Arc::new(CommandRebooter {
            command: config.reboot.command.clone(),
        })
    }
}

/// Only root may change anything, whatever the bus policy lets through.
async fn require_root(conn: &zbus::Connection, header: &Header<'_>) -> fdo::Result<()> {
    let sender = header
        .sender()
        .ok_or_else(|| fdo::Error::AccessDenied("message without a sender".into()))?;
    let proxy = fdo::DBusProxy::new(conn).await?;
    let uid = proxy
        .get_connection_unix_user(zbus::names::BusName::Unique(sender.to_owned()))
        .await?;
    if uid != 0 {
        return Err(fdo::Error::AccessDenied(format!(
            "uid {uid} may read the status; changing it needs root"
        )));
    }
    Ok(())
}

impl Update1 {
    /// Starts an update (`Apply`, or `Stage` with `stage_only`) in the
    /// background; returns its operation id.
    fn start_update(
        &self,
        version: String,
        payload: String,
        allow_downgrade: bool,
        stage_only: bool,
    ) -> fdo::Result<u64> {
        let wanted = match (version.is_empty(), payload.is_empty()) {
            (true, true) => Wanted::Latest,
            (false, true) => Wanted::Version(version),
            (true, false) => Wanted::Payload(payload),
            (false, false) => {
                return Err(fdo::Error::InvalidArgs(
                    "give a version or a payload, not both".into(),
                ))
            }
        };
        let ticket = self.engine.begin("update").map_err(failed)?;
        let id = ticket.id;
        let engine = self.engine.clone();
        let request = UpdateRequest {
            wanted,
            allow_downgrade,
            stage_only,
        };
        let wake = self.wake.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = engine.update_with(ticket, &request) {
                tracing::error!("update failed: {e}");
            }
            wake.notify_one();
        });
        Ok(id)
    }
}

#[zbus::interface(name = "org.tandem.Update1")]
impl Update1 {
    /// Checks the index; returns the check report (JSON).
    async fn check(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> fdo::Result<String> {
        require_root(conn, &header).await?;
        let engine = self.engine.clone();
        let report = tokio::task::spawn_blocking(move || engine.check())
            .await
            .map_err(|e| fdo::Error::Failed(e.to_string()))?
            .map_err(failed)?;
        serde_json::to_string(&report).map_err(|e| fdo::Error::Failed(e.to_string()))
    }

    /// Starts an update (stage, then finalize): `version` empty for the
    /// newest, or a version; `payload` a URL or absolute path to install
    /// without an index. Returns the operation id that `last_result` will
    /// carry.
    async fn apply(
        &self,
        version: String,
        payload: String,
        allow_downgrade: bool,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> fdo::Result<u64> {
        require_root(conn, &header).await?;
        self.start_update(version, payload, allow_downgrade, false)
    }

    /// Starts a stage: as `Apply`, but the slot is not set to boot (an
    /// unplanned reboot still boots the running image) until `Finalize`.
    async fn stage(
        &self,
        version: String,
        payload: String,
        allow_downgrade: bool,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> fdo::Result<u64> {
        require_root(conn, &header).await?;
        self.start_update(version, payload, allow_downgrade, true)
    }

    /// Reads the staged slot back, sets it to boot next and, with `reboot`,
    /// reboots at once through the reboot action (else the reboot strategy
    /// applies). Returns what was done.
    async fn finalize(
        &self,
        reboot: bool,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> fdo::Result<String> {
        require_root(conn, &header).await?;
        let engine = self.engine.clone();
        let rebooter = self.rebooter.clone();
        let message =
            blocking(move || engine.finalize(reboot.then_some(rebooter.as_ref()))).await?;
        self.wake.notify_one();
        Ok(message)
    }

    /// Boots the other slot next when it is good (`updatectl rollback`);
    /// the reboot strategy applies. Returns what was done.
    async fn rollback(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> fdo::Result<String> {
        require_root(conn, &header).await?;
        let engine = self.engine.clone();
        let message = blocking(move || engine.rollback()).await?;
        self.wake.notify_one();
        Ok(message)
    }

    /// Marks the booted slot good by hand.
    async fn mark_good(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> fdo::Result<String> {
        require_root(conn, &header).await?;
        let engine = self.engine.clone();
        blocking(move || engine.mark_booted(true)).await
    }

    /// Marks the booted slot bad by hand: the other boots next (no reboot).
    async fn mark_bad(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> fdo::Result<String> {
        require_root(conn, &header).await?;
        let engine = self.engine.clone();
        blocking(move || engine.mark_booted(false)).await
    }

    /// The metrics in Prometheus' text format.
    async fn get_metrics(&self) -> String {
        self.engine.metrics()
    }

    /// Stops the operation under way; returns whether there was one.
    async fn cancel(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> fdo::Result<bool> {
        require_root(conn, &header).await?;
        Ok(self.engine.cancel())
    }

    /// The status document (JSON, `format_version` 1).
    async fn get_status(&self) -> fdo::Result<String> {
        serde_json::to_string(&self.engine.status()).map_err(|e| fdo::Error::Failed(e.to_string()))
    }

    /// The history, oldest first (JSON).
    async fn get_history(&self) -> fdo::Result<String> {
        let events = self.engine.history().map_err(failed)?;
        serde_json::to_string(&events).map_err(|e| fdo::Error::Failed(e.to_string()))
    }

    #[zbus(property)]
    async fn state(&self) -> String {
        self.engine.status().state.as_str().to_owned()
    }

    /// Fraction of the slot written, 0 to 1; 0 when nothing is under way.
    #[zbus(property)]
    async fn progress(&self) -> f64 {
        self.engine
            .status()
            .progress
            .as_ref()
            .map_or(0.0, |p| p.fraction)
    }

    #[zbus(property)]
    async fn booted_version(&self) -> String {
        self.engine
            .status()
            .booted_version
            .clone()
            .unwrap_or_default()
    }

    #[zbus(property)]
    async fn staged_version(&self) -> String {
        self.engine
            .status()
            .staged
            .as_ref()
            .map(|s| s.version.clone())
            .unwrap_or_default()
    }

    /// When the index was last checked (RFC 3339), empty if never.
    #[zbus(property)]
    async fn last_check(&self) -> String {
        self.engine
            .status()
            .last_check
            .as_ref()
            .map(|c| c.time.clone())
            .unwrap_or_default()
    }

    /// An update waits for a reboot (the Kubernetes operator watches this
    /// under the `kubernetes` strategy).
    #[zbus(property)]
    async fn reboot_required(&self) -> bool {
        self.engine.status().reboot_required
    }

    /// This boot's assessment: `pending`, `running`, `not-needed`,
    /// `passed`, `failed`, `marked-good` or `marked-bad`.
    #[zbus(property)]
    async fn health(&self) -> String {
        self.engine.status().health
    }

    #[zbus(property)]
    async fn last_error(&self) -> String {
        self.engine
            .status()
            .last_error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_default()
    }
}

/// Emits PropertiesChanged for what changed, at most every 250 ms.
async fn forward_changes(
    conn: zbus::Connection,
    engine: Arc<Engine>,
    mut changed: watch::Receiver<()>,
) -> zbus::Result<()> {
    let iface = conn
        .object_server()
        .interface::<_, Update1>(updater::bus::PATH)
        .await?;
    let mut last = engine.status();
    while changed.changed().await.is_ok() {
        let now = engine.status();
        let emitter: &SignalEmitter<'_> = iface.signal_emitter();
        let this = iface.get().await;
        if now.state != last.state {
            this.state_changed(emitter).await?;
            notify(&format!("STATUS={}", now.state.as_str()));
        }
        if now.progress != last.progress {
            this.progress_changed(emitter).await?;
        }
        if now.booted_version != last.booted_version {
            this.booted_version_changed(emitter).await?;
        }
        if now.staged != last.staged {
            this.staged_version_changed(emitter).await?;
        }
        if now.last_check != last.last_check {
            this.last_check_changed(emitter).await?;
        }
        if now.last_error != last.last_error {
            this.last_error_changed(emitter).await?;
        }
        if now.reboot_required != last.reboot_required {
            this.reboot_required_changed(emitter).await?;
        }
        if now.health != last.health {
            this.health_changed(emitter).await?;
        }
        drop(this);
        last = now;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

/// The start's assessment first (nothing else runs before the booted slot
/// is judged), then the interrupted update, the schedule, the reboot
/// strategy and the fleetlock release.
async fn after_start(
    engine: Arc<Engine>,
    rebooter: Arc<dyn Rebooter>,
    wake: Arc<tokio::sync::Notify>,
) {
    let units: Arc<dyn UnitProbe> = Arc::new(SystemdUnits {
        runtime: tokio::runtime::Handle::current(),
    });
    {
        let engine = engine.clone();
        let rebooter = rebooter.clone();
        match tokio::task::spawn_blocking(move || {
            engine.start_boot(units.as_ref(), rebooter.as_ref())
        })
        .await
        {
            Ok(Ok(message)) => tracing::info!("boot assessment: {message}"),
            Ok(Err(e)) => tracing::error!("boot assessment: {e}"),
            Err(e) => tracing::error!("boot assessment task: {e}"),
        }
    }
    if engine.has_pending_job() {
        let engine = engine.clone();
        let wake = wake.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(Err(e)) = engine.resume() {
                tracing::error!("resuming the update failed: {e}");
            }
            wake.notify_one();
        });
    }
    tokio::spawn(schedule(engine.clone(), wake.clone()));
    tokio::spawn(release_fleetlock(engine.clone()));
    reboot_loop(engine, rebooter, wake).await;
}

/// Steps the reboot strategy whenever something may have been staged, and
/// when the strategy asks to be asked again.
async fn reboot_loop(
    engine: Arc<Engine>,
    rebooter: Arc<dyn Rebooter>,
    wake: Arc<tokio::sync::Notify>,
) {
    loop {
        let step = {
            let engine = engine.clone();
            let rebooter = rebooter.clone();
            tokio::task::spawn_blocking(move || engine.reboot_step(rebooter.as_ref())).await
        };
        match step {
            Ok(Some(wait)) => {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = wake.notified() => {}
                }
            }
            Ok(None) => wake.notified().await,
            Err(e) => {
                tracing::error!("reboot strategy task: {e}");
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        }
    }
}

/// Gives a held fleetlock slot back once the node is healthy.
async fn release_fleetlock(engine: Arc<Engine>) {
    loop {
        let engine = engine.clone();
        match tokio::task::spawn_blocking(move || engine.release_fleetlock()).await {
            Ok(Some(wait)) => tokio::time::sleep(wait).await,
            Ok(None) => return,
            Err(e) => {
                tracing::error!("fleetlock task: {e}");
                return;
            }
        }
    }
}

/// Periodic checks (or updates), with jitter, as the schedule says.
async fn schedule(engine: Arc<Engine>, wake: Arc<tokio::sync::Notify>) {
    let s = engine.config().schedule.clone();
    if s.mode == AutoMode::Off {
        tracing::info!("automatic checks are off");
        return;
    }
    loop {
        let jitter = jitter_seconds(s.jitter_seconds);
        tokio::time::sleep(Duration::from_secs(s.interval_seconds.max(60) + jitter)).await;
        if engine.is_busy() {
            continue;
        }
        let engine = engine.clone();
        let mode = s.mode;
        let result = tokio::task::spawn_blocking(move || match mode {
            AutoMode::Check => engine.check().map(|_| ()),
            _ => engine
                .update_now(&UpdateRequest {
                    wanted: Wanted::Latest,
                    allow_downgrade: false,
                    stage_only: false,
                })
                .map(|_| ()),
        })
        .await;
        match result {
            Ok(Err(e)) => tracing::warn!("scheduled {:?}: {e}", s.mode),
            Err(e) => tracing::error!("scheduled task: {e}"),
            Ok(Ok(())) => wake.notify_one(),
        }
    }
}

/// Up to `max` seconds, different on each call and each node.
fn jitter_seconds(max: u64) -> u64 {
    if max == 0 {
        return 0;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mixed =
        u64::from(nanos).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(std::process::id());
    mixed % (max + 1)
}

async fn run(args: Args) -> Result<()> {
    let config = config::load(&args.root)
        .with_context(|| format!("reading the configuration under {}", args.root.display()))?;
    let state_dir = config.state_dir.clone();
    // The engine says when its status changed; the signals read it anew.
    let (tx, rx) = watch::channel(());
    let engine = Engine::open(
        config,
        Box::new(move |_: &Status| {
            tx.send_replace(());
        }),
    )
    .with_context(|| format!("opening the engine state in {}", state_dir.display()))?;
    let engine = Arc::new(engine);
    let wake = Arc::new(tokio::sync::Notify::new());
    let rebooter = rebooter(engine.config());
    let builder = if args.session {
        zbus::connection::Builder::session()
    } else {
        zbus::connection::Builder::system()
    }
    .context("connecting to the bus")?;
    let conn = builder
        .name(updater::bus::NAME)
        .context("asking for the bus name")?
        .serve_at(
            updater::bus::PATH,
            Update1 {
                engine: engine.clone(),
                rebooter: rebooter.clone(),
                wake: wake.clone(),
            },
        )
        .context("serving the object")?
        .build()
        .await
        .with_context(|| format!("taking {} on the bus", updater::bus::NAME))?;
    tracing::info!(
        "serving {} at {}; state {}",
        updater::bus::NAME,
        updater::bus::PATH,
        engine.status().state.as_str()
    );
    notify(&format!(
        "READY=1\nSTATUS={}",
        engine.status().state.as_str()
    ));
    tokio::spawn({
        let conn = conn.clone();
        let engine = engine.clone();
        async move {
            if let Err(e) = forward_changes(conn, engine, rx).await {
                tracing::error!("property signals stopped: {e}");
            }
        }
    });
    tokio::spawn(after_start(engine.clone(), rebooter, wake));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping");
    notify("STOPPING=1");
    engine.stop();
    // Let the update under way reach its checkpoint.
    for _ in 0..100 {
        if !engine.is_busy() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The journal's native protocol, or plain lines on stderr (see `--log`).
fn init_logging(args: &Args) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use updater::log::{JournalLayer, Target};
    let target = match args.log {
        LogTarget::Journal => Target::Journal(args.journal_socket.clone()),
        LogTarget::Stderr => Target::Stderr,
        LogTarget::Auto => updater::log::choose(
            std::env::var_os("JOURNAL_STREAM").is_some(),
            &args.journal_socket,
            args.journal_socket.exists(),
        ),
    };
    if let Target::Journal(path) = &target {
        match JournalLayer::new(path) {
            Ok(layer) => {
                tracing_subscriber::registry().with(layer).init();
                return;
            }
            Err(e) => eprintln!("tandemd: cannot log to the journal, logging to stderr: {e}"),
        }
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        .init();
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(&args);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tandemd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandemd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
