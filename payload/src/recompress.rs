//! The `recompress` operation: a zstd stream in the image (an initrd, a
//! compressed file) is shipped as a recipe for its uncompressed content and
//! re-compressed on the node.
//!
//! A new kernel's initrd shares almost no compressed bytes with the old
//! one, but almost all of its *uncompressed* bytes are files that the new
//! image holds anyway (its modules and userland). The recipe names those as
//! byte ranges of the target image, written by the operations before it,
//! and carries the rest as literal bytes. The node rebuilds the content,
//! compresses it with the encoder the operation names, and checks every
//! [`RECOMPRESS_CHUNK`] of the output against the signed manifest before
//! writing it. The maker emits the operation only after re-compressing the
//! content with this same code has reproduced the stream byte for byte.
//!
//! The recipe (the blob, zstd-compressed), little-endian:
//!
//! ```text
//! "TRCP"
//! prefix_len u32, prefix      bytes of the first block before the stream
//! suffix_len u32, suffix      bytes of the last block after the stream
//! count u32
//! count × (kind u8, len u64, offset u64)
//!         kind 0: `len` bytes of the target image at byte `offset`
//!         kind 1: the next `len` literal bytes (offset 0)
//! literal bytes, in piece order
//! ```
//!
//! On an erofs image, whose files are compressed, the pieces come from the
//! files' decompressed bytes instead, and a stream may be split (a file's
//! tail is stored inline, beside its inode). Such an operation says so
//! (`erofs_view`), needs format version 4, and its recipe is:
//!
//! ```text
//! "TRC2"
//! parts u32, parts × (kind u8, len u32)   the dst bytes in order:
//!         kind 0: the next `len` fixed bytes; kind 1: `len` stream bytes
//! fixed_len u32, fixed bytes
//! view u32, view × (offset u64, len u32, lz4 u8)   erofs file extents of
//!         the target (see crate::erofs::View), concatenated: the view
//! count u32, count × (kind u8, len u64, offset u64)  pieces, as above, and
//!         kind 2: `len` bytes of the view from `offset`
//! literal bytes, in piece order
//! ```

use std::collections::HashMap;
use std::io;

use zstd_safe::{CCtx, CParameter, DCtx, InBuffer, OutBuffer};

use crate::format::{Extent, ZstdEncoder, BLOCK_SIZE, MAX_RECOMPRESS_CONTENT, RECOMPRESS_CHUNK};

const MAGIC: &[u8; 4] = b"TRCP";
const MAGIC_VIEW: &[u8; 4] = b"TRC2";
const PIECE_LEN: usize = 17;
/// Most pieces one recipe may have.
const MAX_PIECES: u32 = 1 << 20;

/// The libzstd this tandem links (`ZSTD_versionNumber`).
pub fn zstd_version() -> u32 {
    zstd_safe::version_number()
}

/// Why a recipe could not be read or a stream not re-created.
#[derive(Debug, thiserror::Error)]
pub enum RecompressError {
    #[error("the recipe is malformed: {0}")]
    Malformed(&'static str),
    #[error("the recipe builds {built} bytes of content, the operation says {expected}")]
    ContentLen { built: u64, expected: u64 },
    #[error("a recipe piece reads target bytes {offset}..{end}, outside the {size}-byte image")]
    Outside { offset: u64, end: u64, size: u64 },
    #[error("zstd: {0}")]
    Zstd(String),
    #[error("the re-created stream does not fill the destination: {written} of {expected} bytes")]
    OutputLen { written: u64, expected: u64 },
    #[error("chunk {chunk} of the re-created stream (bytes {offset}..{end}) does not match its signed SHA-256: this node's compressor did not reproduce it; nothing of it was written")]
    ChunkHash { chunk: usize, offset: u64, end: u64 },
    #[error("{context}: {error}")]
    Io {
        context: &'static str,
        error: io::Error,
    },
}

/// One piece of the content, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// `len` bytes of the target image from byte `offset`.
    Target { offset: u64, len: u64 },
    /// `len` literal bytes from position `at` (of the content when making,
    /// of the recipe when applying).
    Literal { at: usize, len: usize },
    /// `len` bytes of the recipe's erofs view from byte `offset`.
    View { offset: u64, len: u64 },
}

impl Piece {
    fn len(&self) -> u64 {
        match *self {
            Piece::Target { len, .. } | Piece::View { len, .. } => len,
            Piece::Literal { len, .. } => len as u64,
        }
    }
}

/// A run of an operation's destination bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part<'a> {
    /// Bytes written as they are (around and between the stream's runs).
    Fixed(&'a [u8]),
    /// The next `len` bytes of the stream; `None`: the rest of it.
    Stream(Option<u64>),
}

/// Where a stream's bytes go among its destination bytes, for a writer:
/// the fixed bytes, and the runs of stream bytes `(dst offset, len)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub fixed: Vec<u8>,
    pub runs: Vec<(u64, u64)>,
}

/// A parsed recipe, borrowing its literal bytes.
#[derive(Debug)]
pub struct Recipe<'a> {
    pub parts: Vec<Part<'a>>,
    pub pieces: Vec<Piece>,
    /// The erofs file extents kind 2 pieces read ("TRC2" recipes).
    pub view: Vec<crate::erofs::SourcePiece>,
    body: &'a [u8],
}

