//! The cluster as a graph: GPUs, intra-node fabric, NICs and the network switch, with effective bandwidth and
//! latency between any two GPUs and within a group.
