//! bootconfig on real disk images and a real (bind-mounted) ESP: a simulated
//! GRUB boot sequence written back to the GPT and read by `cgpt`, and BLS
//! entries listed by `bootctl`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bootconfig::backend::{BlsBackend, GptPrioBackend};
use bootconfig::bls::{BootCounter, EntriesDir};
use bootconfig::gpt::GptDisk;
use bootconfig::slots::find_slots;
use bootconfig::{BootBackend, Slot, SlotLayout, SlotName};
use tandem_testkit::{bootctl_entries, slot_entry, BindMount, DiskImage, TempDir};

fn slots_of(disk: &GptDisk) -> [Slot; 2] {
    find_slots(
        &disk.partitions(),
        disk.sector_size(),
        disk.size_bytes(),
        &SlotLayout::default(),
    )
    .unwrap()
}

/// One boot as GRUB's `gptprio.next` does it on the disk. Returns the
/// label of the partition booted.
fn grub_boot(image: &DiskImage) -> String {
    let disk = GptDisk::open_for_update(&image.path).unwrap();
    let slots = slots_of(&disk);
    let mut backend = GptPrioBackend::new(disk, slots);
    backend
        .simulate_grub_boot()
        .unwrap()
        .expect("something boots")
        .name
}

#[test]
fn set_next_then_two_boots_without_mark_good_falls_back_to_a() {
    let dir = TempDir::new("grub-sequence");
    let image = DiskImage::flatcar(dir.path());
    let disk = GptDisk::open_for_update(&image.path).unwrap();
    let slots = slots_of(&disk);
    let mut backend = GptPrioBackend::new(disk, slots);
    backend.set_next(SlotName::B, 1).unwrap();
    assert_eq!(backend.next_boot(), Some(SlotName::B));
    drop(backend);

    assert_eq!(grub_boot(&image), "USR-B", "first boot tries B");
    assert_eq!(
        image.cgpt_prio(4),
        (2, 0, false),
        "the try is spent on disk"
    );
    assert_eq!(
        grub_boot(&image),
        "USR-A",
        "B never marked good: GRUB falls back"
    );
    assert_eq!(image.cgpt_prio(3), (1, 0, true));
    assert_eq!(grub_boot(&image), "USR-A");
}

#[test]
fn every_transition_through_the_library_matches_cgpt() {
    let dir = TempDir::new("lib-transitions");
    let image = DiskImage::flatcar(dir.path());
    let open = || {
        let disk = GptDisk::open_for_update(&image.path).unwrap();
        let slots = slots_of(&disk);
        GptPrioBackend::new(disk, slots)
    };
    type Step = fn(&mut GptPrioBackend) -> Vec<String>;
    type Bits = (u8, u8, bool);
    let steps: [(&str, Step, Bits, Bits); 5] = [
        (
            "set-next B, 2 tries",
            |b| b.set_next(SlotName::B, 2).unwrap(),
            (1, 0, true),
            (2, 2, false),
        ),
        (
            "mark-good B",
            |b| b.mark_good(SlotName::B).unwrap(),
            (1, 0, true),
            (2, 0, true),
        ),
        (
            "set-next A",
            |b| b.set_next(SlotName::A, 1).unwrap(),
            (3, 1, false),
            (2, 0, true),
        ),
        (
            "mark-bad A",
            |b| b.mark_bad(SlotName::A).unwrap(),
            (0, 0, false),
            (2, 0, true),
        ),
        (
            "clear A",
            |b| b.clear(SlotName::A).unwrap(),
            (0, 0, false),
            (2, 0, true),
        ),
    ];
    for (what, step, a, b) in steps {
        let mut backend = open();
        let repairs = step(&mut backend);
        assert!(repairs.is_empty(), "{what}: nothing to repair");
        drop(backend);
        assert_eq!(image.cgpt_prio(3), a, "{what}: A as cgpt reads it");
        assert_eq!(image.cgpt_prio(4), b, "{what}: B as cgpt reads it");
        // And bootconfig reads back what cgpt reads.
        let backend = open();
        let reread = |slot| match backend.slot_boot(slot) {
            bootconfig::SlotBoot::Gptprio {
                priority,
                tries,
                successful,
                ..
            } => (priority, tries, successful),
            other => panic!("{other:?}"),
        };
        assert_eq!((reread(SlotName::A), reread(SlotName::B)), (a, b), "{what}");
    }
}

