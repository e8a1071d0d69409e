//! The `psi-server` command line.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::keyholder::pool::HolderLinkArgs;
use crate::registry;
use crate::registry::source::Source;
use crate::serving::config::ServeArgs;
use crate::tools::synth::Generator;

/// The registry operator's server of the private (name, ID) match service.
#[derive(Debug, Parser)]
#[command(name = "psi-server", version, about)]
pub struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "PSI_LOG_JSON")]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a synthetic registry (people who do not exist) as CSV.
    Generate {
        /// Number of people.
        #[arg(long)]
        count: u64,
        /// Seed: the same seed gives the same registry.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output CSV file (columns name,id).
        #[arg(long)]
        out: PathBuf,
    },
    /// Create the key if needed and encrypt a registry into the data
    /// directory as a new registry version (replacing the whole registry).
    Init {
        /// Registry CSV with a header naming the name and ID columns; with
        /// --postgres, a query (`SELECT name, id FROM ...`) or a table name.
        #[arg(long)]
        registry: String,
        #[command(flatten)]
        source: SourceArgs,
        #[command(flatten)]
        guard: GuardArgs,
        /// Data directory (created with mode 0700).
        #[arg(long, env = "PSI_DATA_DIR")]
        data_dir: PathBuf,
        /// Encrypt only slice I of N (0 <= I < N) into a part file in
        /// --parts-dir, reading the key from the data directory (create it
        /// first with `keygen`); `merge` then makes the snapshot.
        #[arg(long, value_parser = crate::registry::partition::parse_slice, requires = "parts_dir")]
        partition: Option<registry::encode::Slice>,
        /// Where partitions write their parts and `merge` reads them.
        #[arg(long, requires = "partition")]
        parts_dir: Option<PathBuf>,
        /// Do not draw a progress bar.
        #[arg(long)]
        no_progress: bool,
        /// Threshold mode: the key holders that make the tags.
        #[command(flatten)]
        holders: HolderLinkArgs,
    },
    /// Create the OPRF key (epoch 1) in a data directory, for partitions
    /// (`init --partition`) to share; an existing key is kept.
    Keygen {
        /// Data directory (created with mode 0700).
        #[arg(long, env = "PSI_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Combine the N parts of a partitioned `init` into the next registry
    /// version: the snapshot a single `init` of the whole source writes.
    Merge {
        /// Data directory (holding the key the parts used).
        #[arg(long, env = "PSI_DATA_DIR")]
        data_dir: PathBuf,
        /// The directory the partitions wrote their parts into.
        #[arg(long)]
        parts_dir: PathBuf,
        /// N: how many partitions ran.
        #[arg(long)]
        partitions: u64,
        #[command(flatten)]
        guard: GuardArgs,
    },
    /// Add and remove records as a new registry version; a running server
    /// publishes it without restarting.
    Update {
        /// Records to add: a CSV file, or with --postgres a query or table.
        #[arg(long)]
        add: Option<String>,
        /// Records to remove: a CSV file, or with --postgres a query or table.
        #[arg(long)]
        remove: Option<String>,
        #[command(flatten)]
        source: SourceArgs,
        #[command(flatten)]
        guard: GuardArgs,
        /// Data directory.
        #[arg(long, env = "PSI_DATA_DIR")]
        data_dir: PathBuf,
        /// Fold the log into a new base first once it holds this many
        /// updates (1 to 64): an update writes only its change, so its
        /// cost follows the change; every this-many-th one also rewrites
        /// the whole registry (as `compact` does).
        #[arg(long, default_value_t = registry::DEFAULT_COMPACT_AFTER)]
        compact_after: usize,
        /// Do not draw a progress bar.
        #[arg(long)]
        no_progress: bool,
        /// Threshold mode: the key holders that make the tags.
        #[command(flatten)]
        holders: HolderLinkArgs,
    },
    /// Fold the updates since the last base into a new base (index and
    /// record store): the registry served does not change; later updates
    /// and restarts have less to apply. Run it at a quiet hour.
    Compact {
        /// Data directory.
        #[arg(long, env = "PSI_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Create a new key epoch, re-encrypt the registry under it while the old
    /// epoch keeps serving, and switch; the old key is destroyed after the
    /// grace period.
    RotateKey {
        /// Data directory.
        #[arg(long, env = "PSI_DATA_DIR")]
        data_dir: PathBuf,
        /// How long the retired key file is kept before it is destroyed.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        grace_period: std::time::Duration,
        /// Do not draw a progress bar.
        #[arg(long)]
        no_progress: bool,
        /// Threshold mode: the key holders, who make the next key.
        #[command(flatten)]
        holders: HolderLinkArgs,
    },
    /// Copy what `serve` needs (keys, key history, deltas, bucket index) from
    /// the encoding directory into a serving directory, without the
    /// plaintext records: the host institutions connect to then holds no
    /// name or ID number. A server on the serving directory picks each
    /// publication up live.
    Publish {
        /// The encoding directory (where `init`, `update` and `rotate-key` run).
        #[arg(long, env = "PSI_DATA_DIR")]
        data_dir: PathBuf,
        /// The serving directory (created, mode 0700, if missing).
        #[arg(long)]
        to: PathBuf,
    },
    /// Serve the encrypted registry until SIGINT or SIGTERM.
    Serve(Box<ServeArgs>),
    /// A local certificate authority for mutual TLS.
    #[command(subcommand)]
    Ca(CaCommand),
    /// The registry's public key, to publish to institutions.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Check or export the audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Threshold mode: run a key holder, holding one share of the key.
    #[command(subcommand)]
    Keyholder(KeyholderCommand),
}

/// `psi-server keyholder` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeyholderCommand {
    /// Serve `psi.v1.KeyHolder` from a holder directory (its share and
    /// committee files) until SIGINT or SIGTERM.
    Serve(Box<crate::keyholder::serve::HolderArgs>),
    /// Create a holder's identity (for key generation) in its directory and
    /// print its public identity, for the committee's holders.txt.
    Init {
        /// The holder's directory (created with mode 0700).
        #[arg(long, env = "PSI_HOLDER_DIR")]
        dir: PathBuf,
    },
    /// A new threshold deployment: the holders generate epoch 1's key among
    /// themselves (no dealer); its committee goes into the data directory,
    /// where `init --holders` then encodes the registry.
    Dkg {
        /// Encoding data directory (no registry or key yet).
        #[arg(long, env = "PSI_DATA_DIR")]
        data_dir: PathBuf,
        /// T: holders needed for an evaluation (at least 2).
        #[arg(long)]
        threshold: u16,
        #[command(flatten)]
        holders: HolderLinkArgs,
    },
    /// Proactive refresh: the holders make new shares of the current key
    /// (same public key, nothing re-encoded); the committee file in the
    /// data directory is replaced. Publish, then `retire` the old shares.
    Refresh {
        /// Encoding data directory.
        #[arg(long, env = "PSI_DATA_DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        holders: HolderLinkArgs,
    },
    /// Have every holder destroy its shares older than the data
    /// directory's current epoch and sharing (once the replicas serve it).
    Retire {
        /// Encoding data directory.
        #[arg(long, env = "PSI_DATA_DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        holders: HolderLinkArgs,
    },
}

