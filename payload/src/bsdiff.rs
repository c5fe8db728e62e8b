//! A bsdiff-class binary diff (Colin Percival's algorithm: suffix-array
//! matches extended into approximate matches), for the `bsdiff` operation.
//!
//! Where zstd's `refPrefix` patch needs exact repeats, bsdiff pairs a new
//! region with an old one even when a few bytes in every few dozen differ,
//! which is what a rebuilt executable looks like (the same code with shifted
//! addresses and offsets): the differences are stored as bytewise
//! subtractions that are mostly zero and compress to almost nothing.
//!
//! The patch body (before zstd) is a sequence of records, each
//!
//! ```text
//! diff_len: u32 LE, extra_len: u32 LE, seek: i64 LE,
//! diff_len bytes added (wrapping) to the old bytes at the old position,
//! extra_len bytes copied as they are
//! ```
//!
//! After a record the old position has moved by `diff_len + seek`. The
//! records are interleaved (not bsdiff 4's three streams) so that a record
//! can be applied as soon as it is read. [`diff`] and [`apply`] are pure
//! functions over byte slices; the caller reads and writes.

use thiserror::Error;

/// Bytes of one record's header.
pub const RECORD_HEADER: usize = 16;

/// Why a patch body does not apply.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BsdiffError {
    #[error("the patch ends inside a record at byte {0}")]
    Truncated(usize),
    #[error("a record reads old bytes {start}..{end}, outside the {len}-byte reference")]
    OutOfReference { start: i64, end: i64, len: usize },
    #[error("the patch writes more than the {0} bytes of its operation")]
    TooLong(usize),
    #[error("the patch writes {written} bytes, the operation {expected}")]
    Short { written: usize, expected: usize },
}

