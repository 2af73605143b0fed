"""Turn the harness's per-family ``results-<family>.json`` into ``real_server_summary.json`` and a plot.

Every ratio is plugin-on over plugin-off from runs made side by side in one harness run (same servers,
same seeds). Seed-workload ratios are medians over the alternated pairs; each comes with its spread
(min and max of the per-pair ratios) and the raw per-run values.

A family may come from several harness runs (oldest first on the command line): see ``merge_runs``.

usage: python scripts/gpu_serve/summarize.py RESULTS.json [...] --out benchmarks/results/real_server_summary.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from exports import arrival_span, last_finisher, measured_records, request_records
from serve import FAMILIES, REPO, merge_config, shipped_config

from mm_scheduler.tune import run_samples

SEED_METRICS = {"median_ttft_ratio": "median_ttft_ms", "mean_ttft_ratio": "mean_ttft_ms",
                "p99_ttft_ratio": "p99_ttft_ms", "throughput_ratio": "total_throughput",
                "duration_ratio": "duration"}
POISSON_METRICS = {"ttft_p50_ratio": "median_ttft_ms", "ttft_p99_ratio": "p99_ttft_ms",
                   "itl_p50_ratio": "median_itl_ms", "itl_p99_ratio": "p99_itl_ms", "tok_s_ratio": "total_throughput"}
# The request that finished last in a Poisson run, whose end ends the drain (exports.last_finisher): its first token
# and its decode, as ratios of the two servers.
LAST_FINISHER_PARTS = {"last_first_token_ratio": "last_first_token_s", "last_decode_ratio": "last_decode_s"}
# The Poisson ratios the shipped config's summary keeps per load: issue 17's three, the decode step's median, and the
# last finisher's first token and decode (where the run recorded them: they tell what moved the tok/s ratio).
SHIPPED_POISSON = ("ttft_p50_ratio", "itl_p99_ratio", "tok_s_ratio", "itl_p50_ratio", *LAST_FINISHER_PARTS)


def _ratio(on: float, off: float) -> float:
    return round(on / off, 4) if off else float("nan")


def seed_repetitions(runs: dict, off: str, on: str) -> list[str]:
    """The seed repetitions (``seed3``) both servers ran; never a warm-up."""
    reps = sorted({_workload(k) for k in runs if k.startswith("seed") and not k.startswith("seedwarm")})
    return [p for p in reps if f"{p}-{off}" in runs and f"{p}-{on}" in runs]


def seed_summary(runs: dict, off: str = "off", on: str = "on") -> dict | None:
    """Seed-workload ratios ``on`` / ``off`` over the repetitions both servers ran (median and spread)."""
    reps = seed_repetitions(runs, off, on)
    if not reps:
        return None
    out: dict = {"runs": len(reps), "measured": measured_on(runs, [f"{p}-{off}" for p in reps])}
    for name, key in SEED_METRICS.items():
        ratios = [_ratio(runs[f"{p}-{on}"][key], runs[f"{p}-{off}"][key]) for p in reps]
        out[name] = round(statistics.median(ratios), 4)
        out[f"{name}_spread"] = [min(ratios), max(ratios)]
    for label, mode in (("off", off), ("on", on)):
        out[label] = {key: [round(runs[f"{p}-{mode}"][key], 2) for p in reps] for key in SEED_METRICS.values()}
        coalescer = [runs[f"{p}-{mode}"].get("coalescer") for p in reps]
        if any(coalescer):
            out[label]["coalescer"] = coalescer
    return out


def poisson_summary(runs: dict, capacity: float | None, off_name: str = "off", on_name: str = "on") -> dict:
    out: dict = {}
    for key in runs:
        if not key.startswith("poisson") or not key.endswith(f"-{off_name}"):
            continue
        load = key[len("poisson"):-len(f"-{off_name}")]
        if f"poisson{load}-{on_name}" not in runs:
            continue
        off, on = runs[key], runs[f"poisson{load}-{on_name}"]
        out[load] = {name: _ratio(on[m], off[m]) for name, m in POISSON_METRICS.items()}
        out[load].update({name: _ratio(on[m], off[m]) for name, m in LAST_FINISHER_PARTS.items()
                          if m in on and m in off})
        out[load]["rate_req_s"] = off.get("request_rate")
        out[load]["measured"] = measured_on(runs, [key])
        for side, run in (("off", off), ("on", on)):  # the arrival span and drain where the harness recorded them
            out[load][side] = {m: run[m] for m in (*POISSON_METRICS.values(), "arrivals_s", "drain_s",
                                                   *LAST_FINISHER_PARTS.values()) if m in run}
        out[load]["on"]["coalescer"] = on.get("coalescer")
    if out and capacity is not None:  # lever comparisons pass None: the capacity is plain off's
        out["capacity_req_s"] = capacity
    return dict(sorted(out.items()))


def lone_summary(runs: dict, off: str = "off", on: str = "on") -> dict | None:
    if f"lone-{off}" not in runs or f"lone-{on}" not in runs:
        return None
    a, b = runs[f"lone-{off}"]["median_ttft_ms"], runs[f"lone-{on}"]["median_ttft_ms"]
    return {"ttft_ratio": _ratio(b, a), "off_ms": a, "on_ms": b, "measured": measured_on(runs, [f"lone-{off}"])}


MEASURED_TAG = re.compile(r"^(seed\d+|lone|poisson[\d.]+)-")  # warm-ups and the capacity probe are not


def _workload(tag: str) -> str:
    """``seed3`` of ``seed3-on+defer2s``: the workload (a seed repetition, ``lone``, ``poisson0.5``) a run tag names."""
    return tag.split("-", 1)[0]


def _server(tag: str) -> str:
    """``on+defer2s`` of ``seed3-on+defer2s``: the server (variant) a run tag names."""
    return tag.split("-", 1)[1]


def merge_runs(results: list[dict]) -> dict:
    """One family's harness runs (oldest first) as one result, so measurements accumulate across device
    sessions. Every compared pair still comes from one run, side by side: a later run adds seed repetitions
    (``serve.py --first-run``: new requests), workloads or variants. A workload it measures again (the lone
    request, one Poisson load) replaces that workload's runs of every server of the earlier run, listed under
    ``replaced``, when the later run measured it on plain off and plain on; otherwise the later run's runs of
    that workload stay out of the merge (``kept_apart``: a lever-only run must not erase the family's off/on
    pair) and are reported per harness run (``levers.<variant>.by_run``). Its correctness check replaces the
    earlier one, and its capacity too when it merged Poisson loads (paced at that capacity; each load keeps its
    own ``rate_req_s``). A seed repetition that two harness runs both claim is refused: it would be the same
    requests counted twice. A run on another GPU, or with a smaller KV pool, merges like any other (its pairs are
    side by side too); every merged run carries its GPU (:func:`_where`) and each ratio says where it was measured
    (:func:`measured_on`)."""
    merged: dict = {"family": results[0]["family"], "variants": {}, "variant_changes": {}, "runs": {},
                    "sources": []}
    for result in results:
        if result.get("extra_flags"):  # serve.py's GPU_SERVE_EXTRA_FLAGS: every server ran unlike the others' runs
            raise SystemExit(f"summarize: {result['family']} at {result.get('commit', '?')}: a study run with "
                             f"{' '.join(result['extra_flags'])} on every server; keep it out of the merged runs")
        measured = sorted(t for t in result["runs"] if MEASURED_TAG.match(t))
        workloads = {_workload(t) for t in measured}
        overlap = workloads & {_workload(t) for t in merged["runs"] if MEASURED_TAG.match(t)}
        twice = [t for t in measured if t.startswith("seed") and _workload(t) in overlap]
        if twice:
            raise SystemExit(f"summarize: {result['family']}: seed runs {twice} appear in two harness runs "
                             "(give the later one new repetitions with serve.py --first-run)")
        paired = {w for w in overlap if f"{w}-off" in result["runs"] and f"{w}-on" in result["runs"]}
        again = sorted(t for t in merged["runs"] if MEASURED_TAG.match(t) and _workload(t) in paired)
        apart = sorted(t for t in measured if _workload(t) in overlap - paired)
        for tag in again:
            del merged["runs"][tag]
        commit = result.get("commit", "")
        merged["runs"].update({t: run for t, run in _located(result).items() if t not in apart})
        merged["variants"].update(result.get("variants", {}))
        merged["variant_changes"].update(result.get("variant_changes", {}))
        for key in ("correctness", "gpu", "sglang"):
            if result.get(key) is not None:
                merged[key] = result[key]
        if result.get("capacity_req_s") is not None and (  # the capacity its merged Poisson loads were paced at
                "capacity_req_s" not in merged or any(t.startswith("poisson") for t in measured if t not in apart)):
            merged["capacity_req_s"] = result["capacity_req_s"]
        source = {"commit": commit, **_where(result), "runs": [t for t in measured if t not in apart]}
        if again:
            source["replaced"] = again
        if apart:
            source["kept_apart"] = apart
        merged["sources"].append(source)
    merged["commit"] = ",".join(dict.fromkeys(src["commit"] for src in merged["sources"]))
    return merged


def _compare(runs: dict, base: str, variant: str) -> dict:
    """``variant`` against ``base`` on every workload both served (None where they did not)."""
    return {"seed": seed_summary(runs, base, variant), "lone": lone_summary(runs, base, variant),
            "poisson": poisson_summary(runs, None, base, variant) or None}


def _floor(server: str) -> bool:
    """A free-encoder server (``+freeenc``): a floor to read against off, never a baseline for a plugin server."""
    return "+freeenc" in server


def _lever(runs: dict, variant: str, flags: dict[str, list]) -> dict:
    """A lever against plain off and, for a plugin server (``on+X``), against plain on. A plugin server with SGLang
    flags is also compared with each plugin-off server that ran with the same flags (``off+F``, or
    ``off+F+backport``: SGLang fixes from later releases): the plugin's part alone. A free-encoder server
    (``+freeenc``) is a floor, never a twin: against plain off, and a floor with flags (``off+F+freeenc``) also
    against ``off+F``, the server whose encoder it removes."""
    out = {"vs_off": _compare(runs, "off", variant)}
    if variant.startswith("on+"):
        out["vs_on"] = _compare(runs, "on", variant)
    if variant.startswith("on+") or _floor(variant):
        for twin, twin_flags in flags.items():
            if twin.startswith("off+") and not _floor(twin) and twin_flags and twin_flags == flags.get(variant) \
                    and any(tag.endswith(f"-{twin}") for tag in runs):
                out[f"vs_{twin}"] = _compare(runs, twin, variant)
    return out


# A ratio this close to 1 is even: one Poisson run moves ~5 % between runs, a lone run of 8 requests ~10 % (Gemma 4's
# lone ratio was 0.85, 1.05 and 0.97 in three runs of the same code path).
VERDICT_TOLERANCE = 0.05
LONE_TOLERANCE = 0.10


def legacy_pool(load: float) -> int:
    """Requests the harness built for a Poisson load while the servers started, from b3633c6 until runs recorded
    ``poisson_primed`` (f63d249): 130 x load, 30 to 200."""
    return int(min(200, max(30, 130 * load)))


def own_schedule(result: dict, load: str) -> str | None:
    """The server of one harness run whose Poisson run at ``load`` drew an arrival schedule of its own, or None.

    SGLang's load generator seeds numpy, builds its dataset from it, then draws the arrival gaps from it. The
    harness built each load's pool before the runs (:func:`legacy_pool`) and the load generator memoized it; a run
    asking for more requests than the pool held rebuilt it inside its own call, so the first server run at that
    load got another schedule than the servers after it, which reused the pool (Qwen2.5-VL at 660b520: at 80 % the
    plugin server got its 128 requests over 21.8 s, plugin-off over 18.2 s). Runs that recorded ``poisson_primed``
    built every load's requests before its first run and never differ. Every Poisson run on record descends from
    b3633c6."""
    if result.get("poisson_primed"):
        return None
    runs = result.get("runs", {})
    tags = [tag for tag in runs if tag.startswith(f"poisson{load}-")]
    asked = max((runs[tag].get("requested") or runs[tag].get("completed") or 0 for tag in tags), default=0)
    if not tags or asked <= legacy_pool(float(load)):
        return None
    first = min(tags, key=lambda tag: (runs[tag].get("window") or [float("inf")])[0])
    return first.split("-", 1)[1]


def schedules_differ(result: dict, load: str, a: str, b: str) -> str | None:
    """Why servers ``a`` and ``b`` of one run got different arrival schedules at ``load`` (:func:`own_schedule`), or
    None: then none of that pair's Poisson ratios is judged."""
    server = own_schedule(result, load)
    if server not in (a, b):
        return None
    return (f"{server}'s run rebuilt the load's {legacy_pool(float(load))}-request pool and drew its own arrival "
            "schedule")


