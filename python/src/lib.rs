//! `psi_match._native`: the Rust half of the Python package. The client
//! side is `psi-client`'s own [`Session`], check and batch code, so Python
//! and the command line give the same answers; the research primitives are
//! `psi-core`'s. `psi_match/__init__.py` adds the Pythonic surface (the
//! `Client` class, answers as objects, pandas DataFrames).
//!
//! Every call that waits on the network releases the GIL, and wakes every
//! 100 ms to let Ctrl-C (`KeyboardInterrupt`) stop it.

use std::future::Future;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use psi_client::batch::{answer_pairs_logged, PairOptions};
use psi_client::check::{check, CheckOutcome};
use psi_client::cli::ServerArgs;
use psi_client::querylog::{LogTarget, QueryLog};
use psi_client::{QueryMode, Session as ClientSession};
use psi_core::suite::{BlindedElement, EvaluatedElement, Mode};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;

create_exception!(
    psi_match,
    PsiError,
    PyException,
    "A failure talking to the service (connection, TLS, refusal, proof), never an answer."
);

/// The runtime the sessions' requests run on: one for the process, as many
/// workers as the machine has cores (at most 4; the work is the server's).
fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get().min(4)))
        .thread_name("psi-match")
        .enable_all()
        .build()
        .map_err(|e| PsiError::new_err(format!("starting the I/O runtime: {e}")))?;
    Ok(RUNTIME.get_or_init(|| rt))
}

/// Runs `work` without the GIL, stopping for Ctrl-C.
fn wait<T: Send, E: Into<anyhow::Error> + Send>(
    py: Python<'_>,
    work: impl Future<Output = Result<T, E>> + Send,
) -> PyResult<T> {
    let rt = runtime()?;
    py.detach(|| {
        rt.block_on(async {
            let mut work = std::pin::pin!(work);
            loop {
                tokio::select! {
                    done = &mut work => return done.map_err(|e| PsiError::new_err(format!("{:#}", e.into()))),
                    () = tokio::time::sleep(Duration::from_millis(100)) => {
                        Python::attach(|py| py.check_signals())?;
                    }
                }
            }
        })
    })
}

fn query_mode(mode: &str) -> PyResult<QueryMode> {
    match mode {
        "bucket" => Ok(QueryMode::Bucket),
        "sync" => Ok(QueryMode::Sync),
        "pir" => Ok(QueryMode::Pir),
        other => Err(PyValueError::new_err(format!(
            "mode must be \"bucket\", \"sync\" or \"pir\", not {other:?}"
        ))),
    }
}

