//! Checks a (signature-verified) manifest before anything is written: every
//! destination block of each component written exactly once, nothing read
//! outside the source, blobs laid out front to back, sizes within limits.
//! Pure: no I/O.

use crate::format::{
    total_blocks, Digest, Extent, Header, Manifest, OpKind, Operation, BLOCK_SIZE, DIGEST_SEGMENT,
    FORMAT_VERSION, MAX_BLOB_LEN, MAX_COMPONENTS, MAX_EROFS_CONTENT, MAX_IMAGE_SIZE, MAX_OP_OUTPUT,
    MAX_RECOMPRESS_CONTENT, MAX_RECOMPRESS_OUTPUT, MAX_REFERENCE_LEN, MIN_FORMAT_VERSION,
    RECOMPRESS_CHUNK,
};

/// What is wrong with a manifest. Each names the component and operation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest is not valid JSON for format version {FORMAT_VERSION}: {0}")]
    Syntax(String),
    #[error("manifest format version {0} is not supported (this tandem reads versions {MIN_FORMAT_VERSION} to {FORMAT_VERSION})")]
    Version(u32),
    #[error("manifest format version {manifest} differs from the header's {header}")]
    HeaderVersion { manifest: u32, header: u32 },
    #[error("manifest block size {0} is not 4096")]
    BlockSize(u64),
    #[error("manifest has {0} components (must be 1 to {MAX_COMPONENTS})")]
    ComponentCount(usize),
    #[error("component {component}: file length {file_len} does not fit its {size}-byte target (it must be in the last block)")]
    FileLen {
        component: String,
        file_len: u64,
        size: u64,
    },
    #[error("component name {0:?} is invalid or repeated")]
    ComponentName(String),
    #[error("manifest data length {manifest} does not match the header's {header}")]
    DataLenMismatch { manifest: u64, header: u64 },
    #[error(
        "component {component}: {what} size {size} is not a positive multiple of 4096 up to 16 TiB"
    )]
    ImageSize {
        component: String,
        what: &'static str,
        size: u64,
    },
    #[error(
        "component {component}: {what} digest does not describe {size} bytes in 16 MiB segments"
    )]
    Digest {
        component: String,
        what: &'static str,
        size: u64,
    },
    #[error("manifest names a source version but no component has a source, or the reverse")]
    SourceMismatch,
    #[error("component {component}, operation {op}: {problem}")]
    Operation {
        component: String,
        op: usize,
        problem: String,
    },
    #[error("component {component}, operation {op}: it re-creates compressed bytes with {library} {}, this tandem has {} (they could not be reproduced)", version_name(.needs), version_name(.has))]
    Encoder {
        component: String,
        op: usize,
        library: &'static str,
        needs: u32,
        has: u32,
    },
    #[error("component {component}: destination blocks {first}..{end} are written twice")]
    Overlap {
        component: String,
        first: u64,
        end: u64,
    },
    #[error("component {component}: destination blocks {first}..{end} are never written")]
    Gap {
        component: String,
        first: u64,
        end: u64,
    },
    #[error(
        "blobs do not fill the data section: they end at {end}, the section is {data_len} bytes"
    )]
    DataLayout { end: u64, data_len: u64 },
}

/// Parses manifest bytes and validates them against the header they came
/// with (its format version and data section length).
pub fn parse_and_validate(bytes: &[u8], header: &Header) -> Result<Manifest, ManifestError> {
    let manifest: Manifest =
        serde_json::from_slice(bytes).map_err(|e| ManifestError::Syntax(e.to_string()))?;
    if manifest.format_version != header.version {
        return Err(ManifestError::HeaderVersion {
            manifest: manifest.format_version,
            header: header.version,
        });
    }
    validate(&manifest, header.data_len)?;
    Ok(manifest)
}

