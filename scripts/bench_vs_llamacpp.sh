#!/usr/bin/env bash
# Side-by-side decode/prefill benchmark: moeshard and llama.cpp on the same GGUF files, with the
# same thread count, alternating runs so both see the same machine state. Prints one table with
# tokens/s (llama.cpp: the better of its mmap and in-memory load modes), peak RSS,
# moeshard/llama.cpp ratios, and moeshard's decode bandwidth (active bytes per token x tokens/s)
# against this machine's measured memory read bandwidth.
#
# usage: scripts/bench_vs_llamacpp.sh [NAME] [-- make_bench_model.py shape flags]
#   NAME   model directory under bench-models/ (default qwen3_moe_bench: the issue's shape)
#   env    TYPES="F16 Q8_0 Q4_K_M"  THREADS=2  REPEAT=3  LLAMA=/tmp/llamacpp-peer  SHARED=../shared
#          MOESHARD=target/release/moeshard  MODELS=bench-models (where models and GGUF files are
#          found or made; point it at another checkout's bench-models/ to reuse them)
# Examples (other shapes):
#   scripts/bench_vs_llamacpp.sh wide_narrow -- --hidden 2048 --experts 128 --moe-intermediate 256 --layers 6
#   scripts/bench_vs_llamacpp.sh few_wide -- --hidden 1024 --experts 8 --top-k 2 --moe-intermediate 2048 --layers 8
#
# Needs: cargo, python3 with numpy, gguf, torch, transformers, safetensors (for llama.cpp's
# converter), cmake and gcc. Builds llama.cpp with ../shared/peer/build_llamacpp.sh when missing.
# Nothing it makes is committed: models and GGUF files land in bench-models/ (ignored).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared}
LLAMA=${LLAMA:-/tmp/llamacpp-peer}
THREADS=${THREADS:-2}
REPEAT=${REPEAT:-3}
TYPES=${TYPES:-"Q8_0 Q4_K_M"}
NAME=${1:-qwen3_moe_bench}
shift || true
[ "${1:-}" = "--" ] && shift
MODELS=${MODELS:-$ROOT/bench-models}
MODEL=$MODELS/$NAME
BIN=$LLAMA/llama.cpp/build/bin
MOESHARD=${MOESHARD:-$ROOT/target/release/moeshard}

log() { echo "[bench] $*" >&2; }

[ -x "$BIN/llama-bench" ] || { log "building llama.cpp"; bash "$SHARED/peer/build_llamacpp.sh" "$LLAMA"; }
[ -x "$MOESHARD" ] || (cd "$ROOT" && cargo build --release --locked)
if [ ! -f "$MODEL/config.json" ]; then
  log "making $MODEL"
  python3 "$ROOT/scripts/make_bench_model.py" "$MODEL" "$@"
fi

gguf_for() { # TYPE -> path, made on demand with llama.cpp's own converter and quantizer
  local t=$1 f="$MODEL-$1.gguf"
  if [ ! -f "$f" ]; then
    case $t in
      F16|Q8_0) log "converting to $t"
        # Our bench tokenizers split like GPT-2 (byte-level BPE): record that pre-tokenizer, not
        # the wrapper's default for unknown ones (qwen2).
        FORCE_TOKPRE=gpt-2 LLAMA_CPP_DIR=$LLAMA/llama.cpp python3 "$SHARED/peer/convert.py" "$MODEL" \
          --outtype "$(echo "$t" | tr 'A-Z' 'a-z')" --outfile "$f" >/dev/null 2>&1 ;;
      *) local src; src=$(gguf_for F16)
        log "quantizing to $t"; "$BIN/llama-quantize" "$src" "$f" "$t" >/dev/null 2>&1 ;;
    esac
  fi
  echo "$f"
}

MEMBW=/tmp/moeshard-membw
[ -x $MEMBW ] || gcc -O3 -march=native -fopenmp "$SHARED/peer/membw.c" -o $MEMBW
membw_out=$(OMP_NUM_THREADS=$THREADS $MEMBW 2>&1 || true)
log "membw: $(echo "$membw_out" | tr '\n' ' ')"