/// Encodes a recipe: the bytes before and after the stream, in its first
/// and last block; literal pieces point into `content`.
pub fn encode_recipe(prefix: &[u8], suffix: &[u8], pieces: &[Piece], content: &[u8]) -> Vec<u8> {
    encode(Recipe2::Plain(prefix, suffix), pieces, content)
}

/// Encodes a "TRC2" recipe: a stream laid out in `layout` among `dst_len`
/// destination bytes, pieces from an erofs `view`.
pub fn encode_recipe_view(
    layout: &Layout,
    dst_len: u64,
    view: &[crate::erofs::SourcePiece],
    pieces: &[Piece],
    content: &[u8],
) -> Vec<u8> {
    encode(Recipe2::View(layout, dst_len, view), pieces, content)
}

enum Recipe2<'a> {
    Plain(&'a [u8], &'a [u8]),
    View(&'a Layout, u64, &'a [crate::erofs::SourcePiece]),
}

fn encode(kind: Recipe2<'_>, pieces: &[Piece], content: &[u8]) -> Vec<u8> {
    let literal: usize = pieces
        .iter()
        .map(|p| match p {
            Piece::Literal { len, .. } => *len,
            Piece::Target { .. } | Piece::View { .. } => 0,
        })
        .sum();
    let mut out = Vec::with_capacity(16 + pieces.len() * 17 + literal);
    match kind {
        Recipe2::Plain(prefix, suffix) => {
            out.extend_from_slice(MAGIC);
            for part in [prefix, suffix] {
                out.extend_from_slice(&(part.len() as u32).to_le_bytes());
                out.extend_from_slice(part);
            }
        }
        Recipe2::View(layout, dst_len, view) => {
            out.extend_from_slice(MAGIC_VIEW);
            let mut parts: Vec<(u8, u64)> = Vec::new();
            let mut at = 0u64;
            for &(offset, len) in &layout.runs {
                if offset > at {
                    parts.push((0, offset - at));
                }
                parts.push((1, len));
                at = offset + len;
            }
            if dst_len > at {
                parts.push((0, dst_len - at));
            }
            out.extend_from_slice(&(parts.len() as u32).to_le_bytes());
            for (kind, len) in parts {
                out.push(kind);
                out.extend_from_slice(&(len as u32).to_le_bytes());
            }
            out.extend_from_slice(&(layout.fixed.len() as u32).to_le_bytes());
            out.extend_from_slice(&layout.fixed);
            crate::erofs::encode_pieces(view, &mut out);
        }
    }
    out.extend_from_slice(&(pieces.len() as u32).to_le_bytes());
    for p in pieces {
        let (kind, len, offset) = match *p {
            Piece::Target { offset, len } => (0u8, len, offset),
            Piece::Literal { len, .. } => (1u8, len as u64, 0),
            Piece::View { offset, len } => (2u8, len, offset),
        };
        out.push(kind);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
    }
    for p in pieces {
        if let Piece::Literal { at, len } = *p {
            out.extend_from_slice(&content[at..at + len]);
        }
    }
    out
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecompressError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(RecompressError::Malformed("it ends early"))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, RecompressError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, RecompressError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
}

