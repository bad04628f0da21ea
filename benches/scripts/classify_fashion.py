#!/usr/bin/env python3
"""Classify the Fashion-MNIST test set through a running kiln server, over HTTP.

Each image is sent as a PNG file to POST /predict/batch (in batches); the answer's
class is compared with the test label. Prints and optionally writes the accuracy.
Needs only the standard library and Pillow.
"""
import argparse
import gzip
import http.client
import io
import json
import struct
import time
import uuid

from PIL import Image


def idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        return [data[16 + i * rows * cols:16 + (i + 1) * rows * cols] for i in range(n)], (rows, cols)
    return list(data[8:8 + n]), None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model", default="fashion_mnist")
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    images, (rows, cols) = idx(f"{a.data}/t10k-images-idx3-ubyte.gz")
    labels, _ = idx(f"{a.data}/t10k-labels-idx1-ubyte.gz")
    n = min(a.limit or len(images), len(images))
    conn = http.client.HTTPConnection(a.host, a.port, timeout=60)
    correct = 0
    started = time.perf_counter()
    for lo in range(0, n, a.batch):
        boundary = uuid.uuid4().hex
        body = io.BytesIO()
        for i in range(lo, min(lo + a.batch, n)):
            png = io.BytesIO()
            Image.frombytes("L", (cols, rows), images[i]).save(png, format="PNG")
            body.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{i}.png\"\r\n"
                       f"Content-Type: image/png\r\n\r\n".encode())
            body.write(png.getvalue())
            body.write(b"\r\n")
        body.write(f"--{boundary}--\r\n".encode())
        conn.request("POST", f"/predict/batch?model={a.model}", body.getvalue(),
                     {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        if resp.status != 200:
            raise SystemExit(f"HTTP {resp.status}: {answer}")
        for i, p in zip(range(lo, n), answer["predictions"]):
            correct += int(p["class_id"] == labels[i])
    seconds = time.perf_counter() - started
    result = {"images": n, "correct": correct, "accuracy": correct / n, "seconds": seconds}
    print(json.dumps(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