/// `(result, error)`, as [`answer`] gives it.
type PyAnswer = (&'static str, Option<String>);

/// Evaluated elements and the proof, as bytes.
type PyEvaluation = (Vec<Vec<u8>>, Option<Vec<u8>>);

/// An answer as `(result, error)`: `("match", None)`, `("no_match", None)`
/// or `("invalid", reason)`, the words of the CLI's `result` column.
fn answer(outcome: CheckOutcome) -> PyAnswer {
    (outcome.result(), outcome.reason().map(str::to_string))
}

/// A connection to a psi-server (the CLI's session: pinned key, verified
/// proofs, key rotations followed, the tag set cached in the cache directory).
#[pyclass(frozen, module = "psi_match._native")]
struct Session {
    session: ClientSession,
    summary: String,
    /// The institution's query log, when given: every check recorded.
    log: Option<LogTarget>,
}

#[pymethods]
impl Session {
    /// Connects with the settings given, the rest from the environment
    /// (`PSI_SERVER`, `PSI_PURPOSE`, ...) and the config file, as the CLI
    /// does (arguments > environment > file > defaults).
    #[new]
    #[pyo3(signature = (server=None, purpose=None, tls_ca=None, tls_cert=None, tls_key=None, pin_key=None, cache_dir=None, concurrency=None, config=None, pin_exact=None, query_log=None, staff=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        server: Option<String>,
        purpose: Option<String>,
        tls_ca: Option<PathBuf>,
        tls_cert: Option<PathBuf>,
        tls_key: Option<PathBuf>,
        pin_key: Option<String>,
        cache_dir: Option<PathBuf>,
        concurrency: Option<usize>,
        config: Option<PathBuf>,
        pin_exact: Option<bool>,
        query_log: Option<PathBuf>,
        staff: Option<String>,
    ) -> PyResult<Self> {
        let args = ServerArgs {
            config,
            server,
            pin_key,
            pin_exact,
            cache_dir,
            concurrency,
            purpose,
            tls_ca,
            tls_cert,
            tls_key,
        }
        .with_environment()
        .map_err(|e| PyValueError::new_err(format!("{e:#}")))?;
        let effective = args
            .effective()
            .map_err(|e| PyValueError::new_err(format!("{e:#}")))?;
        let options = effective
            .options()
            .map_err(|e| PyValueError::new_err(format!("{e:#}")))?;
        let log = match query_log {
            Some(path) => Some(LogTarget {
                log: QueryLog::open(&path).map_err(|e| PyValueError::new_err(format!("{e:#}")))?,
                staff: staff.unwrap_or_else(|| "unnamed".into()),
                caller: "psi_match".into(),
                purpose: options.purpose.clone(),
            }),
            None => None,
        };
        let session = wait(py, ClientSession::connect(options))?;
        Ok(Self {
            session,
            summary: effective.to_string(),
            log,
        })
    }

    /// The settings in force and where each came from (no secrets).
    fn settings(&self) -> String {
        self.summary.clone()
    }

    /// Whether the server's key was trusted on first use by this connection
    /// (compare it with the key the operator published).
    fn trusted_on_first_use(&self) -> bool {
        self.session.pinned == psi_client::pin::Pinned::FirstUse
    }

    /// The server's parameters, as a dict.
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
        let info = self.session.info();
        let d = pyo3::types::PyDict::new(py);
        d.set_item("ciphersuite", &info.ciphersuite)?;
        d.set_item("public_key", hex::encode(&info.public_key))?;
        d.set_item("key_epoch", info.key_epoch)?;
        d.set_item("registry_version", info.registry_version)?;
        d.set_item("registry_size", info.registry_size)?;
        d.set_item("bucket_prefix_bits", info.bucket_prefix_bits)?;
        d.set_item("max_batch", info.max_batch)?;
        d.set_item("max_bucket_batch", info.max_bucket_batch)?;
        d.set_item("tag_bits", info.tag_bits)?;
        // psi.v1.QueryMode numbers.
        let modes: Vec<&str> = info
            .modes
            .iter()
            .filter_map(|m| match m {
                1 => Some("sync"),
                2 => Some("bucket"),
                3 => Some("pir"),
                _ => None,
            })
            .collect();
        d.set_item("modes", modes)?;
        Ok(d)
    }

    /// One pair's answer as `(result, error)`.
    fn check(&self, py: Python<'_>, name: &str, id: &str, mode: &str) -> PyResult<PyAnswer> {
        let mode = query_mode(mode)?;
        match &self.log {
            None => wait(py, check(&self.session, name, id, mode)).map(answer),
            Some(target) => {
                let (outcome, _) = wait(
                    py,
                    target.check(&self.session, name, id, mode, |s| async move {
                        check(&s, name, id, mode).await
                    }),
                )?;
                outcome
                    .map(answer)
                    .map_err(|e| PsiError::new_err(format!("{e:#}")))
            }
        }
    }

    /// With a query log: records pairs answered invalid without being sent
    /// (the package's own checks of a row's cells), as the CLI records a
    /// batch's invalid rows. Without one, does nothing.
    fn record_invalid(
        &self,
        py: Python<'_>,
        pairs: Vec<(String, String)>,
        mode: &str,
    ) -> PyResult<()> {
        let Some(target) = &self.log else {
            return Ok(());
        };
        let mode = query_mode(mode)?;
        let records = pairs
            .iter()
            .map(|(name, id)| {
                let mut r = target.record(mode, name, id);
                r.result = "invalid".into();
                r
            })
            .collect();
        wait(py, target.append(records))
    }

    /// Every pair's answer as `(result, error)`, in order, and the batch's
    /// summary line.
    #[pyo3(signature = (pairs, mode, chunk_rows=8192, max_cache_age_secs=86400))]
    fn batch(
        &self,
        py: Python<'_>,
        pairs: Vec<(String, String)>,
        mode: &str,
        chunk_rows: usize,
        max_cache_age_secs: u64,
    ) -> PyResult<(Vec<PyAnswer>, String)> {
        let opts = PairOptions {
            mode: query_mode(mode)?,
            chunk_rows: chunk_rows.max(1),
            max_cache_age: Duration::from_secs(max_cache_age_secs),
            ..PairOptions::default()
        };
        let (answers, summary) = wait(
            py,
            answer_pairs_logged(&self.session, &pairs, &opts, self.log.as_ref()),
        )?;
        Ok((
            answers.into_iter().map(answer).collect(),
            summary.to_string(),
        ))
    }

    /// PRF outputs (64 bytes each) for arbitrary inputs, evaluated by the
    /// server with verified proofs: the service's OPRF as a research tool.
    fn evaluate(&self, py: Python<'_>, inputs: Vec<Vec<u8>>) -> PyResult<Vec<Vec<u8>>> {
        let outputs = wait(py, self.session.evaluate(inputs))?;
        Ok(outputs.iter().map(|o| o.as_bytes().to_vec()).collect())
    }

    /// Brings the cached tag set up to date and returns it.
    fn sync(&self, py: Python<'_>) -> PyResult<TagSet> {
        let synced = wait(py, self.session.sync())?;
        Ok(TagSet { set: synced.set })
    }
}

