//! The delta planner's decisions, as plain functions over data: which target
//! blocks are zero, which exist somewhere in the source, how the rest is
//! grouped into blobs, and which source regions a changed chunk should be
//! compressed against. [`crate::make`] does the reading and the encoding.

use std::collections::HashMap;

use crate::format::Extent;

/// What the planner decided for one target block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockClass {
    Zero,
    /// Identical to this source block.
    Copy(u64),
    /// New bytes: compressed, possibly against a source region.
    Literal,
    /// Written by an operation planned apart (a recompress operation).
    Claimed,
}

/// An operation before encoding: literal runs still need their blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlannedOp {
    Zero(Vec<Extent>),
    Copy { dst: Vec<Extent>, src: Vec<Extent> },
    Literal(Vec<Extent>),
}

/// Limits on how much one planned operation covers.
#[derive(Debug, Clone, Copy)]
pub struct Grouping {
    /// Most blocks in one literal operation (one blob).
    pub literal_blocks: u64,
    /// Most blocks in one zero or copy operation, so that progress and
    /// checkpoints advance steadily.
    pub bulk_blocks: u64,
}

impl Default for Grouping {
    fn default() -> Self {
        Grouping {
            literal_blocks: 1024,
            bulk_blocks: 16384,
        }
    }
}

fn push_extent(list: &mut Vec<Extent>, start: u64) {
    match list.last_mut() {
        Some(last) if last.0 + last.1 == start => last.1 += 1,
        _ => list.push(Extent(start, 1)),
    }
}

/// Groups classified blocks into operations, in target order. Every block
/// lands in exactly one operation.
pub fn group_blocks(classes: &[BlockClass], grouping: Grouping) -> Vec<PlannedOp> {
    let mut ops = Vec::new();
    let mut zero: (Vec<Extent>, u64) = (Vec::new(), 0);
    let mut copy: (Vec<Extent>, Vec<Extent>, u64) = (Vec::new(), Vec::new(), 0);
    let mut literal: (Vec<Extent>, u64) = (Vec::new(), 0);
    for (block, class) in classes.iter().enumerate() {
        let block = block as u64;
        match *class {
            BlockClass::Zero => {
                push_extent(&mut zero.0, block);
                zero.1 += 1;
                if zero.1 >= grouping.bulk_blocks {
                    ops.push(PlannedOp::Zero(std::mem::take(&mut zero.0)));
                    zero.1 = 0;
                }
            }
            BlockClass::Copy(src) => {
                // Source and destination are each read as one concatenation.
                push_extent(&mut copy.0, block);
                push_extent(&mut copy.1, src);
                copy.2 += 1;
                if copy.2 >= grouping.bulk_blocks {
                    ops.push(PlannedOp::Copy {
                        dst: std::mem::take(&mut copy.0),
                        src: std::mem::take(&mut copy.1),
                    });
                    copy.2 = 0;
                }
            }
            BlockClass::Claimed => {}
            BlockClass::Literal => {
                push_extent(&mut literal.0, block);
                literal.1 += 1;
                if literal.1 >= grouping.literal_blocks {
                    ops.push(PlannedOp::Literal(std::mem::take(&mut literal.0)));
                    literal.1 = 0;
                }
            }
        }
    }
    if !zero.0.is_empty() {
        ops.push(PlannedOp::Zero(zero.0));
    }
    if !copy.0.is_empty() {
        ops.push(PlannedOp::Copy {
            dst: copy.0,
            src: copy.1,
        });
    }
    if !literal.0.is_empty() {
        ops.push(PlannedOp::Literal(literal.0));
    }
    ops
}

/// True when a block is all zeros.
pub fn is_zero(block: &[u8]) -> bool {
    block.iter().all(|&b| b == 0)
}

/// Content-defined anchors: positions where a gear rolling hash over the
/// last 64 bytes has its top `ANCHOR_BITS` bits clear (about one every 512
/// bytes). Two similar files share anchors wherever they share content, at
/// whatever byte offset it moved to.
pub const ANCHOR_BITS: u32 = 9;

const GEAR: [u64; 256] = gear_table();

const fn gear_table() -> [u64; 256] {
    // splitmix64: a fixed, well-mixed table.
    let mut table = [0u64; 256];
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut i = 0;
    while i < 256 {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        table[i] = z ^ (z >> 31);
        i += 1;
    }
    table
}

/// Calls `found(hash, offset)` for each anchor in `data`, skipping anchors
/// inside runs of one repeated byte (zeros, padding), which match everywhere
/// and say nothing.
pub fn for_each_anchor(data: &[u8], mut found: impl FnMut(u64, usize)) {
    let mut h: u64 = 0;
    let shift = 64 - ANCHOR_BITS;
    for (i, &b) in data.iter().enumerate() {
        h = (h << 1).wrapping_add(GEAR[usize::from(b)]);
        if h >> shift == 0 && i >= 63 && !(data[i - 63..=i].iter().all(|&x| x == b)) {
            found(h, i);
        }
    }
}

/// Anchors of the source image, sorted by hash, for similarity lookups.
#[derive(Debug, Default)]
pub struct AnchorIndex {
    /// (hash, source block).
    entries: Vec<(u64, u32)>,
}

/// Anchors whose hash occurs more often than this are dropped: they are
/// boilerplate, not evidence of where a file came from.
const MAX_ANCHOR_REPEATS: usize = 8;

