//! The data-centric (Janus-style) path of the distributed MoE layer: tokens stay on their worker and
//! the experts travel to them.
//!
//! Each worker runs every expert its own tokens chose, on its own rows. The weights of an expert a
//! worker does not hold come to it once per node: if a worker of its node holds the expert, that
//! holder (the node's *representative* for the expert) shares it inside the node; otherwise the
//! lowest-ranked worker of the node that needs it (the *fetcher*) fetches it from one holder (the
//! *supplier*, replicas taken in turn by node) and then shares it with the rest of its node. In
//! backward the weight gradients go back the same way: members send their partial gradients to the
//! node's representative, a fetcher sends its node's sum to the supplier, and every holder adds what
//! reached it to its slot's gradient, contributions in rank order. The replica gradient sum that
//! follows ([`super::DistMoeLayer::sync_replica_grads`]) then gives every replica the whole gradient.
//!
//! Numerically this is the token all-to-all mode: every row meets the same weights and every weight
//! gradient sums the same terms. The GEMMs run on other row counts (a worker's own rows instead of a
//! slot's rows from every worker) and the partial gradients are added up in another grouping, so the
//! results agree within rounding (tests: 1e-5 relative), not bit for bit.

use switchyard_cost::Placement;
use switchyard_kernels::{
    Compute, ExpertGrads, ExpertParams, Storage, combine, combine_backward, gather, gather_backward, route,
    route_backward,
};

use super::exec::{experts_backward, experts_forward};
use super::layer::{DistMoeLayer, MoeLayerGrads, MoeSaved};
use super::slots::tensor_sizes;
use crate::comm::{CommExt, Communicator};
use crate::error::RuntimeError;

fn invalid(what: &str, reason: String) -> RuntimeError {
    RuntimeError::Invalid { what: what.into(), reason }
}

/// Who sends which expert's weights to whom in one layer's forward (the gradients retrace it), the same on
/// every worker: a function of the placement, of which worker needs which expert, and of the node size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchPlan {
    /// Fetches across nodes: `(supplier, fetcher, expert)`, sorted.
    pub fetch: Vec<(usize, usize, u32)>,
    /// Shares inside a node: `(representative, member, expert)`, sorted.
    pub share: Vec<(usize, usize, u32)>,
}

impl FetchPlan {
    /// The plan for `placement` when worker `w` needs expert `e` iff `needs[w][e]`, nodes of
    /// `workers_per_node` consecutive workers (the last node may be smaller).
    pub fn new(placement: &Placement, needs: &[Vec<bool>], workers_per_node: usize) -> FetchPlan {
        let (w, spw, e_n) = (placement.gpus, placement.slots_per_gpu.max(1), placement.experts);
        let wpn = workers_per_node.clamp(1, w.max(1));
        let holders = placement.expert_slots();
        let holds = |worker: usize, e: usize| placement.gpu_slots(worker).contains(&(e as u32));
        let mut plan = FetchPlan::default();
        for node_start in (0..w).step_by(wpn) {
            let node = node_start / wpn;
            let members = node_start..(node_start + wpn).min(w);
            for e in 0..e_n {
                let mut wanting = members.clone().filter(|&m| needs.get(m).is_some_and(|n| n.get(e) == Some(&true)));
                let Some(first) = wanting.next() else { continue };
                let on_node = holders[e].iter().map(|&s| s / spw).find(|v| members.contains(v));
                let rep = match on_node {
                    Some(h) => h,
                    None => {
                        if holders[e].is_empty() {
                            continue;
                        }
                        let supplier = holders[e][node % holders[e].len()] / spw;
                        plan.fetch.push((supplier, first, e as u32));
                        first
                    }
                };
                for m in std::iter::once(first).chain(wanting) {
                    if m != rep && !holds(m, e) {
                        plan.share.push((rep, m, e as u32));
                    }
                }
            }
        }
        plan.fetch.sort_unstable();
        plan.share.sort_unstable();
        plan
    }

