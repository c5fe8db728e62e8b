//! End-to-end tests of what happens after the reboot: boot assessment,
//! automatic rollback, "did not boot", reboot strategies (window,
//! fleetlock), manual rollback and marks, history and metrics. Real parts:
//! `tandemd` as a process on a private `dbus-daemon`, GPT disk images read
//! back by `cgpt`, HTTP (releases, probes, a fleetlock server) on
//! 127.0.0.1, health executables run by the daemon, and Prometheus'
//! reference parser. The reboot is simulated: the test runs GRUB's
//! `gptprio.next` rule on the image, points the kernel command line at the
//! slot it picked, changes the boot id and restarts `tandemd`. The reboot
//! action is a recorder (systemd units are checked in the VM tests).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{in_days, releases, Node, Releases};
use serde_json::Value;
use tandem_testkit::fleetlock::{free_port, FleetlockServer};
use tandem_testkit::http::HttpServer;

/// A node with 2.0.0 published (full payload) and staged into slot B.
fn staged_node(server: &HttpServer, rel: &Releases, extra: &str) -> Node {
    rel.publish(1, vec![rel.release("2.0.0", false)], in_days(7), None);
    let mut node = Node::new(server, rel);
    node.configure("60-scenario", extra);
    node.start();
    node.wait_health();
    let out = node.ctl_ok(&["apply"]);
    assert!(out.contains("2.0.0 staged in slot B"), "{out}");
    node
}

fn events_of<'a>(history: &'a [Value], kind: &str) -> Vec<&'a Value> {
    history.iter().filter(|e| e["kind"] == kind).collect()
}

