//! DeepSeek's Expert Parallelism Load Balancer (EPLB), reimplemented from its published algorithm (the
//! DeepSeek-V3 technical report, and `eplb.py` in `deepseek-ai/EPLB`, whose example it reproduces exactly).
//!
//! Building blocks:
//! - *balanced packing* ([`balanced_packing`]): items by weight descending, each to the lightest pack that still
//!   has room, every pack receiving exactly `items / packs` items;
//! - *replication* ([`replicate_experts`]): every expert starts with one replica; each redundant slot goes, one at a
//!   time, to the expert with the highest load per replica.
//!
//! Policies ([`EplbPolicy`]):
//! - *hierarchical* (prefill, when the expert groups divide evenly over the nodes): pack the expert groups onto
//!   the nodes by group load (equal group count per node); inside each node replicate its experts up to the
//!   node's share of the physical slots; pack the node's replicas onto its GPUs by load per replica (equal slot
//!   count per GPU);
//! - *global* (otherwise): the same with one group and one node (`rebalance_experts_hierarchical(w, r, 1, 1, g)`).
//!
//! Faithfulness details that decide ties, as the reference computes them: loads are converted to `f32`
//! (`weight.float()`) and every sum and per-replica division is done in `f32`; sorts are descending and stable
//! (equal weights keep index order, as `torch.sort` on CPU does); the lightest pack is the first of equal ones
//! (Python's `min`); the expert to replicate is the first of equal ones (`torch.max(dim).indices`); `log2phy` lists
//! an expert's slots by replica rank (the original first, then the redundant ones in the order they were added)
//! and is padded with -1 to the largest replica count over all layers (`logcnt.max()`).

use serde::{Deserialize, Serialize};
use switchyard_cost::Placement;

pub use super::eplb_format::{EplbTensors, from_placements};
use super::error::{PlacementAlgoError, check_loads};

const EPLB: &str = "EPLB";

/// Which EPLB policy ([`eplb`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EplbPolicy {
    /// EPLB's own rule (`rebalance_experts`): hierarchical when the groups divide evenly over the nodes
    /// (`groups % nodes == 0`), global otherwise.
    Auto,
    /// Groups to nodes, replicas within each node, replicas to the node's GPUs.
    Hierarchical,
    /// One group, one node: replicas over all physical slots, then packed onto all GPUs.
    Global,
}

impl EplbPolicy {
    /// Whether this policy runs hierarchically for `groups` groups on `nodes` nodes (`Auto` resolved).
    pub fn is_hierarchical(self, groups: usize, nodes: usize) -> bool {
        match self {
            EplbPolicy::Hierarchical => true,
            EplbPolicy::Global => false,
            EplbPolicy::Auto => nodes > 0 && groups.is_multiple_of(nodes),
        }
    }
}

/// EPLB's output: per layer, `phy2log`, `log2phy` (by replica rank, padded with -1) and `logcnt`.
pub type EplbResult = EplbTensors;

/// One layer's replication: (logical expert of each physical slot, replica rank of each physical slot, replica
/// count of each logical expert), EPLB's `(phy2log, phyrank, logcnt)`.
pub type Replication = (Vec<usize>, Vec<usize>, Vec<usize>);

/// EPLB's balanced packing of `weights` into `packs` packs of `weights.len() / packs` items each: items by weight
/// descending (stable), each to the lightest pack that still has room (the first of equal ones). Returns, per
/// item, (its pack, its rank within the pack). Weights are taken as `f32`, as the reference does.
pub fn balanced_packing(weights: &[f64], packs: usize) -> Result<(Vec<usize>, Vec<usize>), PlacementAlgoError> {
    let w: Vec<f32> = weights.iter().map(|&x| x as f32).collect();
    pack_f32(&w, packs)
}

/// EPLB's replication of `weights.len()` logical experts into `phys` physical ones: one replica each, then
/// `phys - weights.len()` redundant replicas added one at a time to the expert with the highest weight per
/// replica (the first of equal ones). Returns (phy2log, replica rank, logcnt); physical slots `0..experts` hold the
/// originals in order, the redundant ones follow in the order they were added.
pub fn replicate_experts(weights: &[f64], phys: usize) -> Result<Replication, PlacementAlgoError> {
    let w: Vec<f32> = weights.iter().map(|&x| x as f32).collect();
    replicate_f32(&w, phys)
}

