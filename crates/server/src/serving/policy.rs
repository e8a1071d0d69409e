//! Who may ask what: a TOML policy per institution (allowed modes, allowed
//! purpose codes, a rate in elements per second, a daily cap, a largest
//! batch), and the quota state that enforces it. Every OPRF evaluation is one
//! guess at a (name, ID) pair, so these limits are what bound an
//! institution's ability to enumerate the registry.
//!
//! ```toml
//! [institutions.bank-001]
//! modes = ["sync", "bucket", "pir"]
//! purposes = ["kyc-onboarding", "aml-recheck"]
//! rate_per_second = 2000   # elements, token bucket (burst: one second's worth)
//! daily_cap = 1000000      # elements per day (China Standard Time)
//! max_batch = 4096
//! ```
//!
//! The file is re-read on SIGHUP; a file that does not parse leaves the
//! previous policy in force. Quota state survives reloads. With the audit
//! trail in PostgreSQL (several replicas), the quota state is kept there
//! too, so the limits hold across replicas (see [`Enforcer::shared`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use tokio_postgres::types::Type;

use crate::serving::error::ServiceError;

/// One institution's rules.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    /// Allowed modes: `sync`, `bucket`, `pir`.
    pub modes: Vec<String>,
    /// Allowed purpose codes.
    pub purposes: Vec<String>,
    /// Elements per second (token bucket, burst one second's worth).
    pub rate_per_second: u64,
    /// Elements per day.
    pub daily_cap: u64,
    /// Largest batch in one request.
    pub max_batch: usize,
}

/// The whole policy file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Rules by institution id.
    #[serde(default)]
    pub institutions: BTreeMap<String, Rules>,
}

impl Policy {
    /// Reads and checks a policy file.
    ///
    /// # Errors
    /// Unreadable or invalid files, with the reason.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading policy file {}", path.display()))?;
        let policy: Policy = toml::from_str(&text)
            .with_context(|| format!("parsing policy file {}", path.display()))?;
        for (id, r) in &policy.institutions {
            if !crate::tools::ca::is_valid_institution(id) {
                bail!("policy: `{id}` is not a valid institution id");
            }
            if let Some(m) = r
                .modes
                .iter()
                .find(|m| !matches!(m.as_str(), "sync" | "bucket" | "pir"))
            {
                bail!("policy: institution {id}: unknown mode `{m}` (sync, bucket or pir)");
            }
            if let Some(p) = r
                .purposes
                .iter()
                .find(|p| !crate::serving::service::is_valid_purpose(p))
            {
                bail!(
                    "policy: institution {id}: `{p}` is not a purpose code (1-32 of a-z 0-9 _ -)"
                );
            }
            if r.rate_per_second == 0 || r.daily_cap == 0 || r.max_batch == 0 {
                bail!("policy: institution {id}: rate_per_second, daily_cap and max_batch must be at least 1");
            }
        }
        Ok(policy)
    }
}

/// One institution's quota state: a token bucket (elements per second,
/// burst one second's worth) and the elements used on the current day.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Quota {
    tokens: f64,
    /// When `tokens` was last brought up to date, in Unix milliseconds.
    refilled_ms: i64,
    /// The China Standard Time day `used_today` counts.
    day: i64,
    used_today: u64,
}

impl Quota {
    /// A full bucket and nothing used.
    fn fresh(rules: &Rules, now_ms: i64) -> Self {
        Self {
            tokens: rules.rate_per_second as f64,
            refilled_ms: now_ms,
            day: china_day(now_ms).0,
            used_today: 0,
        }
    }

    /// Takes `elements` at `now_ms` if the rate and the daily cap allow.
    fn take(&mut self, rules: &Rules, elements: u64, now_ms: i64) -> Result<(), ServiceError> {
        let (day, until_tomorrow) = china_day(now_ms);
        if self.day != day {
            self.day = day;
            self.used_today = 0;
        }
        let rate = rules.rate_per_second as f64;
        let elapsed = (now_ms - self.refilled_ms).max(0) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate).min(rate.max(elements as f64));
        self.refilled_ms = self.refilled_ms.max(now_ms);
        if self.used_today + elements > rules.daily_cap {
            return Err(ServiceError::QuotaExhausted {
                what: format!("daily cap of {} elements", rules.daily_cap),
                retry_after: until_tomorrow,
            });
        }
        let need = elements as f64;
        if self.tokens < need {
            let wait = Duration::from_secs_f64((need - self.tokens) / rate);
            return Err(ServiceError::QuotaExhausted {
                what: format!("rate of {} elements per second", rules.rate_per_second),
                retry_after: wait,
            });
        }
        self.tokens -= need;
        self.used_today += elements;
        Ok(())
    }
}