fn match_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The longest match of a prefix of `new` among the suffixes `sa[lo..=hi]`
/// of `old`: (length, position in old).
fn search(sa: &[i32], old: &[u8], new: &[u8], mut lo: usize, mut hi: usize) -> (usize, usize) {
    while hi - lo >= 2 {
        let mid = lo + (hi - lo) / 2;
        let at = sa[mid] as usize;
        let n = (old.len() - at).min(new.len());
        if old[at..at + n] < new[..n] {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (a, b) = (sa[lo] as usize, sa[hi] as usize);
    let (x, y) = (match_len(&old[a..], new), match_len(&old[b..], new));
    if x > y {
        (x, a)
    } else {
        (y, b)
    }
}

fn push_record(out: &mut Vec<u8>, diff: &[u8], extra: &[u8], seek: i64) {
    out.extend_from_slice(&(diff.len() as u32).to_le_bytes());
    out.extend_from_slice(&(extra.len() as u32).to_le_bytes());
    out.extend_from_slice(&seek.to_le_bytes());
    out.extend_from_slice(diff);
    out.extend_from_slice(extra);
}

/// The patch body that turns `old` into `new`. Both must be shorter than
/// 2 GiB (operations are at most a few MiB).
pub fn diff(old: &[u8], new: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(new.len() / 4 + RECORD_HEADER);
    if old.is_empty() {
        push_record(&mut out, &[], new, 0);
        return out;
    }
    let (_, sa) = divsufsort::sort(old).into_parts();
    let (olen, nlen) = (old.len() as i64, new.len() as i64);
    let at = |v: &[u8], i: i64| v[i as usize];
    let (mut scan, mut len, mut pos) = (0i64, 0i64, 0i64);
    let (mut last_scan, mut last_pos, mut last_offset) = (0i64, 0i64, 0i64);
    let mut diff_bytes = Vec::new();
    while scan < nlen {
        let mut old_score = 0i64;
        scan += len;
        let mut scsc = scan;
        while scan < nlen {
            let (l, p) = search(&sa, old, &new[scan as usize..], 0, sa.len() - 1);
            (len, pos) = (l as i64, p as i64);
            while scsc < scan + len {
                if scsc + last_offset < olen && at(old, scsc + last_offset) == at(new, scsc) {
                    old_score += 1;
                }
                scsc += 1;
            }
            if (len == old_score && len != 0) || len > old_score + 8 {
                break;
            }
            if scan + last_offset < olen && at(old, scan + last_offset) == at(new, scan) {
                old_score -= 1;
            }
            scan += 1;
        }
        if len == old_score && scan != nlen {
            continue;
        }
        // Extend the previous match forward and this one backward, as far
        // as at least half the bytes agree.
        let (mut s, mut best, mut len_f) = (0i64, 0i64, 0i64);
        let mut i = 0i64;
        while last_scan + i < scan && last_pos + i < olen {
            if at(old, last_pos + i) == at(new, last_scan + i) {
                s += 1;
            }
            i += 1;
            if s * 2 - i > best * 2 - len_f {
                best = s;
                len_f = i;
            }
        }
        let mut len_b = 0i64;
        if scan < nlen {
            let (mut s, mut best) = (0i64, 0i64);
            let mut i = 1i64;
            while scan >= last_scan + i && pos >= i {
                if at(old, pos - i) == at(new, scan - i) {
                    s += 1;
                }
                if s * 2 - i > best * 2 - len_b {
                    best = s;
                    len_b = i;
                }
                i += 1;
            }
        }
        if last_scan + len_f > scan - len_b {
            let overlap = (last_scan + len_f) - (scan - len_b);
            let (mut s, mut best, mut len_s) = (0i64, 0i64, 0i64);
            for i in 0..overlap {
                if at(new, last_scan + len_f - overlap + i)
                    == at(old, last_pos + len_f - overlap + i)
                {
                    s += 1;
                }
                if at(new, scan - len_b + i) == at(old, pos - len_b + i) {
                    s -= 1;
                }
                if s > best {
                    best = s;
                    len_s = i + 1;
                }
            }
            len_f += len_s - overlap;
            len_b -= len_s;
        }
        diff_bytes.clear();
        diff_bytes
            .extend((0..len_f).map(|i| at(new, last_scan + i).wrapping_sub(at(old, last_pos + i))));
        let extra = &new[(last_scan + len_f) as usize..(scan - len_b) as usize];
        let seek = (pos - len_b) - (last_pos + len_f);
        push_record(&mut out, &diff_bytes, extra, seek);
        last_scan = scan - len_b;
        last_pos = pos - len_b;
        last_offset = pos - scan;
    }
    out
}

fn le_u32(b: &[u8]) -> usize {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    u32::from_le_bytes(a) as usize
}

fn le_i64(b: &[u8]) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    i64::from_le_bytes(a)
}

/// Applies a patch body to `old`; the result must be exactly `len` bytes.
pub fn apply(old: &[u8], body: &[u8], len: usize) -> Result<Vec<u8>, BsdiffError> {
    let mut out = Vec::with_capacity(len);
    let mut at = 0usize;
    let mut old_pos = 0i64;
    while at < body.len() {
        let header = body
            .get(at..at + RECORD_HEADER)
            .ok_or(BsdiffError::Truncated(at))?;
        let (diff_len, extra_len) = (le_u32(&header[0..4]), le_u32(&header[4..8]));
        let seek = le_i64(&header[8..16]);
        let diff = body
            .get(at + RECORD_HEADER..at + RECORD_HEADER + diff_len)
            .ok_or(BsdiffError::Truncated(at))?;
        let extra_at = at + RECORD_HEADER + diff_len;
        let extra = body
            .get(extra_at..extra_at + extra_len)
            .ok_or(BsdiffError::Truncated(at))?;
        if out.len() + diff_len + extra_len > len {
            return Err(BsdiffError::TooLong(len));
        }
        let end = old_pos + diff_len as i64;
        if diff_len > 0 && (old_pos < 0 || end > old.len() as i64) {
            return Err(BsdiffError::OutOfReference {
                start: old_pos,
                end,
                len: old.len(),
            });
        }
        if diff_len > 0 {
            let from = &old[old_pos as usize..end as usize];
            out.extend(from.iter().zip(diff).map(|(o, d)| o.wrapping_add(*d)));
        }
        out.extend_from_slice(extra);
        old_pos = end.saturating_add(seek);
        at = extra_at + extra_len;
    }
    if out.len() != len {
        return Err(BsdiffError::Short {
            written: out.len(),
            expected: len,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random generator (xorshift), so the tests
    /// need no crate.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Something shaped like a rebuilt executable: the old bytes with a
    /// region inserted, one removed, and a 4-byte "address" changed every
    /// 64 bytes.
    fn rebuilt(old: &[u8]) -> Vec<u8> {
        let mut new = old[..10_000].to_vec();
        new.extend(noise(7, 3_000));
        new.extend_from_slice(&old[10_000..40_000]);
        new.extend_from_slice(&old[45_000..]);
        for i in (0..new.len()).step_by(64) {
            if let Some(b) = new.get_mut(i) {
                *b = b.wrapping_add(3);
            }
        }
        new
    }

    #[test]
    fn round_trips_and_is_small_for_shifted_code() {
        let old = noise(1, 100_000);
        let new = rebuilt(&old);
        let body = diff(&old, &new);
        assert_eq!(apply(&old, &body, new.len()).unwrap(), new);
        // The patch is mostly zero diff bytes: it compresses far below the
        // new bytes, where an exact-match delta could not (every 64-byte
        // run differs from the old).
        let mut compressed = Vec::with_capacity(zstd_safe::compress_bound(body.len()));
        zstd_safe::compress(&mut compressed, &body, 19).unwrap();
        assert!(
            compressed.len() * 10 < new.len(),
            "{} compressed bytes for {} new",
            compressed.len(),
            new.len()
        );
    }

    #[test]
    fn round_trips_edge_cases() {
        let old = noise(2, 5_000);
        for new in [
            Vec::new(),
            old.clone(),
            noise(3, 4_000),
            old[..1].to_vec(),
            [old.as_slice(), old.as_slice()].concat(),
        ] {
            let body = diff(&old, &new);
            assert_eq!(apply(&old, &body, new.len()).unwrap(), new);
            assert_eq!(apply(&[], &diff(&[], &new), new.len()).unwrap(), new);
        }
    }

    #[test]
    fn a_bad_body_is_refused() {
        let old = noise(4, 60_000);
        let new = rebuilt(&old);
        let body = diff(&old, &new);
        assert!(matches!(
            apply(&old, &body[..body.len() - 1], new.len()),
            Err(BsdiffError::Truncated(_))
        ));
        assert!(matches!(
            apply(&old, &body, new.len() - 1),
            Err(BsdiffError::TooLong(_))
        ));
        assert!(matches!(
            apply(&old, &body, new.len() + 1),
            Err(BsdiffError::Short { .. })
        ));
        assert!(matches!(
            apply(&old[..100], &body, new.len()),
            Err(BsdiffError::OutOfReference { .. })
        ));
    }
}