    /// Expert weights (f32 values) this worker sends and receives in the forward, over both steps.
    pub fn traffic(&self, me: usize, per_expert: usize) -> (usize, usize) {
        let sent = self.fetch.iter().chain(&self.share).filter(|t| t.0 == me).count();
        let got = self.fetch.iter().chain(&self.share).filter(|t| t.1 == me).count();
        (sent * per_expert, got * per_expert)
    }
}

/// What the data-centric forward keeps for its backward.
#[derive(Debug, Default)]
pub struct FetchSaved {
    /// The layer's plan this step.
    plan: FetchPlan,
    /// Experts this worker ran, ascending.
    need: Vec<u32>,
    /// Their weights, stacked in `need` order.
    params: Option<ExpertParams>,
}

impl FetchSaved {
    /// Expert copies that travelled in the forward (fetches across nodes and shares inside them), over all
    /// workers; the backward sends as many gradients back.
    pub fn copies(&self) -> usize {
        self.plan.fetch.len() + self.plan.share.len()
    }
}

/// Appends slot `j`'s four weight tensors to `out`.
fn slot_weights(layer: &DistMoeLayer, j: usize, out: &mut Vec<f32>) {
    layer.slots.slot_weights(j, out);
}

/// Sends, for each `(src, dst, expert)` of `list` with `src == me`, `payload(expert)` to `dst` (experts in list
/// order), and returns what arrived: for each `(src, me, expert)`, the expert and its values.
fn exchange_experts(
    comm: &dyn Communicator,
    list: &[(usize, usize, u32)],
    per: usize,
    mut payload: impl FnMut(u32, &mut Vec<f32>) -> Result<(), RuntimeError>,
    what: &str,
) -> Result<Vec<(usize, u32, Vec<f32>)>, RuntimeError> {
    let (me, w) = (comm.rank(), comm.size());
    if list.is_empty() {
        return Ok(Vec::new());
    }
    let mut send: Vec<Vec<f32>> = vec![Vec::new(); w];
    for &(s, d, e) in list {
        if s == me {
            let at = send[d].len();
            payload(e, &mut send[d])?;
            if send[d].len() != at + per {
                return Err(invalid(what, format!("expert {e}: {} values, expected {per}", send[d].len() - at)));
            }
        }
    }
    let got = comm.all_to_all_v_f32(&send.iter().map(|v| v.as_slice()).collect::<Vec<_>>())?;
    let mut out = Vec::new();
    let mut at = vec![0usize; w];
    for &(s, d, e) in list {
        if d == me {
            let part = got[s].get(at[s]..at[s] + per).ok_or_else(|| {
                invalid(what, format!("worker {s} sent {} values, fewer than announced", got[s].len()))
            })?;
            at[s] += per;
            out.push((s, e, part.to_vec()));
        }
    }
    for (s, msg) in got.iter().enumerate() {
        if msg.len() != at[s] {
            return Err(invalid(what, format!("worker {s} sent {} values, expected {}", msg.len(), at[s])));
        }
    }
    Ok(out)
}