#[test]
fn bls_entries_are_listed_by_bootctl_as_expected() {
    let dir = TempDir::new("bls-disk");
    let image = DiskImage::flatcar(dir.path());
    let esp = BindMount::new("bls-esp");
    let entries = EntriesDir::new(esp.path());
    for version in ["4081.2.0", "4081.3.0"] {
        let kernel_dir = esp.path().join("tandem").join(version);
        std::fs::create_dir_all(&kernel_dir).unwrap();
        std::fs::write(kernel_dir.join("vmlinuz"), b"kernel").unwrap();
        std::fs::write(kernel_dir.join("initrd"), b"initrd").unwrap();
    }
    // A runs 4081.2.0 and is good; B gets the new 4081.3.0 with 3 tries.
    entries
        .write(
            "tandem-a",
            None,
            &slot_entry("4081.2.0", &image.partuuid(3)),
        )
        .unwrap();
    entries
        .write(
            "tandem-b",
            Some(BootCounter { left: 3, done: 0 }),
            &slot_entry("4081.3.0", &image.partuuid(4)),
        )
        .unwrap();
    let listed = bootctl_entries(&esp.bootctl_list());
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(
        listed[0]["title"],
        "Azure Container Linux 4081.3.0 (default) (not reported/new)"
    );
    assert_eq!(listed[0]["tries"], "3 left");
    assert_eq!(
        listed[0]["source"],
        format!("{}/loader/entries/tandem-b+3.conf", esp.path().display())
    );
    assert_eq!(
        listed[1]["title"],
        "Azure Container Linux 4081.2.0 (not reported/new)"
    );
    assert!(!listed[1].contains_key("tries"));

    let disk = GptDisk::open(&image.path).unwrap();
    let slots = slots_of(&disk);
    let backend = BlsBackend::open(entries.clone(), slots.clone()).unwrap();
    assert_eq!(
        backend.next_boot(),
        Some(SlotName::B),
        "bootconfig agrees with bootctl"
    );

    // Mark B bad: A becomes the default, B keeps its done count at 0 left.
    let mut backend = BlsBackend::open(entries.clone(), slots.clone()).unwrap();
    backend.mark_bad(SlotName::B).unwrap();
    assert_eq!(backend.next_boot(), Some(SlotName::A));
    let listed = bootctl_entries(&esp.bootctl_list());
    assert_eq!(
        listed[0]["title"],
        "Azure Container Linux 4081.2.0 (default) (not reported/new)"
    );
    assert_eq!(listed[1]["tries"], "0 left");

    // Set B next again with 1 try, then bless it: no counter left.
    backend.set_next(SlotName::B, 1).unwrap();
    let listed = bootctl_entries(&esp.bootctl_list());
    assert!(listed[0]["title"].contains("4081.3.0 (default)"));
    assert_eq!(listed[0]["tries"], "1 left");
    backend.mark_good(SlotName::B).unwrap();
    let listed = bootctl_entries(&esp.bootctl_list());
    assert!(listed[0]["title"].contains("4081.3.0 (default)"));
    assert!(!listed[0].contains_key("tries"), "blessed: {listed:?}");
    assert!(esp.path().join("loader/entries/tandem-b.conf").exists());

    // An older version is set next by demoting the newer entry.
    backend.set_next(SlotName::A, 1).unwrap();
    assert!(esp.path().join("loader/entries/tandem-a+1.conf").exists());
    assert!(esp.path().join("loader/entries/tandem-b+0.conf").exists());
}

/// An ext4 filesystem made by `mkfs.ext4 -d` from `root`, written into
/// partition `number` of the image (and nowhere else).
fn mkfs_into_partition(image: &DiskImage, number: u32, root: &std::path::Path) {
    let start = image.cgpt_field(number, "-b").parse::<u64>().unwrap() * 512;
    let size = image.cgpt_field(number, "-s").parse::<u64>().unwrap() * 512;
    tandem_testkit::run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-E",
            &format!("offset={start}"),
            "-d",
            root.to_str().unwrap(),
            image.path_str(),
            &(size / 4096).to_string(),
        ],
    );
}

