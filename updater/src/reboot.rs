//! When and how a staged update reboots the node: the strategies' pure
//! decisions (maintenance windows, what to do next), the fleetlock client
//! (the protocol Zincati speaks to Airlock and fleetlock servers), and the
//! reboot actions.

use std::time::{Duration, SystemTime};

use jiff::civil::Weekday;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, ToSpan, ZonedDateTime};

use crate::config::{self, RebootStrategy};

/// The longest wait between two tries of a refused lock or reboot.
pub const MAX_RETRY: Duration = Duration::from_secs(600);

/// A weekly maintenance window, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaintenanceWindow {
    /// Monday first.
    pub days: [bool; 7],
    /// Minutes after local midnight.
    pub start_minute: i32,
    pub length: SignedDuration,
}

fn parse_day(text: &str) -> Option<Weekday> {
    let t = text.trim().to_ascii_lowercase();
    let days = [
        ("mon", Weekday::Monday),
        ("tue", Weekday::Tuesday),
        ("wed", Weekday::Wednesday),
        ("thu", Weekday::Thursday),
        ("fri", Weekday::Friday),
        ("sat", Weekday::Saturday),
        ("sun", Weekday::Sunday),
    ];
    days.iter().find_map(|(short, day)| {
        let full_ok = t.len() >= 3 && t.starts_with(short) && {
            let full = format!("{day:?}").to_ascii_lowercase();
            full.starts_with(&t)
        };
        full_ok.then_some(*day)
    })
}

/// Parses one configured window. Pure.
pub fn parse_window(w: &config::Window) -> Result<MaintenanceWindow, String> {
    if w.days.is_empty() {
        return Err("a reboot window needs at least one day".into());
    }
    let mut days = [false; 7];
    for d in &w.days {
        let day = parse_day(d).ok_or_else(|| {
            format!("reboot window day {d:?} is not a weekday (Mon, Tue, ... Sun)")
        })?;
        days[usize::try_from(day.to_monday_zero_offset()).unwrap_or(0)] = true;
    }
    let (h, m) = w
        .start
        .split_once(':')
        .and_then(|(h, m)| Some((h.parse::<i32>().ok()?, m.parse::<i32>().ok()?)))
        .filter(|(h, m)| (0..24).contains(h) && (0..60).contains(m))
        .ok_or_else(|| format!("reboot window start {:?} is not HH:MM", w.start))?;
    if w.length_minutes == 0 || w.length_minutes > 7 * 24 * 60 {
        return Err(format!(
            "reboot window length_minutes {} must be between 1 and one week",
            w.length_minutes
        ));
    }
    Ok(MaintenanceWindow {
        days,
        start_minute: h * 60 + m,
        length: SignedDuration::from_mins(i64::try_from(w.length_minutes).unwrap_or(0)),
    })
}

/// The time zone windows are read in.
pub fn time_zone(name: &str) -> Result<TimeZone, String> {
    match name {
        "UTC" | "utc" => Ok(TimeZone::UTC),
        "localtime" => TimeZone::try_system().map_err(|e| format!("the system time zone: {e}")),
        name => TimeZone::get(name).map_err(|e| format!("time zone {name:?}: {e}")),
    }
}

/// Checks the reboot settings the strategy needs. Pure but for reading the
/// time zone database.
pub fn validate(r: &config::Reboot) -> Result<(), String> {
    let windows = r
        .windows
        .iter()
        .map(parse_window)
        .collect::<Result<Vec<_>, _>>()?;
    time_zone(&r.time_zone)?;
    match r.strategy {
        RebootStrategy::Window if windows.is_empty() => {
            Err("reboot.strategy = \"window\" needs at least one [[reboot.windows]]".into())
        }
        RebootStrategy::Fleetlock if r.fleetlock_url.is_none() => {
            Err("reboot.strategy = \"fleetlock\" needs reboot.fleetlock_url".into())
        }
        _ => Ok(()),
    }
}

/// Whether a window is open now, or when the next one opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowState {
    Open {
        closes: Timestamp,
    },
    Closed {
        opens: Timestamp,
    },
    /// No window has a day (cannot happen after [`parse_window`]).
    Never,
}

