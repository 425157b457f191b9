//! The cluster spec: nodes of GPUs, the fabric inside a node, the network between nodes, and the fittable
//! constants of the performance model (`ModelConstants`) that calibration replaces with measured ones.

use serde::{Deserialize, Serialize};

use crate::error::{Source, SpecError};
use crate::model::Dtype;

/// One GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSpec {
    /// Name, e.g. "A100-SXM4-80GB".
    pub name: String,
    /// Device memory.
    pub memory_gib: f64,
    /// Dense peak tensor throughput for fp16.
    pub peak_tflops_fp16: f64,
    /// Dense peak tensor throughput for bf16 (default: fp16's).
    #[serde(default)]
    pub peak_tflops_bf16: Option<f64>,
    /// Dense peak throughput for fp32 (TF32 tensor cores when present).
    pub peak_tflops_fp32: f64,
    /// Dense peak tensor throughput for fp8 (absent on GPUs without fp8).
    #[serde(default)]
    pub peak_tflops_fp8: Option<f64>,
    /// Memory bandwidth.
    pub hbm_gbyte_s: f64,
}

impl GpuSpec {
    /// Peak throughput for a dtype, in FLOP/s.
    pub fn peak_flops(&self, dtype: Dtype) -> f64 {
        let t = match dtype {
            Dtype::Fp32 => self.peak_tflops_fp32,
            Dtype::Fp16 => self.peak_tflops_fp16,
            Dtype::Bf16 => self.peak_tflops_bf16.unwrap_or(self.peak_tflops_fp16),
            Dtype::Fp8 => self.peak_tflops_fp8.unwrap_or(self.peak_tflops_bf16.unwrap_or(self.peak_tflops_fp16)),
        };
        t * 1e12
    }
}

/// How the GPUs of one node are connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum IntraNodeKind {
    /// Every GPU reaches every other at full bandwidth through NVSwitch.
    Nvswitch,
    /// Direct NVLink between GPU pairs (V100 hybrid cube mesh): pairs share the per-GPU NVLink bandwidth.
    Nvlink,
    /// PCIe through a host switch: the GPUs of a node share the switch's bandwidth.
    Pcie,
}

/// The fabric inside a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntraNodeSpec {
    /// Kind of fabric.
    pub kind: IntraNodeKind,
    /// Per-GPU, per-direction bandwidth into the fabric.
    pub bandwidth_gbyte_s: f64,
    /// One-way latency of a message.
    pub latency_us: f64,
}

/// The network between nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterNodeSpec {
    /// NICs per node (their bandwidth is shared by the node's GPUs).
    pub nics_per_node: u32,
    /// Line rate of one NIC, per direction, in gigabits per second as NICs are sold (200 Gb/s HDR IB = 200).
    pub nic_gbit_s: f64,
    /// One-way latency of a message across the network.
    pub latency_us: f64,
}

impl InterNodeSpec {
    /// Bytes per second one node can send (all NICs together).
    pub fn node_bytes_per_s(&self) -> f64 {
        self.nics_per_node as f64 * self.nic_gbit_s * 1e9 / 8.0
    }
}

/// The performance model's fittable constants. The defaults are textbook figures; `switchyard calibrate`
/// replaces them with values fitted to measurements of the hardware.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConstants {
    /// Fraction of the peak a large GEMM reaches.
    pub gemm_max_efficiency: f64,
    /// Rows at which a GEMM reaches half its large-shape efficiency: a GEMM of `m` rows runs at
    /// `gemm_max_efficiency * m / (m + gemm_half_efficiency_rows)`, i.e. is charged `gemm_half_efficiency_rows` extra rows.
    pub gemm_half_efficiency_rows: f64,
    /// Fixed cost of launching one kernel.
    pub kernel_launch_us: f64,
    /// Fixed cost per local expert that receives tokens, per pass (forward or backward): launches, bookkeeping.
    pub per_expert_overhead_us: f64,
    /// Fraction of the intra-node link bandwidth an all-to-all or collective achieves.
    pub intra_bandwidth_efficiency: f64,
    /// Fraction of the NIC line rate an all-to-all or collective achieves.
    pub inter_bandwidth_efficiency: f64,
    /// Fixed cost of one collective call (synchronisation, launch).
    pub collective_launch_us: f64,
    /// Fixed cost of one MoE layer pass (forward or backward) beyond its GEMMs and transfers: gate, count
    /// exchange, permutation kernels' launches and synchronisation.
    pub moe_layer_overhead_us: f64,
    /// Fraction of memory-bound elementwise work's bandwidth reached (GELU, softmax, norms) against HBM peak.
    pub hbm_efficiency: f64,
    /// Memory the framework keeps outside the model (CUDA context, allocator slack), per GPU.
    pub reserved_memory_gib: f64,
}

