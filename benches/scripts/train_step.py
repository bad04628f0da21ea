#!/usr/bin/env python3
"""One ResNet training step in PyTorch, timed exactly as `kiln-train bench-step` times it.

Same model (torchvision's ResNet layout, v1.5 strides; torchvision itself when it
imports, else the equivalent definition below), same synthetic batch, same loss, same optimizer (AdamW,
weight decay 0.05 on tensors with more than one dimension, lr 1e-3), same libtorch.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import torchvision
except ImportError:  # torchvision needs numpy and pillow, which the trainer's venv lacks
    torchvision = None


class Block(nn.Module):
    def __init__(self, cin, width, stride, bottleneck):
        super().__init__()
        out = width * (4 if bottleneck else 1)
        if bottleneck:
            self.convs = nn.ModuleList([nn.Conv2d(cin, width, 1, bias=False),
                                        nn.Conv2d(width, width, 3, stride, 1, bias=False),
                                        nn.Conv2d(width, out, 1, bias=False)])
            self.bns = nn.ModuleList([nn.BatchNorm2d(width), nn.BatchNorm2d(width), nn.BatchNorm2d(out)])
        else:
            self.convs = nn.ModuleList([nn.Conv2d(cin, width, 3, stride, 1, bias=False),
                                        nn.Conv2d(width, width, 3, 1, 1, bias=False)])
            self.bns = nn.ModuleList([nn.BatchNorm2d(width), nn.BatchNorm2d(width)])
        self.down = None
        if stride != 1 or cin != out:
            self.down = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))
        self.out = out

    def forward(self, x):
        y = x
        for i, (c, b) in enumerate(zip(self.convs, self.bns)):
            y = b(c(y))
            if i < len(self.convs) - 1:
                y = F.relu(y)
        return F.relu(y + (self.down(x) if self.down is not None else x))


class ResNet(nn.Module):
    def __init__(self, layers, bottleneck, num_classes):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for i, n in enumerate(layers):
            for j in range(n):
                b = Block(cin, 64 * 2 ** i, 2 if (j == 0 and i > 0) else 1, bottleneck)
                blocks.append(b)
                cin = b.out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def build(name, num_classes):
    if torchvision is not None:
        return getattr(torchvision.models, name)(num_classes=num_classes)
    if name == "resnet18":
        return ResNet([2, 2, 2, 2], False, num_classes)
    return ResNet([3, 4, 6, 3], True, num_classes)


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
    model = build(a.model, a.num_classes).to(dev).train()
    assert sum(p.numel() for p in model.parameters()) == {"resnet18": 11689512, "resnet50": 25557032}[a.model] - (
        1000 - a.num_classes) * ({"resnet18": 513, "resnet50": 2049}[a.model])
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
        "model_source": "torchvision" if torchvision is not None else "inline",
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
        f"threads {report['threads']:>2} ranks 1 | median {med:>9.2f} ms  mean {report['mean_ms']:>9.2f} ms  "
        f"{report['images_per_second']:>9.1f} img/s"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
