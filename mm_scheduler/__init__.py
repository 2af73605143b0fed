"""mm-scheduler: coalesce vision-encoder work of concurrent requests into budgeted, batched forwards."""

from .coalescer import Coalescer
from .config import CoalescerConfig, ConfigError, config_from_dict, load_config
from .errors import CoalescerClosedError, CoalescerError, EncodeError, InvalidItemError, QueueFullError
from .types import EncodeItem, Tower

__all__ = [
    "Coalescer",
    "CoalescerClosedError",
    "CoalescerConfig",
    "CoalescerError",
    "ConfigError",
    "EncodeError",
    "EncodeItem",
    "InvalidItemError",
    "QueueFullError",
    "Tower",
    "config_from_dict",
    "load_config",
]
