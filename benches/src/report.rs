//! The sweep's outputs: JSON and CSV of every point, SVG charts (plotters),
//! the ratios against the baselines, the communication model, and the
//! generated section of BENCHMARKS.md.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::costs::CoreCosts;
use crate::sweep::PointResult;

/// OpenMined PSI at one size, as `benches/baselines/openmined.py` prints it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OpenMined {
    /// Server set size.
    pub registry: u64,
    /// Client set size.
    pub queries: u64,
    /// Server setup per registry element, microseconds.
    pub server_setup_us: f64,
    /// Client request per query.
    pub client_request_us: f64,
    /// Server response per query.
    pub server_response_us: f64,
    /// Client intersection per query.
    pub client_intersection_us: f64,
    /// Request + intersection.
    pub client_total_us: f64,
    /// Setup message bytes per registry element.
    pub setup_bytes_per_entry: f64,
}

/// Everything one sweep measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sweep {
    /// The command that produced it.
    pub command: String,
    /// UTC date.
    pub date: String,
    /// CPU model and core count.
    pub machine: String,
    /// End-to-end points.
    pub points: Vec<PointResult>,
    /// One-core per-element costs, ours and baselines.
    pub core: CoreCosts,
    /// OpenMined PSI per size.
    pub openmined: Vec<OpenMined>,
    /// Why OpenMined was not measured, if it was not.
    pub openmined_skipped: Option<String>,
    /// Wall time of the whole sweep.
    pub seconds: f64,
}

/// The machine, as a line: CPU model, cores, memory.
#[must_use]
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(String::new(), |kb| {
            format!(", {:.0} GiB RAM", kb as f64 / 1048576.0)
        });
    format!("{cores} cores, {cpu}{mem}")
}

/// One ratio line: what, ours, theirs, ratio, target.
#[derive(Debug)]
pub struct Ratio {
    /// What is compared.
    pub what: &'static str,
    /// Our figure, microseconds per element.
    pub ours: f64,
    /// Theirs.
    pub theirs: f64,
    /// The target, if the issue set one (ours / theirs at most this).
    pub target: Option<f64>,
}

impl Sweep {
    fn openmined_at_largest(&self) -> Option<&OpenMined> {
        self.openmined.iter().max_by_key(|o| o.registry)
    }

    /// Ours against every baseline, one core, per element.
    #[must_use]
    pub fn ratios(&self) -> Vec<Ratio> {
        let c = &self.core;
        let mut out = vec![
            Ratio {
                what: "server per element vs the scalar-multiplication floor",
                ours: c.server_with_proof_us,
                theirs: c.floor_us,
                target: Some(1.3),
            },
            Ratio {
                what: "server per element vs the voprf crate (both with proof)",
                ours: c.server_with_proof_us,
                theirs: c.voprf_server_us,
                target: None,
            },
            Ratio {
                what: "client per element vs the voprf crate (both verifying)",
                ours: c.client_additive_verified_us,
                theirs: c.voprf_client_us,
                target: None,
            },
            Ratio {
                what: "server per element vs a plain-hash lookup (the price of privacy)",
                ours: c.server_with_proof_us,
                theirs: c.plain_hash_query_us,
                target: None,
            },
            Ratio {
                what: "registry setup per element vs plain hashing",
                ours: c.setup_record_to_tag_us,
                theirs: c.plain_hash_setup_us,
                target: None,
            },
        ];
        if let Some(o) = self.openmined_at_largest() {
            out.extend([
                Ratio {
                    what: "server per element vs OpenMined's server response",
                    ours: c.server_with_proof_us,
                    theirs: o.server_response_us,
                    target: Some(0.5),
                },
                Ratio {
                    what: "client per element vs OpenMined's request + intersection",
                    ours: c.client_additive_verified_us,
                    theirs: o.client_total_us,
                    target: Some(0.7),
                },
                Ratio {
                    what: "registry setup per element vs OpenMined's setup",
                    ours: c.setup_record_to_tag_us,
                    theirs: o.server_setup_us,
                    target: Some(0.5),
                },
            ]);
        }
        out
    }

    /// The ratios as printed lines.
    #[must_use]
    pub fn ratio_lines(&self) -> String {
        let mut s = String::new();
        for r in self.ratios() {
            let ratio = r.ours / r.theirs.max(1e-12);
            let verdict = match r.target {
                Some(t) if ratio <= t => format!(" (target <= {t}: met)"),
                Some(t) => format!(" (target <= {t}: MISSED)"),
                None => String::new(),
            };
            let _ = writeln!(
                s,
                "{:<66} {:>9.2} us vs {:>9.2} us = {:.3}x{verdict}",
                r.what, r.ours, r.theirs, ratio
            );
        }
        s
    }

