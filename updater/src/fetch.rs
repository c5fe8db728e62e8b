//! Downloads: `https://` and `http://` through reqwest (rustls, the system's
//! CA store and `server.ca_file`, proxies from the environment or the configuration) and
//! `file://`. A payload is never stored: [`RangeReader`] hands its bytes
//! straight to the applier and, when a connection drops, stalls or a server
//! fails, asks again for the rest with `Range: bytes=N-`, trying the mirrors
//! in order and backing off between rounds.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use payload::PayloadReader;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use reqwest::StatusCode;

pub use reqwest::Url;

/// How hard to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPolicy {
    pub connect_timeout: Duration,
    /// Longest wait for a response or for the next bytes of a body.
    pub read_timeout: Duration,
    /// Failed rounds (every URL tried once) in a row, without a byte of
    /// progress, before giving up.
    pub attempts: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// `None`: the `https_proxy`/`http_proxy`/`no_proxy` environment.
    pub proxy: Option<String>,
    /// PEM certificates trusted for `https://`, besides the system's store
    /// (a private update server's CA).
    pub ca_file: Option<PathBuf>,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        FetchPolicy {
            connect_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(60),
            attempts: 6,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            proxy: None,
            ca_file: None,
        }
    }
}

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot set up the HTTP client: {0}")]
    Client(String),
    #[error("{url}: {message}")]
    Failed { url: String, message: String },
    #[error("{url}: larger than the {limit} bytes allowed")]
    TooLarge { url: String, limit: u64 },
    #[error("not a URL: {0}")]
    BadUrl(String),
    #[error("cancelled")]
    Cancelled,
}

/// Byte and request counts of a download, shared with whoever reports it.
#[derive(Debug, Default)]
pub struct FetchStats {
    pub requests: AtomicU64,
    /// Body bytes received, including any read again after a restart.
    pub received: AtomicU64,
    /// Requests that resumed with a `Range` after the first.
    pub resumed: AtomicU64,
}

/// An HTTP client with a retry policy.
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::blocking::Client,
    policy: FetchPolicy,
    cancel: Arc<AtomicBool>,
}

