//! Switchyard's own placement: replication-aware, topology-aware and migration-aware.
//!
//! 1. Replica counts: every expert one slot, each spare slot to the expert with the highest load per replica.
//! 2. Construction: replicas heaviest first, each to the least-loaded GPU with a free slot; among GPUs within a
//!    small tolerance of the least load, prefer (a) the GPU that already holds the expert (nothing to move),
//!    (b) a node that sends the expert many tokens (traffic stays inside the node), (c) a node that already holds
//!    a replica of it (cheaper gradient synchronisation).
//! 3. Local search on the busiest GPU: swap one of its slots with a slot of another GPU, or retarget one of its
//!    replicas to the expert with the highest load per replica, while the busiest load falls.
//! 5. Token shares (last): each replicated expert's tokens are split over its replicas so that the busiest GPU
//!    carries the least ([`super::shares::balance_shares`]), instead of evenly.
//! 4. Migration-aware relabelling: inside each node, the new GPU contents are assigned to GPUs by a minimum-cost
//!    assignment (fewest experts to move), and inside each GPU experts keep their slot index when they can.

use switchyard_cost::{Placement, PlacementError};

use super::balanced::replica_counts_for;

/// Knobs of the algorithm.
#[derive(Debug, Clone, PartialEq)]
pub struct SwitchyardOptions {
    /// GPUs per node (the topology's unit of locality).
    pub gpus_per_node: usize,
    /// Loads within this fraction of the mean GPU load count as equal when choosing a GPU.
    pub tie_tolerance: f64,
    /// Rounds of local search at most.
    pub max_rounds: usize,
    /// Split replicated experts' tokens unevenly (token shares) to balance the GPUs exactly.
    pub token_shares: bool,
}

impl Default for SwitchyardOptions {
    fn default() -> Self {
        SwitchyardOptions { gpus_per_node: 8, tie_tolerance: 0.02, max_rounds: 64, token_shares: true }
    }
}

/// Computes a placement of `loads.len()` experts on `gpus` GPUs with `slots_per_gpu` slots each. `source_loads`
/// (per source GPU, per expert) steers replicas toward the nodes that send them tokens; `current` makes the
/// result move as few experts as possible.
pub fn switchyard_placement(
    loads: &[f64],
    source_loads: Option<&[Vec<f64>]>,
    current: Option<&Placement>,
    gpus: usize,
    slots_per_gpu: usize,
    opts: &SwitchyardOptions,
) -> Result<Placement, PlacementError> {
    let e = loads.len();
    let total = gpus * slots_per_gpu;
    if total < e || e == 0 || gpus == 0 {
        return Err(PlacementError::TooFewSlots { slots: total, experts: e });
    }
    let node_src = source_loads.map(|src| node_source_loads(src, gpus, e, opts.gpus_per_node));
    switchyard_placement_by_node(loads, node_src.as_deref(), current, gpus, slots_per_gpu, opts)
}

/// Tokens each node sends to each expert (row-major, nodes x experts) from per-source-GPU loads, as
/// [`switchyard_placement`] sums them (non-finite or negative entries count as 0; rows past `gpus` are ignored).
pub fn node_source_loads(src: &[Vec<f64>], gpus: usize, experts: usize, gpus_per_node: usize) -> Vec<f64> {
    let gpn = gpus_per_node.clamp(1, gpus.max(1));
    let nodes = gpus.div_ceil(gpn);
    let mut node_src = vec![0.0; nodes * experts];
    for (s, row) in src.iter().enumerate().take(gpus) {
        let n = s / gpn;
        for (x, &v) in node_src[n * experts..(n + 1) * experts].iter_mut().zip(row.iter()) {
            *x += if v.is_finite() { v.max(0.0) } else { 0.0 };
        }
    }
    node_src
}

/// [`switchyard_placement`] with the tokens each node sends each expert already summed ([`node_source_loads`];
/// None: no source information): the same placement.
pub fn switchyard_placement_by_node(
    loads: &[f64],
    node_src: Option<&[f64]>,
    current: Option<&Placement>,
    gpus: usize,
    slots_per_gpu: usize,
    opts: &SwitchyardOptions,
) -> Result<Placement, PlacementError> {
    let e = loads.len();
    let total = gpus * slots_per_gpu;
    if total < e || e == 0 || gpus == 0 {
        return Err(PlacementError::TooFewSlots { slots: total, experts: e });
    }
    let loads: Vec<f64> = loads.iter().map(|&x| if x.is_finite() && x > 0.0 { x } else { 0.0 }).collect();
    let cnt = replica_counts_for(&loads, total);
    place_with_counts(&loads, cnt, node_src, current, gpus, slots_per_gpu, opts)
}

