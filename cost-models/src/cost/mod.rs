//! The performance model. Each term is a named function of plain numbers with a unit test against a hand
//! calculation; [`iteration::price_plan`] composes them into the time and memory of one training iteration of a
//! plan, and [`moe::moe_layer_exact`] prices one MoE layer under a measured load matrix and a placement.
//!
//! No term overlaps compute and communication: like SmartMoE's model, the estimate is a sum per GPU and the
//! busiest GPU sets the time. Constants that hardware decides (efficiencies, latencies, overheads) come from
//! [`crate::ModelConstants`], so that calibration can fit them.

pub mod comm;
pub mod compute;
pub mod fabric;
pub mod iteration;
pub mod memory;
pub mod moe;
pub mod pipeline;
pub mod summed;
pub mod tables;
#[cfg(test)]
mod test_fixtures;

pub use fabric::{Fabric, LinkInfo};
pub use iteration::{IterationCost, MoeLoadProfile, TimeBreakdown, price_plan};
pub use memory::{MemoryBreakdown, memory_per_gpu};
pub use moe::{MoeLayerShape, MoeLayerTime, moe_layer_exact};
pub use summed::{SummedLoad, moe_layer_summed};
pub use tables::ModelTables;
