//! `tandem-vm build`: builds (or finds cached) the VM test images and
//! prints where they are. `tandem-vm SCENARIO`: runs one scenario
//! (update, health-failure, never-boots, power-cut) with the console shown.
use anyhow::{bail, Result};
use tandem_qemu_tests::{scenario, vm::VmOptions};

fn main() -> Result<()> {
    let built = scenario::built_for_tests()?;
    let say = |s: &str| println!("==> {s}");
    let shown = VmOptions {
        echo_console: true,
        ..VmOptions::default()
    };
    match std::env::args().nth(1).as_deref().unwrap_or("build") {
        "build" => println!("{built:#?}"),
        "update" => println!("{:#?}", scenario::update(&built, shown, &say)?),
        "health-failure" => println!("{:#?}", scenario::health_failure(&built, shown, &say)?),
        "never-boots" => println!("{:#?}", scenario::never_boots(&built, shown, &say)?),
        "power-cut" => println!("{:#?}", scenario::power_cut(&built, 8 << 20, 0.4, &say)?),
        other => bail!("unknown: {other}"),
    }
    Ok(())
}