impl<'a> Recipe<'a> {
    /// Parses and checks a recipe: it must build exactly `content_len`
    /// bytes, read only inside a `target_size`-byte image, and have short
    /// prefix and suffix; an erofs view only where `erofs_view`.
    pub fn parse(
        body: &'a [u8],
        content_len: u64,
        target_size: u64,
        erofs_view: bool,
    ) -> Result<Recipe<'a>, RecompressError> {
        let mut c = Cursor {
            bytes: body,
            pos: 0,
        };
        let magic = c.take(4)?;
        if magic != if erofs_view { MAGIC_VIEW } else { MAGIC } {
            return Err(RecompressError::Malformed(
                "bad magic (or a view the operation does not name)",
            ));
        }
        let mut part = || -> Result<&'a [u8], RecompressError> {
            let len = c.u32()? as usize;
            if len as u64 >= BLOCK_SIZE {
                return Err(RecompressError::Malformed(
                    "prefix or suffix is a block or more",
                ));
            }
            c.take(len)
        };
        let mut parts = Vec::new();
        let mut view = Vec::new();
        let mut view_len = 0u64;
        if !erofs_view {
            let prefix = part()?;
            let suffix = part()?;
            parts = vec![Part::Fixed(prefix), Part::Stream(None), Part::Fixed(suffix)];
        } else {
            let n = c.u32()?;
            if n > MAX_PIECES {
                return Err(RecompressError::Malformed("too many parts"));
            }
            let mut spec = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let kind = c.take(1)?[0];
                let len = u64::from(c.u32()?);
                if len == 0 || kind > 1 {
                    return Err(RecompressError::Malformed("a bad part"));
                }
                spec.push((kind, len));
            }
            let fixed_len = c.u32()? as usize;
            let mut fixed = c.take(fixed_len)?;
            for (kind, len) in spec {
                if kind == 1 {
                    parts.push(Part::Stream(Some(len)));
                } else {
                    let len = len as usize;
                    if len > fixed.len() {
                        return Err(RecompressError::Malformed("parts need more fixed bytes"));
                    }
                    parts.push(Part::Fixed(&fixed[..len]));
                    fixed = &fixed[len..];
                }
            }
            if !fixed.is_empty() {
                return Err(RecompressError::Malformed("fixed bytes left over"));
            }
            let n = c.u32()?;
            if n > MAX_PIECES {
                return Err(RecompressError::Malformed("too many view pieces"));
            }
            let table = c.take(n as usize * crate::erofs::SOURCE_PIECE_LEN)?;
            view = crate::erofs::decode_pieces(table).map_err(RecompressError::Malformed)?;
            view_len = crate::erofs::check_pieces(&view, target_size, MAX_RECOMPRESS_CONTENT)
                .map_err(RecompressError::Malformed)?;
        }
        let count = c.u32()?;
        if count > MAX_PIECES {
            return Err(RecompressError::Malformed("too many pieces"));
        }
        let mut pieces = Vec::with_capacity(count as usize);
        let mut literal_at = c.pos + count as usize * PIECE_LEN;
        let mut built = 0u64;
        for _ in 0..count {
            let kind = c.take(1)?[0];
            let len = c.u64()?;
            let offset = c.u64()?;
            if len == 0 {
                return Err(RecompressError::Malformed("an empty piece"));
            }
            built = built
                .checked_add(len)
                .filter(|&b| b <= MAX_RECOMPRESS_CONTENT)
                .ok_or(RecompressError::Malformed("pieces too long"))?;
            match kind {
                0 => {
                    let end = offset.checked_add(len).filter(|&e| e <= target_size);
                    let Some(_) = end else {
                        return Err(RecompressError::Outside {
                            offset,
                            end: offset.saturating_add(len),
                            size: target_size,
                        });
                    };
                    pieces.push(Piece::Target { offset, len });
                }
                1 => {
                    let len = usize::try_from(len)
                        .map_err(|_| RecompressError::Malformed("literal too long"))?;
                    pieces.push(Piece::Literal {
                        at: literal_at,
                        len,
                    });
                    literal_at = literal_at.saturating_add(len);
                }
                2 if erofs_view => {
                    if offset.checked_add(len).is_none_or(|e| e > view_len) {
                        return Err(RecompressError::Malformed("a piece reads past the view"));
                    }
                    pieces.push(Piece::View { offset, len });
                }
                _ => return Err(RecompressError::Malformed("unknown piece kind")),
            }
        }
        if literal_at != body.len() {
            return Err(RecompressError::Malformed(
                "literal bytes do not fill the rest of the recipe",
            ));
        }
        if built != content_len {
            return Err(RecompressError::ContentLen {
                built,
                expected: content_len,
            });
        }
        Ok(Recipe {
            parts,
            pieces,
            view,
            body,
        })
    }

    /// The target byte ranges the recipe reads, sorted and merged: its
    /// target pieces, and the whole of every erofs view piece (the 4 KiB
    /// block of an lz4 piece). An operation that writes none of them (nor
    /// the recompress operation's own `dst`) may run beside it.
    pub fn target_reads(&self) -> Vec<(u64, u64)> {
        let mut reads: Vec<(u64, u64)> = self
            .pieces
            .iter()
            .filter_map(|p| match *p {
                Piece::Target { offset, len } => Some((offset, offset.saturating_add(len))),
                _ => None,
            })
            .collect();
        reads.extend(self.view.iter().map(|v| {
            let stored = if v.lz4 { BLOCK_SIZE } else { u64::from(v.len) };
            (v.offset, v.offset.saturating_add(stored))
        }));
        crate::region::merge_ranges(reads)
    }
}

/// A zstd compressor set up as an operation's encoder names.
pub struct StreamCompressor {
    cctx: CCtx<'static>,
    out: Vec<u8>,
}

impl std::fmt::Debug for StreamCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamCompressor")
    }
}

fn zstd_err(code: usize) -> RecompressError {
    RecompressError::Zstd(zstd_safe::get_error_name(code).to_owned())
}

impl StreamCompressor {
    /// The encoder for `content_len` bytes (pledged, as the zstd CLI does
    /// for a file).
    pub fn new(encoder: &ZstdEncoder, content_len: u64) -> Result<Self, RecompressError> {
        let mut cctx = CCtx::create();
        cctx.set_parameter(CParameter::CompressionLevel(encoder.level))
            .map_err(zstd_err)?;
        cctx.set_parameter(CParameter::ChecksumFlag(encoder.checksum))
            .map_err(zstd_err)?;
        cctx.set_parameter(CParameter::NbWorkers(encoder.workers))
            .map_err(zstd_err)?;
        cctx.set_pledged_src_size(Some(content_len))
            .map_err(zstd_err)?;
        Ok(StreamCompressor {
            cctx,
            out: vec![0u8; 1 << 17],
        })
    }

    /// Compresses `input` (all of it, or with `end` the last of it),
    /// handing the output to `emit` as it comes.
    pub fn feed<E: From<RecompressError>>(
        &mut self,
        input: &[u8],
        end: bool,
        emit: &mut dyn FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        use zstd_sys::ZSTD_EndDirective::{ZSTD_e_continue, ZSTD_e_end};
        let mut inb = InBuffer::around(input);
        loop {
            let mut outb = OutBuffer::around(&mut self.out[..]);
            let directive = if end { ZSTD_e_end } else { ZSTD_e_continue };
            let left = self
                .cctx
                .compress_stream2(&mut outb, &mut inb, directive)
                .map_err(zstd_err)?;
            let n = outb.pos();
            if n > 0 {
                emit(&self.out[..n])?;
            }
            let done = if end {
                left == 0
            } else {
                inb.pos() == input.len()
            };
            if done {
                return Ok(());
            }
        }
    }
}

