//! Finding an update: the index and its mirrors, the check, the choice of
//! release and payloads.

use std::time::SystemTime;

use bootconfig::version;
use payload::index::{Choice, IndexError, PayloadChoice, ReleaseIndex};
use payload::{index, Keyring};

use super::{lock, now_text, Engine, EngineError, Ticket, MAX_INDEX_BYTES};
use crate::api::CheckReport;
use crate::fetch::{self, FetchError, Fetcher, Url};
use crate::machine::Event;
use crate::state::{CheckRecord, PayloadKind, PayloadSource};

/// The index URL, then each mirror's copy of it (a mirror replaces the
/// index URL's folder). Pure.
pub fn index_urls(index_url: &Url, mirrors: &[Url]) -> Vec<Url> {
    let name = index_url
        .path_segments()
        .and_then(|mut s| s.next_back())
        .unwrap_or("")
        .to_owned();
    let mut urls = vec![index_url.clone()];
    for m in mirrors {
        if let Ok(u) = as_folder(m).join(&name) {
            if !urls.contains(&u) {
                urls.push(u);
            }
        }
    }
    urls
}

/// A payload's URL as the index names it, resolved against each index URL
/// (a relative URL lives beside the index, on every mirror). Pure.
pub fn payload_urls(index_urls: &[Url], relative: &str) -> Vec<Url> {
    let mut urls = Vec::new();
    for base in index_urls {
        if let Ok(u) = base.join(relative) {
            if !urls.contains(&u) {
                urls.push(u);
            }
        }
    }
    urls
}

fn as_folder(url: &Url) -> Url {
    let mut u = url.clone();
    if !u.path().ends_with('/') {
        let path = format!("{}/", u.path());
        u.set_path(&path);
    }
    u
}

/// The payload sources for a choice, in order. Pure.
fn sources_of(payloads: &[PayloadChoice], index_urls: &[Url]) -> Vec<PayloadSource> {
    payloads
        .iter()
        .map(|p| {
            let (kind, url, size, sha256, manifest) = match p {
                PayloadChoice::Delta(d) => (
                    PayloadKind::Delta,
                    &d.url,
                    d.size,
                    d.sha256,
                    d.manifest_sha256,
                ),
                PayloadChoice::Full(f) => (
                    PayloadKind::Full,
                    &f.url,
                    f.size,
                    f.sha256,
                    f.manifest_sha256,
                ),
            };
            PayloadSource {
                kind,
                urls: payload_urls(index_urls, url)
                    .iter()
                    .map(Url::to_string)
                    .collect(),
                size: Some(size),
                sha256: Some(sha256),
                manifest_sha256: Some(manifest),
            }
        })
        .collect()
}

impl Engine {
    /// Fetches and verifies the index; remembers its serial.
    fn fetch_index(
        &self,
        fetcher: &Fetcher,
        keyring: &Keyring,
    ) -> Result<(ReleaseIndex, Vec<Url>), EngineError> {
        let index_url = self
            .config
            .server
            .index_url
            .as_deref()
            .ok_or(EngineError::NoIndexUrl)?;
        let index_url = fetch::parse_url(index_url)?;
        let mirrors = self
            .config
            .server
            .mirrors
            .iter()
            .map(|m| fetch::parse_url(m))
            .collect::<Result<Vec<_>, _>>()?;
        let urls = index_urls(&index_url, &mirrors);
        let (bytes, from) = fetcher.get_small(&urls, MAX_INDEX_BYTES)?;
        let sig_url = Url::parse(&format!("{from}.sig"))
            .map_err(|e| FetchError::BadUrl(format!("{from}.sig: {e}")))?;
        let (signature, _) = fetcher.get_small(&[sig_url], 1 << 20)?;
        let index_err = |error| EngineError::Index {
            url: from.to_string(),
            error,
        };
        // Serials are remembered per channel, which is known only once the
        // index is read: the serial check follows.
        let index = index::verify_index(&bytes, &signature, keyring, SystemTime::now(), None)
            .map_err(index_err)?;
        if let Some(want) = &self.config.server.channel {
            if &index.channel != want {
                return Err(EngineError::System(format!(
                    "index {from} is for channel {}, this node follows {want}",
                    index.channel
                )));
            }
        }
        let last = lock(&self.persisted)
            .accepted_serial
            .get(&index.channel)
            .copied();
        if let Some(last) = last {
            if index.serial < last {
                return Err(index_err(IndexError::OlderSerial {
                    got: index.serial,
                    last,
                }));
            }
        }
        let channel = index.channel.clone();
        let serial = index.serial;
        self.update(|p| {
            p.accepted_serial.insert(channel, serial);
        })?;
        // Payload URLs resolve against the copy that answered first.
        let mut bases = vec![from.clone()];
        bases.extend(urls.into_iter().filter(|u| *u != from));
        Ok((index, bases))
    }

