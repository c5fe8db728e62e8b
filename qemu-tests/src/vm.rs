//! The runner: one QEMU (q35, OVMF, KVM when `/dev/kvm` works, TCG
//! otherwise) on a copy of the test disk, its serial console appended to
//! `console.log`, and a virtio-serial port to the guest's agent. A VM lives
//! across the guest's reboots (QEMU runs with `-no-reboot`; each reboot is
//! a new QEMU process on the same disk); [`Vm::power_cut`] kills QEMU and
//! [`Vm::start`] boots the same disk again.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::build::{run, Built};

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// How QEMU runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// `TANDEM_VM_ACCEL` (`kvm` or `tcg`) when set; else KVM when
    /// `/dev/kvm` opens read-write and is a hardware KVM, else TCG. PVM
    /// (`kvm_pvm`, the pagetable-based nested KVM of some cloud sandboxes)
    /// runs only PVM-enabled guest kernels and no firmware, so it counts as
    /// no KVM.
    pub fn detect() -> Accel {
        match std::env::var("TANDEM_VM_ACCEL").as_deref() {
            Ok("tcg") => return Accel::Tcg,
            Ok("kvm") => return Accel::Kvm,
            _ => {}
        }
        if Path::new("/sys/module/kvm_pvm").exists() {
            return Accel::Tcg;
        }
        match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
            Ok(_) => Accel::Kvm,
            Err(_) => Accel::Tcg,
        }
    }

    /// The longest one boot (firmware to the report) may take:
    /// `TANDEM_VM_BOOT_TIMEOUT` seconds, else 180 s with KVM, 600 s without
    /// (a boot takes about 40 s with TCG on this machine).
    pub fn boot_timeout(self) -> Duration {
        if let Some(secs) = std::env::var("TANDEM_VM_BOOT_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            return Duration::from_secs(secs);
        }
        Duration::from_secs(match self {
            Accel::Kvm => 180,
            Accel::Tcg => 600,
        })
    }
}

/// What the guest printed on the console at the end of one boot's
/// assessment (`tandem-vm-report`).
#[derive(Debug, Clone)]
pub struct Report {
    pub boot_id: String,
    /// `VERSION_ID` of the booted image.
    pub version: String,
    /// Exit code of `updatectl health --wait`.
    pub health_rc: i32,
    /// `updatectl status --json`.
    pub status: Value,
    /// `updatectl history --json`.
    pub history: Value,
    /// The file names in the ESP's `loader/entries` and `EFI/Linux`.
    pub entries: Vec<String>,
    /// `/proc/cmdline`.
    pub cmdline: String,
    /// `dmsetup table usr`: the verity device of the ACL-layout images.
    pub verity: String,
    /// `journalctl -b -o json SYSLOG_IDENTIFIER=tandemd`: tandemd's
    /// events of this boot as the guest's journald stored them (an array;
    /// empty when the line is missing).
    pub journal: Value,
}

impl Report {
    /// The booted slot, as tandemd reports it.
    pub fn slot(&self) -> String {
        self.status["booted"]["slot"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// History events of a kind, oldest first.
    pub fn events(&self, kind: &str) -> Vec<Value> {
        self.history_list()
            .into_iter()
            .filter(|e| e["kind"] == kind)
            .collect()
    }

    /// Every history event, oldest first.
    pub fn history_list(&self) -> Vec<Value> {
        match &self.history {
            Value::Array(list) => list.clone(),
            other => other["events"].as_array().cloned().unwrap_or_default(),
        }
    }

    /// tandemd's journal entries of an event kind (`TANDEM_EVENT`).
    pub fn journal_events(&self, kind: &str) -> Vec<Value> {
        self.journal
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["TANDEM_EVENT"] == kind)
            .cloned()
            .collect()
    }

    /// The slot's BLS entry file name (`tandem-slot-b+1-0.conf`).
    pub fn entry_of(&self, slot: &str) -> Option<String> {
        let stem = format!("tandem-slot-{}", slot.to_lowercase());
        self.entries
            .iter()
            .find(|e| {
                !e.ends_with(".extra.d")
                    && e.strip_prefix(&stem)
                        .is_some_and(|r| r.starts_with(['.', '+']))
            })
            .cloned()
    }
}

/// One boot's early line (`tandem-vm-boot`): version and root device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootLine {
    pub boot_id: String,
    pub version: String,
    pub device: String,
}

fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
}

