//! Boot tests in a VM: real firmware (OVMF), bootloader (systemd-boot),
//! kernel and reboots.
//!
//! - [`build`]: the cached test images (Debian roots as slot images, signed
//!   payloads on a release disk, a bootable A/B disk).
//! - [`acl`]: the ACL-layout disk: hash partitions, UKIs, dm-verity.
//! - [`vm`]: QEMU, the serial console and the guest's command agent.
//! - [`scenario`]: the scenarios the tests and `cargo xtask demo` run.

pub mod acl;
pub mod build;
pub mod scenario;
pub mod vm;
