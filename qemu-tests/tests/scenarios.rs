//! The VM scenarios: real OVMF, systemd-boot, Debian kernel and reboots.
//! Every assertion is on what the guest printed (its reports, early boot
//! lines, console and agent output). Needs root, qemu-system-x86, ovmf,
//! systemd-boot-efi, debootstrap, mtools and dosfstools, and the binaries
//! built first: run them with `cargo xtask vm-test`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::OnceLock;

use serde_json::Value;
use tandem_qemu_tests::build::Built;
use tandem_qemu_tests::scenario;
use tandem_qemu_tests::vm::{Report, VmOptions};

fn built() -> &'static Built {
    static BUILT: OnceLock<Result<Built, String>> = OnceLock::new();
    match BUILT.get_or_init(|| scenario::built_for_tests().map_err(|e| format!("{e:#}"))) {
        Ok(built) => built,
        Err(e) => panic!("{e}"),
    }
}

fn say(line: &str) {
    eprintln!("{line}");
}

fn kinds(report: &Report) -> Vec<String> {
    report
        .history_list()
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn event_text(event: &Value) -> String {
    format!(
        "{} {}",
        event["message"].as_str().unwrap_or_default(),
        event["output"].as_str().unwrap_or_default()
    )
}

#[test]
fn update_boots_the_new_slot_and_blesses_it() {
    let run = scenario::update(built(), VmOptions::default(), &say).unwrap();
    assert_eq!(run.before.version, "1.0.0");
    assert_eq!(run.before.slot(), "A");
    assert_eq!(
        run.before.entry_of("B"),
        None,
        "slot B starts with no entry"
    );
    let after = &run.after;
    assert_eq!(after.version, "2.0.0", "{after:#?}");
    assert_eq!(after.slot(), "B");
    assert_eq!(after.health_rc, 0, "updatectl health --wait passed");
    assert_eq!(after.status["health"], "passed");
    assert_eq!(after.status["booted"]["status"], "good");
    // Blessed: no boot counter left in the entry's name.
    assert_eq!(after.entry_of("B").as_deref(), Some("tandem-slot-b.conf"));
    assert_eq!(after.entry_of("A").as_deref(), Some("tandem-slot-a.conf"));
    let kinds = kinds(after);
    for kind in ["staged", "reboot", "health-passed"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} in {kinds:?}");
    }
    // The guest's journald stored tandemd's events natively: structured
    // fields, the MESSAGE_ID of the kind, the unit attached by journald.
    for (kind, id) in [
        ("booted", "a3f7c7d418684d32ac0b41f2cdbb9ec3"),
        ("health-passed", "3ee56cf7f45c410cb62ecad8810adf15"),
    ] {
        let entries = after.journal_events(kind);
        assert_eq!(entries.len(), 1, "{kind} in {:#}", after.journal);
        let e = &entries[0];
        assert_eq!(e["MESSAGE_ID"], id, "{e:#}");
        assert_eq!(e["TANDEM_VERSION"], "2.0.0", "{e:#}");
        assert_eq!(e["PRIORITY"], "6", "{e:#}");
        assert_eq!(e["_SYSTEMD_UNIT"], "tandemd.service", "{e:#}");
    }
    // The kernel really came from slot B's partition (vda3).
    let last = run.boots.last().unwrap();
    assert_eq!(
        (last.version.as_str(), last.device.as_str()),
        ("2.0.0", "vda3")
    );
}

#[test]
fn health_failure_rolls_back_to_the_old_slot() {
    let run = scenario::health_failure(built(), VmOptions::default(), &say).unwrap();
    assert_eq!(run.before.version, "2.0.0");
    assert!(
        run.boots
            .iter()
            .any(|b| b.version == "3.0.0" && b.device == "vda3"),
        "3.0.0 booted from slot B: {:?}",
        run.boots
    );
    let after = &run.after;
    assert_eq!(after.version, "2.0.0");
    assert_eq!(after.slot(), "A");
    assert_eq!(after.status["booted"]["status"], "good");
    let failed = after.events("health-failed");
    assert_eq!(failed.len(), 1, "{:#?}", after.history);
    assert_eq!(failed[0]["version"], "3.0.0");
    let text = event_text(&failed[0]);
    assert!(
        text.contains("50-vm-fails"),
        "the failed check is named: {text}"
    );
    assert!(text.contains("containerd did not come up"), "{text}");
    assert!(!after.events("rollback").is_empty(), "{:#?}", after.history);
    // B is marked bad: zero tries left, so systemd-boot sorts it last.
    let b = after.entry_of("B").unwrap();
    assert!(b.starts_with("tandem-slot-b+0"), "{b}");
    assert!(
        after.status["blocked"]["3.0.0"].is_string(),
        "{}",
        after.status
    );
}

#[test]
fn never_booting_update_falls_back_and_is_not_staged_again() {
    let run = scenario::never_boots(built(), VmOptions::default(), &say).unwrap();
    assert_eq!(run.before.version, "2.0.0");
    assert!(
        run.between.contains("No init found"),
        "4.0.0's initrd found no init"
    );
    assert!(
        !run.boots.iter().any(|b| b.version == "4.0.0"),
        "4.0.0 never reached userspace: {:?}",
        run.boots
    );
    let after = &run.after;
    assert_eq!(after.version, "2.0.0");
    assert_eq!(after.slot(), "A");
    let rollbacks = after.events("rollback");
    assert_eq!(rollbacks.len(), 1, "{:#?}", after.history);
    assert_eq!(rollbacks[0]["version"], "4.0.0");
    assert!(
        event_text(&rollbacks[0]).contains("did not boot"),
        "{:?}",
        rollbacks[0]
    );
    assert!(
        after.status["blocked"]["4.0.0"].is_string(),
        "{}",
        after.status
    );
    let (rc, output) = &run.apply_again;
    assert_ne!(*rc, 0, "apply of the newest (4.0.0) is refused: {output}");
    assert!(output.contains("4.0.0"), "{output}");
    assert!(run.status_after["staged"].is_null(), "{}", run.status_after);
    assert_eq!(run.status_after["other"]["status"], "unbootable");
}

#[test]
fn power_cut_mid_write_resumes_from_the_checkpoint() {
    // 8 MiB/s: the slot's 256 MiB take half a minute to write.
    let run = scenario::power_cut(built(), 8 << 20, 0.4, &say).unwrap();
    assert_eq!(run.before.version, "1.0.0");
    let fraction = run.progress_at_cut["fraction"].as_f64().unwrap();
    assert!((0.4..1.0).contains(&fraction), "{}", run.progress_at_cut);
    // After the cut the node came up on the old version, from slot A ...
    let ones: Vec<_> = run.boots.iter().filter(|b| b.version == "1.0.0").collect();
    assert!(
        ones.len() >= 2,
        "1.0.0 booted again after the cut: {:?}",
        run.boots
    );
    assert!(ones.iter().all(|b| b.device == "vda2"));
    // ... and the update went on from its checkpoint, then booted.
    let after = &run.after;
    assert_eq!(after.version, "2.0.0");
    assert_eq!(after.slot(), "B");
    assert_eq!(after.status["health"], "passed");
    assert!(!after.events("resumed").is_empty(), "{:#?}", after.history);
    let checkpoint = after.events("checkpoint");
    assert_eq!(checkpoint.len(), 1, "{:#?}", after.history);
    let text = event_text(&checkpoint[0]);
    let at: u64 = text
        .split("operation ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(at > 0, "resumed past the first operation: {text}");
    assert_eq!(after.events("staged").len(), 1);
}
