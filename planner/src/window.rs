//! The predictor's state, kept at sampling time: each observation is added to running sums (and, for a window
//! mean, the one leaving the window taken back out), so that a decision reads a prediction that is ready, with
//! its column, row and per-node sums, instead of summing the window again.
//!
//! Sampling costs one pass over the new matrix and, in a full window, the matrix leaving it, taken together
//! ([`SummedLoad::replace`]): tens of microseconds per layer per iteration at 64 ranks x 256 experts
//! (`switchyard bench decision` reports it).

use std::collections::VecDeque;

use switchyard_cost::LoadMatrix;
use switchyard_cost::cost::SummedLoad;

use crate::online::Predictor;

/// One layer's load history as its predictor needs it: the prediction is `scale() x sums()`.
#[derive(Debug, Clone)]
pub struct LoadWindow {
    predictor: Predictor,
    gpus_per_node: usize,
    /// Window mean (and last): the observations in the window, oldest first.
    ring: VecDeque<LoadMatrix>,
    sums: Option<SummedLoad>,
    observed: usize,
}

impl LoadWindow {
    /// An empty window for `predictor`, grouping ranks into nodes of `gpus_per_node` for the per-node sums.
    pub fn new(predictor: Predictor, gpus_per_node: usize) -> LoadWindow {
        LoadWindow { predictor, gpus_per_node: gpus_per_node.max(1), ring: VecDeque::new(), sums: None, observed: 0 }
    }

    /// A window that has seen `history` (oldest first).
    pub fn from_history(predictor: Predictor, gpus_per_node: usize, history: &[&LoadMatrix]) -> LoadWindow {
        let mut w = LoadWindow::new(predictor, gpus_per_node);
        // Only the observations the predictor can still see matter for a window.
        let keep = window_len(predictor).unwrap_or(history.len());
        for m in &history[history.len().saturating_sub(keep)..] {
            w.push(m);
        }
        w
    }

    /// The predictor.
    pub fn predictor(&self) -> Predictor {
        self.predictor
    }

    /// Records one observation. A matrix of another shape than the ones before (or one whose data does not
    /// fill it) starts the window over.
    pub fn push(&mut self, m: &LoadMatrix) {
        let fits = self.sums.as_ref().is_some_and(|s| s.ranks() == m.ranks && s.experts() == m.experts)
            && m.counts.len() == m.ranks * m.experts;
        if !fits {
            self.ring.clear();
            self.sums = None;
            self.observed = 0;
            if m.counts.len() != m.ranks * m.experts {
                return;
            }
        }
        let sums = self.sums.get_or_insert_with(|| SummedLoad::zeros(m.ranks, m.experts, self.gpus_per_node));
        match self.predictor {
            Predictor::Ema { alpha } => {
                let a = alpha.clamp(1e-6, 1.0);
                if self.observed == 0 {
                    sums.add(m, 1.0).expect("shape checked");
                } else {
                    sums.scale(1.0 - a);
                    sums.add(m, a).expect("shape checked");
                }
                self.observed += 1;
            }
            Predictor::Last | Predictor::WindowMean { .. } => {
                let w = window_len(self.predictor).unwrap_or(1);
                // In a full window the observation leaving it is taken out in the same pass that adds the new one,
                // and its buffer takes the new one (no allocation per sample).
                while self.ring.len() > w {
                    let old = self.ring.pop_front().expect("not empty");
                    sums.add(&old, -1.0).expect("shape checked");
                }
                let copy = if self.ring.len() == w {
                    let mut old = self.ring.pop_front().expect("a full window");
                    sums.replace(m, &old).expect("shape checked");
                    old.counts.copy_from_slice(&m.counts);
                    old
                } else {
                    sums.add(m, 1.0).expect("shape checked");
                    m.clone()
                };
                self.ring.push_back(copy);
                self.observed = self.ring.len();
            }
        }
    }

    /// Nothing observed yet.
    pub fn is_empty(&self) -> bool {
        self.observed == 0
    }

    /// Observations the prediction rests on (for an exponential average: all so far).
    pub fn len(&self) -> usize {
        self.observed
    }

    /// The running sums (None before the first observation).
    pub fn sums(&self) -> Option<&SummedLoad> {
        self.sums.as_ref().filter(|_| self.observed > 0)
    }

