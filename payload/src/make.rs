//! Making payloads: reads the images, asks [`crate::plan`] what to do with
//! each block, encodes the new bytes on every core, and writes the signed
//! file. Memory stays bounded: the source's block and anchor indexes (about
//! 30 bytes per 4 KiB of source) and a few chunks in flight.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::bsdiff;
use crate::container::{write_payload, PayloadError};
use crate::digest::{digest_file, sha256, worker_count};
use crate::format::{
    self, total_blocks, Blob, Component, Extent, ImageRef, Manifest, Operation, BLOCK_SIZE,
    MAX_BLOB_LEN, MAX_BSDIFF_BODY, MAX_OP_OUTPUT, MAX_RECIPE_BODY, MAX_RECOMPRESS_OUTPUT,
    MAX_REFERENCE_LEN, RECOMPRESS_CHUNK,
};
use crate::plan::{self, AnchorIndex, BlockClass, Grouping, PlannedOp};
use crate::recompress::{self, RecompressError, TargetIndex};
use crate::sign::SigningKey;

const BS: usize = BLOCK_SIZE as usize;
/// Images are read in pieces of this size.
const READ_CHUNK: usize = 4 << 20;

/// Why a payload could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MakeError {
    #[error("{context}: {error}")]
    Io { context: String, error: io::Error },
    #[error("image {path}: {problem}")]
    Image { path: PathBuf, problem: String },
    #[error("zstd: {0}")]
    Zstd(&'static str),
    #[error(transparent)]
    Recompress(#[from] RecompressError),
    #[error("erofs: {0}")]
    Erofs(crate::erofs::ErofsError),
    #[error(transparent)]
    Payload(#[from] PayloadError),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> MakeError {
    let context = context.into();
    move |error| MakeError::Io { context, error }
}

/// Tuning of the maker; the defaults are what `tandem-release` uses.
#[derive(Debug, Clone)]
pub struct MakeOptions {
    /// zstd level for every blob.
    pub level: i32,
    pub threads: usize,
    pub grouping: Grouping,
    /// Most source blocks one patch may use as its reference.
    pub reference_blocks: u64,
    /// Name of the (single) component.
    pub component: String,
    /// Also diff each changed chunk with bsdiff against its reference and
    /// keep the smaller (format version 2; off for payloads that nodes
    /// older than it must read).
    pub bsdiff: bool,
    /// In a delta, re-create compressed bytes on the node where this
    /// tandem's compressor reproduces them exactly: changed zstd streams
    /// from their uncompressed content (format version 3), and changed
    /// files of an lz4-compressed erofs image from their predecessors
    /// (format version 4).
    pub recompress: bool,
}

impl Default for MakeOptions {
    fn default() -> Self {
        MakeOptions {
            level: 19,
            threads: worker_count(),
            grouping: Grouping {
                literal_blocks: MAX_OP_OUTPUT / BLOCK_SIZE / 2,
                bulk_blocks: 16384,
            },
            // Twice the chunk: room for a changed file's predecessor and its
            // neighbours, while zstd's cost of indexing the prefix stays
            // within a few times the cost of compressing the chunk.
            reference_blocks: (MAX_OP_OUTPUT / BLOCK_SIZE).min(MAX_REFERENCE_LEN / BLOCK_SIZE),
            component: "usr".into(),
            bsdiff: true,
            recompress: true,
        }
    }
}

/// An image to read: its path and the version it is.
#[derive(Debug, Clone, Copy)]
pub struct ImageInput<'a> {
    pub path: &'a Path,
    pub version: &'a str,
}

/// Progress of a long step: `done` of `total` units of `phase`.
#[derive(Debug, Clone, Copy)]
pub struct MakeProgress {
    pub phase: &'static str,
    pub done: u64,
    pub total: u64,
}

/// Makes a full payload (`source` is `None`) or a delta, and writes it to
/// `out` (through a temporary file renamed into place). One component,
/// named by `opts.component`.
pub fn make_payload(
    target: ImageInput<'_>,
    source: Option<ImageInput<'_>>,
    key: &SigningKey,
    opts: &MakeOptions,
    out: &Path,
    progress: &(dyn Fn(MakeProgress) + Sync),
) -> Result<Manifest, MakeError> {
    let component = ComponentInput {
        name: opts.component.clone(),
        target: target.path.to_path_buf(),
        source: source.map(|s| s.path.to_path_buf()),
        file: false,
    };
    make_components(
        &[component],
        target.version,
        source.map(|s| s.version),
        key,
        opts,
        out,
        progress,
    )
}

/// One component to make: its target image and, for a delta, the source.
#[derive(Debug, Clone)]
pub struct ComponentInput {
    pub name: String,
    pub target: PathBuf,
    pub source: Option<PathBuf>,
    /// A file of any length (a UKI, an addon), padded with zeros to whole
    /// blocks in the payload; its exact length goes in `file_len`. An
    /// image (`false`) must be whole blocks.
    pub file: bool,
}

/// Makes a payload of several components of one slot (the `/usr` image,
/// its hash tree, its boot artifacts), in the order given.
pub fn make_components(
    components: &[ComponentInput],
    target_version: &str,
    source_version: Option<&str>,
    key: &SigningKey,
    opts: &MakeOptions,
    out: &Path,
    progress: &(dyn Fn(MakeProgress) + Sync),
) -> Result<Manifest, MakeError> {
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let data_path = temp_path(dir, out, "data");
    let data_file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&data_path)
        .map_err(io_err(format!("creating {}", data_path.display())))?;
    let mut made = Vec::new();
    let mut data_len = 0u64;
    let mut result = Ok(());
    for (i, input) in components.iter().enumerate() {
        let padded = |path: &Path, what: &str| -> Result<Option<PathBuf>, MakeError> {
            if !input.file {
                return Ok(None);
            }
            let copy = temp_path(dir, out, &format!("{i}-{what}"));
            pad_copy(path, &copy)?;
            Ok(Some(copy))
        };
        let step = (|| {
            let target_copy = padded(&input.target, "target")?;
            let source_copy = match &input.source {
                Some(source) => padded(source, "source")?,
                None => None,
            };
            let target_path = target_copy.as_deref().unwrap_or(&input.target);
            let source_path = source_copy.as_deref().or(input.source.as_deref());
            let made_one = make_component(
                &input.name,
                target_path,
                source_path,
                opts,
                &data_file,
                data_len,
                progress,
            );
            for copy in [&target_copy, &source_copy].into_iter().flatten() {
                let _ = std::fs::remove_file(copy);
            }
            let (mut component, len) = made_one?;
            if input.file {
                component.file_len = Some(
                    std::fs::metadata(&input.target)
                        .map_err(io_err(format!("sizing {}", input.target.display())))?
                        .len(),
                );
            }
            Ok::<_, MakeError>((component, len))
        })();
        match step {
            Ok((component, len)) => {
                data_len += len;
                made.push(component);
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if let Err(e) = result {
        let _ = std::fs::remove_file(&data_path);
        return Err(e);
    }
    let manifest = Manifest {
        format_version: format::version_for(made.iter().flat_map(|c| &c.operations)),
        block_size: BLOCK_SIZE,
        target_version: target_version.to_owned(),
        source_version: source_version
            .filter(|_| made.iter().any(|c| c.source.is_some()))
            .map(str::to_owned),
        data_len,
        components: made,
    };
    let written = write_final(out, dir, &manifest, key, &data_file);
    let _ = std::fs::remove_file(&data_path);
    written?;
    Ok(manifest)
}

/// Copies a file, padded with zeros to whole blocks.
fn pad_copy(from: &Path, to: &Path) -> Result<(), MakeError> {
    std::fs::copy(from, to).map_err(io_err(format!("copying {}", from.display())))?;
    let file = File::options()
        .write(true)
        .open(to)
        .map_err(io_err(format!("opening {}", to.display())))?;
    let len = crate::files::file_len(&file).map_err(io_err(format!("sizing {}", to.display())))?;
    if len == 0 {
        return Err(MakeError::Image {
            path: from.to_owned(),
            problem: "the file is empty".into(),
        });
    }
    file.set_len(len.next_multiple_of(BLOCK_SIZE))
        .map_err(io_err(format!("padding {}", to.display())))
}

/// One component's operations, its blobs appended to `data_file` (whose
/// first `base` bytes are earlier components'). Returns it and the bytes
/// its blobs take.
fn make_component(
    name: &str,
    target: &Path,
    source: Option<&Path>,
    opts: &MakeOptions,
    data_file: &File,
    base: u64,
    progress: &(dyn Fn(MakeProgress) + Sync),
) -> Result<(Component, u64), MakeError> {
    let target_file = open_image(target)?;
    let target_size = image_size(&target_file, target)?;
    progress(MakeProgress {
        phase: "hashing images",
        done: 0,
        total: 1,
    });
    let target_digest = digest_file(&target_file, target_size)
        .map_err(io_err(format!("hashing {}", target.display())))?;
    let source_state = match source {
        Some(path) => {
            let file = open_image(path)?;
            let size = image_size(&file, path)?;
            let digest =
                digest_file(&file, size).map_err(io_err(format!("hashing {}", path.display())))?;
            let index = index_source(&file, size, opts.threads, progress)
                .map_err(io_err(format!("reading {}", path.display())))?;
            Some((file, size, digest, index))
        }
        None => None,
    };
    let source_view = source_state
        .as_ref()
        .map(|(file, size, _, index)| SourceView {
            file,
            blocks: size / BLOCK_SIZE,
            index,
        });
    let classes = classify_target(
        &target_file,
        target_size,
        source_view.as_ref(),
        opts.threads,
        progress,
    )
    .map_err(io_err(format!("reading {}", target.display())))?;
    let mut classes = classes;
    let erofs_ops = match &source_state {
        Some((file, size, _, _)) if opts.recompress => crate::erofs_delta::plan(
            &target_file,
            target_size,
            file,
            *size,
            &mut classes,
            opts,
            progress,
        )?,
        _ => Vec::new(),
    };
    let recompressed = if source_view.is_some() && opts.recompress {
        plan_recompress(&target_file, target_size, &mut classes, opts, progress)?
    } else {
        Vec::new()
    };
    // Recompress operations read target blocks that the operations before
    // them write. They go right after the operations that write what they
    // read, so that a node runs the rest beside them.
    let mut reads = Vec::new();
    for (op, blob) in &recompressed {
        reads.extend(
            crate::apply::recompress_footprint(op, blob, target_size).ok_or(
                RecompressError::Malformed("a recipe this maker made does not parse"),
            )?,
        );
    }
    let reads = crate::region::merge_ranges(reads);
    let (mut before, mut after) = (classes.clone(), classes);
    for (block, (b, a)) in before.iter_mut().zip(after.iter_mut()).enumerate() {
        let at = block as u64 * BLOCK_SIZE;
        if crate::region::overlaps_any(&reads, at, at + BLOCK_SIZE) {
            *a = plan::BlockClass::Claimed;
        } else {
            *b = plan::BlockClass::Claimed;
        }
    }
    let (erofs_before, erofs_after): (Vec<_>, Vec<_>) = erofs_ops
        .into_iter()
        .partition(|(op, _)| crate::apply::writes_into(&reads, op.dst()));
    let mut operations = Vec::new();
    let encode = |classes: Vec<plan::BlockClass>, start: u64, ops: &mut Vec<Operation>| {
        let planned = plan::group_blocks(&classes, opts.grouping);
        drop(classes);
        let (encoded, end) = encode_all(
            &planned,
            &target_file,
            source_view.as_ref(),
            opts,
            data_file,
            start,
            progress,
        )?;
        ops.extend(encoded);
        Ok::<_, MakeError>(end)
    };
    let mut data_len = encode(before, 0, &mut operations)?;
    let apart = erofs_before.into_iter().chain(recompressed);
    data_len = append_encoded(apart, data_file, data_len, &mut operations)?;
    data_len = encode(after, data_len, &mut operations)?;
    data_len = append_encoded(erofs_after, data_file, data_len, &mut operations)?;
    for op in &mut operations {
        if let Some(blob) = op.blob_mut() {
            blob.offset += base;
        }
    }
    Ok((
        Component {
            name: name.to_owned(),
            target: ImageRef {
                size: target_size,
                digest: target_digest,
            },
            source: source_state.as_ref().map(|(_, size, digest, _)| ImageRef {
                size: *size,
                digest: digest.clone(),
            }),
            file_len: None,
            operations,
        },
        data_len,
    ))
}

/// Appends operations planned apart (erofs, recompress) and their blobs
/// to the data section from `data_len`; returns where it then ends.
fn append_encoded(
    encoded: impl IntoIterator<Item = Encoded>,
    data_file: &File,
    mut data_len: u64,
    operations: &mut Vec<Operation>,
) -> Result<u64, MakeError> {
    let mut writer = data_file;
    for (mut op, blob) in encoded {
        place_blob(&mut writer, &mut op, &blob, &mut data_len)?;
        operations.push(op);
    }
    Ok(data_len)
}

/// Writes an operation's blob where the data section ends (`end`), points
/// the operation at it, and moves `end` past it.
fn place_blob(
    writer: &mut impl Write,
    op: &mut Operation,
    blob: &[u8],
    end: &mut u64,
) -> Result<(), MakeError> {
    writer
        .write_all(blob)
        .map_err(io_err("writing the data section"))?;
    if let Some(b) = op.blob_mut() {
        b.offset = *end;
    }
    *end += blob.len() as u64;
    Ok(())
}

fn temp_path(dir: &Path, out: &Path, what: &str) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "payload".into());
    dir.join(format!(".{name}.{what}.{}", std::process::id()))
}

fn write_final(
    out: &Path,
    dir: &Path,
    manifest: &Manifest,
    key: &SigningKey,
    data_file: &File,
) -> Result<(), MakeError> {
    let tmp = temp_path(dir, out, "tmp");
    let result = (|| {
        let file = File::create(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
        let mut writer = BufWriter::with_capacity(1 << 20, file);
        let mut data = data_file;
        data.seek(SeekFrom::Start(0))
            .map_err(io_err("rewinding the data section"))?;
        write_payload(&mut writer, manifest, key, &mut data)?;
        let file = writer.into_inner().map_err(|e| MakeError::Io {
            context: format!("writing {}", tmp.display()),
            error: e.into_error(),
        })?;
        file.sync_all()
            .map_err(io_err(format!("syncing {}", tmp.display())))?;
        std::fs::rename(&tmp, out).map_err(io_err(format!("renaming to {}", out.display())))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn open_image(path: &Path) -> Result<File, MakeError> {
    File::open(path).map_err(io_err(format!("opening {}", path.display())))
}

/// Size of a regular file or block device.
pub fn image_size(file: &File, path: &Path) -> Result<u64, MakeError> {
    let size =
        crate::files::file_len(file).map_err(io_err(format!("sizing {}", path.display())))?;
    if size == 0 || !size.is_multiple_of(BLOCK_SIZE) {
        return Err(MakeError::Image {
            path: path.to_owned(),
            problem: format!("size {size} is not a positive multiple of 4096 bytes"),
        });
    }
    Ok(size)
}

struct SourceView<'a> {
    file: &'a File,
    blocks: u64,
    index: &'a SourceIndex,
}

/// Where each source block's content is, and where its anchors are.
struct SourceIndex {
    /// xxh3 of a block's bytes -> the first source block with them.
    blocks: HashMap<u64, u32>,
    anchors: AnchorIndex,
}

fn block_hash(block: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(block)
}

/// Splits `0..blocks` into `parts` contiguous ranges.
fn split_range(blocks: u64, parts: usize) -> Vec<(u64, u64)> {
    let parts = parts.max(1) as u64;
    let per = blocks.div_ceil(parts).max(1);
    (0..parts)
        .map(|i| (i * per, ((i + 1) * per).min(blocks)))
        .filter(|(a, b)| a < b)
        .collect()
}

/// Reads blocks `0..blocks` of `file` on `threads` threads, each over its
/// own contiguous range in chunks of up to [`READ_CHUNK`], reporting
/// progress as `phase`. `scan(first_block, bytes, state)` sees every chunk
/// of a range in order; the per-range states come back in range order.
fn scan_parallel<T, F>(
    file: &File,
    blocks: u64,
    threads: usize,
    phase: &'static str,
    progress: &(dyn Fn(MakeProgress) + Sync),
    scan: &F,
) -> io::Result<Vec<T>>
where
    T: Default + Send,
    F: Fn(u64, &[u8], &mut T) -> io::Result<()> + Sync,
{
    let done = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let handles: Vec<_> = split_range(blocks, threads)
            .into_iter()
            .map(|(first, end)| {
                let done = &done;
                scope.spawn(move || -> io::Result<T> {
                    let mut state = T::default();
                    let mut buf = vec![0u8; READ_CHUNK];
                    let mut block = first;
                    while block < end {
                        let n = ((end - block) as usize * BS).min(READ_CHUNK);
                        file.read_exact_at(&mut buf[..n], block * BLOCK_SIZE)?;
                        scan(block, &buf[..n], &mut state)?;
                        block += (n / BS) as u64;
                        let d = done.fetch_add(n / BS, Ordering::Relaxed) + n / BS;
                        progress(MakeProgress {
                            phase,
                            done: d as u64,
                            total: blocks,
                        });
                    }
                    Ok(state)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("reading thread panicked")))
            })
            .collect()
    })
}

/// One thread's share of the source index: (block hash, block) pairs and
/// (anchor hash, block) pairs.
type IndexPart = (Vec<(u64, u32)>, Vec<(u64, u32)>);

fn index_source(
    file: &File,
    size: u64,
    threads: usize,
    progress: &(dyn Fn(MakeProgress) + Sync),
) -> io::Result<SourceIndex> {
    let parts = scan_parallel(
        file,
        size / BLOCK_SIZE,
        threads,
        "indexing source",
        progress,
        &|block, bytes, (hashes, anchors): &mut IndexPart| {
            for (i, b) in bytes.chunks(BS).enumerate() {
                if !plan::is_zero(b) {
                    hashes.push((block_hash(b), (block + i as u64) as u32));
                }
            }
            plan::for_each_anchor(bytes, |h, off| {
                anchors.push((h, (block + (off / BS) as u64) as u32));
            });
            Ok(())
        },
    )?;
    let mut map = HashMap::new();
    let mut all_anchors = Vec::new();
    for (hashes, anchors) in parts {
        for (h, b) in hashes {
            map.entry(h).or_insert(b);
        }
        all_anchors.extend(anchors);
    }
    Ok(SourceIndex {
        blocks: map,
        anchors: AnchorIndex::from_entries(all_anchors),
    })
}

/// What one target block is, given the source block at the same position
/// (when there is one).
fn classify_block(
    here: u64,
    block: &[u8],
    same: Option<&[u8]>,
    source: Option<&SourceView<'_>>,
    other: &mut [u8],
) -> io::Result<BlockClass> {
    if plan::is_zero(block) {
        return Ok(BlockClass::Zero);
    }
    let Some(s) = source else {
        return Ok(BlockClass::Literal);
    };
    if same == Some(block) {
        return Ok(BlockClass::Copy(here));
    }
    if let Some(&src) = s.index.blocks.get(&block_hash(block)) {
        s.file.read_exact_at(other, u64::from(src) * BLOCK_SIZE)?;
        if other == block {
            return Ok(BlockClass::Copy(u64::from(src)));
        }
    }
    Ok(BlockClass::Literal)
}

/// One matching thread's results and its reusable buffers.
#[derive(Default)]
struct ClassifyState {
    classes: Vec<BlockClass>,
    same: Vec<u8>,
    other: Vec<u8>,
}

fn classify_target(
    target: &File,
    size: u64,
    source: Option<&SourceView<'_>>,
    threads: usize,
    progress: &(dyn Fn(MakeProgress) + Sync),
) -> io::Result<Vec<BlockClass>> {
    let parts = scan_parallel(
        target,
        size / BLOCK_SIZE,
        threads,
        "matching target blocks",
        progress,
        &|block, bytes, state: &mut ClassifyState| {
            let ClassifyState {
                classes,
                same,
                other,
            } = state;
            // The source at the same position: the usual match.
            same.clear();
            if let Some(s) = source.filter(|s| block < s.blocks) {
                let len = bytes.len().min(((s.blocks - block) as usize) * BS);
                same.resize(len, 0);
                s.file.read_exact_at(same, block * BLOCK_SIZE)?;
            }
            other.resize(BS, 0);
            let same_blocks = same.chunks(BS).map(Some).chain(std::iter::repeat(None));
            for (i, (b, same)) in bytes.chunks(BS).zip(same_blocks).enumerate() {
                classes.push(classify_block(block + i as u64, b, same, source, other)?);
            }
            Ok(())
        },
    )?;
    Ok(parts.into_iter().flat_map(|p| p.classes).collect())
}

/// Smallest content of a zstd stream worth re-creating.
const MIN_RECOMPRESS_CONTENT: u64 = 1 << 20;

/// A changed zstd stream this tandem's zstd reproduces, and where it is.
struct Stream {
    frame: recompress::Frame,
    encoder: format::ZstdEncoder,
    /// The destination blocks, in the order the bytes go.
    dst: Vec<Extent>,
    /// The destination bytes as the target has them.
    bytes: Vec<u8>,
    /// Where the stream's bytes are among them (erofs files), or `None`
    /// for one contiguous run from `frame.offset`.
    layout: Option<recompress::Layout>,
}

/// Finds the changed zstd streams of the target that this tandem's zstd
/// reproduces, plans a recompress operation for each (claiming its blocks
/// in `classes`) and returns them with their blobs. On an erofs target the
/// streams are found in its files, and their content in its decompressed
/// files.
fn plan_recompress(
    target: &File,
    size: u64,
    classes: &mut [plan::BlockClass],
    opts: &MakeOptions,
    progress: &(dyn Fn(MakeProgress) + Sync),
) -> Result<Vec<Encoded>, MakeError> {
    use plan::BlockClass;
    let read = |buf: &mut [u8], off: u64| target.read_exact_at(buf, off);
    let reading = || io_err("reading the target for zstd streams");
    progress(MakeProgress {
        phase: "finding zstd streams",
        done: 0,
        total: 1,
    });
    let erofs_files = {
        let image = crate::erofs::Image::open(&read, size).ok();
        image.and_then(|i| i.files().ok())
    };
    let streams = match &erofs_files {
        Some(files) => erofs_streams(target, files, classes, progress)?,
        None => raw_streams(target, size, classes, progress)?,
    };
    if streams.is_empty() {
        return Ok(Vec::new());
    }
    let forbidden: Vec<(u64, u64)> = streams
        .iter()
        .flat_map(|s| &s.dst)
        .map(|e| (e.start() * BLOCK_SIZE, (e.start() + e.count()) * BLOCK_SIZE))
        .collect();
    // Every other written block of the target, by content; on an erofs
    // target, whose files are compressed, the files' decompressed bytes.
    progress(MakeProgress {
        phase: "indexing target for zstd streams",
        done: 0,
        total: 1,
    });
    let view = erofs_files
        .as_ref()
        .map(|files| crate::erofs::View::of_files(files, &forbidden));
    let read_view = |buf: &mut [u8], off: u64| match &view {
        Some(v) => v.read(&read, buf, off),
        None => read(buf, off),
    };
    let mut index = TargetIndex::new();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut pos = 0u64;
    if let Some(v) = &view {
        while pos + BLOCK_SIZE <= v.len() {
            let n = ((v.len() - pos) as usize).min(READ_CHUNK) / BS * BS;
            read_view(&mut buf[..n], pos).map_err(reading())?;
            for (i, b) in buf[..n].chunks(BS).enumerate() {
                index.insert(pos / BLOCK_SIZE + i as u64, b);
            }
            pos += n as u64;
        }
    }
    while view.is_none() && pos < size {
        let n = ((size - pos) as usize).min(READ_CHUNK);
        read(&mut buf[..n], pos).map_err(reading())?;
        for (i, b) in buf[..n].chunks(BS).enumerate() {
            let block = pos / BLOCK_SIZE + i as u64;
            let at = block * BLOCK_SIZE;
            let written = matches!(
                classes[block as usize],
                BlockClass::Copy(_) | BlockClass::Literal
            );
            if written && !forbidden.iter().any(|&(a, b)| (a..b).contains(&at)) {
                index.insert(block, b);
            }
        }
        pos += n as u64;
    }
    let mut out = Vec::new();
    for st in streams {
        let (space, skip) = match &view {
            Some(v) => (v.len(), &[][..]),
            None => (size, &forbidden[..]),
        };
        let mut pieces =
            recompress::match_content(&st.frame.content, &index, space, skip, &read_view)
                .map_err(reading())?;
        let body = match (&view, &st.layout) {
            (Some(v), Some(layout)) => {
                let table = compact_view(v, &mut pieces);
                recompress::encode_recipe_view(
                    layout,
                    st.bytes.len() as u64,
                    &table,
                    &pieces,
                    &st.frame.content,
                )
            }
            _ => {
                let start = st.dst[0].start() * BLOCK_SIZE;
                let head = (st.frame.offset - start) as usize;
                let tail = head + st.frame.stream_len as usize;
                recompress::encode_recipe(
                    &st.bytes[..head],
                    &st.bytes[tail..],
                    &pieces,
                    &st.frame.content,
                )
            }
        };
        if body.len() as u64 > MAX_RECIPE_BODY {
            continue;
        }
        let blob = zstd_compress(&body, None, opts.level)?;
        if blob.len() as u64 > MAX_BLOB_LEN || blob.len() as u64 * 2 > st.frame.stream_len {
            continue;
        }
        let chunks = st
            .bytes
            .chunks(RECOMPRESS_CHUNK as usize)
            .map(sha256)
            .collect();
        for e in &st.dst {
            classes[e.start() as usize..(e.start() + e.count()) as usize].fill(BlockClass::Claimed);
        }
        out.push((
            Operation::Recompress {
                dst: st.dst,
                content_len: st.frame.content.len() as u64,
                encoder: st.encoder,
                chunks,
                blob: Blob {
                    offset: 0,
                    len: blob.len() as u64,
                    sha256: sha256(&blob),
                },
                erofs_view: st.layout.is_some(),
            },
            blob,
        ));
    }
    Ok(out)
}

/// The changed zstd streams of a target read as blocks: each contiguous,
/// from a frame header in a changed block.
fn raw_streams(
    target: &File,
    size: u64,
    classes: &[plan::BlockClass],
    progress: &(dyn Fn(MakeProgress) + Sync),
) -> Result<Vec<Stream>, MakeError> {
    use plan::BlockClass;
    let read = |buf: &mut [u8], off: u64| target.read_exact_at(buf, off);
    let reading = || io_err("reading the target for zstd streams");
    let block_of = |off: u64| (off / BLOCK_SIZE) as usize;
    let changed = |off: u64| classes.get(block_of(off)) == Some(&BlockClass::Literal);
    let headers = recompress::find_frame_headers(&read, size, MIN_RECOMPRESS_CONTENT, &changed)
        .map_err(reading())?;
    let mut streams = Vec::new();
    let mut free_from = 0u64;
    for (i, &off) in headers.iter().enumerate() {
        progress(MakeProgress {
            phase: "reproducing zstd streams",
            done: i as u64,
            total: headers.len() as u64,
        });
        if off < free_from {
            continue;
        }
        let Some(frame) = recompress::decode_frame(&read, size, off).map_err(reading())? else {
            continue;
        };
        let first = block_of(off);
        let end = block_of((off + frame.stream_len).div_ceil(BLOCK_SIZE) * BLOCK_SIZE);
        let blocks = &classes[first..end];
        let changed = blocks.iter().filter(|c| **c == BlockClass::Literal).count();
        if changed * 2 < blocks.len() || (end - first) as u64 * BLOCK_SIZE > MAX_RECOMPRESS_OUTPUT {
            continue;
        }
        // The op's blocks, read once: the stream and the bytes around it.
        let start = first as u64 * BLOCK_SIZE;
        let mut bytes = vec![0u8; (end - first) * BS];
        read(&mut bytes, start).map_err(reading())?;
        let head = (off - start) as usize;
        let stream = &bytes[head..head + frame.stream_len as usize];
        let Some(encoder) = recompress::find_encoder(&frame.content, stream, frame.checksum)?
        else {
            continue;
        };
        free_from = off + frame.stream_len;
        streams.push(Stream {
            frame,
            encoder,
            dst: vec![Extent(first as u64, (end - first) as u64)],
            bytes,
            layout: None,
        });
    }
    Ok(streams)
}

/// The changed zstd streams in the uncompressed files of an erofs target
/// (an initrd): a file's bytes may lie in two places (its tail inline,
/// beside its inode), so each stream carries its layout.
fn erofs_streams(
    target: &File,
    files: &[crate::erofs::File],
    classes: &[plan::BlockClass],
    progress: &(dyn Fn(MakeProgress) + Sync),
) -> Result<Vec<Stream>, MakeError> {
    use crate::erofs::Storage;
    use plan::BlockClass;
    let reading = || io_err("reading the target for zstd streams");
    let mut streams = Vec::new();
    let mut taken = std::collections::HashSet::new();
    let candidates: Vec<&crate::erofs::File> = files
        .iter()
        .filter(|f| {
            f.size >= BLOCK_SIZE
                && f.size <= MAX_RECOMPRESS_OUTPUT
                && !f.is_compressed()
                && f.extents.first().is_some_and(|e| e.logical == 0)
        })
        .collect();
    for (i, f) in candidates.iter().enumerate() {
        progress(MakeProgress {
            phase: "reproducing zstd streams",
            done: i as u64,
            total: candidates.len() as u64,
        });
        let mut magic = [0u8; 4];
        let Some(Storage::Plain { offset }) = f.extents.first().map(|e| e.storage) else {
            continue;
        };
        target
            .read_exact_at(&mut magic, offset)
            .map_err(reading())?;
        if magic != [0x28, 0xb5, 0x2f, 0xfd] {
            continue;
        }
        // The file's bytes in the image, and the blocks they touch.
        let mut content = Vec::with_capacity(f.size as usize);
        let mut blocks: Vec<u64> = Vec::new();
        for e in &f.extents {
            let Storage::Plain { offset } = e.storage else {
                continue;
            };
            let at = content.len();
            content.resize(at + e.len as usize, 0);
            target
                .read_exact_at(&mut content[at..], offset)
                .map_err(reading())?;
            for b in offset / BLOCK_SIZE..(offset + e.len).div_ceil(BLOCK_SIZE) {
                if blocks.last() != Some(&b) {
                    blocks.push(b);
                }
            }
        }
        let claimed = blocks.iter().any(|&b| {
            classes
                .get(b as usize)
                .is_none_or(|c| *c == BlockClass::Claimed)
                || taken.contains(&b)
        });
        if claimed {
            continue;
        }
        let changed = blocks
            .iter()
            .filter(|&&b| classes[b as usize] == BlockClass::Literal)
            .count();
        if changed * 2 < blocks.len() {
            continue;
        }
        let read_file = |buf: &mut [u8], off: u64| -> io::Result<()> {
            let end = off as usize + buf.len();
            let src = content
                .get(off as usize..end)
                .ok_or(io::ErrorKind::UnexpectedEof)?;
            buf.copy_from_slice(src);
            Ok(())
        };
        let Some(frame) = recompress::decode_frame(&read_file, f.size, 0).map_err(reading())?
        else {
            continue;
        };
        if (frame.content.len() as u64) < MIN_RECOMPRESS_CONTENT {
            continue;
        }
        let stream = &content[..frame.stream_len as usize];
        let Some(encoder) = recompress::find_encoder(&frame.content, stream, frame.checksum)?
        else {
            continue;
        };
        // Destination: the blocks, in order; the stream's runs among them.
        let dst = plan_extents(&blocks);
        let mut bytes = vec![0u8; blocks.len() * BS];
        for (chunk, &b) in bytes.chunks_mut(BS).zip(&blocks) {
            target
                .read_exact_at(chunk, b * BLOCK_SIZE)
                .map_err(reading())?;
        }
        let position = |image_offset: u64| -> Option<u64> {
            let b = image_offset / BLOCK_SIZE;
            let i = blocks.iter().position(|&x| x == b)?;
            Some(i as u64 * BLOCK_SIZE + image_offset % BLOCK_SIZE)
        };
        let mut runs = Vec::new();
        let mut left = frame.stream_len;
        for e in &f.extents {
            let Storage::Plain { offset } = e.storage else {
                continue;
            };
            if left == 0 {
                break;
            }
            let len = e.len.min(left);
            let Some(at) = position(offset) else {
                continue;
            };
            runs.push((at, len));
            left -= len;
        }
        // Runs in destination order, not overlapping.
        if left != 0 || runs.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
            continue;
        }
        let mut fixed = Vec::new();
        let mut at = 0u64;
        for &(offset, len) in &runs {
            fixed.extend_from_slice(&bytes[at as usize..offset as usize]);
            at = offset + len;
        }
        fixed.extend_from_slice(&bytes[at as usize..]);
        taken.extend(blocks.iter().copied());
        streams.push(Stream {
            frame,
            encoder,
            dst,
            bytes,
            layout: Some(recompress::Layout { fixed, runs }),
        });
    }
    Ok(streams)
}

/// Blocks as extents, consecutive ones merged, in the order given.
pub(crate) fn plan_extents(blocks: &[u64]) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some(e) if e.0 + e.1 == b => e.1 += 1,
            _ => out.push(Extent(b, 1)),
        }
    }
    out
}

