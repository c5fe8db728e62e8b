//! dm-verity hash trees, in the on-disk format of `veritysetup` and the
//! kernel's dm-verity target: a 512-byte superblock (padded to one hash
//! block), then the tree's levels, the top level first, each hash block
//! holding `hash_block_size / 32` SHA-256 digests of the blocks below,
//! zero-padded. A digest is `SHA-256(salt ‖ block)` (hash type 1, what
//! `veritysetup format` writes) or `SHA-256(block ‖ salt)` (type 0, Chrome
//! OS). The root hash is the digest of the top level's one block; with a
//! single data block there are no levels and the root is that block's
//! digest.
//!
//! [`verify`] recomputes the whole tree from the data and compares every
//! stored hash block with it, so a flipped byte in the data or in the tree
//! is found and located. [`format`] builds a hash device (for tests and
//! for release tooling). The layout decisions ([`TreeLayout`]) are pure.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use sha2::{Digest as _, Sha256};

use crate::digest::worker_count;

/// The superblock's size on disk (before padding to a hash block).
pub const SUPERBLOCK_SIZE: usize = 512;
const SIGNATURE: &[u8; 8] = b"verity\0\0";
const DIGEST: usize = 32;
const MAX_SALT: usize = 256;

/// Why a hash tree could not be read or does not match its data.
#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    #[error("{context}: {error}")]
    Io {
        context: String,
        #[source]
        error: io::Error,
    },
    #[error("no dm-verity superblock at the start of the hash area (found {found:02x?})")]
    NoSuperblock { found: Vec<u8> },
    #[error("unsupported dm-verity parameters: {0}")]
    Unsupported(String),
    #[error(
        "the hash tree covers {needed} bytes of data but the data area holds only {available}"
    )]
    DataTooSmall { needed: u64, available: u64 },
    #[error("the hash tree needs {needed} bytes but the hash area holds only {available}")]
    HashTooSmall { needed: u64, available: u64 },
    #[error(
        "hash tree level {level} block {block} does not match the data{}",
        data_range.map(|(a, b)| format!(" (data blocks {a} to {b}: the data or this hash block changed)")).unwrap_or_default()
    )]
    Mismatch {
        /// 0 is the level hashing the data blocks.
        level: usize,
        /// The hash block's index within its level.
        block: u64,
        /// For level 0: the data blocks the hash block covers.
        data_range: Option<(u64, u64)>,
    },
    #[error("verity root hash is {found}, expected {expected}")]
    RootMismatch { expected: String, found: String },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> VerityError {
    let context = context.into();
    move |error| VerityError::Io { context, error }
}

/// The parameters a hash tree is built with (what the superblock holds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityParams {
    /// 1: salt before the block (veritysetup's default); 0: Chrome OS.
    pub hash_type: u32,
    pub data_block_size: u32,
    pub hash_block_size: u32,
    pub data_blocks: u64,
    pub salt: Vec<u8>,
    pub uuid: [u8; 16],
}

impl VerityParams {
    /// SHA-256, 4 KiB blocks, hash type 1: what `veritysetup format`
    /// writes by default, here with a given salt and UUID.
    pub fn new(data_blocks: u64, salt: Vec<u8>, uuid: [u8; 16]) -> VerityParams {
        VerityParams {
            hash_type: 1,
            data_block_size: 4096,
            hash_block_size: 4096,
            data_blocks,
            salt,
            uuid,
        }
    }

    fn check(&self) -> Result<(), VerityError> {
        let power = |n: u32| n.is_power_of_two() && (512..=1 << 20).contains(&n);
        if !power(self.data_block_size) || !power(self.hash_block_size) {
            return Err(VerityError::Unsupported(format!(
                "block sizes {} and {} (want powers of two from 512 to 1 MiB)",
                self.data_block_size, self.hash_block_size
            )));
        }
        if self.hash_type > 1 {
            return Err(VerityError::Unsupported(format!(
                "hash type {}",
                self.hash_type
            )));
        }
        if self.salt.len() > MAX_SALT {
            return Err(VerityError::Unsupported(format!(
                "a {}-byte salt (at most {MAX_SALT})",
                self.salt.len()
            )));
        }
        if self.data_blocks == 0 {
            return Err(VerityError::Unsupported("no data blocks".into()));
        }
        Ok(())
    }

    /// Bytes of data the tree covers.
    pub fn data_size(&self) -> u64 {
        self.data_blocks * u64::from(self.data_block_size)
    }

    /// The tree's shape. Pure.
    pub fn layout(&self) -> TreeLayout {
        TreeLayout::new(self.data_blocks, self.hash_block_size)
    }

