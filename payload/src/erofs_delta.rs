//! The maker's side of the erofs operation: which changed files of an
//! erofs target to re-create on the node, and their blobs.
//!
//! A changed file of an lz4-compressed erofs image shares few compressed
//! bytes with its predecessor, though its content may differ little. For
//! each compressed file of the target whose blocks changed, the maker
//! pairs it with its predecessor in the source image (the same path, or
//! the same path under the other kernel release's directory), and emits an
//! erofs operation (a bsdiff patch between the decompressed contents) when
//! two things hold: compressing the new content with this tandem's lz4hc,
//! as mkfs.erofs does, reproduces the file's blocks byte for byte, and the
//! blob is clearly smaller than what the block planner would ship.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::digest::sha256;
use crate::erofs::{self, ErofsError, Image, SourcePiece, Storage};
use crate::format::{
    Blob, Lz4Encoder, Operation, BLOCK_SIZE, MAX_BLOB_LEN, MAX_EROFS_BODY, MAX_EROFS_CONTENT,
    RECOMPRESS_CHUNK,
};
use crate::make::{MakeError, MakeOptions, MakeProgress};
use crate::plan::BlockClass;

/// lz4hc levels tried on an image, most likely first (mkfs.erofs users
/// pick 12, the best; 9 is liblz4's default).
const LEVELS: [i32; 12] = [12, 9, 10, 11, 8, 7, 6, 5, 4, 3, 2, 1];
/// How many files the level search tries before it gives up on an image.
const LEVEL_PROBES: usize = 8;

/// The kernel releases an image has modules for (`lib/modules/X/`).
fn kernel_releases(files: &[erofs::File]) -> HashSet<&str> {
    files
        .iter()
        .filter_map(|f| {
            let rest = f
                .path
                .strip_prefix("usr/lib/modules/")
                .or_else(|| f.path.strip_prefix("lib/modules/"))?;
            rest.split_once('/').map(|(release, _)| release)
        })
        .collect()
}

/// The target blocks of a file's pclusters, in order; `None` when a
/// piece is not a whole block of its own (an inline tail).
fn pcluster_blocks(file: &erofs::File) -> Option<Vec<u64>> {
    file.extents
        .iter()
        .map(|e| match e.storage {
            Storage::Lz4 { block } => Some(block),
            Storage::Plain { offset } => (offset % BLOCK_SIZE == 0).then_some(offset / BLOCK_SIZE),
        })
        .collect()
}

/// An operation and its blob.
type Planned = (Operation, Vec<u8>);

struct Candidate<'f> {
    new: &'f erofs::File,
    old: Option<&'f erofs::File>,
    blocks: Vec<u64>,
    literal_blocks: u64,
}

/// Whether compressing `content` at `level` gives exactly `blocks` of the
/// target: their bytes when it does.
fn reproduces(
    content: &[u8],
    level: i32,
    blocks: &[u64],
    target: &File,
) -> Result<Option<Vec<u8>>, MakeError> {
    let mut bytes = vec![0u8; blocks.len() * BLOCK_SIZE as usize];
    let mut i = 0usize;
    let outcome = erofs::compress_file(content, level, &mut |p| {
        let Some(&b) = blocks.get(i) else {
            return Err(ErofsError::Body("mismatch"));
        };
        let buf = &mut bytes[i * BLOCK_SIZE as usize..(i + 1) * BLOCK_SIZE as usize];
        target.read_exact_at(buf, b * BLOCK_SIZE)?;
        i += 1;
        if buf[..] == p.block[..] {
            Ok(())
        } else {
            Err(ErofsError::Body("mismatch"))
        }
    });
    match outcome {
        Ok(kept) => Ok((kept && i == blocks.len()).then_some(bytes)),
        Err(ErofsError::Io(error)) => Err(MakeError::Io {
            context: "reading the target's erofs blocks".into(),
            error,
        }),
        Err(_) => Ok(None),
    }
}

