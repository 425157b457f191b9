//! Calibration: fit the performance model's hardware constants to measured MoE layer times by least squares,
//! and validate a calibrated profile on measurements it has not seen.
//!
//! The model fitted is the same [`crate::cost::moe_layer_exact`] the planner and simulator use, so the fit
//! stays physical: GEMMs on an efficiency curve, per-expert and per-layer fixed costs, all-to-all bytes over the
//! links of the topology. Nothing is a curve over this file's own samples: a profile fitted on one node predicts
//! more tokens per GPU, or more nodes (the NICs' constants keep their datasheet efficiency), without refitting.

pub mod fit;
pub mod samples;

use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterSpec, ModelConstants};
use crate::cost::{Fabric, MoeLayerShape, moe_layer_exact};
use crate::error::Source;
use crate::model::Dtype;
use crate::placement::Placement;
pub use fit::{Bound, FitResult, levenberg_marquardt};
pub use samples::{Sample, SampleError, read_samples};

/// The MoE layer that was measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSpec {
    /// Model width.
    pub d_model: u64,
    /// Expert FFN hidden width.
    pub d_ffn: u64,
    /// SwiGLU experts (else Linear-GELU-Linear with biases).
    #[serde(default)]
    pub gated: bool,
    /// Precision of the measurement.
    pub dtype: Dtype,
}

impl Default for LayerSpec {
    /// The layer of `../shared/calibration`: SmartMoE's benchmark, a FastMoE FFN of 2048 -> 4096 -> 2048, fp16.
    fn default() -> Self {
        LayerSpec { d_model: 2048, d_ffn: 4096, gated: false, dtype: Dtype::Fp16 }
    }
}

impl LayerSpec {
    /// Parses `d_model=2048,d_ffn=4096,gated=false,dtype=fp16` (omitted keys keep the default layer's values).
    pub fn parse(s: &str) -> Result<LayerSpec, String> {
        let mut l = LayerSpec::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| format!("`{part}` is not key=value"))?;
            let num = |v: &str| {
                v.parse::<u64>().ok().filter(|&x| x > 0).ok_or_else(|| format!("{k}={v}: not a positive integer"))
            };
            match k.trim() {
                "d_model" => l.d_model = num(v)?,
                "d_ffn" => l.d_ffn = num(v)?,
                "gated" => l.gated = v.parse().map_err(|_| format!("gated={v}: use true or false"))?,
                "dtype" => {
                    l.dtype = serde_json::from_value(serde_json::Value::String(v.to_string()))
                        .map_err(|_| format!("dtype={v}: use fp32, fp16, bf16 or fp8"))?
                }
                other => return Err(format!("unknown key `{other}` (d_model, d_ffn, gated, dtype)")),
            }
        }
        Ok(l)
    }

    fn shape(&self, cluster: &ClusterSpec) -> MoeLayerShape {
        MoeLayerShape {
            d_model: self.d_model,
            d_ffn: self.d_ffn,
            gated: self.gated,
            act_bytes: self.dtype.comm_bytes(),
            param_bytes: self.dtype.bytes().max(2),
            grad_bytes: 4,
            peak_flops: cluster.gpu.peak_flops(self.dtype),
        }
    }
}

/// Which samples to use, by snapshot: the `k`-th distinct iteration of the file (0-based) is snapshot `k`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    /// Every sample.
    All,
    /// Samples of even snapshots (the fitting half of the shared file's split).
    Even,
    /// Samples of odd snapshots (the held-out half).
    Odd,
}

/// Keeps the samples of a selection.
pub fn select(samples: &[Sample], sel: Selection) -> Vec<Sample> {
    let mut iters: Vec<u64> = samples.iter().map(|s| s.iter).collect();
    iters.sort_unstable();
    iters.dedup();
    samples
        .iter()
        .filter(|s| {
            let k = iters.binary_search(&s.iter).unwrap_or(0);
            match sel {
                Selection::All => true,
                Selection::Even => k % 2 == 0,
                Selection::Odd => k % 2 == 1,
            }
        })
        .cloned()
        .collect()
}