/// The placement for sanitised `loads` (finite, non-negative) with the replica counts `cnt`
/// ([`replica_counts_for`] of them): steps 2 to 5.
fn place_with_counts(
    loads: &[f64],
    mut cnt: Vec<u32>,
    node_src: Option<&[f64]>,
    current: Option<&Placement>,
    gpus: usize,
    slots_per_gpu: usize,
    opts: &SwitchyardOptions,
) -> Result<Placement, PlacementError> {
    let e = loads.len();
    let spg = slots_per_gpu;
    let total = gpus * spg;
    let gpn = opts.gpus_per_node.clamp(1, gpus);
    let nodes = gpus.div_ceil(gpn);
    let gpu_node: Vec<usize> = (0..nodes).flat_map(|n| std::iter::repeat_n(n, gpn)).take(gpus).collect();
    let node_of = |g: usize| gpu_node[g];
    let cur_same = current.filter(|c| c.gpus == gpus);

    // 2. Construction: replicas heaviest first (an expert's replicas one after another, ties to the lower
    // expert), each to a GPU of the window.
    let w = |ex: u32, cnt: &[u32]| loads[ex as usize] / cnt[ex as usize] as f64;
    let per_replica: Vec<f64> = (0..e).map(|x| w(x as u32, &cnt)).collect();
    // Per-replica loads are finite and non-negative: their bit patterns order like the values.
    // (Packed into one integer, (bits inverted, expert): heaviest first, ties to the lower expert.)
    let mut order: Vec<u128> = (0..e).map(|x| ((!per_replica[x].to_bits() as u128) << 32) | x as u128).collect();
    order.sort_unstable();
    let mean = loads.iter().sum::<f64>() / gpus as f64;
    let tol = opts.tie_tolerance * mean.max(f64::MIN_POSITIVE);
    let mut gpu_load = vec![0.0f64; gpus];
    // The experts of each GPU's slots, in the order they were placed.
    let mut bins = vec![0u32; total];
    let mut fill = vec![0usize; gpus];
    let mut node_has = vec![0u32; nodes * e];
    // GPUs with a free slot, per node, ordered by load then index (non-negative f64 bit patterns order like the
    // values).
    let key = |l: f64| l.max(0.0).to_bits();
    // (Each entry packed as `load bits << 64 | GPU`, which orders like the pair.)
    let mut open: Vec<Vec<u128>> = (0..nodes)
        .map(|n| (n * gpn..((n + 1) * gpn).min(gpus)).map(|g| (key(0.0) as u128) << 64 | g as u128).collect())
        .collect();
    // The GPUs that hold each expert now, cut per expert.
    let mut hold_start = vec![0usize; e + 1];
    let mut hold_gpus: Vec<usize> = Vec::new();
    if let Some(c) = cur_same {
        for &x in &c.slots {
            if (x as usize) < e {
                hold_start[x as usize + 1] += 1;
            }
        }
        for x in 0..e {
            hold_start[x + 1] += hold_start[x];
        }
        let mut at = hold_start.clone();
        hold_gpus = vec![0; hold_start[e]];
        for (g, xs) in c.slots.chunks_exact(c.slots_per_gpu.max(1)).enumerate() {
            for &x in xs {
                if (x as usize) < e {
                    hold_gpus[at[x as usize]] = g;
                    at[x as usize] += 1;
                }
            }
        }
    }
    // The lightest open GPU of each node, packed as in `open` ([`NO_HEAD`]: none).
    let mut heads: Vec<u128> = open.iter().map(|o| o.first().copied().unwrap_or(NO_HEAD)).collect();
    // GPUs that took the expert being placed (its replicas come one after another: `took[g] == ex + 1`).
    let mut took = vec![0u32; gpus];
    for &packed in &order {
        let ex = packed as u32;
        let x = ex as usize;
        let stamp = ex + 1;
        let holders = &hold_gpus[hold_start[x]..hold_start[x + 1]];
        for _ in 0..cnt[x] {
            // `u64::MAX` (a node without a free GPU) orders after every load.
            let least = least_head(&heads);
            if least >> 64 == u64::MAX as u128 {
                break;
            }
            let (least_bits, lightest) = ((least >> 64) as u64, least as u64 as usize);
            let limit = f64::from_bits(least_bits) + tol;
            // Loads and the limit are non-negative: their bit patterns order like the values.
            let limit_bits = limit.to_bits();
            // Candidates: free GPUs within the tolerance of the least load, not holding this expert already,
            // preferred by (holds it now, tokens its node sends the expert, replicas of it on its node, lighter
            // first, lower index first), floats ordered as `total_cmp` orders them. A GPU that holds the expert
            // now outranks every other, so the holders are looked at first and the rest only when none is a
            // candidate: among either, the key is (its node's tokens, the rest packed into one integer; GPU
            // indices fit in 32 bits, as GPU ids do everywhere). Keys differ by GPU, so the best is the unique
            // maximum; every key is above (0, 0) (its last part is positive). Compared without branches on the
            // outcome, which the loads decide.
            let pref = |g: usize, n: usize| {
                let rest = (node_has[n * e + x] as u128) << 96
                    | (ordered_bits(-gpu_load[g]) as u128) << 32
                    | (u32::MAX - g as u32) as u128;
                (ordered_bits(node_src.map_or(0.0, |m| m[n * e + x])), rest)
            };
            let mut pick = Pick::default();
            // A holder is a candidate exactly when it has a free slot, is within the limit and has not taken
            // this expert yet.
            for &g in holders {
                if fill[g] < spg && gpu_load[g].max(0.0) <= limit && took[g] != stamp {
                    pick.offer(pref(g, node_of(g)), g);
                }
            }
            if pick.gpu.is_none() {
                // Within a node only the lightness and index differ by GPU: the best candidate is the lightest of
                // its node that has not taken the expert.
                for (n, &head) in heads.iter().enumerate() {
                    if (head >> 64) as u64 > limit_bits {
                        continue;
                    }
                    // The node's lightest GPU, unless it took the expert already (rare): then the next within
                    // the limit.
                    let mut g = head as u64 as usize;
                    if took[g] == stamp {
                        let Some(next) = open[n]
                            .iter()
                            .take_while(|&&p| (p >> 64) as u64 <= limit_bits)
                            .map(|&p| p as u64 as usize)
                            .find(|&h| took[h] != stamp)
                        else {
                            continue;
                        };
                        g = next;
                    }
                    pick.offer(pref(g, n), g);
                }
            }
            // None fits: the least-loaded GPU with a free slot.
            let best = pick.gpu.unwrap_or(lightest);
            let n = node_of(best);
            let list = &mut open[n];
            let pos = list.iter().position(|&p| p as u64 as usize == best).expect("the chosen GPU has a free slot");
            bins[best * spg + fill[best]] = ex;
            fill[best] += 1;
            gpu_load[best] += per_replica[x];
            node_has[n * e + x] += 1;
            took[best] = stamp;
            if fill[best] < spg {
                // Its load only grew: its new place is at or after the old one (the list stays sorted, as a
                // removal and a sorted insertion leave it).
                let k = (key(gpu_load[best]) as u128) << 64 | best as u128;
                let mut j = pos;
                while j + 1 < list.len() && list[j + 1] < k {
                    list[j] = list[j + 1];
                    j += 1;
                }
                list[j] = k;
            } else {
                list.remove(pos);
            }
            heads[n] = list.first().copied().unwrap_or(NO_HEAD);
        }
    }

    // 3. Local search on the busiest GPU (without token shares only).
    let rounds = if opts.token_shares { 0 } else { opts.max_rounds };
    if rounds > 0 {
        let mut nested: Vec<Vec<u32>> = (0..gpus).map(|g| bins[g * spg..g * spg + fill[g]].to_vec()).collect();
        local_search(loads, &mut cnt, &mut nested, &mut gpu_load, rounds);
        for (g, b) in nested.iter().enumerate() {
            bins[g * spg..g * spg + b.len()].copy_from_slice(b);
            fill[g] = b.len();
        }
    }

    // 4. Migration-aware relabelling inside each node, then slot order inside each GPU.
    if let Some(cur) = current.filter(|c| c.gpus == gpus && c.slots_per_gpu == slots_per_gpu) {
        let mut mask = vec![0u64; e];
        let mut cost: Vec<f64> = Vec::new();
        let mut hungarian = Hungarian::default();
        let mut old: Vec<u32> = Vec::new();
        let mut old_fill: Vec<usize> = Vec::new();
        let mut direct: Vec<usize> = Vec::new();
        for n in 0..nodes {
            let lo = n * gpn;
            let k = ((n + 1) * gpn).min(gpus) - lo;
            // cost[b][j]: experts of bin b that GPU j of the node does not hold now.
            cost.clear();
            cost.resize(k * k, 0.0);
            if k <= 64 {
                for j in 0..k {
                    for &x in &cur.slots[(lo + j) * spg..(lo + j + 1) * spg] {
                        if (x as usize) < e {
                            mask[x as usize] |= 1 << j;
                        }
                    }
                }
                for b in 0..k {
                    let g = lo + b;
                    for j in 0..k {
                        let missing = bins[g * spg..g * spg + fill[g]]
                            .iter()
                            .filter(|&&x| mask[x as usize] >> j & 1 == 0)
                            .count();
                        cost[b * k + j] = missing as f64;
                    }
                }
                for &x in &cur.slots[lo * spg..(lo + k) * spg] {
                    if (x as usize) < e {
                        mask[x as usize] = 0;
                    }
                }
            } else {
                for b in 0..k {
                    let g = lo + b;
                    for j in 0..k {
                        let now = cur.gpu_slots(lo + j);
                        let missing = bins[g * spg..g * spg + fill[g]].iter().filter(|x| !now.contains(x)).count();
                        cost[b * k + j] = missing as f64;
                    }
                }
            }
            // When every bin has one GPU strictly cheapest for it and those GPUs differ, that assignment is the
            // only optimum (any other costs more in some row and no less in the rest): the Hungarian algorithm
            // would return it. (The common case once placements settle: each bin is mostly one GPU's experts.)
            let assign: &[usize] =
                if strict_row_minima(&cost, k, &mut direct) { &direct } else { hungarian.solve(&cost, k) };
            old.clear();
            old.extend_from_slice(&bins[lo * spg..(lo + k) * spg]);
            old_fill.clear();
            old_fill.extend_from_slice(&fill[lo..lo + k]);
            for (b, &j) in assign.iter().enumerate() {
                let g = lo + j;
                bins[g * spg..(g + 1) * spg].copy_from_slice(&old[b * spg..(b + 1) * spg]);
                fill[g] = old_fill[b];
            }
        }
        let mut placed: Vec<Option<u32>> = vec![None; spg];
        let mut rest: Vec<u32> = Vec::with_capacity(spg);
        for g in 0..gpus {
            let cur_slots = &cur.slots[g * spg..(g + 1) * spg];
            placed.fill(None);
            rest.clear();
            for &x in &bins[g * spg..g * spg + fill[g]] {
                match cur_slots.iter().enumerate().position(|(j, &c)| c == x && placed[j].is_none()) {
                    Some(j) => placed[j] = Some(x),
                    None => rest.push(x),
                }
            }
            let mut it = rest.iter().copied();
            for (slot, p) in bins[g * spg..(g + 1) * spg].iter_mut().zip(&placed) {
                *slot = p.or_else(|| it.next()).unwrap_or(0);
            }
            fill[g] = spg;
        }
    }
    // Every slot is filled (the replicas number the slots); otherwise the slots there are, which do not make a
    // placement.
    let bins = if fill.iter().all(|&f| f == spg) {
        bins
    } else {
        (0..gpus).flat_map(|g| bins[g * spg..g * spg + fill[g]].iter().copied()).collect()
    };
    let placed = Placement::new(gpus, slots_per_gpu, e, bins)?;
    // 5. Token shares: split replicated experts' tokens so the busiest GPU carries the least.
    if opts.token_shares { super::shares::balanced_shares_only(&placed, loads) } else { Ok(placed) }
}

