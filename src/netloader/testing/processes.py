"""Child processes for tests and benchmarks: a server that prints its address once it
listens, a worker that prints JSON lines. Their stdout is read line by line in a thread,
so every wait has a timeout and an early exit is reported with the output and the log.

    with ServerProcess([netloader_command(), "serve", str(ckpt)], log=tmp / "serve.log") as s:
        identity = netloader.Client([s.address]).manifest().identity  # a served checkpoint's
        netloader.load(dest, [s.address], identity)
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

SERVING = re.compile(r"netloader: serving (?P<model>\S+) \(.*\) on (?P<address>\S+)\s*$")
"""The line `netloader serve` prints once it listens."""

WAVE_MEMBER = re.compile(r"netloader: wave member (?P<position>\d+) serving on (?P<address>[^,]+),")
"""The line `netloader pull --wave` prints once it has joined the wave and listens."""

Popen = Callable[..., "subprocess.Popen[str]"]


class ProcessFailed(RuntimeError):
    """A child process exited, or said nothing expected in time."""


def netloader_command() -> str:
    """The `netloader` command installed next to this Python (or else on PATH)."""
    beside = Path(sys.executable).with_name("netloader")
    found = str(beside) if beside.exists() else shutil.which("netloader")
    if not found:
        raise RuntimeError("the `netloader` command is not installed next to this Python")
    return found


class ChildProcess:
    """`argv` started with its stdout read line by line (`expect`, `read_until`,
    `json_line`) and its stderr written to `log` (or inherited when `log` is None).
    `stop()` sends `stop_signal`, then kills what does not exit in time. `popen` starts
    it (`functools.partial(cluster.popen, host)` starts it in an emulated host)."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log: Path | None = None,
        env: Mapping[str, str] | None = None,
        stop_signal: int = signal.SIGTERM,
        popen: Popen = subprocess.Popen,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.log = log
        self.stop_signal = stop_signal
        self.output = ""  # all of stdout read so far
        self._log_file: IO[str] | None = None
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(log, "w")  # noqa: SIM115 - the child writes it all its life
        self.proc: subprocess.Popen[str] = popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            text=True,
            env=None if env is None else dict(env),
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._ended = False
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):
            for line in self.proc.stdout:
                self._lines.put(line)
        self._lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _next_line(self, deadline: float, waiting_for: str) -> str:
        left = deadline - time.monotonic()
        line = None
        if not self._ended and left > 0:
            with contextlib.suppress(queue.Empty):
                line = self._lines.get(timeout=left)
                if line is None:
                    self._ended = True
        if line is None:
            status = self.proc.poll()
            why = "exited" if self._ended else "said nothing more in time"
            raise ProcessFailed(
                f"{Path(self.argv[0]).name} {why} (status {status}) while waiting for "
                f"{waiting_for}; stdout:\n{self.output[-2000:]}\nlog:\n{self.log_tail()}"
            )
        self.output += line
        return line

    def expect(self, pattern: str | re.Pattern[str], timeout: float = 60.0) -> re.Match[str]:
        """Read stdout up to the first line in which `pattern` is found; its match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            if match := regex.search(self._next_line(deadline, f"/{regex.pattern}/")):
                return match

    def read_until(self, marker: str, timeout: float = 60.0) -> str:
        """Stdout from here up to and including the first line containing `marker`."""
        start = len(self.output)
        self.expect(re.escape(marker), timeout)
        return self.output[start:]

    def json_line(self, timeout: float = 120.0) -> dict[str, Any]:
        """The next stdout line that is a JSON object, decoded."""
        text = self.expect(r"^\{", timeout).string
        decoded: dict[str, Any] = json.loads(text)
        return decoded

    def log_text(self) -> str:
        if self._log_file is not None:
            self._log_file.flush()
        return "" if self.log is None else self.log.read_text(errors="replace")

    def log_tail(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log_text()[-chars:]
        return ""

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> int:
        """Send `stop_signal` if it still runs, kill it if it has not exited within
        `timeout`; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        self._reader.join(timeout=2)
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()
        if self._log_file is not None:
            self._log_file.close()
        return self.proc.returncode

    def __enter__(self) -> ChildProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerProcess(ChildProcess):
    """A child process that serves: started, then waited for until it prints a line
    matching `ready` (whose `address` group is its "host:port"; by default the line of
    `netloader serve`, whose `model` group is the model it serves)."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log: Path | None = None,
        ready: str | re.Pattern[str] = SERVING,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
        stop_signal: int = signal.SIGTERM,
        popen: Popen = subprocess.Popen,
    ) -> None:
        super().__init__(argv, log=log, env=env, stop_signal=stop_signal, popen=popen)
        try:
            self.ready = self.expect(ready, timeout)
        except BaseException:
            self.stop(timeout=5)
            raise
        self.address: str = self.ready["address"]

    def __enter__(self) -> ServerProcess:
        return self


def read_address_file(path: Path, timeout: float = 10.0) -> str:
    """The "host:port" a server wrote to its output file (OUTPUT_PREFIX), once written."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise ProcessFailed(f"{path} was not written in {timeout:.0f} s")
        time.sleep(0.05)
    return path.read_text().strip()


def process_usage(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (kB), Threads and the count of open file descriptors of `pid`."""
    fields = {}
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = row.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            fields[key] = int(value.split()[0])
    fields["fds"] = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    return fields
