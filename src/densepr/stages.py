"""Resumable multi-stage jobs: a stage is skipped when its output exists and was made from the same inputs.

A :class:`Stage` is a name, a ``build`` function that writes its outputs (and returns a value),
a ``load`` function that reads them back, its settings, the stages it reads (``upstream``) and
its output paths. Its *fingerprint* is the sha256 of a canonical JSON of (name, settings, the
upstream stages' fingerprints, :data:`CODE_VERSION`).

When a stage's build returns, :class:`StageRunner` writes ``<out>/stages/<name>.json`` (the
*record*: fingerprint, settings, when it finished, its wall seconds, and what it wrote) last and
atomically; the old record is removed before the build starts, so a stage killed midway has no
record and runs again. On the next run a stage is skipped when its record exists, holds the new
fingerprint and its outputs verify:

- a directory artefact with a ``manifest.json`` (the crash-safe artefacts of
  :mod:`densepr.fileio`): its manifest is the one recorded (sha256) and its files check against
  it (:func:`~densepr.fileio.read_manifest`, the cheap ``sample`` check: sizes, sha256 of small
  files, sampled sha256 of large ones);
- any other file (or every file of a directory without a manifest): size and sha256 as recorded.

Otherwise it runs again; a corrupt output is rebuilt, never used. A ``resumable`` stage (hours of
reading) also keeps finished pieces of its work in ``<out>/stages/<name>.partial/``, tagged with its
fingerprint: a killed build resumes from them, pieces of other inputs are discarded, and the
directory goes once the stage is recorded. A setting added to a stage later names the value earlier
runs had (``added``): at that value it stays out of the fingerprint, so those runs stay current. A changed setting changes that
stage's fingerprint and so (through ``upstream``) every fingerprint downstream: those stages
rerun, the ones before do not. ``force_from`` reruns a stage (or group of stages) and everything
after it in ``order``. A skipped stage's value is loaded only when something asks for it
(:meth:`Done.get`), so a run whose every stage is current reads almost nothing.

Several processes (``torchrun``): every process runs the same job with its ``rank`` and a ``sync``
function (broadcast rank 0's value to all, which is also a barrier). Rank 0 decides whether a
stage is current and writes every record; a ``distributed`` stage (training) is built by every
process together, any other by rank 0 alone while the others wait, then read what it wrote.
:meth:`StageRunner.table` lists each stage, whether it ran or was skipped, and its seconds.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from densepr.errors import DenseprError
from densepr.fileio.atomic import atomic_write, read_json, write_json
from densepr.fileio.dirs import remove_tree
from densepr.fileio.manifest import MANIFEST, read_manifest, sha256_file

# Part of every fingerprint: bump it when a stage's code changes what it writes, so old caches rerun.
CODE_VERSION = "densepr-stages-1"
RECORDS = "stages"


@dataclass(frozen=True)
class Stage:
    """One step of a job: ``build()`` writes ``outputs`` and returns a value; ``load()`` reads that value back."""

    name: str
    build: Callable[[], Any]
    load: Callable[[], Any] = lambda: None
    settings: dict = field(default_factory=dict)
    upstream: Sequence[str] = ()  # names of the stages whose outputs this one reads
    outputs: Sequence[Path] = ()
    group: str | None = None  # the entry of the runner's order it belongs to (default: its name)
    distributed: bool = False  # under torchrun every process builds it (e.g. training); else rank 0 alone
    resumable: bool = False  # build(scratch) is given a directory whose partial work survives a kill (see _scratch)
    # settings added after runs were recorded, with the value those runs had: at that value a setting is left
    # out of the fingerprint, so the recorded runs stay current (e.g. {"precision": "fp32"})
    added: Mapping[str, Any] = field(default_factory=dict)

    @property
    def fingerprinted(self) -> dict:
        """The settings that enter the fingerprint: all but those at their :attr:`added` value."""
        return {k: v for k, v in self.settings.items() if not (k in self.added and self.added[k] == v)}

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ValueError(f"stage name {self.name!r}: use letters, digits, '.', '_' and '-'")


def fingerprint(name: str, settings: dict, upstream: dict[str, str], version: str = CODE_VERSION) -> str:
    """sha256 of the canonical JSON of a stage's name, settings, upstream fingerprints and code version."""
    key = {"stage": name, "settings": settings, "upstream": upstream, "version": version}
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()).hexdigest()