/// Where the quota state lives.
enum Quotas {
    /// In this process: one server.
    Local(Mutex<HashMap<String, Quota>>),
    /// In PostgreSQL, shared by every replica: each request's elements are
    /// taken in one transaction holding the institution's row, so the rate
    /// and the daily cap hold across replicas exactly.
    Shared(SharedQuotas),
}

/// Connections a replica keeps to the quota table: quota checks of
/// different institutions run in parallel on them (those of one institution
/// wait for each other on its row anyway). With the audit writer's one, a
/// replica holds up to `QUOTA_CONNECTIONS + 1` PostgreSQL connections.
pub const QUOTA_CONNECTIONS: usize = 4;

/// The quota table in PostgreSQL and this replica's connections to it
/// (opened when first needed, again after one is lost).
struct SharedQuotas {
    url: String,
    clients: Arc<[Mutex<Option<psi_pg::Pg>>]>,
}

const QUOTA_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS quota (
        institution TEXT PRIMARY KEY,
        tokens DOUBLE PRECISION NOT NULL,
        refilled_ms BIGINT NOT NULL,
        day BIGINT NOT NULL,
        used_today BIGINT NOT NULL
    )";

/// The database's clock, in Unix milliseconds: every replica reads the same one.
const DB_NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

impl SharedQuotas {
    fn connect(url: &str) -> Result<psi_pg::Pg> {
        let mut c = psi_pg::Pg::connect(url, "the shared quotas", psi_pg::Use::Serving)?;
        // Replicas starting together would race to create the table.
        c.batch_execute("BEGIN")?;
        c.execute("SELECT pg_advisory_xact_lock(7365)", &[])?;
        c.batch_execute(QUOTA_SCHEMA)?;
        c.batch_execute("COMMIT")?;
        Ok(c)
    }

    /// Takes `elements` from `institution`'s shared quota (blocking: run it
    /// off the async workers).
    fn take(&self, institution: &str, rules: &Rules, elements: u64) -> Result<(), ServiceError> {
        // A free connection, else the institution's own one to wait for.
        let own = institution
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b.into()))
            .checked_rem(self.clients.len())
            .and_then(|i| self.clients.get(i));
        let mut slot = match self.clients.iter().find_map(|c| c.try_lock().ok()) {
            Some(free) => free,
            None => own
                .ok_or(ServiceError::Internal)?
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        };
        if slot.as_ref().is_none_or(psi_pg::Pg::is_closed) {
            *slot = Some(Self::connect(&self.url).map_err(|e| {
                tracing::error!("shared quotas: {e:#}");
                ServiceError::Unavailable("the shared quota database is out of reach".into())
            })?);
        }
        let Some(client) = slot.as_mut() else {
            return Err(ServiceError::Internal);
        };
        let unreachable = |e: anyhow::Error| {
            tracing::error!("shared quotas: {e:#}");
            ServiceError::Unavailable("the shared quota database is out of reach".into())
        };
        // Two round trips: BEGIN with the row (created full if new, locked
        // until the end, with the database's clock), then the new state
        // with COMMIT.
        let row = client
            .begin_with(
                &format!(
                    "INSERT INTO quota (institution, tokens, refilled_ms, day, used_today)
                     VALUES ($1, $2, {DB_NOW_MS}, -1, 0)
                     ON CONFLICT (institution) DO UPDATE SET institution = EXCLUDED.institution
                     RETURNING tokens, refilled_ms, day, used_today, {DB_NOW_MS}"
                ),
                &[
                    (&institution, Type::TEXT),
                    (&(rules.rate_per_second as f64), Type::FLOAT8),
                ],
            )
            .inspect_err(|_| {
                let _ = client.batch_execute("ROLLBACK");
            })
            .map_err(unreachable)?;
        let read = || -> Result<(Quota, i64)> {
            Ok((
                Quota {
                    tokens: row.try_get(0)?,
                    refilled_ms: row.try_get(1)?,
                    day: row.try_get(2)?,
                    used_today: u64::try_from(row.try_get::<_, i64>(3)?).unwrap_or(0),
                },
                row.try_get(4)?,
            ))
        };
        let (mut quota, now_ms) = match read() {
            Ok(read) => read,
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK");
                return Err(unreachable(e));
            }
        };
        // A new row's day is -1: the first take starts its day.
        let taken = quota.take(rules, elements, now_ms);
        client
            .commit_with(
                "UPDATE quota SET tokens = $2, refilled_ms = $3, day = $4, used_today = $5 WHERE institution = $1",
                &[
                    (&institution, Type::TEXT),
                    (&quota.tokens, Type::FLOAT8),
                    (&quota.refilled_ms, Type::INT8),
                    (&quota.day, Type::INT8),
                    (&i64::try_from(quota.used_today).unwrap_or(i64::MAX), Type::INT8),
                ],
            )
            .map_err(unreachable)?;
        taken
    }
}

