//! Token shares for replicas: given where the replicas are, split each replicated expert's tokens over its
//! replicas so that the busiest GPU carries as little as possible. With even splits a hot expert's replicas are
//! all the same size and cannot fill the gaps between GPUs; with shares they can: this is a fractional
//! makespan problem on restricted machines, solved exactly by bisection on the busiest load with a max-flow
//! feasibility test (source -> expert, capacity its load; expert -> each GPU holding it; GPU -> sink, capacity
//! the target minus what its single-copy experts already put there).

use switchyard_cost::placement::SHARE_UNIT;
use switchyard_cost::{Placement, PlacementError};

/// Per flexible expert, the (GPU, edge id) of its edges in the flow network.
type ExpertEdges = Vec<Vec<(usize, usize)>>;

/// Dinic's max-flow on a small graph with `f64` capacities.
struct Flow {
    adj: Vec<Vec<usize>>,
    to: Vec<usize>,
    cap: Vec<f64>,
}

impl Flow {
    fn new(n: usize) -> Self {
        Flow { adj: vec![Vec::new(); n], to: Vec::new(), cap: Vec::new() }
    }

    fn edge(&mut self, a: usize, b: usize, c: f64) -> usize {
        self.adj[a].push(self.to.len());
        self.to.push(b);
        self.cap.push(c);
        self.adj[b].push(self.to.len());
        self.to.push(a);
        self.cap.push(0.0);
        self.to.len() - 2
    }

    fn max_flow(&mut self, s: usize, t: usize) -> f64 {
        let n = self.adj.len();
        let mut total = 0.0;
        loop {
            let mut level = vec![usize::MAX; n];
            level[s] = 0;
            let mut q = std::collections::VecDeque::from([s]);
            while let Some(v) = q.pop_front() {
                for &e in &self.adj[v] {
                    if self.cap[e] > 1e-12 && level[self.to[e]] == usize::MAX {
                        level[self.to[e]] = level[v] + 1;
                        q.push_back(self.to[e]);
                    }
                }
            }
            if level[t] == usize::MAX {
                return total;
            }
            let mut it = vec![0usize; n];
            loop {
                let f = self.dfs(s, t, f64::INFINITY, &level, &mut it);
                if f <= 1e-12 {
                    break;
                }
                total += f;
            }
        }
    }

    fn dfs(&mut self, v: usize, t: usize, f: f64, level: &[usize], it: &mut [usize]) -> f64 {
        if v == t {
            return f;
        }
        while it[v] < self.adj[v].len() {
            let e = self.adj[v][it[v]];
            let w = self.to[e];
            if self.cap[e] > 1e-12 && level[w] == level[v] + 1 {
                let d = self.dfs(w, t, f.min(self.cap[e]), level, it);
                if d > 1e-12 {
                    self.cap[e] -= d;
                    self.cap[e ^ 1] += d;
                    return d;
                }
            }
            it[v] += 1;
        }
        0.0
    }
}

/// Sanitised per-expert loads (non-finite or negative: 0) and the distinct GPUs of each expert.
fn loads_and_homes(placement: &Placement, loads: &[f64]) -> (Vec<f64>, Vec<Vec<usize>>) {
    let e = placement.experts;
    let clean = (0..e).map(|x| loads.get(x).copied().filter(|v| v.is_finite() && *v > 0.0).unwrap_or(0.0)).collect();
    let mut homes: Vec<Vec<usize>> = vec![Vec::new(); e];
    for (slot, &x) in placement.slots.iter().enumerate() {
        let gpu = placement.gpu_of_slot(slot);
        if !homes[x as usize].contains(&gpu) {
            homes[x as usize].push(gpu);
        }
    }
    (clean, homes)
}

/// The placement with token shares that balance the GPUs for `loads` (per expert), and its busiest load.
/// Small instances (up to 64 replicated experts) are solved exactly ([`balance_shares_exact`]); larger ones by
/// water-filling ([`balance_shares_waterfill`]), which converges to the same balance in practice at a fraction of
/// the cost.
pub fn balance_shares(placement: &Placement, loads: &[f64]) -> Result<(Placement, f64), PlacementError> {
    if placement.gpus <= 32 && count_flexible(placement) <= 64 {
        balance_shares_exact(placement, loads)
    } else {
        balance_shares_waterfill(placement, loads, 12)
    }
}

