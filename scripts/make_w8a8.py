#!/usr/bin/env python3
"""Quantize a small Llama checkpoint to W8A8 int8, as llm-compressor writes it, locally.

    python scripts/make_w8a8.py MODEL_DIR OUT_DIR

Every linear weight of the decoder layers (q, k, v, o, gate, up, down) becomes int8 with a
symmetric per-output-channel scale (`weight_scale`, shape [out, 1], in the model's dtype);
activations are quantized per token at run time. Embeddings, norms and lm_head stay as
they were. config.json gains the `quantization_config` of compressed-tensors' "W8A8"
scheme (vLLM runs it on the CPU with its int8 scaled-mm kernel). Deterministic; skips the
build when OUT_DIR is up to date with MODEL_DIR; prints OUT_DIR as the last line.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ARGS = {
    "actorder": None, "block_structure": None, "group_size": None, "num_bits": 8,
    "observer_kwargs": {}, "symmetric": True, "type": "int",
}  # fmt: skip
QUANTIZATION_CONFIG = {
    "config_groups": {
        "group_0": {
            "input_activations": {**ARGS, "dynamic": True, "observer": None, "strategy": "token"},
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {**ARGS, "dynamic": False, "observer": "minmax", "strategy": "channel"},
        }
    },
    "format": "int-quantized",
    "global_compression_ratio": None,
    "ignore": ["lm_head"],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
}


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weight and its per-output-channel scale (symmetric, round to nearest)."""
    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
    q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    return q, scale.to(weight.dtype)


def build(model_dir: Path, out: Path) -> None:
    tensors = load_file(model_dir / "model.safetensors")
    quantized: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(".weight") and any(f".{p}." in name for p in LINEAR):
            q, scale = quantize(tensor)
            quantized[name] = q
            quantized[name.removesuffix(".weight") + ".weight_scale"] = scale
        else:
            quantized[name] = tensor
    save_file(quantized, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = QUANTIZATION_CONFIG
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in model_dir.iterdir():
        if extra.suffix == ".json" and extra.name != "config.json":
            shutil.copy(extra, out / extra.name)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    model_dir, out = Path(argv[0]).resolve(), Path(argv[1]).resolve()
    stamp = {"source": str(model_dir), "mtime": (model_dir / "model.safetensors").stat().st_mtime}
    if (out / ".stamp.json").exists() and json.loads((out / ".stamp.json").read_text()) == stamp:
        print(out)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        build(model_dir, tmp)
        (tmp / ".stamp.json").write_text(json.dumps(stamp) + "\n")
        tmp.chmod(0o755)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
