//! A configuration drop-in (TOML) over the defaults, and its checks.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let docs = [(std::path::PathBuf::from("50-fuzz.toml"), text.to_owned())];
    let _ = updater::config::from_documents(&docs);
});
