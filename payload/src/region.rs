//! A byte range of a file or block device, such as one slot's partition
//! inside a whole-disk image. Reads stop at its end and writes past its end
//! fail, so an apply cannot touch anything outside the slot it updates.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Where a range starts and how long it is, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

impl ByteRange {
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }

    /// Whether the two ranges share a byte.
    pub fn overlaps(&self, other: &ByteRange) -> bool {
        self.offset < other.end() && other.offset < self.end()
    }
}

/// Sorts byte ranges `[start, end)` and merges those that touch or overlap.
pub fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|&(start, end)| start < end);
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// Whether `[start, end)` shares a byte with any of `merged` (as
/// [`merge_ranges`] returns them).
pub fn overlaps_any(merged: &[(u64, u64)], start: u64, end: u64) -> bool {
    // The first range that ends after `start` is the only candidate.
    let i = merged.partition_point(|&(_, e)| e <= start);
    merged.get(i).is_some_and(|&(s, _)| s < end)
}

/// An open file seen through a [`ByteRange`]: offset 0 is the range's start.
#[derive(Debug)]
pub struct Region {
    file: File,
    range: ByteRange,
    /// Reads from the range's end up to here give zeros (a file padded to
    /// whole blocks); writes never go past the range.
    padded_len: u64,
}

impl Region {
    pub fn new(file: File, range: ByteRange) -> Region {
        Region {
            file,
            range,
            padded_len: range.len,
        }
    }

    /// The range, read as if zeros followed it up to `padded_len` bytes.
    pub fn zero_padded(file: File, range: ByteRange, padded_len: u64) -> Region {
        Region {
            file,
            range,
            padded_len: padded_len.max(range.len),
        }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn range(&self) -> ByteRange {
        self.range
    }

    /// Makes `len` bytes from `offset` read as zeros, inside the range
    /// only. In a regular file, `fallocate(FALLOC_FL_ZERO_RANGE)` where its
    /// file system offers it (unwritten extents: no data written). On a
    /// block device, and where that is not offered, zeros are written
    /// through the page cache like any other bytes: a block device's
    /// zeroing is a synchronous write of its own, as slow as the writes
    /// without the device's write-zeroes command, and it would hold back
    /// the apply's checkpoints.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.range.len)
        {
            return Err(io::Error::other(format!(
                "zeroing {len} bytes at {offset} would pass the end of the {}-byte region",
                self.range.len
            )));
        }
        if len == 0 {
            return Ok(());
        }
        use rustix::fs::{fallocate, FallocateFlags};
        let flags = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
        let regular = self.file.metadata()?.is_file();
        match regular.then(|| fallocate(&self.file, flags, self.range.offset + offset, len)) {
            None => {}
            Some(Ok(())) => return Ok(()),
            // Not offered here (tmpfs, some block devices): write zeros.
            Some(Err(e))
                if e == rustix::io::Errno::OPNOTSUPP
                    || e == rustix::io::Errno::NOSYS
                    || e == rustix::io::Errno::INVAL
                    || e == rustix::io::Errno::NODEV => {}
            Some(Err(e)) => return Err(e.into()),
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(zeros.len() as u64) as usize;
            self.write_all_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }
}

impl FileExt for Region {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.range.len {
            let n = usize::try_from(self.padded_len.saturating_sub(offset))
                .map_or(buf.len(), |left| left.min(buf.len()));
            buf[..n].fill(0);
            return Ok(n);
        }
        let n =
            usize::try_from(self.range.len - offset).map_or(buf.len(), |left| left.min(buf.len()));
        self.file.read_at(&mut buf[..n], self.range.offset + offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.range.len) {
            return Err(io::Error::other(format!(
                "write of {} bytes at {offset} would pass the end of the {}-byte region",
                buf.len(),
                self.range.len
            )));
        }
        self.file.write_at(buf, self.range.offset + offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_stay_inside_the_range() {
        let path = std::env::temp_dir().join(format!("tandem-region-{}", std::process::id()));
        std::fs::write(&path, b"0123456789").unwrap();
        let file = File::options().read(true).write(true).open(&path).unwrap();
        let region = Region::new(file, ByteRange { offset: 2, len: 5 });
        let mut buf = [0u8; 8];
        assert_eq!(region.read_at(&mut buf, 0).unwrap(), 5);
        assert_eq!(&buf[..5], b"23456");
        assert_eq!(region.read_at(&mut buf, 5).unwrap(), 0);
        region.write_all_at(b"ab", 3).unwrap();
        assert!(region.write_all_at(b"xyz", 3).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"01234ab789");
        assert!(ByteRange { offset: 0, len: 4 }.overlaps(&ByteRange { offset: 3, len: 1 }));
        assert!(!ByteRange { offset: 0, len: 4 }.overlaps(&ByteRange { offset: 4, len: 1 }));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn ranges_merge_and_overlaps_are_found() {
        let m = merge_ranges(vec![(10, 20), (0, 5), (5, 7), (15, 30), (40, 40), (50, 60)]);
        assert_eq!(m, vec![(0, 7), (10, 30), (50, 60)]);
        assert!(overlaps_any(&m, 6, 8));
        assert!(!overlaps_any(&m, 7, 10));
        assert!(overlaps_any(&m, 29, 100));
        assert!(!overlaps_any(&m, 30, 50));
        assert!(overlaps_any(&m, 0, 1));
        assert!(!overlaps_any(&m, 60, 70));
        assert!(!overlaps_any(&[], 0, u64::MAX));
    }

    #[test]
    fn zeroing_stays_inside_the_range_and_reads_back_as_zeros() {
        let path = std::env::temp_dir().join(format!("tandem-region-z-{}", std::process::id()));
        let data: Vec<u8> = (0..5 * 4096u32).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::options().read(true).write(true).open(&path).unwrap();
        let region = Region::new(
            file,
            ByteRange {
                offset: 4096,
                len: 3 * 4096,
            },
        );
        region.zero_range(4096, 2 * 4096).unwrap();
        assert!(region.zero_range(4096, 2 * 4096 + 1).is_err());
        assert!(region.zero_range(u64::MAX, 2).is_err());
        let after = std::fs::read(&path).unwrap();
        assert_eq!(after.len(), data.len(), "the file keeps its size");
        assert_eq!(after[..2 * 4096], data[..2 * 4096]);
        assert!(after[2 * 4096..4 * 4096].iter().all(|&b| b == 0));
        assert_eq!(after[4 * 4096..], data[4 * 4096..]);
        std::fs::remove_file(&path).unwrap();
    }
}
