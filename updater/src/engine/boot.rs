//! After the reboot: what the engine finds at start (booted into the
//! staged update, or back on the old slot because it never booted), the
//! boot assessment that marks a slot good or rolls it back, the manual
//! marks and rollback, and the reboot strategy's steps.

use std::time::{Duration, SystemTime};

use bootconfig::gptprio::SlotStatus;
use bootconfig::SlotName;
use jiff::ZonedDateTime;
use serde::{Deserialize, Serialize};

use super::{lock, now_text, Engine, EngineError, HealthPhase};
use crate::config::RebootStrategy;
use crate::health::{self, UnitProbe};
use crate::machine::{self, Event};
use crate::reboot::{self, Fleetlock, RebootPlan, Rebooter};
use crate::slotctl;
use crate::state::{Assessment, Staged};

/// What the reboot strategy is doing, for the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebootStatus {
    pub strategy: String,
    /// `waiting`, `left-to-operator` or `rebooting`.
    pub state: String,
    pub detail: String,
    /// When the strategy asks again (a window's start, a lock retry).
    pub next_try: Option<String>,
}

/// The reboot strategy's memory within one run of the engine.
#[derive(Debug, Default)]
pub(super) struct RebootLive {
    pub(super) status: Option<RebootStatus>,
    /// The staged update a reboot was asked for: not asked twice.
    asked_for: Option<Staged>,
    attempt: u32,
    wrote_required: bool,
    release_attempt: u32,
}

/// What the start finds about the last update. Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    Nothing,
    /// Booted into the staged update: it goes on trial.
    BootedInto(Staged),
    /// Still on the update on trial (the daemon restarted).
    StillOnTrial(Staged),
    /// Back on the other slot without the update having been marked good.
    NeverBooted {
        update: Staged,
        reason: String,
    },
}

/// Decides [`Arrival`] from the persisted staged and trial updates, the
/// booted slot and the slots' boot states. Pure.
pub fn arrival(
    staged: Option<&Staged>,
    trial: Option<&Staged>,
    booted: SlotName,
    status: impl Fn(SlotName) -> SlotStatus,
) -> Arrival {
    if let Some(t) = trial {
        return if t.slot == booted {
            Arrival::StillOnTrial(t.clone())
        } else {
            Arrival::NeverBooted {
                update: t.clone(),
                reason: format!(
                    "did not become healthy: the node came back on slot {booted} before slot {}'s health check ended",
                    t.slot
                ),
            }
        };
    }
    match staged {
        Some(s) if s.slot == booted => Arrival::BootedInto(s.clone()),
        // Only a finalized update was meant to boot: one that is only
        // staged waits for its finalize, across reboots.
        Some(s) if s.finalized && status(s.slot) == SlotStatus::Unbootable => {
            Arrival::NeverBooted {
                update: s.clone(),
                reason: "did not boot".into(),
            }
        }
        _ => Arrival::Nothing,
    }
}

/// The digest of a slot's first `size` bytes, read from the disk.
fn read_back(
    disk: &std::path::Path,
    slot: &bootconfig::Slot,
    size: u64,
) -> Result<payload::format::Sha256Hex, EngineError> {
    let io = |e: std::io::Error| {
        EngineError::System(format!(
            "reading slot {} of {} back: {e}",
            slot.name,
            disk.display()
        ))
    };
    if size > slot.size {
        return Err(EngineError::Refused(format!(
            "slot {} ({} bytes) is smaller than the {size}-byte image staged in it",
            slot.name, slot.size
        )));
    }
    let file = std::fs::File::open(disk).map_err(io)?;
    let region = payload::Region::new(
        file,
        payload::ByteRange {
            offset: slot.offset,
            len: slot.size,
        },
    );
    Ok(payload::digest::digest_file(&region, size)
        .map_err(io)?
        .sha256)
}

fn slots_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Slots(format!("{e:#}"))
}

fn count(p: &mut crate::state::Persisted, key: &str) {
    *p.counters.entry(key.to_owned()).or_default() += 1;
}

impl Engine {
    /// The kernel's boot id, if the configured file can be read.
    pub(super) fn boot_id(&self) -> Option<String> {
        std::fs::read_to_string(&self.config.system.boot_id)
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    }

