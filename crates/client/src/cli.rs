//! The `psi-client` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use psi_core::Blinding;

use crate::batch::{self, BatchOptions, FileFormat};
use crate::check::{check, CheckOutcome};
use crate::config::{self, Source};
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

/// Connection flags shared by every command; each may also come from the
/// environment or the config file (flags > environment > file > defaults).
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Config file (TOML; keys server, pin_key, pin_exact, purpose, cache_dir,
    /// concurrency, tls_ca, tls_cert, tls_key) [default:
    /// $XDG_CONFIG_HOME/psi-client/config.toml or ~/.config/psi-client/config.toml, if present].
    #[arg(long, env = "PSI_CLIENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Server URL [default: http://127.0.0.1:50051].
    #[arg(long, env = "PSI_SERVER")]
    pub server: Option<String>,
    /// The server's public key (hex), as published by the operator: a root
    /// of trust, from which the operator's endorsed key rotations are
    /// followed. Without it the key is trusted on first use and remembered
    /// in the cache directory.
    #[arg(long, env = "PSI_PIN_KEY")]
    pub pin_key: Option<String>,
    /// Accept only the --pin-key itself, not keys the operator's rotations
    /// endorsed from it (a new key then needs a new --pin-key).
    #[arg(long, env = "PSI_PIN_EXACT")]
    pub pin_exact: Option<bool>,
    /// Directory for the known-servers file and the synced tag set
    /// [default: $XDG_CACHE_HOME/psi-client or ~/.cache/psi-client].
    #[arg(long, env = "PSI_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Requests in flight at once [default: 4].
    #[arg(long, env = "PSI_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Why these pairs are checked: the purpose code your authorisation names
    /// (e.g. kyc-onboarding); recorded in the operator's audit trail.
    #[arg(long, env = "PSI_PURPOSE")]
    pub purpose: Option<String>,
    /// The operator's CA certificate (PEM), for an https:// server.
    #[arg(long, env = "PSI_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This institution's certificate (PEM), issued by `psi-server ca issue`.
    #[arg(long, env = "PSI_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// This institution's private key (PEM).
    #[arg(long, env = "PSI_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

/// The settings in force and where each came from.
#[derive(Debug, Clone)]
pub struct Effective {
    /// The config file read, if any.
    pub file: Option<PathBuf>,
    /// Server URL.
    pub server: (String, Source),
    /// Pinned key.
    pub pin_key: Option<(String, Source)>,
    /// Whether only the pinned key itself is accepted.
    pub pin_exact: (bool, Source),
    /// Purpose.
    pub purpose: Option<(String, Source)>,
    /// Cache directory.
    pub cache_dir: (PathBuf, Source),
    /// Concurrency.
    pub concurrency: (usize, Source),
    /// TLS files (CA, certificate, key).
    pub tls: Option<([PathBuf; 3], Source)>,
}

/// The connection settings alone, parsed from no arguments: clap then takes
/// each from its `PSI_*` variable, exactly as for the command line.
#[derive(Debug, Parser)]
struct EnvironmentOnly {
    #[command(flatten)]
    args: ServerArgs,
}

impl ServerArgs {
    /// `self` with every setting it leaves unset taken from its `PSI_*`
    /// environment variable, by the same rules as the command line's flags
    /// (flags > environment): for callers that are not the command line,
    /// such as the Python package. The variable names live only in the
    /// `env` attributes above.
    ///
    /// # Errors
    /// A variable that does not parse (e.g. `PSI_CONCURRENCY=many`).
    pub fn with_environment(self) -> Result<Self> {
        let env = EnvironmentOnly::try_parse_from(["psi-client"])
            .map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))?
            .args;
        Ok(Self {
            config: self.config.or(env.config),
            server: self.server.or(env.server),
            pin_key: self.pin_key.or(env.pin_key),
            pin_exact: self.pin_exact.or(env.pin_exact),
            cache_dir: self.cache_dir.or(env.cache_dir),
            concurrency: self.concurrency.or(env.concurrency),
            purpose: self.purpose.or(env.purpose),
            tls_ca: self.tls_ca.or(env.tls_ca),
            tls_cert: self.tls_cert.or(env.tls_cert),
            tls_key: self.tls_key.or(env.tls_key),
        })
    }

    /// Merges flags and environment with the config file and the defaults.
    ///
    /// # Errors
    /// An unreadable or invalid config file, an incomplete TLS set, a zero concurrency.
    pub fn effective(&self) -> Result<Effective> {
        let (file_path, file) = config::load(self.config.as_deref())?;
        let cache_default = || {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from("."))
                .join("psi-client")
        };
        let tls = match (
            config::pick(self.tls_ca.clone(), file.tls_ca.clone()),
            config::pick(self.tls_cert.clone(), file.tls_cert.clone()),
            config::pick(self.tls_key.clone(), file.tls_key.clone()),
        ) {
            (Some((ca, s)), Some((cert, _)), Some((key, _))) => Some(([ca, cert, key], s)),
            (None, None, None) => None,
            _ => bail!("TLS needs all three of --tls-ca, --tls-cert and --tls-key (or tls_ca, tls_cert, tls_key in the config file)"),
        };
        let concurrency =
            config::pick(self.concurrency, file.concurrency).unwrap_or((4, Source::Default));
        if concurrency.0 == 0 {
            bail!("concurrency must be at least 1");
        }
        Ok(Effective {
            file: file_path,
            server: config::pick(self.server.clone(), file.server)
                .unwrap_or_else(|| ("http://127.0.0.1:50051".into(), Source::Default)),
            pin_key: config::pick(self.pin_key.clone(), file.pin_key),
            pin_exact: config::pick(self.pin_exact, file.pin_exact)
                .unwrap_or((false, Source::Default)),
            purpose: config::pick(self.purpose.clone(), file.purpose),
            cache_dir: config::pick(self.cache_dir.clone(), file.cache_dir)
                .unwrap_or_else(|| (cache_default(), Source::Default)),
            concurrency,
            tls,
        })
    }

    fn options(&self) -> Result<ConnectOptions> {
        self.effective()?.options()
    }
}