def arrivals_apart(ratios: dict) -> str | None:
    """Why a Poisson pair's tok/s ratio is not judged, or None: the two runs' arrivals (``arrivals_s``, where the
    harness recorded them) took more than 5 % apart, so tokens over each run's duration compare the two spans rather
    than the servers (spans differ with two arrival schedules, :func:`own_schedule`, or a loop that took requests in
    later, :func:`exports.arrival_span`; ``drain_s`` then tells more)."""
    off, on = ratios["off"].get("arrivals_s"), ratios["on"].get("arrivals_s")
    if off is None or on is None or off <= 0 or abs(on / off - 1) <= VERDICT_TOLERANCE:
        return None
    return f"arrivals over {on} s against {off} s: tok/s would compare the spans"


def _plugin_baseline(result: dict, variant: str) -> str | None:
    """The server ``variant`` is judged against in one harness run: plugin on with the same SGLang flags and no
    setting changed (plain ``on`` when the variant adds no flags), so SGLang's flags are not credited to it."""
    flags, changes = result.get("variants", {}), result.get("variant_changes", {})
    if "on" in flags and flags["on"] == flags[variant]:
        return "on"
    for name, change in changes.items():  # e.g. on+tok4ipc for on+tok4ipc+defer2s
        if name not in ("on", variant) and name.startswith("on+") and flags.get(name) == flags[variant] \
                and not change.get("config") and not change.get("env"):
            return name
    return None


