//! The boot assessment's checks: systemd units that must be active,
//! executables in `health.d` folders that must exit 0, and HTTP probes
//! that must answer 2xx, all under one deadline. The first failure ends
//! the assessment; its output is kept for the history.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::Health;

/// The most output kept of one check (its end, where errors are).
pub const OUTPUT_LIMIT: usize = 4096;

/// How a unit's state is learned (systemd over D-Bus in `tandemd`).
pub trait UnitProbe: Send + Sync {
    /// The unit's `ActiveState` (`active`, `activating`, `failed`, ...).
    fn active_state(&self, unit: &str) -> Result<String, String>;
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    /// `unit`, `script`, `http` or `deadline`.
    pub kind: String,
    /// The unit, the executable's path or the URL.
    pub name: String,
    pub ok: bool,
    /// Why it passed or failed, in one line.
    pub message: String,
    /// What it printed (the last [`OUTPUT_LIMIT`] bytes), or the body.
    pub output: String,
    pub seconds: f64,
}

/// The checks run, in order, and whether all passed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub passed: bool,
    pub checks: Vec<CheckResult>,
}

impl Outcome {
    /// The failed check, if any.
    pub fn failure(&self) -> Option<&CheckResult> {
        self.checks.iter().find(|c| !c.ok)
    }
}

/// The executables of `dirs`, by file name: a name in a later folder
/// replaces the same name in an earlier one, and one that links to
/// `/dev/null` is turned off. `listings` holds each folder's (name, path).
/// Pure.
pub fn merge_listings(listings: Vec<Vec<(String, PathBuf, bool)>>) -> Vec<PathBuf> {
    let mut by_name: std::collections::BTreeMap<String, Option<PathBuf>> = Default::default();
    for listing in listings {
        for (name, path, masked) in listing {
            by_name.insert(name, (!masked).then_some(path));
        }
    }
    by_name.into_values().flatten().collect()
}

/// The executables to run, in name order.
pub fn scripts(dirs: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut listings = Vec::new();
    for dir in dirs {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        };
        let mut listing = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let masked = std::fs::read_link(&path).is_ok_and(|t| t == Path::new("/dev/null"));
            listing.push((name, path, masked));
        }
        listings.push(listing);
    }
    Ok(merge_listings(listings))
}

fn keep_tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(OUTPUT_LIMIT);
    String::from_utf8_lossy(&bytes[start..])
        .trim_end()
        .to_owned()
}

struct Clock {
    start: Instant,
    deadline: Instant,
    total: Duration,
}

impl Clock {
    fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    fn passed(&self) -> bool {
        self.left().is_zero()
    }

    fn deadline_message(&self, what: &str) -> String {
        format!(
            "the health deadline ({}s) passed {what}",
            self.total.as_secs()
        )
    }
}

fn result(
    kind: &str,
    name: &str,
    ok: bool,
    message: String,
    output: String,
    t: Instant,
) -> CheckResult {
    CheckResult {
        kind: kind.into(),
        name: name.into(),
        ok,
        message,
        output,
        seconds: t.elapsed().as_secs_f64(),
    }
}

/// Runs every check in order (units, executables, HTTP probes) until one
/// fails, the deadline passes or `cancel` is set. `env` is given to the
/// executables (the version and slot on trial).
pub fn run(
    config: &Health,
    env: &[(String, String)],
    units: &dyn UnitProbe,
    cancel: &AtomicBool,
) -> Outcome {
    let total = Duration::from_secs(config.deadline_seconds.max(1));
    let start = Instant::now();
    let clock = Clock {
        start,
        deadline: start + total,
        total,
    };
    let retry = Duration::from_secs(config.retry_seconds.max(1));
    let mut checks = Vec::new();
    let mut push = |c: CheckResult| {
        let ok = c.ok;
        if ok {
            tracing::info!("health: {} {} passed: {}", c.kind, c.name, c.message);
        } else {
            tracing::warn!("health: {} {} FAILED: {}", c.kind, c.name, c.message);
        }
        checks.push(c);
        ok
    };
    for unit in &config.units {
        if !push(check_unit(unit, units, &clock, retry, cancel)) {
            return Outcome {
                passed: false,
                checks,
            };
        }
    }
    let scripts = match scripts(&config.dirs) {
        Ok(s) => s,
        Err(e) => {
            push(result(
                "script",
                "health.d",
                false,
                format!("cannot list the health executables: {e}"),
                String::new(),
                Instant::now(),
            ));
            return Outcome {
                passed: false,
                checks,
            };
        }
    };
    let script_timeout = Duration::from_secs(config.script_timeout_seconds.max(1));
    for script in scripts {
        if !push(check_script(&script, env, script_timeout, &clock, cancel)) {
            return Outcome {
                passed: false,
                checks,
            };
        }
    }
    for url in &config.http {
        if !push(check_http(url, &clock, retry, cancel)) {
            return Outcome {
                passed: false,
                checks,
            };
        }
    }
    tracing::info!(
        "health: all {} checks passed in {:.1}s",
        checks.len(),
        clock.start.elapsed().as_secs_f64()
    );
    Outcome {
        passed: true,
        checks,
    }
}