impl Effective {
    /// The session options these settings give.
    ///
    /// # Errors
    /// No purpose anywhere, or unreadable TLS files.
    pub fn options(&self) -> Result<ConnectOptions> {
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let tls = match &self.tls {
            Some(([ca, cert, key], _)) => Some(ClientTls {
                ca: read(ca)?,
                cert: read(cert)?,
                key: read(key)?,
            }),
            None => None,
        };
        let purpose = self.purpose.as_ref().map(|(p, _)| p.clone()).context(
            "declare why these pairs are checked: --purpose CODE, PSI_PURPOSE, or `purpose` in the config file",
        )?;
        Ok(ConnectOptions {
            server: self.server.0.clone(),
            pin_key: self.pin_key.as_ref().map(|(k, _)| k.clone()),
            pin_exact: self.pin_exact.0,
            cache_dir: self.cache_dir.0.clone(),
            blinding: Blinding::Additive,
            concurrency: self.concurrency.0,
            tls,
            purpose,
        })
    }
}

impl std::fmt::Display for Effective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.file {
            Some(p) => writeln!(f, "config file   {}", p.display())?,
            None => writeln!(
                f,
                "config file   none ({} does not exist)",
                config::default_path()
                    .map_or_else(|| "no default path".into(), |p| p.display().to_string())
            )?,
        }
        writeln!(f, "server        {} ({})", self.server.0, self.server.1)?;
        match &self.purpose {
            Some((p, s)) => writeln!(f, "purpose       {p} ({s})")?,
            None => writeln!(f, "purpose       not set: every query must declare one")?,
        }
        match &self.pin_key {
            Some((k, s)) if self.pin_exact.0 => {
                writeln!(f, "pinned key    {k} ({s}), exactly ({})", self.pin_exact.1)?
            }
            Some((k, s)) => writeln!(
                f,
                "pinned key    {k} ({s}), and keys its endorsed rotations lead to"
            )?,
            None => writeln!(
                f,
                "pinned key    none: trusted on first use, then remembered"
            )?,
        }
        writeln!(
            f,
            "cache dir     {} ({})",
            self.cache_dir.0.display(),
            self.cache_dir.1
        )?;
        writeln!(
            f,
            "concurrency   {} ({})",
            self.concurrency.0, self.concurrency.1
        )?;
        // Paths only: the key file's content is never printed.
        match &self.tls {
            Some(([ca, cert, key], s)) => write!(
                f,
                "TLS           CA {}, certificate {}, key {} ({s})",
                ca.display(),
                cert.display(),
                key.display()
            ),
            None => write!(f, "TLS           none (plaintext, loopback servers only)"),
        }
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check one pair: prints `match`, `no_match`, or `invalid: REASON` (a pair that is not a valid name and ID; nothing is sent); exit status 0 match, 1 no match, 2 invalid input or error.
    Check {
        #[command(flatten)]
        server: ServerArgs,
        /// The person's name.
        #[arg(long)]
        name: String,
        /// The resident ID number (18 characters, or a legacy 15-digit number).
        #[arg(long)]
        id: String,
        /// bucket: no download, the server learns the pair's bucket (default
        /// for single checks); pir: no download, the server learns nothing of
        /// the pair (about 0.5-2 s of server work a check); sync: use the local tag set.
        #[arg(long, value_enum, default_value_t = QueryMode::Bucket)]
        mode: QueryMode,
        /// Record the check in this query log (the institution's
        /// hash-chained record of who asked about whom): an SQLite file
        /// (mode 0600) or a postgres:// URL.
        #[arg(long, env = "PSI_QUERY_LOG")]
        query_log: Option<PathBuf>,
        /// Who asks, for the query log.
        #[arg(long, env = "PSI_STAFF_ID", requires = "query_log")]
        staff: Option<String>,
    },
    /// Answer every row of a CSV file (columns `name` and `id`; others pass through).
    Batch {
        #[command(flatten)]
        server: ServerArgs,
        /// Input: a CSV file, or an Excel workbook (.xlsx).
        #[arg(long)]
        input: PathBuf,
        /// Output: the input's columns plus `result` and `error`, as CSV, or
        /// as an Excel workbook if it ends in .xlsx.
        #[arg(long)]
        output: PathBuf,
        /// An .xlsx input's sheet [default: the first].
        #[arg(long)]
        sheet: Option<String>,
        /// The name column's header [default: name or 姓名].
        #[arg(long)]
        name_column: Option<String>,
        /// The ID number column's header [default: id, 身份证号 or 身份证号码].
        #[arg(long)]
        id_column: Option<String>,
        /// sync: download the tag set, then evaluate only (default); bucket: no
        /// download; pir: no download and no bucket revealed (small batches:
        /// each row costs a PIR answer).
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
        /// Record every row in this query log (the institution's
        /// hash-chained record of who asked about whom: an SQLite file,
        /// mode 0600, or a postgres:// URL), each chunk before it is
        /// written to the output.
        #[arg(long, env = "PSI_QUERY_LOG")]
        query_log: Option<PathBuf>,
        /// Who runs the batch, for the query log.
        #[arg(long, env = "PSI_STAFF_ID", requires = "query_log")]
        staff: Option<String>,
    },
    /// Fetch or refresh the local tag set.
    Sync {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// The configuration file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Serve the HTTP/JSON gateway for this institution's systems (POST
    /// /v1/check, /v1/batch; GET /v1/status, /healthz, /metrics,
    /// /openapi.json) over one warm session, logging every check.
    Serve(Box<GatewayArgs>),
    /// API tokens for the gateway's calling systems.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The institution's query log.
    #[command(subcommand)]
    Log(LogCommand),
}

