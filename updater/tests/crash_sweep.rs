//! The crash sweep of `tandemd`: an update killed with SIGKILL at 20
//! points spread over the payload (between operations, right after
//! checkpoints, during the read-back, after the read-back matched, just
//! before and just after the boot flip), then the daemon restarted, which
//! resumes the recorded update by itself. Each time: slot B ends
//! byte-identical to the signed image, slot B's boot entry was not touched
//! before the slot was verified, and the payload bytes served stay under
//! 1.5x the payload. The points are armed with `TANDEM_FAILPOINT` (see
//! `payload::failpoint`): the daemon dies at an exact place, not after a
//! guessed time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use common::{in_days, payload_bytes_served, releases, Node};
use tandem_testkit::http::HttpServer;

/// Kills the update at each point, restarts the daemon, checks the result.
fn sweep(points: &[String]) {
    let rel = releases();
    rel.publish(1, vec![rel.release("2.0.0", false)], in_days(7), None);
    let name = "full-2.0.0.tpl";
    let size = fs::metadata(rel.www.join(name)).unwrap().len();
    let mut served_per_point = Vec::new();
    for point in points {
        let server = HttpServer::serve(&rel.www);
        // About three seconds per payload: the server's socket buffers
        // then hold little beyond what the daemon has read, so that what
        // the server counts as served is what the node downloaded.
        server.set_rate(size / 3);
        let mut node = Node::new(&server, &rel);
        node.daemon_env = vec![(payload::failpoint::ENV.into(), point.clone())];
        node.start();
        // The client's call dies with its daemon.
        let out = node.ctl(&["apply"]);
        assert!(!out.status.success(), "{point}: apply survived");
        let mut daemon = node.daemon.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = daemon.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "{point}: tandemd did not die");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.signal(), Some(9), "{point}: {status:?}");

        // Killed before the flip: slot B's entry is as the update left it
        // when it began (cleared: cannot boot), whatever was written.
        let (prio_b, tries_b, good_b) = node.disk.cgpt_prio(4);
        if point != "after-flip:1" {
            assert_eq!((prio_b, tries_b, good_b), (0, 0, false), "{point}");
        }

        // Restarted without the point: the update resumes by itself.
        node.daemon_env.clear();
        node.start();
        node.wait_for("staged", |s| s["state"] == "updated-need-reboot");
        node.assert_staged_v2(&rel);
        let served = payload_bytes_served(&server, name);
        assert!(
            served * 2 < size * 3,
            "{point}: {served} bytes served for a {size}-byte payload: {:?}",
            server.log_of(name)
        );
        served_per_point.push(format!("{point}: {:.2}x", served as f64 / size as f64));
    }
    eprintln!("payload {size} bytes; served: {served_per_point:#?}");
}

/// 13 points between operations, spread over the payload's 65.
#[test]
fn an_update_killed_between_operations_resumes_to_the_signed_bytes() {
    let points: Vec<String> = (1..=13).map(|k| format!("apply-op:{}", k * 5)).collect();
    sweep(&points);
}

/// 7 points: after checkpoints, during and after the read-back, just
/// before and just after the flip. With the 13 above, 20.
#[test]
fn an_update_killed_after_writing_resumes_and_flips_only_when_verified() {
    let mut points: Vec<String> = (1..=3)
        .map(|k| format!("apply-checkpoint:{}", k * 2))
        .collect();
    for p in [
        "apply-readback:1",
        "apply-verified:1",
        "before-flip:1",
        "after-flip:1",
    ] {
        points.push(p.into());
    }
    sweep(&points);
}
