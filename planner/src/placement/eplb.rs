//! DeepSeek's Expert Parallelism Load Balancer (EPLB), implemented from its published description and
//! reference algorithm: redundant experts are added one at a time to the expert with the highest load per
//! replica, and items are packed by "balanced packing" (heaviest first, each to the lightest pack that still has
//! room, every pack getting the same number of items).
//!
//! - Hierarchical policy (when the expert groups divide evenly over the nodes): pack expert groups onto nodes
//!   by group load; inside each node replicate its experts to the node's share of physical slots; pack the
//!   node's replicas onto its GPUs by load per replica.
//! - Global policy (otherwise): the same with one group and one node.
//!
//! Output in EPLB's form: `phy2log` (logical expert of each physical slot), `log2phy` (physical slots of each
//! logical expert, padded with -1) and `logcnt` (replicas per logical expert), per layer.

use serde::{Deserialize, Serialize};
use switchyard_cost::{Placement, PlacementError};

/// Which EPLB policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EplbPolicy {
    /// Hierarchical when `groups % nodes == 0`, else global (EPLB's own rule).
    Auto,
    /// Groups to nodes, replicas within nodes, replicas to GPUs.
    Hierarchical,
    /// One group, one node.
    Global,
}

/// EPLB's tensors for several layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EplbTensors {
    /// Per layer, the logical expert of each physical slot.
    pub phy2log: Vec<Vec<i64>>,
    /// Per layer, per logical expert, its physical slots padded with -1 to the largest replica count.
    pub log2phy: Vec<Vec<Vec<i64>>>,
    /// Per layer, replicas of each logical expert.
    pub logcnt: Vec<Vec<i64>>,
}

/// One layer's (phy2log, replica rank of each physical slot, replica count of each logical expert).
pub type Replication = (Vec<usize>, Vec<usize>, Vec<usize>);

/// Bad EPLB arguments.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("EPLB: {0}")]
pub struct EplbError(pub String);

