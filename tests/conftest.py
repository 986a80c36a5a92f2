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


def _import_hub_kernels_first() -> None:
    """The repository's top-level `kernels/` (on sys.path through pytest's pythonpath) shadows
    Hugging Face's `kernels` package, which transformers >= 5.25 requires and imports: it then
    imports ours and fails (PITFALLS.md). Import the installed one first, with the repository's
    root off sys.path, so that `import kernels` finds it in sys.modules; ours is imported as
    `nmoe_serve.kernels` only."""
    import importlib
    import sys

    root = [p for p in sys.path if Path(p or ".").resolve() == REPO]
    for p in root:
        sys.path.remove(p)
    try:
        importlib.import_module("kernels")
    except ImportError:  # transformers without the Hub's kernels: nothing to shadow
        pass
    finally:
        sys.path[:0] = root
    hub = sys.modules.get("kernels")
    if hub is not None and Path(getattr(hub, "__file__", "") or "").resolve().is_relative_to(
        REPO / "kernels"
    ):
        del sys.modules["kernels"]  # ours after all: leave it to the normal import


_import_hub_kernels_first()


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