/// Water-filling by coordinate descent: each replicated expert in turn spreads its tokens over its GPUs so that
/// they reach one common level given the rest of their load (the minimum of the sum of squared GPU loads over
/// that expert's split), for `passes` rounds or until nothing moves.
pub fn balance_shares_waterfill(
    placement: &Placement,
    loads: &[f64],
    passes: usize,
) -> Result<(Placement, f64), PlacementError> {
    WATERFILL.with_borrow_mut(|w| {
        let p = waterfill_with(placement, loads, passes, w);
        let max = busiest(&p, &w.loads);
        Ok((p, max))
    })
}

/// [`balance_shares`] without the busiest load (the placement only).
pub(crate) fn balanced_shares_only(placement: &Placement, loads: &[f64]) -> Result<Placement, PlacementError> {
    if placement.gpus <= 32 && count_flexible(placement) <= 64 {
        balance_shares_exact(placement, loads).map(|x| x.0)
    } else {
        Ok(WATERFILL.with_borrow_mut(|w| waterfill_with(placement, loads, 12, w)))
    }
}

/// Experts with more than one slot.
fn count_flexible(placement: &Placement) -> usize {
    WATERFILL.with_borrow_mut(|w| {
        w.cnt.clear();
        w.cnt.resize(placement.experts, 0);
        for &x in &placement.slots {
            w.cnt[x as usize] += 1;
        }
        w.cnt.iter().filter(|&&c| c > 1).count()
    })
}

/// The largest of [`gpu_loads`], without collecting them.
fn busiest(p: &Placement, loads: &[f64]) -> f64 {
    if p.slots_per_gpu == 0 {
        return 0.0;
    }
    let spg = p.slots_per_gpu;
    let Some(shares) = &p.shares else {
        let cnt = p.replica_counts();
        return p
            .slots
            .chunks_exact(spg)
            .enumerate()
            .map(|(g, xs)| {
                let mut t = 0.0;
                for (j, &x) in xs.iter().enumerate() {
                    t += loads[x as usize] * p.share(g * spg + j, &cnt);
                }
                t
            })
            .fold(0.0, f64::max);
    };
    p.slots
        .chunks_exact(spg)
        .zip(shares.chunks_exact(spg))
        .map(|(xs, sh)| shared_load(xs, sh, loads))
        .fold(0.0, f64::max)
}

/// One GPU's load: its slots' experts (`xs`) times their shares (`sh`), [`Placement::share`] written out (the
/// same quotients, summed in slot order).
#[inline]
fn shared_load(xs: &[u32], sh: &[u32], loads: &[f64]) -> f64 {
    let mut t = 0.0;
    for (&x, &s) in xs.iter().zip(sh) {
        t += loads[x as usize] * (s as f64 / SHARE_UNIT as f64);
    }
    t
}

/// Buffers of the water-filling, reused between calls on one thread.
#[derive(Default)]
struct Waterfill {
    cnt: Vec<u32>,
    loads: Vec<f64>,
    ex: ExpertSlots,
    hstart: Vec<usize>,
    homes: Vec<usize>,
    on_home: Vec<usize>,
    flex: Vec<usize>,
    multi: Vec<usize>,
    contrib: Vec<f64>,
    gpu: Vec<f64>,
    order: Vec<usize>,
    other: Vec<f64>,
    frac: Vec<f64>,
}

thread_local! {
    static WATERFILL: std::cell::RefCell<Waterfill> = std::cell::RefCell::new(Waterfill::default());
}

