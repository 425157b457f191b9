//! One MoE layer under a measured load matrix and a placement: compute as the maximum over GPUs, all-to-all
//! dispatch and combine from the source-rank x expert matrix, and gradient synchronisation of replicas.
//! Also the expert-fetch (Janus, data-centric) alternative.

use serde::Serialize;

use super::compute::{DeviceRates, elementwise_time_s, ffn_time_s};
use super::fabric::Fabric;
use crate::cluster::ModelConstants;
use crate::placement::Placement;
use crate::workload::LoadMatrix;

/// Sizes of one MoE layer's experts and the hardware numbers its terms need.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MoeLayerShape {
    /// Model width.
    pub d_model: u64,
    /// Expert FFN hidden width.
    pub d_ffn: u64,
    /// SwiGLU experts.
    pub gated: bool,
    /// Bytes of one activation element on the wire and in memory.
    pub act_bytes: u64,
    /// Bytes of one expert weight element (for replica gradient reduction and expert fetch).
    pub param_bytes: u64,
    /// Bytes of one expert gradient element as reduced.
    pub grad_bytes: u64,
    /// GPU peak FLOP/s for the training dtype.
    pub peak_flops: f64,
}

impl MoeLayerShape {
    /// Weights of one expert (no biases counted for gated experts; Linear biases for the GELU form).
    pub fn expert_params(&self) -> f64 {
        let mats = if self.gated { 3.0 } else { 2.0 };
        let bias = if self.gated { 0.0 } else { (self.d_ffn + self.d_model) as f64 };
        mats * self.d_model as f64 * self.d_ffn as f64 + bias
    }
}

/// The modelled time of one MoE layer (forward + backward), with the terms that make it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MoeLayerTime {
    /// Expert compute of the busiest GPU, forward + backward.
    pub compute_ms: f64,
    /// Dispatch + combine all-to-all, forward and backward (4 exchanges).
    pub all_to_all_ms: f64,
    /// Gradient all-reduce among the replicas of replicated experts (the slowest GPU's share).
    pub replica_sync_ms: f64,
    /// Fixed per-pass cost of the layer (gate, count exchange, launches), forward + backward.
    pub overhead_ms: f64,
    /// Sum of the terms.
    pub total_ms: f64,
    /// Index (within the group) of the busiest GPU.
    pub busiest_gpu: usize,
    /// Tokens each GPU's slots process.
    pub gpu_tokens: Vec<f64>,
    /// Compute time of each GPU (forward + backward), ms.
    pub gpu_compute_ms: Vec<f64>,
    /// Busiest GPU's tokens over the mean.
    pub imbalance: f64,
}

/// Tokens from source rank `s` to each GPU when every expert's tokens are split over its replicas (evenly, or by
/// the placement's shares).
pub fn traffic_tokens(load: &LoadMatrix, placement: &Placement) -> Vec<Vec<f64>> {
    let cnt = placement.replica_counts();
    let mut t = vec![vec![0.0; placement.gpus]; load.ranks];
    for (slot, &e) in placement.slots.iter().enumerate() {
        let g = placement.gpu_of_slot(slot);
        let share = placement.share(slot, &cnt);
        for (s, row) in t.iter_mut().enumerate() {
            row[g] += load.get(s, e as usize) as f64 * share;
        }
    }
    t
}

/// What [`moe_layer_exact`] derives from the load matrix alone (per-expert loads, each source rank's tokens, the
/// counts as floats), computed once so that several placements can be priced under one load
/// ([`moe_layer_exact_prepared`]) with exactly the results of [`moe_layer_exact`].
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedLoad {
    ranks: usize,
    experts: usize,
    /// Tokens routed to each expert (the column sums).
    loads: Vec<f64>,
    /// Tokens each source rank routes (the row sums).
    own: Vec<f64>,
    /// The counts, expert-major: `by_expert[x * ranks + s]` is what rank `s` routes to expert `x`.
    by_expert: Vec<f64>,
}

impl PreparedLoad {
    /// Prepares `load` for pricing.
    pub fn new(load: &LoadMatrix) -> PreparedLoad {
        let loads = load.expert_loads().into_iter().map(|x| x as f64).collect();
        let (r, e) = (load.ranks, load.experts);
        // Eight columns at a time (one cache line of each row), each row's sum accumulating in column order as
        // a sum along the row does (from -0.0, as `Iterator::sum` starts).
        let mut own = vec![-0.0; r];
        let mut by_expert = vec![0.0; r * e];
        for x0 in (0..e).step_by(8) {
            let x1 = (x0 + 8).min(e);
            for (s, o) in own.iter_mut().enumerate() {
                let mut sum = *o;
                for (x, &c) in (x0..x1).zip(&load.counts[s * e + x0..s * e + x1]) {
                    let v = to_f64(c);
                    sum += v;
                    by_expert[x * r + s] = v;
                }
                *o = sum;
            }
        }
        PreparedLoad { ranks: r, experts: e, loads, own, by_expert }
    }

    /// A prepared load from its parts, for a caller that derives them in its own pass (a fractional load, as the
    /// policy's tests price their reference): `loads[x]` the column sums, `own[s]` the row sums and `by_expert[x * ranks
    /// + s]` the counts, all as floats. They must be what [`PreparedLoad::new`] computes for the same counts
    /// (for whole-number counts whose sums stay below 2^53, each sum is the integer sum converted once) for the
    /// pricing to equal [`moe_layer_exact`]'s. Panics when the lengths disagree with `ranks` and `experts`.
    pub fn from_parts(
        ranks: usize,
        experts: usize,
        loads: Vec<f64>,
        own: Vec<f64>,
        by_expert: Vec<f64>,
    ) -> PreparedLoad {
        assert!(
            loads.len() == experts && own.len() == ranks && by_expert.len() == ranks * experts,
            "prepared load parts of the wrong lengths"
        );
        PreparedLoad { ranks, experts, loads, own, by_expert }
    }

    /// Tokens routed to each expert.
    pub fn expert_loads(&self) -> &[f64] {
        &self.loads
    }

    /// Source ranks.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// Experts.
    pub fn experts(&self) -> usize {
        self.experts
    }
}

/// `x as f64` (through the signed conversion, one instruction, where it is the same value).
#[inline]
fn to_f64(x: u64) -> f64 {
    if x <= i64::MAX as u64 { x as i64 as f64 } else { x as f64 }
}

