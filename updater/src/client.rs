//! `updatectl`'s daemon commands: over D-Bus to `tandemd`, or with
//! `--offline` through an engine in this process. Output is for people on
//! stdout (a progress bar on a terminal, plain lines otherwise, on stderr),
//! or a JSON document with `--json`.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::api::{CheckReport, Progress, Status, UpdateOutcome, UpdateRequest, Wanted};
use crate::engine::Engine;
use crate::state::HistoryEvent;

/// A daemon command.
#[derive(Debug, Clone)]
pub enum Request {
    Status {
        json: bool,
    },
    Check {
        json: bool,
    },
    /// Install an update: stage it and, unless `stage_only`, finalize it
    /// (the reboot strategy then applies).
    Apply {
        version: Option<String>,
        payload: Option<String>,
        allow_downgrade: bool,
        stage_only: bool,
        json: bool,
    },
    /// Set the staged update to boot next; `reboot` at once through the
    /// reboot action (else the strategy decides).
    Finalize {
        reboot: bool,
        json: bool,
    },
    Cancel,
    History {
        json: bool,
    },
    /// Boot the other slot next, when it is good.
    Rollback,
    /// Mark the booted slot good (`true`) or bad.
    Mark {
        good: bool,
    },
    /// This boot's assessment; `wait` until it is over (and fail when it
    /// failed).
    Health {
        json: bool,
        wait: bool,
    },
    /// The Prometheus metrics.
    Metrics,
}

/// Runs a command against tandemd, or in-process with `offline`.
pub fn run(request: Request, offline: bool, root: &Path) -> Result<()> {
    if offline {
        return offline_run(request, root);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(daemon_run(request))
}

/// Prints `value` as JSON, or as `human` renders it.
fn show<T: serde::Serialize>(
    value: &T,
    json: bool,
    human: impl FnOnce(&T) -> String,
) -> Result<()> {
    if json {
        print_json(value)
    } else {
        write_out(&human(value))
    }
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).context("cannot encode JSON")?;
    text.push('\n');
    write_out(&text)
}

/// Writes to stdout; a closed pipe (`updatectl status | head`) is not an error.
pub fn write_out(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// The human status. Pure.
pub fn render_status(s: &Status) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<13}{v}\n"));
    line("State:", s.state.as_str().to_owned());
    let version = s.booted_version.as_deref().unwrap_or("unknown");
    line(
        "Booted:",
        match &s.booted {
            Some(b) => format!(
                "slot {} ({}), version {version}, {}",
                b.slot,
                b.partition,
                status_word(b.status)
            ),
            None => format!("version {version}, slot unknown"),
        },
    );
    if let Some(o) = &s.other {
        line(
            "Other:",
            format!(
                "slot {} ({}), {}",
                o.slot,
                o.partition,
                status_word(o.status)
            ),
        );
    }
    if let Some(next) = s.next_boot {
        line("Next boot:", format!("slot {next}"));
    }
    line(
        "Staged:",
        match &s.staged {
            Some(st) if st.finalized => {
                format!("{} in slot {} (since {})", st.version, st.slot, st.time)
            }
            Some(st) => format!(
                "{} in slot {} (since {}), not set to boot: updatectl finalize",
                st.version, st.slot, st.time
            ),
            None => "none".into(),
        },
    );
    if let Some(v) = &s.installing {
        line("Installing:", v.clone());
    }
    if let Some(p) = &s.progress {
        line("Progress:", progress_text(p));
    }
    line(
        "Last check:",
        match &s.last_check {
            Some(c) => match &c.version {
                Some(v) => format!("{} ({}: {v})", c.time, c.outcome),
                None => format!("{} ({})", c.time, c.outcome),
            },
            None => "never".into(),
        },
    );
    line(
        "Last error:",
        match &s.last_error {
            Some(e) => format!("{} {}", e.time, e.message),
            None => "none".into(),
        },
    );
    if let Some(e) = &s.slots_error {
        line("Slots:", format!("cannot read: {e}"));
    }
    line("Health:", health_line(s));
    if let Some(r) = &s.reboot {
        line(
            "Reboot:",
            format!("{} ({}): {}", r.state, r.strategy, r.detail),
        );
    }
    for (version, why) in &s.blocked {
        line("Blocked:", format!("{version}: {why}"));
    }
    out
}

