"""Coalescer settings: one validated dataclass, loadable from YAML.

Every check names the offending key, so a typo in a YAML file stops start-up with a message a user
can act on instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type or out of range; the message names the key."""


DispatchPolicy = Literal["eager", "window"]
QueueFullPolicy = Literal["reject", "wait"]
StreamChoice = Literal["dedicated", "current"]
Handover = Literal["complete", "enqueued"]


@dataclass(frozen=True)
class CoalescerConfig:
    """How the coalescer batches, budgets and dispatches. ``configs/default.yaml`` documents each key."""

    max_wait_ms: float = 2.0
    max_batch_items: int = 64
    budget_bytes: int | None = 2 << 30
    budget_fraction: float | None = None
    max_queue_patches: int = 500_000
    queue_full: QueueFullPolicy = "reject"
    dispatch: DispatchPolicy = "eager"
    max_inflight_batches: int = 2
    bytes_per_patch: int | Literal["auto"] | None = None
    calibration_margin: float = 0.2
    oom_backoff: float = 0.5
    dedup: bool = True
    device: str | None = None
    stream: StreamChoice = "dedicated"
    handover: Handover = "complete"
    forward_timeout_s: float | Literal["auto"] | None = "auto"
    name: str = "default"

    def __post_init__(self) -> None:
        _check_number("max_wait_ms", self.max_wait_ms, minimum=0.0)
        _check_int("max_batch_items", self.max_batch_items, minimum=1)
        if self.budget_bytes is None and self.budget_fraction is None:
            raise ConfigError("one of 'budget_bytes' or 'budget_fraction' must be set")
        if self.budget_bytes is not None:
            _check_int("budget_bytes", self.budget_bytes, minimum=1)
        if self.budget_bytes is not None and self.budget_fraction is not None:
            raise ConfigError(f"set only one of 'budget_bytes' ({self.budget_bytes!r}) or 'budget_fraction' "
                              f"({self.budget_fraction!r}); to size the budget from the device, set budget_bytes "
                              "to null")
        if self.budget_fraction is not None:
            _check_number("budget_fraction", self.budget_fraction, minimum=0.0, exclusive_minimum=True)
            if self.budget_fraction > 1.0:
                raise ConfigError(f"'budget_fraction' must be in (0, 1], got {self.budget_fraction!r}")
        _check_int("max_queue_patches", self.max_queue_patches, minimum=1)
        _check_choice("queue_full", self.queue_full, ("reject", "wait"))
        _check_choice("dispatch", self.dispatch, ("eager", "window"))
        _check_int("max_inflight_batches", self.max_inflight_batches, minimum=1)
        if self.bytes_per_patch is not None and self.bytes_per_patch != "auto":
            _check_int("bytes_per_patch", self.bytes_per_patch, minimum=1)
        _check_number("calibration_margin", self.calibration_margin, minimum=0.0)
        _check_number("oom_backoff", self.oom_backoff, minimum=0.0, exclusive_minimum=True)
        if self.oom_backoff >= 1.0:
            raise ConfigError(f"'oom_backoff' must be in (0, 1), got {self.oom_backoff!r}")
        if not isinstance(self.dedup, bool):
            raise ConfigError(f"'dedup' must be true or false, got {self.dedup!r}")
        if self.device is not None and (not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device)):
            raise ConfigError(f"'device' must be 'cpu', 'cuda' or 'cuda:N' (null: the tower's own), "
                              f"got {self.device!r}")
        _check_choice("stream", self.stream, ("dedicated", "current"))
        _check_choice("handover", self.handover, ("complete", "enqueued"))
        if self.forward_timeout_s is not None and self.forward_timeout_s != "auto":
            if isinstance(self.forward_timeout_s, float) and math.isinf(self.forward_timeout_s):
                raise ConfigError(f"'forward_timeout_s' must be finite (0 or null disables it), "
                                  f"got {self.forward_timeout_s!r}")
            _check_number("forward_timeout_s", self.forward_timeout_s, minimum=0.0)
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"'name' must be a non-empty string, got {self.name!r}")

    def replace(self, **changes: Any) -> CoalescerConfig:
        """A copy with ``changes`` applied and validated again."""
        return dataclasses.replace(self, **changes)


