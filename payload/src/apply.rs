//! Applying a payload while it streams in: read once, front to back, from
//! any byte stream. The head is verified before anything is written; each
//! blob is hashed before it is decompressed and written (positionally, on
//! every core); the target is read back and hashed, each 16 MiB segment as
//! soon as no operation still writes it once every operation is handed to
//! the workers, and checked as a whole at the end. Progress is
//! checkpointed so an interrupted apply resumes where it stopped.
//!
//! Memory: at most `threads` blobs queued plus `threads` in work, each at
//! most one blob, one reference and one output (see the limits in
//! [`crate::format`]): under 100 MiB with two workers, whatever the image.

use std::collections::{BTreeSet, VecDeque};
use std::fs::File;
use std::io::{self, Read};
use std::ops::ControlFlow;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

use serde::{Deserialize, Serialize};

use crate::container::{PayloadError, PayloadHead};
use crate::digest::{digest_file, hash_segment, root_of, sha256, worker_count};
use crate::format::{
    total_blocks, Extent, ImageRef, Manifest, Operation, Sha256Hex, BLOCK_SIZE, DIGEST_SEGMENT,
    MAX_BSDIFF_BODY, MAX_EROFS_BODY, MAX_RECIPE_BODY,
};
use crate::make::read_extents;
use crate::region::{ByteRange, Region};
use crate::sign::Keyring;

/// Why an apply failed. The slot it wrote must not be booted.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Payload(#[from] PayloadError),
    #[error("payload has component {0:?} but no target path was given for it")]
    MissingTarget(String),
    #[error("a target path was given for component {0:?}, which the payload does not have")]
    UnknownComponent(String),
    #[error("component {0:?} is a delta but no source path was given")]
    MissingSource(String),
    #[error("component {component}: target {path} holds {have} bytes, the image needs {need}")]
    TargetTooSmall {
        component: String,
        path: PathBuf,
        have: u64,
        need: u64,
    },
    #[error("component {component}: source {path} holds {have} bytes, the delta reads {need}")]
    SourceTooSmall {
        component: String,
        path: PathBuf,
        have: u64,
        need: u64,
    },
    #[error("refused before writing: {0}")]
    Refused(String),
    #[error("component {component}: source and target are the same bytes of {path}")]
    SourceIsTarget { component: String, path: PathBuf },
    #[error("{path}: bytes {}..{} are outside its {size} bytes", range.offset, range.end())]
    RangeOutside {
        path: PathBuf,
        range: ByteRange,
        size: u64,
    },
    #[error("component {component}: source {path} is not the image this delta was made from (SHA-256 {found}, the payload needs {expected}); nothing was written")]
    WrongSource {
        component: String,
        path: PathBuf,
        expected: Sha256Hex,
        found: Sha256Hex,
    },
    #[error("payload is truncated: the data section ends early (at byte {at} of {len})")]
    TruncatedData { at: u64, len: u64 },
    #[error("blob of operation {op} (data bytes {offset}..{end}) is corrupt: SHA-256 mismatch")]
    BlobHash { op: usize, offset: u64, end: u64 },
    #[error("operation {op}: zstd could not decode the blob: {reason}")]
    Decode { op: usize, reason: String },
    #[error("operation {op} (recompress): {error}")]
    Recompress {
        op: usize,
        error: crate::recompress::RecompressError,
    },
    #[error("operation {op} (erofs): {error}")]
    Erofs {
        op: usize,
        error: crate::erofs::ErofsError,
    },
    #[error("component {component}: target {path} does not read back as the signed image (SHA-256 {found}, expected {expected}); do not boot it")]
    ReadBack {
        component: String,
        path: PathBuf,
        expected: Sha256Hex,
        found: Sha256Hex,
    },
    #[error("{context}: {error}")]
    Io { context: String, error: io::Error },
}

impl ApplyError {
    /// The payload is in a format (version or operation kind) this tandem
    /// does not read, or re-creates a zstd stream with another libzstd than
    /// this tandem's: found before anything was written. A node then takes
    /// the release's full payload, which is written in the oldest format
    /// that holds it.
    pub fn is_unknown_format(&self) -> bool {
        use crate::format::HeaderError;
        use crate::validate::ManifestError;
        matches!(
            self,
            ApplyError::Payload(
                PayloadError::Header(HeaderError::UnsupportedVersion(_))
                    | PayloadError::Manifest(
                        ManifestError::Version(_)
                            | ManifestError::Syntax(_)
                            | ManifestError::Encoder { .. }
                    )
            )
        )
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ApplyError {
    let context = context.into();
    move |error| ApplyError::Io { context, error }
}

/// Where one component goes.
#[derive(Debug, Clone)]
pub struct ComponentPaths {
    pub component: String,
    /// The inactive slot (or an image file) to write.
    pub target: PathBuf,
    /// The part of `target` to write (a slot inside a whole-disk image);
    /// `None` means the whole file or device.
    pub target_range: Option<ByteRange>,
    /// The running image a delta reads from.
    pub source: Option<PathBuf>,
    /// The part of `source` holding the running image.
    pub source_range: Option<ByteRange>,
}

/// A payload byte stream. `skip_forward` moves past bytes that are not
/// needed (resuming at a checkpoint); a download overrides it to ask the
/// server for the rest instead of fetching what it skips.
pub trait PayloadReader: Read {
    /// Skips up to `n` bytes; returns how many were skipped (fewer only at
    /// the end of the stream).
    fn skip_forward(&mut self, n: u64) -> io::Result<u64> {
        io::copy(&mut self.take(n), &mut io::sink())
    }
}

impl PayloadReader for File {}
impl<R: Read> PayloadReader for io::BufReader<R> {}
impl PayloadReader for &[u8] {}
impl<T: AsRef<[u8]>> PayloadReader for io::Cursor<T> {}
impl PayloadReader for io::Stdin {}
impl<R: PayloadReader + ?Sized> PayloadReader for &mut R {
    fn skip_forward(&mut self, n: u64) -> io::Result<u64> {
        (**self).skip_forward(n)
    }
}
impl<R: PayloadReader + ?Sized> PayloadReader for Box<R> {
    fn skip_forward(&mut self, n: u64) -> io::Result<u64> {
        (**self).skip_forward(n)
    }
}

/// The caller's own check of a verified head (its manifest and the
/// manifest's SHA-256), run after every other check (signature, manifest,
/// source image) and before the first write.
pub type Vet = Arc<dyn Fn(&Manifest, &Sha256Hex) -> Result<(), String> + Send + Sync>;

/// Tuning of an apply.
#[derive(Clone)]
pub struct ApplyOptions {
    pub threads: usize,
    /// Where progress is recorded; `None` disables resuming.
    pub checkpoint: Option<PathBuf>,
    /// Write a checkpoint after this many more target bytes are done.
    pub checkpoint_every: u64,
    /// Refuses a payload the caller did not ask for (another version, a
    /// manifest other than the index names) before any write.
    pub vet: Option<Vet>,
    /// Paths given for components the payload does not have are ignored
    /// (a node offers every part of its slot) instead of refused.
    pub skip_unused_paths: bool,
}

impl std::fmt::Debug for ApplyOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplyOptions")
            .field("threads", &self.threads)
            .field("checkpoint", &self.checkpoint)
            .field("checkpoint_every", &self.checkpoint_every)
            .field("vet", &self.vet.is_some())
            .field("skip_unused_paths", &self.skip_unused_paths)
            .finish()
    }
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            threads: worker_count(),
            checkpoint: None,
            checkpoint_every: 64 << 20,
            vet: None,
            skip_unused_paths: false,
        }
    }
}