/// Balanced packing of `weights` into `packs` packs of equal item count: items by weight descending (ties:
/// lower index first), each to the lightest pack with room (ties: lower pack). Returns (pack, rank in pack).
pub fn balanced_packing(weights: &[f64], packs: usize) -> Result<(Vec<usize>, Vec<usize>), EplbError> {
    let n = weights.len();
    if packs == 0 || !n.is_multiple_of(packs) {
        return Err(EplbError(format!("{n} items do not divide into {packs} packs")));
    }
    let per = n / packs;
    if per == 1 {
        return Ok(((0..n).collect(), vec![0; n]));
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
    let mut pack_w = vec![0.0f64; packs];
    let mut pack_n = vec![0usize; packs];
    let mut pack = vec![0usize; n];
    let mut rank = vec![0usize; n];
    for i in order {
        let p = (0..packs)
            .filter(|&p| pack_n[p] < per)
            .min_by(|&a, &b| pack_w[a].total_cmp(&pack_w[b]).then(a.cmp(&b)))
            .ok_or_else(|| EplbError("no pack has room".into()))?;
        pack[i] = p;
        rank[i] = pack_n[p];
        pack_w[p] += weights[i];
        pack_n[p] += 1;
    }
    Ok((pack, rank))
}

/// Adds `phys - weights.len()` redundant replicas, one at a time, to the expert with the highest weight per
/// replica (ties: lower index). Returns (phy2log, replica rank of each physical slot, replica counts).
pub fn replicate_experts(weights: &[f64], phys: usize) -> Result<Replication, EplbError> {
    let n = weights.len();
    if phys < n {
        return Err(EplbError(format!("{phys} physical slots cannot hold {n} experts")));
    }
    let mut phy2log: Vec<usize> = (0..n).collect();
    let mut rank = vec![0usize; n];
    let mut cnt = vec![1usize; n];
    for _ in n..phys {
        let best = (0..n)
            .max_by(|&a, &b| (weights[a] / cnt[a] as f64).total_cmp(&(weights[b] / cnt[b] as f64)).then(b.cmp(&a)))
            .ok_or_else(|| EplbError("no experts".into()))?;
        phy2log.push(best);
        rank.push(cnt[best]);
        cnt[best] += 1;
    }
    Ok((phy2log, rank, cnt))
}

/// One layer of the hierarchical policy. Returns (phy2log, phy rank, logcnt).
fn hierarchical(w: &[f64], phys: usize, groups: usize, nodes: usize, gpus: usize) -> Result<Replication, EplbError> {
    let e = w.len();
    let check = |ok: bool, what: &str| if ok { Ok(()) } else { Err(EplbError(what.to_string())) };
    check(groups > 0 && e.is_multiple_of(groups), "groups must divide the experts")?;
    check(nodes > 0 && groups.is_multiple_of(nodes), "nodes must divide the groups")?;
    check(gpus > 0 && gpus.is_multiple_of(nodes), "nodes must divide the GPUs")?;
    check(phys.is_multiple_of(gpus), "GPUs must divide the physical slots")?;
    check(phys.is_multiple_of(nodes), "nodes must divide the physical slots")?;
    let group_size = e / groups;
    let groups_per_node = groups / nodes;
    let per_gpu = phys / gpus;
    let per_node_log = e / nodes;
    // Step 1: groups to nodes.
    let group_w: Vec<f64> = (0..groups).map(|g| w[g * group_size..(g + 1) * group_size].iter().sum()).collect();
    let (gpack, grank) = balanced_packing(&group_w, nodes)?;
    // log2mlog: logical expert -> its position in the node-major ("meta-logical") order.
    let mut log2mlog = vec![0usize; e];
    for g in 0..groups {
        for k in 0..group_size {
            log2mlog[g * group_size + k] = (gpack[g] * groups_per_node + grank[g]) * group_size + k;
        }
    }
    let mut mlog2log = vec![0usize; e];
    for (l, &m) in log2mlog.iter().enumerate() {
        mlog2log[m] = l;
    }
    // Step 2: replicas within each node; step 3: replicas to the node's GPUs.
    let phys_per_node = phys / nodes;
    let gpus_per_node = gpus / nodes;
    let mut pphy2log = Vec::with_capacity(phys);
    let mut pphy_rank = Vec::with_capacity(phys);
    let mut mlogcnt_all = vec![0usize; e];
    for n in 0..nodes {
        let tokens: Vec<f64> = (0..per_node_log).map(|i| w[mlog2log[n * per_node_log + i]]).collect();
        let (phy2mlog, phyrank, mlogcnt) = replicate_experts(&tokens, phys_per_node)?;
        for i in 0..per_node_log {
            mlogcnt_all[n * per_node_log + i] = mlogcnt[i];
        }
        let per_phy: Vec<f64> = phy2mlog.iter().map(|&m| tokens[m] / mlogcnt[m] as f64).collect();
        let (pack, rank) = balanced_packing(&per_phy, gpus_per_node)?;
        // phy2pphy = pack * per_gpu + rank; invert.
        let mut pphy2phy = vec![0usize; phys_per_node];
        for (p, (&pk, &rk)) in pack.iter().zip(&rank).enumerate() {
            pphy2phy[pk * per_gpu + rk] = p;
        }
        for &p in &pphy2phy {
            pphy2log.push(mlog2log[n * per_node_log + phy2mlog[p]]);
            pphy_rank.push(phyrank[p]);
        }
    }
    let logcnt: Vec<usize> = (0..e).map(|l| mlogcnt_all[log2mlog[l]]).collect();
    Ok((pphy2log, pphy_rank, logcnt))
}

/// Runs EPLB on per-layer expert loads: `loads[layer][expert]`, `replicas` physical slots in all, `groups` expert
/// groups, `nodes` nodes and `gpus` GPUs.
pub fn eplb(
    loads: &[Vec<f64>],
    replicas: usize,
    groups: usize,
    nodes: usize,
    gpus: usize,
    policy: EplbPolicy,
) -> Result<EplbTensors, EplbError> {
    let hier = match policy {
        EplbPolicy::Hierarchical => true,
        EplbPolicy::Global => false,
        EplbPolicy::Auto => nodes > 0 && groups.is_multiple_of(nodes),
    };
    let mut out = EplbTensors { phy2log: Vec::new(), log2phy: Vec::new(), logcnt: Vec::new() };
    let mut per_layer = Vec::new();
    for w in loads {
        let (p, r, c) =
            if hier { hierarchical(w, replicas, groups, nodes, gpus)? } else { hierarchical(w, replicas, 1, 1, gpus)? };
        per_layer.push((p, r, c));
    }
    let maxcnt = per_layer.iter().flat_map(|(_, _, c)| c.iter().copied()).max().unwrap_or(1);
    for (p, r, c) in per_layer {
        let mut l2p = vec![vec![-1i64; maxcnt]; c.len()];
        for (slot, (&l, &k)) in p.iter().zip(&r).enumerate() {
            l2p[l][k] = slot as i64;
        }
        out.phy2log.push(p.iter().map(|&x| x as i64).collect());
        out.log2phy.push(l2p);
        out.logcnt.push(c.iter().map(|&x| x as i64).collect());
    }
    Ok(out)
}

/// One layer's EPLB result as a [`Placement`] (slots in `phy2log` order; `gpus` GPUs).
pub fn to_placement(phy2log: &[i64], gpus: usize, experts: usize) -> Result<Placement, PlacementError> {
    let slots: Vec<u32> = phy2log.iter().map(|&x| x.max(0) as u32).collect();
    let per = slots.len().checked_div(gpus).unwrap_or(0);
    Placement::new(gpus, per, experts, slots)
}

/// EPLB's tensors of placements (one per layer): slot order is the physical order.
pub fn from_placements(placements: &[Placement]) -> EplbTensors {
    let maxcnt = placements.iter().flat_map(|p| p.replica_counts()).max().unwrap_or(1) as usize;
    let mut out = EplbTensors { phy2log: Vec::new(), log2phy: Vec::new(), logcnt: Vec::new() };
    for p in placements {
        out.phy2log.push(p.slots.iter().map(|&x| x as i64).collect());
        let mut l2p = vec![vec![-1i64; maxcnt]; p.experts];
        for (e, slots) in p.expert_slots().iter().enumerate() {
            for (k, &s) in slots.iter().enumerate() {
                l2p[e][k] = s as i64;
            }
        }
        out.log2phy.push(l2p);
        out.logcnt.push(p.replica_counts().iter().map(|&x| x as i64).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reproduces_the_published_example() {
        let w = vec![
            vec![90.0, 132.0, 40.0, 61.0, 104.0, 165.0, 39.0, 4.0, 73.0, 56.0, 183.0, 86.0],
            vec![20.0, 107.0, 104.0, 64.0, 19.0, 197.0, 187.0, 157.0, 172.0, 86.0, 16.0, 27.0],
        ];
        let t = eplb(&w, 16, 4, 2, 8, EplbPolicy::Auto).unwrap();
        assert_eq!(
            t.phy2log,
            vec![
                vec![5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                vec![7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]
            ]
        );
        for l in 0..2 {
            assert_eq!(t.logcnt[l].iter().sum::<i64>(), 16);
            for (e, slots) in t.log2phy[l].iter().enumerate() {
                for &s in slots.iter().filter(|&&s| s >= 0) {
                    assert_eq!(t.phy2log[l][s as usize], e as i64);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn valid_and_round_trips(w in proptest::collection::vec(0.0f64..1000.0, 16), extra in 0usize..3, global in any::<bool>()) {
            let gpus = 4;
            let replicas = 16 + extra * gpus;
            let policy = if global { EplbPolicy::Global } else { EplbPolicy::Hierarchical };
            let t = eplb(std::slice::from_ref(&w), replicas, 4, 2, gpus, policy).unwrap();
            let p = to_placement(&t.phy2log[0], gpus, 16).unwrap();
            p.check().unwrap();
            prop_assert!(p.replica_counts().iter().all(|&c| c >= 1));
            prop_assert_eq!(t.logcnt[0].iter().sum::<i64>(), replicas as i64);
            let total: f64 = p.gpu_loads(&w).iter().sum();
            prop_assert!((total - w.iter().sum::<f64>()).abs() < 1e-6 * (1.0 + total));
            // Placement -> EPLB -> Placement is the identity; the JSON form round-trips.
            let back = from_placements(std::slice::from_ref(&p));
            prop_assert_eq!(to_placement(&back.phy2log[0], gpus, 16).unwrap(), p.clone());
            let json = serde_json::to_string(&back).unwrap();
            prop_assert_eq!(serde_json::from_str::<EplbTensors>(&json).unwrap(), back);
            let pj = serde_json::to_string(&p).unwrap();
            prop_assert_eq!(serde_json::from_str::<Placement>(&pj).unwrap(), p);
        }
    }
}