/// Turns pieces that name bytes of `view` (as `Target` pieces, offsets in
/// the view) into `View` pieces of a view of only the extents they use;
/// returns that smaller view's table.
fn compact_view(
    view: &crate::erofs::View,
    pieces: &mut [recompress::Piece],
) -> Vec<crate::erofs::SourcePiece> {
    use recompress::Piece;
    let mut used = std::collections::BTreeSet::new();
    for p in pieces.iter() {
        if let Piece::Target { offset, len } = *p {
            if let (Some((i, _)), Some((j, _))) =
                (view.piece_at(offset), view.piece_at(offset + len - 1))
            {
                used.extend(i..=j);
            }
        }
    }
    let mut table = Vec::with_capacity(used.len());
    let mut starts = HashMap::with_capacity(used.len());
    let mut at = 0u64;
    for i in used {
        let p = view.pieces()[i];
        starts.insert(i, at);
        at += u64::from(p.len);
        table.push(p);
    }
    for p in pieces.iter_mut() {
        if let Piece::Target { offset, len } = *p {
            if let Some((i, start)) = view.piece_at(offset) {
                if let Some(base) = starts.get(&i) {
                    *p = Piece::View {
                        offset: base + (offset - start),
                        len,
                    };
                }
            }
        }
    }
    table
}

