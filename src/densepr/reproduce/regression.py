"""The regression check: a run's figures against the committed ones (``resources/expected-embedded.json``).

What is committed (:func:`expected_entry`, written by :func:`record_expected`), how a run is compared
(:func:`check_against`, within the profile's tolerance), and the policy ``densepr reproduce`` applies
(:func:`regression_check`): only a run on the embedded defaults is compared with the packaged figures
(an explicit expected file is compared whatever the setup), and end-to-end EM recorded with another
reader recipe is left unchecked.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from densepr.fileio.atomic import read_json, write_json
from densepr.reproduce.profiles import PROFILES, ReproduceConfig
from densepr.train.config import span_loss_name

EXPECTED_RESOURCE = "expected-embedded.json"


def load_expected(path: str | os.PathLike[str] | None = None) -> dict:
    """The committed figures: ``{profile: {"tolerance": points, "results": {...}}}``."""
    if path is not None:
        return read_json(path)
    return json.loads(resources.files("densepr").joinpath("resources", EXPECTED_RESOURCE).read_text(encoding="utf-8"))


def check_against(summary: dict, expected: dict, profile: str) -> list[str]:
    """Every metric that differs from the committed figure by more than the tolerance.

    Returns:
        Human-readable differences (empty when everything is within tolerance).
    """
    if profile not in expected:
        return [f"no committed figures for profile {profile!r}"]
    ref, tol = expected[profile]["results"], float(expected[profile]["tolerance"])
    problems = []
    for ds, entry in ref.items():
        got = summary["results"].get(ds)
        if got is None:
            problems.append(f"{ds}: not evaluated")
            continue
        for key in ("n_all", "n_answerable"):
            if got[key] != entry[key]:
                problems.append(f"{ds}: {key} {got[key]} != committed {entry[key]}")
        for method, rep in entry["methods"].items():
            for subset, metrics in rep.items():
                for name, value in metrics.items():
                    if name == "n":
                        continue
                    now = got["methods"].get(method, {}).get(subset, {}).get(name)
                    if now is None or abs(now - value) > tol:
                        problems.append(f"{ds} {method} {subset} {name}: {now} vs committed {value} (tolerance ±{tol})")
    if "qa" in expected[profile] and not reader_recipe_changed(summary, expected, profile):
        qa_tol, got_qa = float(expected[profile].get("qa_tolerance", tol)), qa_figures(summary.get("qa"))
        for key, value in expected[profile]["qa"].items():
            now = got_qa.get(key)
            if now is None or abs(now - value) > qa_tol:
                problems.append(f"qa {key}: {now} vs committed {value} (tolerance ±{qa_tol})")
    return problems


# What a committed config without these ReaderPlan fields trained: the recipe before each field was added.
READER_PLAN_BEFORE = {"head_lr": None, "span_loss": "positive", "epochs": 1, "dropout": 0.0, "read_precision": "fp32", "cloze": 0, "model": "embedded",
                      "train_precision": None}


def reader_recipe_changed(summary: dict, expected: dict, profile: str) -> bool:
    """True when the committed EM figures were recorded with another reader recipe (``ReaderPlan``) than
    this run's: they measure another reader, so :func:`check_against` leaves EM unchecked (the caller
    says so) until they are recorded again; retrieval figures are checked either way."""
    recorded = expected.get(profile, {}).get("config", {}).get("reader")
    now = summary.get("config", {}).get("reader")
    if recorded is None or now is None:
        return False
    # JSON has lists, not tuples; a field recorded before it existed had the value it now names explicitly;
    # a span loss recorded under its old name ("dpr") is the same loss
    def plan(p: dict) -> dict:
        p = {**READER_PLAN_BEFORE, **p}
        return json.loads(json.dumps({**p, "span_loss": span_loss_name(p["span_loss"])}))

    return plan(recorded) != plan(now)


def qa_figures(qa: dict | None) -> dict[str, float]:
    """End-to-end EM of a run's reader stages, flat: ``{"<set> <mode> <rule> @<k> <all|answerable>": EM}``,
    rule ``paper`` (DPR's selection) or ``fused`` (the tuned one)."""
    flat: dict[str, float] = {}
    for ds, res in ((qa or {}).get("sets") or {}).items():
        for mode, rep in res["modes"].items():
            for rule, per_k in (("paper", rep["k"]), ("fused", rep.get("fused", {}).get("k", {}))):
                for k, m in per_k.items():
                    flat[f"{ds} {mode} {rule} @{k} all"] = m["em"]
                    flat[f"{ds} {mode} {rule} @{k} answerable"] = m["em_answerable"]
    return flat


def expected_entry(summary: dict, tolerance: float, qa_tolerance: float | None = None) -> dict:
    """The part of a run's summary that is committed as the expected figures (EM too, when the run read)."""
    qa = qa_figures(summary.get("qa"))
    return {"tolerance": tolerance, "date": summary["date"], "machine": summary["machine"], "config": summary["config"],
            "results": summary["results"], **({"qa_tolerance": qa_tolerance or tolerance, "qa": qa} if qa else {})}  # fmt: skip


def uses_defaults(cfg: ReproduceConfig) -> bool:
    """Only a run on the embedded defaults can be compared with the committed figures."""
    default = ReproduceConfig(profile=cfg.profile, device=cfg.device)  # the device: a GPU profile checks it
    # gradient caching computes the same loss in pieces: its run is checked against the same figures
    plan = replace(cfg.plan, grad_cache_chunk=0) if cfg.plan is not None else None
    return cfg.encoder is None and plan == default.plan and cfg.datasets == default.datasets and cfg.tune_sets == default.tune_sets and cfg.k == default.k and cfg.depth == default.depth and cfg.reader == default.reader


@dataclass(frozen=True)
class RegressionCheck:
    """What :func:`regression_check` found (the caller reports it)."""

    compared: bool  # False: not compared (the run does not use the embedded defaults and no expected file was given)
    em_unchecked: bool = False  # the committed EM was recorded with another reader recipe: left unchecked
    problems: tuple[str, ...] = ()  # every figure outside the tolerance (see check_against)


def regression_check(summary: dict, cfg: ReproduceConfig, expected: str | os.PathLike[str] | None = None) -> RegressionCheck:
    """Compare a run with the committed figures (``expected``: a file of them; default: the packaged ones).

    The packaged figures are for the embedded defaults: a run on another setup is not compared with them
    (``compared=False``); an explicit ``expected`` says what this run should match, so it is compared whatever the setup.
    """
    if expected is None and not uses_defaults(cfg):
        return RegressionCheck(compared=False)
    committed = load_expected(expected)
    if expected is None and PROFILES[cfg.profile].gpu and cfg.profile not in committed:
        return RegressionCheck(compared=False)  # a GPU profile's first runs: nothing recorded yet to compare with
    problems = check_against(summary, committed, cfg.profile)
    return RegressionCheck(True, reader_recipe_changed(summary, committed, cfg.profile), tuple(problems))


def record_expected(summary: dict, path: Path, profile: str, tolerance: float | None = None) -> None:
    """Record a run's figures as the expected ones for ``profile`` in ``path`` (other profiles' entries kept);
    ``tolerance``: allowed difference in points (default: the profile's)."""
    current = read_json(path) if path.is_file() else {}
    prof = PROFILES[profile]
    current[profile] = expected_entry(summary, tolerance if tolerance is not None else prof.tolerance, prof.qa_tolerance)
    write_json(path, current)
