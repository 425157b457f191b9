//! One MoE layer priced from a load kept as running sums ([`SummedLoad`]): the same model as
//! [`super::moe::moe_layer_exact`], with its all-to-all tallies taken from per-node sums instead of the
//! source-rank x GPU traffic matrix.
//!
//! Why: the online policy prices three placements per layer per decision under one predicted load. The exact
//! form builds the ranks x GPUs traffic matrix for each (every slot's share of every rank's tokens), which is
//! most of a decision's time at 64 GPUs. Every tally of the all-to-all is a sum the per-node sums give directly:
//! what GPU `d` receives from node `n` is `sum over d's slots of share x node_load[n][expert]`, what it receives
//! from itself is a lookup of its own row, what rank `s` sends inside its node is its row against the experts on
//! its node, and which pairs exchange anything at all (the latency term) follows from bitsets of the ranks that
//! route to each expert. The results equal the exact model's up to the order of floating-point additions
//! (tested: relative 1e-9).

use super::fabric::Fabric;
use super::moe::{
    A2aLinks, A2aScratch, MoeLayerShape, MoeLayerTime, SyncScratch, check_shapes, gpu_compute_s, layer_time,
    replica_sync_of, slot_shares,
};
use crate::cluster::ModelConstants;
use crate::placement::Placement;
use crate::workload::LoadMatrix;

/// A load matrix (source ranks x experts) held with its row, column and per-node sums and, for each expert, the
/// set of ranks that route to it, all updated in place as matrices are added ([`SummedLoad::add`]) or the whole
/// is scaled ([`SummedLoad::scale`]): a window sum or an exponential average kept at sampling time, ready to
/// price. Ranks are grouped into nodes of `gpus_per_node` consecutive ranks.
#[derive(Debug, Clone, PartialEq)]
pub struct SummedLoad {
    ranks: usize,
    experts: usize,
    gpus_per_node: usize,
    nodes: usize,
    /// The entries, rank-major.
    values: Vec<f64>,
    /// Sum of each column (per expert).
    col: Vec<f64>,
    /// Sum of each row (per source rank).
    row: Vec<f64>,
    /// Sum over each node's ranks, per expert (nodes x experts, row-major).
    node_col: Vec<f64>,
    /// 64-bit words per rank set.
    words: usize,
    /// For each expert, the ranks whose entry is positive (experts x words).
    routes: Vec<u64>,
}

impl SummedLoad {
    /// All zeros, for `ranks` source ranks (grouped into nodes of `gpus_per_node`) and `experts` experts.
    pub fn zeros(ranks: usize, experts: usize, gpus_per_node: usize) -> SummedLoad {
        let gpn = gpus_per_node.clamp(1, ranks.max(1));
        let nodes = ranks.div_ceil(gpn);
        let words = ranks.div_ceil(64).max(1);
        SummedLoad {
            ranks,
            experts,
            gpus_per_node: gpn,
            nodes,
            values: vec![0.0; ranks * experts],
            col: vec![0.0; experts],
            row: vec![0.0; ranks],
            node_col: vec![0.0; nodes * experts],
            words,
            routes: vec![0; experts * words],
        }
    }

    /// `m` itself.
    pub fn from_matrix(m: &LoadMatrix, gpus_per_node: usize) -> SummedLoad {
        let mut s = SummedLoad::zeros(m.ranks, m.experts, gpus_per_node);
        s.add(m, 1.0).expect("the shapes agree by construction");
        s
    }

    /// Adds `weight` times `m` (weight -1 takes a matrix added before back out: whole counts below 2^53 cancel
    /// exactly). Errors when `m`'s shape differs or its data does not fill it.
    pub fn add(&mut self, m: &LoadMatrix, weight: f64) -> Result<(), String> {
        self.check(m)?;
        self.accumulate(m, None, weight);
        Ok(())
    }

    /// Adds `new` and takes `old` out in one pass: the same sums as `add(new, 1)` then `add(old, -1)` for whole
    /// counts below 2^52 (a full window's step: the observation entering and the one leaving), at the cost of
    /// one. Errors when either shape differs or its data does not fill it.
    pub fn replace(&mut self, new: &LoadMatrix, old: &LoadMatrix) -> Result<(), String> {
        self.check(new)?;
        self.check(old)?;
        self.accumulate(new, Some(old), 1.0);
        Ok(())
    }

