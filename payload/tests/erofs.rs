//! tandem's erofs reader against images made by the real `mkfs.erofs`
//! (erofs-utils): every file of a generated tree read back byte for byte,
//! through lz4hc and lz4 with compact indexes, the legacy full index, and
//! no compression; a damaged image is an error, never a panic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use payload::erofs::{ErofsError, Image, Storage};
use tandem_testkit::{noise, run, text, TempDir};

/// A tree with the shapes a `/usr` has: empty, tiny, block-sized and
/// large files, compressible and not, a directory of many long names, deep
/// nesting, a hard link and a symlink.
fn make_tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut put = |path: &str, bytes: Vec<u8>| {
        let p = root.join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, &bytes).unwrap();
        files.insert(path.to_string(), bytes);
    };
    put("empty", Vec::new());
    put("one", b"x".to_vec());
    for (i, len) in [4095usize, 4096, 4097, 8191, 12_288, 65_537]
        .into_iter()
        .enumerate()
    {
        put(&format!("sizes/text-{len}"), text(i as u64, len));
        put(&format!("sizes/noise-{len}"), noise(100 + i as u64, len));
    }
    put("lib/big-text.so", text(7, 3 << 20));
    // Text with noise spliced in: pclusters that compress and some that
    // cannot (stored raw inside a compressed file).
    let mut mixed = text(8, 1 << 20);
    mixed.extend(noise(9, 200_000));
    mixed.extend(text(10, 500_000));
    put("lib/mixed.bin", mixed);
    put("lib/zeros", vec![0u8; 1 << 20]);
    for i in 0..300 {
        put(
            &format!("share/many/a-rather-long-file-name-to-fill-directory-blocks-{i:04}"),
            text(1000 + i, (i as usize * 37) % 5000),
        );
    }
    put("a/b/c/d/e/f/g/deep", text(11, 10_000));
    fs::hard_link(root.join("lib/big-text.so"), root.join("lib/hardlink.so")).unwrap();
    std::os::unix::fs::symlink("big-text.so", root.join("lib/symlink.so")).unwrap();
    files
}

fn read_back(image: &Path) -> BTreeMap<String, Vec<u8>> {
    let file = fs::File::open(image).unwrap();
    let size = file.metadata().unwrap().len();
    let read = |buf: &mut [u8], off: u64| file.read_exact_at(buf, off);
    let erofs = Image::open(&read, size).unwrap();
    let mut out = BTreeMap::new();
    for f in erofs.files().unwrap() {
        let bytes = erofs.read_file(&f).unwrap();
        assert_eq!(bytes.len() as u64, f.size, "{}", f.path);
        out.insert(f.path.clone(), bytes);
    }
    out
}

fn mkfs(dir: &Path, name: &str, options: &[&str], tree: &Path) -> std::path::PathBuf {
    let image = dir.join(name);
    let mut args = vec!["--quiet", "-T0"];
    args.extend_from_slice(options);
    let (image_s, tree_s) = (image.to_str().unwrap(), tree.to_str().unwrap());
    args.extend([image_s, tree_s]);
    run("mkfs.erofs", &args);
    image
}

#[test]
fn every_file_reads_back_byte_for_byte_through_each_layout() {
    let dir = TempDir::new("erofs-read");
    let tree = dir.path().join("tree");
    let expected = make_tree(&tree);
    // A hard link is listed under one of its names; both names hold the
    // same bytes, so either may be the one kept.
    let linked = expected["lib/big-text.so"].clone();
    for (name, options) in [
        ("lz4hc.erofs", &["-zlz4hc,12"][..]),
        ("lz4.erofs", &["-zlz4"][..]),
        ("legacy.erofs", &["-zlz4hc", "-Elegacy-compress"][..]),
        ("plain.erofs", &[][..]),
        ("extended.erofs", &["-zlz4hc", "-Eforce-inode-extended"][..]),
    ] {
        let image = mkfs(dir.path(), name, options, &tree);
        let mut got = read_back(&image);
        let link = got
            .remove("lib/hardlink.so")
            .or_else(|| got.get("lib/big-text.so").cloned())
            .unwrap();
        assert_eq!(link, linked, "{name}: the hard link");
        if !got.contains_key("lib/big-text.so") {
            got.insert("lib/big-text.so".into(), link);
        }
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "{name}: the file list"
        );
        for (path, bytes) in &expected {
            assert!(got[path] == *bytes, "{name}: {path} differs");
        }
    }
}

