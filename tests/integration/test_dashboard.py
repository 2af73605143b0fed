"""dashboards/mm_coalescer.json queries only series the code exports, with their real labels, and shows them all.

The exported names come from the Prometheus registry after the core's series (``mm_scheduler.metrics``)
and the plugin's own (``mm_scheduler_sglang.service``) are registered, never from a list kept here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "mm_coalescer.json"
SERIES = re.compile(r"\bmm_coalescer_[a-z_]+")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",)}
ADDED_BY_PROMETHEUS = {"instance", "job"}


@pytest.fixture(scope="module")
def exported() -> dict[str, tuple[str, str, set[str]]]:
    """Every exposed sample name -> (family, type, label names), as the registry reports them."""
    import mm_scheduler_sglang.service as plugin
    from prometheus_client import REGISTRY
    from prometheus_client.metrics import MetricWrapperBase

    import mm_scheduler.metrics as core

    objects = [*vars(core._series()).values(), *(v for v in vars(plugin).values() if isinstance(v, MetricWrapperBase))]
    labels = {obj._name: set(obj._labelnames) for obj in objects}
    samples = {}
    for family in REGISTRY.collect():
        if family.name.startswith("mm_coalescer_"):
            for suffix in SUFFIXES[family.type]:
                samples[family.name + suffix] = (family.name, family.type, labels[family.name])
    assert len({f for f, _, _ in samples.values()}) == len(labels)  # every series object is registered
    return samples


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _exprs(dashboard: dict) -> list[str]:
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    return [t["expr"] for p in panels for t in p["targets"]]


def test_every_series_the_dashboard_queries_is_exported(dashboard, exported):
    used = set(SERIES.findall(DASHBOARD.read_text()))
    assert used, "the dashboard queries no mm_coalescer_* series"
    assert sorted(used - set(exported)) == []


def test_every_exported_series_has_a_panel(dashboard, exported):
    shown = {exported[name][0] for name in SERIES.findall(" ".join(_exprs(dashboard)))}
    assert sorted({family for family, _, _ in exported.values()} - shown) == []


def test_labels_in_selectors_and_groupings_exist_on_the_queried_series(dashboard, exported):
    for expr in _exprs(dashboard):
        names = SERIES.findall(expr)
        allowed = set(ADDED_BY_PROMETHEUS).union(*(exported[n][2] for n in names))
        if any(n.endswith("_bucket") for n in names):
            allowed.add("le")
        grouped = {label.strip() for group in re.findall(r"\bby \(([^)]*)\)", expr) for label in group.split(",")}
        matched = set(re.findall(r"([a-z_]+)\s*=~?\s*\"", expr))
        assert grouped | matched <= allowed, (expr, sorted((grouped | matched) - allowed))


def test_counters_and_histograms_are_rated_gauges_are_not(dashboard, exported):
    for expr in _exprs(dashboard):
        for fn, name in re.findall(r"\b(rate|increase)\((mm_coalescer_[a-z_]+)", expr):
            assert exported[name][1] in ("counter", "histogram"), (fn, name)
        for name in SERIES.findall(expr):
            if exported[name][1] == "gauge":
                assert not re.search(rf"\b(rate|increase)\({name}\b", expr), expr
        for by in re.findall(r"histogram_quantile\([0-9.]+, sum by \(([^)]*)\) \(rate\(mm_coalescer_\w+_bucket", expr):
            assert "le" in {label.strip() for label in by.split(",")}, expr
        if "histogram_quantile" in expr:
            assert "_bucket" in expr, expr


def test_follows_sglangs_dashboard_conventions(dashboard):
    """A Prometheus datasource variable, instance and coalescer filters, $__rate_interval, unique panel ids."""
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"instance", "coalescer"} <= set(variables)
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert 'coalescer=~"$coalescer"' in target["expr"] and 'instance=~"$instance"' in target["expr"]
            assert "[$__rate_interval]" in target["expr"] or not re.search(r"\b(rate|increase)\(", target["expr"])
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36


def test_every_series_the_readme_names_is_exported(exported):
    """The operator guide's metric list and "how to read it" name only series that exist."""
    readme = (DASHBOARD.parents[1] / "README.md").read_text()
    families = {family for family, _, _ in exported.values()}
    named = set(SERIES.findall(readme)) - {"mm_coalescer_"}
    assert named and sorted(named - set(exported) - families) == []
