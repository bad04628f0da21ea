#!/usr/bin/env bash
# Training-step benchmark: kiln-train vs PyTorch on the same libtorch, alternating runs,
# then data-parallel scaling of kiln-train with 1 vs 2 MPI processes. Writes out/bench-train.json.
# Env: KILN_TRAIN (binary), PYTHON (with torch + torchvision), DEVICE (cpu|cuda), REPS, BATCH, IMAGE, AMP=1.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
kt=${KILN_TRAIN:-$root/target/release/kiln-train}
py=${PYTHON:-$root/.kiln/torch-venv/bin/python}
device=${DEVICE:-cpu}
reps=${REPS:-3}
batch=${BATCH:-64}
image=${IMAGE:-224}
steps=${STEPS:-8}
amp=()
[ "${AMP:-0}" = 1 ] && amp=(--amp)
out=${OUT_DIR:-$root/out}
mkdir -p "$out/train-step"

for r in $(seq 1 "$reps"); do
  "$kt" bench-step --model resnet18 --batch-size "$batch" --image-size "$image" --steps "$steps" \
    --device "$device" "${amp[@]}" --json "$out/train-step/kiln-$r.json"
  "$py" "$root/benches/scripts/train_step.py" --model resnet18 --batch-size "$batch" --image-size "$image" \
    --steps "$steps" --device "$device" "${amp[@]}" --json "$out/train-step/torch-$r.json"
done

ddp=()
if command -v mpirun >/dev/null 2>&1 && [ "$device" = cpu ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  for n in 1 2; do
    mpirun --oversubscribe --bind-to none -n "$n" "$kt" bench-step --model small-cnn --num-classes 10 \
      --batch-size 256 --steps 20 --device cpu --json "$out/train-step/ddp-$n.json"
  done
  ddp=("$out"/train-step/ddp-*.json)
fi

"$py" - "$out/bench-train.json" "$out"/train-step/kiln-*.json "$out"/train-step/torch-*.json -- "${ddp[@]}" <<'PY'
import json, statistics, sys
dest = sys.argv[1]
rest = sys.argv[2:]
sep = rest.index("--")
steps, ddp = rest[:sep], rest[sep + 1:]
runs = [json.load(open(p)) for p in steps]
kiln = [r["median_ms"] for r in runs if r["implementation"].startswith("kiln")]
torch = [r["median_ms"] for r in runs if not r["implementation"].startswith("kiln")]
summary = {
    "kiln_median_ms": statistics.median(kiln),
    "torch_median_ms": statistics.median(torch),
    "ratio_kiln_over_torch": statistics.median(kiln) / statistics.median(torch),
    "runs": runs,
}
if ddp:
    d = {json.load(open(p))["world_size"]: json.load(open(p)) for p in ddp}
    summary["ddp"] = {str(n): {"median_ms": r["median_ms"], "images_per_second": r["images_per_second"],
                               "threads_per_rank": r["threads"]} for n, r in sorted(d.items())}
    if 1 in d and 2 in d:
        summary["ddp"]["speedup_2_over_1"] = d[2]["images_per_second"] / d[1]["images_per_second"]
json.dump(summary, open(dest, "w"), indent=2)
print(f"\nkiln-train / PyTorch step time (median of {len(kiln)} runs): "
      f"{summary['kiln_median_ms']:.1f} / {summary['torch_median_ms']:.1f} ms = {summary['ratio_kiln_over_torch']:.3f}")
if "ddp" in summary:
    print("DDP:", json.dumps(summary["ddp"]))
print(f"wrote {dest}")
PY
