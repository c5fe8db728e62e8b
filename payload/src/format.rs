//! The payload file: fixed header, manifest, detached signature, data.
//!
//! `payload/FORMAT.md` is the specification; this module is its code. The
//! header is parsed with fixed limits so that nothing is allocated by a size
//! an attacker chose before the signature over the manifest has been checked.

use serde::{Deserialize, Serialize};

/// First eight bytes of every payload.
pub const MAGIC: [u8; 8] = *b"TNDMPAY\0";
/// The newest format version this code reads and writes. Version 2 adds
/// the `bsdiff` operation, version 3 the `recompress` operation; a payload
/// is written in the lowest version that has every kind it uses, so one
/// without either is version 1, which every tandem reads.
pub const FORMAT_VERSION: u32 = 4;
/// The oldest format version this code reads.
pub const MIN_FORMAT_VERSION: u32 = 1;
/// The version of a manifest whose operations are `ops`: the lowest that
/// has every kind they use.
pub fn version_for<'a>(ops: impl IntoIterator<Item = &'a Operation>) -> u32 {
    ops.into_iter()
        .map(Operation::format_version)
        .max()
        .unwrap_or(MIN_FORMAT_VERSION)
}
/// Size of the fixed header in bytes.
pub const HEADER_LEN: usize = 64;
/// Every operation works on blocks of this size.
pub const BLOCK_SIZE: u64 = 4096;
/// Upper bound on the manifest, checked before reading it.
pub const MAX_MANIFEST_LEN: u64 = 64 << 20;
/// Upper bound on the detached signature, checked before reading it.
pub const MAX_SIGNATURE_LEN: u64 = 64 << 10;
/// Upper bound on the data section (1 TiB): a sanity check on the header.
pub const MAX_DATA_LEN: u64 = 1 << 40;
/// Largest image a component may describe (16 TiB).
pub const MAX_IMAGE_SIZE: u64 = 16 << 40;
/// Largest output of one data or patch operation. Together with
/// [`MAX_REFERENCE_LEN`] and [`MAX_BLOB_LEN`] this bounds the applier's memory.
pub const MAX_OP_OUTPUT: u64 = 8 << 20;
/// Largest source reference of one patch operation.
pub const MAX_REFERENCE_LEN: u64 = 24 << 20;
/// Largest compressed blob (an incompressible output plus zstd's framing).
pub const MAX_BLOB_LEN: u64 = MAX_OP_OUTPUT + (64 << 10);
/// Largest decompressed patch body of one bsdiff operation: its output and
/// the records' headers.
pub const MAX_BSDIFF_BODY: u64 = 2 * MAX_OP_OUTPUT;
/// Largest output of one recompress operation (its destination blocks).
/// Its memory does not grow with it: the output streams out in
/// [`RECOMPRESS_CHUNK`]s.
pub const MAX_RECOMPRESS_OUTPUT: u64 = 1 << 30;
/// Largest uncompressed content one recompress operation builds.
pub const MAX_RECOMPRESS_CONTENT: u64 = 4 << 30;
/// A recompress operation's output is hashed, and written, in pieces of
/// this size.
pub const RECOMPRESS_CHUNK: u64 = 1 << 20;
/// Largest decompressed recipe of one recompress operation.
pub const MAX_RECIPE_BODY: u64 = 16 << 20;
/// Largest file (old or new content) an erofs operation rebuilds: the node
/// holds both in memory while it runs (and glibc keeps freed buffers of
/// this size; larger ones pushed the bench's apply over 128 MiB).
pub const MAX_EROFS_CONTENT: u64 = 4 << 20;
/// Largest decompressed body (source table and bsdiff patch) of an erofs
/// operation.
pub const MAX_EROFS_BODY: u64 = 2 * MAX_EROFS_CONTENT + (1 << 20);
/// Most components one payload may carry.
pub const MAX_COMPONENTS: usize = 16;
/// Segment size of an image digest (see [`Digest`]).
pub const DIGEST_SEGMENT: u64 = 16 << 20;

/// Errors in the header: what a truncated or foreign file looks like.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("not a tandem payload (bad magic)")]
    BadMagic,
    #[error(
        "payload format version {0} is not supported (this tandem reads versions {MIN_FORMAT_VERSION} to {FORMAT_VERSION})"
    )]
    UnsupportedVersion(u32),
    #[error("payload header is corrupt (checksum mismatch)")]
    BadChecksum,
    #[error("payload header is corrupt: {0}")]
    Invalid(&'static str),
    #[error("payload header declares a {what} of {len} bytes, over the limit of {limit}")]
    TooLarge {
        what: &'static str,
        len: u64,
        limit: u64,
    },
}

