//! End-to-end tests of `tandemd` and `updatectl` with real parts: a private
//! `dbus-daemon` with the shipped policy, `tandemd` as a process, an HTTP
//! server on 127.0.0.1 serving a signed index and payloads made by the
//! payload library, and GPT disk images made by `sgdisk` and read back by
//! `cgpt`. Run as root (`cargo xtask test` in CI): the daemon owns its bus
//! name as root, and one test drops to `nobody`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use payload::index::{format_time, PayloadRef, Release, ReleaseIndex};
use payload::{make_payload, ImageInput, MakeOptions, SigningKey};
use serde_json::Value;
use tandem_testkit::dbus::DbusDaemon;
use tandem_testkit::http::{Fault, HttpServer};
use tandem_testkit::{image_pair, DiskImage, TempDir};

const MIB: usize = 1 << 20;
const SECTOR: u64 = 512;

/// Images, keys and payloads, served from `www`.
struct Releases {
    _dir: TempDir,
    www: PathBuf,
    v1: Vec<u8>,
    v2: Vec<u8>,
    key: SigningKey,
    public: String,
}

fn releases() -> Releases {
    let dir = TempDir::new("releases");
    let www = dir.path().join("www");
    fs::create_dir_all(&www).unwrap();
    let (v1, v2) = image_pair();
    let (secret, public) =
        payload::sign::generate_key("tandem test <test@tandem.invalid>").unwrap();
    let key = SigningKey::from_bytes(secret.as_bytes()).unwrap();
    let i1 = dir.path().join("v1.img");
    let i2 = dir.path().join("v2.img");
    let i0 = dir.path().join("v0.img");
    fs::write(&i1, &v1).unwrap();
    fs::write(&i2, &v2).unwrap();
    // 0.9.0: an older release, for the downgrade refusal.
    let mut v0 = v1.clone();
    v0[..4096].fill(9);
    fs::write(&i0, &v0).unwrap();
    // Small operations (128 KiB), so that progress, checkpoints and kills
    // land between operations of an 8 MiB image.
    let opts = MakeOptions {
        level: 3,
        grouping: payload::plan::Grouping {
            literal_blocks: 32,
            bulk_blocks: 32,
        },
        ..MakeOptions::default()
    };
    let make = |target: (&Path, &str), source: Option<(&Path, &str)>, name: &str| {
        make_payload(
            ImageInput {
                path: target.0,
                version: target.1,
            },
            source.map(|(path, version)| ImageInput { path, version }),
            &key,
            &opts,
            &www.join(name),
            &|_| {},
        )
        .unwrap();
    };
    make((&i2, "2.0.0"), None, "full-2.0.0.tpl");
    make((&i1, "1.0.0"), None, "full-1.0.0.tpl");
    make((&i0, "0.9.0"), None, "full-0.9.0.tpl");
    make(
        (&i2, "2.0.0"),
        Some((&i1, "1.0.0")),
        "delta-1.0.0-2.0.0.tpl",
    );
    Releases {
        _dir: dir,
        www,
        v1,
        v2,
        key,
        public,
    }
}

impl Releases {
    fn payload_ref(&self, name: &str) -> PayloadRef {
        let bytes = fs::read(self.www.join(name)).unwrap();
        let head = payload::PayloadHead::read_unverified(&mut bytes.as_slice()).unwrap();
        PayloadRef {
            url: name.into(),
            size: bytes.len() as u64,
            sha256: payload::digest::sha256(&bytes),
            manifest_sha256: payload::digest::sha256(&head.manifest_bytes),
        }
    }

    fn release(&self, version: &str, delta: bool) -> Release {
        let deltas = if delta {
            let r = self.payload_ref(&format!("delta-1.0.0-{version}.tpl"));
            vec![payload::index::DeltaRef {
                source_version: "1.0.0".into(),
                url: r.url,
                size: r.size,
                sha256: r.sha256,
                manifest_sha256: r.manifest_sha256,
            }]
        } else {
            Vec::new()
        };
        Release {
            version: version.into(),
            published: "2026-11-01T00:00:00Z".into(),
            full: self.payload_ref(&format!("full-{version}.tpl")),
            deltas,
            rollout: None,
            barrier: false,
        }
    }

