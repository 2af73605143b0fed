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

from .config import CoalescerConfig, config_from_dict

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
    host: dict[str, Histogram] = field(default_factory=dict)  # the host's histograms (all labels summed)
    host_counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = field(default_factory=dict)  # full names

    def counter(self, name: str, **labels: str) -> float:
        """A counter's value summed over the series matching ``labels``."""
        return sum(value for key, value in self.counters.get(name, {}).items()
                   if all((k, v) in key for k, v in labels.items()))

    def host_counter(self, name: str, **labels: str) -> float | None:
        """The host's counter ``name`` (without ``_total``) summed over the series matching ``labels``; None when
        the scrape has no such series (e.g. a host version that does not export it)."""
        matching = [value for key, value in self.host_counters.get(name, {}).items()
                    if all((k, v) in key for k, v in labels.items())]
        return sum(matching) if matching else None

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


_AFTER = re.compile(r"^# after[ \t]*$", re.MULTILINE)
_MONOTONIC = ("_bucket", "_count", "_sum", "_total")


def run_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A scrape's samples, or for a ``# before``/``# after`` file the difference: one run."""
    parts = _AFTER.split(text, maxsplit=1)
    if len(parts) == 1:
        return _samples(text)
    before, after = _samples(parts[0]), _samples(parts[1])
    out = {}
    for key, value in after.items():
        delta = value - before.get(key, 0.0)
        if delta < 0 and key[0].endswith(_MONOTONIC):
            raise ValueError(f"{key[0]} went down between the '# before' and '# after' scrapes: the server "
                             "restarted in between; scrape one run of one server")
        out[key] = delta
    return out


def parse(text: str) -> dict[str, Observed]:
    """Every coalescer's histograms and counters in a scrape (``# before``/``# after``: one run's), each
    summed over labels other than ``coalescer`` (ranks, processes). Histograms of the host (e.g. SGLang's
    ``sglang:queue_time_seconds``) go to every coalescer's ``host``, its counters (``sglang:num_requests_total``) to
    ``host_counters`` by their labels; ``_created`` samples are ignored."""
    buckets: dict[tuple[str, str], dict[float, float]] = {}
    sums: dict[tuple[str, str], float] = {}
    counts: dict[tuple[str, str], float] = {}
    counters: dict[str, dict[str, dict[tuple[tuple[str, str], ...], float]]] = {}
    host_counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for (name, labels), value in run_samples(text).items():
        if name.endswith("_created"):
            continue
        label_map = dict(labels)
        ours = name.startswith("mm_coalescer_")
        group = label_map.pop("coalescer", "") if ours else None  # None: the host's series
        short = name.removeprefix("mm_coalescer_")
        for suffix, table in (("_sum", sums), ("_count", counts)):
            if short.endswith(suffix):
                key = (group, short.removesuffix(suffix))
                table[key] = table.get(key, 0.0) + value
        if short.endswith("_bucket") and "le" in label_map:
            per_le = buckets.setdefault((group, short.removesuffix("_bucket")), {})
            le = float(label_map["le"])
            per_le[le] = per_le.get(le, 0.0) + value
        elif short.endswith("_total"):
            rest = tuple(sorted(label_map.items()))
            series = (counters.setdefault(group, {}) if ours else host_counters).setdefault(
                short.removesuffix("_total"), {})
            series[rest] = series.get(rest, 0.0) + value

    def histograms(group: str | None) -> dict[str, Histogram]:
        return {name: Histogram(tuple(sorted(per_le.items())), counts.get((g, name), 0.0), sums.get((g, name), 0.0))
                for (g, name), per_le in buckets.items() if g == group}

    host = histograms(None)
    return {c: Observed(c, histograms(c), counters.get(c, {}), host, host_counters)
            for c in sorted({g for g, _ in buckets if g is not None} | set(counters))}


