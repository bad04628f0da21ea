#!/usr/bin/env bash
# Per-request server overhead of kiln (issue 4): KServe v2 JSON vs binary infer on the
# identity model, over HTTP/1.1 (wrk) and HTTP/2 cleartext with prior knowledge (h2load),
# plus GET /v2/health/live as the bare-HTTP baseline. Loopback only.
#
#   benches/scripts/overhead.sh            # builds, then ≈ 3 minutes of measurement
#
# Needs wrk and h2load (Debian: apt-get install wrk nghttp2-client), curl, python3, and
# `make setup` done (.kiln/test-models, .kiln/lib/libonnxruntime.so, models/).
#
# Environment:
#   DUR=10        seconds per main-table run      SIDE_DUR=5  seconds per side run
#   SIDE=1        also run the side measurements (identity with queue delay 0; multipart)
#   WIRE=1        also time wrk -c1 runs from loopback packet timestamps (needs tcpdump, root)
#   WIRE_DUR=3    seconds per packet-timed run
#   SKIP_BUILD=0  1 skips `cargo build`
#   WAIT_QUIET=0  wait up to this many seconds for the 1-minute load average to drop below
#                 QUIET_LOAD (default 1.5) before measuring
#
# Writes out/overhead/ (OUT_DIR overrides): runs/ (raw client output, h2load request logs, /metrics before and
# after each run), env.txt, results.json, results.md; prints the markdown tables.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
SCRIPTS=benches/scripts
OUT=${OUT_DIR:-out/overhead}
RUNS=$OUT/runs
DUR=${DUR:-10}
SIDE_DUR=${SIDE_DUR:-5}
WIRE_DUR=${WIRE_DUR:-3}
SIDE=${SIDE:-1}
WAIT_QUIET=${WAIT_QUIET:-0}
QUIET_LOAD=${QUIET_LOAD:-1.5}
ORT=.kiln/lib/libonnxruntime.so
KILN=./target/release/kiln

for tool in wrk h2load curl python3; do
  command -v "$tool" >/dev/null || { echo "overhead.sh: $tool is missing (apt-get install wrk nghttp2-client curl python3)" >&2; exit 1; }
done
for f in "$ORT" .kiln/test-models/identity_fp32/config.toml; do
  [ -e "$f" ] || { echo "overhead.sh: $f is missing; run make setup" >&2; exit 1; }
done

LOAD_BEFORE_BUILD=$(cut -d' ' -f1-3 /proc/loadavg)
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  cargo build --release -p kiln-cli >&2
fi

rm -rf "$OUT"
mkdir -p "$RUNS"

SERVER_PID=
BASE=
stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=
}
trap stop_server EXIT
trap 'exit 130' INT TERM

# start_server TAG REPOSITORY: starts kiln on a free loopback port, sets BASE.
start_server() {
  local tag=$1 repo=$2 port= i
  : >"$OUT/server-$tag.stdout"
  "$KILN" serve --host 127.0.0.1 --port 0 --model-repository "$repo" --ort-library "$ORT" \
    >"$OUT/server-$tag.stdout" 2>"$OUT/server-$tag.log" &
  SERVER_PID=$!
  for i in $(seq 1 600); do
    port=$(sed -n 's#^kiln listening on http://127\.0\.0\.1:\([0-9][0-9]*\).*#\1#p' "$OUT/server-$tag.stdout" || true)
    [ -n "$port" ] && break
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "overhead.sh: kiln exited during start-up; see $OUT/server-$tag.log" >&2
      tail -5 "$OUT/server-$tag.log" >&2
      exit 1
    fi
    sleep 0.1
  done
  [ -n "$port" ] || { echo "overhead.sh: kiln printed no port within 60 s" >&2; exit 1; }
  BASE=http://127.0.0.1:$port
  curl -sf "$BASE/v2/models/identity_fp32/ready" >/dev/null
  echo "# kiln ($tag) on $BASE, pid $SERVER_PID" >&2
}