fn pack_f32(w: &[f32], packs: usize) -> Result<(Vec<usize>, Vec<usize>), PlacementAlgoError> {
    let n = w.len();
    if packs == 0 || !n.is_multiple_of(packs) {
        return Err(PlacementAlgoError::invalid(EPLB, format!("{n} items do not pack evenly into {packs} packs")));
    }
    let per = n / packs;
    if per == 1 {
        // The reference's shortcut: item i alone in pack i.
        return Ok(((0..n).collect(), vec![0; n]));
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| w[b].total_cmp(&w[a])); // stable: equal weights keep index order
    let mut pack_w = vec![0.0f32; packs];
    let mut pack_n = vec![0usize; packs];
    let (mut pack, mut rank) = (vec![0usize; n], vec![0usize; n]);
    for i in order {
        let mut best: Option<usize> = None;
        for p in (0..packs).filter(|&p| pack_n[p] < per) {
            if best.is_none_or(|b| pack_w[p] < pack_w[b]) {
                best = Some(p);
            }
        }
        let p = best.ok_or_else(|| PlacementAlgoError::invalid(EPLB, "no pack has room"))?;
        pack[i] = p;
        rank[i] = pack_n[p];
        pack_w[p] += w[i];
        pack_n[p] += 1;
    }
    Ok((pack, rank))
}

fn replicate_f32(w: &[f32], phys: usize) -> Result<Replication, PlacementAlgoError> {
    let n = w.len();
    if n == 0 || phys < n {
        return Err(PlacementAlgoError::invalid(EPLB, format!("{phys} physical slots cannot hold {n} experts")));
    }
    let mut phy2log: Vec<usize> = (0..n).collect();
    let mut rank = vec![0usize; n];
    let mut cnt = vec![1usize; n];
    for _ in n..phys {
        let mut best = 0;
        for e in 1..n {
            if w[e] / cnt[e] as f32 > w[best] / cnt[best] as f32 {
                best = e;
            }
        }
        phy2log.push(best);
        rank.push(cnt[best]);
        cnt[best] += 1;
    }
    Ok((phy2log, rank, cnt))
}

/// The inverse of a permutation.
fn inverse(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    inv
}

/// EPLB's hierarchical policy on one layer (`rebalance_experts_hierarchical`): `w` per logical expert, `phys`
/// physical slots in all, `groups` expert groups (contiguous runs of experts), `nodes` nodes, `gpus` GPUs.
/// The global policy is this with one group and one node. Returns (phy2log, replica rank, logcnt).
pub fn rebalance_hierarchical(
    w: &[f64],
    phys: usize,
    groups: usize,
    nodes: usize,
    gpus: usize,
) -> Result<Replication, PlacementAlgoError> {
    check_loads(w)?;
    let w: Vec<f32> = w.iter().map(|&x| x as f32).collect();
    hierarchical_f32(&w, phys, groups, nodes, gpus)
}

