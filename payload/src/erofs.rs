//! A reader of erofs images: which blocks hold which bytes of which file.
//!
//! Azure Container Linux builds its `/usr` as erofs compressed with lz4hc.
//! A changed file's compressed blocks share little with its old ones, so
//! the planner needs the files themselves: their paths, and for each file
//! the extents that make up its content, plain or lz4-compressed. This
//! module reads that map from an image and decompresses a file's bytes.
//!
//! What it reads: the superblock, compact and extended inodes, directories
//! (plain or with an inline tail), plain and inline files, and compressed
//! files with full or compact (2- and 4-byte) indexes of one-block lz4
//! pclusters with zero padding, as `mkfs.erofs -zlz4` and `-zlz4hc` make
//! them by default. Anything else (big pclusters, tail packing, fragments,
//! deduplication, chunked files, other compressors, block sizes other than
//! 4 KiB) is refused with [`ErofsError::Unsupported`], and the planner then
//! treats the image as blocks. Nothing here trusts the image: every offset
//! is checked against the image size and every count is bounded, so a
//! malformed image is an error, never a panic.
//!
//! The layout follows the kernel's `fs/erofs/erofs_fs.h`.

use std::collections::HashSet;
use std::io;

const SUPERBLOCK_OFFSET: u64 = 1024;
const MAGIC: u32 = 0xE0F5_E1E2;
const BLOCK: u64 = 4096;
/// Incompatible features this reader handles: lz4 zero padding.
const INCOMPAT_LZ4_0PADDING: u32 = 0x1;
const INCOMPAT_KNOWN: u32 = INCOMPAT_LZ4_0PADDING;

const LAYOUT_FLAT_PLAIN: u16 = 0;
const LAYOUT_COMPRESSED_FULL: u16 = 1;
const LAYOUT_FLAT_INLINE: u16 = 2;
const LAYOUT_COMPRESSED_COMPACT: u16 = 3;

const ADVISE_COMPACTED_2B: u16 = 0x0001;

const TYPE_PLAIN: u8 = 0;
const TYPE_HEAD: u8 = 1;
const TYPE_NONHEAD: u8 = 2;

const S_IFMT: u16 = 0o170000;
const S_IFREG: u16 = 0o100000;
const S_IFDIR: u16 = 0o040000;

/// Most files and directories one image may hold for this reader.
const MAX_INODES: usize = 1 << 22;
/// Largest directory this reader reads.
const MAX_DIR_BYTES: u64 = 64 << 20;
/// Deepest directory nesting this reader follows.
const MAX_DEPTH: usize = 256;

/// Why an image could not be read as erofs.
#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    #[error("not an erofs image (no erofs superblock at byte 1024)")]
    NotErofs,
    #[error("erofs image uses {0}, which this reader does not handle")]
    Unsupported(String),
    #[error("erofs image is malformed: {0}")]
    Malformed(String),
    #[error("reading the erofs image: {0}")]
    Io(#[from] io::Error),
    #[error("the operation's body is malformed: {0}")]
    Body(&'static str),
    #[error("the old file's content: {0}")]
    Source(String),
    #[error("bsdiff: {0}")]
    Patch(#[from] crate::bsdiff::BsdiffError),
    #[error(
        "mkfs.erofs would store the rebuilt file uncompressed; the operation expects pclusters"
    )]
    NotCompressed,
    #[error(transparent)]
    Output(#[from] crate::recompress::RecompressError),
}

fn malformed(what: impl Into<String>) -> ErofsError {
    ErofsError::Malformed(what.into())
}

/// Where one run of a file's bytes is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// Stored as is, starting at this byte of the image.
    Plain { offset: u64 },
    /// One lz4 block, zero-padded at its front to fill image block `block`.
    Lz4 { block: u64 },
}

/// Bytes `logical..logical + len` of a file, and where they are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub len: u64,
    pub storage: Storage,
}

/// A regular file of the image and the extents of its content, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    /// The path from the image's root, without a leading `/`.
    pub path: String,
    pub size: u64,
    pub nid: u64,
    pub extents: Vec<Extent>,
}

impl File {
    /// Whether any of the file's bytes are compressed.
    pub fn is_compressed(&self) -> bool {
        self.extents
            .iter()
            .any(|e| matches!(e.storage, Storage::Lz4 { .. }))
    }
}

/// Reads `buf.len()` bytes of the image at a byte offset.
pub type ReadAt<'a> = dyn Fn(&mut [u8], u64) -> io::Result<()> + Sync + 'a;

struct Superblock {
    root_nid: u64,
    meta_blkaddr: u64,
}

struct Inode {
    nid: u64,
    mode: u16,
    layout: u16,
    size: u64,
    raw_blkaddr: u64,
    /// Where the bytes after the inode and its inline xattrs start.
    end: u64,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes([
        b[at],
        b[at + 1],
        b[at + 2],
        b[at + 3],
        b[at + 4],
        b[at + 5],
        b[at + 6],
        b[at + 7],
    ])
}

/// An erofs image opened for reading.
pub struct Image<'a> {
    read: &'a ReadAt<'a>,
    size: u64,
    sb: Superblock,
}

impl std::fmt::Debug for Image<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("size", &self.size)
            .field("root_nid", &self.sb.root_nid)
            .finish_non_exhaustive()
    }
}

