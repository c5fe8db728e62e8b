//! The crash sweep of `tandem-release apply --checkpoint`: the apply is
//! killed with SIGKILL at 20 points spread over a payload (between
//! operations, right after checkpoints, during the read-back, after the
//! read-back matched), then run again by the same command; every result
//! must be byte-identical to the signed image. The points are armed with
//! `TANDEM_FAILPOINT` (see `payload::failpoint`), so the process dies at
//! an exact place rather than after a guessed time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

use tandem_testkit::{noise, text, TempDir};

const TOOL: &str = env!("CARGO_BIN_EXE_tandem-release");
const MIB: usize = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run(args: &[&str], failpoint: Option<&str>) -> std::process::Output {
    let mut c = Command::new(TOOL);
    c.args(args);
    match failpoint {
        Some(f) => c.env(payload::failpoint::ENV, f),
        None => c.env_remove(payload::failpoint::ENV),
    };
    c.output().unwrap()
}

fn ok(args: &[&str]) -> serde_json::Value {
    let out = run(args, None);
    assert!(
        out.status.success(),
        "tandem-release {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// 40 MiB (three read-back segments) with a change in every MiB, so that
/// the delta has dozens of operations.
fn image_pair(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let mut old = Vec::with_capacity(40 * MIB);
    for i in 0..40u64 {
        if i % 3 == 0 {
            old.extend_from_slice(&noise(i, MIB));
        } else {
            old.extend_from_slice(&text(i, MIB));
        }
    }
    let mut new = old.clone();
    for i in 0..40usize {
        let at = i * MIB + (i * 7919) % (MIB / 2);
        match i % 4 {
            0 => new[at..at + 64 * 1024].copy_from_slice(&noise(100 + i as u64, 64 * 1024)),
            1 => new[at..at + 4096].fill(0),
            2 => new[at] ^= 0x5a,
            _ => new[at..at + 200_000].copy_from_slice(&text(200 + i as u64, 200_000)),
        }
    }
    let (o, n) = (dir.join("old.img"), dir.join("new.img"));
    fs::write(&o, old).unwrap();
    fs::write(&n, new).unwrap();
    (o, n)
}

#[test]
fn an_apply_killed_at_twenty_points_resumes_to_the_same_bytes() {
    let dir = TempDir::new("sweep");
    let (old, new) = image_pair(dir.path());
    let key = dir.path().join("key.asc");
    let keyring = dir.path().join("keyring.asc");
    ok(&[
        "keygen",
        "--user-id",
        "t <t@example.invalid>",
        "--secret",
        s(&key),
        "--public",
        s(&keyring),
    ]);
    // Made through the library with 128 KiB operations (as the engine's
    // tests do), so that the kill points fall between dozens of them; the
    // CLI's defaults would make two.
    let delta = dir.path().join("delta.tpl");
    let opts = payload::MakeOptions {
        level: 3,
        grouping: payload::plan::Grouping {
            literal_blocks: 32,
            bulk_blocks: 32,
        },
        ..payload::MakeOptions::default()
    };
    payload::make_payload(
        payload::ImageInput {
            path: &new,
            version: "2",
        },
        Some(payload::ImageInput {
            path: &old,
            version: "1",
        }),
        &payload::SigningKey::from_file(&key).unwrap(),
        &opts,
        &delta,
        &|_| {},
    )
    .unwrap();
    let want = fs::read(&new).unwrap();
    let slot = dir.path().join("slot.img");
    let checkpoint = dir.path().join("slot.checkpoint");
    let args = [
        "apply",
        s(&delta),
        "--keyring",
        s(&keyring),
        "--source",
        s(&old),
        "--target",
        s(&slot),
        "--checkpoint",
        s(&checkpoint),
        "--checkpoint-mib",
        "1",
        "--threads",
        "2",
        "--json",
        "--quiet",
    ];

    // A clean run, for the count of operations.
    let clean = ok(&args);
    let ops = clean["operations"].as_u64().unwrap();
    assert!(ops >= 30, "{clean}");
    assert!(fs::read(&slot).unwrap() == want);

    let mut points: Vec<String> = (1..=12)
        .map(|k| format!("apply-op:{}", 1 + (k * (ops - 1)) / 12))
        .collect();
    points.extend((1..=4).map(|k| format!("apply-checkpoint:{}", k * 4)));
    points.extend((1..=3).map(|k| format!("apply-readback:{k}")));
    points.push("apply-verified:1".into());
    assert_eq!(points.len(), 20);

    let mut resumed = Vec::new();
    for point in &points {
        fs::remove_file(&slot).unwrap();
        let _ = fs::remove_file(&checkpoint);
        let killed = run(&args, Some(point));
        assert_eq!(
            killed.status.signal(),
            Some(9),
            "{point}: not killed: {killed:?}"
        );
        if !point.starts_with("apply-op") {
            assert!(checkpoint.exists(), "{point}: no checkpoint stored");
        }
        let done = ok(&args);
        assert_eq!(done["outcome"], "complete", "{point}: {done}");
        let at = done["resumed_at_op"].as_u64().unwrap();
        if point.starts_with("apply-checkpoint") {
            assert!(at > 0, "{point}: resumed from the start: {done}");
        }
        assert!(
            fs::read(&slot).unwrap() == want,
            "{point}: the result differs from the signed image"
        );
        assert!(!checkpoint.exists(), "{point}: checkpoint left behind");
        resumed.push(format!("{point} -> op {at}"));
    }
    eprintln!("{} operations; resumed: {resumed:#?}", ops);
}
