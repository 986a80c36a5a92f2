"""build_app: the Ray Serve application (Ingress → Coordinator replicas → worker placement groups).

Serve config files point at it (`import_path: nmoe_serve.serve.app:build_app`) with args
`config` (a TOML path, resolved against the working directory, then the repository) and optional
`overrides` (engine options by name, as `LLM(...)` takes them). The config is read here, once,
where `serve run` runs, and shipped to the replicas as a frozen object.
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


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application for `args` = {"config": "configs/dev.toml", "overrides": {...}}."""
    config = load_config(AppArgs.model_validate(args))
    gpu = config.device.kind == "cuda"
    coordinator = serve.deployment(
        name="Coordinator",
        num_replicas=config.server.ep_groups,
        # with ep_size > 1 the workers take the GPUs in their own placement group; with ep_size 1
        # the rank runs inside the replica, which then needs the GPU itself
        ray_actor_options={
            "num_cpus": 0 if gpu else 0.5,
            "num_gpus": 1 if gpu and config.parallel.ep_size == 1 else 0,
        },
        max_ongoing_requests=100_000,
        health_check_period_s=10,
        health_check_timeout_s=60,
        graceful_shutdown_timeout_s=20,
    )(CoordinatorDeployment).bind(config)
    ingress = serve.deployment(
        name="Ingress",
        num_replicas=config.server.ingress_replicas,
        ray_actor_options={"num_cpus": 0.5},
        max_ongoing_requests=10_000,
    )(Ingress).bind(coordinator, config)
    return ingress
