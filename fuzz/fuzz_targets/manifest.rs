//! The manifest's JSON and its validation, past the header's checks. The
//! first byte picks the header's format version (1 to 3); the rest is the
//! manifest.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&version, manifest)) = data.split_first() else {
        return;
    };
    let header = payload::format::Header {
        version: 1 + u32::from(version % 3),
        manifest_len: manifest.len() as u64,
        signature_len: 0,
        data_len: 1 << 30,
    };
    let _ = payload::validate::parse_and_validate(manifest, &header);
});
