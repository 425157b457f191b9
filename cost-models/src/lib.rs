//! switchyard-cost: the specs (model, cluster), the data model of loads and placements, the topology, and the
//! performance model that prices a parallel plan or one MoE layer under a load.

// `SpecError` carries the file, field, value, reason and fix of a bad spec by value: large by design, and only
// on the error path.
#![allow(clippy::result_large_err)]

pub mod calibrate;
pub mod cluster;
pub mod cost;
pub mod error;
pub mod hf;
pub mod model;
pub mod placement;
pub mod plan;
pub mod presets;
pub mod topology;
pub mod workload;

pub use cluster::{ClusterSpec, GpuSpec, InterNodeSpec, IntraNodeKind, IntraNodeSpec, ModelConstants};
pub use error::{Source, SpecError};
pub use model::{AttentionSpec, Dtype, ModelSpec, MoeSpec, Optimizer, ParamCounts};
pub use placement::{Placement, PlacementError};
pub use plan::{AllToAllAlgo, DispatchMode, ParallelPlan, PlanError, Recompute};
pub use workload::{LoadMatrix, Workload};
