"""Config loading and validation: every error names the key (and the file)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from mm_scheduler import Coalescer, CoalescerConfig, ConfigError, config_from_dict, load_config
from mm_scheduler.config import HOST_SECTIONS, SHIPPED_CONFIGS, resolve_config_path, shipped_configs
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
        ({"handover": "early"}, "handover"),
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


# --- shipped configs by name, one copy, and the checks check-config and the server share ----------------
def test_top_level_configs_is_a_link_to_the_one_copy_inside_the_package():
    repo = CONFIGS.parent
    assert CONFIGS.is_symlink() and CONFIGS.resolve() == (repo / "mm_scheduler" / "configs").resolve()
    assert set(shipped_configs()) == {p.stem for p in CONFIGS.glob("*.yaml")}


@pytest.mark.parametrize("name", ["default", "qwen2_5_vl", "qwen3_vl", "gemma3", "gemma4"])
def test_a_shipped_config_resolves_by_name_to_the_packaged_file(name):
    assert resolve_config_path(name) == SHIPPED_CONFIGS / f"{name}.yaml"
    assert load_config(name) == load_config(CONFIGS / f"{name}.yaml")


def test_an_existing_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gemma3").write_text("max_batch_items: 3\n")
    assert load_config("gemma3").max_batch_items == 3


def test_an_unknown_name_lists_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"qwen25: config file not found \(shipped configs by name: default, "):
        load_config("qwen25")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("qwen2_5_vl.yaml")  # with a suffix it is a path, never a name


def test_a_directory_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="is a directory") as info:
        load_config(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("body, key", [
    ("max_wait_ms: .nan\n", "max_wait_ms"),
    ("max_wait_ms: .inf\n", "max_wait_ms"),
    ("calibration_margin: .nan\n", "calibration_margin"),
    ("oom_backoff: .nan\n", "oom_backoff"),
    ("budget_fraction: .nan\nbudget_bytes: null\n", "budget_fraction"),
    ("forward_timeout_s: .nan\n", "forward_timeout_s"),
    ("forward_timeout_s: .inf\n", "forward_timeout_s"),
    ("max_queue_patches: .inf\n", "max_queue_patches"),
    ("budget_bytes: .inf\n", "budget_bytes"),
])
def test_nan_and_inf_are_refused_for_every_numeric_key(tmp_path, body, key):
    path = tmp_path / "c.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=f"'{key}' must be"):
        load_config(path)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu", "cuda:0:1", 3])
def test_an_unknown_device_is_refused(device):
    with pytest.raises(ConfigError, match="'device' must be 'cpu', 'cuda' or 'cuda:N'"):
        config_from_dict({"device": device})


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", None])
def test_cpu_and_cuda_devices_are_accepted(device):
    assert config_from_dict({"device": device}).device == device


def test_budget_bytes_and_budget_fraction_together_are_refused(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text("budget_bytes: 1048576\nbudget_fraction: 0.1\n")
    with pytest.raises(ConfigError, match=r"set only one of 'budget_bytes'.*or 'budget_fraction'"):
        load_config(path)


def test_budget_fraction_alone_in_a_file_replaces_the_default_bytes(tmp_path):
    path = tmp_path / "fraction.yaml"
    path.write_text("budget_fraction: 0.1\n")
    cfg = load_config(path)
    assert (cfg.budget_bytes, cfg.budget_fraction) == (None, 0.1)


def test_a_typo_gets_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"\['max_wait_msx'\] \(did you mean 'max_wait_ms'\?\)"):
        config_from_dict({"max_wait_msx": 1})
