//! # switchyard-runtime
//!
//! Distributed Mixture-of-Experts training with live expert re-placement.

pub mod bench;
pub mod checksum;
pub mod comm;
pub mod data;
pub mod dense;
pub mod error;
pub mod experts;
pub mod machine;
pub mod migrate;
pub mod moe;
pub mod optim;
pub mod profile;
pub mod switcher;
pub mod trainer;