fn wait_until(what: &str, node: &Node, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(40);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            node.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn passing_checks_mark_the_new_slot_good_after_the_reboot() {
    let rel = releases();
    fs::write(rel.www.join("healthz"), "ok").unwrap();
    let server = HttpServer::serve(&rel.www);
    let extra = format!("[health]\nhttp = [\"{}\"]\n", server.url("healthz"));
    let mut node = staged_node(&server, &rel, &extra);
    node.health_script("10-containers", "echo containers fine");
    // Strategy off: the reboot is left to the operator, kured's file is there.
    let s = node.wait_for("the reboot plan", |s| !s["reboot"].is_null());
    assert_eq!(s["reboot"]["state"], "left-to-operator", "{s}");
    assert_eq!(s["reboot_required"], true);
    assert!(node.dir.path().join("reboot-required").exists());
    assert!(node.reboots().is_empty());

    assert_eq!(node.reboot(["1.0.0", "2.0.0"]), "B");
    let s = node.wait_health();
    assert_eq!(s["health"], "passed", "{s}");
    // cgpt reads B: successful, no tries left, above A.
    let (prio_b, tries_b, good_b) = node.disk.cgpt_prio(4);
    let (prio_a, _, good_a) = node.disk.cgpt_prio(3);
    assert_eq!((tries_b, good_b, good_a), (0, true, true));
    assert!(prio_b > prio_a);
    assert_eq!(s["booted"]["slot"], "B");
    assert_eq!(s["booted"]["status"], "good");
    assert_eq!(s["booted_version"], "2.0.0");
    assert!(s["staged"].is_null() && s["trial"].is_null(), "{s}");
    let checks = s["assessment"]["checks"].as_array().unwrap();
    let kinds: Vec<&str> = checks.iter().map(|c| c["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["script", "http"]);
    assert!(checks.iter().all(|c| c["ok"] == true));
    let human = node.ctl_ok(&["status"]);
    assert!(human.contains("Health:      passed"), "{human}");
    assert!(
        human.contains("slot B (USR-B), version 2.0.0, good"),
        "{human}"
    );
    // The history kept what happened before the restart.
    let h = node.history();
    let kinds: Vec<&str> = h.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    let order = ["staged", "booted", "health-passed"];
    let at: Vec<usize> = order
        .iter()
        .map(|k| kinds.iter().position(|x| x == k).unwrap())
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{kinds:?}");
    // A restart in the same boot does not assess again.
    node.stop();
    node.start();
    let s = node.wait_health();
    assert_eq!(s["health"], "passed");
    assert_eq!(events_of(&node.history(), "health-passed").len(), 1);
    assert!(node.reboots().is_empty());
}

/// Stages 2.0.0, installs `script` (if any) and `extra`, reboots into B
/// and waits for the assessment, which must fail. Returns the node.
fn failing_boot(rel: &Releases, server: &HttpServer, extra: &str, script: Option<&str>) -> Node {
    let mut node = staged_node(server, rel, extra);
    if let Some(body) = script {
        node.health_script("50-kubelet", body);
    }
    assert_eq!(node.reboot(["1.0.0", "2.0.0"]), "B");
    let s = node.wait_health();
    assert_eq!(s["health"], "failed", "{s}");
    // Slot B is bad, A boots next, the reboot action ran once.
    let (prio_b, tries_b, good_b) = node.disk.cgpt_prio(4);
    assert_eq!((prio_b, tries_b, good_b), (0, 0, false));
    assert_eq!(s["next_boot"], "A", "{s}");
    std::thread::sleep(Duration::from_millis(1500));
    let reboots = node.reboots();
    assert_eq!(reboots, ["rollback to slot A"], "{}", node.log_text());
    assert!(s["blocked"]["2.0.0"]
        .as_str()
        .unwrap()
        .starts_with("health check failed"));
    node
}

#[test]
fn a_failing_health_executable_rolls_back_with_its_output() {
    let rel = releases();
    let server = HttpServer::serve(&rel.www);
    let mut node = failing_boot(
        &rel,
        &server,
        "",
        Some("echo \"kubelet on $TANDEM_VERSION in slot $TANDEM_SLOT\"\necho 'not ready: no CNI' >&2\nexit 4"),
    );
    let h = node.history();
    let failed = events_of(&h, "health-failed");
    assert_eq!(failed.len(), 1, "{h:?}");
    let message = failed[0]["message"].as_str().unwrap();
    assert!(
        message.contains("50-kubelet") && message.contains("exit status: 4"),
        "{message}"
    );
    assert_eq!(
        failed[0]["output"],
        "kubelet on 2.0.0 in slot B\nnot ready: no CNI"
    );
    assert_eq!(events_of(&h, "rollback").len(), 1);
    let shown = node.ctl_ok(&["history"]);
    assert!(shown.contains("| not ready: no CNI"), "{shown}");
    let health = node.ctl_ok(&["health"]);
    assert!(health.contains("FAIL script"), "{health}");
    // updatectl health --wait fails, as tandem-health.service must.
    let out = node.ctl(&["health", "--wait"]);
    assert!(!out.status.success());

    // Back on A, which is good: nothing to assess; 2.0.0 is not installed
    // again by itself, only when named.
    assert_eq!(node.reboot(["1.0.0", "2.0.0"]), "A");
    let s = node.wait_health();
    assert_eq!(s["health"], "not-needed", "{s}");
    let err = node.ctl_err(&["apply"]);
    assert!(err.contains("2.0.0 was rolled back"), "{err}");
    let out = node.ctl_ok(&["apply", "2.0.0"]);
    assert!(out.contains("2.0.0 staged in slot B"), "{out}");
}

#[test]
fn a_failing_http_probe_rolls_back() {
    let rel = releases();
    let server = HttpServer::serve(&rel.www);
    // Nothing is served at /healthz: 404 until the deadline.
    let extra = format!(
        "[health]\nhttp = [\"{}\"]\ndeadline_seconds = 3\n",
        server.url("healthz")
    );
    let node = failing_boot(&rel, &server, &extra, None);
    let h = node.history();
    let failed = events_of(&h, "health-failed");
    let message = failed[0]["message"].as_str().unwrap();
    assert!(
        message.contains("http") && message.contains("/healthz") && message.contains("404"),
        "{message}"
    );
    assert!(server.log_of("healthz").len() >= 2, "the probe was retried");
}

#[test]
fn the_deadline_passing_counts_as_a_failure() {
    let rel = releases();
    let server = HttpServer::serve(&rel.www);
    let t = Instant::now();
    let node = failing_boot(
        &rel,
        &server,
        "[health]\ndeadline_seconds = 2\n",
        Some("echo waiting for the API server\nsleep 60"),
    );
    assert!(t.elapsed() < Duration::from_secs(40));
    let h = node.history();
    let message = events_of(&h, "health-failed")[0]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("the health deadline (2s) passed while it ran"),
        "{message}"
    );
}

#[test]
fn an_update_that_never_boots_is_rolled_back_and_not_staged_again() {
    let rel = releases();
    let server = HttpServer::serve(&rel.www);
    let mut node = staged_node(&server, &rel, "");
    // GRUB boots B and spends its one try; B's kernel never reaches
    // userspace (no tandemd runs). The next boot GRUB falls back to A.
    node.stop();
    {
        use bootconfig::backend::GptPrioBackend;
        use bootconfig::gpt::GptDisk;
        let disk = GptDisk::open_for_update(&node.disk.path).unwrap();
        let slots = bootconfig::slots::find_slots(
            &disk.partitions(),
            disk.sector_size(),
            disk.size_bytes(),
            &bootconfig::SlotLayout::default(),
        )
        .unwrap();
        let booted = GptPrioBackend::new(disk, slots)
            .simulate_grub_boot()
            .unwrap()
            .unwrap();
        assert_eq!(booted.number, 4);
    }
    assert_eq!(node.reboot(["1.0.0", "2.0.0"]), "A");
    let s = node.wait_health();
    assert_eq!(s["booted_version"], "1.0.0");
    assert!(s["staged"].is_null(), "{s}");
    assert_eq!(s["blocked"]["2.0.0"], "did not boot");
    let h = node.history();
    let rollbacks = events_of(&h, "rollback");
    assert_eq!(rollbacks.len(), 1, "{h:?}");
    assert_eq!(rollbacks[0]["version"], "2.0.0");
    assert!(rollbacks[0]["message"]
        .as_str()
        .unwrap()
        .contains("did not boot"));
    // Not again by itself: the scheduler's request (the newest) is refused
    // before anything is downloaded; check says why.
    let served = server.log_of("full-2.0.0.tpl").len();
    let err = node.ctl_err(&["apply"]);
    assert!(err.contains("did not boot"), "{err}");
    assert_eq!(server.log_of("full-2.0.0.tpl").len(), served);
    let check = node.ctl_ok(&["check"]);
    assert!(check.contains("rolled back here (did not boot)"), "{check}");
    // The metrics count it (read by Prometheus' own parser below).
    let metrics = node.ctl_ok(&["metrics"]);
    assert!(
        metrics.contains("tandem_rollbacks_total{reason=\"did-not-boot\"} 1"),
        "{metrics}"
    );
    // A person may try it again.
    let out = node.ctl_ok(&["apply", "2.0.0"]);
    assert!(out.contains("2.0.0 staged in slot B"), "{out}");
}

fn utc_minutes_now() -> i64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    (secs / 60) % 1440
}

fn hhmm(minutes: i64) -> String {
    let m = minutes.rem_euclid(1440);
    format!("{:02}:{:02}", m / 60, m % 60)
}

#[test]
fn window_reboots_only_inside_the_window() {
    let rel = releases();
    let server = HttpServer::serve(&rel.www);
    let all = r#"["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]"#;
    let outside = format!(
        "[reboot]\nstrategy = \"window\"\n[[reboot.windows]]\ndays = {all}\nstart = \"{}\"\nlength_minutes = 30\n",
        hhmm(utc_minutes_now() + 120)
    );
    let mut node = staged_node(&server, &rel, &outside);
    let s = node.wait_for("the reboot plan", |s| !s["reboot"].is_null());
    assert_eq!(s["reboot"]["state"], "waiting", "{s}");
    assert!(s["reboot"]["detail"]
        .as_str()
        .unwrap()
        .contains("maintenance window"));
    std::thread::sleep(Duration::from_secs(2));
    assert!(node.reboots().is_empty(), "rebooted outside the window");

    let inside = format!(
        "[reboot]\nstrategy = \"window\"\n[[reboot.windows]]\ndays = {all}\nstart = \"{}\"\nlength_minutes = 180\n",
        hhmm(utc_minutes_now() - 60)
    );
    node.configure("60-scenario", &inside);
    node.stop();
    node.start();
    wait_until("the reboot", &node, || !node.reboots().is_empty());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        node.reboots(),
        ["into 2.0.0 in slot B (strategy window)"],
        "one reboot"
    );
    let s = node.status();
    assert_eq!(s["reboot"]["state"], "rebooting");
}