    /// The digest of one block under these parameters.
    fn digest(&self, block: &[u8]) -> [u8; DIGEST] {
        let mut h = Sha256::new();
        if self.hash_type == 1 {
            h.update(&self.salt);
            h.update(block);
        } else {
            h.update(block);
            h.update(&self.salt);
        }
        h.finalize().into()
    }
}

/// Parses a superblock (the first 512 bytes of a hash area). Pure.
pub fn parse_superblock(bytes: &[u8]) -> Result<VerityParams, VerityError> {
    if bytes.len() < SUPERBLOCK_SIZE || &bytes[..8] != SIGNATURE {
        return Err(VerityError::NoSuperblock {
            found: bytes[..bytes.len().min(8)].to_vec(),
        });
    }
    let u32_at =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let version = u32_at(8);
    if version != 1 {
        return Err(VerityError::Unsupported(format!(
            "superblock version {version}"
        )));
    }
    let algorithm: Vec<u8> = bytes[32..64]
        .iter()
        .copied()
        .take_while(|&b| b != 0)
        .collect();
    if !algorithm.eq_ignore_ascii_case(b"sha256") {
        return Err(VerityError::Unsupported(format!(
            "hash algorithm {:?} (tandem checks sha256 trees)",
            String::from_utf8_lossy(&algorithm)
        )));
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&bytes[16..32]);
    let mut blocks = [0u8; 8];
    blocks.copy_from_slice(&bytes[72..80]);
    let salt_size = usize::from(u16::from_le_bytes([bytes[80], bytes[81]]));
    if salt_size > MAX_SALT {
        return Err(VerityError::Unsupported(format!("salt size {salt_size}")));
    }
    let params = VerityParams {
        hash_type: u32_at(12),
        data_block_size: u32_at(64),
        hash_block_size: u32_at(68),
        data_blocks: u64::from_le_bytes(blocks),
        salt: bytes[88..88 + salt_size].to_vec(),
        uuid,
    };
    params.check()?;
    Ok(params)
}

/// The superblock for `params`, as veritysetup writes it. Pure.
pub fn superblock(params: &VerityParams) -> [u8; SUPERBLOCK_SIZE] {
    let mut sb = [0u8; SUPERBLOCK_SIZE];
    sb[..8].copy_from_slice(SIGNATURE);
    sb[8..12].copy_from_slice(&1u32.to_le_bytes());
    sb[12..16].copy_from_slice(&params.hash_type.to_le_bytes());
    sb[16..32].copy_from_slice(&params.uuid);
    sb[32..38].copy_from_slice(b"sha256");
    sb[64..68].copy_from_slice(&params.data_block_size.to_le_bytes());
    sb[68..72].copy_from_slice(&params.hash_block_size.to_le_bytes());
    sb[72..80].copy_from_slice(&params.data_blocks.to_le_bytes());
    let salt = &params.salt[..params.salt.len().min(MAX_SALT)];
    sb[80..82].copy_from_slice(&(salt.len() as u16).to_le_bytes());
    sb[88..88 + salt.len()].copy_from_slice(salt);
    sb
}

/// Where each level of a tree lies in the hash area (after the padded
/// superblock), in hash blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeLayout {
    /// By level, 0 (hashing the data) first: (first block, block count).
    pub levels: Vec<(u64, u64)>,
    /// How many digests one hash block holds, as a power of two.
    pub fanout_bits: u32,
}

impl TreeLayout {
    /// The kernel's rule (dm-verity-target.c): as many levels as it takes
    /// to bring the data blocks down to one hash block, stored top first.
    pub fn new(data_blocks: u64, hash_block_size: u32) -> TreeLayout {
        let fanout_bits = (hash_block_size as usize / DIGEST).trailing_zeros();
        let mut count = 0u32;
        while fanout_bits * count < 64 && (data_blocks - 1) >> (fanout_bits * count) != 0 {
            count += 1;
        }
        let blocks_at = |level: u32| -> u64 {
            let shift = (level + 1) * fanout_bits;
            if shift >= 64 {
                1
            } else {
                data_blocks.div_ceil(1u64 << shift)
            }
        };
        let mut levels = vec![(0, 0); count as usize];
        let mut position = 0u64;
        for level in (0..count).rev() {
            let n = blocks_at(level);
            levels[level as usize] = (position, n);
            position += n;
        }
        TreeLayout {
            levels,
            fanout_bits,
        }
    }

    /// Hash blocks in the whole tree.
    pub fn hash_blocks(&self) -> u64 {
        self.levels.iter().map(|l| l.1).sum()
    }
}

/// A data area or hash area: a file or device and a byte range in it.
#[derive(Debug, Clone, Copy)]
pub struct Area<'a, F> {
    pub file: &'a F,
    pub offset: u64,
    /// How many bytes from `offset` belong to the area.
    pub len: u64,
}

