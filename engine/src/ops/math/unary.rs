//! Elementwise unary functions and activations. The scalar functions GELU and
//! sigmoid are shared with the fused ops' activations so that a fused node and
//! the pattern it replaced compute the same numbers.

use crate::graph::{Dim, Node};
use crate::ops::util::{input, input_type};
use crate::ops::{InferInput, Inferred, OpDef, Registry};
use crate::{DType, Tensor, TensorData};

use super::erf::erf_f64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sqrt,
    Erf,
    Tanh,
    Sigmoid,
    Relu,
    Exp,
    Neg,
    Reciprocal,
    LeakyRelu,
    HardSigmoid,
    HardSwish,
    Gelu,
}

const ALL: [Kind; 12] = [
    Kind::Sqrt,
    Kind::Erf,
    Kind::Tanh,
    Kind::Sigmoid,
    Kind::Relu,
    Kind::Exp,
    Kind::Neg,
    Kind::Reciprocal,
    Kind::LeakyRelu,
    Kind::HardSigmoid,
    Kind::HardSwish,
    Kind::Gelu,
];

#[derive(Debug)]
pub(super) struct Unary(Kind);

pub(super) fn register(r: &mut Registry) {
    for k in ALL {
        r.add(Unary(k));
    }
}

/// Logistic function, without overflow for large |x|.
pub(crate) fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Exact GELU, `x·Φ(x)` = `0.5·x·(1 + erf(x/√2))`, in f64.
pub(crate) fn gelu(x: f32) -> f32 {
    let x = f64::from(x);
    (0.5 * x * (1.0 + erf_f64(x * std::f64::consts::FRAC_1_SQRT_2))) as f32
}

/// GELU's tanh approximation, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    let x = f64::from(x);
    let k = (2.0 / std::f64::consts::PI).sqrt();
    (0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())) as f32
}

impl Unary {
    fn takes_ints(&self) -> bool {
        matches!(self.0, Kind::Neg | Kind::Relu)
    }
}

fn gelu_tanh_mode(node: &Node) -> Result<bool, String> {
    match node.attrs.string("approximate", "none")?.as_str() {
        "none" => Ok(false),
        "tanh" => Ok(true),
        other => Err(format!("Gelu approximate={other:?} is not supported (none | tanh)")),
    }
}

