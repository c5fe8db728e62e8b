//! End-to-end tests of stage, finalize and commit: `tandemd` as a process
//! on a private `dbus-daemon`, a GPT disk image read back by `cgpt`,
//! payloads over HTTP on 127.0.0.1. The reboot is simulated as in
//! `health.rs` (GRUB's `gptprio.next` rule run on the image, a new boot id,
//! tandemd started again); the reboot action is a recorder.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{in_days, payload_bytes_served, releases, Node};
use tandem_testkit::http::HttpServer;

#[test]
fn a_staged_slot_never_boots_until_finalize_which_reboots_once_and_health_commits() {
    let rel = releases();
    let server = HttpServer::serve(&rel.www);
    rel.publish(1, vec![rel.release("2.0.0", false)], in_days(7), None);
    let mut node = Node::new(&server, &rel);
    // The immediate strategy would reboot at once after an apply: a stage
    // must not set it off.
    node.configure("60-immediate", "[reboot]\nstrategy = \"immediate\"\n");
    node.start();
    node.wait_health();

    let out = node.ctl_ok(&["stage"]);
    assert!(
        out.contains("2.0.0 staged in slot B, not set to boot"),
        "{out}"
    );
    let check_staged = |node: &Node, when: &str| {
        assert!(
            node.slot_bytes(4, rel.v2.len()) == rel.v2,
            "{when}: slot B is not v2"
        );
        // cgpt: B is not bootable at all (priority 0, no tries), A good.
        assert_eq!(node.disk.cgpt_prio(4), (0, 0, false), "{when}");
        assert!(node.disk.cgpt_prio(3).2, "{when}: A is not good");
        let s = node.status();
        assert_eq!(s["state"], "staged", "{when}: {s}");
        assert_eq!(s["staged"]["version"], "2.0.0", "{when}");
        assert_eq!(s["staged"]["finalized"], false, "{when}");
        assert_eq!(s["next_boot"], "A", "{when}: {s}");
        assert_eq!(s["reboot_required"], false, "{when}");
        assert!(node.reboots().is_empty(), "{when}: {:?}", node.reboots());
        assert!(
            !node.dir.path().join("reboot-required").exists(),
            "{when}: kured's file was written for an update that is only staged"
        );
    };
    check_staged(&node, "after stage");
    let human = node.ctl_ok(&["status"]);
    assert!(
        human.contains("not set to boot: updatectl finalize"),
        "{human}"
    );

    // A tandemd crash and an unplanned reboot keep it staged, on A.
    node.kill();
    node.start();
    check_staged(&node, "after a tandemd restart");
    assert_eq!(node.reboot(["1.0.0", "2.0.0"]), "A");
    node.wait_health();
    check_staged(&node, "after an unplanned reboot");
    let kinds = node.history_kinds();
    assert!(!kinds.iter().any(|k| k == "rollback"), "{kinds:?}");

    // Staging the same version again downloads nothing.
    let served = payload_bytes_served(&server, "full-2.0.0.tpl");
    node.ctl_ok(&["stage"]);
    assert_eq!(payload_bytes_served(&server, "full-2.0.0.tpl"), served);

    // Finalize: read back, set next, one reboot through the action.
    let out = node.ctl_ok(&["finalize"]);
    assert!(out.contains("boots next"), "{out}");
    let reboots = node.reboots();
    assert_eq!(reboots.len(), 1, "{reboots:?}");
    assert!(reboots[0].contains("finalize"), "{reboots:?}");
    node.assert_staged_v2(&rel);
    let s = node.status();
    assert_eq!(s["staged"]["finalized"], true, "{s}");
    // The strategy does not reboot a second time.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(node.reboots().len(), 1, "{:?}", node.reboots());
    let kinds = node.history_kinds();
    assert!(kinds.iter().any(|k| k == "finalized"), "{kinds:?}");

    // Commit: booted into B, health passes, B marked good.
    assert_eq!(node.reboot(["1.0.0", "2.0.0"]), "B");
    let s = node.wait_health();
    assert_eq!(s["health"], "passed", "{s}");
    assert!(node.disk.cgpt_prio(4).2);
    assert_eq!(s["booted_version"], "2.0.0");
    assert!(s["staged"].is_null(), "{s}");
}

#[test]
fn finalize_refuses_a_staged_slot_that_changed_and_sets_nothing_next() {
    let rel = releases();
    let server = HttpServer::serve(&rel.www);
    rel.publish(1, vec![rel.release("2.0.0", false)], in_days(7), None);
    let mut node = Node::new(&server, &rel);
    node.start();
    node.wait_health();
    node.ctl_ok(&["stage", "--json"]);
    // Something else writes into the staged slot after it was verified.
    let mut first = node.slot_bytes(4, 4096);
    first[100] ^= 0xff;
    node.write_slot(4, &first);

    let err = node.ctl_err(&["finalize", "--no-reboot"]);
    assert!(err.contains("no longer holds the staged 2.0.0"), "{err}");
    assert_eq!(node.disk.cgpt_prio(4), (0, 0, false));
    assert!(node.reboots().is_empty());
    let s = node.status();
    assert!(s["staged"].is_null(), "{s}");
    assert_eq!(s["state"], "idle", "{s}");
    assert_eq!(s["next_boot"], "A", "{s}");
    let err = node.ctl_err(&["finalize"]);
    assert!(err.contains("no update is staged"), "{err}");
}

#[test]
fn apply_after_stage_finalizes_what_is_staged_without_a_download() {
    let rel = releases();
    let server = HttpServer::serve(&rel.www);
    rel.publish(1, vec![rel.release("2.0.0", false)], in_days(7), None);
    let mut node = Node::new(&server, &rel);
    node.start();
    node.wait_health();
    node.ctl_ok(&["stage"]);
    let served = payload_bytes_served(&server, "full-2.0.0.tpl");
    assert!(served > 0);
    let out = node.ctl_ok(&["apply"]);
    assert!(out.contains("2.0.0 staged in slot B"), "{out}");
    assert_eq!(payload_bytes_served(&server, "full-2.0.0.tpl"), served);
    node.assert_staged_v2(&rel);
    // Strategy off: nothing rebooted, kured's file written.
    assert!(node.reboots().is_empty());
    node.wait_for("kured's file", |s| !s["reboot"].is_null());
    assert!(node.dir.path().join("reboot-required").exists());
}