    fn open_slots(&self, for_update: bool) -> Result<slotctl::Opened, EngineError> {
        slotctl::open(&self.target(), for_update).map_err(slots_err)
    }

    fn booted_of(opened: &slotctl::Opened) -> Result<SlotName, EngineError> {
        opened
            .booted
            .ok_or_else(|| EngineError::Slots("cannot tell the booted slot".into()))
    }

    /// Rests the state machine after a boot entry changed, when it rests.
    fn rest_after_boot_change(&self) -> Result<(), EngineError> {
        let (state, rest) = {
            let p = lock(&self.persisted);
            (p.state, p.rest())
        };
        if let Ok(to) = machine::next(state, Event::BootChanged { rest }) {
            self.update(|p| p.state = to)?;
        }
        Ok(())
    }

    /// What `tandemd` does first at each start: notes a boot into the
    /// staged update or a staged update that never booted, then assesses
    /// the booted slot when it is not marked good (once per boot). A
    /// failed assessment marks the slot bad, sets the other next and
    /// reboots through `rebooter`.
    pub fn start_boot(
        &self,
        units: &dyn UnitProbe,
        rebooter: &dyn Rebooter,
    ) -> Result<String, EngineError> {
        let ticket = self.begin("assess")?;
        self.operate(
            ticket,
            |m: &String| m.clone(),
            || {
                let result = self.start_inner(units, rebooter);
                lock(&self.live).health = HealthPhase::Done;
                result
            },
        )
    }

    fn start_inner(
        &self,
        units: &dyn UnitProbe,
        rebooter: &dyn Rebooter,
    ) -> Result<String, EngineError> {
        let opened = self.open_slots(false)?;
        let booted = Self::booted_of(&opened)?;
        let statuses = SlotName::BOTH.map(|s| opened.backend.slot_boot(s).status());
        drop(opened);
        let version = self.booted_version().ok();
        let boot_id = lock(&self.live).boot_id.clone();
        let (staged, trial, assessed_this_boot) = {
            let p = lock(&self.persisted);
            let assessed = p
                .assessment
                .as_ref()
                .is_some_and(|a| a.boot_id.is_some() && a.boot_id == boot_id);
            (p.staged.clone(), p.trial.clone(), assessed)
        };
        if let Some(v) = &version {
            self.update(|p| {
                p.versions.insert(booted, v.clone());
            })?;
        }
        match arrival(staged.as_ref(), trial.as_ref(), booted, |s| {
            statuses[s.index()]
        }) {
            Arrival::BootedInto(s) => {
                let note = match &version {
                    Some(v) if *v != s.version => format!(" (its os-release says {v})"),
                    _ => String::new(),
                };
                self.record(
                    "booted",
                    Some(&s.version),
                    format!("booted {} from slot {}{note}", s.version, s.slot),
                );
                self.update(|p| {
                    p.staged = None;
                    p.trial = Some(s.clone());
                })?;
                self.rest_after_boot_change()?;
            }
            Arrival::NeverBooted { update, reason } => {
                self.record(
                    "rollback",
                    Some(&update.version),
                    format!(
                        "{} in slot {} {reason}; running slot {booted}{}",
                        update.version,
                        update.slot,
                        version
                            .as_ref()
                            .map(|v| format!(" ({v})"))
                            .unwrap_or_default()
                    ),
                );
                self.update(|p| {
                    p.staged = None;
                    p.trial = None;
                    p.blocked.insert(update.version.clone(), reason.clone());
                    count(p, "rollbacks/did-not-boot");
                })?;
                self.rest_after_boot_change()?;
            }
            Arrival::StillOnTrial(_) | Arrival::Nothing => {}
        }
        if statuses[booted.index()] == SlotStatus::Good {
            return Ok(format!("slot {booted} is marked good; nothing to assess"));
        }
        if assessed_this_boot {
            return Ok(format!("slot {booted} was already assessed in this boot"));
        }
        self.assess(booted, version, boot_id, units, rebooter)
    }

