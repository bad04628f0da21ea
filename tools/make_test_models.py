"""Builds the small tensor models kiln's protocol tests and benchmarks use.

Written with `onnx.helper` (no torch), into a Triton-style repository:
  identity_fp32  INPUT0 FP32 [-1, 16] -> OUTPUT0 (Identity): protocol overhead benchmarks
  add_sub        INPUT0, INPUT1 FP32 [-1, 16] -> OUTPUT0 = a + b, OUTPUT1 = a - b
                 (the shape of Triton's "simple" example, so its clients work unchanged)
  all_types      one Identity per KServe datatype, [-1, 4] each
"""

import argparse
import os
import sys

import onnx
from onnx import TensorProto, helper

TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def value(name, elem, width):
    return helper.make_tensor_value_info(name, elem, ["batch", width])


def save(repo, name, graph, config):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="kiln")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    version_dir = os.path.join(repo, name, "1")
    os.makedirs(version_dir, exist_ok=True)
    path = os.path.join(version_dir, "model.onnx")
    onnx.save(model, path + ".tmp")
    os.replace(path + ".tmp", path)
    with open(os.path.join(repo, name, "config.toml"), "w") as f:
        f.write(config)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="model repository to write")
    args = parser.parse_args()

    identity = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"], name="identity")],
        "identity_fp32",
        [value("INPUT0", TensorProto.FLOAT, 16)],
        [value("OUTPUT0", TensorProto.FLOAT, 16)],
    )
    save(args.out, "identity_fp32", identity,
         'name = "identity_fp32"\nmax_batch_size = 64\n\n[batching]\nmax_queue_delay_us = 100\n')

    add_sub = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"], name="add"),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"], name="sub"),
        ],
        "add_sub",
        [value("INPUT0", TensorProto.FLOAT, 16), value("INPUT1", TensorProto.FLOAT, 16)],
        [value("OUTPUT0", TensorProto.FLOAT, 16), value("OUTPUT1", TensorProto.FLOAT, 16)],
    )
    save(args.out, "add_sub", add_sub, 'name = "add_sub"\nmax_batch_size = 8\n')

    nodes, inputs, outputs = [], [], []
    for dtype, elem in TYPES.items():
        nodes.append(helper.make_node("Identity", [f"INPUT_{dtype}"], [f"OUTPUT_{dtype}"], name=f"id_{dtype}"))
        inputs.append(value(f"INPUT_{dtype}", elem, 4))
        outputs.append(value(f"OUTPUT_{dtype}", elem, 4))
    all_types = helper.make_graph(nodes, "all_types", inputs, outputs)
    save(args.out, "all_types", all_types, 'name = "all_types"\nmax_batch_size = 8\n')
    print(f"[test-models] wrote identity_fp32, add_sub, all_types to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
