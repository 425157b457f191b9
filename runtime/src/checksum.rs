//! A fast 64-bit checksum of `f32` data (four independent multiply-rotate lanes over the values'
//! bit patterns, then mixed): cheap next to a memory copy, and any changed bit changes it.
//! Used to verify migrated expert state and for the run's `param_checksum`.

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;

/// Streaming checksum; feed slices in a fixed order, then [`Checksum::finish`].
#[derive(Debug, Clone)]
pub struct Checksum {
    lanes: [u64; 4],
    len: u64,
}

impl Default for Checksum {
    fn default() -> Self {
        Self::new()
    }
}

#[inline]
fn round(acc: u64, v: u64) -> u64 {
    (acc ^ v.wrapping_mul(P2)).rotate_left(31).wrapping_mul(P1)
}

impl Checksum {
    /// An empty checksum.
    pub fn new() -> Self {
        Self { lanes: [P1, P2, P3, P1 ^ P3], len: 0 }
    }

    /// Adds `f32` values (their exact bit patterns).
    pub fn update_f32(&mut self, data: &[f32]) {
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            for l in 0..4 {
                let v = c[2 * l].to_bits() as u64 | ((c[2 * l + 1].to_bits() as u64) << 32);
                self.lanes[l] = round(self.lanes[l], v);
            }
        }
        for (i, x) in chunks.remainder().iter().enumerate() {
            self.lanes[i % 4] = round(self.lanes[i % 4], x.to_bits() as u64 | 0x1_0000_0000);
        }
        // Separates slices: [a, b] + [c] differs from [a] + [b, c].
        self.lanes[0] = round(self.lanes[0], data.len() as u64);
        self.len += data.len() as u64;
    }

    /// Adds one `u64` (counts, step numbers).
    pub fn update_u64(&mut self, v: u64) {
        self.lanes[1] = round(self.lanes[1], v ^ P3);
        self.len += 1;
    }

    /// The final value.
    pub fn finish(&self) -> u64 {
        let mut h = self.len.wrapping_mul(P3);
        for (i, l) in self.lanes.iter().enumerate() {
            h = (h ^ l.rotate_left(7 * i as u32 + 1)).wrapping_mul(P1);
        }
        h ^= h >> 29;
        h = h.wrapping_mul(P2);
        h ^ (h >> 32)
    }
}

/// Checksum of one slice.
pub fn checksum_f32(data: &[f32]) -> u64 {
    let mut c = Checksum::new();
    c.update_f32(data);
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_flipped_bit_changes_it(v in proptest::collection::vec(-1e3f32..1e3, 1..100), i in 0usize..100, bit in 0u32..32) {
            let i = i % v.len();
            let mut w = v.clone();
            w[i] = f32::from_bits(w[i].to_bits() ^ (1 << bit));
            prop_assert_ne!(checksum_f32(&v), checksum_f32(&w));
            prop_assert_eq!(checksum_f32(&v), checksum_f32(&v.clone()));
        }
    }

    #[test]
    fn slice_boundaries_count() {
        let mut a = Checksum::new();
        a.update_f32(&[1.0, 2.0]);
        a.update_f32(&[3.0]);
        let mut b = Checksum::new();
        b.update_f32(&[1.0]);
        b.update_f32(&[2.0, 3.0]);
        assert_ne!(a.finish(), b.finish());
    }
}
