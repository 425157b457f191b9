//! Loading specs named on the command line: a preset name, a spec JSON file, or a Hugging Face config.json.

use std::path::Path;

use anyhow::{Context, Result, bail};
use switchyard_cost::error::{Source, parse_json_str};
use switchyard_cost::hf::{HfImportOptions, import_hf_config};
use switchyard_cost::{ClusterSpec, ModelSpec, presets};

/// A model by preset name or file. A file with `model_type` or `architectures` is read as a Hugging Face config.
pub fn load_model(arg: &str) -> Result<ModelSpec> {
    if let Some(m) = presets::model(arg) {
        return Ok(m?);
    }
    let path = Path::new(arg);
    if !path.exists() {
        bail!(
            "--model {arg}: no such preset or file; fix: name a preset ({}) or a model JSON / Hugging Face config.json",
            presets::model_names().join(", ")
        );
    }
    let source = Source::File(arg.to_string());
    let text = std::fs::read_to_string(path).with_context(|| format!("{arg}: cannot read"))?;
    let value: serde_json::Value = parse_json_str(&text, &source, "model spec")?;
    let model = if value.get("model_type").is_some() || value.get("architectures").is_some() {
        import_hf_config(&text, &source, &HfImportOptions::default())?
    } else {
        let m: ModelSpec = parse_json_str(&text, &source, "model spec")?;
        m.validate(&source)?;
        m
    };
    Ok(model)
}

/// A cluster by preset name, cluster spec file or calibrated profile, optionally resized to `gpus`.
pub fn load_cluster(arg: &str, gpus: Option<u32>) -> Result<ClusterSpec> {
    let (cluster, source) = match presets::cluster(arg) {
        Some(c) => (c, Source::Preset(arg.to_string())),
        None => {
            let path = Path::new(arg);
            if !path.exists() {
                bail!(
                    "--cluster {arg}: no such preset or file; fix: name a preset ({}) or a cluster JSON",
                    presets::CLUSTER_NAMES.join(", ")
                );
            }
            let source = Source::File(arg.to_string());
            let text = std::fs::read_to_string(path).with_context(|| format!("{arg}: cannot read"))?;
            let value: serde_json::Value = parse_json_str(&text, &source, "cluster spec")?;
            // A calibrated profile carries its cluster with the fitted constants.
            let c: ClusterSpec = if value.get("profile_version").is_some() {
                let p: switchyard_cost::calibrate::CalibratedProfile =
                    parse_json_str(&text, &source, "calibrated profile")?;
                p.cluster
            } else {
                parse_json_str(&text, &source, "cluster spec")?
            };
            (c, source)
        }
    };
    cluster.validate(&source)?;
    Ok(match gpus {
        Some(g) => cluster.with_gpus(g, &source)?,
        None => cluster,
    })
}
