//! Installing an update: the job, the payload streamed into the inactive
//! slot, the read-back, the boot files and the flip.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bootconfig::gptprio::SlotStatus;
use bootconfig::version;
use payload::apply::{ApplyProgress, Phase};
use payload::digest::Sha256Stream;
use payload::format::{ImageRef, Sha256Hex};
use payload::{ApplyError, ApplyOptions, ApplyOutcome, ComponentPaths, Keyring};

use super::{lock, now_text, verity, Engine, EngineError, Ticket};
use crate::api::{Progress, UpdateOutcome, UpdateRequest, Wanted};
use crate::fetch::{Fetcher, RangeReader};
use crate::machine::{Event, UpdateState};
use crate::state::{Job, PayloadKind, PayloadSource, Staged, WrittenSlot};
use crate::{fetch, slotctl};

/// Where the slots are, read once at the start of an update.
#[derive(Debug, Clone)]
struct SlotsOnDisk {
    disk: PathBuf,
    slots: [bootconfig::Slot; 2],
}

/// A payload reader that hashes what it reads, until it skips.
struct HashingReader {
    inner: RangeReader,
    hasher: Option<Sha256Stream>,
}

impl std::io::Read for HashingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

impl payload::PayloadReader for HashingReader {
    fn skip_forward(&mut self, n: u64) -> std::io::Result<u64> {
        // What is skipped is not hashed; the manifest hash vouches for it.
        self.hasher = None;
        self.inner.skip_forward(n)
    }
}

impl Engine {
    /// Installs an update into the inactive slot and sets it next.
    pub fn update_now(&self, request: &UpdateRequest) -> Result<UpdateOutcome, EngineError> {
        let ticket = self.begin("update")?;
        self.update_with(ticket, request)
    }

    pub fn update_with(
        &self,
        ticket: Ticket,
        request: &UpdateRequest,
    ) -> Result<UpdateOutcome, EngineError> {
        self.operate(ticket, summarize_outcome, || {
            let result = self.update_inner(request);
            if let Err(e) = &result {
                let version = lock(&self.persisted)
                    .job
                    .as_ref()
                    .and_then(|j| j.version.clone());
                self.failed(e, version.as_deref());
            }
            result
        })
    }

    /// Resumes the update a restart interrupted, if there is one.
    pub fn resume(&self) -> Option<Result<UpdateOutcome, EngineError>> {
        let job = lock(&self.persisted).job.clone()?;
        let ticket = match self.begin("update") {
            Ok(t) => t,
            Err(e) => return Some(Err(e)),
        };
        Some(self.operate(ticket, summarize_outcome, || {
            self.record(
                "resumed",
                job.version.as_deref(),
                format!("resuming the update into slot {}", job.slot),
            );
            let result = self.run_job(job.clone());
            if let Err(e) = &result {
                self.failed(e, job.version.as_deref());
            }
            result
        }))
    }