/// The fixed header: the format version and the lengths of the three
/// sections that follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Equal to the manifest's `format_version`.
    pub version: u32,
    pub manifest_len: u64,
    pub signature_len: u64,
    pub data_len: u64,
}

impl Header {
    /// Encodes the header (little-endian, CRC-32 over the first 60 bytes).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&self.version.to_le_bytes());
        out[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.manifest_len.to_le_bytes());
        out[24..32].copy_from_slice(&self.signature_len.to_le_bytes());
        out[32..40].copy_from_slice(&self.data_len.to_le_bytes());
        let crc = crc32fast::hash(&out[..60]);
        out[60..64].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and bounds-checks a header.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Header, HeaderError> {
        if bytes[0..8] != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let version = le_u32(&bytes[8..12]);
        if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(HeaderError::UnsupportedVersion(version));
        }
        if le_u32(&bytes[60..64]) != crc32fast::hash(&bytes[..60]) {
            return Err(HeaderError::BadChecksum);
        }
        if le_u32(&bytes[12..16]) as usize != HEADER_LEN {
            return Err(HeaderError::Invalid("header length is not 64"));
        }
        if bytes[40..60].iter().any(|&b| b != 0) {
            return Err(HeaderError::Invalid("reserved bytes are not zero"));
        }
        let header = Header {
            version,
            manifest_len: le_u64(&bytes[16..24]),
            signature_len: le_u64(&bytes[24..32]),
            data_len: le_u64(&bytes[32..40]),
        };
        for (what, len, limit) in [
            ("manifest", header.manifest_len, MAX_MANIFEST_LEN),
            ("signature", header.signature_len, MAX_SIGNATURE_LEN),
            ("data section", header.data_len, MAX_DATA_LEN),
        ] {
            if len > limit {
                return Err(HeaderError::TooLarge { what, len, limit });
            }
        }
        if header.manifest_len == 0 {
            return Err(HeaderError::Invalid("manifest is empty"));
        }
        if header.signature_len == 0 {
            return Err(HeaderError::Invalid(
                "payload is unsigned (signature length 0)",
            ));
        }
        Ok(header)
    }

    /// Offset of the data section from the start of the file.
    pub fn data_offset(&self) -> u64 {
        HEADER_LEN as u64 + self.manifest_len + self.signature_len
    }

    /// Total length of the payload file.
    pub fn file_len(&self) -> u64 {
        self.data_offset() + self.data_len
    }
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

/// The signed manifest. Its exact bytes (JSON) are what the signature covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub block_size: u64,
    /// Version of the image this payload produces.
    pub target_version: String,
    /// For a delta: the version it applies to. `None` for a full payload.
    pub source_version: Option<String>,
    /// Length of the data section; equal to the header's.
    pub data_len: u64,
    pub components: Vec<Component>,
}

impl Manifest {
    /// True when any component reads a source image.
    pub fn is_delta(&self) -> bool {
        self.components.iter().any(|c| c.source.is_some())
    }
}

/// One target of a slot (the OS image; later a verity tree or kernel).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Component {
    pub name: String,
    pub target: ImageRef,
    /// The image a delta reads from, `None` in a full payload.
    pub source: Option<ImageRef>,
    /// For a file (a UKI, an addon): its length. The target is the file
    /// padded with zeros to whole blocks; the node cuts it back to this
    /// length once the padded target is verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_len: Option<u64>,
    pub operations: Vec<Operation>,
}

/// An image named by size and digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRef {
    pub size: u64,
    pub digest: Digest,
}

/// SHA-256 of an image in segments, so that both cores can hash it: the
/// image is cut into `segment_size` pieces (the last may be shorter), each
/// piece is hashed, and `sha256` is the SHA-256 of the concatenated raw
/// segment hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Digest {
    pub segment_size: u64,
    pub segments: Vec<Sha256Hex>,
    pub sha256: Sha256Hex,
}

/// A SHA-256 value written as 64 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Sha256Hex(pub [u8; 32]);

impl Sha256Hex {
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 15)]));
        }
        s
    }

    pub fn from_hex(s: &str) -> Option<Sha256Hex> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks(2).enumerate() {
            let hi = hex_value(pair[0])?;
            let lo = hex_value(pair[1])?;
            out[i] = hi << 4 | lo;
        }
        Some(Sha256Hex(out))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl std::fmt::Display for Sha256Hex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Sha256Hex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Sha256Hex {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Sha256Hex::from_hex(&s)
            .ok_or_else(|| serde::de::Error::custom("expected 64 lowercase hex digits"))
    }
}

/// A run of blocks: `[first_block, block_count]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent(pub u64, pub u64);

