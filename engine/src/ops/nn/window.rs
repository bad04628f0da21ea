//! Sliding-window geometry shared by Conv, kiln.FusedConv and the pools:
//! attribute parsing (2-D only), auto_pad, output sizes for concrete and
//! symbolic inputs, and the `layout` attribute.

use crate::graph::{Dim, Node};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AutoPad {
    NotSet,
    SameUpper,
    SameLower,
    Valid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    Nchw,
    Nhwc,
}

impl Layout {
    pub(crate) fn of(node: &Node) -> Result<Self, String> {
        match node.attrs.string("layout", "NCHW")?.as_str() {
            "NCHW" => Ok(Self::Nchw),
            "NHWC" => Ok(Self::Nhwc),
            other => Err(format!("layout {other:?} is not supported (NCHW or NHWC)")),
        }
    }

    /// Positions of (channels, height, width) in a rank-4 activation.
    pub(crate) fn axes(self) -> (usize, usize, usize) {
        match self {
            Self::Nchw => (1, 2, 3),
            Self::Nhwc => (3, 1, 2),
        }
    }
}

/// Window attributes as written on the node; the kernel of a convolution may
/// instead come from its weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WindowAttrs {
    pub kernel: Option<[usize; 2]>,
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    /// ONNX order: top, left, bottom, right.
    pub pads: [usize; 4],
    pub auto_pad: AutoPad,
    pub ceil_mode: bool,
}

/// One resolved spatial axis: kernel, stride, dilation, padding and output size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Axis {
    pub k: usize,
    pub s: usize,
    pub d: usize,
    pub pb: usize,
    pub pe: usize,
    pub out: usize,
}

impl WindowAttrs {
    /// `pool`: kernel_shape is required and ceil_mode is read.
    pub(crate) fn parse(node: &Node, pool: bool) -> Result<Self, String> {
        let kernel = match node.attrs.ints("kernel_shape")? {
            Some(k) => Some(pair(k, "kernel_shape", 1)?),
            None if pool => return Err("kernel_shape is required".into()),
            None => None,
        };
        let strides = node.attrs.ints("strides")?.map(|v| pair(v, "strides", 1)).transpose()?.unwrap_or([1, 1]);
        let dilations = node.attrs.ints("dilations")?.map(|v| pair(v, "dilations", 1)).transpose()?.unwrap_or([1, 1]);
        let pads = match node.attrs.ints("pads")? {
            None => [0; 4],
            Some(p) if p.len() == 4 && p.iter().all(|x| (0..=MAX_WINDOW).contains(x)) => {
                [p[0] as usize, p[1] as usize, p[2] as usize, p[3] as usize]
            }
            Some(p) => return Err(format!("pads {p:?}: only 2-D windows with 4 non-negative pads are supported")),
        };
        let auto_pad = match node.attrs.string("auto_pad", "NOTSET")?.as_str() {
            "NOTSET" | "" => AutoPad::NotSet,
            "SAME_UPPER" => AutoPad::SameUpper,
            "SAME_LOWER" => AutoPad::SameLower,
            "VALID" => AutoPad::Valid,
            other => return Err(format!("auto_pad {other:?} is not supported")),
        };
        let ceil_mode = match node.attrs.int("ceil_mode", 0)? {
            0 => false,
            1 if pool => true,
            v => return Err(format!("ceil_mode {v} is not supported")),
        };
        Ok(Self { kernel, strides, dilations, pads, auto_pad, ceil_mode })
    }

