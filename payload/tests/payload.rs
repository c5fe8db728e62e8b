//! Payloads end to end on generated images: round trips, resume, and every
//! way a payload, key or source can be wrong, each refused with a clear
//! error before a slot could be flipped to the result.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Cursor;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use payload::apply::ApplyProgress;
use payload::format::{Extent, Manifest, Operation};
use payload::{
    ApplyError, ApplyOptions, ApplyOutcome, ComponentPaths, ImageInput, Keyring, MakeOptions,
    PayloadError, SigningKey,
};
use tandem_testkit::{image_pair, TempDir};

struct Fixture {
    dir: TempDir,
    key: SigningKey,
    keyring: Keyring,
    source: PathBuf,
    target_image: PathBuf,
    target: Vec<u8>,
}

fn fixture(tag: &str) -> Fixture {
    let dir = TempDir::new(tag);
    let (secret, public) = payload::sign::generate_key("test <test@example.com>").unwrap();
    let key = SigningKey::from_bytes(secret.as_bytes()).unwrap();
    let keyring = Keyring::from_bytes(public.as_bytes()).unwrap();
    let (source, target) = image_pair();
    let source_path = dir.path().join("source.img");
    let target_path = dir.path().join("target.img");
    fs::write(&source_path, &source).unwrap();
    fs::write(&target_path, &target).unwrap();
    Fixture {
        dir,
        key,
        keyring,
        source: source_path,
        target_image: target_path,
        target,
    }
}

fn options() -> MakeOptions {
    // Small groups, so that even 8 MiB images make many operations.
    MakeOptions {
        grouping: payload::plan::Grouping {
            literal_blocks: 128,
            bulk_blocks: 256,
        },
        ..MakeOptions::default()
    }
}

impl Fixture {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn make(&self, delta: bool, name: &str) -> (PathBuf, Manifest) {
        let out = self.path(name);
        let source = ImageInput {
            path: &self.source,
            version: "1.0",
        };
        let manifest = payload::make_payload(
            ImageInput {
                path: &self.target_image,
                version: "2.0",
            },
            delta.then_some(source),
            &self.key,
            &options(),
            &out,
            &|_| {},
        )
        .unwrap();
        (out, manifest)
    }

    /// A slot pre-filled with a pattern, so untouched means byte-identical.
    fn slot(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, vec![0xa5u8; self.target.len()]).unwrap();
        p
    }

    fn apply_bytes(
        &self,
        payload: &[u8],
        slot: &Path,
        source: Option<&Path>,
        opts: &ApplyOptions,
    ) -> Result<ApplyOutcome, ApplyError> {
        payload::apply(
            Cursor::new(payload),
            &self.keyring,
            &[ComponentPaths {
                component: "usr".into(),
                target: slot.to_owned(),
                target_range: None,
                source: source.map(Path::to_owned),
                source_range: None,
            }],
            opts,
            &mut |_| ControlFlow::Continue(()),
        )
    }
}

fn assert_untouched(slot: &Path) {
    let bytes = fs::read(slot).unwrap();
    assert!(bytes.iter().all(|&b| b == 0xa5), "the slot was written");
}

#[test]
fn full_payload_round_trips() {
    let f = fixture("full");
    let (payload, manifest) = f.make(false, "full.tpl");
    assert!(!manifest.is_delta());
    let slot = f.slot("slot");
    let outcome = f
        .apply_bytes(
            &fs::read(&payload).unwrap(),
            &slot,
            None,
            &ApplyOptions::default(),
        )
        .unwrap();
    assert!(matches!(outcome, ApplyOutcome::Complete(_)));
    assert!(fs::read(&slot).unwrap() == f.target);
}

#[test]
fn delta_round_trips_and_is_small() {
    let f = fixture("delta");
    let (delta, manifest) = f.make(true, "delta.tpl");
    let (full, _) = f.make(false, "full.tpl");
    let stats = &payload::summary::summarize(&manifest)[0];
    assert!(stats.copy.target_bytes > 4 << 20, "{stats:?}");
    assert!(stats.patch.operations > 0, "{stats:?}");
    assert!(stats.zero.target_bytes > 0, "{stats:?}");
    let delta_len = fs::metadata(&delta).unwrap().len();
    let full_len = fs::metadata(&full).unwrap().len();
    // The moved 1 MiB of noise is copied, not shipped: only the new noise
    // (1 MiB) and small edits remain.
    assert!(
        delta_len < full_len / 2,
        "delta {delta_len} full {full_len}"
    );
    assert!(delta_len < (1 << 20) + (200 << 10), "delta {delta_len}");
    let slot = f.slot("slot");
    f.apply_bytes(
        &fs::read(&delta).unwrap(),
        &slot,
        Some(&f.source),
        &ApplyOptions::default(),
    )
    .unwrap();
    assert!(fs::read(&slot).unwrap() == f.target);
}