/// Reads the blocks of `extents` from `file`, concatenated.
pub fn read_extents<F: FileExt>(file: &F, extents: &[Extent]) -> io::Result<Vec<u8>> {
    let mut out = vec![0u8; (total_blocks(extents) * BLOCK_SIZE) as usize];
    let mut pos = 0usize;
    for e in extents {
        let len = (e.count() * BLOCK_SIZE) as usize;
        file.read_exact_at(&mut out[pos..pos + len], e.start() * BLOCK_SIZE)?;
        pos += len;
    }
    Ok(out)
}

/// Compresses `data` with zstd at `level`, optionally against `reference`
/// as a raw prefix. The window covers reference and data.
pub fn zstd_compress(
    data: &[u8],
    reference: Option<&[u8]>,
    level: i32,
) -> Result<Vec<u8>, MakeError> {
    use zstd_safe::{CCtx, CParameter};
    let fail = |code: usize| MakeError::Zstd(zstd_safe::get_error_name(code));
    let mut cctx = CCtx::create();
    let total = data.len() + reference.map_or(0, <[u8]>::len);
    let window_log = (usize::BITS - total.max(2).saturating_sub(1).leading_zeros()).clamp(10, 25);
    cctx.set_parameter(CParameter::CompressionLevel(level))
        .map_err(fail)?;
    cctx.set_parameter(CParameter::WindowLog(window_log))
        .map_err(fail)?;
    cctx.set_pledged_src_size(Some(data.len() as u64))
        .map_err(fail)?;
    if let Some(r) = reference {
        cctx.ref_prefix(r).map_err(fail)?;
    }
    let mut out = Vec::with_capacity(zstd_safe::compress_bound(data.len()));
    cctx.compress2(&mut out, data).map_err(fail)?;
    Ok(out)
}