def lever_verdict(harness_runs: list[dict], variant: str) -> dict | None:
    """A plugin setting against plugin-on with the same SGLang flags, in every harness run that served both: what
    it makes better, worse, or leaves within the tolerance, and the runs it failed (a server that crashed or did
    not start). Each run's own pairs, so a workload measured again in a later run (which replaces the earlier
    pairs in the merged results) does not hide the earlier comparison. Issue 17's rule: a setting becomes the
    default only when it wins everywhere it was measured (``wins_everywhere_measured``). A Poisson tok/s ratio between
    runs whose arrivals took more than 5 % apart (where the harness recorded them: ``arrivals_s``) is not
    judged (``not_judged``, :func:`arrivals_apart`), nor is any Poisson ratio of a pair whose arrival schedules
    differed (:func:`schedules_differ`)."""
    checks: list[tuple[str, float, bool, float]] = []  # (what, ratio to the baseline, lower is better, tolerance)
    failed: list[str] = []
    unjudged: dict[str, str] = {}
    for result in harness_runs:
        runs, commit = result["runs"], result.get("commit", "")
        base = _plugin_baseline(result, variant) if variant in result.get("variants", {}) else None
        if base is None:
            continue
        against = "" if base == "on" else f" vs {base}"
        failed += [f"{tag} ({commit})" for tag in result.get("failed_runs", {}) if tag.endswith(f"-{variant}")]
        if variant in result.get("failed_to_start", {}):
            failed.append(f"start ({commit})")
        seed, lone, poisson = _compare(runs, base, variant).values()
        if seed:
            checks += [(f"seed TTFT median, {seed['runs']} rep.{against} ({commit})", seed["median_ttft_ratio"],
                        True, VERDICT_TOLERANCE),
                       (f"seed throughput{against} ({commit})", seed["throughput_ratio"], False, VERDICT_TOLERANCE)]
        if lone:
            checks.append((f"lone TTFT{against} ({commit})", lone["ttft_ratio"], True, LONE_TOLERANCE))
        for load, ratios in (poisson or {}).items():
            if why := schedules_differ(result, load, base, variant):
                unjudged[f"Poisson {load}{against} ({commit})"] = why
                continue
            checks += [(f"Poisson {load} TTFT p50{against} ({commit})", ratios["ttft_p50_ratio"], True,
                        VERDICT_TOLERANCE),
                       (f"Poisson {load} ITL p99{against} ({commit})", ratios["itl_p99_ratio"], True,
                        VERDICT_TOLERANCE)]
            tok_s = f"Poisson {load} tok/s{against} ({commit})"
            if why := arrivals_apart(ratios):
                unjudged[tok_s] = why
            else:
                checks.append((tok_s, ratios["tok_s_ratio"], False, VERDICT_TOLERANCE))
    if not checks and not failed:
        return None
    verdict: dict = {"better": {}, "worse": {}, "even": {}, "failed": failed, "not_judged": unjudged}
    for what, ratio, lower_is_better, tolerance in checks:
        if ratio != ratio:  # NaN: a zero baseline, nothing to judge
            continue
        gain = 1 - ratio if lower_is_better else ratio - 1
        side = "better" if gain > tolerance else "worse" if gain < -tolerance else "even"
        label, k = what, 2
        while label in verdict[side]:  # two harness runs at one commit
            label, k = f"{what} #{k}", k + 1
        verdict[side][label] = ratio
    verdict["wins_everywhere_measured"] = bool(verdict["better"]) and not verdict["worse"] and not failed
    return verdict


def default_candidates(families: dict) -> dict:
    """Issue 17's default rule across families: per plugin setting, whether it won everywhere it was measured in
    each family (:func:`lever_verdict`), and in all of them."""
    out: dict = {}
    for family, fam in families.items():
        for variant, lever in fam.get("levers", {}).items():
            if "verdict_vs_on" in lever:
                out.setdefault(variant, {"families": {}})["families"][family] = \
                    lever["verdict_vs_on"]["wins_everywhere_measured"]
    for entry in out.values():
        entry["wins_everywhere_measured"] = all(entry["families"].values())
    return out


def _where(result: dict) -> dict:
    """What a harness run ran on, carried by each of its merged runs: its GPU, and its KV pool where serve.py's
    GPU_SERVE_MAX_TOTAL_TOKENS made it smaller than the family's (two Qwen3-VL servers on an 80 GB H100)."""
    where = {"gpu": result.get("gpu", "")}
    if result.get("max_total_tokens"):
        where["max_total_tokens"] = result["max_total_tokens"]
    return where


def _located(result: dict) -> dict:
    """A harness run's runs, each with its commit and :func:`_where`, as :func:`merge_runs` gives them."""
    return {t: {**run, "commit": result.get("commit", ""), **_where(result)} for t, run in result["runs"].items()}


def measured_on(runs: dict, tags: list[str]) -> list[str]:
    """Where the compared runs ``tags`` were measured, one line per distinct harness run: a family's workloads
    can come from different runs, and since 1a3705d from different GPUs (each pair is one run's, side by side)."""
    lines = []
    for tag in tags:
        run = runs[tag]
        line = f"{run.get('commit', '')} on {run.get('gpu') or 'an unrecorded GPU'}"
        if run.get("max_total_tokens"):
            line += f", KV pool {run['max_total_tokens']} tokens"
        lines.append(line)
    return list(dict.fromkeys(lines))


COMMIT = re.compile(r"[0-9a-f]{7,40}")


def config_values_at(commit: str, name: str) -> dict | None:
    """The values of the shipped config ``name`` at ``commit``, read with git; None where git cannot show it (no
    commit recorded, a commit outside this clone's history, a checkout without git, a file that does not parse)."""
    if not COMMIT.fullmatch(commit):  # "" would make `git show :path` read the index: today's file
        return None
    for path in (f"mm_scheduler/configs/{name}.yaml", f"configs/{name}.yaml"):  # configs/ moved into the package
        try:
            shown = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=REPO, capture_output=True, text=True,
                                   timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if shown.returncode == 0:
            try:
                return yaml.safe_load(shown.stdout)
            except yaml.YAMLError:
                return None
    return None


def _only_config(change: dict) -> bool:
    """A server's ``variant_changes`` entry holds nothing but a plugin config change: no environment, no SGLang
    patch."""
    return not set(change) - {"config", "env"} and not change.get("env")


def plugin_off_with(result: dict, flags: list[str]) -> str | None:
    """The plugin-off server of one harness run that ran with exactly these SGLang flags and nothing else: plain
    ``off`` for none, else the first ``off+X`` with them and no environment or SGLang patch of its own (never a floor
    such as ``+freeenc``)."""
    variants, changes = result.get("variants", {}), result.get("variant_changes", {})
    if not flags:
        return "off" if "off" in variants else None
    for server, ran in variants.items():
        if server.startswith("off+") and not _floor(server) and ran == flags and _only_config(changes.get(server, {})):
            return server
    return None


def shipped_server(result: dict, name: str, current: dict,
                   values_at: Callable[[str, str], dict | None] = config_values_at,
                   flags: list[str] | None = None) -> str | None:
    """The plugin server of one harness run that ran the family's shipped config as it is now (``current``, the
    values of ``configs/<name>.yaml``) and nothing else: no SGLang flag (but ``flags``, which its plugin-off twin
    :func:`plugin_off_with` also ran), environment or SGLang patch of its own, and
    a config holding exactly these values: the one the run recorded (``configs``, since 5d5d209), else the config
    file at the run's commit with the server's config change on top. Plain ``on`` first, else the first such lever:
    one server a run, so no run's plugin-off counts twice. So a lever that later became the default counts
    (Qwen3-VL's ``on+prethread`` at f4d38f4), and a plain ``on`` whose config then differed does not. The code is
    still the run's commit's: a value changed in code without a change in the file is not seen."""
    flags = flags or []
    changes, recorded = result.get("variant_changes", {}), result.get("configs", {})
    base: dict | None = None
    for server in sorted(result.get("variants", {}), key=lambda v: v != "on"):
        change = changes.get(server, {"config": {}, "env": {}} if server == "on" else None)
        if not (server == "on" or server.startswith("on+")) or result["variants"][server] != flags \
                or change is None or not _only_config(change):
            continue
        if server in recorded:
            ran = recorded[server]
        else:
            base = base if base is not None else values_at(result.get("commit", ""), name)
            ran = None if base is None else merge_config(base, change.get("config", {}))
        if ran == current:
            return server
    return None


def shared_flag_sets(harness_runs: list[dict]) -> list[list[str]]:
    """The SGLang flag sets, beyond the harness's own, that some run gave both a plugin server and a plugin-off
    one (``off+X`` beside ``on+X``), in order of first appearance."""
    found: list[list[str]] = []
    for result in harness_runs:
        for server, flags in result.get("variants", {}).items():
            if server.startswith("on+") and flags and flags not in found and plugin_off_with(result, flags):
                found.append(flags)
    return found