    fn update_inner(&self, request: &UpdateRequest) -> Result<UpdateOutcome, EngineError> {
        let (version, candidates) = match &request.wanted {
            Wanted::Payload(url) => {
                let url = fetch::parse_url(url)?;
                let source = PayloadSource {
                    kind: PayloadKind::Given,
                    urls: vec![url.to_string()],
                    size: None,
                    sha256: None,
                    manifest_sha256: None,
                };
                (None, vec![source])
            }
            Wanted::Latest | Wanted::Version(_) => {
                self.advance(Event::CheckStarted)?;
                let wanted = match &request.wanted {
                    Wanted::Version(v) => Some(v.clone()),
                    _ => None,
                };
                let (report, sources) = self.choose(wanted, request.allow_downgrade)?;
                let Some(version) = report.available.clone() else {
                    let rest = lock(&self.persisted).rest();
                    self.advance(Event::UpToDate { rest })?;
                    self.record_check(None)?;
                    return Ok(UpdateOutcome::UpToDate {
                        version: report.booted_version,
                    });
                };
                if let (Wanted::Latest, Some(reason)) = (&request.wanted, &report.blocked) {
                    let rest = lock(&self.persisted).rest();
                    self.advance(Event::UpToDate { rest })?;
                    return Err(EngineError::Blocked {
                        version,
                        reason: reason.clone(),
                    });
                }
                let staged = lock(&self.persisted).staged.clone();
                if let Some(s) = staged.filter(|s| s.version == version) {
                    tracing::info!("{version} is already staged in slot {}", s.slot);
                    let rest = lock(&self.persisted).rest();
                    self.advance(Event::UpToDate { rest })?;
                    let finalized = s.finalized || !request.stage_only;
                    if finalized && !s.finalized {
                        self.finalize_staged(&s)?;
                    }
                    return Ok(UpdateOutcome::Staged {
                        finalized,
                        version,
                        slot: s.slot,
                        payload: PayloadKind::Full,
                        downloaded_bytes: 0,
                        resumed_requests: 0,
                    });
                }
                self.advance(Event::UpdateFound)?;
                self.record_check(Some(&version))?;
                (Some(version), sources)
            }
        };
        // Read only, and let go at once: the disk's lock is shared.
        let opened = slotctl::open(&self.target(), false)
            .map_err(|e| EngineError::Slots(format!("{e:#}")))?;
        let booted = opened.booted.ok_or_else(|| {
            EngineError::Slots(format!(
                "cannot tell the booted slot from {}",
                self.config.system.cmdline.display()
            ))
        })?;
        // The other slot is the way back while the booted one is on trial:
        // it is not overwritten until the booted slot is marked good.
        let booted_status = opened.backend.slot_boot(booted).status();
        drop(opened);
        if booted_status != SlotStatus::Good {
            return Err(EngineError::Refused(format!(
                "the booted slot {booted} is not marked good yet (its health is being assessed, or it failed); slot {} is the way back and is not overwritten until then (updatectl mark-good marks it by hand)",
                booted.other()
            )));
        }
        let job = Job {
            version: version.clone(),
            slot: booted.other(),
            candidates,
            current: 0,
            allow_downgrade: request.allow_downgrade,
            started: now_text(),
            stage_only: request.stage_only,
            written: None,
        };
        self.update(|p| {
            p.job = Some(job.clone());
        })?;
        self.record(
            "download-started",
            version.as_deref(),
            format!(
                "installing into slot {} from {}",
                job.slot,
                job.candidates
                    .first()
                    .and_then(|c| c.urls.first())
                    .map_or("nowhere", String::as_str)
            ),
        );
        self.run_job(job)
    }

