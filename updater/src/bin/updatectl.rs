//! `updatectl`: the operator's CLI for tandem.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use bootconfig::{Guid, SlotLayout, SlotName};
use clap::{Args, Parser, Subcommand};
use updater::client::{self, Request};
use updater::slotctl::{self, Action, Target};

#[derive(Debug, Parser)]
#[command(
    name = "updatectl",
    version,
    about = "Drive and inspect tandem A/B updates"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Run the engine in this process instead of asking tandemd (rescue,
    /// image building); takes the same lock, so not while tandemd runs.
    #[arg(long, global = true)]
    offline: bool,
    /// With --offline: read the configuration under this root.
    #[arg(long, global = true, default_value = "/", value_name = "DIR")]
    root: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the booted and other slot, the staged update, the state,
    /// progress, last check and last error.
    Status {
        /// Print the versioned JSON status document.
        #[arg(long)]
        json: bool,
    },
    /// Check the release index for an update (does not install it).
    Check {
        #[arg(long)]
        json: bool,
    },
    /// Install an update into the other slot and set it to boot next
    /// (stage, then finalize; the reboot strategy then applies).
    Apply {
        /// The version to install (default: the newest this node may take).
        version: Option<String>,
        /// Install this payload (URL or file) instead of asking the index.
        #[arg(long, value_name = "URL|FILE", conflicts_with = "version")]
        payload: Option<String>,
        /// Allow installing a version older than the booted one.
        #[arg(long)]
        allow_downgrade: bool,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write and verify an update into the other slot without setting it
    /// to boot: an unplanned reboot still boots the running image.
    Stage {
        /// The version to stage (default: the newest this node may take).
        version: Option<String>,
        /// Stage this payload (URL or file) instead of asking the index.
        #[arg(long, value_name = "URL|FILE", conflicts_with = "version")]
        payload: Option<String>,
        /// Allow staging a version older than the booted one.
        #[arg(long)]
        allow_downgrade: bool,
        /// Print the status document as JSON when done.
        #[arg(long)]
        json: bool,
    },
    /// Read the staged slot back once more, set it to boot next and reboot
    /// through the reboot action.
    Finalize {
        /// Set it next but leave the reboot to the reboot strategy.
        #[arg(long)]
        no_reboot: bool,
        /// Print the status document as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop the check or update under way.
    Cancel,
    /// Show what the engine did, oldest first.
    History {
        #[arg(long)]
        json: bool,
    },
    /// Boot the other slot next, when it is marked good (the reboot
    /// strategy then applies, as to an update).
    Rollback,
    /// Mark the booted slot good (ends its assessment).
    MarkGood,
    /// Mark the booted slot bad: the other slot boots next (no reboot).
    MarkBad,
    /// Show this boot's health assessment and the checks' results.
    Health {
        #[arg(long)]
        json: bool,
        /// Wait until the assessment is over; fail when it failed (for
        /// tandem-health.service, before boot-complete.target).
        #[arg(long)]
        wait: bool,
    },
    /// Print the Prometheus metrics (text format).
    Metrics,
    /// Show the A/B slots of a disk and change which one boots next
    /// (daemon-free, like cgpt or bootctl).
    Slots(SlotsArgs),
}

#[derive(Debug, Args)]
struct SlotsArgs {
    #[command(subcommand)]
    action: Option<SlotAction>,
    /// Disk (block device or image file); default: the disk holding the booted slot.
    #[arg(long, global = true, value_name = "PATH")]
    disk: Option<PathBuf>,
    /// Use the BLS backend (systemd-boot) with the ESP mounted here,
    /// instead of GPT gptprio attributes.
    #[arg(long, global = true, value_name = "DIR")]
    esp: Option<PathBuf>,
    /// With --esp: the slots boot UKIs in the ESP's EFI/Linux (type #2
    /// entries, ACL's layout) instead of type #1 entries.
    #[arg(long, global = true, requires = "esp")]
    ukis: bool,
    /// gptprio on Flatcar's layout: the ESP mounted here holds the slots'
    /// kernels at flatcar/vmlinuz-a|b (shown with their root hashes).
    #[arg(long, global = true, value_name = "DIR", conflicts_with = "esp")]
    kernels: Option<PathBuf>,
    /// Flatcar's layout: each slot keeps its dm-verity hash tree inside
    /// it from this byte offset (slots.hash = "in-slot").
    #[arg(long, global = true, value_name = "BYTES")]
    hash_offset: Option<u64>,
    /// Print a machine-readable JSON document.
    #[arg(long, global = true)]
    json: bool,
    /// GPT label of slot A.
    #[arg(long, global = true, default_value = "USR-A", value_name = "LABEL")]
    label_a: String,
    /// GPT label of slot B.
    #[arg(long, global = true, default_value = "USR-B", value_name = "LABEL")]
    label_b: String,
    /// Partition type GUID both slots must have (default: Flatcar /usr).
    #[arg(long = "type", global = true, value_name = "GUID")]
    type_guid: Option<Guid>,
    /// Kernel command line to find the booted slot in.
    #[arg(
        long,
        global = true,
        default_value = "/proc/cmdline",
        value_name = "FILE"
    )]
    cmdline: PathBuf,
    /// The booted slot, when the command line does not tell (image building, rescue).
    #[arg(long, global = true, value_name = "A|B")]
    booted: Option<SlotName>,
}

