"""``mm-scheduler tune``: what a scrape of the coalescer's own Prometheus series makes it propose.

Scrapes are produced by the real series (``mm_scheduler.metrics``, prometheus_client's exposition
format); each test uses its own ``coalescer`` label, so the process-wide registry does not mix them.
"""

from __future__ import annotations

import itertools

import pytest
import yaml
from prometheus_client import generate_latest

from mm_scheduler import metrics, tune
from mm_scheduler.cli import main

_labels = (f"tune-test-{i}" for i in itertools.count())


def scrape() -> str:
    return generate_latest().decode()


def forwards(name: str, n: int, units: int, fill: float, wait_s: float = 0.001, forward_s: float = 0.05) -> None:
    for _ in range(n):
        metrics.UNITS_PER_FORWARD.labels(name).observe(units)
        metrics.BUDGET_FILL.labels(name).observe(fill)
        metrics.QUEUE_WAIT.labels(name).observe(wait_s)
        metrics.BATCH_SECONDS.labels(name).observe(forward_s)


def test_a_scrape_is_read_back_into_histograms_and_counters():
    name = next(_labels)
    forwards(name, 3, units=5, fill=0.3)
    metrics.OOM_BACKOFFS.labels(name).inc(2)
    seen = tune.parse(scrape())[name]
    assert seen.forwards == 3
    units = seen.histograms["units_per_forward"]
    assert units.mean() == pytest.approx(5) and units.share_above(4) == 1.0 and units.share_above(8) == 0.0
    assert seen.counter("oom_backoffs") == 2


def test_a_before_after_file_gives_the_runs_difference():
    name = next(_labels)
    forwards(name, 4, units=1, fill=0.1)
    before = scrape()
    forwards(name, 2, units=16, fill=0.95)
    seen = tune.parse(f"# before\n{before}\n# after\n{scrape()}")[name]
    assert seen.forwards == 2 and seen.histograms["units_per_forward"].mean() == pytest.approx(16)


def test_a_budget_that_cut_most_forwards_short_is_doubled():
    name = next(_labels)
    forwards(name, 10, units=4, fill=0.95)
    _, changes = tune.tune(scrape(), {"budget_bytes": 1 << 30}, name)
    assert [(c.key, c.value) for c in changes] == [("budget_bytes", 2 << 30)]
    assert "100% of 10 forwards" in changes[0].why


def test_out_of_memory_backoffs_shrink_the_budget_instead():
    name = next(_labels)
    forwards(name, 10, units=4, fill=0.95)
    metrics.OOM_BACKOFFS.labels(name).inc()
    _, changes = tune.tune(scrape(), {"budget_bytes": None, "budget_fraction": 0.2, "oom_backoff": 0.5}, name)
    assert [(c.key, c.value) for c in changes] == [("budget_fraction", 0.1)]


def test_a_unit_cap_that_binds_while_the_budget_has_room_is_raised():
    name = next(_labels)
    forwards(name, 6, units=32, fill=0.4)
    forwards(name, 4, units=2, fill=0.1)
    _, changes = tune.tune(scrape(), {"max_batch_items": 32}, name)
    assert [(c.key, c.value) for c in changes] == [("max_batch_items", 64)]


def test_a_window_that_never_formed_batches_is_replaced_by_eager_dispatch():
    name = next(_labels)
    forwards(name, 10, units=1, fill=0.05, wait_s=0.004)
    _, changes = tune.tune(scrape(), {"dispatch": "window", "max_wait_ms": 5.0}, name)
    assert [(c.key, c.value) for c in changes] == [("dispatch", "eager")]
    _, eager = tune.tune(scrape(), {"dispatch": "eager", "max_wait_ms": 5.0}, name)
    assert eager == []


def test_traffic_that_touched_no_limit_changes_nothing():
    name = next(_labels)
    forwards(name, 20, units=6, fill=0.3, wait_s=0.03)
    assert tune.tune(scrape(), {}, name)[1] == []


def test_a_scrape_with_several_coalescers_needs_one_named():
    first, second = next(_labels), next(_labels)
    forwards(first, 1, units=1, fill=0.1)
    forwards(second, 1, units=1, fill=0.1)
    with pytest.raises(ValueError, match="--coalescer"):
        tune.tune(scrape(), {})
    with pytest.raises(ValueError, match="no mm_coalescer series labelled"):
        tune.tune(scrape(), {}, "absent")
    assert tune.tune(scrape(), {"name": first})[0].coalescer == first  # the config's name picks it


