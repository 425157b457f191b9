//! `switchyard report`: replay a trace under every algorithm and re-planning frequency; write a markdown table,
//! JSON and plots (time per iteration over training per frequency, imbalance per layer).

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;

use super::simulate::{SimSetup, load, parse_algorithm, parse_frequency, run_one};
use crate::plot::{self, Line};

/// Arguments of `switchyard report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    #[command(flatten)]
    setup: SimSetup,
    /// Re-planning frequencies, comma-separated: iterations (dyn.N) or `auto`.
    #[arg(long = "dyn", default_value = "1,10,100,1000,auto")]
    dyn_list: String,
    /// Algorithms, comma-separated.
    #[arg(long, default_value = "static,smartmoe,eplb,switchyard")]
    algorithms: String,
    /// Output directory for report.md, report.json and the plots.
    #[arg(long, default_value = "out/report")]
    out: PathBuf,
}

/// Runs `switchyard report`.
pub fn run(a: ReportArgs) -> Result<()> {
    let l = load(&a.setup)?;
    let algs = a.algorithms.split(',').map(|s| parse_algorithm(s.trim())).collect::<Result<Vec<_>>>()?;
    let freqs = a.dyn_list.split(',').map(|s| parse_frequency(s.trim())).collect::<Result<Vec<_>>>()?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("cannot create {}", a.out.display()))?;
    let mut rows = Vec::new();
    let mut md = String::new();
    let interval = l.trace.snapshot_interval().unwrap_or(1);
    writeln!(
        md,
        "# Switchyard report\n\nTrace `{}`: {} snapshots ({} iterations apart: each stands for the {} iterations up to the next), {} MoE layers, {} GPUs on {}, {} experts, {} slots per GPU; predictor `{}`{}.\n",
        l.trace.source,
        l.trace.snapshots.len(),
        interval,
        interval,
        l.trace.layers,
        l.trace.ranks,
        l.cluster.name,
        l.trace.experts,
        l.slots,
        a.setup.predictor,
        if a.setup.oracle { ", oracle loads" } else { ", past loads only" }
    )?;
    writeln!(
        md,
        "| algorithm | frequency | mean busiest/mean | p95 | ms/iter | bound ms/iter | x bound | switches | GB moved | MB/decision |"
    )?;
    writeln!(md, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")?;
    let mut per_layer_lines = Vec::new();
    let mut images: Vec<String> = Vec::new();
    for alg in &algs {
        let mut series = Vec::new();
        for f in &freqs {
            let r = run_one(&l, *alg, *f, a.setup.oracle, a.setup.quiet);
            let s = &r.summary;
            writeln!(
                md,
                "| {} | {} | {:.3} | {:.3} | {:.1} | {:.1} | {:.3} | {} | {:.1} | {:.1} |",
                alg.name(),
                f.label(),
                s.mean_imbalance,
                s.p95_imbalance,
                s.mean_iter_ms,
                s.mean_bound_ms,
                s.ratio_to_bound,
                s.switches,
                s.bytes_moved / 1e9,
                s.bytes_per_decision / 1e6
            )?;
            series.push(Line {
                label: f.label(),
                points: r.snapshots.iter().map(|x| (x.iteration as f64, x.iter_ms)).collect(),
            });
            if Some(f)
                == freqs
                    .iter()
                    .find(|f| matches!(f, switchyard_planner::online::Frequency::Every { n: 10 }))
                    .or(freqs.first())
            {
                let layers = l.trace.layers;
                let mut mean = vec![0.0; layers];
                for x in &r.snapshots {
                    for (m, v) in mean.iter_mut().zip(&x.imbalance) {
                        *m += v / r.snapshots.len() as f64;
                    }
                }
                per_layer_lines.push(Line {
                    label: format!("{} {}", alg.name(), f.label()),
                    points: mean.iter().enumerate().map(|(i, &v)| (i as f64, v)).collect(),
                });
            }
            rows.push(json!({"algorithm": alg.name(), "frequency": f.label(), "summary": r.summary}));
        }
        let stem = a.out.join(format!("time-{}", alg.name()));
        plot::lines(
            &stem,
            &format!("{}: modelled MoE time per iteration", alg.name()),
            "iteration",
            "ms per iteration",
            &series,
        )?;
        images.push(format!("![{} time per iteration](time-{}.png)", alg.name(), alg.name()));
    }
    writeln!(md)?;
    for i in &images {
        writeln!(md, "{i}\n")?;
    }
    plot::lines(
        &a.out.join("imbalance-per-layer"),
        "busiest GPU / mean load per layer",
        "MoE layer",
        "busiest / mean",
        &per_layer_lines,
    )?;
    writeln!(md, "![imbalance per layer](imbalance-per-layer.png)")?;
    std::fs::write(a.out.join("report.md"), &md)?;
    std::fs::write(
        a.out.join("report.json"),
        serde_json::to_string_pretty(&json!({"trace": l.trace.source, "slots_per_gpu": l.slots, "runs": rows}))? + "\n",
    )?;
    print!("{md}");
    println!("\nwrote {}/report.md, report.json and PNG/SVG plots", a.out.display());
    Ok(())
}