/// The water-filling's placement, on reused buffers (`w.loads` holds the sanitised loads afterwards).
fn waterfill_with(placement: &Placement, loads_in: &[f64], passes: usize, w: &mut Waterfill) -> Placement {
    let e = placement.experts;
    let Waterfill { loads, ex, hstart, homes, on_home, flex, multi, contrib, gpu, order, other, frac, .. } = w;
    loads.clear();
    loads.resize(e, 0.0);
    for (l, &v) in loads.iter_mut().zip(loads_in) {
        *l = if v.is_finite() && v > 0.0 { v } else { 0.0 };
    }
    let loads = &*loads;
    // Each expert's slots (in slot order, so by GPU), as one array cut at `start`.
    ex.fill(placement);
    let ex = &*ex;
    // The distinct GPUs of each expert (its homes) in increasing order, cut at `hstart`, and how many of its
    // slots each home holds; the experts with more than one slot (`multi`) and the flexible ones (more than one
    // home, some load: `flex`). The GPU loads start from the experts with one home, in expert order.
    // (Written by index into buffers of the largest size, then cut: no capacity checks in the loop.)
    let n = placement.slots.len();
    hstart.clear();
    hstart.resize(e + 1, 0);
    homes.clear();
    homes.resize(n, 0);
    on_home.clear();
    on_home.resize(n, 0);
    flex.clear();
    multi.clear();
    gpu.clear();
    gpu.resize(placement.gpus, 0.0);
    let mut len = 0;
    for x in 0..e {
        let h0 = len;
        match ex.of(x) {
            [] => {}
            &[slot] => {
                let g = ex.gpu[slot];
                homes[len] = g;
                on_home[len] = 1;
                len += 1;
                gpu[g] += loads[x];
            }
            slots => {
                multi.push(x);
                for &slot in slots {
                    let g = ex.gpu[slot];
                    if len > h0 && homes[len - 1] == g {
                        on_home[len - 1] += 1;
                    } else {
                        homes[len] = g;
                        on_home[len] = 1;
                        len += 1;
                    }
                }
                match len - h0 {
                    1 => gpu[homes[h0]] += loads[x],
                    _ if loads[x] > 0.0 => flex.push(x),
                    _ => {}
                }
            }
        }
        hstart[x + 1] = len;
    }
    homes.truncate(len);
    on_home.truncate(len);
    let (hstart, homes, on_home) = (&*hstart, &*homes, &*on_home);
    // Contribution of each flexible expert to each of its homes (indexed like `homes`), from the even split.
    // Each expert's homes in order (indices into its homes), kept from pass to pass (only the flexible experts'
    // are read).
    contrib.clear();
    contrib.resize(homes.len(), 0.0);
    order.clear();
    order.resize(homes.len(), 0);
    for &x in flex.iter() {
        let (a, b) = (hstart[x], hstart[x + 1]);
        let c = loads[x] / (b - a) as f64;
        for k in a..b {
            contrib[k] = c;
            gpu[homes[k]] += c;
            order[k] = k - a;
        }
    }
    let scale = loads.iter().copied().fold(1.0, f64::max);
    // A pass that moves no contribution by more than this is the last. (`moved <= limit` for the largest move
    // that is not NaN, as `f64::max` skips NaN, is no such move `> limit`: a flag, not a chain of maxima.)
    let limit = 1e-6 * scale;
    for _ in 0..passes {
        let mut moved = false;
        for &x in flex.iter() {
            let (a, b) = (hstart[x], hstart[x + 1]);
            let h = &homes[a..b];
            let cx = &mut contrib[a..b];
            if let ([g0, g1], [c0, c1]) = (h, &mut *cx) {
                // Two homes (the common case): the steps of the general case below, written out (a product or
                // quotient by 1 is exact, so the same values).
                let (o0, o1) = (gpu[*g0] - *c0, gpu[*g1] - *c1);
                let (lo, hi) = if o0.total_cmp(&o1).is_gt() { (o1, o0) } else { (o0, o1) };
                let remaining = loads[x];
                let need = hi - lo;
                let level = if need >= remaining {
                    lo + remaining
                } else {
                    let rest = remaining - need;
                    // The next level is infinite: the need is too, and the rest spreads over both homes.
                    if (f64::INFINITY - hi) * 2.0 >= rest { hi + rest / 2.0 } else { f64::INFINITY }
                };
                let v0 = (level - o0).max(0.0);
                moved |= (v0 - *c0).abs() > limit;
                gpu[*g0] += v0 - *c0;
                *c0 = v0;
                let v1 = (level - o1).max(0.0);
                moved |= (v1 - *c1).abs() > limit;
                gpu[*g1] += v1 - *c1;
                *c1 = v1;
                continue;
            }
            // Load of each home without this expert, then the level that absorbs the expert's tokens.
            other.clear();
            other.extend(h.iter().zip(cx.iter()).map(|(&g, &c)| gpu[g] - c));
            // The homes by their other load (a stable insertion sort: homes are few).
            // The homes by their other load, ties by index (the order a stable sort gives): an insertion sort
            // of this expert's order from the previous pass, which the loads change little (the sorted order is
            // unique, so any starting order gives it).
            let order = &mut order[a..b];
            for t in 1..order.len() {
                let i = order[t];
                let oi = other[i];
                let mut j = t;
                while j > 0 && other[order[j - 1]].total_cmp(&oi).then(order[j - 1].cmp(&i)).is_gt() {
                    order[j] = order[j - 1];
                    j -= 1;
                }
                order[j] = i;
            }
            let mut level = other[order[0]];
            let mut remaining = loads[x];
            let mut k = 1;
            while k <= order.len() {
                let next = if k < order.len() { other[order[k]] } else { f64::INFINITY };
                let need = (next - level) * k as f64;
                if need >= remaining {
                    level += remaining / k as f64;
                    break;
                }
                remaining -= need;
                level = next;
                k += 1;
            }
            for ((&g, c), &o) in h.iter().zip(cx.iter_mut()).zip(other.iter()) {
                let v = (level - o).max(0.0);
                moved |= (v - *c).abs() > limit;
                gpu[g] += v - *c;
                *c = v;
            }
        }
        if !moved {
            break;
        }
    }
    // Each slot's fraction: its expert's contribution to its GPU over the expert's slots on that GPU.
    frac.clear();
    frac.resize(placement.slots.len(), 1.0);
    for &x in flex.iter() {
        let mut k = hstart[x];
        for &slot in ex.of(x) {
            while homes[k] != ex.gpu[slot] {
                k += 1;
            }
            frac[slot] = contrib[k] / loads[x] / on_home[k] as f64;
        }
    }
    with_shares_of(placement, ex, multi, frac)
}

