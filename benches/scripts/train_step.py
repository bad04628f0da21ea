#!/usr/bin/env python3
"""One ResNet training step in PyTorch, timed exactly as `kiln-train bench-step` times it.

Same model (torchvision's ResNet), same synthetic batch, same loss, same optimizer (AdamW,
weight decay 0.05 on tensors with more than one dimension, lr 1e-3), same libtorch.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    model = getattr(torchvision.models, a.model)(num_classes=a.num_classes).to(dev).train()
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3
    )
    torch.manual_seed(0)
    x = torch.randn(a.batch_size, 3, a.image_size, a.image_size, device=dev)
    y = torch.randint(0, a.num_classes, (a.batch_size,), device=dev)
    amp = a.amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    times = []
    for i in range(a.warmup + a.steps):
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sync()
        if i >= a.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    med = statistics.median(times)
    report = {
        "implementation": f"PyTorch {torch.__version__} (Python)",
        "model": a.model,
        "batch_size": a.batch_size,
        "image_size": a.image_size,
        "device": str(dev),
        "amp": amp,
        "threads": torch.get_num_threads(),
        "world_size": 1,
        "steps_ms": times,
        "median_ms": med,
        "mean_ms": sum(times) / len(times),
        "images_per_second": a.batch_size / (med / 1e3),
    }
    print(
        f"{'PyTorch (Python)':<20} {a.model:<9} batch {a.batch_size:>4} {a.image_size:>4}px {str(dev):<8} "
        f"threads {report['threads']:>2} ranks 1 | median {med:>9.2} ms  mean {report['mean_ms']:>9.2} ms  "
        f"{report['images_per_second']:>9.1} img/s"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