_DEVICE = re.compile(r"cpu|cuda(:\d+)?")

HOST_SECTIONS = ("sglang",)
"""Top-level YAML sections that belong to a host engine's plugin (``integration/settings.py``)."""

SHIPPED_CONFIGS = Path(__file__).with_name("configs")
"""The YAML files shipped inside the package (the repository's top-level ``configs/`` links here)."""


def shipped_configs() -> dict[str, Path]:
    """Name -> file of every config shipped with the package (``qwen2_5_vl`` -> ``.../qwen2_5_vl.yaml``)."""
    return {p.stem: p for p in sorted(SHIPPED_CONFIGS.glob("*.yaml"))}


def resolve_config_path(name_or_path: str | os.PathLike[str]) -> Path:
    """The file a ``--mm-coalescer-config`` / ``MM_COALESCER_CONFIG`` / ``--config`` value means.

    An existing file wins; otherwise a bare name (no directory, no ``.yaml``) is a shipped config
    (:func:`shipped_configs`). Every caller (the SGLang plugin, ``check-config``, ``bench``, EPD)
    goes through here, so a name means the same file everywhere.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; give a YAML file or a shipped config name "
                          f"({', '.join(shipped_configs())})")
    if path.is_file():
        return path
    bare = os.sep not in text and "/" not in text and path.suffix not in (".yaml", ".yml")
    if bare and text in shipped_configs():
        return shipped_configs()[text]
    raise ConfigError(f"{text}: config file not found (shipped configs by name: {', '.join(shipped_configs())})")


def read_config_file(name_or_path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """Resolve and parse a config file: its path and its top-level mapping (host sections included)."""
    path = resolve_config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (YAML) file") from None
    except yaml.YAMLError as exc:
        problem = " ".join(str(exc).split())
        raise ConfigError(f"{path}: not valid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings, got {type(raw).__name__}")
    return path, raw


def load_config(path: str | os.PathLike[str], **overrides: Any) -> CoalescerConfig:
    """Read a YAML file (or a shipped config by name) into a validated :class:`CoalescerConfig`.

    Errors name the file and key. Host sections (``sglang:``) are left to the host's integration.
    """
    resolved, raw = read_config_file(path)
    core = {key: value for key, value in raw.items() if key not in HOST_SECTIONS}
    return config_from_dict({**core, **overrides}, source=str(resolved))


def config_from_dict(values: dict[str, Any], source: str = "config") -> CoalescerConfig:
    """Build a config from plain values (YAML, CLI); unknown keys are errors, never ignored.

    ``budget_fraction`` given without ``budget_bytes`` replaces the default byte budget.
    """
    known = {f.name for f in fields(CoalescerConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}{did_you_mean(unknown, known)}; "
                          f"known keys: {sorted(known)}")
    if values.get("budget_fraction") is not None and "budget_bytes" not in values:
        values = {**values, "budget_bytes": None}
    try:
        return CoalescerConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def did_you_mean(unknown: list[str], known: set[str] | list[str]) -> str:
    """`` (did you mean 'x'?)`` for typos close to a known key, else an empty string."""
    guesses = [match[0] for key in unknown if (match := difflib.get_close_matches(key, list(known), n=1))]
    return f" (did you mean {', '.join(repr(g) for g in guesses)}?)" if guesses else ""


def _check_int(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"'{key}' must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"'{key}' must be >= {minimum}, got {value!r}")


def _check_number(key: str, value: Any, minimum: float, exclusive_minimum: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"'{key}' must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"'{key}' must be a finite number, got {value!r}")
    if value < minimum or (exclusive_minimum and value == minimum):
        relation = ">" if exclusive_minimum else ">="
        raise ConfigError(f"'{key}' must be {relation} {minimum}, got {value!r}")


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"'{key}' must be one of {list(choices)}, got {value!r}")