#[test]
fn fleetlock_reboots_once_the_lock_is_granted_and_releases_it_when_healthy() {
    let rel = releases();
    let server = HttpServer::serve(&rel.www);
    let port = free_port();
    let extra = format!(
        "[reboot]\nstrategy = \"fleetlock\"\nfleetlock_url = \"http://127.0.0.1:{port}\"\nfleetlock_group = \"workers\"\n"
    );
    // The server is down when the update is staged.
    let mut node = staged_node(&server, &rel, &extra);
    let s = node.wait_for("a lock attempt", |s| {
        s["reboot"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("no reboot slot yet"))
    });
    assert_eq!(s["reboot"]["state"], "waiting");
    std::thread::sleep(Duration::from_secs(1));
    assert!(node.reboots().is_empty(), "rebooted without the lock");

    // Up, but another node holds the only slot: still no reboot.
    let lock = FleetlockServer::start(port, 1);
    lock.hold("other-node");
    wait_until("a refused lock request", &node, || {
        lock.log().iter().any(|r| r.status == 409)
    });
    assert!(
        node.reboots().is_empty(),
        "rebooted while the lock was held"
    );
    let refused = lock.log().into_iter().find(|r| r.status == 409).unwrap();
    assert_eq!(refused.group, "workers");
    assert_eq!(refused.id.len(), 32);

    // The other node lets go: the lock is taken, then the reboot.
    lock.release("other-node");
    wait_until("the reboot", &node, || !node.reboots().is_empty());
    assert_eq!(lock.holders(), std::slice::from_ref(&refused.id));
    assert!(lock.log().iter().all(|r| r.path == "/v1/pre-reboot"));

    // After the reboot the lock stays held until the health check passed.
    node.health_script("10-slow", "sleep 1");
    assert_eq!(node.reboot(["1.0.0", "2.0.0"]), "B");
    let s = node.wait_health();
    assert_eq!(s["health"], "passed");
    wait_until("the lock's release", &node, || lock.holders().is_empty());
    let release = lock
        .log()
        .into_iter()
        .find(|r| r.path == "/v1/steady-state")
        .unwrap();
    assert_eq!((release.status, release.id), (200, refused.id));
    let h = node.history();
    let kinds: Vec<&str> = h.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    let passed = kinds.iter().position(|k| *k == "health-passed").unwrap();
    let released = h
        .iter()
        .position(|e| {
            e["kind"] == "fleetlock"
                && e["message"]
                    .as_str()
                    .unwrap()
                    .contains("gave the reboot slot back")
        })
        .unwrap();
    assert!(passed < released, "{kinds:?}");
    assert_eq!(node.reboots().len(), 1);
}

