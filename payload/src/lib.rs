//! The signed payload format and the release index.
//!
//! Not built yet: this crate is filled by the "Signed payloads" issue. It is
//! an empty library on purpose, so that nothing pretends to work.