OUT=$(mktemp -d)
for t in $TYPES; do
  f=$(gguf_for "$t")
  for r in $(seq "$REPEAT"); do
    log "$t run $r: llama.cpp"
    # Both of llama.cpp's load modes (mmap, and `none`: read into memory, as moeshard copies its
    # weights into memory by default); its best figure of either counts.
    /usr/bin/time -f '%M' -o "$OUT/ll-$t-$r.rss" "$BIN/llama-bench" -m "$f" -t "$THREADS" -p 512 -n 128 \
      -r 1 -lm mmap,none -o json > "$OUT/ll-$t-$r.json" 2>/dev/null
    log "$t run $r: moeshard"
    RAYON_NUM_THREADS=$THREADS /usr/bin/time -f '%M' -o "$OUT/ms-$t-$r.rss" "$MOESHARD" bench \
      --model "$f" --decode-prompt 32 --decode-tokens 128 --prefill-tokens 512 --json \
      > "$OUT/ms-$t-$r.json" 2>"$OUT/ms-$t-$r.err" || { cat "$OUT/ms-$t-$r.err" >&2; exit 1; }
  done
done

python3 - "$OUT" "$MODEL" "$THREADS" "$REPEAT" "$TYPES" "$membw_out" <<'EOF'
import glob, json, re, sys
import gguf

out, model, threads, repeat, types, membw = sys.argv[1:7]
types = types.split()
m = re.search(r"read[^0-9]*([0-9.]+)\s*GB/s", membw)
bw = float(m.group(1)) if m else None

def active_bytes(path):
    """Bytes one decode step reads: every tensor but the embedding table (one row), and the
    routed experts' stacked tensors scaled by top-k / experts."""
    r = gguf.GGUFReader(path)
    arch = r.fields["general.architecture"].contents()
    k = r.fields[f"{arch}.expert_used_count"].contents()
    n = r.fields[f"{arch}.expert_count"].contents()
    total = 0.0
    for t in r.tensors:
        b = int(t.n_bytes)
        if t.name == "token_embd.weight":
            b = b / t.shape[-1]
        elif "_exps." in t.name:
            b = b * k / n
        total += b
    return total

rows = []
for t in types:
    path = f"{model}-{t}.gguf"
    best = {"ms_dec": 0, "ms_pre": 0, "ll_dec": 0, "ll_pre": 0, "ms_rss": 0, "ll_rss": 0}
    for i in range(1, int(repeat) + 1):
        ms = json.load(open(f"{out}/ms-{t}-{i}.json"))
        best["ms_dec"] = max(best["ms_dec"], ms["decode_tok_s"])
        best["ms_pre"] = max(best["ms_pre"], ms["prefill_tok_s"])
        for e in json.load(open(f"{out}/ll-{t}-{i}.json")):
            key = "ll_pre" if e["n_prompt"] > 0 else "ll_dec"
            best[key] = max(best[key], e["avg_ts"])
        best["ms_rss"] = max(best["ms_rss"], int(open(f"{out}/ms-{t}-{i}.rss").read().split()[-1]))
        best["ll_rss"] = max(best["ll_rss"], int(open(f"{out}/ll-{t}-{i}.rss").read().split()[-1]))
    ab = active_bytes(path)
    rows.append((t, ab, best))

print(f"threads {threads}, best of {repeat} alternating runs; memory read bandwidth {bw} GB/s")
print("| GGUF | active MB/token | moeshard decode | llama.cpp decode | ratio | moeshard prefill | llama.cpp prefill | ratio | moeshard GB/s (share of bw) | peak RSS moeshard / llama.cpp MB |")
print("|---|---|---|---|---|---|---|---|---|---|")
for t, ab, b in rows:
    gbs = ab * b["ms_dec"] / 1e9
    share = f"{gbs / bw:.0%}" if bw else "?"
    print(f"| {t} | {ab / 1e6:.0f} | {b['ms_dec']:.1f} | {b['ll_dec']:.1f} | {b['ms_dec'] / b['ll_dec']:.2f} "
          f"| {b['ms_pre']:.1f} | {b['ll_pre']:.1f} | {b['ms_pre'] / b['ll_pre']:.2f} | {gbs:.1f} ({share}) "
          f"| {b['ms_rss'] / 1024:.0f} / {b['ll_rss'] / 1024:.0f} |")
EOF
rm -rf "$OUT"
