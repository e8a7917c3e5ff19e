//! The evaluation's results and their three renderings: JSON (the record), a markdown table (the
//! summary, also printed) and a PNG chart (memory saved vs Δppl).
//!
//! JSON shape (`serde_json::to_string_pretty(&report)`; maps keep ascending context order):
//! ```text
//! { "model": "<dir or file name> [<weights files and sizes>]",
//!   "text": { "path", "sha256", "tokens" },          tokens: of the whole text
//!   "date": "2026-05-01T12:00:00Z",                   UTC, when the run finished
//!   "command": "kvserve eval --model … ",
//!   "passkey_depths": [0.1, 0.5, 0.9],
//!   "policies": [                                     the reference (bf16) first
//!     { "name": "int8",
//!       "bytes_per_token": 73728.0,                   peak KV bytes held / tokens, all runs
//!       "memory_reduction": 0.48,                     1 − bytes_per_token / reference's
//!       "sealed_bytes_per_token": 11880.0,            the format's bytes once blocks seal
//!       "sealed_reduction": 0.484,                    1 − sealed / the reference's sealed
//!       "by_ctx": { "512": { "ppl", "dppl_pct", "kl", "top1", "tokens" }, … },
//!                                                     kl: mean KL(ref ‖ policy) per position;
//!                                                     top1: fraction in 0..1; tokens: positions
//!       "passkey": { "1024": "3/3", … },
//!       "passkey_hits": { "1024": [true, true, true], … } } ] }   one per depth
//! ```

use anyhow::{Context, Result};
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use std::fmt::Write as _;
use std::path::Path;

/// Where the chart's font is read from at run time (Debian/Ubuntu `fonts-dejavu-core`).
pub const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub text: TextInfo,
    pub date: String,
    pub command: String,
    pub passkey_depths: Vec<f64>,
    /// The reference first.
    pub policies: Vec<PolicyReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TextInfo {
    pub path: String,
    pub sha256: String,
    /// Tokens of the whole text.
    pub tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyReport {
    pub name: String,
    pub bytes_per_token: f64,
    /// `1 − bytes_per_token / reference bytes_per_token`, in 0..1. Measured at the peak of
    /// each run: the blocks a prefill chunk fills are exact (f32) until they seal, and the
    /// tail block stays exact.
    pub memory_reduction: f64,
    /// Bytes per token of sealed blocks: what a long sequence's memory converges to.
    pub sealed_bytes_per_token: f64,
    /// `1 − sealed_bytes_per_token / the reference's`.
    pub sealed_reduction: f64,
    /// Ascending context length.
    #[serde(serialize_with = "ordered_map")]
    pub by_ctx: Vec<(usize, CtxStats)>,
    /// Ascending length → retrieved / tried.
    #[serde(serialize_with = "passkey_scores")]
    pub passkey: Vec<(usize, Vec<bool>)>,
    /// The same, one flag per depth of `passkey_depths`.
    #[serde(rename = "passkey_hits", serialize_with = "ordered_map")]
    pub passkey_hits: Vec<(usize, Vec<bool>)>,
}

/// One policy at one context length, over every predicted position of every window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CtxStats {
    pub ppl: f64,
    /// Perplexity change vs the reference, percent.
    pub dppl_pct: f64,
    /// Mean KL(reference ‖ policy) per position.
    pub kl: f64,
    /// Top-1 agreement with the reference, 0..1.
    pub top1: f64,
    /// Predicted positions.
    pub tokens: usize,
}

impl EvalReport {
    /// The largest context length evaluated (the chart's), if any.
    pub fn largest_ctx(&self) -> Option<usize> {
        self.policies
            .first()
            .and_then(|p| p.by_ctx.iter().map(|&(c, _)| c).max())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report always serializes")
    }
}

