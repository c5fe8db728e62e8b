//! The dm-verity gate end to end: `tandemd` on a private bus updating a
//! disk laid out as ACL's (each `/usr` slot with a HASH partition of the
//! DPS usr-verity type), payloads over HTTP on 127.0.0.1. A slot with a
//! hash tree is never set to boot unless its tree matches its data and
//! its root hash is the `usrhash=` its boot artifact names; the gptprio
//! backend has no such artifact, so the update is refused, clearly, with
//! the boot state as it was.

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
