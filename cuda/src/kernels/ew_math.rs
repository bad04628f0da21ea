//! The opcodes of the fused elementwise program and their FP32 formulas on the CPU: the same
//! expressions, case for case, as `apply` in `kernels/cu/elementwise.cu` (change both together).
//! The GPU's `erff`, `expf`, `tanhf`, … are within a few ulp of these.

/// One elementwise operation of an [`super::EwProgram`]. Operands are registers `a`, `b`, `c`
/// (unused ones are ignored); `imm0`/`imm1` are float immediates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EwOp {
    Add,
    Sub,
    Mul,
    Div,
    /// NaN if either operand is NaN.
    Max,
    /// NaN if either operand is NaN.
    Min,
    Pow,
    Neg,
    Abs,
    Exp,
    Log,
    Sqrt,
    Recip,
    Tanh,
    Sigmoid,
    /// `a < 0 ? 0 : a` (NaN passes).
    Relu,
    Erf,
    /// Exact GELU, `0.5·a·(1 + erf(a/√2))`.
    Gelu,
    GeluTanh,
    Silu,
    /// `a` clamped to `[imm0, imm1]`, NaN passing.
    Clip,
    /// `imm0`.
    Const,
    /// `a != 0 ? b : c`.
    Where,
    Equal,
    Less,
    Greater,
    /// `a == 0` as 1/0.
    Not,
    Floor,
    LessOrEqual,
    GreaterOrEqual,
    And,
    Or,
    Xor,
    IsNan,
    /// `a < 0 ? imm0·a : a`.
    LeakyRelu,
    /// `clamp(imm0·a + imm1, 0, 1)`.
    HardSigmoid,
    HardSwish,
    Ceil,
    /// Round half to even (ONNX Round).
    Round,
    /// `a·imm0 + imm1`.
    Affine,
}

impl EwOp {
    /// Every op, in opcode order.
    pub const ALL: [EwOp; 40] = [
        Self::Add,
        Self::Sub,
        Self::Mul,
        Self::Div,
        Self::Max,
        Self::Min,
        Self::Pow,
        Self::Neg,
        Self::Abs,
        Self::Exp,
        Self::Log,
        Self::Sqrt,
        Self::Recip,
        Self::Tanh,
        Self::Sigmoid,
        Self::Relu,
        Self::Erf,
        Self::Gelu,
        Self::GeluTanh,
        Self::Silu,
        Self::Clip,
        Self::Const,
        Self::Where,
        Self::Equal,
        Self::Less,
        Self::Greater,
        Self::Not,
        Self::Floor,
        Self::LessOrEqual,
        Self::GreaterOrEqual,
        Self::And,
        Self::Or,
        Self::Xor,
        Self::IsNan,
        Self::LeakyRelu,
        Self::HardSigmoid,
        Self::HardSwish,
        Self::Ceil,
        Self::Round,
        Self::Affine,
    ];

    /// The opcode in `elementwise.cu` (`OP_ADD` = 0, …).
    pub fn code(self) -> i32 {
        Self::ALL.iter().position(|&o| o == self).map_or(-1, |i| i as i32)
    }

    /// How many register operands the op reads (`a`, then `b`, then `c`).
    pub fn arity(self) -> usize {
        match self {
            Self::Const => 0,
            Self::Add
            | Self::Sub
            | Self::Mul
            | Self::Div
            | Self::Max
            | Self::Min
            | Self::Pow
            | Self::Equal
            | Self::Less
            | Self::Greater
            | Self::LessOrEqual
            | Self::GreaterOrEqual
            | Self::And
            | Self::Or
            | Self::Xor => 2,
            Self::Where => 3,
            _ => 1,
        }
    }

