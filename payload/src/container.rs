//! Reading and writing the payload container around the manifest: header,
//! manifest bytes, signature; the data section follows and is streamed by
//! [`crate::apply`].

use std::io::{self, Read, Write};

use crate::format::{Header, HeaderError, Manifest, HEADER_LEN};
use crate::sign::{Keyring, SignError, SigningKey};
use crate::validate::{self, ManifestError};

/// Why a payload could not be read or trusted.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("payload is truncated: the {section} ends early")]
    Truncated { section: &'static str },
    #[error(transparent)]
    Header(#[from] HeaderError),
    // Not `#[from]`: the message already holds the inner error, and a
    // source would repeat it in `{:#}` chains.
    #[error("payload signature: {0}")]
    Signature(SignError),
    #[error("payload manifest: {0}")]
    Manifest(ManifestError),
    #[error("blob of operation {op} at data offset {offset} is corrupt: SHA-256 mismatch")]
    CorruptBlob { op: usize, offset: u64 },
    #[error("payload has bytes after the end of its data section")]
    TrailingData,
    #[error("reading the payload: {0}")]
    Io(io::Error),
}

impl From<SignError> for PayloadError {
    fn from(e: SignError) -> Self {
        PayloadError::Signature(e)
    }
}

impl From<ManifestError> for PayloadError {
    fn from(e: ManifestError) -> Self {
        PayloadError::Manifest(e)
    }
}

impl From<io::Error> for PayloadError {
    fn from(e: io::Error) -> Self {
        PayloadError::Io(e)
    }
}

/// The part of a payload before its data: header, manifest, signature.
#[derive(Debug, Clone)]
pub struct PayloadHead {
    pub header: Header,
    /// The manifest's exact bytes, as signed.
    pub manifest_bytes: Vec<u8>,
    pub signature: Vec<u8>,
    pub manifest: Manifest,
    /// Fingerprint of the certificate that signed it, when verified.
    pub signer: Option<String>,
}

impl PayloadHead {
    /// Reads the head from the start of a stream, checks the signature
    /// against `keyring`, then validates the manifest. Nothing larger than
    /// the header's fixed limits is allocated, and only as bytes arrive.
    pub fn read_verified<R: Read>(reader: &mut R, keyring: &Keyring) -> Result<Self, PayloadError> {
        Self::read(reader, Some(keyring))
    }

    /// Reads the head without checking the signature: for `inspect`, which
    /// shows what a payload claims. Never use the result to write a slot.
    pub fn read_unverified<R: Read>(reader: &mut R) -> Result<Self, PayloadError> {
        Self::read(reader, None)
    }

    /// The signature is checked before the manifest is parsed.
    fn read<R: Read>(reader: &mut R, keyring: Option<&Keyring>) -> Result<Self, PayloadError> {
        let (header, manifest_bytes, signature) = read_sections(reader)?;
        let signer = match keyring {
            Some(k) => Some(k.verify_detached(&manifest_bytes, &signature)?),
            None => None,
        };
        let manifest = validate::parse_and_validate(&manifest_bytes, &header)?;
        Ok(PayloadHead {
            header,
            manifest_bytes,
            signature,
            manifest,
            signer,
        })
    }
}

fn read_sections<R: Read>(reader: &mut R) -> Result<(Header, Vec<u8>, Vec<u8>), PayloadError> {
    let mut raw = [0u8; HEADER_LEN];
    read_full(reader, &mut raw, "header")?;
    let header = Header::decode(&raw)?;
    let manifest_bytes = read_section(reader, header.manifest_len, "manifest")?;
    let signature = read_section(reader, header.signature_len, "signature")?;
    Ok((header, manifest_bytes, signature))
}

fn read_full<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    section: &'static str,
) -> Result<(), PayloadError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => PayloadError::Truncated { section },
        _ => PayloadError::Io(e),
    })
}

/// Reads `len` bytes (already bounded by the header limits), growing the
/// buffer only as data arrives so a lying header cannot force a large
/// allocation on a short stream.
fn read_section<R: Read>(
    r: &mut R,
    len: u64,
    section: &'static str,
) -> Result<Vec<u8>, PayloadError> {
    let mut out = Vec::with_capacity(usize::try_from(len.min(1 << 20)).unwrap_or(1 << 20));
    let got = r.take(len).read_to_end(&mut out)?;
    if got as u64 != len {
        return Err(PayloadError::Truncated { section });
    }
    Ok(out)
}

/// Writes a payload: header, the manifest's bytes, a signature over them,
/// then `data_len` bytes copied from `data`.
pub fn write_payload<W: Write, D: Read>(
    out: &mut W,
    manifest: &Manifest,
    key: &SigningKey,
    data: &mut D,
) -> Result<Header, PayloadError> {
    let manifest_bytes = serde_json::to_vec(manifest).map_err(io::Error::other)?;
    let signature = key.sign_detached(&manifest_bytes)?;
    write_raw(out, &manifest_bytes, &signature, manifest.data_len, data)
}

/// The `format_version` a manifest names, for its header; version 1 when
/// the bytes do not say (test payloads that are wrong on purpose).
fn version_of(manifest_bytes: &[u8]) -> u32 {
    #[derive(serde::Deserialize)]
    struct Versioned {
        format_version: u32,
    }
    serde_json::from_slice::<Versioned>(manifest_bytes)
        .map(|v| v.format_version)
        .unwrap_or(crate::format::MIN_FORMAT_VERSION)
}

/// Writes a payload from raw parts without checking them. The release tool
/// uses [`write_payload`]; this exists so tests can build payloads that are
/// signed yet wrong, to prove the applier rejects them.
pub fn write_raw<W: Write, D: Read>(
    out: &mut W,
    manifest_bytes: &[u8],
    signature: &[u8],
    data_len: u64,
    data: &mut D,
) -> Result<Header, PayloadError> {
    let header = Header {
        version: version_of(manifest_bytes),
        manifest_len: manifest_bytes.len() as u64,
        signature_len: signature.len() as u64,
        data_len,
    };
    out.write_all(&header.encode())?;
    out.write_all(manifest_bytes)?;
    out.write_all(signature)?;
    let copied = io::copy(&mut data.take(data_len), out)?;
    if copied != data_len {
        return Err(PayloadError::Truncated {
            section: "data given to the writer",
        });
    }
    out.flush()?;
    Ok(header)
}

/// Reads a whole payload and checks everything that can be checked without
/// images: the signature, the manifest, every blob's SHA-256, and that the
/// data section ends where the manifest says. Returns the head.
pub fn verify_stream<R: Read>(
    reader: &mut R,
    keyring: &Keyring,
) -> Result<PayloadHead, PayloadError> {
    let head = PayloadHead::read_verified(reader, keyring)?;
    let mut buf = Vec::new();
    let mut index = 0usize;
    for c in &head.manifest.components {
        for op in &c.operations {
            if let Some(blob) = op.blob() {
                buf.clear();
                let got = reader.take(blob.len).read_to_end(&mut buf)?;
                if got as u64 != blob.len {
                    return Err(PayloadError::Truncated {
                        section: "data section",
                    });
                }
                if crate::digest::sha256(&buf) != blob.sha256 {
                    return Err(PayloadError::CorruptBlob {
                        op: index,
                        offset: blob.offset,
                    });
                }
            }
            index += 1;
        }
    }
    let mut extra = [0u8; 1];
    if reader.read(&mut extra)? != 0 {
        return Err(PayloadError::TrailingData);
    }
    Ok(head)
}
