//! `cargo xtask fuzz`: every fuzz target of `fuzz/` (cargo-fuzz, libFuzzer
//! with coverage instrumentation, on the stable toolchain) for a bounded
//! time, after replaying the saved crashes in `fuzz/regressions/`; then the
//! planted bug (`--features planted-bug`), which must be found.
//!
//! cargo-fuzz is installed once into `~/.cache/tandem-fuzz/tools` (keyed
//! by its version); the instrumented builds live in
//! `~/.cache/tandem-fuzz/target*`, and the corpus each run grows in
//! `~/.cache/tandem-fuzz/corpus`, seeded from `fuzz/corpus/`.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{cargo, repo_root, run, say};

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The targets, and the longest input each takes (a GPT image needs its
/// backup copy at the end of the disk).
pub const TARGETS: [(&str, usize); 9] = [
    ("payload_head", 16 << 10),
    ("manifest", 16 << 10),
    ("release_index", 16 << 10),
    ("gpt", 256 << 10),
    ("bls", 4 << 10),
    ("cmdline", 4 << 10),
    ("uki", 16 << 10),
    ("config", 8 << 10),
    ("annotation", 4 << 10),
];

fn cache() -> PathBuf {
    let base = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("tandem-fuzz")
}

/// `cargo fuzz`, installed into the cache if missing.
fn cargo_fuzz() -> Result<Command> {
    let root = cache().join(format!("tools-{CARGO_FUZZ_VERSION}"));
    let bin = root.join("bin");
    if !bin.join("cargo-fuzz").is_file() {
        say(&format!(
            "installing cargo-fuzz {CARGO_FUZZ_VERSION} into {}",
            root.display()
        ));
        run(cargo()
            .args([
                "install",
                "cargo-fuzz",
                "--locked",
                "--version",
                CARGO_FUZZ_VERSION,
                "--root",
            ])
            .arg(&root))?;
    }
    let path = env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![bin];
    paths.extend(env::split_paths(&path));
    let mut c = cargo();
    c.arg("fuzz")
        .env("PATH", env::join_paths(paths).context("PATH")?)
        .current_dir(repo_root().join("fuzz"));
    Ok(c)
}

/// What libFuzzer printed at the end of a run.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub runs: u64,
    pub seconds: u64,
    pub coverage: u64,
    pub features: u64,
    pub corpus: u64,
}