/// The certificates of a PEM file; an unreadable file, or one without a
/// certificate, is an error (a node must not fall back to trusting less
/// than it was told, or silently to the system store alone).
fn read_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, FetchError> {
    let bad =
        |message: String| FetchError::Client(format!("CA file {}: {message}", path.display()));
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// Parses a URL, or an absolute path as a `file://` URL.
pub fn parse_url(text: &str) -> Result<Url, FetchError> {
    if text.starts_with('/') {
        return Url::from_file_path(text).map_err(|()| FetchError::BadUrl(text.to_owned()));
    }
    let url = Url::parse(text).map_err(|e| FetchError::BadUrl(format!("{text}: {e}")))?;
    match url.scheme() {
        "http" | "https" | "file" => Ok(url),
        other => Err(FetchError::BadUrl(format!(
            "{text}: scheme {other} is not supported (https, http, file)"
        ))),
    }
}

impl Fetcher {
    /// `cancel` stops any download in progress at its next read or wait.
    pub fn new(policy: FetchPolicy, cancel: Arc<AtomicBool>) -> Result<Fetcher, FetchError> {
        let mut builder = reqwest::blocking::Client::builder()
            .connect_timeout(policy.connect_timeout)
            .timeout(policy.read_timeout)
            .user_agent(concat!("tandemd/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &policy.ca_file {
            for cert in read_ca_file(path)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let Some(proxy) = &policy.proxy {
            let proxy = reqwest::Proxy::all(proxy)
                .map_err(|e| FetchError::Client(format!("proxy {proxy}: {e}")))?;
            builder = builder.proxy(proxy);
        }
        let client = builder
            .build()
            .map_err(|e| FetchError::Client(e.to_string()))?;
        Ok(Fetcher {
            client,
            policy,
            cancel,
        })
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Sleeps for the `round`th backoff (0-based), waking early on cancel.
    fn back_off(&self, round: u32) -> Result<(), FetchError> {
        let factor = 1u32.checked_shl(round.min(16)).unwrap_or(u32::MAX);
        let wait = self
            .policy
            .backoff_initial
            .saturating_mul(factor)
            .min(self.policy.backoff_max);
        let step = Duration::from_millis(50);
        let mut waited = Duration::ZERO;
        while waited < wait {
            if self.cancelled() {
                return Err(FetchError::Cancelled);
            }
            std::thread::sleep(step.min(wait - waited));
            waited += step;
        }
        Ok(())
    }

    /// Fetches a small document (an index, a signature) whole, trying each
    /// URL in order, in rounds with backoff.
    pub fn get_small(&self, urls: &[Url], limit: u64) -> Result<(Vec<u8>, Url), FetchError> {
        let mut last = None;
        for round in 0..self.policy.attempts.max(1) {
            if round > 0 {
                self.back_off(round - 1)?;
            }
            for url in urls {
                if self.cancelled() {
                    return Err(FetchError::Cancelled);
                }
                match self.get_whole(url, limit) {
                    Ok(bytes) => return Ok((bytes, url.clone())),
                    Err(e @ FetchError::TooLarge { .. }) => return Err(e),
                    Err(e) => {
                        tracing::warn!("{e}");
                        last = Some(e);
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| FetchError::BadUrl("no URL to fetch".into())))
    }

    fn get_whole(&self, url: &Url, limit: u64) -> Result<Vec<u8>, FetchError> {
        let failed = |message: String| FetchError::Failed {
            url: url.to_string(),
            message,
        };
        let reader: Box<dyn Read> = if url.scheme() == "file" {
            let path = url
                .to_file_path()
                .map_err(|()| failed("not a local path".into()))?;
            Box::new(File::open(&path).map_err(|e| failed(e.to_string()))?)
        } else {
            let response = self
                .client
                .get(url.clone())
                .send()
                .map_err(|e| failed(describe(&e)))?;
            if response.status() != StatusCode::OK {
                return Err(failed(format!("server answered {}", response.status())));
            }
            Box::new(response)
        };
        let mut bytes = Vec::new();
        reader
            .take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| failed(e.to_string()))?;
        if bytes.len() as u64 > limit {
            return Err(FetchError::TooLarge {
                url: url.to_string(),
                limit,
            });
        }
        Ok(bytes)
    }

    /// A reader of the document at `urls` (mirrors in order) that resumes
    /// by itself. `size`, when known, is the exact length expected.
    pub fn open(&self, urls: Vec<Url>, size: Option<u64>) -> RangeReader {
        RangeReader {
            fetcher: self.clone(),
            urls,
            current: 0,
            size,
            pos: 0,
            body: None,
            failures: 0,
            stats: Arc::new(FetchStats::default()),
        }
    }
}

/// reqwest's error with its causes, on one line.
pub fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    if e.is_timeout() {
        text.push_str(" (timed out)");
    }
    text
}

/// A download read front to back that survives dropped connections,
/// stalls, server errors and wrong lengths by asking for the rest.
pub struct RangeReader {
    fetcher: Fetcher,
    urls: Vec<Url>,
    /// Index into `urls` of the source in use.
    current: usize,
    size: Option<u64>,
    pos: u64,
    body: Option<Box<dyn Read + Send>>,
    /// Failures in a row without progress.
    failures: u32,
    stats: Arc<FetchStats>,
}

impl std::fmt::Debug for RangeReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RangeReader")
            .field("url", &self.url().as_str())
            .field("pos", &self.pos)
            .field("size", &self.size)
            .field("failures", &self.failures)
            .finish()
    }
}

impl RangeReader {
    pub fn stats(&self) -> Arc<FetchStats> {
        self.stats.clone()
    }

    /// The position of the next byte `read` returns.
    pub fn position(&self) -> u64 {
        self.pos
    }

    fn url(&self) -> &Url {
        &self.urls[self.current.min(self.urls.len().saturating_sub(1))]
    }

    /// Opens the current URL at `pos`.
    fn connect(&mut self) -> Result<Box<dyn Read + Send>, String> {
        let url = self.url().clone();
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        if url.scheme() == "file" {
            let path = url
                .to_file_path()
                .map_err(|()| "not a local path".to_string())?;
            let mut file = File::open(&path).map_err(|e| e.to_string())?;
            file.seek(SeekFrom::Start(self.pos))
                .map_err(|e| e.to_string())?;
            return Ok(Box::new(file));
        }
        let mut request = self.fetcher.client.get(url.clone());
        if self.pos > 0 {
            request = request.header(RANGE, format!("bytes={}-", self.pos));
        }
        let response = request.send().map_err(|e| describe(&e))?;
        let status = response.status();
        match status {
            StatusCode::PARTIAL_CONTENT => {
                let range = response
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let (start, total) = parse_content_range(range)
                    .ok_or_else(|| format!("206 with an unreadable Content-Range {range:?}"))?;
                if start != self.pos {
                    return Err(format!(
                        "asked for bytes from {}, got a range from {start}",
                        self.pos
                    ));
                }
                if let (Some(want), Some(total)) = (self.size, total) {
                    if want != total {
                        return Err(format!("the file is {total} bytes, the index says {want}"));
                    }
                }
                Ok(Box::new(response))
            }
            StatusCode::OK => {
                if let (Some(want), Some(len)) = (self.size, content_length(&response)) {
                    if want != len {
                        tracing::warn!(
                            "{url}: Content-Length {len}, the index says {want}; reading on"
                        );
                    }
                }
                let mut body: Box<dyn Read + Send> = Box::new(response);
                if self.pos > 0 {
                    // The server ignores Range: read up to where we were.
                    tracing::warn!("{url}: server ignored Range; skipping {} bytes", self.pos);
                    let skipped = io::copy(&mut (&mut body).take(self.pos), &mut io::sink())
                        .map_err(|e| e.to_string())?;
                    if skipped != self.pos {
                        return Err(format!("body ended at byte {skipped}"));
                    }
                }
                Ok(body)
            }
            other => Err(format!("server answered {other}")),
        }
    }

    /// Counts a failure and moves to the next URL; backs off after each
    /// full round of them; gives up after `attempts` rounds in a row.
    fn fail(&mut self, message: &str) -> io::Result<()> {
        self.body = None;
        self.failures += 1;
        let count = self.urls.len().max(1) as u32;
        let limit = self.fetcher.policy.attempts.max(1).saturating_mul(count);
        tracing::warn!(
            "download {} at byte {}: {message} (failure {} of {limit})",
            self.url(),
            self.pos,
            self.failures,
        );
        if self.failures >= limit {
            return Err(io::Error::other(FetchError::Failed {
                url: self.url().to_string(),
                message: format!("{message}; gave up after {} tries", self.failures),
            }));
        }
        self.current = (self.current + 1) % count as usize;
        if self.failures.is_multiple_of(count) {
            self.fetcher
                .back_off(self.failures / count - 1)
                .map_err(io::Error::other)?;
        }
        Ok(())
    }
}

fn content_length(response: &reqwest::blocking::Response) -> Option<u64> {
    response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// `bytes START-END/TOTAL` → (START, TOTAL); TOTAL may be `*`. Pure.
pub fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    if end < start {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start, total))
}

impl Read for RangeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.urls.is_empty() {
            return Err(io::Error::other("no URL to download"));
        }
        loop {
            if self.fetcher.cancelled() {
                return Err(io::Error::other(FetchError::Cancelled));
            }
            let want = match self.size {
                Some(size) if self.pos >= size => return Ok(0),
                Some(size) => {
                    usize::try_from(size - self.pos).map_or(buf.len(), |n| n.min(buf.len()))
                }
                None => buf.len(),
            };
            if self.body.is_none() {
                let resuming = self.pos > 0;
                match self.connect() {
                    Ok(body) => {
                        if resuming {
                            self.stats.resumed.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(
                                "download {}: resumed at byte {} (Range: bytes={}-)",
                                self.url(),
                                self.pos,
                                self.pos
                            );
                        }
                        self.body = Some(body);
                    }
                    Err(message) => {
                        self.fail(&message)?;
                        continue;
                    }
                }
            }
            let Some(body) = self.body.as_mut() else {
                continue;
            };
            match body.read(&mut buf[..want]) {
                Ok(0) if self.size.is_none() => return Ok(0),
                Ok(0) => {
                    let message = format!(
                        "connection ended at byte {} of {}",
                        self.pos,
                        self.size.unwrap_or(0)
                    );
                    self.fail(&message)?;
                }
                Ok(n) => {
                    self.pos += n as u64;
                    self.failures = 0;
                    self.stats.received.fetch_add(n as u64, Ordering::Relaxed);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let message = e.to_string();
                    self.fail(&message)?;
                }
            }
        }
    }
}

impl PayloadReader for RangeReader {
    /// Skips without downloading: the next read asks for a range.
    fn skip_forward(&mut self, n: u64) -> io::Result<u64> {
        let end = self.pos.saturating_add(n);
        let end = self.size.map_or(end, |size| end.min(size));
        let skipped = end - self.pos;
        if skipped > 0 {
            self.body = None;
            self.pos = end;
        }
        Ok(skipped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_is_parsed_strictly() {
        assert_eq!(
            parse_content_range("bytes 100-199/1000"),
            Some((100, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("bytes 9-5/10"), None);
        assert_eq!(parse_content_range("items 1-2/3"), None);
        assert_eq!(parse_content_range("bytes x-2/3"), None);
    }

    #[test]
    fn urls_and_paths_are_accepted_other_schemes_are_not() {
        assert_eq!(parse_url("/srv/a b.json").unwrap().scheme(), "file");
        assert_eq!(
            parse_url("https://x.example/i.json").unwrap().scheme(),
            "https"
        );
        assert!(parse_url("ftp://x.example/i.json").is_err());
        assert!(parse_url("relative/path").is_err());
    }
}