impl<'a> Image<'a> {
    /// Reads the superblock; refuses an image this reader cannot map.
    pub fn open(read: &'a ReadAt<'a>, size: u64) -> Result<Image<'a>, ErofsError> {
        if size < SUPERBLOCK_OFFSET + 128 {
            return Err(ErofsError::NotErofs);
        }
        let mut sb = [0u8; 128];
        read(&mut sb, SUPERBLOCK_OFFSET)?;
        if le32(&sb, 0) != MAGIC {
            return Err(ErofsError::NotErofs);
        }
        let blkszbits = sb[12];
        if blkszbits != 12 {
            return Err(ErofsError::Unsupported(format!(
                "{}-byte blocks",
                1u64.checked_shl(u32::from(blkszbits)).unwrap_or(0)
            )));
        }
        let incompat = le32(&sb, 80);
        if incompat & !INCOMPAT_KNOWN != 0 {
            return Err(ErofsError::Unsupported(format!(
                "incompatible features {:#x}",
                incompat & !INCOMPAT_KNOWN
            )));
        }
        let extra_devices = le16(&sb, 86);
        if extra_devices != 0 {
            return Err(ErofsError::Unsupported("extra devices".into()));
        }
        let image = Image {
            read,
            size,
            sb: Superblock {
                root_nid: u64::from(le16(&sb, 14)),
                meta_blkaddr: u64::from(le32(&sb, 40)),
            },
        };
        Ok(image)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ErofsError> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| malformed("an offset overflows"))?;
        if end > self.size {
            return Err(malformed(format!(
                "bytes {offset}..{end} lie past the image's end ({} bytes)",
                self.size
            )));
        }
        (self.read)(buf, offset)?;
        Ok(())
    }

    fn inode(&self, nid: u64) -> Result<Inode, ErofsError> {
        let at = self
            .sb
            .meta_blkaddr
            .checked_mul(BLOCK)
            .and_then(|m| nid.checked_mul(32).and_then(|n| m.checked_add(n)))
            .ok_or_else(|| malformed(format!("inode {nid} lies past the image")))?;
        let mut b = [0u8; 64];
        let compact = {
            self.read_at(&mut b[..32], at)?;
            le16(&b, 0) & 1 == 0
        };
        let format = le16(&b, 0);
        let layout = (format >> 1) & 0x7;
        let xattr_icount = u64::from(le16(&b, 2));
        let mode = le16(&b, 4);
        let (isize, size, raw) = if compact {
            (32u64, u64::from(le32(&b, 8)), le32(&b, 16))
        } else {
            self.read_at(&mut b[32..], at + 32)?;
            (64u64, le64(&b, 8), le32(&b, 16))
        };
        let xattr_size = if xattr_icount == 0 {
            0
        } else {
            12 + (xattr_icount - 1) * 4
        };
        Ok(Inode {
            nid,
            mode,
            layout,
            size,
            raw_blkaddr: u64::from(raw),
            end: at + isize + xattr_size,
        })
    }

    /// The extents of an uncompressed (plain or inline) inode's data.
    fn flat_extents(&self, inode: &Inode) -> Result<Vec<Extent>, ErofsError> {
        let size = inode.size;
        if size == 0 {
            return Ok(Vec::new());
        }
        let full = match inode.layout {
            LAYOUT_FLAT_PLAIN => size,
            LAYOUT_FLAT_INLINE => size / BLOCK * BLOCK,
            other => return Err(ErofsError::Unsupported(format!("data layout {other}"))),
        };
        let mut extents = Vec::new();
        if full > 0 {
            let offset = inode
                .raw_blkaddr
                .checked_mul(BLOCK)
                .filter(|o| o.checked_add(full).is_some_and(|e| e <= self.size))
                .ok_or_else(|| {
                    malformed(format!("inode {}'s data lies past the image", inode.nid))
                })?;
            extents.push(Extent {
                logical: 0,
                len: full,
                storage: Storage::Plain { offset },
            });
        }
        if full < size {
            let tail = size - full;
            // The inline tail follows the inode in the same block.
            if inode.end % BLOCK + tail > BLOCK || inode.end + tail > self.size {
                return Err(malformed(format!(
                    "inode {}'s inline tail crosses a block",
                    inode.nid
                )));
            }
            extents.push(Extent {
                logical: full,
                len: tail,
                storage: Storage::Plain { offset: inode.end },
            });
        }
        Ok(extents)
    }

    /// The extents of a compressed inode, from its lcluster index.
    fn compressed_extents(&self, inode: &Inode) -> Result<Vec<Extent>, ErofsError> {
        let nid = inode.nid;
        if inode.size == 0 {
            return Ok(Vec::new());
        }
        let header_at = inode.end.div_ceil(8) * 8;
        let mut header = [0u8; 8];
        self.read_at(&mut header, header_at)?;
        let advise = le16(&header, 4);
        let algorithms = header[6];
        let clusterbits = 12 + u32::from(header[7] & 0x7);
        if advise & !ADVISE_COMPACTED_2B != 0 {
            return Err(ErofsError::Unsupported(format!(
                "compression advice {advise:#x} (big pclusters, tail packing or fragments)"
            )));
        }
        if algorithms & 0xf != 0 {
            return Err(ErofsError::Unsupported(format!(
                "compression algorithm {}",
                algorithms & 0xf
            )));
        }
        if clusterbits != 12 {
            return Err(ErofsError::Unsupported(format!(
                "{}-byte logical clusters",
                1u64 << clusterbits
            )));
        }
        let lclusters = inode.size.div_ceil(BLOCK);
        let index = if inode.layout == LAYOUT_COMPRESSED_FULL {
            self.full_index(header_at, lclusters)?
        } else {
            self.compact_index(header_at, lclusters, advise & ADVISE_COMPACTED_2B != 0)?
        };
        let mut heads: Vec<(u64, Storage)> = Vec::new();
        for (lcn, &(kind, clusterofs, blkaddr)) in index.iter().enumerate() {
            if kind == TYPE_NONHEAD {
                if lcn == 0 {
                    return Err(malformed(format!("inode {nid} starts inside a pcluster")));
                }
                continue;
            }
            if u64::from(clusterofs) >= BLOCK {
                return Err(malformed(format!(
                    "inode {nid}: cluster offset {clusterofs}"
                )));
            }
            if lcn == 0 && clusterofs != 0 {
                return Err(malformed(format!(
                    "inode {nid}: first cluster offset {clusterofs}"
                )));
            }
            let logical = lcn as u64 * BLOCK + u64::from(clusterofs);
            if logical >= inode.size {
                // A head at the end (mkfs.erofs marks the end so): nothing
                // of the file is stored there.
                continue;
            }
            let block = blkaddr;
            if block
                .checked_add(1)
                .is_none_or(|e| e.saturating_mul(BLOCK) > self.size)
            {
                return Err(malformed(format!(
                    "inode {nid}: block {block} lies past the image"
                )));
            }
            let storage = if kind == TYPE_PLAIN {
                Storage::Plain {
                    offset: block * BLOCK,
                }
            } else {
                Storage::Lz4 { block }
            };
            heads.push((logical, storage));
        }
        let mut extents = Vec::with_capacity(heads.len());
        for (i, &(logical, storage)) in heads.iter().enumerate() {
            let end = heads.get(i + 1).map_or(inode.size, |h| h.0);
            if end <= logical {
                return Err(malformed(format!("inode {nid}: pclusters out of order")));
            }
            let len = end - logical;
            if matches!(storage, Storage::Plain { .. }) && len > BLOCK {
                return Err(malformed(format!(
                    "inode {nid}: an uncompressed pcluster of {len} bytes"
                )));
            }
            extents.push(Extent {
                logical,
                len,
                storage,
            });
        }
        Ok(extents)
    }

    /// The legacy index: 8 bytes per lcluster.
    fn full_index(
        &self,
        header_at: u64,
        lclusters: u64,
    ) -> Result<Vec<(u8, u16, u64)>, ErofsError> {
        let at = header_at + 8 + 8;
        let bytes = lclusters
            .checked_mul(8)
            .filter(|b| *b <= 64 << 20)
            .ok_or_else(|| malformed("the compression index is too large"))?;
        let mut raw = vec![0u8; bytes as usize];
        self.read_at(&mut raw, at)?;
        Ok(raw
            .chunks_exact(8)
            .map(|e| {
                let kind = (le16(e, 0) & 0x3) as u8;
                let clusterofs = le16(e, 2);
                (kind, clusterofs, u64::from(le32(e, 4)))
            })
            .collect())
    }

    /// The compact index: packs of 2 lclusters in 8 bytes (4B) or 16 in 32
    /// bytes (2B), each pack ending with the block address before it.
    fn compact_index(
        &self,
        header_at: u64,
        lclusters: u64,
        two_byte: bool,
    ) -> Result<Vec<(u8, u16, u64)>, ErofsError> {
        let ebase = header_at + 8;
        let mut initial_4b = (32 - ebase % 32) / 4;
        if initial_4b == 8 {
            initial_4b = 0;
        }
        initial_4b = initial_4b.min(lclusters);
        let count_2b = if two_byte && initial_4b < lclusters {
            (lclusters - initial_4b) / 16 * 16
        } else {
            0
        };
        let rest_4b = lclusters - initial_4b - count_2b;
        // Packs of 4B are 2 lclusters; a partial last pack is stored whole.
        let bytes = initial_4b.div_ceil(2) * 8 + count_2b * 2 + rest_4b.div_ceil(2) * 8;
        if bytes > 64 << 20 {
            return Err(malformed("the compression index is too large"));
        }
        let mut raw = vec![0u8; bytes as usize];
        self.read_at(&mut raw, ebase)?;
        let mut out = Vec::with_capacity(lclusters as usize);
        let mut pos = 0usize;
        for (count, vcnt, pack_bytes, bits) in [
            (initial_4b, 2u64, 8usize, 16usize),
            (count_2b, 16, 32, 14),
            (rest_4b, 2, 8, 16),
        ] {
            let packs = count.div_ceil(vcnt);
            for p in 0..packs {
                let pack = &raw[pos..pos + pack_bytes];
                let in_pack = (count - p * vcnt).min(vcnt) as usize;
                decode_pack(pack, vcnt as usize, bits, in_pack, &mut out)?;
                pos += pack_bytes;
            }
        }
        Ok(out)
    }

    /// Every regular file of the image, walking the tree from the root.
    pub fn files(&self) -> Result<Vec<File>, ErofsError> {
        let mut files = Vec::new();
        let mut seen = HashSet::new();
        let mut stack = vec![(self.sb.root_nid, String::new(), 0usize)];
        seen.insert(self.sb.root_nid);
        while let Some((nid, path, depth)) = stack.pop() {
            let dir = self.inode(nid)?;
            if dir.mode & S_IFMT != S_IFDIR {
                return Err(malformed(format!(
                    "inode {nid} ({path:?}) is not a directory"
                )));
            }
            for (name, child) in self.dir_entries(&dir)? {
                if name == "." || name == ".." {
                    continue;
                }
                if !seen.insert(child) {
                    // A hard link: the file is mapped under its first name.
                    continue;
                }
                if seen.len() > MAX_INODES {
                    return Err(ErofsError::Unsupported("more than 4 Mi inodes".into()));
                }
                let child_path = if path.is_empty() {
                    name
                } else {
                    format!("{path}/{name}")
                };
                let inode = self.inode(child)?;
                match inode.mode & S_IFMT {
                    S_IFDIR => {
                        if depth + 1 > MAX_DEPTH {
                            return Err(malformed("directories nest too deep"));
                        }
                        stack.push((child, child_path, depth + 1));
                    }
                    S_IFREG => {
                        let extents = match inode.layout {
                            LAYOUT_COMPRESSED_FULL | LAYOUT_COMPRESSED_COMPACT => {
                                self.compressed_extents(&inode)?
                            }
                            _ => self.flat_extents(&inode)?,
                        };
                        files.push(File {
                            path: child_path,
                            size: inode.size,
                            nid: child,
                            extents,
                        });
                    }
                    _ => {}
                }
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }

    fn dir_entries(&self, dir: &Inode) -> Result<Vec<(String, u64)>, ErofsError> {
        if dir.size > MAX_DIR_BYTES {
            return Err(ErofsError::Unsupported("a directory over 64 MiB".into()));
        }
        let mut data = Vec::with_capacity(dir.size as usize);
        for e in self.flat_extents(dir)? {
            let Storage::Plain { offset } = e.storage else {
                return Err(ErofsError::Unsupported("compressed directories".into()));
            };
            let start = data.len();
            data.resize(start + e.len as usize, 0);
            self.read_at(&mut data[start..], offset)?;
        }
        let mut entries = Vec::new();
        for block in data.chunks(BLOCK as usize) {
            parse_dir_block(block, &mut entries)
                .map_err(|e| malformed(format!("directory inode {}: {e}", dir.nid)))?;
        }
        Ok(entries)
    }

    /// A file's content, decompressed.
    pub fn read_file(&self, file: &File) -> Result<Vec<u8>, ErofsError> {
        if file.size > 1 << 32 {
            return Err(ErofsError::Unsupported("a file over 4 GiB".into()));
        }
        let mut out = vec![0u8; file.size as usize];
        let mut block = vec![0u8; BLOCK as usize];
        for e in &file.extents {
            let dst = usize::try_from(e.logical)
                .ok()
                .and_then(|l| out.get_mut(l..l + e.len as usize))
                .ok_or_else(|| malformed(format!("{}: an extent past its size", file.path)))?;
            match e.storage {
                Storage::Plain { offset } => self.read_at(dst, offset)?,
                Storage::Lz4 { block: b } => {
                    self.read_at(&mut block, b * BLOCK)?;
                    pcluster_into(&block, dst).map_err(|why| {
                        malformed(format!("{}: the lz4 block at block {b}: {why}", file.path))
                    })?;
                }
            }
        }
        Ok(out)
    }
}

/// Decodes one pack of a compact index into (type, cluster offset, block).
fn decode_pack(
    pack: &[u8],
    vcnt: usize,
    bits: usize,
    used: usize,
    out: &mut Vec<(u8, u16, u64)>,
) -> Result<(), ErofsError> {
    let field = |i: usize| -> (u8, u16) {
        let pos = bits * i;
        let mut v = [0u8; 4];
        let n = (pack.len() - pos / 8).min(4);
        v[..n].copy_from_slice(&pack[pos / 8..pos / 8 + n]);
        let v = u32::from_le_bytes(v) >> (pos & 7);
        let lo = (v & 0xfff) as u16;
        let kind = ((v >> 12) & 0x3) as u8;
        (kind, lo)
    };
    let base = u64::from(le32(pack, pack.len() - 4));
    // Without big pclusters every head takes one block, counted from the
    // block address the pack ends with (the one before its first head).
    let mut heads = 0u64;
    for i in 0..used.min(vcnt) {
        let (kind, lo) = field(i);
        if kind == TYPE_NONHEAD {
            out.push((kind, BLOCK as u16, 0));
        } else if kind == TYPE_PLAIN || kind == TYPE_HEAD {
            heads += 1;
            out.push((kind, lo, base + heads));
        } else {
            return Err(ErofsError::Unsupported(format!("lcluster type {kind}")));
        }
    }
    Ok(())
}

/// Appends one directory block's (name, nid) entries.
fn parse_dir_block(block: &[u8], entries: &mut Vec<(String, u64)>) -> Result<(), String> {
    if block.len() < 12 {
        return Err("a directory block shorter than one entry".into());
    }
    let first_name = usize::from(le16(block, 8));
    if first_name < 12 || first_name % 12 != 0 || first_name > block.len() {
        return Err(format!("first name offset {first_name}"));
    }
    let count = first_name / 12;
    for i in 0..count {
        let at = i * 12;
        let nid = le64(block, at);
        let start = usize::from(le16(block, at + 8));
        let end = if i + 1 < count {
            usize::from(le16(block, at + 12 + 8))
        } else {
            block.len()
        };
        if start > end || end > block.len() {
            return Err(format!("name {i} at {start}..{end}"));
        }
        let raw = &block[start..end];
        let raw = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
        if raw.is_empty() || raw.contains(&b'/') {
            return Err(format!("entry {i} has an invalid name"));
        }
        let name = String::from_utf8_lossy(raw).into_owned();
        entries.push((name, nid));
    }
    Ok(())
}

/// Decompresses one lz4 pcluster block, zero padding at its front, to
/// exactly `out.len()` bytes.
pub fn pcluster_into(block: &[u8], out: &mut [u8]) -> Result<(), &'static str> {
    let start = block.iter().position(|&x| x != 0).unwrap_or(block.len());
    lz4_decompress_into(&block[start..], out)
}

