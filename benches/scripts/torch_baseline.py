#!/usr/bin/env python3
"""PyTorch baseline for `kiln perf`: the same architectures, random weights, one GPU, one process.

Models: ResNet-50 (torchvision, weights=None), BERT-base (transformers BertConfig()) and MiniLM-L6
(BertConfig with hidden 384, 6 layers, 12 heads, intermediate 1536), sequence --seq (128).
Modes: eager FP32, eager FP16 (channels_last for ResNet), FP16 replayed from a CUDA graph (static
input) and FP16 torch.compile (default mode, dynamic=False: one compile per batch size).

Every run is closed-loop on GPU-resident inputs: one call, then synchronize, so `latency_ms` is the
host-observed latency; `gpu_ms` is the same call timed with CUDA events. Throughput is
iterations * batch / wall time over --seconds (or --iters). Each (model, mode, batch) is guarded: a
failure (OOM, compile or capture error) is recorded in the JSON and the rest continue.

--export-onnx DIR writes resnet50.onnx, bert-base.onnx and minilm-l6.onnx (FP32, random weights from
the same seed, opset 17, dynamic batch/seq axes) with the TorchScript exporter and exits, so that
kiln builds and runs the very same architectures.
"""
import argparse
import copy
import json
import math
import os
import statistics
import time
import traceback

import torch

BERTS = {
    "bert-base": {},
    "minilm-l6": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}
MODES = ("eager-fp32", "eager-fp16", "cuda-graph-fp16", "compile-fp16")


def ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def build(name, attn="sdpa"):
    """FP32 model in eval mode; the seed makes every build of a name carry the same weights."""
    torch.manual_seed(0)
    if name == "resnet50":
        import torchvision
        return torchvision.models.resnet50(weights=None).eval()
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(**BERTS[name], attn_implementation=attn)).eval()


def make_inputs(name, batch, seq, device):
    g = torch.Generator().manual_seed(batch)
    if name == "resnet50":
        return {"x": (torch.rand(batch, 3, 224, 224, generator=g) * 2 - 1).to(device)}
    return {
        "input_ids": torch.randint(0, 1000, (batch, seq), generator=g).to(device),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device),
        "token_type_ids": torch.zeros(batch, seq, dtype=torch.long, device=device),
    }


def caller(model, name, inputs):
    if name == "resnet50":
        x = inputs["x"]
        return lambda: model(x)
    return lambda: model(**inputs)


def cast_inputs(name, inputs, fp16):
    if name != "resnet50" or not fp16:
        return inputs
    return {"x": inputs["x"].half().contiguous(memory_format=torch.channels_last)}


