//! `psi-client batch`: one answer per CSV row, in input order, with bounded
//! memory. Rows are read in chunks; each chunk is canonicalised, evaluated
//! (several requests in flight) and written before later chunks pile up.
//! The output goes to `OUTPUT.partial` and is renamed when complete.

use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use psi_core::{Record, TagLookup};
use psi_files::encoding::{self, Encoding, EncodingWriter, Utf8Reader};
use rayon::prelude::*;

use crate::check::CheckOutcome;
use crate::querylog::LogTarget;
use crate::session::Session;
use crate::QueryMode;

/// Options of a batch run.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    /// Input: a CSV file or an `.xlsx` workbook with a header naming the
    /// name and ID columns (other columns pass through).
    pub input: PathBuf,
    /// Output (CSV, or a workbook if it ends in `.xlsx`): the input's columns plus `result` and `error`.
    pub output: PathBuf,
    /// Sync or bucket mode.
    pub mode: QueryMode,
    /// Rows per chunk.
    pub chunk_rows: usize,
    /// How the input and output files are read and written.
    pub file: FileFormat,
    /// Chunks in flight.
    pub chunks_in_flight: usize,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Continue an interrupted run from `OUTPUT.partial`.
    pub resume: bool,
    /// Sync mode: the oldest a tag set may be (since the server last
    /// confirmed it current) to answer from; an older one is re-synced, or
    /// with `no_sync` refused.
    pub max_cache_age: Duration,
    /// Sync mode: answer from the cached tag set without syncing first.
    pub no_sync: bool,
}

/// How a batch's files are read and written; the default reads what
/// institutions usually have (CSV in UTF-8 or GB18030, or a workbook's first
/// sheet, with the usual headers) and answers in the input's encoding.
#[derive(Debug, Clone)]
pub struct FileFormat {
    /// Longest input row in bytes; a longer one stops the run, naming its
    /// line, so memory stays bounded by the chunk whatever the input.
    pub max_row_bytes: usize,
    /// The input's text encoding; `None` detects it (UTF-8 with or without
    /// a BOM, else GB18030) and refuses a file that is neither.
    pub encoding: Option<Encoding>,
    /// The output's encoding; `None` writes the input's.
    pub output_encoding: Option<Encoding>,
    /// An `.xlsx` input's sheet; `None` reads the first.
    pub sheet: Option<String>,
    /// The name column's header; `None` finds `name` or `姓名`.
    pub name_column: Option<String>,
    /// The ID column's header; `None` finds `id`, `身份证号` or `身份证号码`.
    pub id_column: Option<String>,
}

impl Default for FileFormat {
    fn default() -> Self {
        Self {
            max_row_bytes: psi_files::rows::DEFAULT_MAX_ROW_BYTES,
            encoding: None,
            output_encoding: None,
            sheet: None,
            name_column: None,
            id_column: None,
        }
    }
}

/// Whether `path` names an Excel workbook.
fn is_xlsx(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("xlsx"))
}

/// The input's rows: a CSV file read as it goes, or a sheet read whole
/// (a sheet holds at most 1,048,576 rows). Each row comes with a note when
/// it is already known to be invalid (an ID number Excel stored as a number).
enum InputRows {
    Csv(Box<csv::Reader<psi_files::rows::RowGuard<Utf8Reader<Counted<std::fs::File>>>>>),
    Sheet(std::vec::IntoIter<NotedRow>),
}

/// A row and, if it is already known to be invalid, why.
type NotedRow = (csv::ByteRecord, Option<String>);

impl InputRows {
    /// The next row, into `record`; false at the end.
    fn next(&mut self, record: &mut csv::ByteRecord, note: &mut Option<String>) -> Result<bool> {
        match self {
            InputRows::Csv(reader) => {
                *note = None;
                Ok(reader.read_byte_record(record)?)
            }
            InputRows::Sheet(rows) => match rows.next() {
                Some((row, n)) => {
                    *record = row;
                    *note = n;
                    Ok(true)
                }
                None => Ok(false),
            },
        }
    }
}

/// The header and rows of an `.xlsx` input; the ID column's numeric cells
/// become notes.
fn sheet_rows(opts: &BatchOptions) -> Result<(csv::ByteRecord, Vec<NotedRow>)> {
    let sheet = psi_files::xlsx::read(&opts.input, opts.file.sheet.as_deref())
        .with_context(|| format!("reading {}", opts.input.display()))?;
    let header: csv::ByteRecord = sheet.header.iter().map(String::as_str).collect();
    let id_col = column(&header, opts.file.id_column.as_deref(), ID_HEADERS);
    let rows = sheet
        .rows
        .iter()
        .map(|row| {
            let mut note = None;
            let record: csv::ByteRecord = row
                .iter()
                .enumerate()
                .map(|(i, cell)| {
                    if let (psi_files::xlsx::Cell::Number(n), true) = (cell, Some(i) == id_col) {
                        note = Some(format!(
                            "the ID number is stored in the workbook as the number {n}, which Excel keeps to 15 significant digits only: format the column as text and enter the numbers again"
                        ));
                    }
                    cell.text()
                })
                .collect();
            (record, note)
        })
        .collect();
    Ok((header, rows))
}

const NAME_HEADERS: &[&str] = &["name", "姓名"];
const ID_HEADERS: &[&str] = &["id", "身份证号", "身份证号码"];