/// Decompresses one lz4 block (no frame) to exactly `out.len()` bytes.
pub fn lz4_decompress_into(src: &[u8], out: &mut [u8]) -> Result<(), &'static str> {
    let mut s = 0usize;
    let mut d = 0usize;
    let byte = |s: &mut usize| -> Result<u8, &'static str> {
        let b = *src.get(*s).ok_or("it ends inside a sequence")?;
        *s += 1;
        Ok(b)
    };
    let length = |s: &mut usize, nibble: usize| -> Result<usize, &'static str> {
        let mut len = nibble;
        if nibble == 15 {
            loop {
                let b = byte(s)?;
                len = len
                    .checked_add(usize::from(b))
                    .ok_or("a length overflows")?;
                if b != 255 {
                    break;
                }
            }
        }
        Ok(len)
    };
    while s < src.len() {
        let token = byte(&mut s)?;
        let literals = length(&mut s, usize::from(token >> 4))?;
        let lit = src
            .get(s..s + literals)
            .ok_or("literals run past its end")?;
        out.get_mut(d..d + literals)
            .ok_or("it decodes to more bytes than its extent")?
            .copy_from_slice(lit);
        s += literals;
        d += literals;
        if s == src.len() {
            break;
        }
        let offset = usize::from(byte(&mut s)?) | usize::from(byte(&mut s)?) << 8;
        if offset == 0 || offset > d {
            return Err("a match reaches before its start");
        }
        let len = length(&mut s, usize::from(token & 0xf))?
            .checked_add(4)
            .ok_or("a length overflows")?;
        if d + len > out.len() {
            return Err("it decodes to more bytes than its extent");
        }
        for i in 0..len {
            out[d + i] = out[d + i - offset];
        }
        d += len;
    }
    if d != out.len() {
        return Err("it decodes to fewer bytes than its extent");
    }
    Ok(())
}