/// Error and correlation of estimates against measurements.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Samples compared.
    pub samples: usize,
    /// Mean absolute percentage error.
    pub mape_percent: f64,
    /// Pearson correlation coefficient.
    pub pearson_r: f64,
}

/// MAPE and Pearson r of `est` against `real`.
pub fn metrics(est: &[f64], real: &[f64]) -> Metrics {
    let n = est.len().min(real.len());
    if n == 0 {
        return Metrics { samples: 0, mape_percent: f64::NAN, pearson_r: f64::NAN };
    }
    let mape = est.iter().zip(real).map(|(e, r)| ((e - r) / r).abs()).sum::<f64>() / n as f64 * 100.0;
    let (me, mr) = (est.iter().sum::<f64>() / n as f64, real.iter().sum::<f64>() / n as f64);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (e, r) in est.iter().zip(real) {
        sxy += (e - me) * (r - mr);
        sxx += (e - me) * (e - me);
        syy += (r - mr) * (r - mr);
    }
    let r = if sxx > 0.0 && syy > 0.0 { sxy / (sxx * syy).sqrt() } else { f64::NAN };
    Metrics { samples: n, mape_percent: mape, pearson_r: r }
}

/// The cluster a sample of `ranks` GPUs ran on: `cluster` resized to that many GPUs.
pub fn cluster_for(cluster: &ClusterSpec, ranks: usize) -> Result<ClusterSpec, String> {
    if ranks as u32 == cluster.num_gpus() {
        return Ok(cluster.clone());
    }
    cluster.with_gpus(ranks as u32, &Source::Inline).map_err(|e| e.to_string())
}

/// Modelled time of a sample: the minimum over its micro-batches (the measurement is the minimum over rounds,
/// each replaying one micro-batch), experts placed contiguously (expert `e` on GPU `e / (E / G)`).
pub fn predict_ms(sample: &Sample, layer: &LayerSpec, cluster: &ClusterSpec, fabric: &Fabric) -> Result<f64, String> {
    let (g, e) = (sample.ranks(), sample.experts());
    if g == 0 || e == 0 {
        return Err(format!("sample {} has no load", sample.id));
    }
    let placement = Placement::contiguous(g, e.div_ceil(g), e).map_err(|x| x.to_string())?;
    let gpus: Vec<u32> = (0..g as u32).collect();
    let shape = layer.shape(cluster);
    let mut best = f64::INFINITY;
    for mb in &sample.micro_batches {
        let t = moe_layer_exact(&shape, mb, &placement, &gpus, fabric, &cluster.constants, false)?;
        best = best.min(t.total_ms);
    }
    Ok(best)
}

/// Predictions for many samples on one cluster.
pub fn predict_all(samples: &[Sample], layer: &LayerSpec, cluster: &ClusterSpec) -> Result<Vec<f64>, String> {
    let ranks = samples.first().map_or(0, |s| s.ranks());
    let c = cluster_for(cluster, ranks)?;
    let fabric = Fabric::from_cluster(&c);
    samples.iter().map(|s| predict_ms(s, layer, &c, &fabric)).collect()
}

/// The constants calibration fits, with their physical ranges.
pub const FITTED: [(&str, Bound); 5] = [
    ("gemm_max_efficiency", Bound::Interval(0.05, 1.0)),
    ("gemm_half_efficiency_rows", Bound::Positive(256.0)),
    ("per_expert_overhead_us", Bound::Positive(50.0)),
    ("intra_bandwidth_efficiency", Bound::Interval(0.05, 1.0)),
    ("moe_layer_overhead_us", Bound::Positive(100.0)),
];

fn get(c: &ModelConstants, name: &str) -> f64 {
    match name {
        "gemm_max_efficiency" => c.gemm_max_efficiency,
        "gemm_half_efficiency_rows" => c.gemm_half_efficiency_rows,
        "per_expert_overhead_us" => c.per_expert_overhead_us,
        "intra_bandwidth_efficiency" => c.intra_bandwidth_efficiency,
        "moe_layer_overhead_us" => c.moe_layer_overhead_us,
        _ => f64::NAN,
    }
}