def timed(fn, batch, args, cuda):
    """Closed loop: warm-up, then call + synchronize until --seconds (or --iters) have passed."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        fn()
    sync()
    lat, gpu = [], []
    start = time.perf_counter()
    while True:
        if cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
        t0 = time.perf_counter()
        fn()
        if cuda:
            e1.record()
        sync()
        lat.append((time.perf_counter() - t0) * 1e3)
        if cuda:
            gpu.append(e0.elapsed_time(e1))
        done = len(lat) >= args.iters if args.iters else time.perf_counter() - start >= args.seconds
        if done:
            break
    wall = time.perf_counter() - start
    lat.sort()
    pct = lambda q: lat[min(len(lat) - 1, math.ceil(q * len(lat)) - 1)]
    return {
        "iters": len(lat),
        "wall_s": wall,
        "throughput": len(lat) * batch / wall,
        "latency_ms": {"mean": statistics.fmean(lat), "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
                       "max": lat[-1]},
        "gpu_ms": statistics.fmean(gpu) if gpu else None,
    }


def capture(name, model, inputs, fp16_builder):
    """A CUDA graph of one forward on static inputs. transformers may read the attention mask on the
    host (to skip an all-ones mask), which capture forbids: then retry without the (all-ones, hence
    equivalent) mask, then with eager attention. Returns (replay, note)."""
    variants = [("", model, inputs)]
    if name != "resnet50":
        variants.append(("attention_mask omitted (all ones)", model,
                         {k: v for k, v in inputs.items() if k != "attention_mask"}))
        variants.append(("eager attention", fp16_builder, inputs))
    errors = []
    for note, m, ins in variants:
        try:
            if callable(m) and not isinstance(m, torch.nn.Module):
                m = m()
            fn = caller(m, name, ins)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            torch.cuda.synchronize()
            # The graph reads the model's weights and the static inputs: keep both alive with it.
            return (lambda keep=(m, ins): graph.replay()), note
        except Exception as e:  # noqa: BLE001 - try the next variant
            errors.append(f"{note or 'as is'}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            try:
                torch.cuda.synchronize()
            except RuntimeError:
                pass
    raise RuntimeError("CUDA graph capture failed: " + " | ".join(errors))


def run_config(name, mode, batch, args, models, device):
    cuda = device.type == "cuda"
    fp16 = mode != "eager-fp32"
    model = models["fp16" if fp16 else "fp32"]
    inputs = cast_inputs(name, make_inputs(name, batch, args.seq, device), fp16)
    note, setup = "", time.perf_counter()
    if mode == "cuda-graph-fp16":
        if not cuda:
            raise RuntimeError("CUDA graphs need --device cuda")
        fn, note = capture(name, model, inputs, lambda: half(build(name, "eager"), name, device))
    elif mode == "compile-fp16":
        if "compiled" not in models:
            models["compiled"] = torch.compile(model, dynamic=False)
        fn = caller(models["compiled"], name, inputs)
        fn()  # compiles for this shape
    else:
        fn = caller(model, name, inputs)
    setup = time.perf_counter() - setup
    r = timed(fn, batch, args, cuda)
    r.update(setup_s=setup, note=note)
    return r


def half(model, name, device):
    model = model.to(device).half()
    return model.to(memory_format=torch.channels_last) if name == "resnet50" else model


def export_onnx(out_dir, seq):
    os.makedirs(out_dir, exist_ok=True)
    for name in ("resnet50", "bert-base", "minilm-l6"):
        path = os.path.join(out_dir, f"{name}.onnx")
        t0 = time.perf_counter()
        # Eager attention exports as plain MatMul/Softmax, the pattern kiln fuses.
        model = build(name, "eager")
        ins = make_inputs(name, 2, min(seq, 16), torch.device("cpu"))
        if name == "resnet50":
            args, in_names, out_names = (ins["x"],), ["input"], ["logits"]
            axes = {"input": {0: "batch"}, "logits": {0: "batch"}}
        else:
            model = BertOutputs(model)
            in_names = ["input_ids", "attention_mask", "token_type_ids"]
            args = tuple(ins[k] for k in in_names)
            out_names = ["last_hidden_state", "pooler_output"]
            axes = {k: {0: "batch", 1: "seq"} for k in in_names}
            axes.update(last_hidden_state={0: "batch", 1: "seq"}, pooler_output={0: "batch"})
        with torch.no_grad():
            torch.onnx.export(model, args, path, input_names=in_names, output_names=out_names,
                              dynamic_axes=axes, opset_version=17, do_constant_folding=True, dynamo=False)
        print(f"exported {path} ({os.path.getsize(path) / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s")


class BertOutputs(torch.nn.Module):
    """BertModel's forward with the classic additive mask, positional inputs and a tuple of outputs.
    transformers 5 builds its mask with vmap-ed index arithmetic that exports to shapes no
    importer can resolve; embeddings → encoder → pooler with (1 - mask) * min is the same math
    in every transformers version and exports as the plain pattern kiln fuses into attention."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden = self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        mask = attention_mask[:, None, None, :].to(hidden.dtype)
        hidden = self.bert.encoder(hidden, attention_mask=(1.0 - mask) * torch.finfo(hidden.dtype).min)[0]
        return hidden, self.bert.pooler(hidden)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet50,bert-base,minilm-l6")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--resnet-batch", type=ints, default=[1, 8, 64, 256])
    p.add_argument("--bert-batch", type=ints, default=[1, 32, 128], help="BERT-base and MiniLM-L6")
    p.add_argument("--compile-batch", default="ends",
                   help="batch sizes torch.compile runs at: 'ends' (each model's first and last), 'all', or a list")
    p.add_argument("--compile-models", default="resnet50,bert-base,minilm-l6")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per configuration")
    p.add_argument("--iters", type=int, default=0, help="fixed iteration count instead of --seconds")
    p.add_argument("--warmup", type=int, default=10, help="warm-up iterations per configuration")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--export-onnx", metavar="DIR", help="write the ONNX models to DIR and exit")
    args = p.parse_args()
    if args.export_onnx:
        export_onnx(args.export_onnx, args.seq)
        return
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("torch_baseline: CUDA is not available to torch (use --device cpu to try the CPU paths)")
    if cuda:
        torch.backends.cudnn.benchmark = True
    gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
    modes = [m for m in args.modes.split(",") if m and not (args.no_compile and m == "compile-fp16")]
    results = []
    doc = {"tool": "torch_baseline", "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version(), "versions": versions(), "seq": args.seq,
           "seconds": args.seconds, "iters": args.iters, "input_on_gpu": True, "results": results}

    def record(entry):
        # Rewritten after every configuration, so that a run cut short by a timeout keeps what it measured.
        results.append(entry)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=2)
    print(f"torch {torch.__version__} on {gpu}; {args.seconds:g} s per configuration")
    print(f"{'model':<10} {'mode':<16} {'batch':>5} {'throughput':>12} {'p50 ms':>9} {'gpu ms':>9}  note")
    for name in [m for m in args.models.split(",") if m]:
        batches = args.resnet_batch if name == "resnet50" else args.bert_batch
        unit = "img/s" if name == "resnet50" else "seq/s"
        try:
            fp32 = build(name).to(device)
            models = {"fp32": fp32, "fp16": half(copy.deepcopy(fp32), name, device)}
        except Exception as e:  # noqa: BLE001
            record({"model": name, "error": f"build: {type(e).__name__}: {e}"})
            print(f"{name:<10} build failed: {e}")
            continue
        if "compile-fp16" in modes:
            torch._dynamo.reset()
        for mode in modes:
            for batch in batches:
                if mode == "compile-fp16" and not compiles(name, batch, batches, args):
                    continue
                entry = {"model": name, "mode": mode, "batch": batch, "unit": unit}
                if name != "resnet50":
                    entry["seq"] = args.seq
                try:
                    with torch.inference_mode() if mode != "compile-fp16" else torch.no_grad():
                        entry.update(run_config(name, mode, batch, args, models, device))
                    print(f"{name:<10} {mode:<16} {batch:>5} {entry['throughput']:>8.1f} {unit} "
                          f"{entry['latency_ms']['p50']:>9.3f} {entry['gpu_ms'] or 0:>9.3f}  {entry['note']}")
                except Exception as e:  # noqa: BLE001 - one failure must not end the run
                    entry["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                    print(f"{name:<10} {mode:<16} {batch:>5} FAILED {entry['error'][:200]}")
                    if os.environ.get("TORCH_BASELINE_TRACE"):
                        traceback.print_exc()
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
                record(entry)
        del models
        if cuda:
            torch.cuda.empty_cache()


def compiles(name, batch, batches, args):
    if name not in args.compile_models.split(","):
        return False
    if args.compile_batch == "all":
        return True
    if args.compile_batch == "ends":
        return batch in (batches[0], batches[-1])
    return batch in ints(args.compile_batch)


def versions():
    out = {}
    for mod in ("torchvision", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


if __name__ == "__main__":
    main()
