//! bf16 storage (via the `half` crate) with f32 compute.
//!
//! With [`Storage::Bf16`], expert weights and the saved expert activations are held as bf16
//! (round to nearest even) and widened to f32 just before each GEMM, which accumulates in f32.
//! Inputs, outputs, biases and gradients stay f32.

use half::bf16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Element type of stored weights and saved activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    /// 32-bit floats (exact path).
    #[default]
    F32,
    /// bfloat16 storage, f32 compute and accumulation.
    Bf16,
}

/// A flat buffer held in either storage type.
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    /// f32 elements.
    F32(Vec<f32>),
    /// bf16 elements.
    Bf16(Vec<bf16>),
}

impl Default for Stored {
    fn default() -> Self {
        Stored::F32(Vec::new())
    }
}

/// Elements per rayon task for conversions.
const CHUNK: usize = 1 << 14;

/// Rounds `src` to bf16 into `dst` (same length; parallel).
pub fn f32_to_bf16(src: &[f32], dst: &mut [bf16]) {
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| d.convert_from_f32_slice(s));
}

/// Widens `src` to f32 into `dst` (same length; parallel).
pub fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| s.convert_to_f32_slice(d));
}

/// Rounds every element of `v` to the nearest bf16 value (kept as f32).
pub fn round_to_bf16(v: &mut [f32]) {
    for x in v {
        *x = bf16::from_f32(*x).to_f32();
    }
}

impl Stored {
    /// Stores `v` in `storage` (rounding to bf16 if asked).
    pub fn from_f32(v: Vec<f32>, storage: Storage) -> Self {
        match storage {
            Storage::F32 => Stored::F32(v),
            Storage::Bf16 => {
                let mut out = vec![bf16::ZERO; v.len()];
                f32_to_bf16(&v, &mut out);
                Stored::Bf16(out)
            }
        }
    }

    /// The storage type.
    pub fn storage(&self) -> Storage {
        match self {
            Stored::F32(_) => Storage::F32,
            Stored::Bf16(_) => Storage::Bf16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Stored::F32(v) => v.len(),
            Stored::Bf16(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All elements widened to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            Stored::F32(v) => v.clone(),
            Stored::Bf16(v) => {
                let mut out = vec![0.0; v.len()];
                bf16_to_f32(v, &mut out);
                out
            }
        }
    }

    /// Elements `start..end` as f32: a borrow for f32 storage, else widened into `scratch`.
    /// The range must be in bounds (callers check shapes first).
    pub(crate) fn view_f32<'a>(&'a self, start: usize, end: usize, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        match self {
            Stored::F32(v) => &v[start..end],
            Stored::Bf16(v) => {
                crate::tensor::set_len(scratch, end - start);
                bf16_to_f32(&v[start..end], scratch);
                scratch
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_within_bf16_precision() {
        let v: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.37).collect();
        let s = Stored::from_f32(v.clone(), Storage::Bf16);
        assert_eq!(s.storage(), Storage::Bf16);
        let back = s.to_f32_vec();
        for (a, b) in v.iter().zip(&back) {
            assert!((a - b).abs() <= a.abs() * (1.0 / 256.0));
        }
        let mut scratch = Vec::new();
        assert_eq!(s.view_f32(10, 20, &mut scratch), &back[10..20]);
        let f = Stored::from_f32(v.clone(), Storage::F32);
        assert_eq!(f.view_f32(0, 3, &mut scratch), &v[..3]);
    }
}
