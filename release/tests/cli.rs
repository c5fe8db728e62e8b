//! `tandem-release` as users run it: keys from GnuPG, payloads checked by
//! `gpg --verify`, deltas between real ext4 images, interrupted applies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tandem_testkit::{image_pair, run, TempDir};

const TOOL: &str = env!("CARGO_BIN_EXE_tandem-release");

fn tool(args: &[&str]) -> Output {
    Command::new(TOOL).args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = tool(args);
    assert!(
        out.status.success(),
        "tandem-release {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = tool(args);
    assert!(!out.status.success(), "tandem-release {args:?} succeeded");
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The testkit's image pair written to `old.img` and `new.img`.
fn image_files(dir: &Path) -> (PathBuf, PathBuf) {
    let (source, target) = image_pair();
    let old = dir.join("old.img");
    let new = dir.join("new.img");
    fs::write(&old, source).unwrap();
    fs::write(&new, target).unwrap();
    (old, new)
}

/// A new key made by `tandem-release keygen`: (secret key, keyring).
fn keygen(dir: &Path) -> (PathBuf, PathBuf) {
    let key = dir.join("key.asc");
    let keyring = dir.join("keyring.asc");
    ok(&[
        "keygen",
        "--user-id",
        "t <t@example.invalid>",
        "--secret",
        s(&key),
        "--public",
        s(&keyring),
    ]);
    (key, keyring)
}

/// A GnuPG home of its own, with one new key of `algo` (no passphrase).
fn gpg_key(dir: &Path, algo: &str) -> (PathBuf, PathBuf) {
    let home = dir.join(format!("gnupg-{algo}"));
    fs::create_dir_all(&home).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).unwrap();
    }
    let gpg = |args: &[&str]| {
        let mut all = vec!["--homedir", s(&home), "--batch", "--quiet"];
        all.extend_from_slice(args);
        run("gpg", &all)
    };
    let uid = format!("tandem test {algo} <release@example.invalid>");
    gpg(&[
        "--passphrase",
        "",
        "--quick-gen-key",
        &uid,
        algo,
        "sign",
        "never",
    ]);
    let secret = dir.join(format!("{algo}.key.asc"));
    let public = dir.join(format!("{algo}.pub.asc"));
    fs::write(&secret, gpg(&["--armor", "--export-secret-keys"]).stdout).unwrap();
    fs::write(&public, gpg(&["--armor", "--export"]).stdout).unwrap();
    (secret, public)
}

#[test]
fn gnupg_keys_sign_payloads_that_gpg_verifies() {
    let dir = TempDir::new("gpg");
    let (_, target) = image_pair();
    let image = dir.path().join("new.img");
    fs::write(&image, &target).unwrap();
    for algo in ["ed25519", "rsa3072"] {
        let (secret, public) = gpg_key(dir.path(), algo);
        let payload = dir.path().join(format!("{algo}.tpl"));
        ok(&[
            "full",
            "--image",
            s(&image),
            "--version",
            "2.0",
            "--key",
            s(&secret),
            "-o",
            s(&payload),
            "--quiet",
        ]);
        let verified = ok(&["verify", s(&payload), "--keyring", s(&public), "--json"]);
        let v: serde_json::Value = serde_json::from_str(&verified).unwrap();
        assert_eq!(v["valid"], true);
        assert_eq!(v["target_version"], "2.0");
        // The manifest and signature, written out, verify with gpg itself.
        let manifest = dir.path().join(format!("{algo}.manifest.json"));
        let signature = dir.path().join(format!("{algo}.manifest.sig"));
        let inspected = ok(&[
            "inspect",
            s(&payload),
            "--json",
            "--write-manifest",
            s(&manifest),
            "--write-signature",
            s(&signature),
        ]);
        let i: serde_json::Value = serde_json::from_str(&inspected).unwrap();
        assert_eq!(i["kind"], "full");
        let fingerprint = i["signer_fingerprint"].as_str().unwrap().to_owned();
        let verify_home = dir.path().join(format!("verify-{algo}"));
        fs::create_dir_all(&verify_home).unwrap();
        let gpg = |args: &[&str]| {
            let mut all = vec!["--homedir", s(&verify_home), "--batch"];
            all.extend_from_slice(args);
            Command::new("gpg").args(&all).output().unwrap()
        };
        assert!(gpg(&["--import", s(&public)]).status.success());
        let out = gpg(&["--status-fd", "1", "--verify", s(&signature), s(&manifest)]);
        let status = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "gpg --verify: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(status.contains("[GNUPG:] GOODSIG"), "{status}");
        assert!(
            status.contains(&fingerprint[fingerprint.len() - 16..]),
            "{status} {fingerprint}"
        );
        // One changed manifest byte: gpg and tandem both refuse it.
        let mut bad = fs::read(&manifest).unwrap();
        bad[20] ^= 1;
        fs::write(&manifest, bad).unwrap();
        let out = gpg(&["--verify", s(&signature), s(&manifest)]);
        assert!(!out.status.success());
    }
}

