//! The distributed MoE FFN: slots of experts spread over workers, replicas of hot experts, the
//! token exchange, and the gradient reduction over replicas.
//!
//! | file | job |
//! | --- | --- |
//! | [`segments`] | which routed rows go to which replica slot (token shares) |
//! | [`slots`] | one worker's slots: weights and Adam state, exportable per slot for migration |
//! | [`layer`] | forward / backward with the all-to-all exchanges; replica gradient sum |
//! | [`exec`] | where the local experts' FFNs run: CPU kernels or a CUDA GPU (cuBLAS) |
//! | [`fetch`] | the data-centric (Janus) forward / backward: experts travel to the tokens |

pub mod exec;
pub mod fetch;
pub mod layer;
pub mod segments;
pub mod slots;

pub use exec::ExpertDevice;
pub use layer::{DistMoeLayer, MoeLayerGrads, MoeSaved};
pub use slots::SlotStore;
