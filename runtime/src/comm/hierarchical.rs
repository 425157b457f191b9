//! The 2D (hierarchical) all-to-all: first inside each node, then between nodes.
//!
//! Rank `r` sits on node `r / gpus_per_node` at local index `r % gpus_per_node`. Step 1 (intra-node)
//! sends to local index `l` everything bound for local index `l` on any node; step 2 (inter-node,
//! among the ranks with the same local index) forwards it to the right node. Each rank thus sends
//! `gpus_per_node - 1` intra-node and `nodes - 1` inter-node messages instead of `size - 1` flat ones,
//! at the price of moving the bytes twice. The result is byte-identical to the flat
//! [`Communicator::all_to_all_v`].

use super::{CommError, CommResult, Communicator};

const OP: &str = "hierarchical all_to_all_v";

/// Intra-node and inter-node sub-groups of one communicator, for the 2D all-to-all.
pub struct Hierarchical {
    gpus_per_node: usize,
    nodes: usize,
    rank: usize,
    size: usize,
    /// Ranks on this node, ordered by local index.
    intra: Box<dyn Communicator>,
    /// Ranks with this rank's local index, ordered by node.
    inter: Box<dyn Communicator>,
}

impl std::fmt::Debug for Hierarchical {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hierarchical")
            .field("gpus_per_node", &self.gpus_per_node)
            .field("nodes", &self.nodes)
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish()
    }
}

impl Hierarchical {
    /// Collective over `comm`: splits it into the intra-node and inter-node groups. Fails with
    /// [`CommError::Invalid`] unless `gpus_per_node > 0` divides `comm.size()`.
    pub fn new(comm: &dyn Communicator, gpus_per_node: usize) -> CommResult<Self> {
        let (rank, size) = (comm.rank(), comm.size());
        if gpus_per_node == 0 || size % gpus_per_node != 0 {
            return Err(CommError::Invalid {
                rank,
                op: "hierarchical",
                reason: format!("gpus_per_node = {gpus_per_node} must be positive and divide the group size {size}"),
            });
        }
        let (node, local) = (rank / gpus_per_node, rank % gpus_per_node);
        let intra = comm.split(node, local)?;
        let inter = comm.split(local, node)?;
        if intra.rank() != local
            || intra.size() != gpus_per_node
            || inter.rank() != node
            || inter.size() != size / gpus_per_node
        {
            return Err(CommError::Transport {
                rank,
                op: "hierarchical",
                reason: format!(
                    "split gave intra {}/{} and inter {}/{}, expected {local}/{gpus_per_node} and {node}/{}",
                    intra.rank(),
                    intra.size(),
                    inter.rank(),
                    inter.size(),
                    size / gpus_per_node
                ),
            });
        }
        Ok(Hierarchical { gpus_per_node, nodes: size / gpus_per_node, rank, size, intra, inter })
    }

    /// Ranks per node.
    pub fn gpus_per_node(&self) -> usize {
        self.gpus_per_node
    }

    /// Number of nodes.
    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// The intra-node group (rank = local index on the node).
    pub fn intra(&self) -> &dyn Communicator {
        self.intra.as_ref()
    }

    /// The inter-node group (rank = node index).
    pub fn inter(&self) -> &dyn Communicator {
        self.inter.as_ref()
    }

    /// The 2D all-to-all: same contract and result as [`Communicator::all_to_all_v`] on `comm`
    /// (the communicator this was built from).
    pub fn all_to_all_v(&self, comm: &dyn Communicator, send: &[&[u8]]) -> CommResult<Vec<Vec<u8>>> {
        if comm.rank() != self.rank || comm.size() != self.size {
            return Err(CommError::Invalid {
                rank: comm.rank(),
                op: OP,
                reason: format!(
                    "built for rank {} of {} but called with rank {} of {}",
                    self.rank,
                    self.size,
                    comm.rank(),
                    comm.size()
                ),
            });
        }
        if send.len() != self.size {
            return Err(CommError::Invalid {
                rank: self.rank,
                op: OP,
                reason: format!("got {} send buffers for a group of {} ranks", send.len(), self.size),
            });
        }
        let (g, nodes) = (self.gpus_per_node, self.nodes);

        // Step 1: to local index l, everything bound for (any node, l), in node order.
        let step1: Vec<Vec<u8>> = (0..g).map(|l| pack((0..nodes).map(|n| send[n * g + l]))).collect();
        let refs: Vec<&[u8]> = step1.iter().map(Vec::as_slice).collect();
        let got1 = self.intra.all_to_all_v(&refs)?;
        drop(step1);
        // got1[l][n]: from (my node, l) to (n, my local index).
        let got1: Vec<Vec<&[u8]>> = got1
            .iter()
            .enumerate()
            .map(|(l, b)| unpack(b, nodes, self.rank, "intra-node", l))
            .collect::<CommResult<_>>()?;

        // Step 2: to node n, what every local rank sent to (n, my local index), in local order.
        let step2: Vec<Vec<u8>> = (0..nodes).map(|n| pack(got1.iter().map(|parts| parts[n]))).collect();
        let refs: Vec<&[u8]> = step2.iter().map(Vec::as_slice).collect();
        let got2 = self.inter.all_to_all_v(&refs)?;
        drop(step2);

        // got2[n][l]: from (n, l) to this rank.
        let mut out = Vec::with_capacity(self.size);
        for (n, b) in got2.iter().enumerate() {
            out.extend(unpack(b, g, self.rank, "inter-node", n)?.into_iter().map(<[u8]>::to_vec));
        }
        Ok(out)
    }
}

