"""Config loading and validation: every error names the key (and the file)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from mm_scheduler import Coalescer, CoalescerConfig, ConfigError, config_from_dict, load_config
from mm_scheduler.config import HOST_SECTIONS
from mm_scheduler.testing import FakeTower

CONFIGS = Path(__file__).parents[2] / "configs"


def test_default_yaml_loads_and_documents_every_key():
    cfg = load_config(CONFIGS / "default.yaml")
    assert cfg == CoalescerConfig()
    text = (CONFIGS / "default.yaml").read_text()
    for field in CoalescerConfig.__dataclass_fields__:
        assert f"\n{field}:" in text or f"# {field}:" in text, f"{field} is not documented in default.yaml"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_with_the_values_its_file_sets(path):
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    assert raw, f"{path.name} sets nothing"
    core = {key: value for key, value in raw.items() if key not in HOST_SECTIONS}  # sglang: is the plugin's
    assert {key: getattr(cfg, key) for key in core} == core  # every value in the file arrives unchanged
    assert cfg.name == path.stem  # each model's metrics series stay apart


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
    """Without budget_bytes the budget is that share of the device's total memory (RAM on CPU)."""
    cfg = CoalescerConfig(budget_bytes=None, budget_fraction=0.1)
    coalescer = Coalescer(FakeTower(bytes_per_patch=1000), cfg)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert coalescer.budget_bytes == int(ram * 0.1)
    assert coalescer.stats()["budget_patches"] == int(ram * 0.1) // 1000


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
