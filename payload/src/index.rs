//! The signed release index: one static JSON document per channel, with a
//! detached OpenPGP signature beside it, listing releases and their
//! payloads. The node-side decisions (is this index acceptable, which
//! release and payload to take) are pure functions here; fetching is the
//! daemon's.

use std::cmp::Ordering;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::format::Sha256Hex;
use crate::sign::{Keyring, SignError};

/// The index format this code reads and writes.
pub const INDEX_FORMAT_VERSION: u32 = 1;
/// Indexes larger than this are refused before their signature is checked.
pub const MAX_INDEX_LEN: usize = 4 << 20;

/// A channel's release index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseIndex {
    pub format_version: u32,
    pub channel: String,
    /// Grows with every signed publication; a node refuses a lower one.
    pub serial: u64,
    /// RFC 3339 time after which the index is refused.
    pub expires: String,
    pub releases: Vec<Release>,
}

/// One release of the channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub version: String,
    /// RFC 3339.
    pub published: String,
    pub full: PayloadRef,
    #[serde(default)]
    pub deltas: Vec<DeltaRef>,
    #[serde(default)]
    pub rollout: Option<Rollout>,
    /// Every node older than this release must install it before any newer one.
    #[serde(default)]
    pub barrier: bool,
}

/// Where a payload is: `url` relative to the index (or absolute).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadRef {
    pub url: String,
    pub size: u64,
    /// SHA-256 of the whole payload file.
    pub sha256: Sha256Hex,
    /// SHA-256 of the payload's signed manifest. The manifest pins every
    /// blob and the target image, so a client that streams the payload
    /// checks this before writing anything.
    pub manifest_sha256: Sha256Hex,
}

/// A delta payload and the version it applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaRef {
    pub source_version: String,
    pub url: String,
    pub size: u64,
    /// SHA-256 of the whole payload file.
    pub sha256: Sha256Hex,
    /// SHA-256 of the payload's signed manifest. The manifest pins every
    /// blob and the target image, so a client that streams the payload
    /// checks this before writing anything.
    pub manifest_sha256: Sha256Hex,
}

/// A phased rollout: from `start`, over `duration_seconds`, a growing
/// share of nodes (by their stable bucket) becomes eligible.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// RFC 3339.
    pub start: String,
    pub duration_seconds: u64,
}

/// Why an index, or a choice from it, was refused.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("release index is {0} bytes, over the limit of {MAX_INDEX_LEN}")]
    TooLarge(usize),
    #[error("release index signature: {0}")]
    Signature(SignError),
    #[error("release index is not valid: {0}")]
    Invalid(String),
    #[error("release index expired at {0}")]
    Expired(String),
    #[error(
        "release index serial {got} is older than the last accepted ({last}); refusing a rollback"
    )]
    OlderSerial { got: u64, last: u64 },
    #[error("version {0} is not in the release index")]
    UnknownVersion(String),
    #[error(
        "version {wanted} is older than the booted {booted}; pass --allow-downgrade to install it"
    )]
    Downgrade { wanted: String, booted: String },
    #[error("version {wanted} needs {barrier} installed first (a barrier release)")]
    Barrier { wanted: String, barrier: String },
}

fn parse_time(what: &str, value: &str) -> Result<SystemTime, IndexError> {
    humantime::parse_rfc3339(value)
        .map_err(|e| IndexError::Invalid(format!("{what} {value:?} is not an RFC 3339 time: {e}")))
}

/// Formats a time as RFC 3339 (UTC, seconds).
pub fn format_time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl ReleaseIndex {
    /// An empty index for a channel.
    pub fn new(channel: &str) -> ReleaseIndex {
        ReleaseIndex {
            format_version: INDEX_FORMAT_VERSION,
            channel: channel.to_owned(),
            serial: 0,
            expires: format_time(SystemTime::UNIX_EPOCH),
            releases: Vec::new(),
        }
    }

    /// Parses and checks the document's own consistency.
    pub fn parse(bytes: &[u8]) -> Result<ReleaseIndex, IndexError> {
        if bytes.len() > MAX_INDEX_LEN {
            return Err(IndexError::TooLarge(bytes.len()));
        }
        let index: ReleaseIndex =
            serde_json::from_slice(bytes).map_err(|e| IndexError::Invalid(e.to_string()))?;
        index.check()?;
        Ok(index)
    }

    /// Structural checks: version, times, unique versions, sane rollouts.
    pub fn check(&self) -> Result<(), IndexError> {
        if self.format_version != INDEX_FORMAT_VERSION {
            return Err(IndexError::Invalid(format!(
                "format version {} is not supported",
                self.format_version
            )));
        }
        parse_time("expires", &self.expires)?;
        let mut seen: Vec<&str> = Vec::new();
        for r in &self.releases {
            if r.version.is_empty() || seen.contains(&r.version.as_str()) {
                return Err(IndexError::Invalid(format!(
                    "release version {:?} is empty or repeated",
                    r.version
                )));
            }
            seen.push(&r.version);
            parse_time("published", &r.published)?;
            if let Some(rollout) = &r.rollout {
                parse_time("rollout start", &rollout.start)?;
            }
            if r.full.url.is_empty() || r.deltas.iter().any(|d| d.url.is_empty()) {
                return Err(IndexError::Invalid(format!(
                    "release {} has a payload without a URL",
                    r.version
                )));
            }
        }
        Ok(())
    }

    /// The exact bytes to sign and publish.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing plain strings and numbers cannot fail.
        let mut bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }

    pub fn release(&self, version: &str) -> Option<&Release> {
        self.releases.iter().find(|r| r.version == version)
    }
}

