//! The error function. Short approximations (Abramowitz–Stegun 7.1.26 and
//! kin) are off by ~1e-7 absolute, which shows up as GELU mismatches against
//! ONNX Runtime; this is fdlibm's `s_erf.c` (Sun Microsystems, 1993, freely
//! redistributable) in f64, which is within an ulp of f64 and so exact in f32.

/// erf in f32, computed in f64 and rounded once.
pub(crate) fn erf(x: f32) -> f32 {
    erf_f64(f64::from(x)) as f32
}

// fdlibm's published coefficients, kept digit for digit so they can be checked
// against the source.
#[allow(clippy::excessive_precision)]
mod c {
    pub const ERX: f64 = 8.45062911510467529297e-01;
    pub const EFX: f64 = 1.28379167095512586316e-01;
    // [0, 0.84375]
    pub const PP: [f64; 5] = [
        1.28379167095512558561e-01,
        -3.25042107247001499370e-01,
        -2.84817495755985104766e-02,
        -5.77027029648944159157e-03,
        -2.37630166566501626084e-05,
    ];
    pub const QQ: [f64; 5] = [
        3.97917223959155352819e-01,
        6.50222499887672944485e-02,
        5.08130628187576562776e-03,
        1.32494738004321644526e-04,
        -3.96022827877536812320e-06,
    ];
    // [0.84375, 1.25]
    pub const PA: [f64; 7] = [
        -2.36211856075265944077e-03,
        4.14856118683748331666e-01,
        -3.72207876035701323847e-01,
        3.18346619901161753674e-01,
        -1.10894694282396677476e-01,
        3.54783043256182359371e-02,
        -2.16637559486879084300e-03,
    ];
    pub const QA: [f64; 6] = [
        1.06420880400844228286e-01,
        5.40397917702171048937e-01,
        7.18286544141962662868e-02,
        1.26171219808761642112e-01,
        1.36370839120290507362e-02,
        1.19844998467991074170e-02,
    ];
    // [1.25, 1/0.35]
    pub const RA: [f64; 8] = [
        -9.86494403484714822705e-03,
        -6.93858572707181764372e-01,
        -1.05586262253232909814e+01,
        -6.23753324503260060396e+01,
        -1.62396669462573470355e+02,
        -1.84605092906711035994e+02,
        -8.12874355063065934246e+01,
        -9.81432934416914548592e+00,
    ];
    pub const SA: [f64; 8] = [
        1.96512716674392571292e+01,
        1.37657754143519042600e+02,
        4.34565877475229228821e+02,
        6.45387271733267880336e+02,
        4.29008140027567833386e+02,
        1.08635005541779435134e+02,
        6.57024977031928170135e+00,
        -6.04244152148580987438e-02,
    ];
    // [1/0.35, 6]
    pub const RB: [f64; 7] = [
        -9.86494292470009928597e-03,
        -7.99283237680523006574e-01,
        -1.77579549177547519889e+01,
        -1.60636384855821916062e+02,
        -6.37566443368389627722e+02,
        -1.02509513161107724954e+03,
        -4.83519191608651397019e+02,
    ];
    pub const SB: [f64; 7] = [
        3.03380607434824582924e+01,
        3.25792512996573918826e+02,
        1.53672958608443695994e+03,
        3.19985821950859553908e+03,
        2.55305040643316442583e+03,
        4.74528541206955367215e+02,
        -2.24409524465858183362e+01,
    ];
}

/// `c[0] + z·c[1] + z²·c[2] + …`
fn poly(z: f64, c: &[f64]) -> f64 {
    c.iter().rev().fold(0.0, |acc, &k| acc * z + k)
}

/// `1 + z·c[0] + z²·c[1] + …`
fn poly1(z: f64, c: &[f64]) -> f64 {
    1.0 + z * poly(z, c)
}

pub(crate) fn erf_f64(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    let r = if a < 0.84375 {
        if a < 1.0 / (1u64 << 28) as f64 {
            a + c::EFX * a
        } else {
            let z = a * a;
            a + a * (poly(z, &c::PP) / poly1(z, &c::QQ))
        }
    } else if a < 1.25 {
        let s = a - 1.0;
        c::ERX + poly(s, &c::PA) / poly1(s, &c::QA)
    } else if a >= 6.0 {
        1.0
    } else {
        let s = 1.0 / (a * a);
        let (r, q) =
            if a < 1.0 / 0.35 { (poly(s, &c::RA), poly1(s, &c::SA)) } else { (poly(s, &c::RB), poly1(s, &c::SB)) };
        // f64 has ample headroom here: fdlibm's split of x·x only mattered for
        // its own last-ulp accuracy.
        1.0 - (-a * a - 0.5625 + r / q).exp() / a
    };
    if x < 0.0 { -r } else { r }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Independent reference: erf(x) = 2/√π · e^{-x²} · Σ (2x²)ⁿ x / (1·3·…·(2n+1)),
    /// a series of positive terms (no cancellation) summed in f64.
    fn erf_series(x: f64) -> f64 {
        let mut term = x;
        let mut sum = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= 2.0 * x * x / (2.0 * n + 1.0);
            sum += term;
        }
        2.0 / std::f64::consts::PI.sqrt() * (-x * x).exp() * sum
    }

    #[test]
    fn erf_matches_high_precision_reference_on_minus_6_to_6() {
        let mut worst = 0.0f64;
        for i in -60_000..=60_000 {
            let x = i as f32 * 1e-4;
            let want = erf_series(f64::from(x));
            worst = worst.max((f64::from(erf(x)) - want).abs());
            // The f64 path itself is far more accurate than f32 needs.
            assert!((erf_f64(f64::from(x)) - want).abs() < 1e-13, "erf_f64({x})");
        }
        assert!(worst <= 1e-6, "max error {worst}");
        // Rounding once from f64 puts f32 results within half an ulp of 1.
        assert!(worst <= 6e-8, "max error {worst}");
    }

    #[test]
    fn erf_known_values_and_edges() {
        assert_eq!(erf(0.0), 0.0);
        assert!((erf_f64(1.0) - 0.842_700_792_949_714_9).abs() < 1e-15);
        assert!((erf_f64(0.5) - 0.520_499_877_813_046_5).abs() < 1e-15);
        assert!((erf_f64(-2.0) + 0.995_322_265_018_952_7).abs() < 1e-15);
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
        assert_eq!(erf(f32::INFINITY), 1.0);
        assert_eq!(erf(f32::NEG_INFINITY), -1.0);
        assert!(erf(f32::NAN).is_nan());
        assert!((erf(1e-10) - 1.128_379_2e-10).abs() < 1e-16);
    }
}
