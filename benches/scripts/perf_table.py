#!/usr/bin/env python3
"""Combines `kiln perf --json` files and a `torch_baseline.py --json` file into markdown tables.

Usage: perf_table.py FILE.json... [--out table.md]

Each file is recognised by its "tool" field (a `kiln perf` file over several plans is an array of
such documents); unreadable or missing files are noted and skipped.
kiln results are keyed by the plan's file stem (resnet50.plan → resnet50), so name plans like the
torch models (resnet50, bert-base, minilm-l6). Missing entries show as "–"; failed ones as "failed".

Columns: kiln samples/s end to end (host tensors in, host tensors out: H2D + compute + D2H) with
and without CUDA graphs, kiln compute only (batch / mean compute ms: the GPU-resident number the
torch baseline measures), each torch mode, and the ratios kiln / torch eager FP16 and kiln / the
best torch FP16 mode (end to end and compute only).
"""
import argparse
import json
import sys

TORCH_MODES = ("eager-fp32", "eager-fp16", "cuda-graph-fp16", "compile-fp16")
FP16_MODES = TORCH_MODES[1:]
DASH = "–"


def load(paths):
    kiln, torch, notes = [], [], []
    for p in paths:
        try:
            with open(p) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            notes.append(f"skipped {p}: {e}")
            continue
        # `kiln perf` over several plans writes an array of documents, one per plan.
        for d in doc if isinstance(doc, list) else [doc]:
            tool = d.get("tool") if isinstance(d, dict) else None
            if tool == "kiln perf":
                kiln.append(d)
            elif tool == "torch_baseline":
                torch.append(d)
            else:
                notes.append(f"skipped {p}: unknown tool {tool!r}")
    return kiln, torch, notes


def kiln_index(docs):
    """((model, seq), batch, graph) -> result; later files win."""
    out = {}
    for d in docs:
        for r in d.get("results", []):
            out[((d.get("model"), r.get("seq")), r.get("batch"), bool(d.get("cuda_graph")))] = r
    return out


def torch_index(docs):
    out = {}
    for d in docs:
        for r in d.get("results", []):
            out[((r.get("model"), r.get("seq")), r.get("mode"), r.get("batch"))] = r
    return out


def label(model):
    name, seq = model
    return f"{name} (seq {seq})" if seq else str(name)


def num(x, digits=0):
    return DASH if x is None else f"{x:,.{digits}f}"


def ratio(a, b):
    return DASH if not a or not b else f"{a / b:.2f}×"


def kiln_tput(r):
    if r is None or "error" in r:
        return None
    return r.get("samples_per_s")


def kiln_compute_tput(r):
    if r is None or "error" in r or not r.get("compute_ms"):
        return None
    return r["batch"] * 1e3 / r["compute_ms"]


def torch_tput(r):
    return None if r is None or "error" in r else r.get("throughput")


def cell(r, value, digits=0):
    if r is not None and "error" in r:
        return "failed"
    return num(value, digits)


def tables(kiln_docs, torch_docs):
    k, t = kiln_index(kiln_docs), torch_index(torch_docs)
    # A model at another sequence length is another row: ratios only compare equal work.
    models = sorted({m for m, _, _ in k} | {m for m, _, _ in t}, key=lambda m: (m[0] or "", m[1] or 0))
    lines = []
    gpus = sorted({d.get("device") for d in kiln_docs if d.get("device")} | {d.get("gpu") for d in torch_docs if d.get("gpu")})
    lines.append(f"GPU: {', '.join(gpus) or 'unknown'}" + ("  (**different GPUs: ratios are not comparable**)" if len(gpus) > 1 else ""))
    if torch_docs:
        d = torch_docs[-1]
        lines.append(f"torch {d.get('torch')} (CUDA {d.get('cuda')}, cuDNN {d.get('cudnn')}), {d.get('versions', {})}")
    lines.append("")
    head = ["model", "batch", "kiln graph", "kiln no graph", "kiln compute", *[f"torch {m}" for m in TORCH_MODES],
            "kiln/eager16", "kiln/best16", "compute/best16"]
    lines.append("Throughput, samples/s (img/s or seq/s):")
    lines.append("")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for m in models:
        batches = sorted({b for mm, b, _ in k if mm == m and b is not None} | {b for mm, _, b in t if mm == m and b is not None})
        for b in batches:
            kg, kn = k.get((m, b, True)), k.get((m, b, False))
            tr = {mode: t.get((m, mode, b)) for mode in TORCH_MODES}
            best = max((v for v in (torch_tput(tr[x]) for x in FP16_MODES) if v), default=None)
            eager16 = torch_tput(tr["eager-fp16"])
            row = [label(m), str(b), cell(kg, kiln_tput(kg)), cell(kn, kiln_tput(kn)), cell(kg, kiln_compute_tput(kg)),
                   *[cell(tr[x], torch_tput(tr[x])) for x in TORCH_MODES],
                   ratio(kiln_tput(kg), eager16), ratio(kiln_tput(kg), best), ratio(kiln_compute_tput(kg), best)]
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Batch-1 latency, p50 ms (kiln: end to end; torch: GPU-resident input):")
    lines.append("")
    head = ["model", "kiln graph", "kiln no graph", "kiln compute", *[f"torch {m}" for m in TORCH_MODES]]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for m in models:
        kg, kn = k.get((m, 1, True)), k.get((m, 1, False))
        tr = [t.get((m, x, 1)) for x in TORCH_MODES]
        if kg is None and kn is None and not any(tr):
            continue
        p50 = lambda r: None if r is None or "error" in r else (r.get("latency_ms") or {}).get("p50")
        comp = None if kg is None or "error" in kg else kg.get("compute_ms")
        row = [label(m), cell(kg, p50(kg), 3), cell(kn, p50(kn), 3), cell(kg, comp, 3), *[cell(r, p50(r), 3) for r in tr]]
        lines.append("| " + " | ".join(row) + " |")
    failures = [f"- kiln {label(m)} batch {b} ({'graph' if g else 'no graph'}): {r['error']}" for (m, b, g), r in k.items() if "error" in r]
    failures += [f"- torch {label(m)} {mode} batch {b}: {r['error']}" for (m, mode, b), r in t.items() if "error" in r]
    if failures:
        lines += ["", "Failures:", *failures]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="*")
    p.add_argument("--out", help="also write the markdown here")
    args = p.parse_args()
    kiln, torch, notes = load(args.files)
    for n in notes:
        print(n, file=sys.stderr)
    text = tables(kiln, torch)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
