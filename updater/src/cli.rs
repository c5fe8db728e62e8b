//! The command lines of `updatectl` and `tandemd` (clap definitions). They
//! live in the library so that `cargo xtask man` generates the manuals and
//! shell completions from the very definitions the programs parse.

/// `updatectl`'s command line.
pub mod updatectl {
    use std::path::PathBuf;

    use bootconfig::{Guid, SlotName};
    use clap::{Args, Parser, Subcommand};

    #[derive(Debug, Parser)]
    #[command(
        name = "updatectl",
        version,
        about = "Drive and inspect tandem A/B updates"
    )]
    pub struct Cli {
        #[command(subcommand)]
        pub command: Command,
        /// Run the engine in this process instead of asking tandemd (rescue,
        /// image building); takes the same lock, so not while tandemd runs.
        #[arg(long, global = true)]
        pub offline: bool,
        /// With --offline: read the configuration under this root.
        #[arg(long, global = true, default_value = "/", value_name = "DIR")]
        pub root: PathBuf,
    }

    #[derive(Debug, Subcommand)]
    pub enum Command {
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
    pub struct SlotsArgs {
        #[command(subcommand)]
        pub action: Option<SlotAction>,
        /// Disk (block device or image file); default: the disk holding the booted slot.
        #[arg(long, global = true, value_name = "PATH")]
        pub disk: Option<PathBuf>,
        /// Use the BLS backend (systemd-boot) with the ESP mounted here,
        /// instead of GPT gptprio attributes.
        #[arg(long, global = true, value_name = "DIR")]
        pub esp: Option<PathBuf>,
        /// With --esp: the slots boot UKIs in the ESP's EFI/Linux (type #2
        /// entries, ACL's layout) instead of type #1 entries.
        #[arg(long, global = true, requires = "esp")]
        pub ukis: bool,
        /// gptprio on Flatcar's layout: the ESP mounted here holds the slots'
        /// kernels at flatcar/vmlinuz-a|b (shown with their root hashes).
        #[arg(long, global = true, value_name = "DIR", conflicts_with = "esp")]
        pub kernels: Option<PathBuf>,
        /// Flatcar's layout: each slot keeps its dm-verity hash tree inside
        /// it from this byte offset (slots.hash = "in-slot").
        #[arg(long, global = true, value_name = "BYTES")]
        pub hash_offset: Option<u64>,
        /// Print a machine-readable JSON document.
        #[arg(long, global = true)]
        pub json: bool,
        /// GPT label of slot A.
        #[arg(long, global = true, default_value = "USR-A", value_name = "LABEL")]
        pub label_a: String,
        /// GPT label of slot B.
        #[arg(long, global = true, default_value = "USR-B", value_name = "LABEL")]
        pub label_b: String,
        /// Partition type GUID both slots must have (default: Flatcar /usr).
        #[arg(long = "type", global = true, value_name = "GUID")]
        pub type_guid: Option<Guid>,
        /// Kernel command line to find the booted slot in.
        #[arg(
            long,
            global = true,
            default_value = "/proc/cmdline",
            value_name = "FILE"
        )]
        pub cmdline: PathBuf,
        /// The booted slot, when the command line does not tell (image building, rescue).
        #[arg(long, global = true, value_name = "A|B")]
        pub booted: Option<SlotName>,
    }

    #[derive(Debug, Subcommand)]
    pub enum SlotAction {
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
}

/// `tandemd`'s command line.
pub mod tandemd {
    use std::path::PathBuf;

    use clap::Parser;

    #[derive(Debug, Parser)]
    #[command(name = "tandemd", version, about = "The tandem update daemon")]
    pub struct Args {
        /// Read the configuration under this root (`/` on a node).
        #[arg(long, default_value = "/")]
        pub root: PathBuf,
        /// Connect to the session bus instead of the system bus.
        #[arg(long)]
        pub session: bool,
        /// Where logs go: `journal` (the native protocol, structured
        /// fields and MESSAGE_IDs), `stderr`, or `auto`: the journal when
        /// systemd connected stderr to it (JOURNAL_STREAM) and its socket
        /// exists.
        #[arg(long, value_enum, default_value_t = LogTarget::Auto)]
        pub log: LogTarget,
        /// The journal's native socket.
        #[arg(long, default_value = crate::log::JOURNAL_SOCKET, value_name = "PATH")]
        pub journal_socket: PathBuf,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
    pub enum LogTarget {
        Auto,
        Journal,
        Stderr,
    }
}