/// The window state at `now` (in the windows' time zone). Windows may run
/// past midnight; a start that falls in a DST gap moves later, as a wall
/// clock does. Pure.
pub fn window_state(now: &ZonedDateTime, windows: &[MaintenanceWindow]) -> WindowState {
    let tz = now.time_zone().clone();
    let today = now.date();
    let now_ts = now.timestamp();
    let mut next: Option<Timestamp> = None;
    let mut open_until: Option<Timestamp> = None;
    // A window of up to a week that started up to 7 days ago may still be
    // open; the next start is at most 7 days away.
    for offset in -8i32..=8 {
        let Ok(date) = today.checked_add(offset.days()) else {
            continue;
        };
        let weekday = usize::try_from(date.weekday().to_monday_zero_offset()).unwrap_or(0);
        for w in windows.iter().filter(|w| w.days[weekday]) {
            let (h, m) = (w.start_minute / 60, w.start_minute % 60);
            let (Ok(h), Ok(m)) = (i8::try_from(h), i8::try_from(m)) else {
                continue;
            };
            let Ok(start) = date.at(h, m, 0, 0).to_zoned_datetime(tz.clone()) else {
                continue;
            };
            let start = start.timestamp();
            let Ok(end) = start.checked_add(w.length) else {
                continue;
            };
            if start <= now_ts && now_ts < end {
                open_until = Some(open_until.map_or(end, |e| e.max(end)));
            } else if start > now_ts {
                next = Some(next.map_or(start, |n| n.min(start)));
            }
        }
    }
    match (open_until, next) {
        (Some(closes), _) => WindowState::Open { closes },
        (None, Some(opens)) => WindowState::Closed { opens },
        (None, None) => WindowState::Never,
    }
}

/// What the reboot strategy says to do about a staged update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebootPlan {
    /// Reboot now (after taking the fleet lock, for `fleetlock`).
    Reboot,
    /// Ask again at this time; `why` is shown in the status.
    WaitUntil { at: SystemTime, why: String },
    /// Leave the reboot to a person or the operator.
    LeaveToOperator { why: String },
}

/// The plan for a staged update at `now`. Pure.
pub fn plan(
    strategy: RebootStrategy,
    now: &ZonedDateTime,
    windows: &[MaintenanceWindow],
) -> RebootPlan {
    match strategy {
        RebootStrategy::Immediate | RebootStrategy::Fleetlock => RebootPlan::Reboot,
        RebootStrategy::Off => RebootPlan::LeaveToOperator {
            why: "reboot strategy off: reboot when convenient".into(),
        },
        RebootStrategy::Kubernetes => RebootPlan::LeaveToOperator {
            why: "reboot strategy kubernetes: the operator drains and reboots the node".into(),
        },
        RebootStrategy::Window => match window_state(now, windows) {
            WindowState::Open { .. } => RebootPlan::Reboot,
            WindowState::Closed { opens } => RebootPlan::WaitUntil {
                at: SystemTime::try_from(opens).unwrap_or(SystemTime::UNIX_EPOCH),
                why: format!(
                    "waiting for the maintenance window at {}",
                    ZonedDateTime::new(opens, now.time_zone().clone())
                ),
            },
            WindowState::Never => RebootPlan::LeaveToOperator {
                why: "no maintenance window has a day".into(),
            },
        },
    }
}

/// The wait before try `n` (0-based) of something refused: `first`,
/// doubling, at most [`MAX_RETRY`]. Pure.
pub fn backoff(first: Duration, n: u32) -> Duration {
    let first = first.max(Duration::from_secs(1));
    first
        .checked_mul(1u32 << n.min(16))
        .unwrap_or(MAX_RETRY)
        .min(MAX_RETRY)
}

/// Something that reboots the node.
pub trait Rebooter: Send + Sync {
    /// Asks for the reboot; `Err` when it was refused (an inhibitor, a
    /// failing command) and should be asked again later.
    fn reboot(&self, why: &str) -> Result<(), String>;
}

/// Runs the configured command (a test points it at a recorder).
#[derive(Debug, Clone)]
pub struct CommandRebooter {
    pub command: Vec<String>,
}

