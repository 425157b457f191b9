//! Effective link figures the cost terms use: per-GPU bandwidth and latency of each link class, after the
//! efficiency constants. Built from the cluster's topology graph, the single source of truth for links.

use serde::Serialize;

use crate::cluster::{ClusterSpec, IntraNodeKind};
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
    /// Per-GPU, per-direction bandwidth to another GPU of the same node, after efficiency.
    pub intra_bytes_per_s: f64,
    /// The intra-node fabric is one shared switch (PCIe): concurrent transfers of a node's GPUs share
    /// `intra_bytes_per_s` x 2 (the host bridge carries both halves of the node).
    pub intra_shared: bool,
    /// Latency of a message within a node, seconds.
    pub intra_latency_s: f64,
    /// Bytes per second a node can send to other nodes (all NICs), after efficiency.
    pub node_nic_bytes_per_s: f64,
    /// Latency of a message between nodes, seconds.
    pub inter_latency_s: f64,
    /// Memory bandwidth of one GPU for memory-bound kernels, after efficiency.
    pub hbm_bytes_per_s: f64,
    /// Fixed cost of one collective call, seconds.
    pub collective_launch_s: f64,
}

impl Fabric {
    /// Builds the link classes from the cluster's topology graph.
    pub fn from_topology(cluster: &ClusterSpec, topo: &Topology) -> Fabric {
        let c = &cluster.constants;
        let k = cluster.gpus_per_node;
        let (intra_bytes_per_s, intra_latency_s) = if k > 1 {
            let p = topo.path(0, 1);
            (p.bottleneck_bytes_per_s, p.latency_us * 1e-6)
        } else {
            (
                cluster.intra_node.bandwidth_gbyte_s * 1e9 * c.intra_bandwidth_efficiency,
                cluster.intra_node.latency_us * 1e-6,
            )
        };
        let (node_nic_bytes_per_s, inter_latency_s) = if cluster.nodes > 1 {
            let p = topo.path(0, k);
            (topo.node_nic_bytes_per_s(), p.latency_us * 1e-6)
        } else {
            (cluster.inter_node.node_bytes_per_s() * c.inter_bandwidth_efficiency, cluster.inter_node.latency_us * 1e-6)
        };
        Fabric {
            gpus_per_node: k,
            nodes: cluster.nodes,
            intra_bytes_per_s,
            intra_shared: cluster.intra_node.kind == IntraNodeKind::Pcie,
            intra_latency_s,
            node_nic_bytes_per_s,
            inter_latency_s,
            hbm_bytes_per_s: cluster.gpu.hbm_gbyte_s * 1e9 * c.hbm_efficiency,
            collective_launch_s: c.collective_launch_us * 1e-6,
        }
    }

    /// Builds the topology graph and then the link classes.
    pub fn from_cluster(cluster: &ClusterSpec) -> Fabric {
        Fabric::from_topology(cluster, &Topology::from_cluster(cluster))
    }

    /// Per-GPU bandwidth and latency of a ring collective over a group of `size` GPUs of which at most
    /// `per_node` sit on one node (groups are laid out in contiguous blocks, so the group spans
    /// `ceil(size / per_node)` nodes). Across nodes each GPU gets its share of the node's NICs.
    pub fn group_link(&self, size: u32, per_node: u32) -> LinkInfo {
        let per_node = per_node.clamp(1, size.max(1));
        let intra = if self.intra_shared {
            // A shared PCIe switch carries the whole node's traffic: each GPU gets a share.
            (self.intra_bytes_per_s * 2.0 / per_node as f64).min(self.intra_bytes_per_s)
        } else {
            self.intra_bytes_per_s
        };
        if size <= per_node || self.nodes <= 1 {
            LinkInfo { per_gpu_bytes_per_s: intra, latency_s: self.intra_latency_s }
        } else {
            let nic = self.node_nic_bytes_per_s / per_node as f64;
            LinkInfo { per_gpu_bytes_per_s: nic.min(intra), latency_s: self.inter_latency_s }
        }
    }

    /// Node of a GPU given the GPU's global index.
    pub fn node_of(&self, gpu: u32) -> u32 {
        gpu / self.gpus_per_node
    }
}