#[test]
fn rollback_and_marks_go_through_the_daemon_and_are_recorded() {
    let rel = releases();
    let server = HttpServer::serve(&rel.www);
    rel.publish(1, vec![rel.release("2.0.0", false)], in_days(7), None);
    let mut node = Node::new(&server, &rel);
    node.start();
    node.wait_health();
    // Slot B holds nothing good: no rollback, and A cannot be marked bad.
    let err = node.ctl_err(&["rollback"]);
    assert!(err.contains("slot B is not bootable, not good"), "{err}");
    let err = node.ctl_err(&["mark-bad"]);
    assert!(err.contains("nothing would boot"), "{err}");
    // Non-root callers are refused by the bus policy.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_updatectl"))
        .arg("rollback")
        .env("DBUS_SYSTEM_BUS_ADDRESS", node.bus.address())
        .output()
        .unwrap();
    assert!(!out.status.success());

    node.ctl_ok(&["apply"]);
    assert_eq!(node.reboot(["1.0.0", "2.0.0"]), "B");
    assert_eq!(node.wait_health()["health"], "passed");
    // Now A (1.0.0) is good: roll back to it.
    let out = node.ctl_ok(&["rollback"]);
    assert!(out.contains("slot A (1.0.0) boots next"), "{out}");
    let s = node.status();
    assert_eq!(s["next_boot"], "A");
    assert_eq!(s["staged"]["version"], "1.0.0");
    assert!(node.disk.cgpt_prio(4).2, "B stays good");
    assert_eq!(node.reboot(["1.0.0", "2.0.0"]), "A");
    let s = node.wait_health();
    assert_eq!(s["health"], "passed", "{s}");
    assert_eq!(s["booted_version"], "1.0.0");
    // Marked bad by hand: B (still good) boots next, without a reboot.
    let out = node.ctl_ok(&["mark-bad"]);
    assert!(out.contains("slot A marked bad by hand"), "{out}");
    assert_eq!(node.status()["next_boot"], "B");
    assert_eq!(node.status()["health"], "marked-bad");
    let out = node.ctl_ok(&["mark-good"]);
    assert!(out.contains("slot A marked good by hand"), "{out}");
    assert!(node.disk.cgpt_prio(3).2);
    let kinds: Vec<String> = node
        .history()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    for k in ["rollback", "marked-bad", "marked-good"] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing: {kinds:?}");
    }
    assert!(node.reboots().is_empty());
}