fn health_line(s: &Status) -> String {
    let mut text = s.health.clone();
    if let Some(t) = &s.trial {
        text.push_str(&format!(" ({} on trial in slot {})", t.version, t.slot));
    }
    if let Some(a) = &s.assessment {
        if let Some(f) = a.checks.iter().find(|c| !c.ok) {
            text.push_str(&format!(
                "; last assessment {} on slot {}: {} {}: {}",
                a.result, a.slot, f.kind, f.name, f.message
            ));
        } else {
            text.push_str(&format!(
                "; last assessment {} on slot {} at {}",
                a.result, a.slot, a.finished
            ));
        }
    }
    text
}

/// The human view of the assessment. Pure.
pub fn render_health(s: &Status) -> String {
    let mut out = format!("Health: {}\n", health_line(s));
    if let Some(a) = &s.assessment {
        for c in &a.checks {
            out.push_str(&format!(
                "  {} {:<6} {} ({:.1}s): {}\n",
                if c.ok { "ok  " } else { "FAIL" },
                c.kind,
                c.name,
                c.seconds,
                c.message
            ));
            if !c.ok && !c.output.is_empty() {
                for l in c.output.lines() {
                    out.push_str(&format!("         | {l}\n"));
                }
            }
        }
    }
    out
}

/// Whether the assessment is over, and whether it went well.
fn health_done(s: &Status) -> Option<bool> {
    match s.health.as_str() {
        "pending" | "running" => None,
        // Not assessed (cancelled, or the slots could not be read) is no
        // pass: boot-complete.target must not bless the boot.
        "failed" | "marked-bad" | "not-assessed" => Some(false),
        _ => Some(true),
    }
}

/// A slot status in the words of `updatectl status`. Pure.
pub fn status_word(s: bootconfig::gptprio::SlotStatus) -> &'static str {
    match s {
        bootconfig::gptprio::SlotStatus::Good => "good",
        bootconfig::gptprio::SlotStatus::Trying => "on trial",
        bootconfig::gptprio::SlotStatus::Unbootable => "not bootable",
    }
}

fn progress_text(p: &Progress) -> String {
    format!(
        "{} {:.0}% ({} of {}, {} downloaded)",
        p.phase,
        p.fraction * 100.0,
        mib(p.done_bytes),
        mib(p.total_bytes),
        mib(p.downloaded_bytes)
    )
}

/// The human history. Pure.
pub fn render_history(events: &[HistoryEvent]) -> String {
    if events.is_empty() {
        return "No events yet.\n".into();
    }
    events
        .iter()
        .map(|e| {
            let mut line = format!(
                "{}  {:<16} {:<12} {}\n",
                e.time,
                e.kind,
                e.version.as_deref().unwrap_or("-"),
                e.message
            );
            for l in e.output.iter().flat_map(|o| o.lines()) {
                line.push_str(&format!("{:<22}| {l}\n", ""));
            }
            line
        })
        .collect()
}