/// Where registry rows come from when not a CSV file.
#[derive(Debug, clap::Args)]
pub struct SourceArgs {
    /// Read from PostgreSQL (a connection string such as
    /// `host=/run/postgresql dbname=registry` or `postgres://user@host/db`)
    /// through a server-side cursor, instead of CSV files.
    #[arg(long, env = "PSI_POSTGRES")]
    postgres: Option<String>,
    /// The name column (CSV header or table column).
    #[arg(long, default_value = crate::registry::source::NAME_COLUMN)]
    name_column: String,
    /// The ID number column (CSV header or table column).
    #[arg(long, default_value = crate::registry::source::ID_COLUMN)]
    id_column: String,
    /// A CSV file's encoding: utf-8 or gb18030 (which also reads GBK and
    /// GB2312) [default: detected from the bytes; a file in neither is refused].
    #[arg(long, value_parser = psi_files::Encoding::parse)]
    encoding: Option<psi_files::Encoding>,
}

impl SourceArgs {
    fn source(&self, value: &str) -> Result<Source> {
        Ok(Source::from_arg(
            value,
            self.postgres.as_deref(),
            &self.name_column,
            &self.id_column,
        )?
        .with_encoding(self.encoding))
    }
}

/// What a new registry version must look like to be published.
#[derive(Debug, clap::Args)]
pub struct GuardArgs {
    /// Refuse to publish when more than this fraction of a source's rows
    /// is rejected (swapped columns, the wrong file).
    #[arg(long, default_value_t = 0.01)]
    max_rejected_fraction: f64,
    /// Refuse to publish a version with more than this fraction fewer
    /// records than the previous one.
    #[arg(long, default_value_t = 0.10)]
    max_shrink: f64,
    /// Publish whatever the counts (even an empty registry).
    #[arg(long)]
    force: bool,
}

