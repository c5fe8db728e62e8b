//! The dm-verity gate end to end: `tandemd` on a private bus updating a
//! disk laid out as ACL's (each `/usr` slot with a HASH partition of the
//! DPS usr-verity type), payloads over HTTP on 127.0.0.1. A slot with a
//! hash tree is never set to boot unless its tree matches its data and
//! its root hash is the `usrhash=` its boot artifact names; the plain
//! gptprio backend has no such artifact, so the update is refused,
//! clearly, with the boot state as it was. On Flatcar's layout (gptprio,
//! the tree inside USR, the kernel on the ESP carrying the root hash) the
//! kernel is the artifact, and tandem installs it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{in_days, releases, Node};
use tandem_testkit::http::HttpServer;
use tandem_testkit::run;

const USR_VERITY: &str = "77FF5F63-E7B6-4633-ACF4-1565B864C0E6";

/// Turns the node's disk into ACL's shape: HASH-A (5) and HASH-B (6)
/// between the slots' partitions and ROOT.
fn add_hash_partitions(node: &Node) {
    let disk = node.disk.path_str();
    run(
        "sgdisk",
        &[
            "-d",
            "9",
            "-n",
            "5:0:+1M",
            "-t",
            &format!("5:{USR_VERITY}"),
            "-c",
            "5:HASH-A",
            "-n",
            "6:0:+1M",
            "-t",
            &format!("6:{USR_VERITY}"),
            "-c",
            "6:HASH-B",
            "-n",
            "9:0:0",
            "-t",
            "9:8300",
            "-c",
            "9:ROOT",
            disk,
        ],
    );
}

#[test]
fn slots_show_their_hash_partitions_and_an_unverifiable_slot_is_not_set_to_boot() {
    let rel = releases();
    let server = HttpServer::serve(&rel.www);
    rel.publish(1, vec![rel.release("2.0.0", false)], in_days(7), None);
    let mut node = Node::new(&server, &rel);
    add_hash_partitions(&node);

    let shown: serde_json::Value =
        serde_json::from_str(&node.ctl_ok(&["slots", "--disk", node.disk.path_str(), "--json"]))
            .unwrap();
    for (i, label) in [(0, "HASH-A"), (1, "HASH-B")] {
        let hash = &shown["slots"][i]["hash"];
        assert_eq!(hash["kind"], "partition", "{shown}");
        assert_eq!(hash["label"], label, "{shown}");
        assert_eq!(hash["partition_number"], 5 + i as u64, "{shown}");
    }
    let human = node.ctl_ok(&["slots", "--disk", node.disk.path_str()]);
    assert!(
        human.contains("hash:      partition 5 \"HASH-A\""),
        "{human}"
    );

    node.start();
    node.wait_health();
    let err = node.ctl_err(&["apply"]);
    assert!(
        err.contains("slot B has a dm-verity hash tree but its boot artifact names no usrhash="),
        "{err}"
    );
    // Written and verified, but never set to boot: A stays next.
    assert_eq!(node.slot_bytes(4, rel.v2.len()), rel.v2);
    assert_eq!(node.disk.cgpt_prio(4).0, 0, "B was made bootable");
    let s = node.status();
    assert_eq!(s["next_boot"], "A", "{s}");
    assert!(node.reboots().is_empty());
}

/// The ACL node: hash partitions, the UKI backend on an ESP folder, and
/// slot A as shipped (v1 in USR-A, its tree in HASH-A, its UKI and addon
/// installed and good). Returns the v1 and v2 parts as files.
struct AclParts {
    dir: tandem_testkit::TempDir,
    usr: [PathBuf; 2],
    hash: [PathBuf; 2],
    uki: [PathBuf; 2],
    addon: [PathBuf; 2],
    root: [String; 2],
}

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use bootconfig::ukidir::UkiDir;
use payload::make::ComponentInput;

