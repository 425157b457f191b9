//! Placement algorithms: from predicted per-expert load, which logical expert every physical slot holds.
//! `balanced` is the replication-aware greedy the planner seeds its pools with.

pub mod balanced;
pub mod eplb;
pub mod shares;
pub mod smartmoe;
pub mod switchyard;

pub use balanced::{balanced_placement, replica_counts_for};
