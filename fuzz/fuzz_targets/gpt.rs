//! A GUID partition table as a disk image holds it: both copies, their
//! CRCs, the entries, and the repairs the reader would make.
#![no_main]
use std::io::Write;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // GptDisk reads a file (a block device or an image): one per process,
    // rewritten for each input.
    thread_local! {
        static PATH: std::path::PathBuf = std::env::temp_dir()
            .join(format!("tandem-fuzz-gpt-{}.img", std::process::id()));
    }
    PATH.with(|path| {
        let Ok(mut f) = std::fs::File::create(path) else {
            return;
        };
        if f.write_all(data).is_err() {
            return;
        }
        drop(f);
        if let Ok(disk) = bootconfig::gpt::GptDisk::open(path) {
            let _ = disk.partitions();
            let _ = disk.pending_repairs();
            let _ = bootconfig::slots::find_slots(
                &disk.partitions(),
                disk.sector_size(),
                disk.size_bytes(),
                &bootconfig::SlotLayout::default(),
            );
        }
    });
});