def _describe(out_dir: Path, outputs: Sequence[Path]) -> dict[str, dict]:
    """What a stage wrote, for its record: each artefact directory's manifest, each other file's size and sha256."""
    found: dict[str, dict] = {}
    for p in outputs:
        p = Path(p)
        if p.is_dir() and (p / MANIFEST).is_file():
            kind = read_json(p / MANIFEST).get("kind")
            found[_rel(out_dir, p)] = {"manifest": {"kind": kind, "sha256": sha256_file(p / MANIFEST)}}
            continue
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            if not f.is_file():
                raise DenseprError(f"{f}: the stage finished without writing this output")
            found[_rel(out_dir, f)] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    return found


def _rel(out_dir: Path, p: Path) -> str:
    try:
        return str(p.resolve().relative_to(out_dir.resolve()))
    except ValueError:
        return str(p.resolve())


def verify_outputs(out_dir: Path, written: dict[str, dict]) -> str | None:
    """None when every output in a record is as it was written, else what differs."""
    for rel, entry in written.items():
        p = out_dir / rel
        if "manifest" in entry:
            m = p / MANIFEST
            if not m.is_file() or sha256_file(m) != entry["manifest"]["sha256"]:
                return f"{p}: its manifest is missing or not the one this stage wrote"
            try:
                read_manifest(p, entry["manifest"]["kind"], verify="sample")
            except DenseprError as e:
                return str(e)
        elif not p.is_file():
            return f"{p}: missing"
        elif p.stat().st_size != entry["bytes"] or sha256_file(p) != entry["sha256"]:
            return f"{p}: altered since the stage wrote it"
    return None


class Done:
    """A stage that ran or is current; :meth:`get` gives its value (loading a skipped stage's output once)."""

    _UNSET = object()

    def __init__(self, stage: Stage, fp: str, status: str, value: Any = _UNSET, rebuild: Callable[[], Any] | None = None) -> None:
        self.stage, self.fingerprint, self.status, self._value, self._rebuild = stage, fp, status, value, rebuild

    def get(self) -> Any:
        if self._value is Done._UNSET:
            try:
                self._value = self.stage.load()
            except DenseprError:
                if self._rebuild is None:
                    raise
                self._value = self._rebuild()  # passed the record's check yet unreadable: rebuilt, never used
        return self._value