/// The data-centric forward of `layer` (see the module documentation).
pub(super) fn forward(
    layer: &DistMoeLayer,
    cx: &Compute,
    comm: &dyn Communicator,
    x: &[f32],
    tokens: usize,
    out: &mut [f32],
    saved: &mut MoeSaved,
) -> Result<(), RuntimeError> {
    let (d, h) = (layer.slots.params.d_model, layer.slots.params.d_ffn);
    let act = layer.slots.params.activation;
    let (me, e_n) = (comm.rank(), layer.experts);
    let sizes = tensor_sizes(act, d, h);
    let per: usize = sizes.iter().sum();
    route(cx, &layer.gate, x, tokens, d, &layer.gate_weight, e_n, layer.expert_bias.as_deref(), &mut saved.routing)?;
    saved.plan.rebuild(&saved.routing)?;
    saved.input.clear();
    gather(&saved.plan, x, d, &mut saved.input)?;
    let offsets = &saved.plan.offsets;

    // Who needs what: one bit per expert and worker.
    let words = e_n.div_ceil(64);
    let mut mine = vec![0u64; words];
    for e in 0..e_n {
        if offsets[e + 1] > offsets[e] {
            mine[e / 64] |= 1 << (e % 64);
        }
    }
    let all = comm.all_gather_u64(&mine)?;
    let needs: Vec<Vec<bool>> =
        all.iter().map(|m| (0..e_n).map(|e| m.get(e / 64).is_some_and(|w| w >> (e % 64) & 1 == 1)).collect()).collect();
    let plan = FetchPlan::new(&layer.placement, &needs, layer.workers_per_node);

    let local_slot = |e: u32| layer.slots.experts.iter().position(|&x| x == e);
    let fetched = exchange_experts(
        comm,
        &plan.fetch,
        per,
        |e, buf| {
            let j = local_slot(e).ok_or_else(|| invalid("expert fetch", format!("expert {e} is not held here")))?;
            slot_weights(layer, j, buf);
            Ok(())
        },
        "fetched experts",
    )?;
    let shared = exchange_experts(
        comm,
        &plan.share,
        per,
        |e, buf| {
            if let Some(j) = local_slot(e) {
                slot_weights(layer, j, buf);
            } else {
                let (_, _, v) = fetched
                    .iter()
                    .find(|(_, x, _)| *x == e)
                    .ok_or_else(|| invalid("expert share", format!("expert {e} was not fetched here")))?;
                buf.extend_from_slice(v);
            }
            Ok(())
        },
        "shared experts",
    )?;

    // The experts this worker runs, their weights stacked in order.
    let need: Vec<u32> = (0..e_n as u32).filter(|&e| needs[me][e as usize]).collect();
    let mut stacked: [Vec<f32>; 4] = std::array::from_fn(|i| Vec::with_capacity(need.len() * sizes[i]));
    let mut one = Vec::with_capacity(per);
    for &e in &need {
        one.clear();
        let src: &[f32] = if let Some(j) = local_slot(e) {
            slot_weights(layer, j, &mut one);
            &one
        } else if let Some((_, _, v)) = fetched.iter().chain(&shared).find(|(_, x, _)| *x == e) {
            v
        } else {
            return Err(invalid("expert fetch", format!("the weights of expert {e} did not arrive")));
        };
        let mut at = 0;
        for i in 0..4 {
            stacked[i].extend_from_slice(&src[at..at + sizes[i]]);
            at += sizes[i];
        }
    }
    let [w_in, b_in, w_out, b_out] = stacked;
    let params = ExpertParams::new(act, need.len(), d, h, w_in, b_in, w_out, b_out, Storage::F32)?;
    // The grouped rows of the needed experts are contiguous (the others have none).
    saved.offsets.clear();
    saved.offsets.extend(need.iter().map(|&e| offsets[e as usize]));
    saved.offsets.push(offsets[e_n]);
    let mut y = std::mem::take(&mut saved.y);
    experts_forward(&layer.device, cx, &params, &saved.input, &saved.offsets, &mut saved.run, &mut y)?;
    combine(&saved.plan, &saved.routing.weight, &y, d, out)?;
    saved.y = y;
    saved.fetch = Some(FetchSaved { plan, need, params: Some(params) });
    Ok(())
}