/// Models one MoE layer, forward and backward, for the load of one iteration (or micro-batch) `load` (rows:
/// source GPUs of the expert-parallel group, which are also the placement's GPUs), the placement, and where the
/// group's GPUs sit (`gpus[i]` is the global index of group GPU `i`). Errors when the shapes disagree.
pub fn moe_layer_exact(
    shape: &MoeLayerShape,
    load: &LoadMatrix,
    placement: &Placement,
    gpus: &[u32],
    fabric: &Fabric,
    c: &ModelConstants,
    hierarchical: bool,
) -> Result<MoeLayerTime, String> {
    // The prepared form checks the shapes against the placement.
    moe_layer_exact_prepared(shape, &PreparedLoad::new(load), placement, gpus, fabric, c, hierarchical)
}

/// [`moe_layer_exact`] for a load prepared once ([`PreparedLoad`]): the same result, bit for bit.
pub fn moe_layer_exact_prepared(
    shape: &MoeLayerShape,
    load: &PreparedLoad,
    placement: &Placement,
    gpus: &[u32],
    fabric: &Fabric,
    c: &ModelConstants,
    hierarchical: bool,
) -> Result<MoeLayerTime, String> {
    check_shapes(load.ranks, load.experts, placement, gpus)?;
    PRICE_SCRATCH.with_borrow_mut(|w| price_with(shape, load, placement, gpus, fabric, c, hierarchical, w))
}

/// The load's source ranks must be the placement's GPUs and the group's, and its experts the placement's.
pub(super) fn check_shapes(ranks: usize, experts: usize, placement: &Placement, gpus: &[u32]) -> Result<(), String> {
    if ranks != placement.gpus || gpus.len() != placement.gpus {
        return Err(format!(
            "the load matrix has {} source ranks, the placement {} GPUs and the group {} GPUs; they must agree",
            ranks,
            placement.gpus,
            gpus.len()
        ));
    }
    if experts != placement.experts {
        return Err(format!("the load matrix has {} experts, the placement {}", experts, placement.experts));
    }
    Ok(())
}

/// Buffers [`moe_layer_exact_prepared`] reuses between calls on one thread.
#[derive(Default)]
struct PriceScratch {
    cnt: Vec<u32>,
    share: Vec<f64>,
    to_gpu: Vec<f64>,
    sync: SyncScratch,
    a2a: A2aScratch,
    a2a_t: A2aScratch,
}

thread_local! {
    static PRICE_SCRATCH: std::cell::RefCell<PriceScratch> = std::cell::RefCell::new(PriceScratch::default());
}

/// The body of [`moe_layer_exact_prepared`] (shapes checked) on reused buffers.
#[allow(clippy::too_many_arguments)]
fn price_with(
    shape: &MoeLayerShape,
    load: &PreparedLoad,
    placement: &Placement,
    gpus: &[u32],
    fabric: &Fabric,
    c: &ModelConstants,
    hierarchical: bool,
    w: &mut PriceScratch,
) -> Result<MoeLayerTime, String> {
    let d = shape.d_model as f64;
    let ng = placement.gpus;
    let spg = placement.slots_per_gpu.max(1);
    slot_shares(placement, &mut w.cnt, &mut w.share);
    let (cnt, share) = (&w.cnt, &w.share);
    let (gpu_time, gpu_tokens) =
        gpu_compute_s(shape, fabric, c, placement, share, |x| load.loads[x], load.own.iter().copied());
    // Dispatch bytes s -> g (each source's tokens to each GPU, as [`traffic_tokens`] counts them) and the
    // combine's reverse; backward repeats both.
    let ab = shape.act_bytes as f64;
    // Bytes each GPU receives from each source, GPU-major: `to_gpu[g * ranks + s]` (each source's tokens of the
    // GPU's slots, in slot order, as [`traffic_tokens`] sums them, then scaled); the sums over slots run along
    // the sources, all sources at once.
    let r = load.ranks;
    let to_gpu = &mut w.to_gpu;
    to_gpu.clear();
    to_gpu.resize(ng * r, 0.0);
    for ((out, xs), sh) in
        to_gpu.chunks_exact_mut(r.max(1)).zip(placement.slots.chunks_exact(spg)).zip(share.chunks_exact(spg))
    {
        for (&x, &f) in xs.iter().zip(sh) {
            let col = &load.by_expert[x as usize * r..(x as usize + 1) * r];
            for (o, &c) in out.iter_mut().zip(col) {
                *o += c * f;
            }
        }
        for o in out.iter_mut() {
            *o = *o * d * ab;
        }
    }
    // `to_gpu` is the dispatch matrix transposed: the combine's matrix.
    let (combine, dispatch) = all_to_all_both_ways_with(to_gpu, gpus, fabric, hierarchical, &mut w.a2a, &mut w.a2a_t);
    let a2a_s = 2.0 * (dispatch + combine);
    // Replica gradient sync: one ring all-reduce per replicated expert, all running together. Each holder
    // sends 2 (r-1)/r of the gradient over its link; a ring that spans k nodes crosses each of them once in and
    // once out, so each spanned node's NICs carry 2 (r-1)/r of the gradient per such expert.
    let grad_bytes = shape.expert_params() * shape.grad_bytes as f64;
    let sync_s = replica_sync_of(placement, cnt, gpus, grad_bytes, fabric, &mut w.sync);
    Ok(layer_time(gpu_time, gpu_tokens, a2a_s, sync_s, c))
}

/// Each expert's replica count (`cnt`) and the share of its expert's tokens each slot takes (`share`), into
/// reused buffers.
pub(super) fn slot_shares(placement: &Placement, cnt: &mut Vec<u32>, share: &mut Vec<f64>) {
    cnt.clear();
    cnt.resize(placement.experts, 0);
    for &x in &placement.slots {
        cnt[x as usize] += 1;
    }
    share.clear();
    share.extend((0..placement.slots.len()).map(|slot| placement.share(slot, cnt)));
}

