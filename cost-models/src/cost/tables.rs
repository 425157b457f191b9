//! Per-model tables the plan pricer reads many times: prefix sums over layers of dense parameters and MoE
//! layer counts, so that a pipeline stage's totals cost O(1) whatever the number of layers.

use crate::model::{ModelSpec, ParamCounts};

/// Prefix sums over the layers of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelTables {
    /// `dense_prefix[l]` = dense parameters of layers `0..l`.
    dense_prefix: Vec<u64>,
    /// `moe_prefix[l]` = MoE layers among `0..l`.
    moe_prefix: Vec<u32>,
    /// Whole-model counts.
    pub counts: ParamCounts,
}

impl ModelTables {
    /// Builds the tables (O(layers)).
    pub fn new(model: &ModelSpec) -> ModelTables {
        let mut dense_prefix = vec![0u64];
        let mut moe_prefix = vec![0u32];
        for l in 0..model.num_layers {
            dense_prefix.push(dense_prefix[l as usize] + model.layer_dense_params(l));
            moe_prefix.push(moe_prefix[l as usize] + u32::from(model.is_moe_layer(l)));
        }
        ModelTables { dense_prefix, moe_prefix, counts: model.param_counts() }
    }

    /// Dense parameters of layers in `r`.
    pub fn dense_params(&self, r: &std::ops::Range<u32>) -> u64 {
        self.dense_prefix[r.end as usize] - self.dense_prefix[r.start as usize]
    }

    /// MoE layers in `r`.
    pub fn moe_layers(&self, r: &std::ops::Range<u32>) -> u32 {
        self.moe_prefix[r.end as usize] - self.moe_prefix[r.start as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_sums_match_loops() {
        let m = crate::presets::model("gpt-moe-l8-h2048-e32").unwrap().unwrap();
        let t = ModelTables::new(&m);
        let r = 2..5;
        assert_eq!(t.dense_params(&r), r.clone().map(|l| m.layer_dense_params(l)).sum::<u64>());
        assert_eq!(t.moe_layers(&r), 3);
    }
}