/// Checks a fetched index: size, signature by a trusted key, structure,
/// expiry at `now`, and that its serial is not below `last_serial`.
pub fn verify_index(
    bytes: &[u8],
    signature: &[u8],
    keyring: &Keyring,
    now: SystemTime,
    last_serial: Option<u64>,
) -> Result<ReleaseIndex, IndexError> {
    if bytes.len() > MAX_INDEX_LEN {
        return Err(IndexError::TooLarge(bytes.len()));
    }
    keyring
        .verify_detached(bytes, signature)
        .map_err(IndexError::Signature)?;
    let index = ReleaseIndex::parse(bytes)?;
    if parse_time("expires", &index.expires)? <= now {
        return Err(IndexError::Expired(index.expires.clone()));
    }
    if let Some(last) = last_serial {
        if index.serial < last {
            return Err(IndexError::OlderSerial {
                got: index.serial,
                last,
            });
        }
    }
    Ok(index)
}

/// A node's stable place in `[0, 1)` for one release: the same machine
/// gets the same answer every time, different releases shuffle the order.
pub fn rollout_bucket(machine_id: &str, version: &str) -> f64 {
    let mut h = Sha256::new();
    h.update(b"tandem-rollout\0");
    h.update(machine_id.as_bytes());
    h.update(b"\0");
    h.update(version.as_bytes());
    let digest: [u8; 32] = h.finalize().into();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // 53 bits, exactly representable.
    (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64
}

/// Whether a node may take a release at `now` under its rollout.
pub fn eligible(release: &Release, machine_id: &str, now: SystemTime) -> Result<bool, IndexError> {
    let Some(rollout) = &release.rollout else {
        return Ok(true);
    };
    let start = parse_time("rollout start", &rollout.start)?;
    let elapsed = now.duration_since(start).unwrap_or(Duration::ZERO);
    if rollout.duration_seconds == 0 {
        return Ok(now >= start);
    }
    let share = elapsed.as_secs_f64() / rollout.duration_seconds as f64;
    Ok(now >= start && rollout_bucket(machine_id, &release.version) < share.min(1.0))
}

/// What a node asks for.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// A given version (a person asked); `None` for the newest eligible.
    pub version: Option<String>,
    pub allow_downgrade: bool,
}

/// Which payload to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayloadChoice {
    Delta(DeltaRef),
    Full(PayloadRef),
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    UpToDate,
    Update {
        version: String,
        /// Preferred payload first: the delta from the booted version if
        /// there is one, then the full payload as the fallback.
        payloads: Vec<PayloadChoice>,
    },
}

