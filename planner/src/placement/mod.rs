//! Placement algorithms: from predicted per-expert load, which logical expert every physical slot holds.
//! `balanced` is the replication-aware greedy the planner seeds its pools with.

pub mod balanced;
pub mod cost_inputs;
pub mod eplb;
pub mod eplb_format;
pub mod error;
pub mod exact;
pub mod fastermoe;
pub mod shares;
pub mod smartmoe;
pub mod static_contiguous;
pub mod switchyard;

pub use balanced::{balanced_placement, replica_counts_for};
pub use cost_inputs::LayerCostInputs;
pub use eplb::{EplbPolicy, EplbResult, eplb, eplb_placements};
pub use eplb_format::EplbTensors;
pub use error::PlacementAlgoError;
pub use fastermoe::{FasterMoeResult, fastermoe_shadow, fastermoe_shadow_with_homes};
pub use smartmoe::{SmartMoeDecision, smartmoe_greedy};
pub use static_contiguous::static_contiguous;