/// The digests of every data block, computed on every core.
fn hash_data<F: FileExt + Sync>(
    params: &VerityParams,
    data: Area<'_, F>,
) -> Result<Vec<u8>, VerityError> {
    let needed = params.data_size();
    if needed > data.len {
        return Err(VerityError::DataTooSmall {
            needed,
            available: data.len,
        });
    }
    let block = params.data_block_size as usize;
    let chunk_blocks = ((4 << 20) / block) as u64;
    let chunks = params.data_blocks.div_ceil(chunk_blocks);
    let size = usize::try_from(params.data_blocks * DIGEST as u64)
        .map_err(|_| VerityError::Unsupported("a tree too large for memory".into()))?;
    let out = Mutex::new(vec![0u8; size]);
    let next = AtomicU64::new(0);
    let failed: Mutex<Option<VerityError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..worker_count().min(chunks as usize).max(1) {
            scope.spawn(|| {
                let mut buf = vec![0u8; chunk_blocks as usize * block];
                let mut digests = Vec::with_capacity(chunk_blocks as usize * DIGEST);
                loop {
                    let chunk = next.fetch_add(1, Ordering::Relaxed);
                    if chunk >= chunks || failed.lock().map_or(true, |f| f.is_some()) {
                        return;
                    }
                    let first = chunk * chunk_blocks;
                    let n = chunk_blocks.min(params.data_blocks - first) as usize;
                    let at = data.offset + first * block as u64;
                    if let Err(e) = data.file.read_exact_at(&mut buf[..n * block], at) {
                        let mut failed = failed.lock().unwrap_or_else(|p| p.into_inner());
                        *failed = Some(io_err(format!("reading data at byte {at}"))(e));
                        return;
                    }
                    digests.clear();
                    for b in buf[..n * block].chunks(block) {
                        digests.extend_from_slice(&params.digest(b));
                    }
                    let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
                    let start = first as usize * DIGEST;
                    out[start..start + digests.len()].copy_from_slice(&digests);
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(out.into_inner().unwrap_or_else(|p| p.into_inner()))
}

/// Packs digests into zero-padded hash blocks. Pure.
fn pack(digests: &[u8], hash_block: usize) -> Vec<u8> {
    let per_block = hash_block / DIGEST * DIGEST;
    let blocks = digests.len().div_ceil(per_block);
    let mut out = vec![0u8; blocks * hash_block];
    for (i, piece) in digests.chunks(per_block).enumerate() {
        out[i * hash_block..i * hash_block + piece.len()].copy_from_slice(piece);
    }
    out
}

/// The tree computed from the data: each level's hash blocks (level 0
/// first) and the root hash.
struct Tree {
    levels: Vec<Vec<u8>>,
    root: [u8; DIGEST],
}

fn compute<F: FileExt + Sync>(
    params: &VerityParams,
    data: Area<'_, F>,
) -> Result<Tree, VerityError> {
    params.check()?;
    let layout = params.layout();
    let hash_block = params.hash_block_size as usize;
    let mut digests = hash_data(params, data)?;
    if layout.levels.is_empty() {
        let mut root = [0u8; DIGEST];
        root.copy_from_slice(&digests[..DIGEST]);
        return Ok(Tree {
            levels: Vec::new(),
            root,
        });
    }
    let mut levels = Vec::new();
    for _ in &layout.levels {
        let blocks = pack(&digests, hash_block);
        digests = blocks
            .chunks(hash_block)
            .flat_map(|b| params.digest(b))
            .collect();
        levels.push(blocks);
    }
    let mut root = [0u8; DIGEST];
    root.copy_from_slice(&digests[..DIGEST]);
    Ok(Tree { levels, root })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a root hash given as hex (the `usrhash=` of a command line).
pub fn parse_root_hash(text: &str) -> Option<[u8; DIGEST]> {
    if text.len() != DIGEST * 2 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; DIGEST];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

/// A root hash as lowercase hex, as `veritysetup` prints it.
pub fn root_hash_hex(root: &[u8; DIGEST]) -> String {
    hex(root)
}

/// What [`verify`] found: the tree's parameters and its root hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub params: VerityParams,
    pub root_hash: [u8; DIGEST],
}

impl Verified {
    pub fn root_hash_hex(&self) -> String {
        hex(&self.root_hash)
    }
}

/// Reads the superblock of a hash area, recomputes the tree over the data
/// and compares every stored hash block with it. Returns the root hash; the
/// caller compares it with the one the boot artifact names (see
/// [`verify_root`]).
pub fn verify<D: FileExt + Sync, H: FileExt>(
    data: Area<'_, D>,
    hash: Area<'_, H>,
) -> Result<Verified, VerityError> {
    let mut sb = [0u8; SUPERBLOCK_SIZE];
    if hash.len < SUPERBLOCK_SIZE as u64 {
        return Err(VerityError::HashTooSmall {
            needed: SUPERBLOCK_SIZE as u64,
            available: hash.len,
        });
    }
    hash.file
        .read_exact_at(&mut sb, hash.offset)
        .map_err(io_err("reading the verity superblock"))?;
    let params = parse_superblock(&sb)?;
    let hash_block = u64::from(params.hash_block_size);
    let layout = params.layout();
    let needed = hash_block * (1 + layout.hash_blocks());
    if needed > hash.len {
        return Err(VerityError::HashTooSmall {
            needed,
            available: hash.len,
        });
    }
    let tree = compute(&params, data)?;
    let fanout = 1u64 << layout.fanout_bits;
    for (level, ((first, count), computed)) in layout.levels.iter().zip(&tree.levels).enumerate() {
        let mut stored = vec![0u8; (count * hash_block) as usize];
        let at = hash.offset + hash_block * (1 + first);
        hash.file
            .read_exact_at(&mut stored, at)
            .map_err(io_err(format!("reading hash tree level {level}")))?;
        if let Some(block) = stored
            .chunks(hash_block as usize)
            .zip(computed.chunks(hash_block as usize))
            .position(|(s, c)| s != c)
        {
            let block = block as u64;
            let data_range = (level == 0).then(|| {
                let start = block * fanout;
                (start, (start + fanout).min(params.data_blocks) - 1)
            });
            return Err(VerityError::Mismatch {
                level,
                block,
                data_range,
            });
        }
    }
    Ok(Verified {
        params,
        root_hash: tree.root,
    })
}

/// [`verify`], then the root hash compared with `expected` (hex).
pub fn verify_root<D: FileExt + Sync, H: FileExt>(
    data: Area<'_, D>,
    hash: Area<'_, H>,
    expected: &str,
) -> Result<Verified, VerityError> {
    let verified = verify(data, hash)?;
    let found = verified.root_hash_hex();
    if !found.eq_ignore_ascii_case(expected) {
        return Err(VerityError::RootMismatch {
            expected: expected.to_string(),
            found,
        });
    }
    Ok(verified)
}

/// A hash device for `params` over the data: the superblock padded to one
/// hash block, then the tree, top level first. Returns it and the root.
pub fn format<F: FileExt + Sync>(
    params: &VerityParams,
    data: Area<'_, F>,
) -> Result<(Vec<u8>, [u8; DIGEST]), VerityError> {
    let tree = compute(params, data)?;
    let hash_block = params.hash_block_size as usize;
    let mut out = vec![0u8; hash_block];
    out[..SUPERBLOCK_SIZE].copy_from_slice(&superblock(params));
    for level in tree.levels.iter().rev() {
        out.extend_from_slice(level);
    }
    Ok((out, tree.root))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_follows_the_kernel() {
        // 128 digests per 4 KiB block.
        assert!(TreeLayout::new(1, 4096).levels.is_empty());
        assert_eq!(TreeLayout::new(2, 4096).levels, vec![(0, 1)]);
        assert_eq!(TreeLayout::new(128, 4096).levels, vec![(0, 1)]);
        // 129 blocks: two level-0 blocks under one top block, stored first.
        assert_eq!(TreeLayout::new(129, 4096).levels, vec![(1, 2), (0, 1)]);
        let big = TreeLayout::new(128 * 128 + 1, 4096);
        assert_eq!(big.levels, vec![(1 + 2, 129), (1, 2), (0, 1)]);
        assert_eq!(big.hash_blocks(), 132);
    }

    #[test]
    fn superblock_round_trips_and_refuses_others() {
        let params = VerityParams::new(1000, vec![7; 32], [3; 16]);
        let sb = superblock(&params);
        assert_eq!(parse_superblock(&sb).unwrap(), params);
        let mut bad = sb;
        bad[0] = b'x';
        assert!(matches!(
            parse_superblock(&bad),
            Err(VerityError::NoSuperblock { .. })
        ));
        let mut sha1 = sb;
        sha1[32..38].copy_from_slice(b"sha1\0\0");
        assert!(matches!(
            parse_superblock(&sha1),
            Err(VerityError::Unsupported(_))
        ));
    }

    #[test]
    fn root_hash_hex_parses_back() {
        let root = [0xab; 32];
        assert_eq!(parse_root_hash(&root_hash_hex(&root)), Some(root));
        assert_eq!(parse_root_hash("abc"), None);
        assert_eq!(parse_root_hash(&"zz".repeat(32)), None);
    }
}