@dataclass
class StageRunner:
    """Runs stages in ``order`` under ``out_dir``, skipping the current ones; see the module docstring."""

    out_dir: Path
    order: Sequence[str]
    force_from: str | None = None
    log: Callable[[str], None] = lambda m: None
    version: str = CODE_VERSION
    rank: int = 0  # this process among the job's processes (torchrun)
    sync: Callable[[Any], Any] = lambda value: value  # broadcast rank 0's value to every process (a barrier)
    done: dict[str, Done] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.force_from is not None and self.force_from not in self.order:
            raise DenseprError(f"--from {self.force_from!r}: no such stage; stages: {', '.join(self.order)}")

    def record_path(self, name: str) -> Path:
        return self.out_dir / RECORDS / f"{name}.json"

    def _forced(self, group: str) -> bool:
        return self.force_from is not None and self.order.index(group) >= self.order.index(self.force_from)

    def _current(self, stage: Stage, fp: str) -> str | None:
        """Why ``stage`` must run (None: it is current)."""
        if self._forced(stage.group or stage.name):
            return f"forced (--from {self.force_from})"
        path = self.record_path(stage.name)
        if not path.is_file():
            return "no record of a finished run"
        try:
            record = read_json(path)
        except DenseprError as e:
            return str(e)
        if not isinstance(record, dict) or record.get("fingerprint") != fp:
            return "inputs or settings changed"
        problem = verify_outputs(self.out_dir, record.get("wrote", {}))
        return None if problem is None else f"output unusable, rebuilding: {problem}"

    def run(self, stage: Stage) -> Done:
        """Skip ``stage`` when current, else build it and record it; returns its :class:`Done`."""
        group = stage.group or stage.name
        if group not in self.order:
            raise ValueError(f"stage {stage.name!r}: {group!r} is not in the runner's order")
        missing = [u for u in stage.upstream if u not in self.done]
        if missing:
            raise ValueError(f"stage {stage.name!r} reads {missing}, which have not run")
        fp = fingerprint(stage.name, stage.fingerprinted, {u: self.done[u].fingerprint for u in stage.upstream}, self.version)
        t0 = time.perf_counter()
        why = self.sync(self._current(stage, fp) if self.rank == 0 else None)  # rank 0 decides for all
        if why is None:
            done = Done(stage, fp, "skipped", rebuild=lambda: self._build(stage, fp))
            self.log(f"stage {stage.name}: current, skipped")
            status = "skipped"
        elif self.rank == 0 or stage.distributed:
            self.log(f"stage {stage.name}: running ({why})")
            done = Done(stage, fp, "ran", self._build(stage, fp))
            status = "ran"
        else:  # rank 0 builds it; this process reads what it wrote
            done, status = Done(stage, fp, "waited"), "waited"
        self.sync(None)  # every process leaves the stage once rank 0 has recorded it
        self.rows.append({"stage": stage.name, "status": status, "seconds": round(time.perf_counter() - t0, 2)})
        self.done[stage.name] = done
        return done

    def _build(self, stage: Stage, fp: str) -> Any:
        rec = self.record_path(stage.name)
        if self.rank == 0:
            rec.unlink(missing_ok=True)  # from here until the new record, the stage counts as not done
        t0 = time.perf_counter()
        scratch = self._scratch(stage, fp) if stage.resumable else None
        value = stage.build(scratch) if scratch is not None else stage.build()
        seconds = round(time.perf_counter() - t0, 2)
        if self.rank != 0:
            return value
        write_json(rec, {"stage": stage.name, "fingerprint": fp, "version": self.version, "settings": stage.settings,
                         "upstream": {u: self.done[u].fingerprint for u in stage.upstream},
                         "finished": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "seconds": seconds,
                         "wrote": _describe(self.out_dir, stage.outputs)})  # fmt: skip
        if scratch is not None:
            remove_tree(scratch)  # recorded: the partial work is in the outputs now
        return value

    def _scratch(self, stage: Stage, fp: str) -> Path:
        """``<out>/stages/<name>.partial/``: where a long stage keeps finished pieces (each written
        atomically), so that a killed run resumes within the stage. It holds the fingerprint it was made
        for; pieces made for other inputs or settings are discarded, never mixed in."""
        scratch = self.out_dir / RECORDS / f"{stage.name}.partial"
        tag = scratch / "fingerprint.txt"
        if scratch.exists() and not (tag.is_file() and tag.read_text(encoding="utf-8") == fp):
            remove_tree(scratch)
        if not tag.is_file():
            scratch.mkdir(parents=True, exist_ok=True)
            with atomic_write(tag) as f:
                f.write(fp)
        return scratch

    def timed(self, name: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Run a step that is not cached (always runs, on rank 0), listed in the table as ``always``."""
        t0 = time.perf_counter()
        value = fn(*args, **kw) if self.rank == 0 else None
        self.sync(None)
        self.rows.append({"stage": name, "status": "always", "seconds": round(time.perf_counter() - t0, 2)})
        return value

    def timings(self) -> dict[str, float]:
        return {r["stage"]: r["seconds"] for r in self.rows}

    def table(self) -> str:
        """A Markdown table: each stage, whether it ran or was skipped, and its wall seconds."""
        lines = ["| stage | status | seconds |", "|---|---|---:|"]
        lines += [f"| {r['stage']} | {r['status']} | {r['seconds']:.1f} |" for r in self.rows]
        total = sum(r["seconds"] for r in self.rows)
        ran = sum(r["status"] not in ("skipped", "waited") for r in self.rows)
        return "\n".join([*lines, f"| total ({ran} ran, {len(self.rows) - ran} skipped) | | {total:.1f} |"]) + "\n"