impl OpDef for Unary {
    fn name(&self) -> &'static str {
        match self.0 {
            Kind::Sqrt => "Sqrt",
            Kind::Erf => "Erf",
            Kind::Tanh => "Tanh",
            Kind::Sigmoid => "Sigmoid",
            Kind::Relu => "Relu",
            Kind::Exp => "Exp",
            Kind::Neg => "Neg",
            Kind::Reciprocal => "Reciprocal",
            Kind::LeakyRelu => "LeakyRelu",
            Kind::HardSigmoid => "HardSigmoid",
            Kind::HardSwish => "HardSwish",
            Kind::Gelu => "Gelu",
        }
    }

    fn check(&self, node: &Node) -> Result<(), String> {
        if node.inputs.len() != 1 || node.input(0).is_none() || node.outputs.len() != 1 {
            return Err(format!("{} takes one input and has one output", self.name()));
        }
        match self.0 {
            Kind::LeakyRelu => node.attrs.float("alpha", 0.01).map(drop),
            Kind::HardSigmoid => node.attrs.float("alpha", 0.2).and(node.attrs.float("beta", 0.5)).map(drop),
            Kind::Gelu => gelu_tanh_mode(node).map(drop),
            _ => Ok(()),
        }
    }

    fn infer(&self, _node: &Node, inputs: &[InferInput<'_>]) -> Result<Vec<Inferred>, String> {
        let t = input_type(inputs, 0)?;
        let ints = matches!(t.dtype, DType::I64 | DType::I32);
        if t.dtype != DType::F32 && !(ints && self.takes_ints()) {
            return Err(format!("{} of {} is not supported", self.name(), t.dtype));
        }
        // Negating a known integer vector (e.g. slice bounds) keeps it known.
        let sym = match (self.0, inputs.first().and_then(|i| i.sym)) {
            (Kind::Neg, Some(s)) if t.dtype == DType::I64 => {
                s.iter().map(|d| d.as_fixed().and_then(i64::checked_neg).map(Dim::fixed)).collect()
            }
            _ => None,
        };
        Ok(vec![Inferred { ty: t.clone(), sym }])
    }

    fn eval(&self, node: &Node, inputs: &[Option<&Tensor>]) -> Result<Vec<Tensor>, String> {
        let t = input(inputs, 0)?;
        let data = match t.data() {
            TensorData::F32(x) => TensorData::F32(match self.0 {
                Kind::Sqrt => map(x, f32::sqrt),
                Kind::Erf => map(x, super::erf::erf),
                Kind::Tanh => map(x, f32::tanh),
                Kind::Sigmoid => map(x, sigmoid),
                // A comparison, not max: NaN must pass through as in ONNX Runtime.
                Kind::Relu => map(x, |v| if v < 0.0 { 0.0 } else { v }),
                Kind::Exp => map(x, f32::exp),
                Kind::Neg => map(x, |v| -v),
                Kind::Reciprocal => map(x, f32::recip),
                Kind::LeakyRelu => {
                    let a = node.attrs.float("alpha", 0.01)?;
                    map(x, |v| if v < 0.0 { a * v } else { v })
                }
                Kind::HardSigmoid => {
                    let (a, b) = (node.attrs.float("alpha", 0.2)?, node.attrs.float("beta", 0.5)?);
                    map(x, |v| (a * v + b).clamp(0.0, 1.0))
                }
                Kind::HardSwish => map(x, |v| v * (v * (1.0 / 6.0) + 0.5).clamp(0.0, 1.0)),
                Kind::Gelu => {
                    if gelu_tanh_mode(node)? {
                        map(x, gelu_tanh)
                    } else {
                        map(x, gelu)
                    }
                }
            }),
            TensorData::I64(x) if self.takes_ints() => {
                TensorData::I64(if self.0 == Kind::Neg { map(x, i64::wrapping_neg) } else { map(x, |v| v.max(0)) })
            }
            TensorData::I32(x) if self.takes_ints() => {
                TensorData::I32(if self.0 == Kind::Neg { map(x, i32::wrapping_neg) } else { map(x, |v| v.max(0)) })
            }
            _ => return Err(format!("{} of {} is not supported", self.name(), t.dtype())),
        };
        Ok(vec![Tensor::new(t.shape().to_vec(), data).map_err(|e| e.to_string())?])
    }
}