/// The liblz4 this tandem links (`LZ4_versionNumber`), pinned to 1.9.4.
pub fn lz4_version() -> u32 {
    lzzzz::version_number()
}

/// Bytes of file content mkfs.erofs 1.5 compresses from before it moves
/// its queue (`EROFS_CONFIG_COMPR_MAX_SZ`); the queue holds twice as many.
const COMPR_MAX: usize = 900 * 1024;
const QUEUE: usize = 2 * COMPR_MAX;
const BS: usize = BLOCK as usize;

/// One pcluster as mkfs.erofs writes it: a 4 KiB block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pcluster {
    /// The file bytes it holds, from `logical`.
    pub logical: u64,
    pub len: u64,
    /// Whether it is lz4 (else the bytes are stored raw).
    pub compressed: bool,
    pub block: Box<[u8; BS]>,
}

/// Compresses one file's content the way `mkfs.erofs -zlz4hc,LEVEL` of
/// erofs-utils 1.5 does (one-block pclusters, zero padding, no tail
/// packing): its queue of file bytes, `LZ4_compress_HC_destSize` into one
/// block, a block stored raw when compression would not save one. Calls
/// `emit` with each pcluster in order. Returns whether mkfs.erofs would
/// keep the file compressed (it stores a file plain when compression saves
/// no block).
pub fn compress_file(
    content: &[u8],
    level: i32,
    emit: &mut dyn FnMut(Pcluster) -> Result<(), ErofsError>,
) -> Result<bool, ErofsError> {
    let mut q0 = 0usize; // file offset of the queue's first byte
    let mut head = 0usize; // queue offsets
    let mut tail = 0usize;
    let mut remaining = content.len();
    let mut blocks = 0u64;
    while remaining > 0 {
        let read = remaining.min(QUEUE - tail);
        tail += read;
        remaining -= read;
        let last = remaining == 0;
        let mut len = tail - head;
        while len > 0 {
            if len <= BS && !last {
                break;
            }
            let src = &content[q0 + head..q0 + tail];
            let logical = (q0 + head) as u64;
            let mut block = Box::new([0u8; BS]);
            let compressed = if len <= BS {
                // A last piece of one block or less is stored raw.
                None
            } else {
                lz4hc_block(src, level, !(last && len == src.len()))
            };
            let (count, compressed) = match compressed {
                Some((count, bytes)) => {
                    block[BS - bytes.len()..].copy_from_slice(&bytes);
                    (count, true)
                }
                None => {
                    let count = len.min(BS);
                    block[..count].copy_from_slice(&src[..count]);
                    (count, false)
                }
            };
            emit(Pcluster {
                logical,
                len: count as u64,
                compressed,
                block,
            })?;
            blocks += 1;
            head += count;
            len -= count;
            if !last && head >= COMPR_MAX {
                let aligned = head / BS * BS;
                q0 += aligned;
                head -= aligned;
                tail = head + len;
                break;
            }
        }
    }
    Ok(blocks < (content.len() as u64).div_ceil(BLOCK))
}