#[test]
fn metrics_parse_with_prometheus_own_parser() {
    let rel = releases();
    let server = HttpServer::serve(&rel.www);
    let mut node = staged_node(&server, &rel, "");
    node.ctl_ok(&["check"]);
    let textfile = node.dir.path().join("tandem.prom");
    wait_until("the textfile", &node, || textfile.exists());
    for text in [
        node.ctl_ok(&["metrics"]),
        fs::read_to_string(&textfile).unwrap(),
    ] {
        let script = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        print(f"{s.name}|{labels}|{s.value}")
"#;
        // Debian's interpreter, which has python3-prometheus-client.
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "the parser refused:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let samples = String::from_utf8(out.stdout).unwrap();
        for want in [
            "tandem_info|booted_slot=A,booted_version=1.0.0,reboot_strategy=off,staged_version=2.0.0|1.0",
            "tandem_state|state=updated-need-reboot|1.0",
            "tandem_state|state=idle|0.0",
            "tandem_reboot_required||1.0",
            "tandem_updates_staged_total||1.0",
            "tandem_rollbacks_total|reason=health-check|0.0",
            "tandem_failures_total|kind=refused|0.0",
        ] {
            assert!(samples.lines().any(|l| l == want), "{want} not in:\n{samples}");
        }
        assert!(
            samples
                .lines()
                .any(|l| l.starts_with("tandem_last_check_timestamp_seconds||")),
            "{samples}"
        );
    }
    // Counters survive a restart.
    node.stop();
    node.start();
    assert!(node
        .ctl_ok(&["metrics"])
        .contains("tandem_updates_staged_total 1"));
}

/// The journal's native socket, played by the test: a datagram socket
/// bound in the node's folder and read all along by a thread, as journald
/// does. Each datagram is parsed by the protocol's rules (`KEY=value\n`,
/// or `KEY\n`, a u64 LE length, the value, `\n`).
struct JournalSocket {
    path: std::path::PathBuf,
    entries: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl JournalSocket {
    fn bind(path: std::path::PathBuf) -> JournalSocket {
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let entries = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = entries.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 17];
            while let Ok(n) = socket.recv(&mut buf) {
                sink.lock().unwrap().push(buf[..n].to_vec());
            }
        });
        JournalSocket { path, entries }
    }

    fn entries(&self) -> Vec<std::collections::BTreeMap<String, String>> {
        let raw = self.entries.lock().unwrap();
        raw.iter().map(|d| parse_entry(d)).collect()
    }
}

