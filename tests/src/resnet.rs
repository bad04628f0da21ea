//! Test-fixture generator: torchvision-shaped ResNet-18/50 ONNX graphs (Conv
//! without bias → BatchNormalization → Relu, residual Add, MaxPool, global
//! pooling, Gemm head) with deterministic random weights and batch-norm
//! statistics, so builder tests need neither libtorch nor a download.

use kiln_onnx::{DataType, Dim, GraphBuilder, ModelProto, attr_int, attr_ints};

/// Which residual network to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Basic blocks [2, 2, 2, 2].
    R18,
    /// Bottleneck blocks [3, 4, 6, 3].
    R50,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }

    /// Roughly normal (Irwin–Hall of 4), unit variance.
    fn normal(&mut self) -> f32 {
        ((0..4).map(|_| self.next()).sum::<f32>() - 2.0) * 3f32.sqrt()
    }
}

struct Net {
    b: GraphBuilder,
    rng: Rng,
    n: usize,
}

impl Net {
    fn name(&mut self, what: &str) -> String {
        self.n += 1;
        format!("{what}{}", self.n)
    }

    fn conv_bn(
        &mut self,
        x: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        relu: bool,
    ) -> anyhow::Result<String> {
        let fan_in = (cin * k * k) as f32;
        let std = (2.0 / fan_in).sqrt();
        let w: Vec<f32> = (0..cout * cin * k * k).map(|_| self.rng.normal() * std).collect();
        let wn = self.name("conv_w");
        let w = self.b.add_initializer_f32(&wn, &[cout as i64, cin as i64, k as i64, k as i64], &w)?;
        let pad = (k / 2) as i64;
        let y = self.b.add_node(
            "Conv",
            &[x, &w],
            vec![
                attr_ints("kernel_shape", &[k as i64, k as i64]),
                attr_ints("strides", &[stride as i64, stride as i64]),
                attr_ints("pads", &[pad, pad, pad, pad]),
                attr_ints("dilations", &[1, 1]),
                attr_int("group", 1),
            ],
        )?;
        let vec =
            |lo: f32, hi: f32, rng: &mut Rng| -> Vec<f32> { (0..cout).map(|_| lo + (hi - lo) * rng.next()).collect() };
        let scale = vec(0.5, 1.2, &mut self.rng);
        let bias = vec(-0.2, 0.2, &mut self.rng);
        let mean = vec(-0.3, 0.3, &mut self.rng);
        let var = vec(0.5, 1.5, &mut self.rng);
        let mut names = Vec::new();
        for (what, data) in [("bn_scale", scale), ("bn_bias", bias), ("bn_mean", mean), ("bn_var", var)] {
            let n = self.name(what);
            names.push(self.b.add_initializer_f32(&n, &[cout as i64], &data)?);
        }
        let y = self.b.add_node(
            "BatchNormalization",
            &[&y, &names[0], &names[1], &names[2], &names[3]],
            vec![kiln_onnx::attr_float("epsilon", 1e-5)],
        )?;
        if relu { Ok(self.b.add_node("Relu", &[&y], vec![])?) } else { Ok(y) }
    }
}

/// A ResNet with `classes` outputs for `[batch, 3, 224, 224]` inputs named `input`;
/// the output is `logits`. `seed` picks the weights.
pub fn resnet(depth: Depth, classes: usize, seed: u64) -> anyhow::Result<ModelProto> {
    let mut net = Net {
        b: GraphBuilder::new(format!("resnet{}", if depth == Depth::R18 { 18 } else { 50 })),
        rng: Rng(seed | 1),
        n: 0,
    };
    let batch = Dim::Symbolic("batch".into());
    net.b.add_input("input", DataType::Float, &[batch.clone(), Dim::Fixed(3), Dim::Fixed(224), Dim::Fixed(224)])?;
    let mut x = net.conv_bn("input", 3, 64, 7, 2, true)?;
    x = net.b.add_node(
        "MaxPool",
        &[&x],
        vec![attr_ints("kernel_shape", &[3, 3]), attr_ints("strides", &[2, 2]), attr_ints("pads", &[1, 1, 1, 1])],
    )?;
    let (blocks, expansion): ([usize; 4], usize) = match depth {
        Depth::R18 => ([2, 2, 2, 2], 1),
        Depth::R50 => ([3, 4, 6, 3], 4),
    };
    let mut cin = 64;
    for (stage, &count) in blocks.iter().enumerate() {
        let width = 64 << stage;
        for i in 0..count {
            let stride = if i == 0 && stage > 0 { 2 } else { 1 };
            let cout = width * expansion;
            let y = match depth {
                Depth::R18 => {
                    let y = net.conv_bn(&x, cin, width, 3, stride, true)?;
                    net.conv_bn(&y, width, width, 3, 1, false)?
                }
                Depth::R50 => {
                    let y = net.conv_bn(&x, cin, width, 1, 1, true)?;
                    let y = net.conv_bn(&y, width, width, 3, stride, true)?;
                    net.conv_bn(&y, width, cout, 1, 1, false)?
                }
            };
            let shortcut =
                if stride != 1 || cin != cout { net.conv_bn(&x, cin, cout, 1, stride, false)? } else { x.clone() };
            let sum = net.b.add_node("Add", &[&y, &shortcut], vec![])?;
            x = net.b.add_node("Relu", &[&sum], vec![])?;
            cin = cout;
        }
    }
    let pooled = net.b.add_node("GlobalAveragePool", &[&x], vec![])?;
    let flat = net.b.add_node("Flatten", &[&pooled], vec![attr_int("axis", 1)])?;
    let std = (1.0 / cin as f32).sqrt();
    let fc_w: Vec<f32> = (0..classes * cin).map(|_| net.rng.normal() * std).collect();
    let fc_b: Vec<f32> = (0..classes).map(|_| net.rng.normal() * 0.01).collect();
    let w = net.b.add_initializer_f32("fc.weight", &[classes as i64, cin as i64], &fc_w)?;
    let b = net.b.add_initializer_f32("fc.bias", &[classes as i64], &fc_b)?;
    net.b.add_node_with_outputs("Gemm", &[&flat, &w, &b], &["logits"], vec![attr_int("transB", 1)])?;
    net.b.add_output("logits", DataType::Float, &[batch, Dim::Fixed(classes as i64)])?;
    Ok(net.b.finish(kiln_onnx::DEFAULT_OPSET))
}