/// The two releases' USR images in `d` and their hash trees made by
/// `veritysetup format`, with the root hashes it printed.
fn usr_and_trees(
    rel: &common::Releases,
    d: &std::path::Path,
) -> ([PathBuf; 2], [PathBuf; 2], [String; 2]) {
    let usr = [d.join("v1.img"), d.join("v2.img")];
    fs::write(&usr[0], &rel.v1).unwrap();
    fs::write(&usr[1], &rel.v2).unwrap();
    let hash = [d.join("v1.hash"), d.join("v2.hash")];
    let root = [
        tandem_testkit::veritysetup_format(&usr[0], &hash[0]),
        tandem_testkit::veritysetup_format(&usr[1], &hash[1]),
    ];
    (usr, hash, root)
}

fn acl_parts(rel: &common::Releases, node: &Node) -> AclParts {
    let dir = tandem_testkit::TempDir::new("acl-parts");
    let d = dir.path();
    let (usr, hash, root) = usr_and_trees(rel, d);
    let kernel = tandem_testkit::noise(11, 300_000);
    let versions = ["1.0.0", "2.0.0"];
    let uki = [0, 1].map(|i| {
        tandem_testkit::make_uki(
            d,
            &format!("v{i}.efi"),
            &format!("ID=acl\nVERSION_ID={}\n", versions[i]),
            "console=ttyS0 mount.usr=/dev/mapper/usr",
            Some(&kernel),
        )
    });
    let addon = [0, 1].map(|i| {
        tandem_testkit::make_uki(
            d,
            &format!("v{i}.addon.efi"),
            "",
            &format!(
                "systemd.verity_usr_data=PARTUUID={} usrhash={}",
                node.disk.partuuid(3 + i as u32),
                root[i]
            ),
            None,
        )
    });
    AclParts {
        dir,
        usr,
        hash,
        uki,
        addon,
        root,
    }
}

fn make(rel: &common::Releases, inputs: &[ComponentInput], source: Option<&str>, name: &str) {
    payload::make::make_components(
        inputs,
        "2.0.0",
        source,
        &rel.key,
        &payload::MakeOptions::default(),
        &rel.www.join(name),
        &|_| {},
    )
    .unwrap();
}

fn part(name: &str, target: &std::path::Path, source: Option<&PathBuf>) -> ComponentInput {
    ComponentInput {
        name: name.into(),
        target: target.to_path_buf(),
        source: source.cloned(),
        file: name == "uki" || name == "addon",
    }
}

/// Sets the node up as ACL ships it and publishes 2.0.0 as full and
/// delta payloads of all four components.
fn acl_node(rel: &common::Releases, server: &HttpServer) -> (Node, AclParts) {
    let node = Node::new(server, rel);
    add_hash_partitions(&node);
    let parts = acl_parts(rel, &node);
    // HASH-A holds v1's tree.
    let start = node.partition_offset(5);
    let disk = fs::OpenOptions::new()
        .write(true)
        .open(&node.disk.path)
        .unwrap();
    disk.write_all_at(&fs::read(&parts.hash[0]).unwrap(), start)
        .unwrap();
    // The ESP with slot A's UKI and addon, good.
    let esp = node.dir.path().join("esp");
    let ukis = UkiDir::new(&esp);
    fs::create_dir_all(ukis.dir()).unwrap();
    let (u, a) = ukis.staging_paths("tandem-slot-a");
    fs::copy(&parts.uki[0], &u).unwrap();
    fs::copy(&parts.addon[0], &a).unwrap();
    ukis.install("tandem-slot-a", &u, Some(&a), None).unwrap();
    node.configure(
        "60-acl",
        &format!(
            "[slots]\nboot_backend = \"uki\"\nesp = \"{}\"\n",
            esp.display()
        ),
    );
    let full: Vec<ComponentInput> = vec![
        part("usr", &parts.usr[1], None),
        part("verity", &parts.hash[1], None),
        part("uki", &parts.uki[1], None),
        part("addon", &parts.addon[1], None),
    ];
    make(rel, &full, None, "full-2.0.0.tpl");
    let delta: Vec<ComponentInput> = vec![
        part("usr", &parts.usr[1], Some(&parts.usr[0])),
        part("verity", &parts.hash[1], Some(&parts.hash[0])),
        part("uki", &parts.uki[1], Some(&parts.uki[0])),
        part("addon", &parts.addon[1], Some(&parts.addon[0])),
    ];
    make(rel, &delta, Some("1.0.0"), "delta-1.0.0-2.0.0.tpl");
    (node, parts)
}

