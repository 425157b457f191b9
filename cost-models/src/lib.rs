//! switchyard-cost