/// The layer's time from its parts: per-GPU compute (s) and tokens, the all-to-all and replica sync times (s).
pub(super) fn layer_time(
    mut gpu_time: Vec<f64>,
    gpu_tokens: Vec<f64>,
    a2a_s: f64,
    sync_s: f64,
    c: &ModelConstants,
) -> MoeLayerTime {
    let (busiest_gpu, compute_s) =
        gpu_time.iter().copied().enumerate().fold((0, 0.0), |acc, (i, t)| if t > acc.1 { (i, t) } else { acc });
    let overhead_s = 2.0 * c.moe_layer_overhead_us * 1e-6;
    let mean = gpu_tokens.iter().sum::<f64>() / gpu_tokens.len().max(1) as f64;
    let imbalance = if mean > 0.0 { gpu_tokens.iter().copied().fold(0.0, f64::max) / mean } else { 1.0 };
    for t in gpu_time.iter_mut() {
        *t *= 1e3;
    }
    MoeLayerTime {
        compute_ms: compute_s * 1e3,
        all_to_all_ms: a2a_s * 1e3,
        replica_sync_ms: sync_s * 1e3,
        overhead_ms: overhead_s * 1e3,
        total_ms: (compute_s + a2a_s + sync_s + overhead_s) * 1e3,
        busiest_gpu,
        gpu_tokens,
        gpu_compute_ms: gpu_time,
        imbalance,
    }
}

/// Compute time (s, forward + backward) and tokens of each GPU: each slot runs its share (`share[slot]`) of its
/// expert's tokens (`expert_tokens(x)`), and each source GPU permutes its own routed tokens (`own`, one per
/// GPU, in order) locally (gather into per-expert buffers and scatter back: read + write, dispatch + combine,
/// forward + backward, memory-bound).
pub(super) fn gpu_compute_s(
    shape: &MoeLayerShape,
    fabric: &Fabric,
    c: &ModelConstants,
    placement: &Placement,
    share: &[f64],
    expert_tokens: impl Fn(usize) -> f64,
    own: impl Iterator<Item = f64>,
) -> (Vec<f64>, Vec<f64>) {
    let d = shape.d_model as f64;
    let ng = placement.gpus;
    let spg = placement.slots_per_gpu.max(1);
    // Compute per GPU: each slot runs its share of its expert's tokens.
    let mut gpu_time = vec![0.0; ng];
    let mut gpu_tokens = vec![0.0; ng];
    let rates = DeviceRates { peak_flops: shape.peak_flops, hbm_bytes_per_s: fabric.hbm_bytes_per_s };
    let fixed = 2.0 * c.per_expert_overhead_us * 1e-6;
    // (GPU by GPU, its slots in order: no division per slot.)
    for (g, (xs, shs)) in placement.slots.chunks_exact(spg).zip(share.chunks_exact(spg)).enumerate() {
        for (&e, &sh) in xs.iter().zip(shs) {
            let tokens = expert_tokens(e as usize) * sh;
            if tokens <= 0.0 {
                continue;
            }
            let (f, b) = ffn_time_s(tokens, d, shape.d_ffn as f64, shape.gated, shape.act_bytes as f64, rates, c);
            gpu_time[g] += f + b + fixed;
            gpu_tokens[g] += tokens;
        }
    }
    for (t, own) in gpu_time.iter_mut().zip(own) {
        *t += elementwise_time_s(own * d * shape.act_bytes as f64 * 8.0, fabric.hbm_bytes_per_s);
    }
    (gpu_time, gpu_tokens)
}

/// Buffers of [`replica_sync_of`], reused between calls on one thread.
#[derive(Default)]
pub(super) struct SyncScratch {
    starts: Vec<usize>,
    fill: Vec<usize>,
    members: Vec<u32>,
    sets: Vec<(usize, usize)>,
}

/// [`replica_sync_time_s`] of the replicated experts of `placement` (`cnt`: its replica counts; `gpus`: the global
/// index of each of its GPUs), each reducing `grad_bytes`, on reused buffers.
pub(super) fn replica_sync_of(
    placement: &Placement,
    cnt: &[u32],
    gpus: &[u32],
    grad_bytes: f64,
    fabric: &Fabric,
    w: &mut SyncScratch,
) -> f64 {
    let spg = placement.slots_per_gpu.max(1);
    let ns = placement.slots.len();
    // The distinct GPUs of each replicated expert, in increasing global index, one set after another.
    let starts = &mut w.starts;
    starts.clear();
    starts.resize(placement.experts + 1, 0);
    for x in 0..placement.experts {
        starts[x + 1] = starts[x] + cnt[x] as usize;
    }
    let fill = &mut w.fill;
    fill.clear();
    fill.extend_from_slice(starts);
    let members = &mut w.members;
    members.clear();
    members.resize(ns, 0);
    for (xs, &gpu) in placement.slots.chunks_exact(spg).zip(gpus) {
        for &x in xs {
            members[fill[x as usize]] = gpu;
            fill[x as usize] += 1;
        }
    }
    let sets = &mut w.sets;
    sets.clear();
    for x in 0..placement.experts {
        if cnt[x] > 1 {
            let m = &mut members[starts[x]..starts[x + 1]];
            m.sort_unstable();
            let mut k = 1;
            for i in 1..m.len() {
                if m[i] != m[k - 1] {
                    m[k] = m[i];
                    k += 1;
                }
            }
            sets.push((starts[x], starts[x] + k));
        }
    }
    let members = &*members;
    replica_sync_sets(sets.iter().map(|&(a, b)| &members[a..b]), grad_bytes, fabric)
}

/// [`super::comm::all_to_all_time_s`] of a square byte matrix (row-major, `bytes[s * g + d]` from `s` to `d`) and of its
/// transpose, without building either as nested vectors: each sum is taken in the order `all_to_all_time_s`
/// takes it, so the two times are those of `all_to_all_time_s(bytes)` and `all_to_all_time_s(transposed)`
/// exactly. The tallies are reused buffers.
fn all_to_all_both_ways_with(
    bytes: &[f64],
    gpus: &[u32],
    fabric: &Fabric,
    hierarchical: bool,
    scratch: &mut A2aScratch,
    scratch_t: &mut A2aScratch,
) -> (f64, f64) {
    let g = gpus.len();
    if g <= 1 {
        return (0.0, 0.0);
    }
    let links = A2aLinks::new(gpus, fabric);
    scratch.reset(g, links.nodes);
    scratch_t.reset(g, links.nodes);
    // Both directions in one sweep (two independent chains of additions), each in its own order.
    let peers = links.tally_both(bytes, hierarchical, scratch, scratch_t);
    let dispatch = links.finish(scratch, peers.0, fabric, hierarchical);
    let combine = links.finish(scratch_t, peers.1, fabric, hierarchical);
    (dispatch, combine)
}