    /// The op on FP32 values, as the kernel computes it.
    pub fn apply(self, a: f32, b: f32, c: f32, imm0: f32, imm1: f32) -> f32 {
        let flag = |x: bool| if x { 1.0 } else { 0.0 };
        match self {
            Self::Add => a + b,
            Self::Sub => a - b,
            Self::Mul => a * b,
            Self::Div => a / b,
            Self::Max => {
                if a.is_nan() || b.is_nan() {
                    f32::NAN
                } else {
                    a.max(b)
                }
            }
            Self::Min => {
                if a.is_nan() || b.is_nan() {
                    f32::NAN
                } else {
                    a.min(b)
                }
            }
            Self::Pow => {
                if b == 2.0 {
                    a * a
                } else {
                    a.powf(b)
                }
            }
            Self::Neg => -a,
            Self::Abs => a.abs(),
            Self::Exp => a.exp(),
            Self::Log => a.ln(),
            Self::Sqrt => a.sqrt(),
            Self::Recip => 1.0 / a,
            Self::Tanh => a.tanh(),
            Self::Sigmoid => sigmoid(a),
            Self::Relu => {
                if a < 0.0 {
                    0.0
                } else {
                    a
                }
            }
            Self::Erf => erf(a),
            Self::Gelu => 0.5 * a * (1.0 + erf(a * std::f32::consts::FRAC_1_SQRT_2)),
            Self::GeluTanh => 0.5 * a * (1.0 + (0.797_884_6 * (a + 0.044715 * a * a * a)).tanh()),
            Self::Silu => a * sigmoid(a),
            Self::Clip => clamp_nan(a, imm0, imm1),
            Self::Const => imm0,
            Self::Where => {
                if a != 0.0 {
                    b
                } else {
                    c
                }
            }
            Self::Equal => flag(a == b),
            Self::Less => flag(a < b),
            Self::Greater => flag(a > b),
            Self::Not => flag(a == 0.0),
            Self::Floor => a.floor(),
            Self::LessOrEqual => flag(a <= b),
            Self::GreaterOrEqual => flag(a >= b),
            Self::And => flag(a != 0.0 && b != 0.0),
            Self::Or => flag(a != 0.0 || b != 0.0),
            Self::Xor => flag((a != 0.0) != (b != 0.0)),
            Self::IsNan => flag(a.is_nan()),
            Self::LeakyRelu => {
                if a < 0.0 {
                    imm0 * a
                } else {
                    a
                }
            }
            Self::HardSigmoid => clamp_nan(imm0 * a + imm1, 0.0, 1.0),
            Self::HardSwish => a * clamp_nan(a * (1.0 / 6.0) + 0.5, 0.0, 1.0),
            Self::Ceil => a.ceil(),
            Self::Round => a.round_ties_even(),
            Self::Affine => a * imm0 + imm1,
        }
    }
}

/// Logistic function without overflow for large |x| (the engine's form).
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

fn clamp_nan(x: f32, lo: f32, hi: f32) -> f32 {
    if x < lo {
        lo
    } else if x > hi {
        hi
    } else {
        x
    }
}

/// erf in f64, rounded once: the series `2/√π · e^{-x²} · Σ (2x²)ⁿ x / (1·3·…·(2n+1))`, whose
/// terms are all positive (no cancellation); |x| ≥ 6 is ±1 to far below f32's resolution.
pub(crate) fn erf(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let v = f64::from(x);
    if v.abs() >= 6.0 {
        return if v > 0.0 { 1.0 } else { -1.0 };
    }
    let (mut term, mut sum, mut n) = (v, v, 0.0f64);
    while term.abs() > 1e-17 * sum.abs() {
        n += 1.0;
        term *= 2.0 * v * v / (2.0 * n + 1.0);
        sum += term;
    }
    (2.0 / std::f64::consts::PI.sqrt() * (-v * v).exp() * sum) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcodes_are_positions_and_arities_cover_operands() {
        for (i, op) in EwOp::ALL.iter().enumerate() {
            assert_eq!(op.code(), i as i32, "{op:?}");
        }
        assert_eq!(EwOp::Affine.code(), 39);
        assert_eq!((EwOp::Const.arity(), EwOp::Exp.arity(), EwOp::Pow.arity(), EwOp::Where.arity()), (0, 1, 2, 3));
    }

    #[test]
    fn erf_known_values() {
        assert_eq!(erf(0.0), 0.0);
        assert!((erf(1.0) - 0.842_700_8).abs() < 1e-7);
        assert!((erf(-2.0) + 0.995_322_3).abs() < 1e-7);
        assert!((erf(0.5) - 0.520_499_9).abs() < 1e-7);
        assert!((erf(1e-10) - 1.128_379_2e-10).abs() < 1e-16);
        assert_eq!(erf(7.0), 1.0);
        assert_eq!(erf(f32::NEG_INFINITY), -1.0);
        assert!(erf(f32::NAN).is_nan());
    }

    #[test]
    fn nan_semantics() {
        let nan = f32::NAN;
        assert!(EwOp::Max.apply(nan, 1.0, 0.0, 0.0, 0.0).is_nan());
        assert!(EwOp::Min.apply(1.0, nan, 0.0, 0.0, 0.0).is_nan());
        assert!(EwOp::Relu.apply(nan, 0.0, 0.0, 0.0, 0.0).is_nan());
        assert!(EwOp::Clip.apply(nan, 0.0, 0.0, 0.0, 6.0).is_nan());
        assert_eq!(EwOp::Clip.apply(7.0, 0.0, 0.0, 0.0, 6.0), 6.0);
        assert_eq!(EwOp::Equal.apply(nan, nan, 0.0, 0.0, 0.0), 0.0);
        assert_eq!(EwOp::IsNan.apply(nan, 0.0, 0.0, 0.0, 0.0), 1.0);
        assert_eq!(EwOp::Round.apply(2.5, 0.0, 0.0, 0.0, 0.0), 2.0);
        assert_eq!(EwOp::Where.apply(0.0, 1.0, 2.0, 0.0, 0.0), 2.0);
    }
}
