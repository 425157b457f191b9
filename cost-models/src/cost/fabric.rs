//! Effective link figures the cost terms use: per-GPU bandwidth and latency of a collective among `m` GPUs of a
//! node, within the node or across nodes, after the efficiency constants. Read off the cluster's topology graph
//! (the single source of truth for links) once, into tables indexed by `m`, so that pricing a plan costs O(1)
//! per collective.

use serde::Serialize;

use crate::cluster::ClusterSpec;
use crate::topology::Topology;

/// Bandwidth and latency one GPU sees in a collective over some group.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LinkInfo {
    /// Bytes per second each GPU can send (and receive) in the collective.
    pub per_gpu_bytes_per_s: f64,
    /// One-way latency of a message, in seconds.
    pub latency_s: f64,
}

/// Effective link classes of a cluster.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fabric {
    /// GPUs per node.
    pub gpus_per_node: u32,
    /// Nodes.
    pub nodes: u32,
    /// `intra[m - 1]`: per GPU, a collective among `m` GPUs of one node (NVSwitch: the port; NVLink mesh: the
    /// `m - 1` links in use; PCIe: a share of the host switch).
    intra: Vec<LinkInfo>,
    /// `inter[m - 1]`: per GPU, a collective of a group with `m` GPUs on each of several nodes (its share of the
    /// NICs it is attached to, and no more than the intra-node figure).
    inter: Vec<LinkInfo>,
    /// Latency of a message within a node, seconds.
    pub intra_latency_s: f64,
    /// Latency of a message between nodes, seconds.
    pub inter_latency_s: f64,
    /// Memory bandwidth of one GPU for memory-bound kernels, after efficiency.
    pub hbm_bytes_per_s: f64,
    /// Fixed cost of one collective call, seconds.
    pub collective_launch_s: f64,
}

impl Fabric {
    /// Reads the link tables off the cluster's topology graph.
    pub fn from_topology(cluster: &ClusterSpec, topo: &Topology) -> Fabric {
        let c = &cluster.constants;
        let k = cluster.gpus_per_node;
        let mut intra = Vec::with_capacity(k as usize);
        let mut inter = Vec::with_capacity(k as usize);
        for m in 1..=k {
            let one: Vec<u32> = (0..m).collect();
            let g = topo.group_bandwidth(&one);
            intra.push(LinkInfo { per_gpu_bytes_per_s: g.per_gpu_bytes_per_s, latency_s: g.latency_us * 1e-6 });
            if cluster.nodes > 1 {
                let two: Vec<u32> = (0..m).chain(k..k + m).collect();
                let g = topo.group_bandwidth(&two);
                inter.push(LinkInfo { per_gpu_bytes_per_s: g.per_gpu_bytes_per_s, latency_s: g.latency_us * 1e-6 });
            }
        }
        let intra_latency_s = if k > 1 { topo.pair_latency_us(0, 1) * 1e-6 } else { 0.0 };
        let inter_latency_s = if cluster.nodes > 1 { topo.pair_latency_us(0, k) * 1e-6 } else { intra_latency_s };
        Fabric {
            gpus_per_node: k,
            nodes: cluster.nodes,
            intra,
            inter,
            intra_latency_s,
            inter_latency_s,
            hbm_bytes_per_s: cluster.gpu.hbm_gbyte_s * 1e9 * c.hbm_efficiency,
            collective_launch_s: c.collective_launch_us * 1e-6,
        }
    }

    /// Builds the topology graph and then the link tables.
    pub fn from_cluster(cluster: &ClusterSpec) -> Fabric {
        Fabric::from_topology(cluster, &Topology::from_cluster(cluster))
    }