/// [`super::comm::all_to_all_time_s`] of a sparse byte matrix: `entries` are `(source, destination, bytes)`
/// sorted by source then destination, one per pair (the matrix is zero elsewhere); the same time, bit for bit,
/// in time proportional to the entries rather than to the square of the GPUs.
pub fn all_to_all_sparse_time_s(
    entries: &[(usize, usize, f64)],
    gpus: &[u32],
    fabric: &Fabric,
    hierarchical: bool,
) -> f64 {
    let g = gpus.len();
    if g <= 1 {
        return 0.0;
    }
    let links = A2aLinks::new(gpus, fabric);
    let mut w = A2aScratch::new(g, links.nodes);
    let nix = &links.nix;
    let (mut max_peers_intra, mut max_peers_inter) = (0usize, 0usize);
    let mut i = 0;
    while i < entries.len() {
        let s = entries[i].0;
        let (mut pi, mut pe) = (0, 0);
        while i < entries.len() && entries[i].0 == s {
            let (_, d, b) = entries[i];
            i += 1;
            if s == d || b <= 0.0 {
                continue;
            }
            if nix[s] == nix[d] {
                w.intra_send[s] += b;
                w.intra_recv[d] += b;
                pi += 1;
            } else {
                w.inter_send[nix[s]] += b;
                w.inter_recv[nix[d]] += b;
                if hierarchical {
                    w.intra_send[s] += b;
                    w.intra_recv[d] += b;
                }
                pe += 1;
            }
        }
        max_peers_intra = max_peers_intra.max(pi);
        max_peers_inter = max_peers_inter.max(pe);
    }
    links.finish(&w, (max_peers_intra, max_peers_inter), fabric, hierarchical)
}

/// Where each GPU of an all-to-all sits and what its links carry ([`all_to_all_both_ways_with`]).
pub(super) struct A2aLinks {
    /// Node (an index into the group's distinct nodes) of each GPU of the group.
    pub(super) nix: Vec<usize>,
    intra_bw: Vec<f64>,
    inter_bw: Vec<f64>,
    k: f64,
    /// Distinct nodes of the group.
    pub(super) nodes: usize,
}

/// Bytes each GPU sends and receives within its node and each node sends and receives across nodes.
#[derive(Default)]
pub(super) struct A2aScratch {
    pub(super) intra_send: Vec<f64>,
    pub(super) intra_recv: Vec<f64>,
    pub(super) inter_send: Vec<f64>,
    pub(super) inter_recv: Vec<f64>,
}

impl A2aScratch {
    fn new(gpus: usize, nodes: usize) -> A2aScratch {
        A2aScratch {
            intra_send: vec![0.0; gpus],
            intra_recv: vec![0.0; gpus],
            inter_send: vec![0.0; nodes],
            inter_recv: vec![0.0; nodes],
        }
    }

    /// All tallies zero, for `gpus` GPUs on `nodes` nodes.
    pub(super) fn reset(&mut self, gpus: usize, nodes: usize) {
        for (v, n) in [
            (&mut self.intra_send, gpus),
            (&mut self.intra_recv, gpus),
            (&mut self.inter_send, nodes),
            (&mut self.inter_recv, nodes),
        ] {
            v.clear();
            v.resize(n, 0.0);
        }
    }
}

impl A2aLinks {
    /// The node of each GPU (an index into the sorted distinct nodes) and the link figures of each node.
    pub(super) fn new(gpus: &[u32], fabric: &Fabric) -> A2aLinks {
        let node_of: Vec<u32> = gpus.iter().map(|&x| fabric.node_of(x)).collect();
        let mut nodes = node_of.clone();
        nodes.sort_unstable();
        nodes.dedup();
        let nix: Vec<usize> = node_of.iter().map(|n| nodes.binary_search(n).unwrap_or(0)).collect();
        let mut gpus_on_node = vec![0u32; nodes.len()];
        for &n in &nix {
            gpus_on_node[n] += 1;
        }
        A2aLinks {
            nix,
            intra_bw: gpus_on_node.iter().map(|&m| fabric.intra_link(m).per_gpu_bytes_per_s).collect(),
            inter_bw: gpus_on_node.iter().map(|&m| fabric.node_inter_bytes_per_s(m)).collect(),
            k: gpus_on_node.iter().copied().max().unwrap_or(1) as f64,
            nodes: nodes.len(),
        }
    }

    /// The byte tallies of [`super::comm::all_to_all_time_s`] for the square matrix `bytes` (into `w`) and for its
    /// transpose (into `wt`), each sum in the order that function takes it; returns the largest numbers of
    /// intra- and inter-node peers of one sender, for each direction.
    fn tally_both(
        &self,
        bytes: &[f64],
        hierarchical: bool,
        w: &mut A2aScratch,
        wt: &mut A2aScratch,
    ) -> ((usize, usize), (usize, usize)) {
        if hierarchical { self.tally_both_as::<true>(bytes, w, wt) } else { self.tally_both_as::<false>(bytes, w, wt) }
    }