    fn assess(
        &self,
        booted: SlotName,
        version: Option<String>,
        boot_id: Option<String>,
        units: &dyn UnitProbe,
        rebooter: &dyn Rebooter,
    ) -> Result<String, EngineError> {
        let started = now_text();
        lock(&self.live).health = HealthPhase::Running;
        self.notify();
        let env = vec![
            ("TANDEM_SLOT".to_owned(), booted.to_string()),
            (
                "TANDEM_VERSION".to_owned(),
                version.clone().unwrap_or_default(),
            ),
        ];
        let outcome = health::run(&self.config.health, &env, units, &self.cancel);
        let stopped = self.stopping.load(std::sync::atomic::Ordering::SeqCst)
            || self.cancel.load(std::sync::atomic::Ordering::SeqCst);
        if stopped {
            // A shutdown or `updatectl cancel` is no verdict: nothing is
            // marked or recorded, and the next start assesses again.
            return Err(EngineError::Cancelled);
        }
        let assessment = |result: &str| Assessment {
            boot_id: boot_id.clone(),
            slot: booted,
            version: version.clone(),
            result: result.to_owned(),
            started: started.clone(),
            finished: now_text(),
            checks: outcome.checks.clone(),
        };
        let v = version.as_deref();
        let Some(failure) = outcome.failure().cloned().filter(|_| !outcome.passed) else {
            let notes = self
                .open_slots(true)?
                .backend
                .mark_good(booted)
                .map_err(|e| EngineError::Slots(format!("marking slot {booted} good: {e}")))?;
            notes.iter().for_each(|n| tracing::warn!("{n}"));
            let message = format!(
                "{} health checks passed; slot {booted} marked good",
                outcome.checks.len()
            );
            self.record("health-passed", v, message.clone());
            self.update(|p| {
                p.trial = None;
                if let Some(v) = v {
                    p.blocked.remove(v);
                }
                p.assessment = Some(assessment("passed"));
            })?;
            return Ok(message);
        };
        let what = format!("{} {}: {}", failure.kind, failure.name, failure.message);
        self.record_with_output(
            "health-failed",
            v,
            format!("slot {booted}: {what}"),
            (!failure.output.is_empty()).then(|| failure.output.clone()),
        );
        self.update(|p| {
            p.trial = None;
            p.assessment = Some(assessment("failed"));
            count(p, "failures/health");
        })?;
        let marked = self
            .open_slots(true)
            .and_then(|mut o| o.backend.mark_bad(booted).map_err(slots_err));
        match marked {
            Ok(notes) => {
                notes.iter().for_each(|n| tracing::warn!("{n}"));
                let reason = format!("health check failed: {what}");
                self.record(
                    "rollback",
                    v,
                    format!(
                        "slot {booted} marked bad ({reason}); slot {} boots next",
                        booted.other()
                    ),
                );
                self.update(|p| {
                    if let Some(v) = v {
                        p.blocked.insert(v.to_owned(), reason.clone());
                    }
                    count(p, "rollbacks/health-check");
                })?;
                self.refresh_slots();
                if self.config.health.reboot_on_failure {
                    let why = format!("rollback to slot {}", booted.other());
                    if let Err(e) = self.reboot_now(rebooter, v, &why) {
                        tracing::error!("{e}");
                    }
                }
            }
            Err(e) => self.record(
                "failed",
                v,
                format!("cannot roll back from slot {booted}: {e}"),
            ),
        }
        Err(EngineError::System(format!(
            "the health check failed on slot {booted}: {what}"
        )))
    }

    /// Records and asks for a reboot.
    fn reboot_now(
        &self,
        rebooter: &dyn Rebooter,
        version: Option<&str>,
        why: &str,
    ) -> Result<(), String> {
        self.record("reboot", version, format!("rebooting: {why}"));
        rebooter.reboot(why).map_err(|e| {
            let message = format!("the reboot was refused: {e}");
            self.record("failed", version, message.clone());
            message
        })
    }

