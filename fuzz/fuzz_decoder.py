"""Coverage-guided fuzzing (atheris) of everything that parses bytes from a peer: the
frame header, control bodies, each typed message, the manifest, FETCH validation and the
configuration parser. Any input must give a result or the project's own error type.

    .venv/bin/python fuzz/fuzz_decoder.py fuzz/corpus/decoder -max_total_time=60
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from netloader import protocol as p
    from netloader.config import NetloaderConfig
    from netloader.errors import NetloaderError
    from netloader.manifest import Identity, Manifest, TensorEntry

# A small manifest for FETCH validation: 2 tensors, 3 chunks.
MANIFEST = Manifest(
    Identity("m"),
    (TensorEntry("a", "float32", (4,), 16), TensorEntry("b", "uint8", (40,), 40)),
    chunk_bytes=32,
    digests=("0" * 32, "1" * 32, "2" * 32),
)


def one_input(data: bytes) -> None:
    try:
        if data[:1] == b"C":  # the configuration parser, fed the rest as JSON text
            NetloaderConfig.load(data[1:].decode("utf-8", "replace"), environ={})
            return
        header = p.decode_header(data[: p.HEADER.size])
        rest = data[p.HEADER.size :]
        if header.type is p.MsgType.DATA:
            p.decode_data_prefix(rest[: p.DATA_PREFIX.size].ljust(p.DATA_PREFIX.size, b"\0"))
            return
        body = p.decode_body(rest)
        decoder = {
            p.MsgType.HELLO: p.Hello.decode,
            p.MsgType.WELCOME: p.Welcome.decode,
            p.MsgType.FETCH: lambda b: p.Fetch.decode(b).validate(MANIFEST),
            p.MsgType.MANIFEST: Manifest.from_json,
            p.MsgType.ERROR: p.Error.decode,
            p.MsgType.AUTH: p.Auth.decode,
            p.MsgType.GLOO: p.ProcessGroupSetup.decode,
            p.MsgType.CHUNK_ADDRESS: p.ChunkAddress.decode,
            p.MsgType.CUDA_IPC_OFFER: p.CudaIpcOffer.decode,
            p.MsgType.CUDA_IPC_TENSOR: p.CudaIpcTensor.decode,
        }.get(header.type)
        if decoder is not None:
            decoder(body)
    except NetloaderError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
