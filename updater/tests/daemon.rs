//! End-to-end tests of `tandemd` and `updatectl` with real parts: a private
//! `dbus-daemon` with the shipped policy, `tandemd` as a process, an HTTP
//! server on 127.0.0.1 serving a signed index and payloads made by the
//! payload library, and GPT disk images made by `sgdisk` and read back by
//! `cgpt`. Run as root (`cargo xtask test` in CI): the daemon owns its bus
//! name as root, and one test drops to `nobody`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use payload::SigningKey;
use serde_json::Value;

use common::{in_days, payload_bytes_served, releases, schema_errors, Node, MIB};
use tandem_testkit::http::{Fault, HttpServer};

#[test]
fn updatectl_apply_stages_slot_b_from_the_delta() {
    let rel = releases();
    rel.publish(1, vec![rel.release("2.0.0", true)], in_days(7), None);
    let server = HttpServer::serve(&rel.www);
    let mut node = Node::new(&server, &rel);
    node.start();
    let s = node.status();
    assert_eq!(s["state"], "idle");
    assert_eq!(s["booted"]["slot"], "A");
    let check = node.ctl_ok(&["check"]);
    assert!(check.contains("Update available: 2.0.0"), "{check}");
    let out = node.ctl_ok(&["apply"]);
    assert!(out.contains("2.0.0 staged in slot B"), "{out}");
    node.assert_staged_v2(&rel);
    // The delta was used; the full payload was never fetched.
    assert!(!server.log_of("delta-1.0.0-2.0.0.tpl").is_empty());
    assert!(server.log_of("full-2.0.0.tpl").is_empty());
    let kinds = node.history_kinds();
    assert!(kinds.contains(&"staged".to_string()), "{kinds:?}");
    // Properties for watchers, over plain D-Bus.
    let human = node.ctl_ok(&["status"]);
    assert!(human.contains("2.0.0 in slot B"), "{human}");
    // Asking again is a no-op: the version is staged already.
    let again = node.ctl_ok(&["apply"]);
    assert!(again.contains("2.0.0 staged in slot B"), "{again}");
}

/// The schema check is real: the staged node's own status passes (in
/// `Node::status`, as every status the tests read does), and documents that
/// drift from it one way or another do not.
#[test]
fn the_status_schema_takes_real_status_and_refuses_drift() {
    let rel = releases();
    rel.publish(1, vec![rel.release("2.0.0", true)], in_days(7), None);
    let server = HttpServer::serve(&rel.www);
    let mut node = Node::new(&server, &rel);
    node.start();
    node.ctl_ok(&["apply"]);
    let s = node.status();
    assert_eq!(s["state"], "updated-need-reboot");
    assert_eq!(s["staged"]["version"], "2.0.0");
    assert!(s["last_result"]["ok"].as_bool().unwrap());

    let drifted = |change: &dyn Fn(&mut serde_json::Value)| {
        let mut d = s.clone();
        change(&mut d);
        schema_errors(&d).expect_err("the drifted document should be refused")
    };
    let e = drifted(&|d| d["new_field"] = true.into());
    assert!(e.contains("new_field"), "{e}");
    let e = drifted(&|d| {
        d.as_object_mut().unwrap().remove("health");
    });
    assert!(e.contains("health"), "{e}");
    let e = drifted(&|d| d["state"] = "sleeping".into());
    assert!(e.starts_with("/state:"), "{e}");
    let e = drifted(&|d| d["staged"]["slot"] = "C".into());
    assert!(e.starts_with("/staged/slot:"), "{e}");
    let e = drifted(&|d| d["format_version"] = 2.into());
    assert!(e.starts_with("/format_version:"), "{e}");
}

