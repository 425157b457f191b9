//! The exact placement of one MoE layer, as a mixed-integer linear program (MILP), for small instances: the
//! yardstick the heuristics' optimality gap is measured against (`switchyard place --exact`, and the tests).
//!
//! # The model
//!
//! `E` experts with predicted loads `l_e` (tokens) on `G` GPUs of `S` slots each (`G * S >= E`). The problem is
//! the one [`super::shares`] solves for a fixed placement, with the placement free as well:
//!
//! - `y[e,g]` in {0, 1}: GPU `g` holds at least one replica of expert `e`;
//! - `t[e,g] >= 0`: tokens of expert `e` served on GPU `g` (its token share there), `sum_g t[e,g] = l_e`,
//!   `t[e,g] <= l_e * y[e,g]` (tighter: `<= min(l_e, U) * y[e,g]` when an upper bound `U` on the optimum is known);
//! - every expert on at least one GPU (`sum_g y[e,g] >= 1`), at most `S` distinct experts per GPU
//!   (`sum_e y[e,g] <= S`);
//! - minimise `z` with `z >= sum_e t[e,g]` for every GPU: the busiest GPU's tokens.
//!
//! The formulation uses integer replica counts `x[e,g]` in `0..=S` with `sum_e x[e,g] = S` (every slot
//! full) and `t[e,g] <= l_e * x[e,g]`. It has the same optimum: a second replica of an expert on the same GPU
//! adds no capacity (the GPU may already take all of the expert's tokens), so only presence matters, and a GPU
//! with `k < S` distinct experts fills its other `S - k` slots with extra replicas of one of them (share 0 or a
//! part of that GPU's share: the GPU's load is the same). Presence binaries branch far less than counts, and
//! this is what the solution builder does: `x[e,g] = y[e,g]` plus the spare slots on the GPU's heaviest expert.
//! With shares the meaning is exactly that of [`super::shares::balance_shares`]: an expert's tokens split freely
//! over the GPUs that hold it (several slots of it on one GPU split that GPU's part evenly), and a GPU's load
//! is the sum of its parts. [`super::shares::balance_shares`] of the exact placement gives the same maximum.
//!
//! Optionally ([`CrossNode`]) the objective adds `w x` the tokens that cross node boundaries in the all-to-all,
//! priced the way the cost model routes them (`switchyard_cost::cost::traffic_tokens`): every source rank `s`
//! splits its `a[s,e]` tokens for expert `e` by the expert's shares, so the tokens of `e` that leave node `n` are
//! `A[n,e] * (1 - T[e,n] / l_e)` with `A[n,e]` what node `n` sends `e` and `T[e,n] = sum_{g in n} t[e,g]`: linear
//! in `t`.
//!
//! # Solvers and limits
//!
//! `microlp` (pure Rust, always built) or HiGHS (the `highs` feature of `switchyard-planner`, or `highs` of the
//! `switchyard` binary; needs cmake and libclang to build). Both take the time limit; a solve stopped by it
//! returns the best placement found with `optimal: false`. A warm start (e.g. the heuristic's placement) gives
//! the solver an incumbent from the start, so a time-limited solve is never worse than it. Instances with more
//! than [`ExactOptions::max_cells`] expert x GPU pairs are refused with an error that names a smaller one.
//!
//! Symmetry: without the cross-node term all GPUs are interchangeable, and branch and bound explores every
//! relabelling of the GPUs. [`Symmetry::LoadOrder`] (the default) orders the GPUs' loads (non-increasing within
//! each node), which removes the relabellings inside a node; [`Symmetry::FixHeaviest`] only puts the heaviest
//! expert on GPU 0 (no cross-node term).

use std::time::Instant;

use good_lp::{
    Constraint, Expression, ProblemVariables, Solution, SolutionStatus, SolverModel, Variable, WithInitialSolution,
    WithMipGap, WithTimeLimit, constraint, variable,
};
use switchyard_cost::{Placement, PlacementError};

/// Which MILP solver runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExactSolver {
    /// `microlp`: pure Rust branch and bound, always available; fine up to a few hundred expert x GPU pairs.
    #[default]
    Microlp,
    /// HiGHS: needs the `highs` feature (an error otherwise).
    Highs,
}

impl ExactSolver {
    /// The solver's name, as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            ExactSolver::Microlp => "microlp",
            ExactSolver::Highs => "highs",
        }
    }

    /// Parses `microlp` or `highs`.
    pub fn parse(s: &str) -> Option<ExactSolver> {
        match s {
            "microlp" => Some(ExactSolver::Microlp),
            "highs" => Some(ExactSolver::Highs),
            _ => None,
        }
    }

    /// Whether this build has the solver.
    pub fn available(self) -> bool {
        match self {
            ExactSolver::Microlp => true,
            ExactSolver::Highs => cfg!(feature = "highs"),
        }
    }

    /// The best solver this build has: HiGHS with the `highs` feature, else microlp.
    pub fn best_available() -> ExactSolver {
        if ExactSolver::Highs.available() { ExactSolver::Highs } else { ExactSolver::Microlp }
    }
}

