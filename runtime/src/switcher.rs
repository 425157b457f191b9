//! The switcher: keeps each layer's load window (the predictor's running sums, updated as each iteration's
//! loads are recorded) and asks the planner's online policy (`switchyard_planner::online::decide_windows`, the
//! same function the simulator replays) whether and where to move experts.

use switchyard_cost::{LoadMatrix, Placement};
use switchyard_planner::online::{Decision, LayerContext, PolicyConfig, PolicyState, decide_windows};
use switchyard_planner::window::LoadWindow;

/// History and policy state of a run.
#[derive(Debug, Clone)]
pub struct Switcher {
    /// The policy.
    pub config: PolicyConfig,
    state: PolicyState,
    contexts: Vec<LayerContext>,
    windows: Vec<LoadWindow>,
    last_call: Option<u64>,
}

impl Switcher {
    /// A switcher for layers priced by `contexts`, predicting with `config.predictor` (a window mean keeps its
    /// window's snapshots; the others keep none).
    pub fn new(config: PolicyConfig, contexts: Vec<LayerContext>) -> Self {
        let windows = contexts.iter().map(|c| LoadWindow::new(config.predictor, c.gpus_per_node)).collect();
        Self { config, state: PolicyState::default(), contexts, windows, last_call: None }
    }

    /// Records one iteration's loads (one matrix per layer: source worker x expert).
    pub fn record(&mut self, loads: &[LoadMatrix]) {
        for (w, l) in self.windows.iter_mut().zip(loads) {
            w.push(l);
        }
    }

    /// Asks the policy at `iteration` (after recording it) given the current placements.
    pub fn decide(&mut self, iteration: u64, current: &[Placement]) -> Decision {
        let since = self.last_call.map_or(1, |l| iteration.saturating_sub(l).max(1));
        self.last_call = Some(iteration);
        decide_windows(&self.config, &mut self.state, iteration, since, &self.windows, current, &self.contexts)
    }

    /// Modelled time of one iteration of every layer under `loads` and `placements`, ms (summed).
    pub fn modelled_ms(&self, loads: &[LoadMatrix], placements: &[Placement]) -> f64 {
        self.contexts.iter().zip(loads).zip(placements).map(|((c, l), p)| c.iteration_ms(l, p)).sum()
    }
}
