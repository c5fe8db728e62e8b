//! `tandem-vm build` builds (or finds cached) the VM test images;
//! `tandem-vm boot` boots the A/B disk and prints the first report.
fn main() -> anyhow::Result<()> {
    let bins = tandem_qemu_tests::build::Binaries::in_dir(&tandem_qemu_tests::build::repo_root().join("target/debug"))?;
    let built = tandem_qemu_tests::build::build(&tandem_qemu_tests::build::default_cache(), &bins, &|s| eprintln!("{s}"))?;
    println!("{built:?}");
    if std::env::args().nth(1).as_deref() == Some("boot") {
        let dir = std::path::PathBuf::from("/tmp/tandem-vm-boot");
        let mut vm = tandem_qemu_tests::vm::Vm::new(&dir, &built, tandem_qemu_tests::vm::VmOptions { echo_console: true, ..Default::default() })?;
        vm.start()?;
        let report = vm.wait_report(&[], 1)?;
        println!("{report:#?}");
    }
    Ok(())
}