/// The reports in a console log, in order. Pure.
pub fn parse_reports(console: &str) -> Vec<Report> {
    let lines: Vec<&str> = console.lines().map(|l| l.trim_end_matches('\r')).collect();
    let mut reports = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(at) = line.find("TANDEM-REPORT ") else {
            continue;
        };
        let head = &line[at..];
        let (Some(boot_id), Some(version)) = (field(head, "boot_id"), field(head, "version"))
        else {
            continue;
        };
        let json_after = |tag: &str| {
            lines[i + 1..]
                .iter()
                .take_while(|l| !l.contains("TANDEM-REPORT-END"))
                .find_map(|l| {
                    let at = l.find(tag)?;
                    serde_json::from_str::<Value>(l[at + tag.len()..].trim()).ok()
                })
        };
        let ended = lines[i + 1..]
            .iter()
            .any(|l| l.contains(&format!("TANDEM-REPORT-END boot_id={boot_id}")));
        let entries = lines[i + 1..]
            .iter()
            .take_while(|l| !l.contains("TANDEM-REPORT-END"))
            .find_map(|l| {
                let at = l.find("TANDEM-ENTRIES")?;
                Some(
                    l[at + 14..]
                        .split_whitespace()
                        .map(str::to_string)
                        .collect(),
                )
            })
            .unwrap_or_default();
        let line_after = |tag: &str| {
            lines[i + 1..]
                .iter()
                .take_while(|l| !l.contains("TANDEM-REPORT-END"))
                .find_map(|l| Some(l[l.find(tag)? + tag.len()..].trim().to_string()))
                .unwrap_or_default()
        };
        let (cmdline, verity) = (line_after("TANDEM-CMDLINE "), line_after("TANDEM-VERITY "));
        let journal = json_after("TANDEM-JOURNAL ").unwrap_or_else(|| Value::Array(Vec::new()));
        let (Some(status), Some(history)) =
            (json_after("TANDEM-STATUS "), json_after("TANDEM-HISTORY "))
        else {
            continue;
        };
        if !ended {
            continue;
        }
        reports.push(Report {
            boot_id,
            version,
            health_rc: field(head, "health_rc")
                .and_then(|v| v.parse().ok())
                .unwrap_or(-1),
            status,
            history,
            entries,
            cmdline,
            verity,
            journal,
        });
    }
    reports
}

/// The early boot lines in a console log, in order. Pure.
pub fn parse_boot_lines(console: &str) -> Vec<BootLine> {
    console
        .lines()
        .filter_map(|line| {
            let at = line.find("TANDEM-BOOT ")?;
            let line = line[at..].trim_end_matches('\r');
            Some(BootLine {
                boot_id: field(line, "boot_id")?,
                version: field(line, "version")?,
                device: field(line, "device").unwrap_or_default(),
            })
        })
        .collect()
}

/// Options of one VM.
#[derive(Debug, Clone, Default)]
pub struct VmOptions {
    /// Write limit of the main disk in bytes per second (QEMU throttling),
    /// so that a test can cut the power mid-write.
    pub write_limit: Option<u64>,
    /// Copy the console to stdout as it grows (the demo).
    pub echo_console: bool,
}

/// A test VM on its own copy of the disk.
#[derive(Debug)]
pub struct Vm {
    pub dir: PathBuf,
    pub accel: Accel,
    disk: PathBuf,
    release: PathBuf,
    console: PathBuf,
    child: Option<Child>,
    agent: Option<BufReader<UnixStream>>,
    next_id: u64,
    echoed: usize,
    /// Guest reboots so far (each one a new QEMU process).
    pub resets: u32,
    pub options: VmOptions,
}

impl Vm {
    /// A VM in `dir` (created; emptied of an earlier run's files) booting
    /// a fresh copy of the built disk with `version` in slot A. Not started.
    pub fn new(dir: &Path, built: &Built, version: &str, options: VmOptions) -> Result<Vm> {
        Self::on_disk(dir, &built.disk(version)?, &built.release_disk, options)
    }

    /// A VM booting a fresh copy of `template` with `release` as its
    /// release disk.
    pub fn on_disk(dir: &Path, template: &Path, release: &Path, options: VmOptions) -> Result<Vm> {
        fs::create_dir_all(dir)?;
        let disk = dir.join("disk.img");
        let _ = fs::remove_file(&disk);
        run(Command::new("cp")
            .arg("--sparse=always")
            .arg(template)
            .arg(&disk))?;
        fs::copy(OVMF_VARS, dir.join("OVMF_VARS.fd"))
            .context("OVMF is missing: install Debian's ovmf")?;
        let console = dir.join("console.log");
        File::create(&console)?;
        File::create(dir.join("qemu.log"))?;
        Ok(Vm {
            dir: dir.to_path_buf(),
            accel: Accel::detect(),
            disk,
            release: release.to_path_buf(),
            console,
            child: None,
            agent: None,
            next_id: 1,
            echoed: 0,
            resets: 0,
            options,
        })
    }

