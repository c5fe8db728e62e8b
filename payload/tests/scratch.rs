#![allow(clippy::unwrap_used)]
use payload::erofs::{self, Storage};
use std::os::unix::fs::FileExt;
#[test]
fn scratch() {
    let file = std::fs::File::open(std::env::var("IMG").unwrap()).unwrap();
    let size = file.metadata().unwrap().len();
    let read = |buf: &mut [u8], off: u64| file.read_exact_at(buf, off);
    let img = erofs::Image::open(&read, size).unwrap();
    let files = img.files().unwrap();
    let limit: usize = std::env::var("LIMIT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(usize::MAX);
    let (mut ok, mut bad, mut okb, mut badb, mut plain) = (0, 0, 0u64, 0u64, 0u64);
    let t = std::time::Instant::now();
    let mut decomp = 0u64;
    for f in files.iter().filter(|f| f.is_compressed()).take(limit) {
        let content = img.read_file(f).unwrap();
        decomp += content.len() as u64;
        let mut got = Vec::new();
        let kept = erofs::compress_file(&content, 12, &mut |p| {
            got.push(p);
            Ok(())
        })
        .unwrap();
        let mut same = kept && got.len() == f.extents.len();
        if same {
            for (p, e) in got.iter().zip(&f.extents) {
                let blk = match e.storage {
                    Storage::Lz4 { block } => block * 4096,
                    Storage::Plain { offset } => offset,
                };
                let mut b = vec![0u8; 4096];
                read(&mut b, blk).unwrap();
                if p.logical != e.logical
                    || p.len != e.len
                    || p.compressed != matches!(e.storage, Storage::Lz4 { .. })
                    || b[..] != p.block[..]
                {
                    same = false;
                    if bad < 5 {
                        println!(
                            "MISMATCH {} at {} p=({},{},{}) e={:?}",
                            f.path, e.logical, p.logical, p.len, p.compressed, e
                        );
                    }
                    break;
                }
            }
        } else if bad < 5 {
            println!(
                "COUNT {} kept {} got {} want {}",
                f.path,
                kept,
                got.len(),
                f.extents.len()
            );
        }
        if same {
            ok += 1;
            okb += f.size
        } else {
            bad += 1;
            badb += f.size
        }
    }
    for f in files.iter().filter(|f| !f.is_compressed()) {
        plain += f.size;
    }
    println!("files {} compressed-reproduced {ok} ({okb} B) not {bad} ({badb} B); plain bytes {plain}; {:.1} s for {decomp} B", files.len(), t.elapsed().as_secs_f64());
}
