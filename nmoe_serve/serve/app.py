"""build_app: the Ray Serve application (Ingress → Coordinator replicas → worker placement groups).

Serve config files point at it (`import_path: nmoe_serve.serve.app:build_app`) with args
`config` (a TOML path, resolved against the working directory, then the repository) and optional
`overrides` (engine options by name, as `LLM(...)` takes them). The config is read and resolved
into EngineSettings here, once, where `serve run` builds the application, and shipped to the
replicas as a frozen object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve import Application

from nmoe_serve.config import ConfigError, ServeConfig
from nmoe_serve.serve.coordinator_deployment import CoordinatorDeployment
from nmoe_serve.serve.ingress import Ingress
from nmoe_serve.settings import resolve_settings

REPO = Path(__file__).resolve().parents[2]


class AppArgs(BaseModel):
    """The `args` of the application in a Serve config file."""

    model_config = ConfigDict(extra="forbid")
    config: str
    overrides: dict[str, Any] = {}


def load_config(args: AppArgs) -> ServeConfig:
    path = Path(args.config).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, REPO / path]
    for candidate in candidates:
        if candidate.is_file():
            return ServeConfig.from_toml(candidate, overrides=args.overrides)
    raise ConfigError(
        f"application arg config={args.config!r}: no such file (looked in {', '.join(str(c) for c in candidates)}); "
        "give a path to a TOML file such as configs/dev.toml"
    )


def cuda_in_cluster() -> bool:
    """Whether the Ray cluster the application goes to has GPUs (where device.kind = "auto" takes
    CUDA). The builder runs where `serve run` builds the app, which need not be a GPU node."""
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application for `args` = {"config": "configs/dev.toml", "overrides": {...}}.

    The settings are resolved here, once, and shipped to every replica."""
    config = load_config(AppArgs.model_validate(args))
    settings = resolve_settings(config, cuda_available=cuda_in_cluster())
    coordinator_options = CoordinatorDeployment.deployment_options(settings, config.server)
    coordinator = serve.deployment(**coordinator_options)(CoordinatorDeployment).bind(settings, config.server)
    ingress = serve.deployment(**Ingress.deployment_options(settings, config.server))(Ingress)
    return ingress.bind(coordinator, settings, config.server)