# Request bodies: 16 FP32 values, shape [1,16].
JSON_BODY=$RUNS/infer.json
BIN_BODY=$RUNS/infer.bin
MP_BODY=$RUNS/multipart.bin
python3 - "$JSON_BODY" "$BIN_BODY" "$MP_BODY" >"$RUNS/header_len" <<'EOF'
import json, struct, sys
values = [float(i) for i in range(16)]
with open(sys.argv[1], 'w') as f:
    json.dump({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": values}]}, f,
              separators=(',', ':'))
# Binary tensors both ways, as Triton's clients send them: the JSON header, then the raw
# little-endian bytes; the output is asked for as binary too.
header = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                                 "parameters": {"binary_data_size": 64}}],
                     "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]},
                    separators=(',', ':')).encode()
with open(sys.argv[2], 'wb') as f:
    f.write(header + struct.pack('<16f', *values))
# A form whose only part is not the `file` field: kiln reads and parses the whole form,
# then answers 400 missing_field without touching any image code.
part = b''.join([b'--kilnbench\r\n',
                 b'Content-Disposition: form-data; name="other"; filename="x.bin"\r\n',
                 b'Content-Type: application/octet-stream\r\n\r\n', struct.pack('<16f', *values),
                 b'\r\n--kilnbench--\r\n'])
with open(sys.argv[3], 'wb') as f:
    f.write(part)
print(len(header))
EOF
HLEN=$(cat "$RUNS/header_len")
MP_CT='multipart/form-data; boundary=kilnbench'

if [ "$WAIT_QUIET" -gt 0 ]; then
  end=$((SECONDS + WAIT_QUIET))
  while awk -v q="$QUIET_LOAD" '{exit !($1 >= q)}' /proc/loadavg && [ $SECONDS -lt $end ]; do
    echo "# waiting for quiet: load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    sleep 10
  done
fi

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "load average before the build (1/5/15 min): $LOAD_BEFORE_BUILD"
  echo "load average at the first measurement (1/5/15 min): $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "cpu: $(nproc) cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)"
  echo "kernel: $(uname -r)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null) ($(git status --porcelain 2>/dev/null | wc -l) paths modified or untracked)"
  echo "wrk: $(wrk -v 2>&1 | head -1)"
  echo "h2load: $(h2load --version 2>&1 | head -1)"
  echo "durations: main ${DUR} s, side ${SIDE_DUR} s, packet-timed ${WIRE_DUR} s per run"
} >"$OUT/env.txt"

printf '#name\tgroup\tcase\tproto\tconcurrency\tmetric_endpoint\tmetric_model\texpected_status\tduration_s\n' \
  >"$RUNS/manifest.tsv"

scrape() { curl -sf "$BASE/metrics" >"$1"; }

# Each case: name | url path | method | body file | content-type | header length | metric endpoint | model | expected status
declare -A C_PATH C_METHOD C_BODY C_CT C_HLEN C_EP C_MODEL C_STATUS
defcase() {
  C_PATH[$1]=$2; C_METHOD[$1]=$3; C_BODY[$1]=$4; C_CT[$1]=$5; C_HLEN[$1]=$6; C_EP[$1]=$7; C_MODEL[$1]=$8; C_STATUS[$1]=$9
}
INFER=/v2/models/identity_fp32/infer
defcase health /v2/health/live GET "" "" "" - - 200
defcase json "$INFER" POST "$JSON_BODY" application/json "" infer identity_fp32 200
defcase binary "$INFER" POST "$BIN_BODY" application/octet-stream "$HLEN" infer identity_fp32 200
defcase multipart-parse "/predict?model=efficientnet_lite0" POST "$MP_BODY" "$MP_CT" "" predict efficientnet_lite0 400
defcase multipart-refused "/predict?model=efficientnet_lite0" POST "$MP_BODY" application/octet-stream "" predict efficientnet_lite0 415