/// Validates a parsed manifest.
pub fn validate(m: &Manifest, header_data_len: u64) -> Result<(), ManifestError> {
    if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&m.format_version) {
        return Err(ManifestError::Version(m.format_version));
    }
    if m.block_size != BLOCK_SIZE {
        return Err(ManifestError::BlockSize(m.block_size));
    }
    if m.components.is_empty() || m.components.len() > MAX_COMPONENTS {
        return Err(ManifestError::ComponentCount(m.components.len()));
    }
    if m.data_len != header_data_len {
        return Err(ManifestError::DataLenMismatch {
            manifest: m.data_len,
            header: header_data_len,
        });
    }
    if m.source_version.is_some() != m.is_delta() {
        return Err(ManifestError::SourceMismatch);
    }
    let mut names: Vec<&str> = Vec::new();
    let mut blob_end = 0u64;
    for c in &m.components {
        if !valid_name(&c.name) || names.contains(&c.name.as_str()) {
            return Err(ManifestError::ComponentName(c.name.clone()));
        }
        names.push(&c.name);
        check_image(&c.name, "target", c.target.size, &c.target.digest)?;
        if let Some(file_len) = c.file_len {
            if file_len == 0 || file_len > c.target.size || c.target.size - file_len >= BLOCK_SIZE {
                return Err(ManifestError::FileLen {
                    component: c.name.clone(),
                    file_len,
                    size: c.target.size,
                });
            }
        }
        let source_blocks = match &c.source {
            Some(s) => {
                check_image(&c.name, "source", s.size, &s.digest)?;
                Some(s.size / BLOCK_SIZE)
            }
            None => None,
        };
        let target_blocks = c.target.size / BLOCK_SIZE;
        let mut dst_all: Vec<Extent> = Vec::new();
        for (i, op) in c.operations.iter().enumerate() {
            let bad = |problem: String| ManifestError::Operation {
                component: c.name.clone(),
                op: i,
                problem,
            };
            check_op(op, target_blocks, source_blocks).map_err(bad)?;
            let needs = op.format_version();
            if m.format_version < needs {
                let name = kind_name(op.kind());
                let article = if name.starts_with('e') { "an" } else { "a" };
                return Err(bad(format!(
                    "{article} {name} operation needs format version {needs}, the manifest is version {}",
                    m.format_version
                )));
            }
            let library = match op {
                Operation::Recompress { encoder, .. } => Some((
                    "libzstd",
                    encoder.version,
                    crate::recompress::zstd_version(),
                )),
                Operation::Erofs { encoder, .. } => {
                    Some(("liblz4", encoder.version, crate::erofs::lz4_version()))
                }
                _ => None,
            };
            if let Some((library, needs, has)) = library {
                if needs != has {
                    return Err(ManifestError::Encoder {
                        component: c.name.clone(),
                        op: i,
                        library,
                        needs,
                        has,
                    });
                }
            }
            if let Some(blob) = op.blob() {
                if blob.offset != blob_end {
                    return Err(bad(format!(
                        "blob starts at {} but the previous one ends at {blob_end}",
                        blob.offset
                    )));
                }
                blob_end = blob_end.saturating_add(blob.len);
            }
            dst_all.extend_from_slice(op.dst());
        }
        check_coverage(&c.name, dst_all, target_blocks)?;
    }
    if blob_end != m.data_len {
        return Err(ManifestError::DataLayout {
            end: blob_end,
            data_len: m.data_len,
        });
    }
    Ok(())
}

/// A `ZSTD_versionNumber` as "1.5.4".
fn version_name(v: &u32) -> String {
    let v = *v;
    format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100)
}