fn ordered_map<S: Serializer, V: Serialize>(v: &[(usize, V)], s: S) -> Result<S::Ok, S::Error> {
    let mut m = s.serialize_map(Some(v.len()))?;
    for (k, val) in v {
        m.serialize_entry(&k.to_string(), val)?;
    }
    m.end()
}

fn passkey_scores<S: Serializer>(v: &[(usize, Vec<bool>)], s: S) -> Result<S::Ok, S::Error> {
    let mut m = s.serialize_map(Some(v.len()))?;
    for (k, hits) in v {
        m.serialize_entry(&k.to_string(), &score(hits))?;
    }
    m.end()
}

/// `"retrieved/tried"`.
fn score(hits: &[bool]) -> String {
    format!("{}/{}", hits.iter().filter(|&&h| h).count(), hits.len())
}

/// The summary table, one row per policy, with a provenance header.
pub fn markdown(r: &EvalReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# KV policy evaluation\n");
    let _ = writeln!(out, "- model: {}", r.model);
    let _ = writeln!(
        out,
        "- text: {} ({} tokens, sha256 {})",
        r.text.path, r.text.tokens, r.text.sha256
    );
    let _ = writeln!(out, "- date: {}", r.date);
    let _ = writeln!(out, "- command: `{}`\n", r.command);
    let ctxs: Vec<usize> = r
        .policies
        .first()
        .map(|p| p.by_ctx.iter().map(|&(c, _)| c).collect())
        .unwrap_or_default();
    let mut header = String::from(
        "| policy | KV bytes/token (peak) | memory saved vs bf16 (peak) | sealed bytes/token | sealed saved |",
    );
    for c in &ctxs {
        let _ = write!(header, " Δppl @{c} | KL @{c} | top-1 @{c} |");
    }
    header.push_str(" passkey |");
    let _ = writeln!(out, "{header}");
    let _ = writeln!(out, "|{}", "---|".repeat(6 + 3 * ctxs.len()));
    for p in &r.policies {
        let mut row = format!(
            "| {} | {:.0} | {:.1} % | {:.0} | {:.1} % |",
            p.name,
            p.bytes_per_token,
            100.0 * p.memory_reduction,
            p.sealed_bytes_per_token,
            100.0 * p.sealed_reduction
        );
        for c in &ctxs {
            match p.by_ctx.iter().find(|(pc, _)| pc == c) {
                Some((_, s)) => {
                    let _ = write!(
                        row,
                        " {:+.2} % (ppl {:.2}) | {:.5} | {:.1} % |",
                        s.dppl_pct,
                        s.ppl,
                        s.kl,
                        100.0 * s.top1
                    );
                }
                None => row.push_str(" — | — | — |"),
            }
        }
        let passkey: Vec<String> = p
            .passkey
            .iter()
            .map(|(len, hits)| {
                let marks: String = hits.iter().map(|&h| if h { '✓' } else { '✗' }).collect();
                format!("{len}: {} {marks}", score(hits))
            })
            .collect();
        let _ = writeln!(
            row,
            " {} |",
            if passkey.is_empty() {
                "—".to_string()
            } else {
                passkey.join(", ")
            }
        );
        out.push_str(&row);
    }
    if !r.passkey_depths.is_empty() {
        let depths: Vec<String> = r
            .passkey_depths
            .iter()
            .map(|d| format!("{:.0} %", 100.0 * d))
            .collect();
        let _ = writeln!(
            out,
            "\nKL and top-1 are against the first row (the reference). Passkey marks are per depth \
             ({}), teacher-forced.",
            depths.join(", ")
        );
    }
    out
}

/// Registers the chart font once (plotters keeps `'static` font bytes).
fn register_font(font: &Path) -> Result<()> {
    // Registered once per process; a failed attempt (missing file) is not remembered, so a
    // later call with a good font still works.
    static REGISTERED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut done = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return Ok(());
    }
    let bytes = std::fs::read(font).map_err(|e| {
        anyhow::anyhow!(
            "the chart needs the font {} ({e}); install it with `apt-get install \
             fonts-dejavu-core`",
            font.display()
        )
    })?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{} is not a usable TrueType font", font.display()))?;
    *done = true;
    Ok(())
}