impl GuardArgs {
    fn guard(&self) -> Result<registry::PublishGuard> {
        for (name, v) in [
            ("--max-rejected-fraction", self.max_rejected_fraction),
            ("--max-shrink", self.max_shrink),
        ] {
            if !(0.0..=1.0).contains(&v) {
                anyhow::bail!("{name} must be between 0 and 1, got {v}");
            }
        }
        Ok(registry::PublishGuard {
            max_rejected_fraction: self.max_rejected_fraction,
            max_shrink_fraction: self.max_shrink,
            force: self.force,
        })
    }
}

/// `psi-server key` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Print the current key epoch, its public key (what institutions pin,
    /// `psi-client --pin-key`), its fingerprint and the endorsed history of
    /// rotations. Reads public data only: an encoding or a serving directory.
    Show {
        /// Data directory.
        #[arg(long, env = "PSI_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Threshold mode, once for a single-key deployment: split the current
    /// epoch's key into N shares any T of which evaluate (same public key:
    /// no re-encoding), write each holder's directory, put the committee
    /// file in the data directory, then destroy the key file. Move each
    /// holder directory to its host; nothing of it stays here.
    Split {
        /// Encoding data directory.
        #[arg(long, env = "PSI_DATA_DIR")]
        data_dir: PathBuf,
        /// T: holders needed for an evaluation.
        #[arg(long)]
        threshold: u16,
        /// N: holders (at most 255).
        #[arg(long)]
        holders: u16,
        /// Where to write holder-1 .. holder-N (each mode 0700).
        #[arg(long)]
        out: PathBuf,
    },
}

/// `psi-server ca` subcommands.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the operator's CA and the server's certificate.
    Init {
        /// Directory for ca.pem, ca.key, server.pem, server.key.
        #[arg(long)]
        dir: PathBuf,
        /// A DNS name or IP address clients reach the server at; repeat the
        /// flag for each (`--server-name a.example --server-name 10.0.0.5`).
        #[arg(long = "server-name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        server_names: Vec<String>,
    },
    /// Issue an institution's client certificate.
    Issue {
        /// The CA's directory.
        #[arg(long)]
        dir: PathBuf,
        /// Institution id (becomes the certificate's common name).
        #[arg(long)]
        institution: String,
        /// Where to write INSTITUTION.pem and INSTITUTION.key [default: the CA's directory].
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// Replace the institution's existing key and certificate.
        #[arg(long)]
        replace: bool,
    },
}