    /// Checks for an update without installing it.
    pub fn check(&self) -> Result<CheckReport, EngineError> {
        let ticket = self.begin("check")?;
        self.check_with(ticket)
    }

    pub fn check_with(&self, ticket: Ticket) -> Result<CheckReport, EngineError> {
        self.operate(
            ticket,
            |r: &CheckReport| match &r.available {
                Some(v) => format!("update available: {v}"),
                None => format!("up to date at {}", r.booted_version),
            },
            || {
                self.advance(Event::CheckStarted)?;
                let result = self.choose(None, false).map(|(r, _)| r);
                match &result {
                    Ok(r) => {
                        let staged = lock(&self.persisted).staged.clone();
                        // What is staged already is not news.
                        let news = r
                            .available
                            .as_ref()
                            .filter(|v| staged.as_ref().is_none_or(|s| &s.version != *v));
                        let event = if news.is_some() {
                            Event::UpdateFound
                        } else {
                            Event::UpToDate {
                                rest: lock(&self.persisted).rest(),
                            }
                        };
                        self.advance(event)?;
                        self.record_check(r.available.as_deref())?;
                    }
                    Err(e) => self.failed(e, None),
                }
                result
            },
        )
    }

    pub(super) fn record_check(&self, available: Option<&str>) -> Result<(), EngineError> {
        let record = CheckRecord {
            time: now_text(),
            outcome: if available.is_some() {
                "update-available"
            } else {
                "up-to-date"
            }
            .into(),
            version: available.map(str::to_owned),
        };
        self.record(
            "check",
            available,
            match available {
                Some(v) => format!("update available: {v}"),
                None => "up to date".into(),
            },
        );
        self.update(|p| p.last_check = Some(record))
    }

    pub(super) fn choose(
        &self,
        wanted: Option<String>,
        allow_downgrade: bool,
    ) -> Result<(CheckReport, Vec<PayloadSource>), EngineError> {
        let fetcher = self.fetcher()?;
        let keyring = self.keyring()?;
        let (index, bases) = self.fetch_index(&fetcher, &keyring)?;
        let booted = self.booted_version()?;
        let machine_id = self.machine_id()?;
        let request = index::Request {
            version: wanted,
            allow_downgrade,
        };
        let cmp = |a: &str, b: &str| version::compare(a, b);
        let choice = index::choose(
            &index,
            &booted,
            &machine_id,
            SystemTime::now(),
            &request,
            &cmp,
        )
        .map_err(|error| EngineError::Index {
            url: bases.first().map(Url::to_string).unwrap_or_default(),
            error,
        })?;
        let (available, sources) = match choice {
            Choice::UpToDate => (None, Vec::new()),
            Choice::Update { version, payloads } => (Some(version), sources_of(&payloads, &bases)),
        };
        Ok((
            CheckReport {
                booted_version: booted,
                channel: index.channel,
                serial: index.serial,
                blocked: available
                    .as_ref()
                    .and_then(|v| lock(&self.persisted).blocked.get(v).cloned()),
                available,
                payloads: sources.iter().map(|s| s.kind).collect(),
            },
            sources,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_replace_the_index_folder_and_payloads_follow() {
        let index = Url::parse("https://a.example/acl/stable/index.json").unwrap();
        let mirrors = [
            Url::parse("https://b.example/mirror").unwrap(),
            Url::parse("file:///srv/updates/").unwrap(),
        ];
        let urls = index_urls(&index, &mirrors);
        let shown: Vec<String> = urls.iter().map(Url::to_string).collect();
        assert_eq!(
            shown,
            [
                "https://a.example/acl/stable/index.json",
                "https://b.example/mirror/index.json",
                "file:///srv/updates/index.json"
            ]
        );
        let payloads: Vec<String> = payload_urls(&urls, "p/2.0.tpl")
            .iter()
            .map(Url::to_string)
            .collect();
        assert_eq!(
            payloads,
            [
                "https://a.example/acl/stable/p/2.0.tpl",
                "https://b.example/mirror/p/2.0.tpl",
                "file:///srv/updates/p/2.0.tpl"
            ]
        );
        // An absolute URL stays itself, once.
        assert_eq!(payload_urls(&urls, "https://cdn.example/x.tpl").len(), 1);
    }
}
