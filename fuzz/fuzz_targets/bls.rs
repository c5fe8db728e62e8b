//! Boot Loader Specification entries: the file name (boot counting) on the
//! first line, the entry's text after it; and `loader.conf`'s default.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (file_name, body) = text.split_once('\n').unwrap_or((text, ""));
    let _ = bootconfig::bls::loader_default(body);
    if let Some(name) = bootconfig::bls::EntryName::parse(file_name) {
        let entry = bootconfig::bls::BlsEntry::parse(name, file_name, body);
        let _ = entry.status();
        let mut entries = vec![entry.clone(), entry];
        let _ = bootconfig::bls::boot_order(&entries);
        let _ = bootconfig::bls::boot_next(&mut entries, Some(file_name));
    }
});
