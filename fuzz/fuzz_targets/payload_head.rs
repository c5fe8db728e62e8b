//! A payload's head as it streams in: header, manifest, signature (read
//! without a keyring, as `inspect` does; the manifest is validated).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = payload::PayloadHead::read_unverified(&mut &data[..]);
});
