"""ray_cluster.yaml passes Ray's own cluster-config validation and describes 8-GPU nodes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def test_cluster_config_is_valid_for_ray() -> None:
    util = pytest.importorskip("ray.autoscaler._private.util")
    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    util.validate_config(util.prepare_config(config))  # defaults filled as `ray up` does; raises if invalid
    gpu = config["available_node_types"]["gpu_node"]
    assert gpu["resources"]["GPU"] == 8
    assert config["head_node_type"] == "head"


def test_validation_catches_a_broken_config() -> None:
    util = pytest.importorskip("ray.autoscaler._private.util")
    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    config["head_node_type"] = "missing"
    with pytest.raises(ValueError, match="head_node_type"):
        util.validate_config(util.prepare_config(config))