    /// Resolves axis `i` (0 = height, 1 = width) for an input of size `input`
    /// and kernel size `k`.
    pub(crate) fn resolve(&self, i: usize, input: usize, k: usize) -> Result<Axis, String> {
        let (s, d) = (self.strides[i], self.dilations[i]);
        let ek = effective_kernel(k, d)?;
        let (pb, pe) = match self.auto_pad {
            AutoPad::NotSet => (self.pads[i], self.pads[i + 2]),
            AutoPad::Valid => (0, 0),
            AutoPad::SameUpper | AutoPad::SameLower => {
                let out = input.div_ceil(s);
                let total = (out.saturating_sub(1) * s + ek).saturating_sub(input);
                let small = total / 2;
                let large = total - small;
                if self.auto_pad == AutoPad::SameUpper { (small, large) } else { (large, small) }
            }
        };
        let padded = input + pb + pe;
        if input == 0 || padded < ek {
            return Err(format!("spatial size {input} (padded {padded}) is smaller than the window {ek}"));
        }
        let span = padded - ek;
        let ceil = self.ceil_mode && self.auto_pad == AutoPad::NotSet;
        let mut out = if ceil { span.div_ceil(s) + 1 } else { span / s + 1 };
        // ceil_mode never starts a window inside the end padding (ONNX Runtime, PyTorch).
        if ceil && out > 1 && (out - 1) * s >= input + pb {
            out -= 1;
        }
        Ok(Axis { k, s, d, pb, pe, out })
    }

    /// Output size of axis `i` for a possibly symbolic input: computed when
    /// fixed, the input itself when the window preserves size, else a symbol
    /// named after the node.
    pub(crate) fn infer(&self, node: &Node, i: usize, input: &Dim, k: usize) -> Result<Dim, String> {
        if let Some(n) = input.as_fixed() {
            let n = usize::try_from(n).map_err(|_| format!("negative spatial size {n}"))?;
            return Ok(Dim::fixed(self.resolve(i, n, k)?.out as i64));
        }
        let s = self.strides[i];
        let ek = effective_kernel(k, self.dilations[i])?;
        let preserves = s == 1
            && match self.auto_pad {
                AutoPad::SameUpper | AutoPad::SameLower => true,
                AutoPad::Valid => ek == 1,
                AutoPad::NotSet => self.pads[i] + self.pads[i + 2] + 1 == ek,
            };
        Ok(if preserves { input.clone() } else { Dim::sym(format!("{}.{}", node.name, ["h", "w"][i])) })
    }
}

/// Bound on every window attribute, so size arithmetic cannot overflow on a
/// hostile model.
const MAX_WINDOW: i64 = 1 << 20;

fn pair(v: &[i64], name: &str, min: i64) -> Result<[usize; 2], String> {
    let ok = |x: i64| (min..=MAX_WINDOW).contains(&x);
    match v {
        [a, b] if ok(*a) && ok(*b) => Ok([*a as usize, *b as usize]),
        _ => Err(format!("{name} {v:?}: only 2-D windows with values in {min}..={MAX_WINDOW} are supported")),
    }
}

