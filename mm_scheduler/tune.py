"""``mm-scheduler tune``: settings derived from what a running coalescer's ``/metrics`` recorded.

It reads Prometheus text: a saved scrape, a live ``/metrics`` URL, or a file with ``# before`` and
``# after`` scrapes, whose difference is one run (the real-server harness writes these). It proposes a
change only where a setting visibly bound the forwards, or the tower ran out of memory, and gives the
observation behind each change. When nothing bound, it says so and changes nothing: guessing a
window or a budget from traffic that never touched them would only move latency around.

Rules owned by a host integration (the SGLang plugin's ``sglang:`` section) plug in through
``extra_rules``; the core knows only its own metric names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import CoalescerConfig

BOUND_SHARE = 0.25  # a limit "binds" when it shaped at least this share of the forwards
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Histogram:
    """One Prometheus histogram: cumulative bucket counts by upper bound, plus count and sum."""

    buckets: tuple[tuple[float, float], ...]  # (le, cumulative count), ascending, +Inf last
    count: float
    total: float

    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def share_above(self, bound: float) -> float:
        """Share of observations above the largest bucket bound <= ``bound`` (the histogram's resolution)."""
        below = max((cum for le, cum in self.buckets if le <= bound), default=0.0)
        return 1.0 - below / self.count if self.count else 0.0

    def bound_below(self, bound: float) -> float:
        """The largest bucket bound <= ``bound``: what :meth:`share_above` actually compares against."""
        return max((le for le, _ in self.buckets if le <= bound), default=0.0)


@dataclass(frozen=True)
class Observed:
    """One coalescer's series (by its ``coalescer`` label), names without the ``mm_coalescer_`` prefix."""

    coalescer: str
    histograms: dict[str, Histogram] = field(default_factory=dict)
    counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = field(default_factory=dict)

    def counter(self, name: str, **labels: str) -> float:
        """A counter's value summed over the series matching ``labels``."""
        return sum(value for key, value in self.counters.get(name, {}).items()
                   if all((k, v) in key for k, v in labels.items()))

    @property
    def forwards(self) -> float:
        hist = self.histograms.get("units_per_forward")
        return hist.count if hist else 0.0


@dataclass(frozen=True)
class Change:
    """A proposed setting: ``key`` as written in the YAML file (``sglang.x`` for the plugin's section)."""

    key: str
    value: Any
    why: str


Rule = Callable[[dict[str, Any], Observed], list[Change]]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if not match or line.startswith("#"):
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        labels = tuple(sorted(_LABEL.findall(match["labels"] or "")))
        key = (match["name"], labels)
        out[key] = out.get(key, 0.0) + value
    return out


def parse(text: str) -> dict[str, Observed]:
    """Every coalescer's histograms and counters in a scrape; a ``# before``/``# after`` file gives the
    difference (one run). Only ``mm_coalescer_*`` series count; ``_created`` samples are ignored."""
    if "# after" in text:
        before_text, after_text = text.split("# after", 1)
        before, after = _samples(before_text), _samples(after_text)
        samples = {key: value - before.get(key, 0.0) for key, value in after.items()}
    else:
        samples = _samples(text)
    buckets: dict[tuple[str, str], list[tuple[float, float]]] = {}
    sums: dict[tuple[str, str], float] = {}
    counts: dict[tuple[str, str], float] = {}
    counters: dict[str, dict[str, dict[tuple[tuple[str, str], ...], float]]] = {}
    for (name, labels), value in samples.items():
        if not name.startswith("mm_coalescer_") or name.endswith("_created"):
            continue
        label_map = dict(labels)
        coalescer = label_map.pop("coalescer", "")
        short = name.removeprefix("mm_coalescer_")
        if short.endswith("_bucket"):
            buckets.setdefault((coalescer, short[:-7]), []).append((float(label_map["le"]), value))
        elif short.endswith("_sum"):
            sums[(coalescer, short[:-4])] = value
        elif short.endswith("_count"):
            counts[(coalescer, short[:-6])] = value
        elif short.endswith("_total"):
            rest = tuple(sorted(label_map.items()))
            counters.setdefault(coalescer, {}).setdefault(short[:-6], {})[rest] = value
    observed: dict[str, Observed] = {}
    for coalescer in {c for c, _ in buckets} | set(counters):
        hists = {name: Histogram(tuple(sorted(b)), counts.get((c, name), 0.0), sums.get((c, name), 0.0))
                 for (c, name), b in buckets.items() if c == coalescer}
        observed[coalescer] = Observed(coalescer, hists, counters.get(coalescer, {}))
    return observed


def core_rules(values: dict[str, Any], seen: Observed) -> list[Change]:
    """Changes to the coalescer's own keys that ``seen`` justifies (``values``: the config file's keys)."""
    config = CoalescerConfig(**{k: v for k, v in values.items() if k in CoalescerConfig.__dataclass_fields__})
    n = seen.forwards
    changes: list[Change] = []
    if not n:
        return changes
    ooms = seen.counter("oom_backoffs")
    fill = seen.histograms.get("budget_fill_ratio")
    full = fill.share_above(0.9) if fill else 0.0
    if ooms:
        changes.append(_scaled_budget(config, config.oom_backoff,
                                      f"the tower ran out of memory {ooms:g} times at this budget and backed off; "
                                      "start from the smaller budget instead of relearning it"))
    elif full >= BOUND_SHARE:
        changes.append(_scaled_budget(config, 2.0,
                                      f"{full:.0%} of {n:g} forwards filled more than 90 % of the budget, so it cut "
                                      "batches short; doubling it lets them run whole (the budget is activation "
                                      "memory: check the GPU has it free)"))
    units = seen.histograms.get("units_per_forward")
    if units and full < BOUND_SHARE:
        bound = units.bound_below(config.max_batch_items / 2)
        near_cap = units.share_above(bound)
        if near_cap >= BOUND_SHARE:
            changes.append(Change("max_batch_items", config.max_batch_items * 2,
                                  f"{near_cap:.0%} of {n:g} forwards held more than {bound:g} units against a cap of "
                                  f"{config.max_batch_items} while the budget had room"))
    wait = seen.histograms.get("queue_wait_seconds")
    if config.dispatch == "window" and units and wait:
        alone = 1.0 - units.share_above(1)
        if alone >= 0.5 and wait.mean() >= 0.5 * config.max_wait_ms / 1000:
            changes.append(Change("dispatch", "eager",
                                  f"{alone:.0%} of forwards ran one unit after units waited "
                                  f"{wait.mean() * 1000:.1f} ms on average for company (max_wait_ms "
                                  f"{config.max_wait_ms:g}): the window added latency without forming batches"))
    return changes


def _scaled_budget(config: CoalescerConfig, factor: float, why: str) -> Change:
    if config.budget_bytes is not None:
        return Change("budget_bytes", max(1, int(config.budget_bytes * factor)), why)
    return Change("budget_fraction", round(min(1.0, (config.budget_fraction or 0.0) * factor), 6), why)


def summary(seen: Observed) -> list[str]:
    """What the scrape shows, one line each (printed above the proposed config)."""
    lines = [f"coalescer {seen.coalescer!r}: {seen.forwards:g} forwards"]
    for name, label, scale, unit in (("units_per_forward", "units per forward", 1, ""),
                                     ("budget_fill_ratio", "budget fill", 1, ""),
                                     ("queue_wait_seconds", "queue wait", 1000, " ms"),
                                     ("batch_seconds", "forward (dispatch to results)", 1000, " ms"),
                                     ("prefill_wait_seconds", "prefill blocked", 1000, " ms")):
        hist = seen.histograms.get(name)
        if hist and hist.count:
            lines.append(f"  {label}: mean {hist.mean() * scale:.3g}{unit} over {hist.count:g}")
    return lines


def tune(text: str, values: dict[str, Any], coalescer: str | None = None,
         extra_rules: Sequence[Rule] = ()) -> tuple[Observed, list[Change]]:
    """The coalescer a scrape shows (``coalescer`` picks one when there are several) and the changes to
    ``values`` (a config file's keys, ``sglang:`` section included) that its metrics justify."""
    observed = parse(text)
    if coalescer is None:
        coalescer = values.get("name") if values.get("name") in observed else None
    if coalescer is None:
        if len(observed) != 1:
            found = ", ".join(sorted(observed)) or "none"
            raise ValueError(f"pick a coalescer with --coalescer: the scrape has mm_coalescer series for {found}")
        coalescer = next(iter(observed))
    if coalescer not in observed:
        raise ValueError(f"no mm_coalescer series labelled coalescer={coalescer!r} in the scrape "
                         f"(found: {', '.join(sorted(observed)) or 'none'})")
    seen = observed[coalescer]
    changes = core_rules(values, seen)
    for rule in extra_rules:
        changes += rule(values, seen)
    return seen, changes


def apply(values: dict[str, Any], changes: Sequence[Change]) -> dict[str, Any]:
    """``values`` with ``changes`` applied (a ``sglang.x`` key goes into the ``sglang:`` section)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for change in changes:
        section, _, key = change.key.rpartition(".")
        target = out.setdefault(section, {}) if section else out
        target[key] = change.value
    return out