fn hash_partition(node: &Node, number: u32, len: usize) -> Vec<u8> {
    node.slot_bytes(number, len)
}

#[test]
fn an_acl_slot_is_updated_whole_by_a_delta_and_boots_its_uki_next() {
    let rel = releases();
    let server = HttpServer::serve(&rel.www);
    let (mut node, parts) = acl_node(&rel, &server);
    rel.publish(1, vec![rel.release("2.0.0", true)], in_days(7), None);
    node.start();
    node.wait_health();
    let out = node.ctl_ok(&["apply"]);
    assert!(out.contains("2.0.0"), "{out}");

    // Every part of slot B, byte for byte; slot A untouched.
    assert_eq!(node.slot_bytes(4, rel.v2.len()), rel.v2);
    let tree = fs::read(&parts.hash[1]).unwrap();
    assert_eq!(hash_partition(&node, 6, tree.len()), tree);
    let old_tree = fs::read(&parts.hash[0]).unwrap();
    assert_eq!(hash_partition(&node, 5, old_tree.len()), old_tree);
    let linux = node.dir.path().join("esp/EFI/Linux");
    assert_eq!(
        fs::read(linux.join("tandem-slot-b+1.efi")).unwrap(),
        fs::read(&parts.uki[1]).unwrap(),
        "slot B's UKI, set to boot with one try"
    );
    assert_eq!(
        fs::read(linux.join("tandem-slot-b.efi.extra.d/tandem.addon.efi")).unwrap(),
        fs::read(&parts.addon[1]).unwrap()
    );
    assert!(linux.join("tandem-slot-a.efi").is_file(), "A stays good");
    let s = node.status();
    assert_eq!(s["next_boot"], "B", "{s}");
    assert_eq!(s["staged"]["version"], "2.0.0");
    // The delta was used, and it is small.
    let delta = common::payload_bytes_served(&server, "delta-1.0.0-2.0.0.tpl");
    assert!(delta > 0);
    assert_eq!(common::payload_bytes_served(&server, "full-2.0.0.tpl"), 0);
    assert!(node
        .log_text()
        .contains(&format!("root hash {}", parts.root[1])));
    let _ = parts.dir.path();
}

/// Killed after every component (usr, tree, UKI, addon) was written and
/// read back, just before the flip: the restarted daemon reads each
/// component back against the signed digests and goes on to the flip,
/// without downloading the payload again.
#[test]
fn an_acl_update_killed_before_the_flip_reads_back_and_does_not_download_again() {
    let rel = releases();
    let server = HttpServer::serve(&rel.www);
    let (mut node, parts) = acl_node(&rel, &server);
    rel.publish(1, vec![rel.release("2.0.0", true)], in_days(7), None);
    node.daemon_env = vec![(payload::failpoint::ENV.into(), "before-flip:1".into())];
    node.start();
    node.wait_health();
    assert!(!node.ctl(&["apply"]).status.success());
    let mut daemon = node.daemon.take().unwrap();
    let status = daemon.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    let name = "delta-1.0.0-2.0.0.tpl";
    let size = fs::metadata(rel.www.join(name)).unwrap().len();
    assert_eq!(common::payload_bytes_served(&server, name), size);

    node.daemon_env.clear();
    node.start();
    node.wait_for("staged", |s| s["state"] == "updated-need-reboot");
    assert_eq!(node.slot_bytes(4, rel.v2.len()), rel.v2);
    let tree = fs::read(&parts.hash[1]).unwrap();
    assert_eq!(hash_partition(&node, 6, tree.len()), tree);
    let linux = node.dir.path().join("esp/EFI/Linux");
    assert_eq!(
        fs::read(linux.join("tandem-slot-b+1.efi")).unwrap(),
        fs::read(&parts.uki[1]).unwrap()
    );
    let s = node.status();
    assert_eq!(s["next_boot"], "B", "{s}");
    // Not one more byte of the payload: every component was read back.
    assert_eq!(
        common::payload_bytes_served(&server, name),
        size,
        "{}",
        node.log_text()
    );
    let log = node.log_text();
    assert!(
        log.contains("usr, verity, uki, addon read back again"),
        "{log}"
    );
}