/// The policy in force and every institution's quota.
pub struct Enforcer {
    policy: Mutex<Option<Policy>>,
    quotas: Arc<Quotas>,
}

impl Default for Enforcer {
    fn default() -> Self {
        Self::new(None)
    }
}

impl std::fmt::Debug for Enforcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enforcer").finish_non_exhaustive()
    }
}

/// The China Standard Time day of `now_ms` and the time left in it.
fn china_day(now_ms: i64) -> (i64, Duration) {
    let secs = now_ms.div_euclid(1000) + 8 * 3600;
    let day = secs.div_euclid(86_400);
    let left = u64::try_from(86_400 - secs.rem_euclid(86_400)).unwrap_or(86_400);
    (day, Duration::from_secs(left))
}

fn now_ms() -> i64 {
    crate::serving::audit::unix_ms(std::time::SystemTime::now())
}

impl Enforcer {
    /// An enforcer for `policy` (`None`: no limits, for local use) keeping
    /// quotas in this process.
    #[must_use]
    pub fn new(policy: Option<Policy>) -> Self {
        Self {
            policy: Mutex::new(policy),
            quotas: Arc::new(Quotas::Local(Mutex::new(HashMap::new()))),
        }
    }

    /// An enforcer keeping quotas in the PostgreSQL database at `url`,
    /// shared with every replica that names the same database.
    ///
    /// # Errors
    /// The database cannot be reached or its table created.
    pub fn shared(policy: Option<Policy>, url: &str) -> Result<Self> {
        let client = SharedQuotas::connect(url)?;
        Ok(Self {
            policy: Mutex::new(policy),
            quotas: Arc::new(Quotas::Shared(SharedQuotas {
                url: url.to_string(),
                clients: std::iter::once(Some(client))
                    .chain(std::iter::repeat_with(|| None))
                    .take(QUOTA_CONNECTIONS)
                    .map(Mutex::new)
                    .collect(),
            })),
        })
    }

    /// Replaces the policy (quota state is kept).
    pub fn replace(&self, policy: Policy) {
        *self
            .policy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(policy);
    }

    /// The rules for a request, checked against everything but the quotas;
    /// `None` when no policy is in force.
    fn rules(
        &self,
        institution: &str,
        mode: &str,
        purpose: &str,
        elements: u64,
    ) -> Result<Option<Rules>, ServiceError> {
        let rules = {
            let policy = self
                .policy
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let Some(policy) = policy.as_ref() else {
                return Ok(None);
            };
            policy
                .institutions
                .get(institution)
                .cloned()
                .ok_or_else(|| {
                    ServiceError::PermissionDenied(format!(
                        "institution {institution} is not authorised to query"
                    ))
                })?
        };
        if !rules.modes.iter().any(|m| m == mode) {
            return Err(ServiceError::PermissionDenied(format!(
                "institution {institution} may not use {mode} mode (allowed: {})",
                rules.modes.join(", ")
            )));
        }
        if !rules.purposes.iter().any(|p| p == purpose) {
            return Err(ServiceError::PermissionDenied(format!(
                "purpose {purpose} is not authorised for institution {institution} (allowed: {})",
                rules.purposes.join(", ")
            )));
        }
        if elements > rules.max_batch as u64 {
            return Err(ServiceError::InvalidArgument(format!(
                "batch of {elements} elements exceeds institution {institution}'s maximum of {}",
                rules.max_batch
            )));
        }
        Ok(Some(rules))
    }

