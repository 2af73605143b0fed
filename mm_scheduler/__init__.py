"""mm-scheduler: coalesce vision-encoder work of concurrent requests into budgeted, batched forwards."""

from .coalescer import Coalescer
from .config import CoalescerConfig, ConfigError, config_from_dict, load_config
from .errors import (
    CoalescerClosedError,
    CoalescerError,
    EncodeError,
    ForwardTimeoutError,
    InvalidItemError,
    QueueFullError,
    TowerUnhealthyError,
)
from .types import Encoded, EncodeItem, Tower

__all__ = [
    "Coalescer",
    "CoalescerClosedError",
    "CoalescerConfig",
    "CoalescerError",
    "ConfigError",
    "EncodeError",
    "EncodeItem",
    "Encoded",
    "ForwardTimeoutError",
    "InvalidItemError",
    "QueueFullError",
    "Tower",
    "TowerUnhealthyError",
    "config_from_dict",
    "load_config",
]