    /// Writes `sweep.json`, `points.csv` and the charts into `dir`.
    ///
    /// # Errors
    /// I/O or drawing errors.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("sweep.json"), serde_json::to_string_pretty(self)?)?;
        let mut w = csv::Writer::from_path(dir.join("points.csv"))?;
        for p in &self.points {
            w.serialize(p)?;
        }
        w.flush()?;
        self.charts(dir)
    }

    fn series(&self, mode: &str, f: impl Fn(&PointResult) -> f64) -> Vec<(f64, f64)> {
        let mut v: Vec<(f64, f64)> = self
            .points
            .iter()
            .filter(|p| {
                p.mode == mode && p.server_threads == p.client_threads && p.blinding == "additive"
            })
            .filter(|p| p.server_threads == self.max_threads())
            .map(|p| (p.registry_size as f64, f(p)))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v.dedup_by(|a, b| a.0 == b.0);
        v
    }

    fn max_threads(&self) -> usize {
        self.points
            .iter()
            .map(|p| p.server_threads)
            .max()
            .unwrap_or(1)
    }

    fn charts(&self, dir: &Path) -> Result<()> {
        let sync = |f: fn(&PointResult) -> f64| self.series("sync", f);
        let bucket = |f: fn(&PointResult) -> f64| self.series("bucket", f);
        line_chart(
            &dir.join("throughput.svg"),
            "End-to-end rows/s vs registry size",
            "rows/s",
            &[
                ("sync mode", sync(|p| p.rows_per_second)),
                ("bucket mode", bucket(|p| p.rows_per_second)),
            ],
        )?;
        line_chart(
            &dir.join("latency.svg"),
            "Single check latency (bucket mode), ms",
            "ms",
            &[
                ("p50", sync(|p| p.check_p50_ms)),
                ("p95", sync(|p| p.check_p95_ms)),
                ("p99", sync(|p| p.check_p99_ms)),
            ],
        )?;
        line_chart(
            &dir.join("bytes.svg"),
            "Bytes on the wire per query, by mode",
            "bytes",
            &[
                ("sync mode, per batch row", sync(|p| p.wire_bytes_per_query)),
                (
                    "bucket mode, per batch row",
                    bucket(|p| p.wire_bytes_per_query),
                ),
                ("single bucket check", sync(|p| p.check_wire_bytes)),
                (
                    "sync download per registry entry",
                    sync(|p| p.sync_bytes as f64 / p.registry_size as f64),
                ),
            ],
        )?;
        let pir = |f: fn(&PointResult) -> f64| self.series("pir", f);
        line_chart(
            &dir.join("modes.svg"),
            "Per check by mode: server CPU (ms) and bytes (KiB)",
            "ms or KiB",
            &[
                (
                    "sync: server CPU ms/row",
                    sync(|p| p.server_cpu_us_per_element / 1e3),
                ),
                (
                    "bucket: server CPU ms/row",
                    bucket(|p| p.server_cpu_us_per_element / 1e3),
                ),
                (
                    "pir: server CPU ms/row",
                    pir(|p| p.server_cpu_us_per_element / 1e3),
                ),
                (
                    "sync: KiB/row after the download",
                    sync(|p| p.wire_bytes_per_query / 1024.0),
                ),
                ("bucket: KiB/check", bucket(|p| p.check_wire_bytes / 1024.0)),
                ("pir: KiB/check", pir(|p| p.check_wire_bytes / 1024.0)),
            ],
        )?;
        let c = &self.core;
        let mut bars = vec![
            ("floor: one scalar multiplication", c.floor_us),
            ("ours: server, with proof", c.server_with_proof_us),
            ("ours: server, no proof", c.server_without_proof_us),
            ("ours: client, verified", c.client_additive_verified_us),
            ("ours: registry setup", c.setup_record_to_tag_us),
            ("voprf crate: server", c.voprf_server_us),
            ("voprf crate: client", c.voprf_client_us),
            ("plain hash: query", c.plain_hash_query_us),
        ];
        if let Some(o) = self.openmined_at_largest() {
            bars.extend([
                ("OpenMined: server response", o.server_response_us),
                ("OpenMined: client", o.client_total_us),
                ("OpenMined: setup", o.server_setup_us),
            ]);
        }
        bar_chart(
            &dir.join("per-element.svg"),
            "Microseconds per element, one core",
            &bars,
        )
    }

    /// The communication model: from the measured bytes, how long a check,
    /// a first sync and a 10^6-row batch take at each bandwidth with a 50 ms
    /// round trip, at the largest registry measured.
    #[must_use]
    pub fn communication_model(&self) -> String {
        let largest = self
            .points
            .iter()
            .map(|p| p.registry_size)
            .max()
            .unwrap_or(0);
        let at = |mode: &str| {
            self.points
                .iter()
                .find(|p| p.registry_size == largest && p.mode == mode)
        };
        let (Some(sync), Some(bucket)) = (at("sync"), at("bucket")) else {
            return "(needs a sync and a bucket point at the same size)\n".into();
        };
        let rtt = 0.050;
        let mut s = format!(
            "Registry of {largest} entries; time = round trips x 50 ms + bytes x 8 / bandwidth (bytes measured on the wire, HTTP/2 framing included; CPU time not included).\n\n\
             | link | single bucket-mode check ({:.0} B) | one row of a sync-mode batch, after the download ({:.0} B) | first sync ({:.2} MB) | 10^6 rows, sync mode | 10^6 rows, bucket mode |\n|---|---|---|---|---|---|\n",
            bucket.check_wire_bytes,
            sync.wire_bytes_per_query,
            sync.sync_bytes as f64 / 1e6,
        );
        for (name, bps) in [
            ("10 Mbit/s", 10e6),
            ("100 Mbit/s", 100e6),
            ("1 Gbit/s", 1e9),
        ] {
            let t = |bytes: f64, trips: f64| trips * rtt + bytes * 8.0 / bps;
            let _ = writeln!(
                s,
                "| {name} | {:.1} ms | {:.1} ms | {:.2} s | {:.1} s | {:.1} s |",
                t(bucket.check_wire_bytes, 1.0) * 1e3,
                t(sync.wire_bytes_per_query, 1.0) * 1e3,
                t(sync.sync_bytes as f64, 1.0),
                t(1e6 * sync.wire_bytes_per_query, 1.0),
                t(1e6 * bucket.wire_bytes_per_query, 1.0),
            );
        }
        s
    }

    /// The three modes side by side at each registry size measured in all
    /// three: what a first use and each check cost, and what the operator
    /// learns.
    #[must_use]
    pub fn mode_comparison(&self) -> String {
        let mut s = String::from("| N | mode | first use (bytes) | bytes per check | check p50 ms | server CPU ms/query | the operator learns of each pair |\n|---|---|---|---|---|---|---|\n");
        let mut sizes: Vec<u64> = self.points.iter().map(|p| p.registry_size).collect();
        sizes.sort_unstable();
        sizes.dedup();
        let max = self.max_threads();
        for n in sizes {
            let at = |mode: &str| {
                self.points.iter().find(|p| {
                    p.registry_size == n
                        && p.mode == mode
                        && p.server_threads == max
                        && p.blinding == "additive"
                })
            };
            let (Some(sy), Some(bu), Some(pi)) = (at("sync"), at("bucket"), at("pir")) else {
                continue;
            };
            let bits = psi_core::bucket::prefix_bits_for(n);
            let _ = writeln!(
                s,
                "| {n} | sync | {} (the tag set) | {:.0} (per batch row) | local lookup | {:.3} | nothing |",
                sy.sync_bytes,
                sy.wire_bytes_per_query,
                sy.server_cpu_us_per_element / 1e3
            );
            let _ = writeln!(
                s,
                "| {n} | bucket | 0 | {:.0} | {:.1} | {:.3} | its bucket: one of 2^{bits} (~{} entries) |",
                bu.check_wire_bytes,
                bu.check_p50_ms,
                bu.server_cpu_us_per_element / 1e3,
                n >> bits
            );
            let _ = writeln!(
                s,
                "| {n} | pir | {} (public parameters, once per key epoch) | {:.0} | {:.1} | {:.0} | nothing |",
                pi.pir_first_check_bytes,
                pi.check_wire_bytes,
                pi.check_p50_ms,
                pi.server_cpu_us_per_element / 1e3
            );
        }
        s.push_str("\nIn every mode the operator learns who asked, the declared purpose, when, and how many pairs (the audit trail); the institution learns yes or no for each pair it asked. Server CPU per query is the batch's (sync: an evaluation; bucket: an evaluation and a bucket read; pir: an evaluation and a pass over the whole PIR database).\n\n");
        s.push_str("| N | PIR database MiB | build s | build RSS MiB | first check bytes / s | bytes up / down per check | check p50 / p99 ms | `psi-client check` p50 ms | server CPU ms/check |\n|---|---|---|---|---|---|---|---|---|\n");
        for p in self.points.iter().filter(|p| p.mode == "pir") {
            let _ = writeln!(
                s,
                "| {} | {:.1} | {:.2} | {:.1} | {} / {:.2} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} | {:.0} |",
                p.registry_size,
                p.pir_database_bytes as f64 / 1048576.0,
                p.pir_build_seconds,
                p.pir_build_rss_bytes as f64 / 1048576.0,
                p.pir_first_check_bytes,
                p.pir_first_check_seconds,
                p.check_bytes_up,
                p.check_wire_bytes - p.check_bytes_up,
                p.check_p50_ms,
                p.check_p99_ms,
                p.cli_check_p50_ms,
                p.check_server_cpu_ms,
            );
        }
        s
    }

    /// The generated part of BENCHMARKS.md.
    #[must_use]
    pub fn markdown(&self, charts: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Generated by `{}` on {} in {:.0} s.\n\n**Machine**: {}.\n",
            self.command, self.date, self.seconds, self.machine
        );
        let _ = writeln!(s, "### End to end (real `psi-server` process, client in `psi-bench`, loopback with a byte-counting relay)\n");
        s.push_str("| N | mode | threads s/c | init s | disk B/entry | server RSS B/entry | sync bytes | rows/s | server CPU us/row | client CPU us/row | wire B/row | check p50/p95/p99 ms | server peak RSS MiB | client peak RSS MiB |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        for p in &self.points {
            let _ = writeln!(
                s,
                "| {} | {} | {}/{} {} | {:.2} | {:.2} | {:.1} | {} | {:.0} | {:.1} | {:.1} | {:.0} | {:.2} / {:.2} / {:.2} | {:.0} | {:.0} |",
                p.registry_size,
                p.mode,
                p.server_threads,
                p.client_threads,
                if p.blinding == "additive" { "" } else { "mult." },
                p.init_seconds,
                p.disk_bytes_per_entry,
                p.memory_bytes_per_entry,
                if p.mode == "sync" { p.sync_bytes.to_string() } else { "-".into() },
                p.rows_per_second,
                p.server_cpu_us_per_element,
                p.client_cpu_us_per_element,
                p.wire_bytes_per_query,
                p.check_p50_ms,
                p.check_p95_ms,
                p.check_p99_ms,
                p.server_peak_rss_bytes as f64 / 1048576.0,
                p.client_peak_rss_bytes as f64 / 1048576.0,
            );
        }
        let c = &self.core;
        let _ = writeln!(
            s,
            "\nCPU per row counts everything the process did during the batch (both cores; the client's includes reading and writing the CSV), read from /proc in 10 ms ticks: coarse for batches under ~10^4 rows. Memory per entry is the server's resident size after loading divided by N, so small registries show the fixed overhead. Wire bytes include gRPC and HTTP/2 framing; a bucket-mode row downloads its bucket's tags (8 bytes each, ~1024-2047 per bucket) shared by the rows of the same request that fall in it.\n\n### Per element, one core, batches of {} (ours and the baselines in the same run)\n\n| step | us/element |\n|---|---|",
            c.batch
        );
        for (what, us) in [
            ("floor: variable-base scalar multiplication", c.floor_us),
            (
                "ours, server: blind evaluate with proof",
                c.server_with_proof_us,
            ),
            (
                "ours, server: blind evaluate without proof",
                c.server_without_proof_us,
            ),
            (
                "ours, client: additive blind + verified finalize",
                c.client_additive_verified_us,
            ),
            (
                "ours, client: additive, proof not verified",
                c.client_additive_unverified_us,
            ),
            (
                "ours, client: multiplicative (RFC) blind + verified finalize",
                c.client_multiplicative_verified_us,
            ),
            (
                "ours, registry setup: record to tag",
                c.setup_record_to_tag_us,
            ),
            (
                "voprf crate, server: batch blind evaluate with proof",
                c.voprf_server_us,
            ),
            (
                "voprf crate, client: blind + batch finalize (verified)",
                c.voprf_client_us,
            ),
            ("plain hash, setup: SHA-256 + insert", c.plain_hash_setup_us),
            ("plain hash, query: SHA-256 + lookup", c.plain_hash_query_us),
        ] {
            let _ = writeln!(s, "| {what} | {us:.2} |");
        }
        if self.openmined.is_empty() {
            let _ = writeln!(
                s,
                "\nOpenMined PSI: not measured ({}).",
                self.openmined_skipped.as_deref().unwrap_or("skipped")
            );
        } else {
            s.push_str("\n### OpenMined PSI (openmined-psi 2.0.6 from PyPI, own venv, same machine, same run)\n\n| server set | client set | setup us/entry | request us | response us | intersection us | setup bytes/entry |\n|---|---|---|---|---|---|---|\n");
            for o in &self.openmined {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} |",
                    o.registry,
                    o.queries,
                    o.server_setup_us,
                    o.client_request_us,
                    o.server_response_us,
                    o.client_intersection_us,
                    o.setup_bytes_per_entry
                );
            }
        }
        let _ = writeln!(
            s,
            "\n### Ratios (one core, per element, same run)\n\n```\n{}```\n",
            self.ratio_lines()
        );
        let _ = writeln!(
            s,
            "### Communication model\n\n{}",
            self.communication_model()
        );
        let _ = writeln!(
            s,
            "### The three modes compared\n\n{}",
            self.mode_comparison()
        );
        let _ = writeln!(s, "### Charts\n\n{charts}");
        s
    }
}