def shipped_config_summary(harness_runs: list[dict], name: str, current: dict,
                           values_at: Callable[[str, str], dict | None] = config_values_at,
                           slow_above_ms: float | None = None, flags: list[str] | None = None) -> dict | None:
    """Issue 17's targets for the config a family ships now: each harness run's plugin server that ran it
    (:func:`shipped_server`) against plain off in that run (with ``flags``, the off server with them), the median of
    those ratios and each one (``each``, oldest run first; ``measured`` says where, GPUs and KV pools may differ).
    Unlike the merged ``seed`` / ``poisson`` / ``lone``, which take every run of plain ``on`` whatever its config
    then, only these servers count. A Poisson tok/s ratio whose runs' arrivals took 5 % apart is left out of the
    median and listed in ``tok_s_not_judged`` (:func:`arrivals_apart`), and a run whose two servers got different
    arrival schedules is left out of that load altogether (``runs_left_out``, :func:`schedules_differ`), as
    :func:`lever_verdict` leaves them unjudged. Each load also gives the ITL p50 ratio (``itl_p50_ratio``, a decode
    step's median): no target, but it tells a slower decode from a slower first token; and, where both servers'
    records gave it, the last finisher's first token and decode (``LAST_FINISHER_PARTS``), counted over all loads in
    ``last_finisher`` (:func:`last_finisher_signs`). With ``slow_above_ms``
    (:func:`decode_state`), each load also gives its ratios over only the runs in which neither server decoded
    slowly (``normal_decode``)."""
    seed: dict[str, list] = {"median_ttft_ratio": [], "throughput_ratio": []}
    # per load: each compared run's ratios, whether its tok/s is judged, and whether neither server decoded slowly
    poisson: dict[str, list[tuple[dict, bool, bool]]] = {}
    lone: list[float] = []
    unjudged: dict[str, list[str]] = {}  # per load: tok/s ratios of runs whose arrivals took 5 % apart
    left_out: dict[str, list[str]] = {}  # per load: runs whose two servers got different arrival schedules
    where: dict[str, list[str]] = {"seed": [], "poisson": [], "lone": []}
    servers = []
    for result in harness_runs:
        runs = _located(result)
        server = shipped_server(result, name, current, values_at, flags)
        base = plugin_off_with(result, flags or [])
        if server is None or base is None:
            continue
        reps = seed_repetitions(runs, base, server)
        for rep in reps:
            on, off = runs[f"{rep}-{server}"], runs[f"{rep}-{base}"]
            seed["median_ttft_ratio"].append(_ratio(on["median_ttft_ms"], off["median_ttft_ms"]))
            seed["throughput_ratio"].append(_ratio(on["total_throughput"], off["total_throughput"]))
        where["seed"] += measured_on(runs, [f"{rep}-{base}" for rep in reps])
        loads = poisson_summary(runs, None, base, server)
        for load, ratios in loads.items():
            compared = poisson.setdefault(load, [])
            if why := schedules_differ(result, load, base, server):
                left_out.setdefault(load, []).append(f"{result.get('commit', '')}: {why}")
                continue
            if why := arrivals_apart(ratios):
                unjudged.setdefault(load, []).append(f"{ratios['tok_s_ratio']} ({result.get('commit', '')}): {why}")
            normal_decode = slow_above_ms is not None and all(
                ratios[side].get("median_itl_ms", 0) <= slow_above_ms for side in ("off", "on"))
            compared.append((ratios, not why, normal_decode))
            where["poisson"] += ratios["measured"]
        single = lone_summary(runs, base, server)
        if single:
            lone.append(single["ttft_ratio"])
            where["lone"] += single["measured"]
        if reps or loads or single:  # a server with no plugin-off beside it gave no ratio
            servers.append(f"{server} ({result.get('commit', '')})")
    if not servers:
        return None

    def over(ratios: list[float]) -> dict:
        return {"median": round(statistics.median(ratios), 4), "each": ratios}

    def medians(compared: list[tuple[dict, bool, bool]]) -> dict:
        """``SHIPPED_POISSON``'s ratios over ``compared`` runs, tok/s only where judged, the last finisher's only
        where both servers' records gave it."""
        return {key: over(each) for key in SHIPPED_POISSON
                if (each := [ratios[key] for ratios, judged, _ in compared
                             if key in ratios and (key != "tok_s_ratio" or judged)])}

    out: dict = {"config": name, "servers": servers}
    if seed["median_ttft_ratio"]:
        out["seed"] = {"repetitions": len(seed["median_ttft_ratio"]), **{k: over(v) for k, v in seed.items()},
                       "measured": list(dict.fromkeys(where["seed"]))}
    if poisson:
        out["poisson"] = {load: {"runs": len(compared), **medians(compared),
                                 **({"tok_s_not_judged": unjudged[load]} if load in unjudged else {}),
                                 **({"runs_left_out": left_out[load]} if load in left_out else {}),
                                 **({"normal_decode": {"runs": len(normal), **medians(normal)}}
                                    if (normal := [run for run in compared if run[2]]) else {})}
                          for load, compared in sorted(poisson.items())}
        out["poisson_measured"] = list(dict.fromkeys(where["poisson"]))
    if lone:
        out["lone"] = {"runs": len(lone), "ttft_ratio": over(lone), "measured": list(dict.fromkeys(where["lone"]))}
    if finisher := last_finisher_signs(out.get("poisson", {})):
        out["last_finisher"] = finisher
    return out


def last_finisher_signs(poisson: dict) -> dict | None:
    """Over every load of every run (``shipped_config.poisson``): how often the plugin server's last finisher got its
    first token sooner than plugin-off's, and how often it decoded faster, each with a two-sided sign test over the
    loads that were not a tie (a ratio of exactly 1.0, or none). The tok/s of two servers over the same arrivals
    differs by their drains, which end with that request (:func:`exports.last_finisher`). Two loads of one run ran
    on the same two server processes, so they are not wholly independent draws."""
    out = {}
    for part, key in (("first_token_sooner", "last_first_token_ratio"), ("decode_faster", "last_decode_ratio")):
        ratios = [r for load in poisson.values() for r in load.get(key, {}).get("each", [])
                  if r != 1.0 and not math.isnan(r)]
        if ratios:
            wins = sum(r < 1.0 for r in ratios)
            out[part] = {"loads": len(ratios), "plugin_on": wins,
                         "sign_test_p": round(sign_test(wins, len(ratios)), 4)}
    return out or None


