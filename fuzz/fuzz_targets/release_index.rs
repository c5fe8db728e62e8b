//! The release index (JSON) and the choice of release from it.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(index) = payload::index::ReleaseIndex::parse(data) {
        let _ = serde_json::to_vec(&index);
    }
});