fn set(c: &mut ModelConstants, name: &str, v: f64) {
    match name {
        "gemm_max_efficiency" => c.gemm_max_efficiency = v,
        "gemm_half_efficiency_rows" => c.gemm_half_efficiency_rows = v,
        "per_expert_overhead_us" => c.per_expert_overhead_us = v,
        "intra_bandwidth_efficiency" => c.intra_bandwidth_efficiency = v,
        "moe_layer_overhead_us" => c.moe_layer_overhead_us = v,
        _ => {}
    }
}

/// Where and on what a profile was fitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The sample file.
    pub samples_file: String,
    /// Which samples.
    pub selection: Selection,
    /// GPU model.
    pub gpu: String,
    /// GPUs measured.
    pub gpus: u32,
    /// Nodes measured.
    pub nodes: u32,
    /// The constants that were fitted (the others keep the cluster spec's values).
    pub fitted_constants: Vec<String>,
    /// Iterations of the least-squares solver.
    pub iterations: usize,
}

/// A calibrated cluster profile: the cluster spec with fitted constants, the layer it was fitted on, and how
/// well it fits. `plan`, `place`, `simulate` and `validate` accept it where they accept a cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibratedProfile {
    /// Format version of the profile.
    pub profile_version: u32,
    /// The cluster, as measured, with the fitted constants.
    pub cluster: ClusterSpec,
    /// The measured layer.
    pub layer: LayerSpec,
    /// Provenance.
    pub fitted_on: Provenance,
    /// Error on the fitted samples.
    pub fit: Metrics,
    /// The reference model's error on the same samples, when the file carries its estimates.
    pub reference: Option<Metrics>,
}