    /// Writes and signs `stable.json` (signed by `key`, or the release key).
    fn publish(
        &self,
        serial: u64,
        releases: Vec<Release>,
        expires: SystemTime,
        key: Option<&SigningKey>,
    ) {
        let mut index = ReleaseIndex::new("stable");
        index.serial = serial;
        index.expires = format_time(expires);
        index.releases = releases;
        let bytes = index.to_bytes();
        let sig = key.unwrap_or(&self.key).sign_detached(&bytes).unwrap();
        fs::write(self.www.join("stable.json"), &bytes).unwrap();
        fs::write(self.www.join("stable.json.sig"), &sig).unwrap();
    }
}

fn in_days(days: u64) -> SystemTime {
    SystemTime::now() + Duration::from_secs(days * 86400)
}

/// A node: a disk with v1 in slot A, its configuration, a private bus and
/// (when started) `tandemd`.
struct Node {
    dir: TempDir,
    disk: DiskImage,
    root: PathBuf,
    bus: DbusDaemon,
    daemon: Option<Child>,
    log: PathBuf,
}

impl Node {
    fn new(server: &HttpServer, rel: &Releases) -> Node {
        let dir = TempDir::new("node");
        let disk = DiskImage::flatcar(dir.path());
        let node_root = dir.path().join("root");
        let conf = node_root.join("etc/tandem/config.d");
        let keys = node_root.join("etc/tandem/keys.d");
        fs::create_dir_all(&conf).unwrap();
        fs::create_dir_all(&keys).unwrap();
        fs::write(keys.join("release.asc"), &rel.public).unwrap();
        let cmdline = dir.path().join("cmdline");
        fs::write(
            &cmdline,
            format!("console=ttyS0 mount.usr=PARTUUID={} ro\n", disk.partuuid(3)),
        )
        .unwrap();
        let os_release = dir.path().join("os-release");
        fs::write(
            &os_release,
            "NAME=\"Azure Container Linux\"\nVERSION_ID=1.0.0\n",
        )
        .unwrap();
        let machine_id = dir.path().join("machine-id");
        fs::write(&machine_id, "0123456789abcdef0123456789abcdef\n").unwrap();
        fs::write(
            conf.join("50-test.toml"),
            format!(
                r#"state_dir = "{state}"
[server]
index_url = "{index}"
[slots]
disk = "{disk}"
[keys]
dirs = ["{keys}"]
[system]
cmdline = "{cmdline}"
os_release = "{os_release}"
machine_id = "{machine_id}"
[schedule]
mode = "off"
[download]
connect_timeout_seconds = 2
read_timeout_seconds = 2
attempts = 4
backoff_initial_ms = 100
backoff_max_seconds = 1
[apply]
threads = 2
checkpoint_mib = 1
"#,
                state = dir.path().join("state").display(),
                index = server.url("stable.json"),
                disk = disk.path.display(),
                keys = keys.display(),
                cmdline = cmdline.display(),
                os_release = os_release.display(),
                machine_id = machine_id.display(),
            ),
        )
        .unwrap();
        let bus_dir = dir.path().join("bus");
        fs::create_dir_all(&bus_dir).unwrap();
        let bus = DbusDaemon::start(&bus_dir);
        let log = dir.path().join("tandemd.log");
        let node = Node {
            dir,
            disk,
            root: node_root,
            bus,
            daemon: None,
            log,
        };
        node.write_slot(3, &rel.v1);
        node
    }

    fn partition_offset(&self, number: u32) -> u64 {
        self.disk.cgpt_field(number, "-b").parse::<u64>().unwrap() * SECTOR
    }

