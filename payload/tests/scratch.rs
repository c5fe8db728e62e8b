#![allow(clippy::unwrap_used)]
use payload::erofs;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
#[test]
fn scratch() {
    let nf = std::fs::File::open(std::env::var("NEW").unwrap()).unwrap();
    let of = std::fs::File::open(std::env::var("OLD").unwrap()).unwrap();
    let rn = |buf: &mut [u8], off: u64| nf.read_exact_at(buf, off);
    let ro = |buf: &mut [u8], off: u64| of.read_exact_at(buf, off);
    let ni = erofs::Image::open(&rn, nf.metadata().unwrap().len()).unwrap();
    let oi = erofs::Image::open(&ro, of.metadata().unwrap().len()).unwrap();
    let nfiles = ni.files().unwrap();
    let ofiles = oi.files().unwrap();
    let old: HashMap<_, _> = ofiles.iter().map(|f| (f.path.clone(), f)).collect();
    let mut rows = Vec::new();
    for f in &nfiles {
        let o = old.get(&f.path).or_else(|| {
            old.get(
                &f.path
                    .replace(&std::env::var("NR").unwrap(), &std::env::var("OR").unwrap()),
            )
        });
        let same = match o {
            Some(o) => o.size == f.size && oi.read_file(o).unwrap() == ni.read_file(f).unwrap(),
            None => false,
        };
        if !same {
            rows.push((f.size, f.path.clone(), f.is_compressed(), o.is_some()));
        }
    }
    rows.sort();
    let total: u64 = rows.iter().map(|r| r.0).sum();
    println!("changed files {} bytes {total}", rows.len());
    for r in rows.iter().rev().take(25) {
        println!("{:>10} {} compressed={} paired={}", r.0, r.1, r.2, r.3);
    }
    let big: u64 = rows.iter().filter(|r| r.0 > 8 << 20).map(|r| r.0).sum();
    let plain: u64 = rows.iter().filter(|r| !r.2).map(|r| r.0).sum();
    println!("over 8 MiB: {big}; uncompressed: {plain}");
}