fn hierarchical_f32(
    w: &[f32],
    phys: usize,
    groups: usize,
    nodes: usize,
    gpus: usize,
) -> Result<Replication, PlacementAlgoError> {
    let e = w.len();
    let need = |ok: bool, why: String| if ok { Ok(()) } else { Err(PlacementAlgoError::invalid(EPLB, why)) };
    need(e > 0, "there are no experts".into())?;
    need(groups > 0 && e.is_multiple_of(groups), format!("{groups} groups must divide the {e} experts"))?;
    need(nodes > 0 && groups.is_multiple_of(nodes), format!("{nodes} nodes must divide the {groups} groups"))?;
    need(gpus > 0 && gpus.is_multiple_of(nodes), format!("{nodes} nodes must divide the {gpus} GPUs"))?;
    need(phys.is_multiple_of(gpus), format!("{gpus} GPUs must divide the {phys} physical slots"))?;
    need(phys >= e, format!("{phys} physical slots cannot hold {e} experts"))?;
    let group_size = e / groups;
    let groups_per_node = groups / nodes;
    let per_gpu = phys / gpus;
    let log_per_node = e / nodes;
    let phys_per_node = phys / nodes;
    let gpus_per_node = gpus / nodes;

    // Step 1: pack the groups onto the nodes by group load. "Meta-logical" order: node-major, the node's groups
    // in pack-rank order, each group's experts in order.
    let group_w: Vec<f32> = w.chunks(group_size).map(|c| c.iter().sum()).collect();
    let (gpack, grank) = pack_f32(&group_w, nodes)?;
    let log2mlog: Vec<usize> = (0..e)
        .map(|l| (gpack[l / group_size] * groups_per_node + grank[l / group_size]) * group_size + l % group_size)
        .collect();
    let mlog2log = inverse(&log2mlog);

    let mut phy2log = Vec::with_capacity(phys);
    let mut phy_rank = Vec::with_capacity(phys);
    let mut mlogcnt = Vec::with_capacity(e);
    for n in 0..nodes {
        // Step 2: replicas within the node, up to its share of the physical slots.
        let node_w: Vec<f32> = (0..log_per_node).map(|i| w[mlog2log[n * log_per_node + i]]).collect();
        let (phy2mlog, phyrank, cnt) = replicate_f32(&node_w, phys_per_node)?;
        // Step 3: pack the node's replicas onto its GPUs by load per replica.
        let per_phy: Vec<f32> = phy2mlog.iter().map(|&m| node_w[m] / cnt[m] as f32).collect();
        let (pack, rank) = pack_f32(&per_phy, gpus_per_node)?;
        let phy2pphy: Vec<usize> = pack.iter().zip(&rank).map(|(&p, &r)| p * per_gpu + r).collect();
        for p in inverse(&phy2pphy) {
            phy2log.push(mlog2log[n * log_per_node + phy2mlog[p]]);
            phy_rank.push(phyrank[p]);
        }
        mlogcnt.extend(cnt);
    }
    let logcnt = log2mlog.iter().map(|&m| mlogcnt[m]).collect();
    Ok((phy2log, phy_rank, logcnt))
}

/// Runs EPLB (`rebalance_experts`) on per-layer expert loads `loads[layer][expert]` (finite, non-negative): at
/// `num_replicas` physical slots in all (a multiple of `num_gpus`, at least the experts), `num_groups` expert
/// groups, `num_nodes` nodes and `num_gpus` GPUs (a multiple of `num_nodes`). Returns `phy2log`, `log2phy` (by
/// replica rank, -1 padded to the largest count) and `logcnt` per layer.
pub fn eplb(
    loads: &[Vec<f64>],
    num_replicas: usize,
    num_groups: usize,
    num_nodes: usize,
    num_gpus: usize,
    policy: EplbPolicy,
) -> Result<EplbResult, PlacementAlgoError> {
    let experts = loads.first().map_or(0, Vec::len);
    for (l, row) in loads.iter().enumerate() {
        if row.len() != experts {
            return Err(PlacementAlgoError::invalid(
                EPLB,
                format!("layer {l} has {} expert loads, layer 0 has {experts}", row.len()),
            ));
        }
        check_loads(row)?;
    }
    if num_nodes == 0 {
        return Err(PlacementAlgoError::invalid(EPLB, "there must be at least one node"));
    }
    let hierarchical = policy.is_hierarchical(num_groups, num_nodes);
    if hierarchical && !num_groups.is_multiple_of(num_nodes) {
        return Err(PlacementAlgoError::invalid(
            EPLB,
            format!(
                "the hierarchical policy needs the {num_groups} groups to divide evenly over the {num_nodes} nodes"
            ),
        ));
    }
    let mut per_layer = Vec::with_capacity(loads.len());
    for row in loads {
        let w: Vec<f32> = row.iter().map(|&x| x as f32).collect();
        per_layer.push(if hierarchical {
            hierarchical_f32(&w, num_replicas, num_groups, num_nodes, num_gpus)?
        } else {
            hierarchical_f32(&w, num_replicas, 1, 1, num_gpus)?
        });
    }
    let width = per_layer.iter().flat_map(|(_, _, c)| c.iter().copied()).max().unwrap_or(1);
    let mut out = EplbTensors { phy2log: Vec::new(), log2phy: Vec::new(), logcnt: Vec::new() };
    for (p2l, rank, cnt) in per_layer {
        let mut l2p = vec![vec![-1i64; width]; cnt.len()];
        for (slot, (&l, &k)) in p2l.iter().zip(&rank).enumerate() {
            l2p[l][k] = slot as i64;
        }
        out.phy2log.push(p2l.iter().map(|&x| x as i64).collect());
        out.log2phy.push(l2p);
        out.logcnt.push(cnt.iter().map(|&x| x as i64).collect());
    }
    Ok(out)
}

