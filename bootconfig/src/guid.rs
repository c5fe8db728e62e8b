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

/// Builds a GUID from its text fields (`aaaaaaaa-bbbb-cccc-dddd-dddddddddddd`).
const fn from_fields(a: u32, b: u16, c: u16, d: [u8; 8]) -> Guid {
    let (a, b, c) = (a.to_le_bytes(), b.to_le_bytes(), c.to_le_bytes());
    Guid([
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ])
}

/// Discoverable Partitions Specification: `/usr` verity, x86-64.
pub const USR_VERITY_X86_64: Guid = from_fields(
    0x77ff5f63,
    0xe7b6,
    0x4633,
    [0xac, 0xf4, 0x15, 0x65, 0xb8, 0x64, 0xc0, 0xe6],
);
/// DPS: `/usr` verity, arm64.
pub const USR_VERITY_ARM64: Guid = from_fields(
    0x6e11a4e7,
    0xfbca,
    0x4ded,
    [0xb9, 0xe9, 0xe1, 0xa5, 0x12, 0xbb, 0x66, 0x4e],
);
/// DPS: `/usr` verity signature, x86-64.
pub const USR_VERITY_SIG_X86_64: Guid = from_fields(
    0xe7bb33fb,
    0x06cf,
    0x4e81,
    [0x82, 0x73, 0xe5, 0x43, 0xb4, 0x13, 0xe2, 0xe2],
);
/// DPS: `/usr` verity signature, arm64.
pub const USR_VERITY_SIG_ARM64: Guid = from_fields(
    0xc23ce4ff,
    0x44bd,
    0x4b00,
    [0xb2, 0xd4, 0xb4, 0x1b, 0x34, 0x19, 0xe0, 0x2a],
);

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
    fn dps_types_match_their_text() {
        for (guid, text) in [
            (USR_VERITY_X86_64, "77ff5f63-e7b6-4633-acf4-1565b864c0e6"),
            (USR_VERITY_ARM64, "6e11a4e7-fbca-4ded-b9e9-e1a512bb664e"),
            (
                USR_VERITY_SIG_X86_64,
                "e7bb33fb-06cf-4e81-8273-e543b413e2e2",
            ),
            (USR_VERITY_SIG_ARM64, "c23ce4ff-44bd-4b00-b2d4-b41b3419e02a"),
        ] {
            assert_eq!(guid.to_string(), text);
        }
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