    fn tally_both_as<const HIERARCHICAL: bool>(
        &self,
        bytes: &[f64],
        w: &mut A2aScratch,
        wt: &mut A2aScratch,
    ) -> ((usize, usize), (usize, usize)) {
        let g = self.nix.len();
        let nix = &self.nix;
        // Runs of consecutive destinations on one node: within a run the node's running sums stay in registers.
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        for (d, &n) in nix.iter().enumerate() {
            match runs.last_mut() {
                Some(run) if run.2 == n => run.1 = d + 1,
                _ => runs.push((d, d + 1, n)),
            }
        }
        let positive = |b: f64| {
            #[allow(clippy::neg_cmp_op_on_partial_ord)]
            let p = !(b <= 0.0);
            p
        };
        let mut peers = (0usize, 0usize);
        let mut peers_t = (0usize, 0usize);
        for (s, row) in bytes.chunks_exact(g).enumerate() {
            let ns = nix[s];
            let (mut pi, mut pe, mut pi_t, mut pe_t) = (0, 0, 0, 0);
            // The sender's running sums (the same additions in the same order as one at a time).
            let (mut send, mut send_t) = (w.intra_send[s], wt.intra_send[s]);
            let (mut inter, mut inter_t) = (w.inter_send[ns], wt.inter_send[ns]);
            for &(d0, d1, nd) in &runs {
                if nd == ns {
                    for d in d0..d1 {
                        if d == s {
                            continue;
                        }
                        let (b, bt) = (row[d], bytes[d * g + s]);
                        // Adding +0 instead of a non-positive amount leaves every tally as it is (they start at
                        // +0 and only grow), so the sums need no branch.
                        let (pb, pbt) = (positive(b), positive(bt));
                        let (b, bt) = (if pb { b } else { 0.0 }, if pbt { bt } else { 0.0 });
                        send += b;
                        w.intra_recv[d] += b;
                        pi += pb as usize;
                        send_t += bt;
                        wt.intra_recv[d] += bt;
                        pi_t += pbt as usize;
                    }
                } else {
                    let (mut recv, mut recv_t) = (w.inter_recv[nd], wt.inter_recv[nd]);
                    for d in d0..d1 {
                        let (b, bt) = (row[d], bytes[d * g + s]);
                        let (pb, pbt) = (positive(b), positive(bt));
                        let (b, bt) = (if pb { b } else { 0.0 }, if pbt { bt } else { 0.0 });
                        inter += b;
                        recv += b;
                        inter_t += bt;
                        recv_t += bt;
                        if HIERARCHICAL {
                            send += b;
                            w.intra_recv[d] += b;
                            send_t += bt;
                            wt.intra_recv[d] += bt;
                        }
                        pe += pb as usize;
                        pe_t += pbt as usize;
                    }
                    w.inter_recv[nd] = recv;
                    wt.inter_recv[nd] = recv_t;
                }
            }
            w.intra_send[s] = send;
            wt.intra_send[s] = send_t;
            w.inter_send[ns] = inter;
            wt.inter_send[ns] = inter_t;
            peers = (peers.0.max(pi), peers.1.max(pe));
            peers_t = (peers_t.0.max(pi_t), peers_t.1.max(pe_t));
        }
        (peers, peers_t)
    }

    /// The time from the tallies, as [`super::comm::all_to_all_time_s`] takes it.
    pub(super) fn finish(
        &self,
        w: &A2aScratch,
        (max_peers_intra, max_peers_inter): (usize, usize),
        fabric: &Fabric,
        hierarchical: bool,
    ) -> f64 {
        let g = self.nix.len();
        let nix = &self.nix;
        let intra = (0..g).map(|i| w.intra_send[i].max(w.intra_recv[i]) / self.intra_bw[nix[i]]).fold(0.0, f64::max);
        let inter =
            (0..self.nodes).map(|n| w.inter_send[n].max(w.inter_recv[n]) / self.inter_bw[n]).fold(0.0, f64::max);
        let latency = if hierarchical {
            let remote_nodes = (self.nodes as f64 - 1.0).max(0.0);
            let lat_inter = if max_peers_inter > 0 { remote_nodes * fabric.inter_latency_s } else { 0.0 };
            (self.k - 1.0) * fabric.intra_latency_s * 2.0 + lat_inter
        } else {
            max_peers_intra as f64 * fabric.intra_latency_s + max_peers_inter as f64 * fabric.inter_latency_s
        };
        let phases = if hierarchical && self.nodes > 1 { 2.0 } else { 1.0 };
        if intra == 0.0 && inter == 0.0 {
            return 0.0;
        }
        if hierarchical && self.nodes > 1 {
            intra + inter + latency + phases * fabric.collective_launch_s
        } else {
            intra.max(inter) + latency + fabric.collective_launch_s
        }
    }
}

/// Time of the concurrent ring all-reduces that synchronise replicated experts: `sets[i]` are the GPUs (global
/// indices) holding expert i's replicas, each reducing `bytes` of gradient. The busiest GPU link and the busiest
/// node's NICs bound it; the ring's latency adds once per step of the longest ring.
pub fn replica_sync_time_s(sets: &[Vec<u32>], bytes: f64, fabric: &Fabric) -> f64 {
    if sets.is_empty() {
        return 0.0;
    }
    replica_sync_sets(sets.iter().map(|s| s.as_slice()), bytes, fabric)
}

/// [`replica_sync_time_s`] over any sequence of sets (per-GPU and per-node tallies in arrays indexed by GPU and
/// node rather than hash maps: the maxima do not depend on the order).
fn replica_sync_sets<'a>(sets: impl Iterator<Item = &'a [u32]> + Clone, bytes: f64, fabric: &Fabric) -> f64 {
    if bytes <= 0.0 {
        return 0.0;
    }
    let mut max_gpu = None::<u32>;
    let mut longest = 0usize;
    for set in sets.clone() {
        if set.len() < 2 {
            continue;
        }
        longest = longest.max(set.len());
        for &g in set {
            max_gpu = max_gpu.max(Some(g));
        }
    }
    let Some(max_gpu) = max_gpu.filter(|_| longest >= 2) else { return 0.0 };
    // Nodes number GPUs in blocks, so the last GPU's node is the last node.
    let (ng, nn) = (max_gpu as usize + 1, fabric.node_of(max_gpu) as usize + 1);
    let mut gpu_bytes: Vec<Option<f64>> = vec![None; ng];
    // The node of each GPU seen (u32::MAX: not seen), each computed once.
    let mut gpu_node = vec![u32::MAX; ng];
    let mut node_bytes: Vec<Option<f64>> = vec![None; nn];
    let mut node_gpus = vec![0u32; nn];
    let mut crosses = false;
    let mut nodes: Vec<u32> = Vec::new();
    for set in sets {
        let r = set.len();
        if r < 2 {
            continue;
        }
        let share = 2.0 * (r as f64 - 1.0) / r as f64 * bytes;
        nodes.clear();
        for &g in set {
            let b = &mut gpu_bytes[g as usize];
            if b.is_none() {
                let n = fabric.node_of(g);
                gpu_node[g as usize] = n;
                node_gpus[n as usize] += 1;
            }
            *b.get_or_insert(0.0) += share;
            nodes.push(gpu_node[g as usize]);
        }
        nodes.sort_unstable();
        nodes.dedup();
        if nodes.len() > 1 {
            crosses = true;
            for &n in &nodes {
                *node_bytes[n as usize].get_or_insert(0.0) += share;
            }
        }
    }
    let intra = gpu_bytes
        .iter()
        .zip(&gpu_node)
        .filter_map(|(b, &n)| b.map(|b| (n, b)))
        .map(|(n, b)| {
            let m = node_gpus[n as usize].max(1);
            b / fabric.intra_link(m).per_gpu_bytes_per_s
        })
        .fold(0.0, f64::max);
    let inter = node_bytes
        .iter()
        .enumerate()
        .filter_map(|(n, b)| b.map(|b| (n, b)))
        .map(|(n, b)| {
            let m = node_gpus[n].max(1);
            b / fabric.node_inter_bytes_per_s(m)
        })
        .fold(0.0, f64::max);
    let lat = if crosses { fabric.inter_latency_s } else { fabric.intra_latency_s };
    intra.max(inter) + 2.0 * (longest as f64 - 1.0) * lat + fabric.collective_launch_s
}