    /// A fabric with a non-blocking switch in each node (`intra_bytes_per_s` per GPU) and `node_nic_bytes_per_s`
    /// shared by the GPUs of a node: the shape of hand calculations in tests and examples.
    #[allow(clippy::too_many_arguments)]
    pub fn switched(
        gpus_per_node: u32,
        nodes: u32,
        intra_bytes_per_s: f64,
        intra_latency_s: f64,
        node_nic_bytes_per_s: f64,
        inter_latency_s: f64,
        hbm_bytes_per_s: f64,
        collective_launch_s: f64,
    ) -> Fabric {
        let intra = (1..=gpus_per_node)
            .map(|_| LinkInfo { per_gpu_bytes_per_s: intra_bytes_per_s, latency_s: intra_latency_s })
            .collect();
        let inter = if nodes > 1 {
            (1..=gpus_per_node)
                .map(|m| LinkInfo {
                    per_gpu_bytes_per_s: (node_nic_bytes_per_s / m as f64).min(intra_bytes_per_s),
                    latency_s: inter_latency_s,
                })
                .collect()
        } else {
            Vec::new()
        };
        Fabric {
            gpus_per_node,
            nodes,
            intra,
            inter,
            intra_latency_s,
            inter_latency_s,
            hbm_bytes_per_s,
            collective_launch_s,
        }
    }

    fn index(&self, m: u32) -> usize {
        (m.clamp(1, self.gpus_per_node.max(1)) - 1) as usize
    }

    /// Per-GPU link of a collective among `m` GPUs of one node.
    pub fn intra_link(&self, m: u32) -> LinkInfo {
        self.intra[self.index(m)]
    }

    /// Per-GPU link of a collective of a group with `m` GPUs on each of several nodes; the intra-node link on a
    /// single-node cluster.
    pub fn inter_link(&self, m: u32) -> LinkInfo {
        if self.inter.is_empty() { self.intra_link(m) } else { self.inter[self.index(m)] }
    }

    /// Bytes per second that `m` GPUs of one node can send to other nodes together.
    pub fn node_inter_bytes_per_s(&self, m: u32) -> f64 {
        self.inter_link(m).per_gpu_bytes_per_s * m.clamp(1, self.gpus_per_node.max(1)) as f64
    }

    /// Per-GPU bandwidth and latency of a ring collective over a group of `size` GPUs of which `per_node` sit on
    /// each node (groups are laid out in contiguous blocks, so the group spans `ceil(size / per_node)` nodes).
    pub fn group_link(&self, size: u32, per_node: u32) -> LinkInfo {
        let per_node = per_node.clamp(1, size.max(1));
        if size <= per_node || self.nodes <= 1 { self.intra_link(per_node) } else { self.inter_link(per_node) }
    }

    /// Node of a GPU given the GPU's global index.
    pub fn node_of(&self, gpu: u32) -> u32 {
        gpu / self.gpus_per_node.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets;

    #[test]
    fn a100_nodes_share_one_nic() {
        let c = presets::cluster("smartmoe-a100").unwrap();
        let f = Fabric::from_cluster(&c);
        let k = &c.constants;
        assert!((f.intra_link(8).per_gpu_bytes_per_s - 300e9 * k.intra_bandwidth_efficiency).abs() < 1.0);
        assert!((f.group_link(16, 8).per_gpu_bytes_per_s - 25e9 * k.inter_bandwidth_efficiency / 8.0).abs() < 1.0);
        assert!((f.node_inter_bytes_per_s(8) - 25e9 * k.inter_bandwidth_efficiency).abs() < 1.0);
        assert!((f.inter_latency_s - 5e-6).abs() < 1e-12 && (f.intra_latency_s - 3e-6).abs() < 1e-12);
    }

    #[test]
    fn h100_gpus_have_their_own_nic() {
        let c = presets::cluster("dgx-h100").unwrap().with_gpus(16, &crate::Source::Inline).unwrap();
        let f = Fabric::from_cluster(&c);
        let eff = c.constants.inter_bandwidth_efficiency;
        assert!((f.group_link(16, 8).per_gpu_bytes_per_s - 50e9 * eff).abs() < 1.0);
        assert!((f.group_link(4, 2).per_gpu_bytes_per_s - 50e9 * eff).abs() < 1.0);
    }

    #[test]
    fn pcie_switch_is_shared() {
        let c = presets::cluster("smartmoe-v100-pcie").unwrap();
        let f = Fabric::from_cluster(&c);
        let eff = c.constants.intra_bandwidth_efficiency;
        assert!((f.intra_link(8).per_gpu_bytes_per_s - 16e9 * eff / 8.0).abs() < 1.0);
        assert!(f.intra_link(2).per_gpu_bytes_per_s > f.intra_link(8).per_gpu_bytes_per_s);
    }
}
