//! A Unified Kernel Image's PE headers and section table.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = bootconfig::uki::sections(data);
});