/// [`Placement::gpu_loads`], GPU by GPU (the same sums in the same order).
pub(crate) fn gpu_loads(p: &Placement, loads: &[f64]) -> Vec<f64> {
    if p.slots_per_gpu == 0 {
        return vec![0.0; p.gpus];
    }
    let spg = p.slots_per_gpu;
    // `Placement::share` written out: the same quotients.
    match &p.shares {
        Some(shares) => {
            p.slots.chunks_exact(spg).zip(shares.chunks_exact(spg)).map(|(xs, sh)| shared_load(xs, sh, loads)).collect()
        }
        None => {
            let cnt = p.replica_counts();
            p.slots
                .chunks_exact(spg)
                .map(|xs| {
                    let mut t = 0.0;
                    for &x in xs {
                        t += loads[x as usize] * (1.0 / cnt[x as usize] as f64);
                    }
                    t
                })
                .collect()
        }
    }
}

/// Each expert's slots in slot order, as one array cut per expert, and each slot's GPU.
#[derive(Default)]
struct ExpertSlots {
    start: Vec<usize>,
    slots: Vec<usize>,
    gpu: Vec<usize>,
}

impl ExpertSlots {
    /// Refills these buffers for `p`.
    fn fill(&mut self, p: &Placement) {
        let start = &mut self.start;
        start.clear();
        start.resize(p.experts + 1, 0);
        for &x in &p.slots {
            start[x as usize + 1] += 1;
        }
        let mut sum = 0;
        for c in start.iter_mut() {
            sum += *c;
            *c = sum;
        }
        let slots = &mut self.slots;
        slots.clear();
        slots.resize(p.slots.len(), 0);
        // Each expert's next free position, kept in `slots`' tail order: fill from the cut points.
        let mut at = std::mem::take(&mut self.gpu);
        at.clear();
        at.extend_from_slice(&start[..p.experts]);
        for (s, &x) in p.slots.iter().enumerate() {
            slots[at[x as usize]] = s;
            at[x as usize] += 1;
        }
        let spg = p.slots_per_gpu.max(1);
        at.clear();
        at.resize(p.gpus * spg, 0);
        for (g, c) in at.chunks_exact_mut(spg).enumerate() {
            c.fill(g);
        }
        at.truncate(p.slots.len());
        self.gpu = at;
    }

    fn of(&self, x: usize) -> &[usize] {
        &self.slots[self.start[x]..self.start[x + 1]]
    }
}