/// Sleeps up to `d`, waking early on cancel; false when cancelled.
fn pause(d: Duration, cancel: &AtomicBool) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if cancel.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
    }
    !cancel.load(Ordering::SeqCst)
}

fn check_unit(
    unit: &str,
    probe: &dyn UnitProbe,
    clock: &Clock,
    retry: Duration,
    cancel: &AtomicBool,
) -> CheckResult {
    let t = Instant::now();
    loop {
        let state = probe.active_state(unit);
        match state.as_deref() {
            Ok("active") => return result("unit", unit, true, "active".into(), String::new(), t),
            Ok("failed") => {
                return result(
                    "unit",
                    unit,
                    false,
                    "the unit failed".into(),
                    String::new(),
                    t,
                )
            }
            _ => {}
        }
        let shown = match &state {
            Ok(s) => format!("still {s}"),
            Err(e) => e.clone(),
        };
        if clock.passed() || !pause(retry.min(clock.left()), cancel) {
            let message = if cancel.load(Ordering::SeqCst) {
                format!("stopped while waiting ({shown})")
            } else {
                clock.deadline_message(&format!("waiting for it to be active ({shown})"))
            };
            return result("unit", unit, false, message, String::new(), t);
        }
    }
}

fn check_script(
    path: &Path,
    env: &[(String, String)],
    timeout: Duration,
    clock: &Clock,
    cancel: &AtomicBool,
) -> CheckResult {
    let t = Instant::now();
    let name = path.display().to_string();
    let fail = |message: String, output: String| result("script", &name, false, message, output, t);
    if clock.passed() {
        return fail(clock.deadline_message("before it could run"), String::new());
    }
    let limit = timeout.min(clock.left());
    let (reader, writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => return fail(format!("cannot make a pipe: {e}"), String::new()),
    };
    let child = {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(path);
        cmd.stdin(Stdio::null())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .process_group(0);
        match writer.try_clone() {
            Ok(w) => cmd.stdout(w).stderr(writer),
            Err(e) => return fail(format!("cannot make a pipe: {e}"), String::new()),
        };
        // The command (and its copies of the pipe) ends with this block.
        cmd.spawn()
    };
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot run it: {e}"), String::new()),
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let mut reader = reader;
        let mut buf = [0u8; 8192];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    bytes.extend_from_slice(&buf[..n]);
                    if bytes.len() > 2 * OUTPUT_LIMIT {
                        bytes.drain(..bytes.len() - OUTPUT_LIMIT);
                    }
                }
            }
        }
        let _ = tx.send(bytes);
    });
    let started = Instant::now();
    let (status, why_killed) = loop {
        match child.try_wait() {
            Ok(Some(status)) => break (Some(status), None),
            Ok(None) => {}
            Err(e) => break (None, Some(format!("cannot wait for it: {e}"))),
        }
        let why = if cancel.load(Ordering::SeqCst) {
            Some("stopped".to_string())
        } else if started.elapsed() >= limit {
            Some(if limit < timeout {
                clock.deadline_message("while it ran")
            } else {
                format!("it ran longer than its timeout ({}s)", timeout.as_secs())
            })
        } else {
            None
        };
        if let Some(why) = why {
            let pid = rustix::process::Pid::from_child(&child);
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            let _ = child.kill();
            let _ = child.wait();
            break (None, Some(why));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Something it started outside its process group may hold the pipe.
    let output = keep_tail(&rx.recv_timeout(Duration::from_secs(2)).unwrap_or_default());
    match (status, why_killed) {
        (Some(s), _) if s.success() => {
            result("script", &name, true, "exit status 0".into(), output, t)
        }
        (Some(s), _) => fail(format!("it failed: {s}"), output),
        (None, Some(why)) => fail(why, output),
        (None, None) => fail("it vanished".into(), output),
    }
}

fn check_http(url: &str, clock: &Clock, retry: Duration, cancel: &AtomicBool) -> CheckResult {
    let t = Instant::now();
    let client = match reqwest::blocking::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            return result(
                "http",
                url,
                false,
                format!("cannot make a client: {e}"),
                String::new(),
                t,
            )
        }
    };
    loop {
        let each = Duration::from_secs(10)
            .min(clock.left())
            .max(Duration::from_millis(100));
        let (message, body) = match client.get(url).timeout(each).send() {
            Ok(response) => {
                let status = response.status();
                let body = response.text().unwrap_or_default();
                let body = keep_tail(body.as_bytes());
                if status.is_success() {
                    return result("http", url, true, format!("answered {status}"), body, t);
                }
                (format!("answered {status}"), body)
            }
            Err(e) => (crate::fetch::describe(&e), String::new()),
        };
        if clock.passed() || !pause(retry.min(clock.left()), cancel) {
            let message = if cancel.load(Ordering::SeqCst) {
                format!("stopped; last try {message}")
            } else {
                clock.deadline_message(&format!("and the last try {message}"))
            };
            return result("http", url, false, message, body, t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Units(Vec<(&'static str, &'static str)>);

    impl UnitProbe for Units {
        fn active_state(&self, unit: &str) -> Result<String, String> {
            self.0
                .iter()
                .find(|(u, _)| *u == unit)
                .map(|(_, s)| s.to_string())
                .ok_or_else(|| format!("unit {unit} not loaded"))
        }
    }

    fn config(dirs: Vec<PathBuf>) -> Health {
        Health {
            deadline_seconds: 2,
            dirs,
            retry_seconds: 1,
            ..Health::default()
        }
    }

    fn script(dir: &Path, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tandem-health-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn later_folders_replace_and_dev_null_masks() {
        let p = PathBuf::from;
        let merged = merge_listings(vec![
            vec![
                ("10-a".into(), p("/usr/10-a"), false),
                ("20-b".into(), p("/usr/20-b"), false),
                ("30-c".into(), p("/usr/30-c"), false),
            ],
            vec![
                ("20-b".into(), p("/etc/20-b"), false),
                ("30-c".into(), p("/etc/30-c"), true),
                ("05-z".into(), p("/etc/05-z"), false),
            ],
        ]);
        assert_eq!(merged, [p("/etc/05-z"), p("/usr/10-a"), p("/etc/20-b")]);
    }

    #[test]
    fn scripts_pass_fail_with_output_and_time_out() {
        let dir = temp("scripts");
        script(&dir, "10-ok", "echo fine; exit 0");
        script(&dir, "20-env", "test \"$TANDEM_VERSION\" = 2.0.0");
        let none = Units(vec![]);
        let cancel = AtomicBool::new(false);
        let env = [("TANDEM_VERSION".to_string(), "2.0.0".to_string())];
        let out = run(&config(vec![dir.clone()]), &env, &none, &cancel);
        assert!(out.passed, "{out:?}");
        assert_eq!(out.checks.len(), 2);
        assert_eq!(out.checks[0].output, "fine");

        script(&dir, "30-bad", "echo to stdout; echo disk full >&2; exit 3");
        script(&dir, "40-never", "exit 0");
        let out = run(&config(vec![dir.clone()]), &env, &none, &cancel);
        assert!(!out.passed);
        let f = out.failure().unwrap();
        assert!(f.name.ends_with("30-bad"), "{f:?}");
        assert!(f.message.contains("exit status: 3"), "{f:?}");
        assert_eq!(f.output, "to stdout\ndisk full");
        // The first failure ends the run.
        assert_eq!(out.checks.len(), 3);

        // A script that outlives the deadline is killed, with its children.
        std::fs::remove_file(dir.join("30-bad")).unwrap();
        script(&dir, "30-slow", "echo started; sleep 30 & sleep 30");
        let t = Instant::now();
        let out = run(&config(vec![dir.clone()]), &env, &none, &cancel);
        assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
        let f = out.failure().unwrap();
        assert!(
            f.message.contains("deadline (2s) passed while it ran"),
            "{f:?}"
        );
        assert_eq!(f.output, "started");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn units_must_become_active_before_the_deadline() {
        let cancel = AtomicBool::new(false);
        let mut c = config(Vec::new());
        c.units = vec!["containerd.service".into()];
        let up = Units(vec![("containerd.service", "active")]);
        assert!(run(&c, &[], &up, &cancel).passed);
        let failed = Units(vec![("containerd.service", "failed")]);
        let out = run(&c, &[], &failed, &cancel);
        assert_eq!(out.failure().unwrap().message, "the unit failed");
        let slow = Units(vec![("containerd.service", "activating")]);
        let out = run(&c, &[], &slow, &cancel);
        let m = &out.failure().unwrap().message;
        assert!(
            m.contains("deadline") && m.contains("still activating"),
            "{m}"
        );
        let missing = Units(vec![]);
        let out = run(&c, &[], &missing, &cancel);
        assert!(out.failure().unwrap().message.contains("not loaded"));
    }
}