fn core_err(e: psi_core::Error) -> PyErr {
    PyValueError::new_err(e.to_string())
}

fn oprf_mode(mode: &str) -> PyResult<Mode> {
    match mode {
        "voprf" => Ok(Mode::Voprf),
        "oprf" => Ok(Mode::Oprf),
        other => Err(PyValueError::new_err(format!(
            "mode must be \"voprf\" or \"oprf\", not {other:?}"
        ))),
    }
}

fn elements<T>(
    items: &[Vec<u8>],
    parse: impl Fn(&[u8], usize) -> psi_core::Result<T>,
) -> PyResult<Vec<T>> {
    items
        .iter()
        .enumerate()
        .map(|(i, b)| parse(b, i).map_err(core_err))
        .collect()
}

/// The canonical encoding of a (name, ID) pair: the OPRF input both sides
/// compute. Raises ValueError for a pair that is not valid, with the reason.
#[pyfunction]
fn encode_record(name: &str, id: &str) -> PyResult<Vec<u8>> {
    psi_core::Record::parse(name, id, psi_core::CivilDate::today())
        .map(|r| r.encode())
        .map_err(core_err)
}

/// The bucket of an encoded record: the first `prefix_bits` bits of
/// SHA-256("psi.v1.bucket" || encoding), as bucket mode sends it.
#[pyfunction]
fn bucket(encoded: &[u8], prefix_bits: u8) -> PyResult<u32> {
    if !(1..=32).contains(&prefix_bits) {
        return Err(PyValueError::new_err("prefix_bits must be 1 to 32"));
    }
    Ok(psi_core::record::bucket_of_encoding(encoded, prefix_bits))
}

/// The 64-bit tag of a PRF output (its first 8 bytes, big-endian).
#[pyfunction]
fn tag(output: &[u8]) -> PyResult<u64> {
    let output: &[u8; 64] = output
        .try_into()
        .map_err(|_| PyValueError::new_err("a PRF output is 64 bytes"))?;
    Ok(psi_core::Tag::from_output(output).0)
}

/// An OPRF key: the server's side of the protocol, for experiments. Its
/// secret never leaves this object (no repr, no export).
#[pyclass(frozen, module = "psi_match._native")]
struct ServerKey {
    server: psi_core::Server,
}