def core_rules(values: dict[str, Any], seen: Observed) -> list[Change]:
    """Changes to the coalescer's own keys that ``seen`` justifies (``values``: the config file's keys)."""
    config = config_from_dict({k: v for k, v in values.items() if k in CoalescerConfig.__dataclass_fields__})
    n = seen.forwards
    changes: list[Change] = []
    if not n:
        return changes
    ooms = seen.counter("oom_backoffs")
    refused = seen.counter("errors", kind="queue_full")
    units_in = seen.counter("units")
    fill = seen.histograms.get("budget_fill_ratio")
    full = fill.share_above(0.9) if fill else 0.0
    if refused:  # the first limit work met: the others only shaped what got in
        changes.append(_held_queue(config, seen, refused, units_in))
    elif ooms:
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


def _held_queue(config: CoalescerConfig, seen: Observed, refused: float, units_in: float) -> Change:
    """A queue limit that would have taken the refused submissions too: the limit plus their patches, estimated at
    the admitted ones' mean size (at least double the limit; two significant digits). On Gemma3's burst (2729c81:
    250 crops refused at 500,000) it proposes 1,600,000 where doubling gave 1,000,000. Measured on the real server:
    a limit that held the whole burst (4,000,000) won against 500,000 (TTFT median 0.77x of plugin-off against
    0.87x, 86aa9fc); the proposed value itself was not run."""
    limit = config.max_queue_patches
    patches, units = seen.histograms.get("patches_per_forward"), seen.histograms.get("units_per_forward")
    admitted = sum(seen.counters.get("requests", {}).values())
    per_submission = (patches.total / units.total) * (units_in / admitted) if (
        patches and units and units.total and admitted) else 0.0
    needed = limit + refused * per_submission
    value = max(2 * limit, _two_digits_up(needed))
    size = f" of ~{per_submission:,.0f} patches each" if per_submission else ""
    return Change("max_queue_patches", value,
                  f"{refused:g} submissions{size} were refused (while {units_in:g} units got in) because the queue "
                  f"already held max_queue_patches ({limit}) patches; the host encoded them its own way (SGLang: on "
                  f"demand or its own method). Holding them too takes ~{needed:,.0f}")


def _two_digits_up(value: float) -> int:
    """``value`` rounded up to two significant digits: 1,622,304 -> 1,700,000."""
    if value <= 0:
        return 0
    step = 10 ** max(0, len(str(int(value))) - 2)
    return int(-(-value // step) * step)


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
                                     ("batch_gpu_seconds", "forward on the encoder stream", 1000, " ms"),
                                     ("batch_launch_seconds", "forward launch on the host", 1000, " ms"),
                                     ("prefill_wait_seconds", "prefill blocked", 1000, " ms")):
        hist = seen.histograms.get(name)
        if hist and hist.count:
            lines.append(f"  {label}: mean {hist.mean() * scale:.3g}{unit} over {hist.count:g}")
    for name in ("errors", "prefill_items"):
        series = seen.counters.get(name, {})
        if any(series.values()):
            parts = [f"{'/'.join(v for _, v in labels) or 'all'} {value:g}" for labels, value in sorted(series.items())]
            lines.append(f"  {name.replace('_', ' ')}: {', '.join(parts)}")
    return lines


def tune(text: str, values: dict[str, Any], coalescer: str | None = None,
         extra_rules: Sequence[Rule] = ()) -> tuple[Observed, list[Change]]:
    """The coalescer a scrape shows (``coalescer`` picks one when there are several) and the changes to
    ``values`` (a config file's keys, ``sglang:`` section included) that its metrics justify."""
    observed = parse(text)
    if not observed:
        raise ValueError("the scrape has no mm_coalescer series: the plugin is off on that server, or its "
                         "metrics are not enabled (SGLang: --enable-metrics)")
    if coalescer is None:
        coalescer = values.get("name") if values.get("name") in observed else None
    if coalescer is None:
        if len(observed) != 1:
            raise ValueError(f"pick a coalescer with --coalescer: the scrape has series for {', '.join(observed)}")
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
        if section:
            out[section] = target = dict(out.get(section) or {})  # an empty "sglang:" section reads as None
        else:
            target = out
        target[key] = change.value
    return out
