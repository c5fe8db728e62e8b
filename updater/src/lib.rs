//! The tandem engine (library), `tandemd` and `updatectl`.
//!
//! - [`api`]: requests, reports and the status document.
//! - [`cli`]: the clap definitions of `updatectl` and `tandemd`.
//! - [`client`]: `updatectl`'s daemon commands (D-Bus or `--offline`).
//! - [`config`]: TOML configuration with drop-ins.
//! - [`machine`]: the update state machine (pure).
//! - [`state`]: the persisted state, history and lock in `/var/lib/tandem`.
//! - [`fetch`]: downloads that resume with `Range`, retries and mirrors.
//! - [`engine`]: the update steps, driven by `tandemd` and `--offline`,
//!   and after the reboot the boot assessment, rollback and reboots.
//! - [`health`]: the health checks (units, `health.d`, HTTP probes).
//! - [`reboot`]: reboot strategies (windows, fleetlock) and actions.
//! - [`log`]: the journal's native protocol, MESSAGE_IDs; stderr otherwise.
//! - [`metrics`]: Prometheus text-format metrics.
//! - [`notify`]: readiness and status for systemd.
//! - [`slotctl`]: the daemon-free slot view behind `updatectl slots`.

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod engine;
pub mod fetch;
pub mod health;
pub mod log;
pub mod machine;
pub mod metrics;
pub mod notify;
pub mod reboot;
pub mod slotctl;
pub mod state;

/// The D-Bus names of the daemon.
pub mod bus {
    /// Bus name and interface.
    pub const NAME: &str = "org.tandem.Update1";
    pub const PATH: &str = "/org/tandem/Update1";
}