    fn check(&self, m: &LoadMatrix) -> Result<(), String> {
        if m.ranks != self.ranks || m.experts != self.experts || m.counts.len() != m.ranks * m.experts {
            return Err(format!(
                "a {}x{} load matrix ({} counts) cannot be added to a {}x{} sum",
                m.ranks,
                m.experts,
                m.counts.len(),
                self.ranks,
                self.experts
            ));
        }
        Ok(())
    }

    /// Adds `weight x (m - minus)` (`minus` absent: zero); shapes already checked.
    fn accumulate(&mut self, m: &LoadMatrix, minus: Option<&LoadMatrix>, weight: f64) {
        let e = self.experts;
        for s in 0..self.ranks {
            let n = s / self.gpus_per_node;
            let counts = &m.counts[s * e..(s + 1) * e];
            let less = minus.map(|o| &o.counts[s * e..(s + 1) * e]);
            // Counts below 2^52 convert to floats in vector registers (see `small_to_f64`) and their differences
            // are exact, and a row of fewer than 4096 of them sums exactly in 64-bit integers.
            let below = |c: &[u64]| c.iter().fold(0u64, |a, &c| a | c) >> 52 == 0;
            let small = below(counts) && less.is_none_or(below);
            let sum = |c: &[u64]| {
                if small && e < 4096 {
                    c.iter().copied().fold(0u64, u64::wrapping_add) as f64
                } else {
                    c.iter().map(|&c| c as f64).sum()
                }
            };
            let row = match less {
                Some(l) => weight * (sum(counts) - sum(l)),
                None => weight * sum(counts),
            };
            let vals = &mut self.values[s * e..(s + 1) * e];
            let node = &mut self.node_col[n * e..(n + 1) * e];
            // (The conversion is chosen outside the loop, so that each loop is straight-line code.)
            let col = &mut self.col;
            let changed = match (less, small) {
                (None, true) => add_row(vals, node, col, counts.iter().map(|&c| weight * small_to_f64(c))),
                (None, false) => add_row(vals, node, col, counts.iter().map(|&c| weight * c as f64)),
                (Some(l), true) => add_row(
                    vals,
                    node,
                    col,
                    counts.iter().zip(l).map(|(&c, &o)| weight * (small_to_f64(c) - small_to_f64(o))),
                ),
                (Some(l), false) => {
                    add_row(vals, node, col, counts.iter().zip(l).map(|(&c, &o)| weight * (c as f64 - o as f64)))
                }
            };
            self.row[s] += row;
            if changed > 0 {
                self.refresh_routes(s);
            }
        }
    }

    /// Multiplies every entry and sum by `factor` (an exponential average's decay).
    pub fn scale(&mut self, factor: f64) {
        for v in [&mut self.values, &mut self.col, &mut self.row, &mut self.node_col] {
            for x in v.iter_mut() {
                *x *= factor;
            }
        }
        // Entries that underflowed to zero (or changed sign) route no more, or now do.
        for s in 0..self.ranks {
            self.refresh_routes(s);
        }
    }

    /// Rank `s`'s bit in every expert's route set: set where its entry is positive.
    fn refresh_routes(&mut self, s: usize) {
        let (word, bit) = (s / 64, 1u64 << (s % 64));
        for (x, &v) in self.values[s * self.experts..(s + 1) * self.experts].iter().enumerate() {
            let r = &mut self.routes[x * self.words + word];
            *r = if v > 0.0 { *r | bit } else { *r & !bit };
        }
    }

    /// Source ranks.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// Experts.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Ranks per node, as the per-node sums group them.
    pub fn gpus_per_node(&self) -> usize {
        self.gpus_per_node
    }

    /// Nodes of the per-node sums.
    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// Entry of rank `s` and expert `x`.
    pub fn get(&self, s: usize, x: usize) -> f64 {
        self.values[s * self.experts + x]
    }

    /// The entries, rank-major.
    pub fn values(&self) -> &[f64] {
        &self.values
    }

    /// Sum of each expert's column.
    pub fn expert_loads(&self) -> &[f64] {
        &self.col
    }