/// `psi-server audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Walk the hash chain; report the first edited, deleted or reordered record.
    Verify {
        /// The audit database: an SQLite file or a postgres:// URL.
        #[arg(long, env = "PSI_AUDIT_DB", value_parser = crate::serving::audit::AuditStore::from_arg)]
        db: crate::serving::audit::AuditStore,
    },
    /// Remove records older than a time, never any younger than the retention.
    Prune {
        /// The audit database: an SQLite file or a postgres:// URL.
        #[arg(long, env = "PSI_AUDIT_DB", value_parser = crate::serving::audit::AuditStore::from_arg)]
        db: crate::serving::audit::AuditStore,
        /// Remove records before this time (RFC 3339).
        #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
        before: std::time::SystemTime,
        /// Retention in days: records younger than this are never removed.
        #[arg(long, default_value_t = 1098)]
        retention_days: u64,
    },
    /// Check an institution's opened query-log entries for a period
    /// (`psi-client log open`) against this chain: every request of the
    /// institution in the period opened, by entries that make its
    /// commitment; nothing missing, added or changed.
    CheckOpenings {
        /// The audit database: an SQLite file or a postgres:// URL.
        #[arg(long, env = "PSI_AUDIT_DB", value_parser = crate::serving::audit::AuditStore::from_arg)]
        db: crate::serving::audit::AuditStore,
        /// The institution (its certificate's name).
        #[arg(long)]
        institution: String,
        /// The openings file the institution gave.
        #[arg(long)]
        openings: PathBuf,
    },
    /// Export records, oldest first.
    Export {
        /// The audit database: an SQLite file or a postgres:// URL.
        #[arg(long, env = "PSI_AUDIT_DB", value_parser = crate::serving::audit::AuditStore::from_arg)]
        db: crate::serving::audit::AuditStore,
        /// Only this institution.
        #[arg(long)]
        institution: Option<String>,
        /// From this time (RFC 3339, e.g. 2026-11-01T00:00:00Z).
        #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
        since: Option<std::time::SystemTime>,
        /// Until this time, exclusive (RFC 3339).
        #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
        until: Option<std::time::SystemTime>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = crate::serving::audit::Format::Csv)]
        format: crate::serving::audit::Format,
    },
}

/// Runs `work` off the async workers: the audit commands may talk to
/// PostgreSQL, whose client blocks.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .context("the audit command stopped")?
}

/// Runs a parsed command.
///
/// # Errors
/// Whatever the command reports; the message says what to do.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate { count, seed, out } => generate(count, seed, &out),
        Command::Init {
            registry,
            source,
            data_dir,
            partition: Some(slice),
            parts_dir: Some(parts_dir),
            no_progress,
            holders,
            ..
        } => {
            let source = source.source(&registry)?;
            let holders = holders.resolve(HolderLinkArgs::default())?;
            let r = tokio::task::spawn_blocking(move || {
                crate::registry::partition::encode_part(
                    &source,
                    &data_dir,
                    &parts_dir,
                    slice,
                    !no_progress,
                    holders.as_ref(),
                )
            })
            .await??;
            print_part(&slice, &r);
            Ok(())
        }
        Command::Init {
            registry,
            source,
            guard,
            data_dir,
            no_progress,
            holders,
            ..
        } => {
            let source = source.source(&registry)?;
            let guard = guard.guard()?;
            let holders = holders.resolve(HolderLinkArgs::default())?;
            let dir = data_dir.clone();
            let report = tokio::task::spawn_blocking(move || {
                registry::init_guarded(&source, &dir, !no_progress, &guard, holders.as_ref())
            })
            .await??;
            print_init(&report);
            print_key(&data_dir, false)
        }
        Command::Update {
            add,
            remove,
            source,
            guard,
            data_dir,
            compact_after,
            no_progress,
            holders,
        } => {
            let add = add.map(|a| source.source(&a)).transpose()?;
            let remove = remove.map(|r| source.source(&r)).transpose()?;
            let guard = guard.guard()?;
            let holders = holders.resolve(HolderLinkArgs::default())?;
            let r = tokio::task::spawn_blocking(move || {
                registry::update_with(
                    add.as_ref(),
                    remove.as_ref(),
                    &data_dir,
                    !no_progress,
                    &guard,
                    compact_after,
                    holders.as_ref(),
                )
            })
            .await??;
            print_update(&r);
            Ok(())
        }
        Command::Compact { data_dir } => {
            let r = tokio::task::spawn_blocking(move || registry::compact(&data_dir)).await??;
            print_compact(&r);
            Ok(())
        }
        Command::RotateKey {
            data_dir,
            grace_period,
            no_progress,
            holders,
        } => {
            let holders = holders.resolve(HolderLinkArgs::default())?;
            let r = tokio::task::spawn_blocking(move || {
                registry::rotate_key_with(&data_dir, grace_period, !no_progress, holders.as_ref())
            })
            .await??;
            print_rotation(&r);
            Ok(())
        }
        Command::Keygen { data_dir } => {
            let (epoch, created) = crate::registry::partition::keygen(&data_dir)?;
            println!(
                "{} key of epoch {epoch} in {}",
                if created {
                    "created the"
                } else {
                    "kept the existing"
                },
                data_dir.display()
            );
            Ok(())
        }
        Command::Merge {
            data_dir,
            parts_dir,
            partitions,
            guard,
        } => {
            let guard = guard.guard()?;
            let report = tokio::task::spawn_blocking(move || {
                crate::registry::partition::merge(&data_dir, &parts_dir, partitions, &guard)
            })
            .await??;
            print_init(&report);
            Ok(())
        }
        Command::Publish { data_dir, to } => {
            let shown = to.display().to_string();
            let r = tokio::task::spawn_blocking(move || {
                crate::registry::publish::publish(&data_dir, &to)
            })
            .await??;
            println!(
                "published registry version {} (key epoch {}) to {shown}: {} files written ({} bytes), {} removed",
                r.registry_version, r.epoch, r.files_written, r.bytes_written, r.files_removed
            );
            Ok(())
        }
        Command::Serve(args) => {
            let cfg = args.resolve()?;
            let running = crate::serving::serve::start(cfg).await?;
            println!("psi-server listening on {}", running.local_addr);
            if let Some(admin) = running.admin_addr {
                tracing::info!(%admin, "metrics at http://{admin}/metrics");
            }
            running
                .run_until(crate::serving::serve::termination_signal())
                .await
        }
        Command::Ca(command) => ca(command),
        Command::Key(KeyCommand::Show { data_dir }) => print_key(&data_dir, true),
        Command::Key(KeyCommand::Split {
            data_dir,
            threshold,
            holders,
            out,
        }) => {
            let r = tokio::task::spawn_blocking(move || {
                crate::keyholder::split::split(&data_dir, threshold, holders, &out)
            })
            .await??;
            println!(
                "key epoch {} split into {} shares, any {} of which evaluate (public key unchanged: {}); the key file is destroyed.",
                r.epoch,
                r.holder_dirs.len(),
                r.threshold,
                r.public_key_hex
            );
            for (i, dir) in r.holder_dirs.iter().enumerate() {
                println!(
                    "  holder {}: {} (move it to the holder's host)",
                    i + 1,
                    dir.display()
                );
            }
            println!("Serve each with `psi-server keyholder serve --dir DIR ...`; serve and update with --holders.");
            Ok(())
        }
        Command::Keyholder(command) => keyholder(command).await,
        Command::Audit(command) => audit(command).await,
    }
}