/// `psi-client serve` settings.
#[derive(Debug, Args)]
pub struct GatewayArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Where the gateway listens [default: loopback only].
    #[arg(long, env = "PSI_GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// The calling systems' tokens: `NAME SHA256HEX` lines (`psi-client
    /// token new --name NAME` makes one); required unless --insecure-no-auth.
    #[arg(long, env = "PSI_GATEWAY_TOKENS")]
    tokens: Option<PathBuf>,
    /// Serve without tokens or staff ids (every call is `local`): a
    /// demonstration on one machine only.
    #[arg(long)]
    insecure_no_auth: bool,
    /// The query log: an SQLite file (mode 0600) or a postgres:// URL
    /// (gateways may share one) [default: query-log.sqlite in the cache
    /// directory].
    #[arg(long, env = "PSI_QUERY_LOG")]
    query_log: Option<PathBuf>,
    /// Purposes callers may declare, comma-separated; the first is the
    /// default [default: --purpose].
    #[arg(long, env = "PSI_GATEWAY_PURPOSES", value_delimiter = ',')]
    purposes: Vec<String>,
    /// The mode of a check that names none.
    #[arg(long, value_enum, default_value_t = QueryMode::Bucket)]
    default_mode: QueryMode,
    /// Largest request body in bytes.
    #[arg(long, env = "PSI_GATEWAY_MAX_BODY_BYTES", default_value_t = 64 << 10)]
    max_body_bytes: usize,
    /// Most rows in one /v1/batch call.
    #[arg(long, env = "PSI_GATEWAY_MAX_BATCH_ROWS", default_value_t = 1000)]
    max_batch_rows: usize,
    /// Calls answered at once; more are refused 429.
    #[arg(long, env = "PSI_GATEWAY_MAX_CONCURRENT", default_value_t = 32)]
    max_concurrent: usize,
    /// Seconds for one call's answer; past it, 504.
    #[arg(long, env = "PSI_GATEWAY_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    request_timeout_secs: u64,
    /// Largest CSV or .xlsx upload to /v1/batch, in bytes.
    #[arg(long, env = "PSI_GATEWAY_MAX_UPLOAD_BYTES", default_value_t = 32 << 20)]
    max_upload_bytes: usize,
    /// Most rows in one upload.
    #[arg(long, env = "PSI_GATEWAY_MAX_UPLOAD_ROWS", default_value_t = 200_000)]
    max_upload_rows: u64,
    /// Seconds for an upload's answers; past it, 504 (the rows asked are
    /// recorded in the query log all the same).
    #[arg(long, env = "PSI_GATEWAY_UPLOAD_TIMEOUT_SECS", default_value_t = 600)]
    upload_timeout_secs: u64,
    /// Seconds between renewals of the session (rotations followed, a
    /// restarted server reached again).
    #[arg(long, default_value_t = 60)]
    refresh_interval_secs: u64,
}