/// Feeds content to a compressor in the one pattern both the maker and the
/// node use: whole [`FEED`]s with `ZSTD_e_continue`, the rest, then an
/// empty `ZSTD_e_end`. (A single-threaded zstd's output can depend on how
/// its input arrives; a multi-threaded one's does not.)
struct Feeder<'z> {
    z: &'z mut StreamCompressor,
    buf: Vec<u8>,
}

/// The input size of every call but the last two.
const FEED: usize = 1 << 20;

impl Feeder<'_> {
    fn push<E: From<RecompressError>>(
        &mut self,
        mut bytes: &[u8],
        emit: &mut dyn FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        while !bytes.is_empty() {
            if self.buf.is_empty() && bytes.len() >= FEED {
                self.z.feed(&bytes[..FEED], false, emit)?;
                bytes = &bytes[FEED..];
                continue;
            }
            let n = (FEED - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.buf.len() == FEED {
                self.z.feed(&self.buf, false, emit)?;
                self.buf.clear();
            }
        }
        Ok(())
    }

    fn finish<E: From<RecompressError>>(
        mut self,
        emit: &mut dyn FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        if !self.buf.is_empty() {
            self.z.feed(&self.buf, false, emit)?;
            self.buf.clear();
        }
        self.z.feed(&[], true, emit)
    }
}

/// Compresses `content` as a recompress operation does.
pub fn compress<E: From<RecompressError>>(
    encoder: &ZstdEncoder,
    content: &[u8],
    emit: &mut dyn FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let mut z = StreamCompressor::new(encoder, content.len() as u64)?;
    let mut f = Feeder {
        z: &mut z,
        buf: Vec::new(),
    };
    f.push(content, emit)?;
    f.finish(emit)
}

/// The destination bytes of an operation, written [`RECOMPRESS_CHUNK`] at a
/// time, each checked against its signed hash first.
pub(crate) struct ChunkWriter<'a> {
    dst: &'a [Extent],
    chunks: &'a [crate::format::Sha256Hex],
    write: &'a dyn Fn(&[u8], u64) -> io::Result<()>,
    buf: Vec<u8>,
    written: u64,
    next_chunk: usize,
}

impl<'a> ChunkWriter<'a> {
    pub(crate) fn new(
        dst: &'a [Extent],
        chunks: &'a [crate::format::Sha256Hex],
        write: &'a dyn Fn(&[u8], u64) -> io::Result<()>,
    ) -> ChunkWriter<'a> {
        ChunkWriter {
            dst,
            chunks,
            write,
            buf: Vec::with_capacity(RECOMPRESS_CHUNK as usize),
            written: 0,
            next_chunk: 0,
        }
    }

    /// Writes the last chunk; checks that the output filled `dst` and used
    /// every chunk hash.
    pub(crate) fn finish(mut self) -> Result<(), RecompressError> {
        self.flush()?;
        let expected: u64 = self.dst.iter().map(|e| e.count() * BLOCK_SIZE).sum();
        if self.written != expected || self.next_chunk != self.chunks.len() {
            return Err(RecompressError::OutputLen {
                written: self.written,
                expected,
            });
        }
        Ok(())
    }

    pub(crate) fn push(&mut self, mut bytes: &[u8]) -> Result<(), RecompressError> {
        while !bytes.is_empty() {
            let room = RECOMPRESS_CHUNK as usize - self.buf.len();
            let n = room.min(bytes.len());
            self.buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.buf.len() == RECOMPRESS_CHUNK as usize {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), RecompressError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let offset = self.written;
        let end = offset + self.buf.len() as u64;
        let ok = self
            .chunks
            .get(self.next_chunk)
            .is_some_and(|h| *h == crate::digest::sha256(&self.buf));
        if !ok {
            return Err(RecompressError::ChunkHash {
                chunk: self.next_chunk,
                offset,
                end,
            });
        }
        write_logical(self.dst, offset, &self.buf, self.write)?;
        self.written = end;
        self.next_chunk += 1;
        self.buf.clear();
        Ok(())
    }
}

/// Writes `bytes` at byte `offset` of the concatenated `dst` blocks.
fn write_logical(
    dst: &[Extent],
    mut offset: u64,
    mut bytes: &[u8],
    write: &dyn Fn(&[u8], u64) -> io::Result<()>,
) -> Result<(), RecompressError> {
    let mut base = 0u64;
    for e in dst {
        let len = e.count() * BLOCK_SIZE;
        if bytes.is_empty() {
            break;
        }
        if offset < base + len {
            let within = offset - base;
            let n = ((len - within) as usize).min(bytes.len());
            write(&bytes[..n], e.start() * BLOCK_SIZE + within).map_err(|error| {
                RecompressError::Io {
                    context: "writing the re-created stream",
                    error,
                }
            })?;
            bytes = &bytes[n..];
            offset += n as u64;
        }
        base += len;
    }
    if bytes.is_empty() {
        Ok(())
    } else {
        Err(RecompressError::OutputLen {
            written: offset + bytes.len() as u64,
            expected: base,
        })
    }
}

