"""Config loading and validation: every error names the key (and the file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mm_scheduler import CoalescerConfig, ConfigError, config_from_dict, load_config

CONFIGS = Path(__file__).parents[2] / "configs"


def test_default_yaml_loads_and_documents_every_key():
    cfg = load_config(CONFIGS / "default.yaml")
    assert cfg == CoalescerConfig()
    text = (CONFIGS / "default.yaml").read_text()
    for field in CoalescerConfig.__dataclass_fields__:
        assert f"\n{field}:" in text or f"# {field}:" in text, f"{field} is not documented in default.yaml"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    assert isinstance(load_config(path), CoalescerConfig)


def test_unknown_key_is_an_error_naming_key_and_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("max_wait_ms: 1\nmax_batch_itemz: 4\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml.*unknown key\(s\) \['max_batch_itemz'\]"):
        load_config(path)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"budget_bytes": -1}, "budget_bytes"),
        ({"budget_bytes": "lots"}, "budget_bytes"),
        ({"max_wait_ms": -0.5}, "max_wait_ms"),
        ({"max_batch_items": 0}, "max_batch_items"),
        ({"max_batch_items": True}, "max_batch_items"),
        ({"budget_fraction": 1.5}, "budget_fraction"),
        ({"budget_fraction": 0}, "budget_fraction"),
        ({"budget_bytes": None}, "budget_bytes"),
        ({"max_queue_patches": 0}, "max_queue_patches"),
        ({"dispatch": "fifo"}, "dispatch"),
        ({"queue_full": "drop"}, "queue_full"),
        ({"bytes_per_patch": "fast"}, "bytes_per_patch"),
        ({"bytes_per_patch": 0}, "bytes_per_patch"),
        ({"oom_backoff": 1.0}, "oom_backoff"),
        ({"stream": "other"}, "stream"),
        ({"dedup": "yes"}, "dedup"),
        ({"max_inflight_batches": 0}, "max_inflight_batches"),
        ({"name": ""}, "name"),
    ],
)
def test_invalid_value_is_an_error_naming_the_key(values, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        config_from_dict(values, source="test.yaml")


def test_budget_fraction_alone_is_enough():
    cfg = CoalescerConfig(budget_bytes=None, budget_fraction=0.1)
    assert cfg.budget_fraction == 0.1


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("max_wait_ms: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(path)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path)


def test_overrides_apply_on_top_of_the_file():
    cfg = load_config(CONFIGS / "default.yaml", max_wait_ms=7.5)
    assert cfg.max_wait_ms == 7.5


def test_replace_revalidates():
    with pytest.raises(ConfigError, match="'max_wait_ms'"):
        CoalescerConfig().replace(max_wait_ms=-1)