/// The data-centric backward: input gradients from this worker's rows, weight gradients sent back to the
/// slots that hold the experts (see the module documentation); `grads.experts` ends in the local slots' layout.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    layer: &DistMoeLayer,
    cx: &Compute,
    comm: &dyn Communicator,
    x: &[f32],
    saved: &MoeSaved,
    d_out: &[f32],
    d_x: &mut [f32],
    grads: &mut MoeLayerGrads,
) -> Result<(), RuntimeError> {
    let (d, h) = (layer.slots.params.d_model, layer.slots.params.d_ffn);
    let act = layer.slots.params.activation;
    let me = comm.rank();
    let sizes = tensor_sizes(act, d, h);
    let per: usize = sizes.iter().sum();
    let fs = saved
        .fetch
        .as_ref()
        .ok_or_else(|| invalid("expert fetch backward", "the forward did not run in expert-fetch mode".into()))?;
    let params = fs.params.as_ref().ok_or_else(|| invalid("expert fetch backward", "no fetched weights".into()))?;
    let mut d_y = Vec::new();
    let mut d_weight = Vec::new();
    combine_backward(&saved.plan, &saved.routing.weight, &saved.y, d, d_out, &mut d_y, &mut d_weight)?;
    let mut g = ExpertGrads::default();
    let mut d_in = Vec::new();
    experts_backward(cx, params, &saved.input, &saved.run, &d_y, &mut g, &mut d_in)?;
    gather_backward(&saved.plan, &d_in, d, d_x, false)?;
    route_backward(cx, &layer.gate, &saved.routing, x, d, &layer.gate_weight, &d_weight, &mut grads.gate, d_x)?;

    // This worker's partial gradient of each expert it ran.
    let partial = |e: u32| -> Option<Vec<f32>> {
        let k = fs.need.binary_search(&e).ok()?;
        let parts: [&[f32]; 4] = [&g.d_w_in, &g.d_b_in, &g.d_w_out, &g.d_b_out];
        let mut v = Vec::with_capacity(per);
        for i in 0..4 {
            v.extend_from_slice(&parts[i][k * sizes[i]..(k + 1) * sizes[i]]);
        }
        Some(v)
    };
    let missing = |e: u32| invalid("expert gradients", format!("no partial gradient of expert {e} here"));
    // Members to their representative (inside the node).
    let reversed = |list: &[(usize, usize, u32)]| {
        let mut r: Vec<(usize, usize, u32)> = list.iter().map(|&(a, b, e)| (b, a, e)).collect();
        r.sort_unstable();
        r
    };
    let from_members = exchange_experts(
        comm,
        &reversed(&fs.plan.share),
        per,
        |e, buf| {
            buf.extend_from_slice(&partial(e).ok_or_else(|| missing(e))?);
            Ok(())
        },
        "member gradients",
    )?;
    // A representative's sum for its node: its own partial and its members', in rank order.
    let node_sum = |e: u32| -> Vec<f32> {
        let own = partial(e);
        let parts = from_members.iter().filter(|(_, x, _)| *x == e).map(|(s, _, v)| (*s, v.as_slice()));
        sum_in_rank_order(parts.chain(own.as_deref().map(|v| (me, v))), per)
    };
    // Fetchers to their suppliers (across nodes).
    let from_fetchers = exchange_experts(
        comm,
        &reversed(&fs.plan.fetch),
        per,
        |e, buf| {
            buf.extend_from_slice(&node_sum(e));
            Ok(())
        },
        "node gradients",
    )?;

    // Each held expert's first local slot takes every contribution that reached this worker, in rank order
    // (its own partial, its node members' when it represents the node, other nodes' sums when it supplies).
    let spw = layer.slots.len();
    let mut out: [Vec<f32>; 4] = std::array::from_fn(|i| vec![0.0f32; spw * sizes[i]]);
    for (j, &e) in layer.slots.experts.iter().enumerate() {
        if layer.slots.experts[..j].contains(&e) {
            continue;
        }
        let own = partial(e);
        let parts =
            from_members.iter().chain(&from_fetchers).filter(|(_, x, _)| *x == e).map(|(s, _, v)| (*s, v.as_slice()));
        let acc = sum_in_rank_order(parts.chain(own.as_deref().map(|v| (me, v))), per);
        let mut at = 0;
        for i in 0..4 {
            out[i][j * sizes[i]..(j + 1) * sizes[i]].copy_from_slice(&acc[at..at + sizes[i]]);
            at += sizes[i];
        }
    }
    let [a, b, c, dd] = out;
    grads.experts.d_w_in = a;
    grads.experts.d_b_in = b;
    grads.experts.d_w_out = c;
    grads.experts.d_b_out = dd;
    Ok(())
}

