//! A fleetlock server on 127.0.0.1 for end-to-end tests, speaking the
//! protocol Zincati speaks to Airlock: `POST /v1/pre-reboot` takes one of
//! `slots` reboot slots of a group (409 when all are held by others),
//! `POST /v1/steady-state` gives the caller's back. Both need the header
//! `fleet-lock-protocol: true` and a JSON body
//! `{"client_params":{"id":…,"group":…}}` (400 otherwise). It can start
//! on a port chosen before it listens, so a test can show a client
//! retrying while the server is down.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// One request the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockRequest {
    pub path: String,
    pub id: String,
    pub group: String,
    pub status: u16,
}

#[derive(Debug, Default)]
struct Shared {
    holders: Vec<String>,
    log: Vec<LockRequest>,
}

/// The server; stops when dropped.
#[derive(Debug)]
pub struct FleetlockServer {
    port: u16,
    slots: usize,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
}

/// Where [`free_port`] looks: below Linux's default ephemeral range
/// (32768–60999), so that no outgoing connection of any process takes a
/// port between the time it is chosen and the time its server listens.
const PORTS: std::ops::Range<u16> = 20000..32000;

/// A free port on 127.0.0.1, for a server that starts later (or restarts
/// on the same port). Ports come from [`PORTS`], never handed out twice by
/// one process, starting at an offset derived from the process ID so that
/// test processes running side by side do not meet; each is checked free
/// by binding it. (A port the kernel picks for `:0` is an ephemeral one,
/// which any connection may take before the server binds it: kube-apiserver
/// once failed to start on CI with "address already in use".)
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(PORTS.end - PORTS.start);
    let base = std::process::id().wrapping_mul(2654435761) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let offset = u16::try_from((base + n) % span).expect("span fits u16");
        let port = PORTS.start + offset;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 in {PORTS:?}")
}

impl FleetlockServer {
    /// Listens on `port` with `slots` reboot slots.
    pub fn start(port: u16, slots: usize) -> FleetlockServer {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let state = shared.clone();
        crate::http::accept_loop(listener, stop.clone(), move |conn| {
            let _ = handle(conn, slots, &state);
        });
        FleetlockServer {
            port,
            slots,
            shared,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Holds a slot for another node.
    pub fn hold(&self, id: &str) {
        let mut s = self.shared.lock().unwrap();
        assert!(s.holders.len() < self.slots, "no slot left to hold");
        s.holders.push(id.to_owned());
    }

    pub fn release(&self, id: &str) {
        self.shared.lock().unwrap().holders.retain(|h| h != id);
    }

    pub fn holders(&self) -> Vec<String> {
        self.shared.lock().unwrap().holders.clone()
    }

    pub fn log(&self) -> Vec<LockRequest> {
        self.shared.lock().unwrap().log.clone()
    }
}

impl Drop for FleetlockServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn answer(conn: &mut TcpStream, status: u16, text: &str, body: &str) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {status} {text}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}

fn handle(mut conn: TcpStream, slots: usize, shared: &Mutex<Shared>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let path = parts.next().unwrap_or("").to_owned();
    let mut length = 0usize;
    let mut protocol = false;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                length = v.parse().unwrap_or(0);
            }
            if k == "fleet-lock-protocol" && v == "true" {
                protocol = true;
            }
        }
    }
    let mut body = vec![0u8; length.min(1 << 16)];
    reader.read_exact(&mut body)?;
    let params: Option<(String, String)> = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            let p = v.get("client_params")?;
            Some((
                p.get("id")?.as_str()?.to_owned(),
                p.get("group")?.as_str()?.to_owned(),
            ))
        });
    let mut s = shared.lock().unwrap();
    let (status, text, reply) = match (&*method, &*path, protocol, &params) {
        (_, _, false, _) | (_, _, _, None) => (
            400,
            "Bad Request",
            r#"{"kind":"bad_request","value":"fleet-lock-protocol header and client_params needed"}"#,
        ),
        ("POST", "/v1/pre-reboot", true, Some((id, _))) => {
            if s.holders.contains(id) {
                (200, "OK", "{}")
            } else if s.holders.len() < slots {
                s.holders.push(id.clone());
                (200, "OK", "{}")
            } else {
                (
                    409,
                    "Conflict",
                    r#"{"kind":"failed_lock","value":"all reboot slots are held"}"#,
                )
            }
        }
        ("POST", "/v1/steady-state", true, Some((id, _))) => {
            s.holders.retain(|h| h != id);
            (200, "OK", "{}")
        }
        _ => (404, "Not Found", r#"{"kind":"not_found","value":""}"#),
    };
    let (id, group) = params.unwrap_or_default();
    s.log.push(LockRequest {
        path,
        id,
        group,
        status,
    });
    drop(s);
    answer(&mut conn, status, text, reply)
}
