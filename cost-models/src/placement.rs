//! Expert placement: which logical expert every physical slot of every GPU holds, for one MoE layer.
//! Replicas are allowed (an expert in several slots); the derived views are logical -> slots and per-expert
//! replica counts, and the EPLB tensors `phy2log / log2phy / logcnt`.

use serde::{Deserialize, Serialize};

/// A placement that breaks an invariant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// The slot table has the wrong length.
    #[error("placement has {got} slots, expected {gpus} GPUs x {slots_per_gpu} slots = {expected}")]
    SlotCount {
        /// Slots given.
        got: usize,
        /// GPUs.
        gpus: usize,
        /// Slots per GPU.
        slots_per_gpu: usize,
        /// Expected slots.
        expected: usize,
    },
    /// A slot names an expert that does not exist.
    #[error("slot {slot} holds expert {expert}, but there are only {experts} experts")]
    UnknownExpert {
        /// The slot.
        slot: usize,
        /// The expert it names.
        expert: u32,
        /// Logical experts.
        experts: usize,
    },
    /// An expert has no slot.
    #[error("expert {0} has no slot: every logical expert needs at least one")]
    Unplaced(usize),
    /// Token shares that are not one per slot, negative, or do not sum to one per expert.
    #[error("token shares: {0}")]
    Shares(String),
    /// Fewer slots than experts.
    #[error("{slots} slots cannot hold {experts} experts")]
    TooFewSlots {
        /// Slots.
        slots: usize,
        /// Experts.
        experts: usize,
    },
}

/// Where the experts of one MoE layer live: `slots[gpu * slots_per_gpu + j]` is the logical expert in slot `j` of
/// GPU `gpu` (GPUs are numbered within the expert-parallel group). An expert's tokens are split over its replicas
/// evenly, or by `shares` when given: slot `i` receives `shares[i] / SHARE_UNIT` of its expert's tokens.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Placement {
    /// GPUs of the expert-parallel group.
    pub gpus: usize,
    /// Slots on each GPU.
    pub slots_per_gpu: usize,
    /// Logical experts.
    pub experts: usize,
    /// Logical expert held by each physical slot.
    pub slots: Vec<u32>,
    /// Optional token share of each slot, in units of [`SHARE_UNIT`] (the shares of one expert's slots sum to
    /// `SHARE_UNIT`); absent: even split over the replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shares: Option<Vec<u32>>,
}

/// The whole of an expert's tokens in [`Placement::shares`] units (parts per million).
pub const SHARE_UNIT: u32 = 1_000_000;

impl Placement {
    /// Builds and checks a placement.
    pub fn new(gpus: usize, slots_per_gpu: usize, experts: usize, slots: Vec<u32>) -> Result<Self, PlacementError> {
        let p = Placement { gpus, slots_per_gpu, experts, slots, shares: None };
        p.check()?;
        Ok(p)
    }

    /// The same placement with token shares per slot (fractions of the expert's tokens, any positive scale per
    /// expert: they are normalised and rounded to [`SHARE_UNIT`] parts, the rounding given to the largest share).
    pub fn with_shares(mut self, fractions: &[f64]) -> Result<Self, PlacementError> {
        if fractions.len() != self.slots.len() {
            return Err(PlacementError::Shares(format!("{} shares for {} slots", fractions.len(), self.slots.len())));
        }
        if fractions.iter().any(|f| !f.is_finite() || *f < 0.0) {
            return Err(PlacementError::Shares("shares must be finite and non-negative".into()));
        }
        let mut out = vec![0u32; self.slots.len()];
        for slots in self.expert_slots() {
            let sum: f64 = slots.iter().map(|&s| fractions[s]).sum();
            let n = slots.len() as f64;
            let mut given = 0u32;
            for &s in &slots {
                let f = if sum > 0.0 { fractions[s] / sum } else { 1.0 / n };
                out[s] = (f * SHARE_UNIT as f64).floor() as u32;
                given += out[s];
            }
            if let Some(&big) = slots.iter().max_by_key(|&&s| out[s]) {
                out[big] += SHARE_UNIT - given;
            }
        }
        self.shares = Some(out);
        self.check()?;
        Ok(self)
    }

    /// Fraction of its expert's tokens that `slot` receives.
    pub fn share(&self, slot: usize, replica_counts: &[u32]) -> f64 {
        match &self.shares {
            Some(s) => s[slot] as f64 / SHARE_UNIT as f64,
            None => 1.0 / replica_counts[self.slots[slot] as usize] as f64,
        }
    }

    /// Contiguous placement: expert `e` on GPU `e / (experts / gpus)`; spare slots hold replicas of experts in
    /// round-robin order. Needs `gpus * slots_per_gpu >= experts`.
    pub fn contiguous(gpus: usize, slots_per_gpu: usize, experts: usize) -> Result<Self, PlacementError> {
        let total = gpus * slots_per_gpu;
        if total < experts || experts == 0 {
            return Err(PlacementError::TooFewSlots { slots: total, experts });
        }
        // Spread experts evenly: GPU g holds a contiguous run; then fill spare slots round-robin.
        let mut per_gpu: Vec<Vec<u32>> = vec![Vec::new(); gpus];
        for e in 0..experts {
            per_gpu[e * gpus / experts].push(e as u32);
        }
        let mut next = 0usize;
        for g in per_gpu.iter_mut() {
            while g.len() < slots_per_gpu {
                g.push((next % experts) as u32);
                next += 1;
            }
        }
        Placement::new(gpus, slots_per_gpu, experts, per_gpu.concat())
    }

