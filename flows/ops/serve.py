"""A local Prefect stack for this working copy: server, process work pool, deployments, worker.

``shrinkflow serve`` (or ``make serve``) starts a Prefect server on 127.0.0.1 (SQLite under
``PREFECT_HOME``), creates the ``shrinkflow`` process work pool, deploys every deployment of
``prefect.yaml`` and starts a worker whose flow runs (and DVC stage commands) use this
interpreter's venv.

Stopping. SIGINT (Ctrl-C) or SIGTERM, at any moment, stops everything that was started:
the worker and the flow runs it started, then the server, each process group by id,
SIGTERM first and SIGKILL after a grace period. The signal handler only records the
signal; every wait (server start-up, ``prefect deploy``, the serving loop, stopping) polls
it, so no signal interrupts the bookkeeping of what was started or the stopping itself.
A repeated signal shortens the grace period to a few seconds, then the SIGKILL follows.
On Linux serve becomes a child subreaper, so a flow run orphaned by its worker is still
found and stopped. Each message says what happened to which process.

The same helpers start the real server and worker in the integration tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shrinkflow.errors import ShrinkflowError

POOL = "shrinkflow"
BIN = Path(sys.executable).parent
#: Seconds a process group gets between SIGTERM and SIGKILL; a repeated signal cuts it to HURRY_S.
GRACE_S = 15.0
HURRY_S = 3.0
HURRY_NOTICE = "signal received again"


class Interrupted(Exception):
    """A stop signal arrived while serve was starting or serving."""


class StopSignals:
    """SIGINT/SIGTERM while serving: record them; the code that waits decides what to do.

    The handler never raises, so it cannot land between starting a process and recording
    it, or in the middle of stopping one. ``requested`` is set by the first signal;
    ``hurry`` by any later one.
    """

    def __init__(self) -> None:
        self.received: list[str] = []

    def __call__(self, signum: int, frame: object) -> None:
        self.received.append(signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        return bool(self.received)

    @property
    def hurry(self) -> bool:
        return len(self.received) > 1

    def check(self) -> None:
        """Raise ``Interrupted`` once a stop was requested (called by every wait of start-up and serving)."""
        if self.received:
            raise Interrupted(self.received[0])

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        saved = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in saved.items():
                signal.signal(s, handler)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """True when a server could listen on ``host:port`` now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no owner
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


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
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    env.update(extra or {})
    return env


