//! Logging: straight to the journal's native protocol when it is there,
//! with structured fields and a `MESSAGE_ID` per kind of event; otherwise
//! plain lines on stderr.
//!
//! The engine logs each history event (see `Engine::record`) as a tracing
//! event with the fields `tandem_event` (the kind) and `tandem_version`.
//! [`JournalLayer`] sends every tracing event as one datagram to the
//! journal's socket (`/run/systemd/journal/socket`), as `sd_journal_send`
//! does: `MESSAGE`, `PRIORITY`, `SYSLOG_IDENTIFIER`, `CODE_FILE`,
//! `CODE_LINE`, `TANDEM_EVENT`, `TANDEM_VERSION`, and `MESSAGE_ID` for the
//! kinds in [`MESSAGE_IDS`]. `journalctl MESSAGE_ID=...` or
//! `journalctl TANDEM_EVENT=rollback` then finds them.

use std::fmt::Write as _;
use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// The journal's native socket.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// The `MESSAGE_ID` of each kind of event, stable across releases (like
/// the ids of systemd's message catalog).
pub const MESSAGE_IDS: [(&str, &str); 18] = [
    ("check", "cbef719d244b4d9ea06f3794ce4351a7"),
    ("download-started", "3385693ce41645d39f0b7f87187654af"),
    ("resumed", "45f6aa6d60c94fd5b9b9d3fd4cbfa098"),
    ("fallback", "d1aa4727b4bb490ba572a4cd4218694b"),
    ("checkpoint", "0f966fb9fdb94c139a69298b3b5f8e88"),
    ("staged", "5f94039085d54334b914f31348890608"),
    ("finalized", "c478e5ec5cc242ef898525c6824dd567"),
    ("reboot", "e4218dcf4e204cdea10b0cd7f3ed2a1c"),
    ("booted", "a3f7c7d418684d32ac0b41f2cdbb9ec3"),
    ("health-passed", "3ee56cf7f45c410cb62ecad8810adf15"),
    ("health-failed", "e4c4c6043fcf48db991e6d871a1610ec"),
    ("rollback", "dd2ae058008b491788b05f422c195433"),
    ("marked-good", "03f964bb2d544769b90781dc28f8dc57"),
    ("marked-bad", "b458479d4931488b89b74ac777dcad06"),
    ("failed", "a0de1c383181478d8704f6bbcd256504"),
    ("refused", "7295183f47754282a91dee2d944d9cd1"),
    ("cancelled", "3bce0c2db3cf4ca5a901fb4c99a4b468"),
    ("fleetlock", "6db1d7d798af42f0988dba42e349a65d"),
];

/// The `MESSAGE_ID` of an event kind. Pure.
pub fn message_id(kind: &str) -> Option<&'static str> {
    MESSAGE_IDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, id)| *id)
}

/// Where the logs go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Journal(PathBuf),
    Stderr,
}

/// `--log auto`: the journal when systemd connected stderr to it
/// (`JOURNAL_STREAM` is set) and its socket exists; else stderr. Pure but
/// for the socket's existence, which the caller passes.
pub fn choose(journal_stream: bool, socket: &Path, socket_exists: bool) -> Target {
    if journal_stream && socket_exists {
        Target::Journal(socket.to_owned())
    } else {
        Target::Stderr
    }
}

/// The syslog priority of a tracing level.
fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// Appends one field in the native protocol: `KEY=value\n`, or, for a
/// value with a newline, `KEY\n`, its length (u64 little-endian), the
/// value and `\n`. Pure.
pub fn push_field(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(key.as_bytes());
    if value.contains('\n') {
        out.push(b'\n');
        out.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        out.push(b'=');
    }
    out.extend_from_slice(value.as_bytes());
    out.push(b'\n');
}

