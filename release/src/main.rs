//! `tandem-release`: makes, signs, inspects, verifies and (offline) applies
//! tandem payloads. A thin CLI over the `payload` crate.

use std::fs::File;
use std::io::{BufReader, IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use payload::apply::{ApplyProgress, Phase};
use payload::make::{ComponentInput, MakeProgress};
use payload::{
    ApplyOptions, ApplyOutcome, ComponentPaths, Keyring, MakeOptions, PayloadHead, SigningKey,
};
use release::cli::{
    ApplyArgs, Artifacts, Cli, Command, IndexCommand, InspectArgs, KeygenArgs, MakeCommon,
    SourceArtifacts, VerifyArgs,
};
use serde::Serialize;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) if !error.use_stderr() => error.exit(),
        Err(error) => {
            let text = error.to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!("tandem-release: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Full(a) => make(
            None,
            &a.image,
            &a.version,
            &a.artifacts,
            &SourceArtifacts::default(),
            &a.common,
        ),
        Command::Delta(a) => make(
            Some((&a.source, &a.source_version)),
            &a.image,
            &a.version,
            &a.artifacts,
            &a.sources,
            &a.common,
        ),
        Command::Inspect(a) => inspect(&a),
        Command::Verify(a) => verify(&a),
        Command::Apply(a) => apply(&a),
        Command::Keygen(a) => keygen(&a),
        Command::Index(c) => index_command(c),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tandem-release: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints progress lines to stderr at most every half second (or every
/// ten seconds when stderr is not a terminal).
struct Reporter {
    enabled: bool,
    terminal: bool,
    last: Mutex<Option<Instant>>,
}

impl Reporter {
    fn new(quiet: bool) -> Reporter {
        Reporter {
            enabled: !quiet,
            terminal: std::io::stderr().is_terminal(),
            last: Mutex::new(None),
        }
    }

    fn report(&self, line: impl FnOnce() -> String, force: bool) {
        if !self.enabled {
            return;
        }
        let every = if self.terminal {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(10)
        };
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        if !force && last.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        *last = Some(Instant::now());
        if self.terminal {
            eprint!("\r\x1b[K{}", line());
        } else {
            eprintln!("{}", line());
        }
    }

    fn finish(&self) {
        if self.enabled && self.terminal && self.last.lock().is_ok_and(|l| l.is_some()) {
            eprintln!();
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn percent(done: u64, total: u64) -> f64 {
    if total == 0 {
        100.0
    } else {
        done as f64 * 100.0 / total as f64
    }
}

#[derive(Debug, Serialize)]
struct MakeSummary {
    payload: PathBuf,
    payload_bytes: u64,
    kind: &'static str,
    target_version: String,
    source_version: Option<String>,
    signer: String,
    seconds: f64,
    /// The hash tree's root hash, checked against the UKI's `usrhash=`.
    verity_root_hash: Option<String>,
    components: Vec<payload::summary::ComponentSummary>,
}

/// Checks, before anything is signed, that the slot's parts agree: the
/// hash tree matches the image and its root hash is the `usrhash=` the UKI
/// and addon name. Returns the root hash, if there is a tree.
fn check_artifacts(image: &Path, artifacts: &Artifacts) -> Result<Option<String>> {
    use bootconfig::uki;
    let read = |path: &Path, kernel: bool| -> Result<uki::UkiInfo> {
        let info = uki::read_uki(path)?;
        if info.has_kernel != kernel {
            bail!(
                "{}: {}",
                path.display(),
                if kernel {
                    "not a UKI (no .linux section)"
                } else {
                    "not an addon (it has a .linux section: a UKI)"
                }
            );
        }
        Ok(info)
    };
    let uki_info = artifacts
        .uki
        .as_deref()
        .map(|p| read(p, true))
        .transpose()?;
    let addons: Vec<uki::UkiInfo> = artifacts
        .addon
        .as_deref()
        .map(|p| read(p, false))
        .transpose()?
        .into_iter()
        .collect();
    let named = match &artifacts.kernel {
        Some(kernel) => {
            let bytes =
                std::fs::read(kernel).with_context(|| format!("reading {}", kernel.display()))?;
            bootconfig::flatcar::kernel_usrhash(&bytes)
        }
        None => uki_info
            .as_ref()
            .and_then(|u| uki::usrhash(&uki::combined_cmdline(u, &addons))),
    };
    let Some(hash_path) = &artifacts.verity_hash else {
        if let Some(named) = named {
            bail!(
                "the boot artifact names usrhash={named} but no --verity-hash was given to check it against"
            );
        }
        return Ok(None);
    };
    let open = |p: &Path| File::open(p).with_context(|| format!("opening {}", p.display()));
    let (data, hash) = (open(image)?, open(hash_path)?);
    fn area<'a>(f: &'a File, p: &Path) -> Result<payload::verity::Area<'a, File>> {
        Ok(payload::verity::Area {
            file: f,
            offset: 0,
            len: f
                .metadata()
                .with_context(|| format!("sizing {}", p.display()))?
                .len(),
        })
    }
    let verified = payload::verity::verify(area(&data, image)?, area(&hash, hash_path)?)
        .with_context(|| {
            format!(
                "checking {} against {}",
                hash_path.display(),
                image.display()
            )
        })?;
    let root = verified.root_hash_hex();
    match (&artifacts.uki, &artifacts.kernel, named) {
        (Some(uki), _, None) => bail!(
            "{} (with its addon) names no usrhash=: a node could not check the slot's hash tree (root hash {root})",
            uki.display()
        ),
        (_, Some(kernel), None) => bail!(
            "{} carries no root hash (64 hex digits at byte 0x40, or 512 on arm64, where Flatcar's GRUB reads it): a node could not check the slot's hash tree (root hash {root})",
            kernel.display()
        ),
        (Some(_), _, Some(named)) if !named.eq_ignore_ascii_case(&root) => bail!(
            "the UKI and addon name usrhash={named}, but the hash tree's root hash is {root}: refusing to sign a slot that would not boot"
        ),
        (_, Some(_), Some(named)) if !named.eq_ignore_ascii_case(&root) => bail!(
            "the kernel carries root hash {named}, but the hash tree's root hash is {root}: refusing to sign a slot that would not boot"
        ),
        _ => {}
    }
    Ok(Some(root))
}

fn make(
    source: Option<(&PathBuf, &String)>,
    image: &Path,
    version: &str,
    artifacts: &Artifacts,
    sources: &SourceArtifacts,
    common: &MakeCommon,
) -> Result<()> {
    let started = Instant::now();
    let root_hash = check_artifacts(image, artifacts)?;
    let key = SigningKey::from_file(&common.key)?;
    let mut opts = MakeOptions {
        level: common.level,
        component: common.component.clone(),
        bsdiff: !common.no_bsdiff,
        recompress: !common.no_recompress,
        ..MakeOptions::default()
    };
    if let Some(t) = common.threads {
        opts.threads = t.max(1);
    }
    let reporter = Reporter::new(common.quiet);
    let progress = |p: MakeProgress| {
        reporter.report(
            || format!("{}: {:.0}%", p.phase, percent(p.done, p.total)),
            false,
        )
    };
    let mut inputs = vec![ComponentInput {
        name: common.component.clone(),
        target: image.to_path_buf(),
        source: source.map(|(path, _)| path.clone()),
        file: false,
    }];
    let parts = [
        (
            "verity",
            &artifacts.verity_hash,
            &sources.source_verity_hash,
        ),
        ("uki", &artifacts.uki, &sources.source_uki),
        ("addon", &artifacts.addon, &sources.source_addon),
        ("kernel", &artifacts.kernel, &sources.source_kernel),
    ];
    for (name, target, from) in parts {
        if from.is_some() && (target.is_none() || source.is_none()) {
            bail!("--source-{name} is for a delta whose new release has the {name} too");
        }
        if let Some(target) = target {
            inputs.push(ComponentInput {
                name: name.into(),
                target: target.clone(),
                source: from.clone(),
                file: name != "verity",
            });
        }
    }
    let manifest = payload::make::make_components(
        &inputs,
        version,
        source.map(|(_, v)| v.as_str()),
        &key,
        &opts,
        &common.output,
        &progress,
    )
    .with_context(|| format!("making {}", common.output.display()))?;
    reporter.finish();
    let summary = MakeSummary {
        payload: common.output.clone(),
        payload_bytes: std::fs::metadata(&common.output)
            .with_context(|| format!("reading {}", common.output.display()))?
            .len(),
        kind: if manifest.is_delta() { "delta" } else { "full" },
        target_version: manifest.target_version.clone(),
        source_version: manifest.source_version.clone(),
        signer: key.fingerprint().to_owned(),
        seconds: started.elapsed().as_secs_f64(),
        verity_root_hash: root_hash,
        components: payload::summary::summarize(&manifest),
    };
    if common.json {
        print_json(&summary)
    } else {
        println!(
            "wrote {} ({} payload, {}, {} bytes) in {:.1} s",
            summary.payload.display(),
            summary.kind,
            mib(summary.payload_bytes),
            summary.payload_bytes,
            summary.seconds
        );
        print_components(&summary.components);
        Ok(())
    }
}

fn print_json<T: Serialize>(value: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value).context("writing JSON")?;
    writeln!(out).context("writing JSON")?;
    Ok(())
}

fn print_components(components: &[payload::summary::ComponentSummary]) {
    for c in components {
        println!(
            "component {}: target {} sha256 {}",
            c.name,
            mib(c.target_size),
            c.target_sha256
        );
        if let (Some(size), Some(sha)) = (c.source_size, &c.source_sha256) {
            println!("  source {} sha256 {sha}", mib(size));
        }
        println!(
            "  {:<10} {:>8} {:>14} {:>14}",
            "op", "count", "target", "blob"
        );
        for (name, s) in [
            ("zero", c.zero),
            ("copy", c.copy),
            ("data", c.data),
            ("patch", c.patch),
            ("bsdiff", c.bsdiff),
            ("recompress", c.recompress),
            ("erofs", c.erofs),
        ] {
            println!(
                "  {:<10} {:>8} {:>14} {:>14}",
                name,
                s.operations,
                mib(s.target_bytes),
                mib(s.blob_bytes)
            );
        }
    }
}

#[derive(Debug, Serialize)]
struct InspectReport {
    payload_bytes: u64,
    format_version: u32,
    kind: &'static str,
    target_version: String,
    source_version: Option<String>,
    manifest_bytes: u64,
    signature_bytes: u64,
    data_bytes: u64,
    /// The issuer the signature names (not verified by inspect).
    signer_fingerprint: Option<String>,
    components: Vec<payload::summary::ComponentSummary>,
}

fn open_payload(path: &Path) -> Result<BufReader<File>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(BufReader::with_capacity(1 << 20, file))
}

fn inspect(args: &InspectArgs) -> Result<()> {
    let mut reader = open_payload(&args.payload)?;
    let head = PayloadHead::read_unverified(&mut reader)
        .with_context(|| format!("reading {}", args.payload.display()))?;
    if let Some(path) = &args.write_manifest {
        std::fs::write(path, &head.manifest_bytes)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.write_signature {
        std::fs::write(path, &head.signature)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let report = InspectReport {
        payload_bytes: reader.get_ref().metadata().map(|m| m.len()).unwrap_or(0),
        format_version: head.manifest.format_version,
        kind: if head.manifest.is_delta() {
            "delta"
        } else {
            "full"
        },
        target_version: head.manifest.target_version.clone(),
        source_version: head.manifest.source_version.clone(),
        manifest_bytes: head.header.manifest_len,
        signature_bytes: head.header.signature_len,
        data_bytes: head.header.data_len,
        signer_fingerprint: payload::sign::signature_issuer(&head.signature),
        components: payload::summary::summarize(&head.manifest),
    };
    if args.json {
        return print_json(&report);
    }
    println!(
        "{} payload, format {}: version {}{}",
        report.kind,
        report.format_version,
        report.target_version,
        report
            .source_version
            .as_ref()
            .map(|v| format!(" from {v}"))
            .unwrap_or_default()
    );
    println!(
        "size {} (manifest {} bytes, signature {} bytes, data {})",
        mib(report.payload_bytes),
        report.manifest_bytes,
        report.signature_bytes,
        mib(report.data_bytes)
    );
    println!(
        "signed by {} (not verified; use `tandem-release verify`)",
        report.signer_fingerprint.as_deref().unwrap_or("unknown")
    );
    print_components(&report.components);
    Ok(())
}

fn load_keyring(paths: &[PathBuf]) -> Result<Keyring> {
    let mut ring = Keyring::default();
    for p in paths {
        ring.extend(
            Keyring::from_file(p).with_context(|| format!("loading keyring {}", p.display()))?,
        );
    }
    Ok(ring)
}

#[derive(Debug, Serialize)]
struct VerifyReport {
    payload: PathBuf,
    valid: bool,
    signer: String,
    kind: &'static str,
    target_version: String,
    source_version: Option<String>,
}

fn verify(args: &VerifyArgs) -> Result<()> {
    let keyring = load_keyring(&args.keyring)?;
    let mut reader = open_payload(&args.payload)?;
    let head = payload::container::verify_stream(&mut reader, &keyring)
        .with_context(|| format!("{} is not valid", args.payload.display()))?;
    let report = VerifyReport {
        payload: args.payload.clone(),
        valid: true,
        signer: head.signer.clone().unwrap_or_default(),
        kind: if head.manifest.is_delta() {
            "delta"
        } else {
            "full"
        },
        target_version: head.manifest.target_version.clone(),
        source_version: head.manifest.source_version.clone(),
    };
    if args.json {
        return print_json(&report);
    }
    println!(
        "{}: valid {} payload for version {}, signed by {}",
        args.payload.display(),
        report.kind,
        report.target_version,
        report.signer
    );
    Ok(())
}

/// Splits `NAME=PATH`; a bare PATH belongs to the component `usr`.
fn component_path(spec: &str) -> (String, PathBuf) {
    match spec.split_once('=') {
        Some((name, path)) if !name.is_empty() && !name.contains('/') => {
            (name.to_owned(), PathBuf::from(path))
        }
        _ => ("usr".to_owned(), PathBuf::from(spec)),
    }
}

#[derive(Debug, Serialize)]
struct ApplySummary {
    outcome: &'static str,
    seconds: f64,
    #[serde(flatten)]
    report: Option<payload::apply::ApplyReport>,
    checkpoint: Option<payload::Checkpoint>,
}

fn apply(args: &ApplyArgs) -> Result<()> {
    let started = Instant::now();
    let keyring = load_keyring(&args.keyring)?;
    let mut paths: Vec<ComponentPaths> = Vec::new();
    for spec in &args.target {
        let (component, target) = component_path(spec);
        if paths.iter().any(|p| p.component == component) {
            bail!("--target given twice for component {component}");
        }
        if !target.exists() {
            File::create(&target).with_context(|| format!("creating {}", target.display()))?;
        }
        paths.push(ComponentPaths {
            component,
            target,
            target_range: None,
            source: None,
            source_range: None,
        });
    }
    for spec in &args.source {
        let (component, source) = component_path(spec);
        let Some(p) = paths.iter_mut().find(|p| p.component == component) else {
            bail!("--source for component {component}, which has no --target");
        };
        p.source = Some(source);
    }
    let mut opts = ApplyOptions {
        checkpoint: args.checkpoint.clone(),
        checkpoint_every: args.checkpoint_mib << 20,
        ..ApplyOptions::default()
    };
    if let Some(t) = args.threads {
        opts.threads = t.max(1);
    }
    let reporter = Reporter::new(args.quiet);
    let stop_after = args.stop_after;
    let mut control = |p: &ApplyProgress| {
        let phase = match p.phase {
            Phase::VerifyingSource => "verifying source",
            Phase::Writing => "writing",
            Phase::VerifyingTarget => "reading back",
        };
        reporter.report(
            || {
                format!(
                    "{phase}: {:.0}% ({} of {})",
                    percent(p.done_bytes, p.total_bytes),
                    mib(p.done_bytes),
                    mib(p.total_bytes)
                )
            },
            p.phase != Phase::Writing,
        );
        match stop_after {
            Some(limit) if p.phase == Phase::Writing && p.done_bytes >= limit => {
                ControlFlow::Break(())
            }
            _ => ControlFlow::Continue(()),
        }
    };
    let reader = open_payload(&args.payload)?;
    let outcome = payload::apply(reader, &keyring, &paths, &opts, &mut control)
        .with_context(|| format!("applying {}", args.payload.display()))?;
    reporter.finish();
    let summary = match outcome {
        ApplyOutcome::Complete(report) => ApplySummary {
            outcome: "complete",
            seconds: started.elapsed().as_secs_f64(),
            report: Some(report),
            checkpoint: None,
        },
        ApplyOutcome::Stopped(cp) => ApplySummary {
            outcome: "stopped",
            seconds: started.elapsed().as_secs_f64(),
            report: None,
            checkpoint: Some(cp),
        },
    };
    if args.json {
        return print_json(&summary);
    }
    match (&summary.report, &summary.checkpoint) {
        (Some(r), _) => println!(
            "applied version {}: {} written and read back as signed (signer {}){} in {:.1} s",
            r.target_version,
            mib(r.bytes_written),
            r.signer,
            if r.resumed_at_op > 0 {
                format!(", resumed at operation {}", r.resumed_at_op)
            } else {
                String::new()
            },
            summary.seconds
        ),
        (None, Some(cp)) => println!(
            "stopped at operation {} ({} written); run the same command to resume",
            cp.next_op,
            mib(cp.done_bytes)
        ),
        (None, None) => {}
    }
    Ok(())
}

fn keygen(args: &KeygenArgs) -> Result<()> {
    let (secret, public) = payload::sign::generate_key(&args.user_id)?;
    use std::os::unix::fs::OpenOptionsExt;
    for (path, text, mode) in [(&args.secret, secret, 0o600), (&args.public, public, 0o644)] {
        // create_new: never overwrite a key.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        file.write_all(text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "wrote secret key {} and public certificate {}",
        args.secret.display(),
        args.public.display()
    );
    Ok(())
}

fn load_index(path: &Path) -> Result<payload::index::ReleaseIndex> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    payload::index::ReleaseIndex::parse(&bytes)
        .with_context(|| format!("reading {}", path.display()))
}

/// Writes a file atomically (temporary file, fsync, rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    payload::files::write_atomic(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Size, SHA-256 and manifest of a payload file (its head is read, not trusted).
fn describe_payload(
    path: &Path,
    prefix: &str,
) -> Result<(payload::index::PayloadRef, payload::Manifest)> {
    use std::io::Read;
    let mut reader = open_payload(path)?;
    let head = PayloadHead::read_unverified(&mut reader)
        .with_context(|| format!("reading {}", path.display()))?;
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = payload::digest::Sha256Stream::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("payload path has no file name")?;
    Ok((
        payload::index::PayloadRef {
            url: format!("{prefix}{name}"),
            size,
            sha256: hasher.finish(),
            manifest_sha256: payload::digest::sha256(&head.manifest_bytes),
        },
        head.manifest,
    ))
}

fn index_command(command: IndexCommand) -> Result<()> {
    use payload::index::{format_time, DeltaRef, Release, ReleaseIndex, Rollout};
    match command {
        IndexCommand::Add(a) => {
            let mut index = if a.index.exists() {
                load_index(&a.index)?
            } else {
                ReleaseIndex::new(&a.channel)
            };
            let (full, manifest) = describe_payload(&a.full, &a.url_prefix)?;
            if manifest.is_delta() {
                bail!(
                    "{} is a delta; --full needs a full payload",
                    a.full.display()
                );
            }
            let version = manifest.target_version.clone();
            if index.release(&version).is_some() {
                bail!(
                    "version {version} is already in {}; remove it first",
                    a.index.display()
                );
            }
            let mut deltas = Vec::new();
            for d in &a.delta {
                let (r, m) = describe_payload(d, &a.url_prefix)?;
                let Some(source_version) = m.source_version.clone() else {
                    bail!("{} is a full payload; --delta needs a delta", d.display());
                };
                if m.target_version != version {
                    bail!(
                        "{} makes version {}, not {version}",
                        d.display(),
                        m.target_version
                    );
                }
                deltas.push(DeltaRef {
                    source_version,
                    url: r.url,
                    size: r.size,
                    sha256: r.sha256,
                    manifest_sha256: r.manifest_sha256,
                });
            }
            let now = std::time::SystemTime::now();
            let rollout = match (a.rollout_start, a.rollout_hours) {
                (None, None) => None,
                (start, hours) => Some(Rollout {
                    start: start.unwrap_or_else(|| format_time(now)),
                    duration_seconds: hours.unwrap_or(0) * 3600,
                }),
            };
            index.releases.push(Release {
                version: version.clone(),
                published: format_time(now),
                full,
                deltas,
                rollout,
                barrier: a.barrier,
            });
            index.check().context("the new entry is not valid")?;
            write_atomic(&a.index, &index.to_bytes())?;
            println!(
                "added {version} to {} (sign it to publish)",
                a.index.display()
            );
        }
        IndexCommand::Remove {
            index: path,
            version,
        } => {
            let mut index = load_index(&path)?;
            let before = index.releases.len();
            index.releases.retain(|r| r.version != version);
            if index.releases.len() == before {
                bail!("version {version} is not in {}", path.display());
            }
            write_atomic(&path, &index.to_bytes())?;
            println!(
                "removed {version} from {} (sign it to publish)",
                path.display()
            );
        }
        IndexCommand::Sign {
            index: path,
            key,
            expires_in_days,
        } => {
            let key = SigningKey::from_file(&key)?;
            let mut index = load_index(&path)?;
            let now = std::time::SystemTime::now();
            // Serials only grow: at least the previous one plus one, and
            // the time in seconds, so two release machines rarely collide.
            let clock = now
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            index.serial = (index.serial + 1).max(clock);
            index.expires = format_time(now + Duration::from_secs(expires_in_days * 86400));
            let bytes = index.to_bytes();
            let signature = key.sign_detached(&bytes)?;
            let sig_path = PathBuf::from(format!("{}.sig", path.display()));
            write_atomic(&path, &bytes)?;
            write_atomic(&sig_path, &signature)?;
            println!(
                "signed {} (serial {}, expires {}) by {}; signature in {}",
                path.display(),
                index.serial,
                index.expires,
                key.fingerprint(),
                sig_path.display()
            );
        }
        IndexCommand::Show {
            index: path,
            keyring,
            json,
        } => {
            let index = if keyring.is_empty() {
                load_index(&path)?
            } else {
                let ring = load_keyring(&keyring)?;
                let bytes =
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                let sig_path = PathBuf::from(format!("{}.sig", path.display()));
                let sig = std::fs::read(&sig_path)
                    .with_context(|| format!("reading {}", sig_path.display()))?;
                payload::index::verify_index(
                    &bytes,
                    &sig,
                    &ring,
                    std::time::SystemTime::now(),
                    None,
                )
                .with_context(|| format!("checking {}", path.display()))?
            };
            if json {
                return print_json(&index);
            }
            println!(
                "channel {}, serial {}, expires {}{}",
                index.channel,
                index.serial,
                index.expires,
                if keyring.is_empty() {
                    " (signature not checked)"
                } else {
                    " (signature valid)"
                }
            );
            for r in &index.releases {
                println!(
                    "{}{}: full {} ({}){}",
                    r.version,
                    if r.barrier { " [barrier]" } else { "" },
                    r.full.url,
                    mib(r.full.size),
                    r.rollout
                        .as_ref()
                        .map(|ro| format!(
                            ", rollout from {} over {} h",
                            ro.start,
                            ro.duration_seconds / 3600
                        ))
                        .unwrap_or_default()
                );
                for d in &r.deltas {
                    println!(
                        "    delta from {}: {} ({})",
                        d.source_version,
                        d.url,
                        mib(d.size)
                    );
                }
            }
        }
    }
    Ok(())
}
