//! The tandem engine (library), `tandemd` and `updatectl`.
//!
//! - [`config`]: TOML configuration with drop-ins.
//! - [`machine`]: the update state machine (pure).
//! - [`state`]: the persisted state, history and lock in `/var/lib/tandem`.
//! - [`fetch`]: downloads that resume with `Range`, retries and mirrors.
//! - [`engine`]: the update steps, driven by `tandemd` and `--offline`.
//! - [`slotctl`]: the daemon-free slot view behind `updatectl slots`.

pub mod config;
pub mod engine;
pub mod fetch;
pub mod machine;
pub mod slotctl;
pub mod state;
