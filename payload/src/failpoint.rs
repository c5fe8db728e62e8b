//! Crash points for the crash-sweep tests. `TANDEM_FAILPOINT=NAME:N` in
//! the environment makes the process kill itself with SIGKILL the Nth
//! time (1-based) it passes the point NAME, exactly as an outside
//! `kill -9` at that moment would. Unset (as on every node), a point costs
//! one check of a value read once.
//!
//! Points: `apply-op` (before each operation is handed to the workers),
//! `apply-checkpoint` (after each periodic checkpoint is stored),
//! `apply-readback` (before each segment of the target is read back),
//! `apply-verified` (after the read-back matched, before the apply
//! returns); the engine adds `before-flip` (the slot verified, its boot
//! entry not yet changed) and `after-flip` (set to boot next, the state
//! not yet recorded).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable that arms one point.
pub const ENV: &str = "TANDEM_FAILPOINT";

static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

/// `NAME:N` → the point and its count. Pure.
pub fn parse(spec: &str) -> Option<(String, u64)> {
    let (name, n) = spec.rsplit_once(':')?;
    let n: u64 = n.parse().ok()?;
    (!name.is_empty() && n > 0).then(|| (name.to_owned(), n))
}

/// Passes the point `name`: dies here if it is armed and this is its Nth
/// pass.
pub fn hit(name: &str) {
    let armed = ARMED.get_or_init(|| std::env::var(ENV).ok().and_then(|s| parse(&s)));
    let Some((point, n)) = armed else { return };
    if point != name {
        return;
    }
    if HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n {
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        // SIGKILL cannot be caught; should the call fail, stop anyway.
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_point_is_a_name_and_a_positive_count() {
        assert_eq!(parse("apply-op:3"), Some(("apply-op".into(), 3)));
        assert_eq!(parse("before-flip:1"), Some(("before-flip".into(), 1)));
        assert_eq!(parse("apply-op:0"), None);
        assert_eq!(parse("apply-op"), None);
        assert_eq!(parse(":2"), None);
        assert_eq!(parse("apply-op:x"), None);
    }
}
