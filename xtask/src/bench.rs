//! `cargo xtask bench`: tandem's payloads against the tools others ship
//! updates with, on a real OS update, measured in one run.
//!
//! The trees (a debootstrapped Debian bookworm container host, and the
//! same tree after a real security update) are built once by
//! `xtask/bench/make-images.sh` and cached outside the repository, as two
//! image pairs: ext4, and erofs compressed with lz4hc level 12 (as Azure
//! Container Linux builds its `/usr`). Every contender makes its payload
//! from the same files and applies it; each result is byte-compared with
//! the new image. Times are wall clock, peak
//! RSS is GNU time's maximum resident set size of the applying process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// What the benchmark runs: debootstrap and the anchor tools.
pub const PACKAGES: [&str; 8] = [
    "debootstrap",
    "erofs-utils",
    "zstd",
    "lz4",
    "xdelta3",
    "time",
    "e2fsprogs",
    "diffutils",
];

#[derive(Debug, Serialize)]
struct Row {
    pair: &'static str,
    name: String,
    kind: &'static str,
    payload_bytes: u64,
    make_seconds: f64,
    apply_seconds: f64,
    apply_peak_rss_kib: u64,
    verifies: &'static str,
}

#[derive(Debug, Serialize)]
struct Report {
    cores: usize,
    pairs: Vec<Pair>,
    rows: Vec<Row>,
    goals: Vec<Goal>,
}

/// One source and target image, as two A/B partitions hold them.
#[derive(Debug, Serialize)]
struct Pair {
    name: &'static str,
    source_image: PathBuf,
    target_image: PathBuf,
    image_bytes: u64,
    /// The anchors that are slow and say little more on this pair are left
    /// out of it (xdelta3, lz4).
    all_contenders: bool,
}

#[derive(Debug, Serialize)]
struct Goal {
    pair: &'static str,
    goal: &'static str,
    measured: String,
    ratio: f64,
    limit: f64,
    met: bool,
}

/// Runs a command under GNU time; returns (seconds, peak RSS in KiB).
fn timed(cmd: &mut Command, what: &str) -> Result<(f64, u64)> {
    let rss_file = tempfile_path("rss");
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let started = Instant::now();
    let out = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&rss_file)
        .arg(&program)
        .args(&args)
        .output()
        .with_context(|| format!("running {what}"))?;
    let seconds = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    let rss = std::fs::read_to_string(&rss_file)
        .ok()
        .and_then(|s| s.lines().last().and_then(|l| l.trim().parse().ok()))
        .unwrap_or(0);
    let _ = std::fs::remove_file(&rss_file);
    Ok((seconds, rss))
}

fn tempfile_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tandem-bench-{tag}-{}", std::process::id()))
}

fn same_bytes(a: &Path, b: &Path) -> Result<()> {
    let status = Command::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()
        .context("running cmp")?;
    if !status.success() {
        bail!("{} differs from {}", a.display(), b.display());
    }
    Ok(())
}

fn size(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len())
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

