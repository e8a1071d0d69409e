//! `psi-demo`: the whole job on synthetic data, in one process (see
//! `psi-demo --help`). A binary of its own so that the operator's
//! `psi-server` does not link the institution's client library.

// The demo stops with the reason when a step it shows fails.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod demo;

use std::path::PathBuf;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Run the whole job on synthetic data: generate a registry, encrypt it,
/// serve it locally, and check pairs with the client in all three modes
/// (sync, bucket, PIR).
#[derive(Debug, Parser)]
#[command(name = "psi-demo", version)]
struct Args {
    /// Working directory for the demo's files.
    #[arg(long, default_value = "demo-data")]
    dir: PathBuf,
    /// Registry size.
    #[arg(long, default_value_t = 20_000)]
    count: u64,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match demo::run(&args.dir, args.count).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("psi-demo: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