#[test]
fn interrupted_apply_resumes_from_its_checkpoint() {
    let f = fixture("resume");
    let (delta, manifest) = f.make(true, "delta.tpl");
    assert!(manifest.components[0].operations.len() > 4);
    let bytes = fs::read(&delta).unwrap();
    let slot = f.slot("slot");
    let checkpoint = f.path("apply.checkpoint");
    let opts = ApplyOptions {
        threads: 2,
        checkpoint: Some(checkpoint.clone()),
        checkpoint_every: 1 << 20,
        ..ApplyOptions::default()
    };
    let keyring = &f.keyring;
    let paths = [ComponentPaths {
        component: "usr".into(),
        target: slot.clone(),
        target_range: None,
        source: Some(f.source.clone()),
        source_range: None,
    }];
    let half = f.target.len() as u64 / 2;
    let outcome = payload::apply(
        Cursor::new(&bytes),
        keyring,
        &paths,
        &opts,
        &mut |p: &ApplyProgress| {
            if p.done_bytes >= half {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
    )
    .unwrap();
    let ApplyOutcome::Stopped(cp) = outcome else {
        panic!("expected a stop");
    };
    assert!(cp.next_op > 0 && cp.done_bytes >= half, "{cp:?}");
    assert!(checkpoint.exists());
    assert!(fs::read(&slot).unwrap() != f.target);
    // Resume: the second run must start at the checkpoint, not at zero.
    let mut first_seen = None;
    let outcome = payload::apply(
        Cursor::new(&bytes),
        keyring,
        &paths,
        &opts,
        &mut |p: &ApplyProgress| {
            if p.phase == payload::apply::Phase::Writing {
                first_seen.get_or_insert(p.done_bytes);
            }
            ControlFlow::Continue(())
        },
    )
    .unwrap();
    let ApplyOutcome::Complete(report) = outcome else {
        panic!("expected completion");
    };
    assert_eq!(report.resumed_at_op, cp.next_op);
    assert!(first_seen.unwrap() >= half);
    assert!(fs::read(&slot).unwrap() == f.target);
    assert!(!checkpoint.exists(), "checkpoint left after success");
}

#[test]
fn a_checkpoint_of_another_payload_is_ignored() {
    let f = fixture("foreign-cp");
    let (delta, _) = f.make(true, "delta.tpl");
    let checkpoint = f.path("cp");
    let foreign = payload::Checkpoint {
        format_version: 1,
        manifest_sha256: payload::format::Sha256Hex([7; 32]),
        next_op: 3,
        data_offset: 0,
        done_bytes: 1 << 20,
    };
    foreign.store(&checkpoint).unwrap();
    let slot = f.slot("slot");
    let opts = ApplyOptions {
        checkpoint: Some(checkpoint),
        ..ApplyOptions::default()
    };
    let outcome = f
        .apply_bytes(&fs::read(&delta).unwrap(), &slot, Some(&f.source), &opts)
        .unwrap();
    let ApplyOutcome::Complete(report) = outcome else {
        panic!()
    };
    assert_eq!(report.resumed_at_op, 0);
    assert!(fs::read(&slot).unwrap() == f.target);
}

/// Offsets of the sections of a payload file.
fn sections(bytes: &[u8]) -> (usize, usize, usize) {
    let mut raw = [0u8; 64];
    raw.copy_from_slice(&bytes[..64]);
    let h = payload::format::Header::decode(&raw).unwrap();
    let manifest = 64;
    let signature = manifest + h.manifest_len as usize;
    let data = signature + h.signature_len as usize;
    (manifest, signature, data)
}

#[test]
fn one_changed_byte_anywhere_is_refused() {
    let f = fixture("flip");
    let (delta, _) = f.make(true, "delta.tpl");
    let good = fs::read(&delta).unwrap();
    let (manifest, signature, data) = sections(&good);
    let cases = [
        ("manifest", manifest + 40),
        ("signature", signature + (data - signature) / 2),
        ("data blob", data + 10),
        ("last data byte", good.len() - 1),
    ];
    for (what, at) in cases {
        let mut bad = good.clone();
        bad[at] ^= 0x01;
        let slot = f.slot("slot");
        let err = f
            .apply_bytes(&bad, &slot, Some(&f.source), &ApplyOptions::default())
            .expect_err(what);
        let text = err.to_string();
        match what {
            "manifest" | "signature" => {
                assert!(
                    matches!(err, ApplyError::Payload(PayloadError::Signature(_))),
                    "{what}: {text}"
                );
                assert_untouched(&slot);
            }
            _ => assert!(matches!(err, ApplyError::BlobHash { .. }), "{what}: {text}"),
        }
        // The whole-file check says the same without any image.
        assert!(
            payload::container::verify_stream(&mut Cursor::new(&bad), &f.keyring).is_err(),
            "{what}"
        );
    }
}

#[test]
fn truncated_payloads_are_refused() {
    let f = fixture("trunc");
    let (delta, _) = f.make(true, "delta.tpl");
    let good = fs::read(&delta).unwrap();
    let (manifest, signature, data) = sections(&good);
    for cut in [
        0,
        10,
        63,
        manifest + 5,
        signature + 3,
        data,
        data + 100,
        good.len() - 1,
    ] {
        let slot = f.slot("slot");
        let err = f
            .apply_bytes(
                &good[..cut],
                &slot,
                Some(&f.source),
                &ApplyOptions::default(),
            )
            .expect_err("truncated payload applied");
        let text = err.to_string();
        assert!(text.contains("truncated"), "cut at {cut}: {text}");
        if cut < data {
            assert_untouched(&slot);
        }
    }
}

#[test]
fn untrusted_or_missing_signatures_are_refused() {
    let f = fixture("keys");
    let (delta, _) = f.make(true, "delta.tpl");
    let good = fs::read(&delta).unwrap();
    // A keyring with another key only.
    let (_, other_public) = payload::sign::generate_key("other <o@example.com>").unwrap();
    let other = Keyring::from_bytes(other_public.as_bytes()).unwrap();
    let slot = f.slot("slot");
    let err = payload::apply(
        Cursor::new(&good),
        &other,
        &[ComponentPaths {
            component: "usr".into(),
            target: slot.clone(),
            target_range: None,
            source: Some(f.source.clone()),
            source_range: None,
        }],
        &ApplyOptions::default(),
        &mut |_| ControlFlow::Continue(()),
    )
    .unwrap_err();
    assert!(
        matches!(err, ApplyError::Payload(PayloadError::Signature(_))),
        "{err}"
    );
    assert_untouched(&slot);

    // Unsigned: the same manifest and data with an empty signature.
    let (m, s, d) = sections(&good);
    let mut unsigned = Vec::new();
    payload::container::write_raw(
        &mut unsigned,
        &good[m..s],
        &[],
        (good.len() - d) as u64,
        &mut &good[d..],
    )
    .unwrap();
    let err = f
        .apply_bytes(&unsigned, &slot, Some(&f.source), &ApplyOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("unsigned"), "{err}");
    // A signature that is not OpenPGP at all.
    let mut garbage = Vec::new();
    payload::container::write_raw(
        &mut garbage,
        &good[m..s],
        b"not a signature",
        (good.len() - d) as u64,
        &mut &good[d..],
    )
    .unwrap();
    let err = f
        .apply_bytes(&garbage, &slot, Some(&f.source), &ApplyOptions::default())
        .unwrap_err();
    assert!(
        matches!(err, ApplyError::Payload(PayloadError::Signature(_))),
        "{err}"
    );
    assert_untouched(&slot);
}

#[test]
fn a_delta_for_another_source_is_refused_before_writing() {
    let f = fixture("wrong-source");
    let (delta, _) = f.make(true, "delta.tpl");
    let wrong = f.path("wrong.img");
    let mut bytes = fs::read(&f.source).unwrap();
    bytes[5_000_000] ^= 0x80;
    fs::write(&wrong, bytes).unwrap();
    let slot = f.slot("slot");
    let err = f
        .apply_bytes(
            &fs::read(&delta).unwrap(),
            &slot,
            Some(&wrong),
            &ApplyOptions::default(),
        )
        .unwrap_err();
    assert!(matches!(err, ApplyError::WrongSource { .. }), "{err}");
    assert!(err.to_string().contains("nothing was written"));
    assert_untouched(&slot);
    // And without any source at all.
    let err = f
        .apply_bytes(
            &fs::read(&delta).unwrap(),
            &slot,
            None,
            &ApplyOptions::default(),
        )
        .unwrap_err();
    assert!(matches!(err, ApplyError::MissingSource(_)), "{err}");
    assert_untouched(&slot);
}

/// Re-signs a changed manifest with the trusted key (a test-only signer),
/// keeping the data, so the payload passes the signature and reaches the
/// validator.
fn resign(f: &Fixture, good: &[u8], edit: impl FnOnce(&mut Manifest)) -> Vec<u8> {
    let (m, s, d) = sections(good);
    let mut manifest: Manifest = serde_json::from_slice(&good[m..s]).unwrap();
    edit(&mut manifest);
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let signature = f.key.sign_detached(&bytes).unwrap();
    let mut out = Vec::new();
    payload::container::write_raw(
        &mut out,
        &bytes,
        &signature,
        (good.len() - d) as u64,
        &mut &good[d..],
    )
    .unwrap();
    out
}

#[test]
fn signed_manifests_with_bad_extents_are_refused() {
    let f = fixture("extents");
    let (delta, _) = f.make(true, "delta.tpl");
    let good = fs::read(&delta).unwrap();
    let first_zero = |m: &mut Manifest| -> usize {
        m.components[0]
            .operations
            .iter()
            .position(|op| matches!(op, Operation::Zero { .. }))
            .unwrap()
    };
    type Edit = Box<dyn Fn(&mut Manifest)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "written twice",
            Box::new(move |m: &mut Manifest| {
                let i = first_zero(m);
                if let Operation::Zero { dst } = &mut m.components[0].operations[i] {
                    dst.push(Extent(0, 1));
                }
            }),
        ),
        (
            "never written",
            Box::new(move |m: &mut Manifest| {
                let i = first_zero(m);
                m.components[0].operations.remove(i);
            }),
        ),
        (
            "outside the",
            Box::new(|m: &mut Manifest| {
                let ops = &mut m.components[0].operations;
                let i = ops
                    .iter()
                    .position(|op| matches!(op, Operation::Copy { .. }))
                    .unwrap();
                if let Operation::Copy { src, .. } = &mut ops[i] {
                    src[0].0 += 1 << 20;
                }
            }),
        ),
        (
            "does not match the header",
            Box::new(|m: &mut Manifest| m.data_len += 1),
        ),
        (
            "invalid or repeated",
            Box::new(|m: &mut Manifest| m.components[0].name = "../etc".into()),
        ),
    ];
    for (expected, edit) in cases {
        let bad = resign(&f, &good, edit);
        let slot = f.slot("slot");
        let err = f
            .apply_bytes(&bad, &slot, Some(&f.source), &ApplyOptions::default())
            .unwrap_err();
        assert!(
            matches!(err, ApplyError::Payload(PayloadError::Manifest(_))),
            "{expected}: {err}"
        );
        assert!(err.to_string().contains(expected), "{expected}: {err}");
        assert_untouched(&slot);
    }
    // The unchanged manifest, re-signed the same way, is accepted: the
    // cases above fail for their edit, not for the re-signing.
    let same = resign(&f, &good, |_| {});
    let slot = f.slot("slot");
    f.apply_bytes(&same, &slot, Some(&f.source), &ApplyOptions::default())
        .unwrap();
}

