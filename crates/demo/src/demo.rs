//! `psi-demo`: the whole job on synthetic data in one command. It
//! generates a registry, encrypts it, serves it on a local port, and runs the
//! client library against it: a batch in sync mode, the same batch in bucket
//! and PIR mode, and single checks, printing what happened.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use psi_client::batch::{self, BatchOptions};
use psi_client::check::{check, CheckOutcome};
use psi_client::{ConnectOptions, QueryMode, Session};

use psi_server::registry;
use psi_server::serving::config::ServeConfig;
use psi_server::tools::synth::{Generator, Person};

const SEED: u64 = 1;

fn full_width(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '0'..='9' => char::from_u32(c as u32 - '0' as u32 + 0xFF10).unwrap_or(c),
            'X' => 'Ｘ',
            other => other,
        })
        .collect()
}

/// The demo's queries: (note, name, id), with the answer each should get.
fn queries(registered: &[Person]) -> Result<Vec<(String, String, String, &'static str)>> {
    let pick = |f: &dyn Fn(&Person) -> bool| registered.iter().find(|p| f(p)).cloned();
    let plain = registered.first().cloned().context("empty registry")?;
    let second = registered.get(1).cloned().context("registry too small")?;
    let dotted = pick(&|p| p.name.contains('\u{b7}')).context("no minority name generated")?;
    let legacy = pick(&|p| p.id.get(6..8) == Some("19")).context("no 19xx birth")?;
    let x_id = pick(&|p| p.id.ends_with('X'));
    let outsider = Generator::new(SEED + 1000, psi_core::CivilDate::today())?
        .next()
        .context("generator")?;
    let mut q = vec![
        (
            "registered pair, as registered".to_string(),
            plain.name.clone(),
            plain.id.clone(),
            "match",
        ),
        (
            "registered pair, full-width digits".into(),
            second.name.clone(),
            full_width(&second.id),
            "match",
        ),
        (
            "registered pair, spaces in name and ID".into(),
            format!(
                " {} ",
                second
                    .name
                    .chars()
                    .map(String::from)
                    .collect::<Vec<_>>()
                    .join("\u{3000}")
            ),
            format!(
                "{} {}",
                second.id.get(..6).unwrap_or(""),
                second.id.get(6..).unwrap_or("")
            ),
            "match",
        ),
        (
            "minority name with a bullet instead of the middle dot".into(),
            dotted.name.replace('\u{b7}', "\u{2022}"),
            dotted.id.clone(),
            "match",
        ),
        (
            "registered pair, legacy 15-digit ID".into(),
            legacy.name.clone(),
            format!(
                "{}{}",
                legacy.id.get(..6).unwrap_or(""),
                legacy.id.get(8..17).unwrap_or("")
            ),
            "match",
        ),
        (
            "registered ID with another name".into(),
            format!("{}{}", plain.name, "伟"),
            plain.id.clone(),
            "no_match",
        ),
        (
            "person not in the registry".into(),
            outsider.name,
            outsider.id,
            "no_match",
        ),
        (
            "wrong check character".into(),
            plain.name.clone(),
            format!(
                "{}{}",
                plain.id.get(..17).unwrap_or(""),
                if plain.id.ends_with('0') { '1' } else { '0' }
            ),
            "invalid",
        ),
        (
            "Latin letters in the name".into(),
            "Zhang San".into(),
            plain.id.clone(),
            "invalid",
        ),
        (
            "empty name".into(),
            String::new(),
            plain.id.clone(),
            "invalid",
        ),
    ];
    if let Some(p) = x_id {
        q.insert(
            1,
            (
                "registered pair, lower-case x".into(),
                p.name.clone(),
                p.id.to_lowercase(),
                "match",
            ),
        );
    }
    Ok(q)
}

/// Runs the demo in `dir` with a registry of `count` people.
///
/// # Errors
/// Any step's failure, or an answer that differs from the expected one.
pub async fn run(dir: &Path, count: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let registry_csv = dir.join("registry.csv");
    let data_dir = dir.join("server-data");
    println!("1. generating a synthetic registry of {count} people (seed {SEED})");
    psi_server::cli::generate(count, SEED, &registry_csv)?;

    println!("2. encrypting it under the server's OPRF key");
    let (csv_path, data) = (registry_csv.clone(), data_dir.clone());
    let report = tokio::task::spawn_blocking(move || {
        // A fresh synthetic registry replaces whatever an earlier demo left
        // (of any size): its counts are known, so no publication guard.
        registry::init_guarded(
            &psi_server::registry::source::Source::csv(csv_path),
            &data,
            true,
            &registry::PublishGuard::force(),
            None,
        )
    })
    .await??;
    psi_server::cli::print_init(&report);

    println!("3. starting psi-server on a local port");
    let running = psi_server::serving::serve::start(ServeConfig::local(&data_dir)).await?;
    let url = format!("http://{}", running.local_addr);
    println!("   listening on {url}");
    let result = client_side(dir, &url, count).await;
    running.shutdown().await?;
    result?;
    let audit_db = data_dir.join(psi_server::serving::audit::AUDIT_FILE);
    let v = psi_server::serving::audit::verify(&audit_db)?;
    println!(
        "7. the operator's audit trail holds {} records (institution, purpose, counts; no names or IDs), chain intact:\n   psi-server audit export --db {}",
        v.records,
        audit_db.display()
    );
    Ok(())
}