/// The column whose header is `named`, or else one of `defaults`.
fn column(headers: &csv::ByteRecord, named: Option<&str>, defaults: &[&str]) -> Option<usize> {
    let find = |want: &str| {
        headers
            .iter()
            .position(|h| h.trim_ascii().eq_ignore_ascii_case(want.as_bytes()))
    };
    match named {
        Some(n) => find(n),
        None => defaults.iter().find_map(|d| find(d)),
    }
}

/// What a batch did.
#[derive(Debug, Clone, Default)]
pub struct BatchSummary {
    /// Data rows.
    pub rows: u64,
    /// Rows answered `match`.
    pub matched: u64,
    /// Rows answered `no_match`.
    pub no_match: u64,
    /// Rows answered `invalid`.
    pub invalid: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// The registry version the first chunk was answered against.
    pub first_registry_version: u64,
    /// The registry version the last chunk was answered against.
    pub registry_version: u64,
    /// The key epoch of the first chunk.
    pub first_key_epoch: u64,
    /// The key epoch of the last chunk (a rotation during the batch moves it).
    pub key_epoch: u64,
    /// Tag-set shards downloaded by the syncs of the batch (sync mode).
    pub shards_fetched: usize,
    /// Bytes downloaded by those syncs.
    pub bytes_synced: u64,
    /// Rows taken over from an interrupted run (`--resume`).
    pub resumed_rows: u64,
    /// The server's ids of the batch's first and last requests (the ids
    /// its audit records hold), if any request was answered.
    pub request_ids: Option<(String, String)>,
}

impl std::fmt::Display for BatchSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        write!(
            f,
            "{}{} rows: {} match, {} no_match, {} invalid in {:.2} s ({:.0} rows/s); answered against registry version {}, key epoch {}",
            if self.resumed_rows > 0 { format!("resumed after {} rows; ", self.resumed_rows) } else { String::new() },
            self.rows,
            self.matched,
            self.no_match,
            self.invalid,
            secs,
            self.rows as f64 / secs.max(1e-9),
            span(self.first_registry_version, self.registry_version),
            span(self.first_key_epoch, self.key_epoch)
        )?;
        match &self.request_ids {
            Some((first, last)) if first == last => write!(f, "; request id {first}"),
            Some((first, last)) => write!(f, "; request ids {first} to {last}"),
            None => Ok(()),
        }
    }
}

impl BatchSummary {
    /// Counts one answered row.
    fn count(&mut self, answer: &CheckOutcome) {
        self.rows += 1;
        match answer {
            CheckOutcome::Match => self.matched += 1,
            CheckOutcome::NoMatch => self.no_match += 1,
            CheckOutcome::Invalid(_) => self.invalid += 1,
        }
    }
}

fn span(first: u64, last: u64) -> String {
    if first == last {
        last.to_string()
    } else {
        format!("{first} to {last}")
    }
}

/// What a chunk is answered against: a session (one key epoch) and, in sync
/// mode, the tag set of one registry version.
struct View {
    session: Session,
    lookup: Option<Arc<TagLookup>>,
    version: u64,
    epoch: u64,
    confirmed: Instant,
}

/// The current view, refreshed when the tag set gets older than the maximum
/// age and replaced when the server rotates its key.
struct Views {
    current: tokio::sync::Mutex<Arc<View>>,
    mode: QueryMode,
    max_age: Duration,
    no_sync: bool,
    shards_fetched: std::sync::atomic::AtomicUsize,
    bytes_synced: std::sync::atomic::AtomicU64,
    /// Whether a chunk was answered yet.
    answered: std::sync::atomic::AtomicBool,
}

impl Views {
    async fn open(
        session: Session,
        mode: QueryMode,
        max_age: Duration,
        no_sync: bool,
    ) -> Result<Self> {
        let session = session.with_own_request_ids();
        let views = Self {
            current: tokio::sync::Mutex::new(Arc::new(View {
                version: session.info().registry_version,
                epoch: session.info().key_epoch,
                session: session.clone(),
                lookup: None,
                confirmed: Instant::now(),
            })),
            mode,
            max_age,
            no_sync,
            shards_fetched: 0.into(),
            bytes_synced: 0.into(),
            answered: false.into(),
        };
        if mode == QueryMode::Sync {
            let view = if no_sync {
                let set = session.cached(max_age)?;
                View {
                    version: set.header().registry_version,
                    epoch: set.header().epoch,
                    lookup: Some(Arc::new(set.lookup()?)),
                    session,
                    confirmed: Instant::now(),
                }
            } else {
                match views.synced(session.clone()).await {
                    // Rotated since the session connected: follow it.
                    Err(e) if e.is_stale_epoch() => {
                        views.synced(session.follow_rotation().await?).await?
                    }
                    synced => synced?,
                }
            };
            *views.current.lock().await = Arc::new(view);
        }
        Ok(views)
    }

    async fn synced(&self, session: Session) -> crate::error::Result<View> {
        use std::sync::atomic::Ordering::Relaxed;
        let synced = session.sync().await?;
        self.shards_fetched
            .fetch_add(synced.shards_fetched, Relaxed);
        self.bytes_synced.fetch_add(synced.bytes_fetched, Relaxed);
        Ok(View {
            version: synced.set.header().registry_version,
            epoch: synced.set.header().epoch,
            lookup: Some(Arc::new(synced.set.lookup().map_err(crate::Error::lookup)?)),
            session,
            confirmed: Instant::now(),
        })
    }

