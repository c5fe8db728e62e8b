//! GPT GUIDs: parsed from and shown as the usual text form, stored in the
//! mixed-endian byte order of the UEFI specification.

use std::fmt;
use std::str::FromStr;

/// A GUID as it is stored on disk (first three fields little-endian).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Guid([u8; 16]);

/// The GPT partition type of a Flatcar/ACL `/usr` slot.
pub const FLATCAR_USR_TYPE: Guid = Guid([
    0xf4, 0xf5, 0xfb, 0x5d, 0x48, 0x28, 0xac, 0x4b, 0xaa, 0x5e, 0x0d, 0x9a, 0x20, 0xb7, 0x45, 0xa6,
]);

impl Guid {
    /// The GUID whose on-disk bytes are `bytes`.
    pub const fn from_disk_bytes(bytes: [u8; 16]) -> Self {
        Guid(bytes)
    }

    /// The on-disk bytes.
    pub const fn disk_bytes(&self) -> [u8; 16] {
        self.0
    }

    /// True for the all-zero GUID, which marks an unused partition entry.
    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }
}

/// A string that is not a GUID in `8-4-4-4-12` hex form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a GUID (want 8-4-4-4-12 hex digits): {0:?}")]
pub struct ParseGuidError(pub String);

impl FromStr for Guid {
    type Err = ParseGuidError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || ParseGuidError(text.to_string());
        let groups: Vec<&str> = text.split('-').collect();
        let lengths = [8, 4, 4, 4, 12];
        if groups.len() != 5 || groups.iter().zip(lengths).any(|(g, n)| g.len() != n) {
            return Err(bad());
        }
        let hex: String = groups.concat();
        if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut text_order = [0u8; 16];
        for (i, byte) in text_order.iter_mut().enumerate() {
            let pair = hex.get(2 * i..2 * i + 2).ok_or_else(bad)?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        let mut disk = text_order;
        disk[0..4].reverse();
        disk[4..6].reverse();
        disk[6..8].reverse();
        Ok(Guid(disk))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-",
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9]
        )?;
        for byte in &b[10..16] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}

impl serde::Serialize for Guid {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_uses_mixed_endian_bytes() {
        let text = "5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6";
        let guid: Guid = text.parse().unwrap();
        assert_eq!(guid, FLATCAR_USR_TYPE);
        assert_eq!(guid.to_string(), text);
        let upper: Guid = text.to_uppercase().parse().unwrap();
        assert_eq!(upper, guid);
    }

    #[test]
    fn rejects_malformed_text() {
        for bad in [
            "",
            "5dfbf5f4-2848-4bac-aa5e-0d9a20b745a",
            "5dfbf5f428484bacaa5e0d9a20b745a6",
            "zdfbf5f4-2848-4bac-aa5e-0d9a20b745a6",
            "+dfbf5f4-2848-4bac-aa5e-0d9a20b745a6",
        ] {
            assert!(bad.parse::<Guid>().is_err(), "{bad}");
        }
    }
}
