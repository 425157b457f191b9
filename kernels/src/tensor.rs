//! A minimal row-major `f32` matrix and buffer helpers.

use crate::error::{Result, check_len};
use serde::{Deserialize, Serialize};

/// A dense row-major matrix of `f32` (`rows x cols`, element `(i, j)` at `data[i * cols + j]`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Matrix {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl Matrix {
    /// A `rows x cols` matrix of zeros.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self { rows, cols, data: vec![0.0; rows * cols] }
    }

    /// Wraps row-major data; an error unless `data.len() == rows * cols`.
    pub fn from_vec(rows: usize, cols: usize, data: Vec<f32>) -> Result<Self> {
        check_len("matrix data", &[rows, cols], data.len())?;
        Ok(Self { rows, cols, data })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `[rows, cols]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// The row-major elements.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// The row-major elements, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Row `i` (`None` when out of range).
    pub fn row(&self, i: usize) -> Option<&[f32]> {
        if i < self.rows { Some(&self.data[i * self.cols..(i + 1) * self.cols]) } else { None }
    }

    /// Element `(i, j)` (`None` when out of range).
    pub fn get(&self, i: usize, j: usize) -> Option<f32> {
        if i < self.rows && j < self.cols { Some(self.data[i * self.cols + j]) } else { None }
    }

    /// Consumes the matrix and returns its row-major elements.
    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }
}

/// Makes `v.len() == n` reusing the allocation; does not clear existing elements
/// (callers overwrite them), new elements are zero.
pub(crate) fn set_len(v: &mut Vec<f32>, n: usize) {
    if v.len() > n {
        v.truncate(n);
    } else if v.len() < n {
        v.resize(n, 0.0);
    }
}