fn render_check(r: &CheckReport) -> String {
    if let (Some(v), Some(why)) = (&r.available, &r.blocked) {
        return format!(
            "{v} is available but was rolled back here ({why}); tandem will not install it by itself (updatectl apply {v} does).\n"
        );
    }
    match &r.available {
        Some(v) => format!(
            "Update available: {v} (booted {}; channel {}, index serial {}; payloads: {})\n",
            r.booted_version,
            r.channel,
            r.serial,
            r.payloads
                .iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => format!(
            "Up to date at {} (channel {}, index serial {}).\n",
            r.booted_version, r.channel, r.serial
        ),
    }
}

/// Progress on stderr: a redrawn bar on a terminal, otherwise a line per
/// phase and per tenth done.
#[derive(Debug)]
struct ProgressView {
    tty: bool,
    last: Mutex<(String, i64)>,
}

impl ProgressView {
    fn new(quiet: bool) -> Option<ProgressView> {
        (!quiet).then(|| ProgressView {
            tty: std::io::stderr().is_terminal(),
            last: Mutex::new((String::new(), -1)),
        })
    }

    fn show(&self, p: &Progress) {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let tenth = (p.fraction * 10.0).floor() as i64;
        let mut err = std::io::stderr().lock();
        if self.tty {
            let width = 30usize;
            let filled = ((p.fraction * width as f64) as usize).min(width);
            let _ = write!(
                err,
                "\r\x1b[2K[{}{}] {}",
                "#".repeat(filled),
                "-".repeat(width - filled),
                progress_text(p)
            );
            let _ = err.flush();
        } else if last.0 != p.phase || last.1 != tenth {
            let _ = writeln!(err, "{}", progress_text(p));
        }
        *last = (p.phase.clone(), tenth);
    }

    fn done(&self) {
        if self.tty {
            let _ = writeln!(std::io::stderr());
        }
    }
}

fn report_outcome(outcome: &UpdateOutcome) -> Result<()> {
    match outcome {
        UpdateOutcome::UpToDate { version } => write_out(&format!("Up to date at {version}.\n")),
        UpdateOutcome::Staged {
            version,
            slot,
            payload,
            downloaded_bytes,
            resumed_requests,
            finalized,
        } => write_out(&format!(
            "{version} is staged in slot {slot} ({} payload, {} downloaded{}). {}\n",
            payload.as_str(),
            mib(*downloaded_bytes),
            if *resumed_requests > 0 {
                format!(", {resumed_requests} resumed requests")
            } else {
                String::new()
            },
            if *finalized {
                "It boots next: reboot to use it."
            } else {
                "It is not set to boot; `updatectl finalize` does that."
            }
        )),
    }
}

fn wanted(version: Option<String>, payload: Option<String>) -> Result<Wanted> {
    Ok(match (version, payload) {
        (None, None) => Wanted::Latest,
        (Some(v), None) => Wanted::Version(v),
        (None, Some(p)) => Wanted::Payload(absolute_payload(&p)?),
        (Some(_), Some(_)) => bail!("give a version or --payload, not both"),
    })
}

/// A payload given as a relative path is made absolute here: the daemon
/// does not share our working folder.
fn absolute_payload(p: &str) -> Result<String> {
    if p.contains("://") || p.starts_with('/') {
        return Ok(p.to_owned());
    }
    let path = std::fs::canonicalize(p).with_context(|| format!("payload {p}"))?;
    Ok(path.display().to_string())
}

fn offline_run(request: Request, root: &Path) -> Result<()> {
    let config = crate::config::load(root)
        .with_context(|| format!("reading the configuration under {}", root.display()))?;
    let quiet = matches!(
        request,
        Request::Apply { json: true, .. } | Request::Finalize { json: true, .. }
    );
    let view = ProgressView::new(quiet).map(Arc::new);
    let observer_view = view.clone();
    let engine = Engine::open(
        config,
        Box::new(move |s: &Status| {
            if let (Some(v), Some(p)) = (&observer_view, &s.progress) {
                v.show(p);
            }
        }),
    )
    .context("opening the engine")?;
    match request {
        Request::Status { json } => {
            let s = engine.status();
            show(&s, json, render_status)
        }
        Request::Check { json } => {
            let r = engine.check()?;
            show(&r, json, render_check)
        }
        Request::Apply {
            version,
            payload,
            allow_downgrade,
            stage_only,
            json,
        } => {
            let request = UpdateRequest {
                wanted: wanted(version, payload)?,
                allow_downgrade,
                stage_only,
            };
            let result = match engine.resume() {
                Some(Err(e)) => Err(e),
                _ => engine.update_now(&request),
            };
            if let Some(v) = &view {
                v.done();
            }
            let outcome = result?;
            // Through the daemon or not, --json prints the status document.
            if json {
                print_json(&engine.status())
            } else {
                report_outcome(&outcome)
            }
        }
        Request::Finalize { reboot, json } => {
            if reboot {
                bail!("--offline does not reboot: pass --no-reboot, then reboot by hand");
            }
            let message = engine.finalize(None)?;
            if json {
                print_json(&engine.status())
            } else {
                write_out(&format!("{message}; reboot to use it.\n"))
            }
        }
        Request::Cancel => bail!("nothing runs offline to cancel"),
        Request::History { json } => {
            let h = engine.history()?;
            show(&h, json, |v| render_history(v))
        }
        Request::Rollback => write_out(&format!("{}.\n", engine.rollback()?)),
        Request::Mark { good } => write_out(&format!("{}.\n", engine.mark_booted(good)?)),
        Request::Health { json, wait } => {
            if wait {
                bail!("--wait needs tandemd: offline, nothing assesses this boot")
            }
            show(&engine.status(), json, render_health)
        }
        Request::Metrics => write_out(&engine.metrics()),
    }
}

/// What `zbus` says, with a hint when the daemon is not there.
fn bus_error(e: zbus::Error) -> anyhow::Error {
    let text = match &e {
        zbus::Error::MethodError(name, Some(detail), _) => format!("{detail} ({name})"),
        zbus::Error::FDO(f) => f.to_string(),
        other => other.to_string(),
    };
    if text.contains("ServiceUnknown") || text.contains("was not provided by any") {
        anyhow!("tandemd is not running ({text}); start it, or use --offline")
    } else {
        anyhow!(text)
    }
}

async fn proxy(conn: &zbus::Connection) -> Result<zbus::Proxy<'static>> {
    zbus::Proxy::new(conn, crate::bus::NAME, crate::bus::PATH, crate::bus::NAME)
        .await
        .map_err(bus_error)
}

