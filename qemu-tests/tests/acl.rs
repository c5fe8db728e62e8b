//! The ACL-layout scenarios: a disk of USR and HASH partitions, signed
//! UKIs (unsigned here) as systemd-boot type #2 entries, `/usr` opened
//! through dm-verity from the UKI's command line. Every assertion is on
//! what the guest printed: its `/proc/cmdline`, `dmsetup table usr`,
//! tandem's status and history, the ESP's entries. Run with
//! `cargo xtask vm-test`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::OnceLock;

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

/// The report shows the slot booted through dm-verity with `root`.
fn assert_verity(report: &Report, root: &str, partuuid_tail: &str) {
    assert!(
        report.cmdline.contains(&format!("usrhash={root}")),
        "{}",
        report.cmdline
    );
    assert!(
        report.cmdline.contains(&format!(
            "systemd.verity_usr_data=PARTUUID=7a1d0e11-0000-4000-8000-{partuuid_tail}"
        )),
        "{}",
        report.cmdline
    );
    // dmsetup's verity table: ... verity 1 DATA HASH 4096 4096 BLOCKS 1 sha256 ROOT SALT
    assert!(
        report.verity.contains(" verity 1 ") && report.verity.contains(root),
        "dmsetup table usr: {:?}",
        report.verity
    );
}

#[test]
fn acl_update_writes_usr_tree_and_uki_by_delta_and_boots_b_through_verity() {
    let b = built();
    let run = scenario::acl_update(b, VmOptions::default(), &say).unwrap();
    assert_eq!(
        (run.before.version.as_str(), run.before.slot().as_str()),
        ("1.0.0", "A")
    );
    assert_verity(&run.before, &b.acl.root_hashes[0], "000000000102");
    let after = &run.after;
    assert_eq!(
        (after.version.as_str(), after.slot().as_str()),
        ("2.0.0", "B"),
        "{after:#?}"
    );
    assert_verity(after, &b.acl.root_hashes[1], "000000000104");
    assert_eq!(after.status["health"], "passed");
    assert_eq!(
        after.entry_of("B").as_deref(),
        Some("tandem-slot-b.efi"),
        "blessed"
    );
    assert_eq!(after.entry_of("A").as_deref(), Some("tandem-slot-a.efi"));
    let staged = after.events("staged");
    let message = staged.last().unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("delta payload"), "{message}");
}

#[test]
fn acl_a_tree_corrupted_after_staging_is_refused_and_a_keeps_booting() {
    let b = built();
    let run = scenario::acl_tree_corrupted(b, &say).unwrap();
    let (rc, out) = &run.finalize;
    assert_ne!(*rc, 0, "{out}");
    assert!(out.contains("dm-verity check failed"), "{out}");
    assert!(out.contains("hash tree level 0"), "{out}");
    let after = &run.run.after;
    assert_eq!(
        (after.version.as_str(), after.slot().as_str()),
        ("1.0.0", "A")
    );
    assert_verity(after, &b.acl.root_hashes[0], "000000000102");
    assert_eq!(after.status["next_boot"], "A", "{}", after.status);
    // B's UKI is on the ESP but was never given a try.
    assert_eq!(after.entry_of("B").as_deref(), Some("tandem-slot-b+0.efi"));
    assert!(
        run.run.boots.iter().all(|l| l.version == "1.0.0"),
        "{:?}",
        run.run.boots
    );
}

#[test]
fn acl_a_usr_block_corrupted_after_the_flip_fails_verity_and_falls_back_to_a() {
    let b = built();
    let run = scenario::acl_usr_corrupted(b, &say).unwrap();
    // The kernel's dm-verity found the block and the boot failed.
    assert!(
        run.between.contains("device-mapper: verity") && run.between.contains("is corrupted"),
        "no verity error on the console of B's boot:\n{}",
        tandem_qemu_tests::vm::tail(&run.between, 40)
    );
    let after = &run.run.after;
    assert_eq!(
        (after.version.as_str(), after.slot().as_str()),
        ("1.0.0", "A")
    );
    assert!(
        run.run.boots.iter().all(|l| l.version == "1.0.0"),
        "2.0.0 reached userspace"
    );
    // systemd-boot spent B's one try; tandem recorded it.
    assert_eq!(
        after.entry_of("B").as_deref(),
        Some("tandem-slot-b+0-1.efi")
    );
    let rollback = after.events("rollback");
    let text = rollback.last().expect("a rollback event")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.contains("did not boot"), "{text}");
    assert!(
        after.status["blocked"].to_string().contains("2.0.0"),
        "{}",
        after.status
    );
}

#[test]
fn acl_a_power_cut_while_the_uki_is_written_leaves_a_bootable_esp() {
    let b = built();
    let run = scenario::acl_power_cut(b, 8 << 20, &say).unwrap();
    let boots = &run.boots;
    // The boot after the cut is A's (the ESP boots), then the resumed
    // update boots B.
    let after_cut = &boots[1];
    assert_eq!(after_cut.version, "1.0.0", "{boots:?}");
    assert_eq!(run.after.version, "2.0.0");
    assert_eq!(run.after.slot(), "B");
    assert_verity(&run.after, &b.acl.root_hashes[1], "000000000104");
    assert_eq!(
        run.after.entry_of("B").as_deref(),
        Some("tandem-slot-b.efi")
    );
}