/// Chooses the release a node should install. `cmp` orders versions
/// (the caller passes the same comparison the boot loader uses).
pub fn choose(
    index: &ReleaseIndex,
    booted: &str,
    machine_id: &str,
    now: SystemTime,
    request: &Request,
    cmp: &dyn Fn(&str, &str) -> Ordering,
) -> Result<Choice, IndexError> {
    let newer = |r: &&Release| cmp(&r.version, booted) == Ordering::Greater;
    // The lowest barrier above the booted version caps what may be taken.
    let barrier = index
        .releases
        .iter()
        .filter(|r| r.barrier)
        .filter(newer)
        .min_by(|a, b| cmp(&a.version, &b.version));
    let target = match &request.version {
        Some(wanted) => {
            let release = index
                .release(wanted)
                .ok_or_else(|| IndexError::UnknownVersion(wanted.clone()))?;
            match cmp(wanted, booted) {
                Ordering::Equal => return Ok(Choice::UpToDate),
                Ordering::Less if !request.allow_downgrade => {
                    return Err(IndexError::Downgrade {
                        wanted: wanted.clone(),
                        booted: booted.to_owned(),
                    })
                }
                Ordering::Less => {}
                Ordering::Greater => {
                    if let Some(b) = barrier {
                        if cmp(wanted, &b.version) == Ordering::Greater {
                            return Err(IndexError::Barrier {
                                wanted: wanted.clone(),
                                barrier: b.version.clone(),
                            });
                        }
                    }
                }
            }
            release
        }
        None => {
            let mut best: Option<&Release> = None;
            for r in index.releases.iter().filter(newer) {
                if let Some(b) = barrier {
                    if cmp(&r.version, &b.version) == Ordering::Greater {
                        continue;
                    }
                }
                if !eligible(r, machine_id, now)? {
                    continue;
                }
                if best.is_none_or(|b| cmp(&r.version, &b.version) == Ordering::Greater) {
                    best = Some(r);
                }
            }
            match best {
                Some(r) => r,
                None => return Ok(Choice::UpToDate),
            }
        }
    };
    let mut payloads: Vec<PayloadChoice> = target
        .deltas
        .iter()
        .filter(|d| d.source_version == booted)
        .cloned()
        .map(PayloadChoice::Delta)
        .collect();
    payloads.push(PayloadChoice::Full(target.full.clone()));
    Ok(Choice::Update {
        version: target.version.clone(),
        payloads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric(a: &str, b: &str) -> Ordering {
        let parts =
            |s: &str| -> Vec<u64> { s.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
        parts(a).cmp(&parts(b))
    }

    fn at(s: &str) -> SystemTime {
        humantime::parse_rfc3339(s).unwrap()
    }

    fn payload(name: &str) -> PayloadRef {
        PayloadRef {
            url: name.into(),
            size: 1,
            sha256: Sha256Hex([1; 32]),
            manifest_sha256: Sha256Hex([4; 32]),
        }
    }

    fn release(version: &str) -> Release {
        Release {
            version: version.into(),
            published: "2026-11-01T00:00:00Z".into(),
            full: payload(&format!("{version}.tpl")),
            deltas: vec![],
            rollout: None,
            barrier: false,
        }
    }

    fn index(releases: Vec<Release>) -> ReleaseIndex {
        ReleaseIndex {
            format_version: 1,
            channel: "stable".into(),
            serial: 5,
            expires: "2026-12-01T00:00:00Z".into(),
            releases,
        }
    }

    fn pick(ix: &ReleaseIndex, booted: &str, request: &Request) -> Result<Choice, IndexError> {
        choose(
            ix,
            booted,
            "machine-1",
            at("2026-11-20T00:00:00Z"),
            request,
            &numeric,
        )
    }

    #[test]
    fn prefers_the_delta_from_the_booted_version_then_full() {
        let mut r = release("3.0");
        r.deltas = vec![
            DeltaRef {
                source_version: "1.0".into(),
                url: "1-3.tpl".into(),
                size: 1,
                sha256: Sha256Hex([2; 32]),
                manifest_sha256: Sha256Hex([5; 32]),
            },
            DeltaRef {
                source_version: "2.0".into(),
                url: "2-3.tpl".into(),
                size: 1,
                sha256: Sha256Hex([3; 32]),
                manifest_sha256: Sha256Hex([6; 32]),
            },
        ];
        let ix = index(vec![release("2.0"), r]);
        let Choice::Update { version, payloads } = pick(&ix, "2.0", &Request::default()).unwrap()
        else {
            panic!()
        };
        assert_eq!(version, "3.0");
        assert!(matches!(&payloads[0], PayloadChoice::Delta(d) if d.url == "2-3.tpl"));
        assert!(matches!(&payloads[1], PayloadChoice::Full(f) if f.url == "3.0.tpl"));
        assert_eq!(payloads.len(), 2);
        // From a version with no delta: the full payload only.
        let Choice::Update { payloads, .. } = pick(&ix, "1.5", &Request::default()).unwrap() else {
            panic!()
        };
        assert_eq!(payloads, vec![PayloadChoice::Full(payload("3.0.tpl"))]);
        assert_eq!(
            pick(&ix, "3.0", &Request::default()).unwrap(),
            Choice::UpToDate
        );
    }

    #[test]
    fn barriers_must_be_passed_first() {
        let mut b = release("2.0");
        b.barrier = true;
        let ix = index(vec![release("1.0"), b, release("3.0")]);
        let Choice::Update { version, .. } = pick(&ix, "1.0", &Request::default()).unwrap() else {
            panic!()
        };
        assert_eq!(version, "2.0");
        let err = pick(
            &ix,
            "1.0",
            &Request {
                version: Some("3.0".into()),
                allow_downgrade: false,
            },
        )
        .unwrap_err();
        assert!(matches!(err, IndexError::Barrier { .. }), "{err}");
        let Choice::Update { version, .. } = pick(&ix, "2.0", &Request::default()).unwrap() else {
            panic!()
        };
        assert_eq!(version, "3.0");
    }

    #[test]
    fn never_downgrades_unless_asked() {
        let ix = index(vec![release("1.0"), release("2.0")]);
        assert_eq!(
            pick(&ix, "2.0", &Request::default()).unwrap(),
            Choice::UpToDate
        );
        let ask = |allow| Request {
            version: Some("1.0".into()),
            allow_downgrade: allow,
        };
        assert!(matches!(
            pick(&ix, "2.0", &ask(false)),
            Err(IndexError::Downgrade { .. })
        ));
        assert!(matches!(
            pick(&ix, "2.0", &ask(true)),
            Ok(Choice::Update { version, .. }) if version == "1.0"
        ));
        assert!(matches!(
            pick(
                &ix,
                "2.0",
                &Request {
                    version: Some("9.9".into()),
                    allow_downgrade: true
                }
            ),
            Err(IndexError::UnknownVersion(_))
        ));
    }

    #[test]
    fn phased_rollout_grows_with_time_and_never_flaps() {
        let mut r = release("2.0");
        r.rollout = Some(Rollout {
            start: "2026-11-10T00:00:00Z".into(),
            duration_seconds: 10 * 24 * 3600,
        });
        let machines: Vec<String> = (0..2000).map(|i| format!("{i:032x}")).collect();
        let start = at("2026-11-10T00:00:00Z");
        let mut previous: Vec<bool> = vec![false; machines.len()];
        for day in 0..=11u64 {
            let now = start + Duration::from_secs(day * 24 * 3600);
            let now_eligible: Vec<bool> = machines
                .iter()
                .map(|m| eligible(&r, m, now).unwrap())
                .collect();
            let share = now_eligible.iter().filter(|e| **e).count() as f64 / machines.len() as f64;
            let expected = (day as f64 / 10.0).min(1.0);
            assert!(
                (share - expected).abs() < 0.05,
                "day {day}: {share} vs {expected}"
            );
            // Once eligible, always eligible: no flapping.
            for (was, is) in previous.iter().zip(&now_eligible) {
                assert!(!*was || *is, "a machine lost eligibility on day {day}");
            }
            previous = now_eligible;
        }
        // Not before the start, and the same answer when asked again.
        assert!(!eligible(&r, &machines[0], start - Duration::from_secs(1)).unwrap());
        let mid = start + Duration::from_secs(5 * 24 * 3600);
        for m in &machines[..50] {
            assert_eq!(eligible(&r, m, mid).unwrap(), eligible(&r, m, mid).unwrap());
        }
    }

    #[test]
    fn index_checks_refuse_expired_older_and_unsigned() {
        let (secret, public) = crate::sign::generate_key("idx <i@example.invalid>").unwrap();
        let key = crate::sign::SigningKey::from_bytes(secret.as_bytes()).unwrap();
        let keyring = Keyring::from_bytes(public.as_bytes()).unwrap();
        let ix = index(vec![release("1.0")]);
        let bytes = ix.to_bytes();
        let sig = key.sign_detached(&bytes).unwrap();
        let now = at("2026-11-20T00:00:00Z");
        assert_eq!(
            verify_index(&bytes, &sig, &keyring, now, Some(5)).unwrap(),
            ix
        );
        assert!(matches!(
            verify_index(&bytes, &sig, &keyring, at("2026-12-02T00:00:00Z"), None),
            Err(IndexError::Expired(_))
        ));
        assert!(matches!(
            verify_index(&bytes, &sig, &keyring, now, Some(6)),
            Err(IndexError::OlderSerial { got: 5, last: 6 })
        ));
        let mut tampered = bytes.clone();
        let pos = tampered.iter().position(|&b| b == b'5').unwrap();
        tampered[pos] = b'9';
        assert!(matches!(
            verify_index(&tampered, &sig, &keyring, now, None),
            Err(IndexError::Signature(_))
        ));
        let mut dup = index(vec![release("1.0"), release("1.0")]);
        dup.serial = 1;
        assert!(matches!(
            ReleaseIndex::parse(&dup.to_bytes()),
            Err(IndexError::Invalid(_))
        ));
    }
}