/// The construction's best candidate so far, by its key (its node's tokens, the rest of the preference packed
/// into one integer), kept without branches on the comparison's outcome.
#[derive(Default)]
struct Pick {
    key: (u64, u128),
    gpu: Option<usize>,
}

impl Pick {
    /// Keeps GPU `g` if `key` is above the best so far.
    #[inline(always)]
    fn offer(&mut self, key: (u64, u128), g: usize) {
        let take = (key.0 > self.key.0) | ((key.0 == self.key.0) & (key.1 > self.key.1));
        self.key = if take { key } else { self.key };
        self.gpu = if take { Some(g) } else { self.gpu };
    }
}

/// The least of the packed node heads, in four independent running minima (no chain of dependent comparisons
/// as long as the nodes).
#[inline(always)]
fn least_head(heads: &[u128]) -> u128 {
    let mut m = [NO_HEAD; 4];
    let chunks = heads.chunks_exact(4);
    for &h in chunks.remainder() {
        m[0] = m[0].min(h);
    }
    for c in chunks {
        for (mk, &h) in m.iter_mut().zip(c) {
            *mk = (*mk).min(h);
        }
    }
    m[0].min(m[1]).min(m[2].min(m[3]))
}

/// A node without a free GPU, as a packed head (load bits `u64::MAX`: after every load).
const NO_HEAD: u128 = (u64::MAX as u128) << 64;

/// Step 3: while the busiest GPU's load falls, swap one of its slots with a slot of another GPU, or retarget one
/// of its replicas to the expert with the highest load per replica.
fn local_search(loads: &[f64], cnt: &mut Vec<u32>, bins: &mut Vec<Vec<u32>>, gpu_load: &mut Vec<f64>, rounds: usize) {
    let e = loads.len();
    let gpus = bins.len();
    let w = |ex: u32, cnt: &[u32]| loads[ex as usize] / cnt[ex as usize] as f64;
    let recompute = |bins: &[Vec<u32>], cnt: &[u32]| -> Vec<f64> {
        bins.iter().map(|b| b.iter().map(|&x| loads[x as usize] / cnt[x as usize] as f64).sum()).collect()
    };
    for _ in 0..rounds {
        let gmax = (0..gpus).max_by(|&a, &b| gpu_load[a].total_cmp(&gpu_load[b])).unwrap_or(0);
        let lmax = gpu_load[gmax];
        // Best swap between the busiest GPU and another.
        let mut best: Option<(f64, usize, usize, usize)> = None; // (new pair max, slot on gmax, gpu, slot)
        for (i, &a) in bins[gmax].iter().enumerate() {
            let wa = w(a, cnt);
            for (g, bg) in bins.iter().enumerate() {
                if g == gmax {
                    continue;
                }
                for (j, &b) in bg.iter().enumerate() {
                    let wb = w(b, cnt);
                    if a == b || wb >= wa || bg.contains(&a) || bins[gmax].contains(&b) {
                        continue;
                    }
                    let pair = (lmax - wa + wb).max(gpu_load[g] - wb + wa);
                    if pair < lmax - 1e-12 * lmax.max(1.0) && best.is_none_or(|x| pair < x.0) {
                        best = Some((pair, i, g, j));
                    }
                }
            }
        }
        if let Some((_, i, g, j)) = best {
            let (a, b) = (bins[gmax][i], bins[g][j]);
            bins[gmax][i] = b;
            bins[g][j] = a;
            let (wa, wb) = (w(a, cnt), w(b, cnt));
            gpu_load[gmax] += wb - wa;
            gpu_load[g] += wa - wb;
            continue;
        }
        // Retarget a replica on the busiest GPU to the expert with the highest load per replica.
        let Some(hot) = (0..e)
            .filter(|&x| cnt[x] < gpus as u32)
            .max_by(|&a, &b| (loads[a] / cnt[a] as f64).total_cmp(&(loads[b] / cnt[b] as f64)).then(b.cmp(&a)))
        else {
            break;
        };
        let mut improved = false;
        for i in 0..bins[gmax].len() {
            let a = bins[gmax][i];
            if cnt[a as usize] < 2 || a as usize == hot || bins[gmax].contains(&(hot as u32)) {
                continue;
            }
            let mut c2 = cnt.clone();
            c2[a as usize] -= 1;
            c2[hot] += 1;
            let mut b2 = bins.clone();
            b2[gmax][i] = hot as u32;
            let l2 = recompute(&b2, &c2);
            if l2.iter().copied().fold(0.0, f64::max) < lmax - 1e-12 * lmax.max(1.0) {
                *bins = b2;
                *cnt = c2;
                *gpu_load = l2;
                improved = true;
                break;
            }
        }
        if !improved {
            break;
        }
    }
}

