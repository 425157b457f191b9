//! Communication terms: ring collectives, point-to-point, and all-to-all from a per-pair byte matrix, flat and
//! hierarchical (2D).

use super::fabric::{Fabric, LinkInfo};

/// Ring all-reduce of `bytes` per GPU over `n` GPUs: `2 (n-1)/n * bytes / bw + 2 (n-1) * latency + launch`.
/// Zero for a group of one.
pub fn all_reduce_time_s(bytes: f64, n: u32, link: LinkInfo, launch_s: f64) -> f64 {
    if n <= 1 || bytes <= 0.0 {
        return 0.0;
    }
    let n = n as f64;
    2.0 * (n - 1.0) / n * bytes / link.per_gpu_bytes_per_s + 2.0 * (n - 1.0) * link.latency_s + launch_s
}

/// Ring reduce-scatter or all-gather of `bytes` (the full buffer) per GPU over `n` GPUs: half an all-reduce.
pub fn reduce_scatter_time_s(bytes: f64, n: u32, link: LinkInfo, launch_s: f64) -> f64 {
    if n <= 1 || bytes <= 0.0 {
        return 0.0;
    }
    let n = n as f64;
    (n - 1.0) / n * bytes / link.per_gpu_bytes_per_s + (n - 1.0) * link.latency_s + launch_s
}

/// One point-to-point message of `bytes`.
pub fn p2p_time_s(bytes: f64, link: LinkInfo) -> f64 {
    if bytes <= 0.0 { 0.0 } else { bytes / link.per_gpu_bytes_per_s + link.latency_s }
}

/// All-to-all where `bytes[s][d]` goes from GPU `gpus[s]` to GPU `gpus[d]` (global GPU indices, so the node of
/// each is known). Intra-node traffic and inter-node traffic move concurrently; the time is the slowest of: any
/// GPU's intra-node send or receive over its link, any node's inter-node send or receive over its NICs; plus
/// the latency of the messages. Flat: one message per peer with data. Hierarchical (2D): traffic is first
/// gathered within the node by destination, then sent between nodes in one message per node pair and GPU,
/// then scattered within the destination node: intra-node bytes grow (the extra hops) but messages fall from
/// `peers` to `gpus_per_node - 1 + nodes - 1`.
pub fn all_to_all_time_s(bytes: &[Vec<f64>], gpus: &[u32], fabric: &Fabric, hierarchical: bool) -> f64 {
    let g = gpus.len();
    if g <= 1 {
        return 0.0;
    }
    let node_of: Vec<u32> = gpus.iter().map(|&x| fabric.node_of(x)).collect();
    let node = |i: usize| node_of[i];
    let mut intra_send = vec![0.0; g];
    let mut intra_recv = vec![0.0; g];
    let mut nodes: Vec<u32> = gpus.iter().map(|&x| fabric.node_of(x)).collect();
    nodes.sort_unstable();
    nodes.dedup();
    let nidx = |n: u32| nodes.binary_search(&n).unwrap_or(0);
    let mut inter_send = vec![0.0; nodes.len()];
    let mut inter_recv = vec![0.0; nodes.len()];
    let nix: Vec<usize> = (0..g).map(|i| nidx(node(i))).collect();
    let mut gpus_on_node = vec![0u32; nodes.len()];
    for &n in &nix {
        gpus_on_node[n] += 1;
    }
    let mut max_peers_intra = 0usize;
    let mut max_peers_inter = 0usize;
    for s in 0..g {
        let (mut pi, mut pe) = (0, 0);
        for d in 0..g {
            let b = bytes[s][d];
            if s == d || b <= 0.0 {
                continue;
            }
            if nix[s] == nix[d] {
                intra_send[s] += b;
                intra_recv[d] += b;
                pi += 1;
            } else {
                inter_send[nix[s]] += b;
                inter_recv[nix[d]] += b;
                if hierarchical {
                    // Gathered to the GPU that talks to node(d), and scattered on arrival.
                    intra_send[s] += b;
                    intra_recv[d] += b;
                }
                pe += 1;
            }
        }
        max_peers_intra = max_peers_intra.max(pi);
        max_peers_inter = max_peers_inter.max(pe);
    }
    let intra_bw = |n: usize| fabric.intra_link(gpus_on_node[n]).per_gpu_bytes_per_s;
    let intra = (0..g).map(|i| intra_send[i].max(intra_recv[i]) / intra_bw(nix[i])).fold(0.0, f64::max);
    let inter = (0..nodes.len())
        .map(|n| inter_send[n].max(inter_recv[n]) / fabric.node_inter_bytes_per_s(gpus_on_node[n]))
        .fold(0.0, f64::max);
    let latency = if hierarchical {
        let k = gpus_on_node.iter().copied().max().unwrap_or(1) as f64;
        let remote_nodes = (nodes.len() as f64 - 1.0).max(0.0);
        let lat_inter = if max_peers_inter > 0 { remote_nodes * fabric.inter_latency_s } else { 0.0 };
        (k - 1.0) * fabric.intra_latency_s * 2.0 + lat_inter
    } else {
        max_peers_intra as f64 * fabric.intra_latency_s + max_peers_inter as f64 * fabric.inter_latency_s
    };
    let phases = if hierarchical && nodes.len() > 1 { 2.0 } else { 1.0 };
    if intra == 0.0 && inter == 0.0 {
        return 0.0;
    }
    if hierarchical && nodes.len() > 1 {
        // Phases run one after the other: gather, exchange, scatter (gather and scatter share intra bytes).
        intra + inter + latency + phases * fabric.collective_launch_s
    } else {
        intra.max(inter) + latency + fabric.collective_launch_s
    }
}

