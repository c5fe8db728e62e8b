//! A real HTTP/1.1 server on 127.0.0.1 for end-to-end tests: serves the
//! files of a folder with `Range` support, and misbehaves on request the
//! way networks and CDNs do (dropped connections, stalls, 5xx answers,
//! a Content-Length that lies, a slow link). It logs every request.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One misbehaviour, used up by the request it applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer `500 Internal Server Error`.
    ServerError,
    /// Send this many body bytes, then close the connection.
    DropAfter(u64),
    /// Send this many body bytes, then go silent for the duration.
    StallAfter(u64, Duration),
    /// Claim a Content-Length this many bytes short of the body, send
    /// that much and close (a length that lies; a length too long is what
    /// `DropAfter` looks like to the client).
    ShortLength(u64),
}

/// What one request got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub path: String,
    /// The start of the `Range` asked for, if one was.
    pub range_start: Option<u64>,
    pub status: u16,
    pub body_bytes: u64,
}

#[derive(Debug, Default)]
struct Shared {
    faults: Vec<(String, Fault)>,
    log: Vec<Served>,
    /// Bytes per second for bodies; 0 is unlimited.
    rate: u64,
}

/// The server; stops when dropped.
#[derive(Debug)]
pub struct HttpServer {
    port: u16,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
}

impl HttpServer {
    pub fn serve(root: &Path) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let root = root.to_owned();
        let served = shared.clone();
        accept_loop(listener, stop.clone(), move |conn| {
            let _ = handle(conn, &root, &served);
        });
        HttpServer { port, shared, stop }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Queues a fault for the next requests of `path` (file name).
    pub fn fault(&self, path: &str, fault: Fault) {
        self.shared
            .lock()
            .unwrap()
            .faults
            .push((path.to_owned(), fault));
    }

    /// Limits body bytes per second for every response.
    pub fn set_rate(&self, bytes_per_second: u64) {
        self.shared.lock().unwrap().rate = bytes_per_second;
    }

    pub fn log(&self) -> Vec<Served> {
        self.shared.lock().unwrap().log.clone()
    }

    /// Requests of one file.
    pub fn log_of(&self, path: &str) -> Vec<Served> {
        self.log().into_iter().filter(|s| s.path == path).collect()
    }
}

/// Serves each connection on its own thread until `stop` is set (the
/// owner then connects once to wake the loop).
pub(crate) fn accept_loop(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    serve: impl Fn(TcpStream) + Send + Sync + 'static,
) {
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let Ok(conn) = conn else { continue };
            let serve = serve.clone();
            std::thread::spawn(move || serve(conn));
        }
    });
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn handle(conn: TcpStream, root: &Path, shared: &Mutex<Shared>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut range_start = None;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("range") {
                    range_start = value
                        .trim()
                        .strip_prefix("bytes=")
                        .and_then(|r| r.split('-').next())
                        .and_then(|s| s.parse::<u64>().ok());
                }
            }
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .trim_start_matches('/')
            .to_owned();
        let (fault, rate) = {
            let mut s = shared.lock().unwrap();
            let i = s.faults.iter().position(|(p, _)| *p == path);
            (i.map(|i| s.faults.remove(i).1), s.rate)
        };
        let file: PathBuf = root.join(&path);
        let record = |status: u16, body_bytes: u64| {
            shared.lock().unwrap().log.push(Served {
                path: path.clone(),
                range_start,
                status,
                body_bytes,
            });
        };
        if fault == Some(Fault::ServerError) {
            record(500, 0);
            out.write_all(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
            return Ok(());
        }
        let Ok(data) = std::fs::read(&file) else {
            record(404, 0);
            out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")?;
            continue;
        };
        let start = range_start.unwrap_or(0).min(data.len() as u64) as usize;
        let body = &data[start..];
        let (status, mut head) = match range_start {
            Some(_) => (
                206,
                format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{}/{}\r\n",
                    data.len().saturating_sub(1),
                    data.len()
                ),
            ),
            None => (
                200,
                "HTTP/1.1 200 OK\r\nAccept-Ranges: bytes\r\n".to_owned(),
            ),
        };
        let claimed = match &fault {
            Some(Fault::ShortLength(short)) => (body.len() as u64).saturating_sub(*short),
            _ => body.len() as u64,
        };
        head.push_str(&format!("Content-Length: {claimed}\r\n\r\n"));
        out.write_all(head.as_bytes())?;
        let limit = match &fault {
            Some(Fault::DropAfter(n)) | Some(Fault::StallAfter(n, _)) => {
                (*n as usize).min(body.len())
            }
            _ => claimed as usize,
        };
        let mut sent = 0usize;
        let chunk = 16 * 1024;
        while sent < limit {
            let n = chunk.min(limit - sent);
            if out.write_all(&body[sent..sent + n]).is_err() {
                record(status, sent as u64);
                return Ok(());
            }
            sent += n;
            if rate > 0 {
                std::thread::sleep(Duration::from_secs_f64(n as f64 / rate as f64));
            }
        }
        record(status, sent as u64);
        match fault {
            Some(Fault::StallAfter(_, pause)) => {
                std::thread::sleep(pause);
                return Ok(());
            }
            Some(Fault::DropAfter(_)) | Some(Fault::ShortLength(_)) => return Ok(()),
            _ => {}
        }
    }
}
