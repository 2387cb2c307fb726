#!/usr/bin/env python3
"""Writes a random-weight Qwen3-MoE checkpoint of the benchmark shape (numpy only; no torch).

    python3 scripts/make_bench_model.py bench-models/qwen3_moe_bench

Shape: hidden 1024, 12 layers, 16 query and 4 KV heads of head_dim 128, 64 experts (top-8),
moe_intermediate_size 512, vocab 32768, bf16 (about 2.7 GB). The tokenizer is a real one of the
model's vocabulary: a byte-level BPE (the GPT-2 pre-tokenizer, NFC, Qwen's three special tokens
and the tiny fixture's chat template) trained here, deterministically, on the text this machine
has (Python's standard library sources and the Debian license texts), so prompts tokenize into
realistic pieces and llama.cpp's converter records it (`tokenizer.ggml.pre = gpt-2`). Weights are N(0, std) with norms 1, so routing
spreads tokens over the experts as a trained model's would, roughly. Never commit the output
(`bench-models/` is ignored).
"""

import argparse
import json
import os
import shutil
import struct
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "tests", "fixtures", "qwen3_moe_tiny")


def config(a):
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": a.hidden,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": a.head_dim,
        "intermediate_size": 4 * a.hidden,
        "moe_intermediate_size": a.moe_intermediate,
        "num_local_experts": a.experts,
        "num_experts_per_tok": a.top_k,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "vocab_size": a.vocab,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "sliding_window": None,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": None,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "dtype": "bfloat16",
        "transformers_version": "5.24.0",
    }


def tensors(a):
    """(name, shape, kind) in file order; kind is 'norm' (ones) or 'w' (random)."""
    h, hd = a.hidden, a.head_dim
    out = [("model.embed_tokens.weight", (a.vocab, h), "w")]
    for i in range(a.layers):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", (h,), "norm"),
            (f"{p}.post_attention_layernorm.weight", (h,), "norm"),
            (f"{p}.self_attn.q_proj.weight", (a.heads * hd, h), "w"),
            (f"{p}.self_attn.k_proj.weight", (a.kv_heads * hd, h), "w"),
            (f"{p}.self_attn.v_proj.weight", (a.kv_heads * hd, h), "w"),
            (f"{p}.self_attn.o_proj.weight", (h, a.heads * hd), "w"),
            (f"{p}.self_attn.q_norm.weight", (hd,), "norm"),
            (f"{p}.self_attn.k_norm.weight", (hd,), "norm"),
            (f"{p}.mlp.gate.weight", (a.experts, h), "w"),
        ]
        for e in range(a.experts):
            q = f"{p}.mlp.experts.{e}"
            out += [
                (f"{q}.gate_proj.weight", (a.moe_intermediate, h), "w"),
                (f"{q}.up_proj.weight", (a.moe_intermediate, h), "w"),
                (f"{q}.down_proj.weight", (h, a.moe_intermediate), "w"),
            ]
    out += [
        ("model.norm.weight", (h,), "norm"),
        ("lm_head.weight", (a.vocab, h), "w"),
    ]
    return out


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS_BYTES = 48 << 20


def corpus_files():
    """Text files to train on, in a fixed order, up to CORPUS_BYTES."""
    roots = [os.path.dirname(os.__file__), "/usr/share/common-licenses"]
    files, total = [], 0
    for root in roots:
        for dirpath, dirnames, names in os.walk(root):
            dirnames.sort()
            for n in sorted(names):
                p = os.path.join(dirpath, n)
                if not (n.endswith(".py") or root.endswith("licenses")) or not os.path.isfile(p):
                    continue
                files.append(p)
                total += os.path.getsize(p)
                if total >= CORPUS_BYTES:
                    return files
    return files


def train_tokenizer(vocab, out):
    """A byte-level BPE tokenizer of exactly `vocab` tokens (ids 0-2 the special tokens)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def lines():
        for p in corpus_files():
            with open(p, encoding="utf-8", errors="ignore") as f:
                yield f.read()

    tok.train_from_iterator(lines(), trainer=trainer)
    if tok.get_vocab_size() != vocab:
        sys.exit(f"the corpus gave only {tok.get_vocab_size()} tokens, not {vocab}")
    tok.save(out)
    print(f"wrote {out} ({vocab} tokens)")


def to_bf16(x):
    """float32 -> bfloat16 bits (round to nearest even), as little-endian uint16."""
    u = x.astype(np.float32).view(np.uint32)
    u = u + (0x7FFF + ((u >> 16) & 1))
    return (u >> 16).astype("<u2")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out", help="output directory")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--moe-intermediate", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--std", type=float, default=0.03)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    os.makedirs(a.out, exist_ok=True)
    specs = tensors(a)
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in specs:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)  # keep the data 8-byte aligned
    rng = np.random.default_rng(a.seed)
    path = os.path.join(a.out, "model.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for i, (name, shape, kind) in enumerate(specs):
            if kind == "norm":
                x = np.ones(shape, dtype=np.float32)
            else:
                x = rng.standard_normal(shape, dtype=np.float32) * np.float32(a.std)
            f.write(to_bf16(x).tobytes())
            if i % 200 == 0:
                print(f"  {i}/{len(specs)} tensors", file=sys.stderr)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config(a), f, indent=2)
    train_tokenizer(a.vocab, os.path.join(a.out, "tokenizer.json"))
    shutil.copy(os.path.join(FIXTURE, "tokenizer_config.json"), os.path.join(a.out, "tokenizer_config.json"))
    size = os.path.getsize(path)
    print(f"wrote {path} ({size / 1e9:.2f} GB, {len(specs)} tensors)")


if __name__ == "__main__":
    main()