impl Default for ModelConstants {
    fn default() -> Self {
        ModelConstants {
            gemm_max_efficiency: 0.70,
            gemm_half_efficiency_rows: 256.0,
            kernel_launch_us: 5.0,
            per_expert_overhead_us: 20.0,
            intra_bandwidth_efficiency: 0.80,
            inter_bandwidth_efficiency: 0.85,
            collective_launch_us: 15.0,
            moe_layer_overhead_us: 100.0,
            hbm_efficiency: 0.75,
            reserved_memory_gib: 2.0,
        }
    }
}

/// A cluster of identical nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// Name shown in tables.
    pub name: String,
    /// Nodes.
    pub nodes: u32,
    /// GPUs in each node.
    pub gpus_per_node: u32,
    /// The GPU.
    pub gpu: GpuSpec,
    /// Fabric inside a node.
    pub intra_node: IntraNodeSpec,
    /// Network between nodes.
    pub inter_node: InterNodeSpec,
    /// Fittable constants of the performance model.
    #[serde(default)]
    pub constants: ModelConstants,
}

impl ClusterSpec {
    /// Total GPUs.
    pub fn num_gpus(&self) -> u32 {
        self.nodes * self.gpus_per_node
    }

    /// The same cluster resized to `gpus` GPUs. The count must be a positive multiple of the node size, or a
    /// divisor of it (a partial node); the error says which counts are allowed.
    pub fn with_gpus(&self, gpus: u32, source: &Source) -> Result<ClusterSpec, SpecError> {
        let k = self.gpus_per_node;
        let mut c = self.clone();
        if gpus == 0 {
            return Err(SpecError::invalid(
                source,
                "--gpus",
                gpus,
                "must be positive",
                format!("use a multiple of {k}"),
            ));
        }
        if gpus > 1 << 17 {
            return Err(SpecError::invalid(
                source,
                "--gpus",
                gpus,
                "is more than Switchyard plans for (131,072)",
                "use fewer GPUs",
            ));
        }
        if gpus.is_multiple_of(k) {
            c.nodes = gpus / k;
        } else if gpus < k && k.is_multiple_of(gpus) {
            c.nodes = 1;
            c.gpus_per_node = gpus;
        } else {
            return Err(SpecError::invalid(
                source,
                "--gpus",
                gpus,
                format!("is not a multiple of the node size ({k} GPUs per node)"),
                format!(
                    "use a multiple of {k} (e.g. {}), or a divisor of {k} for part of one node",
                    (gpus / k).max(1) * k
                ),
            ));
        }
        Ok(c)
    }

