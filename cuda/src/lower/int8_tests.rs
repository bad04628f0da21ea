//! Unit tests of the INT8 lowering's pure parts (forms, refusals, weight layouts).

use super::*;

fn conv(attrs: &[(&str, Attr)]) -> Node {
    let mut n = Node::new("c", "kiln.FusedConv", vec![Some(0), Some(1)], vec![2])
        .with_attr("layout", Attr::String("NHWC".into()));
    for (k, v) in attrs {
        n = n.with_attr(k, v.clone());
    }
    n
}

#[test]
fn layers_get_their_form_or_a_clear_refusal() -> Result<(), String> {
    let dense = Node::new("d", "kiln.Dense", vec![Some(0), Some(1)], vec![2]);
    assert_eq!(classify(&dense, &[10, 6])?.0, Int8Form::Gemm);
    assert_eq!(classify(&conv(&[]), &[16, 1, 1, 8])?.0, Int8Form::Gemm, "1×1 stride 1");
    let strided = conv(&[("strides", Attr::Ints(vec![2, 2]))]);
    assert_eq!(classify(&strided, &[16, 1, 1, 8])?.0, Int8Form::Conv, "1×1 stride 2 is no GEMM");
    let (form, g, c, k) = classify(&conv(&[("pads", Attr::Ints(vec![0, 0, 1, 1]))]), &[16, 3, 3, 3])?;
    assert_eq!((form, g.pads, c, k), (Int8Form::Conv, [0, 0, 1, 1], 3, 16));
    let dw = conv(&[("group", Attr::Int(24))]);
    assert_eq!(classify(&dw, &[24, 5, 5, 1])?.0, Int8Form::Depthwise);
    let refused = [
        (conv(&[("group", Attr::Int(4))]), vec![16, 3, 3, 2], "grouped"),
        (conv(&[("layout", Attr::String("NCHW".into()))]), vec![16, 8, 3, 3], "channels-last"),
        (conv(&[("auto_pad", Attr::String("SAME_UPPER".into()))]), vec![16, 3, 3, 8], "auto_pad"),
        (conv(&[]), vec![0, 3, 3, 8], "shape"),
    ];
    for (node, w, why) in refused {
        let err = classify(&node, &w).err().ok_or(format!("{why}: accepted"))?;
        assert!(err.contains(why), "{why}: {err}");
    }
    Ok(())
}

#[test]
fn weights_are_quantised_per_output_channel_into_padded_layouts() {
    // Dense [K=3, N=2] → [Np=4, Kp=4], transposed, zero padding.
    let w = [1.0, -2.0, 0.5, 4.0, -1.0, 8.0];
    let q = quantised_weights(Int8Form::Gemm, &w, &[3, 2], &[1.0 / 127.0, 8.0 / 127.0], (4, 4));
    let q: Vec<i8> = q.into_iter().map(|b| b as i8).collect();
    assert_eq!(q, [127, 64, -127, 0, -32, 64, 127, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    // OHWI [K=1, 1, 1, C=3] → [Kp=4, Cp=4].
    let q = quantised_weights(Int8Form::Conv, &[0.5, -1.0, 1.0], &[1, 1, 1, 3], &[1.0 / 127.0], (4, 4));
    assert_eq!(&q[..4], &[64, (-127i8) as u8, 127, 0]);
    assert!(q[4..].iter().all(|&b| b == 0));
}