/// Repairs `current` for new loads with as few expert moves as possible: the replica counts the loads call
/// for are computed, and only the slots of experts that hold more replicas than they need are given to experts
/// that hold fewer (one transfer each), on the GPUs that carry the most load per slot first and never twice on
/// one GPU; token shares then balance the rest. None when the slot configuration differs or nothing changes.
pub fn repair_placement(loads: &[f64], current: &Placement, opts: &SwitchyardOptions) -> Option<Placement> {
    let (g, s, e) = (current.gpus, current.slots_per_gpu, current.experts);
    if loads.len() != e || g * s < e {
        return None;
    }
    let loads: Vec<f64> = loads.iter().map(|&x| if x.is_finite() && x > 0.0 { x } else { 0.0 }).collect();
    let want = replica_counts_for(&loads, g * s);
    repair_with_counts(&loads, &want, current, opts)
}

/// [`repair_placement`] for sanitised loads and the replica counts they call for.
fn repair_with_counts(loads: &[f64], want: &[u32], current: &Placement, opts: &SwitchyardOptions) -> Option<Placement> {
    let e = current.experts;
    let s = current.slots_per_gpu;
    let have = current.replica_counts();
    // Freed slots: surplus replicas, taken from the most loaded GPUs first (an expert's slots in slot order,
    // sorted by their GPU's load, heaviest first, then by slot).
    if (0..e).all(|x| have[x] <= want[x]) {
        return None;
    }
    let gpu_load = super::shares::gpu_loads(current, loads);
    let mut slots = current.slots.clone();
    // Each expert's slots, in slot order, cut per expert.
    let mut start = vec![0usize; e + 1];
    for &x in &slots {
        start[x as usize + 1] += 1;
    }
    let mut sum = 0;
    for c in start.iter_mut() {
        sum += *c;
        *c = sum;
    }
    let mut at = start.clone();
    let mut of = vec![0usize; slots.len()];
    for (i, &x) in slots.iter().enumerate() {
        of[at[x as usize]] = i;
        at[x as usize] += 1;
    }
    let mut freed: Vec<usize> = Vec::new();
    let mut mine: Vec<(u64, usize)> = Vec::new();
    for x in 0..e {
        let surplus = have[x].saturating_sub(want[x]) as usize;
        if surplus == 0 {
            continue;
        }
        // (Heaviest GPU first as `total_cmp` orders the loads, then the lower slot: unique keys.)
        mine.clear();
        mine.extend(of[start[x]..start[x + 1]].iter().map(|&i| (!ordered_bits(gpu_load[i / s]), i)));
        mine.sort_unstable();
        freed.extend(mine.iter().take(surplus).map(|&(_, i)| i));
    }
    // Deficits, heaviest first (load per wanted replica, then the lower expert), each to a freed slot on a GPU
    // that lacks the expert, least loaded first.
    let mut heavy: Vec<(u64, u32)> =
        (0..e).filter(|&x| want[x] > have[x]).map(|x| (!ordered_bits(loads[x] / want[x] as f64), x as u32)).collect();
    heavy.sort_unstable();
    let mut load_now = gpu_load;
    for &i in &freed {
        let x = slots[i] as usize;
        load_now[i / s] -= loads[x] / have[x] as f64;
    }
    // The freed slots as GPUs: the least loaded freed slot is the first freed slot of the least loaded GPU
    // with one (slots of a lower GPU come first), so the GPUs with a freed slot, ordered by (load, GPU), stand
    // for the slots ordered by (load of their GPU, slot); `free[i]`: slot `i` is freed and not yet given.
    let mut free = vec![false; slots.len()];
    let mut free_on = vec![0u32; current.gpus];
    for &i in &freed {
        free[i] = true;
        free_on[i / s] += 1;
    }
    let mut open: Vec<(u64, usize)> =
        (0..current.gpus).filter(|&g| free_on[g] > 0).map(|g| (ordered_bits(load_now[g]), g)).collect();
    open.sort_unstable();
    // The first freed slot not yet given, in `freed` order (the choice when every such GPU holds the expert).
    let mut first = 0;
    'deficits: for &(_, x) in &heavy {
        for _ in have[x as usize]..want[x as usize] {
            let pick = open.iter().position(|&(_, g)| !slots[g * s..(g + 1) * s].contains(&x));
            let (i, k) = match pick {
                Some(k) => {
                    let g = open[k].1;
                    ((g * s..(g + 1) * s).find(|&i| free[i]).expect("a freed slot on an open GPU"), k)
                }
                None => {
                    while first < freed.len() && !free[freed[first]] {
                        first += 1;
                    }
                    let Some(&i) = freed.get(first) else { break 'deficits };
                    (i, open.iter().position(|&(_, h)| h == i / s).expect("the GPU is open"))
                }
            };
            let g = i / s;
            slots[i] = x;
            load_now[g] += loads[x as usize] / want[x as usize] as f64;
            free[i] = false;
            free_on[g] -= 1;
            // The GPU's new place among the open ones.
            open.remove(k);
            if free_on[g] > 0 {
                let key = (ordered_bits(load_now[g]), g);
                let at = open.partition_point(|o| *o < key);
                open.insert(at, key);
            }
        }
    }
    let p = Placement::new(current.gpus, s, e, slots).ok()?;
    if opts.token_shares { super::shares::balanced_shares_only(&p, loads).ok() } else { Some(p) }
}

/// `v`'s bits as an unsigned integer that orders like [`f64::total_cmp`].
fn ordered_bits(v: f64) -> u64 {
    let b = v.to_bits();
    if b >> 63 == 1 { !b } else { b | 1 << 63 }
}