pub fn bench(repo: &Path, cache: &Path) -> Result<()> {
    let script = repo.join("xtask/bench/make-images.sh");
    crate::run(Command::new("bash").arg(&script).arg(cache))?;
    crate::run(crate::cargo().args(["build", "--release", "--quiet", "-p", "release"]))?;
    let tool = repo.join("target/release/tandem-release");
    let work = cache.join("run");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let key = work.join("key.asc");
    let keyring = work.join("keyring.asc");
    crate::run(
        Command::new(&tool)
            .args([
                "keygen",
                "--user-id",
                "tandem bench <bench@example.invalid>",
            ])
            .arg("--secret")
            .arg(&key)
            .arg("--public")
            .arg(&keyring),
    )?;
    let mut pairs = Vec::new();
    for (name, ext, all_contenders) in [("ext4", "img", true), ("erofs lz4hc", "erofs", false)] {
        let target_image = cache.join(format!("new.{ext}"));
        pairs.push(Pair {
            name,
            source_image: cache.join(format!("old.{ext}")),
            image_bytes: size(&target_image)?,
            target_image,
            all_contenders,
        });
    }
    let mut rows = Vec::new();
    let mut goals = Vec::new();
    for pair in &pairs {
        let pair_rows = bench_pair(&tool, &work, &key, &keyring, pair)?;
        goals.extend(pair_goals(pair.name, &pair_rows)?);
        rows.extend(pair_rows);
    }
    let report = Report {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        pairs,
        rows,
        goals,
    };
    print_report(&report);
    let json_path = repo.join("target/bench/bench.json");
    if let Some(dir) = json_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(&report).context("encoding the report")?;
    std::fs::write(&json_path, json + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("\nwritten as JSON to {}", json_path.display());
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// Makes and applies every contender's payload on one image pair.
fn bench_pair(
    tool: &Path,
    work: &Path,
    key: &Path,
    keyring: &Path,
    pair: &Pair,
) -> Result<Vec<Row>> {
    let (old, new) = (&pair.source_image, &pair.target_image);
    let w = |name: &str| work.join(name);
    let mut rows = Vec::new();
    let mut measure = |name: &str,
                       kind: &'static str,
                       verifies: &'static str,
                       out: &Path,
                       make: &mut Command,
                       apply: &mut Command,
                       applied: &Path|
     -> Result<()> {
        let label = format!("{} {name}", pair.name);
        eprintln!("bench: {label}: making");
        let (make_seconds, _) = timed(make, &label)?;
        eprintln!("bench: {label}: applying");
        let _ = std::fs::remove_file(applied);
        let (apply_seconds, rss) = timed(apply, &label)?;
        same_bytes(applied, new).with_context(|| format!("{label} did not reproduce the image"))?;
        let _ = std::fs::remove_file(applied);
        let row = Row {
            pair: pair.name,
            name: name.to_owned(),
            kind,
            payload_bytes: size(out)?,
            make_seconds,
            apply_seconds,
            apply_peak_rss_kib: rss,
            verifies,
        };
        let _ = std::fs::remove_file(out);
        eprintln!(
            "bench: {label}: {} made in {:.1} s, applied in {:.1} s, peak RSS {} MiB",
            mb(row.payload_bytes),
            make_seconds,
            apply_seconds,
            rss / 1024
        );
        rows.push(row);
        Ok(())
    };
    let applied = w("applied.img");

    measure(
        "tandem delta",
        "delta",
        "signature, every blob, source and target SHA-256",
        &w("delta.tpl"),
        Command::new(tool)
            .args([
                "delta",
                "--quiet",
                "--source-version",
                "bookworm",
                "--version",
                "bookworm-updated",
            ])
            .arg("--source")
            .arg(old)
            .arg("--image")
            .arg(new)
            .arg("--key")
            .arg(key)
            .arg("-o")
            .arg(w("delta.tpl")),
        Command::new(tool)
            .args(["apply", "--quiet"])
            .arg(w("delta.tpl"))
            .arg("--keyring")
            .arg(keyring)
            .arg("--source")
            .arg(old)
            .arg("--target")
            .arg(&applied),
        &applied,
    )?;
    if pair.all_contenders {
        measure(
            "tandem full",
            "full",
            "signature, every blob, target SHA-256",
            &w("full.tpl"),
            Command::new(tool)
                .args(["full", "--quiet", "--version", "bookworm-updated"])
                .arg("--image")
                .arg(new)
                .arg("--key")
                .arg(key)
                .arg("-o")
                .arg(w("full.tpl")),
            Command::new(tool)
                .args(["apply", "--quiet"])
                .arg(w("full.tpl"))
                .arg("--keyring")
                .arg(keyring)
                .arg("--target")
                .arg(&applied),
            &applied,
        )?;
    }
    measure(
        "zstd -19 -T2 (full)",
        "full",
        "nothing (frame checksum only)",
        &w("new.img.zst"),
        Command::new("zstd")
            .args(["-q", "-f", "-19", "-T2"])
            .arg(new)
            .arg("-o")
            .arg(w("new.img.zst")),
        Command::new("zstd")
            .args(["-q", "-f", "-d"])
            .arg(w("new.img.zst"))
            .arg("-o")
            .arg(&applied),
        &applied,
    )?;
    if pair.all_contenders {
        measure(
            "lz4 -9 (full)",
            "full",
            "nothing (frame checksum only)",
            &w("new.img.lz4"),
            Command::new("lz4")
                .args(["-q", "-f", "-9"])
                .arg(new)
                .arg(w("new.img.lz4")),
            Command::new("lz4")
                .args(["-q", "-f", "-d"])
                .arg(w("new.img.lz4"))
                .arg(&applied),
            &applied,
        )?;
    }
    let patch_from = format!("--patch-from={}", old.display());
    measure(
        PATCH_FROM,
        "delta",
        "nothing (frame checksum only)",
        &w("delta.zst"),
        Command::new("zstd")
            .args(["-q", "-f", "-19", "--long=31", &patch_from])
            .arg(new)
            .arg("-o")
            .arg(w("delta.zst")),
        Command::new("zstd")
            .args(["-q", "-f", "-d", "--long=31", &patch_from])
            .arg(w("delta.zst"))
            .arg("-o")
            .arg(&applied),
        &applied,
    )?;
    if pair.all_contenders {
        measure(
            "xdelta3 -9 -B 1073741824",
            "delta",
            "nothing (Adler-32 of windows)",
            &w("delta.vcdiff"),
            Command::new("xdelta3")
                .args(["-f", "-e", "-9", "-B", "1073741824", "-s"])
                .arg(old)
                .arg(new)
                .arg(w("delta.vcdiff")),
            Command::new("xdelta3")
                .args(["-f", "-d", "-B", "1073741824", "-s"])
                .arg(old)
                .arg(w("delta.vcdiff"))
                .arg(&applied),
            &applied,
        )?;
    }
    Ok(rows)
}

const PATCH_FROM: &str = "zstd -19 --long=31 --patch-from";

/// Issue 16's goals on one pair, as ratios against anchors of the same run.
fn pair_goals(pair: &'static str, rows: &[Row]) -> Result<Vec<Goal>> {
    let row = |name: &str| rows.iter().find(|r| r.name == name);
    let (Some(td), Some(zp), Some(zf)) = (
        row("tandem delta"),
        row(PATCH_FROM),
        row("zstd -19 -T2 (full)"),
    ) else {
        bail!("a benchmark row of the {pair} pair is missing");
    };
    let goal = |goal: &'static str, measured: String, ratio: f64, limit: f64| Goal {
        pair,
        goal,
        measured,
        ratio,
        limit,
        met: ratio <= limit,
    };
    Ok(vec![
        goal(
            "delta size <= 0.5x zstd --patch-from size",
            format!("{} vs {}", mb(td.payload_bytes), mb(zp.payload_bytes)),
            td.payload_bytes as f64 / zp.payload_bytes as f64,
            0.5,
        ),
        goal(
            "delta apply time <= 2x zstd -d of the full image",
            format!("{:.2} s vs {:.2} s", td.apply_seconds, zf.apply_seconds),
            td.apply_seconds / zf.apply_seconds,
            2.0,
        ),
        goal(
            "delta apply peak RSS <= 128 MiB",
            format!("{} MiB", td.apply_peak_rss_kib / 1024),
            td.apply_peak_rss_kib as f64 / (128.0 * 1024.0),
            1.0,
        ),
        goal(
            "delta make time <= zstd -19 --patch-from make time",
            format!("{:.1} s vs {:.1} s", td.make_seconds, zp.make_seconds),
            td.make_seconds / zp.make_seconds,
            1.0,
        ),
    ])
}

fn print_report(r: &Report) {
    println!("\n{} cores", r.cores);
    for pair in &r.pairs {
        println!(
            "\n{} pair: {} -> {} ({} each)",
            pair.name,
            pair.source_image.display(),
            pair.target_image.display(),
            mb(pair.image_bytes),
        );
        println!(
            "{:<34} {:>6} {:>11} {:>9} {:>9} {:>9}  verifies",
            "payload", "kind", "size", "make s", "apply s", "RSS MiB"
        );
        for row in r.rows.iter().filter(|row| row.pair == pair.name) {
            println!(
                "{:<34} {:>6} {:>11} {:>9.1} {:>9.2} {:>9}  {}",
                row.name,
                row.kind,
                mb(row.payload_bytes),
                row.make_seconds,
                row.apply_seconds,
                row.apply_peak_rss_kib / 1024,
                row.verifies
            );
        }
    }
    println!();
    for g in &r.goals {
        println!(
            "{} {:<12} {:<52} {} (ratio {:.2}, limit {:.2})",
            if g.met { "met    " } else { "NOT MET" },
            g.pair,
            g.goal,
            g.measured,
            g.ratio,
            g.limit
        );
    }
}
