//! switchyard-planner: the plan space and its search, the pool of the best plan, placement algorithms,
//! routing traces, and exports of a plan to training frameworks.

pub mod export;
pub mod online;
pub mod placement;
pub mod pool;
pub mod profile;
pub mod search;
pub mod simulate;
pub mod space;
pub mod trace;
pub mod window;

pub use search::{RankedPlan, SearchOptions, SearchResult, search};
pub use space::SpaceOptions;
