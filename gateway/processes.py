"""Child processes for the bench and the native topology: start, wait for health, stop — all bounded.

Contract
--------
* :func:`spawn` starts a child in its own session (its own process group) with its output in a
  log file; on Linux the child also receives SIGTERM if this process dies (``PR_SET_PDEATHSIG``).
* :func:`stop` TERMs a child's whole process group, waits up to ``grace`` seconds, then KILLs the
  group (stragglers included); idempotent and bounded.
* :func:`run_logged` runs a command to completion (bounded); :class:`Server` starts a long-running
  child and waits (bounded) until an HTTP health URL answers 200.
* :func:`start_script_service` runs one of ``scripts/postgres.sh|redis.sh|kafka.sh`` (they print
  ``ADDRESS DIR``) and registers ``SCRIPT stop DIR`` on an :class:`contextlib.ExitStack`.
* Every failure is a :class:`ProcessError` whose message names the step and carries the log tail.
* Nothing runs at import time.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final

ROOT: Final = Path(__file__).parent.parent
SCRIPTS: Final = ROOT / "scripts"


class ProcessError(RuntimeError):
    """A child process failed to start, finish or answer; the message says which, with its log tail."""


def log(prefix: str, message: str) -> None:
    """One progress line on stderr: ``[prefix] message``."""
    print(f"[{prefix}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, chars: int = 3000) -> str:
    """The last ``chars`` characters of a log ("" when it cannot be read)."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def last_line(path: Path) -> str:
    lines = [line for line in tail(path).splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(empty log)"


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _child_setup() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when its parent dies (PR_SET_PDEATHSIG)."""
    libc = _libc()
    if libc is None:
        return None

    def setup() -> None:
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG = 1

    return setup


def kill_group(proc: subprocess.Popen[Any], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    """TERM the child's process group, wait up to ``grace`` seconds, then KILL it (bounded)."""
    if proc.poll() is None:
        kill_group(proc, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    kill_group(proc, signal.SIGKILL)  # stragglers of the group, even when the leader exited
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def spawn(argv: Sequence[str], env: dict[str, str], log_file: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session, stdout and stderr appended to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        return subprocess.Popen(
            list(argv),
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_child_setup(),  # only prctl(2): no locks, no allocation
        )


def run_logged(argv: Sequence[str], env: dict[str, str], log_file: Path, timeout: float, what: str) -> int:
    """Run a command to completion with its output in ``log_file``; return its exit status.

    Raises :class:`ProcessError` (with the log tail) when it outlives ``timeout``; the child's whole
    process group is killed on timeout, error or interruption.
    """
    proc = spawn(argv, env, log_file)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ProcessError(f"{what} did not finish within {timeout:.0f}s; log {log_file}:\n{tail(log_file)}") from None
    finally:
        stop(proc, grace=5)


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only: never a proxy


def http_get(url: str, headers: dict[str, str], timeout: float = 10) -> tuple[int, bytes]:
    """GET ``url`` (no proxy); (status, body) for any HTTP status, OSError for transport failures."""
    return http_request(url, headers, None, timeout)


def http_request(url: str, headers: dict[str, str], body: bytes | None, timeout: float = 10) -> tuple[int, bytes]:
    """GET (``body`` None) or POST ``url`` (no proxy); (status, body) for any status, OSError otherwise."""
    request = urllib.request.Request(url, data=body, headers=headers, method="GET" if body is None else "POST")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def scrape(url: str) -> str | None:
    """The Prometheus text page at ``url``; None when it cannot be read (not 200, or unreachable)."""
    try:
        status, body = http_get(url, {}, timeout=10)
    except OSError:
        return None
    return body.decode("utf-8", "replace") if status == 200 else None


def metric_sum(page: str | None, name: str, **labels: str) -> float | None:
    """The sum of metric ``name``'s samples on ``page`` (a :func:`scrape`) whose labels include
    every ``label="value"`` given; None when there are none. Label values must not hold commas
    (ours: names, codes and route templates)."""
    wanted = {f'{k}="{v}"' for k, v in labels.items()}
    total: float | None = None
    for line in (page or "").splitlines():
        sample, _, value = line.rpartition(" ")
        metric, _, label_block = sample.partition("{")
        if metric == name and wanted <= set(label_block.rstrip("}").split(",")):
            total = (total or 0.0) + float(value)
    return total


class Server:
    """A long-running child that answers ``GET health`` (default ``http://127.0.0.1:PORT/healthz``)."""

    def __init__(
        self, name: str, argv: Sequence[str], env: dict[str, str], log: Path, port: int, health: str | None = None
    ) -> None:
        self.name, self.argv, self.env, self.log, self.port = name, list(argv), env, log, port
        self.base = f"http://127.0.0.1:{port}"
        self.health = health or f"{self.base}/healthz"
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        """Start the child without waiting (then :meth:`wait_healthy`)."""
        self.proc = spawn(self.argv, self.env, self.log)

    def wait_healthy(self, timeout: float) -> None:
        """Wait (bounded) until the health URL answers 200; ProcessError with the log otherwise."""
        assert self.proc is not None, "launch first"
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ProcessError(
                    f"{self.name} exited with status {self.proc.returncode}: {last_line(self.log)}\n{tail(self.log)}"
                )
            with contextlib.suppress(OSError):
                if http_get(self.health, {}, timeout=1)[0] == 200:
                    return
            if time.monotonic() > deadline:
                raise ProcessError(f"{self.name} did not answer {self.health} within {timeout:.0f}s:\n{tail(self.log)}")
            time.sleep(0.1)

    def start(self, timeout: float) -> None:
        """:meth:`launch`, then :meth:`wait_healthy`."""
        self.launch()
        self.wait_healthy(timeout)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Idempotent, bounded (TERM, 15 s grace, KILL)."""
        if self.proc is not None:
            stop(self.proc, grace=15)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` stops what it started."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def base_env() -> dict[str, str]:
    """This process's environment without any ``UNIHEALTH_*`` or proxy setting (each child sets its own)."""
    drop = ("http_proxy", "https_proxy", "all_proxy")
    return {k: v for k, v in os.environ.items() if not k.startswith("UNIHEALTH_") and k.lower() not in drop}


def python_module(module: str, *args: str) -> list[str]:
    """``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def start_script_service(
    script: str, stack: contextlib.ExitStack, log_file: Path, timeout: float = 600.0, prefix: str = "topology"
) -> tuple[str, str]:
    """Run ``scripts/SCRIPT`` (it prints ``ADDRESS DIR``), register ``SCRIPT stop DIR`` on ``stack``
    and return (ADDRESS, DIR). The script runs in its own session: a Ctrl-C in the terminal cannot kill it
    half-way and leave a server whose directory nobody knows; on interruption it may finish
    (bounded), and what it started is stopped."""
    path = SCRIPTS / script

    def stop_it(directory: str) -> None:
        log(prefix, f"stopping {script} server")
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run([str(path), "stop", directory], capture_output=True, timeout=60, check=False)

    log_file.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc, signal.SIGKILL)
        raise ProcessError(f"scripts/{script} did not finish within {timeout:.0f}s") from None
    except KeyboardInterrupt:
        with contextlib.suppress(subprocess.TimeoutExpired):
            out, _ = proc.communicate(timeout=90)
            if proc.returncode == 0 and len(out.split()) == 2:
                stop_it(out.split()[1])
        kill_group(proc, signal.SIGKILL)
        raise
    log_file.write_text(err)
    fields = out.split()
    if proc.returncode != 0 or len(fields) != 2:
        raise ProcessError(f"scripts/{script} failed (status {proc.returncode}):\n{err[-3000:]}")
    address, directory = fields
    stack.callback(stop_it, directory)
    return address, directory
