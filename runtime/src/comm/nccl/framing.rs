//! Pure helpers of the NCCL communicator (no NCCL, no GPU): the header that gives NCCL's untagged
//! point-to-point messages a tag and a length, and the planning of variable-size exchanges from the sizes
//! the ranks exchanged first.

/// `"SYN1"`: the first word of every header, so a stream that fell out of step is detected.
pub const MAGIC: u32 = u32::from_le_bytes(*b"SYN1");

/// Bytes of an encoded [`Header`].
pub const HEADER_BYTES: usize = 16;

/// What precedes every payload: the tag (a user tag, or an internal collective's) and the payload's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The tag.
    pub tag: u32,
    /// Payload length in bytes.
    pub len_bytes: u64,
}

/// Why a header could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not [`HEADER_BYTES`] long.
    #[error("a message header must be {HEADER_BYTES} bytes, got {0}")]
    Length(usize),
    /// The magic word is wrong: the message stream with this peer is out of step.
    #[error("bad message header magic {0:#010x} (expected {MAGIC:#010x}): the stream with this peer is out of step")]
    Magic(u32),
}

impl Header {
    /// The 16 bytes on the wire: magic, tag, length (little-endian).
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&self.tag.to_le_bytes());
        out[8..].copy_from_slice(&self.len_bytes.to_le_bytes());
        out
    }

    /// Reads a header; fails on a wrong length or magic word.
    pub fn decode(bytes: &[u8]) -> Result<Header, FrameError> {
        if bytes.len() != HEADER_BYTES {
            return Err(FrameError::Length(bytes.len()));
        }
        let word = |r: std::ops::Range<usize>| -> u32 {
            let mut w = [0u8; 4];
            w.copy_from_slice(&bytes[r]);
            u32::from_le_bytes(w)
        };
        let magic = word(0..4);
        if magic != MAGIC {
            return Err(FrameError::Magic(magic));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[8..]);
        Ok(Header { tag: word(4..8), len_bytes: u64::from_le_bytes(len) })
    }
}

/// Where each peer's bytes sit in one contiguous buffer: `offsets[j]..offsets[j] + sizes[j]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Bytes (or elements) per peer.
    pub sizes: Vec<usize>,
    /// Start of each peer's part.
    pub offsets: Vec<usize>,
    /// Sum of the sizes.
    pub total: usize,
}

impl Layout {
    /// Packs `sizes` one after the other; `None` when the total overflows `usize`.
    pub fn packed(sizes: &[usize]) -> Option<Layout> {
        let mut offsets = Vec::with_capacity(sizes.len());
        let mut total = 0usize;
        for &s in sizes {
            offsets.push(total);
            total = total.checked_add(s)?;
        }
        Some(Layout { sizes: sizes.to_vec(), offsets, total })
    }

    /// The range of peer `j`.
    pub fn range(&self, j: usize) -> std::ops::Range<usize> {
        self.offsets[j]..self.offsets[j] + self.sizes[j]
    }
}

/// The plan of one variable all-to-all on rank `rank` of `n`: `matrix` is the all-gathered size matrix,
/// row `i` the sizes rank `i` sends to each rank (row-major `n x n`). Returns the send layout (this rank's
/// row) and the receive layout (this rank's column), or why the matrix is unusable.
pub fn all_to_all_plan(rank: usize, n: usize, matrix: &[u64]) -> Result<(Layout, Layout), String> {
    if rank >= n {
        return Err(format!("rank {rank} is out of range for {n} ranks"));
    }
    if Some(matrix.len()) != n.checked_mul(n) {
        return Err(format!("the size matrix has {} entries, expected {n} x {n}", matrix.len()));
    }
    let to_usize = |v: u64, i: usize, j: usize| {
        usize::try_from(v)
            .map_err(|_| format!("rank {i} sends {v} bytes to rank {j}: more than this machine can address"))
    };
    let send: Vec<usize> = (0..n).map(|j| to_usize(matrix[rank * n + j], rank, j)).collect::<Result<_, _>>()?;
    let recv: Vec<usize> = (0..n).map(|i| to_usize(matrix[i * n + rank], i, rank)).collect::<Result<_, _>>()?;
    let overflow = |what: &str| format!("the {what} sizes of rank {rank} add up to more than usize");
    Ok((
        Layout::packed(&send).ok_or_else(|| overflow("send"))?,
        Layout::packed(&recv).ok_or_else(|| overflow("receive"))?,
    ))
}