impl AnchorIndex {
    /// Builds the index from (hash, block) pairs in any order.
    pub fn from_entries(mut entries: Vec<(u64, u32)>) -> AnchorIndex {
        entries.sort_unstable();
        entries.dedup();
        let mut kept = Vec::with_capacity(entries.len());
        let mut i = 0;
        while i < entries.len() {
            let mut j = i;
            while j < entries.len() && entries[j].0 == entries[i].0 {
                j += 1;
            }
            if j - i <= MAX_ANCHOR_REPEATS {
                kept.extend_from_slice(&entries[i..j]);
            }
            i = j;
        }
        kept.shrink_to_fit();
        AnchorIndex { entries: kept }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Source blocks holding an anchor with this hash.
    pub fn lookup(&self, hash: u64) -> impl Iterator<Item = u32> + '_ {
        let start = self.entries.partition_point(|e| e.0 < hash);
        self.entries[start..]
            .iter()
            .take_while(move |e| e.0 == hash)
            .map(|e| e.1)
    }
}

/// Source regions are chosen in granules of this many blocks (64 KiB).
pub const GRANULE_BLOCKS: u64 = 16;

/// Chooses the source extents to use as a chunk's reference: the granules
/// where the chunk's anchors point most often (at least `min_votes`), each
/// widened by one granule on both sides (similar files shift), up to
/// `budget_blocks` in all, returned in source order and merged.
pub fn choose_reference(
    chunk: &[u8],
    index: &AnchorIndex,
    source_blocks: u64,
    budget_blocks: u64,
    min_votes: u32,
) -> Vec<Extent> {
    let mut votes: HashMap<u64, u32> = HashMap::new();
    for_each_anchor(chunk, |hash, _| {
        for block in index.lookup(hash) {
            *votes.entry(u64::from(block) / GRANULE_BLOCKS).or_default() += 1;
        }
    });
    let mut ranked: Vec<(u64, u32)> = votes.into_iter().filter(|v| v.1 >= min_votes).collect();
    // Most votes first; ties by position so the choice is deterministic.
    ranked.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let granules = source_blocks.div_ceil(GRANULE_BLOCKS);
    let mut chosen: Vec<u64> = Vec::new();
    let mut blocks = 0u64;
    for (g, _) in ranked {
        for candidate in [g, g.wrapping_sub(1), g + 1] {
            if candidate >= granules || chosen.contains(&candidate) {
                continue;
            }
            let len = granule_len(candidate, source_blocks);
            if blocks + len > budget_blocks {
                continue;
            }
            chosen.push(candidate);
            blocks += len;
        }
        if blocks + GRANULE_BLOCKS > budget_blocks {
            break;
        }
    }
    chosen.sort_unstable();
    let mut extents: Vec<Extent> = Vec::new();
    for g in chosen {
        let start = g * GRANULE_BLOCKS;
        let len = granule_len(g, source_blocks);
        match extents.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 += len,
            _ => extents.push(Extent(start, len)),
        }
    }
    extents
}

fn granule_len(g: u64, source_blocks: u64) -> u64 {
    GRANULE_BLOCKS.min(source_blocks - g * GRANULE_BLOCKS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::total_blocks;
    use crate::format::BLOCK_SIZE;
    use BlockClass::*;

    const BS: usize = BLOCK_SIZE as usize;

    #[test]
    fn grouping_covers_every_block_once_in_order() {
        let classes = [
            Zero,
            Zero,
            Copy(7),
            Copy(8),
            Copy(3),
            Literal,
            Zero,
            Literal,
            Copy(4),
        ];
        let ops = group_blocks(&classes, Grouping::default());
        assert_eq!(
            ops,
            vec![
                PlannedOp::Zero(vec![Extent(0, 2), Extent(6, 1)]),
                PlannedOp::Copy {
                    dst: vec![Extent(2, 3), Extent(8, 1)],
                    src: vec![Extent(7, 2), Extent(3, 2)],
                },
                PlannedOp::Literal(vec![Extent(5, 1), Extent(7, 1)]),
            ]
        );
    }

    #[test]
    fn grouping_splits_large_runs() {
        let classes = vec![Literal; 2500];
        let ops = group_blocks(&classes, Grouping::default());
        let sizes: Vec<u64> = ops
            .iter()
            .map(|op| match op {
                PlannedOp::Literal(d) => total_blocks(d),
                _ => 0,
            })
            .collect();
        assert_eq!(sizes, vec![1024, 1024, 452]);
    }

    #[test]
    fn anchors_follow_content_not_position() {
        let content: Vec<u8> = (0..20000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut shifted = vec![0x55u8; 777];
        shifted.extend_from_slice(&content);
        let mut a = Vec::new();
        for_each_anchor(&content, |h, _| a.push(h));
        let mut b = Vec::new();
        for_each_anchor(&shifted, |h, _| b.push(h));
        assert!(a.len() > 10, "{} anchors", a.len());
        assert_eq!(a, b);
        let mut zeros = 0;
        for_each_anchor(&[0u8; 100_000], |_, _| zeros += 1);
        assert_eq!(zeros, 0);
    }

    #[test]
    fn reference_points_at_the_moved_content() {
        // Source: noise, then at block 320 the content a target chunk holds.
        use tandem_testkit::noise;
        let content = noise(7, 64 * 1024);
        let mut source = noise(99, 320 * BS);
        source.extend_from_slice(&content);
        source.extend_from_slice(&noise(5, 100 * BS));
        let mut entries = Vec::new();
        for_each_anchor(&source, |h, off| entries.push((h, (off / BS) as u32)));
        let index = AnchorIndex::from_entries(entries);
        let source_blocks = (source.len() / BS) as u64;
        let mut chunk = content.clone();
        chunk[1000] ^= 1;
        let reference = choose_reference(&chunk, &index, source_blocks, 64, 2);
        assert!(!reference.is_empty());
        let covered = |b: u64| reference.iter().any(|e| e.0 <= b && b < e.0 + e.1);
        assert!((320..336).all(covered), "{reference:?}");
        assert!(total_blocks(&reference) <= 64);
    }
}