#[test]
fn a_passphrase_protected_key_gets_a_clear_error() {
    let dir = TempDir::new("gpg-pass");
    let home = dir.path().join("gnupg");
    fs::create_dir_all(&home).unwrap();
    let gpg = |args: &[&str]| {
        let mut all = vec![
            "--homedir",
            s(&home),
            "--batch",
            "--quiet",
            "--pinentry-mode",
            "loopback",
        ];
        all.extend_from_slice(args);
        run("gpg", &all)
    };
    gpg(&[
        "--passphrase",
        "secret",
        "--quick-gen-key",
        "locked <l@example.invalid>",
        "ed25519",
        "sign",
        "never",
    ]);
    let key = dir.path().join("locked.asc");
    fs::write(
        &key,
        gpg(&["--passphrase", "secret", "--armor", "--export-secret-keys"]).stdout,
    )
    .unwrap();
    let image = dir.path().join("img");
    fs::write(&image, vec![1u8; 8192]).unwrap();
    let out = dir.path().join("p.tpl");
    let err = fails(&[
        "full",
        "--image",
        s(&image),
        "--version",
        "1",
        "--key",
        s(&key),
        "-o",
        s(&out),
    ]);
    assert!(err.contains("passphrase-protected"), "{err}");
    assert!(!out.exists());
}

/// An ext4 image of `tree`, made the way release builds make them.
fn ext4(tree: &Path, image: &Path) {
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-U",
            "6b8f1c2e-3d4a-4b5c-9e6f-7a8b9c0d1e2f",
            "-E",
            "hash_seed=0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0,root_owner=0:0",
            "-d",
            s(tree),
            s(image),
            "64M",
        ],
    );
}

