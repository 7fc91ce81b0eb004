"""Real servers on loopback for the production tests, one of each per test session.

- ``prefect_stack``: ``prefect server start`` on 127.0.0.1 on a free port with its own
  PREFECT_HOME (SQLite), the ``shrinkflow`` process work pool, and a process worker
  (started with setsid, 1 s poll). Test-process flows talk to it too.
- ``s3_endpoint``: ``moto_server`` on 127.0.0.1 with one bucket, for DVC's S3 remote.

Each is stopped by its PID (process group) when the session ends. The helpers at the
end start ``make serve`` / ``shrinkflow serve`` as a terminal would and find what is
left of a stack afterwards.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import BIN, project_env

from flows.ops import serve

S3_BUCKET = "shrinkflow-test"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def prefect_stack(tmp_path_factory) -> Iterator[serve.Stack]:
    """A Prefect server + work pool + worker; the test process's Prefect client points at it."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    stack = serve.start_server(home, logs=home / "logs")
    try:
        serve.create_pool(stack.env)
        stack.start_worker(poll_seconds=1)
        with temporary_settings({PREFECT_API_URL: stack.api_url, PREFECT_HOME: home}):
            yield stack
    finally:
        stack.close()


@dataclass(frozen=True)
class S3:
    url: str
    bucket: str
    env: dict[str, str]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> Iterator[S3]:
    """``moto_server`` on a free loopback port with bucket ``S3_BUCKET``."""
    import boto3

    port = serve.free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    env = {**project_env(), **S3_ENV}
    proc = serve._spawn([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=S3_BUCKET)
        yield S3(url=url, bucket=S3_BUCKET, env=S3_ENV)
    finally:
        serve.stop(proc)


def prefect(stack: serve.Stack, *args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the ``prefect`` CLI against the test server."""
    return subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=cwd, env=stack.env, capture_output=True,
                          text=True, timeout=timeout)


# ------------------------------------------------------------------ serve under signals


def stack_processes(home: Path) -> list[str]:
    """Processes (pid and command line) whose environment has ``PREFECT_HOME=home``: a stack's server,
    worker and flow runs all inherit it."""
    needle = f"PREFECT_HOME={home}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{proc.name} {cmdline}")
        except OSError:  # gone, a zombie, or not ours
            continue
    return found


def start_in_terminal(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``cmd`` as a terminal would start a job: a process group of its own (pgid = its pid),
    so ``os.killpg`` reaches it and its children the way Ctrl-C and ``kill -- -PGID`` do."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_output(proc: subprocess.Popen, log: Path, text: str, timeout: float = 240) -> str:
    """Wait until ``text`` appears in ``log``; fail with the log if the process ends first."""
    deadline = time.monotonic() + timeout
    while text not in (out := log.read_text(errors="replace")):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not printed (exit {proc.poll()}):\n{out[-4000:]}")
        time.sleep(0.2)
    return out
