//! A parallel plan: how the dense part (tp, pp, dp) and the MoE part (ep, etp, edp, expert slots) of a model are
//! laid out on the GPUs, with the micro-batching, recomputation and communication choices that go with it.
//! Invariants are checked by [`ParallelPlan::check`], never assumed.

use serde::{Deserialize, Serialize};

use crate::cluster::ClusterSpec;
use crate::model::ModelSpec;

/// Activation recomputation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Keep every activation.
    None,
    /// Recompute the attention core (scores, softmax) only (Korthikanti et al.).
    Selective,
    /// Keep only each layer's input; recompute the whole layer in backward.
    Full,
}

/// How the all-to-all of a token dispatch is performed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum AllToAllAlgo {
    /// Every GPU sends directly to every peer.
    Flat,
    /// Two phases: within the node, then between nodes (Tutel's 2D all-to-all): fewer, larger messages.
    Hierarchical,
}

/// How MoE layers meet tokens and experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum DispatchMode {
    /// Tokens travel to the experts (all-to-all), the usual expert parallelism.
    Token,
    /// Experts travel to the tokens (Janus, data-centric): remote expert weights are fetched once per node and
    /// their gradients pushed back; tokens never leave their GPU.
    ExpertFetch,
}

/// One hybrid-parallel layout.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelPlan {
    /// Tensor parallelism of the dense part (within a node), with sequence parallelism.
    pub tp: u32,
    /// Pipeline stages.
    pub pp: u32,
    /// Data parallelism of the dense part.
    pub dp: u32,
    /// Expert parallelism: GPUs (per expert-tp rank) over which one layer's experts are spread.
    pub ep: u32,
    /// Expert tensor parallelism: each expert's FFN split over `etp` GPUs.
    pub etp: u32,
    /// Expert data parallelism: copies of the whole expert set in a pipeline stage (tp*dp = etp*ep*edp).
    pub edp: u32,
    /// Expert slots per GPU per MoE layer (>= experts / ep; more leaves room for replicas of hot experts).
    pub slots_per_gpu: u32,
    /// Sequences per micro-batch.
    pub micro_batch_size: u32,
    /// Micro-batches per iteration per data-parallel rank.
    pub num_micro_batches: u32,
    /// Activation recomputation.
    pub recompute: Recompute,
    /// Optimizer state sharded over data-parallel ranks (ZeRO-1 / Megatron distributed optimizer).
    pub distributed_optimizer: bool,
    /// All-to-all algorithm for token dispatch.
    pub all_to_all: AllToAllAlgo,
    /// Token dispatch or expert fetch for MoE layers.
    pub dispatch: DispatchMode,
}

/// A plan that breaks an invariant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid plan {plan}: {reason}")]
pub struct PlanError {
    /// The plan, in short form.
    pub plan: String,
    /// The broken invariant.
    pub reason: String,
}

impl ParallelPlan {
    /// Short human form, e.g. `tp2 pp4 dp8 | ep16 etp1 edp1 s3 | mb1x64 rc:sel zero1 a2a:flat`.
    pub fn label(&self) -> String {
        let rc = match self.recompute {
            Recompute::None => "none",
            Recompute::Selective => "sel",
            Recompute::Full => "full",
        };
        format!(
            "tp{} pp{} dp{} | ep{} etp{} edp{} s{} | mb{}x{} rc:{}{}{}",
            self.tp,
            self.pp,
            self.dp,
            self.ep,
            self.etp,
            self.edp,
            self.slots_per_gpu,
            self.micro_batch_size,
            self.num_micro_batches,
            rc,
            if self.distributed_optimizer { " zero1" } else { "" },
            match (self.dispatch, self.all_to_all) {
                (DispatchMode::ExpertFetch, _) => " fetch",
                (DispatchMode::Token, AllToAllAlgo::Flat) => " a2a:flat",
                (DispatchMode::Token, AllToAllAlgo::Hierarchical) => " a2a:2d",
            }
        )
    }

    /// GPUs the plan uses.
    pub fn gpus(&self) -> u64 {
        self.tp as u64 * self.pp as u64 * self.dp as u64
    }

    /// Layers held by each pipeline stage: the first `L mod pp` stages hold one more (uneven splits allowed, as
    /// Megatron-LM's first/last-stage layer options and DeepSeek-V3's 61 layers on 16 stages need).
    pub fn stage_layers(&self, num_layers: u32) -> Vec<std::ops::Range<u32>> {
        let pp = self.pp.max(1);
        let base = num_layers / pp;
        let extra = num_layers % pp;
        let mut start = 0;
        (0..pp)
            .map(|s| {
                let n = base + u32::from(s < extra);
                let r = start..start + n;
                start += n;
                r
            })
            .collect()
    }

