//! The switcher: keeps each layer's load history and asks the planner's online policy
//! (`switchyard_planner::online::decide`, the same function the simulator replays) whether and
//! where to move experts.

use switchyard_cost::{LoadMatrix, Placement};
use switchyard_planner::online::{Decision, LayerContext, PolicyConfig, PolicyState, decide};

/// History and policy state of a run.
#[derive(Debug, Clone)]
pub struct Switcher {
    /// The policy.
    pub config: PolicyConfig,
    state: PolicyState,
    contexts: Vec<LayerContext>,
    history: Vec<std::collections::VecDeque<LoadMatrix>>,
    keep: usize,
    last_call: Option<u64>,
}

impl Switcher {
    /// A switcher for layers priced by `contexts`, keeping the last `keep` load snapshots per layer.
    pub fn new(config: PolicyConfig, contexts: Vec<LayerContext>, keep: usize) -> Self {
        let layers = contexts.len();
        Self {
            config,
            state: PolicyState::default(),
            contexts,
            history: vec![Default::default(); layers],
            keep: keep.max(1),
            last_call: None,
        }
    }

    /// Records one iteration's loads (one matrix per layer: source worker x expert).
    pub fn record(&mut self, loads: Vec<LoadMatrix>) {
        for (h, l) in self.history.iter_mut().zip(loads) {
            if h.len() == self.keep {
                h.pop_front();
            }
            h.push_back(l);
        }
    }

    /// Asks the policy at `iteration` (after recording it) given the current placements.
    pub fn decide(&mut self, iteration: u64, current: &[Placement]) -> Decision {
        let since = self.last_call.map_or(1, |l| iteration.saturating_sub(l).max(1));
        self.last_call = Some(iteration);
        let hist: Vec<Vec<&LoadMatrix>> = self.history.iter().map(|h| h.iter().collect()).collect();
        decide(&self.config, &mut self.state, iteration, since, &hist, current, &self.contexts)
    }

    /// Modelled time of one iteration of every layer under `loads` and `placements`, ms (summed).
    pub fn modelled_ms(&self, loads: &[LoadMatrix], placements: &[Placement]) -> f64 {
        self.contexts.iter().zip(loads).zip(placements).map(|((c, l), p)| c.iteration_ms(l, p)).sum()
    }
}