#[pymethods]
impl ServerKey {
    /// A fresh random key.
    #[staticmethod]
    #[pyo3(signature = (mode="voprf"))]
    fn generate(mode: &str) -> PyResult<Self> {
        let key = psi_core::ServerKey::generate(&mut rand_core::OsRng);
        Ok(Self {
            server: psi_core::Server::new(oprf_mode(mode)?, key),
        })
    }

    /// RFC 9497 `DeriveKeyPair(seed, info)`: the same seed and info give the
    /// same key (as in docs/vectors/psi-v1.json).
    #[staticmethod]
    #[pyo3(signature = (seed, info, mode="voprf"))]
    fn derive(seed: &[u8], info: &[u8], mode: &str) -> PyResult<Self> {
        let mode = oprf_mode(mode)?;
        let seed: &[u8; 32] = seed
            .try_into()
            .map_err(|_| PyValueError::new_err("the seed is 32 bytes"))?;
        let key = psi_core::ServerKey::derive(mode, seed, info).map_err(core_err)?;
        Ok(Self {
            server: psi_core::Server::new(mode, key),
        })
    }

    /// The public key pkS (32 bytes).
    #[getter]
    fn public_key(&self) -> Vec<u8> {
        self.server.public_key().to_bytes().to_vec()
    }

    /// `BlindEvaluate`: the evaluated elements and, in VOPRF mode, the
    /// batch's proof (None in OPRF mode).
    fn blind_evaluate(&self, py: Python<'_>, blinded: Vec<Vec<u8>>) -> PyResult<PyEvaluation> {
        let blinded = elements(&blinded, BlindedElement::from_slice)?;
        let evaluation = py
            .detach(|| self.server.blind_evaluate(&blinded, &mut rand_core::OsRng))
            .map_err(core_err)?;
        Ok((
            evaluation.elements.iter().map(|e| e.0.to_vec()).collect(),
            evaluation.proof.map(|p| p.to_bytes().to_vec()),
        ))
    }

    /// The PRF output for `input` computed directly with the key (what a
    /// client learns through blind, evaluate and finalize).
    fn evaluate(&self, input: &[u8]) -> PyResult<Vec<u8>> {
        self.server
            .evaluate(input)
            .map(|o| o.as_bytes().to_vec())
            .map_err(core_err)
    }

    fn __repr__(&self) -> String {
        format!(
            "ServerKey(public_key={})",
            self.server.public_key().to_hex()
        )
    }
}

/// The client's secret state between `blind` and `finalize`; used once.
#[pyclass(module = "psi_match._native")]
struct BlindState {
    client: psi_core::Client,
    state: Option<psi_core::BlindState>,
    inputs: Vec<Vec<u8>>,
}

#[pymethods]
impl BlindState {
    /// `Finalize`: verifies the proof (VOPRF mode; pass None in OPRF mode),
    /// unblinds and hashes: the 64-byte PRF outputs, in input order.
    /// Raises ValueError if the proof does not verify.
    #[pyo3(signature = (evaluated, proof))]
    fn finalize(
        &mut self,
        py: Python<'_>,
        evaluated: Vec<Vec<u8>>,
        proof: Option<Vec<u8>>,
    ) -> PyResult<Vec<Vec<u8>>> {
        let state = self
            .state
            .take()
            .ok_or_else(|| PyValueError::new_err("this blind state was finalized already"))?;
        let evaluated = elements(&evaluated, EvaluatedElement::from_slice)?;
        let (client, inputs) = (&self.client, &self.inputs);
        let outputs = py
            .detach(|| match proof {
                Some(proof) => psi_core::Proof::from_bytes(&proof)
                    .and_then(|p| client.finalize(state, inputs, &evaluated, &p)),
                None => client.finalize_unverified(state, inputs, &evaluated),
            })
            .map_err(core_err)?;
        Ok(outputs.iter().map(|o| o.as_bytes().to_vec()).collect())
    }

    fn __len__(&self) -> usize {
        self.inputs.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "BlindState({} inputs{})",
            self.inputs.len(),
            if self.state.is_some() {
                ""
            } else {
                ", finalized"
            }
        )
    }
}