    /// Starts QEMU (power on) and connects to the agent's port.
    pub fn start(&mut self) -> Result<()> {
        let socket = self.dir.join("agent.sock");
        let _ = fs::remove_file(&socket);
        let mut disk = format!(
            "file={},format=raw,if=virtio,cache=writeback",
            self.disk.display()
        );
        if let Some(limit) = self.options.write_limit {
            disk.push_str(&format!(",throttling.bps-write={limit}"));
        }
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args(["-machine", "q35", "-m", "1024", "-smp", "1", "-no-reboot"])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-nic",
                "none",
            ]);
        match self.accel {
            Accel::Kvm => qemu.args(["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => qemu.args(["-accel", "tcg", "-cpu", "max"]),
        };
        qemu.arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                self.dir.join("OVMF_VARS.fd").display()
            ))
            .arg("-drive")
            .arg(disk)
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio,readonly=on",
                self.release.display()
            ))
            .arg("-chardev")
            .arg(format!(
                "file,id=console,path={},append=on",
                self.console.display()
            ))
            .args(["-serial", "chardev:console"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=agent,path={},server=on,wait=off",
                socket.display()
            ))
            .args(["-device", "virtio-serial-pci"])
            .args(["-device", "virtserialport,chardev=agent,name=tandem.agent"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join("qemu.log"))?,
            );
        let child = qemu
            .spawn()
            .context("cannot start qemu-system-x86_64 (install Debian's qemu-system-x86)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(&socket) {
                Ok(stream) => break stream,
                Err(e) => {
                    if let Some(status) = self
                        .child
                        .as_mut()
                        .and_then(|c| c.try_wait().ok().flatten())
                    {
                        bail!(
                            "qemu exited ({status}): {}",
                            fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default()
                        );
                    }
                    if Instant::now() > deadline {
                        bail!(
                            "cannot connect to the agent socket {}: {e}",
                            socket.display()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        self.agent = Some(BufReader::new(stream));
        Ok(())
    }

    /// Kills QEMU at once: a power cut. What the guest had not yet written
    /// to its disk is lost.
    pub fn power_cut(&mut self) -> Result<()> {
        self.agent = None;
        if let Some(mut child) = self.child.take() {
            child.kill().context("cannot kill qemu")?;
            child.wait()?;
        }
        Ok(())
    }

    /// The VM's own copy of the disk (change it only while powered off).
    pub fn disk_path(&self) -> &Path {
        &self.disk
    }

    /// The console so far.
    pub fn console(&mut self) -> String {
        let text = fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if self.options.echo_console && text.len() > self.echoed {
            let new = &text[self.echoed..];
            let mut out = std::io::stdout().lock();
            for line in new.split_inclusive('\n') {
                let line = strip_ansi(line.trim_end_matches(['\r', '\n']));
                // The JSON lines are for the test; the summary shows them.
                if !["TANDEM-STATUS", "TANDEM-HISTORY"]
                    .iter()
                    .any(|tag| line.contains(tag))
                {
                    let _ = writeln!(out, "  | {line}");
                }
            }
            self.echoed = text.len();
        }
        text
    }

    /// Fails when QEMU died; powers it on again when the guest reset.
    ///
    /// QEMU runs with `-no-reboot`: a guest reboot (or panic reboot) makes
    /// it exit 0, and the runner starts it again on the same disk and
    /// firmware variables, a cold power-on. OVMF under TCG was seen to hang
    /// after a warm reset (100% CPU, no output) in about one reboot in
    /// thirty; a cold start does not go through that path.
    fn check_running(&mut self) -> Result<()> {
        let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        else {
            return Ok(());
        };
        if status.success() {
            self.child = None;
            self.agent = None;
            self.resets += 1;
            return self.start();
        }
        bail!(
            "qemu exited ({status}): {}; console tail:\n{}",
            fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default(),
            tail(&self.console(), 40)
        );
    }

    /// Polls the console until `found` returns something, within one
    /// boot's timeout times `boots` (the boots expected on the way),
    /// powering the guest on again after its reboots.
    fn wait_console<T>(
        &mut self,
        boots: u32,
        what: &str,
        found: impl Fn(&str) -> Option<T>,
    ) -> Result<T> {
        let timeout = self.accel.boot_timeout() * boots;
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.console();
            if let Some(value) = found(&text) {
                return Ok(value);
            }
            self.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "{what}: not seen within {}s; console tail:\n{}",
                    timeout.as_secs(),
                    tail(&text, 60)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits for the first report `pred` accepts.
    pub fn wait_report(
        &mut self,
        boots: u32,
        what: &str,
        pred: impl Fn(&Report) -> bool,
    ) -> Result<Report> {
        self.wait_console(boots, what, |text| {
            parse_reports(text).into_iter().find(|r| pred(r))
        })
    }

    /// Waits until `pred` holds for the console's early boot lines.
    pub fn wait_boot_lines(
        &mut self,
        boots: u32,
        what: &str,
        pred: impl Fn(&[BootLine]) -> bool,
    ) -> Result<Vec<BootLine>> {
        self.wait_console(boots, what, |text| {
            let lines = parse_boot_lines(text);
            pred(&lines).then_some(lines)
        })
    }

    fn agent(&mut self) -> Result<&mut BufReader<UnixStream>> {
        self.agent.as_mut().context("the VM is not running")
    }

    /// Sends a command to the guest's agent without waiting for it (it may
    /// reboot the guest).
    pub fn send(&mut self, command: &str) -> Result<u64> {
        if command.contains('\n') {
            bail!("one line per command");
        }
        let id = self.next_id;
        self.next_id += 1;
        let stream = self.agent()?.get_mut();
        writeln!(stream, "{id} {command}").context("cannot write to the agent")?;
        Ok(id)
    }

    /// Runs a shell command in the guest; returns its exit code and its
    /// output (stdout and stderr).
    pub fn run(&mut self, command: &str, timeout: Duration) -> Result<(i32, String)> {
        let id = self.send(command)?;
        let deadline = Instant::now() + timeout;
        let mut output = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "the guest did not finish {command:?} within {}s",
                    timeout.as_secs()
                );
            }
            let reader = self.agent()?;
            reader
                .get_ref()
                .set_read_timeout(Some(left.min(Duration::from_secs(1))))?;
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) => bail!("the agent's connection closed during {command:?}"),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    self.console();
                    self.check_running()?;
                    continue;
                }
                Err(e) => return Err(e).context("reading from the agent"),
            }
            if let Some(rest) = line.trim_end().strip_prefix("@@done ") {
                let mut words = rest.split_whitespace();
                if words.next() == Some(&id.to_string()) {
                    let rc = words.next().and_then(|w| w.parse().ok()).unwrap_or(-1);
                    return Ok((rc, output));
                }
                // What came before was an earlier, unwaited command's.
                output.clear();
                continue;
            }
            if line.starts_with("@@ready ") {
                continue;
            }
            output.push_str(&line);
        }
    }

    /// Runs a command that must succeed; returns its output.
    pub fn run_ok(&mut self, command: &str) -> Result<String> {
        let (rc, output) = self.run(command, Duration::from_secs(600))?;
        if rc != 0 {
            bail!("{command:?} failed in the guest (exit {rc}):\n{output}");
        }
        Ok(output)
    }

    /// `updatectl status --json`, from the guest.
    pub fn status(&mut self) -> Result<Value> {
        let text = self.run_ok("updatectl status --json")?;
        serde_json::from_str(&text).with_context(|| format!("status is not JSON: {text}"))
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.power_cut();
    }
}

