"""ServeConfig (TOML, `${ENV}`, overrides, refusals) and resolve_settings against a real checkpoint."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pydantic
import pytest

from nmoe_serve.config import ConfigError, ServeConfig, override_keys

TINY = {"tiny": {"seed": 0}}


def build(**sections: dict[str, Any]) -> ServeConfig:
    """A config with the tiny model unless `model` is given, plus the given sections."""
    return ServeConfig.from_dict({"model": dict(TINY), **sections})


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "serve.toml"
    path.write_text(text)
    return path


# --- configs/dev.toml and defaults ---------------------------------------------------------------


def test_dev_toml_loads_with_its_values(dev_config_path: Path):
    config = ServeConfig.from_toml(dev_config_path)
    assert config.model.tiny is not None and config.model.tiny.seed == 0 and not config.model.tiny.fp8
    assert config.model.path is None
    assert config.model.dtype == "float32"
    assert config.model.max_seq_len == 2048
    assert config.parallel.ep_size == 1
    assert (config.cache.page_size, config.cache.num_pages) == (16, 1024)
    assert config.scheduler.max_num_seqs == 64
    assert config.device.kind == "cpu"
    assert config.pages_for_one_sequence() == 2048 // 16


def test_defaults_fill_absent_sections():
    config = ServeConfig.from_dict({"model": {"path": "/ckpt"}})
    assert config.parallel.ep_size == 1
    assert config.cache.page_size == 64 and config.cache.num_pages is None
    assert config.device.kind == "auto"
    assert config.pages_for_one_sequence() is None


def test_integer_is_accepted_where_a_float_is_expected():
    assert build(cache={"cpu_kv_cache_gib": 2}).cache.cpu_kv_cache_gib == 2.0


# --- refusals --------------------------------------------------------------------------------------


def test_unknown_top_level_key_lists_the_sections():
    with pytest.raises(
        ConfigError, match=r"bogus: unknown key; valid keys here: cache, device, model, parallel, scheduler"
    ):
        ServeConfig.from_dict({"model": TINY, "bogus": 1})


def test_unknown_key_in_a_section_lists_that_sections_keys():
    with pytest.raises(
        ConfigError,
        match=r"cache\.pages: unknown key; valid keys here: cpu_kv_cache_gib, enable_prefix_caching, kv_dtype, max_rank_imbalance, memory_utilization, num_pages, page_size",
    ):
        build(cache={"pages": 8})


def test_unknown_key_in_a_nested_table_lists_its_keys():
    with pytest.raises(ConfigError, match=r"model\.tiny\.sed: unknown key; valid keys here: fp8, seed"):
        ServeConfig.from_dict({"model": {"tiny": {"sed": 1}}})


WRONG_TYPES = [
    (
        {"cache": {"page_size": "16"}},
        r"cache\.page_size = '16': Input should be a valid integer \(cache\.page_size: tokens per KV page\)",
    ),
    ({"parallel": {"ep_size": 1.5}}, r"parallel\.ep_size = 1\.5: Input should be a valid integer"),
    ({"parallel": {"ep_size": True}}, r"parallel\.ep_size = True: Input should be a valid integer"),
    ({"cache": {"num_pages": False}}, r"cache\.num_pages = False: Input should be a valid integer"),
    ({"device": {"seed": "0"}}, r"device\.seed = '0': Input should be a valid integer"),
    (
        {"cache": {"memory_utilization": "0.5"}},
        r"cache\.memory_utilization = '0\.5': Input should be a valid number",
    ),
    ({"cache": 5}, r"cache = 5: Input should be a valid dictionary"),
]


@pytest.mark.parametrize(("sections", "message"), WRONG_TYPES)
def test_wrong_type_names_the_key_the_value_and_what_it_should_be(sections, message):
    with pytest.raises(ConfigError, match=message):
        build(**sections)


OUT_OF_RANGE = [
    ({"parallel": {"ep_size": 0}}, r"parallel\.ep_size = 0: Input should be greater than or equal to 1"),
    ({"parallel": {"ep_size": 65}}, r"parallel\.ep_size = 65: Input should be less than or equal to 64"),
    ({"cache": {"page_size": 2048}}, r"cache\.page_size = 2048: Input should be less than or equal to 1024"),
    ({"cache": {"num_pages": 0}}, r"cache\.num_pages = 0: Input should be greater than or equal to 1"),
    (
        {"cache": {"memory_utilization": 0.0}},
        r"cache\.memory_utilization = 0\.0: Input should be greater than 0",
    ),
    (
        {"cache": {"memory_utilization": 0.99}},
        r"cache\.memory_utilization = 0\.99: Input should be less than or equal to 0\.98",
    ),
    (
        {"scheduler": {"admission_watermark": 1.0}},
        r"scheduler\.admission_watermark = 1\.0: Input should be less than 1",
    ),
    (
        {"scheduler": {"max_num_seqs": 0}},
        r"scheduler\.max_num_seqs = 0: Input should be greater than or equal to 1",
    ),
    ({"device": {"seed": -1}}, r"device\.seed = -1: Input should be greater than or equal to 0"),
    ({"device": {"kind": "tpu"}}, r"device\.kind = 'tpu': Input should be 'auto', 'cpu' or 'cuda'"),
    (
        {"model": {"tiny": {"seed": -2}}},
        r"model\.tiny\.seed = -2: Input should be greater than or equal to 0",
    ),
    (
        {"model": {"tiny": {}, "max_seq_len": 1}},
        r"model\.max_seq_len = 1: Input should be greater than or equal to 2",
    ),
    (
        {"model": {"tiny": {}, "dtype": "fp8"}},
        r"model\.dtype = 'fp8': Input should be 'auto', 'bfloat16', 'float16' or 'float32'",
    ),
]


@pytest.mark.parametrize(("sections", "message"), OUT_OF_RANGE)
def test_out_of_range_value_names_the_key_the_value_and_the_range(sections, message):
    with pytest.raises(ConfigError, match=message):
        build(**sections)


@pytest.mark.parametrize("page_size", [3, 24, 100])
def test_page_size_must_be_a_power_of_two(page_size: int):
    with pytest.raises(
        ConfigError, match=rf"cache\.page_size={page_size} must be a power of two \(e\.g\. 16, 64\)"
    ):
        build(cache={"page_size": page_size})


@pytest.mark.parametrize("page_size", [1, 2, 16, 1024])
def test_powers_of_two_are_accepted_as_page_size(page_size: int):
    assert build(cache={"page_size": page_size}).cache.page_size == page_size


@pytest.mark.parametrize("model", [{"path": "/ckpt", "tiny": {"seed": 0}}, {}, {"dtype": "float32"}])
def test_model_needs_exactly_one_of_path_and_tiny(model: dict[str, Any]):
    with pytest.raises(
        ConfigError, match=r"set exactly one of model\.path .* or model\.tiny .*tiny = \{ seed = 0 \}"
    ):
        ServeConfig.from_dict({"model": model})


def test_missing_model_section_says_what_to_set():
    with pytest.raises(ConfigError, match=r"model\.path|model\.tiny"):
        ServeConfig.from_dict({"cache": {"page_size": 16}})


def test_num_pages_too_few_for_max_seq_len_names_both_keys_and_the_minimum():
    # 100 tokens at 16 per page need ceil(100 / 16) = 7 pages.
    with pytest.raises(
        ConfigError,
        match=r"cache\.num_pages=6 is too few for one sequence of model\.max_seq_len=100 tokens "
        r"\(7 pages of 16\): raise cache\.num_pages to at least 7 or lower model\.max_seq_len",
    ):
        ServeConfig.from_dict(
            {"model": {**TINY, "max_seq_len": 100}, "cache": {"num_pages": 6, "page_size": 16}}
        )
    exact = ServeConfig.from_dict(
        {"model": {**TINY, "max_seq_len": 100}, "cache": {"num_pages": 7, "page_size": 16}}
    )
    assert exact.pages_for_one_sequence() == 7


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        build(cache={"page_size": "16", "pages": 1}, parallel={"ep_size": 0})
    message = str(info.value)
    assert "cache.page_size = '16'" in message
    assert "cache.pages: unknown key" in message
    assert "parallel.ep_size = 0" in message


# --- TOML files and ${ENV} -------------------------------------------------------------------------


def test_env_variable_is_substituted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NMOE_TEST_CKPT", "/models/dsv3")
    monkeypatch.setenv("NMOE_TEST_TAG", "r1")
    path = write(tmp_path, '[model]\npath = "${NMOE_TEST_CKPT}"\nname = "dsv3-${NMOE_TEST_TAG}-chat"\n')
    config = ServeConfig.from_toml(path)
    assert config.model.path == "/models/dsv3"
    assert config.model.name == "dsv3-r1-chat"


def test_env_default_is_used_when_the_variable_is_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("NMOE_TEST_UNSET", raising=False)
    path = write(tmp_path, '[model]\npath = "${NMOE_TEST_UNSET:-/models/default}"\n')
    assert ServeConfig.from_toml(path).model.path == "/models/default"


def test_env_value_wins_over_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NMOE_TEST_SET", "/models/set")
    path = write(tmp_path, '[model]\npath = "${NMOE_TEST_SET:-/models/default}"\n')
    assert ServeConfig.from_toml(path).model.path == "/models/set"


def test_env_default_is_used_when_the_variable_is_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NMOE_TEST_EMPTY", "")
    path = write(tmp_path, '[model]\npath = "${NMOE_TEST_EMPTY:-/models/default}"\n')
    assert ServeConfig.from_toml(path).model.path == "/models/default"


def test_missing_env_variable_names_the_variable_the_key_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("NMOE_TEST_MISSING", raising=False)
    path = write(tmp_path, '[model]\npath = "${NMOE_TEST_MISSING}"\n')
    with pytest.raises(
        ConfigError,
        match=re.escape(
            f"{path}: model.path = '${{NMOE_TEST_MISSING}}' needs the environment variable "
            "NMOE_TEST_MISSING, which is not set: export NMOE_TEST_MISSING=... or write a default as "
            "${NMOE_TEST_MISSING:-value}"
        ),
    ):
        ServeConfig.from_toml(path)


def test_substituted_value_is_still_type_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NMOE_TEST_KIND", "tpu")
    path = write(tmp_path, '[model]\ntiny = { seed = 0 }\n[device]\nkind = "${NMOE_TEST_KIND}"\n')
    with pytest.raises(ConfigError, match=r"device\.kind = 'tpu': Input should be 'auto', 'cpu' or 'cuda'"):
        ServeConfig.from_toml(path)


def test_invalid_toml_names_the_file_and_the_position(tmp_path: Path):
    path = write(tmp_path, "[model\ntiny = { seed = 0 }\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))} is not valid TOML: .*line 1"):
        ServeConfig.from_toml(path)


def test_missing_file_says_to_pass_a_toml_file(tmp_path: Path):
    path = tmp_path / "absent.toml"
    with pytest.raises(
        ConfigError, match=rf"config file {re.escape(str(path))} does not exist: pass the path of a TOML file"
    ):
        ServeConfig.from_toml(path)


def test_errors_from_a_file_name_the_file(tmp_path: Path):
    path = write(tmp_path, "[model]\ntiny = { seed = 0 }\n[cache]\npage_size = 24\n")
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(path))}: invalid configuration:\n  cache: cache\.page_size=24"
    ):
        ServeConfig.from_toml(path)


# --- overrides -------------------------------------------------------------------------------------


def test_overrides_replace_values_and_create_missing_sections(dev_config_path: Path):
    config = ServeConfig.from_toml(
        dev_config_path, overrides={"num_pages": 2048, "device": "auto", "ep_size": 2, "max_num_seqs": 8}
    )
    assert config.cache.num_pages == 2048
    assert config.device.kind == "auto"
    assert config.parallel.ep_size == 2
    assert config.scheduler.max_num_seqs == 8
    assert config.cache.page_size == 16  # untouched
    bare = ServeConfig.from_dict({"model": dict(TINY)}, overrides={"page_size": 32})
    assert bare.cache.page_size == 32


def test_override_can_switch_the_model_source(dev_config_path: Path):
    config = ServeConfig.from_toml(dev_config_path, overrides={"path": "/models/x", "tiny": None})
    assert config.model.path == "/models/x" and config.model.tiny is None


def test_unknown_override_lists_the_valid_options():
    with pytest.raises(
        ConfigError, match=r"unknown engine option 'bogus'; valid options: .*num_pages.*page_size"
    ):
        ServeConfig.from_dict({"model": dict(TINY)}, overrides={"bogus": 1})


def test_overridden_values_are_validated_like_file_values():
    with pytest.raises(ConfigError, match=r"cache\.page_size=24 must be a power of two"):
        ServeConfig.from_dict({"model": dict(TINY)}, overrides={"page_size": 24})


def test_override_into_a_section_that_is_not_a_table_is_refused():
    with pytest.raises(ConfigError, match=r"\[cache\] must be a table"):
        ServeConfig.from_dict({"model": dict(TINY), "cache": 5}, overrides={"num_pages": 8})


def test_override_keys_reach_every_field_of_every_section():
    keys = override_keys()
    assert keys["num_pages"] == ("cache", "num_pages")
    assert keys["ep_size"] == ("parallel", "ep_size")
    assert keys["device"] == ("device", "kind")
    targets = set(keys.values())
    for section, info in ServeConfig.model_fields.items():
        for field in info.annotation.model_fields:
            assert (section, field) in targets, f"{section}.{field} has no override keyword"


# --- frozen ----------------------------------------------------------------------------------------


def test_config_is_frozen(dev_config_path: Path):
    config = ServeConfig.from_toml(dev_config_path)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.cache.page_size = 32  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.parallel = config.parallel  # type: ignore[misc]
    assert config.cache.page_size == 16


@pytest.mark.parametrize("name", ["dev", "production", "benchmark_lmsys"])
def test_shipped_configs_are_valid(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NMOE_MODEL_PATH", "/models/deepseek-v3")
    config = ServeConfig.from_toml(Path(__file__).parents[2] / "configs" / f"{name}.toml")
    if name == "production":  # MTP on, so its steps run one at a time
        assert config.speculative.method == "mtp" and not config.scheduler.overlap
    else:
        assert config.speculative.method == "none"


def test_speculative_options_reach_the_llm_keywords() -> None:
    keys = override_keys()
    assert keys["speculative_method"] == ("speculative", "method")
    assert keys["num_draft_tokens"] == ("speculative", "num_draft_tokens")
    assert "method" not in keys
