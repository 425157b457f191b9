//! `switchyard presets` and `switchyard topology`.

use anyhow::Result;
use clap::Args;
use serde_json::json;
use switchyard_cost::presets;
use switchyard_cost::topology::Topology;

use super::specs::load_cluster;

/// Arguments of `switchyard presets`.
#[derive(Debug, Args)]
pub struct PresetsArgs {
    /// Print JSON: `{"models": [...], "clusters": [...]}` with every full spec.
    #[arg(long)]
    json: bool,
}

/// Runs `switchyard presets`.
pub fn run(a: PresetsArgs) -> Result<()> {
    let mut models = Vec::new();
    for n in presets::model_names() {
        models.push(presets::model(n).expect("listed preset")?);
    }
    let clusters: Vec<_> = presets::CLUSTER_NAMES.iter().map(|n| presets::cluster(n).expect("listed preset")).collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json!({ "models": models, "clusters": clusters }))?);
        return Ok(());
    }
    println!("models:");
    println!(
        "  {:<24} {:>6} {:>7} {:>8} {:>6} {:>9} {:>10} {:>10}",
        "name", "layers", "hidden", "experts", "top-k", "moe", "params", "active"
    );
    for m in &models {
        let p = m.param_counts();
        let (e, k) = m.moe.as_ref().map_or((0, 0), |x| (x.num_experts, x.top_k));
        println!(
            "  {:<24} {:>6} {:>7} {:>8} {:>6} {:>9} {:>9.1}B {:>9.1}B",
            m.name,
            m.num_layers,
            m.hidden_size,
            e,
            k,
            format!("{}/{}", m.num_moe_layers(), m.num_layers),
            p.total as f64 / 1e9,
            p.active_per_token as f64 / 1e9
        );
    }
    println!("clusters (node counts are defaults; --gpus resizes):");
    for c in &clusters {
        println!(
            "  {:<20} {} x {} {} ({:.0} GiB), {:?} {:.0} GB/s per GPU, {} x {:.0} Gb/s NICs per node",
            c.name,
            c.nodes,
            c.gpus_per_node,
            c.gpu.name,
            c.gpu.memory_gib,
            c.intra_node.kind,
            c.intra_node.bandwidth_gbyte_s,
            c.inter_node.nics_per_node,
            c.inter_node.nic_gbit_s
        );
    }
    Ok(())
}

/// Arguments of `switchyard topology`.
#[derive(Debug, Args)]
pub struct TopologyArgs {
    /// Cluster: a preset name or a cluster spec JSON.
    #[arg(long, short)]
    cluster: String,
    /// Use this many GPUs.
    #[arg(long)]
    gpus: Option<u32>,
    /// Print JSON: the graph's counts and every link class.
    #[arg(long)]
    json: bool,
}

/// Runs `switchyard topology`.
pub fn run_topology(a: TopologyArgs) -> Result<()> {
    let cluster = load_cluster(&a.cluster, a.gpus)?;
    let topo = Topology::from_cluster(&cluster);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&topo.summary())?);
    } else {
        println!("{}", topo.describe());
    }
    Ok(())
}