/// An encoded literal operation: the operation (blob offset still 0) and
/// its blob.
type Encoded = (Operation, Vec<u8>);

fn encode_literal(
    dst: &[Extent],
    target: &File,
    source: Option<&SourceView<'_>>,
    opts: &MakeOptions,
) -> Result<Encoded, MakeError> {
    let data = read_extents(target, dst).map_err(io_err("reading target blocks"))?;
    let blob_of = |bytes: &[u8]| Blob {
        offset: 0,
        len: bytes.len() as u64,
        sha256: sha256(bytes),
    };
    let mut best: Option<Encoded> = None;
    if let Some(s) = source {
        let src =
            plan::choose_reference(&data, &s.index.anchors, s.blocks, opts.reference_blocks, 2);
        if !src.is_empty() {
            let reference = read_extents(s.file, &src).map_err(io_err("reading source blocks"))?;
            let blob = zstd_compress(&data, Some(&reference), opts.level)?;
            if opts.bsdiff {
                // The same reference, diffed as executables are: kept when
                // it is smaller and fits the format's bounds.
                let body = bsdiff::diff(&reference, &data);
                if body.len() as u64 <= MAX_BSDIFF_BODY {
                    let diffed = zstd_compress(&body, None, opts.level)?;
                    if diffed.len() < blob.len() && diffed.len() as u64 <= MAX_BLOB_LEN {
                        best = Some((
                            Operation::Bsdiff {
                                dst: dst.to_vec(),
                                src: src.clone(),
                                blob: blob_of(&diffed),
                            },
                            diffed,
                        ));
                    }
                }
            }
            if best.is_none() {
                best = Some((
                    Operation::Patch {
                        dst: dst.to_vec(),
                        src,
                        blob: blob_of(&blob),
                    },
                    blob,
                ));
            }
        }
    }
    // A patch that saves under a tenth may lose to plain compression (its
    // reference was a poor guess): try plain then, too.
    let try_plain = match &best {
        None => true,
        Some((_, blob)) => blob.len() * 10 > data.len() * 9,
    };
    if try_plain {
        let blob = zstd_compress(&data, None, opts.level)?;
        if best.as_ref().is_none_or(|(_, b)| blob.len() < b.len()) {
            best = Some((
                Operation::Data {
                    dst: dst.to_vec(),
                    blob: blob_of(&blob),
                },
                blob,
            ));
        }
    }
    best.ok_or(MakeError::Zstd("no encoding produced"))
}

