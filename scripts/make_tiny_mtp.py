#!/usr/bin/env python3
"""Build a tiny MiMo checkpoint (a Qwen2 body and one multi-token-prediction layer) and its
tokenizer locally, deterministically, no hub.

    python scripts/make_tiny_mtp.py CACHE_DIR

Writes CACHE_DIR/tiny-mtp/: config.json, generation_config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, and prints that path as the last line. The tokenizer,
corpus, training loop and caching are make_tiny_llama.py's; a rebuild is skipped when its
.stamp.json matches the parameters.

- The target: Qwen2 (hidden 256, 2 layers, 4/2 heads, head_dim 64, inter 688), trained
  TRAIN_STEPS AdamW steps so that greedy text depends on the prompt, saved with
  architectures ["MiMoForCausalLM"] and num_nextn_predict_layers 1 (model_type stays
  "qwen2": no remote code). vLLM's speculative method "mtp" then builds MiMoMTPModel, the
  draft, from the same checkpoint: its embedding, its lm_head and `model.mtp_layers.0.*`.
- The MTP layer is trained MTP_STEPS steps after the target, on the target's frozen hidden
  states, the way vLLM's proposer feeds it: at position i, the hidden state h_i (before the
  final norm) and the embedding of token i+1 (zeroed at position 0) predict token i+2.
  The tests need a draft that runs, not a good one: its acceptance rate is whatever it is.
- bfloat16, as the other tiny models (the tests serve them as float32).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_llama import build_tokenizer, cached_build, make_corpus, train

VERSION = 1  # bump when the build changes, so cached models are rebuilt
NAME = "tiny-mtp"
SHAPE = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=688)  # fmt: skip
TRAIN_STEPS = 150
MTP_STEPS = 100


def mtp_layer(config: Any) -> Any:
    """An MTP layer named as in MiMo checkpoints (`model.mtp_layers.N.*`): the norms, the
    projection of [hidden; embedding] and one decoder block flattened into it; `forward(emb,
    hid, pos)` gives the normed hidden state that the lm_head turns into logits."""
    import torch
    from torch import nn
    from transformers.models.qwen2.modeling_qwen2 import (
        Qwen2DecoderLayer,
        Qwen2RMSNorm,
        Qwen2RotaryEmbedding,
    )

    class MTPLayer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            h, eps = config.hidden_size, config.rms_norm_eps
            self.token_layernorm = Qwen2RMSNorm(h, eps=eps)
            self.hidden_layernorm = Qwen2RMSNorm(h, eps=eps)
            self.input_proj = nn.Linear(2 * h, h, bias=False)
            block = Qwen2DecoderLayer(config, layer_idx=0)
            self.self_attn, self.mlp = block.self_attn, block.mlp
            self.input_layernorm = block.input_layernorm
            self.post_attention_layernorm = block.post_attention_layernorm
            self.final_layernorm = Qwen2RMSNorm(h, eps=eps)
            self.rotary = Qwen2RotaryEmbedding(config)  # not saved: no weights in vLLM's

        def forward(self, emb: torch.Tensor, hid: torch.Tensor, pos: torch.Tensor) -> Any:
            emb = torch.where(pos.unsqueeze(-1) == 0, 0.0, emb)  # [B, L, H]
            x = self.input_proj(
                torch.cat([self.hidden_layernorm(hid), self.token_layernorm(emb)], -1)
            )
            n = x.shape[1]
            mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
            attn, _ = self.self_attn(self.input_layernorm(x), self.rotary(x, pos), mask)
            x = x + attn
            x = x + self.mlp(self.post_attention_layernorm(x))
            return self.final_layernorm(x)

    return MTPLayer()


def train_mtp(
    model: Any, mtp: Any, tokenizer: Any, corpus: list[str], steps: int, seed: int
) -> None:
    """Train `mtp` on the frozen `model`'s hidden states (see the module's docstring)."""
    import torch
    from torch import nn

    for p in model.parameters():
        p.requires_grad_(False)
    captured: dict[str, torch.Tensor] = {}
    model.model.norm.register_forward_pre_hook(lambda m, a: captured.__setitem__("h", a[0]))
    ids = [i for line in corpus for i in tokenizer(line + " ")["input_ids"]]
    data = torch.tensor(ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed + 2)
    params = [p for n, p in mtp.named_parameters() if not n.startswith("rotary")]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    for step in range(steps):
        starts = torch.randint(0, len(data) - 65, (16,), generator=gen).tolist()
        batch = torch.stack([data[s : s + 64] for s in starts])
        with torch.no_grad():
            target_next = model(input_ids=batch).logits[:, 1:-1].argmax(-1)  # guess for i+2
            hid = captured["h"][:, :-2]  # h_i, i = 0 .. L-3
        emb = model.model.embed_tokens(batch[:, 1:-1])  # token i+1
        pos = torch.arange(hid.shape[1])[None].expand(batch.shape[0], -1)
        logits = model.lm_head(mtp(emb, hid, pos))
        labels = batch[:, 2:]
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            agree = (logits.argmax(-1) == target_next).float().mean().item()
            print(f"make_tiny_mtp: mtp step {step} loss {loss.item():.3f} "
                  f"agrees with the target {agree:.2f}", file=sys.stderr)  # fmt: skip


def build(out: Path, seed: int) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.use_deterministic_algorithms(True, warn_only=True)
    corpus = make_corpus(20000, seed)
    tokenizer = build_tokenizer(out, corpus)
    config = Qwen2Config(
        vocab_size=len(tokenizer), max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, use_sliding_window=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.02, **SHAPE,
    )  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    train(model, tokenizer, corpus, TRAIN_STEPS, seed)
    torch.manual_seed(seed + 1)
    mtp = mtp_layer(config)
    train_mtp(model, mtp, tokenizer, corpus, MTP_STEPS, seed)

    dtype = torch.bfloat16
    model = model.to(dtype)
    model.config.dtype = dtype  # written to config.json
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True, max_shard_size="4GB")
    tensors = load_file(out / "model.safetensors")
    for name, t in mtp.state_dict().items():
        if not name.startswith("rotary"):
            tensors[f"model.mtp_layers.0.{name}"] = t.to(dtype).contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(architectures=["MiMoForCausalLM"], num_nextn_predict_layers=1)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cache_dir", type=Path)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)

    out = args.cache_dir.resolve() / NAME
    params = {"version": VERSION, "name": NAME, "seed": args.seed}
    return cached_build(out, params, lambda tmp: build(tmp, args.seed), "make_tiny_mtp")


if __name__ == "__main__":
    sys.exit(main())