fn kind_name(kind: OpKind) -> &'static str {
    match kind {
        OpKind::Zero => "zero",
        OpKind::Copy => "copy",
        OpKind::Data => "data",
        OpKind::Patch => "patch",
        OpKind::Bsdiff => "bsdiff",
        OpKind::Recompress => "recompress",
        OpKind::Erofs => "erofs",
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn check_image(
    component: &str,
    what: &'static str,
    size: u64,
    digest: &Digest,
) -> Result<(), ManifestError> {
    if size == 0 || !size.is_multiple_of(BLOCK_SIZE) || size > MAX_IMAGE_SIZE {
        return Err(ManifestError::ImageSize {
            component: component.to_owned(),
            what,
            size,
        });
    }
    let segments = size.div_ceil(DIGEST_SEGMENT);
    if digest.segment_size != DIGEST_SEGMENT || digest.segments.len() as u64 != segments {
        return Err(ManifestError::Digest {
            component: component.to_owned(),
            what,
            size,
        });
    }
    if crate::digest::root_of(&digest.segments) != digest.sha256 {
        return Err(ManifestError::Digest {
            component: component.to_owned(),
            what,
            size,
        });
    }
    Ok(())
}

fn check_op(op: &Operation, target_blocks: u64, source_blocks: Option<u64>) -> Result<(), String> {
    let dst = op.dst();
    if dst.is_empty() {
        return Err("no destination extents".into());
    }
    check_extents(dst, target_blocks, "destination")?;
    let dst_blocks = total_blocks(dst);
    let src = op.src();
    if matches!(
        op,
        Operation::Copy { .. } | Operation::Patch { .. } | Operation::Bsdiff { .. }
    ) {
        let Some(source_blocks) = source_blocks else {
            return Err("reads a source, but the component has none".into());
        };
        if src.is_empty() {
            return Err("no source extents".into());
        }
        check_extents(src, source_blocks, "source")?;
    }
    let src_blocks = total_blocks(src);
    match op {
        Operation::Zero { .. } => {}
        Operation::Copy { .. } => {
            if src_blocks != dst_blocks {
                return Err(format!(
                    "copies {src_blocks} source blocks into {dst_blocks} destination blocks"
                ));
            }
        }
        Operation::Recompress {
            content_len,
            encoder,
            chunks,
            ..
        } => {
            let out = dst_blocks * BLOCK_SIZE;
            if out > MAX_RECOMPRESS_OUTPUT {
                return Err(format!(
                    "writes {out} bytes, over the limit of {MAX_RECOMPRESS_OUTPUT} per recompress operation"
                ));
            }
            if *content_len == 0 || *content_len > MAX_RECOMPRESS_CONTENT {
                return Err(format!(
                    "builds {content_len} bytes of content, not between 1 and {MAX_RECOMPRESS_CONTENT}"
                ));
            }
            if chunks.len() as u64 != out.div_ceil(RECOMPRESS_CHUNK) {
                return Err(format!(
                    "has {} chunk hashes for {out} bytes in {RECOMPRESS_CHUNK}-byte chunks",
                    chunks.len()
                ));
            }
            if !(1..=22).contains(&encoder.level) || encoder.workers > 64 {
                return Err(format!(
                    "zstd level {} or {} workers is out of range",
                    encoder.level, encoder.workers
                ));
            }
        }
        Operation::Erofs {
            content_len,
            encoder,
            chunks,
            ..
        } => {
            if source_blocks.is_none() {
                return Err(
                    "re-creates an erofs file from a source image, but the component has none"
                        .into(),
                );
            }
            // One block per pcluster, each holding at least one byte.
            let out = dst_blocks * BLOCK_SIZE;
            if *content_len == 0 || *content_len > MAX_EROFS_CONTENT || dst_blocks > *content_len {
                return Err(format!(
                    "builds {content_len} bytes into {dst_blocks} blocks (at most {MAX_EROFS_CONTENT} bytes, a block needs one)"
                ));
            }
            if chunks.len() as u64 != out.div_ceil(RECOMPRESS_CHUNK) {
                return Err(format!(
                    "has {} chunk hashes for {out} bytes in {RECOMPRESS_CHUNK}-byte chunks",
                    chunks.len()
                ));
            }
            if !(1..=12).contains(&encoder.level) {
                return Err(format!("lz4hc level {} is out of range", encoder.level));
            }
        }
        Operation::Data { .. } | Operation::Patch { .. } | Operation::Bsdiff { .. } => {
            if dst_blocks * BLOCK_SIZE > MAX_OP_OUTPUT {
                return Err(format!(
                    "writes {} bytes, over the limit of {MAX_OP_OUTPUT} per blob",
                    dst_blocks * BLOCK_SIZE
                ));
            }
            if src_blocks * BLOCK_SIZE > MAX_REFERENCE_LEN {
                return Err(format!(
                    "references {} source bytes, over the limit of {MAX_REFERENCE_LEN}",
                    src_blocks * BLOCK_SIZE
                ));
            }
        }
    }
    if let Some(blob) = op.blob() {
        if blob.len == 0 || blob.len > MAX_BLOB_LEN {
            return Err(format!(
                "blob length {} is not between 1 and {MAX_BLOB_LEN}",
                blob.len
            ));
        }
    }
    Ok(())
}

fn check_extents(extents: &[Extent], limit_blocks: u64, what: &str) -> Result<(), String> {
    for e in extents {
        match e.end() {
            Some(end) if e.count() > 0 && end <= limit_blocks => {}
            _ => {
                return Err(format!(
                    "{what} extent [{}, {}] lies outside the {limit_blocks} blocks of the {what} image or is empty",
                    e.start(),
                    e.count()
                ))
            }
        }
    }
    Ok(())
}

/// Every block of `0..target_blocks` in exactly one destination extent.
fn check_coverage(
    component: &str,
    mut extents: Vec<Extent>,
    target_blocks: u64,
) -> Result<(), ManifestError> {
    extents.sort_unstable_by_key(|e| e.start());
    let mut next = 0u64;
    for e in extents {
        // Extents were bounds-checked, so `end` does not overflow.
        let end = e.start() + e.count();
        if e.start() < next {
            return Err(ManifestError::Overlap {
                component: component.to_owned(),
                first: e.start(),
                end: end.min(next),
            });
        }
        if e.start() > next {
            return Err(ManifestError::Gap {
                component: component.to_owned(),
                first: next,
                end: e.start(),
            });
        }
        next = end;
    }
    if next != target_blocks {
        return Err(ManifestError::Gap {
            component: component.to_owned(),
            first: next,
            end: target_blocks,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Blob, Component, ImageRef, Sha256Hex};

    fn image(blocks: u64) -> ImageRef {
        let size = blocks * BLOCK_SIZE;
        let segments = vec![Sha256Hex([1; 32]); size.div_ceil(DIGEST_SEGMENT) as usize];
        let sha256 = crate::digest::root_of(&segments);
        ImageRef {
            size,
            digest: Digest {
                segment_size: DIGEST_SEGMENT,
                segments,
                sha256,
            },
        }
    }

    fn blob(offset: u64, len: u64) -> Blob {
        Blob {
            offset,
            len,
            sha256: Sha256Hex::default(),
        }
    }

    fn delta(ops: Vec<Operation>, data_len: u64) -> Manifest {
        Manifest {
            format_version: 1,
            block_size: 4096,
            target_version: "2".into(),
            source_version: Some("1".into()),
            data_len,
            components: vec![Component {
                file_len: None,
                name: "usr".into(),
                target: image(10),
                source: Some(image(8)),
                operations: ops,
            }],
        }
    }

    fn good_ops() -> Vec<Operation> {
        vec![
            Operation::Zero {
                dst: vec![Extent(0, 2)],
            },
            Operation::Copy {
                dst: vec![Extent(2, 3)],
                src: vec![Extent(5, 3)],
            },
            Operation::Data {
                dst: vec![Extent(5, 1), Extent(9, 1)],
                blob: blob(0, 10),
            },
            Operation::Patch {
                dst: vec![Extent(6, 3)],
                src: vec![Extent(0, 8)],
                blob: blob(10, 5),
            },
        ]
    }

    #[test]
    fn accepts_a_complete_delta() {
        assert_eq!(validate(&delta(good_ops(), 15), 15), Ok(()));
    }

    #[test]
    fn rejects_overlap_gap_and_out_of_range() {
        let mut ops = good_ops();
        ops[0] = Operation::Zero {
            dst: vec![Extent(0, 3)],
        };
        assert!(matches!(
            validate(&delta(ops, 15), 15),
            Err(ManifestError::Overlap {
                first: 2,
                end: 3,
                ..
            })
        ));
        let mut ops = good_ops();
        ops[0] = Operation::Zero {
            dst: vec![Extent(0, 1)],
        };
        assert!(matches!(
            validate(&delta(ops, 15), 15),
            Err(ManifestError::Gap {
                first: 1,
                end: 2,
                ..
            })
        ));
        let mut ops = good_ops();
        ops[1] = Operation::Copy {
            dst: vec![Extent(2, 3)],
            src: vec![Extent(6, 3)],
        };
        let err = validate(&delta(ops, 15), 15).unwrap_err();
        assert!(err.to_string().contains("outside the 8 blocks"), "{err}");
        let mut ops = good_ops();
        ops.push(Operation::Zero {
            dst: vec![Extent(u64::MAX, 2)],
        });
        assert!(validate(&delta(ops, 15), 15).is_err());
    }

    #[test]
    fn rejects_bad_blob_layout_and_lengths() {
        assert!(matches!(
            validate(&delta(good_ops(), 15), 16),
            Err(ManifestError::DataLenMismatch { .. })
        ));
        let mut ops = good_ops();
        ops[3] = Operation::Patch {
            dst: vec![Extent(6, 3)],
            src: vec![Extent(0, 8)],
            blob: blob(11, 4),
        };
        assert!(validate(&delta(ops, 15), 15).is_err());
        let mut ops = good_ops();
        ops[1] = Operation::Copy {
            dst: vec![Extent(2, 3)],
            src: vec![Extent(5, 2)],
        };
        assert!(validate(&delta(ops, 15), 15).is_err());
    }

    #[test]
    fn rejects_source_reads_in_a_full_payload() {
        let mut m = delta(good_ops(), 15);
        m.components[0].source = None;
        m.source_version = None;
        let err = validate(&m, 15).unwrap_err();
        assert!(err.to_string().contains("has none"), "{err}");
    }

    #[test]
    fn rejects_a_digest_that_does_not_fit_the_size() {
        let mut m = delta(good_ops(), 15);
        m.components[0].target.size = 11 * BLOCK_SIZE;
        assert!(validate(&m, 15).is_err());
        let mut m = delta(good_ops(), 15);
        m.components[0].target.digest.sha256 = Sha256Hex([9; 32]);
        assert!(matches!(
            validate(&m, 15),
            Err(ManifestError::Digest { .. })
        ));
    }

    #[test]
    fn format_versions_gate_the_bsdiff_operation_and_must_match_the_header() {
        let bsdiff_ops = || {
            let mut ops = good_ops();
            ops[3] = Operation::Bsdiff {
                dst: vec![Extent(6, 3)],
                src: vec![Extent(0, 8)],
                blob: blob(10, 5),
            };
            ops
        };
        let err = validate(&delta(bsdiff_ops(), 15), 15).unwrap_err();
        assert!(err.to_string().contains("needs format version 2"), "{err}");
        let mut m = delta(bsdiff_ops(), 15);
        m.format_version = 2;
        assert_eq!(validate(&m, 15), Ok(()));
        for version in [0, 5] {
            m.format_version = version;
            assert_eq!(validate(&m, 15), Err(ManifestError::Version(version)));
        }
        // The header and the manifest must name the same version.
        m.format_version = 2;
        let bytes = serde_json::to_vec(&m).unwrap();
        let header = |version| Header {
            version,
            manifest_len: bytes.len() as u64,
            signature_len: 1,
            data_len: 15,
        };
        assert!(parse_and_validate(&bytes, &header(2)).is_ok());
        assert_eq!(
            parse_and_validate(&bytes, &header(1)),
            Err(ManifestError::HeaderVersion {
                manifest: 2,
                header: 1
            })
        );
    }

    #[test]
    fn a_recompress_operation_needs_version_3_this_libzstd_and_one_hash_per_chunk() {
        let encoder = crate::format::ZstdEncoder {
            version: crate::recompress::zstd_version(),
            level: 9,
            workers: 1,
            checksum: true,
        };
        let ops = |encoder, chunks: usize| {
            let mut ops = good_ops();
            ops[3] = Operation::Recompress {
                dst: vec![Extent(6, 3)],
                content_len: 100_000,
                encoder,
                chunks: vec![Sha256Hex([3; 32]); chunks],
                blob: blob(10, 5),
                erofs_view: false,
            };
            ops
        };
        let err = validate(&delta(ops(encoder, 1), 15), 15).unwrap_err();
        assert!(
            err.to_string()
                .contains("a recompress operation needs format version 3"),
            "{err}"
        );
        let mut m = delta(ops(encoder, 1), 15);
        m.format_version = 3;
        assert_eq!(validate(&m, 15), Ok(()));
        // 12 KiB of output is one 1 MiB chunk, not two.
        m.components[0].operations = ops(encoder, 2);
        let err = validate(&m, 15).unwrap_err();
        assert!(err.to_string().contains("2 chunk hashes"), "{err}");
        // Another libzstd would not reproduce the stream: refused as a
        // format this node cannot read, so it takes the full payload.
        let other = crate::format::ZstdEncoder {
            version: 10507,
            ..encoder
        };
        m.components[0].operations = ops(other, 1);
        let err = validate(&m, 15).unwrap_err();
        assert!(
            matches!(err, ManifestError::Encoder { needs: 10507, .. }),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("libzstd 1.5.7, this tandem has 1.5.4"),
            "{err}"
        );
    }

    #[test]
    fn an_erofs_operation_needs_version_4_a_source_this_liblz4_and_bounded_content() {
        let encoder = crate::format::Lz4Encoder {
            version: crate::erofs::lz4_version(),
            level: 12,
        };
        let ops = |encoder, content_len: u64, chunks: usize| {
            let mut ops = good_ops();
            ops[3] = Operation::Erofs {
                dst: vec![Extent(6, 3)],
                content_len,
                encoder,
                chunks: vec![Sha256Hex([3; 32]); chunks],
                blob: blob(10, 5),
            };
            ops
        };
        let err = validate(&delta(ops(encoder, 50_000, 1), 15), 15).unwrap_err();
        assert!(
            err.to_string()
                .contains("an erofs operation needs format version 4"),
            "{err}"
        );
        let mut m = delta(ops(encoder, 50_000, 1), 15);
        m.format_version = 4;
        assert_eq!(validate(&m, 15), Ok(()));
        for (bad, why) in [
            (ops(encoder, 50_000, 2), "2 chunk hashes"),
            (ops(encoder, 2, 1), "builds 2 bytes into 3 blocks"),
            (ops(encoder, 5 << 20, 1), "builds 5242880 bytes"),
            (
                ops(
                    crate::format::Lz4Encoder {
                        level: 13,
                        ..encoder
                    },
                    50_000,
                    1,
                ),
                "level 13",
            ),
        ] {
            m.components[0].operations = bad;
            let err = validate(&m, 15).unwrap_err();
            assert!(err.to_string().contains(why), "{err}");
        }
        // A full payload has no source to re-create the file from.
        m.components[0].operations = ops(encoder, 50_000, 1);
        m.components[0].source = None;
        m.source_version = None;
        m.components[0].operations[1] = Operation::Zero {
            dst: vec![Extent(2, 3)],
        };
        let err = validate(&m, 15).unwrap_err();
        assert!(err.to_string().contains("has none"), "{err}");
        // Another liblz4: refused as a format this node cannot read.
        let mut m = delta(ops(encoder, 50_000, 1), 15);
        m.format_version = 4;
        m.components[0].operations = ops(
            crate::format::Lz4Encoder {
                version: 11000,
                ..encoder
            },
            50_000,
            1,
        );
        let err = validate(&m, 15).unwrap_err();
        assert!(
            matches!(
                err,
                ManifestError::Encoder {
                    library: "liblz4",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("liblz4 1.10.0, this tandem has 1.9.4"),
            "{err}"
        );
    }
}