    /// What the sums are multiplied by to give the prediction (1 / observations for a window mean).
    pub fn scale(&self) -> f64 {
        match self.predictor {
            Predictor::Ema { .. } => 1.0,
            _ => 1.0 / self.observed.max(1) as f64,
        }
    }

    /// The predicted load matrix (fractional), as [`Predictor::predict`] gives it.
    pub fn predicted(&self) -> Option<Vec<Vec<f64>>> {
        Some(self.sums()?.rows(self.scale()))
    }
}

/// Observations a predictor averages: 1 for the last, the window for a window mean, None (all) for an
/// exponential average.
fn window_len(predictor: Predictor) -> Option<usize> {
    match predictor {
        Predictor::Last => Some(1),
        Predictor::WindowMean { window } => Some(window.max(1)),
        Predictor::Ema { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn matrix(ranks: usize, experts: usize, seed: u64) -> LoadMatrix {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let counts = (0..ranks * experts)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                if state.is_multiple_of(4) { 0 } else { state % 3000 }
            })
            .collect();
        LoadMatrix { ranks, experts, counts }
    }

    fn bits(v: &[Vec<f64>]) -> Vec<u64> {
        v.iter().flatten().map(|x| x.to_bits()).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Windows of a power of two (and the last observation, and exponential averages) predict what
        /// `Predictor::predict` does, bit for bit; other windows to the last rounding.
        #[test]
        fn predicts_as_the_predictor(k in 0usize..8, n in 1usize..9, seed in 0u64..100_000, ranks in 1usize..12) {
            let predictor = match k {
                0 => Predictor::Last,
                1 => Predictor::Ema { alpha: 0.3 },
                2 => Predictor::Ema { alpha: 1.0 },
                w => Predictor::WindowMean { window: w - 2 },
            };
            let hist: Vec<LoadMatrix> = (0..n as u64).map(|i| matrix(ranks, 5, seed + i)).collect();
            let refs: Vec<&LoadMatrix> = hist.iter().collect();
            let mut win = LoadWindow::new(predictor, 4);
            for m in &refs {
                win.push(m);
            }
            let from = LoadWindow::from_history(predictor, 4, &refs);
            let want = predictor.predict(&refs).unwrap();
            for got in [win.predicted().unwrap(), from.predicted().unwrap()] {
                let w = match predictor { Predictor::WindowMean { window } => window.min(n), _ => 1 };
                if w.is_power_of_two() {
                    prop_assert_eq!(bits(&got), bits(&want));
                } else {
                    for (a, b) in got.iter().flatten().zip(want.iter().flatten()) {
                        prop_assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0));
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any sequence of matrices, of any shapes (empty ones, and data that does not fill them, included),
        /// is taken in without a panic, and the prediction has the shape of the last one that fits.
        #[test]
        fn any_shapes_are_taken_in(
            shapes in proptest::collection::vec((0usize..5, 0usize..5, any::<bool>()), 1..12),
            k in 0usize..4,
        ) {
            let predictor = [Predictor::Last, Predictor::WindowMean { window: 3 }, Predictor::Ema { alpha: 0.5 }, Predictor::WindowMean { window: 1 }][k];
            let mut w = LoadWindow::new(predictor, 2);
            for (i, &(r, e, broken)) in shapes.iter().enumerate() {
                let mut m = matrix(r, e, i as u64);
                if broken {
                    m.counts.push(1);
                }
                w.push(&m);
                match w.predicted() {
                    Some(p) => {
                        prop_assert!(!broken);
                        prop_assert_eq!(p.len(), r);
                        prop_assert!(p.iter().all(|row| row.len() == e));
                    }
                    None => prop_assert!(broken),
                }
            }
        }
    }

    #[test]
    fn a_new_shape_starts_over() {
        let mut w = LoadWindow::new(Predictor::WindowMean { window: 4 }, 2);
        assert!(w.is_empty() && w.predicted().is_none());
        w.push(&matrix(4, 3, 1));
        w.push(&matrix(4, 3, 2));
        assert_eq!(w.len(), 2);
        let m = matrix(4, 5, 3);
        w.push(&m);
        assert_eq!(w.len(), 1);
        assert_eq!(w.sums().unwrap(), &SummedLoad::from_matrix(&m, 2));
        // Broken data is not taken in.
        w.push(&LoadMatrix { ranks: 4, experts: 5, counts: vec![1; 3] });
        assert!(w.is_empty());
    }
}