fn map<T: Copy>(x: &[T], f: impl Fn(T) -> T) -> Vec<T> {
    x.iter().map(|&v| f(v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Attr, ValueType, fixed_shape};
    use crate::ops::util::{f32s, i64s, tensor_f32, tensor_i64};

    fn run(node: &Node, k: Kind, x: &Tensor) -> Result<Tensor, String> {
        Unary(k).eval(node, &[Some(x)])?.pop().ok_or_else(|| "no output".to_string())
    }

    fn node(k: Kind) -> Node {
        Node::new("n", Unary(k).name(), vec![Some(0)], vec![1])
    }

    fn close(got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= tol * (1.0 + w.abs()), "got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn functions_match_known_values() -> Result<(), String> {
        let x = tensor_f32(vec![2, 3], vec![-3.0, -1.0, -0.25, 0.0, 0.5, 4.0])?;
        let xs = f32s(&x)?.to_vec();
        let apply = |f: fn(f32) -> f32| xs.iter().map(|&v| f(v)).collect::<Vec<f32>>();
        let cases: [(Kind, Vec<f32>); 9] = [
            (Kind::Tanh, apply(f32::tanh)),
            (Kind::Sigmoid, apply(|v| 1.0 / (1.0 + (-v).exp()))),
            (Kind::Relu, vec![0.0, 0.0, 0.0, 0.0, 0.5, 4.0]),
            (Kind::Exp, apply(f32::exp)),
            (Kind::Neg, vec![3.0, 1.0, 0.25, -0.0, -0.5, -4.0]),
            (Kind::LeakyRelu, vec![-0.03, -0.01, -0.0025, 0.0, 0.5, 4.0]),
            (Kind::HardSigmoid, vec![0.0, 0.3, 0.45, 0.5, 0.6, 1.0]),
            (Kind::HardSwish, vec![0.0, -1.0 / 3.0, -0.25 * (0.5 - 0.25 / 6.0), 0.0, 0.5 * (0.5 + 0.5 / 6.0), 4.0]),
            (Kind::Erf, vec![-0.999_977_9, -0.842_700_8, -0.276_326_4, 0.0, 0.520_499_9, 1.0]),
        ];
        for (k, want) in cases {
            let y = run(&node(k), k, &x)?;
            assert_eq!(y.shape(), &[2, 3]);
            close(f32s(&y)?, &want, 1e-6);
        }
        let pos = tensor_f32(vec![3], vec![0.25, 4.0, 9.0])?;
        close(f32s(&run(&node(Kind::Sqrt), Kind::Sqrt, &pos)?)?, &[0.5, 2.0, 3.0], 0.0);
        close(f32s(&run(&node(Kind::Reciprocal), Kind::Reciprocal, &pos)?)?, &[4.0, 0.25, 1.0 / 9.0], 0.0);
        let leaky = node(Kind::LeakyRelu).with_attr("alpha", Attr::Float(0.5));
        close(f32s(&run(&leaky, Kind::LeakyRelu, &x)?)?, &[-1.5, -0.5, -0.125, 0.0, 0.5, 4.0], 0.0);
        Ok(())
    }

    #[test]
    fn sigmoid_is_stable_for_large_inputs() {
        assert_eq!(sigmoid(-1000.0), 0.0);
        assert_eq!(sigmoid(1000.0), 1.0);
        assert!((sigmoid(-80.0) - (-80.0f64).exp() as f32).abs() < 1e-40);
        assert!(sigmoid(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_exact_and_tanh_modes() -> Result<(), String> {
        let x = tensor_f32(vec![5], vec![-3.0, -1.0, 0.0, 0.5, 2.0])?;
        // x·Φ(x) with Φ from tables (1e-9 accurate).
        let phi = [0.001_349_898_03_f64, 0.158_655_253_9, 0.5, 0.691_462_461_3, 0.977_249_868_1];
        let want: Vec<f32> = [-3.0f64, -1.0, 0.0, 0.5, 2.0].iter().zip(phi).map(|(x, p)| (x * p) as f32).collect();
        close(f32s(&run(&node(Kind::Gelu), Kind::Gelu, &x)?)?, &want, 1e-7);
        let tanh_node = node(Kind::Gelu).with_attr("approximate", Attr::String("tanh".into()));
        let naive: Vec<f32> = f32s(&x)?
            .iter()
            .map(|&v| 0.5 * v * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh()))
            .collect();
        let approx = run(&tanh_node, Kind::Gelu, &x)?;
        close(f32s(&approx)?, &naive, 1e-6);
        // The approximation is close to, but not the same as, the exact form.
        assert!(f32s(&approx)?.iter().zip(&want).any(|(a, b)| a != b));
        assert!((f32s(&approx)?[1] - want[1]).abs() < 1e-3);
        let bad = node(Kind::Gelu).with_attr("approximate", Attr::String("fast".into()));
        assert!(Unary(Kind::Gelu).check(&bad).is_err());
        assert!(Unary(Kind::Gelu).check(&tanh_node).is_ok());
        Ok(())
    }

    #[test]
    fn integer_neg_and_relu_and_types() -> Result<(), String> {
        let x = tensor_i64(vec![3], vec![-2, 0, 5])?;
        assert_eq!(i64s(&run(&node(Kind::Neg), Kind::Neg, &x)?)?, &[2, 0, -5]);
        assert_eq!(i64s(&run(&node(Kind::Relu), Kind::Relu, &x)?)?, &[0, 0, 5]);
        assert!(run(&node(Kind::Exp), Kind::Exp, &x).is_err());
        let ti = ValueType::new(DType::I64, fixed_shape(&[2]));
        let s = [Dim::fixed(4), Dim::fixed(-1)];
        let ins = [InferInput { ty: Some(&ti), sym: Some(&s), ..Default::default() }];
        let out = Unary(Kind::Neg).infer(&node(Kind::Neg), &ins)?;
        assert_eq!(out[0].sym, Some(vec![Dim::fixed(-4), Dim::fixed(1)]));
        assert!(Unary(Kind::Sqrt).infer(&node(Kind::Sqrt), &ins).is_err());
        Ok(())
    }
}