/// A resumable position: every operation before `next_op` is written and
/// synced; the stream resumes at `data_offset` in the data section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub format_version: u32,
    /// SHA-256 of the manifest's bytes: a checkpoint fits one payload only.
    pub manifest_sha256: Sha256Hex,
    pub next_op: usize,
    pub data_offset: u64,
    pub done_bytes: u64,
}

impl Checkpoint {
    /// Reads a checkpoint file; `Ok(None)` when there is none.
    pub fn load(path: &Path) -> Result<Option<Checkpoint>, ApplyError> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(format!("reading checkpoint {}", path.display()))(e)),
        }
    }

    /// Writes it atomically: temporary file, fsync, rename, fsync of the folder.
    pub fn store(&self, path: &Path) -> Result<(), ApplyError> {
        let ctx = || format!("writing checkpoint {}", path.display());
        let bytes =
            serde_json::to_vec_pretty(self).map_err(|e| io_err(ctx())(io::Error::other(e)))?;
        crate::files::write_atomic(path, &bytes).map_err(io_err(ctx()))
    }
}

/// Where an apply stands, for progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    VerifyingSource,
    Writing,
    VerifyingTarget,
}

#[derive(Debug, Clone, Copy)]
pub struct ApplyProgress {
    pub phase: Phase,
    /// Target bytes written (in `Writing`).
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Payload bytes read so far.
    pub read_bytes: u64,
}

/// How an apply ended.
#[derive(Debug, Clone)]
pub enum ApplyOutcome {
    /// Every byte written and read back as the signed image.
    Complete(ApplyReport),
    /// Stopped on request at a checkpoint; apply again to resume.
    Stopped(Checkpoint),
}

#[derive(Debug, Clone, Serialize)]
pub struct ApplyReport {
    pub target_version: String,
    pub source_version: Option<String>,
    pub signer: String,
    /// Where this run started: 0, or the checkpoint's operation.
    pub resumed_at_op: usize,
    pub operations: usize,
    pub bytes_written: u64,
}

struct Slot {
    /// A whole regular file holding a file component: its signed length.
    cut_to: Option<u64>,
    image: ImageRef,
    target: Region,
    target_path: PathBuf,
    source: Option<Region>,
    /// The signed (and verified) length of the source image.
    source_size: Option<u64>,
}

struct Job {
    index: usize,
    slot: usize,
    op: Operation,
    blob: Option<Vec<u8>>,
}