/// Re-creates an operation's stream: rebuilds the content from `recipe`
/// (target pieces through `read(buf, offset)`), compresses it with
/// `encoder`, and writes prefix, stream and suffix into `dst` through
/// `write(bytes, offset)`, each chunk checked against `chunks` before it
/// is written.
pub fn rebuild(
    recipe: &Recipe<'_>,
    encoder: &ZstdEncoder,
    content_len: u64,
    dst: &[Extent],
    chunks: &[crate::format::Sha256Hex],
    read: &dyn Fn(&mut [u8], u64) -> io::Result<()>,
    write: &dyn Fn(&[u8], u64) -> io::Result<()>,
) -> Result<(), RecompressError> {
    let mut out = Splicer {
        out: ChunkWriter::new(dst, chunks, write),
        parts: &recipe.parts,
        next: 0,
        left: None,
    };
    out.fixed()?;
    let mut z = StreamCompressor::new(encoder, content_len)?;
    let mut feeder = Feeder {
        z: &mut z,
        buf: Vec::with_capacity(FEED),
    };
    let mut emit = |b: &[u8]| out.stream(b);
    let mut buf = vec![0u8; FEED];
    let view = crate::erofs::View::new(recipe.view.clone());
    for piece in &recipe.pieces {
        match *piece {
            Piece::View { offset, len } => {
                let mut pos = 0u64;
                while pos < len {
                    let n = ((len - pos) as usize).min(buf.len());
                    view.read(read, &mut buf[..n], offset + pos)
                        .map_err(|error| RecompressError::Io {
                            context: "reading the target's erofs files for the recipe",
                            error,
                        })?;
                    feeder.push(&buf[..n], &mut emit)?;
                    pos += n as u64;
                }
            }
            Piece::Literal { at, len } => {
                feeder.push(&recipe.body[at..at + len], &mut emit)?;
            }
            Piece::Target { offset, len } => {
                let mut pos = 0u64;
                while pos < len {
                    let n = ((len - pos) as usize).min(buf.len());
                    read(&mut buf[..n], offset + pos).map_err(|error| RecompressError::Io {
                        context: "reading the target image for the recipe",
                        error,
                    })?;
                    feeder.push(&buf[..n], &mut emit)?;
                    pos += n as u64;
                }
            }
        }
    }
    feeder.finish(&mut emit)?;
    out.finish()
}

/// Writes stream bytes and fixed bytes into the destination in the order
/// of a recipe's parts.
struct Splicer<'a, 'r> {
    out: ChunkWriter<'a>,
    parts: &'r [Part<'r>],
    next: usize,
    /// Stream bytes left in the current stream part (`Some(None)`: the
    /// rest of the stream).
    left: Option<Option<u64>>,
}

impl Splicer<'_, '_> {
    /// Writes fixed parts up to the next stream part, and enters it.
    fn fixed(&mut self) -> Result<(), RecompressError> {
        while let Some(part) = self.parts.get(self.next) {
            self.next += 1;
            match *part {
                Part::Fixed(bytes) => self.out.push(bytes)?,
                Part::Stream(len) => {
                    self.left = Some(len);
                    return Ok(());
                }
            }
        }
        self.left = None;
        Ok(())
    }