CASE_LABEL() {
  case $1 in
    health) echo 'GET /v2/health/live (no body)' ;;
    json) echo 'v2 infer, JSON' ;;
    binary) echo "v2 infer, binary (header $HLEN B + 64 B)" ;;
    multipart-parse) echo 'multipart form parsed → 400' ;;
    multipart-refused) echo 'same body, wrong type → 415 (unread)' ;;
  esac
}

# run_wrk GROUP CASE CONNECTIONS SECONDS
run_wrk() {
  local group=$1 c=$2 conns=$3 dur=$4 threads=2 name
  name=$group-$c-h1-c$conns
  # wrk needs at least as many connections as threads.
  [ "$conns" -lt "$threads" ] && threads=$conns
  scrape "$RUNS/$name.before.prom"
  KILN_METHOD=${C_METHOD[$c]} KILN_BODY=${C_BODY[$c]} KILN_CONTENT_TYPE=${C_CT[$c]} KILN_HEADER_LEN=${C_HLEN[$c]} \
    wrk -t"$threads" -c"$conns" -d"${dur}s" --latency -s "$SCRIPTS/post.lua" "$BASE${C_PATH[$c]}" >"$RUNS/$name.txt" 2>&1
  scrape "$RUNS/$name.after.prom"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$group" "$(CASE_LABEL "$c")" "HTTP/1.1 (wrk -t$threads)" \
    "-c$conns" "${C_EP[$c]}" "${C_MODEL[$c]}" "${C_STATUS[$c]}" "$dur" >>"$RUNS/manifest.tsv"
  echo "# $name: $(grep -m1 'Requests/sec' "$RUNS/$name.txt")" >&2
}