/// Plans erofs operations for a delta between two erofs images; marks the
/// blocks they write as claimed. Returns nothing when either image is not
/// an erofs image this reader maps.
pub(crate) fn plan(
    target: &File,
    target_size: u64,
    source: &File,
    source_size: u64,
    classes: &mut [BlockClass],
    opts: &MakeOptions,
    progress: &(dyn Fn(MakeProgress) + Sync),
) -> Result<Vec<Planned>, MakeError> {
    let read_target = |buf: &mut [u8], off: u64| target.read_exact_at(buf, off);
    let read_source = |buf: &mut [u8], off: u64| source.read_exact_at(buf, off);
    let (Ok(new_img), Ok(old_img)) = (
        Image::open(&read_target, target_size),
        Image::open(&read_source, source_size),
    ) else {
        return Ok(Vec::new());
    };
    progress(MakeProgress {
        phase: "reading erofs files",
        done: 0,
        total: 1,
    });
    let (Ok(new_files), Ok(old_files)) = (new_img.files(), old_img.files()) else {
        return Ok(Vec::new());
    };
    let old_by_path: HashMap<&str, &erofs::File> =
        old_files.iter().map(|f| (f.path.as_str(), f)).collect();
    let (old_rel, new_rel) = (kernel_releases(&old_files), kernel_releases(&new_files));
    let rename = match (old_rel.len(), new_rel.len()) {
        (1, 1) if old_rel != new_rel => old_rel
            .iter()
            .zip(&new_rel)
            .next()
            .map(|(o, n)| (n.to_string(), o.to_string())),
        _ => None,
    };
    let mut candidates = Vec::new();
    let mut taken: HashSet<u64> = HashSet::new();
    for f in &new_files {
        if !f.is_compressed() || f.size > MAX_EROFS_CONTENT {
            continue;
        }
        let Some(blocks) = pcluster_blocks(f) else {
            continue;
        };
        if blocks
            .iter()
            .any(|&b| b as usize >= classes.len() || classes[b as usize] == BlockClass::Claimed)
        {
            continue;
        }
        // Blocks shared with a file already taken (deduplicated images)
        // stay with the block planner.
        if !blocks.iter().all(|&b| taken.insert(b)) {
            continue;
        }
        let literal_blocks = blocks
            .iter()
            .filter(|&&b| classes[b as usize] == BlockClass::Literal)
            .count() as u64;
        if literal_blocks == 0 {
            continue;
        }
        let old = old_by_path.get(f.path.as_str()).copied().or_else(|| {
            let (new, old) = rename.as_ref()?;
            old_by_path.get(f.path.replace(new, old).as_str()).copied()
        });
        let old = old.filter(|o| o.size <= MAX_EROFS_CONTENT);
        candidates.push(Candidate {
            new: f,
            old,
            blocks,
            literal_blocks,
        });
    }
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    // The image's lz4hc level: the first that reproduces one of the first
    // few candidates.
    let mut level = None;
    'probe: for c in candidates.iter().take(LEVEL_PROBES) {
        let content = new_img.read_file(c.new).map_err(erofs_err)?;
        for l in LEVELS {
            if reproduces(&content, l, &c.blocks, target)?.is_some() {
                level = Some(l);
                break 'probe;
            }
        }
    }
    let Some(level) = level else {
        return Ok(Vec::new());
    };
    let encoder = Lz4Encoder {
        version: erofs::lz4_version(),
        level,
    };
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Planned>>> =
        Mutex::new((0..candidates.len()).map(|_| None).collect());
    let failure: Mutex<Option<MakeError>> = Mutex::new(None);
    let work = || -> Result<(), MakeError> {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(c) = candidates.get(i) else {
                return Ok(());
            };
            if let Some(op) = plan_file(c, &new_img, &old_img, target, &encoder, opts)? {
                if let Ok(mut r) = results.lock() {
                    r[i] = Some(op);
                }
            }
            let d = done.fetch_add(1, Ordering::Relaxed) + 1;
            progress(MakeProgress {
                phase: "re-creating erofs files",
                done: d as u64,
                total: candidates.len() as u64,
            });
        }
    };
    std::thread::scope(|scope| {
        for _ in 0..opts.threads.max(1) {
            scope.spawn(|| {
                if let Err(e) = work() {
                    if let Ok(mut f) = failure.lock() {
                        f.get_or_insert(e);
                    }
                    // Stop the others at the next file.
                    next.store(usize::MAX / 2, Ordering::Relaxed);
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().ok().flatten() {
        return Err(e);
    }
    let results = results.into_inner().unwrap_or_default();
    let mut out = Vec::new();
    for (c, r) in candidates.iter().zip(results) {
        if let Some(op) = r {
            for &b in &c.blocks {
                classes[b as usize] = BlockClass::Claimed;
            }
            out.push(op);
        }
    }
    Ok(out)
}

fn erofs_err(e: ErofsError) -> MakeError {
    match e {
        ErofsError::Io(error) => MakeError::Io {
            context: "reading an erofs image".into(),
            error,
        },
        other => MakeError::Erofs(other),
    }
}

/// One file's operation, or `None` when it does not reproduce or does not
/// pay.
fn plan_file(
    c: &Candidate<'_>,
    new_img: &Image<'_>,
    old_img: &Image<'_>,
    target: &File,
    encoder: &Lz4Encoder,
    opts: &MakeOptions,
) -> Result<Option<Planned>, MakeError> {
    // A file that does not decode is left to the block planner.
    let Ok(new) = new_img.read_file(c.new) else {
        return Ok(None);
    };
    let Some(bytes) = reproduces(&new, encoder.level, &c.blocks, target)? else {
        return Ok(None);
    };
    let (old, pieces) = match c.old.map(|o| (old_img.read_file(o), o)) {
        Some((Ok(bytes), o)) => (bytes, SourcePiece::of(o)),
        _ => (Vec::new(), Vec::new()),
    };
    let patch = crate::bsdiff::diff(&old, &new);
    let body = erofs::encode_body(&pieces, &patch);
    if body.len() as u64 > MAX_EROFS_BODY {
        return Ok(None);
    }
    let blob = crate::make::zstd_compress(&body, None, opts.level)?;
    // The block planner would ship the changed blocks, which lz4 has
    // already compressed: worth it only when clearly smaller.
    if blob.len() as u64 > MAX_BLOB_LEN
        || blob.len() as u64 * 10 > c.literal_blocks * BLOCK_SIZE * 8
    {
        return Ok(None);
    }
    let chunks = bytes
        .chunks(RECOMPRESS_CHUNK as usize)
        .map(sha256)
        .collect();
    let op = Operation::Erofs {
        dst: crate::make::plan_extents(&c.blocks),
        content_len: new.len() as u64,
        encoder: *encoder,
        chunks,
        blob: Blob {
            offset: 0,
            len: blob.len() as u64,
            sha256: sha256(&blob),
        },
    };
    Ok(Some((op, blob)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Extent;
    use std::io;

    #[test]
    fn consecutive_blocks_merge_into_extents() {
        assert_eq!(
            crate::make::plan_extents(&[5, 6, 7, 9, 10, 3]),
            vec![Extent(5, 3), Extent(9, 2), Extent(3, 1)]
        );
        assert!(crate::make::plan_extents(&[]).is_empty());
    }

    #[test]
    fn io_errors_keep_their_context() {
        let e = erofs_err(ErofsError::Io(io::Error::other("disk gone")));
        assert!(e.to_string().contains("reading an erofs image"), "{e}");
    }
}