/// `psi-client token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token for a calling system: prints the token (give it to the
    /// system) and the line for the gateway's tokens file (which holds only
    /// its SHA-256).
    New {
        /// The system's name, as the query log records it.
        #[arg(long)]
        name: String,
    },
}

/// `psi-client log` subcommands.
#[derive(Debug, Subcommand)]
pub enum LogCommand {
    /// Walk the query log's hash chain: a changed, deleted or inserted
    /// record is named.
    Verify {
        /// The query log: an SQLite file or a postgres:// URL.
        #[arg(long, env = "PSI_QUERY_LOG")]
        log: PathBuf,
    },
    /// The openings of a period for a regulator: every entry committed in
    /// it, grouped by the commitment its request carried, to check against
    /// the operator's audit chain (`psi-server audit check-openings`).
    /// The file holds the pairs asked about: it is written mode 0600.
    Open {
        /// The query log: an SQLite file or a postgres:// URL.
        #[arg(long, env = "PSI_QUERY_LOG")]
        log: PathBuf,
        /// From this time (RFC 3339, e.g. 2026-11-01T00:00:00Z).
        #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
        since: std::time::SystemTime,
        /// Until this time, exclusive (RFC 3339).
        #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
        until: std::time::SystemTime,
        /// Where to write the openings (JSON).
        #[arg(long)]
        out: PathBuf,
    },
    /// Remove records older than the retention period (the rest still verifies).
    Prune {
        /// The query log: an SQLite file or a postgres:// URL.
        #[arg(long, env = "PSI_QUERY_LOG")]
        log: PathBuf,
        /// Days kept [default: three years].
        #[arg(long, default_value_t = crate::querylog::DEFAULT_RETENTION_DAYS)]
        retention_days: u64,
    },
}

/// `psi-client config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the settings in force (flags > environment > file > defaults;
    /// no secrets) and test the connection.
    Check {
        #[command(flatten)]
        server: ServerArgs,
    },
}