/// Symmetry-breaking constraints (they never change the optimum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Symmetry {
    /// None.
    None,
    /// GPU loads non-increasing inside each node.
    LoadOrder,
    /// The heaviest expert on GPU 0 (ignored with the cross-node term, where GPUs of different nodes differ).
    #[default]
    FixHeaviest,
}

/// The all-to-all term of the objective: tokens that cross node boundaries, weighted.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossNode {
    /// Tokens each source rank sends each expert (`source_loads[rank][expert]`); one row per GPU of the group
    /// (rank `r` sits on GPU `r`).
    pub source_loads: Vec<Vec<f64>>,
    /// GPUs per node (rank and GPU `g` are on node `g / gpus_per_node`).
    pub gpus_per_node: usize,
    /// Objective weight of one cross-node token relative to one token on the busiest GPU.
    pub weight: f64,
}

/// Knobs of [`exact_placement`].
#[derive(Debug, Clone, PartialEq)]
pub struct ExactOptions {
    /// The solver.
    pub solver: ExactSolver,
    /// Wall-clock limit of the solve, seconds.
    pub time_limit_s: f64,
    /// Relative gap at which the solver may stop and call its placement optimal (HiGHS's default, 1e-4: within
    /// 0.01% of the best possible busiest load).
    pub mip_gap: f64,
    /// Largest `experts x gpus` accepted (the refusal names a smaller instance).
    pub max_cells: usize,
    /// Symmetry breaking.
    pub symmetry: Symmetry,
    /// A placement to start from (with its shares, or with balanced shares when that is better): the solver's first
    /// incumbent and, without the cross-node term, an upper bound that tightens the model; the result is never
    /// worse than it (without the cross-node term).
    pub warm_start: Option<Placement>,
    /// Optional all-to-all term.
    pub cross_node: Option<CrossNode>,
}

impl Default for ExactOptions {
    fn default() -> Self {
        ExactOptions {
            solver: ExactSolver::Microlp,
            time_limit_s: 60.0,
            mip_gap: 1e-4,
            max_cells: DEFAULT_MAX_CELLS,
            symmetry: Symmetry::FixHeaviest,
            warm_start: None,
            cross_node: None,
        }
    }
}

/// Default bound on `experts x gpus`: 32 experts on 16 GPUs.
pub const DEFAULT_MAX_CELLS: usize = 512;

/// The exact placement and what is known of its optimality.
#[derive(Debug, Clone, PartialEq)]
pub struct ExactSolution {
    /// The placement, every slot full, with the token shares of the solution.
    pub placement: Placement,
    /// Its busiest GPU's tokens (with its shares).
    pub max_load: f64,
    /// A lower bound on any placement's busiest load: [`lower_bound`].
    pub lower_bound: f64,
    /// The solver that ran (`"microlp"`, `"highs"`, or `"none"` when there was nothing to solve).
    pub solver: &'static str,
    /// Whether the solver proved optimality, within [`ExactOptions::mip_gap`] (false: stopped by the time limit
    /// with the best placement found).
    pub optimal: bool,
    /// Wall-clock time of the solve, ms (building the model included).
    pub solve_ms: f64,
    /// Tokens that cross node boundaries under the solution's shares, when the cross-node term was asked for.
    pub cross_node_tokens: Option<f64>,
}