/// The journal fields of one event. Pure.
pub fn entry(
    level: &Level,
    message: &str,
    event: Option<&str>,
    version: Option<&str>,
    file: Option<&str>,
    line: Option<u32>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + message.len());
    push_field(&mut out, "MESSAGE", message);
    push_field(&mut out, "PRIORITY", &priority(level).to_string());
    push_field(&mut out, "SYSLOG_IDENTIFIER", "tandemd");
    if let Some(kind) = event {
        push_field(&mut out, "TANDEM_EVENT", kind);
        if let Some(id) = message_id(kind) {
            push_field(&mut out, "MESSAGE_ID", id);
        }
    }
    if let Some(v) = version {
        push_field(&mut out, "TANDEM_VERSION", v);
    }
    if let Some(f) = file {
        push_field(&mut out, "CODE_FILE", f);
    }
    if let Some(l) = line {
        push_field(&mut out, "CODE_LINE", &l.to_string());
    }
    out
}

#[derive(Default)]
struct Fields {
    message: String,
    event: Option<String>,
    version: Option<String>,
    /// Other fields, as ` key=value` after the message.
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "tandem_event" => self.event = Some(value.to_owned()),
            "tandem_version" => self.version = Some(value.to_owned()),
            "message" => self.message = value.to_owned(),
            name => {
                let _ = write!(self.rest, " {name}={value}");
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            "tandem_event" | "tandem_version" => self.record_str(field, &format!("{value:?}")),
            name => {
                let _ = write!(self.rest, " {name}={value:?}");
            }
        }
    }
}

/// A tracing layer that sends each event to the journal's socket; an
/// event the journal does not take (socket gone, queue full, too large)
/// is written to stderr instead, so nothing is lost.
#[derive(Debug)]
pub struct JournalLayer {
    socket: UnixDatagram,
    path: PathBuf,
}

impl JournalLayer {
    /// The socket does not block: a journal that stalls must not stall
    /// updates; what it cannot take at once goes to stderr (which systemd
    /// also hands to the journal, as plain lines).
    pub fn new(path: &Path) -> io::Result<JournalLayer> {
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok(JournalLayer {
            socket,
            path: path.to_owned(),
        })
    }
}

impl<S: Subscriber> Layer<S> for JournalLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        let message = format!("{}{}", fields.message, fields.rest);
        let datagram = entry(
            meta.level(),
            &message,
            fields.event.as_deref(),
            fields.version.as_deref(),
            meta.file(),
            meta.line(),
        );
        if let Err(e) = self.socket.send_to(&datagram, &self.path) {
            eprintln!("{} {message} (the journal refused it: {e})", meta.level());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_follow_the_native_protocol() {
        let mut out = Vec::new();
        push_field(&mut out, "MESSAGE", "one line");
        push_field(&mut out, "MESSAGE", "two\nlines");
        let mut want = b"MESSAGE=one line\nMESSAGE\n".to_vec();
        want.extend_from_slice(&9u64.to_le_bytes());
        want.extend_from_slice(b"two\nlines\n");
        assert_eq!(out, want);
    }

    #[test]
    fn an_event_kind_has_a_message_id_and_priorities_follow_syslog() {
        let e = entry(
            &Level::WARN,
            "rollback: x",
            Some("rollback"),
            Some("2.0"),
            None,
            None,
        );
        let text = String::from_utf8(e).unwrap();
        assert!(text.contains("PRIORITY=4\n"), "{text}");
        assert!(
            text.contains("MESSAGE_ID=dd2ae058008b491788b05f422c195433\n"),
            "{text}"
        );
        assert!(text.contains("TANDEM_VERSION=2.0\n"), "{text}");
        // Ids are unique and 128-bit hex.
        let mut ids: Vec<&str> = MESSAGE_IDS.iter().map(|(_, id)| *id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), MESSAGE_IDS.len());
        assert!(ids
            .iter()
            .all(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())));
        assert_eq!(message_id("no-such-kind"), None);
    }

    #[test]
    fn auto_takes_the_journal_only_when_systemd_connected_it() {
        let sock = Path::new(JOURNAL_SOCKET);
        assert_eq!(choose(true, sock, true), Target::Journal(sock.into()));
        assert_eq!(choose(false, sock, true), Target::Stderr);
        assert_eq!(choose(true, sock, false), Target::Stderr);
    }
}
