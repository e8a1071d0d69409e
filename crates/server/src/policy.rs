//! Who may ask what: a TOML policy per institution (allowed modes, allowed
//! purpose codes, a rate in elements per second, a daily cap, a largest
//! batch), and the quota state that enforces it. Every OPRF evaluation is one
//! guess at a (name, ID) pair, so these limits are what bound an
//! institution's ability to enumerate the registry.
//!
//! ```toml
//! [institutions.bank-001]
//! modes = ["sync", "bucket"]
//! purposes = ["kyc-onboarding", "aml-recheck"]
//! rate_per_second = 2000   # elements, token bucket (burst: one second's worth)
//! daily_cap = 1000000      # elements per day (China Standard Time)
//! max_batch = 4096
//! ```
//!
//! The file is re-read on SIGHUP; a file that does not parse leaves the
//! previous policy in force. Quota state survives reloads.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::error::ServiceError;

/// One institution's rules.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    /// Allowed modes: `sync`, `bucket`.
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
            if !crate::ca::is_valid_institution(id) {
                bail!("policy: `{id}` is not a valid institution id");
            }
            if let Some(m) = r
                .modes
                .iter()
                .find(|m| !matches!(m.as_str(), "sync" | "bucket"))
            {
                bail!("policy: institution {id}: unknown mode `{m}` (sync or bucket)");
            }
            if let Some(p) = r
                .purposes
                .iter()
                .find(|p| !crate::service::is_valid_purpose(p))
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

struct Quota {
    tokens: f64,
    refilled: Instant,
    day: i64,
    used_today: u64,
}

/// The policy in force and every institution's quota.
#[derive(Default)]
pub struct Enforcer {
    policy: Mutex<Option<Policy>>,
    quotas: Mutex<HashMap<String, Quota>>,
}

impl std::fmt::Debug for Enforcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enforcer").finish_non_exhaustive()
    }
}

fn china_day(now: std::time::SystemTime) -> (i64, Duration) {
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        + 8 * 3600;
    let day = secs.div_euclid(86_400);
    let left = u64::try_from(86_400 - secs.rem_euclid(86_400)).unwrap_or(86_400);
    (day, Duration::from_secs(left))
}

impl Enforcer {
    /// An enforcer for `policy` (`None`: no limits, for local use).
    #[must_use]
    pub fn new(policy: Option<Policy>) -> Self {
        Self {
            policy: Mutex::new(policy),
            quotas: Mutex::new(HashMap::new()),
        }
    }

    /// Replaces the policy (quota state is kept).
    pub fn replace(&self, policy: Policy) {
        *self
            .policy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(policy);
    }

    /// Checks one request and takes its elements from the quotas.
    ///
    /// # Errors
    /// `PermissionDenied` for an unknown institution or a mode or purpose it
    /// may not use; `InvalidArgument` for a batch over its maximum;
    /// `ResourceExhausted` with the delay after which to retry.
    pub fn admit(
        &self,
        institution: &str,
        mode: &str,
        purpose: &str,
        elements: u64,
    ) -> Result<(), ServiceError> {
        let rules = {
            let policy = self
                .policy
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let Some(policy) = policy.as_ref() else {
                return Ok(());
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
        let now = Instant::now();
        let (day, until_tomorrow) = china_day(std::time::SystemTime::now());
        let rate = rules.rate_per_second as f64;
        let mut quotas = self
            .quotas
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let q = quotas.entry(institution.to_string()).or_insert(Quota {
            tokens: rate,
            refilled: now,
            day,
            used_today: 0,
        });
        if q.day != day {
            q.day = day;
            q.used_today = 0;
        }
        q.tokens = (q.tokens + now.duration_since(q.refilled).as_secs_f64() * rate)
            .min(rate.max(elements as f64));
        q.refilled = now;
        if q.used_today + elements > rules.daily_cap {
            return Err(ServiceError::QuotaExhausted {
                what: format!("daily cap of {} elements", rules.daily_cap),
                retry_after: until_tomorrow,
            });
        }
        let need = elements as f64;
        if q.tokens < need {
            let wait = Duration::from_secs_f64((need - q.tokens) / rate);
            return Err(ServiceError::QuotaExhausted {
                what: format!("rate of {} elements per second", rules.rate_per_second),
                retry_after: wait,
            });
        }
        q.tokens -= need;
        q.used_today += elements;
        Ok(())
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

    #[test]
    fn rules_are_enforced_with_precise_refusals() {
        let e = Enforcer::new(Some(policy(BANK).unwrap()));
        assert!(e.admit("bank-001", "sync", "kyc", 100).is_ok());
        let err = |r: Result<(), ServiceError>| r.unwrap_err().to_string();
        assert!(err(e.admit("bank-002", "sync", "kyc", 1)).contains("not authorised"));
        assert!(err(e.admit("bank-001", "bucket", "kyc", 1)).contains("may not use bucket mode"));
        assert!(err(e.admit("bank-001", "sync", "marketing", 1))
            .contains("purpose marketing is not authorised"));
        assert!(err(e.admit("bank-001", "sync", "kyc", 101)).contains("maximum of 100"));
        // The bucket is empty right after 100 elements: retry in about a second.
        match e.admit("bank-001", "sync", "kyc", 100) {
            Err(ServiceError::QuotaExhausted { retry_after, .. }) => {
                assert!(retry_after > Duration::from_millis(500))
            }
            other => panic!("{other:?}"),
        }
        std::thread::sleep(Duration::from_millis(1100));
        assert!(e.admit("bank-001", "sync", "kyc", 100).is_ok());
        std::thread::sleep(Duration::from_millis(1100));
        // 200 used today; 100 more would pass the daily cap of 250.
        match e.admit("bank-001", "sync", "kyc", 100) {
            Err(ServiceError::QuotaExhausted { what, .. }) => assert!(what.contains("daily cap")),
            other => panic!("{other:?}"),
        }
        assert!(Enforcer::new(None)
            .admit("anyone", "bucket", "x", 1_000_000)
            .is_ok());
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