/// Why [`exact_placement`] gave no solution.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExactError {
    /// More expert x GPU pairs than the limit.
    #[error(
        "exact placement: {experts} experts x {gpus} GPUs = {cells} expert-GPU pairs is over the limit of {limit}; \
         fix: a smaller instance (e.g. {suggest}), or a larger limit with a time limit"
    )]
    TooLarge {
        /// Experts.
        experts: usize,
        /// GPUs.
        gpus: usize,
        /// `experts * gpus`.
        cells: usize,
        /// The limit.
        limit: usize,
        /// A smaller instance that fits, in words.
        suggest: String,
    },
    /// Loads that are not finite non-negative token counts, no GPU, no expert, or too few slots.
    #[error("exact placement: {0}")]
    Invalid(String),
    /// The solver asked for is not in this build.
    #[error("exact placement: solver `{0}` is not in this build; fix: build with `--features highs` or use microlp")]
    Unavailable(&'static str),
    /// The solver failed (or found nothing within the time limit).
    #[error("exact placement: {solver}: {reason}")]
    Solver {
        /// The solver.
        solver: &'static str,
        /// Its message.
        reason: String,
    },
    /// The placement built from the solution is invalid (a bug).
    #[error(transparent)]
    Placement(#[from] PlacementError),
}

/// A lower bound on the busiest GPU's load of any placement with token shares: the mean GPU load, and the
/// heaviest expert spread over as many GPUs as the spare slots allow (`G * S - E` spare slots give an expert at
/// most `1 + G * S - E` replicas, on at most `G` GPUs).
pub fn lower_bound(loads: &[f64], gpus: usize, slots_per_gpu: usize) -> f64 {
    let g = gpus.max(1);
    let total: f64 = loads.iter().sum();
    let spare = (g * slots_per_gpu).saturating_sub(loads.len());
    let spread = (1 + spare).min(g) as f64;
    let heaviest = loads.iter().copied().fold(0.0, f64::max);
    (total / g as f64).max(heaviest / spread)
}

/// The busiest GPU's load of `placement` for `loads` when its replicas' shares are balanced the way the
/// heuristic balances them ([`super::shares::balance_shares`]): the number the heuristic is compared with.
pub fn balanced_max_load(placement: &Placement, loads: &[f64]) -> Result<f64, PlacementError> {
    if placement.replica_counts().iter().all(|&c| c <= 1) {
        return Ok(placement.gpu_loads(loads).into_iter().fold(0.0, f64::max));
    }
    Ok(super::shares::balance_shares(placement, loads)?.1)
}

/// A smaller instance that fits `limit`, in words.
fn suggest(experts: usize, gpus: usize, limit: usize) -> String {
    let g = (limit / experts.max(1)).clamp(1, gpus);
    if g >= 2 && experts * g <= limit {
        return format!("{experts} experts on {g} GPUs");
    }
    let e = (limit / gpus.max(1)).max(1);
    format!("{e} experts on {gpus} GPUs")
}

/// Everything the model needs, in normalised units (loads divided by `scale`).
struct Instance {
    e: usize,
    g: usize,
    s: usize,
    loads: Vec<f64>,
    scale: f64,
    /// Per expert, the fraction of its tokens each node sends it (`[expert][node]`), and the node of each GPU.
    cross: Option<(Vec<Vec<f64>>, Vec<usize>, f64)>,
}

/// The exact placement of `loads.len()` experts on `gpus` GPUs with `slots_per_gpu` slots each (see the module
/// documentation for the model).
pub fn exact_placement(
    loads: &[f64],
    gpus: usize,
    slots_per_gpu: usize,
    opts: &ExactOptions,
) -> Result<ExactSolution, ExactError> {
    let start = Instant::now();
    let (e, g, s) = (loads.len(), gpus, slots_per_gpu);
    if e == 0 || g == 0 || s == 0 {
        return Err(ExactError::Invalid(format!("{e} experts on {g} GPUs x {s} slots: all must be at least 1")));
    }
    if g * s < e {
        return Err(ExactError::Invalid(format!(
            "{g} GPUs x {s} slots cannot hold {e} experts; fix: {} slots per GPU or more",
            e.div_ceil(g)
        )));
    }
    if let Some(x) = loads.iter().position(|x| !x.is_finite() || *x < 0.0) {
        return Err(ExactError::Invalid(format!(
            "the load of expert {x} is {}: loads must be finite and non-negative token counts",
            loads[x]
        )));
    }
    if e * g > opts.max_cells {
        return Err(ExactError::TooLarge {
            experts: e,
            gpus: g,
            cells: e * g,
            limit: opts.max_cells,
            suggest: suggest(e, g, opts.max_cells),
        });
    }
    if !opts.solver.available() {
        return Err(ExactError::Unavailable(opts.solver.name()));
    }
    if opts.time_limit_s.is_nan() || opts.time_limit_s <= 0.0 {
        return Err(ExactError::Invalid(format!("time limit {} s: must be positive", opts.time_limit_s)));
    }
    if !opts.mip_gap.is_finite() || !(0.0..1.0).contains(&opts.mip_gap) {
        return Err(ExactError::Invalid(format!("relative MIP gap {}: must be in [0, 1)", opts.mip_gap)));
    }
    let lb = lower_bound(loads, g, s);
    let total: f64 = loads.iter().sum();
    let cross = match &opts.cross_node {
        Some(c) => Some(cross_fractions(c, loads, g)?),
        None => None,
    };
    if total <= 0.0 {
        // Nothing to balance: any placement is optimal.
        let placement = Placement::contiguous(g, s, e)?;
        return Ok(ExactSolution {
            placement,
            max_load: 0.0,
            lower_bound: lb,
            solver: "none",
            optimal: true,
            solve_ms: start.elapsed().as_secs_f64() * 1e3,
            cross_node_tokens: cross.as_ref().map(|_| 0.0),
        });
    }
    let scale = total / g as f64;
    let inst = Instance { e, g, s, loads: loads.iter().map(|x| x / scale).collect(), scale, cross };
    let warm = match &opts.warm_start {
        Some(p) if p.gpus == g && p.slots_per_gpu == s && p.experts == e => {
            p.check()?;
            // Its shares as given, or balanced when that is better (even splits, or none given).
            let mut best = p.clone();
            if p.replica_counts().iter().any(|&c| c > 1) {
                let (q, m) = super::shares::balance_shares(p, loads)?;
                if m < p.gpu_loads(loads).into_iter().fold(0.0, f64::max) {
                    best = q;
                }
            }
            Some(best)
        }
        Some(p) => {
            return Err(ExactError::Invalid(format!(
                "warm start has {} GPUs x {} slots and {} experts, the instance {g} x {s} and {e}",
                p.gpus, p.slots_per_gpu, p.experts
            )));
        }
        None => None,
    };
    // The warm start relabelled to satisfy the symmetry-breaking constraints (a hint that breaks them is ignored).
    let warm = warm.map(|p| relabel_for_symmetry(&p, loads, opts.symmetry, inst.cross.as_ref().map(|c| &c.1[..])));
    let (y_val, t_val, optimal) = solve(&inst, opts, lb / scale, warm.as_ref())?;
    let mut placement = build_placement(&inst, &y_val, &t_val)?;
    let mut max_load = placement.gpu_loads(loads).into_iter().fold(0.0, f64::max);
    if inst.cross.is_none() {
        // Shares are stored in parts per million: keep whichever of the solver's shares and the flow-balanced ones
        // is better after rounding (they agree up to the rounding and the solvers' tolerances), and never return
        // worse than the warm start (a solver may drop its hint).
        if let Ok((p, m)) = super::shares::balance_shares(&placement, loads)
            && m < max_load
        {
            placement = p;
            max_load = m;
        }
        if let Some(w) = warm {
            let m = w.gpu_loads(loads).into_iter().fold(0.0, f64::max);
            if m < max_load {
                placement = w;
                max_load = m;
            }
        }
    }
    let cross_node_tokens = opts.cross_node.as_ref().map(|c| cross_node_tokens(&placement, c));
    Ok(ExactSolution {
        placement,
        max_load,
        lower_bound: lb,
        solver: opts.solver.name(),
        optimal,
        solve_ms: start.elapsed().as_secs_f64() * 1e3,
        cross_node_tokens,
    })
}

/// `placement` with its GPUs relabelled (whole GPUs swapped, shares kept) so that it satisfies the
/// symmetry-breaking constraints: the heaviest expert on GPU 0, or the GPUs' loads non-increasing inside each node.
fn relabel_for_symmetry(
    placement: &Placement,
    loads: &[f64],
    symmetry: Symmetry,
    nodes: Option<&[usize]>,
) -> Placement {
    let g = placement.gpus;
    let mut order: Vec<usize> = (0..g).collect();
    match symmetry {
        Symmetry::None => return placement.clone(),
        Symmetry::FixHeaviest => {
            if nodes.is_some() {
                return placement.clone();
            }
            let h = (0..loads.len()).max_by(|&a, &b| loads[a].total_cmp(&loads[b]).then(b.cmp(&a))).unwrap_or(0);
            if let Some(gg) = (0..g).find(|&gg| placement.gpu_slots(gg).contains(&(h as u32))) {
                order.swap(0, gg);
            }
        }
        Symmetry::LoadOrder => {
            let l = placement.gpu_loads(loads);
            let node = |gg: usize| nodes.map(|n| n[gg]).unwrap_or(0);
            order.sort_by(|&a, &b| node(a).cmp(&node(b)).then(l[b].total_cmp(&l[a])).then(a.cmp(&b)));
        }
    }
    let s = placement.slots_per_gpu;
    let mut out = placement.clone();
    for (new, &old) in order.iter().enumerate() {
        out.slots[new * s..(new + 1) * s].copy_from_slice(placement.gpu_slots(old));
        if let (Some(dst), Some(src)) = (out.shares.as_mut(), placement.shares.as_ref()) {
            dst[new * s..(new + 1) * s].copy_from_slice(&src[old * s..(old + 1) * s]);
        }
    }
    out
}

/// Per expert, the fraction of its tokens each node sends (`[expert][node]`), each GPU's node, and the weight.
#[allow(clippy::type_complexity)]
fn cross_fractions(c: &CrossNode, loads: &[f64], g: usize) -> Result<(Vec<Vec<f64>>, Vec<usize>, f64), ExactError> {
    let e = loads.len();
    if c.source_loads.len() != g || c.source_loads.iter().any(|r| r.len() != e) {
        return Err(ExactError::Invalid(format!(
            "cross-node term: source loads must have one row per GPU ({g}) of one load per expert ({e})"
        )));
    }
    if c.source_loads.iter().flatten().any(|x| !x.is_finite() || *x < 0.0) || !c.weight.is_finite() || c.weight < 0.0 {
        return Err(ExactError::Invalid("cross-node term: source loads and weight must be finite, >= 0".into()));
    }
    let gpn = c.gpus_per_node.clamp(1, g);
    let nodes = g.div_ceil(gpn);
    let node_of: Vec<usize> = (0..g).map(|x| x / gpn).collect();
    let mut frac = vec![vec![0.0; nodes]; e];
    for (r, row) in c.source_loads.iter().enumerate() {
        for (x, &v) in row.iter().enumerate() {
            frac[x][node_of[r]] += v;
        }
    }
    for f in frac.iter_mut() {
        let sum: f64 = f.iter().sum();
        for v in f.iter_mut() {
            *v = if sum > 0.0 { *v / sum } else { 0.0 };
        }
    }
    Ok((frac, node_of, c.weight))
}

/// Tokens that cross node boundaries when every source rank splits its tokens by the placement's shares.
pub fn cross_node_tokens(placement: &Placement, c: &CrossNode) -> f64 {
    let g = placement.gpus;
    let gpn = c.gpus_per_node.clamp(1, g.max(1));
    let cnt = placement.replica_counts();
    let mut out = 0.0;
    for (slot, &x) in placement.slots.iter().enumerate() {
        let share = placement.share(slot, &cnt);
        let node = placement.gpu_of_slot(slot) / gpn;
        for (r, row) in c.source_loads.iter().enumerate().take(g) {
            if r / gpn != node {
                out += row.get(x as usize).copied().unwrap_or(0.0) * share;
            }
        }
    }
    out
}

/// Builds and solves the MILP; returns `y` (presence) and `t` (normalised tokens) per expert and GPU, and
/// whether the solver proved optimality.
// Expert x GPU matrices of variables and values: index loops are the clear form.
#[allow(clippy::type_complexity, clippy::needless_range_loop)]
fn solve(
    inst: &Instance,
    opts: &ExactOptions,
    lb: f64,
    warm: Option<&Placement>,
) -> Result<(Vec<Vec<f64>>, Vec<Vec<f64>>, bool), ExactError> {
    let (e, g, s) = (inst.e, inst.g, inst.s);
    let l = &inst.loads;
    // An upper bound on the optimum (normalised) from the warm start tightens `t <= min(l, U) * y`; with the
    // cross-node term the optimum's busiest load may exceed the warm start's, so no bound then.
    let ub = match (warm, &inst.cross) {
        (Some(p), None) => {
            let raw: Vec<f64> = l.iter().map(|x| x * inst.scale).collect();
            let m = p.gpu_loads(&raw).into_iter().fold(0.0, f64::max) / inst.scale;
            (m * (1.0 + 1e-6) + 1e-9).max(lb)
        }
        _ => f64::INFINITY,
    };
    let mut vars = ProblemVariables::new();
    let y: Vec<Vec<Variable>> = (0..e).map(|_| (0..g).map(|_| vars.add(variable().binary())).collect()).collect();
    let t: Vec<Vec<Variable>> =
        (0..e).map(|x| (0..g).map(|_| vars.add(variable().min(0.0).max(l[x].min(ub)))).collect()).collect();
    let z = vars.add(variable().min(lb * (1.0 - 1e-9)));
    let mut cons: Vec<Constraint> = Vec::new();
    for x in 0..e {
        let tx: Expression = t[x].iter().sum();
        cons.push(constraint!(tx == l[x]));
        let yx: Expression = y[x].iter().sum();
        cons.push(constraint!(yx >= 1.0));
        for gg in 0..g {
            cons.push(constraint!(t[x][gg] <= l[x].min(ub) * y[x][gg]));
        }
    }
    let gpu_load = |gg: usize| -> Expression { (0..e).map(|x| t[x][gg]).sum() };
    for gg in 0..g {
        let yg: Expression = (0..e).map(|x| y[x][gg]).sum();
        cons.push(constraint!(yg <= s as f64));
        cons.push(constraint!(gpu_load(gg) <= z));
    }
    let node_of = |gg: usize| inst.cross.as_ref().map(|c| c.1[gg]).unwrap_or(0);
    match opts.symmetry {
        Symmetry::None => {}
        Symmetry::LoadOrder => {
            for gg in 0..g.saturating_sub(1) {
                if node_of(gg) == node_of(gg + 1) {
                    cons.push(constraint!(gpu_load(gg) >= gpu_load(gg + 1)));
                }
            }
        }
        Symmetry::FixHeaviest => {
            if inst.cross.is_none() {
                let h = (0..e).max_by(|&a, &b| l[a].total_cmp(&l[b]).then(b.cmp(&a))).unwrap_or(0);
                cons.push(constraint!(y[h][0] == 1.0));
            }
        }
    }
    // Objective: the busiest load, plus the weighted cross-node tokens:
    // sum_e sum_n A[n,e] (1 - T[e,n] / l_e) = sum_e l_e - sum_e sum_g frac[e][node(g)] t[e,g].
    let mut objective: Expression = z.into();
    if let Some((frac, nodes, w)) = &inst.cross
        && *w > 0.0
    {
        let constant: f64 = l.iter().sum();
        let mut local = Expression::from(0.0);
        for x in 0..e {
            for gg in 0..g {
                local += frac[x][nodes[gg]] * t[x][gg];
            }
        }
        objective += *w * (constant - local);
    }
    let initial: Option<Vec<(Variable, f64)>> = warm.map(|p| {
        let cnt = p.replica_counts();
        let mut tv = vec![vec![0.0; g]; e];
        let mut yv = vec![vec![0.0; g]; e];
        for (slot, &x) in p.slots.iter().enumerate() {
            let gg = p.gpu_of_slot(slot);
            yv[x as usize][gg] = 1.0;
            tv[x as usize][gg] += l[x as usize] * p.share(slot, &cnt);
        }
        let mut v = Vec::with_capacity(2 * e * g + 1);
        let mut zmax: f64 = 0.0;
        for gg in 0..g {
            zmax = zmax.max((0..e).map(|x| tv[x][gg]).sum());
        }
        for x in 0..e {
            for gg in 0..g {
                v.push((y[x][gg], yv[x][gg]));
                v.push((t[x][gg], tv[x][gg].min(l[x].min(ub))));
            }
        }
        v.push((z, zmax.max(lb)));
        v
    });
    let problem = vars.minimise(objective);
    let read = |val: &dyn Fn(Variable) -> f64| {
        let yv: Vec<Vec<f64>> = y.iter().map(|r| r.iter().map(|&v| val(v)).collect()).collect();
        let tv: Vec<Vec<f64>> = t.iter().map(|r| r.iter().map(|&v| val(v)).collect()).collect();
        (yv, tv)
    };
    let name = opts.solver.name();
    let fail = |reason: String| ExactError::Solver { solver: name, reason };
    match opts.solver {
        ExactSolver::Microlp => {
            let mut m = problem
                .using(good_lp::microlp)
                .with_time_limit(opts.time_limit_s)
                .with_mip_gap(opts.mip_gap as f32)
                .map_err(|x| fail(x.to_string()))?;
            if let Some(init) = initial {
                m = m.with_initial_solution(init);
            }
            let sol = m.with_all(cons).solve().map_err(|x| fail(x.to_string()))?;
            let (yv, tv) = read(&|v| sol.value(v));
            Ok((yv, tv, proven(sol.status())))
        }
        ExactSolver::Highs => solve_highs(problem, cons, initial, opts, &read).map_err(fail),
    }
}

/// Whether a solver's status proves optimality: optimal, or stopped within the requested relative gap.
fn proven(status: SolutionStatus) -> bool {
    matches!(status, SolutionStatus::Optimal | SolutionStatus::GapLimit)
}

/// HiGHS, one thread (layers are solved in parallel by the caller).
#[cfg(feature = "highs")]
#[allow(clippy::type_complexity)]
fn solve_highs(
    problem: good_lp::variable::UnsolvedProblem,
    cons: Vec<Constraint>,
    initial: Option<Vec<(Variable, f64)>>,
    opts: &ExactOptions,
    read: &dyn Fn(&dyn Fn(Variable) -> f64) -> (Vec<Vec<f64>>, Vec<Vec<f64>>),
) -> Result<(Vec<Vec<f64>>, Vec<Vec<f64>>, bool), String> {
    let mut m = problem
        .using(good_lp::highs)
        .set_time_limit(opts.time_limit_s)
        .set_threads(1)
        .set_mip_rel_gap(opts.mip_gap as f32)
        .map_err(|x| x.to_string())?;
    if let Some(init) = initial {
        m = m.with_initial_solution(init);
    }
    let sol = m.with_all(cons).solve().map_err(|x| x.to_string())?;
    let (yv, tv) = read(&|v| sol.value(v));
    Ok((yv, tv, proven(sol.status())))
}

#[cfg(not(feature = "highs"))]
#[allow(clippy::type_complexity)]
fn solve_highs(
    _problem: good_lp::variable::UnsolvedProblem,
    _cons: Vec<Constraint>,
    _initial: Option<Vec<(Variable, f64)>>,
    _opts: &ExactOptions,
    _read: &dyn Fn(&dyn Fn(Variable) -> f64) -> (Vec<Vec<f64>>, Vec<Vec<f64>>),
) -> Result<(Vec<Vec<f64>>, Vec<Vec<f64>>, bool), String> {
    Err("not in this build; fix: build with `--features highs`".into())
}

/// The placement of a solution: each GPU's experts (`y`), its spare slots on its heaviest expert (or, on a GPU
/// that holds nothing, on the expert with the most load), and the shares `t / l` split over an expert's slots on
/// a GPU.
fn build_placement(inst: &Instance, y: &[Vec<f64>], t: &[Vec<f64>]) -> Result<Placement, ExactError> {
    let (e, g, s) = (inst.e, inst.g, inst.s);
    let l = &inst.loads;
    let heaviest = (0..e).max_by(|&a, &b| l[a].total_cmp(&l[b]).then(b.cmp(&a))).unwrap_or(0);
    let mut slots: Vec<u32> = Vec::with_capacity(g * s);
    for gg in 0..g {
        let mut here: Vec<usize> = (0..e).filter(|&x| y[x][gg] > 0.5).collect();
        if here.len() > s {
            return Err(ExactError::Solver {
                solver: "exact",
                reason: format!("solution puts {} experts on GPU {gg} with {s} slots", here.len()),
            });
        }
        here.sort_by(|&a, &b| t[b][gg].total_cmp(&t[a][gg]).then(a.cmp(&b)));
        let fill = here.first().copied().unwrap_or(heaviest);
        slots.extend(here.iter().map(|&x| x as u32));
        slots.extend(std::iter::repeat_n(fill as u32, s - here.len()));
    }
    let placement = Placement::new(g, s, e, slots)?;
    // Shares: the expert's tokens on each GPU over its tokens, split evenly over its slots there; an expert with
    // no tokens splits evenly. Tokens on a GPU the solution does not place the expert on (solver noise) are zero.
    let mut per_gpu = vec![vec![0usize; g]; e];
    for (slot, &x) in placement.slots.iter().enumerate() {
        per_gpu[x as usize][placement.gpu_of_slot(slot)] += 1;
    }
    let frac: Vec<f64> = placement
        .slots
        .iter()
        .enumerate()
        .map(|(slot, &x)| {
            let (x, gg) = (x as usize, placement.gpu_of_slot(slot));
            if l[x] <= 0.0 {
                return 1.0;
            }
            (t[x][gg].max(0.0) / l[x]) / per_gpu[x][gg] as f64
        })
        .collect();
    Ok(placement.with_shares(&frac)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::switchyard::{SwitchyardOptions, switchyard_placement};
    use proptest::prelude::*;

    fn check_valid(p: &Placement, e: usize, g: usize, s: usize) {
        p.check().unwrap();
        assert_eq!((p.experts, p.gpus, p.slots_per_gpu), (e, g, s));
        assert_eq!(p.slots.len(), g * s, "every slot full");
        assert!(p.replica_counts().iter().all(|&c| c >= 1), "every expert placed");
        let shares = p.shares.as_ref().expect("shares");
        let mut sum = vec![0u64; e];
        for (&x, &v) in p.slots.iter().zip(shares) {
            sum[x as usize] += v as u64;
        }
        assert!(sum.iter().all(|&v| v == switchyard_cost::placement::SHARE_UNIT as u64), "{sum:?}");
    }

    #[test]
    fn permutation_by_hand() {
        // 4 experts on 2 GPUs x 2 slots, no spare slot: {8, 2} | {3, 3} = 10 | 6 is best ({8, 3} = 11).
        // Lower bound: the heaviest expert alone, 8.
        let loads = [8.0, 3.0, 3.0, 2.0];
        let sol = exact_placement(&loads, 2, 2, &ExactOptions { mip_gap: 0.0, ..Default::default() }).unwrap();
        check_valid(&sol.placement, 4, 2, 2);
        assert!(sol.optimal);
        assert!((sol.max_load - 10.0).abs() < 1e-6, "{}", sol.max_load);
        assert_eq!(sol.lower_bound, 8.0);
    }

    #[test]
    fn one_spare_slot_by_hand() {
        // 5 experts (9, 3, 3, 3, 3) on 3 GPUs x 2 slots: the spare slot replicates the 9; two GPUs hold it with one
        // 3 each (9 + 6 = 15 split 7.5 / 7.5), the third two 3s (6). Optimum 7.5, above the mean 7.
        let loads = [9.0, 3.0, 3.0, 3.0, 3.0];
        for symmetry in [Symmetry::None, Symmetry::LoadOrder, Symmetry::FixHeaviest] {
            let o = ExactOptions { symmetry, mip_gap: 0.0, ..Default::default() };
            let sol = exact_placement(&loads, 3, 2, &o).unwrap();
            check_valid(&sol.placement, 5, 3, 2);
            assert!(sol.optimal);
            assert!((sol.max_load - 7.5).abs() < 1e-5, "{symmetry:?}: {}", sol.max_load);
            assert_eq!(sol.placement.replica_counts()[0], 2);
            assert_eq!(sol.lower_bound, 7.0);
        }
    }

    #[cfg(feature = "highs")]
    #[test]
    fn highs_agrees_by_hand() {
        let loads = [9.0, 3.0, 3.0, 3.0, 3.0];
        let o = ExactOptions { solver: ExactSolver::Highs, mip_gap: 0.0, ..Default::default() };
        let sol = exact_placement(&loads, 3, 2, &o).unwrap();
        check_valid(&sol.placement, 5, 3, 2);
        assert!(sol.optimal && sol.solver == "highs");
        assert!((sol.max_load - 7.5).abs() < 1e-5, "{}", sol.max_load);
    }

    #[test]
    fn refuses_big_instances_and_bad_input() {
        let loads = vec![1.0; 64];
        let e = exact_placement(&loads, 16, 4, &ExactOptions::default()).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ExactError::TooLarge { .. }) && msg.contains("64 experts on 8 GPUs"), "{msg}");
        assert!(matches!(exact_placement(&[1.0; 5], 2, 2, &ExactOptions::default()), Err(ExactError::Invalid(_))));
        assert!(matches!(
            exact_placement(&[1.0, f64::NAN], 2, 1, &ExactOptions::default()),
            Err(ExactError::Invalid(_))
        ));
        if !cfg!(feature = "highs") {
            let o = ExactOptions { solver: ExactSolver::Highs, ..Default::default() };
            assert!(matches!(exact_placement(&[1.0, 2.0], 2, 1, &o), Err(ExactError::Unavailable("highs"))));
        }
        // No load: any placement, nothing to solve.
        let sol = exact_placement(&[0.0; 3], 2, 2, &ExactOptions::default()).unwrap();
        assert_eq!(sol.max_load, 0.0);
        assert!(sol.optimal);
    }

    #[test]
    fn warm_start_and_cross_node_term() {
        // 4 experts on 4 GPUs (2 nodes of 2) x 2 slots. Node 0 sends everything to experts 0 and 1, node 1 to 2 and
        // 3: with a heavy cross-node weight the optimum keeps every expert's tokens on its sending node.
        let loads = [40.0, 20.0, 30.0, 10.0];
        let src = vec![
            vec![20.0, 10.0, 0.0, 0.0],
            vec![20.0, 10.0, 0.0, 0.0],
            vec![0.0, 0.0, 15.0, 5.0],
            vec![0.0, 0.0, 15.0, 5.0],
        ];
        let cross = CrossNode { source_loads: src, gpus_per_node: 2, weight: 10.0 };
        let o = ExactOptions { cross_node: Some(cross.clone()), ..Default::default() };
        let sol = exact_placement(&loads, 4, 2, &o).unwrap();
        check_valid(&sol.placement, 4, 4, 2);
        assert!(sol.optimal);
        assert!(sol.cross_node_tokens.unwrap() < 1e-3, "{:?}", sol.cross_node_tokens);
        // Node 0 carries 60 tokens on 2 GPUs: 30 each at best.
        assert!((sol.max_load - 30.0).abs() < 1e-4, "{}", sol.max_load);
        // Without the term the busiest load is the mean, 25.
        let plain = exact_placement(&loads, 4, 2, &ExactOptions::default()).unwrap();
        assert!((plain.max_load - 25.0).abs() < 1e-4, "{}", plain.max_load);
        // A warm start gives the same optimum.
        let w = Placement::contiguous(4, 2, 4).unwrap();
        let warm = exact_placement(&loads, 4, 2, &ExactOptions { warm_start: Some(w), ..Default::default() }).unwrap();
        assert!((warm.max_load - 25.0).abs() < 1e-4 && warm.optimal, "{}", warm.max_load);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        #[test]
        fn between_the_bound_and_the_heuristic(
            loads in proptest::collection::vec(0.0f64..1000.0, 2..9),
            gpus in 2usize..5,
            extra in 0usize..2,
        ) {
            let e = loads.len();
            let slots = e.div_ceil(gpus) + extra;
            let sol = exact_placement(&loads, gpus, slots, &ExactOptions::default()).unwrap();
            check_valid(&sol.placement, e, gpus, slots);
            prop_assert!(sol.optimal);
            let opts = SwitchyardOptions { gpus_per_node: gpus, ..Default::default() };
            let heur = switchyard_placement(&loads, None, None, gpus, slots, &opts).unwrap();
            let h = balanced_max_load(&heur, &loads).unwrap();
            // Shares are whole parts per million of each expert's tokens.
            let tol = loads.iter().sum::<f64>() * 2e-6 * slots as f64 + 1e-6;
            // Optimal within the relative MIP gap (1e-4).
            prop_assert!(sol.max_load <= h * (1.0 + 1e-4) + tol, "exact {} > heuristic {}", sol.max_load, h);
            prop_assert!(sol.max_load >= sol.lower_bound - tol, "exact {} < bound {}", sol.max_load, sol.lower_bound);
            // The reported load is the placement's.
            let m = sol.placement.gpu_loads(&loads).into_iter().fold(0.0, f64::max);
            prop_assert!((m - sol.max_load).abs() <= 1e-9 * (1.0 + m));
        }
    }
}
