//! tandem's dm-verity code against `veritysetup` (cryptsetup), on generated
//! data of several sizes: the same root hash, a byte-identical hash device,
//! and a flipped byte in the data or the tree caught and located.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{self, File};
use std::path::Path;

use payload::verity::{self, Area, TreeLayout, VerityError};
use tandem_testkit::{noise, run, TempDir};

fn area(file: &File) -> Area<'_, File> {
    Area {
        file,
        offset: 0,
        len: file.metadata().unwrap().len(),
    }
}

/// `veritysetup format` of `data` into `hash`; returns the root hash it
/// printed.
fn veritysetup_format(data: &Path, hash: &Path, salt: Option<&str>) -> String {
    let mut args = vec!["format", "--uuid=7a1d0e11-0000-4000-8000-0000000000aa"];
    let salt_arg;
    if let Some(salt) = salt {
        salt_arg = format!("--salt={salt}");
        args.push(&salt_arg);
    }
    let (data, hash) = (data.to_str().unwrap(), hash.to_str().unwrap());
    args.extend([data, hash]);
    let out = run("veritysetup", &args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|| panic!("no root hash in veritysetup's output:\n{text}"))
}

fn data_file(dir: &Path, name: &str, blocks: usize, seed: u64) -> std::path::PathBuf {
    let path = dir.join(name);
    let mut bytes = noise(seed, blocks * 4096);
    // Some zero blocks, as a filesystem image has.
    for b in (0..blocks).step_by(5) {
        bytes[b * 4096..(b + 1) * 4096].fill(0);
    }
    fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn root_hash_and_hash_device_match_veritysetup() {
    let dir = TempDir::new("verity-sizes");
    // One block (no levels), one level, two levels, a partial top level,
    // three levels.
    for (i, blocks) in [1usize, 2, 128, 129, 3000, 16_385].into_iter().enumerate() {
        let data = data_file(dir.path(), &format!("data-{blocks}"), blocks, i as u64);
        let hash = dir.path().join(format!("hash-{blocks}"));
        // veritysetup's own random salt: tandem reads it from the superblock.
        let expected = veritysetup_format(&data, &hash, None);
        let (d, h) = (File::open(&data).unwrap(), File::open(&hash).unwrap());
        let verified = verity::verify(area(&d), area(&h)).unwrap();
        assert_eq!(verified.root_hash_hex(), expected, "{blocks} blocks");
        assert_eq!(verified.params.data_blocks, blocks as u64);
        verity::verify_root(area(&d), area(&h), &expected.to_uppercase()).unwrap();

        // tandem's own hash device is veritysetup's, byte for byte, and
        // veritysetup accepts it.
        let params = verified.params.clone();
        let (ours, root) = verity::format(&params, area(&d)).unwrap();
        assert_eq!(verity::root_hash_hex(&root), expected);
        let theirs = fs::read(&hash).unwrap();
        assert_eq!(&theirs[..ours.len()], &ours[..], "{blocks} blocks");
        assert!(theirs[ours.len()..].iter().all(|&b| b == 0));
        let ours_path = dir.path().join(format!("ours-{blocks}"));
        fs::write(&ours_path, &ours).unwrap();
        run(
            "veritysetup",
            &[
                "verify",
                data.to_str().unwrap(),
                ours_path.to_str().unwrap(),
                &expected,
            ],
        );
    }
}

#[test]
fn a_fixed_salt_and_type_0_are_read_too() {
    let dir = TempDir::new("verity-salt");
    let data = data_file(dir.path(), "data", 300, 9);
    let hash = dir.path().join("hash");
    let salt = "00112233445566778899aabbccddeeff";
    let expected = veritysetup_format(&data, &hash, Some(salt));
    let (d, h) = (File::open(&data).unwrap(), File::open(&hash).unwrap());
    let verified = verity::verify(area(&d), area(&h)).unwrap();
    assert_eq!(verified.root_hash_hex(), expected);
    assert_eq!(verified.params.salt.len(), 16);

    let hash0 = dir.path().join("hash0");
    let out = run(
        "veritysetup",
        &[
            "format",
            "--format=0",
            &format!("--salt={salt}"),
            data.to_str().unwrap(),
            hash0.to_str().unwrap(),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let expected0 = text
        .lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .unwrap()
        .trim();
    let h0 = File::open(&hash0).unwrap();
    assert_eq!(
        verity::verify(area(&d), area(&h0)).unwrap().root_hash_hex(),
        expected0
    );
}

#[test]
fn a_flipped_byte_in_data_or_tree_is_caught() {
    let dir = TempDir::new("verity-flip");
    let blocks = 16_385;
    let data = data_file(dir.path(), "data", blocks, 4);
    let hash = dir.path().join("hash");
    let expected = veritysetup_format(&data, &hash, None);
    let pristine_data = fs::read(&data).unwrap();
    let pristine_hash = fs::read(&hash).unwrap();

    // A byte of data block 9000: level 0 block 70 (9000 / 128) differs.
    let mut bytes = pristine_data.clone();
    bytes[9000 * 4096 + 17] ^= 0x40;
    fs::write(&data, &bytes).unwrap();
    let (d, h) = (File::open(&data).unwrap(), File::open(&hash).unwrap());
    match verity::verify(area(&d), area(&h)) {
        Err(VerityError::Mismatch {
            level: 0,
            block: 70,
            data_range: Some((8960, 9087)),
        }) => {}
        other => panic!("expected a level-0 mismatch, got {other:?}"),
    }
    fs::write(&data, &pristine_data).unwrap();

    // Every stored level, and the top block (which only the root covers).
    let layout = TreeLayout::new(blocks as u64, 4096);
    for (level, (first, _)) in layout.levels.iter().enumerate() {
        let mut tree = pristine_hash.clone();
        let at = (1 + *first as usize) * 4096 + 100;
        tree[at] ^= 1;
        fs::write(&hash, &tree).unwrap();
        let (d, h) = (File::open(&data).unwrap(), File::open(&hash).unwrap());
        match verity::verify(area(&d), area(&h)) {
            Err(VerityError::Mismatch { level: l, .. }) => assert_eq!(l, level),
            other => panic!("level {level}: expected a mismatch, got {other:?}"),
        }
    }

    // A tree that matches its data but not the root hash the boot
    // artifact names.
    fs::write(&hash, &pristine_hash).unwrap();
    let (d, h) = (File::open(&data).unwrap(), File::open(&hash).unwrap());
    let wrong = "0".repeat(64);
    assert!(matches!(
        verity::verify_root(area(&d), area(&h), &wrong),
        Err(VerityError::RootMismatch { .. })
    ));
    verity::verify_root(area(&d), area(&h), &expected).unwrap();

    // Data shorter than the tree says, and no superblock at all.
    let short = Area {
        file: &d,
        offset: 0,
        len: 4096 * 100,
    };
    assert!(matches!(
        verity::verify(short, area(&h)),
        Err(VerityError::DataTooSmall { .. })
    ));
    assert!(matches!(
        verity::verify(area(&h), area(&d)),
        Err(VerityError::NoSuperblock { .. })
    ));
}

#[test]
fn offsets_inside_a_larger_device_work() {
    // Flatcar keeps the tree inside USR after the filesystem: data at 0,
    // hash area at an offset of the same file.
    let dir = TempDir::new("verity-offset");
    let data = data_file(dir.path(), "data", 700, 5);
    let hash = dir.path().join("hash");
    let expected = veritysetup_format(&data, &hash, None);
    let mut whole = fs::read(&data).unwrap();
    let offset = whole.len() as u64 + 8 * 4096;
    whole.resize(offset as usize, 0xee);
    whole.extend_from_slice(&fs::read(&hash).unwrap());
    let joined = dir.path().join("joined");
    fs::write(&joined, &whole).unwrap();
    let f = File::open(&joined).unwrap();
    let data_area = Area {
        file: &f,
        offset: 0,
        len: offset,
    };
    let hash_area = Area {
        file: &f,
        offset,
        len: whole.len() as u64 - offset,
    };
    let verified = verity::verify_root(data_area, hash_area, &expected).unwrap();
    assert_eq!(verified.params.data_blocks, 700);
}
