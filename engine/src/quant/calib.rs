//! Activation statistics for INT8 calibration and the three ways of turning them into a
//! clipping threshold (`amax`, the value that maps to ±127): the largest magnitude seen,
//! a percentile of the magnitudes, or the threshold whose 128-level quantisation loses
//! the least information (KL divergence, TensorRT's entropy calibrator).

use serde::{Deserialize, Serialize};

/// Bins of |x| kept per tensor; TensorRT's and ONNX Runtime's calibrators use 2048.
pub const BINS: usize = 2048;
/// Quantised levels on one side of zero for INT8.
const LEVELS: usize = 128;

/// How a threshold is chosen from a histogram.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "method")]
pub enum Method {
    /// The largest magnitude seen (no clipping; outliers stretch the scale).
    MinMax,
    /// The given percentile of magnitudes (e.g. 99.99).
    Percentile { percentile: f64 },
    /// Minimum KL divergence between the clipped distribution and its INT8 quantisation.
    /// Its threshold is at least 128 of the 2048 bins, 1/16 of the largest magnitude:
    /// with extreme outliers (1000× the bulk) percentile clips harder.
    Entropy,
}

impl Method {
    /// `minmax`, `entropy`, `percentile` (99.99) or `percentile:P`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "minmax" => Ok(Self::MinMax),
            "entropy" => Ok(Self::Entropy),
            "percentile" => Ok(Self::Percentile { percentile: 99.99 }),
            other => match other.strip_prefix("percentile:").map(str::parse::<f64>) {
                Some(Ok(p)) if p > 0.0 && p <= 100.0 => Ok(Self::Percentile { percentile: p }),
                _ => Err(format!("calibration method {other:?}: expected minmax, entropy or percentile[:P]")),
            },
        }
    }
}

/// A histogram of |x| over `[0, BINS·width)`. It starts at the first batch's range and
/// doubles its range (merging bin pairs) when a larger value arrives, so one pass over the
/// calibration set suffices and counts stay exact. Exact zeros are counted apart: they
/// quantise to zero under any scale, and as a spike in bin 0 (half of every ReLU output)
/// they would drag the entropy threshold down to about 1.7σ.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub counts: Vec<u64>,
    pub width: f32,
    pub amax: f32,
    /// Non-zero finite values binned.
    pub total: u64,
    pub zeros: u64,
}

impl Histogram {
    pub fn add(&mut self, data: &[f32]) {
        let m = data.iter().filter(|x| x.is_finite()).fold(0.0f32, |a, &x| a.max(x.abs()));
        if self.counts.is_empty() {
            self.counts = vec![0; BINS];
        }
        if m > 0.0 && self.width == 0.0 {
            // The first non-zero batch sets the range; m itself lands in the last bin.
            self.width = m / (BINS - 1) as f32;
        }
        while self.width > 0.0 && m >= self.width * BINS as f32 {
            for i in 0..BINS / 2 {
                self.counts[i] = self.counts[2 * i] + self.counts[2 * i + 1];
            }
            self.counts[BINS / 2..].fill(0);
            self.width *= 2.0;
        }
        self.amax = self.amax.max(m);
        for &x in data.iter().filter(|x| x.is_finite()) {
            if x == 0.0 {
                self.zeros += 1;
                continue;
            }
            let bin = ((x.abs() / self.width) as usize).min(BINS - 1);
            self.counts[bin] += 1;
            self.total += 1;
        }
    }

    /// The clipping threshold by `method`; never above the largest magnitude seen.
    pub fn threshold(&self, method: Method) -> f32 {
        if self.total == 0 || self.width == 0.0 {
            return self.amax;
        }
        let t = match method {
            Method::MinMax => self.amax,
            Method::Percentile { percentile } => self.percentile(percentile),
            Method::Entropy => self.entropy(),
        };
        t.min(self.amax)
    }

    fn percentile(&self, p: f64) -> f32 {
        let want = (p / 100.0 * self.total as f64).ceil() as u64;
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return (i + 1) as f32 * self.width;
            }
        }
        self.amax
    }

    /// For each candidate cut `i` (128..=BINS bins), the reference distribution P is the
    /// histogram's first `i` bins with everything beyond folded into the last; Q quantises
    /// those `i` bins into 128 levels and spreads each level back over the bins that were
    /// non-zero. The cut with the smallest KL(P‖Q) gives the threshold `i · width`.
    fn entropy(&self) -> f32 {
        let last_used = self.counts.iter().rposition(|&c| c > 0).unwrap_or(0) + 1;
        if last_used <= LEVELS {
            // Every value fits 128 levels unclipped: nothing to trade off.
            return last_used as f32 * self.width;
        }
        let mut best = (f64::INFINITY, BINS);
        let mut p = vec![0f64; BINS];
        let mut q = vec![0f64; BINS];
        for i in LEVELS..=BINS {
            let outliers: u64 = self.counts[i..].iter().sum();
            for (dst, &c) in p[..i].iter_mut().zip(&self.counts[..i]) {
                *dst = c as f64;
            }
            p[i - 1] += outliers as f64;
            q[..i].fill(0.0);
            for level in 0..LEVELS {
                let (lo, hi) = (level * i / LEVELS, (level + 1) * i / LEVELS);
                let sum: u64 = self.counts[lo..hi].iter().sum();
                // Spread over the bins where P has mass, the folded outlier bin included.
                let nonzero = p[lo..hi].iter().filter(|&&c| c > 0.0).count();
                if nonzero == 0 {
                    continue;
                }
                let share = sum as f64 / nonzero as f64;
                for (dst, &c) in q[lo..hi].iter_mut().zip(&p[lo..hi]) {
                    if c > 0.0 {
                        *dst = share;
                    }
                }
            }
            let kl = kl_divergence(&p[..i], &q[..i]);
            if kl < best.0 {
                best = (kl, i);
            }
        }
        best.1 as f32 * self.width
    }
}