/// `psi-server keyholder ...`: the key holders and their ceremonies.
async fn keyholder(command: KeyholderCommand) -> Result<()> {
    let link = |h: HolderLinkArgs| -> Result<crate::keyholder::pool::HoldersConfig> {
        h.resolve(HolderLinkArgs::default())?
            .context("list the key holders with --holders (every holder takes part)")
    };
    match command {
        KeyholderCommand::Serve(args) => {
            let running = crate::keyholder::serve::start(*args).await?;
            println!("psi-server keyholder listening on {}", running.local_addr);
            crate::serving::serve::termination_signal().await;
            running.shutdown().await
        }
        KeyholderCommand::Init { dir } => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .with_context(|| format!("creating {}", dir.display()))?;
            let pk = crate::keyholder::identity::create(&dir)?;
            println!(
                "holder identity {} in {}; list every holder's identity, in index order, in {} in each holder's directory (`holder <index> <identity>` lines)",
                pk.to_hex(),
                dir.display(),
                crate::keyholder::identity::HOLDERS_FILE
            );
            Ok(())
        }
        KeyholderCommand::Dkg {
            data_dir,
            threshold,
            holders,
        } => {
            if threshold < 2 {
                anyhow::bail!("--threshold must be at least 2");
            }
            let s =
                crate::keyholder::ceremony::new_deployment(&data_dir, threshold, &link(holders)?)
                    .await?;
            println!(
                "key epoch 1 generated by {} holders, any {} of which evaluate: public key {} (institutions pin it); committee in {}",
                s.committee.shares().len(),
                threshold,
                s.committee.public_key().to_hex(),
                data_dir.display()
            );
            Ok(())
        }
        KeyholderCommand::Refresh { data_dir, holders } => {
            let (epoch, s) =
                crate::keyholder::ceremony::refresh(&data_dir, &link(holders)?).await?;
            println!(
                "key epoch {epoch} refreshed: generation {} of its shares, same public key {}. Publish, and once the replicas serve it run `psi-server keyholder retire`",
                s.generation,
                s.committee.public_key().to_hex()
            );
            Ok(())
        }
        KeyholderCommand::Retire { data_dir, holders } => {
            for (i, gone) in
                crate::keyholder::ceremony::retire_old(&data_dir, &link(holders)?).await?
            {
                println!(
                    "holder {i}: destroyed {}",
                    if gone.is_empty() {
                        "nothing (no older share)".to_string()
                    } else {
                        format!("the shares of {}", gone.join(", "))
                    }
                );
            }
            Ok(())
        }
    }
}

