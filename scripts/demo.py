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
from safetensors.torch import load_file

import netloader
from netloader.testing.models import (
    checkpoint_specs,
    differing,
    empty_like,
    llama_like,
    write_checkpoint,
)
from netloader.testing.processes import ServerProcess, netloader_command

NETLOADER = netloader_command()


def build_checkpoint(directory: Path, size_mib: int) -> Path:
    """A Llama-shaped checkpoint of about `size_mib` (netloader.testing.models.llama_like),
    made locally (no hub) and kept for the next run."""
    path = directory / "model.safetensors"
    stamp, made = directory / "made", f"llama_like {size_mib} MiB"
    if path.exists() and stamp.exists() and stamp.read_text() == made:
        return path
    write_checkpoint(directory, llama_like(size_mib << 20))
    stamp.write_text(made)
    return path


def empty_model(path: Path) -> dict[str, torch.Tensor]:
    """What a loader has before loading: tensors of the right dtype and shape, no data."""
    return empty_like(checkpoint_specs(path))


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

    server = ServerProcess(
        [NETLOADER, "-v", "serve", str(ckpt.parent), "--model", "demo"],
        log=args.workdir / "server.log",
    )
    try:
        print(f"server process {server.pid}: {server.ready.string.strip()}")
        address = server.address

        # A served checkpoint's identity: its name plus what it is (weights=checkpoint
        # and its config's fingerprint), as the server states it.
        identity = netloader.Client([address]).manifest().identity
        assert identity.model == "demo", identity
        results: dict[str, float] = {}
        for transport in ("same-host", "tcp", "gloo"):
            dest = empty_model(ckpt)
            report = netloader.load(dest, [address], identity, transport=transport)
            results[f"netloader pull over {transport}, into fresh memory"] = report.seconds
            report = netloader.load(dest, [address], identity, transport=transport)
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
        identical = not differing(dest, model)
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
        server.stop(timeout=20)


if __name__ == "__main__":
    main()