/// `Blind`: blinds `inputs` for the server whose public key is `public_key`;
/// returns the state to finalize with and the blinded elements to send.
#[pyfunction]
#[pyo3(signature = (public_key, inputs, mode="voprf"))]
fn blind(
    py: Python<'_>,
    public_key: &[u8],
    inputs: Vec<Vec<u8>>,
    mode: &str,
) -> PyResult<(BlindState, Vec<Vec<u8>>)> {
    let public_key = psi_core::PublicKey::from_bytes(public_key).map_err(core_err)?;
    let client = psi_core::Client::new(oprf_mode(mode)?, public_key);
    let (state, blinded) = py
        .detach(|| client.blind(&inputs, psi_core::Blinding::Additive, &mut rand_core::OsRng))
        .map_err(core_err)?;
    Ok((
        BlindState {
            client,
            state: Some(state),
            inputs,
        },
        blinded.iter().map(|b| b.0.to_vec()).collect(),
    ))
}

/// A tag set: the compact, sharded set of 64-bit tags sync mode downloads
/// (docs/PROTOCOL.md gives its bytes).
#[pyclass(frozen, module = "psi_match._native")]
struct TagSet {
    set: psi_core::TagSet,
}

#[pymethods]
impl TagSet {
    /// Builds a tag set from tags (as `tag()` gives them).
    #[new]
    #[pyo3(signature = (tags, epoch=0, registry_version=0))]
    fn new(tags: Vec<u64>, epoch: u64, registry_version: u64) -> PyResult<Self> {
        let tags: Vec<psi_core::Tag> = tags.into_iter().map(psi_core::Tag).collect();
        Ok(Self {
            set: psi_core::TagSet::build(&tags, epoch, registry_version).map_err(core_err)?,
        })
    }

    /// Reads a tag set's bytes, checking every digest.
    #[staticmethod]
    fn from_bytes(data: &[u8]) -> PyResult<Self> {
        Ok(Self {
            set: psi_core::TagSet::from_bytes(data).map_err(core_err)?,
        })
    }

    /// The tag set's bytes.
    fn to_bytes(&self) -> Vec<u8> {
        self.set.to_bytes()
    }

    /// Whether the set holds `tag` (false positives at most 2^-32 per query).
    fn __contains__(&self, tag: u64) -> PyResult<bool> {
        self.set.contains(psi_core::Tag(tag)).map_err(core_err)
    }

    fn __len__(&self) -> usize {
        usize::try_from(self.set.len()).unwrap_or(usize::MAX)
    }

    /// The root digest over the header and every shard digest.
    #[getter]
    fn root_digest(&self) -> Vec<u8> {
        self.set.root_digest().to_vec()
    }

    /// Each shard's digest, in shard order.
    #[getter]
    fn shard_digests(&self) -> Vec<Vec<u8>> {
        self.set
            .shards()
            .iter()
            .map(|s| s.digest().to_vec())
            .collect()
    }

    /// The key epoch the tags were computed under.
    #[getter]
    fn epoch(&self) -> u64 {
        self.set.header().epoch
    }

    /// The registry version the set describes.
    #[getter]
    fn registry_version(&self) -> u64 {
        self.set.header().registry_version
    }

    fn __repr__(&self) -> String {
        format!(
            "TagSet({} tags, {} shards, epoch {}, registry version {})",
            self.set.len(),
            self.set.shards().len(),
            self.set.header().epoch,
            self.set.header().registry_version
        )
    }
}

/// The Rust half of `psi_match`.
/// Checks a query log's hash chain; returns its number of records.
#[pyfunction]
fn verify_log(path: PathBuf) -> PyResult<u64> {
    psi_client::querylog::verify(&path).map_err(|e| PsiError::new_err(format!("{e:#}")))
}

#[pymodule]
mod _native {
    #[pymodule_export]
    use super::{
        blind, bucket, encode_record, tag, verify_log, BlindState, PsiError, ServerKey, Session,
        TagSet,
    };
}