/// Applies a payload read from `reader` (positioned at its first byte).
/// `control` is called as work progresses; `Break` stops at a checkpoint.
pub fn apply<R: PayloadReader>(
    mut reader: R,
    keyring: &Keyring,
    paths: &[ComponentPaths],
    opts: &ApplyOptions,
    control: &mut dyn FnMut(&ApplyProgress) -> ControlFlow<()>,
) -> Result<ApplyOutcome, ApplyError> {
    let head = PayloadHead::read_verified(&mut reader, keyring)?;
    let manifest = &head.manifest;
    let manifest_sha256 = sha256(&head.manifest_bytes);
    for p in paths {
        if !opts.skip_unused_paths && !manifest.components.iter().any(|c| c.name == p.component) {
            return Err(ApplyError::UnknownComponent(p.component.clone()));
        }
    }
    let total_bytes: u64 = manifest.components.iter().map(|c| c.target.size).sum();
    // Open and check everything before the first write.
    let mut slots = Vec::new();
    let mut extend = Vec::new();
    for c in &manifest.components {
        let p = paths
            .iter()
            .find(|p| p.component == c.name)
            .ok_or_else(|| ApplyError::MissingTarget(c.name.clone()))?;
        let target = File::options()
            .read(true)
            .write(true)
            .open(&p.target)
            .map_err(io_err(format!("opening target {}", p.target.display())))?;
        let file_size = device_size(&target, &p.target)?;
        let is_regular = target
            .metadata()
            .map_err(io_err(format!("inspecting {}", p.target.display())))?
            .is_file();
        let have = match p.target_range {
            Some(range) if range.end() > file_size => {
                return Err(ApplyError::RangeOutside {
                    path: p.target.clone(),
                    range,
                    size: file_size,
                })
            }
            Some(range) => range.len,
            None => file_size,
        };
        if have < c.target.size && (!is_regular || p.target_range.is_some()) {
            return Err(ApplyError::TargetTooSmall {
                component: c.name.clone(),
                path: p.target.clone(),
                have,
                need: c.target.size,
            });
        }
        let source = match &c.source {
            None => None,
            Some(src) => {
                let path = p
                    .source
                    .as_ref()
                    .ok_or_else(|| ApplyError::MissingSource(c.name.clone()))?;
                let file = File::open(path)
                    .map_err(io_err(format!("opening source {}", path.display())))?;
                let file_len = device_size(&file, path)?;
                let source_range = p.source_range.unwrap_or(ByteRange {
                    offset: 0,
                    len: file_len,
                });
                if source_range.end() > file_len {
                    return Err(ApplyError::RangeOutside {
                        path: path.clone(),
                        range: source_range,
                        size: file_len,
                    });
                }
                let target_range = p.target_range.unwrap_or(ByteRange {
                    offset: 0,
                    len: u64::MAX,
                });
                if same_file(&file, &target)? && source_range.overlaps(&target_range) {
                    return Err(ApplyError::SourceIsTarget {
                        component: c.name.clone(),
                        path: path.clone(),
                    });
                }
                // A file component's source is the installed file, read
                // padded to whole blocks as the payload was made.
                let pads = c.file_len.is_some()
                    && source_range.len < src.size
                    && src.size - source_range.len < BLOCK_SIZE;
                let (size, file) = if pads {
                    (src.size, Region::zero_padded(file, source_range, src.size))
                } else {
                    (source_range.len, Region::new(file, source_range))
                };
                if size < src.size {
                    return Err(ApplyError::SourceTooSmall {
                        component: c.name.clone(),
                        path: path.clone(),
                        have: size,
                        need: src.size,
                    });
                }
                let _ = control(&ApplyProgress {
                    phase: Phase::VerifyingSource,
                    done_bytes: 0,
                    total_bytes,
                    read_bytes: head.header.data_offset(),
                });
                let found = digest_file(&file, src.size)
                    .map_err(io_err(format!("hashing source {}", path.display())))?;
                if found.sha256 != src.digest.sha256 {
                    return Err(ApplyError::WrongSource {
                        component: c.name.clone(),
                        path: path.clone(),
                        expected: src.digest.sha256,
                        found: found.sha256,
                    });
                }
                Some(file)
            }
        };
        if have < c.target.size {
            extend.push((slots.len(), c.target.size));
        }
        let range = p.target_range.unwrap_or(ByteRange {
            offset: 0,
            len: have.max(c.target.size),
        });
        slots.push(Slot {
            cut_to: c
                .file_len
                .filter(|_| is_regular && p.target_range.is_none()),
            image: c.target.clone(),
            target: Region::new(target, range),
            target_path: p.target.clone(),
            source,
            source_size: c.source.as_ref().map(|s| s.size),
        });
    }

    // The caller's last word before the first write (the engine clears the
    // slot's boot state here, so a refused payload changes nothing).
    if let Some(vet) = &opts.vet {
        vet(manifest, &manifest_sha256).map_err(ApplyError::Refused)?;
    }
    for (index, size) in extend {
        let slot: &Slot = &slots[index];
        slot.target
            .file()
            .set_len(size)
            .map_err(io_err(format!("extending {}", slot.target_path.display())))?;
    }

    // Flatten the operations; note where each one's blob would start.
    let mut ops: Vec<(usize, &Operation, u64)> = Vec::new();
    let mut offset = 0u64;
    for (slot, c) in manifest.components.iter().enumerate() {
        for op in &c.operations {
            ops.push((slot, op, offset));
            offset += op.blob().map_or(0, |b| b.len);
        }
    }

    let resume = match &opts.checkpoint {
        Some(path) => Checkpoint::load(path)?.filter(|cp| {
            cp.manifest_sha256 == manifest_sha256
                && cp.next_op <= ops.len()
                && ops.get(cp.next_op).map_or(offset, |o| o.2) == cp.data_offset
        }),
        None => None,
    };
    let (start_op, done_bytes) = resume
        .as_ref()
        .map_or((0, 0), |cp| (cp.next_op, cp.done_bytes));
    let start_offset = ops.get(start_op).map_or(offset, |o| o.2);
    let data_start = head.header.data_offset();
    if start_offset > 0 {
        let skipped = reader
            .skip_forward(start_offset)
            .map_err(io_err("skipping to the checkpoint"))?;
        if skipped != start_offset {
            return Err(ApplyError::TruncatedData {
                at: skipped,
                len: manifest.data_len,
            });
        }
    }

    let threads = opts.threads.max(1);
    let (job_tx, job_rx) = mpsc::sync_channel::<Work>(threads);
    let job_rx = std::sync::Mutex::new(job_rx);
    let (done_tx, done_rx) = mpsc::channel::<Done>();
    let mut stopped = false;
    let sizes: Vec<u64> = slots.iter().map(|s| s.image.size).collect();
    let op_list: Vec<(usize, &Operation)> = ops.iter().map(|&(slot, op, _)| (slot, op)).collect();
    let mut tally = Tally {
        in_flight: 0,
        failure: None,
        completed: BTreeSet::new(),
        low_water: start_op,
        done_bytes,
        segments: Segments::new(&sizes, &op_list[start_op..]),
    };
    let mut hazard: Option<Hazard> = None;
    let mut last_checkpoint_bytes = done_bytes;
    let mut read_bytes = data_start + start_offset;
    let writing = |done_bytes: u64, read_bytes: u64| ApplyProgress {
        phase: Phase::Writing,
        done_bytes,
        total_bytes,
        read_bytes,
    };

    std::thread::scope(|scope| {
        for _ in 0..threads {
            let done_tx = done_tx.clone();
            let job_rx = &job_rx;
            let slots = &slots;
            scope.spawn(move || loop {
                let work = match job_rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                let done = match work {
                    Ok(Work::Op(job)) => {
                        let index = job.index;
                        Done::Op(run_job(&slots[job.slot], job).map(|bytes| (index, bytes)))
                    }
                    Ok(Work::Hash { slot, segment }) => {
                        crate::failpoint::hit("apply-readback");
                        let s = &slots[slot];
                        let mut buf = vec![0u8; 1 << 20];
                        let result =
                            hash_segment(&s.target, s.image.size, segment as u64, &mut buf);
                        Done::Hash {
                            slot,
                            segment,
                            result,
                        }
                    }
                    Err(_) => return,
                };
                if done_tx.send(done).is_err() {
                    return;
                }
            });
        }
        drop(done_tx);

        for (index, &(slot, op, blob_offset)) in ops.iter().enumerate().skip(start_op) {
            crate::failpoint::hit("apply-op");
            while let Ok(r) = done_rx.try_recv() {
                tally.absorb(r, &op_list);
            }
            if tally.failure.is_some() {
                break;
            }
            if control(&writing(tally.done_bytes, read_bytes)).is_break() {
                stopped = true;
                break;
            }
            if tally.done_bytes - last_checkpoint_bytes >= opts.checkpoint_every {
                if let Some(path) = &opts.checkpoint {
                    let at = ops.get(tally.low_water).map_or(offset, |o| o.2);
                    if let Err(e) = checkpoint(
                        &slots,
                        path,
                        manifest_sha256,
                        tally.low_water,
                        at,
                        tally.done_bytes,
                    ) {
                        tally.failure = Some(e);
                        break;
                    }
                    crate::failpoint::hit("apply-checkpoint");
                }
                last_checkpoint_bytes = tally.done_bytes;
            }
            let blob = match op.blob() {
                Some(b) => {
                    // The validator checked b.len against MAX_BLOB_LEN.
                    let mut buf = Vec::with_capacity(b.len as usize);
                    match (&mut reader).take(b.len).read_to_end(&mut buf) {
                        Ok(n) if n as u64 == b.len => {}
                        Ok(n) => {
                            tally.failure = Some(ApplyError::TruncatedData {
                                at: blob_offset + n as u64,
                                len: manifest.data_len,
                            });
                            break;
                        }
                        Err(e) => {
                            tally.failure = Some(io_err("reading the payload")(e));
                            break;
                        }
                    }
                    read_bytes += b.len;
                    Some(buf)
                }
                None => None,
            };
            // A recompress operation reads target blocks that the
            // operations before it write: it starts once they are done.
            // The operations after it run beside it, unless one writes a
            // byte it reads or writes; that one waits for it.
            if let Some(h) = &hazard {
                if tally.is_done(h.op) {
                    hazard = None;
                } else if h.conflicts(slot, op) {
                    tally.drain(&done_rx, &op_list);
                    hazard = None;
                }
            }
            let recompress = matches!(op, Operation::Recompress { .. });
            if recompress {
                tally.drain(&done_rx, &op_list);
            }
            if tally.failure.is_some() {
                break;
            }
            if recompress {
                let size = slots[slot].image.size;
                hazard = Some(Hazard {
                    op: index,
                    slot,
                    ranges: blob
                        .as_deref()
                        .and_then(|b| recompress_footprint(op, b, size))
                        .unwrap_or_else(|| vec![(0, u64::MAX)]),
                });
            }
            let job = Job {
                index,
                slot,
                op: op.clone(),
                blob,
            };
            let rb = read_bytes;
            let mut ask = |t: &Tally| control(&writing(t.done_bytes, rb));
            if !hand_over(
                Work::Op(job),
                &job_tx,
                &done_rx,
                &mut tally,
                &op_list,
                &mut ask,
            ) {
                stopped = tally.failure.is_none();
                break;
            }
        }
        // Every operation handed over, the segments no operation writes any
        // more are read back and hashed while the last ones run (a long
        // recompress operation). Not before: reading back would hold up
        // operations and the checkpoints taken between them (the VM
        // power-cut scenario then resumed from operation 0).
        while !stopped && tally.failure.is_none() {
            let rb = read_bytes;
            let mut ask = |t: &Tally| control(&writing(t.done_bytes, rb));
            if !hand_out_ready(&mut tally, &job_tx, &done_rx, &op_list, &mut ask) {
                stopped = tally.failure.is_none();
                break;
            }
            if tally.in_flight == 0 {
                break;
            }
            match done_rx.recv() {
                Ok(r) => tally.absorb(r, &op_list),
                Err(_) => break,
            }
        }
        drop(job_tx);
        tally.drain(&done_rx, &op_list);
    });
    let Tally {
        failure,
        low_water,
        done_bytes,
        segments,
        ..
    } = tally;

    if let Some(path) = &opts.checkpoint {
        if stopped || failure.is_some() {
            // Record what is done so a retry resumes; best effort on failure.
            let at = ops.get(low_water).map_or(offset, |o| o.2);
            let stored = checkpoint(&slots, path, manifest_sha256, low_water, at, done_bytes);
            if let (Err(e), None) = (stored, &failure) {
                return Err(e);
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    if stopped {
        let at = ops.get(low_water).map_or(offset, |o| o.2);
        return Ok(ApplyOutcome::Stopped(Checkpoint {
            format_version: 1,
            manifest_sha256,
            next_op: low_water,
            data_offset: at,
            done_bytes,
        }));
    }

    let mut hashes = segments.hashes;
    for (i, (slot, c)) in slots.iter().zip(&manifest.components).enumerate() {
        slot.target
            .file()
            .sync_all()
            .map_err(io_err(format!("syncing {}", slot.target_path.display())))?;
        let _ = control(&ApplyProgress {
            phase: Phase::VerifyingTarget,
            done_bytes,
            total_bytes,
            read_bytes,
        });
        // Every segment was read back after the last operation that writes
        // it; one that was not (none should be) is read back now.
        let mut buf = vec![0u8; 1 << 20];
        let mut found = Vec::with_capacity(hashes[i].len());
        for (segment, hash) in std::mem::take(&mut hashes[i]).into_iter().enumerate() {
            let hash = match hash {
                Some(h) => h,
                None => {
                    crate::failpoint::hit("apply-readback");
                    hash_segment(&slot.target, slot.image.size, segment as u64, &mut buf).map_err(
                        io_err(format!("reading back {}", slot.target_path.display())),
                    )?
                }
            };
            found.push(hash);
        }
        let found = root_of(&found);
        if found != slot.image.digest.sha256 {
            if let Some(path) = &opts.checkpoint {
                let _ = std::fs::remove_file(path);
            }
            return Err(ApplyError::ReadBack {
                component: c.name.clone(),
                path: slot.target_path.clone(),
                expected: slot.image.digest.sha256,
                found,
            });
        }
    }
    crate::failpoint::hit("apply-verified");
    // Files (a UKI, an addon) were written padded to whole blocks and
    // verified so; now cut back to their signed length.
    for slot in &slots {
        if let Some(len) = slot.cut_to {
            let file = slot.target.file();
            file.set_len(len)
                .and_then(|()| file.sync_all())
                .map_err(io_err(format!(
                    "cutting {} to its length",
                    slot.target_path.display()
                )))?;
        }
    }
    if let Some(path) = &opts.checkpoint {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("removing checkpoint {}", path.display()))(e)),
        }
    }
    Ok(ApplyOutcome::Complete(ApplyReport {
        target_version: manifest.target_version.clone(),
        source_version: manifest.source_version.clone(),
        signer: head.signer.clone().unwrap_or_default(),
        resumed_at_op: start_op,
        operations: ops.len(),
        bytes_written: total_bytes,
    }))
}

