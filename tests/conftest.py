"""Shared fixtures: tiny checkpoints written once per session, a private model cache directory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Keep tests from writing into the user's cache; set before anything resolves the cache root.
os.environ.setdefault("NMOE_SERVE_CACHE", tempfile.mkdtemp(prefix="nmoe-serve-test-cache-"))
# Local Ray clusters on 127.0.0.1 rather than the host's interface (see PITFALLS); before Ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray's token authentication is on by default; clients must say so to send the token (see PITFALLS).
os.environ.setdefault("RAY_AUTH_MODE", "token")
# The tests' Ray clusters live in their own temp dir, so they neither join nor replace (in
# /tmp/ray/ray_current_cluster) a cluster the developer runs; they are stopped by the tests
# that start them, never with `ray stop`.
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="nmoe-ray-"))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def progress(request: pytest.FixtureRequest):
    """progress(line): a line on the terminal even under -q, for fixtures that take a while."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")

    def say(line: str) -> None:
        if reporter is not None:
            reporter.write_line(f"[nmoe_serve tests] {line}")

    return say


@pytest.fixture(scope="session")
def tiny_fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny checkpoint with float32 weights (exact comparisons against references)."""
    import torch

    from nmoe_serve.model.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-fp32"), seed=0, dtype=torch.float32)


@pytest.fixture(scope="session")
def dev_config_path() -> Path:
    return REPO / "configs" / "dev.toml"
