//! switchyard-kernels
