//! tandem's payloads: the signed file format, the delta planner and maker,
//! and the streaming, verifying applier. `FORMAT.md` specifies the format.
//!
//! - [`format`]: header, manifest and operation types, limits.
//! - [`validate`]: the manifest checks run before anything is written.
//! - [`sign`]: OpenPGP signing and verification (sequoia, pure Rust).
//! - [`container`]: reading and writing header, manifest and signature.
//! - [`plan`]: the planner's pure decisions; [`make`] does its I/O.
//! - [`bsdiff`]: the executable-friendly binary diff of `bsdiff` operations.
//! - [`recompress`]: zstd streams re-created on the node from a recipe.
//! - [`erofs`]: erofs images read (files and their lz4 extents), and the
//!   erofs operation that re-creates a compressed file on the node; its
//!   maker's side is `erofs_delta`.
//! - [`apply`]: streamed apply with checkpoints and read-back verification.
//! - [`digest`]: segmented SHA-256 of images, on every core.
//! - [`index`]: the signed release index and the choice of release.
//! - [`region`]: a slot's byte range inside a disk, for bounded I/O.
//! - [`failpoint`]: crash points for the crash-sweep tests (`TANDEM_FAILPOINT`).
//! - [`files`]: file length and atomic replacement.
//! - [`summary`]: operation counts and bytes, for `inspect` and benchmarks.
//! - [`verity`]: dm-verity hash trees: superblock, layout, verify, format.

pub mod apply;
pub mod bsdiff;
pub mod container;
pub mod digest;
pub mod erofs;
mod erofs_delta;
pub mod failpoint;
pub mod files;
pub mod format;
pub mod index;
pub mod make;
pub mod plan;
pub mod recompress;
pub mod region;
pub mod sign;
pub mod summary;
pub mod validate;
pub mod verity;

pub use apply::{
    apply, ApplyError, ApplyOptions, ApplyOutcome, Checkpoint, ComponentPaths, PayloadReader,
};
pub use container::{PayloadError, PayloadHead};
pub use format::Manifest;
pub use make::{make_payload, ImageInput, MakeError, MakeOptions};
pub use region::{ByteRange, Region};
pub use sign::{Keyring, SignError, SigningKey};
