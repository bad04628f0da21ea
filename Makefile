# kiln — the two commands: `make serve` and `make test`. Both set themselves up.
SHELL := /bin/bash
CARGO ?= cargo
HOST ?= 127.0.0.1
PORT ?= 8000
export KILN_ORT_LIBRARY ?= $(CURDIR)/.kiln/lib/libonnxruntime.so
# libtorch for the trainer (installed by `scripts/setup --trainer`); serving never links it.
export LIBTORCH ?= $(CURDIR)/.kiln/libtorch
# NVRTC and ptxas for the kernel compile check (installed by scripts/setup-cuda); the test puts
# $(KILN_CUDA_HOME)/lib on LD_LIBRARY_PATH for itself.
export KILN_CUDA_HOME ?= $(CURDIR)/.kiln/cuda
# Open MPI refuses root unless told; CI runs as root.
export OMPI_ALLOW_RUN_AS_ROOT ?= 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM ?= 1

.PHONY: setup setup-trainer build build-trainer serve test lint fmt bench bench-load bench-train bench-build train-fashion clean

## setup: Python venv, ONNX Runtime library, EfficientNet-Lite0 import, sample photos (idempotent)
setup:
	@bash scripts/setup

## setup-trainer: setup + libtorch (PyPI torch 2.11.0), Open MPI, Fashion-MNIST, MiniLM-L6 (idempotent)
setup-trainer:
	@bash scripts/setup --trainer

build-trainer: setup-trainer
	$(CARGO) build --release -p kiln-trainer

build: setup
	$(CARGO) build --release -p kiln-cli

## serve: serve the default model on $(HOST):$(PORT) over HTTP/1.1 and HTTP/2
serve: build
	./target/release/kiln serve --host $(HOST) --port $(PORT) --model-repository models

## test: formatting, lints, and every test of the workspace
test: setup-trainer
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) test --workspace --locked

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## bench: engine, end-to-end HTTP and batcher benchmarks; writes out/bench-*.json
bench: setup
	$(CARGO) run --release -p kiln-bench --bin kiln-e2e-bench -- --out out/bench-e2e.json
	$(CARGO) run --release -p kiln-bench --bin kiln-batcher-bench -- --out out/bench-batcher.json

## bench-load: kiln bench vs wrk and h2load against a trivial server (needs wrk, nghttp2-client, taskset)
bench-load:
	$(CARGO) build --release -p kiln-cli -p kiln-bench
	python3 benches/scripts/loadgen-compare.py --reps 3 --out out/loadgen-compare.json

## bench-build: `kiln build` wall time, peak memory and activation-memory planning for ResNet-50 and MiniLM-L6
bench-build: build
	python3 benches/scripts/build_bench.py --out out/bench-build.json

## train-fashion: train the small CNN on Fashion-MNIST (CPU) and export it to models/fashion_mnist
train-fashion: build-trainer
	./target/release/kiln-train fit --model small-cnn --data fashion-mnist --epochs 5 --out runs/fashion-mnist
	./target/release/kiln-train export --checkpoint runs/fashion-mnist --out models/fashion_mnist/1/model.onnx --force

## bench-train: ResNet-18 training step, kiln-train vs PyTorch (same libtorch), and DDP 1 vs 2 processes
bench-train: build-trainer
	bash benches/scripts/train-step.sh

clean:
	rm -rf target .kiln runs models/*/[0-9]*/ models/*/labels.txt