#[test]
fn a_hash_tree_corrupted_after_staging_is_refused_at_finalize() {
    let rel = releases();
    let server = HttpServer::serve(&rel.www);
    let (mut node, parts) = acl_node(&rel, &server);
    rel.publish(1, vec![rel.release("2.0.0", false)], in_days(7), None);
    node.start();
    node.wait_health();
    node.ctl_ok(&["stage"]);
    let linux = node.dir.path().join("esp/EFI/Linux");
    assert!(
        linux.join("tandem-slot-b+0.efi").is_file(),
        "staged, not set to boot"
    );

    // Between the two steps, a byte of HASH-B's level 0 flips on disk (the
    // superblock, then the top level's one block, then level 0).
    let at = node.partition_offset(6) + 2 * 4096 + 77;
    let disk = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&node.disk.path)
        .unwrap();
    let mut byte = [0u8];
    disk.read_exact_at(&mut byte, at).unwrap();
    disk.write_all_at(&[byte[0] ^ 0x10], at).unwrap();
    let err = node.ctl_err(&["finalize", "--no-reboot"]);
    assert!(err.contains("dm-verity check failed"), "{err}");
    assert!(
        err.contains("hash tree level 0 block 0 does not match"),
        "{err}"
    );
    assert!(
        linux.join("tandem-slot-b+0.efi").is_file(),
        "B was set to boot"
    );
    let s = node.status();
    assert_eq!(s["next_boot"], "A", "{s}");
    assert!(s["staged"].is_null(), "the refused stage is forgotten: {s}");
    drop(parts);
}

#[test]
fn a_signed_payload_whose_tree_does_not_match_its_uki_is_refused_by_the_node() {
    // tandem-release refuses to sign this; a payload made some other way
    // must still never boot.
    let rel = releases();
    let server = HttpServer::serve(&rel.www);
    let (mut node, parts) = acl_node(&rel, &server);
    // The new image with the OLD tree and the new UKI and addon.
    let wrong: Vec<ComponentInput> = vec![
        part("usr", &parts.usr[1], None),
        part("verity", &parts.hash[0], None),
        part("uki", &parts.uki[1], None),
        part("addon", &parts.addon[1], None),
    ];
    make(&rel, &wrong, None, "full-2.0.0.tpl");
    rel.publish(1, vec![rel.release("2.0.0", false)], in_days(7), None);
    node.start();
    node.wait_health();
    let err = node.ctl_err(&["apply"]);
    assert!(err.contains("dm-verity check failed"), "{err}");
    let linux = node.dir.path().join("esp/EFI/Linux");
    assert!(
        !fs::read_dir(&linux).unwrap().flatten().any(|e| e
            .file_name()
            .to_string_lossy()
            .starts_with("tandem-slot-b+1")),
        "B was set to boot"
    );
    assert_eq!(node.status()["next_boot"], "A");
}

/// Flatcar's layout: the tree inside each USR partition at this offset.
const FLATCAR_HASH_OFFSET: u64 = 12 << 20;

struct FlatcarParts {
    dir: tandem_testkit::TempDir,
    usr: [PathBuf; 2],
    hash: [PathBuf; 2],
    kernel: [PathBuf; 2],
    root: [String; 2],
}

fn flatcar_kernel(dir: &std::path::Path, name: &str, seed: u64, root: &str) -> PathBuf {
    let mut bytes = tandem_testkit::noise(seed, 300_000);
    bytes[..2].copy_from_slice(b"MZ");
    bootconfig::flatcar::embed_usrhash(&mut bytes, root).unwrap();
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap();
    path
}