/// Encodes every planned operation, writing blobs in order to `data_file`
/// (the data section's offset `start` onwards); returns the operations and
/// where the data section then ends.
fn encode_all(
    planned: &[PlannedOp],
    target: &File,
    source: Option<&SourceView<'_>>,
    opts: &MakeOptions,
    data_file: &File,
    start: u64,
    progress: &(dyn Fn(MakeProgress) + Sync),
) -> Result<(Vec<Operation>, u64), MakeError> {
    let literal_total: u64 = planned
        .iter()
        .map(|op| match op {
            PlannedOp::Literal(d) => total_blocks(d),
            _ => 0,
        })
        .sum();
    let mut literal_done = 0u64;
    let mut operations = Vec::with_capacity(planned.len());
    let mut offset = start;
    let mut writer = BufWriter::with_capacity(1 << 20, data_file);
    let batch_len = opts.threads.max(1) * 3;
    for batch in planned.chunks(batch_len) {
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<Option<Result<Encoded, MakeError>>>> =
            Mutex::new((0..batch.len()).map(|_| None).collect());
        std::thread::scope(|scope| {
            for _ in 0..opts.threads.max(1) {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(op) = batch.get(i) else { return };
                    if let PlannedOp::Literal(dst) = op {
                        let r = encode_literal(dst, target, source, opts);
                        if let Ok(mut all) = results.lock() {
                            all[i] = Some(r);
                        }
                    }
                });
            }
        });
        let mut results = results
            .into_inner()
            .map_err(|_| MakeError::Zstd("encoder thread panicked"))?;
        for (i, op) in batch.iter().enumerate() {
            match op {
                PlannedOp::Zero(dst) => operations.push(Operation::Zero { dst: dst.clone() }),
                PlannedOp::Copy { dst, src } => operations.push(Operation::Copy {
                    dst: dst.clone(),
                    src: src.clone(),
                }),
                PlannedOp::Literal(dst) => {
                    let (mut operation, blob) = results[i]
                        .take()
                        .ok_or(MakeError::Zstd("encoder thread stopped early"))??;
                    place_blob(&mut writer, &mut operation, &blob, &mut offset)?;
                    operations.push(operation);
                    literal_done += total_blocks(dst);
                }
            }
        }
        progress(MakeProgress {
            phase: "encoding new blocks",
            done: literal_done,
            total: literal_total,
        });
    }
    writer.flush().map_err(io_err("writing the data section"))?;
    Ok((operations, offset))
}
