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
    /// Written and verified in the inactive slot, not set to boot: an
    /// unplanned reboot still boots the running image (`updatectl stage`).
    Staged,
    UpdatedNeedReboot,
    ReportingError,
}

/// What waits when nothing is under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rest {
    /// Nothing staged.
    Nothing,
    /// An update is staged but not finalized (not set to boot).
    Staged,
    /// A finalized update waits for a reboot.
    NeedReboot,
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
            UpdateState::Staged => "staged",
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
    pub fn resting(rest: Rest) -> UpdateState {
        match rest {
            Rest::Nothing => UpdateState::Idle,
            Rest::Staged => UpdateState::Staged,
            Rest::NeedReboot => UpdateState::UpdatedNeedReboot,
        }
    }
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    CheckStarted,
    /// The check found nothing newer; `rest` says what waits.
    UpToDate {
        rest: Rest,
    },
    UpdateFound,
    /// Writing the inactive slot starts (the slot's boot state was cleared).
    ApplyStarted,
    /// Every byte is written; reading back starts.
    Written,
    /// The slot read back equal to the manifest; the boot entry is next.
    Verified,
    /// The slot is verified and its boot files are installed; with
    /// `finalized` it is also set to boot next.
    Staged {
        finalized: bool,
    },
    /// A staged update is set to boot next (`updatectl finalize`).
    Finalized,
    Failed,
    /// The error is recorded; rest again.
    ErrorReported {
        rest: Rest,
    },
    /// A person stopped the work; `rest` says whether an earlier staged
    /// update still stands (it does unless the slot was already cleared).
    Cancelled {
        rest: Rest,
    },
    /// Boot entries changed outside an update (a rollback set, a staged
    /// update found not to have booted, a slot marked): rest again, with
    /// or without something waiting.
    BootChanged {
        rest: Rest,
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
        (S::Checking, Event::UpToDate { rest }) => S::resting(rest),
        (S::Checking, Event::UpdateFound) => S::UpdateAvailable,
        (s, Event::ApplyStarted) if resting(s) || s == S::Checking => S::Downloading,
        (S::Downloading, Event::Written) => S::Verifying,
        (S::Verifying, Event::Verified) => S::Finalizing,
        (S::Finalizing, Event::Staged { finalized: true }) => S::UpdatedNeedReboot,
        (S::Finalizing, Event::Staged { finalized: false }) => S::Staged,
        (s, Event::Finalized) if resting(s) && s != S::ReportingError => S::UpdatedNeedReboot,
        (s, Event::Failed) if s.is_busy() => S::ReportingError,
        (S::ReportingError, Event::ErrorReported { rest }) => S::resting(rest),
        (s, Event::Cancelled { rest }) if s.is_busy() => S::resting(rest),
        (s, Event::BootChanged { rest }) if resting(s) && s != S::ReportingError => {
            S::resting(rest)
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
            Event::Staged { finalized: true },
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
            for finalized in [true, false] {
                assert!(next(from, Event::Staged { finalized }).is_err(), "{from:?}");
            }
        }
        // Finalizing (setting a staged slot next) only at rest.
        for from in [
            S::Checking,
            S::Downloading,
            S::Verifying,
            S::Finalizing,
            S::ReportingError,
        ] {
            assert!(next(from, Event::Finalized).is_err(), "{from:?}");
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
            next(
                s,
                Event::ErrorReported {
                    rest: Rest::Nothing
                }
            )
            .unwrap(),
            S::Idle
        );
        assert_eq!(
            next(
                s,
                Event::ErrorReported {
                    rest: Rest::NeedReboot
                }
            )
            .unwrap(),
            S::UpdatedNeedReboot
        );
        assert!(next(S::Downloading, Event::ApplyStarted).is_err());
        assert!(next(S::Downloading, Event::CheckStarted).is_err());
        assert!(next(S::Idle, Event::Failed).is_err());
        assert_eq!(
            run(&[
                Event::ApplyStarted,
                Event::Cancelled {
                    rest: Rest::Nothing
                }
            ])
            .unwrap(),
            S::Idle
        );
        // A check while an update waits for its reboot comes back to it.
        let s = next(S::UpdatedNeedReboot, Event::CheckStarted).unwrap();
        assert_eq!(
            next(
                s,
                Event::UpToDate {
                    rest: Rest::NeedReboot
                }
            )
            .unwrap(),
            S::UpdatedNeedReboot
        );
    }

    #[test]
    fn stage_then_finalize_rests_in_staged_then_needs_a_reboot() {
        let s = run(&[
            Event::ApplyStarted,
            Event::Written,
            Event::Verified,
            Event::Staged { finalized: false },
        ])
        .unwrap();
        assert_eq!(s, S::Staged);
        assert!(!s.is_busy());
        // A check while staged comes back to staged.
        let c = next(s, Event::CheckStarted).unwrap();
        assert_eq!(
            next(c, Event::UpToDate { rest: Rest::Staged }).unwrap(),
            S::Staged
        );
        assert_eq!(next(s, Event::Finalized).unwrap(), S::UpdatedNeedReboot);
        assert_eq!(
            next(
                S::ReportingError,
                Event::ErrorReported { rest: Rest::Staged }
            )
            .unwrap(),
            S::Staged
        );
    }

    #[test]
    fn boot_changes_happen_only_at_rest() {
        assert_eq!(
            next(
                S::Idle,
                Event::BootChanged {
                    rest: Rest::NeedReboot
                }
            )
            .unwrap(),
            S::UpdatedNeedReboot
        );
        assert_eq!(
            next(
                S::UpdatedNeedReboot,
                Event::BootChanged {
                    rest: Rest::Nothing
                }
            )
            .unwrap(),
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
                next(
                    from,
                    Event::BootChanged {
                        rest: Rest::NeedReboot
                    }
                )
                .is_err(),
                "{from:?}"
            );
        }
    }

    #[test]
    fn states_serialize_as_their_names() {
        for s in [
            S::Idle,
            S::UpdateAvailable,
            S::Staged,
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