#[test]
fn absurd_header_lengths_are_refused_without_allocating() {
    let f = fixture("absurd");
    for (manifest_len, signature_len, data_len) in [
        (u64::MAX, 10, 10),
        (10, u64::MAX / 2, 10),
        (10, 10, u64::MAX),
        (1 << 40, 10, 10),
    ] {
        let header = payload::format::Header {
            version: 1,
            manifest_len,
            signature_len,
            data_len,
        };
        let mut bytes = header.encode().to_vec();
        bytes.extend_from_slice(&[b'{'; 100]);
        let slot = f.slot("slot");
        let err = f
            .apply_bytes(&bytes, &slot, None, &ApplyOptions::default())
            .unwrap_err();
        assert!(err.to_string().contains("over the limit"), "{err}");
        assert_untouched(&slot);
    }
    // A header that claims a large (allowed) manifest on a short stream is
    // a truncation, found without reserving the claimed size.
    let header = payload::format::Header {
        version: 1,
        manifest_len: 60 << 20,
        signature_len: 100,
        data_len: 0,
    };
    let err = f
        .apply_bytes(
            &header.encode(),
            &f.slot("slot"),
            None,
            &ApplyOptions::default(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn a_target_that_reads_back_wrong_is_reported() {
    // A manifest (re-signed by the test signer) whose target digest is
    // not what its operations produce: every blob verifies, the read-back
    // does not, and the error says not to boot the slot.
    let f = fixture("readback");
    let (full, _) = f.make(false, "full.tpl");
    let good = fs::read(&full).unwrap();
    let bad = resign(&f, &good, |m| {
        let d = &mut m.components[0].target.digest;
        d.segments[0].0[0] ^= 1;
        d.sha256 = payload::digest::root_of(&d.segments);
    });
    let slot = f.slot("slot");
    let err = f
        .apply_bytes(&bad, &slot, None, &ApplyOptions::default())
        .unwrap_err();
    assert!(matches!(err, ApplyError::ReadBack { .. }), "{err}");
    assert!(err.to_string().contains("do not boot it"));
}

#[test]
fn a_stale_checkpoint_as_a_crash_leaves_it_still_resumes_correctly() {
    // A crash leaves the last periodic checkpoint behind while later
    // operations were already (partly) written. Resuming from it redoes
    // those operations, which must be harmless.
    let f = fixture("stale");
    let (delta, _) = f.make(true, "delta.tpl");
    let bytes = fs::read(&delta).unwrap();
    let slot = f.slot("slot");
    let checkpoint = f.path("cp");
    let opts = ApplyOptions {
        threads: 2,
        checkpoint: Some(checkpoint.clone()),
        checkpoint_every: 512 << 10,
        ..ApplyOptions::default()
    };
    let paths = [ComponentPaths {
        component: "usr".into(),
        target: slot.clone(),
        target_range: None,
        source: Some(f.source.clone()),
        source_range: None,
    }];
    let total = f.target.len() as u64;
    let mut early: Option<Vec<u8>> = None;
    let outcome = payload::apply(
        Cursor::new(&bytes),
        &f.keyring,
        &paths,
        &opts,
        &mut |p: &ApplyProgress| {
            if early.is_none() && p.done_bytes > 0 {
                early = fs::read(&checkpoint).ok();
            }
            if p.done_bytes * 2 >= total {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        },
    )
    .unwrap();
    assert!(matches!(outcome, ApplyOutcome::Stopped(_)));
    let early = early.expect("no periodic checkpoint was written");
    let stale: payload::Checkpoint = serde_json::from_slice(&early).unwrap();
    let ApplyOutcome::Stopped(latest) = outcome else {
        unreachable!()
    };
    assert!(stale.next_op < latest.next_op, "{stale:?} {latest:?}");
    fs::write(&checkpoint, &early).unwrap();
    let outcome = payload::apply(Cursor::new(&bytes), &f.keyring, &paths, &opts, &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    let ApplyOutcome::Complete(report) = outcome else {
        panic!()
    };
    assert_eq!(report.resumed_at_op, stale.next_op);
    assert!(fs::read(&slot).unwrap() == f.target);
}

/// A 4 MiB "executable" and its rebuild: the same bytes with a 4-byte
/// field changed every 256 bytes (shifted addresses) and 12 KiB inserted,
/// so no block of the rebuild repeats a block of the old one.
fn rebuilt_executable(f: &Fixture) -> (PathBuf, PathBuf, Vec<u8>) {
    const MIB: usize = 1 << 20;
    let old = tandem_testkit::noise(40, 4 * MIB);
    let mut new = old[..MIB].to_vec();
    new.extend(tandem_testkit::noise(41, 12 << 10));
    new.extend_from_slice(&old[MIB..4 * MIB - (12 << 10)]);
    for i in (100..new.len()).step_by(256) {
        let v = u32::from_le_bytes(new[i..i + 4].try_into().unwrap()).wrapping_add(0x1000);
        new[i..i + 4].copy_from_slice(&v.to_le_bytes());
    }
    let (src, dst) = (f.path("old-exe.img"), f.path("new-exe.img"));
    fs::write(&src, &old).unwrap();
    fs::write(&dst, &new).unwrap();
    (src, dst, new)
}

/// A delta made with the default options and one made with `off` (a
/// feature turned off), written as `names`; both manifests and sizes.
fn make_with_and_without(
    f: &Fixture,
    source: &Path,
    target: &Path,
    off: MakeOptions,
    names: (&str, &str),
) -> (Manifest, Manifest, u64, u64) {
    let with = make_from(f, source, target, &options(), names.0);
    let without = make_from(f, source, target, &off, names.1);
    let size = |name| fs::metadata(f.path(name)).unwrap().len();
    (with, without, size(names.0), size(names.1))
}

/// Applies `payload` from `source` to `slot`, first filled with 0xa5 bytes
/// (`len` of them), so that what an apply did not write shows.
fn apply_fresh(
    f: &Fixture,
    source: &Path,
    slot: &Path,
    len: usize,
    payload: &[u8],
) -> Result<ApplyOutcome, ApplyError> {
    fs::write(slot, vec![0xa5u8; len]).unwrap();
    payload::apply(
        Cursor::new(payload),
        &f.keyring,
        &[ComponentPaths {
            component: "usr".into(),
            target: slot.to_path_buf(),
            target_range: None,
            source: Some(source.to_path_buf()),
            source_range: None,
        }],
        &ApplyOptions::default(),
        &mut |_| ControlFlow::Continue(()),
    )
}

fn make_from(f: &Fixture, source: &Path, target: &Path, opts: &MakeOptions, out: &str) -> Manifest {
    payload::make_payload(
        ImageInput {
            path: target,
            version: "2.0",
        },
        Some(ImageInput {
            path: source,
            version: "1.0",
        }),
        &f.key,
        opts,
        &f.path(out),
        &|_| {},
    )
    .unwrap()
}

#[test]
fn a_rebuilt_executable_ships_as_bsdiff_operations_in_format_version_2() {
    let f = fixture("bsdiff");
    let (old, new_path, new) = rebuilt_executable(&f);
    let (with, without, a, b) = make_with_and_without(
        &f,
        &old,
        &new_path,
        MakeOptions {
            bsdiff: false,
            ..options()
        },
        ("bsdiff.tpl", "patch.tpl"),
    );
    let stats = &payload::summary::summarize(&with)[0];
    assert!(stats.bsdiff.operations > 0, "{stats:?}");
    assert_eq!(with.format_version, 2);
    assert_eq!(without.format_version, 1, "no bsdiff op, the oldest format");
    eprintln!("rebuilt 4 MiB executable: bsdiff delta {a} bytes, zstd patch delta {b} bytes");
    assert!(a * 2 < b, "bsdiff {a} patch {b}");
    let bytes = fs::read(f.path("bsdiff.tpl")).unwrap();
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 2);
    let slot = f.path("exe-slot");
    let apply = |payload: &[u8]| apply_fresh(&f, &old, &slot, new.len(), payload);
    apply(&bytes).unwrap();
    assert!(fs::read(&slot).unwrap() == new);

    // A signed manifest whose bsdiff operation points at other source
    // blocks: every blob verifies, the output is wrong, and the apply
    // stops with an error (the read-back, or the patch running outside
    // its reference) instead of completing.
    let bad = resign(&f, &bytes, |m| {
        let op = m.components[0]
            .operations
            .iter_mut()
            .find(|op| matches!(op, Operation::Bsdiff { .. }))
            .unwrap();
        if let Operation::Bsdiff { src, .. } = op {
            let start = if src[0].0 > 0 {
                src[0].0 - 1
            } else {
                src[0].0 + 1
            };
            src[0] = Extent(start, src[0].1);
        }
    });
    let err = apply(&bad).unwrap_err();
    assert!(
        matches!(err, ApplyError::ReadBack { .. } | ApplyError::Decode { .. }),
        "{err}"
    );

    // The same manifest claiming format version 1 is refused before
    // anything is written: version 1 has no bsdiff operation.
    let old_format = resign(&f, &bytes, |m| m.format_version = 1);
    let err = apply(&old_format).unwrap_err();
    assert!(err.to_string().contains("needs format version 2"), "{err}");
    assert!(fs::read(&slot).unwrap().iter().all(|&b| b == 0xa5));
}

/// Text-like bytes (words of a small vocabulary): compressible, as files
/// in an initrd are.
fn text(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: [&[u8]; 12] = [
        b"module ",
        b"kernel ",
        b"init ",
        b"udev ",
        b"\x7fELF\x02\x01 ",
        b"symbol ",
        b"0x1f00 ",
        b"section ",
        b"relocation ",
        b"\n",
        b"firmware ",
        b"__ksymtab ",
    ];
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(WORDS[(x % 12) as usize]);
    }
    out.truncate(len);
    out
}

/// An image with eight 256 KiB "modules" as files (block-aligned) and an
/// initrd: a zstd stream (level 9, one worker, as Debian's mkinitramfs
/// writes it) of a cpio-like archive of the same files, 512 bytes into
/// block 1024. `version` changes every module's signature and the
/// archive's generated part.
fn image_with_initrd(version: u64) -> Vec<u8> {
    let mut image = vec![0u8; 8 << 20];
    let mut archive = Vec::new();
    for i in 0..8u64 {
        let mut module = text(100 + i, 256 << 10);
        let sig = text(version * 1000 + i, 700);
        let n = module.len();
        module[n - 700..].copy_from_slice(&sig);
        let at = (16 + i as usize * 80) * 4096;
        image[at..at + module.len()].copy_from_slice(&module);
        archive
            .extend_from_slice(format!("070701 name=lib/modules/{version}/m{i}.ko\n").as_bytes());
        archive.extend_from_slice(&module);
        while archive.len() % 4 != 0 {
            archive.push(0);
        }
    }
    archive.extend_from_slice(&text(version * 77, 20 << 10));
    let encoder = payload::format::ZstdEncoder {
        version: payload::recompress::zstd_version(),
        level: 9,
        workers: 1,
        checksum: true,
    };
    let mut stream = Vec::new();
    payload::recompress::compress(&encoder, &archive, &mut |b: &[u8]| -> Result<
        (),
        payload::recompress::RecompressError,
    > {
        stream.extend_from_slice(b);
        Ok(())
    })
    .unwrap();
    let at = 1024 * 4096;
    image[at..at + 512].copy_from_slice(&text(version, 512));
    image[at + 512..at + 512 + stream.len()].copy_from_slice(&stream);
    image
}

#[test]
fn a_new_initrd_is_re_created_from_the_new_files_and_a_wrong_encoder_is_caught() {
    let f = fixture("recompress");
    let (old_path, new_path) = (f.path("old-initrd.img"), f.path("new-initrd.img"));
    let new = image_with_initrd(2);
    fs::write(&old_path, image_with_initrd(1)).unwrap();
    fs::write(&new_path, &new).unwrap();
    let (with, without, a, b) = make_with_and_without(
        &f,
        &old_path,
        &new_path,
        MakeOptions {
            recompress: false,
            ..options()
        },
        ("recompress.tpl", "blocks.tpl"),
    );
    let stats = &payload::summary::summarize(&with)[0];
    assert_eq!(stats.recompress.operations, 1, "{stats:?}");
    assert_eq!(with.format_version, 3);
    assert!(without.format_version < 3);
    eprintln!("new initrd: recompress delta {a} bytes, block delta {b} bytes");
    assert!(a * 4 < b, "recompress {a} blocks {b}");

    let slot = f.path("initrd-slot");
    let apply = |payload: &[u8]| apply_fresh(&f, &old_path, &slot, new.len(), payload);
    let bytes = fs::read(f.path("recompress.tpl")).unwrap();
    apply(&bytes).unwrap();
    assert!(fs::read(&slot).unwrap() == new, "byte-exact round trip");

    // The recompress operation comes right after the operations that
    // write what it reads (some of the modules), and the others (zero
    // blocks, the modules it does not read) after it, so that a node runs
    // them beside it.
    let ops = &with.components[0].operations;
    let r = ops
        .iter()
        .position(|o| matches!(o, Operation::Recompress { .. }))
        .unwrap();
    let blob = ops[r].blob().unwrap();
    let data = sections(&bytes).2 + blob.offset as usize;
    let footprint = payload::apply::recompress_footprint(
        &ops[r],
        &bytes[data..data + blob.len as usize],
        new.len() as u64,
    )
    .unwrap();
    let touches = |o: &Operation| {
        o.dst().iter().any(|e| {
            let (start, end) = (e.start() * 4096, (e.start() + e.count()) * 4096);
            payload::region::overlaps_any(&footprint, start, end)
        })
    };
    assert!(r > 0 && ops[..r].iter().all(touches), "{ops:?}");
    assert!(ops.len() > r + 1, "{ops:?}");
    assert!(!ops[r + 1..].iter().any(touches), "{ops:?}");

    // A signed manifest naming another level: the node's output differs
    // from the signed stream, its first chunk fails its hash, and the
    // apply stops with that error; none of the stream's blocks is written.
    let mut dst = Extent(0, 0);
    let bad = resign(&f, &bytes, |m| {
        for op in &mut m.components[0].operations {
            if let Operation::Recompress {
                encoder, dst: d, ..
            } = op
            {
                encoder.level = 8;
                dst = d[0];
            }
        }
    });
    let err = apply(&bad).unwrap_err();
    assert!(matches!(err, ApplyError::Recompress { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("does not match its signed SHA-256"),
        "{err}"
    );
    let written = fs::read(&slot).unwrap();
    let range = dst.0 as usize * 4096..(dst.0 + dst.1) as usize * 4096;
    assert!(written[range].iter().all(|&b| b == 0xa5));

    // A node whose libzstd is another version refuses the payload before
    // writing, as a format it cannot read: it takes the full payload.
    let other = resign(&f, &bytes, |m| {
        for op in &mut m.components[0].operations {
            if let Operation::Recompress { encoder, .. } = op {
                encoder.version += 1;
            }
        }
    });
    let err = apply(&other).unwrap_err();
    assert!(err.is_unknown_format(), "{err}");
    assert!(fs::read(&slot).unwrap().iter().all(|&b| b == 0xa5));
}

/// An erofs image of `tree`, lz4hc as Azure Container Linux builds `/usr`,
/// padded to `size` bytes.
fn erofs_image(tree: &Path, out: &Path, size: u64) {
    let status = std::process::Command::new("mkfs.erofs")
        .args([
            "--quiet",
            "-zlz4hc,12",
            "-T0",
            "-U",
            "6b8f1c2e-3d4a-4b5c-9e6f-7a8b9c0d1e2f",
        ])
        .arg(out)
        .arg(tree)
        .status()
        .expect("mkfs.erofs (erofs-utils) is installed");
    assert!(status.success());
    let len = fs::metadata(out).unwrap().len();
    assert!(len <= size, "{len} bytes of erofs");
    fs::OpenOptions::new()
        .write(true)
        .open(out)
        .unwrap()
        .set_len(size)
        .unwrap();
}

/// Module-like files: text with runs of noise, as code and data mix.
fn module(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut i = 0;
    while out.len() < len {
        out.extend(tandem_testkit::text(seed * 1000 + i, 3000));
        out.extend(tandem_testkit::noise(seed * 1000 + i, 300));
        i += 1;
    }
    out.truncate(len);
    out
}

#[test]
fn a_changed_erofs_file_is_re_created_from_its_predecessor_and_a_wrong_encoder_is_caught() {
    let f = fixture("erofs");
    let (old_tree, new_tree) = (f.path("old-tree"), f.path("new-tree"));
    for (tree, release, version) in [
        (&old_tree, "6.1.0-1-amd64", 1u8),
        (&new_tree, "6.1.0-2-amd64", 2),
    ] {
        let modules = tree.join("lib/modules").join(release).join("kernel");
        fs::create_dir_all(&modules).unwrap();
        for m in 0..12u64 {
            let mut bytes = module(m, 60_000 + m as usize * 20_000);
            if version == 2 {
                // A rebuilt module: a version string every 16 KiB, and a
                // new signature at the end.
                for at in (100..bytes.len()).step_by(16384) {
                    bytes[at..at + 8].copy_from_slice(b"6.1.0-2\0");
                }
                bytes.extend(tandem_testkit::noise(900 + m, 512));
            }
            fs::write(modules.join(format!("mod{m}.ko")), bytes).unwrap();
        }
        fs::create_dir_all(tree.join("lib/x86_64-linux-gnu")).unwrap();
        let mut lib = module(50, 900_000);
        if version == 2 {
            lib[400_000..400_016].copy_from_slice(b"patched security");
        }
        fs::write(tree.join("lib/x86_64-linux-gnu/libfoo.so.1"), lib).unwrap();
        fs::write(tree.join("lib/unchanged"), module(60, 200_000)).unwrap();
        if version == 2 {
            fs::write(tree.join("lib/brand-new"), module(70, 150_000)).unwrap();
        }
        // An initrd of the modules: a zstd stream, which erofs cannot
        // compress (stored plain), of files stored compressed.
        let mut archive = Vec::new();
        let mut names: Vec<_> = fs::read_dir(&modules)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for path in names {
            archive.extend_from_slice(format!("070701 {}\n", path.display()).as_bytes());
            archive.extend(fs::read(&path).unwrap());
        }
        archive.extend(tandem_testkit::text(u64::from(version) * 31, 10_000));
        let encoder = payload::format::ZstdEncoder {
            version: payload::recompress::zstd_version(),
            level: 9,
            workers: 1,
            checksum: true,
        };
        let mut stream = Vec::new();
        payload::recompress::compress(&encoder, &archive, &mut |b: &[u8]| -> Result<
            (),
            payload::recompress::RecompressError,
        > {
            stream.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
        fs::create_dir_all(tree.join("boot")).unwrap();
        fs::write(tree.join(format!("boot/initrd.img-{release}")), stream).unwrap();
    }
    let (old_path, new_path) = (f.path("old.erofs"), f.path("new.erofs"));
    erofs_image(&old_tree, &old_path, 8 << 20);
    erofs_image(&new_tree, &new_path, 8 << 20);
    let new = fs::read(&new_path).unwrap();

    let (with, without, a, b) = make_with_and_without(
        &f,
        &old_path,
        &new_path,
        MakeOptions {
            recompress: false,
            ..options()
        },
        ("erofs.tpl", "blocks.tpl"),
    );
    let stats = &payload::summary::summarize(&with)[0];
    // Every module (paired across the release rename), the library and the
    // new file; the unchanged file is copied. The initrd is re-created from
    // the decompressed modules.
    assert_eq!(stats.erofs.operations, 14, "{stats:?}");
    assert_eq!(stats.recompress.operations, 1, "{stats:?}");
    assert!(with.components[0].operations.iter().any(|op| matches!(
        op,
        Operation::Recompress {
            erofs_view: true,
            ..
        }
    )));
    assert_eq!(with.format_version, 4);
    assert!(without.format_version < 4);
    eprintln!("erofs pair: erofs-operation delta {a} bytes, block delta {b} bytes");
    // The noise in the fixture (new signatures, the new file) is most of
    // what is left; the bench pair shows the gain on a real OS.
    assert!(a * 3 < b * 2, "erofs {a} blocks {b}");

    let slot = f.path("erofs-slot");
    let apply = |payload: &[u8]| apply_fresh(&f, &old_path, &slot, new.len(), payload);
    let bytes = fs::read(f.path("erofs.tpl")).unwrap();
    apply(&bytes).unwrap();
    assert!(fs::read(&slot).unwrap() == new, "byte-exact round trip");

    // A signed manifest naming another lz4hc level: the node's pclusters
    // differ from the signed ones, the first chunk of each operation fails
    // its hash, the apply stops with that error, and no block of those
    // files is written.
    let mut dsts = Vec::new();
    let bad = resign(&f, &bytes, |m| {
        for op in &mut m.components[0].operations {
            if let Operation::Erofs {
                encoder, dst: d, ..
            } = op
            {
                encoder.level = 9;
                dsts.extend(d.iter().copied());
            }
        }
    });
    let err = apply(&bad).unwrap_err();
    assert!(matches!(err, ApplyError::Erofs { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("does not match its signed SHA-256"),
        "{err}"
    );
    let written = fs::read(&slot).unwrap();
    for d in &dsts {
        let range = d.0 as usize * 4096..(d.0 + d.1) as usize * 4096;
        assert!(
            written[range].iter().all(|&b| b == 0xa5),
            "{d:?} was written"
        );
    }

    // A node whose liblz4 is another version refuses the payload before
    // writing, as a format it cannot read: it takes the full payload.
    let other = resign(&f, &bytes, |m| {
        for op in &mut m.components[0].operations {
            if let Operation::Erofs { encoder, .. } = op {
                encoder.version += 1;
            }
        }
    });
    let err = apply(&other).unwrap_err();
    assert!(err.is_unknown_format(), "{err}");
    assert!(err.to_string().contains("liblz4"), "{err}");
    assert!(fs::read(&slot).unwrap().iter().all(|&b| b == 0xa5));
}