impl Extent {
    pub fn start(&self) -> u64 {
        self.0
    }
    pub fn count(&self) -> u64 {
        self.1
    }
    /// One past the last block, `None` on overflow.
    pub fn end(&self) -> Option<u64> {
        self.0.checked_add(self.1)
    }

    /// The bytes `[start, end)` it covers (saturating: the validator
    /// rejects extents near the limit long before).
    pub fn bytes(&self) -> (u64, u64) {
        let start = self.0.saturating_mul(BLOCK_SIZE);
        (
            start,
            start.saturating_add(self.1.saturating_mul(BLOCK_SIZE)),
        )
    }
}

/// Total block count of a list of extents (saturating: the validator
/// rejects anything near the limit long before).
pub fn total_blocks(extents: &[Extent]) -> u64 {
    extents
        .iter()
        .fold(0u64, |sum, e| sum.saturating_add(e.count()))
}

/// A compressed blob in the data section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Blob {
    /// Offset from the start of the data section.
    pub offset: u64,
    pub len: u64,
    pub sha256: Sha256Hex,
}

/// What to write into a list of destination extents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Operation {
    /// Zeros.
    Zero { dst: Vec<Extent> },
    /// The source blocks `src`, in order, into `dst` (equal block counts).
    Copy { dst: Vec<Extent>, src: Vec<Extent> },
    /// A zstd frame that decompresses to exactly the `dst` blocks.
    Data { dst: Vec<Extent>, blob: Blob },
    /// A zstd frame compressed with the concatenated `src` blocks as its
    /// reference prefix (zstd's `refPrefix`).
    Patch {
        dst: Vec<Extent>,
        src: Vec<Extent>,
        blob: Blob,
    },
    /// A zstd frame holding a bsdiff patch body ([`crate::bsdiff`]) that
    /// turns the concatenated `src` blocks into the `dst` blocks. Format
    /// version 2.
    Bsdiff {
        dst: Vec<Extent>,
        src: Vec<Extent>,
        blob: Blob,
    },
    /// A zstd stream re-created on the node: its uncompressed content is
    /// rebuilt from the recipe in the blob (pieces of the target image,
    /// written by the operations before it, and literal bytes), then
    /// compressed with `encoder`, which must be this node's libzstd; each
    /// [`RECOMPRESS_CHUNK`] of the `dst` blocks is checked against `chunks`
    /// before it is written. Format version 3; see [`crate::recompress`].
    Recompress {
        dst: Vec<Extent>,
        /// Bytes of the content the recipe builds.
        content_len: u64,
        encoder: ZstdEncoder,
        /// SHA-256 of each [`RECOMPRESS_CHUNK`] of the `dst` bytes, in order
        /// (the last may be shorter).
        chunks: Vec<Sha256Hex>,
        blob: Blob,
        /// The recipe takes pieces from the decompressed files of the
        /// target, an erofs image (format version 4).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        erofs_view: bool,
    },
    /// A compressed erofs file re-created on the node: the blob holds the
    /// old file's place in the source image and a bsdiff patch from its
    /// content to the new content, which the node compresses into
    /// pclusters with `encoder` (mkfs.erofs's lz4hc, this node's liblz4);
    /// each [`RECOMPRESS_CHUNK`] of the `dst` blocks is checked against
    /// `chunks` before it is written. Format version 4; see
    /// [`crate::erofs`].
    Erofs {
        dst: Vec<Extent>,
        /// Bytes of the new file's content.
        content_len: u64,
        encoder: Lz4Encoder,
        /// SHA-256 of each [`RECOMPRESS_CHUNK`] of the `dst` bytes.
        chunks: Vec<Sha256Hex>,
        blob: Blob,
    },
}

/// The lz4 encoder an erofs operation must run: the library version
/// (`LZ4_versionNumber`, e.g. 10904 for 1.9.4) and the lz4hc level, as
/// erofs-utils 1.5's `mkfs.erofs -zlz4hc,LEVEL` uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lz4Encoder {
    pub version: u32,
    pub level: i32,
}

/// The zstd encoder a recompress operation must run: the library version
/// (`ZSTD_versionNumber`, e.g. 10504 for 1.5.4) and the parameters that
/// decide its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZstdEncoder {
    pub version: u32,
    pub level: i32,
    /// 0: single-threaded mode; 1 or more: multi-threaded mode, whose
    /// output is the same for any number of workers (and differs from
    /// single-threaded mode).
    pub workers: u32,
    pub checksum: bool,
}

impl Operation {
    pub fn dst(&self) -> &[Extent] {
        match self {
            Operation::Zero { dst }
            | Operation::Copy { dst, .. }
            | Operation::Data { dst, .. }
            | Operation::Patch { dst, .. }
            | Operation::Bsdiff { dst, .. }
            | Operation::Recompress { dst, .. }
            | Operation::Erofs { dst, .. } => dst,
        }
    }

