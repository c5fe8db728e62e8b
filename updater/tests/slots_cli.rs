//! `updatectl slots` against disk images made by sgdisk, every transition
//! checked twice: through updatectl's own JSON and by `cgpt` reading the
//! bits back. Bytes outside the GPT copies must never change.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

use serde_json::Value;
use tandem_testkit::{assert_only_gpt_changed, DiskImage, TempDir};

fn updatectl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_updatectl"))
        .args(args)
        // Keep the machine's own command line out of it.
        .args(["--cmdline", "/dev/null"])
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = updatectl(args);
    assert!(
        out.status.success(),
        "updatectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(image: &DiskImage) -> Value {
    serde_json::from_str(&ok(&["slots", "--disk", image.path_str(), "--json"])).unwrap()
}

/// Runs a command that must fail: one line on stderr naming the problem,
/// non-zero exit, and the image byte-for-byte unchanged.
fn refused(image: &DiskImage, args: &[&str], expect: &str) {
    let before = image.bytes();
    let out = updatectl(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "updatectl {args:?} should fail");
    assert!(
        stderr.contains(expect),
        "stderr {stderr:?} should mention {expect:?}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
    assert!(
        image.bytes() == before,
        "image changed by a refused command"
    );
}

#[test]
fn set_next_mark_good_mark_bad_as_cgpt_reads_them() {
    let dir = TempDir::new("cli-flow");
    let image = DiskImage::flatcar(dir.path());
    let disk = image.path_str();
    let a_before = image.cgpt_prio(3);
    assert_eq!(a_before, (1, 0, true));

    let before = image.bytes();
    ok(&["slots", "set-next", "B", "--disk", disk]);
    let (b_prio, b_tries, b_ok) = image.cgpt_prio(4);
    assert!(
        b_prio > a_before.0,
        "B priority {b_prio} above A's {}",
        a_before.0
    );
    assert_eq!((b_tries, b_ok), (1, false));
    assert_eq!(image.cgpt_prio(3), a_before, "A unchanged");
    assert_eq!(
        image.cgpt_field(3, "-A"),
        "0x101",
        "A's raw attribute bits unchanged"
    );
    let after = image.bytes();
    assert_ne!(before, after, "the GPT was written");
    assert_only_gpt_changed(&image, &before, &after);
    assert_eq!(json(&image)["next_boot"], "B");

    ok(&["slots", "mark-good", "B", "--disk", disk]);
    assert_eq!(image.cgpt_prio(4), (b_prio, 0, true));
    let state = json(&image);
    assert_eq!(state["slots"][1]["boot"]["status"], "good");
    assert_eq!(state["next_boot"], "B");

    let before = image.bytes();
    ok(&["slots", "mark-bad", "B", "--disk", disk]);
    assert_eq!(image.cgpt_prio(4), (0, 0, false));
    assert_eq!(image.cgpt_prio(3), a_before);
    assert_eq!(json(&image)["next_boot"], "A", "A first after mark-bad B");
    assert_only_gpt_changed(&image, &before, &image.bytes());
}

#[test]
fn set_next_with_tries_and_cancel() {
    let dir = TempDir::new("cli-cancel");
    let image = DiskImage::flatcar(dir.path());
    let disk = image.path_str();
    ok(&["slots", "set-next", "B", "--tries", "3", "--disk", disk]);
    assert_eq!(image.cgpt_prio(4), (2, 3, false));
    ok(&["slots", "cancel", "--disk", disk]);
    assert_eq!(image.cgpt_prio(4), (0, 0, false));
    assert_eq!(image.cgpt_prio(3), (1, 0, true));
    refused(
        &image,
        &["slots", "cancel", "--disk", disk],
        "nothing to cancel",
    );
    refused(
        &image,
        &["slots", "set-next", "B", "--tries", "0", "--disk", disk],
        "tries",
    );
}

#[test]
fn reads_states_that_cgpt_writes() {
    let dir = TempDir::new("cli-cgpt");
    let image = DiskImage::flatcar(dir.path());
    for (prio, tries, successful) in [
        (5u8, 7u8, false),
        (15, 15, true),
        (0, 0, false),
        (3, 0, true),
    ] {
        let (p, t, s) = (
            prio.to_string(),
            tries.to_string(),
            u8::from(successful).to_string(),
        );
        image.cgpt_add(4, &["-P", &p, "-T", &t, "-S", &s]);
        let boot = &json(&image)["slots"][1]["boot"];
        assert_eq!(boot["priority"], prio);
        assert_eq!(boot["tries"], tries);
        assert_eq!(boot["successful"], successful);
    }
}

#[test]
fn repairs_a_corrupt_primary_gpt_from_the_backup() {
    let dir = TempDir::new("cli-repair");
    let image = DiskImage::flatcar(dir.path());
    let mut bytes = image.bytes();
    bytes[512 + 60] ^= 0xff; // inside the disk GUID: the header CRC no longer matches
    std::fs::write(&image.path, &bytes).unwrap();
    let shown = json(&image);
    assert_eq!(shown["gpt_primary"]["state"], "corrupt");
    assert_eq!(bytes, image.bytes(), "listing never writes");

    let out = updatectl(&["slots", "set-next", "B", "--disk", image.path_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("repaired: primary GPT is corrupt"),
        "says so: {stderr}"
    );
    assert_only_gpt_changed(&image, &bytes, &image.bytes());
    // sgdisk checks both copies and their CRCs on its own.
    let verify = tandem_testkit::run("sgdisk", &["-v", image.path_str()]);
    let report = String::from_utf8_lossy(&verify.stdout);
    assert!(report.contains("No problems found"), "{report}");
    assert_eq!(image.cgpt_prio(4), (2, 1, false));
    let shown = json(&image);
    assert_eq!(shown["gpt_primary"]["state"], "sound");
    assert_eq!(shown["gpt_backup"]["state"], "sound");
}

#[test]
fn refuses_broken_disks_without_writing() {
    let dir = TempDir::new("cli-broken");
    let image = DiskImage::flatcar(dir.path());
    let mut bytes = image.bytes();
    bytes[512 + 60] ^= 0xff;
    let len = bytes.len();
    bytes[len - 512 + 60] ^= 0xff;
    std::fs::write(&image.path, &bytes).unwrap();
    refused(
        &image,
        &["slots", "set-next", "B", "--disk", image.path_str()],
        "no valid GPT",
    );
    refused(
        &image,
        &["slots", "--disk", image.path_str()],
        "no valid GPT",
    );

    let dir = TempDir::new("cli-truncated");
    let image = DiskImage::flatcar(dir.path());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&image.path)
        .unwrap();
    file.set_len(48 << 20).unwrap();
    drop(file);
    refused(
        &image,
        &["slots", "set-next", "B", "--disk", image.path_str()],
        "truncated",
    );

    let dir = TempDir::new("cli-nolabel");
    let image = DiskImage::with_labels(dir.path(), "ROOT-A", "USR-B");
    refused(
        &image,
        &["slots", "set-next", "B", "--disk", image.path_str()],
        "no partition labelled \"USR-A\"",
    );

    let missing = dir.path().join("nope.img");
    refused(
        &image,
        &["slots", "--disk", missing.to_str().unwrap()],
        "cannot open",
    );
}

#[test]
fn refuses_to_leave_no_bootable_slot() {
    let dir = TempDir::new("cli-brick");
    let image = DiskImage::flatcar(dir.path());
    // A is good; B was never set up: marking A bad would leave nothing to boot.
    refused(
        &image,
        &["slots", "mark-bad", "A", "--disk", image.path_str()],
        "nothing would boot",
    );
}

#[test]
fn names_the_booted_slot_from_the_command_line() {
    let dir = TempDir::new("cli-booted");
    let image = DiskImage::flatcar(dir.path());
    let cmdline = dir.path().join("cmdline");
    std::fs::write(
        &cmdline,
        format!(
            "root=LABEL=ROOT mount.usr=PARTUUID={} ro\n",
            image.partuuid(4)
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_updatectl"))
        .args(["slots", "--json", "--disk", image.path_str()])
        .args(["--cmdline", cmdline.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["booted"], "B");
    assert_eq!(shown["slots"][1]["booted"], true);
    assert_eq!(shown["slots"][0]["booted"], false);

    // The caller may name the booted slot instead; cancel then spares it.
    let shown: Value = serde_json::from_str(&ok(&[
        "slots",
        "--json",
        "--disk",
        image.path_str(),
        "--booted",
        "A",
    ]))
    .unwrap();
    assert_eq!(shown["booted"], "A");

    // Without --disk the disk comes from the command line; one that names
    // no partition is a clear error.
    let out = updatectl(&["slots"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pass --disk"));
}

#[test]
fn bls_backend_through_updatectl() {
    use bootconfig::bls::{BootCounter, EntriesDir};
    let dir = TempDir::new("cli-bls");
    let image = DiskImage::flatcar(dir.path());
    let esp = TempDir::new("cli-bls-esp");
    let entries = EntriesDir::new(esp.path());
    entries
        .write(
            "tandem-a",
            None,
            &tandem_testkit::slot_entry("1.0", &image.partuuid(3)),
        )
        .unwrap();
    entries
        .write(
            "tandem-b",
            Some(BootCounter { left: 2, done: 1 }),
            &tandem_testkit::slot_entry("2.0", &image.partuuid(4)),
        )
        .unwrap();
    let esp_path = esp.path().to_str().unwrap();
    let disk = image.path_str();
    let gpt_before = image.bytes();
    let shown: Value =
        serde_json::from_str(&ok(&["slots", "--disk", disk, "--esp", esp_path, "--json"])).unwrap();
    assert_eq!(shown["backend"], "bls");
    assert_eq!(shown["next_boot"], "B");
    let b = &shown["slots"][1]["boot"];
    assert_eq!(b["entry"], "tandem-b+2-1.conf");
    assert_eq!(
        (b["tries_left"].clone(), b["tries_done"].clone()),
        (2.into(), 1.into())
    );
    assert_eq!(b["status"], "trying");

    ok(&["slots", "mark-bad", "B", "--disk", disk, "--esp", esp_path]);
    assert!(esp.path().join("loader/entries/tandem-b+0-1.conf").exists());
    let shown: Value =
        serde_json::from_str(&ok(&["slots", "--disk", disk, "--esp", esp_path, "--json"])).unwrap();
    assert_eq!(shown["next_boot"], "A");
    assert!(
        image.bytes() == gpt_before,
        "the BLS backend never writes the disk"
    );
}