#[test]
fn the_full_payload_is_used_without_a_delta_or_when_the_source_differs() {
    let rel = releases();
    let server = HttpServer::serve(&rel.www);

    // No delta for the booted version.
    rel.publish(1, vec![rel.release("2.0.0", false)], in_days(7), None);
    let mut node = Node::new(&server, &rel);
    node.start();
    node.ctl_ok(&["apply"]);
    node.assert_staged_v2(&rel);
    assert!(!server.log_of("full-2.0.0.tpl").is_empty());
    drop(node);

    // A delta whose source is not what slot A holds.
    rel.publish(2, vec![rel.release("2.0.0", true)], in_days(7), None);
    let mut node = Node::new(&server, &rel);
    let mut changed = rel.v1.clone();
    changed[5 * MIB] ^= 0x55;
    node.write_slot(3, &changed);
    node.start();
    let before_full = server.log_of("full-2.0.0.tpl").len();
    node.ctl_ok(&["apply"]);
    assert!(node.slot_bytes(4, rel.v2.len()) == rel.v2);
    assert!(server.log_of("full-2.0.0.tpl").len() > before_full);
    assert!(node.history_kinds().contains(&"fallback".to_string()));
    assert_eq!(node.status()["state"], "updated-need-reboot");
    drop(node);

    // A delta in a format version this tandem does not read (as an older
    // node sees a newer format): refused before writing, the full payload
    // taken instead.
    rel.publish(3, vec![rel.release("2.0.0", true)], in_days(7), None);
    let delta = rel.www.join("delta-1.0.0-2.0.0.tpl");
    let mut bytes = fs::read(&delta).unwrap();
    let mut head = [0u8; payload::format::HEADER_LEN];
    head.copy_from_slice(&bytes[..payload::format::HEADER_LEN]);
    let future = payload::format::Header {
        version: payload::format::FORMAT_VERSION + 1,
        ..payload::format::Header::decode(&head).unwrap()
    };
    bytes[..payload::format::HEADER_LEN].copy_from_slice(&future.encode());
    fs::write(&delta, &bytes).unwrap();
    let mut node = Node::new(&server, &rel);
    node.start();
    let before_full = server.log_of("full-2.0.0.tpl").len();
    node.ctl_ok(&["apply"]);
    node.assert_staged_v2(&rel);
    assert!(server.log_of("full-2.0.0.tpl").len() > before_full);
    let said = node.ctl_ok(&["history", "--json"]);
    assert!(
        said.contains("cannot read the delta") && said.contains("format version"),
        "{said}"
    );
}

#[test]
fn dropped_stalled_failing_and_lying_servers_are_resumed_with_ranges() {
    let rel = releases();
    rel.publish(1, vec![rel.release("2.0.0", false)], in_days(7), None);
    let server = HttpServer::serve(&rel.www);
    let name = "full-2.0.0.tpl";
    let size = fs::metadata(rel.www.join(name)).unwrap().len();
    for fault in [
        Fault::ServerError,
        Fault::ServerError,
        Fault::ServerError,
        Fault::DropAfter(300_000),
        Fault::ShortLength(size / 2),
        Fault::StallAfter(200_000, Duration::from_secs(4)),
        Fault::DropAfter(100_000),
    ] {
        server.fault(name, fault);
    }
    let mut node = Node::new(&server, &rel);
    node.start();
    node.ctl_ok(&["apply"]);
    node.assert_staged_v2(&rel);
    let log = server.log_of(name);
    let ranged: Vec<u64> = log
        .iter()
        .filter_map(|s| s.range_start)
        .filter(|&s| s > 0)
        .collect();
    assert!(ranged.len() >= 4, "{log:?}");
    // Each resume starts where the last body stopped: nothing twice.
    assert!(
        payload_bytes_served(&server, name) <= size + 64 * 1024,
        "{} bytes served for a {size}-byte payload: {log:?}",
        payload_bytes_served(&server, name)
    );
    assert!(log.iter().filter(|s| s.status == 500).count() == 3);
    let text = node.log_text();
    assert!(text.contains("resumed at byte"), "{text}");
}