#[test]
fn compressed_files_are_mapped_to_lz4_blocks_and_raw_blocks() {
    let dir = TempDir::new("erofs-map");
    let tree = dir.path().join("tree");
    make_tree(&tree);
    let image = mkfs(dir.path(), "lz4hc.erofs", &["-zlz4hc,12"], &tree);
    let file = fs::File::open(&image).unwrap();
    let size = file.metadata().unwrap().len();
    let read = |buf: &mut [u8], off: u64| file.read_exact_at(buf, off);
    let erofs = Image::open(&read, size).unwrap();
    let files = erofs.files().unwrap();
    let get = |p: &str| files.iter().find(|f| f.path == p).unwrap();
    let text = get("lib/big-text.so");
    assert!(text.is_compressed());
    // Text compresses: far fewer blocks than 3 MiB / 4 KiB.
    assert!(
        text.extents.len() < 768 / 2,
        "{} extents",
        text.extents.len()
    );
    let mixed = get("lib/mixed.bin");
    let raw = mixed
        .extents
        .iter()
        .filter(|e| matches!(e.storage, Storage::Plain { .. }))
        .count();
    assert!(raw > 0, "noise inside a compressed file is stored raw");
    // The extents tile the file exactly, in order.
    for f in &files {
        let mut at = 0;
        for e in &f.extents {
            assert_eq!(e.logical, at, "{}", f.path);
            at += e.len;
        }
        assert_eq!(at, f.size, "{}", f.path);
    }
    // Noise does not compress: stored plain.
    assert!(!get("sizes/noise-65537").is_compressed());
}

#[test]
fn a_damaged_image_is_an_error_not_a_panic() {
    let dir = TempDir::new("erofs-damage");
    let tree = dir.path().join("tree");
    make_tree(&tree);
    let image = mkfs(dir.path(), "lz4hc.erofs", &["-zlz4hc,12"], &tree);
    let good = fs::read(&image).unwrap();
    // Not erofs at all.
    let zeros = vec![0u8; 1 << 16];
    let read = |buf: &mut [u8], off: u64| {
        buf.copy_from_slice(&zeros[off as usize..off as usize + buf.len()]);
        Ok(())
    };
    assert!(matches!(
        Image::open(&read, zeros.len() as u64),
        Err(ErofsError::NotErofs)
    ));
    // Every 2039th byte flipped in turn (metadata and data): each image
    // either reads, or fails with an error; a compressed block that still
    // decodes gives other bytes, which the planner's checks catch.
    let mut errors = 0;
    let mut step = 0;
    for at in (0..good.len()).step_by(2039) {
        step += 1;
        let mut bad = good.clone();
        bad[at] ^= 0x5a;
        let read = |buf: &mut [u8], off: u64| {
            let end = off as usize + buf.len();
            buf.copy_from_slice(
                bad.get(off as usize..end)
                    .ok_or(std::io::ErrorKind::UnexpectedEof)?,
            );
            Ok(())
        };
        let outcome = Image::open(&read, bad.len() as u64).and_then(|img| {
            for f in img.files()? {
                img.read_file(&f)?;
            }
            Ok(())
        });
        if outcome.is_err() {
            errors += 1;
        }
    }
    assert!(step > 100);
    assert!(errors > 0, "no flipped byte was noticed");
}