#[derive(Debug, Subcommand)]
enum SlotAction {
    /// Boot SLOT next, on trial: above the other slot, N tries, not successful.
    SetNext {
        slot: SlotName,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=15))]
        tries: u8,
    },
    /// Mark SLOT good: successful, no tries left.
    MarkGood { slot: SlotName },
    /// Mark SLOT bad: it never boots again until set next; the other boots first.
    MarkBad { slot: SlotName },
    /// Undo a set-next of the slot that is not booted.
    Cancel,
}

fn slots(args: SlotsArgs) -> Result<()> {
    let mut layout = SlotLayout {
        labels: [args.label_a, args.label_b],
        ..SlotLayout::default()
    };
    if let Some(type_guid) = args.type_guid {
        layout.type_guid = type_guid;
    }
    if let Some(offset) = args.hash_offset {
        layout.hash = bootconfig::HashLayout::InSlot { offset };
    }
    let target = Target {
        disk: args.disk,
        esp: args.esp,
        ukis: args.ukis,
        kernels: args.kernels,
        layout,
        cmdline: args.cmdline,
        booted: args.booted,
    };
    let action = args.action.map(|action| match action {
        SlotAction::SetNext { slot, tries } => Action::SetNext { slot, tries },
        SlotAction::MarkGood { slot } => Action::MarkGood(slot),
        SlotAction::MarkBad { slot } => Action::MarkBad(slot),
        SlotAction::Cancel => Action::Cancel,
    });
    let report = match action {
        None => slotctl::report(&target)?,
        Some(action) => {
            let (notes, report) = slotctl::apply(&target, action)?;
            for note in notes {
                eprintln!("updatectl: repaired: {note}");
            }
            report
        }
    };
    let text = if args.json {
        let mut text = serde_json::to_string_pretty(&report).context("cannot encode the report")?;
        text.push('\n');
        text
    } else {
        slotctl::render(&report)
    };
    client::write_out(&text)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) if !error.use_stderr() => error.exit(), // --help, --version
        Err(error) => {
            // One line, like every other error; `--help` has the rest.
            let text = error.to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!("updatectl: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Slots(args) => slots(args),
        Command::Status { json } => client::run(Request::Status { json }, cli.offline, &cli.root),
        Command::Check { json } => client::run(Request::Check { json }, cli.offline, &cli.root),
        Command::Apply {
            version,
            payload,
            allow_downgrade,
            json,
        } => client::run(
            Request::Apply {
                version,
                payload,
                allow_downgrade,
                stage_only: false,
                json,
            },
            cli.offline,
            &cli.root,
        ),
        Command::Stage {
            version,
            payload,
            allow_downgrade,
            json,
        } => client::run(
            Request::Apply {
                version,
                payload,
                allow_downgrade,
                stage_only: true,
                json,
            },
            cli.offline,
            &cli.root,
        ),
        Command::Finalize { no_reboot, json } => client::run(
            Request::Finalize {
                reboot: !no_reboot,
                json,
            },
            cli.offline,
            &cli.root,
        ),
        Command::Cancel => client::run(Request::Cancel, cli.offline, &cli.root),
        Command::History { json } => client::run(Request::History { json }, cli.offline, &cli.root),
        Command::Rollback => client::run(Request::Rollback, cli.offline, &cli.root),
        Command::MarkGood => client::run(Request::Mark { good: true }, cli.offline, &cli.root),
        Command::MarkBad => client::run(Request::Mark { good: false }, cli.offline, &cli.root),
        Command::Health { json, wait } => {
            client::run(Request::Health { json, wait }, cli.offline, &cli.root)
        }
        Command::Metrics => client::run(Request::Metrics, cli.offline, &cli.root),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("updatectl: {error:#}");
            ExitCode::FAILURE
        }
    }
}