#[test]
fn boot_files_are_read_from_the_slot_image_and_installed_on_the_esp() {
    let dir = TempDir::new("bootfiles-disk");
    let image = DiskImage::flatcar(dir.path());
    // A Debian-style root for slot B: kernel and initrd in /boot, the
    // command line in /etc/kernel/cmdline.
    let root = dir.path().join("root");
    for sub in ["boot", "etc/kernel", "usr/lib"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    let kernel = tandem_testkit::noise(7, 300_000);
    let initrd = tandem_testkit::noise(8, 100_000);
    std::fs::write(root.join("boot/vmlinuz-6.1.0-9-cloud-amd64"), &kernel).unwrap();
    std::fs::write(root.join("boot/initrd.img-6.1.0-9-cloud-amd64"), &initrd).unwrap();
    std::fs::write(
        root.join("etc/kernel/cmdline"),
        "console=ttyS0\n  panic=5\n",
    )
    .unwrap();
    std::fs::write(
        root.join("usr/lib/os-release"),
        "NAME=\"Azure Container Linux\"\n",
    )
    .unwrap();
    mkfs_into_partition(&image, 4, &root);
    let before = image.bytes();

    let esp = BindMount::new("bootfiles-esp");
    let entries = EntriesDir::new(esp.path());
    // A boots 1.0.0 from an entry of its own.
    entries
        .write("tandem-a", None, &slot_entry("1.0.0", &image.partuuid(3)))
        .unwrap();
    let disk = GptDisk::open(&image.path).unwrap();
    let slots = slots_of(&disk);
    let b = slots[1].clone();
    let files = bootconfig::bootfiles::read_from_image(&image.path, b.offset, b.size).unwrap();
    assert_eq!(files.kernel, kernel);
    assert_eq!(files.initrd.as_deref(), Some(&initrd[..]));
    assert_eq!(files.cmdline, "console=ttyS0 panic=5");

    let mut backend = BlsBackend::open(entries.clone(), slots.clone()).unwrap();
    assert!(backend.installs_boot_files());
    backend
        .install(SlotName::B, "2.0.0", &files, "root")
        .unwrap();
    assert_eq!(
        image.bytes(),
        before,
        "reading boot files writes nothing to the disk"
    );
    assert_eq!(
        std::fs::read(esp.path().join("tandem/slot-b/vmlinuz")).unwrap(),
        kernel
    );
    assert_eq!(
        std::fs::read(esp.path().join("tandem/slot-b/initrd")).unwrap(),
        initrd
    );
    // Installed but not set next: no tries, so A still boots.
    assert_eq!(backend.next_boot(), Some(SlotName::A));
    let listed = bootctl_entries(&esp.bootctl_list());
    let b_entry = listed
        .iter()
        .find(|e| e["title"].contains("2.0.0"))
        .expect("bootctl lists B's entry");
    assert_eq!(b_entry["tries"], "0 left");
    assert_eq!(b_entry["linux"], "/tandem/slot-b/vmlinuz");
    assert_eq!(
        b_entry["options"],
        format!("root=PARTUUID={} console=ttyS0 panic=5", image.partuuid(4))
    );
    assert!(b_entry["title"].starts_with("Azure Container Linux 2.0.0 (slot B)"));

    backend.set_next(SlotName::B, 1).unwrap();
    assert_eq!(backend.next_boot(), Some(SlotName::B));
    let listed = bootctl_entries(&esp.bootctl_list());
    assert!(
        listed[0]["title"].contains("2.0.0 (slot B) (default)"),
        "{listed:?}"
    );
    assert_eq!(listed[0]["tries"], "1 left");

    // Installing again replaces the files and the one entry; A's are untouched.
    let a_entries = std::fs::read_dir(entries.dir()).unwrap().count();
    backend
        .install(SlotName::B, "2.0.1", &files, "root")
        .unwrap();
    assert_eq!(std::fs::read_dir(entries.dir()).unwrap().count(), a_entries);
    assert_eq!(backend.next_boot(), Some(SlotName::A));

    // A slot without a filesystem gets a clear error.
    let a = slots[0].clone();
    let err = bootconfig::bootfiles::read_from_image(&image.path, a.offset, a.size).unwrap_err();
    assert!(err.to_string().contains("not a filesystem"), "{err}");
}

/// One boot as systemd-boot does it on the ESP: the default entry (both
/// kinds), one try spent by renaming it. Returns the version booted.
fn systemd_boot(esp: &std::path::Path) -> String {
    use bootconfig::ukidir::UkiDir;
    let (t1, t2) = (EntriesDir::new(esp), UkiDir::new(esp));
    let mut entries = t1.read().unwrap();
    entries.extend(t2.read().unwrap());
    let before = entries.clone();
    let chosen = bootconfig::bls::boot_next(&mut entries, None).expect("something boots");
    let (old, new) = (&before[chosen], &entries[chosen]);
    if old.file_name != new.file_name {
        t2.set_counter(old, new.name.counter).unwrap();
    }
    new.version.clone().unwrap()
}

#[test]
fn ukis_are_type_2_entries_with_boot_counting_rollback_to_older_and_crash_safe_writes() {
    use bootconfig::ukidir::UkiDir;
    use tandem_testkit::make_uki;
    let dir = TempDir::new("uki-disk");
    let image = DiskImage::flatcar(dir.path());
    let esp = BindMount::new("uki-esp");
    let disk = GptDisk::open(&image.path).unwrap();
    let slots = slots_of(&disk);
    let kernel = tandem_testkit::noise(1, 100_000);
    // ACL's shape: the UKI's command line is the same for both slots; the
    // slot's addon names its partitions and root hash.
    let uki = |version: &str| {
        make_uki(
            dir.path(),
            &format!("{version}.efi"),
            &format!("ID=acl\nVERSION_ID={version}\nPRETTY_NAME=\"ACL {version}\"\n"),
            "console=ttyS0 mount.usr=/dev/mapper/usr",
            Some(&kernel),
        )
    };
    let addon = |partuuid: &str, n: u32| {
        make_uki(
            dir.path(),
            &format!("{n}.addon.efi"),
            "",
            &format!(
                "systemd.verity_usr_data=PARTUUID={partuuid} usrhash={}",
                "ab".repeat(32)
            ),
            None,
        )
    };
    let mut backend = BlsBackend::open_ukis(esp.path(), slots.clone()).unwrap();
    assert_eq!(backend.name(), "uki");
    let (staged_uki, staged_addon) = backend.uki_staging(SlotName::A).unwrap();
    std::fs::create_dir_all(staged_uki.parent().unwrap()).unwrap();
    std::fs::copy(uki("4081.2.0"), &staged_uki).unwrap();
    std::fs::copy(addon(&image.partuuid(3), 3), &staged_addon).unwrap();
    backend
        .install_uki(SlotName::A, &staged_uki, Some(&staged_addon))
        .unwrap();
    let linux = esp.path().join("EFI/Linux");
    assert!(linux.join("tandem-slot-a+0.efi").is_file());
    assert!(linux
        .join("tandem-slot-a.efi.extra.d/tandem.addon.efi")
        .is_file());
    assert!(!staged_uki.exists() && !staged_addon.exists());
    backend.mark_good(SlotName::A).unwrap();

    // B gets 4081.3.0 and one try; bootctl (systemd's own parser) agrees.
    let (staged_uki, staged_addon) = backend.uki_staging(SlotName::B).unwrap();
    std::fs::copy(uki("4081.3.0"), &staged_uki).unwrap();
    std::fs::copy(addon(&image.partuuid(4), 4), &staged_addon).unwrap();
    backend
        .install_uki(SlotName::B, &staged_uki, Some(&staged_addon))
        .unwrap();
    backend.set_next(SlotName::B, 1).unwrap();
    let listed = bootctl_entries(&esp.bootctl_list());
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(
        listed[0]["title"].contains("ACL 4081.3.0 (default)"),
        "{listed:?}"
    );
    assert_eq!(listed[0]["tries"], "1 left");
    assert_eq!(
        listed[0]["type"],
        "Boot Loader Specification Type #2 (.efi)"
    );
    // bookworm's bootctl (252) predates addons, so it shows the UKI's own
    // options; tandem reads the addon's too, as systemd-stub 254+ does.
    assert_eq!(listed[0]["id"], "tandem-slot-b.efi");
    let read = bootconfig::ukidir::UkiDir::new(esp.path()).read().unwrap();
    assert!(
        read.iter().any(|e| e.file_name == "tandem-slot-b+1.efi"
            && e.options.ends_with(&format!(
                "PARTUUID={} usrhash={}",
                image.partuuid(4),
                "ab".repeat(32)
            ))),
        "{read:?}"
    );
    assert_eq!(backend.next_boot(), Some(SlotName::B));

    // B's try is spent and it never comes up: systemd-boot falls back to A.
    assert_eq!(systemd_boot(esp.path()), "4081.3.0");
    assert_eq!(systemd_boot(esp.path()), "4081.2.0");
    let backend = BlsBackend::open_ukis(esp.path(), slots.clone()).unwrap();
    assert_eq!(backend.next_boot(), Some(SlotName::A));
    assert!(linux.join("tandem-slot-b+0-1.efi").is_file());

    // B again, committed; then a rollback to the older A: B is demoted so
    // systemd-boot boots A first, and B still boots if A fails.
    let mut backend = BlsBackend::open_ukis(esp.path(), slots.clone()).unwrap();
    backend.set_next(SlotName::B, 1).unwrap();
    assert_eq!(systemd_boot(esp.path()), "4081.3.0");
    let mut backend = BlsBackend::open_ukis(esp.path(), slots.clone()).unwrap();
    backend.mark_good(SlotName::B).unwrap();
    let notes = backend.set_next(SlotName::A, 1).unwrap();
    assert!(notes.iter().any(|n| n.contains("demoted")), "{notes:?}");
    let listed = bootctl_entries(&esp.bootctl_list());
    assert!(
        listed[0]["title"].contains("ACL 4081.2.0 (default)"),
        "{listed:?}"
    );
    assert_eq!(systemd_boot(esp.path()), "4081.2.0");
    assert_eq!(systemd_boot(esp.path()), "4081.3.0", "falls back to B");

    // A power cut while A's new UKI is written: its staging file is all
    // there is. The ESP still boots B, the leftover is swept by the next
    // install, and the half-written file is never an entry.
    let mut backend = BlsBackend::open_ukis(esp.path(), slots.clone()).unwrap();
    backend.mark_good(SlotName::B).unwrap();
    backend.clear(SlotName::A).unwrap();
    let (staged_uki, _) = backend.uki_staging(SlotName::A).unwrap();
    std::fs::write(
        &staged_uki,
        &std::fs::read(uki("4081.4.0")).unwrap()[..5000],
    )
    .unwrap();
    let listed = bootctl_entries(&esp.bootctl_list());
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(listed[0]["title"].contains("4081.3.0 (default)"));
    assert!(!linux.join("tandem-slot-a.efi.extra.d").exists());
    let removed = UkiDir::new(esp.path()).sweep(&[]).unwrap();
    assert_eq!(removed, vec![staged_uki.clone()]);

    // A UKI that names neither slot is refused and not left behind.
    let stray = make_uki(
        dir.path(),
        "stray.efi",
        "ID=acl\nVERSION_ID=9\n",
        "quiet",
        Some(&kernel),
    );
    let err = backend.install_uki(SlotName::A, &stray, None).unwrap_err();
    assert!(err.to_string().contains("no boot entry"), "{err}");
    assert_eq!(UkiDir::new(esp.path()).read().unwrap().len(), 1);
}

#[test]
fn type_1_rollback_to_an_older_version_demotes_the_newer_entry() {
    let dir = TempDir::new("bls-older");
    let image = DiskImage::flatcar(dir.path());
    let esp = BindMount::new("bls-older-esp");
    let entries = EntriesDir::new(esp.path());
    entries
        .write(
            "tandem-a",
            None,
            &slot_entry("4081.2.0", &image.partuuid(3)),
        )
        .unwrap();
    entries
        .write(
            "tandem-b",
            None,
            &slot_entry("4081.3.0", &image.partuuid(4)),
        )
        .unwrap();
    let disk = GptDisk::open(&image.path).unwrap();
    let mut backend = BlsBackend::open(entries.clone(), slots_of(&disk)).unwrap();
    assert_eq!(backend.next_boot(), Some(SlotName::B));
    backend.set_next(SlotName::A, 1).unwrap();
    let listed = bootctl_entries(&esp.bootctl_list());
    assert!(
        listed[0]["title"].contains("4081.2.0 (default)"),
        "{listed:?}"
    );
    assert_eq!(listed[0]["tries"], "1 left");
    assert_eq!(listed[1]["tries"], "0 left", "B demoted: {listed:?}");
    // A fails its try: systemd-boot comes back to B.
    let mut all = entries.read().unwrap();
    let before = all.clone();
    let first = bootconfig::bls::boot_next(&mut all, None).unwrap();
    assert_eq!(before[first].version.as_deref(), Some("4081.2.0"));
    entries
        .set_counter(&before[first], all[first].name.counter)
        .unwrap();
    let all = entries.read().unwrap();
    let next = bootconfig::bls::default_entry(&all, None).unwrap();
    assert_eq!(next.version.as_deref(), Some("4081.3.0"));
}
