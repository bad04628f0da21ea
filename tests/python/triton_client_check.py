"""Drives a running kiln server with Triton's official HTTP client, unmodified.

Usage: triton_client_check.py HOST:PORT
Exits non-zero (with the failing check named) if anything kiln answers differs from
what the KServe v2 protocol and the test models promise.
"""

import sys

import numpy as np
import tritonclient.http as httpclient


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok: {what}")


def add_sub(client, binary):
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    b = np.full((2, 16), 0.5, dtype=np.float32)
    inputs = [httpclient.InferInput("INPUT0", [2, 16], "FP32"), httpclient.InferInput("INPUT1", [2, 16], "FP32")]
    inputs[0].set_data_from_numpy(a, binary_data=binary)
    inputs[1].set_data_from_numpy(b, binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary),
        httpclient.InferRequestedOutput("OUTPUT1", binary_data=binary),
    ]
    result = client.infer("add_sub", inputs, outputs=outputs, request_id="req-7")
    check(np.array_equal(result.as_numpy("OUTPUT0"), a + b), f"add_sub OUTPUT0 (binary={binary})")
    check(np.array_equal(result.as_numpy("OUTPUT1"), a - b), f"add_sub OUTPUT1 (binary={binary})")
    check(result.get_response()["id"] == "req-7", "request id echoed")


def all_types(client, binary):
    values = {
        "BOOL": np.array([[True, False, True, True]], dtype=bool),
        "UINT8": np.array([[0, 1, 200, 255]], dtype=np.uint8),
        "INT8": np.array([[-128, -1, 0, 127]], dtype=np.int8),
        "INT16": np.array([[-32768, -2, 3, 32767]], dtype=np.int16),
        "INT32": np.array([[-(2**31), -3, 4, 2**31 - 1]], dtype=np.int32),
        "INT64": np.array([[-(2**62), -4, 5, 2**62]], dtype=np.int64),
        "FP16": np.array([[0.5, -1.25, 65504, 0.0]], dtype=np.float16),
        "FP32": np.array([[1.5, -2.75, 3.0e38, 1e-30]], dtype=np.float32),
        "FP64": np.array([[1.0e300, -2.5, 0.1, 3.0]], dtype=np.float64),
        "BYTES": np.array([[b"kiln", b"", b"tensor", b"\xc3\xa9t\xc3\xa9"]], dtype=np.object_),
    }
    inputs, outputs = [], []
    for dtype, array in values.items():
        tensor = httpclient.InferInput(f"INPUT_{dtype}", list(array.shape), dtype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
        outputs.append(httpclient.InferRequestedOutput(f"OUTPUT_{dtype}", binary_data=binary))
    result = client.infer("all_types", inputs, outputs=outputs)
    for dtype, array in values.items():
        got = result.as_numpy(f"OUTPUT_{dtype}")
        if dtype == "BYTES":
            same = [bytes(x) if not isinstance(x, str) else x.encode() for x in got.ravel()] == list(array.ravel())
        else:
            same = got.dtype == array.dtype and np.array_equal(got, array)
        check(same and got.shape == array.shape, f"all_types {dtype} round trip (binary={binary})")


def main():
    url = sys.argv[1]
    client = httpclient.InferenceServerClient(url=url)
    check(client.is_server_live(), "server live")
    check(client.is_server_ready(), "server ready")
    check(client.is_model_ready("add_sub"), "add_sub ready")
    meta = client.get_server_metadata()
    check(meta["name"] == "kiln" and "binary_tensor_data" in meta["extensions"], "server metadata")
    model = client.get_model_metadata("add_sub")
    check([i["name"] for i in model["inputs"]] == ["INPUT0", "INPUT1"], "model metadata inputs")
    check(model["inputs"][0]["datatype"] == "FP32" and model["inputs"][0]["shape"] == [-1, 16], "input spec")
    for binary in (False, True):
        add_sub(client, binary)
        all_types(client, binary)
    try:
        client.get_model_metadata("no_such_model")
        raise SystemExit("FAILED: unknown model did not raise")
    except httpclient.InferenceServerException as e:
        check("unknown model" in str(e), "unknown model is an error")
    print("triton client: all checks passed")


if __name__ == "__main__":
    main()
