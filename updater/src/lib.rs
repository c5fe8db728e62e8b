//! The tandem engine (library), `tandemd` and `updatectl`.
//!
//! So far it holds the daemon-free slot view behind `updatectl slots` and
//! the engine's configuration; the engine itself, the D-Bus API and the
//! daemon are being built in the "node daemon" issue.

pub mod config;
pub mod slotctl;