    fn write_slot(&self, number: u32, bytes: &[u8]) {
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&self.disk.path)
            .unwrap();
        file.write_all_at(bytes, self.partition_offset(number))
            .unwrap();
    }

    fn slot_bytes(&self, number: u32, len: usize) -> Vec<u8> {
        let file = fs::File::open(&self.disk.path).unwrap();
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, self.partition_offset(number))
            .unwrap();
        buf
    }

    fn start(&mut self) {
        assert!(self.daemon.is_none());
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tandemd"))
            .arg("--root")
            .arg(&self.root)
            .env("DBUS_SYSTEM_BUS_ADDRESS", self.bus.address())
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.ctl(&["status", "--json"]).status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "tandemd did not come up:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_updatectl"))
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", self.bus.address())
            .output()
            .unwrap()
    }

    fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "updatectl {args:?} failed: {}\n--- tandemd log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn ctl_err(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            !out.status.success(),
            "updatectl {args:?} should have failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    fn status(&self) -> Value {
        serde_json::from_str(&self.ctl_ok(&["status", "--json"])).unwrap()
    }

    fn history_kinds(&self) -> Vec<String> {
        let h: Value = serde_json::from_str(&self.ctl_ok(&["history", "--json"])).unwrap();
        h.as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Waits until the status satisfies `done`.
    fn wait_for(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.ctl(&["status", "--json"]);
            if out.status.success() {
                let s: Value = serde_json::from_slice(&out.stdout).unwrap();
                if done(&s) {
                    return s;
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn assert_staged_v2(&self, rel: &Releases) {
        assert!(
            self.slot_bytes(4, rel.v2.len()) == rel.v2,
            "slot B is not v2"
        );
        assert!(self.slot_bytes(3, rel.v1.len()) == rel.v1, "slot A changed");
        // cgpt reads the gptprio bits: B above A, one try, not yet good.
        let (prio_b, tries_b, good_b) = self.disk.cgpt_prio(4);
        let (prio_a, _, good_a) = self.disk.cgpt_prio(3);
        assert!(prio_b > prio_a, "B priority {prio_b} not above A {prio_a}");
        assert_eq!((tries_b, good_b, good_a), (1, false, true));
        let s = self.status();
        assert_eq!(s["format_version"], 1);
        assert_eq!(s["state"], "updated-need-reboot", "{s}");
        assert_eq!(s["staged"]["version"], "2.0.0");
        assert_eq!(s["staged"]["slot"], "B");
        assert_eq!(s["next_boot"], "B");
        assert_eq!(s["booted"]["slot"], "A");
        assert_eq!(s["booted_version"], "1.0.0");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        let _ = &self.dir;
    }
}

fn payload_bytes_served(server: &HttpServer, name: &str) -> u64 {
    server.log_of(name).iter().map(|s| s.body_bytes).sum()
}

#[test]
fn updatectl_apply_stages_slot_b_from_the_delta() {
    let rel = releases();
    rel.publish(1, vec![rel.release("2.0.0", true)], in_days(7), None);
    let server = HttpServer::serve(&rel.www);
    let mut node = Node::new(&server, &rel);
    node.start();
    let s = node.status();
    assert_eq!(s["state"], "idle");
    assert_eq!(s["booted"]["slot"], "A");
    let check = node.ctl_ok(&["check"]);
    assert!(check.contains("Update available: 2.0.0"), "{check}");
    let out = node.ctl_ok(&["apply"]);
    assert!(out.contains("2.0.0 staged in slot B"), "{out}");
    node.assert_staged_v2(&rel);
    // The delta was used; the full payload was never fetched.
    assert!(!server.log_of("delta-1.0.0-2.0.0.tpl").is_empty());
    assert!(server.log_of("full-2.0.0.tpl").is_empty());
    let kinds = node.history_kinds();
    assert!(kinds.contains(&"staged".to_string()), "{kinds:?}");
    // Properties for watchers, over plain D-Bus.
    let human = node.ctl_ok(&["status"]);
    assert!(human.contains("2.0.0 in slot B"), "{human}");
    // Asking again is a no-op: the version is staged already.
    let again = node.ctl_ok(&["apply"]);
    assert!(again.contains("2.0.0 staged in slot B"), "{again}");
}

#[test]
fn the_full_payload_is_used_without_a_delta_or_when_the_source_differs() {
    let rel = releases();
    let server = HttpServer::serve(&rel.www);

    // No delta for the booted version.
    rel.publish(1, vec![rel.release("2.0.0", false)], in_days(7), None);
    let mut node = Node::new(&server, &rel);
    node.start();
    node.ctl_ok(&["apply"]);
    node.assert_staged_v2(&rel);
    assert!(!server.log_of("full-2.0.0.tpl").is_empty());
    drop(node);

    // A delta whose source is not what slot A holds.
    rel.publish(2, vec![rel.release("2.0.0", true)], in_days(7), None);
    let mut node = Node::new(&server, &rel);
    let mut changed = rel.v1.clone();
    changed[5 * MIB] ^= 0x55;
    node.write_slot(3, &changed);
    node.start();
    let before_full = server.log_of("full-2.0.0.tpl").len();
    node.ctl_ok(&["apply"]);
    assert!(node.slot_bytes(4, rel.v2.len()) == rel.v2);
    assert!(server.log_of("full-2.0.0.tpl").len() > before_full);
    assert!(node.history_kinds().contains(&"fallback".to_string()));
    assert_eq!(node.status()["state"], "updated-need-reboot");
}

#[test]
fn dropped_stalled_failing_and_lying_servers_are_resumed_with_ranges() {
    let rel = releases();
    rel.publish(1, vec![rel.release("2.0.0", false)], in_days(7), None);
    let server = HttpServer::serve(&rel.www);
    let name = "full-2.0.0.tpl";
    let size = fs::metadata(rel.www.join(name)).unwrap().len();
    for fault in [
        Fault::ServerError,
        Fault::ServerError,
        Fault::ServerError,
        Fault::DropAfter(300_000),
        Fault::ShortLength(size / 2),
        Fault::StallAfter(200_000, Duration::from_secs(4)),
        Fault::DropAfter(100_000),
    ] {
        server.fault(name, fault);
    }
    let mut node = Node::new(&server, &rel);
    node.start();
    node.ctl_ok(&["apply"]);
    node.assert_staged_v2(&rel);
    let log = server.log_of(name);
    let ranged: Vec<u64> = log
        .iter()
        .filter_map(|s| s.range_start)
        .filter(|&s| s > 0)
        .collect();
    assert!(ranged.len() >= 4, "{log:?}");
    // Each resume starts where the last body stopped: nothing twice.
    assert!(
        payload_bytes_served(&server, name) <= size + 64 * 1024,
        "{} bytes served for a {size}-byte payload: {log:?}",
        payload_bytes_served(&server, name)
    );
    assert!(log.iter().filter(|s| s.status == 500).count() == 3);
    let text = node.log_text();
    assert!(text.contains("resumed at byte"), "{text}");
}

#[test]
fn tandemd_killed_mid_apply_resumes_from_its_checkpoint() {
    let rel = releases();
    rel.publish(1, vec![rel.release("2.0.0", false)], in_days(7), None);
    let server = HttpServer::serve(&rel.www);
    let name = "full-2.0.0.tpl";
    let size = fs::metadata(rel.www.join(name)).unwrap().len();
    // About six seconds for the whole payload.
    server.set_rate((size / 6).max(64 * 1024));
    let mut node = Node::new(&server, &rel);
    node.start();
    // The client waits for the result; it ends with the first daemon.
    let mut client = Some(
        Command::new(env!("CARGO_BIN_EXE_updatectl"))
            .arg("apply")
            .env("DBUS_SYSTEM_BUS_ADDRESS", node.bus.address())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for at in [2 * MIB as u64, 5 * MIB as u64] {
        let s = node.wait_for("progress", |s| {
            s["progress"]["done_bytes"].as_u64().unwrap_or(0) >= at
        });
        assert_eq!(s["state"], "downloading");
        node.kill();
        if let Some(mut c) = client.take() {
            assert!(
                !c.wait().unwrap().success(),
                "the client saw its daemon die"
            );
        }
        // Restarted, the daemon resumes the recorded update by itself.
        node.start();
    }
    node.wait_for("staged", |s| s["state"] == "updated-need-reboot");
    node.assert_staged_v2(&rel);
    let served = payload_bytes_served(&server, name);
    assert!(
        served < size + size / 2,
        "{served} bytes served for a {size}-byte payload: {:?}",
        server.log_of(name)
    );
    let kinds = node.history_kinds();
    assert_eq!(
        kinds.iter().filter(|k| *k == "resumed").count(),
        2,
        "{kinds:?}"
    );
    assert!(server
        .log_of(name)
        .iter()
        .any(|s| s.range_start.is_some_and(|r| r > 0)));
}

#[test]
fn bad_indexes_payloads_and_downgrades_are_refused_and_change_nothing() {
    let rel = releases();
    let server = HttpServer::serve(&rel.www);
    rel.publish(5, vec![rel.release("2.0.0", false)], in_days(7), None);
    let mut node = Node::new(&server, &rel);
    node.start();
    node.ctl_ok(&["check"]); // serial 5 accepted
    let before = fs::read(&node.disk.path).unwrap();
    let unchanged = |node: &Node, what: &str| {
        assert!(
            fs::read(&node.disk.path).unwrap() == before,
            "{what}: the disk changed"
        );
        let s = node.status();
        assert_eq!(s["state"], "idle", "{what}: {s}");
        assert!(s["staged"].is_null(), "{what}");
    };

    rel.publish(4, vec![rel.release("2.0.0", false)], in_days(7), None);
    let err = node.ctl_err(&["apply"]);
    assert!(err.contains("older than the last accepted"), "{err}");
    unchanged(&node, "lower serial");

    rel.publish(
        6,
        vec![rel.release("2.0.0", false)],
        SystemTime::now() - Duration::from_secs(60),
        None,
    );
    let err = node.ctl_err(&["apply"]);
    assert!(err.contains("expired"), "{err}");
    unchanged(&node, "expired");

    let (other, _) = payload::sign::generate_key("mallory <m@evil.invalid>").unwrap();
    let other = SigningKey::from_bytes(other.as_bytes()).unwrap();
    rel.publish(
        7,
        vec![rel.release("2.0.0", false)],
        in_days(7),
        Some(&other),
    );
    let err = node.ctl_err(&["apply"]);
    assert!(err.contains("signature"), "{err}");
    unchanged(&node, "bad signature");

    // A validly signed payload, but not the one the index names.
    rel.publish(8, vec![rel.release("2.0.0", false)], in_days(7), None);
    let good = fs::read(rel.www.join("full-2.0.0.tpl")).unwrap();
    fs::copy(
        rel.www.join("full-1.0.0.tpl"),
        rel.www.join("full-2.0.0.tpl"),
    )
    .unwrap();
    let err = node.ctl_err(&["apply"]);
    assert!(err.contains("the index says"), "{err}");
    unchanged(&node, "payload hash");
    fs::write(rel.www.join("full-2.0.0.tpl"), good).unwrap();

    rel.publish(9, vec![rel.release("0.9.0", false)], in_days(7), None);
    let err = node.ctl_err(&["apply", "0.9.0"]);
    assert!(err.contains("--allow-downgrade"), "{err}");
    unchanged(&node, "downgrade");
    let path = rel.www.join("full-0.9.0.tpl");
    let err = node.ctl_err(&["apply", "--payload", path.to_str().unwrap()]);
    assert!(err.contains("--allow-downgrade"), "{err}");
    unchanged(&node, "downgrade by payload");
    let kinds = node.history_kinds();
    assert!(
        kinds.iter().filter(|k| *k == "refused").count() >= 5,
        "{kinds:?}"
    );
    // A person may downgrade on purpose.
    node.ctl_ok(&["apply", "0.9.0", "--allow-downgrade"]);
    assert_eq!(node.status()["staged"]["version"], "0.9.0");
    // An update that fails after slot B's boot state was cleared (the
    // payload's data is cut short) no longer reports 0.9.0 as staged, and
    // B does not boot.
    rel.publish(10, vec![rel.release("2.0.0", false)], in_days(7), None);
    let full = rel.www.join("full-2.0.0.tpl");
    let bytes = fs::read(&full).unwrap();
    fs::write(&full, &bytes[..bytes.len() / 2]).unwrap();
    node.ctl_err(&["apply"]);
    let s = node.status();
    assert!(s["staged"].is_null(), "{s}");
    assert_eq!(s["state"], "idle", "{s}");
    assert_eq!(node.disk.cgpt_prio(4), (0, 0, false));
    assert_eq!(s["next_boot"], "A");
}

#[test]
fn any_user_reads_the_status_but_only_root_may_apply() {
    let rel = releases();
    rel.publish(1, vec![rel.release("2.0.0", true)], in_days(7), None);
    let server = HttpServer::serve(&rel.www);
    let mut node = Node::new(&server, &rel);
    node.start();
    let bin = node.dir.path().join("bin");
    fs::create_dir_all(&bin).unwrap();
    let ctl = bin.join("updatectl");
    fs::copy(env!("CARGO_BIN_EXE_updatectl"), &ctl).unwrap();
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&ctl)
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", node.bus.address())
            .current_dir("/")
            .output()
            .unwrap()
    };
    let out = as_nobody(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["booted"]["slot"], "A");
    let out = as_nobody(&["history"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = fs::read(&node.disk.path).unwrap();
    for args in [&["apply"][..], &["check"], &["cancel"]] {
        let out = as_nobody(args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("AccessDenied"), "{args:?}: {err}");
    }
    assert!(fs::read(&node.disk.path).unwrap() == before);
    assert!(server.log_of("stable.json").is_empty());
}
