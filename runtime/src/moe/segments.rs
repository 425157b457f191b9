//! Which rows of a source's grouped buffer go to which slot.
//!
//! The source groups its routed rows by expert (the kernels' dispatch order). Expert `e`'s rows are
//! split among `e`'s replica slots in ascending slot order, contiguously, in proportion to the
//! placement's token shares (even shares when it has none). With one replica per expert the whole
//! run goes to that slot, so an expert sees its rows in the same order wherever it lives.

use switchyard_cost::Placement;

/// A contiguous run of grouped rows bound for one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Global slot index (`worker * slots_per_worker + local slot`).
    pub slot: usize,
    /// First row in the source's grouped buffer.
    pub start: usize,
    /// Number of rows.
    pub rows: usize,
}

/// Splits the grouped rows (`offsets[e]..offsets[e + 1]` for expert `e`) among the slots of
/// `placement`. Returns one segment per (expert, replica slot), possibly empty, ordered by slot
/// within each expert and by expert overall.
pub fn split_rows(placement: &Placement, offsets: &[usize]) -> Vec<Segment> {
    let replicas = placement.replica_counts();
    let expert_slots = placement.expert_slots();
    let mut out = Vec::with_capacity(placement.slots.len());
    for (e, slots) in expert_slots.iter().enumerate() {
        let (a, b) = (offsets[e], offsets[e + 1]);
        let n = b - a;
        let mut cum = 0.0f64;
        let mut prev = 0usize;
        for (i, &s) in slots.iter().enumerate() {
            cum += placement.share(s, &replicas);
            let cut = if i + 1 == slots.len() { n } else { ((n as f64 * cum).round() as usize).clamp(prev, n) };
            out.push(Segment { slot: s, start: a + prev, rows: cut - prev });
            prev = cut;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_replica_takes_every_row() {
        let p = Placement::new(2, 2, 4, vec![3, 1, 0, 2]).unwrap();
        let segs = split_rows(&p, &[0, 2, 5, 5, 9]);
        assert_eq!(
            segs,
            vec![
                Segment { slot: 2, start: 0, rows: 2 },
                Segment { slot: 1, start: 2, rows: 3 },
                Segment { slot: 3, start: 5, rows: 0 },
                Segment { slot: 0, start: 5, rows: 4 },
            ]
        );
    }

    proptest! {
        #[test]
        fn segments_cover_every_row_once(
            counts in proptest::collection::vec(0usize..50, 3),
            extra in proptest::collection::vec(0u32..3, 3),
        ) {
            // 3 experts, 2 workers x 3 slots: experts 0..3 plus 3 replicas chosen by `extra`.
            let mut slots = vec![0u32, 1, 2];
            slots.extend(extra.iter().copied());
            let p = Placement::new(2, 3, 3, slots).unwrap();
            let mut offsets = vec![0usize];
            for c in &counts { offsets.push(offsets.last().unwrap() + c); }
            let segs = split_rows(&p, &offsets);
            let mut covered = vec![0u32; *offsets.last().unwrap()];
            for s in &segs {
                let e = p.slots[s.slot] as usize;
                prop_assert!(offsets[e] <= s.start && s.start + s.rows <= offsets[e + 1]);
                for c in &mut covered[s.start..s.start + s.rows] { *c += 1; }
            }
            prop_assert!(covered.iter().all(|&c| c == 1));
        }
    }
}