/// `erofs_compress_destsize` with lz4hc: as much of `src` as fits one
/// block; `None` when that would not save space (mkfs.erofs then stores
/// the bytes raw). `in_blocks`: the result is counted in whole blocks.
fn lz4hc_block(src: &[u8], level: i32, in_blocks: bool) -> Option<(usize, Vec<u8>)> {
    let mut dst = vec![0u8; BS];
    let mut cursor = io::Cursor::new(src);
    let written = lzzzz::lz4_hc::compress_partial(&mut cursor, &mut dst, level).ok()?;
    if written == 0 {
        return None;
    }
    let consumed = cursor.position() as usize;
    let counted = if in_blocks || written >= BS || consumed != src.len() {
        written.div_ceil(BS) * BS
    } else {
        written
    };
    if consumed <= counted {
        return None;
    }
    dst.truncate(written);
    Some((consumed, dst))
}

// ---- The erofs operation: a compressed file re-created on the node. ----

const BODY_MAGIC: &[u8; 4] = b"TEFS";
const PIECE_LEN: usize = 13;

/// A run of an old file's content in the source image: `len` bytes stored
/// at byte `offset`, or, when `lz4`, the 4 KiB lz4 block at `offset` that
/// decompresses to `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourcePiece {
    pub offset: u64,
    pub len: u32,
    pub lz4: bool,
}