/// Span of a dilated kernel; an empty kernel (from a weight with a 0 dim) is an error.
fn effective_kernel(k: usize, d: usize) -> Result<usize, String> {
    k.checked_sub(1)
        .and_then(|k1| k1.checked_mul(d))
        .and_then(|x| x.checked_add(1))
        .ok_or_else(|| format!("kernel size {k} with dilation {d} is not a valid window"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Attr;

    fn node(attrs: &[(&str, Attr)]) -> Node {
        attrs.iter().fold(Node::new("p", "MaxPool", vec![], vec![]), |n, (k, v)| n.with_attr(k, v.clone()))
    }

    #[test]
    fn output_sizes_follow_onnx() -> Result<(), String> {
        let n = node(&[("kernel_shape", Attr::Ints(vec![3, 3])), ("strides", Attr::Ints(vec![2, 2]))]);
        let w = WindowAttrs::parse(&n, true)?;
        assert_eq!(w.resolve(0, 112, 3)?.out, 55);
        let n = node(&[
            ("kernel_shape", Attr::Ints(vec![3, 3])),
            ("strides", Attr::Ints(vec![2, 2])),
            ("pads", Attr::Ints(vec![1, 1, 1, 1])),
        ]);
        assert_eq!(WindowAttrs::parse(&n, true)?.resolve(0, 112, 3)?.out, 56);
        // ceil_mode: 6 with k2 s2 → floor 3, ceil 3; 5 → floor 2, ceil 3.
        let n = node(&[
            ("kernel_shape", Attr::Ints(vec![2, 2])),
            ("strides", Attr::Ints(vec![2, 2])),
            ("ceil_mode", Attr::Int(1)),
        ]);
        let w = WindowAttrs::parse(&n, true)?;
        assert_eq!(w.resolve(0, 5, 2)?.out, 3);
        assert_eq!(w.resolve(0, 6, 2)?.out, 3);
        // The last window would start in the end padding: dropped (starts 0, 2; not 4).
        let n = node(&[
            ("kernel_shape", Attr::Ints(vec![2, 2])),
            ("strides", Attr::Ints(vec![2, 2])),
            ("pads", Attr::Ints(vec![0, 0, 1, 1])),
            ("ceil_mode", Attr::Int(1)),
        ]);
        assert_eq!(WindowAttrs::parse(&n, true)?.resolve(0, 4, 2)?.out, 2);
        assert_eq!(WindowAttrs::parse(&n, true)?.resolve(0, 5, 2)?.out, 3);
        let n = node(&[("auto_pad", Attr::String("SAME_LOWER".into())), ("strides", Attr::Ints(vec![2, 2]))]);
        let a = WindowAttrs::parse(&n, false)?.resolve(1, 7, 4)?;
        // out 4, total pad (4-1)*2+4-7 = 3: lower puts the extra one first.
        assert_eq!((a.out, a.pb, a.pe), (4, 2, 1));
        let n = node(&[("auto_pad", Attr::String("SAME_UPPER".into())), ("strides", Attr::Ints(vec![2, 2]))]);
        let a = WindowAttrs::parse(&n, false)?.resolve(1, 7, 4)?;
        assert_eq!((a.out, a.pb, a.pe), (4, 1, 2));
        let n = node(&[("auto_pad", Attr::String("VALID".into())), ("dilations", Attr::Ints(vec![2, 2]))]);
        assert_eq!(WindowAttrs::parse(&n, false)?.resolve(0, 10, 3)?.out, 6);
        assert!(WindowAttrs::parse(&n, false)?.resolve(0, 4, 3).is_err());
        Ok(())
    }

    #[test]
    fn symbolic_sizes_are_preserved_or_renamed() -> Result<(), String> {
        let same = node(&[("auto_pad", Attr::String("SAME_UPPER".into()))]);
        let w = WindowAttrs::parse(&same, false)?;
        assert_eq!(w.infer(&same, 0, &Dim::sym("h"), 3)?, Dim::sym("h"));
        let strided = node(&[("strides", Attr::Ints(vec![2, 2])), ("pads", Attr::Ints(vec![1, 1, 1, 1]))]);
        let w = WindowAttrs::parse(&strided, false)?;
        assert_eq!(w.infer(&strided, 1, &Dim::sym("w"), 3)?, Dim::sym("p.w"));
        assert_eq!(w.infer(&strided, 1, &Dim::fixed(224), 3)?, Dim::fixed(112));
        Ok(())
    }

    #[test]
    fn parse_rejects_non_2d_and_bad_values() {
        let bad = [
            node(&[("kernel_shape", Attr::Ints(vec![3]))]),
            node(&[("kernel_shape", Attr::Ints(vec![3, 3, 3]))]),
            node(&[("kernel_shape", Attr::Ints(vec![3, 3])), ("strides", Attr::Ints(vec![0, 1]))]),
            node(&[("kernel_shape", Attr::Ints(vec![3, 3])), ("pads", Attr::Ints(vec![1, 1]))]),
            node(&[("kernel_shape", Attr::Ints(vec![3, 3])), ("pads", Attr::Ints(vec![1, -1, 1, 1]))]),
            node(&[("kernel_shape", Attr::Ints(vec![3, 3])), ("pads", Attr::Ints(vec![1, i64::MAX, 1, 1]))]),
            node(&[("kernel_shape", Attr::Ints(vec![3, 3])), ("dilations", Attr::Ints(vec![1, 1 << 40]))]),
            node(&[("kernel_shape", Attr::Ints(vec![3, 3])), ("auto_pad", Attr::String("SAME".into()))]),
            node(&[("kernel_shape", Attr::Ints(vec![3, 3])), ("ceil_mode", Attr::Int(2))]),
            node(&[]),
        ];
        for n in &bad {
            assert!(WindowAttrs::parse(n, true).is_err(), "{:?}", n.attrs);
        }
        assert!(WindowAttrs::parse(&node(&[("ceil_mode", Attr::Int(1))]), false).is_err());
    }
}
