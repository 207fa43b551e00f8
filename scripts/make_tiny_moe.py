#!/usr/bin/env python3
"""Build a small mixture-of-experts checkpoint (Qwen3-MoE) and its tokenizer locally,
deterministically, no hub.

    python scripts/make_tiny_moe.py CACHE_DIR [--dtype bfloat16|float32]

Writes CACHE_DIR/tiny-moe/ (tiny-moe-float32/ for float32): config.json,
generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json, and prints
that path as the last line. The tokenizer, corpus, training loop and caching are
make_tiny_llama.py's (the same seeded tokenizer as the tiny Llama); a rebuild is skipped
when its .stamp.json matches the parameters.

- Qwen3MoeForCausalLM: hidden 128, 2 layers, 4/2 heads, head_dim 64, every layer sparse
  with 16 experts (moe_intermediate_size 64), top-2 routing: many small tensors (each
  expert's gate/up/down projection is its own checkpoint tensor, 3 x 16 per layer).
- Trained 200 AdamW steps on the corpus so that greedy text depends on the prompt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_llama import build_tokenizer, cached_build, make_corpus, train

VERSION = 1  # bump when the build changes, so cached models are rebuilt
NAME = "tiny-moe"
SHAPE = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=64, intermediate_size=256, moe_intermediate_size=64, num_experts=16,
             num_experts_per_tok=2)  # fmt: skip
TRAIN_STEPS = 200


def build(out: Path, dtype_name: str, seed: int) -> None:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.use_deterministic_algorithms(True, warn_only=True)
    corpus = make_corpus(20000, seed)
    tokenizer = build_tokenizer(out, corpus)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, decoder_sparse_step=1,
        mlp_only_layers=[], norm_topk_prob=True, output_router_logits=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.02, **SHAPE,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config)
    train(model, tokenizer, corpus, TRAIN_STEPS, seed)
    dtype = getattr(torch, dtype_name)
    model = model.to(dtype)
    model.config.dtype = dtype  # written to config.json
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True, max_shard_size="4GB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cache_dir", type=Path)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)

    name = NAME if args.dtype == "bfloat16" else f"{NAME}-{args.dtype}"
    out = args.cache_dir.resolve() / name
    params = {"version": VERSION, "name": NAME, "dtype": args.dtype, "seed": args.seed}
    return cached_build(out, params, lambda tmp: build(tmp, args.dtype, args.seed), "make_tiny_moe")


if __name__ == "__main__":
    sys.exit(main())