    /// The view to answer the next chunk with.
    async fn get(&self) -> Result<Arc<View>> {
        let mut current = self.current.lock().await;
        if self.mode == QueryMode::Sync && current.confirmed.elapsed() > self.max_age {
            if self.no_sync {
                bail!(
                    "the cached tag set (registry version {}) is now older than the maximum age of {}; run again without --no-sync",
                    current.version,
                    humantime::format_duration(self.max_age)
                );
            }
            *current = Arc::new(self.synced(current.session.clone()).await?);
        }
        Ok(Arc::clone(&current))
    }

    /// After the server refused `stale`'s key epoch: reconnect (following
    /// the endorsed rotation), re-sync, and return the new view; a chunk
    /// that failed alongside gets the view the first one made.
    async fn rotated(&self, stale: &View) -> Result<Arc<View>> {
        let mut current = self.current.lock().await;
        if current.epoch == stale.epoch {
            let session = current.session.follow_rotation().await?;
            tracing::warn!(
                "the server rotated its key from epoch {} to {}; re-synced, continuing",
                stale.epoch,
                session.info().key_epoch
            );
            *current = Arc::new(match self.mode {
                QueryMode::Sync if self.no_sync => bail!(
                    "the server rotated its key to epoch {}: the cached tag set is of no use; run again without --no-sync",
                    session.info().key_epoch
                ),
                QueryMode::Sync => self.synced(session).await?,
                QueryMode::Bucket | QueryMode::Pir => View {
                    version: session.info().registry_version,
                    epoch: session.info().key_epoch,
                    session,
                    lookup: None,
                    confirmed: Instant::now(),
                },
            });
        }
        Ok(Arc::clone(&current))
    }

    /// A summary started at the current view.
    async fn summary(&self) -> Result<BatchSummary> {
        let first = self.get().await?;
        Ok(BatchSummary {
            first_registry_version: first.version,
            registry_version: first.version,
            first_key_epoch: first.epoch,
            key_epoch: first.epoch,
            ..BatchSummary::default()
        })
    }