/// Switchyard's proposal and the minimal repair of `current` for the same loads, the replica counts computed
/// once: `(switchyard_placement_by_node(..), repair_placement(..))` with `current` as both the placement to stay
/// close to and the one to repair.
pub fn placement_and_repair(
    loads: &[f64],
    node_src: Option<&[f64]>,
    current: &Placement,
    gpus: usize,
    slots_per_gpu: usize,
    opts: &SwitchyardOptions,
) -> (Result<Placement, PlacementError>, Option<Placement>) {
    let e = loads.len();
    let total = gpus * slots_per_gpu;
    if total < e || e == 0 || gpus == 0 {
        return (Err(PlacementError::TooFewSlots { slots: total, experts: e }), repair_placement(loads, current, opts));
    }
    let clean: Vec<f64> = loads.iter().map(|&x| if x.is_finite() && x > 0.0 { x } else { 0.0 }).collect();
    let cnt = replica_counts_for(&clean, total);
    let repair = if current.experts == e && current.gpus * current.slots_per_gpu == total {
        repair_with_counts(&clean, &cnt, current, opts)
    } else {
        repair_placement(loads, current, opts)
    };
    (place_with_counts(&clean, cnt, node_src, Some(current), gpus, slots_per_gpu, opts), repair)
}

/// Whether each row of the `n` x `n` row-major `cost` has a unique strict minimum and those minima lie in
/// distinct columns; then `out` holds each row's column (the unique minimum-cost assignment).
fn strict_row_minima(cost: &[f64], n: usize, out: &mut Vec<usize>) -> bool {
    out.clear();
    if n > 128 || cost.len() < n * n {
        return false;
    }
    let mut taken = 0u128;
    for row in cost.chunks_exact(n.max(1)).take(n) {
        let mut best = 0;
        for (j, &c) in row.iter().enumerate().skip(1) {
            if c < row[best] {
                best = j;
            }
        }
        let strict = row.iter().enumerate().all(|(j, &c)| j == best || c > row[best]);
        if !strict || taken >> best & 1 == 1 {
            return false;
        }
        taken |= 1 << best;
        out.push(best);
    }
    out.len() == n
}

/// Scratch of the Hungarian algorithm, reused between calls.
#[derive(Default)]
struct Hungarian {
    u: Vec<f64>,
    v: Vec<f64>,
    p: Vec<usize>,
    way: Vec<usize>,
    minv: Vec<f64>,
    used: Vec<bool>,
    ans: Vec<usize>,
}

impl Hungarian {
    /// [`min_cost_assignment`] of the `n` x `n` row-major matrix `cost`: the same algorithm, step for step.
    fn solve(&mut self, cost: &[f64], n: usize) -> &[usize] {
        self.ans.clear();
        if n == 0 {
            return &self.ans;
        }
        let inf = f64::INFINITY;
        for buf in [&mut self.u, &mut self.v] {
            buf.clear();
            buf.resize(n + 1, 0.0);
        }
        for buf in [&mut self.p, &mut self.way] {
            buf.clear();
            buf.resize(n + 1, 0);
        }
        self.minv.clear();
        self.minv.resize(n + 1, inf);
        self.used.clear();
        self.used.resize(n + 1, false);
        // Plain slices of n + 1 (the buffers' pointers stay in registers; the bounds checks go).
        let (u, v) = (&mut self.u[..n + 1], &mut self.v[..n + 1]);
        let (p, way) = (&mut self.p[..n + 1], &mut self.way[..n + 1]);
        let (minv, used) = (&mut self.minv[..n + 1], &mut self.used[..n + 1]);
        let cost = &cost[..n * n];
        for i in 1..=n {
            p[0] = i;
            let mut j0 = 0;
            minv.fill(inf);
            used.fill(false);
            loop {
                used[j0] = true;
                let i0 = p[j0];
                let mut delta = inf;
                let mut j1 = 0;
                let row = &cost[(i0 - 1) * n..i0 * n];
                let ui0 = u[i0];
                for j in 1..=n {
                    // The steps for a column not yet used, as selects (a used column keeps its values).
                    let free = !used[j];
                    let cur = row[j - 1] - ui0 - v[j];
                    let lower = free & (cur < minv[j]);
                    minv[j] = if lower { cur } else { minv[j] };
                    way[j] = if lower { j0 } else { way[j] };
                    let best = free & (minv[j] < delta);
                    delta = if best { minv[j] } else { delta };
                    j1 = if best { j } else { j1 };
                }
                for j in 0..=n {
                    if used[j] {
                        u[p[j]] += delta;
                        v[j] -= delta;
                    } else {
                        minv[j] -= delta;
                    }
                }
                j0 = j1;
                if p[j0] == 0 {
                    break;
                }
            }
            loop {
                let j1 = way[j0];
                p[j0] = p[j1];
                j0 = j1;
                if j0 == 0 {
                    break;
                }
            }
        }
        self.ans.resize(n, 0);
        for (j, &row) in p.iter().enumerate().take(n + 1).skip(1) {
            if row > 0 {
                self.ans[row - 1] = j - 1;
            }
        }
        &self.ans
    }
}

