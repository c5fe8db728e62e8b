//! `cargo xtask man` and `cargo xtask install`: the manuals and shell
//! completions, generated from the programs' own clap definitions
//! (`updater::cli`, `release::cli`), and the programs installed with them.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

/// A program, its command line and its manual section.
struct Program {
    name: &'static str,
    command: clap::Command,
    /// 8 for the daemon, 1 for the commands.
    section: &'static str,
}

fn programs() -> Vec<Program> {
    vec![
        Program {
            name: "updatectl",
            command: updater::cli::updatectl::Cli::command(),
            section: "1",
        },
        Program {
            name: "tandem-release",
            command: release::cli::Cli::command(),
            section: "1",
        },
        Program {
            name: "tandemd",
            command: updater::cli::tandemd::Args::command(),
            section: "8",
        },
    ]
}

/// Where each kind of generated file goes under a prefix.
pub fn man_dir(prefix: &Path, section: &str) -> PathBuf {
    prefix.join("share/man").join(format!("man{section}"))
}

/// Writes the manuals (one page per program and per subcommand, as
/// `git` does: `updatectl-apply(1)`) and the bash, zsh and fish
/// completions under `prefix` (`share/man`, `share/bash-completion`,
/// `share/zsh/site-functions`, `share/fish/vendor_completions.d`).
/// Returns the files written.
pub fn generate(prefix: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for program in programs() {
        let mut command = program.command.clone();
        command.build();
        write_pages(
            &command,
            program.name,
            program.section,
            prefix,
            &mut written,
        )?;
        for (shell, dir, file) in [
            (
                Shell::Bash,
                "share/bash-completion/completions",
                program.name.to_owned(),
            ),
            (
                Shell::Zsh,
                "share/zsh/site-functions",
                format!("_{}", program.name),
            ),
            (
                Shell::Fish,
                "share/fish/vendor_completions.d",
                format!("{}.fish", program.name),
            ),
        ] {
            let mut text = Vec::new();
            clap_complete::generate(shell, &mut command, program.name, &mut text);
            let path = prefix.join(dir).join(file);
            write(&path, &text)?;
            written.push(path);
        }
    }
    Ok(written)
}

/// One page for `command`, named `name`, then one per subcommand
/// (`name-sub`), recursively; help subcommands are left out.
fn write_pages(
    command: &clap::Command,
    name: &str,
    section: &str,
    prefix: &Path,
    written: &mut Vec<PathBuf>,
) -> Result<()> {
    // Once built, a subcommand's display name is `parent-sub`, which the
    // page takes as its title.
    let mut text = Vec::new();
    clap_mangen::Man::new(command.clone())
        .section(section)
        .source(format!("tandem {}", env!("CARGO_PKG_VERSION")))
        .manual("tandem")
        .render(&mut text)
        .with_context(|| format!("cannot render the manual of {name}"))?;
    let path = man_dir(prefix, section).join(format!("{name}.{section}"));
    write(&path, &text)?;
    written.push(path);
    for sub in command.get_subcommands() {
        if sub.get_name() == "help" || sub.is_hide_set() {
            continue;
        }
        let sub_name = format!("{name}-{}", sub.get_name());
        write_pages(sub, &sub_name, section, prefix, written)?;
    }
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// The programs `install` copies, built in release mode.
const BINARIES: [&str; 3] = ["updatectl", "tandemd", "tandem-release"];

/// `cargo xtask man [--out DIR]`.
pub fn man_task(args: &[String]) -> Result<()> {
    let out = match args {
        [] => PathBuf::from("target/man"),
        [flag, dir] if flag == "--out" => PathBuf::from(dir),
        _ => bail!("usage: cargo xtask man [--out DIR]"),
    };
    let written = generate(&out)?;
    crate::say(&format!(
        "{} manual pages and completions written under {}",
        written.len(),
        out.display()
    ));
    Ok(())
}

/// `cargo xtask install [--prefix DIR]` (default `/usr/local`): the
/// release binaries into `DIR/bin`, the manuals and completions under
/// `DIR/share`.
pub fn install_task(args: &[String]) -> Result<()> {
    let prefix = match args {
        [] => PathBuf::from("/usr/local"),
        [flag, dir] if flag == "--prefix" => PathBuf::from(dir),
        _ => bail!("usage: cargo xtask install [--prefix DIR]"),
    };
    crate::run(crate::cargo().args([
        "build",
        "--release",
        "-p",
        "updater",
        "-p",
        "release",
        "--bins",
    ]))?;
    let bin = prefix.join("bin");
    fs::create_dir_all(&bin).with_context(|| format!("cannot create {}", bin.display()))?;
    let target = crate::target_dir();
    for name in BINARIES {
        let from = target.join("release").join(name);
        let to = bin.join(name);
        // Copied beside, then renamed: a running program keeps its file.
        let tmp = bin.join(format!(".{name}.new"));
        fs::copy(&from, &tmp)
            .with_context(|| format!("cannot copy {} to {}", from.display(), tmp.display()))?;
        fs::rename(&tmp, &to).with_context(|| format!("cannot install {}", to.display()))?;
    }
    let written = generate(&prefix)?;
    crate::say(&format!(
        "installed {} into {} and {} manual pages and completions under {}",
        BINARIES.join(", "),
        bin.display(),
        written.len(),
        prefix.join("share").display()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn man(prefix: &Path, page: &str) -> String {
        let out = Command::new("man")
            .args(["-M"])
            .arg(prefix.join("share/man"))
            .arg(page)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .output()
            .expect("man runs (Debian package man-db)");
        assert!(
            out.status.success(),
            "man {page}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn man_finds_every_program_and_subcommand_and_bash_completes_them() {
        let dir = tandem_testkit::TempDir::new("man");
        let written = generate(dir.path()).unwrap();
        assert!(written.len() > 30, "{written:?}");

        let page = man(dir.path(), "updatectl");
        assert!(
            page.contains("Drive and inspect tandem A/B updates"),
            "{page}"
        );
        assert!(page.contains("updatectl-apply(1)"), "{page}");
        let apply = man(dir.path(), "updatectl-apply");
        assert!(apply.contains("--allow-downgrade"), "{apply}");
        // Flags shared by every subcommand are on the subcommand's page too.
        assert!(apply.contains("--offline"), "{apply}");
        let slots = man(dir.path(), "updatectl-slots-set-next");
        assert!(slots.contains("--tries"), "{slots}");
        let release = man(dir.path(), "tandem-release-delta");
        assert!(release.contains("--no-recompress"), "{release}");
        let daemon = man(dir.path(), "tandemd");
        assert!(daemon.contains("The tandem update daemon"), "{daemon}");
        assert!(man_dir(dir.path(), "8").join("tandemd.8").is_file());

        // bash loads the completion and completes subcommands from it.
        let script = format!(
            "source {}; COMP_WORDS=(updatectl ap); COMP_CWORD=1; _updatectl updatectl ap updatectl; echo \"${{COMPREPLY[@]}}\"",
            dir.path()
                .join("share/bash-completion/completions/updatectl")
                .display()
        );
        let out = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        let replies = String::from_utf8_lossy(&out.stdout);
        assert!(
            replies.split_whitespace().any(|w| w == "apply"),
            "bash completion of `updatectl ap`: {replies:?} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