    /// `updatectl finalize`: sets the staged slot to boot next, after
    /// reading it back once more. With `rebooter` (a caller that drained
    /// the node) it reboots at once; without, the reboot strategy applies.
    /// Finalizing what is finalized already changes nothing.
    pub fn finalize(&self, rebooter: Option<&dyn Rebooter>) -> Result<String, EngineError> {
        let ticket = self.begin("finalize")?;
        self.operate(
            ticket,
            |m: &String| m.clone(),
            || {
                let result = self.finalize_inner(rebooter);
                if let Err(e) = &result {
                    let version = lock(&self.persisted)
                        .staged
                        .as_ref()
                        .map(|s| s.version.clone());
                    self.failed(e, version.as_deref());
                }
                result
            },
        )
    }

    fn finalize_inner(&self, rebooter: Option<&dyn Rebooter>) -> Result<String, EngineError> {
        let (staged, job) = {
            let p = lock(&self.persisted);
            (p.staged.clone(), p.job.is_some())
        };
        if job {
            return Err(EngineError::Refused(
                "an update is being written; finalize once it is staged".into(),
            ));
        }
        let staged = staged.ok_or(EngineError::NotStaged)?;
        let mut message = if staged.finalized {
            format!(
                "{} in slot {} was finalized already",
                staged.version, staged.slot
            )
        } else {
            self.finalize_staged(&staged)?;
            format!(
                "{} in slot {} boots next (one try)",
                staged.version, staged.slot
            )
        };
        if let Some(rebooter) = rebooter {
            let why = format!("finalize: into {} in slot {}", staged.version, staged.slot);
            self.reboot_now(rebooter, Some(&staged.version), &why)
                .map_err(EngineError::System)?;
            let asked = Staged {
                finalized: true,
                ..staged
            };
            lock(&self.live).reboot.asked_for = Some(asked);
            self.set_reboot_status("rebooting", why, None);
            message.push_str("; rebooting");
        }
        Ok(message)
    }

    /// Reads the staged slot back against the digest recorded when it was
    /// staged, then sets it to boot next (one try). A slot that no longer
    /// holds what was staged is forgotten and never set next.
    pub(super) fn finalize_staged(&self, staged: &Staged) -> Result<(), EngineError> {
        let (disk, slot, booted) = {
            let o = self.open_slots(false)?;
            (
                o.disk_path.clone(),
                o.slots[staged.slot.index()].clone(),
                o.booted,
            )
        };
        if booted == Some(staged.slot) {
            return Err(EngineError::Refused(format!(
                "slot {} is booted now; there is nothing to finalize",
                staged.slot
            )));
        }
        if let Some(image) = &staged.image {
            // The operation under way (`finalize`) shows in the status.
            let found = read_back(&disk, &slot, image.size)?;
            if found != image.digest.sha256 {
                self.update(|p| p.staged = None)?;
                self.rest_after_boot_change()?;
                return Err(EngineError::Refused(format!(
                    "slot {} no longer holds the staged {} (its SHA-256 is {found}, {} was staged); it is not set to boot: stage the update again",
                    staged.slot, staged.version, image.digest.sha256
                )));
            }
        } else {
            tracing::warn!(
                "slot {}: no digest recorded at staging (an older state file); it was verified when staged",
                staged.slot
            );
        }
        // The hash tree could have changed since staging too: the gate
        // runs again, against the root hash the boot entry names.
        let usrhash = {
            let o = self.open_slots(false)?;
            if let Some((uki, addon)) = o.backend.uki_files(staged.slot) {
                use bootconfig::uki;
                let addons: Vec<uki::UkiInfo> = addon
                    .and_then(|a| uki::read_uki(&a).ok())
                    .into_iter()
                    .collect();
                uki::read_uki(&uki)
                    .ok()
                    .and_then(|u| uki::usrhash(&uki::combined_cmdline(&u, &addons)))
            } else if let Some(kernel) = o.backend.kernel_file(staged.slot) {
                super::verity::kernel_usrhash(&kernel)?
            } else if o.backend.installs_boot_files() {
                bootconfig::bootfiles::read_from_image(&disk, slot.offset, slot.image_size())
                    .ok()
                    .and_then(|f| bootconfig::uki::usrhash(&f.cmdline))
            } else {
                None
            }
        };
        if let Err(e) = super::verity::check_slot(&disk, &slot, usrhash.as_deref()) {
            self.update(|p| p.staged = None)?;
            self.rest_after_boot_change()?;
            return Err(e);
        }
        let notes = self
            .open_slots(true)?
            .backend
            .set_next(staged.slot, 1)
            .map_err(|e| EngineError::Slots(format!("setting slot {} next: {e}", staged.slot)))?;
        notes.iter().for_each(|n| tracing::warn!("{n}"));
        self.update(|p| {
            if let Some(s) = p.staged.as_mut() {
                s.finalized = true;
            }
        })?;
        self.advance(Event::Finalized)?;
        self.record(
            "finalized",
            Some(&staged.version),
            format!(
                "{} in slot {} read back equal to what was staged and set to boot next",
                staged.version, staged.slot
            ),
        );
        Ok(())
    }

