"""A real netloader server process for tests: serves one of netloader.testing.models.SETS
and prints `ADDR host:port` on stdout once listening; stops on SIGTERM.

    python tests/support/peer.py transformer_like --model m --chunk-bytes 1048576
    python tests/support/peer.py transformer_like --device cuda --device-gib 4 --secret S
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

import torch

import netloader
from netloader.testing.models import SETS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("set", choices=sorted(SETS))
    parser.add_argument("--model", default="test-model")
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--tp-rank", type=int, default=0)
    parser.add_argument("--pp-size", type=int, default=1)
    parser.add_argument("--pp-rank", type=int, default=0)
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20)
    parser.add_argument("--column-tiles", type=int, default=1)
    parser.add_argument("--secret")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--mutate", help="serve this tensor with one byte changed")
    parser.add_argument(
        "--flip-after-digests",
        help="flip a byte of this tensor in place once the digests are computed",
    )
    parser.add_argument("--device", default="cpu", help="serve the tensors from this device")
    parser.add_argument(
        "--device-gib",
        type=float,
        default=0.0,
        help="also serve this many GiB of random tensors made on --device (never on the host)",
    )
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    tensors = SETS[args.set]()
    if args.device != "cpu":  # contiguous copies on the device, the host ones dropped
        tensors = {name: t.contiguous().to(args.device) for name, t in tensors.items()}
    block = 256 << 20
    for i in range(int(args.device_gib * (1 << 30)) // block):
        tensors[f"device_block.{i}"] = torch.randint(
            0, 256, (block,), dtype=torch.uint8, device=args.device
        )
    if args.mutate:
        victim = tensors[args.mutate].clone()
        victim.reshape(-1).view(torch.uint8)[0] ^= 0xFF
        tensors[args.mutate] = victim
    identity = netloader.Identity(
        args.model,
        tp_size=args.tp_size,
        tp_rank=args.tp_rank,
        pp_size=args.pp_size,
        pp_rank=args.pp_rank,
    )
    server = netloader.serve(
        tensors,
        identity,
        listen=args.listen,
        secret=args.secret,
        chunk_bytes=args.chunk_bytes,
        column_tiles=args.column_tiles,
    )
    server.manifest()  # digests ready before we announce ourselves
    if args.flip_after_digests:  # memory gone bad under a running server
        tensors[args.flip_after_digests].reshape(-1).view(torch.uint8)[0] ^= 0xFF
    print(f"ADDR {server.address}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.close()


if __name__ == "__main__":
    main()
