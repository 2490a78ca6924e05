"""Real processes for tests and benchmarks: the simulator and Sluice, on free ports.

Each process logs to files in its own directory (a pipe nobody reads would fill and
block it) and is killed with its whole process group when the test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
#: The key the test simulator demands; Sluice gets it as its upstream AWS credentials.
UPSTREAM_KEY_ID = "AKIDSLUICEUPSTREAM"
UPSTREAM_SECRET = "upstream-secret-for-tests"


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(method: str, url: str, body: Any = None, timeout: float = 10) -> Any:
    """A small blocking JSON request (admin endpoints, health checks)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


@dataclass(frozen=True)
class TLSFiles:
    """A throwaway CA and a certificate for 127.0.0.1/localhost signed by it (PEM files)."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def create(cls, directory: Path) -> TLSFiles:
        import trustme

        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        files = cls(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
        ca.cert_pem.write_to_path(str(files.ca))
        leaf.private_key_pem.write_to_path(str(files.key))
        # The chain, leaf first: what a real deployment's fullchain.pem holds.
        with files.cert.open("wb") as out:
            for blob in leaf.cert_chain_pems:
                out.write(blob.bytes())
        return files

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


class Proc:
    """A child process in its own process group, logging to files."""

    def __init__(self, name: str, cmd: list[str], workdir: Path, env: dict[str, str]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.stdout_path = workdir / f"{name}.out"
        self.stderr_path = workdir / f"{name}.err"
        self._out = self.stdout_path.open("wb")
        self._err = self.stderr_path.open("wb")
        self.popen = subprocess.Popen(
            cmd, stdout=self._out, stderr=self._err, env=env, cwd=ROOT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_http(
        self, url: str, timeout: float = 30.0, context: ssl.SSLContext | None = None
    ) -> None:
        """Block until ``url`` answers 200, or fail with the process's stderr."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.popen.returncode}:\n{self.stderr()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1, context=context) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready at {url} after {timeout}s:\n{self.stderr()}")

    def stderr(self) -> str:
        self._err.flush()
        return self.stderr_path.read_text(errors="replace")[-5000:]

    def stdout_lines(self) -> list[str]:
        self._out.flush()
        return self.stdout_path.read_text(errors="replace").splitlines()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (workers included)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        self.kill(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            self.popen.wait(5)
        self._out.close()
        self._err.close()
        return self.popen.returncode


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    # (nor the developer's allocator settings: proxy/allocator.py decides, tests say)
    skip = ("AWS_", "SLUICE_", "LD_PRELOAD", "PYTHONMALLOC", "MALLOC_CONF")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Simulator(Proc):
    """The Bedrock simulator as a real process, with its admin endpoints."""

    def __init__(self, workdir: Path, config: dict[str, Any] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = {
            "latency_scale": 0.02,
            "auth": {"access_key_id": UPSTREAM_KEY_ID, "secret_access_key": UPSTREAM_SECRET},
        }
        cfg.update(config or {})
        path = workdir / f"simulator-{self.port}.yaml"
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg))
        cmd = [
            sys.executable,
            "-m",
            "proxy",
            "simulate",
            "--port",
            str(self.port),
            "--config",
            str(path),
        ]
        super().__init__(f"simulator-{self.port}", cmd, workdir, _env(None))
        self.wait_http(self.url + "/_sim/healthz")

    def stats(self) -> dict[str, Any]:
        return http_json("GET", self.url + "/_sim/stats")  # type: ignore[no-any-return]

    def reset(self) -> None:
        http_json("POST", self.url + "/_sim/reset", {})

    def configure(self, patch: dict[str, Any]) -> None:
        http_json("POST", self.url + "/_sim/config", patch)


class Sluice(Proc):
    """A Sluice process serving on a free port."""

    def __init__(
        self,
        workdir: Path,
        *,
        upstream: str,
        policy: dict[str, Any] | str | None = None,
        redis_url: str | None = None,
        env: dict[str, str] | None = None,
        workers: int = 1,
        port: int | None = None,
        extra_args: list[str] | None = None,
        tls: TLSFiles | None = None,
    ) -> None:
        self.port = port or free_port()
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--port",
            str(self.port),
            "--upstream",
            upstream,
            "--workers",
            str(workers),
        ]
        if isinstance(policy, dict):
            path = workdir / f"policy-{self.port}.yaml"
            workdir.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(policy))
            cmd += ["--config", str(path)]
        elif isinstance(policy, str):
            cmd += ["--config", policy]
        if redis_url:
            cmd += ["--redis-url", redis_url]
        if tls:
            cmd += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
        cmd += extra_args or []
        if redis_url and not {"--fleet", "--no-fleet"} & set(cmd):
            # Tests share Redis servers across policies: each process follows a fleet of its
            # own unless the test joins several into one (--fleet NAME).
            cmd += ["--fleet", f"test-{uuid.uuid4().hex}"]  # never reused: a port can be
        base_env = {
            "AWS_ACCESS_KEY_ID": UPSTREAM_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": UPSTREAM_SECRET,
            "AWS_REGION": "us-east-1",
        }
        base_env.update(env or {})
        super().__init__(f"sluice-{self.port}", cmd, workdir, _env(base_env))
        self.wait_http(self.url + "/healthz", context=tls.client_context() if tls else None)

    def access_log(self) -> list[dict[str, Any]]:
        """The JSON access-log records written so far."""
        out = []
        for line in self.stdout_lines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def log_record(self, request_id: str, timeout: float = 3.0) -> dict[str, Any]:
        """The access-log record of one request (the log is flushed every 200 ms)."""
        deadline = time.monotonic() + timeout
        while True:
            for record in self.access_log():
                if record.get("request_id") == request_id:
                    return record
            if time.monotonic() > deadline:
                raise AssertionError(f"no access-log record for request {request_id}")
            time.sleep(0.05)

    def metrics(self) -> str:
        context = self.tls.client_context() if self.tls else None
        with urllib.request.urlopen(self.url + "/metrics", timeout=5, context=context) as resp:
            return resp.read().decode()


def bedrock_client(
    url: str,
    *,
    key_id: str = "AKIDCLIENTDEMO",
    secret: str = "client-secret",
    retries: dict[str, Any] | None = None,
    read_timeout: float = 30,
    max_pool: int = 50,
    **kwargs: Any,
) -> Any:
    """A real boto3 bedrock-runtime client pointed at ``url``."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "bedrock-runtime",
        region_name="us-east-1",
        endpoint_url=url,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        config=Config(
            retries=retries or {"total_max_attempts": 1, "mode": "standard"},
            read_timeout=read_timeout,
            max_pool_connections=max_pool,
        ),
        **kwargs,
    )


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus sample's values whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def workload_client(url: str, workload: str) -> Any:
    """:func:`bedrock_client` whose every call names ``workload`` (x-sluice-workload)."""
    client = bedrock_client(url)
    client.meta.events.register(
        "before-sign.bedrock-runtime.*",
        lambda request, **_: request.headers.__setitem__("x-sluice-workload", workload),
    )
    return client