    fn stream(&mut self, mut bytes: &[u8]) -> Result<(), RecompressError> {
        let too_long = || RecompressError::Malformed("the stream is longer than its parts");
        while !bytes.is_empty() {
            match self.left {
                None => return Err(too_long()),
                Some(None) => {
                    self.out.push(bytes)?;
                    return Ok(());
                }
                Some(Some(left)) => {
                    let n = (left as usize).min(bytes.len());
                    self.out.push(&bytes[..n])?;
                    bytes = &bytes[n..];
                    if n as u64 == left {
                        self.fixed()?;
                    } else {
                        self.left = Some(Some(left - n as u64));
                    }
                }
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), RecompressError> {
        match self.left {
            Some(None) => self.fixed()?,
            Some(Some(_)) => {
                return Err(RecompressError::Malformed(
                    "the stream is shorter than its parts",
                ))
            }
            None => {}
        }
        if self.left.is_some() {
            return Err(RecompressError::Malformed(
                "the stream is shorter than its parts",
            ));
        }
        self.out.finish()
    }
}

// ---- Making: finding streams, reproducing them, writing recipes. ----

/// A zstd frame found in an image: where it is, its compressed length, and
/// its decompressed content.
#[derive(Debug)]
pub struct Frame {
    pub offset: u64,
    pub stream_len: u64,
    pub content: Vec<u8>,
    pub checksum: bool,
}

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Offsets of every zstd frame header in `image` that names a content size
/// of at least `min_content` bytes (and at most the format's limit), for
/// which `wanted(offset)` holds.
pub fn find_frame_headers(
    read: &dyn Fn(&mut [u8], u64) -> io::Result<()>,
    size: u64,
    min_content: u64,
    wanted: &dyn Fn(u64) -> bool,
) -> io::Result<Vec<u64>> {
    const CHUNK: usize = 4 << 20;
    const HEADER: usize = 18;
    let mut found = Vec::new();
    let mut buf = vec![0u8; CHUNK + HEADER];
    let mut pos = 0u64;
    while pos < size {
        let n = ((size - pos) as usize).min(buf.len());
        read(&mut buf[..n], pos)?;
        let scan = n.min(CHUNK);
        let mut i = 0;
        while i + 4 <= n && i < scan {
            let Some(k) = buf[i..scan].iter().position(|&b| b == ZSTD_MAGIC[0]) else {
                break;
            };
            i += k;
            if buf.get(i..i + 4) == Some(&ZSTD_MAGIC[..]) && wanted(pos + i as u64) {
                let header = &buf[i..n.min(i + HEADER)];
                if let Ok(Some(len)) = zstd_safe::get_frame_content_size(header) {
                    if (min_content..=MAX_RECOMPRESS_CONTENT).contains(&len) {
                        found.push(pos + i as u64);
                    }
                }
            }
            i += 1;
        }
        pos += scan as u64;
    }
    Ok(found)
}

/// Decodes the frame at `offset`: its content and compressed length, or
/// `None` when it does not decode (a false header, a fragmented file).
pub fn decode_frame(
    read: &dyn Fn(&mut [u8], u64) -> io::Result<()>,
    size: u64,
    offset: u64,
) -> io::Result<Option<Frame>> {
    let mut head = [0u8; 18];
    let n = ((size - offset) as usize).min(head.len());
    read(&mut head[..n], offset)?;
    let Ok(Some(content_len)) = zstd_safe::get_frame_content_size(&head[..n]) else {
        return Ok(None);
    };
    let checksum = head[4] & 0x04 != 0;
    let mut dctx = DCtx::create();
    let mut content = Vec::new();
    let mut out = vec![0u8; 1 << 20];
    let mut input = vec![0u8; 1 << 20];
    let mut pos = offset;
    while pos < size {
        let n = ((size - pos) as usize).min(input.len());
        read(&mut input[..n], pos)?;
        let mut inb = InBuffer::around(&input[..n]);
        loop {
            let mut outb = OutBuffer::around(&mut out[..]);
            let Ok(hint) = dctx.decompress_stream(&mut outb, &mut inb) else {
                return Ok(None);
            };
            let produced = outb.pos();
            if (content.len() + produced) as u64 > content_len {
                // More content than the header names.
                return Ok(None);
            }
            content.extend_from_slice(&out[..produced]);
            if hint == 0 {
                // The frame ended inside this input.
                if content.len() as u64 != content_len {
                    return Ok(None);
                }
                return Ok(Some(Frame {
                    offset,
                    stream_len: pos + inb.pos() as u64 - offset,
                    content,
                    checksum,
                }));
            }
            if inb.pos() == n && produced < out.len() {
                break;
            }
        }
        pos += n as u64;
    }
    Ok(None)
}

/// The encoder that reproduces `stream` from `content`, when one of the
/// levels 1 to 19, multi- or single-threaded, does: each try stops at the
/// first byte that differs.
pub fn find_encoder(
    content: &[u8],
    stream: &[u8],
    checksum: bool,
) -> Result<Option<ZstdEncoder>, RecompressError> {
    // The common ones first: the zstd CLI's default (3), mkinitramfs's (9),
    // dracut's (15), the CLI's highest non-ultra (19).
    let mut levels = vec![9, 3, 19, 15];
    levels.extend((1..=19).filter(|l| ![9, 3, 19, 15].contains(l)));
    for level in levels {
        for workers in [1, 0] {
            let encoder = ZstdEncoder {
                version: zstd_version(),
                level,
                workers,
                checksum,
            };
            if reproduces(&encoder, content, stream)? {
                return Ok(Some(encoder));
            }
        }
    }
    Ok(None)
}

/// A comparison stopped at the first differing byte.
#[derive(Debug)]
enum Compare {
    Differs,
    Failed(RecompressError),
}

impl From<RecompressError> for Compare {
    fn from(e: RecompressError) -> Self {
        Compare::Failed(e)
    }
}

/// True when `encoder` turns `content` into exactly `stream`.
pub fn reproduces(
    encoder: &ZstdEncoder,
    content: &[u8],
    stream: &[u8],
) -> Result<bool, RecompressError> {
    let mut pos = 0usize;
    let mut emit = |b: &[u8]| -> Result<(), Compare> {
        if stream.get(pos..pos + b.len()) != Some(b) {
            return Err(Compare::Differs);
        }
        pos += b.len();
        Ok(())
    };
    match compress(encoder, content, &mut emit) {
        Ok(()) => Ok(pos == stream.len()),
        Err(Compare::Differs) => Ok(false),
        Err(Compare::Failed(e)) => Err(e),
    }
}

const WINDOW: usize = BLOCK_SIZE as usize;
const ROLL_BASE: u64 = 0x9e37_79b9_7f4a_7c15 | 1;
const FILTER_BITS: u32 = 24;

/// `ROLL_BASE` to the power `WINDOW - 1`: what the byte leaving the window
/// was multiplied by.
fn roll_out_factor() -> u64 {
    let mut f = 1u64;
    for _ in 0..WINDOW - 1 {
        f = f.wrapping_mul(ROLL_BASE);
    }
    f
}

fn poly_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0u64, |h, &b| {
        h.wrapping_mul(ROLL_BASE).wrapping_add(u64::from(b))
    })
}

/// The target image's blocks by a rolling hash of their bytes, so that
/// content at any byte alignment can find them.
#[derive(Debug, Default)]
pub struct TargetIndex {
    blocks: HashMap<u64, u64>,
    filter: Vec<u64>,
}

impl TargetIndex {
    pub fn new() -> TargetIndex {
        TargetIndex {
            blocks: HashMap::new(),
            filter: vec![0u64; 1 << (FILTER_BITS - 6)],
        }
    }

    /// Adds a block (the first block with given bytes wins).
    pub fn insert(&mut self, block: u64, bytes: &[u8]) {
        let h = poly_hash(bytes);
        let bit = (h >> (64 - FILTER_BITS)) as usize;
        self.filter[bit / 64] |= 1 << (bit % 64);
        self.blocks.entry(h).or_insert(block);
    }

