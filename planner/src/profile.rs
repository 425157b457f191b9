//! What an expected workload does to a plan's MoE layers: the busiest GPU's load over the mean under the
//! placement Switchyard would use (replicas with token shares), per (expert-parallel size, slots per GPU). Cached, since thousands of plans share
//! a handful of (ep, slots) pairs.

use std::collections::HashMap;
use std::sync::Mutex;

use switchyard_cost::cost::MoeLoadProfile;
use switchyard_cost::{Placement, Workload};

use crate::placement::switchyard::{SwitchyardOptions, switchyard_placement};

/// Computes and caches [`MoeLoadProfile`]s for one workload and expert count.
pub struct ProfileCache {
    workload: Workload,
    experts: usize,
    layers: usize,
    cache: Mutex<HashMap<(u32, u32), MoeLoadProfile>>,
}

impl ProfileCache {
    /// A cache for `experts` routed experts over `moe_layers` MoE layers.
    pub fn new(workload: Workload, experts: usize, moe_layers: usize) -> Self {
        ProfileCache { workload, experts, layers: moe_layers.max(1), cache: Mutex::new(HashMap::new()) }
    }

    /// The workload.
    pub fn workload(&self) -> &Workload {
        &self.workload
    }

    /// Profile of a group of `ep` GPUs with `slots` slots each (averaged over the workload's distinct layers).
    pub fn profile(&self, ep: u32, slots: u32) -> MoeLoadProfile {
        if let Some(p) = self.cache.lock().expect("profile cache").get(&(ep, slots)) {
            return *p;
        }
        let p = self.compute(ep, slots);
        self.cache.lock().expect("profile cache").insert((ep, slots), p);
        p
    }

    fn compute(&self, ep: u32, slots: u32) -> MoeLoadProfile {
        let (ep, slots) = (ep.max(1) as usize, slots.max(1) as usize);
        if self.experts == 0 || ep * slots < self.experts {
            return MoeLoadProfile::BALANCED;
        }
        let layers = self.workload.num_distinct_layers().min(self.layers);
        let mut imb = 0.0;
        let mut active = 0.0;
        for l in 0..layers {
            let f = self.workload.expert_fractions(l, self.experts);
            let p = if ep == 1 {
                Placement::contiguous(1, slots, self.experts).expect("one GPU holds every expert")
            } else {
                // The placement Switchyard would use: replicas with token shares.
                let opts = SwitchyardOptions { gpus_per_node: ep, ..Default::default() };
                switchyard_placement(&f, None, None, ep, slots, &opts).expect("enough slots")
            };
            let loads = p.gpu_loads(&f);
            let busiest = loads.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |x| x.0);
            let cnt = p.replica_counts();
            let used = p.gpu_slots(busiest).iter().filter(|&&e| f[e as usize] / cnt[e as usize] as f64 > 0.0).count();
            imb += p.imbalance(&f);
            active += used as f64 / slots as f64;
        }
        let n = layers as f64;
        MoeLoadProfile {
            imbalance: (imb / n).max(self.workload.imbalance_floor()),
            active_slot_fraction: active / n,
            replicas_per_gpu: (ep * slots - self.experts) as f64 / ep as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_balanced_and_skew_is_not() {
        let u = ProfileCache::new(Workload::Uniform, 32, 4).profile(8, 4);
        assert!((u.imbalance - 1.0).abs() < 1e-12);
        assert_eq!(u.replicas_per_gpu, 0.0);
        let z = ProfileCache::new(Workload::Skewed { zipf_s: 1.2 }, 32, 4);
        let tight = z.profile(8, 4);
        let spare = z.profile(8, 6);
        assert!(tight.imbalance > 1.5, "{}", tight.imbalance);
        assert!(spare.imbalance < tight.imbalance);
        assert_eq!(spare.replicas_per_gpu, 2.0);
        let cap = ProfileCache::new(Workload::CapacityBound { capacity_factor: 1.25 }, 32, 4).profile(8, 4);
        assert_eq!(cap.imbalance, 1.25);
    }
}
