//! Payloads of several components of one slot: the `/usr` image, its
//! hash tree and a boot artifact of any length (a UKI), full and as a
//! delta, each written to its own target and verified.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use payload::make::ComponentInput;
use payload::{ApplyError, ApplyOptions, ApplyOutcome, ComponentPaths, Keyring, MakeOptions};
use tandem_testkit::{image_pair, noise, TempDir};

struct Setup {
    dir: TempDir,
    key: payload::SigningKey,
    keyring: Keyring,
}

fn setup(tag: &str) -> Setup {
    let dir = TempDir::new(tag);
    let (secret, public) = payload::sign::generate_key("test <test@example.com>").unwrap();
    Setup {
        dir,
        key: payload::SigningKey::from_bytes(secret.as_bytes()).unwrap(),
        keyring: Keyring::from_bytes(public.as_bytes()).unwrap(),
    }
}

impl Setup {
    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::write(&path, bytes).unwrap();
        path
    }
}

fn input(name: &str, target: &Path, source: Option<&PathBuf>, file: bool) -> ComponentInput {
    ComponentInput {
        name: name.into(),
        target: target.to_path_buf(),
        source: source.cloned(),
        file,
    }
}

#[test]
fn usr_hash_tree_and_uki_round_trip_full_and_delta() {
    let s = setup("components");
    let (usr_old, usr_new) = image_pair();
    let hash_old = noise(1, 9 * 4096);
    let mut hash_new = hash_old.clone();
    hash_new[5 * 4096..6 * 4096].copy_from_slice(&noise(2, 4096));
    // A UKI is not whole blocks; the new one mostly equals the old.
    let uki_old = noise(3, 300_001);
    let mut uki_new = uki_old.clone();
    uki_new.extend_from_slice(b"a new section");
    uki_new[1000..1100].fill(7);
    let paths = [
        (s.write("usr-old", &usr_old), s.write("usr-new", &usr_new)),
        (
            s.write("hash-old", &hash_old),
            s.write("hash-new", &hash_new),
        ),
        (s.write("uki-old", &uki_old), s.write("uki-new", &uki_new)),
    ];
    let names = ["usr", "verity", "uki"];
    for delta in [false, true] {
        let inputs: Vec<ComponentInput> = names
            .iter()
            .zip(&paths)
            .map(|(name, (old, new))| input(name, new, delta.then_some(old), *name == "uki"))
            .collect();
        let out = s.dir.path().join(format!("p-{delta}.tpl"));
        let manifest = payload::make::make_components(
            &inputs,
            "2.0",
            delta.then_some("1.0"),
            &s.key,
            &MakeOptions::default(),
            &out,
            &|_| {},
        )
        .unwrap();
        assert_eq!(manifest.components.len(), 3);
        assert_eq!(manifest.components[2].file_len, Some(uki_new.len() as u64));
        assert_eq!(manifest.components[2].target.size % 4096, 0);
        assert_eq!(manifest.is_delta(), delta);

        // Targets: a slot inside a bigger file, a hash partition file, and
        // a new empty file for the UKI.
        let targets: Vec<PathBuf> = names
            .iter()
            .map(|n| s.dir.path().join(format!("out-{delta}-{n}")))
            .collect();
        fs::write(&targets[0], vec![0xaa; usr_new.len() + (1 << 20)]).unwrap();
        fs::write(&targets[1], vec![0xbb; 16 * 4096]).unwrap();
        fs::write(&targets[2], b"").unwrap();
        let component_paths: Vec<ComponentPaths> = names
            .iter()
            .zip(&targets)
            .zip(&paths)
            .map(|((n, t), (old, _))| ComponentPaths {
                component: n.to_string(),
                target: t.clone(),
                target_range: None,
                source: delta.then(|| old.clone()),
                source_range: None,
            })
            .collect();
        let bytes = fs::read(&out).unwrap();
        let outcome = payload::apply(
            Cursor::new(&bytes),
            &s.keyring,
            &component_paths,
            &ApplyOptions::default(),
            &mut |_| std::ops::ControlFlow::Continue(()),
        )
        .unwrap();
        assert!(matches!(outcome, ApplyOutcome::Complete(_)));
        let usr = fs::read(&targets[0]).unwrap();
        assert_eq!(&usr[..usr_new.len()], &usr_new[..]);
        // Only the image's length is written; the rest of the slot stays.
        assert!(usr[usr_new.len()..].iter().all(|&b| b == 0xaa));
        assert_eq!(
            &fs::read(&targets[1]).unwrap()[..hash_new.len()],
            &hash_new[..]
        );
        // The UKI comes out exactly, cut back to its signed length.
        assert_eq!(fs::read(&targets[2]).unwrap(), uki_new);
        if delta {
            // The delta is small: the UKI and tree are mostly copied.
            assert!(
                bytes.len() < usr_new.len() / 2,
                "delta of {} bytes",
                bytes.len()
            );
        }
    }
}

#[test]
fn a_missing_component_target_is_refused_before_writing() {
    let s = setup("components-missing");
    let (_, usr) = image_pair();
    let usr_path = s.write("usr", &usr);
    let uki_path = s.write("uki", &noise(4, 5000));
    let out = s.dir.path().join("p.tpl");
    payload::make::make_components(
        &[
            input("usr", &usr_path, None, false),
            input("uki", &uki_path, None, true),
        ],
        "2.0",
        None,
        &s.key,
        &MakeOptions::default(),
        &out,
        &|_| {},
    )
    .unwrap();
    let target = s.write("target", &vec![0x11; usr.len()]);
    let err = payload::apply(
        Cursor::new(fs::read(&out).unwrap()),
        &s.keyring,
        &[ComponentPaths {
            component: "usr".into(),
            target: target.clone(),
            target_range: None,
            source: None,
            source_range: None,
        }],
        &ApplyOptions::default(),
        &mut |_| std::ops::ControlFlow::Continue(()),
    )
    .unwrap_err();
    assert!(
        matches!(err, ApplyError::MissingTarget(ref c) if c == "uki"),
        "{err}"
    );
    assert!(fs::read(&target).unwrap().iter().all(|&b| b == 0x11));
}
