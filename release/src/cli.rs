//! `tandem-release`'s command line (clap definitions), in the library so
//! that `cargo xtask man` generates the manual and shell completions from
//! the very definitions the program parses.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "tandem-release",
    version,
    about = "Make, sign, inspect, verify and apply tandem payloads"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make a signed full payload of an image.
    Full(FullArgs),
    /// Make a signed delta payload from a source image to a new image.
    Delta(DeltaArgs),
    /// Show what a payload holds (its signature is not checked here).
    Inspect(InspectArgs),
    /// Check a payload's signature, manifest and every blob.
    Verify(VerifyArgs),
    /// Apply a payload to an image file or block device, offline.
    Apply(ApplyArgs),
    /// Make an Ed25519 signing key (secret key file and public certificate).
    Keygen(KeygenArgs),
    /// Keep a channel's signed release index.
    #[command(subcommand)]
    Index(IndexCommand),
}

#[derive(Debug, Subcommand)]
pub enum IndexCommand {
    /// Add a release (its full payload and any deltas) to an index, creating it if missing.
    Add(IndexAddArgs),
    /// Remove a release from an index.
    Remove {
        /// The index file.
        #[arg(long, value_name = "FILE")]
        index: PathBuf,
        #[arg(long)]
        version: String,
    },
    /// Bump the serial, set the expiry and write FILE.sig (a detached signature).
    Sign {
        #[arg(long, value_name = "FILE")]
        index: PathBuf,
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Days until nodes refuse the index.
        #[arg(long, default_value_t = 14)]
        expires_in_days: u64,
    },
    /// Show an index; with --keyring, check it as a node would.
    Show {
        index: PathBuf,
        #[arg(long, value_name = "FILE")]
        keyring: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct IndexAddArgs {
    /// The index file.
    #[arg(long, value_name = "FILE")]
    pub index: PathBuf,
    /// Channel name, when the index is created.
    #[arg(long, default_value = "stable")]
    pub channel: String,
    /// The release's full payload; its version is read from its manifest.
    #[arg(long, value_name = "PAYLOAD")]
    pub full: PathBuf,
    /// Delta payloads to this release (their source versions are read from them).
    #[arg(long, value_name = "PAYLOAD")]
    pub delta: Vec<PathBuf>,
    /// URL prefix of the payloads (default: beside the index, by file name).
    #[arg(long, default_value = "")]
    pub url_prefix: String,
    /// Start a phased rollout at this RFC 3339 time (default: now, when --rollout-hours is given).
    #[arg(long)]
    pub rollout_start: Option<String>,
    /// Spread the rollout over this many hours.
    #[arg(long)]
    pub rollout_hours: Option<u64>,
    /// Make this release a barrier: older nodes must install it first.
    #[arg(long)]
    pub barrier: bool,
}

#[derive(Debug, Args)]
pub struct MakeCommon {
    /// Secret key file (armored or binary OpenPGP, as `gpg --export-secret-keys` writes it).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// Where to write the payload.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// zstd compression level of the blobs (1-22).
    #[arg(long, default_value_t = 19, value_parser = clap::value_parser!(i32).range(1..=22))]
    pub level: i32,
    /// Worker threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Name of the component the image is.
    #[arg(long, default_value = "usr")]
    pub component: String,
    /// Make no bsdiff operations (format version 2). With
    /// --no-recompress, a delta in payload format version 1, for nodes whose
    /// tandem predates format version 2.
    #[arg(long)]
    pub no_bsdiff: bool,
    /// Make no recompressing operations: changed zstd streams, such as an
    /// initrd (recompress, format version 3), and changed files of an
    /// lz4hc erofs image (erofs, format version 4) ship as compressed
    /// blocks.
    #[arg(long)]
    pub no_recompress: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// A slot's parts beside its `/usr` image.
#[derive(Debug, Args, Default)]
pub struct Artifacts {
    /// The image's dm-verity hash device (`veritysetup format` output,
    /// superblock first): the `verity` component, for the HASH partition.
    #[arg(long, value_name = "FILE")]
    pub verity_hash: Option<PathBuf>,
    /// The signed Unified Kernel Image that boots the image: the `uki`
    /// component, shipped as it is.
    #[arg(long, value_name = "FILE")]
    pub uki: Option<PathBuf>,
    /// The signed UKI addon with the slot's verity arguments: the `addon`
    /// component.
    #[arg(long, value_name = "FILE", requires = "uki")]
    pub addon: Option<PathBuf>,
    /// Flatcar's layout: the kernel image GRUB boots from the ESP
    /// (`flatcar/vmlinuz-a|b`), with the root hash embedded where Flatcar's
    /// GRUB reads it: the `kernel` component.
    #[arg(long, value_name = "FILE", conflicts_with = "uki")]
    pub kernel: Option<PathBuf>,
}

/// The running release's parts, for a delta of each.
#[derive(Debug, Args, Default)]
pub struct SourceArtifacts {
    /// The running image's hash device.
    #[arg(long, value_name = "FILE")]
    pub source_verity_hash: Option<PathBuf>,
    /// The running UKI.
    #[arg(long, value_name = "FILE")]
    pub source_uki: Option<PathBuf>,
    /// The running addon.
    #[arg(long, value_name = "FILE")]
    pub source_addon: Option<PathBuf>,
    /// The running Flatcar kernel.
    #[arg(long, value_name = "FILE")]
    pub source_kernel: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct FullArgs {
    /// The new image.
    #[arg(long, value_name = "IMG")]
    pub image: PathBuf,
    /// Its version.
    #[arg(long)]
    pub version: String,
    #[command(flatten)]
    pub artifacts: Artifacts,
    #[command(flatten)]
    pub common: MakeCommon,
}

#[derive(Debug, Args)]
pub struct DeltaArgs {
    /// The image nodes run now.
    #[arg(long, value_name = "IMG")]
    pub source: PathBuf,
    /// Its version.
    #[arg(long)]
    pub source_version: String,
    /// The new image.
    #[arg(long, value_name = "IMG")]
    pub image: PathBuf,
    /// Its version.
    #[arg(long)]
    pub version: String,
    #[command(flatten)]
    pub artifacts: Artifacts,
    #[command(flatten)]
    pub sources: SourceArtifacts,
    #[command(flatten)]
    pub common: MakeCommon,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    pub payload: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Write the manifest's exact signed bytes to this file.
    #[arg(long, value_name = "FILE")]
    pub write_manifest: Option<PathBuf>,
    /// Write the detached signature to this file (for `gpg --verify SIG MANIFEST`).
    #[arg(long, value_name = "FILE")]
    pub write_signature: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    pub payload: PathBuf,
    /// Trusted certificates (armored or binary; may hold several).
    #[arg(long, value_name = "FILE", required = true)]
    pub keyring: Vec<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    pub payload: PathBuf,
    /// Trusted certificates (armored or binary; may hold several).
    #[arg(long, value_name = "FILE", required = true)]
    pub keyring: Vec<PathBuf>,
    /// Where to write: PATH, or NAME=PATH per component. An image file is created if missing.
    #[arg(long, value_name = "[NAME=]PATH", required = true)]
    pub target: Vec<String>,
    /// The image a delta applies to: PATH or NAME=PATH.
    #[arg(long, value_name = "[NAME=]PATH")]
    pub source: Vec<String>,
    /// Record progress here, and resume from it if it exists.
    #[arg(long, value_name = "FILE")]
    pub checkpoint: Option<PathBuf>,
    /// With --checkpoint: store it every this many MiB written.
    #[arg(long, value_name = "MIB", default_value_t = 64, requires = "checkpoint", value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_mib: u64,
    /// Stop (at a checkpoint) once this many target bytes are written; for
    /// testing interruption and resume.
    #[arg(long, value_name = "BYTES", requires = "checkpoint")]
    pub stop_after: Option<u64>,
    /// Worker threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long)]
    pub json: bool,
    /// No progress on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// User ID of the new key, e.g. "tandem release <release@example.com>".
    #[arg(long)]
    pub user_id: String,
    /// Where to write the secret key (armored).
    #[arg(long, value_name = "FILE")]
    pub secret: PathBuf,
    /// Where to write the public certificate (armored): the nodes' keyring.
    #[arg(long, value_name = "FILE")]
    pub public: PathBuf,
}