impl SourcePiece {
    /// The old file's content, in order, as the operation names it.
    pub fn of(file: &File) -> Vec<SourcePiece> {
        file.extents
            .iter()
            .map(|e| match e.storage {
                Storage::Lz4 { block } => SourcePiece {
                    offset: block * BLOCK,
                    len: e.len as u32,
                    lz4: true,
                },
                Storage::Plain { offset } => SourcePiece {
                    offset,
                    len: e.len as u32,
                    lz4: false,
                },
            })
            .collect()
    }
}

/// An erofs operation's body (its blob, zstd-compressed), little-endian:
///
/// ```text
/// "TEFS"
/// count u32
/// count × (offset u64, len u32, lz4 u8)   the old file's content in order
/// bsdiff patch body (crate::bsdiff) from the old content to the new
/// ```
#[derive(Debug)]
pub struct Body<'a> {
    pub source: Vec<SourcePiece>,
    pub patch: &'a [u8],
}

pub fn encode_body(source: &[SourcePiece], patch: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + source.len() * PIECE_LEN + patch.len());
    out.extend_from_slice(BODY_MAGIC);
    encode_pieces(source, &mut out);
    out.extend_from_slice(patch);
    out
}

impl<'a> Body<'a> {
    /// Reads a body; every piece must lie inside the `source_size`-byte
    /// source image, and the old content fit [`MAX_EROFS_CONTENT`].
    pub fn parse(body: &'a [u8], source_size: u64) -> Result<Body<'a>, ErofsError> {
        let rest = body
            .strip_prefix(BODY_MAGIC)
            .ok_or(ErofsError::Body("no TEFS magic"))?;
        let count = rest
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or(ErofsError::Body("no piece count"))?;
        let table_len = count
            .checked_mul(PIECE_LEN)
            .filter(|&n| n <= rest.len() - 4)
            .ok_or(ErofsError::Body("the piece table runs past its end"))?;
        let source = decode_pieces(&rest[4..4 + table_len]).map_err(ErofsError::Body)?;
        check_pieces(&source, source_size, crate::format::MAX_EROFS_CONTENT)
            .map_err(ErofsError::Body)?;
        Ok(Body {
            source,
            patch: &rest[4 + table_len..],
        })
    }

    /// The old file's content, read and decompressed from the source image.
    pub fn old_content(
        &self,
        read: &dyn Fn(&mut [u8], u64) -> io::Result<()>,
    ) -> Result<Vec<u8>, ErofsError> {
        let view = View::new(self.source.clone());
        let mut old = vec![0u8; view.len() as usize];
        view.read(read, &mut old, 0)
            .map_err(|e| ErofsError::Source(e.to_string()))?;
        Ok(old)
    }
}

/// Decompressed file bytes of an erofs image as one run of bytes: the
/// pieces, each placed right after the one before. A recompress operation
/// takes an initrd's files from it when the image is erofs (its files are
/// compressed, so the image's own bytes hold few of them).
#[derive(Debug)]
pub struct View {
    pieces: Vec<SourcePiece>,
    starts: Vec<u64>,
    len: u64,
    /// The last few lz4 pieces decompressed: (piece index, bytes).
    cache: std::cell::RefCell<Vec<(usize, Vec<u8>)>>,
}

const VIEW_CACHE: usize = 8;

impl View {
    pub fn new(pieces: Vec<SourcePiece>) -> View {
        let mut starts = Vec::with_capacity(pieces.len());
        let mut len = 0u64;
        for p in &pieces {
            starts.push(len);
            len += u64::from(p.len);
        }
        View {
            pieces,
            starts,
            len,
            cache: std::cell::RefCell::new(Vec::new()),
        }
    }