    /// `updatectl rollback`: boots the other slot next (on trial), when it
    /// is marked good. The reboot strategy then applies, as to an update.
    pub fn rollback(&self) -> Result<String, EngineError> {
        let ticket = self.begin("rollback")?;
        self.operate(
            ticket,
            |m: &String| m.clone(),
            || {
                if lock(&self.persisted).job.is_some() {
                    return Err(EngineError::Refused(
                        "an interrupted update is recorded; cancel or finish it first".into(),
                    ));
                }
                let mut o = self.open_slots(true)?;
                let booted = Self::booted_of(&o)?;
                let other = booted.other();
                let status = o.backend.slot_boot(other).status();
                if status != SlotStatus::Good {
                    return Err(EngineError::Refused(format!(
                        "refusing: slot {other} is {}, not good; there is no good slot to roll back to",
                        crate::client::status_word(status)
                    )));
                }
                let notes = o
                    .backend
                    .set_next(other, 1)
                    .map_err(|e| EngineError::Slots(format!("setting slot {other} next: {e}")))?;
                drop(o);
                notes.iter().for_each(|n| tracing::warn!("{n}"));
                let version = lock(&self.persisted)
                    .versions
                    .get(&other)
                    .cloned()
                    .unwrap_or_else(|| "unknown".into());
                let message = format!(
                    "rollback: slot {other} ({version}) boots next, on trial; slot {booted} stays good"
                );
                self.record("rollback", Some(&version), message.clone());
                self.update(|p| {
                    p.staged = Some(Staged {
                        version: version.clone(),
                        slot: other,
                        time: now_text(),
                        finalized: true,
                        image: None,
                    });
                    p.trial = None;
                    count(p, "rollbacks/manual");
                })?;
                self.rest_after_boot_change()?;
                Ok(message)
            },
        )
    }

    /// `updatectl mark-good` / `mark-bad`: a person's assessment of the
    /// booted slot, recorded as this boot's.
    pub fn mark_booted(&self, good: bool) -> Result<String, EngineError> {
        let kind = if good { "marked-good" } else { "marked-bad" };
        let ticket = self.begin(kind)?;
        self.operate(
            ticket,
            |m: &String| m.clone(),
            || {
                let mut o = self.open_slots(true)?;
                let booted = Self::booted_of(&o)?;
                let notes = if good {
                    o.backend.mark_good(booted)
                } else {
                    o.backend.mark_bad(booted)
                }
                .map_err(|e| EngineError::Slots(format!("slot {booted}: {e}")))?;
                drop(o);
                notes.iter().for_each(|n| tracing::warn!("{n}"));
                let version = self.booted_version().ok();
                let message = if good {
                    format!("slot {booted} marked good by hand")
                } else {
                    format!(
                        "slot {booted} marked bad by hand; slot {} boots next",
                        booted.other()
                    )
                };
                self.record(kind, version.as_deref(), message.clone());
                let boot_id = lock(&self.live).boot_id.clone();
                self.update(|p| {
                    p.trial = None;
                    if let Some(v) = &version {
                        if good {
                            p.blocked.remove(v);
                        } else {
                            p.blocked.insert(v.clone(), "marked bad by hand".into());
                            count(p, "rollbacks/manual");
                        }
                    }
                    p.assessment = Some(Assessment {
                        boot_id,
                        slot: booted,
                        version: version.clone(),
                        result: kind.to_owned(),
                        started: now_text(),
                        finished: now_text(),
                        checks: Vec::new(),
                    });
                })?;
                Ok(message)
            },
        )
    }