/// Minimum-cost perfect assignment of rows to columns (Hungarian algorithm, O(n^3)); returns the column of each
/// row.
pub fn min_cost_assignment(cost: &[Vec<f64>]) -> Vec<usize> {
    let n = cost.len();
    let flat: Vec<f64> =
        cost.iter().flat_map(|row| row.iter().copied().chain(std::iter::repeat(0.0)).take(n)).collect();
    Hungarian::default().solve(&flat, n).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn assignment_by_hand() {
        let c = vec![vec![4.0, 1.0, 3.0], vec![2.0, 0.0, 5.0], vec![3.0, 2.0, 2.0]];
        // Optimum: row0 -> col1 (1), row1 -> col0 (2), row2 -> col2 (2) = 5.
        assert_eq!(min_cost_assignment(&c), vec![1, 0, 2]);
    }

    #[test]
    fn replicates_the_hot_expert_and_balances() {
        let mut loads = vec![1.0; 16];
        loads[3] = 40.0;
        let opts = SwitchyardOptions { gpus_per_node: 4, ..Default::default() };
        let p = switchyard_placement(&loads, None, None, 8, 3, &opts).unwrap();
        assert!(p.replica_counts()[3] >= 6, "{:?}", p.replica_counts());
        let mean = loads.iter().sum::<f64>() / 8.0;
        assert!(p.gpu_loads(&loads).iter().cloned().fold(0.0, f64::max) / mean < 1.1, "{:?}", p.gpu_loads(&loads));
    }

    #[test]
    fn repair_moves_only_what_the_counts_need() {
        let mut loads = vec![10.0; 16];
        loads[0] = 200.0;
        let opts = SwitchyardOptions { gpus_per_node: 4, ..Default::default() };
        let cur = switchyard_placement(&loads, None, None, 8, 3, &opts).unwrap();
        // The hot expert moves from 0 to 5.
        loads.swap(0, 5);
        let r = repair_placement(&loads, &cur, &opts).unwrap();
        r.check().unwrap();
        let changed = r.slots.iter().zip(&cur.slots).filter(|(a, b)| a != b).count();
        let need: u32 = r.replica_counts()[5] - 1;
        assert_eq!(changed as u32, need, "{:?} -> {:?}", cur.slots, r.slots);
        assert!(r.imbalance(&loads) < cur.imbalance(&loads));
        assert!(repair_placement(&loads, &r, &opts).is_none(), "nothing left to repair");
    }

    #[test]
    fn same_loads_move_nothing() {
        let loads: Vec<f64> = (0..32).map(|i| 1.0 + (i % 5) as f64).collect();
        let opts = SwitchyardOptions::default();
        let a = switchyard_placement(&loads, None, None, 16, 3, &opts).unwrap();
        // Shuffle GPUs inside each node: the relabelling undoes it.
        let mut slots = a.slots.clone();
        slots.rotate_left(3 * 2);
        let cur = Placement::new(16, 3, 32, slots).unwrap();
        let b = switchyard_placement(&loads, None, Some(&cur), 16, 3, &opts).unwrap();
        let moved: usize =
            (0..16).map(|g| b.gpu_slots(g).iter().filter(|x| !cur.gpu_slots(g).contains(x)).count()).sum();
        assert!(moved <= 6, "moved {moved}");
        assert!(b.imbalance(&loads) <= a.imbalance(&loads) + 1e-9);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn valid_and_no_worse_than_balanced(
            loads in proptest::collection::vec(0.0f64..100.0, 1..48),
            gpus in 1usize..17,
            extra in 0usize..3,
            gpn in 1usize..9,
        ) {
            let slots = loads.len().div_ceil(gpus) + extra;
            let opts = SwitchyardOptions { gpus_per_node: gpn, ..Default::default() };
            let p = switchyard_placement(&loads, None, None, gpus, slots, &opts).unwrap();
            p.check().unwrap();
            prop_assert!(p.replica_counts().iter().all(|&c| c >= 1));
            let total: f64 = p.gpu_loads(&loads).iter().sum();
            prop_assert!((total - loads.iter().sum::<f64>()).abs() < 1e-6 * (1.0 + total));
            let b = super::super::balanced::balanced_placement(&loads, gpus, slots).unwrap();
            prop_assert!(p.imbalance(&loads) <= b.imbalance(&loads) * 1.02 + 1e-9,
                "{} vs {}", p.imbalance(&loads), b.imbalance(&loads));
            // Re-running from its own output stays as good, within the tie tolerance it trades for fewer moves.
            let q = switchyard_placement(&loads, None, Some(&p), gpus, slots, &opts).unwrap();
            prop_assert!(q.imbalance(&loads) <= p.imbalance(&loads) * 1.05 + 1e-9);
        }
    }
}

/// The placement and the repair against their first versions (a B-tree of open GPUs scanned in full, nested
/// vectors, `Placement::gpu_loads`): the same placements, slot for slot and share for share.
#[cfg(test)]
mod equals_reference {
    use proptest::prelude::*;

    use super::*;