    pub fn src(&self) -> &[Extent] {
        match self {
            Operation::Copy { src, .. }
            | Operation::Patch { src, .. }
            | Operation::Bsdiff { src, .. } => src,
            Operation::Zero { .. }
            | Operation::Data { .. }
            | Operation::Recompress { .. }
            | Operation::Erofs { .. } => &[],
        }
    }

    pub fn blob(&self) -> Option<&Blob> {
        match self {
            Operation::Data { blob, .. }
            | Operation::Patch { blob, .. }
            | Operation::Bsdiff { blob, .. }
            | Operation::Recompress { blob, .. }
            | Operation::Erofs { blob, .. } => Some(blob),
            Operation::Zero { .. } | Operation::Copy { .. } => None,
        }
    }

    /// The first format version that has this operation.
    pub fn format_version(&self) -> u32 {
        match self {
            Operation::Recompress {
                erofs_view: true, ..
            } => 4,
            op => op.kind().format_version(),
        }
    }

    pub fn kind(&self) -> OpKind {
        match self {
            Operation::Zero { .. } => OpKind::Zero,
            Operation::Copy { .. } => OpKind::Copy,
            Operation::Data { .. } => OpKind::Data,
            Operation::Patch { .. } => OpKind::Patch,
            Operation::Bsdiff { .. } => OpKind::Bsdiff,
            Operation::Recompress { .. } => OpKind::Recompress,
            Operation::Erofs { .. } => OpKind::Erofs,
        }
    }

    /// The blob, to set its offset once the data section is laid out.
    pub fn blob_mut(&mut self) -> Option<&mut Blob> {
        match self {
            Operation::Data { blob, .. }
            | Operation::Patch { blob, .. }
            | Operation::Bsdiff { blob, .. }
            | Operation::Recompress { blob, .. }
            | Operation::Erofs { blob, .. } => Some(blob),
            Operation::Zero { .. } | Operation::Copy { .. } => None,
        }
    }
}

/// The operation kinds, for statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    Zero,
    Copy,
    Data,
    Patch,
    Bsdiff,
    Recompress,
    Erofs,
}

impl OpKind {
    /// The first format version that has this kind.
    pub fn format_version(self) -> u32 {
        match self {
            OpKind::Zero | OpKind::Copy | OpKind::Data | OpKind::Patch => 1,
            OpKind::Bsdiff => 2,
            OpKind::Recompress => 3,
            OpKind::Erofs => 4,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            version: 1,
            manifest_len: 100,
            signature_len: 200,
            data_len: 300,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = header();
        assert_eq!(Header::decode(&h.encode()), Ok(h));
        assert_eq!(h.data_offset(), 364);
        assert_eq!(h.file_len(), 664);
    }

    #[test]
    fn header_rejects_corruption_and_absurd_lengths() {
        let good = header().encode();
        let mut b = good;
        b[0] = b'X';
        assert_eq!(Header::decode(&b), Err(HeaderError::BadMagic));
        let mut b = good;
        b[8] = 5;
        assert_eq!(Header::decode(&b), Err(HeaderError::UnsupportedVersion(5)));
        let mut b = good;
        b[20] ^= 1;
        assert_eq!(Header::decode(&b), Err(HeaderError::BadChecksum));
        let absurd = Header {
            manifest_len: u64::MAX,
            ..header()
        }
        .encode();
        assert!(matches!(
            Header::decode(&absurd),
            Err(HeaderError::TooLarge {
                what: "manifest",
                ..
            })
        ));
        let unsigned = Header {
            signature_len: 0,
            ..header()
        }
        .encode();
        assert!(matches!(
            Header::decode(&unsigned),
            Err(HeaderError::Invalid(_))
        ));
    }

    #[test]
    fn operations_serialize_compactly() {
        let op = Operation::Copy {
            dst: vec![Extent(10, 2)],
            src: vec![Extent(0, 2)],
        };
        let json = serde_json::to_string(&op).unwrap();
        assert_eq!(json, r#"{"op":"copy","dst":[[10,2]],"src":[[0,2]]}"#);
        assert_eq!(serde_json::from_str::<Operation>(&json).unwrap(), op);
        assert!(serde_json::from_str::<Operation>(r#"{"op":"move","dst":[]}"#).is_err());
    }

    #[test]
    fn sha256_hex_is_strict() {
        let h = Sha256Hex([0xab; 32]);
        assert_eq!(Sha256Hex::from_hex(&h.to_hex()), Some(h));
        assert_eq!(Sha256Hex::from_hex(&"AB".repeat(32)), None);
        assert_eq!(Sha256Hex::from_hex("ab"), None);
    }
}