/// KL(P‖Q) of two unnormalised histograms; bins where P has mass and Q none get a small
/// floor instead of infinity (the folded outlier bin can be such a bin).
fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    let (sp, sq) = (p.iter().sum::<f64>(), q.iter().sum::<f64>());
    if sp == 0.0 || sq == 0.0 {
        return f64::INFINITY;
    }
    let mut kl = 0.0;
    for (&a, &b) in p.iter().zip(q) {
        if a > 0.0 {
            let (pa, qb) = (a / sp, (b / sq).max(1e-12));
            kl += pa * (pa / qb).ln();
        }
    }
    kl
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic standard normals (Box–Muller over a fixed LCG).
    fn normals(n: usize) -> Vec<f32> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut uniform = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let (u, v) = (uniform(), uniform());
                ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
            })
            .collect()
    }

    #[test]
    fn uniform_data_keeps_its_range_under_every_method() {
        let data: Vec<f32> = (0..200_000).map(|i| (i as f32 / 100_000.0) - 1.0).collect();
        let mut h = Histogram::default();
        for chunk in data.chunks(10_000) {
            h.add(chunk);
        }
        assert_eq!((h.total, h.zeros), (199_999, 1));
        assert_eq!(h.counts.iter().sum::<u64>(), h.total, "counts survive range growth");
        assert!((h.threshold(Method::MinMax) - 1.0).abs() < 1e-6);
        let p = h.threshold(Method::Percentile { percentile: 99.99 });
        assert!((0.99..=1.0).contains(&p), "percentile {p}");
        let e = h.threshold(Method::Entropy);
        assert!((0.9..=1.0).contains(&e), "entropy clips a flat distribution only slightly: {e}");
    }

    #[test]
    fn gaussian_thresholds_are_ordered_and_where_theory_puts_them() {
        let data = normals(400_000);
        let mut h = Histogram::default();
        h.add(&data);
        let max = h.threshold(Method::MinMax);
        let p9999 = h.threshold(Method::Percentile { percentile: 99.99 });
        let p99 = h.threshold(Method::Percentile { percentile: 99.0 });
        let e = h.threshold(Method::Entropy);
        assert!((4.0..6.0).contains(&max), "max |x| of 4e5 normals: {max}");
        // Two-sided 99.99 % of |N(0,1)| is 3.89σ, 99 % is 2.576σ.
        assert!((p9999 - 3.89).abs() < 0.1, "p99.99 {p9999}");
        assert!((p99 - 2.576).abs() < 0.03, "p99 {p99}");
        assert!(e < max && e > 2.0, "entropy clips the tail but keeps the bulk: {e}");
    }

    #[test]
    fn relu_outputs_with_a_spike_at_zero_keep_their_bulk() {
        // Half the values exactly zero (post-ReLU), half |N(0, 1)|.
        let data: Vec<f32> = normals(200_000).into_iter().map(|x| x.max(0.0)).collect();
        let mut h = Histogram::default();
        h.add(&data);
        assert_eq!(h.zeros + h.total, 200_000);
        let e = h.threshold(Method::Entropy);
        // As for |N(0, 1)| itself: the zeros do not pull the threshold into the bulk.
        assert!(e > 3.0 && e < h.amax, "entropy on ReLU outputs: {e}");
    }

    #[test]
    fn one_outlier_stretches_minmax_but_not_the_others() {
        let mut data = normals(100_000);
        data.push(60.0);
        let mut h = Histogram::default();
        h.add(&data[..50_000]);
        h.add(&data[50_000..]);
        assert_eq!(h.threshold(Method::MinMax), 60.0);
        assert!(h.threshold(Method::Percentile { percentile: 99.99 }) < 5.0);
        let e = h.threshold(Method::Entropy);
        assert!(e < 10.0, "entropy ignores one outlier: {e}");
    }

    #[test]
    fn degenerate_inputs_do_not_divide_by_zero() {
        let mut h = Histogram::default();
        h.add(&[0.0; 16]);
        h.add(&[f32::NAN, f32::INFINITY]);
        assert_eq!((h.total, h.zeros), (0, 16));
        for m in [Method::MinMax, Method::Entropy, Method::Percentile { percentile: 99.9 }] {
            assert_eq!(h.threshold(m), 0.0);
        }
        assert_eq!(Method::parse("percentile:99.9"), Ok(Method::Percentile { percentile: 99.9 }));
        assert!(Method::parse("percentile:0").is_err() && Method::parse("kl").is_err());
    }
}