# run_wire GROUP CASE SECONDS: wrk -c1 under tcpdump on lo. The packet timestamps split
# each round trip into server time (request segment out of the client -> first response
# segment out of the server: kernel delivery, wake-up, hyper, kiln, write) and client time
# (response -> next request). Needs tcpdump and the right to capture; skipped otherwise.
run_wire() {
  local group=$1 c=$2 dur=$3 name port td i
  name=$group-$c-h1-c1-wire
  port=${BASE##*:}
  tcpdump -i lo -n -s 96 -B 32768 -w "$RUNS/$name.pcap" "tcp port $port and (tcp[tcpflags] & tcp-push != 0)" \
    2>"$RUNS/$name.tcpdump.err" &
  td=$!
  for i in $(seq 1 50); do grep -q listening "$RUNS/$name.tcpdump.err" 2>/dev/null && break; sleep 0.1; done
  scrape "$RUNS/$name.before.prom"
  KILN_METHOD=${C_METHOD[$c]} KILN_BODY=${C_BODY[$c]} KILN_CONTENT_TYPE=${C_CT[$c]} KILN_HEADER_LEN=${C_HLEN[$c]} \
    wrk -t1 -c1 -d"${dur}s" --latency -s "$SCRIPTS/post.lua" "$BASE${C_PATH[$c]}" >"$RUNS/$name.txt" 2>&1
  scrape "$RUNS/$name.after.prom"
  sleep 0.2
  kill -INT "$td" 2>/dev/null || true
  wait "$td" 2>/dev/null || true
  tcpdump -r "$RUNS/$name.pcap" -n -tt 2>/dev/null | awk -v p=".$port" '{print $1, (substr($3, length($3) - length(p) + 1) == p ? "S" : "C")}' \
    >"$RUNS/$name.pkts"
  rm -f "$RUNS/$name.pcap"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$group-wire" "$(CASE_LABEL "$c")" "HTTP/1.1 (wrk -t1) + tcpdump" \
    "-c1" "${C_EP[$c]}" "${C_MODEL[$c]}" "${C_STATUS[$c]}" "$dur" >>"$RUNS/manifest.tsv"
  echo "# $name: $(grep -m1 'Requests/sec' "$RUNS/$name.txt")" >&2
}
CAN_WIRE=0
if [ "${WIRE:-1}" = 1 ] && command -v tcpdump >/dev/null && [ "$(id -u)" = 0 ]; then CAN_WIRE=1; fi

# run_h2 GROUP CASE CLIENTS STREAMS SECONDS
run_h2() {
  local group=$1 c=$2 clients=$3 streams=$4 dur=$5 name args
  name=$group-$c-h2-c$clients-m$streams
  args=(-D "$dur" -c "$clients" -m "$streams" -t 1 --log-file="$RUNS/$name.log")
  [ -n "${C_CT[$c]}" ] && args+=(-H "content-type: ${C_CT[$c]}")
  [ -n "${C_HLEN[$c]}" ] && args+=(-H "inference-header-content-length: ${C_HLEN[$c]}")
  [ -n "${C_BODY[$c]}" ] && args+=(-d "${C_BODY[$c]}")
  scrape "$RUNS/$name.before.prom"
  h2load "${args[@]}" "$BASE${C_PATH[$c]}" >"$RUNS/$name.txt" 2>&1
  scrape "$RUNS/$name.after.prom"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$group" "$(CASE_LABEL "$c")" "h2c (h2load -t1)" \
    "-c$clients -m$streams" "${C_EP[$c]}" "${C_MODEL[$c]}" "${C_STATUS[$c]}" "$dur" >>"$RUNS/manifest.tsv"
  echo "# $name: $(grep -m1 'req/s' "$RUNS/$name.txt")" >&2
}

warm_up() {
  local c
  for c in "$@"; do
    KILN_METHOD=${C_METHOD[$c]} KILN_BODY=${C_BODY[$c]} KILN_CONTENT_TYPE=${C_CT[$c]} KILN_HEADER_LEN=${C_HLEN[$c]} \
      wrk -t2 -c8 -d1s -s "$SCRIPTS/post.lua" "$BASE${C_PATH[$c]}" >/dev/null 2>&1
  done
}

# ---- main table: the test repository exactly as `make setup` made it ----
start_server main .kiln/test-models
warm_up json binary health
for c in health json binary; do
  run_wrk main "$c" 1 "$DUR"
  run_wrk main "$c" 32 "$DUR"
  run_h2 main "$c" 1 1 "$DUR"
  run_h2 main "$c" 4 16 "$DUR"
done
if [ "$CAN_WIRE" = 1 ]; then
  for c in health json binary; do run_wire main "$c" "$WIRE_DUR"; done
fi
stop_server

# ---- side runs: queue delay 0, and multipart parsing ----
if [ "$SIDE" = 1 ]; then
  SIDE_REPO=$ROOT/$OUT/repo-side
  mkdir -p "$SIDE_REPO/identity_fp32"
  sed 's/^max_queue_delay_us *=.*/max_queue_delay_us = 0/' .kiln/test-models/identity_fp32/config.toml \
    >"$SIDE_REPO/identity_fp32/config.toml"
  ln -s "$ROOT/.kiln/test-models/identity_fp32/1" "$SIDE_REPO/identity_fp32/1"
  [ -f models/efficientnet_lite0/config.toml ] && ln -s "$ROOT/models/efficientnet_lite0" "$SIDE_REPO/efficientnet_lite0"
  start_server side "$SIDE_REPO"
  warm_up json binary
  for c in json binary; do
    run_wrk delay0 "$c" 1 "$SIDE_DUR"
    run_h2 delay0 "$c" 1 1 "$SIDE_DUR"
  done
  if [ "$CAN_WIRE" = 1 ]; then
    for c in json binary; do run_wire delay0 "$c" "$WIRE_DUR"; done
  fi
  if [ -L "$SIDE_REPO/efficientnet_lite0" ]; then
    warm_up multipart-parse
    for c in multipart-parse multipart-refused; do
      run_wrk multipart "$c" 1 "$SIDE_DUR"
      run_h2 multipart "$c" 1 1 "$SIDE_DUR"
    done
  fi
  stop_server
fi

echo "load average at end (1/5/15 min): $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/env.txt"
cat "$OUT/env.txt"
echo
python3 "$SCRIPTS/overhead_summary.py" "$OUT"
