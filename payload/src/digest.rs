//! Image digests: SHA-256 per 16 MiB segment, hashed on every core, and a
//! root over the segment hashes (see [`crate::format::Digest`]).

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use sha2::{Digest as _, Sha256};

use crate::format::{Digest, Sha256Hex, DIGEST_SEGMENT};

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> Sha256Hex {
    Sha256Hex(Sha256::digest(data).into())
}

/// SHA-256 of a stream fed in pieces.
#[derive(Debug, Clone, Default)]
pub struct Sha256Stream(Sha256);

impl Sha256Stream {
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish(self) -> Sha256Hex {
        Sha256Hex(self.0.finalize().into())
    }
}

/// The root hash over a list of segment hashes.
pub fn root_of(segments: &[Sha256Hex]) -> Sha256Hex {
    let mut h = Sha256::new();
    for s in segments {
        h.update(s.0);
    }
    Sha256Hex(h.finalize().into())
}

/// How many worker threads to use for CPU-bound work.
pub fn worker_count() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 16))
}

/// Digest of the first `size` bytes of `file`. Fails if the file is shorter.
pub fn digest_file<F: FileExt + Sync>(file: &F, size: u64) -> io::Result<Digest> {
    let count = usize::try_from(size.div_ceil(DIGEST_SEGMENT))
        .map_err(|_| io::Error::other("image too large"))?;
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Sha256Hex>>> = Mutex::new(vec![None; count]);
    let first_error: Mutex<Option<io::Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..worker_count().min(count.max(1)) {
            scope.spawn(|| {
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= count {
                        return;
                    }
                    match hash_segment(file, size, index as u64, &mut buf) {
                        Ok(h) => {
                            if let Ok(mut r) = results.lock() {
                                r[index] = Some(h);
                            }
                        }
                        Err(e) => {
                            if let Ok(mut slot) = first_error.lock() {
                                slot.get_or_insert(e);
                            }
                            next.store(count, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().ok().flatten() {
        return Err(e);
    }
    let segments = results
        .into_inner()
        .map_err(|_| io::Error::other("digest worker panicked"))?
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| io::Error::other("digest worker stopped early"))?;
    let sha256 = root_of(&segments);
    Ok(Digest {
        segment_size: DIGEST_SEGMENT,
        segments,
        sha256,
    })
}

/// SHA-256 of segment `index` of the first `size` bytes of `file`, read
/// through `buf`. A segment that reads as all zeros (free space, zeroed
/// blocks) is checked to be zeros and takes the known hash of zeros, which
/// costs a comparison instead of hashing.
pub fn hash_segment<F: FileExt>(
    file: &F,
    size: u64,
    index: u64,
    buf: &mut [u8],
) -> io::Result<Sha256Hex> {
    let start = index * DIGEST_SEGMENT;
    let end = (start + DIGEST_SEGMENT).min(size);
    let mut h = Sha256::new();
    let mut pos = start;
    // Zero bytes read from `start` and not yet hashed.
    let mut zero_run = 0u64;
    let mut only_zeros = true;
    while pos < end {
        let n = usize::try_from((end - pos).min(buf.len() as u64)).unwrap_or(buf.len());
        file.read_exact_at(&mut buf[..n], pos)?;
        if only_zeros && is_zero(&buf[..n]) {
            zero_run += n as u64;
        } else {
            if only_zeros {
                update_zeros(&mut h, zero_run);
                only_zeros = false;
            }
            h.update(&buf[..n]);
        }
        pos += n as u64;
    }
    if only_zeros {
        return Ok(zeros_sha256(end - start));
    }
    Ok(Sha256Hex(h.finalize().into()))
}

const ZERO_CHUNK: usize = 1 << 16;
static ZEROS: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

fn is_zero(bytes: &[u8]) -> bool {
    bytes.chunks(ZERO_CHUNK).all(|c| c == &ZEROS[..c.len()])
}

fn update_zeros(h: &mut Sha256, mut len: u64) {
    while len > 0 {
        let n = len.min(ZERO_CHUNK as u64) as usize;
        h.update(&ZEROS[..n]);
        len -= n as u64;
    }
}

/// SHA-256 of `len` zero bytes; a whole segment's is computed once.
fn zeros_sha256(len: u64) -> Sha256Hex {
    static SEGMENT: std::sync::OnceLock<Sha256Hex> = std::sync::OnceLock::new();
    let compute = |len| {
        let mut h = Sha256::new();
        update_zeros(&mut h, len);
        Sha256Hex(h.finalize().into())
    };
    if len == DIGEST_SEGMENT {
        *SEGMENT.get_or_init(|| compute(len))
    } else {
        compute(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Write;

    #[test]
    fn digest_matches_sequential_hashing_and_rejects_short_files() {
        let dir = std::env::temp_dir().join(format!("tandem-digest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img");
        let data: Vec<u8> = (0..(DIGEST_SEGMENT + 8192))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        File::create(&path).unwrap().write_all(&data).unwrap();
        let f = File::open(&path).unwrap();
        let d = digest_file(&f, data.len() as u64).unwrap();
        let seg = DIGEST_SEGMENT as usize;
        assert_eq!(d.segments, vec![sha256(&data[..seg]), sha256(&data[seg..])]);
        assert_eq!(d.sha256, root_of(&d.segments));
        assert!(digest_file(&f, data.len() as u64 + 4096).is_err());
        // Zeros, whole segments and partial ones, and a segment that is
        // zeros but for its last byte or its first.
        let mut zeros = vec![0u8; 3 * seg + 100];
        zeros[2 * seg - 1] = 7;
        zeros[2 * seg] = 9;
        File::create(&path).unwrap().write_all(&zeros).unwrap();
        let f = File::open(&path).unwrap();
        let d = digest_file(&f, zeros.len() as u64).unwrap();
        let expected: Vec<_> = zeros.chunks(seg).map(sha256).collect();
        assert_eq!(d.segments, expected);
        assert_ne!(d.segments[0], d.segments[1]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
