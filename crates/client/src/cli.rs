//! The `psi-client` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use psi_core::Blinding;

use crate::batch::{self, BatchOptions};
use crate::check::{check, CheckOutcome};
use crate::pin::Pinned;
use crate::session::{ClientTls, ConnectOptions, Session};
use crate::QueryMode;

/// Ask whether (name, ID) pairs are in the registry without revealing them.
#[derive(Debug, Parser)]
#[command(name = "psi-client", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Connection flags shared by every command.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Server URL.
    #[arg(long, env = "PSI_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// The server's public key (hex), as published by the operator. Without
    /// it the key is trusted on first use and remembered in the cache directory.
    #[arg(long, env = "PSI_PIN_KEY")]
    pub pin_key: Option<String>,
    /// Directory for the known-servers file and the synced tag set
    /// [default: $XDG_CACHE_HOME/psi-client or ~/.cache/psi-client].
    #[arg(long, env = "PSI_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Why these pairs are checked: the purpose code your authorisation names
    /// (e.g. kyc-onboarding); recorded in the operator's audit trail.
    #[arg(long, env = "PSI_PURPOSE")]
    pub purpose: String,
    /// The operator's CA certificate (PEM), for an https:// server.
    #[arg(long, env = "PSI_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// This institution's certificate (PEM), issued by `psi-server ca issue`.
    #[arg(long, env = "PSI_TLS_CERT", requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// This institution's private key (PEM).
    #[arg(long, env = "PSI_TLS_KEY", requires_all = ["tls_ca", "tls_cert"])]
    pub tls_key: Option<PathBuf>,
}

impl ServerArgs {
    fn options(&self) -> Result<ConnectOptions> {
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let tls = match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => Some(ClientTls {
                ca: read(ca)?,
                cert: read(cert)?,
                key: read(key)?,
            }),
            _ => None,
        };
        let cache_dir = self.cache_dir.clone().unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from("."))
                .join("psi-client")
        });
        Ok(ConnectOptions {
            server: self.server.clone(),
            pin_key: self.pin_key.clone(),
            cache_dir,
            blinding: Blinding::Additive,
            concurrency: self.concurrency,
            tls,
            purpose: self.purpose.clone(),
        })
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check one pair: prints match or no_match; exit status 0 match, 1 no match, 2 invalid input or error.
    Check {
        #[command(flatten)]
        server: ServerArgs,
        /// The person's name.
        #[arg(long)]
        name: String,
        /// The resident ID number (18 characters, or a legacy 15-digit number).
        #[arg(long)]
        id: String,
        /// bucket: no download (default for single checks); sync: use the local tag set.
        #[arg(long, value_enum, default_value_t = QueryMode::Bucket)]
        mode: QueryMode,
    },
    /// Answer every row of a CSV file (columns `name` and `id`; others pass through).
    Batch {
        #[command(flatten)]
        server: ServerArgs,
        /// Input CSV.
        #[arg(long)]
        input: PathBuf,
        /// Output CSV: the input's columns plus `result` and `error`.
        #[arg(long)]
        output: PathBuf,
        /// sync: download the tag set, then evaluate only (default); bucket: no download.
        #[arg(long, value_enum, default_value_t = QueryMode::Sync)]
        mode: QueryMode,
        /// Rows per chunk.
        #[arg(long, default_value_t = 8192)]
        chunk_rows: usize,
        /// Longest input row in bytes (all its fields); a longer row stops
        /// the run with its line number.
        #[arg(long, default_value_t = psi_files::rows::DEFAULT_MAX_ROW_BYTES)]
        max_row_bytes: usize,
        /// The input's encoding: utf-8 or gb18030 (which also reads GBK and
        /// GB2312) [default: detected from the bytes; a file in neither is refused].
        #[arg(long, value_parser = psi_files::Encoding::parse)]
        encoding: Option<psi_files::Encoding>,
        /// The output's encoding: utf-8, utf-8-bom (opens correctly in
        /// Excel) or gb18030 [default: the input's].
        #[arg(long, value_parser = psi_files::Encoding::parse)]
        output_encoding: Option<psi_files::Encoding>,
        /// Do not draw a progress bar.
        #[arg(long)]
        no_progress: bool,
        /// Continue an interrupted run from OUTPUT.partial: rows already
        /// written are kept and not asked again.
        #[arg(long)]
        resume: bool,
        /// Sync mode: the oldest the tag set may be, since the server last
        /// confirmed it current, to answer from; during a long batch an
        /// older one is re-synced.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        max_cache_age: std::time::Duration,
        /// Sync mode: answer from the cached tag set without syncing first;
        /// refused if it is older than --max-cache-age.
        #[arg(long)]
        no_sync: bool,
    },
    /// Fetch or refresh the local tag set.
    Sync {
        #[command(flatten)]
        server: ServerArgs,
    },
}

async fn connect(args: &ServerArgs) -> Result<Session> {
    let session = Session::connect(args.options()?).await?;
    if session.pinned == Pinned::FirstUse {
        eprintln!(
            "note: trusting {}'s public key {} (epoch {}) on first use; compare it with the key the operator published",
            args.server,
            psi_core::PublicKey::from_bytes(&session.info().public_key)
                .map(|k| k.to_hex())
                .unwrap_or_default(),
            session.info().key_epoch
        );
    }
    Ok(session)
}

/// Runs a parsed command and returns the process exit status.
pub async fn run(cli: Cli) -> ExitCode {
    match run_inner(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("psi-client: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run_inner(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Check {
            server,
            name,
            id,
            mode,
        } => {
            let session = connect(&server).await?;
            Ok(match check(&session, &name, &id, mode).await? {
                CheckOutcome::Match => {
                    println!("match");
                    ExitCode::SUCCESS
                }
                CheckOutcome::NoMatch => {
                    println!("no_match");
                    ExitCode::from(1)
                }
                CheckOutcome::Invalid(reason) => {
                    println!("invalid: {reason}");
                    ExitCode::from(2)
                }
            })
        }
        Command::Batch {
            server,
            input,
            output,
            mode,
            chunk_rows,
            max_row_bytes,
            encoding,
            output_encoding,
            no_progress,
            resume,
            max_cache_age,
            no_sync,
        } => {
            let session = connect(&server).await?;
            let summary = batch::run(
                &session,
                &BatchOptions {
                    input,
                    output: output.clone(),
                    mode,
                    chunk_rows,
                    max_row_bytes,
                    encoding,
                    output_encoding,
                    chunks_in_flight: 2,
                    progress: !no_progress,
                    resume,
                    max_cache_age,
                    no_sync,
                },
            )
            .await?;
            eprintln!("{summary}; answers in {}", output.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Sync { server } => {
            let session = connect(&server).await?;
            let s = session.sync().await?;
            println!(
                "tag set of registry version {} ({} entries): {}fetched {} of {} shards, {} bytes; cached at {}",
                s.set.header().registry_version,
                s.set.len(),
                if s.delta_applied { "applied the delta since the cached version, " } else { "" },
                s.shards_fetched,
                s.shards_total,
                s.bytes_fetched,
                session.cache_path().display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
