"""Start and drive a real vLLM OpenAI server (CPU) with `--load-format netloader`.

Standard library only: the tests (tests/vllm) and the benchmark (benchmarks/bench_vllm.py)
run in netloader's own venv and start vLLM with the vLLM venv's python
(scripts/setup_vllm.sh prints it). A server's netloader address is in its OUTPUT_PREFIX
file: `netloader.testing.processes.read_address_file`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from netloader.files import is_weight_file

PROMPTS = ["The cat", "A small robot repairs", "The captain", "Our team builds", "The baker"]

# vLLM's automatic binding pins every CPU worker (its inference, and netloader's threads in
# it) to the same core; instances started here take the cores in turn instead.
_NEXT_CORE = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_weightless_dir(model_dir: Path, out: Path) -> Path:
    """A copy of `model_dir` with its config and tokenizer files but no weight files."""
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and not f.name.startswith(".") and not is_weight_file(f.name):
            shutil.copy2(f, out / f.name)
    return out


class VllmError(RuntimeError):
    pass


class VllmInstance:
    """One `vllm.entrypoints.openai.api_server` in its own process group.

    with VllmInstance(python, model_dir, {"MODEL": "tiny"}, workdir=tmp, name="seed") as s:
        s.complete("The cat")
    """

    def __init__(
        self,
        python: str,
        model: Path | str,
        extra_config: dict[str, Any] | None,
        *,
        workdir: Path,
        name: str,
        dtype: str | None = None,
        served_model_name: str | None = None,
        tensor_parallel: int = 1,
        env: dict[str, str] | None = None,
        unset_env: tuple[str, ...] = ("NETLOADER_SECRET", "NETLOADER_CONFIG"),
        load_format: str = "netloader",
        extra_args: tuple[str, ...] = (),
        ready_timeout: float = 180.0,
        enforce_eager: bool = True,
    ) -> None:
        self.name = name
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(workdir) / f"{name}.log"
        self.ready_timeout = ready_timeout
        self.ready_seconds: float | None = None
        self.cmd = [
            python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--host", "127.0.0.1", "--port", str(self.port),
            "--kv-cache-memory-bytes", "256M", "--max-model-len", "512",
            "--load-format", load_format,
        ]  # fmt: skip
        if enforce_eager:  # vLLM's default torch.compile costs ~17 s here (see the README)
            self.cmd.append("--enforce-eager")
        if extra_config is not None:
            self.cmd += ["--model-loader-extra-config", json.dumps(extra_config)]
        if dtype:
            self.cmd += ["--dtype", dtype]
        if served_model_name:
            self.cmd += ["--served-model-name", served_model_name]
        if tensor_parallel > 1:
            self.cmd += ["--tensor-parallel-size", str(tensor_parallel)]
        self.cmd += list(extra_args)
        # By default an outer NETLOADER_SECRET / NETLOADER_CONFIG does not leak in: the
        # caller says what the instance gets (env=...).
        self.env = {k: v for k, v in os.environ.items() if k not in unset_env}
        self.env.update(
            VLLM_HOST_IP="127.0.0.1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            PYTHONUNBUFFERED="1",
        )
        if tensor_parallel > 1:
            # Automatic binding wants one NUMA node per CPU worker; bind one core each.
            self.env.setdefault(
                "VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(tensor_parallel))
            )
        else:  # one core, as vLLM's own binding would give it, but not always the same one;
            # except where torch.compile runs: vLLM hashes its environment, the binding
            # included, into the compile cache's key, and those instances share caches.
            cores = sorted(os.sched_getaffinity(0))
            core = cores[next(_NEXT_CORE) % len(cores)] if enforce_eager else cores[0]
            self.env.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(core))
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.tmpdir: str | None = None
        self.model_id: str | None = None
        self.started_at = 0.0

    # ---- life cycle --------------------------------------------------------------------
    def __enter__(self) -> VllmInstance:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        # vLLM leaves ZMQ ipc sockets and vllm_dist_* files behind when killed: keep them
        # in a private directory that stop() removes.
        self.tmpdir = tempfile.mkdtemp(prefix=f"nl-vllm-{self.name}-")
        env = {**self.env, "VLLM_RPC_BASE_PATH": self.tmpdir, "TMPDIR": self.tmpdir}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            log.write(("$ " + " ".join(self.cmd) + "\n").encode())
            log.flush()
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group, killed whole by stop()
            )

    def wait_ready(self) -> float:
        """Seconds from start until /health answers; raises VllmError with the log tail."""
        assert self.proc is not None
        deadline = self.started_at + self.ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise VllmError(
                    f"vLLM {self.name} exited with status {self.proc.returncode} before it "
                    f"was ready; log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise VllmError(
                    f"vLLM {self.name} not ready after {self.ready_timeout:.0f} s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.25)
        self.ready_seconds = time.monotonic() - self.started_at
        self.model_id = self._get("/v1/models")["data"][0]["id"]
        return self.ready_seconds

    def terminate(self) -> None:
        """SIGTERM to the whole process group, without waiting (`stop` waits)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to the whole process group, SIGKILL to what is left after `grace`."""
        self.terminate()
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
            _kill_group(proc.pid)  # workers that outlive the API server, too
            proc.wait()
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    # ---- use ---------------------------------------------------------------------------
    def complete(self, prompt: str, max_tokens: int = 24, timeout: float = 120.0) -> str:
        """Greedy (temperature 0) completion of `prompt`."""
        body = {
            "model": self.model_id,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "seed": 0,
        }
        answer = self._post("/v1/completions", body, timeout)
        text: str = answer["choices"][0]["text"]
        return text

    def completions(self, prompts: list[str] = PROMPTS) -> dict[str, str]:
        return {p: self.complete(p) for p in prompts}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_text().splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"

    def netloader_lines(self) -> list[str]:
        return [line for line in self.log_text().splitlines() if "[netloader]" in line]

    def _get(self, path: str, timeout: float = 30.0) -> Any:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def _post(self, path: str, body: dict[str, Any], timeout: float) -> Any:
        req = urllib.request.Request(
            self.base_url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise VllmError(f"{path} -> HTTP {exc.code}: {exc.read()[:500]!r}") from exc


@contextlib.contextmanager
def running(*instances: VllmInstance) -> Iterator[tuple[VllmInstance, ...]]:
    """Start `instances` at once and wait until each is ready; stop them all at the end.
    A start is mostly three processes importing in turn, so starts overlap well on
    several cores."""
    try:
        for instance in instances:
            instance.start()
        for instance in instances:
            instance.wait_ready()
        yield instances
    finally:
        for instance in instances:
            instance.terminate()
        for instance in instances:
            instance.stop()


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