    /// Checks every invariant against the model and the cluster.
    pub fn check(&self, model: &ModelSpec, cluster: &ClusterSpec) -> Result<(), PlanError> {
        let err = |reason: String| Err(PlanError { plan: self.label(), reason });
        let n = cluster.num_gpus() as u64;
        for (name, v) in [
            ("tp", self.tp),
            ("pp", self.pp),
            ("dp", self.dp),
            ("ep", self.ep),
            ("etp", self.etp),
            ("edp", self.edp),
            ("micro_batch_size", self.micro_batch_size),
            ("num_micro_batches", self.num_micro_batches),
        ] {
            if v == 0 {
                return err(format!("{name} must be positive"));
            }
        }
        if self.gpus() != n {
            return err(format!("tp*pp*dp = {} but the cluster has {n} GPUs", self.gpus()));
        }
        if !cluster.gpus_per_node.is_multiple_of(self.tp) {
            return err(format!("tp {} must divide the GPUs per node ({})", self.tp, cluster.gpus_per_node));
        }
        if !model.attention.num_heads().is_multiple_of(self.tp) {
            return err(format!("tp {} must divide the attention heads ({})", self.tp, model.attention.num_heads()));
        }
        if self.pp > model.num_layers {
            return err(format!("pp {} exceeds the layers ({})", self.pp, model.num_layers));
        }
        let batch = self.dp as u64 * self.micro_batch_size as u64 * self.num_micro_batches as u64;
        if batch != model.global_batch {
            return err(format!(
                "dp*micro_batch_size*num_micro_batches = {batch} but global_batch is {}",
                model.global_batch
            ));
        }
        if self.seq_per_tp_rank(model) == 0 {
            return err(format!("tp {} exceeds the tokens of a micro-batch", self.tp));
        }
        match &model.moe {
            None => {
                if self.ep != 1
                    || self.etp != 1
                    || self.edp as u64 != self.tp as u64 * self.dp as u64
                    || self.slots_per_gpu != 0
                {
                    return err("a dense model has ep = etp = 1, edp = tp*dp and no expert slots".into());
                }
            }
            Some(m) => {
                if self.etp as u64 * self.ep as u64 * self.edp as u64 != self.tp as u64 * self.dp as u64 {
                    return err(format!(
                        "etp*ep*edp = {} must equal tp*dp = {} (the GPUs of a pipeline stage)",
                        self.etp as u64 * self.ep as u64 * self.edp as u64,
                        self.tp as u64 * self.dp as u64
                    ));
                }
                if m.num_experts % self.ep != 0 {
                    return err(format!("ep {} must divide the experts ({})", self.ep, m.num_experts));
                }
                if (self.slots_per_gpu as u64) * (self.ep as u64) < m.num_experts as u64 {
                    return err(format!(
                        "{} slots on each of ep {} GPUs cannot hold {} experts",
                        self.slots_per_gpu, self.ep, m.num_experts
                    ));
                }
                if model.moe.as_ref().is_some_and(|m| m.expert_ffn_hidden % self.etp as u64 != 0) {
                    return err(format!("etp {} must divide the expert FFN size ({})", self.etp, m.expert_ffn_hidden));
                }
                if self.etp > 1 && !cluster.gpus_per_node.is_multiple_of(self.etp) {
                    return err(format!("etp {} must divide the GPUs per node ({})", self.etp, cluster.gpus_per_node));
                }
            }
        }
        Ok(())
    }

    /// Tokens of one micro-batch held by each tensor-parallel rank (sequence parallelism).
    pub fn seq_per_tp_rank(&self, model: &ModelSpec) -> u64 {
        self.micro_batch_size as u64 * model.seq_len / self.tp as u64
    }

    /// Extra (replica) slots on each GPU beyond the experts' even share.
    pub fn spare_slots_per_gpu(&self, model: &ModelSpec) -> u32 {
        match &model.moe {
            Some(m) => self.slots_per_gpu.saturating_sub(m.num_experts / self.ep),
            None => 0,
        }
    }
}

/// A valid plan of `gpt-moe-l8-h2048-e32` on two nodes of 8 A100s (tp1 pp2 dp8, ep8 with 4 slots), shared by
/// the crate's tests.
#[cfg(test)]
pub(crate) fn test_plan() -> ParallelPlan {
    tests::base()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets;

    pub(super) fn base() -> ParallelPlan {
        ParallelPlan {
            tp: 1,
            pp: 2,
            dp: 8,
            ep: 8,
            etp: 1,
            edp: 1,
            slots_per_gpu: 4,
            micro_batch_size: 4,
            num_micro_batches: 8,
            recompute: Recompute::None,
            distributed_optimizer: false,
            all_to_all: AllToAllAlgo::Flat,
            dispatch: DispatchMode::Token,
        }
    }

    #[test]
    fn invariants_are_checked() {
        let m = presets::model("gpt-moe-l8-h2048-e32").unwrap().unwrap();
        let c = presets::cluster("smartmoe-a100").unwrap();
        base().check(&m, &c).unwrap();
        let bad = |f: &dyn Fn(&mut ParallelPlan), why: &str| {
            let mut p = base();
            f(&mut p);
            let e = p.check(&m, &c).unwrap_err();
            assert!(e.reason.contains(why), "{} lacks {why}", e.reason);
        };
        bad(&|p| p.dp = 4, "tp*pp*dp");
        bad(&|p| p.ep = 3, "etp*ep*edp");
        bad(&|p| p.slots_per_gpu = 3, "cannot hold");
        bad(&|p| p.num_micro_batches = 7, "global_batch");
        bad(&|p| p.pp = 16, "tp*pp*dp");
        bad(&|p| p.tp = 0, "must be positive");
    }

    #[test]
    fn uneven_stages_cover_every_layer() {
        let mut p = base();
        p.pp = 16;
        let s = p.stage_layers(61);
        assert_eq!(s.len(), 16);
        assert_eq!(s[0], 0..4);
        assert_eq!(s[15].end, 61);
        assert!(s.iter().all(|r| r.len() == 3 || r.len() == 4));
    }
}
