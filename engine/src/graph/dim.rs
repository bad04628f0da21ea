//! Symbolic dimensions. A dimension is a monomial `k · s1 · s2 · …` over named
//! symbols (`batch`, `seq`), which is exactly what reshapes of BERT-like graphs
//! produce (`batch*seq`, `batch*12`); anything richer is given a fresh symbol.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// One dimension of a tensor shape: `coef` times the product of `syms` (sorted,
/// repeats allowed). A fixed dimension has no symbols.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Dim {
    coef: i64,
    syms: Vec<String>,
}

/// A tensor shape whose dimensions may be symbolic.
pub type Shape = Vec<Dim>;

impl Dim {
    pub fn fixed(n: i64) -> Self {
        Self { coef: n, syms: Vec::new() }
    }

    pub fn sym(name: impl Into<String>) -> Self {
        Self { coef: 1, syms: vec![name.into()] }
    }

    /// The value when no symbol is involved.
    pub fn as_fixed(&self) -> Option<i64> {
        self.syms.is_empty().then_some(self.coef)
    }

    pub fn is_fixed(&self) -> bool {
        self.syms.is_empty()
    }

    pub fn symbols(&self) -> &[String] {
        &self.syms
    }

    /// The product. A coefficient overflowing i64 (only absurd models get there)
    /// becomes the unbindable symbol `?overflow`, so planning fails with a message.
    pub fn mul(&self, other: &Dim) -> Dim {
        let Some(coef) = self.coef.checked_mul(other.coef) else { return Dim::sym("?overflow") };
        let mut syms: Vec<String> = self.syms.iter().chain(&other.syms).cloned().collect();
        syms.sort();
        Dim { coef, syms }
    }

    /// Exact division, or `None` when `other` does not divide `self`.
    pub fn div(&self, other: &Dim) -> Option<Dim> {
        if self.coef.checked_rem(other.coef)? != 0 {
            return None;
        }
        let mut syms = self.syms.clone();
        for s in &other.syms {
            let at = syms.iter().position(|x| x == s)?;
            syms.remove(at);
        }
        Some(Dim { coef: self.coef.checked_div(other.coef)?, syms })
    }

    /// The concrete size for given symbol values; `None` if a symbol is unbound.
    pub fn eval(&self, bindings: &HashMap<String, usize>) -> Option<usize> {
        let mut v = usize::try_from(self.coef).ok()?;
        for s in &self.syms {
            v = v.checked_mul(*bindings.get(s)?)?;
        }
        Some(v)
    }
}

/// Product of all dimensions of a shape.
pub fn numel(shape: &[Dim]) -> Dim {
    shape.iter().fold(Dim::fixed(1), |acc, d| acc.mul(d))
}

/// Concrete shape for given symbol values.
pub fn eval_shape(shape: &[Dim], bindings: &HashMap<String, usize>) -> Option<Vec<usize>> {
    shape.iter().map(|d| d.eval(bindings)).collect()
}

pub fn fixed_shape(dims: &[usize]) -> Shape {
    dims.iter().map(|&d| Dim::fixed(d as i64)).collect()
}

impl From<i64> for Dim {
    fn from(n: i64) -> Self {
        Dim::fixed(n)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.syms.is_empty() {
            return write!(f, "{}", self.coef);
        }
        let mut first = true;
        if self.coef != 1 {
            write!(f, "{}", self.coef)?;
            first = false;
        }
        for s in &self.syms {
            if !first {
                f.write_str("*")?;
            }
            f.write_str(s)?;
            first = false;
        }
        Ok(())
    }
}

/// `[batch, 3, 224, 224]`.
pub fn shape_string(shape: &[Dim]) -> String {
    let parts: Vec<String> = shape.iter().map(ToString::to_string).collect();
    format!("[{}]", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monomials_multiply_divide_and_evaluate() {
        let bs = Dim::sym("batch").mul(&Dim::sym("seq")).mul(&Dim::fixed(384));
        assert_eq!(bs.to_string(), "384*batch*seq");
        let per_row = bs.div(&Dim::fixed(12)).and_then(|d| d.div(&Dim::sym("seq")));
        assert_eq!(per_row, Some(Dim::sym("batch").mul(&Dim::fixed(32))));
        assert_eq!(bs.div(&Dim::sym("heads")), None);
        assert_eq!(Dim::fixed(10).div(&Dim::fixed(3)), None);
        assert_eq!(Dim::fixed(i64::MIN).div(&Dim::fixed(-1)), None);
        assert_eq!(Dim::fixed(i64::MAX).mul(&Dim::fixed(3)), Dim::sym("?overflow"));
        let b: HashMap<String, usize> = [("batch".to_string(), 2), ("seq".to_string(), 5)].into();
        assert_eq!(bs.eval(&b), Some(3840));
        assert_eq!(Dim::sym("other").eval(&b), None);
    }
}
