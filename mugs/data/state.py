"""The dataset's state as the workflow sees it: a fingerprint of a stat pass over the files ``mugs prepare``
would read (paths, sizes, mtimes; no file is opened), kept in ``<data.prepared_dir>.state.json``.

Snakemake compares only a directory's own mtime, which a change inside a class folder leaves alone,
and DVC would hash every raw file (140 GB for ImageNet) to notice one. Instead the workflow refreshes
this small file at every invocation (``mugs data-state``; Snakemake also does it while parsing) and
``prepare`` takes it as its input: the file is rewritten only when the stat pass differs, so an
untouched tree reruns nothing and a modified, added or removed image reruns ``prepare`` and what
follows. The fingerprint holds mtimes, so it is specific to the machine's copy of the data; it lives
beside the prepared directory (DVC deletes a stage's outputs before running it), never beside the data.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mugs.config import DataConfig
from mugs.data.prepare import _scan_class_dir, prepare_workers
from mugs.data.sources import FASHION_MNIST_FILES, imagefolder_layout
from mugs.files import atomic_write_text


def state_path(config: DataConfig) -> Path:
    """Where the fingerprint of ``config.root`` is kept: beside ``config.prepared_dir``."""
    return Path(f"{config.prepared_dir}.state.json")


def data_state(config: DataConfig) -> dict[str, Any]:
    """The fingerprint of the files ``mugs prepare`` would read from ``config.root``: their number, total
    size and a SHA-256 over every ``(path, size, mtime)`` and every unusable entry it would report.
    Raises :class:`~mugs.data.sources.DataError` when the root is missing or not laid out as expected.
    """
    root = Path(config.root)
    lines: list[str] = []
    if config.source == "fashion-mnist":
        for name in sorted({name for pair in FASHION_MNIST_FILES.values() for name in pair}):
            try:
                info = os.stat(root / name)
            except OSError as error:
                lines.append(f"{name}\0missing: {error.strerror}")
            else:
                lines.append(f"{name}\0{info.st_size}\0{info.st_mtime_ns}")
    else:
        _, layout, not_classes = imagefolder_layout(root, config.classes)
        lines.extend(f"{path}\0not a class: {reason}" for _, path, reason in not_classes)
        class_dirs = [d for split in layout.values() for d in split]
        # the listings in threads, as prepare's scan does: the stat calls release the GIL
        with ThreadPoolExecutor(max_workers=max(prepare_workers(config.workers), 4)) as threads:
            listings = list(threads.map(_scan_class_dir, class_dirs))
        for _, (files, problems, ignored) in listings:
            lines.extend(f"{rel}\0{size}\0{mtime}" for rel, size, mtime in files)
            lines.extend(f"{rel}\0bad: {reason}" for rel, reason in problems)
            lines.append(f"ignored\0{ignored}")
        coarse = root / "coarse.json"
        if coarse.is_file():
            info = coarse.stat()
            lines.append(f"coarse.json\0{info.st_size}\0{info.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return {"root": config.root, "source": config.source, "entries": len(lines), "sha256": digest}


def refresh_data_state(config: DataConfig) -> bool:
    """Write the fingerprint to :func:`state_path` when it differs from the one there; True if written.

    An unchanged file keeps its mtime, which is what Snakemake compares.
    """
    path = state_path(config)
    text = json.dumps(data_state(config), indent=1, sort_keys=True) + "\n"
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return True
