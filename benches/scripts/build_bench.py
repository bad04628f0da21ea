#!/usr/bin/env python3
"""`kiln build` wall time and peak memory for ResNet-50 and MiniLM-L6, and the
memory planner's peak activation bytes vs the naive sum, at the largest profile.

Prints a table and writes JSON (default out/bench-build.json). Needs a release
`kiln` (make build) and the generated ResNet-50 (this script makes it)."""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_build(kiln, model, precision, extra, workdir):
    plan = os.path.join(workdir, f"{os.path.basename(model)}.{precision}.plan")
    report = plan + ".json"
    cmd = [kiln, "build", model, "--precision", precision, "--out", plan, "--report", report] + extra
    log = os.path.join(workdir, "build.log")
    with open(log, "w") as out:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        # wait4 gives this child's own peak RSS (getrusage would give the max over all children).
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        with open(log) as f:
            sys.exit(f"{' '.join(cmd)} failed:\n{f.read()}")
    with open(report) as f:
        rep = json.load(f)
    return {
        "precision": precision,
        "wall_s": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "nodes_before": rep["nodes_before"],
        "nodes_after": rep["nodes_after"],
        "weight_mib": rep["weight_bytes"] / 2**20,
        "bindings": rep["memory_bindings"],
        "peak_activation_mib": rep["peak_activation_bytes"] / 2**20,
        "naive_activation_mib": rep["naive_activation_bytes"] / 2**20,
        "plan_mib": os.path.getsize(plan) / 2**20,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kiln", default=os.path.join(ROOT, "target/release/kiln"))
    ap.add_argument("--out", default=os.path.join(ROOT, "out/bench-build.json"))
    args = ap.parse_args()
    minilm = os.path.join(ROOT, ".kiln/assets/minilm-l6-int8.onnx")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        r50 = os.path.join(tmp, "resnet50.onnx")
        subprocess.run(["cargo", "run", "-q", "--release", "-p", "kiln-tests", "--example", "make_resnet", "--",
                        "50", r50], check=True, cwd=ROOT)
        cases = [("resnet50", r50, ["--batch", "1:8:64"])]
        if os.path.isfile(minilm):
            cases.append(("minilm-l6", minilm, ["--batch", "1:8:64", "--seq", "1:128:128"]))
        for name, model, extra in cases:
            for precision in ("fp32", "fp16"):
                row = run_build(args.kiln, model, precision, extra, tmp)
                row["model"] = name
                rows.append(row)
    print(f"{'model':<10} {'prec':<5} {'wall s':>7} {'RSS MiB':>8} {'nodes':>11} {'weights MiB':>11} "
          f"{'act peak MiB':>12} {'naive MiB':>10} {'reuse':>6}")
    for r in rows:
        print(f"{r['model']:<10} {r['precision']:<5} {r['wall_s']:>7.2f} {r['peak_rss_mib']:>8.0f} "
              f"{r['nodes_before']:>5}→{r['nodes_after']:<5} {r['weight_mib']:>11.1f} "
              f"{r['peak_activation_mib']:>12.1f} {r['naive_activation_mib']:>10.1f} "
              f"{r['naive_activation_mib'] / max(r['peak_activation_mib'], 1e-9):>5.1f}×")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