    /// Answers a chunk against the current view, following a key rotation
    /// (asked again under the new epoch, against that epoch's tag set).
    async fn answer(
        &self,
        chunk: &Chunk,
        columns: Columns,
        today: psi_core::CivilDate,
        commitment: Option<[u8; 32]>,
    ) -> Result<(Vec<CheckOutcome>, Arc<View>, Option<(u64, u64)>)> {
        let mut view = self.get().await?;
        let mut rotations = 0;
        loop {
            let how = match view.lookup.as_deref() {
                Some(lookup) => Answering::Locally(lookup),
                None => Answering::Remotely(self.mode),
            };
            // The requests carry the commitment to the chunk's log records
            // (the session shares the view's record of request ids).
            let session = match commitment {
                Some(c) => view.session.with_log_commitment(c),
                None => view.session.clone(),
            };
            match answer_chunk(&session, how, chunk, columns, today).await {
                Ok((answers, versions)) => {
                    // The versions that answered: the tag set's, or those
                    // the server's responses named (none if nothing was asked).
                    let versions = match view.lookup {
                        Some(_) => Some((view.version, view.version)),
                        None => versions,
                    };
                    return Ok((answers, view, versions));
                }
                Err(e) if e.is_stale_epoch() && rotations < 3 => {
                    rotations += 1;
                    view = self.rotated(&view).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Notes in `summary` the registry versions that answered a chunk
    /// (`versions`, first and last, if anything was asked) under `view`'s
    /// key epoch: the summary names the versions whose answers it holds.
    fn note_answered(&self, summary: &mut BatchSummary, view: &View, versions: Option<(u64, u64)>) {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some((first, last)) = versions {
            if !self.answered.swap(true, Relaxed) {
                summary.first_registry_version = first;
            }
            summary.registry_version = last;
        }
        summary.key_epoch = view.epoch;
    }

    /// Fills in what the syncs fetched and the time taken.
    async fn finish(&self, summary: &mut BatchSummary, started: Instant) {
        use std::sync::atomic::Ordering::Relaxed;
        summary.request_ids = self.current.lock().await.session.request_ids();
        summary.shards_fetched = self.shards_fetched.load(Relaxed);
        summary.bytes_synced = self.bytes_synced.load(Relaxed);
        summary.elapsed = started.elapsed();
    }
}

/// Where a chunk's rows hold their fields: how many the header names, and
/// the name and ID columns.
#[derive(Debug, Clone, Copy)]
struct Columns {
    columns: usize,
    name: usize,
    id: usize,
}

impl Columns {
    fn field(self, row: &csv::ByteRecord, col: usize) -> String {
        String::from_utf8_lossy(row.get(col).unwrap_or_default()).into_owned()
    }
}

/// Records a batch's chunks in the query log; once stopped (the run
/// failed), chunks not yet begun are not asked.
struct Recorder<'a> {
    target: &'a LogTarget,
    mode: QueryMode,
    stopped: std::sync::atomic::AtomicBool,
}

impl<'a> Recorder<'a> {
    fn new(target: &'a LogTarget, mode: QueryMode) -> Self {
        Self {
            target,
            mode,
            stopped: false.into(),
        }
    }
}

/// Answers `chunk` and, with a recorder, records it: the rows' records
/// made first, the requests carrying their commitment, the records (with
/// the answers, or `error` on failure) durable before this returns. `None`:
/// the run had stopped before this chunk began; nothing was asked.
async fn answer_recorded(
    views: &Views,
    recorder: Option<&Recorder<'_>>,
    chunk: Chunk,
    columns: Columns,
    today: psi_core::CivilDate,
) -> Result<Option<(Chunk, Vec<CheckOutcome>, Arc<View>, Option<(u64, u64)>)>> {
    let Some(recorder) = recorder else {
        let (answers, view, versions) = views.answer(&chunk, columns, today, None).await?;
        return Ok(Some((chunk, answers, view, versions)));
    };
    if recorder.stopped.load(std::sync::atomic::Ordering::SeqCst) {
        return Ok(None);
    }
    let mut records: Vec<crate::querylog::LogRecord> = chunk
        .rows
        .iter()
        .map(|row| {
            recorder.target.record(
                recorder.mode,
                &columns.field(row, columns.name),
                &columns.field(row, columns.id),
            )
        })
        .collect();
    let entries: Vec<_> = records
        .iter()
        .map(crate::querylog::LogRecord::entry)
        .collect();
    let commitment = psi_core::commitment::commit(&entries);
    let answered = views.answer(&chunk, columns, today, Some(commitment)).await;
    let commitment = hex::encode(commitment);
    match &answered {
        Ok((answers, view, _)) => {
            let span = view
                .session
                .request_ids()
                .map(|(first, last)| format!("{first}..{last}"))
                .unwrap_or_default();
            // Invalid rows are never sent: a chunk of only those sent nothing.
            let sent = answers.iter().any(|a| a.reason().is_none());
            for (record, answer) in records.iter_mut().zip(answers) {
                record.result = answer.result().into();
                record.request_id.clone_from(&span);
                if sent {
                    record.commitment.clone_from(&commitment);
                }
            }
        }
        Err(_) => {
            // Asked but not answered: recorded all the same, with the
            // commitment its requests may have carried.
            for record in &mut records {
                record.result = "error".into();
                record.commitment.clone_from(&commitment);
            }
        }
    }
    recorder.target.append(records).await?;
    let (answers, view, versions) = answered?;
    Ok(Some((chunk, answers, view, versions)))
}

/// After a chunk failed: lets the chunks already asked alongside it (at
/// most `in_flight - 1`) finish and be recorded; none is begun.
async fn drain<S, T>(recorder: Option<&Recorder<'_>>, answered: &mut S, in_flight: usize)
where
    S: futures::Stream<Item = T> + Unpin,
{
    let Some(recorder) = recorder else { return };
    recorder
        .stopped
        .store(true, std::sync::atomic::Ordering::SeqCst);
    for _ in 1..in_flight {
        if answered.next().await.is_none() {
            break;
        }
    }
}

struct Chunk {
    rows: Vec<csv::ByteRecord>,
    /// Per row, a reason it is invalid already known (from the sheet).
    notes: Vec<Option<String>>,
    end_byte: u64,
}

/// Runs a batch. In sync mode the local tag set is refreshed first.
///
/// # Errors
/// Unreadable input, a header without `name` or `id`, RPC or proof failures,
/// I/O errors. On error no output file is left claiming completeness.
pub async fn run(session: &Session, opts: &BatchOptions) -> Result<BatchSummary> {
    run_logged(session, opts, None).await
}

/// [`run`], each chunk's rows recorded in `log`: the records are made
/// before the chunk is asked, its requests carry the commitment to them
/// (`x-psi-log-commitment`), and they are durable (one transaction a chunk,
/// with the answers) before the rows are written to the output: no answer
/// without its record. A row's record names the batch's requests so far as
/// `FIRST..LAST`. A run that stops on an error records the chunks it had
/// asked as `error`.
///
/// # Errors
/// As [`run`], and a query log that cannot be written.
pub async fn run_logged(
    session: &Session,
    opts: &BatchOptions,
    log: Option<&LogTarget>,
) -> Result<BatchSummary> {
    let started = Instant::now();
    // The whole input is checked before the first request: a file in
    // neither encoding is refused, never answered as a run of `invalid`.
    let input_encoding = if is_xlsx(&opts.input) {
        // A workbook's text is Unicode; a CSV written from it opens in
        // Excel when it carries the BOM.
        Encoding::Utf8Bom
    } else {
        input_encoding(&opts.input, opts.file.encoding).await?
    };
    let output_encoding = opts.file.output_encoding.unwrap_or(input_encoding);
    let views = Views::open(session.clone(), opts.mode, opts.max_cache_age, opts.no_sync).await?;
    let mut summary = views.summary().await?;

    let read_units = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (headers, mut reader, total_units) = open_input(opts, input_encoding, &read_units)?;
    let (name_col, id_col) = name_and_id_columns(&headers, opts)?;
    let mut out_headers = headers.clone();
    out_headers.push_field(b"result");
    out_headers.push_field(b"error");
    let partial = partial_path(&opts.output);
    let (mut sink, done_rows) = open_output(opts, &partial, &out_headers, output_encoding)?;
    summary.resumed_rows = done_rows;
    // Rows already answered by the interrupted run are skipped, not re-asked.
    let mut skip = csv::ByteRecord::new();
    let mut no_note = None;
    for _ in 0..done_rows {
        if !reader.next(&mut skip, &mut no_note)? {
            bail!(
                "{} holds more rows than {}: it is not this input's output",
                partial.display(),
                opts.input.display()
            );
        }
    }
    let bar = progress_bar(opts.progress, total_units);

    // The reader runs on its own thread and stays at most a few chunks ahead.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Chunk>>(opts.chunks_in_flight.max(1));
    let reading = format!(
        "reading {}; the rows before this point are answered in {}",
        opts.input.display(),
        partial.display()
    );
    let reader_task = spawn_reader(reader, opts.chunk_rows.max(1), read_units, tx, reading);

    let today = psi_core::CivilDate::today();
    let columns = headers.len();
    let recorder = log.map(|target| Recorder::new(target, opts.mode));
    let in_flight = opts.chunks_in_flight.max(1);
    let mut answered = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|chunk| {
            let (views, recorder) = (&views, recorder.as_ref());
            async move {
                let columns = Columns {
                    columns,
                    name: name_col,
                    id: id_col,
                };
                answer_recorded(views, recorder, chunk?, columns, today).await
            }
        })
        .buffered(in_flight);
    while let Some(item) = answered.next().await {
        let (chunk, answers, view, versions) = match item {
            Ok(Some(answered)) => answered,
            Ok(None) => continue,
            Err(e) => {
                drain(recorder.as_ref(), &mut answered, in_flight).await;
                return Err(e);
            }
        };
        views.note_answered(&mut summary, &view, versions);
        for (row, answer) in chunk.rows.iter().zip(answers) {
            // As many fields as the header, so the added columns line up
            // under their headers (a longer row is answered `invalid`).
            let mut out: csv::ByteRecord = row.iter().take(columns).collect();
            while out.len() < columns {
                out.push_field(b"");
            }
            summary.count(&answer);
            out.push_field(answer.result().as_bytes());
            out.push_field(answer.reason().unwrap_or("").as_bytes());
            sink.write(out)?;
        }
        // Each chunk reaches the file before the next: an interrupted run
        // loses at most the chunks in flight, which --resume asks again.
        sink.flush()?;
        bar.set_position(chunk.end_byte);
        let rate = summary.rows as f64 / started.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!("{} rows, {rate:.0} rows/s", summary.rows));
    }
    reader_task.await.context("input reader")?;
    bar.finish_and_clear();
    sink.finish(&partial, &out_headers, &opts.output).await?;
    psi_files::atomic::rename_durably(&partial, &opts.output)?;
    views.finish(&mut summary, started).await;
    Ok(summary)
}

/// The input's header, its rows, and its size in progress units (a CSV's
/// bytes, counted into `read_units` as they are read; a sheet's rows).
fn open_input(
    opts: &BatchOptions,
    encoding: Encoding,
    read_units: &Arc<std::sync::atomic::AtomicU64>,
) -> Result<(csv::ByteRecord, InputRows, u64)> {
    if is_xlsx(&opts.input) {
        let (headers, rows) = sheet_rows(opts)?;
        let n = rows.len() as u64;
        return Ok((headers, InputRows::Sheet(rows.into_iter()), n));
    }
    let file_len = std::fs::metadata(&opts.input)
        .with_context(|| format!("reading {}", opts.input.display()))?
        .len();
    let file = std::fs::File::open(&opts.input)
        .with_context(|| format!("opening {}", opts.input.display()))?;
    let mut reader =
        csv::ReaderBuilder::new()
            .flexible(true)
            .from_reader(psi_files::rows::RowGuard::new(
                Utf8Reader::new(
                    Counted {
                        inner: file,
                        count: Arc::clone(read_units),
                    },
                    encoding,
                ),
                opts.file.max_row_bytes,
            ));
    let headers = reader
        .byte_headers()
        .with_context(|| format!("reading the header of {}", opts.input.display()))?
        .clone();
    Ok((headers, InputRows::Csv(Box::new(reader)), file_len))
}

/// The name and ID columns' positions; an error when either is missing or
/// the input already has the columns the output adds.
fn name_and_id_columns(headers: &csv::ByteRecord, opts: &BatchOptions) -> Result<(usize, usize)> {
    let (Some(name_col), Some(id_col)) = (
        column(headers, opts.file.name_column.as_deref(), NAME_HEADERS),
        column(headers, opts.file.id_column.as_deref(), ID_HEADERS),
    ) else {
        bail!(
            "{} must start with a header naming the name column ({}) and the ID column ({}); name others with --name-column and --id-column",
            opts.input.display(),
            opts.file.name_column.as_deref().map_or_else(|| NAME_HEADERS.join(" or "), str::to_string),
            opts.file.id_column.as_deref().map_or_else(|| ID_HEADERS.join(" or "), str::to_string),
        );
    };
    if column(headers, Some("result"), &[]).is_some()
        || column(headers, Some("error"), &[]).is_some()
    {
        bail!(
            "{} already has a `result` or `error` column; rename it, the output adds these two",
            opts.input.display()
        );
    }
    Ok((name_col, id_col))
}

/// Where the answers go until the run completes (`partial`, 0600; a
/// workbook is kept in memory and written whole at the end), and how many
/// rows an interrupted run being resumed already answered.
fn open_output(
    opts: &BatchOptions,
    partial: &Path,
    out_headers: &csv::ByteRecord,
    encoding: Encoding,
) -> Result<(Sink, u64)> {
    if is_xlsx(&opts.output) {
        if opts.resume {
            bail!("an .xlsx output is written whole at the end and cannot be resumed; write a CSV output to use --resume");
        }
        return Ok((Sink::Sheet(Vec::new()), 0));
    }
    let done_rows = if partial.exists() {
        if !opts.resume {
            bail!(
                "{} exists from an interrupted run: pass --resume to continue it, or delete it",
                partial.display()
            );
        }
        resume_point(partial, out_headers, encoding)?
    } else {
        0
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(partial)
        .with_context(|| format!("opening {}", partial.display()))?;
    let new_file = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0) == 0;
    let mut writer = csv::Writer::from_writer(BufWriter::new(EncodingWriter::new(
        file, encoding, new_file,
    )));
    if done_rows == 0 && new_file {
        writer.write_byte_record(out_headers)?;
    }
    Ok((Sink::Csv(Box::new(writer)), done_rows))
}

/// A progress bar over `total` units, hidden unless `shown`.
fn progress_bar(shown: bool, total: u64) -> ProgressBar {
    let bar = if shown {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {percent:>3}% {msg} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Reads `reader` on a blocking thread, `chunk_rows` rows a chunk, into
/// `tx` (bounded: the reader stays at most a few chunks ahead). A read
/// error is sent with `reading` as its context and ends the reading.
fn spawn_reader(
    mut reader: InputRows,
    chunk_rows: usize,
    read_units: Arc<std::sync::atomic::AtomicU64>,
    tx: tokio::sync::mpsc::Sender<Result<Chunk>>,
    reading: String,
) -> tokio::task::JoinHandle<()> {
    let sheet_input = matches!(reader, InputRows::Sheet(_));
    tokio::task::spawn_blocking(move || loop {
        let mut rows = Vec::with_capacity(chunk_rows);
        let mut notes = Vec::with_capacity(chunk_rows);
        let mut record = csv::ByteRecord::new();
        let mut note = None;
        let mut failed = None;
        while rows.len() < chunk_rows {
            match reader.next(&mut record, &mut note) {
                // A compact copy: `record`'s buffer keeps the size of the
                // longest row read so far, and a clone would copy all of it.
                Ok(true) => {
                    rows.push(record.iter().collect());
                    notes.push(note.take());
                }
                Ok(false) => break,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if sheet_input {
            read_units.fetch_add(rows.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        let end_byte = read_units.load(std::sync::atomic::Ordering::Relaxed);
        if let Some(e) = failed {
            let _ = tx.blocking_send(Err(e.context(reading)));
            return;
        }
        if rows.is_empty() {
            return;
        }
        if tx
            .blocking_send(Ok(Chunk {
                rows,
                notes,
                end_byte,
            }))
            .is_err()
        {
            return;
        }
    })
}

/// Options of [`answer_pairs`].
#[derive(Debug, Clone)]
pub struct PairOptions {
    /// Sync or bucket mode.
    pub mode: QueryMode,
    /// Pairs per request.
    pub chunk_rows: usize,
    /// Requests in flight.
    pub chunks_in_flight: usize,
    /// Sync mode: as [`BatchOptions::max_cache_age`].
    pub max_cache_age: Duration,
}

impl Default for PairOptions {
    fn default() -> Self {
        Self {
            mode: QueryMode::Sync,
            chunk_rows: 8192,
            chunks_in_flight: 2,
            max_cache_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// Answers (name, ID) pairs held in memory, in order, as `run` answers a
/// file's rows (the library's batch: the Python package's `Client.batch`).
///
/// # Errors
/// As [`run`], less the files.
pub async fn answer_pairs<N, I>(
    session: &Session,
    pairs: &[(N, I)],
    opts: &PairOptions,
) -> Result<(Vec<CheckOutcome>, BatchSummary)>
where
    N: AsRef<str> + Sync,
    I: AsRef<str> + Sync,
{
    answer_pairs_logged(session, pairs, opts, None).await
}

/// [`answer_pairs`], each chunk recorded in `log` as [`run_logged`]
/// records a file's.
///
/// # Errors
/// As [`answer_pairs`], and a query log that cannot be written.
pub async fn answer_pairs_logged<N, I>(
    session: &Session,
    pairs: &[(N, I)],
    opts: &PairOptions,
    log: Option<&LogTarget>,
) -> Result<(Vec<CheckOutcome>, BatchSummary)>
where
    N: AsRef<str> + Sync,
    I: AsRef<str> + Sync,
{
    let started = Instant::now();
    let views = Views::open(session.clone(), opts.mode, opts.max_cache_age, false).await?;
    let mut summary = views.summary().await?;
    let today = psi_core::CivilDate::today();
    let views = &views;
    let recorder = log.map(|target| Recorder::new(target, opts.mode));
    let recorder = recorder.as_ref();
    let chunk_rows = opts.chunk_rows.max(1);
    let in_flight = opts.chunks_in_flight.max(1);
    let columns = Columns {
        columns: 2,
        name: 0,
        id: 1,
    };
    // Chunks by index: a stream of borrowed slices would make the future
    // depend on a higher-ranked lifetime, which the compiler cannot prove `Send`.
    let mut answered = futures::stream::iter((0..pairs.len()).step_by(chunk_rows))
        .map(|start| {
            let rows = pairs
                .get(start..pairs.len().min(start + chunk_rows))
                .unwrap_or(&[]);
            let chunk = Chunk {
                rows: rows
                    .iter()
                    .map(|(n, i)| [n.as_ref(), i.as_ref()].iter().collect())
                    .collect(),
                notes: vec![None; rows.len()],
                end_byte: 0,
            };
            answer_recorded(views, recorder, chunk, columns, today)
        })
        .buffered(in_flight);
    let mut answers = Vec::with_capacity(pairs.len());
    while let Some(item) = answered.next().await {
        let (_, chunk_answers, view, versions) = match item {
            Ok(Some(answered)) => answered,
            Ok(None) => continue,
            Err(e) => {
                drain(recorder, &mut answered, in_flight).await;
                return Err(e);
            }
        };
        views.note_answered(&mut summary, &view, versions);
        for answer in chunk_answers {
            summary.count(&answer);
            answers.push(answer);
        }
    }
    views.finish(&mut summary, started).await;
    Ok((answers, summary))
}

/// Cuts `partial` (written in `encoding`) back to its last complete row and
/// returns how many data rows it holds. A row is complete when its line
/// ended and it has every column; anything after the first incomplete row
/// is discarded.
fn resume_point(partial: &Path, headers: &csv::ByteRecord, encoding: Encoding) -> Result<u64> {
    let bytes = std::fs::read(partial).with_context(|| format!("reading {}", partial.display()))?;
    // A line break is one byte 0x0A in UTF-8 and GB18030 alike, never part
    // of another character.
    let end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let text = encoding::decode(bytes.get(..end).unwrap_or(&[]), encoding)
        .with_context(|| format!("reading {} as {encoding}", partial.display()))?;
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(text.as_bytes());
    if reader.byte_headers().ok() != Some(headers) {
        bail!(
            "{} does not start with this input's header plus result,error; not resuming",
            partial.display()
        );
    }
    let mut rows = 0u64;
    let mut keep = reader.position().byte();
    let mut record = csv::ByteRecord::new();
    while let Ok(true) = reader.read_byte_record(&mut record) {
        if record.len() != headers.len() {
            break;
        }
        rows += 1;
        keep = reader.position().byte();
    }
    // Back from the decoded text to the file's bytes.
    let kept = text
        .get(..usize::try_from(keep)?)
        .context("resume point inside a character")?;
    let bom = if bytes.starts_with(b"\xEF\xBB\xBF") && encoding != Encoding::Gb18030 {
        3
    } else {
        0
    };
    let keep_bytes = bom + encoding::encode(kept, encoding).len() as u64;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(partial)
        .with_context(|| format!("opening {}", partial.display()))?;
    file.set_len(keep_bytes)?;
    file.sync_all()?;
    Ok(rows)
}

/// The input's encoding: the one named (checked over the whole file), or
/// the one detected.
async fn input_encoding(input: &Path, named: Option<Encoding>) -> Result<Encoding> {
    let path = input.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<Encoding> {
        let what = || format!("reading {}", path.display());
        match named {
            Some(e) => {
                let file = std::fs::File::open(&path).with_context(what)?;
                encoding::validate(file, e).with_context(what)?;
                Ok(e)
            }
            None => Ok(encoding::detect(&path).with_context(what)?),
        }
    })
    .await
    .context("checking the input's encoding")?
}

/// How many data rows `opts.input` holds, its encoding and header checked
/// as [`run`] checks them: what a caller that limits a batch's rows (the
/// gateway's uploads) reads before anything is asked.
///
/// # Errors
/// As [`run`] for the input: unreadable, in neither encoding, a header
/// without the name or ID column, a row over the longest allowed.
pub async fn count_rows(opts: &BatchOptions) -> Result<u64> {
    let encoding = if is_xlsx(&opts.input) {
        Encoding::Utf8Bom
    } else {
        input_encoding(&opts.input, opts.file.encoding).await?
    };
    let opts = opts.clone();
    tokio::task::spawn_blocking(move || -> Result<u64> {
        let (headers, mut reader, _) = open_input(&opts, encoding, &Arc::default())?;
        name_and_id_columns(&headers, &opts)?;
        let (mut row, mut note, mut n) = (csv::ByteRecord::new(), None, 0u64);
        while reader.next(&mut row, &mut note)? {
            n += 1;
        }
        Ok(n)
    })
    .await
    .context("counting the input's rows")?
}

/// Rows in one Excel sheet.
const XLSX_MAX_ROWS: usize = 1 << 20;

/// Where answered rows go: a CSV file written as it goes (flushed after
/// every chunk, so a run can resume), or the rows of a sheet written whole
/// at the end.
enum Sink {
    Csv(Box<csv::Writer<BufWriter<EncodingWriter<std::fs::File>>>>),
    Sheet(Vec<Vec<String>>),
}

impl Sink {
    fn write(&mut self, row: csv::ByteRecord) -> Result<()> {
        match self {
            Sink::Csv(w) => Ok(w.write_byte_record(&row)?),
            Sink::Sheet(rows) => {
                // A sheet holds 1,048,576 rows, the header included: say so
                // at once rather than after the last answer.
                if rows.len() + 1 >= XLSX_MAX_ROWS {
                    bail!("an .xlsx sheet holds at most {XLSX_MAX_ROWS} rows: write a CSV output for this input");
                }
                // Fields came from UTF-8 text (decoded CSV or a sheet).
                rows.push(
                    row.iter()
                        .map(|f| String::from_utf8_lossy(f).into_owned())
                        .collect(),
                );
                Ok(())
            }
        }
    }

    fn flush(&mut self) -> Result<()> {
        match self {
            Sink::Csv(w) => Ok(w.flush()?),
            Sink::Sheet(_) => Ok(()),
        }
    }

    /// Completes `partial`: the CSV flushed and synced, or the workbook
    /// (headed by `out_headers`) written; `output` names the file in errors.
    async fn finish(
        self,
        partial: &Path,
        out_headers: &csv::ByteRecord,
        output: &Path,
    ) -> Result<()> {
        match self {
            Sink::Csv(writer) => {
                let mut inner = writer
                    .into_inner()
                    .map_err(|e| anyhow::anyhow!("writing {}: {e}", partial.display()))?;
                inner.flush()?;
                inner
                    .into_inner()
                    .map_err(|e| anyhow::anyhow!("writing {}: {e}", partial.display()))?
                    .finish()
                    .with_context(|| format!("writing {}", partial.display()))?
                    .sync_all()?;
            }
            Sink::Sheet(rows) => {
                let header: Vec<String> = out_headers
                    .iter()
                    .map(|h| String::from_utf8_lossy(h).into_owned())
                    .collect();
                let partial = partial.to_path_buf();
                tokio::task::spawn_blocking(move || {
                    psi_files::xlsx::write(&partial, "answers", &header, &rows)
                })
                .await
                .context("writing the workbook")?
                .with_context(|| format!("writing {}", output.display()))?;
            }
        }
        Ok(())
    }
}

/// Counts the bytes read (for the progress bar, in the file's own bytes).
struct Counted<R> {
    inner: R,
    count: Arc<std::sync::atomic::AtomicU64>,
}

impl<R: std::io::Read> std::io::Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

fn partial_path(output: &Path) -> PathBuf {
    let mut name = output
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".partial");
    output.with_file_name(name)
}

/// How a chunk's rows are answered: against the synced tag set, or by
/// asking the server (bucket or PIR mode).
enum Answering<'a> {
    Locally(&'a TagLookup),
    Remotely(QueryMode),
}

async fn answer_chunk(
    session: &Session,
    how: Answering<'_>,
    chunk: &Chunk,
    Columns {
        columns,
        name: name_col,
        id: id_col,
    }: Columns,
    today: psi_core::CivilDate,
) -> crate::error::Result<(Vec<CheckOutcome>, Option<(u64, u64)>)> {
    let parsed: Vec<Result<Record, String>> = chunk
        .rows
        .par_iter()
        .zip(&chunk.notes)
        .map(|(row, note)| {
            if let Some(note) = note {
                return Err(note.clone());
            }
            if row.len() > columns {
                return Err(format!(
                    "the row has {} fields but the header names {columns} (an unquoted comma?); the extra fields are not copied",
                    row.len()
                ));
            }
            let field = |i: usize, what: &str| {
                let raw = row
                    .get(i)
                    .ok_or_else(|| format!("the row has no {what} field"))?;
                std::str::from_utf8(raw).map_err(|_| format!("the {what} field is not valid UTF-8"))
            };
            let name = field(name_col, "name")?;
            let id = field(id_col, "id")?;
            Record::parse(name, id, today).map_err(|e| e.to_string())
        })
        .collect();
    let valid: Vec<Record> = parsed
        .iter()
        .filter_map(|p| p.as_ref().ok().cloned())
        .collect();
    let answers = match how {
        Answering::Locally(lookup) => {
            let inputs: Vec<Vec<u8>> = valid.iter().map(Record::encode).collect();
            let outputs = session.evaluate(inputs).await?;
            let found = outputs.iter().map(|o| lookup.contains(o.tag())).collect();
            crate::Answers {
                found,
                registry_versions: None,
            }
        }
        Answering::Remotely(QueryMode::Pir) => session.pir_check(&valid).await?,
        Answering::Remotely(_) => session.bucket_check(&valid).await?,
    };
    let mut found = answers.found.into_iter();
    let outcomes = parsed
        .into_iter()
        .map(|p| match p {
            Ok(_) => match found.next() {
                Some(true) => Ok(CheckOutcome::Match),
                Some(false) => Ok(CheckOutcome::NoMatch),
                None => Err(crate::Error::Internal(
                    "fewer answers than valid rows".into(),
                )),
            },
            Err(reason) => Ok(CheckOutcome::Invalid(reason)),
        })
        .collect::<crate::error::Result<Vec<_>>>()?;
    Ok((outcomes, answers.registry_versions))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_output_resumes_in_its_own_encoding() {
        let headers: csv::ByteRecord = ["姓名", "id", "result", "error"].iter().collect();
        let whole = "姓名,id,result,error\n张伟,1,match,\n李秀英,2,no_match,\n";
        for (encoding, bom) in [
            (Encoding::Gb18030, &b""[..]),
            (Encoding::Utf8Bom, &b"\xEF\xBB\xBF"[..]),
            (Encoding::Utf8, &b""[..]),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let partial = dir.path().join("out.csv.partial");
            let complete = [bom, &encoding::encode(whole, encoding)].concat();
            // A torn third row after the two complete ones.
            let torn = [complete.clone(), encoding::encode("王五,3,mat", encoding)].concat();
            std::fs::write(&partial, &torn).unwrap();
            assert_eq!(resume_point(&partial, &headers, encoding).unwrap(), 2);
            assert_eq!(std::fs::read(&partial).unwrap(), complete, "{encoding}");
        }
    }
}
