"""Crash-safe file writing and artefact manifests.

Modules: :mod:`~densepr.fileio.atomic` (one file written atomically, JSON, ``.npy``, disk-full errors),
:mod:`~densepr.fileio.manifest` (manifests and checksums), :mod:`~densepr.fileio.dirs` (directory artefacts
swapped in whole, locks), :mod:`~densepr.fileio.pages` (releasing mapped pages, RSS), :mod:`~densepr.fileio.ids`
(passage-id files).

Every artefact densepr writes goes to a temporary file in the destination directory, is
fsync'ed, then renamed over the final name, so an interrupted run never leaves a
half-written file under a name a later stage would trust. Directory artefacts (BM25
index, embeddings, FAISS index) carry a ``manifest.json`` listing each file's size and
sha256, checked when loaded.

Directory artefacts are (re)built beside their final name and swapped in whole
(:func:`atomic_dir`): the previous version's files are never rewritten, only unlinked once the
new version is in place, so a process that has them open or memory-mapped (a running server)
keeps reading the old version until it reloads, and a failed or disk-full build leaves the
previous version as it was. A directory holding another artefact kind, or anything densepr did
not write, is never overwritten.

Checks on load (``read_manifest(..., verify="sample")``, the default): every file's size, then
its sha256 if it is at most ``FULL_HASH_BYTES`` (32 MiB), else a sampled sha256 over
``SAMPLE_BLOCKS`` blocks of 64 KiB (the first, the last and the rest evenly spaced), recorded
in the manifest when it was written. ``densepr verify`` checks every byte (full sha256).
"""


# The package's API, importable from ``densepr.fileio`` as before the split (one import line for a caller).
from densepr.fileio.atomic import (
    NoSpaceError,
    atomic_path,
    atomic_write,
    file_name,
    fsync_dir,
    is_no_space,
    read_json,
    save_npy,
    write_json,
)
from densepr.fileio.dirs import LOCK, atomic_dir, check_target, dir_lock, install_dir, remove_tree, writable_dir
from densepr.fileio.identity import file_identity
from densepr.fileio.ids import IdLines, open_ids, read_ids, write_ids
from densepr.fileio.manifest import (
    MANIFEST,
    check_dir_manifest,
    check_file,
    file_entry,
    read_manifest,
    sha256_file,
    verify_tree,
    write_dir_manifest,
    write_manifest,
)
from densepr.fileio.pages import MappedPages, release_pages, rss_bytes, save_npy_released

__all__ = [
    "LOCK", "MANIFEST", "IdLines", "MappedPages", "NoSpaceError", "atomic_dir", "atomic_path", "atomic_write", "check_dir_manifest",
    "check_file", "check_target", "dir_lock", "file_entry", "file_identity", "file_name", "fsync_dir", "install_dir",
    "is_no_space", "open_ids", "read_ids", "read_json", "read_manifest", "release_pages", "remove_tree", "rss_bytes",
    "save_npy", "save_npy_released", "sha256_file", "verify_tree", "writable_dir", "write_dir_manifest", "write_ids",
    "write_json", "write_manifest",
]  # fmt: skip