/// Fits the constants named in `fit` (a subset of [`FITTED`]; empty: all of them) of `cluster` to `samples`
/// (all from one configuration) by least squares on relative errors, starting from the cluster's current
/// constants; the others keep their values.
pub fn calibrate(
    samples: &[Sample],
    samples_file: &str,
    selection: Selection,
    layer: &LayerSpec,
    cluster: &ClusterSpec,
    fit: &[String],
) -> Result<CalibratedProfile, String> {
    if samples.is_empty() {
        return Err("no samples to fit (check --select)".into());
    }
    let names: Vec<&str> = FITTED.iter().map(|(n, _)| *n).collect();
    if let Some(bad) = fit.iter().find(|f| !names.contains(&f.as_str())) {
        return Err(format!("cannot fit `{bad}`: the fittable constants are {}", names.join(", ")));
    }
    let chosen: Vec<(&str, Bound)> =
        FITTED.iter().filter(|(n, _)| fit.is_empty() || fit.iter().any(|f| f == n)).copied().collect();
    let ranks = samples[0].ranks();
    let base = cluster_for(cluster, ranks)?;
    let real: Vec<f64> = samples.iter().map(|s| s.real_ms).collect();
    let residuals = |x: &[f64]| -> Vec<f64> {
        let mut c = base.clone();
        for ((name, _), v) in chosen.iter().zip(x) {
            set(&mut c.constants, name, *v);
        }
        let fabric = Fabric::from_cluster(&c);
        samples
            .iter()
            .zip(&real)
            .map(|(s, r)| match predict_ms(s, layer, &c, &fabric) {
                Ok(p) if p.is_finite() => (p - r) / r,
                _ => 1e3,
            })
            .collect()
    };
    let x0: Vec<f64> = chosen.iter().map(|(n, _)| get(&base.constants, n)).collect();
    let bounds: Vec<Bound> = chosen.iter().map(|(_, b)| *b).collect();
    // A weak prior (1% of a typical relative residual per unit of z) holds what the samples cannot see.
    let f = levenberg_marquardt(&x0, &bounds, &residuals, 100, 0.01);
    let mut fitted = base.clone();
    for ((name, _), v) in chosen.iter().zip(&f.params) {
        set(&mut fitted.constants, name, *v);
    }
    let est = predict_all(samples, layer, &fitted)?;
    let reference: Vec<f64> = samples.iter().filter_map(|s| s.reference_est_ms).collect();
    Ok(CalibratedProfile {
        profile_version: 1,
        fitted_on: Provenance {
            samples_file: samples_file.to_string(),
            selection,
            gpu: fitted.gpu.name.clone(),
            gpus: fitted.num_gpus(),
            nodes: fitted.nodes,
            fitted_constants: chosen.iter().map(|(n, _)| n.to_string()).collect(),
            iterations: f.iterations,
        },
        layer: layer.clone(),
        fit: metrics(&est, &real),
        reference: (reference.len() == samples.len()).then(|| metrics(&reference, &real)),
        cluster: fitted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets;
    use crate::workload::LoadMatrix;

    fn synthetic(truth: &ClusterSpec, layer: &LayerSpec, n: usize) -> Vec<Sample> {
        // Skewed loads of various shapes on 8 GPUs x 32 experts, 8192 assignments per GPU; "measured" by the
        // model itself with the true constants.
        let mut out = Vec::new();
        for i in 0..n {
            let hot = (i * 7) % 32;
            let skew = 1.0 + (i % 5) as f64;
            let w: Vec<f64> = (0..32).map(|e| if e == hot { skew * 4.0 } else { 1.0 + ((e * i) % 3) as f64 }).collect();
            let m = LoadMatrix::from_fractions(8, &w, 8192);
            out.push(Sample {
                id: i.to_string(),
                iter: i as u64,
                layer: 0,
                real_ms: 0.0,
                reference_est_ms: None,
                micro_batches: vec![m],
            });
        }
        let est = predict_all(&out, layer, truth).unwrap();
        for (s, e) in out.iter_mut().zip(est) {
            s.real_ms = e;
        }
        out
    }

    #[test]
    fn recovers_constants_from_its_own_predictions() {
        let mut truth = presets::cluster("smartmoe-a100").unwrap().with_gpus(8, &Source::Inline).unwrap();
        truth.constants.gemm_max_efficiency = 0.55;
        truth.constants.per_expert_overhead_us = 300.0;
        truth.constants.moe_layer_overhead_us = 900.0;
        let layer = LayerSpec::default();
        let samples = synthetic(&truth, &layer, 40);
        let start = presets::cluster("smartmoe-a100").unwrap();
        let p = calibrate(&samples, "synthetic", Selection::All, &layer, &start, &[]).unwrap();
        assert!(calibrate(&samples, "synthetic", Selection::All, &layer, &start, &["colour".into()]).is_err());
        assert!(p.fit.mape_percent < 0.5, "{:?}", p.fit);
        assert!(p.fit.pearson_r > 0.999);
        assert_eq!(p.cluster.num_gpus(), 8);
    }

    #[test]
    fn selection_splits_by_snapshot() {
        let mk = |iter: u64| Sample {
            id: iter.to_string(),
            iter,
            layer: 0,
            real_ms: 1.0,
            reference_est_ms: None,
            micro_batches: vec![],
        };
        let s: Vec<Sample> = [101, 101, 201, 301, 401].into_iter().map(mk).collect();
        let even: Vec<u64> = select(&s, Selection::Even).iter().map(|x| x.iter).collect();
        assert_eq!(even, vec![101, 101, 301]);
        assert_eq!(select(&s, Selection::Odd).len(), 2);
    }

    #[test]
    fn metrics_by_hand() {
        let m = metrics(&[11.0, 18.0, 33.0], &[10.0, 20.0, 30.0]);
        assert!((m.mape_percent - 10.0).abs() < 1e-12);
        // Deviations (-29/3, -8/3, 37/3) and (-10, 0, 10): r = 220 / sqrt(2274/9 * 200).
        assert!((m.pearson_r - 220.0 / (2274.0f64 / 9.0 * 200.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn layer_spec_parses() {
        let l = LayerSpec::parse("d_model=1024, d_ffn=4096,gated=true,dtype=bf16").unwrap();
        assert_eq!((l.d_model, l.d_ffn, l.gated, l.dtype), (1024, 4096, true, Dtype::Bf16));
        assert!(LayerSpec::parse("d_model=0").is_err());
        assert!(LayerSpec::parse("colour=red").is_err());
    }
}
