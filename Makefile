# kiln — the two commands: `make serve` and `make test`. Both set themselves up.
SHELL := /bin/bash
CARGO ?= cargo
HOST ?= 127.0.0.1
PORT ?= 8000
export KILN_ORT_LIBRARY ?= $(CURDIR)/.kiln/lib/libonnxruntime.so

.PHONY: setup build serve test lint fmt bench bench-load clean

## setup: Python venv, ONNX Runtime library, EfficientNet-Lite0 import, sample photos (idempotent)
setup:
	@bash scripts/setup

build: setup
	$(CARGO) build --release -p kiln-cli

## serve: serve the default model on $(HOST):$(PORT) over HTTP/1.1 and HTTP/2
serve: build
	./target/release/kiln serve --host $(HOST) --port $(PORT) --model-repository models

## test: formatting, lints, and every test of the workspace
test: setup
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

clean:
	rm -rf target .kiln models/*/[0-9]*/ models/*/labels.txt