fn parse_entry(mut d: &[u8]) -> std::collections::BTreeMap<String, String> {
    let mut fields = std::collections::BTreeMap::new();
    while !d.is_empty() {
        let end = d.iter().position(|&b| b == b'\n' || b == b'=').unwrap();
        let key = String::from_utf8(d[..end].to_vec()).unwrap();
        assert!(
            key.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'),
            "{key:?}"
        );
        let value;
        if d[end] == b'=' {
            let stop = end + 1 + d[end + 1..].iter().position(|&b| b == b'\n').unwrap();
            value = d[end + 1..stop].to_vec();
            d = &d[stop + 1..];
        } else {
            let len = u64::from_le_bytes(d[end + 1..end + 9].try_into().unwrap()) as usize;
            value = d[end + 9..end + 9 + len].to_vec();
            assert_eq!(d[end + 9 + len], b'\n');
            d = &d[end + 10 + len..];
        }
        fields.insert(key, String::from_utf8(value).unwrap());
    }
    fields
}

#[test]
fn events_reach_the_journal_with_their_fields_and_message_ids() {
    let rel = releases();
    let server = HttpServer::serve(&rel.www);
    rel.publish(1, vec![rel.release("2.0.0", false)], in_days(7), None);
    let mut node = Node::new(&server, &rel);
    let journal = JournalSocket::bind(node.dir.path().join("journal.socket"));
    node.daemon_args = vec![
        "--log".into(),
        "journal".into(),
        "--journal-socket".into(),
        journal.path.display().to_string(),
    ];
    node.start();
    node.wait_health();
    node.ctl_ok(&["apply"]);
    node.health_script("50-kubelet", "echo 'no CNI'\nexit 3");
    assert_eq!(node.reboot(["1.0.0", "2.0.0"]), "B");
    assert_eq!(node.wait_health()["health"], "failed");
    wait_until("the rollback's reboot", &node, || {
        !node.reboots().is_empty()
    });

    let entries = journal.entries();
    let of = |kind: &str| {
        entries
            .iter()
            .find(|e| e.get("TANDEM_EVENT").map(String::as_str) == Some(kind))
            .unwrap_or_else(|| panic!("no {kind} entry in {entries:#?}"))
    };
    for (kind, id, priority) in [
        ("staged", "5f94039085d54334b914f31348890608", "6"),
        ("booted", "a3f7c7d418684d32ac0b41f2cdbb9ec3", "6"),
        ("health-failed", "e4c4c6043fcf48db991e6d871a1610ec", "4"),
        ("rollback", "dd2ae058008b491788b05f422c195433", "4"),
        ("reboot", "e4218dcf4e204cdea10b0cd7f3ed2a1c", "6"),
    ] {
        let e = of(kind);
        assert_eq!(e["MESSAGE_ID"], id, "{e:#?}");
        assert_eq!(e["PRIORITY"], priority, "{e:#?}");
        assert_eq!(e["SYSLOG_IDENTIFIER"], "tandemd");
        assert_eq!(e["TANDEM_VERSION"], "2.0.0", "{e:#?}");
        assert!(e["MESSAGE"].starts_with(&format!("{kind}: ")), "{e:#?}");
        assert!(e["CODE_FILE"].ends_with(".rs"), "{e:#?}");
    }
    assert!(of("health-failed")["MESSAGE"].contains("50-kubelet"));
    // Nothing went to stderr: every line reached the journal.
    let stderr = node.log_text();
    assert!(!stderr.contains("health-failed"), "{stderr}");
}

/// A journal that stalls (its queue full: nobody reads the socket) does
/// not stall the daemon; what it cannot take goes to stderr.
#[test]
fn a_journal_that_stalls_does_not_stall_the_daemon() {
    let rel = releases();
    let server = HttpServer::serve(&rel.www);
    rel.publish(1, vec![rel.release("2.0.0", false)], in_days(7), None);
    let mut node = Node::new(&server, &rel);
    let path = node.dir.path().join("stalled.socket");
    let _never_read = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    node.daemon_args = vec![
        "--log".into(),
        "journal".into(),
        "--journal-socket".into(),
        path.display().to_string(),
    ];
    node.start();
    let out = node.ctl_ok(&["apply"]);
    assert!(out.contains("2.0.0 staged in slot B"), "{out}");
    let stderr = node.log_text();
    assert!(stderr.contains("staged: "), "{stderr}");
    assert!(stderr.contains("the journal refused it"), "{stderr}");
}