/// A node on Flatcar's layout: gptprio, the kernels on the ESP at
/// `flatcar/vmlinuz-a|b`, each USR slot's tree at 12 MiB into it. Slot A
/// holds 1.0.0 (data, tree, kernel); 2.0.0 is published as full and delta
/// payloads of `usr`, `verity` and `kernel`.
fn flatcar_node(rel: &common::Releases, server: &HttpServer) -> (Node, FlatcarParts) {
    let node = Node::new(server, rel);
    let dir = tandem_testkit::TempDir::new("flatcar-parts");
    let d = dir.path();
    let (usr, hash, root) = usr_and_trees(rel, d);
    // The two kernels differ a little, as releases' kernels do.
    let kernel = [
        flatcar_kernel(d, "vmlinuz-1", 21, &root[0]),
        flatcar_kernel(d, "vmlinuz-2", 21, &root[1]),
    ];
    let disk = fs::OpenOptions::new()
        .write(true)
        .open(&node.disk.path)
        .unwrap();
    disk.write_all_at(
        &fs::read(&hash[0]).unwrap(),
        node.partition_offset(3) + FLATCAR_HASH_OFFSET,
    )
    .unwrap();
    let esp = node.dir.path().join("esp");
    fs::create_dir_all(esp.join("flatcar")).unwrap();
    fs::copy(&kernel[0], esp.join("flatcar/vmlinuz-a")).unwrap();
    node.configure(
        "60-flatcar",
        &format!(
            "[slots]\nesp = \"{}\"\nhash = \"in-slot\"\nhash_offset = {FLATCAR_HASH_OFFSET}\n",
            esp.display()
        ),
    );
    let file = |name: &str, target: &PathBuf, source: Option<&PathBuf>| ComponentInput {
        name: name.into(),
        target: target.clone(),
        source: source.cloned(),
        file: name == "kernel",
    };
    let full = vec![
        file("usr", &usr[1], None),
        file("verity", &hash[1], None),
        file("kernel", &kernel[1], None),
    ];
    make(rel, &full, None, "full-2.0.0.tpl");
    let delta = vec![
        file("usr", &usr[1], Some(&usr[0])),
        file("verity", &hash[1], Some(&hash[0])),
        file("kernel", &kernel[1], Some(&kernel[0])),
    ];
    make(rel, &delta, Some("1.0.0"), "delta-1.0.0-2.0.0.tpl");
    (
        node,
        FlatcarParts {
            dir,
            usr,
            hash,
            kernel,
            root,
        },
    )
}