/// What the workers are handed: an operation, or a segment of a target to
/// read back and hash.
enum Work {
    Op(Job),
    Hash { slot: usize, segment: usize },
}

/// What they send back.
enum Done {
    Op(Result<(usize, u64), ApplyError>),
    Hash {
        slot: usize,
        segment: usize,
        result: io::Result<Sha256Hex>,
    },
}

/// Hands `work` to the workers and counts it in flight. While they are
/// busy it absorbs their results and asks `control`, so that a stop
/// request is honoured at once rather than after the queue drains. False
/// when it was not handed over: the workers are gone, something failed, or
/// `control` asked to stop.
fn hand_over(
    mut work: Work,
    job_tx: &mpsc::SyncSender<Work>,
    done_rx: &mpsc::Receiver<Done>,
    tally: &mut Tally,
    ops: &[(usize, &Operation)],
    control: &mut dyn FnMut(&Tally) -> ControlFlow<()>,
) -> bool {
    loop {
        match job_tx.try_send(work) {
            Ok(()) => {
                tally.in_flight += 1;
                return true;
            }
            Err(mpsc::TrySendError::Disconnected(_)) => return false,
            Err(mpsc::TrySendError::Full(back)) => work = back,
        }
        if let Ok(r) = done_rx.recv_timeout(std::time::Duration::from_millis(50)) {
            tally.absorb(r, ops);
        }
        if tally.failure.is_some() || control(tally).is_break() {
            return false;
        }
    }
}