    /// Sum of each rank's row.
    pub fn rank_loads(&self) -> &[f64] {
        &self.row
    }

    /// Sum over each node's ranks, per expert (nodes x experts, row-major).
    pub fn node_loads(&self) -> &[f64] {
        &self.node_col
    }

    /// The entries times `scale`, one vector per rank.
    pub fn rows(&self, scale: f64) -> Vec<Vec<f64>> {
        let e = self.experts;
        (0..self.ranks).map(|s| self.values[s * e..(s + 1) * e].iter().map(|v| v * scale).collect()).collect()
    }

    /// The entries as a load matrix of whole tokens after multiplying by `scale` (rounded, negatives as 0).
    pub fn to_matrix(&self, scale: f64) -> LoadMatrix {
        LoadMatrix {
            ranks: self.ranks,
            experts: self.experts,
            counts: self.values.iter().map(|v| (v * scale).round().max(0.0) as u64).collect(),
        }
    }
}

/// Adds `dv` to a row's entries and to its node's and the experts' sums in one pass without branches (adding a
/// zero changes nothing) or chains of dependent additions; returns how many entries changed sign (only then are
/// the rank's routes looked at again).
fn add_row(vals: &mut [f64], node: &mut [f64], col: &mut [f64], dv: impl Iterator<Item = f64>) -> u64 {
    let mut changed = 0u64;
    for (((v, nc), cs), d) in vals.iter_mut().zip(node.iter_mut()).zip(col.iter_mut()).zip(dv) {
        let before = *v > 0.0;
        *v += d;
        *nc += d;
        *cs += d;
        changed += (before != (*v > 0.0)) as u64;
    }
    changed
}

/// `x as f64` for `x` below 2^52 (`2^52 + x` is exact, and so is taking 2^52 away): integer and float operations
/// only, which vectorise.
#[inline]
fn small_to_f64(x: u64) -> f64 {
    const TWO_52: u64 = 0x4330_0000_0000_0000;
    f64::from_bits(x | TWO_52) - f64::from_bits(TWO_52)
}

/// Buffers of [`moe_layer_summed`], reused between calls on one thread.
#[derive(Default)]
struct SummedScratch {
    cnt: Vec<u32>,
    share: Vec<f64>,
    /// Tokens GPU `d` receives from node `n`: `from_node[n * gpus + d]`.
    from_node: Vec<f64>,
    /// Tokens GPU `d` receives in all, and from its own rank.
    all_in: Vec<f64>,
    own_in: Vec<f64>,
    /// Tokens each rank sends to the GPUs of its own node (itself included).
    in_node: Vec<f64>,
    /// Per-node sums when the load's nodes are not the group's.
    node_col: Vec<f64>,
    /// Each node's summed shares of each expert (nodes x experts); all zero between calls.
    node_share: Vec<f64>,
    /// For each GPU, the ranks that send it anything (gpus x words).
    senders: Vec<u64>,
    node_mask: Vec<u64>,
    peers_intra: Vec<u32>,
    peers_inter: Vec<u32>,
    sync: SyncScratch,
    a2a: A2aScratch,
}

thread_local! {
    static SUMMED_SCRATCH: std::cell::RefCell<SummedScratch> = std::cell::RefCell::new(SummedScratch::default());
}

/// [`super::moe::moe_layer_exact`] of the load `scale` x `load` (the load's rows are the group's GPUs, which
/// are the placement's), from its sums. Equal to the exact model up to the order of additions. Errors when the
/// shapes disagree or `scale` is not a positive finite number.
#[allow(clippy::too_many_arguments)]
pub fn moe_layer_summed(
    shape: &MoeLayerShape,
    load: &SummedLoad,
    scale: f64,
    placement: &Placement,
    gpus: &[u32],
    fabric: &Fabric,
    c: &ModelConstants,
    hierarchical: bool,
) -> Result<MoeLayerTime, String> {
    check_shapes(load.ranks, load.experts, placement, gpus)?;
    if !(scale > 0.0 && scale.is_finite()) {
        return Err(format!("the load's scale is {scale}; it must be a positive finite number"));
    }
    SUMMED_SCRATCH.with_borrow_mut(|w| price_summed(shape, load, scale, placement, gpus, fabric, c, hierarchical, w))
}