def test_the_cli_prints_a_config_the_server_accepts(tmp_path, capsys):
    name = next(_labels)
    forwards(name, 10, units=4, fill=0.95)
    scraped = tmp_path / "metrics.txt"
    scraped.write_text(scrape())
    assert main(["tune", str(scraped), "--config", "default", "--coalescer", name,
                 "--out", str(tmp_path / "tuned.yaml")]) == 0
    assert "1 change(s)" in capsys.readouterr().out
    text = (tmp_path / "tuned.yaml").read_text()
    assert "# budget_bytes: 4294967296 (" in text
    assert yaml.safe_load(text)["budget_bytes"] == 4 << 30
    assert main(["check-config", str(tmp_path / "tuned.yaml")]) == 0


def test_the_cli_names_an_unreadable_metrics_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["tune", str(tmp_path / "missing.txt")])
    assert info.value.code == 2 and "missing.txt: cannot read the metrics file" in capsys.readouterr().err


def test_series_split_by_other_labels_are_summed_per_coalescer():
    text = "\n".join([
        *(f'mm_coalescer_units_per_forward_bucket{{coalescer="c",tp_rank="{r}",le="{le}"}} {n}'
          for r, per_le in ((0, ((1, 10), (2, 10), ("+Inf", 10))), (1, ((1, 0), (2, 10), ("+Inf", 10))))
          for le, n in per_le),
        'mm_coalescer_units_per_forward_count{coalescer="c",tp_rank="0"} 10',
        'mm_coalescer_units_per_forward_count{coalescer="c",tp_rank="1"} 10',
        'mm_coalescer_units_per_forward_sum{coalescer="c",tp_rank="0"} 10',
        'mm_coalescer_units_per_forward_sum{coalescer="c",tp_rank="1"} 20',
    ])
    units = tune.parse(text)["c"].histograms["units_per_forward"]
    assert units.count == 20 and units.mean() == pytest.approx(1.5) and units.share_above(1) == pytest.approx(0.5)


def test_a_restart_between_the_two_scrapes_is_refused():
    name = next(_labels)
    forwards(name, 5, units=1, fill=0.1)
    after = scrape().replace(f'mm_coalescer_units_per_forward_count{{coalescer="{name}"}} 5.0',
                             f'mm_coalescer_units_per_forward_count{{coalescer="{name}"}} 1.0')
    with pytest.raises(ValueError, match="restarted"):
        tune.parse(f"# before\n{scrape()}\n# after\n{after}")


def test_refused_submissions_raise_the_queue_limit_before_anything_else():
    name = next(_labels)
    forwards(name, 10, units=4, fill=0.95)
    metrics.ERRORS.labels(kind="queue_full", coalescer=name).inc(7)
    seen, changes = tune.tune(scrape(), {"max_queue_patches": 1000}, name)
    assert [(c.key, c.value) for c in changes] == [("max_queue_patches", 2000)]
    assert "  errors: queue_full 7" in tune.summary(seen)


def test_a_budget_fraction_config_and_an_empty_host_section_are_tuned_like_any_other():
    name = next(_labels)
    forwards(name, 10, units=4, fill=0.95)
    values = {"budget_bytes": None, "budget_fraction": 0.1, "sglang": None}
    _, changes = tune.tune(scrape(), values, name)
    assert tune.apply(values, [*changes, tune.Change("sglang.x", 1, "")]) == {
        "budget_bytes": None, "budget_fraction": 0.2, "sglang": {"x": 1}}


def test_a_scrape_without_the_plugin_says_so():
    with pytest.raises(ValueError, match="no mm_coalescer series"):
        tune.tune('sglang:num_requests_total{model="m"} 3\n', {})


def test_refused_submissions_get_a_queue_limit_that_would_have_held_them_too():
    """Gemma3's burst at 2729c81: 250 crops of 4,096 patches refused against a limit of 500,000; holding them takes
    500,000 + 250 * 4,096 = 1,524,000, so the proposal is 1,600,000 rather than a doubling to 1,000,000."""
    name = next(_labels)
    for _ in range(35):
        metrics.UNITS_PER_FORWARD.labels(name).observe(10)
        metrics.PATCHES_PER_FORWARD.labels(name).observe(40_960)
    metrics.UNITS.labels(name).inc(350)
    metrics.REQUESTS.labels(outcome="ok", coalescer=name).inc(350)
    metrics.ERRORS.labels(kind="queue_full", coalescer=name).inc(250)
    _, changes = tune.tune(scrape(), {"max_queue_patches": 500_000}, name)
    assert [(c.key, c.value) for c in changes] == [("max_queue_patches", 1_600_000)]
    assert "of ~4,096 patches each" in changes[0].why and "~1,524,000" in changes[0].why


@pytest.mark.parametrize(("value", "rounded"), [(1_622_304, 1_700_000), (1_600_000, 1_600_000), (7, 7), (99.5, 100)])
def test_a_proposed_limit_is_rounded_up_to_two_significant_digits(value, rounded):
    assert tune._two_digits_up(value) == rounded
