//! `tandem-release`: making, signing, inspecting and applying payloads.
//!
//! Not built yet: the CLI arrives with the "Signed payloads" issue, as a thin
//! layer over the `payload` crate. Empty on purpose.
