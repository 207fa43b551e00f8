"""A short coverage-guided fuzz run (atheris) of the decoders and the config parser,
from the corpus in fuzz/corpus/decoder: any input must give a result or the project's
own error type (an escaping exception makes atheris exit non-zero with the input)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
RUNS = 50_000


def test_short_fuzz_run_finds_no_crash(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    shutil.copytree(ROOT / "fuzz" / "corpus" / "decoder", corpus)  # atheris adds to it
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "fuzz" / "fuzz_decoder.py"),
            str(corpus),
            f"-runs={RUNS}",
            "-max_total_time=30",
            "-max_len=4096",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    tail = done.stderr[-3000:]
    assert done.returncode == 0, tail
    ran = re.search(r"Done (\d+) runs", done.stderr)
    assert ran and int(ran.group(1)) > 0, tail
    print(
        f"\nfuzz: {ran.group(0)}; corpus grew from "
        f"{len(list((ROOT / 'fuzz/corpus/decoder').iterdir()))} to {len(list(corpus.iterdir()))}"
    )