/// All-to-all of a plan-level (expected) workload: every GPU of a group of `size` GPUs (contiguous, `per_node` on
/// each node) sends `send_bytes` spread evenly over the group, and the busiest receives `recv_bytes`.
pub fn uniform_all_to_all_time_s(
    send_bytes: f64,
    recv_bytes: f64,
    size: u32,
    per_node: u32,
    fabric: &Fabric,
    hierarchical: bool,
) -> f64 {
    if size <= 1 || (send_bytes <= 0.0 && recv_bytes <= 0.0) {
        return 0.0;
    }
    let per_node = per_node.clamp(1, size);
    let nodes = size.div_ceil(per_node) as f64;
    let n = size as f64;
    let local_frac = (per_node as f64 - 1.0) / n;
    let remote_frac = (n - per_node as f64) / n;
    let vol = send_bytes.max(recv_bytes);
    let intra_link = fabric.intra_link(per_node).per_gpu_bytes_per_s;
    let mut intra = vol * local_frac / intra_link;
    let inter =
        if nodes > 1.0 { vol * remote_frac * per_node as f64 / fabric.node_inter_bytes_per_s(per_node) } else { 0.0 };
    if hierarchical && nodes > 1.0 {
        intra += vol * remote_frac / intra_link;
        let lat = (per_node as f64 - 1.0) * 2.0 * fabric.intra_latency_s + (nodes - 1.0) * fabric.inter_latency_s;
        intra + inter + lat + 2.0 * fabric.collective_launch_s
    } else {
        let lat = (per_node as f64 - 1.0) * fabric.intra_latency_s + (n - per_node as f64) * fabric.inter_latency_s;
        intra.max(inter) + lat + fabric.collective_launch_s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fabric() -> Fabric {
        Fabric::switched(2, 2, 100.0, 1.0, 10.0, 5.0, 1000.0, 0.5)
    }

    #[test]
    fn all_reduce_by_hand() {
        let l = LinkInfo { per_gpu_bytes_per_s: 10.0, latency_s: 1.0 };
        // n=4: 2*3/4*100/10 = 15 s + 6 latencies + launch 0.5.
        assert!((all_reduce_time_s(100.0, 4, l, 0.5) - 21.5).abs() < 1e-12);
        assert_eq!(all_reduce_time_s(100.0, 1, l, 0.5), 0.0);
        assert!((reduce_scatter_time_s(100.0, 4, l, 0.5) - 11.0).abs() < 1e-12);
    }

    #[test]
    fn flat_all_to_all_by_hand() {
        // GPUs 0,1 on node 0; 2,3 on node 1. Each sends 10 bytes to every other GPU.
        let b = vec![vec![0.0, 10.0, 10.0, 10.0]; 4].into_iter().enumerate().map(|(i, mut r)| {
            r[i] = 0.0;
            r
        });
        let b: Vec<Vec<f64>> = b.collect();
        let t = all_to_all_time_s(&b, &[0, 1, 2, 3], &fabric(), false);
        // intra: 10 bytes / 100 = 0.1 s; inter: a node sends 2 GPUs x 2 peers x 10 = 40 bytes / 10 = 4 s.
        // latency: 1 intra peer * 1 + 2 inter peers * 5 = 11; launch 0.5.
        assert!((t - (4.0 + 11.0 + 0.5)).abs() < 1e-12, "{t}");
        let h = all_to_all_time_s(&b, &[0, 1, 2, 3], &fabric(), true);
        // intra: (10 + 20 relayed) sent = 30/100 = 0.3; inter 4; latency (2-1)*1*2 + 1*5 = 7; 2 launches.
        assert!((h - (0.3 + 4.0 + 7.0 + 1.0)).abs() < 1e-12, "{h}");
    }

    #[test]
    fn uniform_matches_exact_on_uniform_traffic() {
        let b: Vec<Vec<f64>> = (0..4).map(|s| (0..4).map(|d| if s == d { 0.0 } else { 10.0 }).collect()).collect();
        // Each GPU sends 30 bytes to others + 10 to itself = 40 bytes spread over 4 GPUs.
        let exact = all_to_all_time_s(&b, &[0, 1, 2, 3], &fabric(), false);
        let unif = uniform_all_to_all_time_s(40.0, 40.0, 4, 2, &fabric(), false);
        assert!((exact - unif).abs() < 1e-9, "{exact} {unif}");
        let exact_h = all_to_all_time_s(&b, &[0, 1, 2, 3], &fabric(), true);
        let unif_h = uniform_all_to_all_time_s(40.0, 40.0, 4, 2, &fabric(), true);
        assert!((exact_h - unif_h).abs() < 1e-9, "{exact_h} {unif_h}");
    }
}