/// `psi-server ca ...`: the operator's certificate authority.
fn ca(command: CaCommand) -> Result<()> {
    match command {
        CaCommand::Init { dir, server_names } => {
            crate::tools::ca::init(&dir, &server_names)?;
            println!(
                "CA and server certificate for {} written to {}; serve with --tls-cert {} --tls-key {} --client-ca {}",
                server_names.join(", "),
                dir.display(),
                dir.join(crate::tools::ca::SERVER_CERT).display(),
                dir.join(crate::tools::ca::SERVER_KEY).display(),
                dir.join(crate::tools::ca::CA_CERT).display()
            );
            Ok(())
        }
        CaCommand::Issue {
            dir,
            institution,
            out_dir,
            replace,
        } => {
            let out = out_dir.unwrap_or_else(|| dir.clone());
            let (cert, key) = crate::tools::ca::issue(&dir, &institution, &out, replace)?;
            println!(
                "certificate for institution {institution}: {} (key {}); give both and {} to the institution",
                cert.display(),
                key.display(),
                dir.join(crate::tools::ca::CA_CERT).display()
            );
            Ok(())
        }
    }
}

/// `psi-server audit ...`: the audit trail's upkeep and exports.
async fn audit(command: AuditCommand) -> Result<()> {
    match command {
        AuditCommand::Prune {
            db,
            before,
            retention_days,
        } => {
            let retention = std::time::Duration::from_secs(retention_days.saturating_mul(86_400));
            let n = blocking(move || {
                crate::serving::audit::prune(&db, before, retention, std::time::SystemTime::now())
            })
            .await?;
            println!("removed {n} audit records; the remaining chain still verifies (psi-server audit verify)");
            Ok(())
        }
        AuditCommand::Verify { db } => {
            let v = blocking(move || crate::serving::audit::verify(&db)).await?;
            println!(
                "audit chain intact: {} records; head {} (keep this value outside the database to detect truncation)",
                v.records, v.head
            );
            Ok(())
        }
        AuditCommand::CheckOpenings {
            db,
            institution,
            openings,
        } => {
            let text = std::fs::read_to_string(&openings)
                .with_context(|| format!("reading {}", openings.display()))?;
            let who = institution.clone();
            let c =
                blocking(move || crate::serving::audit::check_openings(&db, &institution, &text))
                    .await?;
            println!(
                "openings of {who} hold: {} requests in the period, each opened; {} commitments, {} log entries, nothing missing, added or changed",
                c.requests, c.groups, c.entries
            );
            Ok(())
        }
        AuditCommand::Export {
            db,
            institution,
            since,
            until,
            format,
        } => {
            let filter = crate::serving::audit::ExportFilter {
                institution,
                since,
                until,
            };
            let n = blocking(move || {
                let stdout = std::io::stdout();
                let mut out = stdout.lock();
                crate::serving::audit::export(&db, &filter, format, &mut out)
            })
            .await?;
            eprintln!("exported {n} records");
            Ok(())
        }
    }
}

/// Writes `count` synthetic people to `out`.
///
/// # Errors
/// I/O errors.
pub fn generate(count: u64, seed: u64, out: &std::path::Path) -> Result<()> {
    let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = csv::Writer::from_writer(BufWriter::new(file));
    w.write_record(["name", "id"])?;
    for p in Generator::new(seed, psi_core::CivilDate::today())?.take(usize::try_from(count)?) {
        w.write_record([p.name.as_str(), p.id.as_str()])?;
    }
    w.into_inner()
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?
        .flush()?;
    eprintln!("wrote {count} synthetic people to {}", out.display());
    Ok(())
}

