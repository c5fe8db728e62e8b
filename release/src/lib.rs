//! `tandem-release`'s command line, shared with `cargo xtask man`.

pub mod cli;