/// EPLB's result as one [`Placement`] per layer: `num_gpus` GPUs, `num_replicas / num_gpus` slots each, slot `i`
/// holding `phy2log[layer][i]`.
pub fn eplb_placements(
    loads: &[Vec<f64>],
    num_replicas: usize,
    num_groups: usize,
    num_nodes: usize,
    num_gpus: usize,
    policy: EplbPolicy,
) -> Result<Vec<Placement>, PlacementAlgoError> {
    eplb(loads, num_replicas, num_groups, num_nodes, num_gpus, policy)?.to_placements(num_gpus)
}

/// One layer's `phy2log` as a [`Placement`] of `gpus` GPUs and `experts` logical experts (slots per GPU =
/// `phy2log.len() / gpus`). Errors on entries that are not experts (including -1), uneven slots, unplaced experts.
pub fn to_placement(phy2log: &[i64], gpus: usize, experts: usize) -> Result<Placement, PlacementAlgoError> {
    super::eplb_format::phy2log_to_placement(phy2log, gpus, experts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// DeepSeek's published example (`deepseek-ai/EPLB`, README): 2 layers, 12 experts in 4 groups, 16 physical
    /// slots, 2 nodes, 8 GPUs.
    fn example() -> Vec<Vec<f64>> {
        vec![
            vec![90.0, 132.0, 40.0, 61.0, 104.0, 165.0, 39.0, 4.0, 73.0, 56.0, 183.0, 86.0],
            vec![20.0, 107.0, 104.0, 64.0, 19.0, 197.0, 187.0, 157.0, 172.0, 86.0, 16.0, 27.0],
        ]
    }

    const PUBLISHED: [[i64; 16]; 2] =
        [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1], [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]];

    #[test]
    fn reproduces_the_published_example() {
        let t = eplb(&example(), 16, 4, 2, 8, EplbPolicy::Auto).unwrap();
        assert_eq!(t.phy2log, PUBLISHED.iter().map(|r| r.to_vec()).collect::<Vec<_>>());
        t.check().unwrap();
        // Layer by layer (layers are independent), and Auto = Hierarchical here (4 groups % 2 nodes == 0).
        for (l, w) in example().iter().enumerate() {
            let one = eplb(std::slice::from_ref(w), 16, 4, 2, 8, EplbPolicy::Hierarchical).unwrap();
            assert_eq!(one.phy2log[0], PUBLISHED[l].to_vec(), "layer {l}");
        }
        // Layer 0: experts 5 and 4 get the redundant slots in node 0, 10 and 1 in node 1.
        assert_eq!(t.logcnt[0], vec![1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1]);
        assert_eq!(t.logcnt[1], vec![1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]);
        // log2phy by replica rank: expert 5's original is slot 0, its redundant copy slot 2.
        assert_eq!(t.log2phy[0][5], vec![0, 2]);
        assert_eq!(t.log2phy[0][0], vec![12, -1]);
        let ps = eplb_placements(&example(), 16, 4, 2, 8, EplbPolicy::Auto).unwrap();
        assert_eq!((ps[0].gpus, ps[0].slots_per_gpu, ps[0].experts), (8, 2, 12));
        assert_eq!(ps[1].gpu_slots(7), &[3, 1]);
    }

    #[test]
    fn the_published_example_step_by_step() {
        let w = &example()[0];
        // Step 1: group loads 262, 330, 116, 325 onto 2 nodes: 330 -> node 0, 325 -> node 1, 262 -> node 1
        // (lighter), 116 -> node 0. Node 0 holds groups 1, 2 (experts 3..9), node 1 groups 3, 0.
        let groups: Vec<f64> = w.chunks(3).map(|c| c.iter().sum()).collect();
        assert_eq!(groups, vec![262.0, 330.0, 116.0, 325.0]);
        assert_eq!(balanced_packing(&groups, 2).unwrap(), (vec![1, 0, 0, 1], vec![1, 0, 1, 0]));
        // Step 2, node 0: experts 3..9 (loads 61, 104, 165, 39, 4, 73) into 8 slots: 165 and then 104 are split.
        let node0 = [61.0, 104.0, 165.0, 39.0, 4.0, 73.0];
        let (p2m, rank, cnt) = replicate_experts(&node0, 8).unwrap();
        assert_eq!(
            (p2m.clone(), rank, cnt.clone()),
            (vec![0, 1, 2, 3, 4, 5, 2, 1], vec![0, 0, 0, 0, 0, 0, 1, 1], vec![1, 2, 2, 1, 1, 1])
        );
        // Step 3: replicas (82.5, 82.5, 73, 61, 52, 52, 39, 4) onto 4 GPUs, 2 each. Ties go to the lower index
        // and the first lightest GPU.
        let per: Vec<f64> = p2m.iter().map(|&m| node0[m] / cnt[m] as f64).collect();
        let (pack, rank) = balanced_packing(&per, 4).unwrap();
        assert_eq!(pack, vec![3, 3, 0, 0, 1, 2, 1, 2]);
        assert_eq!(rank, vec![0, 1, 0, 1, 1, 0, 0, 1]);
        // Which is the first half of the published row: GPU0 {5, 6}, GPU1 {5, 7}, GPU2 {8, 4}, GPU3 {3, 4}.
        let (p2l, _, _) = rebalance_hierarchical(w, 16, 4, 2, 8).unwrap();
        assert_eq!(p2l[..8].iter().map(|&x| x as i64).collect::<Vec<_>>(), PUBLISHED[0][..8].to_vec());
    }

    #[test]
    fn global_policy_is_one_group_one_node() {
        let w = example();
        let g = eplb(&w, 16, 4, 2, 8, EplbPolicy::Global).unwrap();
        let h = eplb(&w, 16, 1, 1, 8, EplbPolicy::Hierarchical).unwrap();
        assert_eq!(g, h);
        // Auto falls back to global when the groups do not divide over the nodes (3 groups, 2 nodes).
        assert_eq!(eplb(&w, 16, 3, 2, 8, EplbPolicy::Auto).unwrap(), g);
        // Global packs onto GPUs too: 16 replicas, 2 per GPU, every expert placed.
        let p = to_placement(&g.phy2log[0], 8, 12).unwrap();
        assert!(p.replica_counts().iter().all(|&c| c >= 1));
    }

    #[test]
    fn bad_arguments_are_errors() {
        let w = example();
        let cases: Vec<(usize, usize, usize, usize, EplbPolicy)> = vec![
            (16, 5, 1, 8, EplbPolicy::Hierarchical), // 5 groups do not divide 12 experts
            (16, 3, 2, 8, EplbPolicy::Hierarchical), // 3 groups do not divide over 2 nodes
            (16, 4, 2, 6, EplbPolicy::Auto),         // 6 GPUs do not divide 16 slots
            (16, 4, 3, 9, EplbPolicy::Auto),         // 3 nodes do not divide 4 groups -> global; 9 GPUs
            (10, 4, 2, 2, EplbPolicy::Auto),         // 10 slots cannot hold 12 experts
            (16, 4, 0, 8, EplbPolicy::Auto),         // no nodes
            (16, 4, 2, 0, EplbPolicy::Global),       // no GPUs
            (16, 4, 2, 3, EplbPolicy::Hierarchical), // 2 nodes do not divide 3 GPUs
        ];
        for (i, (r, g, n, gpus, pol)) in cases.into_iter().enumerate() {
            assert!(eplb(&w, r, g, n, gpus, pol).is_err(), "case {i}");
        }
        assert!(matches!(
            eplb(&[vec![1.0, f64::NAN]], 2, 1, 1, 1, EplbPolicy::Auto),
            Err(PlacementAlgoError::BadLoad { expert: 1, .. })
        ));
        assert!(eplb(&[vec![1.0, -1.0]], 2, 1, 1, 1, EplbPolicy::Auto).is_err());
        assert!(eplb(&[vec![1.0, 2.0], vec![1.0]], 2, 1, 1, 1, EplbPolicy::Auto).is_err());
        assert!(eplb(&[vec![]], 2, 1, 1, 1, EplbPolicy::Auto).is_err());
        assert_eq!(eplb(&[], 2, 1, 1, 1, EplbPolicy::Auto).unwrap().layers(), 0);
        assert!(to_placement(&[0, -1], 1, 2).is_err());
        assert!(balanced_packing(&[1.0, 2.0, 3.0], 2).is_err());
        assert!(replicate_experts(&[1.0, 2.0], 1).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn valid_balanced_and_consistent(
            (experts, groups, nodes, gpus_per_node, per_gpu) in (1usize..4, 1usize..3, 1usize..4, 1usize..3, 0usize..3)
                .prop_map(|(gpn, nodes, groups_per_node, group_size, extra)| {
                    // groups = nodes * groups_per_node; experts = groups * group_size; slots per GPU covers the
                    // node's experts.
                    let groups = nodes * groups_per_node;
                    let experts = groups * group_size;
                    let gpus_per_node = gpn;
                    let per_gpu = (experts / nodes).div_ceil(gpus_per_node) + extra;
                    (experts, groups, nodes, gpus_per_node, per_gpu)
                }),
            seed in proptest::collection::vec(0.0f64..1000.0, 64),
            layers in 1usize..3,
            global in any::<bool>(),
        ) {
            let gpus = nodes * gpus_per_node;
            let replicas = gpus * per_gpu;
            let loads: Vec<Vec<f64>> =
                (0..layers).map(|l| (0..experts).map(|e| seed[(l * 7 + e) % 64].round()).collect()).collect();
            let policy = if global { EplbPolicy::Global } else { EplbPolicy::Hierarchical };
            let t = eplb(&loads, replicas, groups, nodes, gpus, policy).unwrap();
            t.check().unwrap();
            let ps = t.to_placements(gpus).unwrap();
            for (l, p) in ps.iter().enumerate() {
                p.check().unwrap();
                prop_assert_eq!(p.slots.len(), replicas);
                prop_assert_eq!(p.slots_per_gpu, replicas / gpus);
                prop_assert!(p.replica_counts().iter().all(|&c| c >= 1));
                prop_assert_eq!(t.logcnt[l].iter().sum::<i64>() as usize, replicas);
                let total: f64 = p.gpu_loads(&loads[l]).iter().sum();
                let want: f64 = loads[l].iter().sum();
                prop_assert!((total - want).abs() <= 1e-9 * (1.0 + want));
                // Hierarchical: each node holds whole groups, and the replicas of its experts stay inside it.
                if !global {
                    let per_node = replicas / nodes;
                    let group_size = experts / groups;
                    for n in 0..nodes {
                        let mut gs: Vec<usize> =
                            p.slots[n * per_node..(n + 1) * per_node].iter().map(|&e| e as usize / group_size).collect();
                        gs.sort_unstable();
                        gs.dedup();
                        prop_assert_eq!(gs.len(), groups / nodes);
                    }
                }
                // log2phy lists replica ranks 0..logcnt.
                for e in 0..experts {
                    let listed = t.log2phy[l][e].iter().filter(|&&s| s >= 0).count() as i64;
                    prop_assert_eq!(listed, t.logcnt[l][e]);
                }
            }
            // Redundant replicas never leave an expert with a higher load per replica than another expert had
            // when it received its last redundant copy (EPLB's rule), globally: checked for the global policy.
            if global {
                for (l, w) in loads.iter().enumerate() {
                    let cnt = &t.logcnt[l];
                    let max_now = (0..experts).map(|e| w[e] / cnt[e] as f64).fold(0.0, f64::max);
                    for e in 0..experts {
                        if cnt[e] > 1 {
                            prop_assert!(w[e] / (cnt[e] - 1) as f64 >= max_now - 1e-3);
                        }
                    }
                }
            }
        }
    }
}