    /// Steps 3 to 5 for a recorded job.
    fn run_job(&self, mut job: Job) -> Result<UpdateOutcome, EngineError> {
        let from = lock(&self.persisted).state;
        if from != UpdateState::Downloading {
            self.advance(Event::ApplyStarted)?;
        }
        // The disk is locked only while its table is read or written, not
        // for the whole download.
        let opened = slotctl::open(&self.target(), false)
            .map_err(|e| EngineError::Slots(format!("{e:#}")))?;
        let layout = SlotsOnDisk {
            disk: opened.disk_path.clone(),
            slots: opened.slots.clone(),
        };
        let booted = opened.booted;
        drop(opened);
        let booted = booted.ok_or_else(|| {
            EngineError::Slots(format!(
                "cannot tell the booted slot from {}",
                self.config.system.cmdline.display()
            ))
        })?;
        if booted == job.slot {
            return Err(EngineError::Slots(format!(
                "slot {} is booted now; the update meant for it is dropped",
                job.slot
            )));
        }
        if let Some(w) = job.written.take() {
            // Written and verified before a restart: every component is
            // read back once more, and if the slot still holds them all,
            // on to the flip.
            let mut paths = verity::component_paths(
                &layout.disk,
                &layout.slots[job.slot.index()],
                &layout.slots[job.slot.other().index()],
            );
            paths.extend(self.esp_paths(job.slot)?);
            // A UKI and addon already installed as the slot's entry were
            // moved out of their staging files: read back where they are.
            let installed = slotctl::open(&self.target(), false)
                .ok()
                .and_then(|o| o.backend.uki_files(job.slot))
                .map(|(uki, addon)| {
                    let mut v = vec![("uki".to_owned(), uki)];
                    v.extend(addon.map(|a| ("addon".to_owned(), a)));
                    v
                })
                .unwrap_or_default();
            match read_back_components(&paths, &installed, &w.components) {
                Ok(()) => {
                    tracing::info!(
                        "slot {} holds {} as written and verified before the restart ({} read back again)",
                        job.slot,
                        w.version,
                        w.components
                            .iter()
                            .map(|(c, _)| c.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    let source = job.candidates.get(job.current).cloned().ok_or_else(|| {
                        EngineError::System("the recorded update has no payload".into())
                    })?;
                    if lock(&self.persisted).state == UpdateState::Downloading {
                        self.advance(Event::Written)?;
                    }
                    let usr = w
                        .components
                        .iter()
                        .find(|(c, _)| c == "usr")
                        .map(|(_, image)| image.clone());
                    return self.finish(
                        &job,
                        &source,
                        (w.version, usr, w.components),
                        w.downloaded_bytes,
                        w.resumed_requests,
                    );
                }
                Err(why) => {
                    tracing::warn!(
                        "slot {} no longer holds the {} written before the restart ({why}); applying again",
                        job.slot,
                        w.version
                    );
                    let again = job.clone();
                    self.update(|p| p.job = Some(again))?;
                }
            }
        }
        let booted_version = self.booted_version()?;
        let keyring = self.keyring()?;
        let fetcher = self.fetcher()?;
        loop {
            let Some(source) = job.candidates.get(job.current).cloned() else {
                return Err(EngineError::System("no payload left to try".into()));
            };
            match self.apply_one(&job, &source, &layout, &keyring, &fetcher, &booted_version) {
                Ok((written, downloaded, resumed)) => {
                    // Recorded before the boot files and the flip: a
                    // restart from here reads the components back instead
                    // of downloading the payload again.
                    let mut done = job.clone();
                    done.written = Some(WrittenSlot {
                        version: written.0.clone(),
                        components: written.2.clone(),
                        downloaded_bytes: downloaded,
                        resumed_requests: resumed,
                    });
                    self.update(|p| p.job = Some(done))?;
                    return self.finish(&job, &source, written, downloaded, resumed);
                }
                Err(EngineError::Apply(e)) if job.current + 1 < job.candidates.len() => {
                    // A delta this node cannot use, found before writing:
                    // the next candidate is the full payload.
                    let why = match &e {
                        ApplyError::WrongSource {
                            expected, found, ..
                        } => format!(
                            "slot {booted} is not the delta's source (SHA-256 {found}, the delta needs {expected})"
                        ),
                        e if e.is_unknown_format() => {
                            format!("this tandem cannot read the delta ({e})")
                        }
                        _ => return Err(EngineError::Apply(e)),
                    };
                    self.record(
                        "fallback",
                        job.version.as_deref(),
                        format!("{why}; using the full payload"),
                    );
                    job.current += 1;
                    let next = job.clone();
                    self.update(|p| p.job = Some(next))?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Streams one payload into the slot; returns the version written, the
    /// bytes received and the requests that resumed a range.
    fn apply_one(
        &self,
        job: &Job,
        source: &PayloadSource,
        layout: &SlotsOnDisk,
        keyring: &Keyring,
        fetcher: &Fetcher,
        booted_version: &str,
    ) -> Result<(Written, u64, u64), EngineError> {
        let urls = source
            .urls
            .iter()
            .map(|u| fetch::parse_url(u))
            .collect::<Result<Vec<_>, _>>()?;
        let reader = fetcher.open(urls, source.size);
        let stats = reader.stats();
        let mut reader = HashingReader {
            inner: reader,
            hasher: source.sha256.map(|_| Sha256Stream::default()),
        };
        let mut paths = verity::component_paths(
            &layout.disk,
            &layout.slots[job.slot.index()],
            &layout.slots[job.slot.other().index()],
        );
        paths.extend(self.esp_paths(job.slot)?);
        let written_version: Arc<Mutex<Option<Written>>> = Arc::default();
        let cleared = Arc::new(AtomicBool::new(false));
        let vet: payload::apply::Vet = {
            let cleared = cleared.clone();
            let job = job.clone();
            let source = source.clone();
            let booted_version = booted_version.to_owned();
            let written_version = written_version.clone();
            let target = self.target();
            Arc::new(move |m: &payload::Manifest, sha: &Sha256Hex| {
                vet_manifest(&job, &source, &booted_version, m, sha)?;
                let image = m
                    .components
                    .iter()
                    .find(|c| c.name == "usr")
                    .map(|c| c.target.clone());
                let names = m
                    .components
                    .iter()
                    .map(|c| (c.name.clone(), c.target.clone()))
                    .collect();
                *lock(&written_version) = Some((m.target_version.clone(), image, names));
                // Only now, with every check passed, does the boot state
                // change: a half-written slot must never boot.
                let notes = slotctl::open(&target, true)
                    .map_err(|e| format!("{e:#}"))?
                    .backend
                    .clear(job.slot)
                    .map_err(|e| format!("clearing slot {}'s boot state: {e}", job.slot))?;
                notes.iter().for_each(|n| tracing::warn!("{n}"));
                cleared.store(true, Ordering::SeqCst);
                Ok(())
            })
        };
        let applied = self.run_apply(&mut reader, keyring, paths, vet, &stats);
        if cleared.load(Ordering::SeqCst) {
            // The slot that held a staged update no longer boots.
            self.update(|p| p.staged = None)?;
        }
        applied?;
        let version = lock(&written_version)
            .clone()
            .ok_or_else(|| EngineError::System("the payload named no version".into()))?;
        if let (Some(want), Some(hasher)) = (source.sha256, reader.hasher.take()) {
            // Read to the end so trailing bytes count too.
            let mut rest = Vec::new();
            std::io::Read::read_to_end(&mut reader.inner, &mut rest)
                .map_err(|e| EngineError::System(format!("reading the payload's end: {e}")))?;
            let mut hasher = hasher;
            hasher.update(&rest);
            let got = hasher.finish();
            if got != want {
                return Err(EngineError::Apply(ApplyError::Refused(format!(
                    "the payload's SHA-256 is {got}, the index says {want}"
                ))));
            }
        }
        Ok((
            version,
            stats.received.load(Ordering::Relaxed),
            stats.resumed.load(Ordering::Relaxed),
        ))
    }

    fn finish(
        &self,
        job: &Job,
        source: &PayloadSource,
        (version, image, components): Written,
        downloaded: u64,
        resumed: u64,
    ) -> Result<UpdateOutcome, EngineError> {
        self.advance(Event::Verified)?;
        let finalized = !job.stage_only;
        {
            let mut o = slotctl::open(&self.target(), true)
                .map_err(|e| EngineError::Slots(format!("{e:#}")))?;
            let slot = o.slots[job.slot.index()].clone();
            // Read from the slot just verified, so the kernel booted is the
            // one the payload's signature covers.
            let files = if o.backend.installs_boot_files() {
                Some(
                    bootconfig::bootfiles::read_from_image(
                        &o.disk_path,
                        slot.offset,
                        slot.image_size(),
                    )
                    .map_err(|e| {
                        EngineError::Slots(format!("slot {}'s boot files: {e}", job.slot))
                    })?,
                )
            } else {
                None
            };
            // The UKI backend boots the payload's UKI and addon, written and
            // verified in the slot's staging files.
            let ukis = match o.backend.uki_staging(job.slot) {
                Some((uki, addon)) => {
                    if !components.iter().any(|(c, _)| c == "uki") {
                        return Err(EngineError::Refused(format!(
                            "the payload for {version} has no UKI, and slot {} boots one (slots.boot_backend = \"uki\"); it is not set to boot",
                            job.slot
                        )));
                    }
                    let addon = components
                        .iter()
                        .any(|(c, _)| c == "addon")
                        .then_some(addon);
                    Some((uki, addon))
                }
                None => None,
            };
            // gptprio on Flatcar's layout boots the payload's kernel,
            // written and verified in the slot's staging file.
            let kernel = match o.backend.kernel_staging(job.slot) {
                Some(_) if !components.iter().any(|(c, _)| c == "kernel") => {
                    return Err(EngineError::Refused(format!(
                        "the payload for {version} has no kernel, and slot {} boots its own from the ESP (flatcar/vmlinuz-a|b, slots.esp with gptprio); it is not set to boot",
                        job.slot
                    )));
                }
                staged => staged,
            };
            let usrhash = match &ukis {
                Some((uki, addon)) => {
                    let read = |p: &std::path::Path| {
                        bootconfig::uki::read_uki(p).map_err(|e| {
                            EngineError::Refused(format!("slot {}'s UKI: {e}", job.slot))
                        })
                    };
                    let addons = addon
                        .as_deref()
                        .map(read)
                        .transpose()?
                        .into_iter()
                        .collect::<Vec<_>>();
                    bootconfig::uki::usrhash(&bootconfig::uki::combined_cmdline(
                        &read(uki)?,
                        &addons,
                    ))
                }
                None => match &kernel {
                    Some(k) => verity::kernel_usrhash(k)?,
                    None => files
                        .as_ref()
                        .and_then(|f| bootconfig::uki::usrhash(&f.cmdline)),
                },
            };
            if let Some(root) = verity::check_slot(&o.disk_path, &slot, usrhash.as_deref())? {
                tracing::info!(
                    "slot {}: dm-verity tree matches its data, root hash {root} as its boot entry names",
                    job.slot
                );
            }
            if let Some((uki, addon)) = &ukis {
                let notes = o
                    .backend
                    .install_uki(job.slot, uki, addon.as_deref())
                    .map_err(|e| {
                        EngineError::Slots(format!("installing slot {}'s UKI: {e}", job.slot))
                    })?;
                notes.iter().for_each(|n| tracing::info!("{n}"));
                tracing::info!("installed slot {}'s UKI and its entry", job.slot);
            }
            if let Some(k) = &kernel {
                let notes = o.backend.install_kernel(job.slot, k).map_err(|e| {
                    EngineError::Slots(format!("installing slot {}'s kernel: {e}", job.slot))
                })?;
                notes.iter().for_each(|n| tracing::info!("{n}"));
            }
            if let Some(files) = files {
                let notes = o
                    .backend
                    .install(job.slot, &version, &files, &self.config.slots.root_arg)
                    .map_err(|e| {
                        EngineError::Slots(format!(
                            "installing slot {}'s boot files: {e}",
                            job.slot
                        ))
                    })?;
                notes.iter().for_each(|n| tracing::warn!("{n}"));
                tracing::info!(
                    "installed kernel {} of slot {} and its boot entry",
                    files.located.kernel_version,
                    job.slot
                );
            }
            if finalized {
                payload::failpoint::hit("before-flip");
                let notes = o.backend.set_next(job.slot, 1).map_err(|e| {
                    EngineError::Slots(format!("setting slot {} next: {e}", job.slot))
                })?;
                notes.iter().for_each(|n| tracing::warn!("{n}"));
                payload::failpoint::hit("after-flip");
            }
        }
        let staged = Staged {
            version: version.clone(),
            slot: job.slot,
            time: now_text(),
            finalized,
            image,
        };
        self.update(|p| {
            p.staged = Some(staged);
            p.job = None;
            p.versions.insert(job.slot, version.clone());
            p.blocked.remove(&version);
            *p.counters.entry("staged".into()).or_default() += 1;
        })?;
        self.advance(Event::Staged { finalized })?;
        self.record(
            "staged",
            Some(&version),
            format!(
                "{version} written to slot {} from the {} payload ({downloaded} bytes received, {resumed} resumed requests), verified, and {}",
                job.slot,
                source.kind.as_str(),
                if finalized {
                    "set to boot next"
                } else {
                    "left for finalize (not set to boot)"
                }
            ),
        );
        Ok(UpdateOutcome::Staged {
            finalized,
            version,
            slot: job.slot,
            payload: source.kind,
            downloaded_bytes: downloaded,
            resumed_requests: resumed,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn run_apply(
        &self,
        reader: &mut HashingReader,
        keyring: &Keyring,
        paths: Vec<ComponentPaths>,
        vet: payload::apply::Vet,
        stats: &fetch::FetchStats,
    ) -> Result<(), EngineError> {
        let threads = match self.config.apply.threads {
            0 => payload::digest::worker_count(),
            n => n,
        };
        let opts = ApplyOptions {
            threads,
            checkpoint: Some(self.dir.checkpoint_file()),
            checkpoint_every: self.config.apply.checkpoint_mib.max(1) << 20,
            vet: Some(vet),
            skip_unused_paths: true,
        };
        let mut written = false;
        let mut last_note: Option<Instant> = None;
        let mut control = |p: &ApplyProgress| {
            if p.phase == Phase::VerifyingTarget && !written {
                written = true;
                if let Err(e) = self.advance(Event::Written) {
                    tracing::error!("{e}");
                }
            }
            if last_note.is_none_or(|t| t.elapsed() >= Duration::from_millis(200))
                || p.phase != Phase::Writing
            {
                last_note = Some(Instant::now());
                self.progress(p, stats.received.load(Ordering::Relaxed));
            }
            if self.cancel.load(Ordering::SeqCst) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        // Downloads show progress between operations too: a ticker adds
        // the bytes received while a long blob streams in.
        let finished = AtomicBool::new(false);
        let outcome = std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut seen = 0;
                while !finished.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(250));
                    let received = stats.received.load(Ordering::Relaxed);
                    if received != seen {
                        seen = received;
                        let changed = {
                            let mut live = lock(&self.live);
                            match live.progress.as_mut() {
                                Some(p) => {
                                    p.downloaded_bytes = received;
                                    true
                                }
                                None => false,
                            }
                        };
                        if changed {
                            self.notify();
                        }
                    }
                }
            });
            let outcome = payload::apply(reader, keyring, &paths, &opts, &mut control);
            finished.store(true, Ordering::SeqCst);
            outcome
        });
        match outcome {
            Ok(ApplyOutcome::Complete(report)) => {
                if !written {
                    self.advance(Event::Written)?;
                }
                tracing::info!(
                    "applied {} operations ({} bytes), resumed at operation {}",
                    report.operations,
                    report.bytes_written,
                    report.resumed_at_op
                );
                if report.resumed_at_op > 0 {
                    self.record(
                        "checkpoint",
                        Some(&report.target_version),
                        format!(
                            "continued from the checkpoint at operation {} of {}",
                            report.resumed_at_op, report.operations
                        ),
                    );
                }
                Ok(())
            }
            Ok(ApplyOutcome::Stopped(_)) => Err(EngineError::Cancelled),
            // A download stopped by cancel surfaces as a read error.
            Err(_) if self.cancel.load(Ordering::SeqCst) => Err(EngineError::Cancelled),
            Err(e) => Err(EngineError::Apply(e)),
        }
    }

    fn progress(&self, p: &ApplyProgress, downloaded: u64) {
        let phase = match p.phase {
            Phase::VerifyingSource => "verifying-source",
            Phase::Writing => "writing",
            Phase::VerifyingTarget => "reading-back",
        };
        let fraction = if p.total_bytes == 0 {
            0.0
        } else {
            p.done_bytes as f64 / p.total_bytes as f64
        };
        lock(&self.live).progress = Some(Progress {
            phase: phase.into(),
            done_bytes: p.done_bytes,
            total_bytes: p.total_bytes,
            downloaded_bytes: downloaded,
            fraction,
        });
        self.notify();
    }
}

/// The checks of a payload's verified head against what was asked for.
fn vet_manifest(
    job: &Job,
    source: &PayloadSource,
    booted_version: &str,
    m: &payload::Manifest,
    sha: &Sha256Hex,
) -> Result<(), String> {
    if let Some(want) = source.manifest_sha256 {
        if *sha != want {
            return Err(format!(
                "the payload's manifest has SHA-256 {sha}, the index says {want}"
            ));
        }
    }
    if let Some(v) = &job.version {
        if &m.target_version != v {
            return Err(format!(
                "the payload makes version {}, the update is for {v}",
                m.target_version
            ));
        }
    }
    if !job.allow_downgrade
        && version::compare(&m.target_version, booted_version) == std::cmp::Ordering::Less
    {
        return Err(format!(
            "the payload makes {}, older than the booted {booted_version}; pass --allow-downgrade to install it",
            m.target_version
        ));
    }
    Ok(())
}

/// What an apply wrote: the version and, for a one-component payload, the
/// image (size and digest) that finalize reads back.
/// Reads each recorded component back from its place and compares it with
/// the image the payload signed. A file component (a UKI) was cut to its
/// signed length after it was verified padded with zeros to whole blocks:
/// it is read padded again. `installed`: where a file component may be
/// instead, once installed as the slot's entry (then copied back to its
/// staging place and read back there). Each component is read once, the
/// copied ones twice.
fn read_back_components(
    paths: &[ComponentPaths],
    installed: &[(String, PathBuf)],
    components: &[(String, ImageRef)],
) -> Result<(), String> {
    if components.is_empty() {
        return Err("nothing was recorded".into());
    }
    for (name, image) in components {
        let place = paths
            .iter()
            .find(|p| &p.component == name)
            .ok_or_else(|| format!("component {name} has no place on this node"))?;
        if digest_of(&place.target, place.target_range, image, name)? == image.digest.sha256 {
            continue;
        }
        // Installing the entry moved the file out of its staging place:
        // it is copied back, and the copy is read back too, so that the
        // boot files are installed from the staging files as always.
        let Some((_, from)) = installed.iter().find(|(n, from)| {
            n == name && digest_of(from, None, image, name).is_ok_and(|d| d == image.digest.sha256)
        }) else {
            return Err(format!(
                "component {name} is neither at {} nor installed as the payload signed it",
                place.target.display()
            ));
        };
        std::fs::copy(from, &place.target)
            .and_then(|_| std::fs::File::open(&place.target)?.sync_all())
            .map_err(|e| format!("copying {} back: {e}", from.display()))?;
        let found = digest_of(&place.target, place.target_range, image, name)?;
        if found != image.digest.sha256 {
            return Err(format!(
                "component {name} copied back has SHA-256 {found}, the payload signed {}",
                image.digest.sha256
            ));
        }
    }
    Ok(())
}

/// The segmented SHA-256 of `image.size` bytes at a component's place.
fn digest_of(
    path: &std::path::Path,
    range: Option<payload::ByteRange>,
    image: &ImageRef,
    name: &str,
) -> Result<Sha256Hex, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let digest = match range {
        Some(range) => {
            if image.size > range.len {
                return Err(format!("component {name} is larger than its partition"));
            }
            payload::digest::digest_file(&payload::Region::new(file, range), image.size)
        }
        None => payload::digest::digest_file(&ZeroPadded(file), image.size),
    };
    digest
        .map(|d| d.sha256)
        .map_err(|e| format!("reading {name} back: {e}"))
}

/// A file read as if zeros followed its end (reads only).
struct ZeroPadded(std::fs::File);

impl std::os::unix::fs::FileExt for ZeroPadded {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let n = self.0.read_at(buf, offset)?;
        if n > 0 {
            return Ok(n);
        }
        buf.fill(0);
        Ok(buf.len())
    }

    fn write_at(&self, _: &[u8], _: u64) -> std::io::Result<usize> {
        Err(std::io::Error::other("read only"))
    }
}

/// What a payload wrote: its version, its `usr` image, its components and
/// the image each holds.
type Written = (String, Option<ImageRef>, Vec<(String, ImageRef)>);

fn summarize_outcome(o: &UpdateOutcome) -> String {
    match o {
        UpdateOutcome::UpToDate { version } => format!("up to date at {version}"),
        UpdateOutcome::Staged {
            version,
            slot,
            finalized: true,
            ..
        } => format!("{version} staged in slot {slot}; reboot to use it"),
        UpdateOutcome::Staged { version, slot, .. } => format!(
            "{version} staged in slot {slot}, not set to boot; `updatectl finalize` sets it next"
        ),
    }
}