    fn reference_placement(
        loads: &[f64],
        source_loads: Option<&[Vec<f64>]>,
        current: Option<&Placement>,
        gpus: usize,
        slots_per_gpu: usize,
        opts: &SwitchyardOptions,
    ) -> Result<Placement, PlacementError> {
        let e = loads.len();
        let total = gpus * slots_per_gpu;
        if total < e || e == 0 || gpus == 0 {
            return Err(PlacementError::TooFewSlots { slots: total, experts: e });
        }
        let loads: Vec<f64> = loads.iter().map(|&x| if x.is_finite() && x > 0.0 { x } else { 0.0 }).collect();
        let gpn = opts.gpus_per_node.clamp(1, gpus);
        let nodes = gpus.div_ceil(gpn);
        let node_of = |g: usize| g / gpn;
        // Tokens each node sends to each expert.
        let mut node_src = vec![vec![0.0; e]; nodes];
        if let Some(src) = source_loads {
            for (s, row) in src.iter().enumerate().take(gpus) {
                for (x, &v) in node_src[node_of(s)].iter_mut().zip(row.iter()) {
                    *x += if v.is_finite() { v.max(0.0) } else { 0.0 };
                }
            }
        }
        let on_gpu = |g: usize, ex: u32| current.is_some_and(|c| c.gpus == gpus && c.gpu_slots(g).contains(&ex));

        // 1. Replica counts.
        let mut cnt = replica_counts_for(&loads, total);
        // 2. Construction.
        let mut items: Vec<u32> = Vec::with_capacity(total);
        for (i, &c) in cnt.iter().enumerate() {
            items.extend(std::iter::repeat_n(i as u32, c as usize));
        }
        let w = |ex: u32, cnt: &[u32]| loads[ex as usize] / cnt[ex as usize] as f64;
        items.sort_by(|&a, &b| w(b, &cnt).total_cmp(&w(a, &cnt)).then(a.cmp(&b)));
        let mean = loads.iter().sum::<f64>() / gpus as f64;
        let tol = opts.tie_tolerance * mean.max(f64::MIN_POSITIVE);
        let mut gpu_load = vec![0.0f64; gpus];
        let mut bins: Vec<Vec<u32>> = vec![Vec::with_capacity(slots_per_gpu); gpus];
        let mut node_has = vec![vec![0u32; e]; nodes];
        // GPUs with a free slot, ordered by load (non-negative f64 bit patterns order like the values).
        let key = |l: f64| l.max(0.0).to_bits();
        let mut open: std::collections::BTreeSet<(u64, usize)> = (0..gpus).map(|g| (key(0.0), g)).collect();
        let mut window: Vec<usize> = Vec::new();
        for &ex in &items {
            let wx = w(ex, &cnt);
            let Some(&(least_bits, _)) = open.first() else { break };
            let least = f64::from_bits(least_bits);
            // Candidates: free GPUs within the tolerance of the least load, not holding this expert already.
            window.clear();
            window.extend(
                open.iter()
                    .take_while(|(l, _)| f64::from_bits(*l) <= least + tol)
                    .map(|&(_, g)| g)
                    .filter(|&g| !bins[g].contains(&ex)),
            );
            // Each candidate's preference key, computed once: (holds it now, tokens its node sends the expert,
            // replicas of it on its node, lighter first, lower index first).
            let mut best: Option<(usize, (bool, f64, u32, f64))> = None;
            for &g in &window {
                let k =
                    (on_gpu(g, ex), node_src[node_of(g)][ex as usize], node_has[node_of(g)][ex as usize], -gpu_load[g]);
                let better = match &best {
                    None => true,
                    Some((bg, bk)) => {
                        k.0.cmp(&bk.0)
                            .then(k.1.total_cmp(&bk.1))
                            .then(k.2.cmp(&bk.2))
                            .then(k.3.total_cmp(&bk.3))
                            .then(bg.cmp(&g))
                            .is_gt()
                    }
                };
                if better {
                    best = Some((g, k));
                }
            }
            let best = best
                .map(|(g, _)| g)
                .unwrap_or_else(|| open.first().map(|&(_, g)| g).expect("a GPU has a free slot while replicas remain"));
            open.remove(&(key(gpu_load[best]), best));
            bins[best].push(ex);
            gpu_load[best] += wx;
            node_has[node_of(best)][ex as usize] += 1;
            if bins[best].len() < slots_per_gpu {
                open.insert((key(gpu_load[best]), best));
            }
        }

        // 3. Local search on the busiest GPU.
        let recompute = |bins: &[Vec<u32>], cnt: &[u32]| -> Vec<f64> {
            bins.iter().map(|b| b.iter().map(|&x| loads[x as usize] / cnt[x as usize] as f64).sum()).collect()
        };
        // With token shares the split fixes what packing leaves; the search then only has to mind the counts.
        let rounds = if opts.token_shares { 0 } else { opts.max_rounds };
        for _ in 0..rounds {
            let gmax = (0..gpus).max_by(|&a, &b| gpu_load[a].total_cmp(&gpu_load[b])).unwrap_or(0);
            let lmax = gpu_load[gmax];
            // Best swap between the busiest GPU and another.
            let mut best: Option<(f64, usize, usize, usize)> = None; // (new pair max, slot on gmax, gpu, slot)
            for (i, &a) in bins[gmax].iter().enumerate() {
                let wa = w(a, &cnt);
                for (g, bg) in bins.iter().enumerate() {
                    if g == gmax {
                        continue;
                    }
                    for (j, &b) in bg.iter().enumerate() {
                        let wb = w(b, &cnt);
                        if a == b || wb >= wa || bg.contains(&a) || bins[gmax].contains(&b) {
                            continue;
                        }
                        let pair = (lmax - wa + wb).max(gpu_load[g] - wb + wa);
                        if pair < lmax - 1e-12 * lmax.max(1.0) && best.is_none_or(|x| pair < x.0) {
                            best = Some((pair, i, g, j));
                        }
                    }
                }
            }
            if let Some((_, i, g, j)) = best {
                let (a, b) = (bins[gmax][i], bins[g][j]);
                bins[gmax][i] = b;
                bins[g][j] = a;
                let (wa, wb) = (w(a, &cnt), w(b, &cnt));
                gpu_load[gmax] += wb - wa;
                gpu_load[g] += wa - wb;
                continue;
            }
            // Retarget a replica on the busiest GPU to the expert with the highest load per replica.
            let Some(hot) = (0..e)
                .filter(|&x| cnt[x] < gpus as u32)
                .max_by(|&a, &b| (loads[a] / cnt[a] as f64).total_cmp(&(loads[b] / cnt[b] as f64)).then(b.cmp(&a)))
            else {
                break;
            };
            let mut improved = false;
            for i in 0..bins[gmax].len() {
                let a = bins[gmax][i];
                if cnt[a as usize] < 2 || a as usize == hot || bins[gmax].contains(&(hot as u32)) {
                    continue;
                }
                let mut c2 = cnt.clone();
                c2[a as usize] -= 1;
                c2[hot] += 1;
                let mut b2 = bins.clone();
                b2[gmax][i] = hot as u32;
                let l2 = recompute(&b2, &c2);
                if l2.iter().copied().fold(0.0, f64::max) < lmax - 1e-12 * lmax.max(1.0) {
                    bins = b2;
                    cnt = c2;
                    gpu_load = l2;
                    improved = true;
                    break;
                }
            }
            if !improved {
                break;
            }
        }

        // 4. Migration-aware relabelling inside each node, then slot order inside each GPU.
        if let Some(cur) = current.filter(|c| c.gpus == gpus && c.slots_per_gpu == slots_per_gpu) {
            for n in 0..nodes {
                let members: Vec<usize> = (n * gpn..((n + 1) * gpn).min(gpus)).collect();
                let k = members.len();
                let cost: Vec<Vec<f64>> = members
                    .iter()
                    .map(|&b| {
                        members
                            .iter()
                            .map(|&g| bins[b].iter().filter(|x| !cur.gpu_slots(g).contains(x)).count() as f64)
                            .collect()
                    })
                    .collect();
                let assign = min_cost_assignment(&cost);
                let old: Vec<Vec<u32>> = members.iter().map(|&b| bins[b].clone()).collect();
                for (bi, &gi) in assign.iter().enumerate().take(k) {
                    bins[members[gi]] = old[bi].clone();
                }
            }
            for (g, bin) in bins.iter_mut().enumerate() {
                let cur_slots = cur.gpu_slots(g);
                let mut placed: Vec<Option<u32>> = vec![None; slots_per_gpu];
                let mut rest = Vec::new();
                for &x in bin.iter() {
                    match cur_slots.iter().enumerate().position(|(j, &c)| c == x && placed[j].is_none()) {
                        Some(j) => placed[j] = Some(x),
                        None => rest.push(x),
                    }
                }
                let mut it = rest.into_iter();
                *bin = placed.into_iter().map(|p| p.or_else(|| it.next()).unwrap_or(0)).collect();
            }
        }
        let placed = Placement::new(gpus, slots_per_gpu, e, bins.concat())?;
        // 5. Token shares: split replicated experts' tokens so the busiest GPU carries the least.
        if opts.token_shares { Ok(crate::placement::shares::balance_shares(&placed, &loads)?.0) } else { Ok(placed) }
    }

    fn reference_repair(loads: &[f64], current: &Placement, opts: &SwitchyardOptions) -> Option<Placement> {
        let (g, s, e) = (current.gpus, current.slots_per_gpu, current.experts);
        if loads.len() != e || g * s < e {
            return None;
        }
        let loads: Vec<f64> = loads.iter().map(|&x| if x.is_finite() && x > 0.0 { x } else { 0.0 }).collect();
        let want = replica_counts_for(&loads, g * s);
        let have = current.replica_counts();
        let mut slots = current.slots.clone();
        let gpu_load = current.gpu_loads(&loads);
        // Freed slots: surplus replicas, taken from the most loaded GPUs first.
        let mut freed: Vec<usize> = Vec::new();
        for x in 0..e {
            let surplus = have[x].saturating_sub(want[x]) as usize;
            if surplus == 0 {
                continue;
            }
            let mut mine: Vec<usize> = (0..slots.len()).filter(|&i| slots[i] as usize == x).collect();
            mine.sort_by(|&a, &b| {
                gpu_load[current.gpu_of_slot(b)].total_cmp(&gpu_load[current.gpu_of_slot(a)]).then(a.cmp(&b))
            });
            freed.extend(mine.into_iter().take(surplus));
        }
        if freed.is_empty() {
            return None;
        }
        // Deficits, heaviest first, each to a freed slot on a GPU that lacks the expert, least loaded first.
        let mut deficit: Vec<u32> = Vec::new();
        for x in 0..e {
            deficit.extend(std::iter::repeat_n(x as u32, want[x].saturating_sub(have[x]) as usize));
        }
        deficit.sort_by(|&a, &b| {
            (loads[b as usize] / want[b as usize] as f64)
                .total_cmp(&(loads[a as usize] / want[a as usize] as f64))
                .then(a.cmp(&b))
        });
        let mut load_now = gpu_load.clone();
        for &i in &freed {
            let x = slots[i] as usize;
            load_now[current.gpu_of_slot(i)] -= loads[x] / have[x] as f64;
        }
        for x in deficit {
            let holds = |gpu: usize, slots: &[u32]| slots[gpu * s..(gpu + 1) * s].contains(&x);
            let pick = freed
                .iter()
                .enumerate()
                .filter(|&(_, &i)| !holds(current.gpu_of_slot(i), &slots))
                .min_by(|a, b| {
                    load_now[current.gpu_of_slot(*a.1)]
                        .total_cmp(&load_now[current.gpu_of_slot(*b.1)])
                        .then(a.1.cmp(b.1))
                })
                .or_else(|| freed.iter().enumerate().next())
                .map(|(k, &i)| (k, i));
            let Some((k, i)) = pick else { break };
            slots[i] = x;
            load_now[current.gpu_of_slot(i)] += loads[x as usize] / want[x as usize] as f64;
            freed.remove(k);
        }
        let p = Placement::new(g, s, e, slots).ok()?;
        if opts.token_shares { crate::placement::shares::balance_shares(&p, &loads).ok().map(|x| x.0) } else { Some(p) }
    }

