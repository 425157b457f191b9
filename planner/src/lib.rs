//! switchyard-planner