    /// Checks one request and takes its elements from the quotas.
    ///
    /// # Errors
    /// `PermissionDenied` for an unknown institution or a mode or purpose it
    /// may not use; `InvalidArgument` for a batch over its maximum;
    /// `ResourceExhausted` with the delay after which to retry;
    /// `Unavailable` when the shared quota database is out of reach.
    pub async fn admit(
        &self,
        institution: &str,
        mode: &str,
        purpose: &str,
        elements: u64,
    ) -> Result<(), ServiceError> {
        let Some(rules) = self.rules(institution, mode, purpose, elements)? else {
            return Ok(());
        };
        match &*self.quotas {
            Quotas::Local(quotas) => {
                let now = now_ms();
                let mut quotas = quotas
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                quotas
                    .entry(institution.to_string())
                    .or_insert_with(|| Quota::fresh(&rules, now))
                    .take(&rules, elements, now)
            }
            Quotas::Shared(_) => {
                let quotas = Arc::clone(&self.quotas);
                let institution = institution.to_string();
                tokio::task::spawn_blocking(move || match &*quotas {
                    Quotas::Shared(shared) => shared.take(&institution, &rules, elements),
                    Quotas::Local(_) => Err(ServiceError::Internal),
                })
                .await
                .map_err(|_| ServiceError::Internal)?
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Result<Policy> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("policy.toml");
        std::fs::write(&p, text).unwrap();
        Policy::load(&p)
    }

    const BANK: &str = r#"
[institutions.bank-001]
modes = ["sync"]
purposes = ["kyc"]
rate_per_second = 100
daily_cap = 250
max_batch = 100
"#;

    #[tokio::test]
    async fn rules_are_enforced_with_precise_refusals() {
        let e = Enforcer::new(Some(policy(BANK).unwrap()));
        assert!(e.admit("bank-001", "sync", "kyc", 100).await.is_ok());
        let err = |r: Result<(), ServiceError>| r.unwrap_err().to_string();
        assert!(err(e.admit("bank-002", "sync", "kyc", 1).await).contains("not authorised"));
        assert!(
            err(e.admit("bank-001", "bucket", "kyc", 1).await).contains("may not use bucket mode")
        );
        assert!(err(e.admit("bank-001", "sync", "marketing", 1).await)
            .contains("purpose marketing is not authorised"));
        assert!(err(e.admit("bank-001", "sync", "kyc", 101).await).contains("maximum of 100"));
        // The bucket is empty right after 100 elements: retry in about a second.
        match e.admit("bank-001", "sync", "kyc", 100).await {
            Err(ServiceError::QuotaExhausted { retry_after, .. }) => {
                assert!(retry_after > Duration::from_millis(500))
            }
            other => panic!("{other:?}"),
        }
        assert!(Enforcer::new(None)
            .admit("anyone", "bucket", "x", 1_000_000)
            .await
            .is_ok());
    }

    /// The token bucket refills with the clock it is given, and the daily
    /// cap counts a China Standard Time day: no sleeping, the times are told.
    #[test]
    fn quotas_refill_by_the_clock_and_the_daily_cap_resets_at_midnight_cst() {
        let policy = policy(BANK).unwrap();
        let rules = &policy.institutions["bank-001"];
        // 2026-12-02 00:00:00 CST, in Unix milliseconds.
        let midnight: i64 = 1_796_140_800_000;
        let mut q = Quota::fresh(rules, midnight);
        assert!(q.take(rules, 100, midnight).is_ok());
        match q.take(rules, 100, midnight + 500) {
            Err(ServiceError::QuotaExhausted { what, retry_after }) => {
                assert!(what.contains("rate of 100"), "{what}");
                // Half a second refilled 50 of the 100 needed.
                assert_eq!(retry_after, Duration::from_millis(500));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            q.take(rules, 100, midnight + 1_000).is_ok(),
            "refilled after a second"
        );
        // 200 used today; 100 more would pass the daily cap of 250, whatever
        // the rate allows.
        match q.take(rules, 100, midnight + 60_000) {
            Err(ServiceError::QuotaExhausted { what, retry_after }) => {
                assert!(what.contains("daily cap of 250"), "{what}");
                assert_eq!(retry_after, Duration::from_secs(24 * 3600 - 60));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            q.take(rules, 50, midnight + 60_000).is_ok(),
            "up to the cap"
        );
        // The next CST day starts afresh.
        assert!(q.take(rules, 100, midnight + 24 * 3600 * 1000).is_ok());
    }

    #[test]
    fn bad_policy_files_say_what_is_wrong() {
        assert!(policy("[institutions.b]\nmodes=[\"psi\"]\npurposes=[]\nrate_per_second=1\ndaily_cap=1\nmax_batch=1\n").unwrap_err().to_string().contains("unknown mode"));
        assert!(policy("[institutions.b]\nmodes=[]\npurposes=[\"KYC\"]\nrate_per_second=1\ndaily_cap=1\nmax_batch=1\n").unwrap_err().to_string().contains("not a purpose code"));
        assert!(
            format!("{:#}", policy("[institutions.b]\nmodes=[]\n").unwrap_err())
                .contains("missing field")
        );
        assert_eq!(policy("").unwrap(), Policy::default());
    }
}