    /// Checks every field.
    pub fn validate(&self, source: &Source) -> Result<(), SpecError> {
        let posf = |field: &str, v: f64| -> Result<(), SpecError> {
            if !v.is_finite() || v <= 0.0 {
                Err(SpecError::invalid(
                    source,
                    field,
                    v,
                    "must be a positive number",
                    "use the hardware's datasheet value",
                ))
            } else {
                Ok(())
            }
        };
        let nonneg = |field: &str, v: f64| -> Result<(), SpecError> {
            if !v.is_finite() || v < 0.0 {
                Err(SpecError::invalid(
                    source,
                    field,
                    v,
                    "must be zero or positive",
                    "use a measured or datasheet value",
                ))
            } else {
                Ok(())
            }
        };
        let frac = |field: &str, v: f64| -> Result<(), SpecError> {
            if !v.is_finite() || v <= 0.0 || v > 1.0 {
                Err(SpecError::invalid(
                    source,
                    field,
                    v,
                    "must be a fraction in (0, 1]",
                    "use e.g. 0.8, or run `switchyard calibrate`",
                ))
            } else {
                Ok(())
            }
        };
        if self.name.trim().is_empty() {
            return Err(SpecError::invalid(source, "name", "\"\"", "must not be empty", "give the cluster a name"));
        }
        if self.nodes == 0 || self.nodes > 1 << 17 {
            return Err(SpecError::invalid(
                source,
                "nodes",
                self.nodes,
                "must be between 1 and 131,072",
                "count the nodes",
            ));
        }
        if self.gpus_per_node == 0 || self.gpus_per_node > 1024 {
            return Err(SpecError::invalid(
                source,
                "gpus_per_node",
                self.gpus_per_node,
                "must be between 1 and 1024",
                "count the GPUs in one node (usually 4 or 8)",
            ));
        }
        if self.num_gpus() > 1 << 17 {
            return Err(SpecError::invalid(
                source,
                "nodes",
                self.nodes,
                format!("{} GPUs is more than Switchyard plans for (131,072)", self.num_gpus()),
                "plan a smaller cluster",
            ));
        }
        posf("gpu.memory_gib", self.gpu.memory_gib)?;
        posf("gpu.peak_tflops_fp16", self.gpu.peak_tflops_fp16)?;
        posf("gpu.peak_tflops_fp32", self.gpu.peak_tflops_fp32)?;
        if let Some(v) = self.gpu.peak_tflops_bf16 {
            posf("gpu.peak_tflops_bf16", v)?;
        }
        if let Some(v) = self.gpu.peak_tflops_fp8 {
            posf("gpu.peak_tflops_fp8", v)?;
        }
        posf("gpu.hbm_gbyte_s", self.gpu.hbm_gbyte_s)?;
        posf("intra_node.bandwidth_gbyte_s", self.intra_node.bandwidth_gbyte_s)?;
        nonneg("intra_node.latency_us", self.intra_node.latency_us)?;
        if self.inter_node.nics_per_node == 0 && self.nodes > 1 {
            return Err(SpecError::invalid(
                source,
                "inter_node.nics_per_node",
                0,
                "a cluster of several nodes needs at least one NIC per node",
                "set the number of NICs per node",
            ));
        }
        if self.nodes > 1 || self.inter_node.nics_per_node > 0 {
            posf("inter_node.nic_gbit_s", self.inter_node.nic_gbit_s)?;
        }
        nonneg("inter_node.latency_us", self.inter_node.latency_us)?;
        let c = &self.constants;
        frac("constants.gemm_max_efficiency", c.gemm_max_efficiency)?;
        nonneg("constants.gemm_half_efficiency_rows", c.gemm_half_efficiency_rows)?;
        nonneg("constants.kernel_launch_us", c.kernel_launch_us)?;
        nonneg("constants.per_expert_overhead_us", c.per_expert_overhead_us)?;
        frac("constants.intra_bandwidth_efficiency", c.intra_bandwidth_efficiency)?;
        frac("constants.inter_bandwidth_efficiency", c.inter_bandwidth_efficiency)?;
        nonneg("constants.collective_launch_us", c.collective_launch_us)?;
        nonneg("constants.moe_layer_overhead_us", c.moe_layer_overhead_us)?;
        frac("constants.hbm_efficiency", c.hbm_efficiency)?;
        nonneg("constants.reserved_memory_gib", c.reserved_memory_gib)?;
        if c.reserved_memory_gib >= self.gpu.memory_gib {
            return Err(SpecError::invalid(
                source,
                "constants.reserved_memory_gib",
                c.reserved_memory_gib,
                format!("leaves no room in gpu.memory_gib ({})", self.gpu.memory_gib),
                "use a small reserve, e.g. 2",
            ));
        }
        Ok(())
    }
}