    /// Every file extent of an image, in path order, except those that
    /// touch one of the `skip` byte ranges of the image.
    pub fn of_files(files: &[File], skip: &[(u64, u64)]) -> View {
        let touches = |p: &SourcePiece| {
            let end = p.offset + if p.lz4 { BLOCK } else { u64::from(p.len) };
            skip.iter().any(|&(a, b)| p.offset < b && a < end)
        };
        View::new(
            files
                .iter()
                .flat_map(SourcePiece::of)
                .filter(|p| !touches(p))
                .collect(),
        )
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn pieces(&self) -> &[SourcePiece] {
        &self.pieces
    }

    /// The piece holding byte `offset` of the view, and where it starts.
    pub fn piece_at(&self, offset: u64) -> Option<(usize, u64)> {
        if offset >= self.len {
            return None;
        }
        let i = self.starts.partition_point(|&s| s <= offset) - 1;
        Some((i, self.starts[i]))
    }

    /// Reads `buf.len()` bytes of the view from `offset`, decompressing
    /// through `image` (reads of the image the pieces are in).
    pub fn read(
        &self,
        image: &dyn Fn(&mut [u8], u64) -> io::Result<()>,
        buf: &mut [u8],
        offset: u64,
    ) -> io::Result<()> {
        let outside = || io::Error::new(io::ErrorKind::UnexpectedEof, "read past the erofs view");
        let mut at = offset;
        let mut done = 0usize;
        while done < buf.len() {
            let (i, start) = self.piece_at(at).ok_or_else(outside)?;
            let p = self.pieces[i];
            let within = (at - start) as usize;
            let n = (p.len as usize - within).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            if p.lz4 {
                let mut cache = self.cache.borrow_mut();
                let hit = cache.iter().position(|(k, _)| *k == i);
                let bytes = match hit {
                    Some(h) => &cache[h].1,
                    None => {
                        let mut block = vec![0u8; BS];
                        image(&mut block, p.offset)?;
                        let mut out = vec![0u8; p.len as usize];
                        pcluster_into(&block, &mut out).map_err(|why| {
                            io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("the erofs lz4 block at byte {}: {why}", p.offset),
                            )
                        })?;
                        if cache.len() == VIEW_CACHE {
                            cache.remove(0);
                        }
                        cache.push((i, out));
                        &cache[cache.len() - 1].1
                    }
                };
                dst.copy_from_slice(&bytes[within..within + n]);
            } else {
                image(dst, p.offset + within as u64)?;
            }
            done += n;
            at += n as u64;
        }
        Ok(())
    }
}

/// Checks a table of source pieces against an image of `image_size`
/// bytes: each inside it (an lz4 piece block-aligned), none empty, their
/// total at most `limit`.
pub fn check_pieces(
    pieces: &[SourcePiece],
    image_size: u64,
    limit: u64,
) -> Result<u64, &'static str> {
    let mut total = 0u64;
    for p in pieces {
        let stored = if p.lz4 {
            if p.offset % BLOCK != 0 {
                return Err("an lz4 piece is not block-aligned");
            }
            BLOCK
        } else {
            u64::from(p.len)
        };
        if p.len == 0
            || p.offset
                .checked_add(stored)
                .is_none_or(|end| end > image_size)
        {
            return Err("a piece lies outside the image");
        }
        total += u64::from(p.len);
        if total > limit {
            return Err("the pieces are over the limit");
        }
    }
    Ok(total)
}

/// Encodes a table of source pieces (13 bytes each).
pub fn encode_pieces(pieces: &[SourcePiece], out: &mut Vec<u8>) {
    out.extend_from_slice(&(pieces.len() as u32).to_le_bytes());
    for p in pieces {
        out.extend_from_slice(&p.offset.to_le_bytes());
        out.extend_from_slice(&p.len.to_le_bytes());
        out.push(u8::from(p.lz4));
    }
}

/// Decodes a table of `count` source pieces from `table` (13 bytes each).
pub fn decode_pieces(table: &[u8]) -> Result<Vec<SourcePiece>, &'static str> {
    table
        .chunks_exact(PIECE_LEN)
        .map(|p| {
            Ok(SourcePiece {
                offset: le64(p, 0),
                len: le32(p, 8),
                lz4: match p[12] {
                    0 => false,
                    1 => true,
                    _ => return Err("a piece kind is not 0 or 1"),
                },
            })
        })
        .collect()
}

/// Bytes of one encoded source piece.
pub const SOURCE_PIECE_LEN: usize = PIECE_LEN;

/// The first half of an erofs operation: the old content from the source
/// image, the patch applied; the new file's content.
pub fn patched_content(
    body: &Body<'_>,
    content_len: u64,
    read_source: &dyn Fn(&mut [u8], u64) -> io::Result<()>,
) -> Result<Vec<u8>, ErofsError> {
    let old = body.old_content(read_source)?;
    Ok(crate::bsdiff::apply(
        &old,
        body.patch,
        content_len as usize,
    )?)
}