/// Prints a partition's encoding summary.
fn print_part(slice: &crate::registry::encode::Slice, r: &crate::registry::partition::PartReport) {
    println!(
        "partition {}/{}: {} rows of the slice, {} accepted, {} rejected; written to {} in {:.1} s",
        slice.index,
        slice.count,
        r.counts.rows,
        r.counts.accepted,
        r.counts.rejected_total(),
        r.path.display(),
        r.elapsed.as_secs_f64()
    );
}

/// Prints an update's summary.
fn print_update(r: &registry::UpdateReport) {
    println!(
        "registry version {} (key epoch {}): {} added, {} already present, {} removed, {} not found; {} records; {:.1} s",
        r.registry_version,
        r.epoch,
        r.added,
        r.already_present,
        r.removed,
        r.not_found,
        r.records,
        r.elapsed.as_secs_f64()
    );
    print_rejected("add", &r.add, &r.report_path);
    print_rejected("remove", &r.remove, &r.report_path);
}

/// Prints a compaction's summary.
fn print_compact(r: &registry::CompactReport) {
    if r.updates_folded == 0 {
        println!(
            "registry version {}: nothing to compact ({} records in the base)",
            r.registry_version, r.records
        );
    } else {
        println!(
            "registry version {}: {} updates folded into a new base of {} records in {:.1} s",
            r.registry_version,
            r.updates_folded,
            r.records,
            r.elapsed.as_secs_f64()
        );
    }
}

/// Prints a key rotation's summary.
fn print_rotation(r: &registry::RotateReport) {
    println!(
        "key epoch {} -> {}: {} records re-encrypted as registry version {} in {:.1} s; the old key is destroyed after {}",
        r.old_epoch,
        r.epoch,
        r.records,
        r.registry_version,
        r.elapsed.as_secs_f64(),
        humantime::format_duration(r.old_key_destroyed_after)
    );
}

/// Prints the committed key epoch's public key and fingerprint; with
/// `history`, every endorsed rotation too.
fn print_key(data_dir: &std::path::Path, history: bool) -> Result<()> {
    let (epoch, key) = crate::store::public_key(data_dir)?;
    println!(
        "key epoch {epoch}: public key {} (fingerprint {}); institutions pin it with psi-client --pin-key",
        key.to_hex(),
        fingerprint(&key)
    );
    if history {
        for step in crate::store::keystore::load_history(data_dir)? {
            println!(
                "  epoch {}: public key {} (fingerprint {}), endorsed by the key of epoch {}",
                step.epoch,
                step.public_key.to_hex(),
                fingerprint(&step.public_key),
                step.epoch.saturating_sub(1)
            );
        }
    }
    Ok(())
}

/// The first 16 bytes of SHA-256 over a public key, in groups of four hex
/// digits: short enough to read out over the telephone.
fn fingerprint(key: &psi_core::PublicKey) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.to_bytes());
    hex::encode(digest.get(..16).unwrap_or_default())
        .as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Prints an init summary.
pub fn print_init(r: &registry::InitReport) {
    println!(
        "registry version {} (key epoch {}{}): {} rows read, {} accepted, {} rejected, {} duplicates kept once; {} records in {:.1} s; {} bucket prefix bits",
        r.registry_version,
        r.epoch,
        if r.key_created { ", new key" } else { "" },
        r.counts.rows,
        r.counts.accepted,
        r.counts.rejected_total(),
        r.duplicates,
        r.records,
        r.elapsed.as_secs_f64(),
        r.bucket_prefix_bits,
    );
    print_rejected("registry", &r.counts, &r.report_path);
}

fn print_rejected(label: &str, counts: &registry::RowCounts, report: &std::path::Path) {
    if counts.rejected_total() > 0 {
        println!(
            "{label}: {} rows read, {} rejected:",
            counts.rows,
            counts.rejected_total()
        );
        for (reason, n) in &counts.rejected {
            println!("  rejected {n:>8}  {reason}");
        }
        println!("  rejected rows are listed in {}", report.display());
    }
}