async fn get_status(p: &zbus::Proxy<'_>) -> Result<Status> {
    let text: String = p.call("GetStatus", &()).await.map_err(bus_error)?;
    serde_json::from_str(&text).context("tandemd sent a status this updatectl cannot read")
}

async fn daemon_run(request: Request) -> Result<()> {
    let conn = zbus::Connection::system()
        .await
        .context("cannot connect to the system bus")?;
    let p = proxy(&conn).await?;
    match request {
        Request::Status { json } => {
            let s = get_status(&p).await?;
            show(&s, json, render_status)
        }
        Request::Check { json } => {
            let text: String = p.call("Check", &()).await.map_err(bus_error)?;
            let r: CheckReport =
                serde_json::from_str(&text).context("tandemd sent an unreadable report")?;
            show(&r, json, render_check)
        }
        Request::Apply {
            version,
            payload,
            allow_downgrade,
            stage_only,
            json,
        } => {
            let (v, pl) = match wanted(version, payload)? {
                Wanted::Latest => (String::new(), String::new()),
                Wanted::Version(v) => (v, String::new()),
                Wanted::Payload(pl) => (String::new(), pl),
            };
            let method = if stage_only { "Stage" } else { "Apply" };
            let id: u64 = p
                .call(method, &(v, pl, allow_downgrade))
                .await
                .map_err(bus_error)?;
            let view = ProgressView::new(json);
            let result = loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let s = get_status(&p).await?;
                if let Some(r) = s.last_result.as_ref().filter(|r| r.id == id) {
                    break (r.clone(), s);
                }
                if let (Some(v), Some(pr)) = (&view, &s.progress) {
                    v.show(pr);
                }
            };
            if let Some(v) = &view {
                v.done();
            }
            let (r, s) = result;
            if !r.ok {
                bail!("{}", r.message);
            }
            if json {
                print_json(&s)
            } else {
                write_out(&format!("{}.\n", r.message))
            }
        }
        Request::Finalize { reboot, json } => {
            let m: String = p.call("Finalize", &(reboot,)).await.map_err(bus_error)?;
            if json {
                print_json(&get_status(&p).await?)
            } else {
                write_out(&format!("{m}.\n"))
            }
        }
        Request::Cancel => {
            let any: bool = p.call("Cancel", &()).await.map_err(bus_error)?;
            write_out(if any {
                "Cancelling; the update stops at its next checkpoint.\n"
            } else {
                "Nothing to cancel.\n"
            })
        }
        Request::History { json } => {
            let text: String = p.call("GetHistory", &()).await.map_err(bus_error)?;
            let h: Vec<HistoryEvent> =
                serde_json::from_str(&text).context("tandemd sent an unreadable history")?;
            show(&h, json, |h| render_history(h))
        }
        Request::Rollback => {
            let m: String = p.call("Rollback", &()).await.map_err(bus_error)?;
            write_out(&format!("{m}.\n"))
        }
        Request::Mark { good } => {
            let method = if good { "MarkGood" } else { "MarkBad" };
            let m: String = p.call(method, &()).await.map_err(bus_error)?;
            write_out(&format!("{m}.\n"))
        }
        Request::Health { json, wait } => {
            let s = loop {
                let s = get_status(&p).await?;
                if !wait || health_done(&s).is_some() {
                    break s;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            };
            show(&s, json, render_health)?;
            if wait && health_done(&s) == Some(false) {
                bail!("this boot's health assessment: {}", s.health);
            }
            Ok(())
        }
        Request::Metrics => {
            let m: String = p.call("GetMetrics", &()).await.map_err(bus_error)?;
            write_out(&m)
        }
    }
}