    /// Checks the invariants: the right number of slots, every slot a valid expert, every expert placed.
    pub fn check(&self) -> Result<(), PlacementError> {
        let expected = self.gpus * self.slots_per_gpu;
        if self.slots.len() != expected {
            return Err(PlacementError::SlotCount {
                got: self.slots.len(),
                gpus: self.gpus,
                slots_per_gpu: self.slots_per_gpu,
                expected,
            });
        }
        if expected < self.experts {
            return Err(PlacementError::TooFewSlots { slots: expected, experts: self.experts });
        }
        let mut seen = vec![false; self.experts];
        for (slot, &e) in self.slots.iter().enumerate() {
            if e as usize >= self.experts {
                return Err(PlacementError::UnknownExpert { slot, expert: e, experts: self.experts });
            }
            seen[e as usize] = true;
        }
        if let Some(e) = seen.iter().position(|s| !s) {
            return Err(PlacementError::Unplaced(e));
        }
        if let Some(sh) = &self.shares {
            if sh.len() != self.slots.len() {
                return Err(PlacementError::Shares(format!("{} shares for {} slots", sh.len(), self.slots.len())));
            }
            let mut sum = vec![0u64; self.experts];
            for (&e, &x) in self.slots.iter().zip(sh) {
                sum[e as usize] += x as u64;
            }
            if let Some(e) = sum.iter().position(|&x| x != SHARE_UNIT as u64) {
                return Err(PlacementError::Shares(format!("expert {e}'s shares sum to {} of {SHARE_UNIT}", sum[e])));
            }
        }
        Ok(())
    }

    /// GPU of a physical slot.
    pub fn gpu_of_slot(&self, slot: usize) -> usize {
        slot / self.slots_per_gpu
    }

    /// The experts of one GPU's slots.
    pub fn gpu_slots(&self, gpu: usize) -> &[u32] {
        &self.slots[gpu * self.slots_per_gpu..(gpu + 1) * self.slots_per_gpu]
    }

    /// Replicas of each logical expert (EPLB's `logcnt`).
    pub fn replica_counts(&self) -> Vec<u32> {
        let mut c = vec![0u32; self.experts];
        for &e in &self.slots {
            c[e as usize] += 1;
        }
        c
    }

    /// Physical slots of each logical expert, in slot order (EPLB's `log2phy` without padding).
    pub fn expert_slots(&self) -> Vec<Vec<usize>> {
        let mut v = vec![Vec::new(); self.experts];
        for (s, &e) in self.slots.iter().enumerate() {
            v[e as usize].push(s);
        }
        v
    }

    /// Per-GPU load when each expert's `loads[e]` tokens are split over its replicas (evenly, or by the shares).
    pub fn gpu_loads(&self, loads: &[f64]) -> Vec<f64> {
        let cnt = self.replica_counts();
        let mut g = vec![0.0; self.gpus];
        for (s, &e) in self.slots.iter().enumerate() {
            g[s / self.slots_per_gpu] += loads[e as usize] * self.share(s, &cnt);
        }
        g
    }

    /// Busiest GPU's load over the mean GPU load (1 = perfect balance); 1 when there is no load.
    pub fn imbalance(&self, loads: &[f64]) -> f64 {
        let g = self.gpu_loads(loads);
        let mean = g.iter().sum::<f64>() / g.len() as f64;
        if mean <= 0.0 { 1.0 } else { g.iter().cloned().fold(0.0, f64::max) / mean }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_places_every_expert_and_fills_spares() {
        let p = Placement::contiguous(4, 3, 8).unwrap();
        assert_eq!(p.gpu_slots(0), &[0, 1, 0]);
        assert_eq!(p.gpu_slots(3), &[6, 7, 3]);
        assert!(p.replica_counts().iter().all(|&c| c >= 1));
        assert_eq!(p.replica_counts().iter().sum::<u32>(), 12);
    }

    #[test]
    fn invariants_are_checked() {
        assert!(matches!(Placement::new(2, 1, 3, vec![0, 1]), Err(PlacementError::TooFewSlots { .. })));
        assert!(matches!(Placement::new(2, 1, 2, vec![0, 0]), Err(PlacementError::Unplaced(1))));
        assert!(matches!(Placement::new(2, 1, 2, vec![0, 5]), Err(PlacementError::UnknownExpert { .. })));
        assert!(matches!(Placement::new(2, 2, 2, vec![0, 1]), Err(PlacementError::SlotCount { .. })));
    }

    #[test]
    fn shares_split_load_unevenly() {
        // GPU0: e0, e1; GPU1: e0, e2. e0 sends 3/4 of its tokens to GPU1.
        let p = Placement::new(2, 2, 3, vec![0, 1, 0, 2]).unwrap().with_shares(&[1.0, 1.0, 3.0, 1.0]).unwrap();
        assert_eq!(p.shares.as_deref(), Some(&[250_000, 1_000_000, 750_000, 1_000_000][..]));
        assert_eq!(p.gpu_loads(&[100.0, 10.0, 30.0]), vec![35.0, 105.0]);
        let mut bad = p.clone();
        bad.shares.as_mut().unwrap()[0] = 1;
        assert!(matches!(bad.check(), Err(PlacementError::Shares(_))));
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Placement>(&json).unwrap(), p);
        // Without shares the field is absent from the JSON.
        assert!(!serde_json::to_string(&Placement::contiguous(2, 1, 2).unwrap()).unwrap().contains("shares"));
    }

    #[test]
    fn replicas_split_load() {
        // GPU0: e0, e1; GPU1: e0, e2. e0 has 2 replicas.
        let p = Placement::new(2, 2, 3, vec![0, 1, 0, 2]).unwrap();
        let g = p.gpu_loads(&[100.0, 10.0, 30.0]);
        assert_eq!(g, vec![60.0, 80.0]);
        assert!((p.imbalance(&[100.0, 10.0, 30.0]) - 80.0 / 70.0).abs() < 1e-12);
    }
}
