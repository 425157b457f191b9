//! switchyard-cost: the specs (model, cluster), the data model of loads and placements, the topology, and the
//! performance model that prices a parallel plan or one MoE layer under a load.

pub mod cluster;
pub mod error;
pub mod hf;
pub mod model;
pub mod placement;
pub mod topology;
pub mod workload;

pub use cluster::{ClusterSpec, GpuSpec, InterNodeSpec, IntraNodeKind, IntraNodeSpec, ModelConstants};
pub use error::{Source, SpecError};
pub use model::{AttentionSpec, Dtype, ModelSpec, MoeSpec, Optimizer, ParamCounts};
pub use placement::{Placement, PlacementError};
pub use workload::{LoadMatrix, Workload};