#[test]
fn a_flatcar_slot_is_updated_with_its_tree_inside_usr_and_its_kernel_on_the_esp() {
    let rel = releases();
    let server = HttpServer::serve(&rel.www);
    let (mut node, parts) = flatcar_node(&rel, &server);
    rel.publish(1, vec![rel.release("2.0.0", true)], in_days(7), None);
    let esp = node.dir.path().join("esp");
    let args = [
        "slots",
        "--disk",
        node.disk.path_str(),
        "--kernels",
        esp.to_str().unwrap(),
        "--hash-offset",
        "12582912",
    ];
    let human = node.ctl_ok(&args);
    assert!(
        human.contains(&format!("vmlinuz-a (usrhash {})", parts.root[0])),
        "{human}"
    );
    assert!(human.contains("vmlinuz-b (missing)"), "{human}");
    assert!(
        human.contains(&format!(
            "hash:      inside the slot from byte {FLATCAR_HASH_OFFSET}"
        )),
        "{human}"
    );

    node.start();
    node.wait_health();
    let out = node.ctl_ok(&["apply"]);
    assert!(out.contains("2.0.0"), "{out}");
    // Slot B: data, then the tree at the offset; its kernel in place, the
    // staging file gone; slot A and its kernel untouched.
    assert_eq!(node.slot_bytes(4, rel.v2.len()), rel.v2);
    let b = node.slot_bytes(4, 16 << 20);
    let tree = fs::read(&parts.hash[1]).unwrap();
    let at = FLATCAR_HASH_OFFSET as usize;
    assert_eq!(&b[at..at + tree.len()], &tree[..]);
    assert_eq!(
        fs::read(esp.join("flatcar/vmlinuz-b")).unwrap(),
        fs::read(&parts.kernel[1]).unwrap()
    );
    assert!(!esp.join("flatcar/.vmlinuz-b.new").exists());
    assert_eq!(
        fs::read(esp.join("flatcar/vmlinuz-a")).unwrap(),
        fs::read(&parts.kernel[0]).unwrap()
    );
    assert_eq!(node.slot_bytes(3, rel.v1.len()), rel.v1);
    // veritysetup reads slot B as the kernel will: data and tree in one
    // partition, the tree at the offset, the root hash from the kernel.
    let part = parts.dir.path().join("usr-b.part");
    fs::write(&part, &b).unwrap();
    let p = part.to_str().unwrap();
    run(
        "veritysetup",
        &[
            "verify",
            p,
            p,
            &parts.root[1],
            &format!("--hash-offset={FLATCAR_HASH_OFFSET}"),
        ],
    );
    let s = node.status();
    assert_eq!(s["next_boot"], "B", "{s}");
    assert!(node
        .log_text()
        .contains(&format!("root hash {}", parts.root[1])));
    assert_eq!(common::payload_bytes_served(&server, "full-2.0.0.tpl"), 0);

    let shown: serde_json::Value = serde_json::from_str(&node.ctl_ok(&[
        "slots",
        "--disk",
        node.disk.path_str(),
        "--kernels",
        esp.to_str().unwrap(),
        "--hash-offset",
        "12582912",
        "--json",
    ]))
    .unwrap();
    assert_eq!(
        shown["slots"][1]["kernel"]["usrhash"],
        parts.root[1].as_str()
    );
    assert_eq!(shown["slots"][1]["hash"]["kind"], "in-slot");
    let _ = &parts.usr;
}

#[test]
fn a_flatcar_kernel_naming_another_root_hash_or_no_kernel_is_refused() {
    let rel = releases();
    let server = HttpServer::serve(&rel.www);
    let (mut node, parts) = flatcar_node(&rel, &server);
    // 2.0.0's data and tree with a kernel that names 1.0.0's root hash.
    let wrong = flatcar_kernel(parts.dir.path(), "wrong", 22, &parts.root[0]);
    let inputs = |kernel: Option<&PathBuf>| {
        let mut v = vec![
            part("usr", &parts.usr[1], None),
            part("verity", &parts.hash[1], None),
        ];
        if let Some(k) = kernel {
            v.push(ComponentInput {
                name: "kernel".into(),
                target: k.clone(),
                source: None,
                file: true,
            });
        }
        v
    };
    make(&rel, &inputs(Some(&wrong)), None, "full-2.0.0.tpl");
    rel.publish(1, vec![rel.release("2.0.0", false)], in_days(7), None);
    node.start();
    node.wait_health();
    let err = node.ctl_err(&["apply"]);
    assert!(err.contains("dm-verity check failed"), "{err}");
    assert!(err.contains(&parts.root[0]), "{err}");
    let esp = node.dir.path().join("esp");
    assert!(
        !esp.join("flatcar/vmlinuz-b").exists(),
        "the wrong kernel was installed"
    );
    assert_eq!(node.status()["next_boot"], "A");

    // No kernel at all: slot B would boot whatever kernel it had.
    make(&rel, &inputs(None), None, "full-2.0.0.tpl");
    rel.publish(2, vec![rel.release("2.0.0", false)], in_days(7), None);
    let err = node.ctl_err(&["apply"]);
    assert!(err.contains("has no kernel"), "{err}");
    assert!(!esp.join("flatcar/vmlinuz-b").exists());
    assert_eq!(node.status()["next_boot"], "A");
}