/// A console line without its terminal escapes (colours, clears). Pure.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // Parameters, then one final letter.
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The last `n` lines of a text.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn reads_reports_and_boot_lines_from_a_console() {
        let console = "\x1b[2J BdsDxe: loading\r\n\
            TANDEM-BOOT boot_id=b1 version=1.0.0 partuuid=x device=vda2\r\n\
            [  OK  ] Started something.\r\n\
            TANDEM-REPORT boot_id=b1 version=1.0.0 health_rc=0\r\n\
            TANDEM-STATUS {\"booted\": {\"slot\": \"A\"}, \"health\": \"passed\"}\r\n\
            [   12.5] a kernel line in between\r\n\
            TANDEM-HISTORY [{\"kind\": \"booted\"}, {\"kind\": \"health-passed\"}]\r\n\
            TANDEM-ENTRIES tandem-slot-a.conf tandem-slot-b+0-1.conf \r\n\
            TANDEM-REPORT-END boot_id=b1\r\n\
            TANDEM-REPORT boot_id=b2 version=2.0.0 health_rc=1\r\n\
            TANDEM-STATUS {\"booted\": {\"slot\": \"B\"}}\r\n";
        let reports = parse_reports(console);
        // b2's report is cut short (no history, no end): not a report yet.
        assert_eq!(reports.len(), 1);
        let r = &reports[0];
        assert_eq!((r.boot_id.as_str(), r.version.as_str()), ("b1", "1.0.0"));
        assert_eq!(r.slot(), "A");
        assert_eq!(r.health_rc, 0);
        assert_eq!(r.events("health-passed").len(), 1);
        assert_eq!(r.entry_of("A").as_deref(), Some("tandem-slot-a.conf"));
        assert_eq!(r.entry_of("B").as_deref(), Some("tandem-slot-b+0-1.conf"));
        let boots = parse_boot_lines(console);
        assert_eq!(
            boots,
            vec![BootLine {
                boot_id: "b1".into(),
                version: "1.0.0".into(),
                device: "vda2".into()
            }]
        );
        assert_eq!(
            strip_ansi("[\x1b[0;32m  OK  \x1b[0m] Started \x1b[0;1;39mx\x1b[0m."),
            "[  OK  ] Started x."
        );
    }
}
