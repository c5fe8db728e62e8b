//! Fixtures shared by the end-to-end tests: signed releases served over
//! HTTP on 127.0.0.1, and a node (a GPT disk image with v1 in slot A, its
//! configuration, a private `dbus-daemon`, and `tandemd` as a process).
//! The reboot action of every node is a recorder, and every path the
//! engine writes is inside the node's temporary folder.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use bootconfig::backend::GptPrioBackend;
use bootconfig::gpt::GptDisk;
use bootconfig::slots::find_slots;
use bootconfig::SlotLayout;
use payload::index::{format_time, PayloadRef, Release, ReleaseIndex};
use payload::{make_payload, ImageInput, MakeOptions, SigningKey};
use serde_json::Value;
use tandem_testkit::dbus::DbusDaemon;
use tandem_testkit::http::HttpServer;
use tandem_testkit::{image_pair, DiskImage, TempDir};

pub const MIB: usize = 1 << 20;

/// The status document's schema, as shipped.
pub const STATUS_SCHEMA: &str = include_str!("../../status.schema.json");

/// Checks a document against [`STATUS_SCHEMA`] with an independent
/// validator: python3-jsonschema (Draft 2020-12), which also checks the
/// schema itself. `Err` lists each error with its JSON path.
pub fn schema_errors(doc: &Value) -> Result<(), String> {
    const SCRIPT: &str = r#"
import json, sys
from jsonschema import Draft202012Validator
d = json.load(sys.stdin)
Draft202012Validator.check_schema(d["schema"])
errors = list(Draft202012Validator(d["schema"]).iter_errors(d["doc"]))
for e in errors:
    # A nullable field's error is an anyOf: show the deepest error of its
    # branches (the one in the object, not "is not null").
    while e.context:
        e = max(e.context, key=lambda c: len(c.absolute_path))
    print("/" + "/".join(map(str, e.absolute_path)) + ": " + e.message)
sys.exit(1 if errors else 0)
"#;
    let schema: Value = serde_json::from_str(STATUS_SCHEMA).unwrap();
    let input = serde_json::json!({ "schema": schema, "doc": doc }).to_string();
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs (Debian package python3-jsonschema)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    match out.status.code() {
        Some(0) => Ok(()),
        Some(1) => Err(String::from_utf8_lossy(&out.stdout).into_owned()),
        _ => panic!(
            "the schema check could not run: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// A workspace binary. Cargo names the updater's own for its tests; the
/// tests of other crates that share these fixtures (cluster-tests) find
/// them beside their own executable, in the target folder.
pub fn bin(name: &str) -> PathBuf {
    let given = match name {
        "tandemd" => option_env!("CARGO_BIN_EXE_tandemd"),
        "updatectl" => option_env!("CARGO_BIN_EXE_updatectl"),
        _ => None,
    };
    if let Some(p) = given {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first (`cargo build --bins`; cargo xtask test does)",
        path.display()
    );
    path
}
pub const SECTOR: u64 = 512;

/// Images, keys and payloads, served from `www`.
pub struct Releases {
    _dir: TempDir,
    pub www: PathBuf,
    pub v1: Vec<u8>,
    pub v2: Vec<u8>,
    pub key: SigningKey,
    pub public: String,
}

pub fn releases() -> Releases {
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
    pub fn payload_ref(&self, name: &str) -> PayloadRef {
        let bytes = fs::read(self.www.join(name)).unwrap();
        let head = payload::PayloadHead::read_unverified(&mut bytes.as_slice()).unwrap();
        PayloadRef {
            url: name.into(),
            size: bytes.len() as u64,
            sha256: payload::digest::sha256(&bytes),
            manifest_sha256: payload::digest::sha256(&head.manifest_bytes),
        }
    }

    pub fn release(&self, version: &str, delta: bool) -> Release {
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
    pub fn publish(
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

pub fn in_days(days: u64) -> SystemTime {
    SystemTime::now() + Duration::from_secs(days * 86400)
}

/// A node: a disk with v1 in slot A, its configuration, a private bus and
/// (when started) `tandemd`.
pub struct Node {
    pub dir: TempDir,
    pub disk: DiskImage,
    pub root: PathBuf,
    pub bus: DbusDaemon,
    pub daemon: Option<Child>,
    pub log: PathBuf,
    /// More arguments for `tandemd` (e.g. `--log journal`).
    pub daemon_args: Vec<String>,
    /// More environment for `tandemd` (e.g. `TANDEM_FAILPOINT`).
    pub daemon_env: Vec<(String, String)>,
    boots: u32,
}

impl Node {
    pub fn new(server: &HttpServer, rel: &Releases) -> Node {
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
boot_id = "{boot_id}"
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
[reboot]
strategy = "off"
command = ["sh", "-c", 'echo "$TANDEM_REBOOT_REASON" >> {reboots}']
required_file = "{required}"
retry_seconds = 1
[health]
dirs = ["{root}/usr/lib/tandem/health.d", "{root}/etc/tandem/health.d"]
deadline_seconds = 20
retry_seconds = 1
script_timeout_seconds = 10
[metrics]
textfile = "{metrics}"
"#,
                state = dir.path().join("state").display(),
                index = server.url("stable.json"),
                disk = disk.path.display(),
                keys = keys.display(),
                cmdline = cmdline.display(),
                os_release = os_release.display(),
                machine_id = machine_id.display(),
                boot_id = dir.path().join("boot_id").display(),
                reboots = dir.path().join("reboots").display(),
                required = dir.path().join("reboot-required").display(),
                root = node_root.display(),
                metrics = dir.path().join("tandem.prom").display(),
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
            daemon_args: Vec::new(),
            daemon_env: Vec::new(),
            boots: 0,
        };
        fs::write(node.dir.path().join("boot_id"), "boot-0\n").unwrap();
        node.write_slot(3, &rel.v1);
        node
    }

    pub fn partition_offset(&self, number: u32) -> u64 {
        self.disk.cgpt_field(number, "-b").parse::<u64>().unwrap() * SECTOR
    }

    pub fn write_slot(&self, number: u32, bytes: &[u8]) {
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&self.disk.path)
            .unwrap();
        file.write_all_at(bytes, self.partition_offset(number))
            .unwrap();
    }

    pub fn slot_bytes(&self, number: u32, len: usize) -> Vec<u8> {
        let file = fs::File::open(&self.disk.path).unwrap();
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, self.partition_offset(number))
            .unwrap();
        buf
    }

    pub fn start(&mut self) {
        assert!(self.daemon.is_none());
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(bin("tandemd"))
            .arg("--root")
            .arg(&self.root)
            .args(&self.daemon_args)
            .env_remove(payload::failpoint::ENV)
            .envs(self.daemon_env.iter().map(|(k, v)| (k, v)))
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

    pub fn kill(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(bin("updatectl"))
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", self.bus.address())
            .output()
            .unwrap()
    }

    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "updatectl {args:?} failed: {}\n--- tandemd log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn ctl_err(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            !out.status.success(),
            "updatectl {args:?} should have failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// The status document, checked against `updater/status.schema.json`.
    pub fn status(&self) -> Value {
        let text = self.ctl_ok(&["status", "--json"]);
        let doc: Value = serde_json::from_str(&text).unwrap();
        if let Err(errors) = schema_errors(&doc) {
            panic!("the status document does not match its schema:\n{errors}\n{text}");
        }
        doc
    }

    pub fn history_kinds(&self) -> Vec<String> {
        let h: Value = serde_json::from_str(&self.ctl_ok(&["history", "--json"])).unwrap();
        h.as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Waits until the status satisfies `done`.
    pub fn wait_for(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.ctl(&["status", "--json"]);
            if out.status.success() {
                let s: Value = serde_json::from_slice(&out.stdout).unwrap();
                if done(&s) {
                    if let Err(errors) = schema_errors(&s) {
                        panic!("the status document does not match its schema:\n{errors}\n{s:#}");
                    }
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

    pub fn assert_staged_v2(&self, rel: &Releases) {
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

impl Node {
    /// Adds a configuration drop-in (read after `50-test.toml`, key by key).
    pub fn configure(&self, name: &str, toml: &str) {
        fs::write(
            self.root
                .join("etc/tandem/config.d")
                .join(format!("{name}.toml")),
            toml,
        )
        .unwrap();
    }

    /// Installs a health executable in `etc/tandem/health.d`.
    pub fn health_script(&self, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.root.join("etc/tandem/health.d");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// What the reboot action recorded, one reason per call.
    pub fn reboots(&self) -> Vec<String> {
        fs::read_to_string(self.dir.path().join("reboots"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub fn stop(&mut self) {
        if let Some(child) = self.daemon.take() {
            let pid = child.id().to_string();
            Command::new("kill").args(["-TERM", &pid]).status().unwrap();
            let mut child = child;
            child.wait().unwrap();
        }
    }

    /// A reboot, simulated: tandemd stops, GRUB's `gptprio.next` picks a
    /// slot and spends its try on the disk image, the kernel command line
    /// names the slot picked, its image's os-release gives `versions` of
    /// the slot (A, B), the boot id changes, and tandemd starts again.
    /// Returns the slot booted (`"A"` or `"B"`).
    pub fn reboot(&mut self, versions: [&str; 2]) -> String {
        self.stop();
        let booted = {
            let disk = GptDisk::open_for_update(&self.disk.path).unwrap();
            let slots = find_slots(
                &disk.partitions(),
                disk.sector_size(),
                disk.size_bytes(),
                &SlotLayout::default(),
            )
            .unwrap();
            let mut backend = GptPrioBackend::new(disk, slots);
            backend
                .simulate_grub_boot()
                .unwrap()
                .expect("GRUB finds a slot")
        };
        let slot = if booted.number == 3 { "A" } else { "B" };
        let version = versions[usize::from(slot == "B")];
        self.boot_as(booted.number, version);
        slot.to_owned()
    }

    /// The node comes up (tandemd started again, with a new boot id) from
    /// partition `number` running `version`: the reboot's second half, for
    /// tests that pick the partition by another bootloader's rule. tandemd
    /// must be stopped.
    pub fn boot_as(&mut self, number: u32, version: &str) {
        let booted_number = number;
        fs::write(
            self.dir.path().join("cmdline"),
            format!(
                "console=ttyS0 mount.usr=PARTUUID={} ro\n",
                self.disk.partuuid(booted_number)
            ),
        )
        .unwrap();
        fs::write(
            self.dir.path().join("os-release"),
            format!("NAME=\"Azure Container Linux\"\nVERSION_ID={version}\n"),
        )
        .unwrap();
        self.boots += 1;
        fs::write(
            self.dir.path().join("boot_id"),
            format!("boot-{}\n", self.boots),
        )
        .unwrap();
        let _ = fs::remove_file(self.dir.path().join("reboot-required"));
        self.start();
    }

    /// The history's events (kind, version, message, output).
    pub fn history(&self) -> Vec<Value> {
        let h: Value = serde_json::from_str(&self.ctl_ok(&["history", "--json"])).unwrap();
        h.as_array().unwrap().clone()
    }

    /// Waits until this boot's assessment is over; returns the status.
    pub fn wait_health(&self) -> Value {
        self.wait_for("the health assessment", |s| {
            !matches!(s["health"].as_str(), Some("pending" | "running")) && s["operation"].is_null()
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        let _ = &self.dir;
    }
}

pub fn payload_bytes_served(server: &HttpServer, name: &str) -> u64 {
    server.log_of(name).iter().map(|s| s.body_bytes).sum()
}