def sign_test(wins: int, n: int) -> float:
    """Two-sided sign test: the chance of a split at least this uneven among ``n`` coin flips."""
    tail = sum(math.comb(n, k) for k in range(min(wins, n - wins) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


SLOW_DECODE = 1.35  # a Poisson load's ITL p50 this far above its family's median one counts as a slow decode


def decode_state(harness_runs: list[dict]) -> dict | None:
    """Every Poisson load of every server in a family's harness runs (all variants, all loads): how many decoded
    slowly (ITL p50 above ``SLOW_DECODE`` x the family's median), with the plugin off (``off``, ``off+...``) and
    on, and Fisher's exact test of the two rates.

    Why: a server's eager decode sometimes runs 1.3-2x slower for a whole load, and a ratio against plugin-off
    reads that as a cost of the plugin when it strikes the plugin's server, as a win when it strikes off's. This
    says whether the state comes with the plugin."""
    loads: dict[str, list[tuple[str, float]]] = {"plugin_off": [], "plugin_on": []}
    for result in harness_runs:
        for tag, run in result["runs"].items():
            if tag.startswith("poisson") and MEASURED_TAG.match(tag) and run.get("median_itl_ms"):
                side = "plugin_off" if _server(tag).split("+")[0] == "off" else "plugin_on"
                loads[side].append((f"{tag} ({result.get('commit', '')})", run["median_itl_ms"]))
    if not loads["plugin_off"] or not loads["plugin_on"]:
        return None
    median = statistics.median(itl for side in loads.values() for _, itl in side)
    slow = {side: [name for name, itl in side_loads if itl > SLOW_DECODE * median]
            for side, side_loads in loads.items()}
    off_slow, on_slow = len(slow["plugin_off"]), len(slow["plugin_on"])
    off_n, on_n = len(loads["plugin_off"]), len(loads["plugin_on"])
    return {"itl_p50_median_ms": round(median, 2), "slow_above_ms": round(SLOW_DECODE * median, 2),
            **{side: {"loads": len(loads[side]), "slow": len(slow[side]), "slow_loads": slow[side]} for side in loads},
            "fisher_p": round(fisher_exact(off_slow, off_n - off_slow, on_slow, on_n - on_slow), 4)}


def fisher_exact(a: int, b: int, c: int, d: int) -> float:
    """Two-sided p of Fisher's exact test for the table [[a, b], [c, d]]: the chance, with the row and column
    totals fixed, of a table at most as likely as this one."""
    row, col, n = a + b, a + c, a + b + c + d

    def chance(x: int) -> float:
        return math.comb(row, x) * math.comb(n - row, col - x) / math.comb(n, col)

    seen = chance(a)
    return min(1.0, sum(p for x in range(max(0, col - (n - row)), min(row, col) + 1)
                        if (p := chance(x)) <= seen * (1 + 1e-9)))


TARGETS: list[tuple[str, tuple[str, ...], float, bool]] = [  # issue 17: (name, where in shipped_config, bound, at most)
    ("seed TTFT median <= 0.60x", ("seed", "median_ttft_ratio"), 0.60, True),
    ("seed throughput >= 1.15x", ("seed", "throughput_ratio"), 1.15, False),
    *[(f"Poisson {load} {what}", ("poisson", load, key), bound, at_most)
      for load in ("0.5", "0.8")
      for what, key, bound, at_most in (("TTFT p50 <= 0.80x", "ttft_p50_ratio", 0.80, True),
                                        ("ITL p99 <= 1.05x", "itl_p99_ratio", 1.05, True),
                                        ("tok/s >= 1.0x", "tok_s_ratio", 1.0, False))],
    ("lone TTFT <= 0.90x", ("lone", "ttft_ratio"), 0.90, True),
]


def target_check(shipped: dict | None) -> dict:
    """Issue 17's targets against a family's ``shipped_config``: each target's median ratio over the runs that
    measured it, whether that median meets it (``met``), and in how many of those runs it did (``runs_met`` of
    ``runs``); ``unmeasured`` lists the targets no such run measured (all of them without a shipped-config run), and
    ``not_judged`` a Poisson target whose every run was left out of it (``tok_s_not_judged``, ``runs_left_out``: with
    those runs). Either leaves the targets not all met."""
    out: dict = {"targets": {}, "unmeasured": [], "not_judged": {}}
    for name, path, bound, at_most in TARGETS:
        node: Any = shipped or {}
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        unjudged = [*(node.get("tok_s_not_judged", []) if path[-1] == "tok_s_ratio" else []),
                    *node.get("runs_left_out", [])] if isinstance(node, dict) else []
        node = node.get(path[-1]) if isinstance(node, dict) else None
        if not node:
            if unjudged:
                out["not_judged"][name] = unjudged
            else:
                out["unmeasured"].append(name)
            continue
        def meets(ratio: float, bound: float = bound, at_most: bool = at_most) -> bool:
            return ratio <= bound if at_most else ratio >= bound

        out["targets"][name] = {"median": node["median"], "met": meets(node["median"]), "runs": len(node["each"]),
                                "runs_met": sum(map(meets, node["each"]))}
    out["all_met"] = not out["unmeasured"] and not out["not_judged"] and all(t["met"] for t in out["targets"].values())
    return out


def family_summary(result: dict, raw: Path | None = None, harness_runs: list[dict] | None = None) -> dict:
    """One family's ratios from its merged runs; ``harness_runs`` (the runs before merging) adds each plugin
    setting's verdict against plain on (:func:`lever_verdict`)."""
    runs = result["runs"]
    fam: dict = {"commit": result.get("commit", "")}
    if len(result.get("sources", [])) > 1:
        fam["sources"] = result["sources"]
    seed = seed_summary(runs)
    if seed:
        fam["seed"] = seed
    poisson = poisson_summary(runs, result.get("capacity_req_s"))
    if poisson:
        fam["poisson"] = poisson
    lone = lone_summary(runs)
    if lone:
        fam["lone"] = lone
    family = result.get("family", "")
    if harness_runs and family in FAMILIES:
        name = FAMILIES[family]["config"]
        state = decode_state(harness_runs)
        current, slow_above_ms = shipped_config(name), state["slow_above_ms"] if state else None
        shipped = shipped_config_summary(harness_runs, name, current, slow_above_ms=slow_above_ms)
        if shipped:
            fam["shipped_config"] = shipped
        fam["issue17_targets"] = target_check(shipped)
        # The shipped config where both servers ran extra SGLang flags: a setup a production server runs but the
        # harness does not by default (Gemma3 on `sdpa` vision attention, for the `fa3` the stripped kernel lacks)
        for flags in shared_flag_sets(harness_runs):
            with_flags = shipped_config_summary(harness_runs, name, current, slow_above_ms=slow_above_ms, flags=flags)
            if with_flags:
                fam.setdefault("shipped_config_with_flags", {})[" ".join(flags)] = {
                    **with_flags, "issue17_targets": target_check(with_flags)}
        if state:
            fam["decode_state"] = state
    correct = result.get("correctness")
    if correct:
        fam["outputs_identical"] = bool(correct["all_identical"])
        fam["outputs_compared"] = {"image_requests": correct["requests"], "identical": correct["identical"],
                                   "servers": correct.get("servers", ["off", "on"]),
                                   "video_requests": correct.get("video_requests", 0),
                                   "video_identical": correct.get("video_identical", 0)}
    # A lever ("off+X" without "on+X": SGLang's own; "on+X": a plugin setting, or the plugin on SGLang flags)
    # against plain off, and for "on+X" against plain on, from the same harness run.
    for variant, changes in result.get("variant_changes", {}).items():
        if variant in ("off", "on") or (variant.startswith("off+") and f"on+{variant[4:]}" in result["variants"]):
            continue
        lever = {"changes": {**changes, "flags": result["variants"].get(variant, [])},
                 **_lever(runs, variant, result["variants"])}
        # Each harness run's own comparisons too: the same variant at several commits may be different code (a
        # fix between runs), and a run kept apart from the merge or replaced by a later one (merge_runs) is only
        # seen here.
        by_run = [{"commit": run.get("commit", ""), "runs": sorted(t for t in run["runs"] if MEASURED_TAG.match(t)
                                                                   and t.endswith(f"-{variant}")),
                   **_lever(_located(run), variant, run.get("variants", {}))}
                  for run in harness_runs or [] if any(t.endswith(f"-{variant}") for t in run["runs"])]
        if len(by_run) > 1 or any(t.endswith(f"-{variant}") for src in result.get("sources", [])
                                  for t in (*src.get("kept_apart", []), *src.get("replaced", []))):
            lever["by_run"] = by_run
        verdict = lever_verdict(harness_runs, variant) if harness_runs and variant.startswith("on+") else None
        if verdict:
            lever["verdict_vs_on"] = verdict
        compared = [lever, *lever.get("by_run", [])]
        if verdict or any(v for c in compared for side, against in c.items() if side.startswith("vs_")
                          for v in against.values()):
            fam.setdefault("levers", {})[variant] = lever
    # Both servers with the same extra SGLang flags ("off+X" vs "on+X"), the flags alone ("off+X" vs "off"),
    # and the runs in which either server failed (a crashed or hung server: its cause from serve.py).
    for variant, flags in result.get("variants", {}).items():
        if not variant.startswith("off+") or f"on+{variant[4:]}" not in result["variants"]:
            continue
        on = f"on+{variant[4:]}"
        pair = {"flags": flags, "seed": seed_summary(runs, variant, on), "lone": lone_summary(runs, variant, on),
                "sglang_flags_alone": {"seed": seed_summary(runs, "off", variant),
                                       "lone": lone_summary(runs, "off", variant)}}
        failed = {f"{tag} ({run.get('commit', '')})": cause for run in harness_runs or []
                  for tag, cause in run.get("failed_runs", {}).items()
                  if not _floor(_server(tag))
                  and any(_server(tag) == v or _server(tag).startswith(f"{v}+") for v in (variant, on))}
        if failed:
            pair["failed"] = failed
        fam.setdefault("with_sglang_flags", {})[variant[4:]] = pair
    breakdown = stage_breakdown(raw, result) if raw is not None else None
    if breakdown:
        fam["time_breakdown_seed_s"] = breakdown
    return fam


# --- where the time goes (seed workload) ---------------------------------------------------------------
def _run_delta(metrics_file: Path) -> dict[str, float]:
    """One run's increase per series name (plus its ``stage`` label), summed over the other labels."""
    out: dict[str, float] = {}
    for (name, labels), value in run_samples(metrics_file.read_text()).items():
        stage = dict(labels).get("stage")
        key = f"{name}[{stage}]" if stage else name
        out[key] = out.get(key, 0.0) + value
    return out


def _seed_records(export_dir: Path, window: list[float] | None, requested: int | None = None) -> list[dict]:
    """SGLang's per-request export for the seed run: by the run's wall-clock window when the harness
    recorded one, without the load generator's warm-up request (:func:`exports.measured_records`, given the
    run's ``requested``), else the one burst of 100 requests with the seed workload's prompt length (the load
    generator's warm-up request comes a second before it)."""
    records = request_records(export_dir, window)
    if window:
        return measured_records(records, requested)
    bursts, current = [], []
    for r in records:
        if current and r["request_received_ts"] - current[-1]["request_received_ts"] > 1.0:
            bursts.append(current)
            current = []
        current.append(r)
    bursts.append(current)
    seed = [b for b in bursts if len(b) == 100 and all(1900 <= r["prompt_tokens"] <= 1930 for r in b)]
    return seed[-1] if seed else []


def stage_breakdown(raw: Path, result: dict, tag: str = "seed0") -> dict:
    """Mean seconds per request of the seed run, per server, from SGLang's own timing.

    preprocess: HTTP receipt to dispatch to the scheduler (tokenizer manager: image decode, HF processor,
    feature transfer), from ``--export-metrics-to-file``. queue, scheduler request processing and prefill
    forward (the encoder runs in it when the plugin is off): ``sglang:queue_time_seconds`` and
    ``sglang:per_stage_req_latency_seconds``. handover_and_delivery is what TTFT leaves over: the hand-over to
    the scheduler, and the wait between the prefill and the first chunk leaving the server (for a burst mostly the
    latter: :func:`first_token_timeline`). decode: e2e minus TTFT. ``arrivals_s`` / ``drain_s``: how long the run's
    requests took to arrive and what the server took after the last (:func:`exports.arrival_span`). The plugin's own
    counters give its encoder time (forwards, busy seconds) and the prefill's blocked time. ``cpu_s``: the server's
    CPU seconds per process during the run, where serve.py recorded them. SGLang's counters (TTFT, queue, stages)
    include the load generator's warm-up request, one of ``requests``; ``preprocess`` and the arrival span leave it
    out (:func:`exports.measured_records`).
    """
    out: dict = {}
    for variant in result.get("variants", {"off": [], "on": []}):
        metrics = raw / f"metrics-{tag}-{variant}.txt"
        if not metrics.exists():
            continue
        d = _run_delta(metrics)
        n = d.get("sglang:time_to_first_token_seconds_count") or 1.0
        run = result["runs"].get(f"{tag}-{variant}", {})
        records = _seed_records(raw / f"requests-{variant}", run.get("window"), run.get("requested"))
        pre = statistics.mean(r["api_server_dispatch_finish_ts"] - r["request_received_ts"] for r in records) \
            if records else float("nan")
        ttft = d.get("sglang:time_to_first_token_seconds_sum", 0.0) / n
        row = {
            "requests": int(n),
            "ttft": ttft,
            "preprocess": pre,
            "queue": d.get("sglang:queue_time_seconds_sum", 0.0) / n,
            "scheduler_request_process": d.get("sglang:per_stage_req_latency_seconds_sum[request_process]", 0.0) / n,
            "prefill_forward": (d.get("sglang:per_stage_req_latency_seconds_sum[prefill_forward]", 0.0)
                                + d.get("sglang:per_stage_req_latency_seconds_sum[chunked_prefill]", 0.0)) / n,
            "decode": (d.get("sglang:e2e_request_latency_seconds_sum", 0.0) / n) - ttft,
        }
        row["handover_and_delivery"] = ttft - row["preprocess"] - row["queue"] - row["scheduler_request_process"] \
            - row["prefill_forward"]
        row.update(arrival_span(records))
        if (cpu := run.get("cpu_s", {}).get(variant)) is not None:  # recorded by serve.py since session 15
            row["cpu_s"] = cpu
        if "mm_coalescer_forwards_total" in d:
            forwards = d["mm_coalescer_forwards_total"]
            row["coalescer"] = {
                "forwards": forwards,
                "units_per_forward": d.get("mm_coalescer_units_total", 0.0) / max(1.0, forwards),
                "encoder_busy_s": d.get("mm_coalescer_batch_seconds_sum", 0.0),  # overlaps: 2 batches in flight
                **({"encoder_stream_s": d["mm_coalescer_batch_gpu_seconds_sum"]}  # CUDA events, when exported
                   if "mm_coalescer_batch_gpu_seconds_sum" in d else {}),
                **({"encoder_launch_s": d["mm_coalescer_batch_launch_seconds_sum"]}  # host, in the tower's calls
                   if "mm_coalescer_batch_launch_seconds_sum" in d else {}),
                "prefill_blocked_s": d.get("mm_coalescer_prefill_wait_seconds_sum", 0.0),
            }
        out[variant] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
    return out


def lone_encoder_share(raw: Path, target: float = 0.90) -> dict | None:
    """What any encoder speed-up can give a lone request: the encoder's share of its TTFT.

    A lone request's images are one batch with or without the plugin, so only a faster encoder can lower its
    TTFT. From one harness run's unpacked files (its own ``results.json``: a later run replaces the lone pair in
    the merged results): the lone run's time breakdown per server, the plugin's encoder seconds a request
    (busy seconds over requests, the load generator's test request included), plugin-off's TTFT if that encoder
    cost nothing and all else stayed as measured (``free_encoder_ttft_ratio``: the floor of any encoder
    speed-up), and the share of the encoder's time a faster forward must save to reach ``target``. The floor uses
    the host-side time: with one batch in flight it does not overlap, and it holds the launch gaps a graph replay
    removes; the encoder stream's own time (CUDA events) comes beside it when the run exported it.
    """
    result = json.loads((raw / "results.json").read_text())
    rows = stage_breakdown(raw, result, "lone")
    if "off" not in rows or "coalescer" not in rows.get("on", {}):
        return None
    encoder = rows["on"]["coalescer"]["encoder_busy_s"] / rows["on"]["requests"]
    ttft_off = rows["off"]["ttft"]
    if encoder <= 0 or ttft_off <= 0:  # no forward, or no SGLang timing: nothing to divide
        return None
    stream = rows["on"]["coalescer"].get("encoder_stream_s")
    return {"commit": result.get("commit", ""), "breakdown_s": rows, "encoder_s_per_request": round(encoder, 4),
            **({"encoder_stream_s_per_request": round(stream / rows["on"]["requests"], 4)}
               if stream is not None else {}),
            "ttft_off_s": ttft_off, "free_encoder_ttft_ratio": round((ttft_off - encoder) / ttft_off, 3),
            f"encoder_cut_needed_for_{target:.2f}x": round((1 - target) * ttft_off / encoder, 3)}


def poisson_encoder_wait(raw: Path) -> dict:
    """Where the plugin's Poisson TTFT goes, per load: does an encode started at arrival get a head start?

    From one harness run's unpacked files: per load and server, :func:`stage_breakdown`'s mean seconds a request,
    and for the plugin's servers what a prefill blocked on the encoder (mean per prefill), what one encoder
    forward took (dispatch to results), how long launching it took on the host (from the commit that exports it:
    close to the forward's time means launch-bound, CPU or GIL; much less means the GPU was the wait) and how
    many units it held. A prefill that blocks for most of a forward holding one request's images means the encode
    started at arrival ran no earlier than SGLang's own would have, and batched nothing: the plugin can then at best
    match SGLang's inline encode. With ``early_encode_min_waiting`` the inline encodes (SGLang's own method) count
    as blocked time too, and the forwards are the coalescer's only.

    Each row carries :func:`stage_breakdown`'s ``arrivals_s`` and ``drain_s`` (:func:`exports.arrival_span`), and
    every other server's ``prefill_forward_minus_off_ms`` against the plugin-off server with its SGLang flags
    (:func:`plugin_off_with`: ``off+mmsdpa`` for ``on+mmsdpa``; none when the run has no such server, so an
    ``on+mmsdpa`` beside plain ``off`` gets no delta: another kernel is not the plugin's cost). ``flags`` are the
    plugin servers' SGLang flags when all of them ran the same extra ones beside a plugin-off twin on them (the run
    belongs to ``shipped_config_with_flags``), else empty.
    """
    result = json.loads((raw / "results.json").read_text())
    variants = result.setdefault("variants", {"off": [], "on": []})  # as stage_breakdown reads a run without them
    plugin_flags = [ran for server, ran in variants.items() if server == "on" or server.startswith("on+")]
    out: dict = {}
    for load in sorted({_workload(t) for t in result["runs"] if t.startswith("poisson")}):
        rows = stage_breakdown(raw, result, load)
        for variant, row in rows.items():
            d = _run_delta(raw / f"metrics-{load}-{variant}.txt")
            prefills, forwards = (d.get(f"mm_coalescer_{n}_seconds_count") for n in ("prefill_wait", "batch"))
            if prefills and forwards:
                blocked = d["mm_coalescer_prefill_wait_seconds_sum"] / prefills
                forward = d["mm_coalescer_batch_seconds_sum"] / forwards
                row.setdefault("coalescer", {}).update({
                    "prefill_blocked_ms_per_prefill": round(1000 * blocked, 1), "forward_ms": round(1000 * forward, 1),
                    "blocked_share_of_forward": round(blocked / forward, 2),
                    **({"launch_ms": round(1000 * d["mm_coalescer_batch_launch_seconds_sum"] / forwards, 1)}
                       if "mm_coalescer_batch_launch_seconds_sum" in d else {})})
        for variant, row in rows.items():
            baseline = plugin_off_with(result, variants.get(variant, []))
            if baseline in rows and baseline != variant:
                row["prefill_forward_minus_off_ms"] = round(1000 * (row["prefill_forward"]
                                                                    - rows[baseline]["prefill_forward"]), 1)
        out[load] = rows
    shared = plugin_flags[0] if plugin_flags and all(f == plugin_flags[0] for f in plugin_flags) else []
    if shared and plugin_off_with(result, shared) is None:  # no plugin-off twin on those flags: not that setup
        shared = []
    return {"commit": result.get("commit", ""), "flags": shared, "loads": out}


_REQ_TIME_STATS = re.compile(r"ReqTimeStats\(rid=(\w+),.*queue_duration=([\d.]+)ms.*entry_time=([\d.]+)")


def first_token_timeline(raw: Path, result: dict, tag: str) -> dict:
    """When a burst's requests were handed to the scheduler, prefilled and answered, per server.

    Seconds from the burst's first receipt (the load generator's warm-up request left out: before 2026-12-06 the
    origin was its receipt, 1.4-2.5 s ahead of the burst, and every time here that much later), as percentiles
    (p10, p50, p90) over its requests: ``dispatched`` (the tokenizer manager handed it to the scheduler:
    per-request export), ``scheduled`` (the scheduler put it in a prefill batch: ``ReqTimeStats`` entry time plus
    queue duration in the server log, from ``--enable-request-time-stats-logging``) and ``first_sent`` (the
    server sent its first chunk). Also ``tokenizer_done`` (the last dispatch: the tokenizer manager finished
    preprocessing the burst) and ``sent_after_tokenizer_done``: the share of requests scheduled before that moment
    whose first chunk was sent only after it (a first token that waited for the tokenizer manager, not for the
    GPU). ``scheduled`` is when the prefill starts, so a request whose prefill was still running at that moment
    counts too: an upper bound. Streaming requests only (``response_sent_to_client_ts`` is the first chunk);
    percentiles are nearest rank.
    """
    out: dict = {}
    for variant in result.get("variants", {}):
        log = raw / f"server-{variant}.log"
        run = result["runs"].get(f"{tag}-{variant}", {})
        if not log.exists() or not run.get("window"):
            continue
        entered = {m.group(1): float(m.group(3)) + float(m.group(2)) / 1000.0
                   for m in map(_REQ_TIME_STATS.search, log.read_text(errors="replace").splitlines()) if m}
        records = [r for r in _seed_records(raw / f"requests-{variant}", run["window"], run.get("requested"))
                   if r.get("id") in entered and "api_server_dispatch_finish_ts" in r
                   and "response_sent_to_client_ts" in r]
        if not records:
            continue
        start = min(r["request_received_ts"] for r in records)
        done = max(r["api_server_dispatch_finish_ts"] for r in records) - start
        series = {"dispatched": [r["api_server_dispatch_finish_ts"] - start for r in records],
                  "scheduled": [entered[r["id"]] - start for r in records],
                  "first_sent": [r["response_sent_to_client_ts"] - start for r in records]}
        early = [sent for scheduled, sent in zip(series["scheduled"], series["first_sent"], strict=True)
                 if scheduled < done]
        held = [sent for sent in early if sent >= done]
        out[variant] = {"requests": len(records), "tokenizer_done": round(done, 3),
                        **{name: [round(_percentile(v, q), 3) for q in (10, 50, 90)] for name, v in series.items()},
                        "sent_after_tokenizer_done": round(len(held) / len(early), 3) if early else 0.0}
    return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def plot(summary: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: pip install matplotlib for the plot")
        return False
    families = summary["families"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    names = list(families)
    bars = [("seed median TTFT", lambda f: families[f].get("seed", {}), "median_ttft_ratio"),
            ("seed throughput", lambda f: families[f].get("seed", {}), "throughput_ratio"),
            ("lone TTFT", lambda f: families[f].get("lone", {}), "ttft_ratio")]
    for i, (label, part, key) in enumerate(bars):
        vals = [part(f).get(key, float("nan")) for f in names]
        spreads = [part(f).get(f"{key}_spread", [v, v]) for f, v in zip(names, vals, strict=True)]
        pairs = list(zip(vals, spreads, strict=True))
        err = [[v - s[0] for v, s in pairs], [s[1] - v for v, s in pairs]]
        axes[0].bar([x + 0.27 * i for x in range(len(names))], vals, 0.27, yerr=err, label=label)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_xticks([x + 0.27 for x in range(len(names))], names)
    axes[0].set_title("seed workload (100 x 6 images) and a lone request: on / off")
    axes[0].legend(fontsize=7, loc="lower center")
    for f in names:
        poisson = {k: v for k, v in families[f].get("poisson", {}).items() if k != "capacity_req_s"}
        loads = sorted(poisson, key=float)
        xs = [float(x) for x in loads]
        axes[1].plot(xs, [poisson[x]["ttft_p50_ratio"] for x in loads], "o-", label=f"{f} TTFT p50")
        axes[1].plot(xs, [poisson[x]["itl_p99_ratio"] for x in loads], "s--", label=f"{f} ITL p99")
        for x, load in zip(xs, loads, strict=True):  # a load measured on another GPU than the first listed says so
            other = [g for g in summary["gpu"].split(", ")[1:] if any(g in m for m in poisson[load]["measured"])]
            if other:
                axes[1].annotate(other[0].removeprefix("NVIDIA ").split()[0], (x, poisson[load]["ttft_p50_ratio"]),
                                 fontsize=6)
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set_xlabel("load (fraction of plugin-off capacity)")
    axes[1].set_title("Poisson: on / off")
    axes[1].legend(fontsize=7)
    stages = ("preprocess", "handover_and_delivery", "queue", "prefill_forward", "decode")
    bars = [(f"{f} {v}", row) for f in names for v, row in families[f].get("time_breakdown_seed_s", {}).items()]
    bottoms = [0.0] * len(bars)
    for stage in stages:
        heights = [max(0.0, row.get(stage, 0.0)) for _, row in bars]
        axes[2].bar(range(len(bars)), heights, bottom=bottoms, label=stage)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    axes[2].set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=7, rotation=60, ha="right")
    axes[2].set_ylabel("mean seconds per request")
    axes[2].set_title("seed workload: where the time goes")
    axes[2].legend(fontsize=7)
    latest = ", ".join(f"{f} {families[f].get('commit', '').split(',')[-1]}" for f in names)
    fig.suptitle(f"mm-scheduler in a real SGLang {summary['sglang']} server, {summary['gpu']} (latest runs: {latest})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def with_last_finishers(result: dict, archive: Path) -> dict:
    """``result`` with each Poisson run's last finisher (:func:`exports.last_finisher`) filled in from the run's
    archive (SGLang's per-request export in ``gpu-serve-<family>.tar.xz``) where the harness did not record it
    (runs before it did). Nothing else is added or changed: a run recorded before ``requested`` was counts the load
    generator's warm-up request among its records, which moves its arrival span but not its last finisher. A run
    without an archive, or whose archive holds no export for its server, stays as it is."""
    missing = {tag: run for tag, run in result.get("runs", {}).items()
               if tag.startswith("poisson") and run.get("window") and "last_decode_s" not in run}
    if not missing or not archive.exists():
        return result
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(archive) as tar:
        tar.extractall(tmp, members=[m for m in tar.getmembers() if "/requests-" in m.name], filter="data")
        for tag, run in missing.items():
            for export in Path(tmp).glob(f"*/requests-{_server(tag)}"):
                run.update(last_finisher(measured_records(request_records(export, run["window"]),
                                                          run.get("requested"))))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/real_server_summary.json"))
    p.add_argument("--raw", action="append", default=[], metavar="FAMILY=DIR",
                   help="a family's unpacked gpu-serve-<family>.tar.xz, for the time breakdown")
    p.add_argument("--timeline", action="append", default=[], metavar="FAMILY=DIR@TAG",
                   help="an unpacked gpu-serve-<family>.tar.xz and a seed run in it: first_token_timeline")
    p.add_argument("--lone", action="append", default=[], metavar="FAMILY=DIR",
                   help="an unpacked gpu-serve-<family>.tar.xz with a lone run: lone_encoder_share")
    p.add_argument("--poisson", action="append", default=[], metavar="FAMILY=DIR",
                   help="an unpacked gpu-serve-<family>.tar.xz with Poisson runs: poisson_encoder_wait (repeatable; "
                        "a run on extra SGLang flags goes under shipped_config_with_flags)")
    args = p.parse_args()
    raw = dict(item.split("=", 1) for item in args.raw)
    by_family: dict[str, list[dict]] = {}
    for path in args.results:
        newest = json.loads(path.read_text())
        with_last_finishers(newest, path.parent / f"gpu-serve-{newest['family']}.tar.xz")  # serve.py's archive
        by_family.setdefault(newest["family"], []).append(newest)
    merged = {family: merge_runs(results) for family, results in by_family.items()}
    gpus = dict.fromkeys(r["gpu"] for results in by_family.values() for r in results if r.get("gpu"))
    summary = {"sglang": newest.get("sglang", ""), "gpu": ", ".join(gpus), "commit": newest.get("commit", ""),
               "families": {}}
    for family, result in merged.items():
        summary["families"][family] = family_summary(result, Path(raw[family]) if family in raw else None,
                                                     by_family[family])
    summary["plugin_settings_vs_on"] = default_candidates(summary["families"])
    for item in args.timeline:
        family, where = item.split("=", 1)
        directory, tag = where.rsplit("@", 1)
        timeline = first_token_timeline(Path(directory), merged[family], tag)
        summary["families"][family].setdefault("first_token_timeline_s", {})[tag] = timeline
    for item in args.lone:
        family, directory = item.split("=", 1)
        share = lone_encoder_share(Path(directory))
        if share:
            summary["families"][family]["lone_encoder_share"] = share
    for item in args.poisson:
        family, directory = item.split("=", 1)
        wait = poisson_encoder_wait(Path(directory))
        fam = summary["families"][family]
        if wait["flags"]:  # both servers on extra SGLang flags: beside that setup's shipped-config ratios
            fam = fam.setdefault("shipped_config_with_flags", {}).setdefault(" ".join(wait["flags"]), {})
        if "poisson_encoder_wait" in fam:
            sys.exit(f"--poisson {item}: {family} already has a Poisson encoder wait for these flags "
                     f"({fam['poisson_encoder_wait']['commit']}); give one run a family and flag set")
        fam["poisson_encoder_wait"] = wait
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.out}")
    for fam, s in summary["families"].items():
        seed = s.get("seed", {})
        print(f"{fam}: seed median TTFT {seed.get('median_ttft_ratio')} "
              f"(spread {seed.get('median_ttft_ratio_spread')}),"
              f" throughput {seed.get('throughput_ratio')}, lone {s.get('lone', {}).get('ttft_ratio')},"
              f" identical {s.get('outputs_identical')}")
        for load, v in s.get("poisson", {}).items():
            if load != "capacity_req_s":
                print(f"   poisson {load}: TTFT p50 {v['ttft_p50_ratio']} ITL p99 {v['itl_p99_ratio']} "
                      f"tok/s {v['tok_s_ratio']}")
        check = s.get("issue17_targets")
        if check:
            print(f"   issue 17 targets, shipped config medians: all met {check['all_met']}; missed "
                  f"{[t for t, v in check['targets'].items() if not v['met']]}; unmeasured {len(check['unmeasured'])}; "
                  f"not judged {list(check['not_judged'])}")
        for flags, with_flags in s.get("shipped_config_with_flags", {}).items():
            if "issue17_targets" not in with_flags:  # only a Poisson encoder wait: no shipped-config ratios
                continue
            targets = with_flags["issue17_targets"]
            print(f"   with {flags} on both servers: all met {targets['all_met']}; "
                  f"{ {t: v['median'] for t, v in targets['targets'].items()} }")
        shipped = s.get("shipped_config")
        if shipped:
            seed = shipped.get("seed", {})
            print(f"   shipped config ({len(shipped['servers'])} servers): seed TTFT "
                  f"{seed.get('median_ttft_ratio', {}).get('each')}, lone {shipped.get('lone', {}).get('ttft_ratio')}")
            for load, v in shipped.get("poisson", {}).items():
                each = {key: v.get(key, {}).get("each") for key in SHIPPED_POISSON}
                print(f"   shipped poisson {load}: TTFT p50 {each['ttft_p50_ratio']} ITL p99 {each['itl_p99_ratio']} "
                      f"tok/s {each['tok_s_ratio']} (ITL p50 {each['itl_p50_ratio']}; last finisher's first token "
                      f"{each['last_first_token_ratio']}, decode {each['last_decode_ratio']}); "
                      f"left out {v.get('runs_left_out', [])}, tok/s not judged "
                      f"{v.get('tok_s_not_judged', [])}")
                normal = v.get("normal_decode")
                if normal:
                    print(f"     neither server slow ({normal['runs']} runs): TTFT p50 "
                          f"{normal['ttft_p50_ratio']['median']} ITL p99 {normal['itl_p99_ratio']['median']} "
                          f"tok/s {normal.get('tok_s_ratio', {}).get('median')}")
            if finisher := shipped.get("last_finisher"):
                print(f"   last finisher on the plugin server: {finisher}")
        state = s.get("decode_state")
        if state:
            print(f"   slow decodes (ITL p50 > {state['slow_above_ms']} ms): plugin off "
                  f"{state['plugin_off']['slow']}/{state['plugin_off']['loads']}, on "
                  f"{state['plugin_on']['slow']}/{state['plugin_on']['loads']} (Fisher p {state['fisher_p']})")
    if plot(summary, args.out.with_suffix(".png")):
        print(f"wrote {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
