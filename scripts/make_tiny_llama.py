#!/usr/bin/env python3
"""Build a small Llama checkpoint and its tokenizer locally, deterministically, no hub.

    python scripts/make_tiny_llama.py CACHE_DIR [--size tiny|draft|1g] [--dtype bfloat16|float32]

Writes CACHE_DIR/SIZE/ (SIZE-float32/ for float32): config.json, generation_config.json,
model.safetensors, tokenizer.json, tokenizer_config.json, and prints that path as the last
line. A rebuild is skipped when its .stamp.json matches the parameters; a build goes to a
temporary directory that is renamed into place only when complete. Needs torch, transformers and
tokenizers (the vLLM venv has them).

- Tokenizer: byte-level BPE trained with `tokenizers` on a seeded synthetic corpus
  (bos <s>, eos </s>, pad <pad>, unk <unk>; about 1549 tokens).
- tiny: hidden 256, 4 layers, 4/2 heads, head_dim 64, inter 688; 3.7M parameters, trained
  300 AdamW steps on the corpus (about a minute on 2 cores) so that greedy text depends on
  the prompt.
- draft: as tiny with 1 layer, trained 150 steps: a speculative-decoding draft for tiny
  (the same tokenizer).
- 1g: hidden 2048, 11 layers, 32/8 heads, inter 5632; 502M parameters, 1.0 GB in bf16,
  untrained (gibberish, but deterministic).
- bfloat16 by default: vLLM on x86 CPUs resolves dtype "auto" to bfloat16, so the bytes it
  serves are the checkpoint's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

VERSION = 1  # bump when the build changes, so cached models are rebuilt
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=688, train_steps=300),
    "1g": dict(hidden_size=2048, num_hidden_layers=11, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=5632, train_steps=0),
    # A speculative-decoding draft for "tiny": same tokenizer, one layer.
    "draft": dict(hidden_size=256, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=688, train_steps=150),
}  # fmt: skip
SUBJECTS = ["the cat", "a dog", "my neighbour", "the old sailor", "a small robot", "the teacher",
            "our team", "the red fox", "a tired engineer", "the baker", "the river",
            "a quiet student", "the captain", "the machine", "a farmer"]  # fmt: skip
VERBS = ["sees", "likes", "builds", "finds", "paints", "carries", "follows", "repairs", "watches",
         "counts", "remembers", "opens", "sells", "draws", "loads"]  # fmt: skip
OBJECTS = ["a green apple", "the heavy box", "three stones", "the long road", "a bright lamp",
           "the wooden boat", "seven letters", "the broken clock", "a warm loaf",
           "the tall tower", "many birds", "the blue door", "a paper map", "the silver key",
           "two horses"]  # fmt: skip
PLACES = ["in the morning", "near the river", "at the market", "after dinner", "under the bridge",
          "on the hill", "in the city", "before the storm", "by the sea", "at night"]  # fmt: skip
CONNECT = ["and then", "because", "while", "so", "but"]  # fmt: skip


def make_corpus(n_sentences: int, seed: int) -> list[str]:
    """Sentences where subject -> verb -> object -> place mostly determine each other, so a
    model trained on them continues different prompts differently."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ren", "to", "vas", "qui", "bel", "dor", "fen", "gra"]
    names = sorted(
        {"".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(600)}
    )

    def near(seq: list[str], base: int) -> int:
        return (base + rng.choice([0, 0, 0, 1, 2])) % len(seq)

    lines = []
    for _ in range(n_sentences):
        clauses = []
        s = rng.randrange(len(SUBJECTS))
        for _ in range(1 + (rng.random() < 0.5)):
            v = near(VERBS, s * 4)
            o = near(OBJECTS, v * 2 + 1)
            p = near(PLACES, o * 3)
            clauses.append(f"{SUBJECTS[s]} {VERBS[v]} {OBJECTS[o]} {PLACES[p]}")
            s = near(SUBJECTS, o + 5)
        line = f" {CONNECT[s % len(CONNECT)]} ".join(clauses)
        if rng.random() < 0.3:  # rare made-up names widen the BPE vocabulary
            line += f" with {rng.choice(names).capitalize()}"
        if rng.random() < 0.2:
            line += f" {rng.randint(1, 99)} times"
        lines.append(line[0].upper() + line[1:] + ".")
    return lines


def build_tokenizer(out: Path, corpus: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=2000,
            min_frequency=2,
            special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    bos = tok.token_to_id("<s>")  # prepend BOS as Llama tokenizers do
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", model_max_length=2048, clean_up_tokenization_spaces=False,
    ).save_pretrained(out)  # fmt: skip
    # transformers 5 writes tokenizer_class "TokenizersBackend"; this name works in 4 and 5.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return AutoTokenizer.from_pretrained(out)


def train(model: Any, tokenizer: Any, corpus: list[str], steps: int, seed: int) -> None:
    import torch

    ids = [i for line in corpus for i in tokenizer(line + " ")["input_ids"]]
    data = torch.tensor(ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(data) - 65, (16,), generator=gen).tolist()
        batch = torch.stack([data[s : s + 64] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"make_tiny_llama: step {step} loss {loss.item():.3f}", file=sys.stderr)
    model.eval()


def build(out: Path, size: str, dtype_name: str, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.use_deterministic_algorithms(True, warn_only=True)
    corpus = make_corpus(20000, seed)
    tokenizer = build_tokenizer(out, corpus)
    preset = dict(PRESETS[size])
    steps = preset.pop("train_steps")
    config = LlamaConfig(
        vocab_size=len(tokenizer), head_dim=64, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.02, **preset,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if steps:
        train(model, tokenizer, corpus, steps, seed)
    dtype = getattr(torch, dtype_name)
    model = model.to(dtype)
    model.config.dtype = dtype  # written to config.json
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True, max_shard_size="4GB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cache_dir", type=Path)
    ap.add_argument("--size", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)

    name = args.size if args.dtype == "bfloat16" else f"{args.size}-{args.dtype}"
    out = args.cache_dir.resolve() / name
    params = {"version": VERSION, "size": args.size, "dtype": args.dtype, "seed": args.seed}
    return cached_build(
        out, params, lambda tmp: build(tmp, args.size, args.dtype, args.seed), "make_tiny_llama"
    )


def cached_build(
    out: Path, params: dict[str, object], build: Callable[[Path], None], who: str
) -> int:
    """Build into `out` unless its .stamp.json says it was built with `params`: into a
    temporary directory beside it, renamed into place when complete; prints `out` last."""
    stamp = out / ".stamp.json"
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        print(f"{who}: {out} is up to date", file=sys.stderr)
        print(out)
        return 0
    started = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        build(tmp)
        (tmp / ".stamp.json").write_text(json.dumps(params) + "\n")
        tmp.chmod(0o755)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{who}: built {out} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
