"""File plumbing under everything else: atomic writes, copies and links, stale temporaries, hashing
and the output guard.

This module imports nothing of the package (and no torch), so every layer, down to the data
sources that prepare's worker processes import, can use it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "OutputError",
    "atomic_copy",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output",
    "file_sha256",
    "publish_link",
    "remove_stale_temporaries",
]


class OutputError(ValueError):
    """An output cannot be written where the user asked for it; the message names the user's path."""


def _temporary_name(path: Path) -> Path:
    """A fresh name beside ``path`` of the form ``.<name>.<random>.tmp``, the pattern
    :func:`remove_stale_temporaries` deletes."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def _temporary_beside(path: Path) -> tuple[int, Path]:
    """A new, exclusive temporary file next to ``path``, created with the permissions of any file
    the user writes (mode 0666 less the umask; ``tempfile.mkstemp`` would make it 0600, which a
    project group on a shared file system could not read). An error names ``path``, not the
    temporary file the user never heard of."""
    while True:
        temporary = _temporary_name(path)
        try:
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temporary
        except FileExistsError:
            continue
        except OSError as error:
            raise OSError(error.errno, f"cannot write {path}: {error.strerror}") from None


def _sync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` through ``write(handle)`` so that readers see either the old file or the
    complete new one.

    The data go to a temporary file in the same directory, are flushed and fsync'ed, and the file is
    renamed over ``path``; the directory is fsync'ed so the rename survives a crash. A writer killed
    before the rename leaves a ``.<name>.<random>.tmp`` file, which :func:`remove_stale_temporaries`
    deletes when the run starts again.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = _temporary_beside(path)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace the file ``path`` with ``data`` atomically (as :func:`atomic_write`)."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Replace the text file ``path`` atomically (as :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode())


def atomic_copy(source: str | Path, target: str | Path) -> Path:
    """Replace ``target`` with a copy of ``source`` atomically (as :func:`atomic_write`)."""
    with open(source, "rb") as original:
        return atomic_write(target, lambda handle: shutil.copyfileobj(original, handle))


def publish_link(source: str | Path, target: str | Path) -> Path:
    """Make ``target`` name the same file as ``source`` (a hard link: no second write; a copy on file
    systems without hard links).

    The link is made under a temporary name and renamed, so ``target`` is either absent (or its old
    self) or complete whenever the process dies.
    """
    source, target = Path(source), Path(target)
    temporary = _temporary_name(target)
    try:
        os.link(source, temporary)
    except OSError:  # file systems without hard links
        return atomic_copy(source, target)
    os.replace(temporary, target)
    _sync_directory(target.parent)
    return target


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files that writers killed before their rename left in ``directory``.

    Only for the run's single writer (it holds the run lock), so no live write is among them.
    """
    directory = Path(directory)
    stale = sorted(directory.glob(".*.tmp")) if directory.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


_CHUNK = 1 << 22
# (path, size, mtime_ns) -> digest: a multi-GB checkpoint is hashed once per process
_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (memoised on path, size and modification time)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(_CHUNK):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def _probe_writable(out: Path, directory: Path) -> None:
    """Create and remove a temporary file in ``directory``: permission bits and ``os.access`` say
    nothing for root, or on read-only, pseudo (``/proc``) and full file systems."""
    try:
        descriptor, temporary = _temporary_beside(directory / out.name)
    except OSError as error:
        raise OutputError(f"cannot write {out}: {os.strerror(error.errno)} in {directory}") from None
    os.close(descriptor)
    temporary.unlink(missing_ok=True)


def check_output(out: str | Path, inputs: Sequence[str | Path] = (), *, directory: bool = False) -> Path:
    """Refuse (:class:`OutputError` naming ``out``), before any work, an output ``out`` (a file, or
    with ``directory`` a directory) that cannot be written or that is one of ``inputs`` (also
    through a link). Writability is tried by creating and removing a temporary file where the
    output will go (in the nearest existing folder when ``out``'s own does not exist yet)."""
    out = Path(out)
    if out.exists():
        if out.is_dir() != directory:
            kind = "is a directory" if out.is_dir() else "is a file, not a directory"
            raise OutputError(f"cannot write {out}: it {kind}")
        same = [str(source) for source in inputs if Path(source).exists() and out.samefile(source)]
        if same:
            raise OutputError(
                f"{out} is the input {same[0]}: refusing to overwrite it; choose another output"
            )
        if not directory and not os.access(out, os.W_OK):
            raise OutputError(f"cannot write {out}: it is read-only")
    folders = ([out] if directory else []) + list(out.absolute().parents)
    parent = next(folder for folder in folders if folder.exists())
    if not parent.is_dir():
        raise OutputError(f"cannot write {out}: {parent} is a file, not a directory")
    _probe_writable(out, parent)
    return out