/// Markers around the generated section of BENCHMARKS.md.
pub const BEGIN: &str = "<!-- psi-bench sweep: generated, do not edit by hand -->";
/// End marker.
pub const END: &str = "<!-- psi-bench sweep: end -->";

/// Replaces the generated section of `benchmarks_md` (or inserts it after
/// the title) with `section`.
///
/// # Errors
/// I/O errors.
pub fn rewrite_benchmarks(benchmarks_md: &Path, section: &str) -> Result<()> {
    let text = std::fs::read_to_string(benchmarks_md).unwrap_or_else(|_| "# Benchmarks\n".into());
    let block = format!("{BEGIN}\n## Sweep: throughput, latency, bytes and baselines (issue #6)\n\n{section}\n{END}");
    let new = match (text.find(BEGIN), text.find(END)) {
        (Some(a), Some(b)) if b > a => format!("{}{block}{}", &text[..a], &text[b + END.len()..]),
        _ => {
            let cut = text.find("\n## ").map_or(text.len(), |i| i + 1);
            format!("{}{block}\n\n{}", &text[..cut], &text[cut..])
        }
    };
    std::fs::write(benchmarks_md, new)
        .with_context(|| format!("writing {}", benchmarks_md.display()))
}

fn line_chart(
    path: &Path,
    title: &str,
    y_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<()> {
    let points: Vec<(f64, f64)> = series.iter().flat_map(|(_, v)| v.iter().copied()).collect();
    if points.is_empty() {
        return Ok(());
    }
    let (x0, x1) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(draw)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (x0 * 0.8..x1 * 1.25).log_scale(),
            (y0.max(1e-3) * 0.5..y1 * 2.0).log_scale(),
        )
        .map_err(draw)?;
    chart
        .configure_mesh()
        .x_desc("registry size N")
        .y_desc(y_label)
        .x_label_formatter(&|x| format!("{x:.0e}"))
        .draw()
        .map_err(draw)?;
    for (i, (name, data)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(data.iter().copied(), color.stroke_width(2)))
            .map_err(draw)?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(data.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(draw)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw)?;
    root.present().map_err(draw)?;
    Ok(())
}