/// `placement.clone().with_shares(fractions)` for a valid placement and finite, non-negative fractions, without
/// its checks and allocations: the same normalisation and rounding (each expert's shares floored to
/// [`SHARE_UNIT`] parts, the remainder to its largest share, the last of equal ones), so the same shares.
/// `multi`: the experts with more than one slot (an expert's only slot gets the whole unit: f / f, or 1 / 1 for
/// a zero fraction, is exactly one).
fn with_shares_of(placement: &Placement, ex: &ExpertSlots, multi: &[usize], fractions: &[f64]) -> Placement {
    let mut out = vec![SHARE_UNIT; placement.slots.len()];
    for &x in multi {
        let slots = ex.of(x);
        let sum: f64 = slots.iter().map(|&s| fractions[s]).sum();
        let n = slots.len() as f64;
        let mut given = 0u32;
        let mut big = slots[0];
        for &s in slots {
            let f = if sum > 0.0 { fractions[s] / sum } else { 1.0 / n };
            // (`as` truncates toward zero and saturates: the floor for every value, NaN and negatives as 0,
            // without a call to the C library's `floor` on CPUs without SSE4.1.)
            out[s] = (f * SHARE_UNIT as f64) as u32;
            given += out[s];
            if out[s] >= out[big] {
                big = s;
            }
        }
        out[big] += SHARE_UNIT - given;
    }
    Placement {
        gpus: placement.gpus,
        slots_per_gpu: placement.slots_per_gpu,
        experts: placement.experts,
        slots: placement.slots.clone(),
        shares: Some(out),
    }
}