    /// A random valid placement from a seed (every expert once, the rest at random, repeats allowed).
    fn placement(gpus: usize, slots: usize, experts: usize, seed: u64, shares: bool) -> Placement {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let mut v: Vec<u32> = (0..experts as u32).collect();
        while v.len() < gpus * slots {
            v.push(next(experts) as u32);
        }
        for i in (1..v.len()).rev() {
            v.swap(i, next(i + 1));
        }
        let p = Placement::new(gpus, slots, experts, v).unwrap();
        if shares {
            let f: Vec<f64> = (0..p.slots.len()).map(|_| next(100) as f64).collect();
            p.with_shares(&f).unwrap()
        } else {
            p
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(160))]
        #[test]
        fn placement_and_repair_bit_identical(
            gpus in 1usize..24,
            per_gpu in 1usize..4,
            extra in 0usize..3,
            gpn in 1usize..10,
            seed in 0u64..1_000_000,
            // 0: no current; 1: current of the same shape; 2: with shares; 3: other slots per GPU; 4: other GPUs
            current_kind in 0usize..5,
            with_source in any::<bool>(),
            token_shares in any::<bool>(),
            levels in 1u64..60,
            tie in prop_oneof![Just(0.0), Just(0.02), Just(0.3)],
        ) {
            let experts = (gpus * per_gpu).saturating_sub(seed as usize % 3).max(1);
            let slots = experts.div_ceil(gpus) + extra;
            // Few distinct load levels: many ties.
            let loads: Vec<f64> =
                (0..experts).map(|x| ((x as u64 * 2654435761 + seed) % levels) as f64 * 10.0).collect();
            let source: Vec<Vec<f64>> = (0..gpus)
                .map(|s| (0..experts).map(|x| ((s as u64 * 31 + x as u64 * 7 + seed) % (levels + 3)) as f64).collect())
                .collect();
            let current = match current_kind {
                1 => Some(placement(gpus, slots, experts, seed ^ 1, false)),
                2 => Some(placement(gpus, slots, experts, seed ^ 2, true)),
                3 => Some(placement(gpus, slots + 1, experts, seed ^ 3, false)),
                4 => Some(placement(gpus + 1, slots, experts, seed ^ 4, false)),
                _ => None,
            };
            let opts = SwitchyardOptions { gpus_per_node: gpn, tie_tolerance: tie, token_shares, ..Default::default() };
            let src = with_source.then_some(source.as_slice());
            let a = switchyard_placement(&loads, src, current.as_ref(), gpus, slots, &opts);
            let b = reference_placement(&loads, src, current.as_ref(), gpus, slots, &opts);
            prop_assert_eq!(a.clone().ok(), b.ok());
            if let Some(cur) = &current {
                let r = repair_placement(&loads, cur, &opts);
                prop_assert_eq!(&r, &reference_repair(&loads, cur, &opts));
                // Together, sharing the replica counts: the same two.
                let node_src = src.map(|m| node_source_loads(m, gpus, experts, gpn));
                let (pa, ra) = placement_and_repair(&loads, node_src.as_deref(), cur, gpus, slots, &opts);
                prop_assert_eq!(pa.ok(), a.ok());
                prop_assert_eq!(ra, r);
            }
        }

        /// Where the rows' strict minima form a permutation, it is the assignment the Hungarian algorithm gives.
        #[test]
        fn strict_row_minima_are_the_assignment(n in 0usize..9, seed in 0u64..100_000, spread in 1u64..6) {
            let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut cost: Vec<f64> = (0..n * n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state % spread) as f64 + 1.0
                })
                .collect();
            // Often a permutation of strict minima: zeros on a shifted diagonal.
            if seed % 2 == 0 {
                for i in 0..n {
                    cost[i * n + (i + seed as usize) % n] = 0.0;
                }
            }
            let mut direct = Vec::new();
            if strict_row_minima(&cost, n, &mut direct) {
                let mut h = Hungarian::default();
                prop_assert_eq!(&direct[..], h.solve(&cost, n));
            }
        }

        #[test]
        fn assignment_is_optimal(n in 1usize..7, seed in 0u64..100_000) {
            let cost: Vec<Vec<f64>> =
                (0..n).map(|i| (0..n).map(|j| ((i as u64 * 7 + j as u64 * 13 + seed * (j as u64 + 1)) % 5) as f64).collect()).collect();
            let a = min_cost_assignment(&cost);
            // A permutation of the columns.
            let mut seen = a.clone();
            seen.sort_unstable();
            prop_assert_eq!(seen, (0..n).collect::<Vec<_>>());
            // As cheap as the best of all permutations (brute force).
            let total = |p: &[usize]| p.iter().enumerate().map(|(i, &j)| cost[i][j]).sum::<f64>();
            let mut perm: Vec<usize> = (0..n).collect();
            let mut best = f64::INFINITY;
            loop {
                best = best.min(total(&perm));
                // Next permutation in lexicographic order.
                let Some(i) = (0..n.saturating_sub(1)).rev().find(|&i| perm[i] < perm[i + 1]) else { break };
                let j = (i + 1..n).rev().find(|&j| perm[j] > perm[i]).expect("a larger element");
                perm.swap(i, j);
                perm[i + 1..].reverse();
            }
            prop_assert_eq!(total(&a), best);
            // Reusing the scratch of an earlier, larger solve gives the same answer.
            let mut h = Hungarian::default();
            let big: Vec<f64> = (0..(n + 2) * (n + 2)).map(|k| (k % 7) as f64).collect();
            h.solve(&big, n + 2);
            let flat: Vec<f64> = cost.iter().flatten().copied().collect();
            prop_assert_eq!(h.solve(&flat, n).to_vec(), a);
        }
    }
}
