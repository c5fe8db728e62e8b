//! The kernel command line: the booted partition, the verity root hash.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = bootconfig::cmdline::booted_partuuid(text);
    let _ = bootconfig::uki::usrhash(text);
});
