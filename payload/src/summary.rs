//! What a payload holds, counted: for `tandem-release inspect` and the
//! benchmark.

use serde::Serialize;

use crate::format::{total_blocks, Manifest, OpKind, BLOCK_SIZE};

/// Operation count, target bytes written and blob bytes, per kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KindStats {
    pub operations: u64,
    pub target_bytes: u64,
    pub blob_bytes: u64,
}

/// Statistics of one component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ComponentSummary {
    pub name: String,
    pub target_size: u64,
    pub target_sha256: String,
    pub source_size: Option<u64>,
    pub source_sha256: Option<String>,
    pub zero: KindStats,
    pub copy: KindStats,
    pub data: KindStats,
    pub patch: KindStats,
    pub bsdiff: KindStats,
    pub recompress: KindStats,
    pub erofs: KindStats,
}

/// Counts a manifest's operations.
pub fn summarize(manifest: &Manifest) -> Vec<ComponentSummary> {
    manifest
        .components
        .iter()
        .map(|c| {
            let mut summary = ComponentSummary {
                name: c.name.clone(),
                target_size: c.target.size,
                target_sha256: c.target.digest.sha256.to_hex(),
                source_size: c.source.as_ref().map(|s| s.size),
                source_sha256: c.source.as_ref().map(|s| s.digest.sha256.to_hex()),
                zero: KindStats::default(),
                copy: KindStats::default(),
                data: KindStats::default(),
                patch: KindStats::default(),
                bsdiff: KindStats::default(),
                recompress: KindStats::default(),
                erofs: KindStats::default(),
            };
            for op in &c.operations {
                let s = match op.kind() {
                    OpKind::Zero => &mut summary.zero,
                    OpKind::Copy => &mut summary.copy,
                    OpKind::Data => &mut summary.data,
                    OpKind::Patch => &mut summary.patch,
                    OpKind::Bsdiff => &mut summary.bsdiff,
                    OpKind::Recompress => &mut summary.recompress,
                    OpKind::Erofs => &mut summary.erofs,
                };
                s.operations += 1;
                s.target_bytes += total_blocks(op.dst()) * BLOCK_SIZE;
                s.blob_bytes += op.blob().map_or(0, |b| b.len);
            }
            summary
        })
        .collect()
}
