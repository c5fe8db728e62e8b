//! The tandem engine (library), `tandemd` and `updatectl`.
//!
//! So far it holds the daemon-free slot view behind `updatectl slots`; the
//! engine, D-Bus API and daemon arrive with the "node daemon" issue.

pub mod slotctl;