#[test]
fn tandemd_killed_mid_apply_resumes_from_its_checkpoint() {
    let rel = releases();
    rel.publish(1, vec![rel.release("2.0.0", false)], in_days(7), None);
    let server = HttpServer::serve(&rel.www);
    let name = "full-2.0.0.tpl";
    let size = fs::metadata(rel.www.join(name)).unwrap().len();
    // About six seconds for the whole payload.
    server.set_rate((size / 6).max(64 * 1024));
    let mut node = Node::new(&server, &rel);
    node.start();
    // The client waits for the result; it ends with the first daemon.
    let mut client = Some(
        Command::new(env!("CARGO_BIN_EXE_updatectl"))
            .arg("apply")
            .env("DBUS_SYSTEM_BUS_ADDRESS", node.bus.address())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for at in [2 * MIB as u64, 5 * MIB as u64] {
        let s = node.wait_for("progress", |s| {
            s["progress"]["done_bytes"].as_u64().unwrap_or(0) >= at
        });
        assert_eq!(s["state"], "downloading");
        node.kill();
        if let Some(mut c) = client.take() {
            assert!(
                !c.wait().unwrap().success(),
                "the client saw its daemon die"
            );
        }
        // Restarted, the daemon resumes the recorded update by itself.
        node.start();
    }
    node.wait_for("staged", |s| s["state"] == "updated-need-reboot");
    node.assert_staged_v2(&rel);
    let served = payload_bytes_served(&server, name);
    assert!(
        served < size + size / 2,
        "{served} bytes served for a {size}-byte payload: {:?}",
        server.log_of(name)
    );
    let kinds = node.history_kinds();
    assert_eq!(
        kinds.iter().filter(|k| *k == "resumed").count(),
        2,
        "{kinds:?}"
    );
    assert!(server
        .log_of(name)
        .iter()
        .any(|s| s.range_start.is_some_and(|r| r > 0)));
}

#[test]
fn bad_indexes_payloads_and_downgrades_are_refused_and_change_nothing() {
    let rel = releases();
    let server = HttpServer::serve(&rel.www);
    rel.publish(5, vec![rel.release("2.0.0", false)], in_days(7), None);
    let mut node = Node::new(&server, &rel);
    node.start();
    node.ctl_ok(&["check"]); // serial 5 accepted
    let before = fs::read(&node.disk.path).unwrap();
    let unchanged = |node: &Node, what: &str| {
        assert!(
            fs::read(&node.disk.path).unwrap() == before,
            "{what}: the disk changed"
        );
        let s = node.status();
        assert_eq!(s["state"], "idle", "{what}: {s}");
        assert!(s["staged"].is_null(), "{what}");
    };

    rel.publish(4, vec![rel.release("2.0.0", false)], in_days(7), None);
    let err = node.ctl_err(&["apply"]);
    assert!(err.contains("older than the last accepted"), "{err}");
    unchanged(&node, "lower serial");

    rel.publish(
        6,
        vec![rel.release("2.0.0", false)],
        SystemTime::now() - Duration::from_secs(60),
        None,
    );
    let err = node.ctl_err(&["apply"]);
    assert!(err.contains("expired"), "{err}");
    unchanged(&node, "expired");

    let (other, _) = payload::sign::generate_key("mallory <m@evil.invalid>").unwrap();
    let other = SigningKey::from_bytes(other.as_bytes()).unwrap();
    rel.publish(
        7,
        vec![rel.release("2.0.0", false)],
        in_days(7),
        Some(&other),
    );
    let err = node.ctl_err(&["apply"]);
    assert!(err.contains("signature"), "{err}");
    unchanged(&node, "bad signature");

    // A validly signed payload, but not the one the index names.
    rel.publish(8, vec![rel.release("2.0.0", false)], in_days(7), None);
    let good = fs::read(rel.www.join("full-2.0.0.tpl")).unwrap();
    fs::copy(
        rel.www.join("full-1.0.0.tpl"),
        rel.www.join("full-2.0.0.tpl"),
    )
    .unwrap();
    let err = node.ctl_err(&["apply"]);
    assert!(err.contains("the index says"), "{err}");
    unchanged(&node, "payload hash");
    fs::write(rel.www.join("full-2.0.0.tpl"), good).unwrap();

    rel.publish(9, vec![rel.release("0.9.0", false)], in_days(7), None);
    let err = node.ctl_err(&["apply", "0.9.0"]);
    assert!(err.contains("--allow-downgrade"), "{err}");
    unchanged(&node, "downgrade");
    let path = rel.www.join("full-0.9.0.tpl");
    let err = node.ctl_err(&["apply", "--payload", path.to_str().unwrap()]);
    assert!(err.contains("--allow-downgrade"), "{err}");
    unchanged(&node, "downgrade by payload");
    let kinds = node.history_kinds();
    assert!(
        kinds.iter().filter(|k| *k == "refused").count() >= 5,
        "{kinds:?}"
    );
    // A person may downgrade on purpose.
    node.ctl_ok(&["apply", "0.9.0", "--allow-downgrade"]);
    assert_eq!(node.status()["staged"]["version"], "0.9.0");
    // An update that fails after slot B's boot state was cleared (the
    // payload's data is cut short) no longer reports 0.9.0 as staged, and
    // B does not boot.
    rel.publish(10, vec![rel.release("2.0.0", false)], in_days(7), None);
    let full = rel.www.join("full-2.0.0.tpl");
    let bytes = fs::read(&full).unwrap();
    fs::write(&full, &bytes[..bytes.len() / 2]).unwrap();
    node.ctl_err(&["apply"]);
    let s = node.status();
    assert!(s["staged"].is_null(), "{s}");
    assert_eq!(s["state"], "idle", "{s}");
    assert_eq!(node.disk.cgpt_prio(4), (0, 0, false));
    assert_eq!(s["next_boot"], "A");
}

#[test]
fn any_user_reads_the_status_but_only_root_may_apply() {
    let rel = releases();
    rel.publish(1, vec![rel.release("2.0.0", true)], in_days(7), None);
    let server = HttpServer::serve(&rel.www);
    let mut node = Node::new(&server, &rel);
    node.start();
    let bin = node.dir.path().join("bin");
    fs::create_dir_all(&bin).unwrap();
    let ctl = bin.join("updatectl");
    fs::copy(env!("CARGO_BIN_EXE_updatectl"), &ctl).unwrap();
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&ctl)
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", node.bus.address())
            .current_dir("/")
            .output()
            .unwrap()
    };
    let out = as_nobody(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["booted"]["slot"], "A");
    let out = as_nobody(&["history"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = fs::read(&node.disk.path).unwrap();
    for args in [&["apply"][..], &["check"], &["cancel"]] {
        let out = as_nobody(args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("AccessDenied"), "{args:?}: {err}");
    }
    assert!(fs::read(&node.disk.path).unwrap() == before);
    assert!(server.log_of("stable.json").is_empty());
}