/// Hands every segment ready to be read back to the workers; false as
/// [`hand_over`].
fn hand_out_ready(
    tally: &mut Tally,
    job_tx: &mpsc::SyncSender<Work>,
    done_rx: &mpsc::Receiver<Done>,
    ops: &[(usize, &Operation)],
    control: &mut dyn FnMut(&Tally) -> ControlFlow<()>,
) -> bool {
    while let Some((slot, segment)) = tally.segments.ready.pop_front() {
        if !hand_over(
            Work::Hash { slot, segment },
            job_tx,
            done_rx,
            tally,
            ops,
            control,
        ) {
            return false;
        }
    }
    true
}

/// Which [`DIGEST_SEGMENT`]s of each target no operation still writes:
/// those are read back and hashed while the others are being written.
/// Decisions only; the workers do the reading.
#[derive(Debug)]
struct Segments {
    /// Per component: how many operations still write into each segment.
    pending: Vec<Vec<u32>>,
    /// Segments no operation writes any more, not yet handed out.
    ready: VecDeque<(usize, usize)>,
    /// Per component: each segment's SHA-256 once read back.
    hashes: Vec<Vec<Option<Sha256Hex>>>,
}

impl Segments {
    /// `sizes`: each component's target size; `ops`: the operations still
    /// to run, with their component.
    fn new(sizes: &[u64], ops: &[(usize, &Operation)]) -> Segments {
        let counts = sizes.iter().map(|s| s.div_ceil(DIGEST_SEGMENT) as usize);
        let mut pending: Vec<Vec<u32>> = counts.clone().map(|n| vec![0; n]).collect();
        for &(slot, op) in ops {
            for segment in segments_of(op, pending[slot].len()) {
                pending[slot][segment] += 1;
            }
        }
        let ready = pending
            .iter()
            .enumerate()
            .flat_map(|(slot, p)| {
                p.iter()
                    .enumerate()
                    .filter(|(_, &n)| n == 0)
                    .map(move |(segment, _)| (slot, segment))
            })
            .collect();
        Segments {
            pending,
            ready,
            hashes: counts.map(|n| vec![None; n]).collect(),
        }
    }

    /// Operation `op` of component `slot` is written.
    fn written(&mut self, slot: usize, op: &Operation) {
        let pending = &mut self.pending[slot];
        for segment in segments_of(op, pending.len()) {
            pending[segment] = pending[segment].saturating_sub(1);
            if pending[segment] == 0 {
                self.ready.push_back((slot, segment));
            }
        }
    }
}