/// Writes the chart: memory saved (x, %) vs Δppl % at the largest context (y), one labelled
/// point per policy. `font` is a TrueType file (normally [`FONT_PATH`]).
pub fn write_png(r: &EvalReport, path: &Path, font: &Path) -> Result<()> {
    use plotters::prelude::*;
    register_font(font)?;
    let ctx = r
        .largest_ctx()
        .context("the report has no context length to plot")?;
    let points: Vec<(String, f64, f64)> = r
        .policies
        .iter()
        .filter_map(|p| {
            let s = p.by_ctx.iter().find(|(c, _)| *c == ctx)?.1;
            Some((p.name.clone(), 100.0 * p.memory_reduction, s.dppl_pct))
        })
        .filter(|(_, x, y)| x.is_finite() && y.is_finite())
        .collect();
    let (xmax, ymin, ymax) = points.iter().fold((10.0f64, 0.0f64, 0.5f64), |a, p| {
        (a.0.max(p.1), a.1.min(p.2), a.2.max(p.2))
    });
    let pad = (ymax - ymin) * 0.15;
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("KV memory saved vs perplexity change (ctx {ctx})"),
                ("sans-serif", 22),
            )
            .margin(20)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(
                -2.0..(xmax * 1.15 + 2.0).min(100.0),
                (ymin - pad)..(ymax + pad),
            )?;
        chart
            .configure_mesh()
            .x_desc("KV memory saved vs bf16 (%)")
            .y_desc(format!("Δppl at ctx {ctx} (%)"))
            .label_style(("sans-serif", 14))
            .draw()?;
        // Labels of points close enough for their labels (~10 % of the x range wide) to
        // overlap are stacked instead of overprinted.
        let near = |a: &(String, f64, f64), b: &(String, f64, f64)| {
            (a.1 - b.1).abs() < 10.0 && (a.2 - b.2).abs() < 0.04 * (ymax - ymin + 2.0 * pad)
        };
        chart.draw_series(points.iter().enumerate().map(|(i, p)| {
            let stacked = points[..i].iter().filter(|q| near(q, p)).count() as i32;
            EmptyElement::at((p.1, p.2))
                + Circle::new((0, 0), 5, BLUE.filled())
                + Text::new(p.0.clone(), (8, -16 - 17 * stacked), ("sans-serif", 15))
        }))?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now_iso() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    iso_from_unix(secs)
}

/// Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
fn iso_from_unix(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(ppl: f64, dppl: f64, kl: f64, top1: f64) -> CtxStats {
        CtxStats {
            ppl,
            dppl_pct: dppl,
            kl,
            top1,
            tokens: 511,
        }
    }

    fn sample() -> EvalReport {
        EvalReport {
            model: "SmolLM2 [model.safetensors 1 bytes]".into(),
            text: TextInfo {
                path: "GPL-3".into(),
                sha256: "ab".repeat(32),
                tokens: 9000,
            },
            date: "2026-01-02T03:04:05Z".into(),
            command: "kvserve eval".into(),
            passkey_depths: vec![0.1, 0.5, 0.9],
            policies: vec![
                PolicyReport {
                    name: "bf16".into(),
                    bytes_per_token: 1000.0,
                    memory_reduction: 0.0,
                    sealed_bytes_per_token: 900.0,
                    sealed_reduction: 0.0,
                    by_ctx: vec![
                        (512, stats(12.0, 0.0, 0.0, 1.0)),
                        (2048, stats(10.0, 0.0, 0.0, 1.0)),
                    ],
                    passkey: vec![(1024, vec![true; 3])],
                    passkey_hits: vec![(1024, vec![true; 3])],
                },
                PolicyReport {
                    name: "int8".into(),
                    bytes_per_token: 516.0,
                    memory_reduction: 0.484,
                    sealed_bytes_per_token: 464.4,
                    sealed_reduction: 0.484,
                    by_ctx: vec![
                        (512, stats(12.1, 0.8333, 0.0004, 0.989)),
                        (2048, stats(10.05, 0.5, 0.0006, 0.99)),
                    ],
                    passkey: vec![(1024, vec![true, false, true])],
                    passkey_hits: vec![(1024, vec![true, false, true])],
                },
            ],
        }
    }

    #[test]
    fn markdown_has_one_row_per_policy_and_three_columns_per_ctx() {
        let md = markdown(&sample());
        let table: Vec<&str> = md.lines().filter(|l| l.starts_with('|')).collect();
        assert_eq!(table.len(), 4, "{md}");
        assert_eq!(
            table[0],
            "| policy | KV bytes/token (peak) | memory saved vs bf16 (peak) | sealed bytes/token \
             | sealed saved | Δppl @512 | KL @512 | top-1 @512 | Δppl @2048 | KL @2048 | top-1 \
             @2048 | passkey |"
        );
        let cols = |l: &str| l.matches('|').count();
        assert!(table.iter().all(|l| cols(l) == cols(table[0])), "{md}");
        assert_eq!(
            table[2],
            "| bf16 | 1000 | 0.0 % | 900 | 0.0 % | +0.00 % (ppl 12.00) | 0.00000 | 100.0 % | +0.00 % (ppl \
             10.00) | 0.00000 | 100.0 % | 1024: 3/3 ✓✓✓ |"
        );
        assert_eq!(
            table[3],
            "| int8 | 516 | 48.4 % | 464 | 48.4 % | +0.83 % (ppl 12.10) | 0.00040 | 98.9 % | +0.50 % (ppl \
             10.05) | 0.00060 | 99.0 % | 1024: 2/3 ✓✗✓ |"
        );
        assert!(md.contains("- text: GPL-3 (9000 tokens"));
    }

    #[test]
    fn json_has_the_documented_shape_in_context_order() {
        let r = sample();
        let s = r.to_json();
        assert!(s.find("\"512\"").unwrap() < s.find("\"2048\"").unwrap());
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        for k in [
            "model",
            "text",
            "date",
            "command",
            "policies",
            "passkey_depths",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert_eq!(v["text"]["tokens"], 9000);
        let p = &v["policies"][1];
        assert_eq!(p["name"], "int8");
        assert_eq!(p["memory_reduction"], 0.484);
        assert_eq!(p["sealed_reduction"], 0.484);
        assert_eq!(p["passkey"]["1024"], "2/3");
        assert_eq!(p["passkey_hits"]["1024"][1], false);
        let c = &p["by_ctx"]["2048"];
        for k in ["ppl", "dppl_pct", "kl", "top1", "tokens"] {
            assert!(c.get(k).is_some(), "missing by_ctx.{k}");
        }
        assert_eq!(c["tokens"], 511);
        assert_eq!(r.largest_ctx(), Some(2048));
    }

    #[test]
    fn png_is_written_and_a_missing_font_names_its_package() {
        // The error must name the package to install.
        let e = write_png(
            &sample(),
            Path::new("/nonexistent.png"),
            Path::new("/no/font.ttf"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("fonts-dejavu-core"), "{e}");
        // .ci/run installs fonts-dejavu-core.
        let font = Path::new(FONT_PATH);
        assert!(
            font.exists(),
            "{FONT_PATH} missing: apt-get install fonts-dejavu-core"
        );
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("chart.png");
        write_png(&sample(), &out, font).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
    }

    #[test]
    fn iso_dates() {
        assert_eq!(iso_from_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso_from_unix(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(iso_from_unix(1_767_225_599), "2025-12-31T23:59:59Z");
    }
}