/// Reads libFuzzer's `#N DONE cov: X ft: Y corp: Z/...` and `Done N runs
/// in T second(s)` lines. Pure.
pub fn parse_stats(log: &str) -> Stats {
    let mut s = Stats::default();
    let after = |line: &str, key: &str| -> Option<u64> {
        let rest = if key.is_empty() {
            line
        } else {
            line.split(key).nth(1)?
        };
        rest.split(|c: char| !c.is_ascii_digit())
            .find(|w| !w.is_empty())?
            .parse()
            .ok()
    };
    for line in log.lines() {
        if line.contains(" DONE ") || line.contains("\tDONE ") {
            s.coverage = after(line, "cov: ").unwrap_or(s.coverage);
            s.features = after(line, "ft: ").unwrap_or(s.features);
            s.corpus = after(line, "corp: ").unwrap_or(s.corpus);
        }
        if let Some(rest) = line.strip_prefix("Done ") {
            s.runs = after(rest, "").unwrap_or(s.runs);
            s.seconds = after(rest, "in ").unwrap_or(s.seconds);
        }
    }
    s
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// `cargo xtask fuzz [--seconds N] [TARGET...]`.
pub fn fuzz_task(args: &[String]) -> Result<()> {
    let mut seconds = 20u64;
    let mut only = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .context("--seconds takes a number")?
            }
            t if TARGETS.iter().any(|(n, _)| *n == t) => only.push(t.to_owned()),
            other => bail!(
                "unknown argument {other:?}; usage: cargo xtask fuzz [--seconds N] [TARGET...] (targets: {})",
                TARGETS.map(|(n, _)| n).join(", ")
            ),
        }
    }
    // libFuzzer itself is C++, built by libfuzzer-sys.
    crate::ensure_packages(&["g++"])?;
    let repo = repo_root();
    let target_dir = cache().join("target");
    say("building the fuzz targets (coverage-instrumented, no sanitizer)");
    run(cargo_fuzz()?
        .args(["build", "-s", "none", "--target-dir"])
        .arg(&target_dir))?;

    let mut table = Vec::new();
    for (target, max_len) in TARGETS {
        if !only.is_empty() && !only.iter().any(|t| t == target) {
            continue;
        }
        // Saved crashes first: each must now run clean.
        let saved = files_in(&repo.join("fuzz/regressions").join(target));
        if !saved.is_empty() {
            run(cargo_fuzz()?
                .args(["run", "-s", "none", "--target-dir"])
                .arg(&target_dir)
                .arg(target)
                .args(&saved)
                .arg("--")
                .arg("-timeout=10"))
            .with_context(|| format!("a saved crash of {target} crashes again"))?;
        }
        let corpus = cache().join("corpus").join(target);
        fs::create_dir_all(&corpus)?;
        let artifacts = repo.join("fuzz/artifacts").join(target);
        fs::create_dir_all(&artifacts)?;
        say(&format!("fuzzing {target} for {seconds} s"));
        let out = cargo_fuzz()?
            .args(["run", "-s", "none", "--target-dir"])
            .arg(&target_dir)
            .arg(target)
            .arg(&corpus)
            .arg(repo.join("fuzz/corpus").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-max_len={max_len}"))
            // An input that takes this long is a finding (a hang).
            .arg("-timeout=10")
            // Feedback from how close each comparison came: solves the
            // magic values parsers check byte by byte.
            .arg("-use_value_profile=1")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1")
            .output()
            .with_context(|| format!("cannot run cargo fuzz for {target}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            eprintln!("{log}");
            bail!(
                "fuzz target {target} found a crash ({}); the input is in {}: fix the bug and move the input to fuzz/regressions/{target}/, where it is replayed on every run",
                out.status,
                artifacts.display()
            );
        }
        let s = parse_stats(&log);
        if s.runs == 0 {
            eprintln!("{log}");
            bail!("fuzz target {target} ran no input");
        }
        table.push((target, s));
    }

    // The planted bug must be found, or the harness proves nothing.
    if only.is_empty() {
        let planted_dir = cache().join("target-planted");
        let artifacts = cache().join("planted-artifacts");
        // A fresh corpus each time, so that it is found from the seeds
        // (libFuzzer adds what it finds to its first corpus folder, never
        // to the repository's seeds).
        let planted_corpus = cache().join("planted-corpus");
        for dir in [&artifacts, &planted_corpus] {
            let _ = fs::remove_dir_all(dir);
            fs::create_dir_all(dir)?;
        }
        say("fuzzing cmdline with the planted bug (it must be found)");
        let out = cargo_fuzz()?
            .args([
                "run",
                "-s",
                "none",
                "--features",
                "planted-bug",
                "--target-dir",
            ])
            .arg(&planted_dir)
            .arg("cmdline")
            .arg(&planted_corpus)
            .arg(repo.join("fuzz/corpus/cmdline"))
            .arg("--")
            .arg("-max_total_time=300")
            .arg("-use_value_profile=1")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-runs=100000000")
            .output()
            .context("cannot run cargo fuzz with the planted bug")?;
        let log = String::from_utf8_lossy(&out.stderr);
        let found = files_in(&artifacts);
        if out.status.success() || !log.contains("planted bug reached") || found.is_empty() {
            eprintln!("{log}");
            bail!("the planted bug was not found: the fuzzing harness does not work");
        }
        let s = parse_stats(&log);
        let input = fs::read(&found[0]).unwrap_or_default();
        say(&format!(
            "the planted bug was found after {} runs: input {:?}",
            log.lines()
                .filter_map(|l| l.strip_prefix('#'))
                .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                .max()
                .unwrap_or(s.runs),
            String::from_utf8_lossy(&input)
        ));
    }

    println!("| target | runs | runs/s | coverage (edges) | features | corpus |");
    println!("|---|---|---|---|---|---|");
    for (target, s) in &table {
        println!(
            "| {target} | {} | {} | {} | {} | {} |",
            s.runs,
            s.runs / s.seconds.max(1),
            s.coverage,
            s.features,
            s.corpus
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzer_final_lines_are_read() {
        let log = "#2\tINITED cov: 40 ft: 41 corp: 1/1b exec/s: 0 rss: 30Mb\n\
                   #524288\tpulse  cov: 812 ft: 2930 corp: 300/20Kb lim: 4096 exec/s: 26214 rss: 60Mb\n\
                   #531001\tDONE   cov: 815 ft: 2941 corp: 305/21Kb lim: 4096 exec/s: 25285 rss: 61Mb\n\
                   Done 531001 runs in 21 second(s)\n";
        assert_eq!(
            parse_stats(log),
            Stats {
                runs: 531001,
                seconds: 21,
                coverage: 815,
                features: 2941,
                corpus: 305,
            }
        );
        assert_eq!(parse_stats("nothing"), Stats::default());
    }
}