async fn client_side(dir: &Path, url: &str, count: u64) -> Result<()> {
    let registered: Vec<Person> = Generator::new(SEED, psi_core::CivilDate::today())?
        .take(usize::try_from(count)?.min(5000))
        .collect();
    let queries = queries(&registered)?;
    let input = dir.join("queries.csv");
    let mut w = csv::Writer::from_path(&input)?;
    w.write_record(["note", "name", "id"])?;
    for (note, name, id, _) in &queries {
        w.write_record([note, name, id])?;
    }
    w.flush()?;

    // The snapshot loads after the port binds: wait for it.
    let cache_dir = dir.join("client-cache");
    let _ = std::fs::remove_dir_all(&cache_dir);
    let options = ConnectOptions {
        server: url.to_string(),
        pin_key: None,
        pin_exact: false,
        cache_dir,
        blinding: psi_core::Blinding::Additive,
        concurrency: 4,
        tls: None,
        purpose: "demo".to_string(),
    };
    let session = Session::connect_when_ready(options, Duration::from_secs(10)).await?;
    println!(
        "4. client connected; pinned public key {} (epoch {})",
        psi_core::PublicKey::from_bytes(&session.info().public_key)?.to_hex(),
        session.info().key_epoch
    );

    let mut outputs = Vec::new();
    for mode in [QueryMode::Sync, QueryMode::Bucket, QueryMode::Pir] {
        let output = dir.join(format!(
            "answers-{}.csv",
            format!("{mode:?}").to_lowercase()
        ));
        let summary = batch::run(
            &session,
            &BatchOptions {
                input: input.clone(),
                output: output.clone(),
                mode,
                chunk_rows: 4096,
                file: psi_client::batch::FileFormat::default(),
                chunks_in_flight: 2,
                progress: false,
                resume: false,
                max_cache_age: std::time::Duration::from_secs(24 * 3600),
                no_sync: false,
            },
        )
        .await?;
        println!("5. batch in {mode:?} mode: {summary}");
        if mode == QueryMode::Sync {
            println!(
                "   (synced the tag set first: {} shards, {} bytes)",
                summary.shards_fetched, summary.bytes_synced
            );
        }
        outputs.push(output);
    }
    let mut rows = Vec::new();
    for output in &outputs {
        let mut r = csv::Reader::from_path(output)?;
        let answers: Vec<(String, String)> = r
            .records()
            .map(|rec| {
                let rec = rec?;
                Ok((
                    rec.get(3).unwrap_or("").to_string(),
                    rec.get(4).unwrap_or("").to_string(),
                ))
            })
            .collect::<Result<_>>()?;
        rows.push(answers);
    }
    println!(
        "\n   {:<55} {:<10} {:<10} {:<10} reason",
        "query (synthetic people)", "sync", "bucket", "pir"
    );
    let mut wrong = 0;
    for (i, (note, _, _, want)) in queries.iter().enumerate() {
        let got: Vec<(String, String)> = rows
            .iter()
            .map(|r| r.get(i).cloned().unwrap_or_default())
            .collect();
        if got.iter().any(|g| g.0 != *want) {
            wrong += 1;
        }
        let col = |m: usize| got.get(m).map_or("", |g| g.0.as_str());
        let reason = got.first().map_or("", |g| g.1.as_str());
        println!(
            "   {note:<55} {:<10} {:<10} {:<10} {reason}",
            col(0),
            col(1),
            col(2)
        );
    }
    let first = registered.first().context("empty registry")?;
    let single = check(&session, &first.name, &first.id, QueryMode::Pir).await?;
    println!("\n6. single check in PIR mode of the first registered pair (the server learns nothing of it): {single:?}");
    println!(
        "   answers written to {}",
        outputs
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if wrong > 0 || single != CheckOutcome::Match {
        bail!("{wrong} answers differ from the expected ones");
    }
    println!("\nall answers as expected.");
    Ok(())
}