/// The sum of `parts` (contributor rank, values), added in rank order (so every run adds them alike).
fn sum_in_rank_order<'a>(parts: impl Iterator<Item = (usize, &'a [f32])>, len: usize) -> Vec<f32> {
    let mut parts: Vec<(usize, &[f32])> = parts.collect();
    parts.sort_by_key(|(s, _)| *s);
    let mut acc = vec![0.0f32; len];
    for (_, v) in parts {
        for (a, b) in acc.iter_mut().zip(v) {
            *a += b;
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use switchyard_cost::DispatchMode;

    fn placement(workers: usize, spw: usize, slots: Vec<u32>, experts: usize) -> Placement {
        Placement::new(workers, spw, experts, slots).unwrap()
    }

    #[test]
    fn plan_by_hand() {
        // 4 workers in 2 nodes of 2, one slot each: experts 0..4 on workers 0..4.
        let p = placement(4, 1, vec![0, 1, 2, 3], 4);
        // Every worker needs experts 0 and 3.
        let needs = vec![vec![true, false, false, true]; 4];
        let plan = FetchPlan::new(&p, &needs, 2);
        // Node 0 (workers 0, 1) holds 0 on worker 0; expert 3 is fetched by worker 0 from worker 3 and shared.
        // Node 1 (2, 3) holds 3 on worker 3; expert 0 is fetched by worker 2 from worker 0 and shared.
        assert_eq!(plan.fetch, vec![(0, 2, 0), (3, 0, 3)]);
        assert_eq!(plan.share, vec![(0, 1, 0), (0, 1, 3), (2, 3, 0), (3, 2, 3)]);
        // One node: shares only.
        let one = FetchPlan::new(&p, &needs, 4);
        assert!(one.fetch.is_empty());
        assert_eq!(one.share, vec![(0, 1, 0), (0, 2, 0), (0, 3, 0), (3, 0, 3), (3, 1, 3), (3, 2, 3)]);
    }

    /// One forward and backward of a 4-worker layer with replicas (and a duplicate replica on one worker),
    /// in both modes: (outputs, input gradients, expert gradients summed over replicas) of every worker.
    /// A worker's outputs, input gradients and the four expert gradients.
    type StepResult = (Vec<f32>, Vec<f32>, [Vec<f32>; 4]);

    fn one_step(dispatch: DispatchMode, wpn: usize) -> Vec<StepResult> {
        use crate::experts::{ExpertRuntime, MoeShape};
        use switchyard_kernels::{Activation, GateConfig};
        let (workers, experts, spw, d, h, tokens) = (4, 6, 3, 8, 16, 40);
        let placement = Placement::new(workers, spw, experts, vec![0, 1, 2, 3, 4, 5, 0, 0, 3, 1, 5, 2]).unwrap();
        let shape = MoeShape {
            layers: 1,
            d_model: d,
            d_ffn: h,
            experts,
            slots_per_worker: spw,
            activation: Activation::Gelu,
            gate: GateConfig { top_k: 2, ..GateConfig::default() },
        };
        let out = crate::comm::local::run_local(workers, std::time::Duration::from_secs(20), |comm| {
            let mut rt = ExpertRuntime::new(&comm, shape, vec![placement.clone()], 3, Default::default(), None)?;
            rt.layers[0].dispatch = dispatch;
            rt.layers[0].workers_per_node = wpn;
            let mut rng = switchyard_kernels::random::seeded_rng(11 + comm.rank() as u64);
            let x: Vec<f32> =
                (0..tokens * d).map(|_| switchyard_kernels::random::standard_normal(&mut rng) as f32).collect();
            let d_out: Vec<f32> =
                (0..tokens * d).map(|_| switchyard_kernels::random::standard_normal(&mut rng) as f32).collect();
            let cx = Compute::new(1);
            let mut y = vec![0.0f32; tokens * d];
            rt.forward(&cx, &comm, 0, &x, tokens, &mut y)?;
            let mut d_x = vec![0.0f32; tokens * d];
            rt.backward(&cx, &comm, 0, &x, &d_out, &mut d_x)?;
            let mut g = rt.expert_grads(0).clone();
            rt.layers[0].sync_replica_grads(&comm, &mut g)?;
            Ok::<_, RuntimeError>((y, d_x, [g.d_w_in, g.d_b_in, g.d_w_out, g.d_b_out]))
        });
        out.into_iter().map(|r| r.unwrap_or_else(|e| panic!("{e}"))).collect()
    }

    #[test]
    fn same_outputs_and_gradients_as_the_token_mode() {
        let token = one_step(DispatchMode::Token, 4);
        for wpn in [1, 2, 4] {
            let fetch = one_step(DispatchMode::ExpertFetch, wpn);
            for (w, (a, b)) in token.iter().zip(&fetch).enumerate() {
                // Outputs, input gradients and weight gradients (the same sums, grouped differently).
                for (x, y) in [&a.0, &a.1].into_iter().chain(&a.2).zip([&b.0, &b.1].into_iter().chain(&b.2)) {
                    assert_eq!(x.len(), y.len());
                    let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                    let diff = x.iter().zip(y).map(|(p, q)| (p - q) * (p - q)).sum::<f32>().sqrt();
                    assert!(diff / norm < 1e-5, "worker {w} ({wpn} per node): gradients differ by {}", diff / norm);
                    assert!(norm > 1e-6, "a gradient of zero tests nothing");
                }
            }
        }
    }

    proptest! {
        /// Every worker gets every expert it needs exactly once (or holds it), and only fetchers fetch.
        #[test]
        fn plan_delivers_each_need_once(
            workers in 1usize..7, spw in 1usize..4, wpn in 1usize..8, seed in 0u64..10_000,
        ) {
            let experts = (workers * spw).clamp(1, 9).min(workers * spw);
            let mut rng = switchyard_kernels::random::seeded_rng(seed);
            let mut slots: Vec<u32> = (0..experts as u32).collect();
            while slots.len() < workers * spw {
                slots.push((switchyard_kernels::random::standard_normal(&mut rng).abs() * 3.0) as u32 % experts as u32);
            }
            let p = placement(workers, spw, slots, experts);
            let needs: Vec<Vec<bool>> = (0..workers)
                .map(|_| (0..experts).map(|_| switchyard_kernels::random::standard_normal(&mut rng) > 0.0).collect())
                .collect();
            let plan = FetchPlan::new(&p, &needs, wpn);
            let wpn = wpn.clamp(1, workers);
            for (w, need) in needs.iter().enumerate() {
                for (e, &n) in need.iter().enumerate() {
                    let holds = p.gpu_slots(w).contains(&(e as u32));
                    let got = plan.fetch.iter().chain(&plan.share).filter(|t| t.1 == w && t.2 == e as u32).count();
                    if n && !holds {
                        prop_assert_eq!(got, 1, "worker {} expert {}", w, e);
                    } else if !holds {
                        prop_assert_eq!(got, 0);
                    }
                }
            }
            for &(s, f, e) in &plan.fetch {
                prop_assert!(p.gpu_slots(s).contains(&e));
                prop_assert_ne!(s / wpn, f / wpn);
            }
            for &(r, m, _) in &plan.share {
                prop_assert_eq!(r / wpn, m / wpn);
            }
        }
    }
}