    fn get(&self, h: u64) -> Option<u64> {
        let bit = (h >> (64 - FILTER_BITS)) as usize;
        if self.filter[bit / 64] & (1 << (bit % 64)) == 0 {
            return None;
        }
        self.blocks.get(&h).copied()
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

/// Cuts `content` into pieces: runs of at least a block that the target
/// image holds (found through `index`, checked byte for byte through
/// `read`, extended both ways while the bytes agree but never into
/// `forbidden` byte ranges), and literal bytes between them.
pub fn match_content(
    content: &[u8],
    index: &TargetIndex,
    image_size: u64,
    forbidden: &[(u64, u64)],
    read: &dyn Fn(&mut [u8], u64) -> io::Result<()>,
) -> io::Result<Vec<Piece>> {
    let allowed = |offset: u64| {
        offset < image_size && !forbidden.iter().any(|&(a, b)| (a..b).contains(&offset))
    };
    let out_factor = roll_out_factor();
    let mut pieces = Vec::new();
    let mut literal_start = 0usize;
    let mut pos = 0usize;
    let mut h: Option<u64> = None;
    let mut block = vec![0u8; WINDOW];
    let mut ext = vec![0u8; 64 << 10];
    while pos + WINDOW <= content.len() {
        let hash = match h {
            Some(v) => v,
            None => poly_hash(&content[pos..pos + WINDOW]),
        };
        let usable = |at: u64| {
            at + BLOCK_SIZE <= image_size
                && !forbidden
                    .iter()
                    .any(|&(a, b)| a < at + BLOCK_SIZE && at < b)
        };
        let hit = match index.get(hash) {
            Some(b) if usable(b * BLOCK_SIZE) => {
                let at = b * BLOCK_SIZE;
                read(&mut block, at)?;
                (block[..] == content[pos..pos + WINDOW]).then_some(at)
            }
            _ => None,
        };
        let Some(at) = hit else {
            if pos + WINDOW < content.len() {
                let out = u64::from(content[pos]);
                let inn = u64::from(content[pos + WINDOW]);
                h = Some(
                    hash.wrapping_sub(out.wrapping_mul(out_factor))
                        .wrapping_mul(ROLL_BASE)
                        .wrapping_add(inn),
                );
            }
            pos += 1;
            continue;
        };
        // Extend backwards over pending literal bytes.
        let mut start = pos;
        let mut img = at;
        while start > literal_start && img > 0 && allowed(img - 1) {
            let n = (start - literal_start).min(ext.len()).min(img as usize);
            read(&mut ext[..n], img - n as u64)?;
            let mut k = 0;
            while k < n && ext[n - 1 - k] == content[start - 1 - k] && allowed(img - 1 - k as u64) {
                k += 1;
            }
            start -= k;
            img -= k as u64;
            if k < n {
                break;
            }
        }
        // Extend forwards.
        let mut end = pos + WINDOW;
        let mut img_end = at + BLOCK_SIZE;
        while end < content.len() && allowed(img_end) {
            let n = (content.len() - end)
                .min(ext.len())
                .min((image_size - img_end) as usize);
            read(&mut ext[..n], img_end)?;
            let mut k = 0;
            while k < n && ext[k] == content[end + k] && allowed(img_end + k as u64) {
                k += 1;
            }
            end += k;
            img_end += k as u64;
            if k < n {
                break;
            }
        }
        if start > literal_start {
            pieces.push(Piece::Literal {
                at: literal_start,
                len: start - literal_start,
            });
        }
        pieces.push(Piece::Target {
            offset: img,
            len: (end - start) as u64,
        });
        pos = end;
        literal_start = end;
        h = None;
    }
    if literal_start < content.len() {
        pieces.push(Piece::Literal {
            at: literal_start,
            len: content.len() - literal_start,
        });
    }
    Ok(pieces)
}

/// Bytes of content that pieces take from the target image.
pub fn matched_bytes(pieces: &[Piece]) -> u64 {
    pieces
        .iter()
        .map(|p| match p {
            Piece::Target { len, .. } | Piece::View { len, .. } => *len,
            Piece::Literal { .. } => 0,
        })
        .sum()
}

/// Total content length of pieces.
pub fn content_len(pieces: &[Piece]) -> u64 {
    pieces.iter().map(Piece::len).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 7) as u8 + b'a'
            })
            .collect()
    }

    #[test]
    fn a_recipe_round_trips_and_rejects_what_does_not_add_up() {
        let c = content(1, 10_000);
        let pieces = [
            Piece::Literal { at: 0, len: 100 },
            Piece::Target {
                offset: 8192,
                len: 5000,
            },
            Piece::Literal {
                at: 5100,
                len: 4900,
            },
        ];
        let body = encode_recipe(b"head", b"", &pieces, &c);
        let r = Recipe::parse(&body, 10_000, 1 << 20, false).unwrap();
        assert_eq!(
            r.parts,
            vec![Part::Fixed(b"head"), Part::Stream(None), Part::Fixed(b"")]
        );
        assert_eq!(r.pieces.len(), 3);
        let Piece::Literal { at, len } = r.pieces[2] else {
            panic!("{:?}", r.pieces[2])
        };
        assert_eq!(&body[at..at + len], &c[5100..]);
        assert!(matches!(
            Recipe::parse(&body, 9_999, 1 << 20, false),
            Err(RecompressError::ContentLen { .. })
        ));
        assert!(matches!(
            Recipe::parse(&body, 10_000, 12_000, false),
            Err(RecompressError::Outside { .. })
        ));
        assert!(Recipe::parse(&body[..body.len() - 1], 10_000, 1 << 20, false).is_err());
        let mut bad = body.clone();
        bad[0] = b'X';
        assert!(Recipe::parse(&bad, 10_000, 1 << 20, false).is_err());
    }

    #[test]
    fn content_is_found_in_the_image_at_any_alignment_and_never_in_forbidden_bytes() {
        // An "image" of 64 blocks; the content is a literal head, 3.5
        // blocks of the image from a byte offset that is not aligned, a
        // literal middle and 2 more blocks.
        let image = content(7, 64 * 4096);
        let mut c = b"literal head".to_vec();
        c.extend_from_slice(&image[4096 * 5 + 100..4096 * 8 + 2148]);
        c.extend_from_slice(b"middle");
        c.extend_from_slice(&image[4096 * 20..4096 * 22]);
        let read = |buf: &mut [u8], off: u64| {
            buf.copy_from_slice(&image[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        let mut index = TargetIndex::new();
        for (i, b) in image.chunks(4096).enumerate() {
            index.insert(i as u64, b);
        }
        let pieces = match_content(&c, &index, image.len() as u64, &[], &read).unwrap();
        assert_eq!(
            pieces,
            vec![
                Piece::Literal { at: 0, len: 12 },
                Piece::Target {
                    offset: 4096 * 5 + 100,
                    len: 3 * 4096 + 2048
                },
                Piece::Literal {
                    at: 12 + 3 * 4096 + 2048,
                    len: 6
                },
                Piece::Target {
                    offset: 4096 * 20,
                    len: 8192
                },
            ]
        );
        assert_eq!(content_len(&pieces), c.len() as u64);
        // Blocks 20 and 21 forbidden (another operation's output): those
        // bytes stay literal.
        let pieces = match_content(
            &c,
            &index,
            image.len() as u64,
            &[(4096 * 20, 4096 * 22)],
            &read,
        )
        .unwrap();
        assert_eq!(matched_bytes(&pieces), 3 * 4096 + 2048);
    }

    #[test]
    fn a_stream_is_found_reproduced_and_rebuilt_chunk_by_chunk() {
        let c = content(3, 3 << 20);
        let encoder = ZstdEncoder {
            version: zstd_version(),
            level: 3,
            workers: 0,
            checksum: true,
        };
        let mut stream = Vec::new();
        compress(
            &encoder,
            &c,
            &mut |b: &[u8]| -> Result<(), RecompressError> {
                stream.extend_from_slice(b);
                Ok(())
            },
        )
        .unwrap();
        // In an image, 300 bytes into a block, after other bytes.
        let mut image = content(9, 300);
        image.extend_from_slice(&stream);
        image.resize(image.len().div_ceil(4096) * 4096, 0);
        let size = image.len() as u64;
        let read = |buf: &mut [u8], off: u64| {
            buf.copy_from_slice(&image[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        let found = find_frame_headers(&read, size, 1 << 20, &|_| true).unwrap();
        assert_eq!(found, vec![300]);
        let frame = decode_frame(&read, size, 300).unwrap().unwrap();
        assert_eq!(frame.stream_len, stream.len() as u64);
        assert_eq!(frame.content, c);
        let e = find_encoder(&frame.content, &stream, frame.checksum)
            .unwrap()
            .unwrap();
        assert_eq!((e.level, e.workers), (3, 0));
        assert!(!reproduces(&ZstdEncoder { workers: 1, ..e }, &c, &stream).unwrap());

        // Rebuilt from literal bytes alone into a fresh image.
        let dst = [Extent(0, size / 4096)];
        let out_bytes = &image[..];
        let chunks: Vec<_> = out_bytes
            .chunks(RECOMPRESS_CHUNK as usize)
            .map(crate::digest::sha256)
            .collect();
        let pieces = [Piece::Literal {
            at: 0,
            len: c.len(),
        }];
        let tail_start = 300 + stream.len();
        let body = encode_recipe(&image[..300], &image[tail_start..], &pieces, &c);
        let recipe = Recipe::parse(&body, c.len() as u64, size, false).unwrap();
        let written = std::cell::RefCell::new(vec![0u8; image.len()]);
        let write = |b: &[u8], off: u64| {
            written.borrow_mut()[off as usize..off as usize + b.len()].copy_from_slice(b);
            Ok(())
        };
        let no_read = |_: &mut [u8], _: u64| Err(io::Error::other("no target pieces"));
        rebuild(&recipe, &e, c.len() as u64, &dst, &chunks, &no_read, &write).unwrap();
        assert!(*written.borrow() == image);

        // Another level makes other bytes: the first chunk fails its hash
        // and nothing is written.
        let fresh = std::cell::RefCell::new(vec![0u8; image.len()]);
        let write = |b: &[u8], off: u64| {
            fresh.borrow_mut()[off as usize..off as usize + b.len()].copy_from_slice(b);
            Ok(())
        };
        let err = rebuild(
            &recipe,
            &ZstdEncoder { level: 4, ..e },
            c.len() as u64,
            &dst,
            &chunks,
            &no_read,
            &write,
        )
        .unwrap_err();
        assert!(
            matches!(err, RecompressError::ChunkHash { chunk: 0, .. }),
            "{err:?}"
        );
        assert!(fresh.borrow().iter().all(|&b| b == 0));
    }
}