    fn fleetlock(&self) -> Option<Fleetlock> {
        let r = &self.config.reboot;
        let base = r.fleetlock_url.clone()?;
        let machine_id = self.machine_id().unwrap_or_default();
        Some(Fleetlock {
            base,
            id: reboot::fleetlock_id(&machine_id),
            group: r.fleetlock_group.clone(),
        })
    }

    fn set_reboot_status(&self, state: &str, detail: String, next: Option<SystemTime>) {
        let status = RebootStatus {
            strategy: self.config.reboot.strategy.as_str().to_owned(),
            state: state.to_owned(),
            detail,
            next_try: next.map(payload::index::format_time),
        };
        let changed = {
            let mut live = lock(&self.live);
            let changed = live.reboot.status.as_ref() != Some(&status);
            live.reboot.status = Some(status);
            changed
        };
        if changed {
            self.notify();
        }
    }

    /// One step of the reboot strategy for a staged update: returns when
    /// to step again, or `None` to wait for the next change.
    pub fn reboot_step(&self, rebooter: &dyn Rebooter) -> Option<Duration> {
        if self.is_busy() {
            return Some(Duration::from_secs(1));
        }
        let cfg = &self.config.reboot;
        // Only a finalized update waits for a reboot.
        let staged = lock(&self.persisted).staged.clone().filter(|s| s.finalized);
        let Some(staged) = staged else {
            let mut live = lock(&self.live);
            live.reboot.status = None;
            live.reboot.attempt = 0;
            if live.reboot.wrote_required {
                live.reboot.wrote_required = false;
                let _ = std::fs::remove_file(&cfg.required_file);
            }
            return None;
        };
        if lock(&self.live).reboot.asked_for.as_ref() == Some(&staged) {
            return None;
        }
        // kured's signal, whatever the strategy.
        if !lock(&self.live).reboot.wrote_required {
            match std::fs::write(&cfg.required_file, b"") {
                Ok(()) => lock(&self.live).reboot.wrote_required = true,
                Err(e) => tracing::warn!("cannot write {}: {e}", cfg.required_file.display()),
            }
        }
        let tz = reboot::time_zone(&cfg.time_zone).unwrap_or(jiff::tz::TimeZone::UTC);
        let windows: Vec<_> = cfg
            .windows
            .iter()
            .filter_map(|w| reboot::parse_window(w).ok())
            .collect();
        let now = ZonedDateTime::now().with_time_zone(tz);
        let retry = Duration::from_secs(cfg.retry_seconds);
        let v = Some(staged.version.as_str());
        match reboot::plan(cfg.strategy, &now, &windows) {
            RebootPlan::LeaveToOperator { why } => {
                self.set_reboot_status("left-to-operator", why, None);
                None
            }
            RebootPlan::WaitUntil { at, why } => {
                self.set_reboot_status("waiting", why, Some(at));
                let wait = at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::from_secs(1));
                Some(wait.clamp(Duration::from_secs(1), Duration::from_secs(3600)))
            }
            RebootPlan::Reboot => {
                if cfg.strategy == RebootStrategy::Fleetlock
                    && !lock(&self.persisted).fleetlock_held
                {
                    let Some(f) = self.fleetlock() else {
                        self.set_reboot_status("left-to-operator", "no fleetlock_url".into(), None);
                        return None;
                    };
                    if let Err(e) = f.pre_reboot() {
                        let wait = {
                            let mut live = lock(&self.live);
                            live.reboot.attempt += 1;
                            reboot::backoff(retry, live.reboot.attempt - 1)
                        };
                        let message = format!("no reboot slot yet: {e}");
                        self.record_once("fleetlock", v, message.clone());
                        self.set_reboot_status("waiting", message, Some(SystemTime::now() + wait));
                        return Some(wait);
                    }
                    if let Err(e) = self.update(|p| p.fleetlock_held = true) {
                        tracing::error!("{e}");
                    }
                    self.record(
                        "fleetlock",
                        v,
                        format!("took a reboot slot from {} (group {})", f.base, f.group),
                    );
                }
                let why = format!(
                    "into {} in slot {} (strategy {})",
                    staged.version,
                    staged.slot,
                    cfg.strategy.as_str()
                );
                match self.reboot_now(rebooter, v, &why) {
                    Ok(()) => {
                        {
                            let mut live = lock(&self.live);
                            live.reboot.asked_for = Some(staged);
                            live.reboot.attempt = 0;
                        }
                        self.set_reboot_status("rebooting", why, None);
                        None
                    }
                    Err(e) => {
                        let wait = {
                            let mut live = lock(&self.live);
                            live.reboot.attempt += 1;
                            reboot::backoff(retry, live.reboot.attempt - 1)
                        };
                        self.set_reboot_status("waiting", e, Some(SystemTime::now() + wait));
                        Some(wait)
                    }
                }
            }
        }
    }

    /// Gives a held fleetlock slot back once the booted slot is good and
    /// assessed: returns when to try again, or `None` when done.
    pub fn release_fleetlock(&self) -> Option<Duration> {
        if !lock(&self.persisted).fleetlock_held {
            return None;
        }
        let ready = {
            let live = lock(&self.live);
            live.health == HealthPhase::Done && live.booted_good
        };
        if !ready {
            return Some(Duration::from_secs(2));
        }
        let Some(f) = self.fleetlock() else {
            let _ = self.update(|p| p.fleetlock_held = false);
            return None;
        };
        match f.steady_state() {
            Ok(()) => {
                if let Err(e) = self.update(|p| p.fleetlock_held = false) {
                    tracing::error!("{e}");
                }
                self.record(
                    "fleetlock",
                    None,
                    format!("gave the reboot slot back to {} (node healthy)", f.base),
                );
                None
            }
            Err(e) => {
                let wait = {
                    let mut live = lock(&self.live);
                    live.reboot.release_attempt += 1;
                    reboot::backoff(
                        Duration::from_secs(self.config.reboot.retry_seconds),
                        live.reboot.release_attempt - 1,
                    )
                };
                self.record_once(
                    "fleetlock",
                    None,
                    format!("cannot give the reboot slot back yet: {e}"),
                );
                Some(wait)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(v: &str, slot: SlotName) -> Staged {
        Staged {
            version: v.into(),
            slot,
            time: String::new(),
            finalized: true,
            image: None,
        }
    }

    #[test]
    fn arrivals() {
        use SlotName::{A, B};
        use SlotStatus::{Good, Trying, Unbootable};
        let s = staged("2.0.0", B);
        let st = |a, b| move |x: SlotName| if x == A { a } else { b };
        // Waiting for the reboot: B still has its try.
        assert_eq!(
            arrival(Some(&s), None, A, st(Good, Trying)),
            Arrival::Nothing
        );
        // Booted into it.
        assert_eq!(
            arrival(Some(&s), None, B, st(Good, Unbootable)),
            Arrival::BootedInto(s.clone())
        );
        // Its try spent, back on A.
        assert_eq!(
            arrival(Some(&s), None, A, st(Good, Unbootable)),
            Arrival::NeverBooted {
                update: s.clone(),
                reason: "did not boot".into()
            }
        );
        // On trial, the daemon restarted; or back on A mid-assessment.
        assert_eq!(
            arrival(None, Some(&s), B, st(Good, Unbootable)),
            Arrival::StillOnTrial(s.clone())
        );
        match arrival(None, Some(&s), A, st(Good, Unbootable)) {
            Arrival::NeverBooted { reason, .. } => {
                assert!(reason.contains("did not become healthy"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(arrival(None, None, A, st(Good, Good)), Arrival::Nothing);
        // Only staged (never set next): its cleared slot is no failed boot,
        // and it stays staged across reboots.
        let only = Staged {
            finalized: false,
            ..s.clone()
        };
        assert_eq!(
            arrival(Some(&only), None, A, st(Good, Unbootable)),
            Arrival::Nothing
        );
    }
}