/// The segments (of `count`) an operation writes into, each once.
fn segments_of(op: &Operation, count: usize) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    for e in op.dst().iter().filter(|e| e.count() > 0) {
        let (start, end) = e.bytes();
        let (first, last) = (start / DIGEST_SEGMENT, (end - 1) / DIGEST_SEGMENT);
        for segment in first..=last.min(count.saturating_sub(1) as u64) {
            out.push(segment as usize);
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The results the workers have sent back, absorbed in any order.
struct Tally {
    in_flight: usize,
    failure: Option<ApplyError>,
    /// Operations done above `low_water`, not yet contiguous with it.
    completed: BTreeSet<usize>,
    /// Every operation below this one is done: a checkpoint resumes here.
    low_water: usize,
    done_bytes: u64,
    segments: Segments,
}

impl Tally {
    fn absorb(&mut self, done: Done, ops: &[(usize, &Operation)]) {
        self.in_flight -= 1;
        match done {
            Done::Op(Ok((index, bytes))) => {
                self.completed.insert(index);
                self.done_bytes += bytes;
                while self.completed.remove(&self.low_water) {
                    self.low_water += 1;
                }
                if let Some(&(slot, op)) = ops.get(index) {
                    self.segments.written(slot, op);
                }
            }
            Done::Op(Err(e)) => {
                self.failure.get_or_insert(e);
            }
            Done::Hash {
                slot,
                segment,
                result: Ok(hash),
            } => {
                self.segments.hashes[slot][segment] = Some(hash);
            }
            Done::Hash {
                result: Err(error), ..
            } => {
                self.failure.get_or_insert(ApplyError::Io {
                    context: "reading back the target".into(),
                    error,
                });
            }
        }
    }

    /// Whether operation `index` is written.
    fn is_done(&self, index: usize) -> bool {
        index < self.low_water || self.completed.contains(&index)
    }

    /// Waits for every job in flight.
    fn drain(&mut self, done: &mpsc::Receiver<Done>, ops: &[(usize, &Operation)]) {
        while self.in_flight > 0 {
            match done.recv() {
                Ok(r) => self.absorb(r, ops),
                Err(_) => break,
            }
        }
    }
}

/// A recompress operation in flight and the target bytes it reads or
/// writes.
#[derive(Debug)]
struct Hazard {
    op: usize,
    slot: usize,
    /// Byte ranges of the slot's target, sorted and merged.
    ranges: Vec<(u64, u64)>,
}

impl Hazard {
    /// Whether `op` of component `slot` must wait for the recompress
    /// operation: another recompress operation, an operation of another
    /// component (whose target may share its file), or one that writes a
    /// byte the recompress operation reads or writes.
    fn conflicts(&self, slot: usize, op: &Operation) -> bool {
        matches!(op, Operation::Recompress { .. })
            || slot != self.slot
            || writes_into(&self.ranges, op.dst())
    }
}

/// Whether extents `dst` share a byte with any of `merged` (byte ranges as
/// [`crate::region::merge_ranges`] returns them).
pub fn writes_into(merged: &[(u64, u64)], dst: &[Extent]) -> bool {
    dst.iter().any(|e| {
        let (start, end) = e.bytes();
        crate::region::overlaps_any(merged, start, end)
    })
}

/// The target byte ranges a recompress operation reads (its recipe's) or
/// writes (its `dst`), sorted and merged, from its blob as the payload
/// carries it. `None` when it is not a recompress operation or its blob
/// does not parse (the operation then fails on it by itself).
pub fn recompress_footprint(
    op: &Operation,
    blob: &[u8],
    target_size: u64,
) -> Option<Vec<(u64, u64)>> {
    let Operation::Recompress {
        dst,
        content_len,
        erofs_view,
        ..
    } = op
    else {
        return None;
    };
    // Nothing unverified is parsed.
    if op.blob().is_none_or(|b| sha256(blob) != b.sha256) {
        return None;
    }
    let body = zstd_decompress_bounded(blob, MAX_RECIPE_BODY as usize).ok()?;
    let recipe =
        crate::recompress::Recipe::parse(&body, *content_len, target_size, *erofs_view).ok()?;
    let mut ranges = recipe.target_reads();
    ranges.extend(dst.iter().map(Extent::bytes));
    Some(crate::region::merge_ranges(ranges))
}

fn checkpoint(
    slots: &[Slot],
    path: &Path,
    manifest_sha256: Sha256Hex,
    next_op: usize,
    data_offset: u64,
    done_bytes: u64,
) -> Result<(), ApplyError> {
    // Written blocks reach the disk before the checkpoint says they did.
    for s in slots {
        s.target
            .file()
            .sync_data()
            .map_err(io_err(format!("syncing {}", s.target_path.display())))?;
    }
    Checkpoint {
        format_version: 1,
        manifest_sha256,
        next_op,
        data_offset,
        done_bytes,
    }
    .store(path)
}

fn device_size(file: &File, path: &Path) -> Result<u64, ApplyError> {
    crate::files::file_len(file).map_err(io_err(format!("sizing {}", path.display())))
}

fn same_file(a: &File, b: &File) -> Result<bool, ApplyError> {
    let ma = a.metadata().map_err(io_err("inspecting source"))?;
    let mb = b.metadata().map_err(io_err("inspecting target"))?;
    let same_inode = ma.dev() == mb.dev() && ma.ino() == mb.ino();
    let same_device = ma.rdev() != 0 && ma.rdev() == mb.rdev();
    Ok(same_inode || same_device)
}

/// Runs one operation; returns the target bytes it wrote.
fn run_job(slot: &Slot, job: Job) -> Result<u64, ApplyError> {
    let dst = job.op.dst();
    let out_len = total_blocks(dst) * BLOCK_SIZE;
    let write_err = || io_err(format!("writing {}", slot.target_path.display()));
    match &job.op {
        Operation::Zero { .. } => {
            for e in dst {
                slot.target
                    .zero_range(e.start() * BLOCK_SIZE, e.count() * BLOCK_SIZE)
                    .map_err(write_err())?;
            }
        }
        Operation::Copy { src, .. } => {
            let source = slot
                .source
                .as_ref()
                .ok_or_else(|| ApplyError::MissingSource(String::new()))?;
            copy_extents(source, src, &slot.target, dst).map_err(write_err())?;
        }
        Operation::Data { blob, .. }
        | Operation::Patch { blob, .. }
        | Operation::Bsdiff { blob, .. } => {
            let bytes = job.blob.unwrap_or_default();
            if sha256(&bytes) != blob.sha256 {
                return Err(ApplyError::BlobHash {
                    op: job.index,
                    offset: blob.offset,
                    end: blob.offset + blob.len,
                });
            }
            let reference = match (&job.op, &slot.source) {
                (Operation::Patch { src, .. } | Operation::Bsdiff { src, .. }, Some(source)) => {
                    Some(read_extents(source, src).map_err(io_err("reading the source"))?)
                }
                _ => None,
            };
            let decode = |reason: String| ApplyError::Decode {
                op: job.index,
                reason,
            };
            let out = match (&job.op, reference) {
                (Operation::Bsdiff { .. }, Some(old)) => {
                    let body = zstd_decompress_bounded(&bytes, MAX_BSDIFF_BODY as usize)
                        .map_err(decode)?;
                    crate::bsdiff::apply(&old, &body, out_len as usize)
                        .map_err(|e| decode(format!("bsdiff: {e}")))?
                }
                (_, reference) => zstd_decompress(&bytes, reference.as_deref(), out_len as usize)
                    .map_err(decode)?,
            };
            write_extents(&slot.target, dst, &out).map_err(write_err())?;
        }
        Operation::Recompress {
            content_len,
            encoder,
            chunks,
            blob,
            erofs_view,
            ..
        } => {
            let body = checked_body(job.index, job.blob, blob, MAX_RECIPE_BODY)?;
            let failed = |error| ApplyError::Recompress {
                op: job.index,
                error,
            };
            let recipe =
                crate::recompress::Recipe::parse(&body, *content_len, slot.image.size, *erofs_view)
                    .map_err(failed)?;
            let read = |buf: &mut [u8], offset: u64| slot.target.read_exact_at(buf, offset);
            let write = |buf: &[u8], offset: u64| slot.target.write_all_at(buf, offset);
            crate::recompress::rebuild(&recipe, encoder, *content_len, dst, chunks, &read, &write)
                .map_err(failed)?;
        }
        Operation::Erofs {
            content_len,
            encoder,
            chunks,
            blob,
            ..
        } => {
            let body = checked_body(job.index, job.blob, blob, MAX_EROFS_BODY)?;
            let failed = |error| ApplyError::Erofs {
                op: job.index,
                error,
            };
            let source = slot
                .source
                .as_ref()
                .ok_or_else(|| ApplyError::MissingSource(String::new()))?;
            let source_size = slot.source_size.unwrap_or(0);
            let read = |buf: &mut [u8], offset: u64| source.read_exact_at(buf, offset);
            let new = crate::erofs::Body::parse(&body, source_size)
                .and_then(|body| crate::erofs::patched_content(&body, *content_len, &read))
                .map_err(failed)?;
            // The patch is no longer needed while the file is compressed.
            drop(body);
            let write = |buf: &[u8], offset: u64| slot.target.write_all_at(buf, offset);
            crate::erofs::write_pclusters(&new, encoder, dst, chunks, &write).map_err(failed)?;
        }
    }
    Ok(out_len)
}

/// Decompresses a zstd frame that must yield exactly `len` bytes.
/// A blob checked against its signed hash, decompressed to at most
/// `limit` bytes: the body of a recompress or erofs operation.
fn checked_body(
    op: usize,
    bytes: Option<Vec<u8>>,
    blob: &crate::format::Blob,
    limit: u64,
) -> Result<Vec<u8>, ApplyError> {
    let bytes = bytes.unwrap_or_default();
    if sha256(&bytes) != blob.sha256 {
        return Err(ApplyError::BlobHash {
            op,
            offset: blob.offset,
            end: blob.offset + blob.len,
        });
    }
    zstd_decompress_bounded(&bytes, limit as usize)
        .map_err(|reason| ApplyError::Decode { op, reason })
}

pub fn zstd_decompress(
    blob: &[u8],
    reference: Option<&[u8]>,
    len: usize,
) -> Result<Vec<u8>, String> {
    let mut dctx = zstd_safe::DCtx::create();
    let name = |code: usize| zstd_safe::get_error_name(code).to_owned();
    if let Some(r) = reference {
        dctx.ref_prefix(r).map_err(name)?;
    }
    let mut out = Vec::with_capacity(len);
    let n = dctx.decompress(&mut out, blob).map_err(name)?;
    if n != len {
        return Err(format!("decoded {n} bytes, the operation writes {len}"));
    }
    Ok(out)
}

/// Decompresses a zstd frame that names its content size, at most `limit`
/// bytes (checked before anything is allocated).
pub fn zstd_decompress_bounded(blob: &[u8], limit: usize) -> Result<Vec<u8>, String> {
    let size = match zstd_safe::get_frame_content_size(blob) {
        Ok(Some(size)) => size,
        Ok(None) => return Err("the zstd frame does not name its size".into()),
        Err(_) => return Err("not a zstd frame".into()),
    };
    if size > limit as u64 {
        return Err(format!(
            "the frame holds {size} bytes, over the limit of {limit}"
        ));
    }
    zstd_decompress(blob, None, size as usize)
}

fn write_extents(file: &Region, extents: &[Extent], data: &[u8]) -> io::Result<()> {
    let mut pos = 0usize;
    for e in extents {
        let len = (e.count() * BLOCK_SIZE) as usize;
        file.write_all_at(&data[pos..pos + len], e.start() * BLOCK_SIZE)?;
        pos += len;
    }
    Ok(())
}

/// Copies the concatenated `src` blocks into the concatenated `dst` blocks
/// through a 1 MiB buffer.
fn copy_extents(
    source: &Region,
    src: &[Extent],
    target: &Region,
    dst: &[Extent],
) -> io::Result<()> {
    const PIECE: u64 = 256; // blocks
    let mut buf = vec![0u8; (PIECE * BLOCK_SIZE) as usize];
    let mut d = dst.iter().copied();
    let mut cur_dst: Option<Extent> = None;
    for s in src {
        let mut s_pos = s.start();
        let s_end = s.start() + s.count();
        while s_pos < s_end {
            let dext = match cur_dst.take().or_else(|| d.next()) {
                Some(e) => e,
                None => return Err(io::Error::other("copy extents do not line up")),
            };
            let n = (s_end - s_pos).min(dext.count()).min(PIECE);
            let bytes = (n * BLOCK_SIZE) as usize;
            source.read_exact_at(&mut buf[..bytes], s_pos * BLOCK_SIZE)?;
            target.write_all_at(&buf[..bytes], dext.start() * BLOCK_SIZE)?;
            s_pos += n;
            if dext.count() > n {
                cur_dst = Some(Extent(dext.start() + n, dext.count() - n));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Blob, ZstdEncoder};

    fn recompress_op(dst: Vec<Extent>) -> Operation {
        Operation::Recompress {
            dst,
            content_len: 1,
            encoder: ZstdEncoder {
                version: crate::recompress::zstd_version(),
                level: 9,
                workers: 1,
                checksum: true,
            },
            chunks: Vec::new(),
            blob: Blob {
                offset: 0,
                len: 0,
                sha256: sha256(b""),
            },
            erofs_view: false,
        }
    }

    #[test]
    fn only_operations_that_touch_what_a_recompress_operation_reads_or_writes_wait() {
        // The recompress operation reads bytes 4096..8192 and 40960..41000
        // and writes blocks 20..22.
        let hazard = Hazard {
            op: 7,
            slot: 0,
            ranges: crate::region::merge_ranges(vec![
                (4096, 8192),
                (40960, 41000),
                (20 * 4096, 22 * 4096),
            ]),
        };
        let zero = |dst: Vec<Extent>| Operation::Zero { dst };
        assert!(!hazard.conflicts(0, &zero(vec![Extent(0, 1), Extent(2, 8)])));
        assert!(
            hazard.conflicts(0, &zero(vec![Extent(0, 2)])),
            "reads block 1"
        );
        assert!(
            hazard.conflicts(0, &zero(vec![Extent(10, 1)])),
            "reads into block 10"
        );
        assert!(
            hazard.conflicts(0, &zero(vec![Extent(21, 5)])),
            "writes block 21"
        );
        assert!(!hazard.conflicts(0, &zero(vec![Extent(22, 100)])));
        // Another component may share the target's file; another
        // recompress operation may read anything: both wait.
        assert!(hazard.conflicts(1, &zero(vec![Extent(100, 1)])));
        assert!(hazard.conflicts(0, &recompress_op(vec![Extent(100, 1)])));
    }

    #[test]
    fn a_segment_is_read_back_only_once_no_operation_writes_it() {
        let per_segment = DIGEST_SEGMENT / BLOCK_SIZE;
        // Two components: the first of three segments (the last one
        // short), the second of one.
        let sizes = [2 * DIGEST_SEGMENT + 4096, 4096];
        let zero = |dst: Vec<Extent>| Operation::Zero { dst };
        let a = zero(vec![Extent(0, 1), Extent(per_segment - 1, 2)]); // segments 0, 1
        let b = zero(vec![Extent(per_segment + 5, 1)]); // segment 1
        let c = zero(vec![Extent(0, 1)]); // the second component's only one
        let ops = [(0, &a), (0, &b), (1, &c)];
        let mut s = Segments::new(&sizes, &ops);
        // Segment 2 of the first component is written by none of them.
        assert_eq!(s.ready.drain(..).collect::<Vec<_>>(), vec![(0, 2)]);
        s.written(0, &b);
        assert!(s.ready.is_empty(), "segment 1 is still written by `a`");
        s.written(0, &a);
        assert_eq!(s.ready.drain(..).collect::<Vec<_>>(), vec![(0, 0), (0, 1)]);
        s.written(1, &c);
        assert_eq!(s.ready.drain(..).collect::<Vec<_>>(), vec![(1, 0)]);
        assert_eq!(
            s.hashes.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![3, 1]
        );
        // An operation already done before a resume counts for nothing.
        let s = Segments::new(&sizes, &ops[1..]);
        assert_eq!(
            s.ready.iter().copied().collect::<Vec<_>>(),
            vec![(0, 0), (0, 2)]
        );
    }

    #[test]
    fn a_recompress_footprint_needs_a_verified_blob_that_parses() {
        // "TRCP", no prefix or suffix, one target piece of 10 bytes at 5000.
        let mut recipe = b"TRCP".to_vec();
        recipe.extend_from_slice(&0u32.to_le_bytes());
        recipe.extend_from_slice(&0u32.to_le_bytes());
        recipe.extend_from_slice(&1u32.to_le_bytes());
        recipe.push(0);
        recipe.extend_from_slice(&10u64.to_le_bytes());
        recipe.extend_from_slice(&5000u64.to_le_bytes());
        let mut compressed = Vec::with_capacity(256);
        zstd_safe::compress(&mut compressed, &recipe, 3).unwrap();
        let mut op = recompress_op(vec![Extent(3, 1)]);
        if let Operation::Recompress {
            content_len, blob, ..
        } = &mut op
        {
            *content_len = 10;
            blob.len = compressed.len() as u64;
            blob.sha256 = sha256(&compressed);
        }
        assert_eq!(
            recompress_footprint(&op, &compressed, 1 << 20),
            Some(vec![(5000, 5010), (3 * 4096, 4 * 4096)])
        );
        // A blob that is not the signed one is not parsed.
        let mut other = compressed.clone();
        other[0] ^= 1;
        assert_eq!(recompress_footprint(&op, &other, 1 << 20), None);
        // A recipe that reads past the image does not parse.
        assert_eq!(recompress_footprint(&op, &compressed, 5005), None);
        assert_eq!(
            recompress_footprint(&Operation::Zero { dst: vec![] }, &compressed, 1 << 20),
            None
        );
    }
}