fn bar_chart(path: &Path, title: &str, bars: &[(&str, f64)]) -> Result<()> {
    let max = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1e-3);
    let root = SVGBackend::new(path, (900, 60 + 36 * bars.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(draw)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(260)
        .build_cartesian_2d(0.0..max * 1.15, (0..bars.len()).into_segmented())
        .map_err(draw)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(bars.len() + 1)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => bars.get(*i).map_or(String::new(), |b| b.0.to_string()),
            _ => String::new(),
        })
        .x_desc("microseconds per element")
        .draw()
        .map_err(draw)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (name, v))| {
            let color = if name.starts_with("ours") {
                BLUE.mix(0.7)
            } else {
                BLACK.mix(0.35)
            };
            let mut bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (*v, SegmentValue::Exact(i + 1)),
                ],
                color.filled(),
            );
            bar.set_margin(4, 4, 0, 0);
            bar
        }))
        .map_err(draw)?;
    root.present().map_err(draw)?;
    Ok(())
}

fn draw<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing a chart: {e:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(mode: &str, check_bytes: f64, per_query: f64, sync_bytes: u64) -> PointResult {
        PointResult {
            registry_size: 1000,
            mode: mode.into(),
            server_threads: 2,
            client_threads: 2,
            blinding: "additive".into(),
            check_wire_bytes: check_bytes,
            wire_bytes_per_query: per_query,
            sync_bytes,
            ..PointResult::default()
        }
    }

    #[test]
    fn the_communication_model_adds_round_trips_and_transfer_time() {
        let sweep = Sweep {
            points: vec![
                point("sync", 0.0, 100.0, 1_250_000),
                point("bucket", 12_500.0, 1000.0, 0),
            ],
            ..Sweep::default()
        };
        let model = sweep.communication_model();
        // 10 Mbit/s: 50 ms + 12,500 B x 8 / 10^7 = 60 ms; sync 1.25 MB: 0.05 + 1 s;
        // 10^6 rows of 100 B: 0.05 + 80 s; of 1000 B: 0.05 + 800 s.
        assert!(
            model.contains("| 10 Mbit/s | 60.0 ms | 50.1 ms | 1.05 s | 80.0 s | 800.0 s |"),
            "{model}"
        );
        assert!(
            model.contains("| 1 Gbit/s | 50.1 ms | 50.0 ms | 0.06 s | 0.9 s | 8.1 s |"),
            "{model}"
        );
    }

    #[test]
    fn ratios_say_whether_targets_are_met() {
        let sweep = Sweep {
            core: CoreCosts {
                floor_us: 30.0,
                server_with_proof_us: 45.0,
                client_additive_verified_us: 50.0,
                setup_record_to_tag_us: 40.0,
                ..CoreCosts::default()
            },
            openmined: vec![OpenMined {
                registry: 10,
                server_response_us: 100.0,
                client_total_us: 100.0,
                server_setup_us: 100.0,
                ..OpenMined::default()
            }],
            ..Sweep::default()
        };
        let lines = sweep.ratio_lines();
        assert!(
            lines.contains("= 1.500x (target <= 1.3: MISSED)"),
            "{lines}"
        );
        assert!(lines.contains("= 0.450x (target <= 0.5: met)"), "{lines}");
        assert!(lines.contains("= 0.500x (target <= 0.7: met)"), "{lines}");
    }

    #[test]
    fn the_generated_section_is_replaced_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let md = dir.path().join("BENCHMARKS.md");
        std::fs::write(&md, "# Benchmarks\n\nintro\n\n## Older section\n\nkept\n").unwrap();
        rewrite_benchmarks(&md, "first run").unwrap();
        let once = std::fs::read_to_string(&md).unwrap();
        assert!(
            once.starts_with("# Benchmarks\n\nintro\n\n<!-- psi-bench"),
            "{once}"
        );
        assert!(once.contains("first run") && once.ends_with("## Older section\n\nkept\n"));
        rewrite_benchmarks(&md, "second run").unwrap();
        let twice = std::fs::read_to_string(&md).unwrap();
        assert!(!twice.contains("first run") && twice.contains("second run"));
        assert_eq!(twice.matches(BEGIN).count(), 1);
        assert!(twice.ends_with("## Older section\n\nkept\n"));
    }

    #[test]
    fn charts_are_written_as_svg() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = point("sync", 9000.0, 64.0, 4000);
        let mut b = point("bucket", 9000.0, 900.0, 0);
        for p in [&mut a, &mut b] {
            p.rows_per_second = 1000.0;
            p.check_p50_ms = 1.0;
            p.check_p95_ms = 1.2;
            p.check_p99_ms = 1.5;
        }
        let mut bigger = a.clone();
        bigger.registry_size = 10_000;
        let sweep = Sweep {
            points: vec![a, b, bigger],
            core: CoreCosts {
                floor_us: 30.0,
                server_with_proof_us: 40.0,
                ..CoreCosts::default()
            },
            ..Sweep::default()
        };
        sweep.write(dir.path()).unwrap();
        for chart in ["throughput", "latency", "bytes", "per-element"] {
            let svg = std::fs::read_to_string(dir.path().join(format!("{chart}.svg"))).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("<text"), "{chart}");
        }
        let csv = std::fs::read_to_string(dir.path().join("points.csv")).unwrap();
        assert_eq!(csv.lines().count(), 4);
    }
}
