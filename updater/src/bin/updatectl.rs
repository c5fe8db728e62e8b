//! `updatectl`: the operator's CLI for tandem.

use std::process::ExitCode;

use anyhow::{Context, Result};
use bootconfig::SlotLayout;
use clap::Parser;
use updater::cli::updatectl::{Cli, Command, SlotAction, SlotsArgs};
use updater::client::{self, Request};
use updater::slotctl::{self, Action, Target};

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
