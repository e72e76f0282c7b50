"""Directory artefacts: built beside their final name, swapped in whole (:func:`atomic_dir`), never
overwriting what densepr did not write (:func:`check_target`); work-directory locks (:func:`dir_lock`)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import glob
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from densepr.errors import DenseprError
from densepr.fileio.atomic import UMASK, NoSpaceError, fsync_dir, is_no_space, no_space_names, read_json
from densepr.fileio.manifest import MANIFEST


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Delete a directory artefact, its manifests first: if this is interrupted, what is left
    has no manifest, so nothing trusts (or verifies) a half-deleted artefact. A symbolic link is
    removed itself; nothing under its target is touched. Callers decide what is theirs to delete
    (:func:`writable_dir`)."""
    path = Path(path)
    if path.is_symlink():  # the link only: never what it points to (an index, a user's folder)
        path.unlink()
        return
    if not path.exists():
        return
    for top, _, names in os.walk(path):  # links inside are not followed (os.walk, like rmtree)
        if MANIFEST in names:
            Path(top, MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def check_target(final: str | os.PathLike[str], kind: str, own: tuple[str, ...] = ()) -> None:
    """Refuse to (re)build a ``kind`` artefact at ``final`` unless ``final`` is absent, an empty
    directory, a ``kind`` artefact (its manifest says so), or a directory without manifest that
    holds only files a ``kind`` build writes (``own``: file name patterns, and directory name
    patterns ending in ``/``; an interrupted build, or a run directory's parts).

    Raises:
        DenseprError: ``final`` is a file, holds an artefact of another kind, or holds files
            densepr did not write there; they are never overwritten.
    """
    final = Path(final)
    if not final.exists():
        return
    advice = f"write the {kind} elsewhere, or delete {final} first"
    if not final.is_dir():
        raise DenseprError(f"{final}: is a file, not a {kind!r} directory; refusing to replace it ({advice})")
    mpath = final / MANIFEST
    if mpath.exists():
        try:
            data = read_json(mpath)
        except DenseprError:
            data = None
        found = data.get("kind") if isinstance(data, dict) else None
        if found != kind:
            what = f"a densepr {found!r} artefact" if found else "an unreadable manifest"
            raise DenseprError(f"{final}: holds {what} ({mpath}), not a {kind!r}; refusing to overwrite it ({advice})")
        return
    foreign = sorted(p.name for p in final.iterdir() if not _owned(p, own))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise DenseprError(f"{final}: not empty and not a {kind!r} artefact densepr wrote (it holds {foreign[0]!r}{more}, "
                           f"and no {MANIFEST}); refusing to overwrite it ({advice})")  # fmt: skip


def _owned(p: Path, own: tuple[str, ...]) -> bool:
    """``p`` (an entry of a directory being rebuilt) matches a pattern of ``own``: a file pattern, or a
    directory pattern ending in ``/``; a symbolic link never does (writing through it reaches elsewhere)."""
    if p.is_symlink():
        return False
    if p.is_dir():
        return any(pat.endswith("/") and fnmatch.fnmatchcase(p.name, pat[:-1]) for pat in (*own, ".*.building-*/", ".*.old-*/"))
    return p.is_file() and any(fnmatch.fnmatchcase(p.name, pat) for pat in (*own, ".*.tmp"))


def writable_dir(final: str | os.PathLike[str], kind: str, own: tuple[str, ...] = ()) -> Path:
    """Where a ``kind`` artefact may be (re)written in place of ``final``, checked by :func:`check_target`:
    ``final`` itself, or, when ``final`` is a symbolic link, its target, under the same rules (the link is
    kept). The one check every writer makes before it writes or deletes anything at ``final``."""
    final = Path(final)
    if not final.is_symlink():
        check_target(final, kind, own)
        return final
    target = final.resolve()  # rebuild where the link points, keep the link
    try:
        check_target(target, kind, own)
    except DenseprError as e:  # name the path the user gave, and where it leads
        raise DenseprError(f"{final} (a link to {target}): {str(e).removeprefix(f'{target}: ')}") from None
    return target


_HOST = socket.gethostname().replace("/", "_").replace("@", "_") or "host"


def sibling_prefix(final: Path, what: str) -> str:
    """Prefix of a sibling work directory of ``final``: ``.NAME.WHAT-PID@HOST-`` (then random)."""
    return f".{final.name}.{what}-{os.getpid()}@{_HOST}-"


def sibling_abandoned(path: Path, final: Path, what: str) -> bool:
    """True for a sibling work directory left by a process of this host that no longer runs."""
    rest = path.name[len(f".{final.name}.{what}-") :]
    pid, _, host = rest.partition("@")
    if not pid.isdigit() or host.rsplit("-", 1)[0] != _HOST:
        return False  # another machine's (shared filesystem): not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


LOCK = ".densepr.lock"


@contextlib.contextmanager
def dir_lock(directory: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory/.densepr.lock`` for the block, so two jobs never write one
    directory at once: a second is refused at once, told who holds it (pid and host, written in the file).
    The kernel drops the lock when its holder exits or is killed, so a lock file left behind blocks nothing."""
    import fcntl

    directory = Path(directory)
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "another process"
            raise DenseprError(f"{directory}: another {what} is running in it ({holder}); wait for it to end, "
                               f"or give another output directory") from None  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname() or 'this host'}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _clean_stale(final: Path) -> None:
    """Remove build directories of killed builds of ``final``; put back an old version a crash
    left aside mid-swap (only the fallback swap has that window) if ``final`` is missing."""
    for p in final.parent.glob(f".{glob.escape(final.name)}.old-*"):
        if sibling_abandoned(p, final, "old"):
            if not final.exists() and (p / MANIFEST).is_file():
                os.rename(p, final)
            else:
                remove_tree(p)
    for p in final.parent.glob(f".{glob.escape(final.name)}.building-*"):
        if sibling_abandoned(p, final, "building"):
            remove_tree(p)


def _fsync_tree(directory: Path) -> None:
    """fsync every file under ``directory``, then the directories (so a swap publishes durable data)."""
    for p in sorted(directory.rglob("*"), key=lambda p: -len(p.parts)):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(directory)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # kernel or filesystem without it
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def install_dir(build: str | os.PathLike[str], final: str | os.PathLike[str], kind: str | None) -> None:
    """Swap the complete ``kind`` artefact ``build`` into place at ``final``, then delete the old one.

    ``build`` must hold its manifest (written last by its builder; ``kind`` None: a directory of parts
    with manifests of their own, see :func:`atomic_dir`). Its files are fsync'ed, then
    the two directories are exchanged atomically (``renameat2(RENAME_EXCHANGE)``; where that is
    unavailable, ``final`` is renamed aside and ``build`` renamed in). The old version's files
    are then unlinked, never rewritten: a process that has them open or memory-mapped keeps
    reading them until it reloads.
    """
    build, final = Path(build), Path(final)
    mpath = build / MANIFEST
    data = read_json(mpath) if mpath.is_file() and kind is not None else None
    if kind is not None and (not isinstance(data, dict) or data.get("kind") != kind):
        raise DenseprError(f"{build}: no {kind} manifest; an incomplete build is never installed")
    _fsync_tree(build)
    if not final.exists():
        os.rename(build, final)
    elif _exchange(build, final):
        fsync_dir(final.parent)
        remove_tree(build)  # now the old version
        return
    else:
        aside = Path(tempfile.mkdtemp(prefix=sibling_prefix(final, "old"), dir=final.parent))
        os.rename(final, aside)  # onto the empty directory mkdtemp made
        try:
            os.rename(build, final)
        except BaseException:
            os.rename(aside, final)
            raise
        fsync_dir(final.parent)
        remove_tree(aside)
        return
    fsync_dir(final.parent)


def _file_being_written(directory: Path) -> Path | None:
    """Best guess at the file a library was writing (by name) into ``directory`` when it failed:
    a ``.npy`` shorter than its header says, else the last one written (mtime, then inode)."""
    files = [p for p in directory.rglob("*") if p.is_file()] if directory.is_dir() else []
    for p in files:
        if p.suffix == ".npy":
            with contextlib.suppress(Exception), open(p, "rb") as fh:
                fmt = np.lib.format
                major, _ = fmt.read_magic(fh)
                shape, _, dtype = fmt.read_array_header_1_0(fh) if major == 1 else fmt.read_array_header_2_0(fh)
                if p.stat().st_size < fh.tell() + int(np.prod(shape)) * dtype.itemsize:
                    return p
    return max(files, key=lambda p: (p.stat().st_mtime_ns, p.stat().st_ino), default=None)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], kind: str, own: tuple[str, ...] = (), manifest: bool = True) -> Iterator[Path]:
    """(Re)build the directory artefact ``final`` beside it, then swap it in whole.

    Yields a fresh, empty sibling directory (``.NAME.building-PID@HOST-XXXX``); the caller
    writes the artefact's files there and, last, its manifest (:func:`write_manifest`). On
    success it is installed at ``final`` by :func:`install_dir` (fsync, atomic swap, old version
    deleted). On any exception, a full disk included, the build directory is deleted and
    ``final`` is left exactly as it was (still loadable); a disk-full error becomes a
    :class:`NoSpaceError` naming the file being written. Build directories of killed builds are
    removed by the next build of the same artefact.

    ``final`` is first checked by :func:`check_target` (``own``: names of the files this kind
    writes): an artefact of another kind, or anything densepr did not write, is never
    overwritten. Rebuilding needs room for both versions until the swap. ``manifest=False``: a
    directory of parts that carry their own manifests (a bi-encoder's two encoders); it is installed
    once the caller returns, without a manifest of its own.
    """
    final = writable_dir(final, kind, own)
    existed = final.exists()
    with no_space_names(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(final)
        build = Path(tempfile.mkdtemp(prefix=sibling_prefix(final, "building"), dir=final.parent))
    try:
        os.chmod(build, 0o777 & ~UMASK)
        yield build
        install_dir(build, final, kind if manifest else None)
    except BaseException as e:
        full = isinstance(e, NoSpaceError) or is_no_space(e, build)
        newest = _file_being_written(build) if full else None
        remove_tree(build)
        if full:
            cause = e.error if isinstance(e, NoSpaceError) else e
            named = e.path if isinstance(e, NoSpaceError) else (getattr(e, "filename", None) or newest or build)
            with contextlib.suppress(ValueError):  # name the file by its final path, not the build directory's
                named = final / Path(named).relative_to(build)
            raise NoSpaceError(named, cause, final if existed else None) from cause
        raise