/// The receive layout of a variable all-gather: `sizes[i]` is rank `i`'s contribution.
pub fn all_gather_plan(sizes: &[u64]) -> Result<Layout, String> {
    let s: Vec<usize> = sizes
        .iter()
        .enumerate()
        .map(|(i, &v)| usize::try_from(v).map_err(|_| format!("rank {i} contributes {v} bytes: too many")))
        .collect::<Result<_, _>>()?;
    Layout::packed(&s).ok_or_else(|| "the all-gather's sizes add up to more than usize".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn headers_round_trip(tag in any::<u32>(), len_bytes in any::<u64>()) {
            let h = Header { tag, len_bytes };
            prop_assert_eq!(Header::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn corrupted_headers_are_rejected(tag in any::<u32>(), len_bytes in any::<u64>(), byte in 0usize..4, flip in 1u8..=255) {
            let mut b = Header { tag, len_bytes }.encode();
            b[byte] ^= flip;
            prop_assert!(matches!(Header::decode(&b), Err(FrameError::Magic(_))));
        }

        #[test]
        fn short_or_long_headers_are_rejected(len in 0usize..40) {
            prop_assume!(len != HEADER_BYTES);
            prop_assert_eq!(Header::decode(&vec![0u8; len]), Err(FrameError::Length(len)));
        }

        #[test]
        fn the_plans_of_all_ranks_agree(n in 1usize..6, seed in any::<u64>()) {
            // A random size matrix; what rank i sends to j must be what j expects from i.
            let mut x = seed;
            let matrix: Vec<u64> = (0..n * n).map(|_| { x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); x >> 54 }).collect();
            let plans: Vec<(Layout, Layout)> = (0..n).map(|r| all_to_all_plan(r, n, &matrix).unwrap()).collect();
            for i in 0..n {
                for j in 0..n {
                    prop_assert_eq!(plans[i].0.sizes[j], plans[j].1.sizes[i]);
                }
                let (send, recv) = &plans[i];
                prop_assert_eq!(send.total, send.sizes.iter().sum::<usize>());
                prop_assert_eq!(recv.total, recv.sizes.iter().sum::<usize>());
                // The ranges tile the buffer in rank order.
                let mut next = 0;
                for j in 0..n {
                    prop_assert_eq!(recv.range(j).start, next);
                    next = recv.range(j).end;
                }
                prop_assert_eq!(next, recv.total);
            }
        }
    }

    #[test]
    fn plans_by_hand() {
        // Rank 1 of 3: sends row 1, receives column 1.
        let m = [0, 5, 1, 2, 3, 4, 7, 8, 9];
        let (send, recv) = all_to_all_plan(1, 3, &m).unwrap();
        assert_eq!(send, Layout { sizes: vec![2, 3, 4], offsets: vec![0, 2, 5], total: 9 });
        assert_eq!(recv, Layout { sizes: vec![5, 3, 8], offsets: vec![0, 5, 8], total: 16 });
        assert!(all_to_all_plan(3, 3, &m).is_err());
        assert!(all_to_all_plan(0, 2, &m).unwrap_err().contains("9 entries"));
        assert!(all_to_all_plan(0, 2, &[u64::MAX, u64::MAX, 0, 0]).unwrap_err().contains("add up"));
        assert_eq!(all_gather_plan(&[3, 0, 2]).unwrap().offsets, vec![0, 3, 3]);
    }
}