/// The placement with the token shares that minimise the busiest GPU's load for `loads` (per expert), and that
/// load, exactly (bisection with a max-flow test). Experts on a single GPU keep all their tokens there.
pub fn balance_shares_exact(placement: &Placement, loads: &[f64]) -> Result<(Placement, f64), PlacementError> {
    let g = placement.gpus;
    let e = placement.experts;
    let (loads, homes) = loads_and_homes(placement, loads);
    let mut base = vec![0.0; g];
    let flex: Vec<usize> = (0..e).filter(|&x| homes[x].len() > 1 && loads[x] > 0.0).collect();
    for x in 0..e {
        if homes[x].len() == 1 {
            base[homes[x][0]] += loads[x];
        }
    }
    let flex_total: f64 = flex.iter().map(|&x| loads[x]).sum();
    // Flow network for a target: node 0 source, 1..=F experts, then GPUs, then the sink.
    let build = |target: f64| -> (Flow, ExpertEdges, bool) {
        let n = 2 + flex.len() + g;
        let sink = n - 1;
        let mut f = Flow::new(n);
        let mut edges = vec![Vec::new(); flex.len()];
        for (i, &x) in flex.iter().enumerate() {
            f.edge(0, 1 + i, loads[x]);
            for &gpu in &homes[x] {
                let id = f.edge(1 + i, 1 + flex.len() + gpu, f64::INFINITY);
                edges[i].push((gpu, id));
            }
        }
        let mut ok = true;
        for (gpu, &b) in base.iter().enumerate() {
            let room = target - b;
            if room < -1e-9 * target.max(1.0) {
                ok = false;
            }
            f.edge(1 + flex.len() + gpu, sink, room.max(0.0));
        }
        (f, edges, ok)
    };
    let feasible = |target: f64| -> Option<(Flow, ExpertEdges)> {
        let (mut f, edges, ok) = build(target);
        if !ok {
            return None;
        }
        let sink = f.adj.len() - 1;
        let got = f.max_flow(0, sink);
        (got >= flex_total * (1.0 - 1e-9) - 1e-9).then_some((f, edges))
    };
    let even = placement.gpu_loads(&loads).into_iter().fold(0.0, f64::max);
    let mut lo = base.iter().copied().fold((base.iter().sum::<f64>() + flex_total) / g as f64, f64::max);
    let mut hi = even.max(lo);
    let mut best = feasible(hi);
    if flex.is_empty() || best.is_none() {
        return Ok((placement.clone(), even));
    }
    for _ in 0..30 {
        if hi - lo <= 1e-5 * hi.max(1.0) {
            break;
        }
        let mid = 0.5 * (lo + hi);
        match feasible(mid) {
            Some(sol) => {
                hi = mid;
                best = Some(sol);
            }
            None => lo = mid,
        }
    }
    let (f, edges) = best.expect("the even split is feasible");
    // Shares: the flow to each GPU, split evenly among the expert's slots there.
    let mut frac = vec![0.0; placement.slots.len()];
    let slots_of = placement.expert_slots();
    for x in 0..e {
        let on = |gpu: usize| slots_of[x].iter().filter(|&&s| placement.gpu_of_slot(s) == gpu).count() as f64;
        match flex.iter().position(|&y| y == x) {
            Some(i) => {
                for &(gpu, id) in &edges[i] {
                    let sent = f.cap[id ^ 1];
                    for &s in slots_of[x].iter().filter(|&&s| placement.gpu_of_slot(s) == gpu) {
                        frac[s] = sent / loads[x] / on(gpu);
                    }
                }
            }
            None => {
                for &s in &slots_of[x] {
                    frac[s] = 1.0;
                }
            }
        }
    }
    let p = placement.clone().with_shares(&frac)?;
    let max = p.gpu_loads(&loads).into_iter().fold(0.0, f64::max);
    Ok((p, max))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn shares_fill_the_gaps() {
        // GPU0: e0 (100), e1 (10); GPU1: e0, e2 (30). Even split: 60 / 80. Best: GPU0 = GPU1 = 70.
        let p = Placement::new(2, 2, 3, vec![0, 1, 0, 2]).unwrap();
        let (q, max) = balance_shares(&p, &[100.0, 10.0, 30.0]).unwrap();
        assert!((max - 70.0).abs() < 1e-3, "{max}");
        let l = q.gpu_loads(&[100.0, 10.0, 30.0]);
        assert!((l[0] - 70.0).abs() < 1e-3 && (l[1] - 70.0).abs() < 1e-3, "{l:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn never_worse_than_even_and_conserves_load(loads in proptest::collection::vec(0.0f64..1000.0, 2..24), gpus in 2usize..9, extra in 1usize..3) {
            let slots = loads.len().div_ceil(gpus) + extra;
            let p = crate::placement::balanced_placement(&loads, gpus, slots).unwrap();
            let even = p.gpu_loads(&loads).into_iter().fold(0.0, f64::max);
            let (q, max) = balance_shares(&p, &loads).unwrap();
            q.check().unwrap();
            // Water-filling lands close to the exact optimum.
            let (w, wmax) = balance_shares_waterfill(&p, &loads, 200).unwrap();
            w.check().unwrap();
            // Shares are stored in parts per million: each slot's share may round by one part, so allow the
            // rounding of every slot's tokens on top of the solvers' tolerance.
            let rounding = loads.iter().sum::<f64>() * 2e-6 * slots as f64 + 1e-6;
            prop_assert!(wmax <= even * (1.0 + 1e-5) + rounding);
            prop_assert!(wmax <= max * 1.10 + rounding, "waterfill {} exact {}", wmax, max);
            prop_assert_eq!(&q.slots, &p.slots);
            prop_assert!(max <= even * (1.0 + 1e-5) + rounding, "{} > {}", max, even);
            let total: f64 = q.gpu_loads(&loads).iter().sum();
            prop_assert!((total - loads.iter().sum::<f64>()).abs() < 1e-3 * (1.0 + total));
        }
    }
}

/// Water-filling against its first version (hash maps, nested vectors, `with_shares`): the same shares, bit for
/// bit.
#[cfg(test)]
mod waterfill_equals_reference {
    use proptest::prelude::*;

    use super::*;

