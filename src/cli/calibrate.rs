//! `switchyard calibrate` and `switchyard validate`: fit the performance model's constants to measured MoE layer
//! times, and check a calibrated profile on measurements it has not seen.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde_json::json;
use switchyard_cost::calibrate::{
    CalibratedProfile, LayerSpec, Selection, calibrate, metrics, predict_all, read_samples, select,
};

use super::specs::load_cluster;
use crate::plot;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Select {
    /// Every sample.
    All,
    /// Even snapshots (the k-th distinct iteration, k even).
    Even,
    /// Odd snapshots.
    Odd,
}

impl From<Select> for Selection {
    fn from(s: Select) -> Self {
        match s {
            Select::All => Selection::All,
            Select::Even => Selection::Even,
            Select::Odd => Selection::Odd,
        }
    }
}

/// Arguments of `switchyard calibrate`.
#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// Measured samples: the CSV of ../shared/calibration, or JSON Lines.
    #[arg(long)]
    samples: PathBuf,
    /// The hardware measured: a preset, a cluster spec or a profile (resized to the samples' GPU count).
    #[arg(long, default_value = "smartmoe-a100")]
    cluster: String,
    /// The measured layer: `d_model=2048,d_ffn=4096,gated=false,dtype=fp16` (the default, SmartMoE's
    /// benchmark layer) or a JSON file with those fields.
    #[arg(long)]
    layer: Option<String>,
    /// Which samples to fit on.
    #[arg(long, value_enum, default_value = "all")]
    select: Select,
    /// Constants to fit (comma-separated; default: all of gemm_max_efficiency, gemm_half_efficiency_rows,
    /// per_expert_overhead_us, intra_bandwidth_efficiency, moe_layer_overhead_us); the others keep the
    /// cluster's values.
    #[arg(long, value_delimiter = ',')]
    fit: Vec<String>,
    /// Where to write the calibrated profile (JSON).
    #[arg(long)]
    out: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_layer(arg: Option<&str>) -> Result<LayerSpec> {
    let Some(s) = arg else { return Ok(LayerSpec::default()) };
    if Path::new(s).exists() {
        let text = std::fs::read_to_string(s).with_context(|| format!("{s}: cannot read"))?;
        let l: LayerSpec = serde_json::from_str(&text)
            .with_context(|| format!("{s}: not a layer spec; fix: {{\"d_model\": 2048, \"d_ffn\": 4096, \"gated\": false, \"dtype\": \"fp16\"}}"))?;
        if l.d_model == 0 || l.d_ffn == 0 {
            bail!("{s}: d_model and d_ffn must be positive");
        }
        return Ok(l);
    }
    LayerSpec::parse(s).map_err(|e| anyhow::anyhow!("--layer {s}: {e}"))
}

/// Runs `switchyard calibrate`.
pub fn run_calibrate(a: CalibrateArgs) -> Result<()> {
    let layer = parse_layer(a.layer.as_deref())?;
    let cluster = load_cluster(&a.cluster, None)?;
    let all = read_samples(&a.samples)?;
    let samples = select(&all, a.select.into());
    let file = a.samples.display().to_string();
    let t = std::time::Instant::now();
    let profile = calibrate(&samples, &file, a.select.into(), &layer, &cluster, &a.fit)
        .map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
    let text = serde_json::to_string_pretty(&profile)?;
    std::fs::write(&a.out, text + "\n").with_context(|| format!("cannot write {}", a.out.display()))?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"profile": a.out.display().to_string(), "fit": profile.fit, "reference": profile.reference, "constants": profile.cluster.constants})
            )?
        );
        return Ok(());
    }
    let c = &profile.cluster.constants;
    println!(
        "fitted on {} samples ({:?} snapshots of {}) of {} x {} in {:.1} s ({} solver iterations)",
        samples.len(),
        profile.fitted_on.selection,
        file,
        profile.cluster.num_gpus(),
        profile.cluster.gpu.name,
        t.elapsed().as_secs_f64(),
        profile.fitted_on.iterations
    );
    println!(
        "  gemm_max_efficiency {:.3}, gemm_half_efficiency_rows {:.0}, per_expert_overhead_us {:.1}, intra_bandwidth_efficiency {:.3}, moe_layer_overhead_us {:.1}",
        c.gemm_max_efficiency,
        c.gemm_half_efficiency_rows,
        c.per_expert_overhead_us,
        c.intra_bandwidth_efficiency,
        c.moe_layer_overhead_us
    );
    println!("  fit: MAPE {:.2}%, Pearson r {:.3}", profile.fit.mape_percent, profile.fit.pearson_r);
    if let Some(r) = profile.reference {
        println!(
            "  the file's reference model on the same samples: MAPE {:.2}%, Pearson r {:.3}",
            r.mape_percent, r.pearson_r
        );
    }
    println!("wrote {}", a.out.display());
    Ok(())
}

/// Arguments of `switchyard validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Measured samples (CSV or JSON Lines); any GPU count: the profile's cluster is resized to match.
    #[arg(long)]
    samples: PathBuf,
    /// A calibrated profile written by `switchyard calibrate`.
    #[arg(long)]
    profile: PathBuf,
    /// Which samples to test on.
    #[arg(long, value_enum, default_value = "all")]
    select: Select,
    /// Stem of the scatter plot (`<stem>.png` and `<stem>.svg`); default: next to the profile.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Reads a calibrated profile.
pub fn read_profile(path: &Path) -> Result<CalibratedProfile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!("{}: not a calibrated profile; fix: write one with `switchyard calibrate --out`", path.display())
    })
}

/// Runs `switchyard validate`.
pub fn run_validate(a: ValidateArgs) -> Result<()> {
    let profile = read_profile(&a.profile)?;
    let all = read_samples(&a.samples)?;
    let samples = select(&all, a.select.into());
    if samples.is_empty() {
        bail!("{}: no samples in the {:?} selection", a.samples.display(), a.select);
    }
    let est = predict_all(&samples, &profile.layer, &profile.cluster)
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.samples.display()))?;
    let real: Vec<f64> = samples.iter().map(|s| s.real_ms).collect();
    let m = metrics(&est, &real);
    let refs: Vec<f64> = samples.iter().filter_map(|s| s.reference_est_ms).collect();
    let reference = (refs.len() == samples.len()).then(|| metrics(&refs, &real));
    let stem = a.plot.clone().unwrap_or_else(|| {
        let s = a.profile.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "profile".into());
        a.profile.with_file_name(format!("{s}-validate"))
    });
    let title = format!("{} samples: MAPE {:.2}%, r {:.3}", samples.len(), m.mape_percent, m.pearson_r);
    let files = plot::scatter_estimate_vs_real(&stem, &title, &real, &est)?;
    let gpus = samples[0].ranks();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "samples": m.samples, "gpus": gpus, "mape_percent": m.mape_percent, "pearson_r": m.pearson_r,
                "reference": reference, "plots": files, "profile": a.profile.display().to_string(),
            }))?
        );
        return Ok(());
    }
    println!(
        "{} samples on {} GPUs ({:?}): MAPE {:.2}%, Pearson r {:.3}",
        m.samples, gpus, a.select, m.mape_percent, m.pearson_r
    );
    if let Some(r) = reference {
        println!(
            "  the file's reference model on the same samples: MAPE {:.2}%, Pearson r {:.3}",
            r.mape_percent, r.pearson_r
        );
    }
    println!("  plot: {}", files.join(", "));
    Ok(())
}
