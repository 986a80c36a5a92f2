"""A local Ray cluster running `serve run deployments/dev.yaml` (8 CPU workers), shared by the
tests in this folder. The cluster has a fixed metrics port (the tests scrape it) and a dashboard
(for `ray job submit`); the application gets an API key and a small waiting-queue limit through a
copy of dev.yaml with two more overrides, so 401 and 429 can be tested."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-1234"
MAX_WAITING = 48
DEFAULT_MAX_TOKENS = 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class DevServer:
    url: str
    gcs_address: str
    dashboard_url: str
    metrics_url: str
    env: dict[str, str]
    api_key: str
    startup_health: list[tuple[str, object]]  # what /health answered while the server started

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=120, **kw
        )


def _wait_for_port(port: int, timeout_s: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def _stop(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """Stop a process group this fixture started (never `ray stop`, which stops every cluster)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextlib.contextmanager
def run_dev_server(work: Path, progress, overrides: dict[str, object]) -> Iterator[DevServer]:
    """A local Ray cluster running deployments/dev.yaml with `overrides` on top of the tests' own,
    stopped (its own processes only) on exit."""
    gcs, dashboard, metrics, http = _free_port(), _free_port(), _free_port(), _free_port()
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("RAY_ADDRESS", None)
    progress("starting a Ray cluster and `serve run deployments/dev.yaml` for tests/serve (about a minute)")
    head_log = (work / "ray-head.log").open("w")
    head = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            "--block",  # in the foreground: stopping this process group stops the whole cluster
            f"--port={gcs}",
            f"--temp-dir={work / 'ray'}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--metrics-export-port={metrics}",
            "--num-cpus=4",
            "--disable-usage-stats",
        ],
        env=env,
        cwd=REPO,
        stdout=head_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    _wait_for_port(gcs, 120, head)
    _wait_for_port(dashboard, 120, head)
    config = yaml.safe_load((REPO / "deployments" / "dev.yaml").read_text())
    config["applications"][0]["args"]["overrides"].update(
        {
            "api_key": API_KEY,
            "max_waiting_requests": MAX_WAITING,
            "default_max_tokens": DEFAULT_MAX_TOKENS,
            **overrides,
        }
    )
    config["http_options"]["port"] = http  # not 8000: a developer's own dev server may be running
    spec = work / "dev-test.yaml"
    spec.write_text(yaml.safe_dump(config))
    log = (work / "serve.log").open("w")
    serve = subprocess.Popen(
        ["serve", "run", str(spec), f"--address=127.0.0.1:{gcs}"],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = DevServer(
        f"http://127.0.0.1:{http}",
        f"127.0.0.1:{gcs}",
        f"http://127.0.0.1:{dashboard}",
        f"http://127.0.0.1:{metrics}/metrics",
        env,
        API_KEY,
        [],
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                answer = httpx.get(f"{server.url}/health", timeout=5)
                try:
                    body = answer.json()
                except ValueError:  # Serve's proxy, before the application has an ingress replica
                    body = answer.text[:200]
                server.startup_health.append(
                    (str(answer.status_code), (answer.headers.get("retry-after"), body))
                )
                if answer.status_code == 200:
                    break
            except httpx.ConnectError:  # nothing listens yet (Serve's proxy starting)
                pass
            except httpx.HTTPError as e:  # a listener that does not answer: recorded, a test fails on it
                server.startup_health.append(("no answer", type(e).__name__))
            if serve.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("serve run did not come up:\n" + (work / "serve.log").read_text()[-4000:])
            time.sleep(1)
        progress(f"dev server up at {server.url} ({overrides or 'deployments/dev.yaml'})")
        yield server
    finally:
        _stop(serve)
        _stop(head, timeout_s=60)
        log.close()
        head_log.close()


@pytest.fixture(scope="session")
def dev_server(tmp_path_factory: pytest.TempPathFactory, progress):
    with run_dev_server(tmp_path_factory.mktemp("serve"), progress, {}) as server:
        yield server


@pytest.fixture(scope="session")
def engine_handle(dev_server: DevServer):
    """A Serve handle to the Coordinator deployment, from this process (for reading engine state)."""
    import ray
    from ray import serve

    os.environ.update({k: dev_server.env[k] for k in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")})
    ray.shutdown()  # a local cluster of an earlier test module (EP engines) would be in the way
    ray.init(address=dev_server.gcs_address, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield serve.get_deployment_handle("Coordinator", app_name="nmoe")
    ray.shutdown()