async fn connect(args: &ServerArgs) -> Result<Session> {
    let options = args.options()?;
    let session = Session::connect(options.clone()).await?;
    if session.pinned == Pinned::FirstUse {
        eprintln!(
            "note: trusting {}'s public key {} (epoch {}) on first use; compare it with the key the operator published",
            options.server,
            psi_core::PublicKey::from_bytes(&session.info().public_key)
                .map(|k| k.to_hex())
                .unwrap_or_default(),
            session.info().key_epoch
        );
    }
    Ok(session)
}

/// The purpose the settings declare.
fn session_purpose(args: &ServerArgs) -> Result<String> {
    Ok(args.options()?.purpose)
}

async fn connect_checked(options: ConnectOptions) -> Result<Session> {
    Session::connect(options)
        .await
        .context("connection    failed")
}

/// Runs a parsed command and returns the process exit status.
/// Runs blocking `work` (a query log in PostgreSQL is reached on a
/// runtime of its own) off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .context("a blocking task")?
}

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
            query_log,
            staff,
        } => {
            let session = connect(&server).await?;
            let outcome = match query_log {
                // With a log, the record is made first and the request
                // carries the commitment to it (`psi-client log open`
                // opens it later).
                Some(path) => {
                    let target = crate::querylog::LogTarget {
                        log: crate::querylog::QueryLog::opened(&path).await?,
                        staff: staff.unwrap_or_else(|| "unnamed".into()),
                        caller: "psi-client check".into(),
                        purpose: session_purpose(&server)?,
                    };
                    let (name, id) = (name.as_str(), id.as_str());
                    let (outcome, _) = target
                        .check(&session, name, id, mode, |s| async move {
                            check(&s, name, id, mode).await
                        })
                        .await?;
                    outcome?
                }
                None => check(&session, &name, &id, mode).await?,
            };
            Ok(match outcome {
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
            sheet,
            name_column,
            id_column,
            mode,
            chunk_rows,
            max_row_bytes,
            encoding,
            output_encoding,
            no_progress,
            resume,
            max_cache_age,
            no_sync,
            query_log,
            staff,
        } => {
            let log = match &query_log {
                Some(path) => Some(crate::querylog::LogTarget {
                    log: crate::querylog::QueryLog::opened(path).await?,
                    staff: staff.clone().unwrap_or_else(|| "unnamed".into()),
                    caller: "psi-client batch".into(),
                    purpose: session_purpose(&server)?,
                }),
                None => None,
            };
            let session = connect(&server).await?;
            let summary = batch::run_logged(
                &session,
                &BatchOptions {
                    input,
                    output: output.clone(),
                    mode,
                    chunk_rows,
                    file: FileFormat {
                        max_row_bytes,
                        encoding,
                        output_encoding,
                        sheet,
                        name_column,
                        id_column,
                    },
                    chunks_in_flight: 2,
                    progress: !no_progress,
                    resume,
                    max_cache_age,
                    no_sync,
                },
                log.as_ref(),
            )
            .await?;
            eprintln!("{summary}; answers in {}", output.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Check { server }) => {
            let effective = server.effective()?;
            println!("{effective}");
            let mut options = effective.options().or_else(|_| {
                // Server info needs no purpose: test the connection anyway.
                Effective {
                    purpose: Some(("config-check".into(), Source::Default)),
                    ..effective.clone()
                }
                .options()
            })?;
            options.concurrency = 1;
            let server_url = options.server.clone();
            let session = connect_checked(options).await?;
            let info = session.info();
            println!(
                "connection    ok: {} at key epoch {}, registry version {} ({} entries), pinned key {}",
                server_url,
                info.key_epoch,
                info.registry_version,
                info.registry_size,
                psi_core::PublicKey::from_bytes(&info.public_key)
                    .map(|k| k.to_hex())
                    .unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(args) => {
            let args = *args;
            let options = args.server.options()?;
            let query_log = args
                .query_log
                .clone()
                .unwrap_or_else(|| options.cache_dir.join("query-log.sqlite"));
            let tokens = match (&args.tokens, args.insecure_no_auth) {
                (Some(path), false) => Some(crate::gateway::load_tokens(path)?),
                (None, true) => None,
                (Some(_), true) => bail!("--tokens and --insecure-no-auth both given"),
                (None, false) => bail!(
                    "the gateway needs --tokens FILE (callers' token hashes; `psi-client token new`), or --insecure-no-auth for a demonstration"
                ),
            };
            let purposes = if args.purposes.is_empty() {
                vec![options.purpose.clone()]
            } else {
                args.purposes.clone()
            };
            if let Some(bad) = purposes.iter().find(|p| !psi_proto::is_valid_purpose(p)) {
                bail!("purpose `{bad}`: 1 to 32 of a-z, 0-9, '_' or '-'");
            }
            let settings = crate::gateway::GatewaySettings {
                tokens,
                purposes,
                default_mode: args.default_mode,
                max_body_bytes: args.max_body_bytes.max(1024),
                max_batch_rows: args.max_batch_rows.max(1),
                max_concurrent: args.max_concurrent.max(1),
                request_timeout: std::time::Duration::from_secs(args.request_timeout_secs.max(1)),
                max_upload_bytes: args.max_upload_bytes.max(1024),
                max_upload_rows: args.max_upload_rows.max(1),
                upload_timeout: std::time::Duration::from_secs(args.upload_timeout_secs.max(1)),
                refresh_interval: std::time::Duration::from_secs(args.refresh_interval_secs.max(1)),
                ..crate::gateway::GatewaySettings::new(args.listen, &options.purpose, query_log)
            };
            let running = crate::gateway::start(options, settings).await?;
            eprintln!(
                "psi-client gateway listening on http://{}",
                running.local_addr
            );
            let _ = tokio::signal::ctrl_c().await;
            running.shutdown().await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(TokenCommand::New { name }) => {
            let (token, line) = crate::gateway::new_token(&name)?;
            println!("token for {name}: {token}");
            println!("add this line to the gateway's tokens file: {line}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Log(LogCommand::Verify { log }) => {
            let place = crate::querylog::place(&log);
            let n = blocking(move || crate::querylog::verify(&log)).await?;
            println!("{place}: {n} records, the chain verifies");
            Ok(ExitCode::SUCCESS)
        }
        Command::Log(LogCommand::Open {
            log,
            since,
            until,
            out,
        }) => {
            let ms = |t: std::time::SystemTime| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            };
            let (since, until) = (ms(since), ms(until));
            let openings = blocking(move || crate::querylog::open(&log, since, until)).await?;
            let json = serde_json::to_vec_pretty(&openings)?;
            psi_files::atomic::write_atomically(&out, &json, 0o600)
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "{} commitments, {} entries opened into {} (mode 0600: it holds the pairs asked about)",
                openings.groups.len(),
                openings.groups.iter().map(|g| g.records.len()).sum::<usize>(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Log(LogCommand::Prune {
            log,
            retention_days,
        }) => {
            let n = blocking(move || crate::querylog::QueryLog::open(&log)?.prune(retention_days))
                .await?;
            println!(
                "removed {n} records older than {retention_days} days; the rest still verifies"
            );
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

#[cfg(test)]
mod tests {
    use super::ServerArgs;

    /// One test touches the process's environment, so nothing races it.
    #[test]
    fn unset_settings_come_from_the_environment_as_for_the_command_line() {
        let none = ServerArgs {
            config: None,
            server: None,
            pin_key: None,
            pin_exact: None,
            cache_dir: None,
            concurrency: None,
            purpose: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
        };
        std::env::set_var("PSI_PURPOSE", "kyc-onboarding");
        std::env::set_var("PSI_CONCURRENCY", "7");
        let got = none.clone().with_environment().unwrap();
        assert_eq!(got.purpose.as_deref(), Some("kyc-onboarding"));
        assert_eq!(got.concurrency, Some(7));
        // What the caller gives wins over the environment.
        let given = ServerArgs {
            purpose: Some("aml-recheck".into()),
            ..none.clone()
        };
        let got = given.with_environment().unwrap();
        assert_eq!(got.purpose.as_deref(), Some("aml-recheck"));
        std::env::set_var("PSI_CONCURRENCY", "many");
        let err = none.with_environment().unwrap_err().to_string();
        assert!(err.contains("many"), "{err}");
        std::env::remove_var("PSI_PURPOSE");
        std::env::remove_var("PSI_CONCURRENCY");
    }
}