    fn reference_waterfill(
        placement: &Placement,
        loads: &[f64],
        passes: usize,
    ) -> Result<(Placement, f64), PlacementError> {
        let e = placement.experts;
        let (loads, homes) = loads_and_homes(placement, loads);
        // Contribution of each flexible expert to each of its GPUs, starting from the even split.
        let flex: Vec<usize> = (0..e).filter(|&x| homes[x].len() > 1 && loads[x] > 0.0).collect();
        let mut contrib: Vec<Vec<f64>> =
            flex.iter().map(|&x| vec![loads[x] / homes[x].len() as f64; homes[x].len()]).collect();
        let mut gpu = vec![0.0; placement.gpus];
        for x in 0..e {
            if homes[x].len() == 1 {
                gpu[homes[x][0]] += loads[x];
            }
        }
        for (i, &x) in flex.iter().enumerate() {
            for (k, &g) in homes[x].iter().enumerate() {
                gpu[g] += contrib[i][k];
            }
        }
        let mut order: Vec<usize> = Vec::new();
        let mut other: Vec<f64> = Vec::new();
        let scale = loads.iter().copied().fold(1.0, f64::max);
        for _ in 0..passes {
            let mut moved = 0.0f64;
            for (i, &x) in flex.iter().enumerate() {
                let h = &homes[x];
                // Load of each home without this expert, then the level that absorbs the expert's tokens.
                other.clear();
                other.extend(h.iter().enumerate().map(|(k, &g)| gpu[g] - contrib[i][k]));
                order.clear();
                order.extend(0..h.len());
                order.sort_by(|&a, &b| other[a].total_cmp(&other[b]));
                let mut level = other[order[0]];
                let mut remaining = loads[x];
                let mut k = 1;
                while k <= order.len() {
                    let next = if k < order.len() { other[order[k]] } else { f64::INFINITY };
                    let need = (next - level) * k as f64;
                    if need >= remaining {
                        level += remaining / k as f64;
                        break;
                    }
                    remaining -= need;
                    level = next;
                    k += 1;
                }
                for (kk, &g) in h.iter().enumerate() {
                    let c = (level - other[kk]).max(0.0);
                    moved = moved.max((c - contrib[i][kk]).abs());
                    gpu[g] += c - contrib[i][kk];
                    contrib[i][kk] = c;
                }
            }
            if moved <= 1e-6 * scale {
                break;
            }
        }
        // Each slot's fraction: its expert's contribution to its GPU over the expert's slots on that GPU.
        let flex_index: Vec<Option<usize>> = {
            let mut v = vec![None; e];
            for (i, &x) in flex.iter().enumerate() {
                v[x] = Some(i);
            }
            v
        };
        let mut per_gpu_slots = std::collections::HashMap::new();
        for (slot, &x) in placement.slots.iter().enumerate() {
            *per_gpu_slots.entry((x, placement.gpu_of_slot(slot))).or_insert(0usize) += 1;
        }
        let frac: Vec<f64> = placement
            .slots
            .iter()
            .enumerate()
            .map(|(slot, &x)| match flex_index[x as usize] {
                Some(i) => {
                    let g = placement.gpu_of_slot(slot);
                    let k = homes[x as usize].iter().position(|&h| h == g).unwrap_or(0);
                    contrib[i][k] / loads[x as usize] / per_gpu_slots[&(x, g)] as f64
                }
                None => 1.0,
            })
            .collect();
        let p = placement.clone().with_shares(&frac)?;
        let max = p.gpu_loads(&loads).into_iter().fold(0.0, f64::max);
        Ok((p, max))
    }

    /// A placement from a seed: every expert once, the rest at random (repeats on one GPU allowed).
    fn placement(gpus: usize, slots: usize, experts: usize, seed: u64) -> Placement {
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
        Placement::new(gpus, slots, experts, v).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        #[test]
        fn bit_identical(
            gpus in 1usize..40,
            per_gpu in 1usize..4,
            extra in 0usize..3,
            seed in 0u64..1_000_000,
            passes in 0usize..20,
            zeros in 0usize..4,
            integer in any::<bool>(),
        ) {
            let experts = gpus * per_gpu;
            let p = placement(gpus, per_gpu + extra, experts, seed);
            let loads: Vec<f64> = (0..experts)
                .map(|x| {
                    if zeros > 0 && x % (zeros + 2) == 0 {
                        0.0
                    } else {
                        let v = ((x as u64 * 7919 + seed) % 1000) as f64;
                        if integer { v } else { v * 1.37 + 0.11 }
                    }
                })
                .collect();
            let (a, amax) = balance_shares_waterfill(&p, &loads, passes).unwrap();
            let (b, bmax) = reference_waterfill(&p, &loads, passes).unwrap();
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(amax.to_bits(), bmax.to_bits());
            a.check().unwrap();
            let l1: Vec<u64> = gpu_loads(&a, &loads).iter().map(|x| x.to_bits()).collect();
            let l2: Vec<u64> = a.gpu_loads(&loads).iter().map(|x| x.to_bits()).collect();
            prop_assert_eq!(l1, l2);
        }
    }
}
