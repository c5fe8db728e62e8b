//! Prometheus metrics in the text exposition format (version 0.0.4), made
//! from the status document. Pure.

use std::fmt::Write;

use crate::api::Status;
use crate::config::Config;
use crate::machine::UpdateState;

const STATES: [UpdateState; 9] = [
    UpdateState::Idle,
    UpdateState::Checking,
    UpdateState::UpdateAvailable,
    UpdateState::Downloading,
    UpdateState::Verifying,
    UpdateState::Finalizing,
    UpdateState::Staged,
    UpdateState::UpdatedNeedReboot,
    UpdateState::ReportingError,
];

/// Failure kinds counted (`failures/<kind>`), shown even at zero.
const FAILURE_KINDS: [&str; 3] = ["refused", "failed", "health"];
/// Rollback reasons counted (`rollbacks/<reason>`).
const ROLLBACK_REASONS: [&str; 3] = ["did-not-boot", "health-check", "manual"];

/// A label value, escaped as the format says.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn seconds(time: &str) -> Option<i64> {
    time.parse::<jiff::Timestamp>().ok().map(|t| t.as_second())
}

/// The metrics for a status. Pure.
pub fn render(s: &Status, config: &Config) -> String {
    let mut out = String::new();
    header(
        &mut out,
        "tandem_info",
        "gauge",
        "The booted version and slot, and the reboot strategy (always 1).",
    );
    let _ = writeln!(
        out,
        "tandem_info{{booted_version=\"{}\",booted_slot=\"{}\",staged_version=\"{}\",reboot_strategy=\"{}\"}} 1",
        label(s.booted_version.as_deref().unwrap_or("")),
        s.booted.as_ref().map(|b| b.slot.to_string()).unwrap_or_default(),
        label(s.staged.as_ref().map_or("", |st| st.version.as_str())),
        config.reboot.strategy.as_str()
    );
    header(
        &mut out,
        "tandem_state",
        "gauge",
        "The update engine's state (1 for the current one).",
    );
    for state in STATES {
        let _ = writeln!(
            out,
            "tandem_state{{state=\"{}\"}} {}",
            state.as_str(),
            u8::from(state == s.state)
        );
    }
    header(
        &mut out,
        "tandem_reboot_required",
        "gauge",
        "1 when a staged update waits for a reboot.",
    );
    let _ = writeln!(
        out,
        "tandem_reboot_required {}",
        u8::from(s.reboot_required)
    );
    header(
        &mut out,
        "tandem_booted_slot_good",
        "gauge",
        "1 when the booted slot is marked good.",
    );
    let good = s
        .booted
        .as_ref()
        .is_some_and(|b| b.status == bootconfig::gptprio::SlotStatus::Good);
    let _ = writeln!(out, "tandem_booted_slot_good {}", u8::from(good));
    if let Some(t) = s.last_check.as_ref().and_then(|c| seconds(&c.time)) {
        header(
            &mut out,
            "tandem_last_check_timestamp_seconds",
            "gauge",
            "When the release index was last checked (Unix time).",
        );
        let _ = writeln!(out, "tandem_last_check_timestamp_seconds {t}");
    }
    let counter = |key: &str| s.counters.get(key).copied().unwrap_or(0);
    header(
        &mut out,
        "tandem_failures_total",
        "counter",
        "Failed operations by kind (refused index or payload, other failures, health checks).",
    );
    for kind in FAILURE_KINDS {
        let _ = writeln!(
            out,
            "tandem_failures_total{{kind=\"{kind}\"}} {}",
            counter(&format!("failures/{kind}"))
        );
    }
    header(
        &mut out,
        "tandem_rollbacks_total",
        "counter",
        "Rollbacks by reason.",
    );
    for reason in ROLLBACK_REASONS {
        let _ = writeln!(
            out,
            "tandem_rollbacks_total{{reason=\"{reason}\"}} {}",
            counter(&format!("rollbacks/{reason}"))
        );
    }
    header(
        &mut out,
        "tandem_updates_staged_total",
        "counter",
        "Updates written, verified and set to boot next.",
    );
    let _ = writeln!(out, "tandem_updates_staged_total {}", counter("staged"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(seconds("1970-01-01T00:01:40Z"), Some(100));
    }
}