impl Rebooter for CommandRebooter {
    fn reboot(&self, why: &str) -> Result<(), String> {
        let (program, args) = self
            .command
            .split_first()
            .ok_or_else(|| "reboot.command is empty".to_string())?;
        let out = std::process::Command::new(program)
            .args(args)
            .env("TANDEM_REBOOT_REASON", why)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("{program}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} {}: {}",
                self.command.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

/// Why a fleetlock request failed.
#[derive(Debug, thiserror::Error)]
pub enum FleetlockError {
    #[error("fleetlock {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("fleetlock {url} answered {status}: {body}")]
    Refused {
        url: String,
        status: u16,
        body: String,
    },
}

/// A fleetlock client: `POST {base}/v1/pre-reboot` takes a reboot slot,
/// `POST {base}/v1/steady-state` gives it back.
#[derive(Debug, Clone)]
pub struct Fleetlock {
    pub base: String,
    pub id: String,
    pub group: String,
}

impl Fleetlock {
    /// The request body. Pure.
    pub fn body(&self) -> String {
        serde_json::json!({
            "client_params": { "id": self.id, "group": self.group }
        })
        .to_string()
    }

    fn post(&self, path: &str) -> Result<(), FleetlockError> {
        let url = format!("{}/{path}", self.base.trim_end_matches('/'));
        let unreachable = |message: String| FleetlockError::Unreachable {
            url: url.clone(),
            message,
        };
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| unreachable(e.to_string()))?;
        let response = client
            .post(&url)
            .header("fleet-lock-protocol", "true")
            .header("content-type", "application/json")
            .body(self.body())
            .send()
            .map_err(|e| unreachable(crate::fetch::describe(&e)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = response.text().unwrap_or_default();
        Err(FleetlockError::Refused {
            url,
            status: status.as_u16(),
            body: body.chars().take(500).collect::<String>().trim().to_owned(),
        })
    }

    /// Takes (or confirms holding) a reboot slot.
    pub fn pre_reboot(&self) -> Result<(), FleetlockError> {
        self.post("v1/pre-reboot")
    }

    /// Gives the slot back once the node is healthy again.
    pub fn steady_state(&self) -> Result<(), FleetlockError> {
        self.post("v1/steady-state")
    }
}

/// The node's id for fleetlock: derived from the machine id (which should
/// not leave the node), like systemd's app-specific ids. Pure.
pub fn fleetlock_id(machine_id: &str) -> String {
    let digest =
        payload::digest::sha256(format!("tandem-fleetlock:{}", machine_id.trim()).as_bytes());
    digest.to_string()[..32].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    fn window(days: &[&str], start: &str, minutes: u64) -> MaintenanceWindow {
        parse_window(&config::Window {
            days: days.iter().map(|d| d.to_string()).collect(),
            start: start.into(),
            length_minutes: minutes,
        })
        .unwrap()
    }

    fn at(tz: &TimeZone, y: i16, mo: i8, d: i8, h: i8, mi: i8) -> ZonedDateTime {
        date(y, mo, d)
            .at(h, mi, 0, 0)
            .to_zoned_datetime(tz.clone())
            .unwrap()
    }

    #[test]
    fn windows_open_close_and_run_past_midnight() {
        let utc = TimeZone::UTC;
        // 2026-11-24 is a Tuesday.
        let w = [window(&["Tue", "thursday"], "22:30", 120)];
        let s = window_state(&at(&utc, 2026, 11, 24, 22, 29), &w);
        assert_eq!(
            s,
            WindowState::Closed {
                opens: at(&utc, 2026, 11, 24, 22, 30).timestamp()
            }
        );
        // Open at the start, still open after midnight, closed at the end.
        let open = WindowState::Open {
            closes: at(&utc, 2026, 11, 25, 0, 30).timestamp(),
        };
        assert_eq!(window_state(&at(&utc, 2026, 11, 24, 22, 30), &w), open);
        assert_eq!(window_state(&at(&utc, 2026, 11, 25, 0, 29), &w), open);
        assert_eq!(
            window_state(&at(&utc, 2026, 11, 25, 0, 30), &w),
            WindowState::Closed {
                opens: at(&utc, 2026, 11, 26, 22, 30).timestamp()
            }
        );
        // From Friday the next is Tuesday.
        assert_eq!(
            window_state(&at(&utc, 2026, 11, 27, 12, 0), &w),
            WindowState::Closed {
                opens: at(&utc, 2026, 12, 1, 22, 30).timestamp()
            }
        );
    }

    #[test]
    fn windows_follow_the_time_zone_across_dst() {
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        // 2026-03-29 (Sunday): clocks jump from 02:00 to 03:00.
        let w = [window(&["Sun"], "02:30", 60)];
        match window_state(&at(&berlin, 2026, 3, 28, 12, 0), &w) {
            WindowState::Closed { opens } => {
                // 02:30 does not exist that day; the window opens at 03:30
                // local (01:30 UTC), as a wall clock would.
                assert_eq!(opens.to_string(), "2026-03-29T01:30:00Z");
            }
            other => panic!("{other:?}"),
        }
        // A summer window at 02:30 local is 00:30 UTC.
        match window_state(&at(&berlin, 2026, 7, 1, 12, 0), &w) {
            WindowState::Closed { opens } => assert_eq!(opens.to_string(), "2026-07-05T00:30:00Z"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_windows_and_missing_settings_are_refused() {
        let bad = |days: &[&str], start: &str, len: u64| {
            parse_window(&config::Window {
                days: days.iter().map(|d| d.to_string()).collect(),
                start: start.into(),
                length_minutes: len,
            })
            .unwrap_err()
        };
        assert!(bad(&["Mo"], "01:00", 60).contains("\"Mo\""));
        assert!(bad(&["Funday"], "01:00", 60).contains("Funday"));
        assert!(bad(&["Mon"], "24:00", 60).contains("HH:MM"));
        assert!(bad(&["Mon"], "1am", 60).contains("HH:MM"));
        assert!(bad(&["Mon"], "01:00", 0).contains("length"));
        assert!(bad(&[], "01:00", 10).contains("day"));
        let mut r = config::Reboot {
            strategy: RebootStrategy::Window,
            ..config::Reboot::default()
        };
        assert!(validate(&r).unwrap_err().contains("reboot.windows"));
        r.strategy = RebootStrategy::Fleetlock;
        assert!(validate(&r).unwrap_err().contains("fleetlock_url"));
        r.fleetlock_url = Some("http://127.0.0.1:1".into());
        r.time_zone = "Mars/Olympus".into();
        assert!(validate(&r).unwrap_err().contains("Mars/Olympus"));
    }

    #[test]
    fn plans_follow_the_strategy() {
        let utc = TimeZone::UTC;
        let now = at(&utc, 2026, 11, 24, 12, 0);
        let w = [window(&["Wed"], "03:00", 60)];
        assert_eq!(
            plan(RebootStrategy::Immediate, &now, &w),
            RebootPlan::Reboot
        );
        assert_eq!(
            plan(RebootStrategy::Fleetlock, &now, &w),
            RebootPlan::Reboot
        );
        assert!(matches!(
            plan(RebootStrategy::Off, &now, &w),
            RebootPlan::LeaveToOperator { .. }
        ));
        assert!(matches!(
            plan(RebootStrategy::Kubernetes, &now, &w),
            RebootPlan::LeaveToOperator { .. }
        ));
        match plan(RebootStrategy::Window, &now, &w) {
            RebootPlan::WaitUntil { at: t, why } => {
                assert_eq!(
                    t,
                    SystemTime::try_from(at(&utc, 2026, 11, 25, 3, 0).timestamp()).unwrap()
                );
                assert!(why.contains("2026-11-25T03:00:00"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        let inside = at(&utc, 2026, 11, 25, 3, 59);
        assert_eq!(
            plan(RebootStrategy::Window, &inside, &w),
            RebootPlan::Reboot
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let s = Duration::from_secs;
        assert_eq!(backoff(s(30), 0), s(30));
        assert_eq!(backoff(s(30), 1), s(60));
        assert_eq!(backoff(s(30), 4), s(480));
        assert_eq!(backoff(s(30), 5), MAX_RETRY);
        assert_eq!(backoff(s(30), 40), MAX_RETRY);
    }

    #[test]
    fn fleetlock_body_and_id() {
        let f = Fleetlock {
            base: "http://127.0.0.1:1".into(),
            id: fleetlock_id("0123456789abcdef0123456789abcdef\n"),
            group: "workers".into(),
        };
        assert_eq!(f.id.len(), 32);
        assert!(!f.id.contains("0123456789abcdef"));
        let v: serde_json::Value = serde_json::from_str(&f.body()).unwrap();
        assert_eq!(v["client_params"]["group"], "workers");
        assert_eq!(v["client_params"]["id"], f.id.as_str());
    }
}
