//! What pricing one MoE layer with the exact model ([`switchyard_cost::cost::moe_layer_exact`]) needs besides the
//! load and the placement: the experts' shape, where the expert-parallel group's GPUs sit, the link classes and
//! the fitted constants. Placement algorithms that consult the performance model (FasterMoE's shadowing, and
//! others later) take one of these.

use switchyard_cost::cost::{Fabric, MoeLayerShape, MoeLayerTime, moe_layer_exact};
use switchyard_cost::{ClusterSpec, LoadMatrix, ModelConstants, Placement};

use super::error::PlacementAlgoError;

/// The inputs of [`moe_layer_exact`] other than the load matrix and the placement.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerCostInputs {
    /// Sizes of the experts and the GPU's peak.
    pub shape: MoeLayerShape,
    /// Global index of each GPU of the expert-parallel group (`gpus[i]` is the placement's GPU `i`).
    pub gpus: Vec<u32>,
    /// Link classes of the cluster.
    pub fabric: Fabric,
    /// Fitted constants of the model.
    pub constants: ModelConstants,
    /// Price the all-to-all as the hierarchical (2D) form.
    pub hierarchical: bool,
}

impl LayerCostInputs {
    /// The inputs for an expert-parallel group spanning GPUs `0..gpus` of `cluster`, flat all-to-all.
    pub fn for_cluster(cluster: &ClusterSpec, shape: MoeLayerShape, gpus: usize) -> Result<Self, PlacementAlgoError> {
        if gpus == 0 || gpus > cluster.num_gpus() as usize {
            return Err(PlacementAlgoError::invalid(
                "cost inputs",
                format!("a group of {gpus} GPUs does not fit a cluster of {} GPUs", cluster.num_gpus()),
            ));
        }
        Ok(LayerCostInputs {
            shape,
            gpus: (0..gpus as u32).collect(),
            fabric: Fabric::from_cluster(cluster),
            constants: cluster.constants.clone(),
            hierarchical: false,
        })
    }

    /// The modelled layer (forward + backward) under `load` and `placement`, with its terms.
    pub fn layer_time(&self, load: &LoadMatrix, placement: &Placement) -> Result<MoeLayerTime, PlacementAlgoError> {
        moe_layer_exact(&self.shape, load, placement, &self.gpus, &self.fabric, &self.constants, self.hierarchical)
            .map_err(PlacementAlgoError::Cost)
    }

    /// The modelled layer time in milliseconds.
    pub fn layer_time_ms(&self, load: &LoadMatrix, placement: &Placement) -> Result<f64, PlacementAlgoError> {
        Ok(self.layer_time(load, placement)?.total_ms)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use switchyard_cost::{Dtype, Source, presets};

    /// The test inputs of the placement algorithms: 16 A100s of the SmartMoE testbed, d_model 2048, d_ffn 4096,
    /// fp16 activations and weights, fp32 gradients, 312 TFLOP/s.
    pub(crate) fn a100_inputs(gpus: u32) -> LayerCostInputs {
        let cluster = presets::cluster("smartmoe-a100").unwrap().with_gpus(gpus, &Source::Inline).unwrap();
        let shape = MoeLayerShape {
            d_model: 2048,
            d_ffn: 4096,
            gated: false,
            act_bytes: 2,
            param_bytes: 2,
            grad_bytes: 4,
            peak_flops: 312e12,
        };
        LayerCostInputs::for_cluster(&cluster, shape, gpus as usize).unwrap()
    }

    #[test]
    fn prices_a_layer_and_refuses_mismatched_shapes() {
        let c = a100_inputs(16);
        assert_eq!(c.fabric, Fabric::from_cluster(&presets::cluster("smartmoe-a100").unwrap()));
        assert_eq!(presets::cluster("smartmoe-a100").unwrap().gpu.peak_flops(Dtype::Fp16), 312e12);
        let load = LoadMatrix::from_fractions(16, &[1.0 / 32.0; 32], 4096);
        let p = Placement::contiguous(16, 2, 32).unwrap();
        let t = c.layer_time_ms(&load, &p).unwrap();
        assert!(t.is_finite() && t > 0.0);
        let wrong = LoadMatrix::from_fractions(8, &[1.0 / 32.0; 32], 4096);
        assert!(matches!(c.layer_time_ms(&wrong, &p), Err(PlacementAlgoError::Cost(_))));
        let cluster = presets::cluster("smartmoe-a100").unwrap();
        assert!(LayerCostInputs::for_cluster(&cluster, c.shape.clone(), 17).is_err());
    }
}