/// `sum_i a[i] * b[i]` (up to the shorter length) in four independent partial sums, lane `k` taking the
/// indices `i = k mod 4` in order, added as `(t0 + t1) + (t2 + t3)`: the additions are not one chain of
/// dependent latencies. With AVX2 the four lanes run as one vector; the bits are the same (no fused
/// multiply-add either way).
fn dot4(a: &[f64], b: &[f64]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        fn avx2(a: &[f64], b: &[f64]) -> f64 {
            dot4_portable(a, b)
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { avx2(a, b) };
        }
    }
    dot4_portable(a, b)
}

/// [`dot4`] for any CPU.
#[inline(always)]
fn dot4_portable(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut t = [0.0f64; 4];
    let (ac, bc) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (a4, b4) in ac.zip(bc) {
        for (tk, (x, y)) in t.iter_mut().zip(a4.iter().zip(b4)) {
            *tk += x * y;
        }
    }
    for (tk, (x, y)) in t.iter_mut().zip(ar.iter().zip(br)) {
        *tk += x * y;
    }
    (t[0] + t[1]) + (t[2] + t[3])
}

// Indices run over several arrays of GPUs, ranks and slots at once.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn price_summed(
    shape: &MoeLayerShape,
    load: &SummedLoad,
    scale: f64,
    placement: &Placement,
    gpus: &[u32],
    fabric: &Fabric,
    c: &ModelConstants,
    hierarchical: bool,
    w: &mut SummedScratch,
) -> Result<MoeLayerTime, String> {
    let e = placement.experts;
    let ng = placement.gpus;
    let spg = placement.slots_per_gpu.max(1);
    slot_shares(placement, &mut w.cnt, &mut w.share);
    let share = &w.share;
    let (gpu_time, gpu_tokens) =
        gpu_compute_s(shape, fabric, c, placement, share, |x| load.col[x] * scale, load.row.iter().map(|r| r * scale));

    // The all-to-all, from the sums. Tallies are in entry units, turned into bytes at the end.
    let links = A2aLinks::new(gpus, fabric);
    let nix = &links.nix;
    let nn = links.nodes;
    let node_col: &[f64] = if nn == load.nodes && (0..ng).all(|s| nix[s] == s / load.gpus_per_node) {
        &load.node_col
    } else {
        w.node_col.clear();
        w.node_col.resize(nn * e, 0.0);
        for s in 0..ng {
            let n = nix[s];
            for (a, &v) in w.node_col[n * e..(n + 1) * e].iter_mut().zip(&load.values[s * e..(s + 1) * e]) {
                *a += v;
            }
        }
        &w.node_col
    };
    // Every entry of these is written below (no need to zero them).
    w.from_node.resize(nn * ng, 0.0);
    w.all_in.resize(ng, 0.0);
    w.own_in.resize(ng, 0.0);
    // Each node's share of each expert (nodes x experts): what fraction of an expert's tokens its slots there take.
    // All zero between calls: only the entries of the placement's slots are set, and set back to zero after use.
    if w.node_share.len() != nn * e {
        w.node_share.clear();
        w.node_share.resize(nn * e, 0.0);
    }
    for d in 0..ng {
        let mut all = 0.0;
        for j in d * spg..(d + 1) * spg {
            let (x, f) = (placement.slots[j] as usize, share[j]);
            all += f * load.col[x];
            w.node_share[nix[d] * e + x] += f;
        }
        w.all_in[d] = all;
    }
    // What each GPU d receives from each node n, summed from zero over d's slots in order: node by node, so that
    // the lookups stay in one node's row of sums.
    for (n, from) in w.from_node.chunks_exact_mut(ng).enumerate() {
        let nc = &node_col[n * e..(n + 1) * e];
        for (d, v) in from.iter_mut().enumerate() {
            let mut a = 0.0;
            for j in d * spg..(d + 1) * spg {
                a += share[j] * nc[placement.slots[j] as usize];
            }
            *v = a;
        }
    }
    // What each rank sends to its own node's GPUs (its row against its node's shares, one sequential pass over
    // the row rather than a lookup per slot: the rows stream from memory) and to itself (its own slots, the row
    // now in cache).
    w.in_node.resize(ng, 0.0);
    for s in 0..ng {
        let row = &load.values[s * e..(s + 1) * e];
        let fr = &w.node_share[nix[s] * e..(nix[s] + 1) * e];
        w.in_node[s] = dot4(row, fr);
        let mut own = 0.0;
        for j in s * spg..(s + 1) * spg {
            own += share[j] * row[placement.slots[j] as usize];
        }
        w.own_in[s] = own;
    }
    for d in 0..ng {
        for j in d * spg..(d + 1) * spg {
            w.node_share[nix[d] * e + placement.slots[j] as usize] = 0.0;
        }
    }
    let bytes = shape.d_model as f64 * shape.act_bytes as f64 * scale;
    let t = &mut w.a2a;
    t.reset(ng, nn);
    for g in 0..ng {
        let n = nix[g];
        let from_own_node = w.from_node[n * ng + g];
        // Within the node, less the rank's own tokens; hierarchical routes the rest through the node too.
        let (send, recv) = if hierarchical {
            (load.row[g] - w.own_in[g], w.all_in[g] - w.own_in[g])
        } else {
            (w.in_node[g] - w.own_in[g], from_own_node - w.own_in[g])
        };
        t.intra_send[g] = send.max(0.0) * bytes;
        t.intra_recv[g] = recv.max(0.0) * bytes;
        t.inter_recv[n] += (w.all_in[g] - from_own_node).max(0.0) * bytes;
        for m in 0..nn {
            if m != n {
                t.inter_send[m] += w.from_node[m * ng + g] * bytes;
            }
        }
    }
    // Who exchanges anything with whom: rank s sends GPU d tokens when one of d's slots with a positive share
    // holds an expert s routes to.
    let words = load.words;
    w.senders.clear();
    w.senders.resize(ng * words, 0);
    for d in 0..ng {
        for j in d * spg..(d + 1) * spg {
            if share[j] > 0.0 {
                let x = placement.slots[j] as usize;
                for (a, &b) in
                    w.senders[d * words..(d + 1) * words].iter_mut().zip(&load.routes[x * words..(x + 1) * words])
                {
                    *a |= b;
                }
            }
        }
    }
    w.node_mask.clear();
    w.node_mask.resize(nn * words, 0);
    for (s, &n) in nix.iter().enumerate() {
        w.node_mask[n * words + s / 64] |= 1 << (s % 64);
    }
    // Dispatch: each rank's receivers (counted per sender); combine: each GPU's senders, now its receivers.
    // Every sender starts with every other GPU as a peer; the pairs that exchange nothing are taken away (few
    // for dense loads: only the missing bits are visited).
    let mut node_size = vec![0u32; nn];
    for &n in nix.iter() {
        node_size[n] += 1;
    }
    w.peers_intra.clear();
    w.peers_intra.extend(nix.iter().map(|&n| node_size[n] - 1));
    w.peers_inter.clear();
    w.peers_inter.extend(nix.iter().map(|&n| ng as u32 - node_size[n]));
    let (mut combine_intra, mut combine_inter) = (0usize, 0usize);
    for d in 0..ng {
        let n = nix[d];
        let (mut ci, mut ce) = (0usize, 0usize);
        for k in 0..words {
            let base = k * 64;
            let lanes = (ng - base).min(64);
            let valid = if lanes == 64 { u64::MAX } else { (1u64 << lanes) - 1 };
            let own_bit = if d / 64 == k { 1u64 << (d % 64) } else { 0 };
            let from = w.senders[d * words + k];
            let mask = w.node_mask[n * words + k];
            ci += (from & mask & !own_bit).count_ones() as usize;
            ce += (from & !mask).count_ones() as usize;
            let mut missing = !from & valid & !own_bit;
            while missing != 0 {
                let s = base + missing.trailing_zeros() as usize;
                missing &= missing - 1;
                if nix[s] == n {
                    w.peers_intra[s] -= 1;
                } else {
                    w.peers_inter[s] -= 1;
                }
            }
        }
        combine_intra = combine_intra.max(ci);
        combine_inter = combine_inter.max(ce);
    }
    let dispatch_peers = (
        w.peers_intra.iter().copied().max().unwrap_or(0) as usize,
        w.peers_inter.iter().copied().max().unwrap_or(0) as usize,
    );
    let (dispatch, combine) = if ng <= 1 {
        (0.0, 0.0)
    } else {
        (
            links.finish(&w.a2a, dispatch_peers, fabric, hierarchical),
            links.finish(&w.a2a, (combine_intra, combine_inter), fabric, hierarchical),
        )
    };
    let a2a_s = 2.0 * (dispatch + combine);
    let grad_bytes = shape.expert_params() * shape.grad_bytes as f64;
    let sync_s = replica_sync_of(placement, &w.cnt, gpus, grad_bytes, fabric, &mut w.sync);
    Ok(layer_time(gpu_time, gpu_tokens, a2a_s, sync_s, c))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::moe::moe_layer_exact;
    use super::super::test_fixtures::{self as fixtures, Shares, rng, shape};
    use super::*;

    /// The dispatched dot product gives the portable loop's bits (lanes in order, no fused multiply-add) and
    /// the sum within rounding, for every remainder length.
    #[test]
    fn dot4_is_the_portable_sum_bit_for_bit() {
        let mut r = rng(11);
        for n in 0..40 {
            let a: Vec<f64> = (0..n).map(|_| r(1_000_000) as f64 / 997.0).collect();
            let b: Vec<f64> = (0..n + 3).map(|_| r(1_000_000) as f64 / 1e6).collect();
            let got = dot4(&a, &b);
            assert_eq!(got.to_bits(), dot4_portable(&a, &b).to_bits(), "n {n}");
            let naive: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((got - naive).abs() <= 1e-12 * naive.abs().max(1.0), "n {n}: {got} vs {naive}");
        }
    }

    /// Every expert once, the rest at random (repeats on one GPU allowed), optionally with random shares, some
    /// of them zero.
    fn placement(gpus: usize, slots: usize, experts: usize, seed: u64, shares: bool) -> Placement {
        fixtures::placement(gpus, slots, experts, seed, if shares { Shares::SomeZero } else { Shares::Even })
    }

    /// Sparse counts: about a third of the entries zero, so that the latency term's peer counts vary.
    fn load(ranks: usize, experts: usize, seed: u64) -> LoadMatrix {
        let mut next = rng(seed ^ 0xABCD);
        let counts = (0..ranks * experts).map(|_| if next(3) == 0 { 0 } else { next(5000) as u64 }).collect();
        LoadMatrix { ranks, experts, counts }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * a.abs().max(b.abs()) || (a - b).abs() < 1e-300
    }

    fn assert_close(a: &MoeLayerTime, b: &MoeLayerTime) {
        for (x, y, what) in [
            (a.compute_ms, b.compute_ms, "compute"),
            (a.all_to_all_ms, b.all_to_all_ms, "all-to-all"),
            (a.replica_sync_ms, b.replica_sync_ms, "sync"),
            (a.overhead_ms, b.overhead_ms, "overhead"),
            (a.total_ms, b.total_ms, "total"),
            (a.imbalance, b.imbalance, "imbalance"),
        ] {
            assert!(close(x, y), "{what}: summed {x} exact {y}");
        }
        for (x, y) in a.gpu_compute_ms.iter().zip(&b.gpu_compute_ms).chain(a.gpu_tokens.iter().zip(&b.gpu_tokens)) {
            assert!(close(*x, *y), "per GPU: summed {x} exact {y}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn summed_pricing_equals_exact(
            gpn in 1u32..9,
            nodes in 1u32..5,
            extra in 0usize..3,
            experts_per_gpu in 1usize..4,
            seed in 0u64..1_000_000,
            shares in any::<bool>(),
            hierarchical in any::<bool>(),
            latency in any::<bool>(),
        ) {
            let gpus = (gpn * nodes) as usize;
            let experts = gpus * experts_per_gpu;
            let slots = experts_per_gpu + extra;
            let lat = if latency { 1e-5 } else { 0.0 };
            let fabric = Fabric::switched(gpn, nodes, 3e11, lat, 5e10, lat * 3.0, 2e12, 1e-5);
            let c = ModelConstants::default();
            let p = placement(gpus, slots, experts, seed, shares);
            let m = load(gpus, experts, seed);
            let ids: Vec<u32> = (0..gpus as u32).collect();
            let exact = moe_layer_exact(&shape(), &m, &p, &ids, &fabric, &c, hierarchical).unwrap();
            let s = SummedLoad::from_matrix(&m, gpn as usize);
            let summed = moe_layer_summed(&shape(), &s, 1.0, &p, &ids, &fabric, &c, hierarchical).unwrap();
            assert_close(&summed, &exact);
            // Nodes grouped differently from the fabric's: the sums are regrouped, same result.
            let other = SummedLoad::from_matrix(&m, (gpn as usize % 3) + 1);
            let regrouped = moe_layer_summed(&shape(), &other, 1.0, &p, &ids, &fabric, &c, hierarchical).unwrap();
            assert_close(&regrouped, &exact);
        }

        #[test]
        fn window_sums_are_exact(ranks in 1usize..70, experts in 1usize..20, seed in 0u64..100_000, n in 1usize..6) {
            let ms: Vec<LoadMatrix> = (0..n as u64).map(|k| load(ranks, experts, seed + k)).collect();
            let mut s = SummedLoad::zeros(ranks, experts, 4);
            for m in &ms {
                s.add(m, 1.0).unwrap();
            }
            // Take all but the last back out: exactly the last one remains, routes included.
            for m in &ms[..n - 1] {
                s.add(m, -1.0).unwrap();
            }
            prop_assert_eq!(&s, &SummedLoad::from_matrix(&ms[n - 1], 4));
            // A window's step in one pass (the newest in, the oldest out) leaves the same sums as two.
            let mut one = SummedLoad::zeros(ranks, experts, 4);
            let mut two = one.clone();
            for m in &ms[..n - 1] {
                one.add(m, 1.0).unwrap();
                two.add(m, 1.0).unwrap();
            }
            one.replace(&ms[n - 1], &ms[0]).unwrap();
            two.add(&ms[n - 1], 1.0).unwrap();
            two.add(&ms[0], -1.0).unwrap();
            prop_assert_eq!(&one, &two);
        }
    }

    #[test]
    fn scaled_load_is_priced_as_the_scaled_matrix() {
        let fabric = Fabric::switched(4, 2, 3e11, 1e-5, 5e10, 3e-5, 2e12, 1e-5);
        let c = ModelConstants::default();
        let p = placement(8, 3, 16, 7, true);
        // Even counts: half of each is whole.
        let mut m = load(8, 16, 3);
        for v in m.counts.iter_mut() {
            *v *= 2;
        }
        let ids: Vec<u32> = (0..8).collect();
        let half = LoadMatrix { ranks: 8, experts: 16, counts: m.counts.iter().map(|v| v / 2).collect() };
        let exact = moe_layer_exact(&shape(), &half, &p, &ids, &fabric, &c, false).unwrap();
        let s = SummedLoad::from_matrix(&m, 4);
        assert_close(&moe_layer_summed(&shape(), &s, 0.5, &p, &ids, &fabric, &c, false).unwrap(), &exact);
        assert_eq!(s.to_matrix(0.5), half);
    }

    #[test]
    fn bad_shapes_and_scales_are_errors() {
        let fabric = Fabric::switched(4, 2, 3e11, 1e-5, 5e10, 3e-5, 2e12, 1e-5);
        let c = ModelConstants::default();
        let p = placement(8, 3, 16, 7, false);
        let ids: Vec<u32> = (0..8).collect();
        let s = SummedLoad::from_matrix(&load(8, 16, 1), 4);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(moe_layer_summed(&shape(), &s, bad, &p, &ids, &fabric, &c, false).is_err());
        }
        let wrong = SummedLoad::from_matrix(&load(8, 15, 1), 4);
        assert!(moe_layer_summed(&shape(), &wrong, 1.0, &p, &ids, &fabric, &c, false).is_err());
        let mut z = SummedLoad::zeros(8, 16, 4);
        assert!(z.add(&load(7, 16, 1), 1.0).is_err());
        assert!(z.add(&LoadMatrix { ranks: 8, experts: 16, counts: vec![1; 3] }, 1.0).is_err());
    }
}
