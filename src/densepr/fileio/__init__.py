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