/// Expert-fetch (Janus) time of one MoE layer per iteration: every node fetches the weights of the experts it
/// does not hold once (over its NICs) and shares them among its GPUs (over the intra-node fabric); backward
/// pushes the gradients back the same way. `remote_experts_per_node` and `remote_experts_per_gpu` count experts
/// held elsewhere.
pub fn expert_fetch_time_s(
    shape: &MoeLayerShape,
    remote_experts_per_node: f64,
    remote_experts_per_gpu: f64,
    fabric: &Fabric,
) -> f64 {
    let w = shape.expert_params();
    let inter = remote_experts_per_node * w * (shape.param_bytes + shape.grad_bytes) as f64
        / fabric.node_inter_bytes_per_s(fabric.gpus_per_node);
    let intra_link = fabric.intra_link(fabric.gpus_per_node).per_gpu_bytes_per_s;
    let intra = remote_experts_per_gpu * w * (shape.param_bytes + shape.grad_bytes) as f64 / intra_link;
    if remote_experts_per_gpu <= 0.0 {
        return 0.0;
    }
    inter + intra + 2.0 * fabric.collective_launch_s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fabric() -> Fabric {
        Fabric::switched(2, 2, 1e3, 0.0, 1e2, 0.0, 1e30, 0.0)
    }

    fn exact_consts() -> ModelConstants {
        ModelConstants {
            gemm_max_efficiency: 1.0,
            gemm_half_efficiency_rows: 0.0,
            kernel_launch_us: 0.0,
            per_expert_overhead_us: 0.0,
            moe_layer_overhead_us: 0.0,
            ..Default::default()
        }
    }

    fn shape() -> MoeLayerShape {
        MoeLayerShape {
            d_model: 2,
            d_ffn: 4,
            gated: false,
            act_bytes: 2,
            param_bytes: 2,
            grad_bytes: 4,
            peak_flops: 1.0,
        }
    }

    #[test]
    fn busiest_gpu_sets_compute_by_hand() {
        // 2 GPUs x 1 slot, experts 0 (GPU0) and 1 (GPU1). Rank 0 sends 3 tokens to e0 and 1 to e1; rank 1 sends
        // 1 to e0 and 1 to e1. GPU0 processes 4 tokens, GPU1 2 tokens.
        let load = LoadMatrix::from_rows(&[vec![3, 1], vec![1, 1]]).unwrap();
        let p = Placement::new(2, 1, 2, vec![0, 1]).unwrap();
        let t = moe_layer_exact(&shape(), &load, &p, &[0, 1], &fabric(), &exact_consts(), false).unwrap();
        // FFN FLOPs per token: fwd 2*(2*4*2) = 32, bwd 64 -> 96 per token at 1 FLOP/s.
        assert_eq!(t.busiest_gpu, 0);
        assert!((t.compute_ms - 4.0 * 96.0 * 1e3).abs() < 1e-6, "{}", t.compute_ms);
        // Dispatch: rank0 -> GPU1 1 token, rank1 -> GPU0 1 token: 1 token * 2 elems * 2 bytes = 4 bytes / 1e3.
        // Combine the same; x2 for backward: 4 exchanges of 4e-3 s.
        assert!((t.all_to_all_ms - 16e-3 * 1e3).abs() < 1e-9, "{}", t.all_to_all_ms);
        assert_eq!(t.replica_sync_ms, 0.0);
        assert!((t.imbalance - 4.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn replicas_split_tokens_and_pay_sync() {
        // Expert 0 replicated on both GPUs; e1 on GPU1 only. 2 GPUs x 2 slots: [0, 0'] hmm: [e0, e1] [e0, e1]
        let load = LoadMatrix::from_rows(&[vec![4, 0], vec![4, 2]]).unwrap();
        let p = Placement::new(2, 2, 2, vec![0, 1, 0, 1]).unwrap();
        let t = moe_layer_exact(&shape(), &load, &p, &[0, 1], &fabric(), &exact_consts(), false).unwrap();
        assert_eq!(t.gpu_tokens, vec![5.0, 5.0]);
        // Two replicated experts, each all-reduced over the 2 GPUs of one node: expert params 2*2*4 + 6 = 22,
        // x4 bytes = 88; each ring sends 2*(1/2)*88 = 88 bytes per GPU: 176 bytes per GPU at 1e3 B/s.
        assert!((t.replica_sync_ms - 176.0).abs() < 1e-6, "{}", t.replica_sync_ms);
        // On GPUs of two nodes, each node's NIC (1e2 B/s) carries 176 bytes too: 1.76 s.
        let t2 = moe_layer_exact(&shape(), &load, &p, &[0, 2], &fabric(), &exact_consts(), false).unwrap();
        assert!((t2.replica_sync_ms - 1760.0).abs() < 1e-6, "{}", t2.replica_sync_ms);
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let load = LoadMatrix::from_rows(&[vec![1, 1]]).unwrap();
        let p = Placement::new(2, 1, 2, vec![0, 1]).unwrap();
        assert!(moe_layer_exact(&shape(), &load, &p, &[0, 1], &fabric(), &exact_consts(), false).is_err());
    }

    #[test]
    fn expert_fetch_by_hand() {
        // 3 remote experts per node and per GPU, 22 params * (2 + 4) bytes = 132 bytes each.
        let t = expert_fetch_time_s(&shape(), 3.0, 3.0, &fabric());
        assert!((t - (396.0 / 1e2 + 396.0 / 1e3)).abs() < 1e-12, "{t}");
    }

    #[test]
    fn fixed_overhead_and_permutation_by_hand() {
        // One GPU, one expert, 10 tokens: compute 10 x 96 FLOPs at 1 FLOP/s; activations 10 x 4 x 2 elements x
        // 2 bytes = 160 B forward and 240 B backward; permutation 10 tokens x 2 elements x 2 bytes x 8 = 320 B;
        // memory at 1e3 B/s; fixed overhead 2 x 50 us.
        let load = LoadMatrix::from_rows(&[vec![10]]).unwrap();
        let p = Placement::new(1, 1, 1, vec![0]).unwrap();
        let f = Fabric::switched(1, 1, 1e3, 0.0, 0.0, 0.0, 1e3, 0.0);
        let c = ModelConstants { moe_layer_overhead_us: 50.0, ..exact_consts() };
        let t = moe_layer_exact(&shape(), &load, &p, &[0], &f, &c, false).unwrap();
        let expect_s = 960.0 + 0.4 + 0.32;
        assert!((t.compute_ms - expect_s * 1e3).abs() < 1e-6, "{}", t.compute_ms);
        assert!((t.overhead_ms - 0.1).abs() < 1e-12);
        assert!((t.total_ms - (t.compute_ms + 0.1)).abs() < 1e-9);
    }
}

/// The prepared pricing against the layer model as first written (one evaluation per call, nested vectors, hash
/// maps): the same numbers, bit for bit.
#[cfg(test)]
mod prepared_equals_reference {
    use std::collections::{BTreeSet, HashMap};

    use proptest::prelude::*;

    use super::super::comm::all_to_all_time_s;
    use super::super::test_fixtures::{self, Shares, shape};
    use super::*;

    fn reference_sync(sets: &[Vec<u32>], bytes: f64, fabric: &Fabric) -> f64 {
        if sets.is_empty() || bytes <= 0.0 {
            return 0.0;
        }
        let mut gpu_bytes: HashMap<u32, f64> = HashMap::new();
        let mut node_bytes: HashMap<u32, f64> = HashMap::new();
        let mut node_gpus: HashMap<u32, BTreeSet<u32>> = HashMap::new();
        let mut longest = 0usize;
        let mut crosses = false;
        for set in sets {
            let r = set.len();
            if r < 2 {
                continue;
            }
            longest = longest.max(r);
            let share = 2.0 * (r as f64 - 1.0) / r as f64 * bytes;
            for &g in set {
                *gpu_bytes.entry(g).or_default() += share;
                node_gpus.entry(fabric.node_of(g)).or_default().insert(g);
            }
            let mut nodes: Vec<u32> = set.iter().map(|&g| fabric.node_of(g)).collect();
            nodes.sort_unstable();
            nodes.dedup();
            if nodes.len() > 1 {
                crosses = true;
                for n in nodes {
                    *node_bytes.entry(n).or_default() += share;
                }
            }
        }
        if longest < 2 {
            return 0.0;
        }
        let intra = gpu_bytes
            .iter()
            .map(|(g, b)| {
                let m = node_gpus.get(&fabric.node_of(*g)).map_or(1, |s| s.len() as u32);
                b / fabric.intra_link(m).per_gpu_bytes_per_s
            })
            .fold(0.0, f64::max);
        let inter = node_bytes
            .iter()
            .map(|(n, b)| {
                let m = node_gpus.get(n).map_or(1, |s| s.len() as u32);
                b / fabric.node_inter_bytes_per_s(m)
            })
            .fold(0.0, f64::max);
        let lat = if crosses { fabric.inter_latency_s } else { fabric.intra_latency_s };
        intra.max(inter) + 2.0 * (longest as f64 - 1.0) * lat + fabric.collective_launch_s
    }

    fn reference(
        shape: &MoeLayerShape,
        load: &LoadMatrix,
        placement: &Placement,
        gpus: &[u32],
        fabric: &Fabric,
        c: &ModelConstants,
        hierarchical: bool,
    ) -> MoeLayerTime {
        let d = shape.d_model as f64;
        let loads: Vec<f64> = load.expert_loads().into_iter().map(|x| x as f64).collect();
        let cnt = placement.replica_counts();
        let mut gpu_time = vec![0.0; placement.gpus];
        let mut gpu_tokens = vec![0.0; placement.gpus];
        for (slot, &e) in placement.slots.iter().enumerate() {
            let g = placement.gpu_of_slot(slot);
            let tokens = loads[e as usize] * placement.share(slot, &cnt);
            if tokens <= 0.0 {
                continue;
            }
            let (f, b) = ffn_time_s(
                tokens,
                d,
                shape.d_ffn as f64,
                shape.gated,
                shape.act_bytes as f64,
                DeviceRates { peak_flops: shape.peak_flops, hbm_bytes_per_s: fabric.hbm_bytes_per_s },
                c,
            );
            gpu_time[g] += f + b + 2.0 * c.per_expert_overhead_us * 1e-6;
            gpu_tokens[g] += tokens;
        }
        for (s, t) in gpu_time.iter_mut().enumerate().take(load.ranks) {
            let own: f64 = load.row(s).iter().map(|&x| x as f64).sum();
            *t += elementwise_time_s(own * d * shape.act_bytes as f64 * 8.0, fabric.hbm_bytes_per_s);
        }
        let (busiest_gpu, compute_s) =
            gpu_time.iter().copied().enumerate().fold((0, 0.0), |acc, (i, t)| if t > acc.1 { (i, t) } else { acc });
        let tokens = traffic_tokens(load, placement);
        let bytes: Vec<Vec<f64>> =
            tokens.iter().map(|r| r.iter().map(|t| t * d * shape.act_bytes as f64).collect()).collect();
        let transposed: Vec<Vec<f64>> =
            (0..placement.gpus).map(|g| (0..load.ranks).map(|s| bytes[s][g]).collect()).collect();
        let dispatch = all_to_all_time_s(&bytes, gpus, fabric, hierarchical);
        let combine = all_to_all_time_s(&transposed, gpus, fabric, hierarchical);
        let a2a_s = 2.0 * (dispatch + combine);
        let grad_bytes = shape.expert_params() * shape.grad_bytes as f64;
        let slots = placement.expert_slots();
        let mut replica_sets: Vec<Vec<u32>> = Vec::new();
        for (e, s) in slots.iter().enumerate() {
            if cnt[e] > 1 {
                let mut members: Vec<u32> = s.iter().map(|&x| gpus[placement.gpu_of_slot(x)]).collect();
                members.sort_unstable();
                members.dedup();
                replica_sets.push(members);
            }
        }
        let sync_s = reference_sync(&replica_sets, grad_bytes, fabric);
        let overhead_s = 2.0 * c.moe_layer_overhead_us * 1e-6;
        let mean = gpu_tokens.iter().sum::<f64>() / gpu_tokens.len().max(1) as f64;
        let imbalance = if mean > 0.0 { gpu_tokens.iter().copied().fold(0.0, f64::max) / mean } else { 1.0 };
        MoeLayerTime {
            compute_ms: compute_s * 1e3,
            all_to_all_ms: a2a_s * 1e3,
            replica_sync_ms: sync_s * 1e3,
            overhead_ms: overhead_s * 1e3,
            total_ms: (compute_s + a2a_s + sync_s + overhead_s) * 1e3,
            busiest_gpu,
            gpu_tokens,
            gpu_compute_ms: gpu_time.iter().map(|t| t * 1e3).collect(),
            imbalance,
        }
    }

    fn same(a: &MoeLayerTime, b: &MoeLayerTime) -> bool {
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        a.compute_ms.to_bits() == b.compute_ms.to_bits()
            && a.all_to_all_ms.to_bits() == b.all_to_all_ms.to_bits()
            && a.replica_sync_ms.to_bits() == b.replica_sync_ms.to_bits()
            && a.overhead_ms.to_bits() == b.overhead_ms.to_bits()
            && a.total_ms.to_bits() == b.total_ms.to_bits()
            && a.busiest_gpu == b.busiest_gpu
            && bits(&a.gpu_tokens) == bits(&b.gpu_tokens)
            && bits(&a.gpu_compute_ms) == bits(&b.gpu_compute_ms)
            && a.imbalance.to_bits() == b.imbalance.to_bits()
    }

    /// A placement of `experts` on `gpus` GPUs with `slots` slots from a seed, optionally with random shares.
    fn placement(gpus: usize, slots: usize, experts: usize, seed: u64, shares: bool) -> Placement {
        test_fixtures::placement(gpus, slots, experts, seed, if shares { Shares::Random } else { Shares::Even })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn prepared_pricing_is_bit_identical(
            gpn in 1u32..9,
            nodes in 1u32..5,
            extra in 0usize..3,
            experts_per_gpu in 1usize..4,
            seed in 0u64..1_000_000,
            shares in any::<bool>(),
            hierarchical in any::<bool>(),
            offset in 0u32..9,
            zero_every in 0usize..5,
        ) {
            let g = (gpn * nodes) as usize;
            let experts = g * experts_per_gpu;
            let slots = experts_per_gpu + extra;
            let p = placement(g, slots, experts, seed, shares);
            // Loads with zeros sprinkled in (zero traffic skips peers and compute).
            let rows: Vec<Vec<u64>> = (0..g)
                .map(|s| (0..experts).map(|x| {
                    let v = ((s * 31 + x * 17) as u64 * (seed % 97 + 1)) % 500;
                    if zero_every > 0 && (s + x) % (zero_every + 1) == 0 { 0 } else { v }
                }).collect())
                .collect();
            let load = LoadMatrix::from_rows(&rows).unwrap();
            let fabric = Fabric::switched(gpn, nodes + 1, 450e9, 2e-6, 50e9, 5e-6, 3e12, 10e-6);
            // Group GPUs placed anywhere in the cluster (not necessarily from 0, nor node-aligned).
            let gpus: Vec<u32> = (0..g as u32).map(|i| i + offset).collect();
            let c = ModelConstants::default();
            let prep = PreparedLoad::new(&load);
            let a = moe_layer_exact_prepared(&shape(), &prep, &p, &gpus, &fabric, &c, hierarchical).unwrap();
            let b = reference(&shape(), &load, &p, &gpus, &fabric, &c, hierarchical);
            prop_assert!(same(&a, &b), "{a:?}\n{b:?}");
            let direct = moe_layer_exact(&shape(), &load, &p, &gpus, &fabric, &c, hierarchical).unwrap();
            prop_assert!(same(&direct, &b));
        }

        #[test]
        fn sparse_all_to_all_is_bit_identical(
            gpn in 1u32..9,
            nodes in 1u32..4,
            seed in 0u64..1_000_000,
            hierarchical in any::<bool>(),
            density in 1u64..6,
        ) {
            let g = (gpn * nodes) as usize;
            let mut m = vec![vec![0.0; g]; g];
            let mut entries = Vec::new();
            for (s, row) in m.iter_mut().enumerate() {
                for (d, cell) in row.iter_mut().enumerate() {
                    let h = (s as u64 * 131 + d as u64 * 71 + seed) % 7;
                    if h < density {
                        let b = ((h + 1) * 1000 + seed % 13) as f64 * 0.37;
                        *cell = b;
                        entries.push((s, d, b));
                    }
                }
            }
            let gpus: Vec<u32> = (0..g as u32).collect();
            let fabric = Fabric::switched(gpn, nodes, 450e9, 2e-6, 50e9, 5e-6, 3e12, 10e-6);
            let dense = all_to_all_time_s(&m, &gpus, &fabric, hierarchical);
            let sparse = all_to_all_sparse_time_s(&entries, &gpus, &fabric, hierarchical);
            prop_assert_eq!(dense.to_bits(), sparse.to_bits());
        }

        #[test]
        fn replica_sync_is_bit_identical(
            sets in proptest::collection::vec(proptest::collection::vec(0u32..40, 0..6), 0..12),
            gpn in 1u32..9,
        ) {
            let fabric = Fabric::switched(gpn, 40u32.div_ceil(gpn), 450e9, 2e-6, 50e9, 5e-6, 3e12, 10e-6);
            let a = replica_sync_time_s(&sets, 1e6, &fabric);
            let b = reference_sync(&sets, 1e6, &fabric);
            prop_assert_eq!(a.to_bits(), b.to_bits());
        }
    }
}
