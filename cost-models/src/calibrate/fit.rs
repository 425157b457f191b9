//! Damped least squares (Levenberg-Marquardt) with a numerical Jacobian, for the handful of physical constants
//! calibration fits. Parameters are optimised in an unbounded space and mapped into their physical ranges
//! (a fraction in (lo, hi), or a positive number), so every iterate is physical.

/// How a parameter's unbounded value `z` maps to its physical value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bound {
    /// `lo + (hi - lo) * sigmoid(z)`.
    Interval(f64, f64),
    /// `scale * exp(z)`.
    Positive(f64),
}

impl Bound {
    /// Physical value of `z`.
    pub fn to_physical(self, z: f64) -> f64 {
        match self {
            Bound::Interval(lo, hi) => lo + (hi - lo) / (1.0 + (-z).exp()),
            Bound::Positive(s) => s * z.clamp(-50.0, 50.0).exp(),
        }
    }

    /// `z` of a physical value (clamped inside the range).
    pub fn to_unbounded(self, x: f64) -> f64 {
        match self {
            Bound::Interval(lo, hi) => {
                let t = ((x - lo) / (hi - lo)).clamp(1e-6, 1.0 - 1e-6);
                (t / (1.0 - t)).ln()
            }
            Bound::Positive(s) => (x.max(1e-12 * s) / s).ln(),
        }
    }
}

/// Result of a fit.
#[derive(Debug, Clone, PartialEq)]
pub struct FitResult {
    /// Physical parameter values.
    pub params: Vec<f64>,
    /// Sum of squared residuals at the solution.
    pub cost: f64,
    /// Iterations run.
    pub iterations: usize,
}

/// Minimises `sum(residuals(x)^2) + prior_weight^2 * |z - z0|^2` over physical parameters `x` starting from
/// `x0`, with `bounds` per parameter (`z` is the unbounded image of `x`). The weak prior keeps a parameter the
/// data cannot see at its starting value instead of letting it drift to a bound; a parameter the data does
/// determine is not moved by it. `residuals` must return the same number of finite values for any physical `x`.
pub fn levenberg_marquardt(
    x0: &[f64],
    bounds: &[Bound],
    residuals: &dyn Fn(&[f64]) -> Vec<f64>,
    max_iterations: usize,
    prior_weight: f64,
) -> FitResult {
    let n = x0.len();
    let phys = |z: &[f64]| -> Vec<f64> { z.iter().zip(bounds).map(|(&z, b)| b.to_physical(z)).collect() };
    let cost_of = |r: &[f64]| -> f64 { r.iter().map(|x| x * x).sum::<f64>() };
    let z0: Vec<f64> = x0.iter().zip(bounds).map(|(&x, b)| b.to_unbounded(x)).collect();
    let residuals = |x: &[f64]| -> Vec<f64> {
        let mut r = residuals(x);
        let z: Vec<f64> = x.iter().zip(bounds).map(|(&x, b)| b.to_unbounded(x)).collect();
        r.extend(z.iter().zip(&z0).map(|(a, b)| prior_weight * (a - b)));
        r
    };
    let mut z = z0.clone();
    let mut r = residuals(&phys(&z));
    let mut cost = cost_of(&r);
    let mut lambda = 1e-3;
    let mut it = 0;
    while it < max_iterations {
        it += 1;
        // Jacobian by central differences in z.
        let m = r.len();
        let mut jac = vec![vec![0.0; n]; m];
        for j in 0..n {
            let h = 1e-4 * (1.0 + z[j].abs());
            let mut zp = z.clone();
            zp[j] += h;
            let mut zm = z.clone();
            zm[j] -= h;
            let (rp, rm) = (residuals(&phys(&zp)), residuals(&phys(&zm)));
            for i in 0..m {
                jac[i][j] = (rp[i] - rm[i]) / (2.0 * h);
            }
        }
        // Normal equations J^T J and J^T r.
        let mut jtj = vec![vec![0.0; n]; n];
        let mut jtr = vec![0.0; n];
        for i in 0..m {
            for a in 0..n {
                jtr[a] += jac[i][a] * r[i];
                for b in 0..n {
                    jtj[a][b] += jac[i][a] * jac[i][b];
                }
            }
        }
        let mut improved = false;
        for _ in 0..20 {
            let mut a = jtj.clone();
            for (k, row) in a.iter_mut().enumerate() {
                row[k] += lambda * (jtj[k][k].abs() + 1e-12);
            }
            let Some(step) = solve(a, jtr.iter().map(|x| -x).collect()) else {
                lambda *= 10.0;
                continue;
            };
            let zn: Vec<f64> = z.iter().zip(&step).map(|(a, b)| a + b).collect();
            let rn = residuals(&phys(&zn));
            let cn = cost_of(&rn);
            if cn.is_finite() && cn < cost {
                let rel = (cost - cn) / cost.max(1e-300);
                z = zn;
                r = rn;
                cost = cn;
                lambda = (lambda / 3.0).max(1e-12);
                improved = true;
                if rel < 1e-10 {
                    return FitResult { params: phys(&z), cost, iterations: it };
                }
                break;
            }
            lambda *= 4.0;
        }
        if !improved {
            break;
        }
    }
    FitResult { params: phys(&z), cost, iterations: it }
}

/// Solves `a x = b` by Gaussian elimination with partial pivoting; None when singular.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let piv = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[piv][col].abs() < 1e-300 {
            return None;
        }
        a.swap(col, piv);
        b.swap(col, piv);
        let pivot_row = a[col].clone();
        for row in col + 1..n {
            let f = a[row][col] / pivot_row[col];
            for (x, p) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_a_known_curve() {
        // y = a * x / (x + b) + c with a = 0.7, b = 300, c = 2.
        let xs: Vec<f64> = (1..60).map(|i| i as f64 * 50.0).collect();
        let ys: Vec<f64> = xs.iter().map(|x| 0.7 * x / (x + 300.0) + 2.0).collect();
        let res =
            |p: &[f64]| -> Vec<f64> { xs.iter().zip(&ys).map(|(x, y)| p[0] * x / (x + p[1]) + p[2] - y).collect() };
        let f = levenberg_marquardt(
            &[0.5, 100.0, 1.0],
            &[Bound::Interval(0.0, 1.0), Bound::Positive(100.0), Bound::Positive(1.0)],
            &res,
            200,
            0.0,
        );
        assert!((f.params[0] - 0.7).abs() < 1e-4, "{:?}", f);
        assert!((f.params[1] - 300.0).abs() < 0.5, "{:?}", f);
        assert!((f.params[2] - 2.0).abs() < 1e-4, "{:?}", f);
    }

    #[test]
    fn bounds_round_trip() {
        for b in [Bound::Interval(0.1, 1.0), Bound::Positive(10.0)] {
            for x in [0.2, 0.5, 0.9] {
                assert!((b.to_physical(b.to_unbounded(x)) - x).abs() < 1e-9);
            }
        }
    }
}
