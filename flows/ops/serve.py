"""A local Prefect stack for this working copy: server, process work pool, deployments, worker.

``shrinkflow serve`` (or ``make serve``) starts a Prefect server on 127.0.0.1 (SQLite under
``PREFECT_HOME``), creates the ``shrinkflow`` process work pool, deploys every deployment of
``prefect.yaml`` and starts a worker whose flow runs (and DVC stage commands) use this
interpreter's venv. Ctrl-C stops the worker, then the server, each by its process id.

The same helpers start the real server and worker in the integration tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shrinkflow.errors import ShrinkflowError

POOL = "shrinkflow"
BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def prefect_env(api_url: str | None, home: Path | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the server, the worker and ``prefect`` commands.

    The venv's bin/ goes first on PATH so flow runs and DVC's ``shrinkflow stage`` commands
    resolve to this venv, whatever PATH the caller had.
    """
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # else a DNS lookup at start
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    env.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "dvc")  # DVC's "Running stage ..." lines reach the run logs
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    env.update(extra or {})
    return env


def prefect_cmd(args: Sequence[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 180) -> str:
    """Run ``prefect ARGS`` (non-interactive); raise with its output when it fails."""
    cmd = [str(BIN / "prefect"), "--no-prompt", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ShrinkflowError(f"`prefect {' '.join(args)}` exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def _spawn(cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    # A session of its own (setsid): the process and its children get signals as one
    # group, addressed by this PID, and a worker stops on SIGTERM at once.
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen | None, grace: float = 15.0) -> None:
    """Stop a process started by ``_spawn`` and its children: SIGTERM to its group, SIGKILL after ``grace`` s."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)  # the group id is this PID (setsid)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def wait_ready(api_url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0, log: Path | None = None) -> float:
    """Poll ``/health`` until the server answers; return the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise ShrinkflowError(f"the Prefect server exited with code {proc.returncode} before it was ready\n{tail}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.25)
    raise ShrinkflowError(f"the Prefect server at {api_url} was not ready after {timeout:.0f} s (see {log})")


@dataclass
class Stack:
    """A running server (and, once started, a worker), stopped by ``close()``."""

    api_url: str
    env: dict[str, str]
    logs: Path
    server: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)
    ready_s: float = 0.0

    def start_worker(self, pool: str = POOL, poll_seconds: float | None = None, cwd: Path | None = None) -> subprocess.Popen:
        """A process worker on ``pool``; ``poll_seconds`` sets PREFECT_WORKER_QUERY_SECONDS."""
        env = dict(self.env)
        if poll_seconds is not None:
            env["PREFECT_WORKER_QUERY_SECONDS"] = str(poll_seconds)
        log = self.logs / f"worker-{len(self.workers)}.log"
        proc = _spawn([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"], env, log, cwd)
        self.workers.append(proc)
        return proc

    def close(self) -> None:
        """Stop the workers first (they report to the server), then the server."""
        for w in self.workers:
            stop(w)
        self.workers.clear()
        stop(self.server)
        self.server = None


def start_server(home: Path | None, host: str = "127.0.0.1", port: int | None = None, logs: Path | None = None,
                 timeout: float = 120.0) -> Stack:
    """Start ``prefect server start`` (SQLite under ``home``) and wait until it answers."""
    port = port or free_port(host)
    api_url = f"http://{host}:{port}/api"
    logs = logs or (home or Path.cwd()) / "logs"
    env = prefect_env(api_url, home)
    # The server itself must not point at an API: it *is* the API.
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    server_env["PREFECT_SERVER_API_HOST"] = host
    server_env["PREFECT_SERVER_API_PORT"] = str(port)
    stack = Stack(api_url=api_url, env=env, logs=logs)
    log = logs / "server.log"
    stack.server = _spawn([str(BIN / "prefect"), "server", "start", "--host", host, "--port", str(port)], server_env, log)
    try:
        stack.ready_s = wait_ready(api_url, stack.server, timeout, log)
    except BaseException:
        stack.close()
        raise
    return stack


def create_pool(env: dict[str, str], pool: str = POOL) -> None:
    """A process work pool that runs one flow at a time: every run shares this working copy."""
    prefect_cmd(["work-pool", "create", pool, "--type", "process", "--overwrite"], env)
    prefect_cmd(["work-pool", "set-concurrency-limit", pool, "1"], env)


def deploy(root: Path, env: dict[str, str], names: Sequence[str] = ()) -> str:
    """``prefect deploy`` every deployment of ``root/prefect.yaml`` (or just ``names``)."""
    root = Path(root).resolve()
    if not (root / "prefect.yaml").is_file():
        raise ShrinkflowError(f"{root}/prefect.yaml not found: run from the project root (or pass --root)")
    # prefect.yaml's pull step reads {{ $PWD }}: make it this root, however we were called.
    env = {**env, "PWD": str(root)}
    args = ["deploy", *(a for n in names for a in ("--name", n))] if names else ["deploy", "--all"]
    return prefect_cmd(args, env, cwd=root)


@contextlib.contextmanager
def local_stack(root: Path, home: Path | None = None, host: str = "127.0.0.1", port: int | None = None,
                poll_seconds: float | None = None, pool: str = POOL) -> Iterator[Stack]:
    """Server + pool + deployments + worker for the project at ``root``; all stopped on exit."""
    log_home = home or Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()  # never inside the project
    stack = start_server(home, host, port, logs=log_home / "shrinkflow-serve-logs")
    try:
        create_pool(stack.env, pool)
        deploy(root, stack.env)
        stack.start_worker(pool, poll_seconds, cwd=Path(root))
        yield stack
    finally:
        stack.close()


def serve(root: Path, home: Path | None, host: str, port: int, poll_seconds: float | None) -> None:
    """Run the local stack until Ctrl-C (or SIGTERM), then stop it."""
    root = Path(root).resolve()
    if not (root / "prefect.yaml").is_file():
        raise ShrinkflowError(f"{root}/prefect.yaml not found: run from the project root (or pass --root)")
    if home is None and "PREFECT_HOME" in os.environ:
        home = Path(os.environ["PREFECT_HOME"])
    # SIGTERM ends the wait like Ctrl-C does, so `kill PID` also stops everything.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    print(f"starting the Prefect server on http://{host}:{port} ...", flush=True)
    with local_stack(root, home, host, port, poll_seconds) as stack:
        print(
            f"ready in {stack.ready_s:.1f} s: UI http://{host}:{port}, pool {POOL!r}, worker pid {stack.workers[0].pid}\n"
            f"logs: {stack.logs}\n\n"
            f"In another shell:\n  export PREFECT_API_URL={stack.api_url}\n"
            "  prefect deployment run 'compress/local'\n  prefect deployment run 'retrain/nightly'\n\n"
            "Ctrl-C stops the worker and the server.",
            flush=True,
        )
        try:
            while True:
                for p in [stack.server, *stack.workers]:
                    if p is not None and p.poll() is not None:
                        raise ShrinkflowError(f"process {p.pid} ({' '.join(map(str, p.args[1:3]))}) exited with {p.returncode}; see {stack.logs}")
                time.sleep(1)
        except KeyboardInterrupt:
            print("\nstopping the worker, then the server ...", flush=True)
    print("stopped.", flush=True)