/// Frames parts as `[len_0 .. len_{k-1}: u64 LE][part_0 .. part_{k-1}]`.
fn pack<'a>(parts: impl Iterator<Item = &'a [u8]> + Clone) -> Vec<u8> {
    let (count, bytes) = parts.clone().fold((0usize, 0usize), |(c, b), p| (c + 1, b + p.len()));
    let mut out = Vec::with_capacity(8 * count + bytes);
    for p in parts.clone() {
        out.extend_from_slice(&(p.len() as u64).to_le_bytes());
    }
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

/// Splits a [`pack`]ed buffer of `count` parts.
fn unpack<'a>(buf: &'a [u8], count: usize, rank: usize, step: &str, from: usize) -> CommResult<Vec<&'a [u8]>> {
    let malformed = || CommError::Transport {
        rank,
        op: OP,
        reason: format!("malformed {step} message from rank {from} ({} bytes, {count} parts expected)", buf.len()),
    };
    let header = count.checked_mul(8).filter(|&h| h <= buf.len()).ok_or_else(malformed)?;
    let mut parts = Vec::with_capacity(count);
    let mut offset = header;
    for i in 0..count {
        let mut word = [0u8; 8];
        word.copy_from_slice(&buf[8 * i..8 * i + 8]);
        let len = usize::try_from(u64::from_le_bytes(word)).map_err(|_| malformed())?;
        let end = offset.checked_add(len).filter(|&e| e <= buf.len()).ok_or_else(malformed)?;
        parts.push(&buf[offset..end]);
        offset = end;
    }
    if offset != buf.len() {
        return Err(malformed());
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::comm::local::{WorkerError, run_local};
    use proptest::prelude::*;

    fn bytes(seed: u64, src: usize, dst: usize, len: usize) -> Vec<u8> {
        (0..len).map(|i| (seed as usize ^ (src * 131 + dst * 17 + i * 7)) as u8).collect()
    }

    fn check(n: usize, g: usize, seed: u64, lens: &[usize]) -> Result<(), TestCaseError> {
        let out = run_local(n, Duration::from_secs(10), |c| {
            let me = c.rank();
            let h = Hierarchical::new(&c, g)?;
            let send: Vec<Vec<u8>> = (0..n).map(|j| bytes(seed, me, j, lens[(me * n + j) % lens.len()])).collect();
            let refs: Vec<&[u8]> = send.iter().map(Vec::as_slice).collect();
            let flat = c.all_to_all_v(&refs)?;
            let two_d = h.all_to_all_v(&c, &refs)?;
            Ok::<_, CommError>((flat, two_d))
        });
        for (r, res) in out.into_iter().enumerate() {
            let (flat, two_d) =
                res.map_err(|e: WorkerError<CommError>| TestCaseError::fail(format!("rank {r}: {e}")))?;
            prop_assert_eq!(&flat, &two_d, "rank {}", r);
        }
        Ok(())
    }

    #[test]
    fn rejects_a_node_size_that_does_not_divide() {
        let out = run_local(6, Duration::from_secs(10), |c| {
            let bad = [Hierarchical::new(&c, 4).err(), Hierarchical::new(&c, 0).err()];
            let h = Hierarchical::new(&c, 3)?;
            let wrong_len = h.all_to_all_v(&c, &[b"x"]).err();
            Ok::<_, CommError>((bad, wrong_len))
        });
        for res in out {
            let (bad, wrong_len) = res.unwrap();
            for e in bad.into_iter().chain([wrong_len]) {
                assert!(matches!(e, Some(CommError::Invalid { .. })), "{e:?}");
            }
        }
    }

    #[test]
    fn degenerate_layouts_match_flat() {
        // One node, one rank per node, and a single rank.
        check(4, 4, 1, &[0, 3, 10]).unwrap();
        check(4, 1, 2, &[5, 0]).unwrap();
        check(1, 1, 3, &[7]).unwrap();
        check(8, 2, 4, &[0]).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn matches_flat_all_to_all(
            layout in prop::sample::select(vec![(2usize, 1usize), (2, 2), (4, 2), (6, 2), (6, 3), (8, 2), (8, 4)]),
            seed in any::<u64>(),
            lens in prop::collection::vec(prop_oneof![Just(0usize), 0usize..600], 1..80),
        ) {
            check(layout.0, layout.1, seed, &lens)?;
        }
    }
}
