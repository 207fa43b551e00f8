"""The main job, end to end: a `netloader serve` process holds a checkpoint in memory; this
process builds empty tensors for the same model and pulls the weights into them, verified,
then checks them bit for bit against the file and compares with loading from disk."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import netloader

NETLOADER = str(Path(sys.executable).with_name("netloader"))


def build_checkpoint(directory: Path, size_mib: int) -> Path:
    """A transformer-shaped bf16 checkpoint of about `size_mib`, made locally (no hub)."""
    path = directory / "model.safetensors"
    stamp = directory / "size_mib"
    if path.exists() and stamp.exists() and stamp.read_text() == str(size_mib):
        return path
    directory.mkdir(parents=True, exist_ok=True)
    width = 2048
    layer_bytes = 12 * width * width * 2  # qkv+o (4 w^2) + mlp (8 w^2), bf16
    layers = max(1, (size_mib << 20) // layer_bytes)
    g = torch.Generator().manual_seed(0)
    tensors = {"embed_tokens.weight": torch.randn(8000, width, generator=g).bfloat16()}
    for i in range(layers):
        p = f"layers.{i}."
        tensors[p + "self_attn.qkv_proj.weight"] = torch.randn(
            3 * width, width, generator=g
        ).bfloat16()
        tensors[p + "self_attn.o_proj.weight"] = torch.randn(width, width, generator=g).bfloat16()
        tensors[p + "mlp.gate_up_proj.weight"] = torch.randn(
            8 * width, width // 2, generator=g
        ).bfloat16()
        tensors[p + "mlp.down_proj.weight"] = torch.randn(width, 4 * width, generator=g).bfloat16()
        tensors[p + "input_layernorm.weight"] = torch.ones(width, dtype=torch.bfloat16)
    tensors["norm.weight"] = torch.ones(width, dtype=torch.bfloat16)
    save_file(tensors, path)
    stamp.write_text(str(size_mib))
    return path


def empty_model(path: Path) -> dict[str, torch.Tensor]:
    """What a loader has before loading: tensors of the right dtype and shape, no data."""
    with safe_open(path, "pt") as f:
        return {
            name: torch.empty(f.get_slice(name).get_shape(), dtype=_dtype(f, name))
            for name in f.keys()  # noqa: SIM118 - safe_open is not a dict
        }


def _dtype(f: object, name: str) -> torch.dtype:
    code = f.get_slice(name).get_dtype()  # type: ignore[attr-defined]
    return {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}[code]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    args = parser.parse_args()

    started = time.perf_counter()
    ckpt = build_checkpoint(args.workdir / "ckpt", args.size_mib)
    print(
        f"checkpoint: {ckpt} ({ckpt.stat().st_size / 1e9:.2f} GB), "
        f"built in {time.perf_counter() - started:.1f} s"
    )

    server = subprocess.Popen(
        [NETLOADER, "-v", "serve", str(ckpt.parent), "--model", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline().strip()
        print(f"server process {server.pid}: {line}")
        address = line.rsplit(" on ", 1)[1]

        results: dict[str, float] = {}
        for transport in ("tcp", "gloo"):
            dest = empty_model(ckpt)
            report = netloader.load(dest, [address], model_name="demo", transport=transport)
            results[f"netloader pull over {transport}, into fresh memory"] = report.seconds
            report = netloader.load(dest, [address], model_name="demo", transport=transport)
            results[f"netloader pull over {transport}, into loaded memory"] = report.seconds
            print(f"client: {report.summary()}")

        # Today's way, for comparison: read the file and copy into the model's memory.
        model = empty_model(ckpt)
        t0 = time.perf_counter()
        from_disk = load_file(ckpt)
        for name, tensor in model.items():
            tensor.copy_(from_disk[name])
        results["safetensors from disk into fresh memory (warm page cache)"] = (
            time.perf_counter() - t0
        )
        identical = all(
            torch.equal(model[n].view(torch.int16), t.view(torch.int16)) for n, t in dest.items()
        )
        print(f"bit-identical to the checkpoint on disk: {identical}")

        t0 = time.perf_counter()
        out = args.workdir / "pulled"
        pull = subprocess.run(
            [NETLOADER, "pull", address, "--out", str(out), "--model", "demo"],
            capture_output=True,
            text=True,
            check=True,
        )
        results["netloader pull to disk (CLI process, incl. start-up)"] = time.perf_counter() - t0
        print(pull.stdout.strip())

        size = ckpt.stat().st_size
        print("\n| path | seconds | GB/s |\n| --- | ---: | ---: |")
        for name, seconds in results.items():
            print(f"| {name} | {seconds:.3f} | {size / seconds / 1e9:.2f} |")
        (args.workdir / "demo.json").write_text(json.dumps(results, indent=1))
        if not identical:
            sys.exit("demo: pulled weights differ from the checkpoint")
    finally:
        server.terminate()
        server.wait(timeout=20)


if __name__ == "__main__":
    main()