def prefect_cmd(args: Sequence[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 180,
                signals: StopSignals | None = None) -> str:
    """Run ``prefect ARGS`` (non-interactive); raise with its output when it fails.

    With ``signals``, a stop request ends the command (its process group) and raises ``Interrupted``.
    """
    cmd = [str(BIN / "prefect"), "--no-prompt", *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            out, err = proc.communicate(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            if (signals is not None and signals.requested) or time.monotonic() > deadline:
                stop(proc, grace=5)
                if signals is not None:
                    signals.check()
                raise ShrinkflowError(f"`prefect {' '.join(args)}` did not finish in {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise ShrinkflowError(f"`prefect {' '.join(args)}` exited {proc.returncode}:\n{out}\n{err}")
    return out


def _spawn(cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    # A session of its own (setsid): the process and its children get signals as one
    # group, addressed by this PID; a Ctrl-C in serve's terminal does not reach it.
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


# ------------------------------------------------------------------------ process groups


def _processes() -> dict[int, tuple[int, int, str]] | None:
    """pid → (parent pid, process group, state) from /proc; None where there is no /proc."""
    if not os.path.isdir("/proc/self"):
        return None
    table: dict[int, tuple[int, int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
        table[int(entry)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def _descendants(pid: int, table: dict[int, tuple[int, int, str]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for p, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(p)
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _groups_alive(groups: set[int]) -> set[int]:
    """The process groups among ``groups`` that still have a running (non-zombie) member."""
    table = _processes()
    if table is None:
        alive = set()
        for g in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(g, 0)
                alive.add(g)
        return alive
    me = os.getpid()
    for p, (ppid, _, state) in table.items():  # zombies re-parented to us (subreaper): reap them
        if ppid == me and state == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p, os.WNOHANG)
    return {pgid for _, pgid, state in table.values() if pgid in groups and state != "Z"}


def _signal_groups(groups: set[int], sig: signal.Signals) -> None:
    for g in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(g, sig)


_SUBREAPER = False


def become_subreaper() -> bool:
    """Linux: orphaned descendants (a flow run whose worker died) are re-parented to this process."""
    global _SUBREAPER
    if sys.platform.startswith("linux") and not _SUBREAPER:
        with contextlib.suppress(OSError, AttributeError):
            _SUBREAPER = ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    return _SUBREAPER


def stop(proc: subprocess.Popen | None, grace: float = GRACE_S, hurry: Callable[[], bool] | None = None,
         say: Callable[[str], None] | None = None, name: str = "process", others: frozenset[int] = frozenset()) -> str:
    """Stop a process started by ``_spawn`` and everything it started: SIGTERM, SIGKILL after ``grace`` s.

    Its own group is signalled, and so are the groups of descendants that left it (a
    process worker runs each flow in a session of its own; orphans come back to a
    subreaper). ``others``: groups of other processes of the same stack, never touched
    here. ``hurry()`` turning true shortens what is left of the grace period to
    ``HURRY_S``. Returns what happened.
    """
    if proc is None:
        return ""
    t0 = time.monotonic()
    groups, signalled = {proc.pid}, set()
    mine = os.getpgid(0)

    def track() -> None:
        table = _processes()
        if table is None:
            return
        roots = [proc.pid] + ([os.getpid()] if _SUBREAPER and proc.poll() is not None else [])
        for r in roots:
            groups.update(table[d][1] for d in _descendants(r, table) if d in table)
        groups.difference_update({mine, *others})

    def term(alive: set[int]) -> None:
        _signal_groups(alive - signalled, signal.SIGTERM)
        signalled.update(alive)

    track()
    if proc.poll() is not None and not _groups_alive(groups):
        return f"{name} (pid {proc.pid}) had already exited with {proc.returncode}"
    term(set(groups))
    deadline, hurried = t0 + grace, False
    while True:
        proc.poll()
        track()
        alive = _groups_alive(groups)
        if not alive:
            _reap(proc)
            return f"{name} (pid {proc.pid}) stopped by SIGTERM in {time.monotonic() - t0:.1f} s"
        term(alive)  # a flow run started meanwhile
        if hurry is not None and hurry() and not hurried:
            hurried = True
            deadline = min(deadline, time.monotonic() + HURRY_S)
            if say is not None:
                say(f"{HURRY_NOTICE}: {name} (pid {proc.pid}) gets SIGKILL in {max(0.0, deadline - time.monotonic()):.0f} s")
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    waited = time.monotonic() - t0
    stuck = _groups_alive(groups)
    _signal_groups(groups, signal.SIGKILL)
    end = time.monotonic() + 10
    while _groups_alive(groups) and time.monotonic() < end:
        proc.poll()
        time.sleep(0.05)
    _reap(proc)
    left = _groups_alive(groups)
    if left:
        return f"{name} (pid {proc.pid}): process group(s) {sorted(left)} still running after SIGKILL"
    runs = sorted(stuck - {proc.pid})
    who = "it" if not runs else f"{'it and ' if proc.pid in stuck else ''}process group(s) {runs} it started (flow runs)"
    return f"{name} (pid {proc.pid}): {who} still running {waited:.1f} s after SIGTERM: killed (SIGKILL)"


def _reap(proc: subprocess.Popen) -> None:
    """Collect the exit status of a process that has exited (a zombie until then)."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def wait_ready(api_url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0, log: Path | None = None,
               signals: StopSignals | None = None) -> float:
    """Poll ``/health`` until the server answers; return the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if signals is not None:
            signals.check()
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
        self.workers.append(_spawn([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"], env, log, cwd))
        return self.workers[-1]

    def describe(self) -> str:
        parts = [f"worker (pid {w.pid})" for w in self.workers] + ([f"server (pid {self.server.pid})"] if self.server else [])
        return ", then ".join(parts) or "nothing (no process was started yet)"

    def close(self, hurry: Callable[[], bool] | None = None, say: Callable[[str], None] | None = None) -> list[str]:
        """Stop the workers first (they report to the server), then the server; returns what happened to each."""
        done = []
        if say is not None:  # a repeated signal is announced once, not once per process still to stop
            hurried, inner = [], say

            def say(text: str) -> None:
                if text.startswith(HURRY_NOTICE):
                    if hurried:
                        return
                    hurried.append(text)
                inner(text)

        server = frozenset({self.server.pid} if self.server is not None else ())
        for i, w in enumerate(self.workers):
            done.append(stop(w, hurry=hurry, say=say, name=f"worker{'' if len(self.workers) == 1 else f' {i}'}", others=server))
            if say is not None:
                say(done[-1])
        self.workers.clear()
        if self.server is not None:
            done.append(stop(self.server, hurry=hurry, say=say, name="server"))
            if say is not None:
                say(done[-1])
        self.server = None
        return done


def start_server(home: Path | None, host: str = "127.0.0.1", port: int | None = None, logs: Path | None = None,
                 timeout: float = 120.0, stack: Stack | None = None, signals: StopSignals | None = None) -> Stack:
    """Start ``prefect server start`` (SQLite under ``home``) and wait until it answers.

    With ``stack``, the server is recorded there and whoever owns the stack stops it,
    whatever happens next; otherwise a failed start stops it here.
    """
    port = port or free_port(host)
    own = stack is None
    stack = stack or Stack(api_url="", env={}, logs=logs or (home or Path.cwd()) / "logs")
    stack.api_url = f"http://{host}:{port}/api"
    stack.env = prefect_env(stack.api_url, home)
    # The server itself must not point at an API: it *is* the API.
    server_env = {k: v for k, v in stack.env.items() if k != "PREFECT_API_URL"}
    server_env["PREFECT_SERVER_API_HOST"] = host
    server_env["PREFECT_SERVER_API_PORT"] = str(port)
    log = stack.logs / "server.log"
    stack.server = _spawn([str(BIN / "prefect"), "server", "start", "--host", host, "--port", str(port)], server_env, log)
    try:
        stack.ready_s = wait_ready(stack.api_url, stack.server, timeout, log, signals)
    except BaseException:
        if own:
            stack.close()
        raise
    return stack


def create_pool(env: dict[str, str], pool: str = POOL, signals: StopSignals | None = None) -> None:
    """A process work pool that runs one flow at a time: every run shares this working copy."""
    prefect_cmd(["work-pool", "create", pool, "--type", "process", "--overwrite"], env, signals=signals)
    prefect_cmd(["work-pool", "set-concurrency-limit", pool, "1"], env, signals=signals)


def deploy(root: Path, env: dict[str, str], names: Sequence[str] = (), signals: StopSignals | None = None) -> str:
    """``prefect deploy`` every deployment of ``root/prefect.yaml`` (or just ``names``)."""
    root = Path(root).resolve()
    if not (root / "prefect.yaml").is_file():
        raise ShrinkflowError(f"{root}/prefect.yaml not found: run from the project root (or pass --root)")
    # prefect.yaml's pull step reads {{ $PWD }}: make it this root, however we were called.
    env = {**env, "PWD": str(root)}
    args = ["deploy", *(a for n in names for a in ("--name", n))] if names else ["deploy", "--all"]
    return prefect_cmd(args, env, cwd=root, signals=signals)


def _say(text: str) -> None:
    print(text, flush=True)


def serve(root: Path, home: Path | None, host: str, port: int, poll_seconds: float | None) -> None:
    """Run the local stack until SIGINT (Ctrl-C) or SIGTERM, then stop all of it.

    Raises:
        ShrinkflowError: start-up failed or a process of the stack exited on its own;
            everything started was stopped first.
    """
    root = Path(root).resolve()
    if not (root / "prefect.yaml").is_file():
        raise ShrinkflowError(f"{root}/prefect.yaml not found: run from the project root (or pass --root)")
    if home is None and "PREFECT_HOME" in os.environ:
        home = Path(os.environ["PREFECT_HOME"])
    log_home = home or Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()  # never inside the project
    signals = StopSignals()
    with signals.installed():
        become_subreaper()
        stack = Stack(api_url="", env={}, logs=log_home / "shrinkflow-serve-logs")
        step, error = "starting the server", None
        try:
            _say(f"starting the Prefect server on http://{host}:{port} ...")
            start_server(home, host, port, logs=stack.logs, stack=stack, signals=signals)
            step = "creating the work pool"
            create_pool(stack.env, POOL, signals=signals)
            step = "deploying prefect.yaml"
            deploy(root, stack.env, signals=signals)
            step = "starting the worker"
            stack.start_worker(POOL, poll_seconds, cwd=root)
            _say(
                f"ready in {stack.ready_s:.1f} s: UI http://{host}:{port}, pool {POOL!r}, "
                f"server pid {stack.server.pid}, worker pid {stack.workers[0].pid}\n"
                f"logs: {stack.logs}\n\n"
                f"In another shell:\n  export PREFECT_API_URL={stack.api_url}\n"
                "  prefect deployment run 'compress/local' --watch\n  prefect deployment run 'retrain/nightly' --watch\n\n"
                "Ctrl-C (or SIGTERM) stops the worker and the server."
            )
            step = "serving"
            while True:
                for p in [stack.server, *stack.workers]:
                    if p is not None and p.poll() is not None:
                        raise ShrinkflowError(f"process {p.pid} ({' '.join(map(str, p.args[1:3]))}) exited with {p.returncode}; see {stack.logs}")
                for _ in range(5):
                    signals.check()
                    time.sleep(0.2)
        except Interrupted as sig:
            when = "" if step == "serving" else f" during start-up ({step})"
            _say(f"\n{sig}{when}: stopping {stack.describe()}; a second signal sends SIGKILL after {HURRY_S:.0f} s")
        except BaseException as exc:  # start-up failed or a process died: stop the rest, then report
            error = exc
            _say(f"\n{step} failed: stopping {stack.describe()}")
        finally:
            done = stack.close(hurry=lambda: signals.hurry, say=_say)
        free = f"port {port} is {'free' if port_is_free(host, port) else 'held by another process'}"
        left = [m for m in done if m.endswith("still running after SIGKILL")]
        if left:  # not seen in practice: a process in uninterruptible sleep survives even SIGKILL for a while
            _say(f"NOT stopped: {'; '.join(left)}; {free}.")
        else:
            _say(f"stopped: no process of this stack is left; {free}.")
    if error is not None:
        raise error
