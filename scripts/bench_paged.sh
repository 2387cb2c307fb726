#!/usr/bin/env bash
# Paged experts (--memory-budget) on the benchmark model, with real disk reads, side by side
# with llama.cpp reading the same GGUF by mmap under the same memory limit.
#
#   scripts/bench_paged.sh [MODEL.gguf]
#
# 1. The disk: O_DIRECT reads (page cache bypassed), 1 MiB sequential on one thread, and
#    expert-sized ranges (one expert matrix of MODEL) at random offsets on 1 and 4 threads.
# 2. moeshard bench at --memory-budget 100%, 50% and 25% of the routed experts' bytes. Paged
#    reads use O_DIRECT, so they are real disk reads whatever the page cache holds.
# 3. llama-bench (mmap) and moeshard bench, each in a cgroup-v1 memory cgroup limited to the
#    same bytes: the budget plus the dense weights plus OVERHEAD (a cgroup limit caps the page
#    cache too, so llama.cpp re-reads evicted expert pages from disk). The cgroup's page cache
#    is emptied (memory.force_empty) before each run.
#
# Needs root for the cgroup (skipped otherwise), python3 with the `gguf` package for the byte
# counts, a release build (cargo build --release) and llama.cpp's llama-bench (LLAMA_BIN).
# Environment: BIN, LLAMA_BIN, TOKENS (decode tokens, default 64), LLAMA_TOKENS (llama-bench's,
# default 16: under a tight limit it decodes below 1 token/s), OVERHEAD (bytes, default 256 MiB),
# THREADS (compute threads of both, default 2; on a loaded machine use 1: llama.cpp's spinning
# threads collapse when cores are shared), PCTS (default "100 50 25").
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-bench-models/qwen3_moe_bench-Q4_K_M.gguf}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/moeshard}
LLAMA_BIN=${LLAMA_BIN:-/tmp/llamacpp-peer/llama.cpp/build/bin}
TOKENS=${TOKENS:-64}
LLAMA_TOKENS=${LLAMA_TOKENS:-16}
OVERHEAD=${OVERHEAD:-$((256 << 20))}
THREADS=${THREADS:-2}
PCTS=${PCTS:-100 50 25}
CG=/sys/fs/cgroup/memory/moeshard-bench-paged-$$

[ -x "$BIN" ] || { echo "no $BIN: cargo build --release first" >&2; exit 1; }
[ -f "$MODEL" ] || { echo "no $MODEL" >&2; exit 1; }

# Byte counts: routed experts (ffn_*_exps) and everything else (the dense part), and one expert
# matrix (the read size of the disk test).
read -r EXPERT_BYTES DENSE_BYTES MATRIX_BYTES < <(python3 - "$MODEL" <<'EOF'
import sys, gguf
r = gguf.GGUFReader(sys.argv[1])
exp = sum(int(t.n_bytes) for t in r.tensors if "_exps" in t.name)
dense = sum(int(t.n_bytes) for t in r.tensors if "_exps" not in t.name)
t = next(t for t in r.tensors if t.name.endswith("ffn_gate_exps.weight"))
n_exp = int(t.shape[-1])
print(exp, dense, int(t.n_bytes) // n_exp)
EOF
)
echo "model $MODEL: routed experts $EXPERT_BYTES bytes, dense $DENSE_BYTES bytes," \
  "one expert matrix $MATRIX_BYTES bytes"

echo "== disk (O_DIRECT)"
python3 - "$MODEL" "$MATRIX_BYTES" <<'EOF'
import mmap, os, random, sys, threading, time
path, matrix = sys.argv[1], int(sys.argv[2])
A = 4096
size = os.path.getsize(path)
fd = os.open(path, os.O_RDONLY | os.O_DIRECT)

def run(threads, nbytes, count, sequential):
    span = (nbytes + 2 * A) // A * A
    rng = random.Random(1)
    if sequential:
        offs = [i * span for i in range(count)]
    else:
        offs = [rng.randrange(0, (size - span) // A) * A for _ in range(count)]
    chunks = [offs[i::threads] for i in range(threads)]
    def work(mine):
        buf = mmap.mmap(-1, span)
        for o in mine:
            # The covering aligned range of an unaligned matrix: what moeshard reads.
            n = os.preadv(fd, [buf], o)
            assert n == span, n
    ts = [threading.Thread(target=work, args=(c,)) for c in chunks]
    t0 = time.perf_counter()
    for t in ts: t.start()
    for t in ts: t.join()
    dt = time.perf_counter() - t0
    return count * span / dt / 1e6

seq = run(1, 1 << 20, min(512, size // ((1 << 20) + 2 * A) - 1), True)
r1 = run(1, matrix, 400, False)
r4 = run(4, matrix, 800, False)
print(f"sequential 1 MiB, 1 thread:            {seq:7.0f} MB/s")
print(f"random {matrix} B ranges, 1 thread:   {r1:7.0f} MB/s")
print(f"random {matrix} B ranges, 4 threads:  {r4:7.0f} MB/s")
EOF

echo "== moeshard bench --memory-budget (no memory limit; paged reads are O_DIRECT)"
RAYON_NUM_THREADS="$THREADS" "$BIN" bench --model "$MODEL" --memory-budget-sweep --decode-tokens "$TOKENS" \
  --prefill-tokens 0 --json

if [ "$(id -u)" != 0 ] || [ ! -d /sys/fs/cgroup/memory ]; then
  echo "not root or no cgroup-v1 memory controller: skipping the memory-limited runs"
  exit 0
fi
trap 'rmdir "$CG" 2>/dev/null || true' EXIT
mkdir -p "$CG"
in_cgroup() {
  echo 1 > "$CG/memory.force_empty" 2>/dev/null || true
  echo 0 > "$CG/memory.max_usage_in_bytes" 2>/dev/null || true
  bash -c 'echo $$ > '"$CG"'/cgroup.procs && exec "$@"' _ "$@"
}
echo "== memory-limited: limit = budget + dense + $OVERHEAD bytes"
for pct in $PCTS; do
  budget=$((EXPERT_BYTES / 100 * pct))
  [ "$pct" = 100 ] && budget=$((EXPERT_BYTES + (64 << 20)))
  limit=$((budget + DENSE_BYTES + OVERHEAD))
  echo "$limit" > "$CG/memory.limit_in_bytes"
  echo "-- $pct%: budget $budget, cgroup limit $limit"
  in_cgroup "$LLAMA_BIN/llama-bench" -m "$MODEL" -p 0 -n "$LLAMA_TOKENS" -t "$THREADS" -r 1 \
    -o md 2>/tmp/bench_paged_llama.err | grep -E '^\|' \
    || { echo "llama-bench failed:"; tail -n 3 /tmp/bench_paged_llama.err; }
  echo "llama-bench peak cgroup usage $(cat "$CG/memory.max_usage_in_bytes")," \
    "OOM kills so far $(awk '$1 == "oom_kill" {print $2}' "$CG/memory.oom_control")"
  RAYON_NUM_THREADS="$THREADS" in_cgroup "$BIN" bench --model "$MODEL" --memory-budget "$budget" \
    --decode-tokens "$TOKENS" --prefill-tokens 0 --json || echo "moeshard bench failed"
  echo "moeshard peak cgroup usage $(cat "$CG/memory.max_usage_in_bytes")"
done