#[test]
fn delta_between_ext4_images_round_trips_and_resumes() {
    let dir = TempDir::new("ext4");
    let tree = dir.path().join("tree");
    fs::create_dir_all(tree.join("lib/modules/1.0")).unwrap();
    fs::create_dir_all(tree.join("bin")).unwrap();
    for i in 0..40u64 {
        let body = tandem_testkit::text(i, 40_000 + (i as usize) * 1000);
        fs::write(tree.join(format!("lib/modules/1.0/mod{i}.ko")), body).unwrap();
    }
    fs::write(
        tree.join("bin/containerd"),
        tandem_testkit::noise(99, 3 << 20),
    )
    .unwrap();
    let old = dir.path().join("old.img");
    ext4(&tree, &old);
    // The update: modules move to a new version directory with small edits,
    // one binary is replaced, a new file appears.
    fs::rename(tree.join("lib/modules/1.0"), tree.join("lib/modules/1.1")).unwrap();
    for i in (0..40u64).step_by(3) {
        let p = tree.join(format!("lib/modules/1.1/mod{i}.ko"));
        let mut body = fs::read(&p).unwrap();
        body.splice(100..100, b"patched ".iter().copied());
        fs::write(&p, body).unwrap();
    }
    fs::write(tree.join("bin/runc"), tandem_testkit::noise(7, 1 << 20)).unwrap();
    // Enough new bytes for several blobs, so an apply can stop in between.
    fs::write(tree.join("bin/kubelet"), tandem_testkit::noise(8, 20 << 20)).unwrap();
    let new = dir.path().join("new.img");
    ext4(&tree, &new);

    let (key, keyring) = keygen(dir.path());
    let delta = dir.path().join("delta.tpl");
    let made = ok(&[
        "delta",
        "--source",
        s(&old),
        "--source-version",
        "1.0",
        "--image",
        s(&new),
        "--version",
        "1.1",
        "--key",
        s(&key),
        "-o",
        s(&delta),
        "--json",
        "--quiet",
    ]);
    let m: serde_json::Value = serde_json::from_str(&made).unwrap();
    assert_eq!(m["kind"], "delta");
    let full = dir.path().join("full.tpl");
    ok(&[
        "full",
        "--image",
        s(&new),
        "--version",
        "1.1",
        "--key",
        s(&key),
        "-o",
        s(&full),
        "--quiet",
    ]);
    let delta_len = fs::metadata(&delta).unwrap().len();
    let full_len = fs::metadata(&full).unwrap().len();
    // The unchanged 3 MiB of noise (containerd) is copied, not shipped.
    assert!(
        delta_len + (3 << 20) < full_len,
        "delta {delta_len} full {full_len}"
    );

    // Interrupted once anything is written, then resumed by the same command.
    let slot = dir.path().join("slot.img");
    let checkpoint = dir.path().join("slot.checkpoint");
    let stopped = ok(&[
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
        "--stop-after",
        "1",
        "--threads",
        "1",
        "--json",
    ]);
    let st: serde_json::Value = serde_json::from_str(&stopped).unwrap();
    assert_eq!(st["outcome"], "stopped", "{stopped}");
    assert!(checkpoint.exists());
    let resumed = ok(&[
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
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_str(&resumed).unwrap();
    assert_eq!(r["outcome"], "complete");
    assert!(r["resumed_at_op"].as_u64().unwrap() > 0, "{resumed}");
    assert!(fs::read(&slot).unwrap() == fs::read(&new).unwrap());
    assert!(!checkpoint.exists());

    // The full payload too, onto a fresh file.
    let slot2 = dir.path().join("slot2.img");
    ok(&[
        "apply",
        s(&full),
        "--keyring",
        s(&keyring),
        "--target",
        s(&slot2),
        "--quiet",
    ]);
    assert!(fs::read(&slot2).unwrap() == fs::read(&new).unwrap());

    // The delta against the new image (wrong source): refused, clearly.
    let err = fails(&[
        "apply",
        s(&delta),
        "--keyring",
        s(&keyring),
        "--source",
        s(&new),
        "--target",
        s(&slot2),
        "--quiet",
    ]);
    assert!(
        err.contains("not the image this delta was made from"),
        "{err}"
    );
}

#[test]
fn inspect_shows_versions_operations_and_signer() {
    let dir = TempDir::new("inspect");
    let (old, new) = image_files(dir.path());
    let (key, keyring) = keygen(dir.path());
    let delta = dir.path().join("d.tpl");
    ok(&[
        "delta",
        "--source",
        s(&old),
        "--source-version",
        "41",
        "--image",
        s(&new),
        "--version",
        "42",
        "--key",
        s(&key),
        "-o",
        s(&delta),
        "--quiet",
    ]);
    let verified = ok(&["verify", s(&delta), "--keyring", s(&keyring)]);
    assert!(
        verified.contains("valid delta payload for version 42"),
        "{verified}"
    );
    let text = ok(&["inspect", s(&delta)]);
    assert!(
        text.contains("delta payload, format 1: version 42 from 41"),
        "{text}"
    );
    assert!(text.contains("patch"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", s(&delta), "--json"])).unwrap();
    let c = &json["components"][0];
    assert_eq!(c["name"], "usr");
    assert!(c["copy"]["target_bytes"].as_u64().unwrap() > 0);
    assert_eq!(json["signer_fingerprint"].as_str().unwrap().len(), 40);
    // Errors are one line and name the problem.
    let err = fails(&["inspect", s(&old)]);
    assert!(err.contains("not a tandem payload"), "{err}");
    let err = fails(&["verify", s(&delta), "--keyring", s(&old)]);
    assert!(err.contains("keyring"), "{err}");
    let err = fails(&[
        "full",
        "--image",
        s(&dir.path().join("missing")),
        "--version",
        "1",
        "--key",
        s(&key),
        "-o",
        "x",
    ]);
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn index_add_sign_show_and_refuse_tampering() {
    let dir = TempDir::new("index");
    let (old, new) = image_files(dir.path());
    let (key, keyring) = keygen(dir.path());
    let p = |n: &str| dir.path().join(n);
    ok(&[
        "full",
        "--image",
        s(&old),
        "--version",
        "1.0",
        "--key",
        s(&key),
        "-o",
        s(&p("1.0.tpl")),
        "-q",
    ]);
    ok(&[
        "full",
        "--image",
        s(&new),
        "--version",
        "1.1",
        "--key",
        s(&key),
        "-o",
        s(&p("1.1.tpl")),
        "-q",
    ]);
    ok(&[
        "delta",
        "--source",
        s(&old),
        "--source-version",
        "1.0",
        "--image",
        s(&new),
        "--version",
        "1.1",
        "--key",
        s(&key),
        "-o",
        s(&p("1.0-1.1.tpl")),
        "-q",
    ]);
    let index = p("stable.json");
    ok(&[
        "index",
        "add",
        "--index",
        s(&index),
        "--full",
        s(&p("1.0.tpl")),
    ]);
    ok(&[
        "index",
        "add",
        "--index",
        s(&index),
        "--full",
        s(&p("1.1.tpl")),
        "--delta",
        s(&p("1.0-1.1.tpl")),
        "--rollout-hours",
        "24",
        "--barrier",
    ]);
    // A delta given as a full payload, or a release added twice: refused.
    let err = fails(&[
        "index",
        "add",
        "--index",
        s(&index),
        "--full",
        s(&p("1.0-1.1.tpl")),
    ]);
    assert!(err.contains("is a delta"), "{err}");
    let err = fails(&[
        "index",
        "add",
        "--index",
        s(&index),
        "--full",
        s(&p("1.1.tpl")),
    ]);
    assert!(err.contains("already in"), "{err}");
    ok(&["index", "sign", "--index", s(&index), "--key", s(&key)]);
    let shown = ok(&[
        "index",
        "show",
        s(&index),
        "--keyring",
        s(&keyring),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert!(v["serial"].as_u64().unwrap() > 1_700_000_000);
    let r = &v["releases"][1];
    assert_eq!(r["version"], "1.1");
    assert_eq!(r["barrier"], true);
    assert_eq!(r["deltas"][0]["source_version"], "1.0");
    assert_eq!(r["deltas"][0]["url"], "1.0-1.1.tpl");
    assert_eq!(
        r["full"]["size"].as_u64().unwrap(),
        fs::metadata(p("1.1.tpl")).unwrap().len()
    );
    let text = ok(&["index", "show", s(&index), "--keyring", s(&keyring)]);
    assert!(text.contains("(signature valid)"), "{text}");
    // Tampered after signing: refused when checked.
    let mut bytes = fs::read(&index).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    fs::write(&index, bytes).unwrap();
    let err = fails(&["index", "show", s(&index), "--keyring", s(&keyring)]);
    assert!(err.contains("signature"), "{err}");
}

#[test]
fn verity_tree_and_uki_are_checked_before_signing_and_round_trip() {
    let dir = TempDir::new("release-uki");
    let d = dir.path();
    let (key, keyring) = keygen(d);
    let (old, new) = image_files(d);
    let (old_hash, new_hash) = (d.join("old.hash"), d.join("new.hash"));
    let old_root = tandem_testkit::veritysetup_format(&old, &old_hash);
    let new_root = tandem_testkit::veritysetup_format(&new, &new_hash);
    let osrel = |v: &str| format!("ID=acl\nVERSION_ID={v}\n");
    let kernel = tandem_testkit::noise(7, 200_000);
    let uki = |name: &str, v: &str, cmdline: &str| {
        tandem_testkit::make_uki(d, name, &osrel(v), cmdline, Some(&kernel))
    };
    let old_uki = uki(
        "old.efi",
        "1.0",
        &format!("mount.usr=/dev/mapper/usr usrhash={old_root}"),
    );
    let new_uki = uki(
        "new.efi",
        "2.0",
        &format!("mount.usr=/dev/mapper/usr usrhash={new_root}"),
    );
    let out = d.join("full.tpl");
    let full = |uki: &Path, addon: Option<&Path>, out: &Path| -> Vec<String> {
        let mut args: Vec<String> = [
            "full",
            "--image",
            s(&new),
            "--version",
            "2.0",
            "--key",
            s(&key),
            "-o",
            s(out),
            "--verity-hash",
            s(&new_hash),
            "--uki",
            s(uki),
            "--json",
            "-q",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        if let Some(addon) = addon {
            args.extend(["--addon".to_string(), s(addon).to_string()]);
        }
        args
    };
    let args = full(&new_uki, None, &out);
    let summary: serde_json::Value =
        serde_json::from_str(&ok(&args.iter().map(String::as_str).collect::<Vec<_>>())).unwrap();
    assert_eq!(summary["verity_root_hash"], new_root.as_str());
    let names: Vec<&str> = summary["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["usr", "verity", "uki"]);

    // A UKI naming another root hash is refused, and nothing is written.
    let wrong = uki("wrong.efi", "2.0", &format!("usrhash={old_root}"));
    let refused = d.join("refused.tpl");
    let args = full(&wrong, None, &refused);
    let err = fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        err.contains("refusing to sign") && err.contains(&new_root),
        "{err}"
    );
    assert!(!refused.exists());
    // ACL's shape: the UKI names no hash, the slot's addon does.
    let bare = uki("bare.efi", "2.0", "mount.usr=/dev/mapper/usr");
    let addon = tandem_testkit::make_uki(
        d,
        "b.addon.efi",
        "",
        &format!("systemd.verity_usr_data=PARTUUID=x usrhash={new_root}"),
        None,
    );
    let with_addon = d.join("addon.tpl");
    let args = full(&bare, Some(&addon), &with_addon);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let args = full(&bare, None, &refused);
    let err = fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("names no usrhash="), "{err}");
    let args = full(&addon, None, &refused);
    let err = fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("not a UKI"), "{err}");

    // A delta of all three, applied to fresh targets, byte for byte.
    let delta = d.join("delta.tpl");
    ok(&[
        "delta",
        "--source",
        s(&old),
        "--source-version",
        "1.0",
        "--image",
        s(&new),
        "--version",
        "2.0",
        "--key",
        s(&key),
        "-o",
        s(&delta),
        "-q",
        "--verity-hash",
        s(&new_hash),
        "--uki",
        s(&new_uki),
        "--source-verity-hash",
        s(&old_hash),
        "--source-uki",
        s(&old_uki),
    ]);
    let (slot, hash_part, uki_out) = (d.join("slot"), d.join("hash-part"), d.join("uki-out"));
    fs::write(&slot, vec![0u8; fs::metadata(&new).unwrap().len() as usize]).unwrap();
    fs::write(&hash_part, vec![0u8; 1 << 20]).unwrap();
    fs::write(&uki_out, b"").unwrap();
    let (old_slot, old_hash_part) = (d.join("old-slot"), d.join("old-hash-part"));
    fs::copy(&old, &old_slot).unwrap();
    fs::copy(&old_hash, &old_hash_part).unwrap();
    ok(&[
        "apply",
        s(&delta),
        "--keyring",
        s(&keyring),
        "--target",
        &format!("usr={}", s(&slot)),
        "--target",
        &format!("verity={}", s(&hash_part)),
        "--target",
        &format!("uki={}", s(&uki_out)),
        "--source",
        &format!("usr={}", s(&old_slot)),
        "--source",
        &format!("verity={}", s(&old_hash_part)),
        "--source",
        &format!("uki={}", s(&old_uki)),
        "-q",
    ]);
    assert_eq!(fs::read(&slot).unwrap(), fs::read(&new).unwrap());
    let tree = fs::read(&new_hash).unwrap();
    assert_eq!(&fs::read(&hash_part).unwrap()[..tree.len()], &tree[..]);
    assert_eq!(fs::read(&uki_out).unwrap(), fs::read(&new_uki).unwrap());
    // The delta carries little of the UKI: its kernel is unchanged.
    let inspect = ok(&["inspect", s(&delta), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let uki_part = v["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "uki")
        .unwrap()
        .clone();
    let blobs = uki_part["data"]["blob_bytes"].as_u64().unwrap()
        + uki_part["patch"]["blob_bytes"].as_u64().unwrap();
    assert!(blobs < 50_000, "{uki_part}");
}

#[test]
fn a_flatcar_kernel_must_carry_the_trees_root_hash() {
    let dir = TempDir::new("release-kernel");
    let d = dir.path();
    let (key, _) = keygen(d);
    let (old, new) = image_files(d);
    let (old_hash, new_hash) = (d.join("old.hash"), d.join("new.hash"));
    let old_root = tandem_testkit::veritysetup_format(&old, &old_hash);
    let new_root = tandem_testkit::veritysetup_format(&new, &new_hash);
    let kernel = |name: &str, root: Option<&str>| {
        let mut bytes = tandem_testkit::noise(9, 100_000);
        bytes[..2].copy_from_slice(b"MZ");
        if let Some(root) = root {
            bootconfig::flatcar::embed_usrhash(&mut bytes, root).unwrap();
        }
        let path = d.join(name);
        fs::write(&path, bytes).unwrap();
        path
    };
    let good = kernel("good", Some(&new_root));
    let full = |kernel: &Path, out: &Path| -> Vec<String> {
        [
            "full",
            "--image",
            s(&new),
            "--version",
            "2.0",
            "--key",
            s(&key),
            "-o",
            s(out),
            "--verity-hash",
            s(&new_hash),
            "--kernel",
            s(kernel),
            "--json",
            "-q",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    fn strs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let out = d.join("full.tpl");
    let summary: serde_json::Value = serde_json::from_str(&ok(&strs(&full(&good, &out)))).unwrap();
    assert_eq!(summary["verity_root_hash"], new_root.as_str());
    let names: Vec<&str> = summary["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["usr", "verity", "kernel"]);

    let refused = d.join("refused.tpl");
    let wrong = kernel("wrong", Some(&old_root));
    let err = fails(&strs(&full(&wrong, &refused)));
    assert!(
        err.contains("the kernel carries root hash") && err.contains(&new_root),
        "{err}"
    );
    let bare = kernel("bare", None);
    let err = fails(&strs(&full(&bare, &refused)));
    assert!(err.contains("carries no root hash"), "{err}");
    assert!(!refused.exists());
    // A kernel is Flatcar's boot artifact, a UKI ACL's: not both.
    let mut both = full(&good, &refused);
    both.extend(["--uki".to_string(), s(&good).to_string()]);
    let err = fails(&strs(&both));
    assert!(err.contains("cannot be used with"), "{err}");
}
