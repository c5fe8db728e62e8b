//! The update state machine: update_engine's states, which operators know,
//! and the only transitions between them. Pure: the engine asks it before
//! every step and persists what it answers.

use serde::{Deserialize, Serialize};

/// Where the engine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateState {
    Idle,
    Checking,
    UpdateAvailable,
    Downloading,
    Verifying,
    Finalizing,
    UpdatedNeedReboot,
    ReportingError,
}

impl UpdateState {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateState::Idle => "idle",
            UpdateState::Checking => "checking",
            UpdateState::UpdateAvailable => "update-available",
            UpdateState::Downloading => "downloading",
            UpdateState::Verifying => "verifying",
            UpdateState::Finalizing => "finalizing",
            UpdateState::UpdatedNeedReboot => "updated-need-reboot",
            UpdateState::ReportingError => "reporting-error",
        }
    }

    /// Whether work is under way (a crash here leaves something to resume
    /// or to clean up).
    pub fn is_busy(self) -> bool {
        matches!(
            self,
            UpdateState::Checking
                | UpdateState::Downloading
                | UpdateState::Verifying
                | UpdateState::Finalizing
        )
    }

    /// The state to rest in when nothing is under way.
    pub fn resting(staged: bool) -> UpdateState {
        if staged {
            UpdateState::UpdatedNeedReboot
        } else {
            UpdateState::Idle
        }
    }
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    CheckStarted,
    /// The check found nothing newer; `staged` says whether an update
    /// waits for a reboot.
    UpToDate {
        staged: bool,
    },
    UpdateFound,
    /// Writing the inactive slot starts (the slot's boot state was cleared).
    ApplyStarted,
    /// Every byte is written; reading back starts.
    Written,
    /// The slot read back equal to the manifest; the boot entry is next.
    Verified,
    /// The slot is set to boot next.
    Staged,
    Failed,
    /// The error is recorded; rest again.
    ErrorReported {
        staged: bool,
    },
    /// A person stopped the work; `staged` says whether an earlier staged
    /// update still stands (it does unless the slot was already cleared).
    Cancelled {
        staged: bool,
    },
    /// Boot entries changed outside an update (a rollback set, a staged
    /// update found not to have booted, a slot marked): rest again, with
    /// or without something waiting for a reboot.
    BootChanged {
        staged: bool,
    },
}

/// A transition the machine does not allow: a bug in the engine, reported
/// rather than followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no transition from {} on {event:?}", from.as_str())]
pub struct BadTransition {
    pub from: UpdateState,
    pub event: Event,
}

/// The state after `event` in `from`.
pub fn next(from: UpdateState, event: Event) -> Result<UpdateState, BadTransition> {
    use UpdateState as S;
    let resting = |s: S| !s.is_busy();
    let to = match (from, event) {
        (s, Event::CheckStarted) if resting(s) => S::Checking,
        (S::Checking, Event::UpToDate { staged }) => S::resting(staged),
        (S::Checking, Event::UpdateFound) => S::UpdateAvailable,
        (s, Event::ApplyStarted) if resting(s) || s == S::Checking => S::Downloading,
        (S::Downloading, Event::Written) => S::Verifying,
        (S::Verifying, Event::Verified) => S::Finalizing,
        (S::Finalizing, Event::Staged) => S::UpdatedNeedReboot,
        (s, Event::Failed) if s.is_busy() => S::ReportingError,
        (S::ReportingError, Event::ErrorReported { staged }) => S::resting(staged),
        (s, Event::Cancelled { staged }) if s.is_busy() => S::resting(staged),
        (s, Event::BootChanged { staged }) if resting(s) && s != S::ReportingError => {
            S::resting(staged)
        }
        (from, event) => return Err(BadTransition { from, event }),
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use UpdateState as S;

    fn run(events: &[Event]) -> Result<S, BadTransition> {
        events.iter().try_fold(S::Idle, |s, &e| next(s, e))
    }

    #[test]
    fn a_whole_update_walks_update_engines_states_in_order() {
        let mut s = S::Idle;
        let mut seen = vec![s];
        for e in [
            Event::CheckStarted,
            Event::UpdateFound,
            Event::ApplyStarted,
            Event::Written,
            Event::Verified,
            Event::Staged,
        ] {
            s = next(s, e).unwrap();
            seen.push(s);
        }
        let names: Vec<&str> = seen.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "idle",
                "checking",
                "update-available",
                "downloading",
                "verifying",
                "finalizing",
                "updated-need-reboot"
            ]
        );
    }

    #[test]
    fn the_boot_entry_cannot_be_reached_without_verifying() {
        // Staged only from finalizing, finalizing only from verifying.
        for from in [S::Idle, S::Checking, S::Downloading, S::Verifying] {
            assert!(next(from, Event::Staged).is_err(), "{from:?}");
        }
        for from in [S::Idle, S::Downloading, S::Finalizing] {
            assert!(next(from, Event::Verified).is_err(), "{from:?}");
        }
        assert!(run(&[Event::ApplyStarted, Event::Verified]).is_err());
    }

    #[test]
    fn failures_report_then_rest_and_work_cannot_start_twice() {
        let s = run(&[Event::ApplyStarted, Event::Failed]).unwrap();
        assert_eq!(s, S::ReportingError);
        assert_eq!(
            next(s, Event::ErrorReported { staged: false }).unwrap(),
            S::Idle
        );
        assert_eq!(
            next(s, Event::ErrorReported { staged: true }).unwrap(),
            S::UpdatedNeedReboot
        );
        assert!(next(S::Downloading, Event::ApplyStarted).is_err());
        assert!(next(S::Downloading, Event::CheckStarted).is_err());
        assert!(next(S::Idle, Event::Failed).is_err());
        assert_eq!(
            run(&[Event::ApplyStarted, Event::Cancelled { staged: false }]).unwrap(),
            S::Idle
        );
        // A check while an update waits for its reboot comes back to it.
        let s = next(S::UpdatedNeedReboot, Event::CheckStarted).unwrap();
        assert_eq!(
            next(s, Event::UpToDate { staged: true }).unwrap(),
            S::UpdatedNeedReboot
        );
    }

    #[test]
    fn boot_changes_happen_only_at_rest() {
        assert_eq!(
            next(S::Idle, Event::BootChanged { staged: true }).unwrap(),
            S::UpdatedNeedReboot
        );
        assert_eq!(
            next(S::UpdatedNeedReboot, Event::BootChanged { staged: false }).unwrap(),
            S::Idle
        );
        for from in [
            S::Checking,
            S::Downloading,
            S::Verifying,
            S::Finalizing,
            S::ReportingError,
        ] {
            assert!(
                next(from, Event::BootChanged { staged: true }).is_err(),
                "{from:?}"
            );
        }
    }

    #[test]
    fn states_serialize_as_their_names() {
        for s in [
            S::Idle,
            S::UpdateAvailable,
            S::UpdatedNeedReboot,
            S::ReportingError,
        ] {
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
    }
}
