//! Errors of the placement algorithms: bad arguments (lengths, divisibility, loads), an invalid result
//! placement, a cost-model refusal, or EPLB tensors that do not describe a placement.

use switchyard_cost::PlacementError;

/// Why a placement algorithm could not produce a placement. Every input problem is reported, never a panic.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlacementAlgoError {
    /// The placement built (or given) breaks an invariant of [`switchyard_cost::Placement`].
    #[error(transparent)]
    Placement(#[from] PlacementError),
    /// A list has the wrong length.
    #[error("{what} has {got} entries, expected {expected}")]
    Length {
        /// What the list is.
        what: &'static str,
        /// Entries given.
        got: usize,
        /// Entries expected.
        expected: usize,
    },
    /// A load that is not a finite, non-negative token count.
    #[error("the load of expert {expert} is {value}: loads must be finite and non-negative token counts")]
    BadLoad {
        /// The expert.
        expert: usize,
        /// Its load.
        value: f64,
    },
    /// Arguments the algorithm cannot work with (a count of zero, a count that does not divide another, too few
    /// slots); the message says which and why.
    #[error("{algorithm}: {reason}")]
    Invalid {
        /// The algorithm (`"EPLB"`, `"SmartMoE"`, ...).
        algorithm: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The performance model refused the inputs (shapes that disagree).
    #[error("cost model: {0}")]
    Cost(String),
    /// EPLB tensors (`phy2log`, `log2phy`, `logcnt`) that are inconsistent or do not describe a placement.
    #[error("EPLB tensors: {0}")]
    EplbFormat(String),
}

impl PlacementAlgoError {
    /// An [`PlacementAlgoError::Invalid`] for `algorithm`.
    pub fn invalid(algorithm: &'static str, reason: impl Into<String>) -> Self {
        PlacementAlgoError::Invalid { algorithm, reason: reason.into() }
    }
}

/// Checks that `loads` are finite and non-negative (token counts).
pub fn check_loads(loads: &[f64]) -> Result<(), PlacementAlgoError> {
    match loads.iter().position(|x| !x.is_finite() || *x < 0.0) {
        Some(expert) => Err(PlacementAlgoError::BadLoad { expert, value: loads[expert] }),
        None => Ok(()),
    }
}
