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
}