/// The second half: the new content compressed into pclusters, each chunk
/// of them checked against `chunks` before it is written into `dst`.
pub fn write_pclusters(
    new: &[u8],
    encoder: &crate::format::Lz4Encoder,
    dst: &[crate::format::Extent],
    chunks: &[crate::format::Sha256Hex],
    write: &dyn Fn(&[u8], u64) -> io::Result<()>,
) -> Result<(), ErofsError> {
    let mut out = crate::recompress::ChunkWriter::new(dst, chunks, write);
    let kept = compress_file(new, encoder.level, &mut |p| {
        out.push(&p.block[..]).map_err(ErofsError::from)
    })?;
    if !kept {
        return Err(ErofsError::NotCompressed);
    }
    out.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lz4_literals_and_overlapping_matches_decode() {
        // "abc" then a match of offset 3, length 9: "abcabcabcabc".
        let src = [0x35, b'a', b'b', b'c', 3, 0];
        let mut out = [0u8; 12];
        lz4_decompress_into(&src, &mut out).unwrap();
        assert_eq!(&out, b"abcabcabcabc");
        let mut short = [0u8; 11];
        assert!(lz4_decompress_into(&src, &mut short).is_err());
        let mut long = [0u8; 13];
        assert!(lz4_decompress_into(&src, &mut long).is_err());
        // A match before the start is refused.
        assert!(lz4_decompress_into(&[0x10, b'a', 2, 0], &mut [0u8; 5]).is_err());
    }

    #[test]
    fn a_directory_block_lists_its_names() {
        let mut block = vec![0u8; 64];
        // Two entries, names at 24 ("a") and 25 ("bc", then zero padding).
        block[0..8].copy_from_slice(&7u64.to_le_bytes());
        block[8..10].copy_from_slice(&24u16.to_le_bytes());
        block[12..20].copy_from_slice(&9u64.to_le_bytes());
        block[20..22].copy_from_slice(&25u16.to_le_bytes());
        block[24] = b'a';
        block[25] = b'b';
        block[26] = b'c';
        let mut entries = Vec::new();
        parse_dir_block(&block, &mut entries).unwrap();
        assert_eq!(entries, vec![("a".into(), 7), ("bc".into(), 9)]);
        block[8..10].copy_from_slice(&5u16.to_le_bytes());
        assert!(parse_dir_block(&block, &mut Vec::new()).is_err());
    }

    #[test]
    fn an_operation_body_round_trips_and_bad_tables_are_refused() {
        let pieces = [
            SourcePiece {
                offset: 8192,
                len: 20_000,
                lz4: true,
            },
            SourcePiece {
                offset: 12_300,
                len: 700,
                lz4: false,
            },
        ];
        let body = encode_body(&pieces, b"patch");
        let parsed = Body::parse(&body, 16384).unwrap();
        assert_eq!(parsed.source, pieces);
        assert_eq!(parsed.patch, b"patch");
        // A piece past the source image, a misaligned lz4 block, a bad
        // kind, a table longer than the body, no magic.
        assert!(Body::parse(&body, 12_000).is_err());
        let mut misaligned = pieces;
        misaligned[0].offset = 8000;
        assert!(Body::parse(&encode_body(&misaligned, b""), 16384).is_err());
        let mut kind = body.clone();
        kind[8 + 12] = 2;
        assert!(Body::parse(&kind, 16384).is_err());
        assert!(Body::parse(&body[..20], 16384).is_err());
        assert!(Body::parse(b"XEFS\0\0\0\0", 16384).is_err());
        // Old content over the limit.
        let huge: Vec<SourcePiece> = (0..3)
            .map(|_| SourcePiece {
                offset: 0,
                len: 12 << 20,
                lz4: false,
            })
            .collect();
        assert!(Body::parse(&encode_body(&huge, b""), 1 << 30).is_err());
    }

    #[test]
    fn compressing_keeps_mkfs_erofs_rules_for_small_and_incompressible_files() {
        let collect = |content: &[u8]| {
            let mut out = Vec::new();
            let kept = compress_file(content, 12, &mut |p| {
                out.push(p);
                Ok(())
            })
            .unwrap();
            (kept, out)
        };
        // One block or less: stored raw, so mkfs.erofs keeps it plain.
        let (kept, blocks) = collect(&[7u8; 4096]);
        assert!(!kept);
        assert_eq!(blocks.len(), 1);
        assert!(!blocks[0].compressed);
        // Repetitive bytes: one lz4 block, zero padded at its front, that
        // decodes back to them.
        let content: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let (kept, blocks) = collect(&content);
        assert!(kept);
        let mut back = vec![0u8; content.len()];
        for p in &blocks {
            assert!(p.compressed);
            assert_eq!(p.block[0], 0, "zero padding first");
            let dst = &mut back[p.logical as usize..(p.logical + p.len) as usize];
            pcluster_into(&p.block[..], dst).unwrap();
        }
        assert!(back == content);
    }

    #[test]
    fn garbage_is_not_erofs() {
        let bytes = vec![0x5au8; 8192];
        let read = |buf: &mut [u8], off: u64| {
            buf.copy_from_slice(&bytes[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        assert!(matches!(
            Image::open(&read, bytes.len() as u64),
            Err(ErofsError::NotErofs)
        ));
    }
}
