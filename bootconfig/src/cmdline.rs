//! Which slot the kernel was booted from, read off its command line.

use crate::guid::Guid;
use crate::slots::Slot;
use crate::SlotName;

/// Keys that name the `/usr` or root device, most specific first. Flatcar
/// boots with `mount.usr=/dev/mapper/usr verity.usr=PARTUUID=…`, so
/// `verity.usr` is asked when `mount.usr` names no partition; ACL's UKI
/// addons name the slot as `systemd.verity_usr_data=PARTUUID=…`.
pub const ROOT_ARGS: [&str; 5] = [
    "mount.usr",
    "verity.usr",
    "systemd.verity_usr_data",
    "usr",
    "root",
];

/// Splits a kernel command line into words, honouring double quotes the way
/// the kernel does (`key="a b"` is one word, quotes removed).
fn words(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in cmdline.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

/// The PARTUUID a device spec names: `PARTUUID=…` or `/dev/disk/by-partuuid/…`.
pub fn partuuid_of(spec: &str) -> Option<Guid> {
    let (prefix, rest) = spec.split_at_checked(9)?;
    if prefix.eq_ignore_ascii_case("PARTUUID=") {
        // A bug planted for the fuzzing harness's own test (feature
        // `planted-bug`, never in a release build): it must find it.
        #[cfg(feature = "planted-bug")]
        {
            let b = rest.as_bytes();
            if b.first() == Some(&b'B') && b.get(1) == Some(&b'U') && b.get(2) == Some(&b'G') {
                panic!("planted bug reached");
            }
        }
        return rest.parse().ok();
    }
    spec.strip_prefix("/dev/disk/by-partuuid/")?.parse().ok()
}

/// The PARTUUID of the booted `/usr` (or root) partition. The last value of
/// a key wins, as in the kernel and systemd. Pure.
pub fn booted_partuuid(cmdline: &str) -> Option<Guid> {
    let words = words(cmdline);
    ROOT_ARGS.iter().find_map(|key| {
        words
            .iter()
            .rev()
            .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
            .and_then(partuuid_of)
    })
}

/// The slot booted, by matching the command line's PARTUUID. Pure.
pub fn booted_slot(cmdline: &str, slots: &[Slot; 2]) -> Option<SlotName> {
    let partuuid = booted_partuuid(cmdline)?;
    slots
        .iter()
        .find(|slot| slot.partuuid == partuuid)
        .map(|slot| slot.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "7130c94a-213a-4e5a-8e26-6cce9662f132";
    const B: &str = "e03dd35c-7c2d-4a47-b3fe-27f15780a57c";

    #[test]
    fn reads_every_supported_form() {
        let a: Guid = A.parse().unwrap();
        for line in [
            format!("BOOT_IMAGE=/vmlinuz mount.usr=PARTUUID={A} rootflags=rw"),
            format!(
                "mount.usr=/dev/mapper/usr verity.usr=PARTUUID={} quiet",
                A.to_uppercase()
            ),
            format!("usr=/dev/disk/by-partuuid/{A}"),
            format!("root=PARTUUID={A} ro"),
            format!("root=PARTUUID={B} mount.usr=partuuid={A}"),
            format!("mount.usr=PARTUUID={B} mount.usr=PARTUUID={A}"),
            format!("console=ttyS0 dyndbg=\"module x +p\" usr=\"PARTUUID={A}\""),
        ] {
            assert_eq!(booted_partuuid(&line), Some(a), "{line}");
        }
    }

    #[test]
    fn ignores_what_names_no_partition() {
        for line in [
            "",
            "root=/dev/sda9 ro",
            "mount.usr=/dev/mapper/usr",
            "xmount.usr=PARTUUID=nonsense",
            "usr=PARTUUID=123",
        ] {
            assert_eq!(booted_partuuid(line), None, "{line}");
        }
    }
}
