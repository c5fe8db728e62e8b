//! What the agent does next, from the node's two annotations and what
//! tandemd says. Pure: the caller reads the node and tandemd, asks
//! [`decide`], and does the one step it answers.
//!
//! Every request is carried out at most once: a status with the request's
//! `operationId` says it was seen, and only an `InProgress` one (the agent
//! stopped mid-operation) is looked at again, against tandemd's own state,
//! so that a finalize (a reboot) is never asked for twice.

use std::collections::BTreeMap;

use crate::protocol::{
    commit_id, parse_request, Code, RequestOperation, StatusOperation, UpdateRequest, UpdateStatus,
    SCHEMA_VERSION,
};

/// The part of tandemd's status document the agent reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tandem {
    pub booted_version: Option<String>,
    /// The staged update: version, and whether it is set to boot next.
    pub staged: Option<(String, bool)>,
    /// This boot's assessment (`pending`, `running`, `passed`, `failed`,
    /// `not-needed`, `not-assessed`, `marked-good`, `marked-bad`).
    pub health: String,
    /// An operation is under way.
    pub busy: bool,
    /// Versions rolled back on this node, with why.
    pub blocked: BTreeMap<String, String>,
}

impl Tandem {
    /// Reads the fields from tandemd's status document (JSON).
    pub fn from_status(status: &serde_json::Value) -> Tandem {
        let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
        Tandem {
            booted_version: text(&status["booted_version"]),
            staged: status["staged"]["version"].as_str().map(|v| {
                (
                    v.to_owned(),
                    status["staged"]["finalized"].as_bool().unwrap_or(true),
                )
            }),
            health: text(&status["health"]).unwrap_or_default(),
            busy: !status["operation"].is_null(),
            blocked: status["blocked"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    fn staged_is(&self, version: &str) -> Option<bool> {
        self.staged
            .as_ref()
            .filter(|(v, _)| v == version)
            .map(|(_, f)| *f)
    }

    fn booted_is(&self, version: &str) -> bool {
        self.booted_version.as_deref() == Some(version)
    }

    fn healthy(&self) -> Option<bool> {
        match self.health.as_str() {
            "passed" | "not-needed" | "marked-good" => Some(true),
            "failed" | "marked-bad" => Some(false),
            _ => None,
        }
    }
}

/// An operation to run through tandemd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Stage(String),
    /// Set next and reboot.
    Finalize,
    /// The other slot next, then reboot.
    Rollback,
}

/// The one step to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Idle,
    /// Nothing yet: tandemd is busy, or a reboot or health verdict is
    /// awaited. Says what for.
    Wait(String),
    /// Write this status.
    Report(UpdateStatus),
    /// Write this `InProgress` status, then run the action.
    Run(UpdateStatus, Action),
}

fn status(
    r: &UpdateRequest,
    op: StatusOperation,
    code: Code,
    message: String,
    from: Option<String>,
    started: &str,
    now: &str,
) -> UpdateStatus {
    UpdateStatus {
        schema_version: SCHEMA_VERSION.into(),
        node_update_id: r.node_update_id.clone(),
        operation_id: if op == StatusOperation::Commit {
            commit_id(&r.operation_id)
        } else {
            r.operation_id.clone()
        },
        operation: op,
        code,
        message,
        from_version: from,
        to_version: r.target_version.clone(),
        started_utc: started.to_owned(),
        finished_utc: code.is_final().then(|| now.to_owned()),
    }
}

/// The next step. `request` and `current` are the annotations' values;
/// `now` is an RFC 3339 UTC time for the status. Pure.
pub fn decide(
    request: Option<&str>,
    current: Option<&UpdateStatus>,
    tandem: &Tandem,
    now: &str,
) -> Step {
    let Some(text) = request else {
        return Step::Idle;
    };
    let r = match parse_request(text) {
        Ok(r) => r,
        Err(invalid) => {
            let seen = current.is_some_and(|c| {
                c.code == Code::InvalidRequest
                    && c.operation_id == invalid.operation_id
                    && c.node_update_id == invalid.node_update_id
                    && c.message == invalid.why
            });
            if seen {
                return Step::Idle;
            }
            return Step::Report(UpdateStatus {
                schema_version: SCHEMA_VERSION.into(),
                node_update_id: invalid.node_update_id,
                operation_id: invalid.operation_id,
                operation: StatusOperation::Stage,
                code: Code::InvalidRequest,
                message: invalid.why,
                from_version: tandem.booted_version.clone(),
                to_version: None,
                started_utc: now.into(),
                finished_utc: Some(now.into()),
            });
        }
    };
    let same = |c: &&UpdateStatus| c.node_update_id == r.node_update_id;
    match current.filter(same) {
        Some(c) if c.operation_id == commit_id(&r.operation_id) => Step::Idle,
        Some(c) if c.operation_id == r.operation_id => {
            if c.code == Code::InProgress {
                resume(&r, c, tandem, now)
            } else if r.operation == RequestOperation::Finalize && c.code == Code::Success {
                commit(&r, c, tandem, now)
            } else {
                Step::Idle
            }
        }
        _ => start(&r, tandem, now),
    }
}

/// A request not seen before.
fn start(r: &UpdateRequest, tandem: &Tandem, now: &str) -> Step {
    let from = tandem.booted_version.clone();
    let op = StatusOperation::from(r.operation);
    let report =
        |code, message: String| Step::Report(status(r, op, code, message, from.clone(), now, now));
    let run = |message: String, action| {
        Step::Run(
            status(r, op, Code::InProgress, message, from.clone(), now, now),
            action,
        )
    };
    if tandem.busy {
        return Step::Wait("tandemd is busy".into());
    }
    match (r.operation, r.target_version.as_deref()) {
        (RequestOperation::Stage, Some(v)) if tandem.booted_is(v) => {
            report(Code::AlreadyAtTarget, format!("{v} is booted"))
        }
        (RequestOperation::Stage, Some(v)) if tandem.staged_is(v).is_some() => {
            report(Code::Success, format!("{v} is staged"))
        }
        (RequestOperation::Stage, Some(v)) => {
            run(format!("staging {v}"), Action::Stage(v.to_owned()))
        }
        (RequestOperation::Finalize, Some(v)) if tandem.booted_is(v) => {
            report(Code::AlreadyAtTarget, format!("{v} is booted"))
        }
        (RequestOperation::Finalize, Some(v)) if tandem.staged_is(v).is_none() => report(
            Code::NotStaged,
            match &tandem.staged {
                Some((s, _)) => format!("{v} is not staged ({s} is)"),
                None => format!("{v} is not staged"),
            },
        ),
        (RequestOperation::Finalize, Some(v)) => {
            run(format!("finalizing {v} and rebooting"), Action::Finalize)
        }
        (RequestOperation::Rollback, _) => run("rolling back".into(), Action::Rollback),
        // parse_request refuses these; nothing to do if one came through.
        (RequestOperation::Stage | RequestOperation::Finalize, None) => Step::Idle,
    }
}

/// The agent stopped while `c` was under way: find out from tandemd
/// whether it happened, without doing it a second time.
fn resume(r: &UpdateRequest, c: &UpdateStatus, tandem: &Tandem, now: &str) -> Step {
    let done = |code, message: String| {
        Step::Report(status(
            r,
            c.operation,
            code,
            message,
            c.from_version.clone(),
            &c.started_utc,
            now,
        ))
    };
    if tandem.busy {
        return Step::Wait("tandemd is busy".into());
    }
    let target = r.target_version.as_deref().unwrap_or_default();
    match r.operation {
        RequestOperation::Stage => match tandem.staged_is(target) {
            Some(_) => done(Code::Success, format!("{target} is staged")),
            // tandemd resumes an interrupted write by itself; asking again
            // continues it (or reports why it cannot).
            None => Step::Run(c.clone(), Action::Stage(target.to_owned())),
        },
        RequestOperation::Finalize => {
            if tandem.booted_is(target) || tandem.staged_is(target) == Some(true) {
                done(
                    Code::Success,
                    format!("{target} was set to boot next and the reboot asked for"),
                )
            } else if tandem.staged_is(target) == Some(false) {
                // It never got as far as setting the slot next.
                Step::Run(c.clone(), Action::Finalize)
            } else {
                done(
                    Code::OperationFailed,
                    format!("{target} is no longer staged"),
                )
            }
        }
        RequestOperation::Rollback => {
            if tandem.booted_version != c.from_version
                || tandem.staged.as_ref().is_some_and(|s| s.1)
            {
                done(Code::Success, "the other slot boots next".into())
            } else {
                Step::Run(c.clone(), Action::Rollback)
            }
        }
    }
}

/// After a successful finalize: the commit, once the new image's health
/// (or its failure to boot) is known.
fn commit(r: &UpdateRequest, c: &UpdateStatus, tandem: &Tandem, now: &str) -> Step {
    let target = r.target_version.as_deref().unwrap_or_default();
    let report = |code, message: String| {
        Step::Report(status(
            r,
            StatusOperation::Commit,
            code,
            message,
            c.from_version.clone(),
            &c.started_utc,
            now,
        ))
    };
    if tandem.booted_is(target) {
        return match tandem.healthy() {
            Some(true) => report(
                Code::Success,
                format!("{target} booted and passed its health checks"),
            ),
            Some(false) => report(
                Code::RevertedToPrevious,
                format!(
                    "{target} booted but its health assessment is {}; tandemd rolls back",
                    tandem.health
                ),
            ),
            None => Step::Wait(format!("the health assessment of {target}")),
        };
    }
    if tandem.staged_is(target) == Some(true) {
        return Step::Wait(format!("the reboot into {target}"));
    }
    let why = tandem
        .blocked
        .get(target)
        .cloned()
        .unwrap_or_else(|| "it is no longer staged".into());
    report(
        Code::RevertedToPrevious,
        format!(
            "the node runs {} again: {target} {why}",
            tandem
                .booted_version
                .as_deref()
                .unwrap_or("an unknown version")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2c1a9e-8b7d-4c6e-9f10-1234567890ab";
    const NOW: &str = "2026-12-02T10:00:00Z";

    fn req(op: &str, target: Option<&str>) -> String {
        let mut v = serde_json::json!({"schemaVersion": "1.0", "nodeUpdateId": ID,
            "operationId": format!("op-{op}"), "operation": op});
        if let Some(t) = target {
            v["targetVersion"] = t.into();
        }
        v.to_string()
    }

    fn node(booted: &str, staged: Option<(&str, bool)>, health: &str) -> Tandem {
        Tandem {
            booted_version: Some(booted.into()),
            staged: staged.map(|(v, f)| (v.into(), f)),
            health: health.into(),
            busy: false,
            blocked: BTreeMap::new(),
        }
    }

    fn reported(step: Step) -> UpdateStatus {
        match step {
            Step::Report(s) | Step::Run(s, _) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn stage_runs_once_then_reports_and_repeats_are_idle() {
        let r = req("stage", Some("2.0.0"));
        let t = node("1.0.0", None, "not-needed");
        let Step::Run(s, Action::Stage(v)) = decide(Some(&r), None, &t, NOW) else {
            panic!()
        };
        assert_eq!((s.code, v.as_str()), (Code::InProgress, "2.0.0"));
        assert_eq!(s.from_version.as_deref(), Some("1.0.0"));
        assert_eq!(s.finished_utc, None);
        // Agent restarted mid-stage, tandemd still writing: wait.
        let busy = Tandem {
            busy: true,
            ..t.clone()
        };
        assert!(matches!(
            decide(Some(&r), Some(&s), &busy, NOW),
            Step::Wait(_)
        ));
        // Written meanwhile: success, with the original start time.
        let staged = node("1.0.0", Some(("2.0.0", false)), "not-needed");
        let done = reported(decide(Some(&r), Some(&s), &staged, "2026-12-02T10:05:00Z"));
        assert_eq!(done.code, Code::Success);
        assert_eq!(done.started_utc, NOW);
        assert_eq!(done.finished_utc.as_deref(), Some("2026-12-02T10:05:00Z"));
        // The same request again: nothing.
        assert_eq!(decide(Some(&r), Some(&done), &staged, NOW), Step::Idle);
        // A new request for what is staged or booted needs no work.
        let mut again: serde_json::Value = serde_json::from_str(&r).unwrap();
        again["operationId"] = "op-again".into();
        let again = again.to_string();
        assert_eq!(
            reported(decide(Some(&again), Some(&done), &staged, NOW)).code,
            Code::Success
        );
        let at = node("2.0.0", None, "passed");
        assert_eq!(
            reported(decide(Some(&again), Some(&done), &at, NOW)).code,
            Code::AlreadyAtTarget
        );
    }

    #[test]
    fn finalize_needs_the_target_staged_and_is_never_run_twice() {
        let r = req("finalize", Some("2.0.0"));
        let none = node("1.0.0", None, "not-needed");
        assert_eq!(
            reported(decide(Some(&r), None, &none, NOW)).code,
            Code::NotStaged
        );
        let other = node("1.0.0", Some(("3.0.0", false)), "not-needed");
        let s = reported(decide(Some(&r), None, &other, NOW));
        assert_eq!(s.code, Code::NotStaged);
        assert!(s.message.contains("3.0.0 is"), "{}", s.message);
        let staged = node("1.0.0", Some(("2.0.0", false)), "not-needed");
        let Step::Run(s, Action::Finalize) = decide(Some(&r), None, &staged, NOW) else {
            panic!()
        };
        // The agent died after tandemd set it next (the reboot is coming):
        // finalize is reported done, not asked again.
        let set = node("1.0.0", Some(("2.0.0", true)), "not-needed");
        let done = reported(decide(Some(&r), Some(&s), &set, NOW));
        assert_eq!(
            (done.operation, done.code),
            (StatusOperation::Finalize, Code::Success)
        );
        // Died before tandemd set it next: ask again (nothing happened yet).
        assert!(matches!(
            decide(Some(&r), Some(&s), &staged, NOW),
            Step::Run(_, Action::Finalize)
        ));
        // Waiting for the reboot, then for the health verdict.
        assert!(matches!(
            decide(Some(&r), Some(&done), &set, NOW),
            Step::Wait(_)
        ));
        let booted = node("2.0.0", None, "running");
        assert!(matches!(
            decide(Some(&r), Some(&done), &booted, NOW),
            Step::Wait(_)
        ));
        // Healthy: commit Success, then idle for good.
        let good = node("2.0.0", None, "passed");
        let c = reported(decide(Some(&r), Some(&done), &good, NOW));
        assert_eq!(
            (c.operation, c.code),
            (StatusOperation::Commit, Code::Success)
        );
        assert_eq!(c.operation_id, "op-finalize.commit");
        assert_eq!(c.from_version.as_deref(), Some("1.0.0"));
        assert_eq!(c.to_version.as_deref(), Some("2.0.0"));
        assert_eq!(decide(Some(&r), Some(&c), &good, NOW), Step::Idle);
        // And back on the old image later: still idle (no second commit).
        assert_eq!(decide(Some(&r), Some(&c), &none, NOW), Step::Idle);
    }

    #[test]
    fn a_failed_health_check_or_a_boot_that_never_happened_is_reverted() {
        let r = req("finalize", Some("2.0.0"));
        let staged = node("1.0.0", Some(("2.0.0", false)), "not-needed");
        let Step::Run(s, _) = decide(Some(&r), None, &staged, NOW) else {
            panic!()
        };
        let done = UpdateStatus {
            code: Code::Success,
            finished_utc: Some(NOW.into()),
            ..s
        };
        let failed = node("2.0.0", None, "failed");
        let c = reported(decide(Some(&r), Some(&done), &failed, NOW));
        assert_eq!(
            (c.operation, c.code),
            (StatusOperation::Commit, Code::RevertedToPrevious)
        );
        let mut back = node("1.0.0", None, "not-needed");
        back.blocked.insert("2.0.0".into(), "did not boot".into());
        let c = reported(decide(Some(&r), Some(&done), &back, NOW));
        assert_eq!(c.code, Code::RevertedToPrevious);
        assert!(c.message.contains("did not boot"), "{}", c.message);
    }

    #[test]
    fn malformed_requests_are_answered_once() {
        let bad = r#"{"schemaVersion":"1.0","nodeUpdateId":"3f2c1a9e-8b7d-4c6e-9f10-1234567890ab","operationId":"x","operation":"stage"}"#;
        let t = node("1.0.0", None, "not-needed");
        let s = reported(decide(Some(bad), None, &t, NOW));
        assert_eq!(s.code, Code::InvalidRequest);
        assert_eq!(s.operation_id, "x");
        assert_eq!(decide(Some(bad), Some(&s), &t, NOW), Step::Idle);
        assert_eq!(decide(None, Some(&s), &t, NOW), Step::Idle);
    }

    #[test]
    fn rollback_runs_once() {
        let r = req("rollback", None);
        let t = node("2.0.0", None, "passed");
        let Step::Run(s, Action::Rollback) = decide(Some(&r), None, &t, NOW) else {
            panic!()
        };
        assert_eq!(s.to_version, None);
        // Restarted after tandemd set the other slot next: done.
        let set = node("2.0.0", Some(("1.0.0", true)), "passed");
        assert_eq!(
            reported(decide(Some(&r), Some(&s), &set, NOW)).code,
            Code::Success
        );
        // Restarted after the reboot into the other slot: done too.
        let back = node("1.0.0", None, "not-needed");
        assert_eq!(
            reported(decide(Some(&r), Some(&s), &back, NOW)).code,
            Code::Success
        );
    }

    #[test]
    fn tandem_status_documents_are_read() {
        let doc = serde_json::json!({"booted_version": "1.0.0", "health": "passed",
            "staged": {"version": "2.0.0", "slot": "B", "time": "", "finalized": false},
            "operation": null, "blocked": {"3.0.0": "did not boot"}});
        let t = Tandem::from_status(&doc);
        assert_eq!(t.staged, Some(("2.0.0".into(), false)));
        assert!(!t.busy);
        assert_eq!(
            t.blocked.get("3.0.0").map(String::as_str),
            Some("did not boot")
        );
    }
}
