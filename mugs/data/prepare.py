"""``mugs prepare``: scan a source, decode every image once, and write the manifests training reads.

Outputs in ``DataConfig.prepared_dir`` (all deterministic: the same source and settings give the same
bytes on any machine and with any number of worker processes):

- ``manifest-{train,val,test}.jsonl``: one ``{"path", "label", "coarse", "size", "sha256"}`` per image,
  sorted by path (Fashion-MNIST paths are ``<idx file>#<row>``);
- ``classes.json``: class names, coarse class names and each class's coarse label;
- ``stats.json``: per-channel mean/std of the train split on the [0, 1] scale;
- ``bad-files.json``: every file that could not be used, with the reason;
- ``duplicates.json``: identical images (by content hash) found in more than one split;
- ``summary.json``: counts, the settings that shaped the result and a hash of each manifest.

The directory is written next to the old one and swapped in only when complete, so a failed or
interrupted run leaves the previous preparation as it was.  Per-file results are cached in the sibling
``<prepared_dir>.cache/files.sqlite`` keyed by ``(path, size, mtime)``: a rerun decodes only new or
changed files, and an interrupted scan resumes where it stopped.  The cache lives outside the prepared
directory because it holds machine-specific mtimes and DVC deletes a stage's outputs before rerunning it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sqlite3
import stat
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError
from rich.console import Console

from mugs.config import DataConfig
from mugs.data.sources import (
    FASHION_MNIST_COARSE,
    FASHION_MNIST_COARSE_CLASSES,
    FASHION_MNIST_FILES,
    IMAGE_EXTENSIONS,
    ClassDir,
    DataError,
    check_fashion_mnist_root,
    fashion_mnist_split,
    imagefolder_coarse,
    imagefolder_layout,
    loop_reason,
    stat_reason,
    to_rgb,
)
from mugs.fashion_mnist import FASHION_MNIST_CLASSES
from mugs.progress import PlainProgress, progress_display

if TYPE_CHECKING:
    from rich.progress import Progress

FORMAT_VERSION = 1
# Bump when the per-file verification changes, so cached results from older code are discarded.
CACHE_VERSION = "1"
SUMS = 7  # per image: sum of R, G, B; sum of squares of R, G, B; pixel count


@dataclass
class PrepareSummary:
    """What one ``mugs prepare`` run produced; ``decoded``/``cached`` count files this run verified."""

    prepared_dir: Path
    source: str
    counts: dict[str, int]
    bad_files: int
    duplicates: int
    ignored_files: int
    decoded: int = 0
    cached: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Split:
    """The rows of one split before writing; ``sums`` is ``[N, SUMS]`` int64 (imagefolder only)."""

    paths: list[str]
    labels: np.ndarray
    sizes: np.ndarray
    digests: list[str]
    sums: np.ndarray | None = None

    def take(self, keep: np.ndarray) -> _Split:
        index = np.flatnonzero(keep)
        return _Split(
            [self.paths[i] for i in index],
            self.labels[index],
            self.sizes[index],
            [self.digests[i] for i in index],
            None if self.sums is None else self.sums[index],
        )


def run_prepare(config: DataConfig, *, progress: bool = True) -> PrepareSummary:
    """Prepare ``config.source`` into ``config.prepared_dir``; raises :class:`DataError` on bad input."""
    start = time.perf_counter()
    console = Console(stderr=True, quiet=not progress)
    out = Path(config.prepared_dir)
    _recover_interrupted_swap(out)
    _check_output_dir(out)

    with progress_display(progress) as bar:
        if config.source == "fashion-mnist":
            result = _prepare_fashion_mnist(config, bar)
        else:
            result = _prepare_imagefolder(config, bar, out)
    splits, meta = result["splits"], result["meta"]
    bad: list[dict[str, str]] = result["bad"]

    if "val" not in splits:
        if config.val_fraction <= 0:
            raise DataError(
                f"{config.root} has no val split and data.val_fraction is 0; set a fraction to hold out "
                "(checkpoint selection must not look at the test split)"
            )
        val_mask = stratified_holdout(splits["train"].labels, config.val_fraction, config.split_seed)
        splits["val"] = splits["train"].take(val_mask)
        splits["train"] = splits["train"].take(~val_mask)
        meta["val_split"] = {
            "held_out_of": "train",
            "fraction": config.val_fraction,
            "seed": config.split_seed,
        }
    else:
        meta["val_split"] = {"held_out_of": None}
    classes = meta["classes"]
    for name, split in splits.items():
        if not split.paths:
            raise DataError(f"the {name} split of {config.root} is empty")
        counts = np.bincount(split.labels, minlength=len(classes))
        if (counts == 0).any():
            empty = [classes[i] for i in np.flatnonzero(counts == 0)]
            raise DataError(f"class(es) {empty[:10]} have no images in the {name} split of {config.root}")

    if splits["train"].sums is not None:
        totals = [int(v) for v in splits["train"].sums.sum(axis=0, dtype=np.int64)]
    else:
        totals = result["train_sums"](splits["train"])
    mean, std = mean_std(totals[0:3], totals[3:6], totals[6])
    stats = {"mean": mean, "std": std, "images": len(splits["train"].paths), "pixels": totals[6]}

    duplicates = cross_split_duplicates(splits)
    notes = []
    if duplicates:
        first = duplicates[0]["files"]
        notes.append(
            f"{len(duplicates)} image(s) occur in more than one split (same content hash), e.g. "
            f"{first[0]} and {first[1]}; listed in duplicates.json"
        )
    if bad:
        notes.append(f"skipped {len(bad)} bad file(s), e.g. {bad[0]['path']}: {bad[0]['reason']}")
    for note in notes:
        console.print(f"[yellow]warning:[/yellow] {note}", highlight=False)

    order = [s for s in ("train", "val", "test") if s in splits]
    manifests = {name: _manifest_bytes(splits[name], meta["coarse_of_class"]) for name in order}
    summary = {
        "format": FORMAT_VERSION,
        "source": config.source,
        "root": config.root,
        "splits": {name: len(splits[name].paths) for name in order},
        "manifest_sha256": {name: hashlib.sha256(data).hexdigest() for name, data in manifests.items()},
        "classes": len(classes),
        "bad_files": len(bad),
        "on_bad_image": config.on_bad_image,
        "duplicates_across_splits": len(duplicates),
        "ignored_files": meta.pop("ignored", 0),
        "settings": {
            "classes": config.classes,
            "max_per_class": config.max_per_class,
            "val_fraction": config.val_fraction,
            "split_seed": config.split_seed,
        },
        **{key: meta[key] for key in ("val_split", "modes", "source_files") if key in meta},
    }
    files = {f"manifest-{name}.jsonl": data for name, data in manifests.items()}
    files["classes.json"] = _json_bytes(
        {
            "classes": classes,
            "coarse_classes": meta["coarse_classes"],
            "coarse_of_class": meta["coarse_of_class"],
        }
    )
    files["stats.json"] = _json_bytes(stats)
    files["bad-files.json"] = _json_bytes(bad)
    files["duplicates.json"] = _json_bytes(duplicates)
    files["summary.json"] = _json_bytes(summary)
    _publish(out, files)
    seconds = time.perf_counter() - start
    console.print(
        f"prepared {config.source} → {out}: "
        + ", ".join(f"{name} {n}" for name, n in summary["splits"].items())
        + f" ({len(bad)} bad, {seconds:.1f} s)",
        highlight=False,
    )
    return PrepareSummary(
        prepared_dir=out,
        source=config.source,
        counts=summary["splits"],
        bad_files=len(bad),
        duplicates=len(duplicates),
        ignored_files=summary["ignored_files"],
        decoded=result.get("decoded", 0),
        cached=result.get("cached", 0),
        seconds=seconds,
        warnings=notes,
    )


# ----------------------------------------------------------------------------------------- helpers


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the validation images: ``round(fraction * n_c)`` of each class ``c`` (at least one
    when the class has two or more, never all), drawn by a generator seeded with ``(seed, c)`` so one
    class's draw does not depend on the others.
    """
    mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        index = np.flatnonzero(labels == label)
        n_val = int(np.floor(fraction * len(index) + 0.5))
        n_val = min(max(n_val, 1), len(index) - 1) if len(index) >= 2 else 0
        rng = np.random.default_rng([seed, int(label)])
        mask[index[rng.permutation(len(index))[:n_val]]] = True
    return mask


def mean_std(sums: list[int], squares: list[int], count: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std on the [0, 1] scale from exact integer sums of 8-bit values.

    ``var = (N·Σx² − (Σx)²) / N²`` is evaluated in integers, so there is no cancellation and the result
    does not depend on how the sums were split between processes.
    """
    if count <= 0:
        raise DataError("cannot compute channel statistics of an empty train split")
    mean = [s / (255 * count) for s in sums]
    std = [
        float(np.sqrt((count * q - s * s) / (count * count))) / 255
        for s, q in zip(sums, squares, strict=True)
    ]
    return mean, std


def cross_split_duplicates(splits: dict[str, _Split]) -> list[dict[str, Any]]:
    """Images whose content hash occurs in more than one split, with every file that holds it."""
    where: dict[str, list[tuple[str, str]]] = {}
    for name, split in splits.items():
        for path, digest in zip(split.paths, split.digests, strict=True):
            where.setdefault(digest, []).append((name, path))
    found = []
    for digest, files in where.items():
        if len({name for name, _ in files}) > 1:
            found.append({"sha256": digest, "files": sorted(f"{name}:{path}" for name, path in files)})
    return sorted(found, key=lambda d: d["files"])


def _manifest_bytes(split: _Split, coarse_of_class: list[int] | None) -> bytes:
    lines = []
    for path, label, size, digest in zip(
        split.paths, split.labels.tolist(), split.sizes.tolist(), split.digests, strict=True
    ):
        coarse = None if coarse_of_class is None else coarse_of_class[label]
        row = {"path": path, "label": label, "coarse": coarse, "size": size, "sha256": digest}
        lines.append(json.dumps(row, ensure_ascii=True, separators=(",", ":")))
    return ("\n".join(lines) + "\n").encode()


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=1, ensure_ascii=True) + "\n").encode()


def _path_key(path: str) -> tuple[str, int]:
    # "file.gz#12" sorts by row number, not as text ("#100" < "#12")
    name, sep, row = path.rpartition("#")
    return (name, int(row)) if sep and row.isdigit() else (path, -1)


# ----------------------------------------------------------------------------- output directory


def _siblings(out: Path, kind: str) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.{kind}-*")) if out.parent.is_dir() else []


def _recover_interrupted_swap(out: Path) -> None:
    """A run killed between the two renames of :func:`_publish` leaves the old output under a hidden name."""
    if not out.exists():
        for previous in reversed(_siblings(out, "previous")):
            if (previous / "summary.json").is_file():
                os.replace(previous, out)
                break
    for staging in _siblings(out, "staging"):
        pid = staging.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"data.prepared_dir {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "summary.json").is_file():
        raise DataError(
            f"data.prepared_dir {out} is not empty and holds no earlier preparation (no summary.json); "
            "refusing to replace it — choose another directory or empty it"
        )


def _publish(out: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into a fresh sibling directory, then swap it in place of ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name, data in files.items():
        with open(staging / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    previous = out.parent / f".{out.name}.previous-{os.getpid()}"
    if out.exists():
        os.replace(out, previous)
    os.replace(staging, out)
    shutil.rmtree(previous, ignore_errors=True)


# ---------------------------------------------------------------------------------- Fashion-MNIST


def _fashion_classes(selected: list[str] | None) -> list[str]:
    """The selected classes in Fashion-MNIST's order (the configuration checks that they are its own)."""
    if selected is None:
        return list(FASHION_MNIST_CLASSES)
    return [c for c in FASHION_MNIST_CLASSES if c in selected]


def _prepare_fashion_mnist(config: DataConfig, bar: Progress | PlainProgress) -> dict[str, Any]:
    root = Path(config.root)
    if not root.is_dir():
        raise DataError(
            f"dataset root {root} does not exist; copy the demo data there with "
            f"`mugs demo-data --dest {root}` (or `dvc pull`)"
        )
    check_fashion_mnist_root(root)
    classes = _fashion_classes(config.classes)
    new_label = np.full(len(FASHION_MNIST_CLASSES), -1, dtype=np.int64)
    new_label[[FASHION_MNIST_CLASSES.index(c) for c in classes]] = np.arange(len(classes))
    splits: dict[str, _Split] = {}
    arrays: dict[str, np.ndarray] = {}
    for name, (image_file, _) in FASHION_MNIST_FILES.items():
        images, labels = fashion_mnist_split(root, name)
        labels = new_label[labels]
        keep = labels >= 0
        if config.max_per_class is not None:
            # the first max_per_class rows of each class, in file order
            rank = np.zeros(len(labels), dtype=np.int64)
            for label in range(len(classes)):
                rank[labels == label] = np.arange(int((labels == label).sum()))
            keep &= rank < config.max_per_class
        index = np.flatnonzero(keep)
        task = bar.add_task(f"hashing {name}", total=len(index))
        digests = []
        for start in range(0, len(index), 4096):
            chunk = index[start : start + 4096]
            digests.extend(hashlib.sha256(images[i].tobytes()).hexdigest() for i in chunk)
            bar.advance(task, len(chunk))
        splits[name] = _Split(
            paths=[f"{image_file}#{i}" for i in index],
            labels=labels[index],
            sizes=np.full(len(index), images[0].size, dtype=np.int64),
            digests=digests,
        )
        arrays[name] = images

    def train_sums(split: _Split) -> list[int]:
        # gray replicated to RGB: the three channels share one sum
        rows = np.array([_path_key(p)[1] for p in split.paths], dtype=np.int64)
        pixels = arrays["train"][rows]
        total = int(pixels.sum(dtype=np.int64))
        square = int((pixels.astype(np.int64) ** 2).sum())
        return [total] * 3 + [square] * 3 + [int(pixels.size)]

    coarse_of_class = [FASHION_MNIST_COARSE_CLASSES.index(FASHION_MNIST_COARSE[c]) for c in classes]
    source_files = {}
    for pair in FASHION_MNIST_FILES.values():
        for name in pair:
            source_files[name] = hashlib.sha256((root / name).read_bytes()).hexdigest()
    meta = {
        "classes": classes,
        "coarse_classes": list(FASHION_MNIST_COARSE_CLASSES),
        "coarse_of_class": coarse_of_class,
        "source_files": source_files,
    }
    return {"splits": splits, "meta": meta, "bad": [], "train_sums": train_sums}


# ------------------------------------------------------------------------------------ ImageFolder


def _prepare_imagefolder(config: DataConfig, bar: Progress | PlainProgress, out: Path) -> dict[str, Any]:
    root = Path(config.root)
    classes, layout, not_classes = imagefolder_layout(root, config.classes)
    coarse = imagefolder_coarse(root, classes)
    class_dirs = [d for split in layout.values() for d in split]
    bad: list[dict[str, str]] = [{"path": p, "split": s, "reason": r} for s, p, r in not_classes]
    ignored = 0
    # 1. list every class directory, in threads: on network file systems the stat calls dominate,
    # and they release the GIL, so no worker process has to start (a warm rerun starts none)
    task = bar.add_task("scanning", total=len(class_dirs))
    listings = {}
    with ThreadPoolExecutor(max_workers=max(config.workers, 1)) as threads:
        for class_dir, listing in _map(threads, _scan_class_dir, [(d,) for d in class_dirs]):
            listings[class_dir] = listing
            bar.advance(task)
    candidates: list[tuple[ClassDir, str, int, int]] = []
    for class_dir in class_dirs:
        files, problems, n_ignored = listings[class_dir]
        ignored += n_ignored
        bad.extend({"path": p, "split": class_dir.split, "reason": r} for p, r in problems)
        if not files and not problems:
            raise DataError(f"class directory {class_dir.path} contains no images")
        if config.max_per_class is not None:
            files = files[: config.max_per_class]
        candidates.extend((class_dir, *f) for f in files)

    # 2. decode every file not already verified with the same size and mtime
    records: list[tuple | None] = [None] * len(candidates)
    cache = _Cache(Path(f"{out}.cache") / "files.sqlite")
    keys = [str((root / rel).absolute()) for _, rel, _, _ in candidates]
    for i, record in cache.lookup(keys, [(size, mtime) for _, _, size, mtime in candidates]):
        records[i] = record
    todo = [i for i, r in enumerate(records) if r is None]
    cached = len(candidates) - len(todo)
    task = bar.add_task("decoding", total=len(candidates), completed=cached)
    chunk = max(8, min(256, len(todo) // (8 * max(config.workers, 1)) or 8))
    jobs = [
        (str(root), [candidates[i][1] for i in todo[s : s + chunk]], todo[s : s + chunk])
        for s in range(0, len(todo), chunk)
    ]
    try:
        with _executor(config.workers if todo else 0) as pool:
            for (_, _, index), results in _map(pool, _verify_chunk, jobs):
                for i, record in zip(index, results, strict=True):
                    records[i] = record
                cache.store([(keys[i], candidates[i][2], candidates[i][3], records[i]) for i in index])
                bar.advance(task, len(index))
    finally:
        cache.close()

    per_split: dict[str, list[tuple[str, int, int, str, tuple]]] = {}
    modes: dict[str, int] = {}
    label_of = {name: i for i, name in enumerate(classes)}
    for (class_dir, rel, _, _), record in zip(candidates, records, strict=True):
        ok, reason_or_digest, size, mode, sums = record
        if not ok:
            bad.append({"path": rel, "split": class_dir.split, "reason": reason_or_digest})
            continue
        modes[mode] = modes.get(mode, 0) + 1
        per_split.setdefault(class_dir.split, []).append(
            (rel, label_of[class_dir.name], size, reason_or_digest, sums)
        )
    bad.sort(key=lambda b: b["path"])
    if bad and config.on_bad_image == "error":
        report = Path(f"{out}.cache") / "bad-files.json"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_bytes(_json_bytes(bad))
        listed = "\n".join(f"  {b['path']}: {b['reason']}" for b in bad[:10])
        raise DataError(
            f"{len(bad)} bad file(s) under {root} and data.on_bad_image is 'error' (full list in {report}):\n"
            + listed
            + ("\n  …" if len(bad) > 10 else "")
        )
    for class_dir in class_dirs:
        if not any(r[1] == label_of[class_dir.name] for r in per_split.get(class_dir.split, ())):
            raise DataError(f"class directory {class_dir.path} has no readable images (see bad-files.json)")

    splits = {}
    for name, rows in per_split.items():
        rows.sort(key=lambda r: r[0])
        splits[name] = _Split(
            paths=[r[0] for r in rows],
            labels=np.array([r[1] for r in rows], dtype=np.int64),
            sizes=np.array([r[2] for r in rows], dtype=np.int64),
            digests=[r[3] for r in rows],
            sums=np.array([r[4] for r in rows], dtype=np.int64).reshape(-1, SUMS),
        )
    meta = {
        "classes": classes,
        "coarse_classes": None if coarse is None else coarse[0],
        "coarse_of_class": None if coarse is None else coarse[1],
        "modes": dict(sorted(modes.items())),
        "ignored": ignored,
    }
    return {"splits": splits, "meta": meta, "bad": bad, "decoded": len(todo), "cached": cached}


def _scan_class_dir(class_dir: ClassDir) -> tuple[ClassDir, tuple[list, list, int]]:
    """``(files [(rel path, size, mtime_ns)], problems [(rel path, reason)], ignored count)`` of one class
    directory, recursing into subdirectories (following symlinks, but never into a loop).
    """
    files: list[tuple[str, int, int]] = []
    problems: list[tuple[str, str]] = []
    ignored = 0

    def walk(directory: str, rel: str, ancestors: tuple[str, ...]) -> None:
        nonlocal ignored
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as error:
            problems.append((rel, f"cannot list directory: {error.strerror}"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            entry_rel = f"{rel}/{entry.name}"
            try:
                info = os.stat(entry.path)
            except OSError as error:
                problems.append((entry_rel, stat_reason(entry.path, error)))
                continue
            if stat.S_ISDIR(info.st_mode):
                real = os.path.realpath(entry.path)
                loop = loop_reason(real, ancestors)
                if loop:
                    problems.append((entry_rel, loop))
                else:
                    walk(entry.path, entry_rel, (*ancestors, real))
            elif os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
                ignored += 1
            elif not stat.S_ISREG(info.st_mode):
                problems.append((entry_rel, "not a regular file (a FIFO, socket or device)"))
            elif info.st_size == 0:
                problems.append((entry_rel, "zero-byte file"))
            else:
                files.append((entry_rel, info.st_size, info.st_mtime_ns))

    walk(str(class_dir.path), f"{class_dir.split}/{class_dir.name}", (os.path.realpath(class_dir.path),))
    return class_dir, (files, problems, ignored)


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def verify_image(path: str) -> tuple[bool, str, int, str, tuple[int, ...]]:
    """Read and fully decode one file: ``(True, sha256, size, mode, sums)`` or ``(False, reason, …)``.

    ``sums`` are the exact integer per-channel sums and sums of squares of the RGB pixels (see
    :func:`mean_std`) and the pixel count.
    """
    try:
        data = _read_file(path)
    except PermissionError:
        return False, "unreadable: permission denied", 0, "", ()
    except OSError as error:
        return False, f"unreadable: {error.strerror or error}", 0, "", ()
    if not data:
        return False, "zero-byte file", 0, "", ()
    truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a half image must fail here, not train silently
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                mode = image.mode
                rgb = np.asarray(to_rgb(image), dtype=np.uint8)
    except UnidentifiedImageError:
        return False, "not an image: no decoder recognises the content", len(data), "", ()
    except Image.DecompressionBombError as error:
        return False, f"too large to decode safely: {error}", len(data), "", ()
    except Exception as error:  # any decoder failure makes the file bad, whatever the plugin raises
        return False, f"cannot decode ({type(error).__name__}): {error}", len(data), "", ()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
    sums, squares = [], []
    values = np.arange(256, dtype=np.int64)
    for channel in range(3):
        histogram = np.bincount(rgb[..., channel].ravel(), minlength=256).astype(np.int64)
        sums.append(int(histogram @ values))
        squares.append(int(histogram @ (values * values)))
    pixels = rgb.shape[0] * rgb.shape[1]
    return True, hashlib.sha256(data).hexdigest(), len(data), mode, (*sums, *squares, pixels)


def _verify_chunk(root: str, rels: list[str], index: list[int]) -> tuple[tuple, list[tuple]]:
    return (root, rels, index), [verify_image(os.path.join(root, rel)) for rel in rels]


# ------------------------------------------------------------------------------ processes, cache


@contextlib.contextmanager
def _executor(workers: int) -> Iterator[Executor | None]:
    """A process pool for ``workers >= 2``; ``None`` (run in this process) for 0 or 1."""
    if workers <= 1:
        yield None
        return
    # not fork: the rich progress thread may hold a lock at the moment of forking
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _map(pool: Executor | None, fn: Any, jobs: list[tuple]) -> Iterator[Any]:
    """``fn(*job)`` for every job, in completion order when parallel."""
    if pool is None:
        for job in jobs:
            yield fn(*job)
        return
    futures = [pool.submit(fn, *job) for job in jobs]
    for future in as_completed(futures):
        yield future.result()


class _Cache:
    """Per-file verification results keyed by absolute path, valid while size and mtime are unchanged."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path)
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        version = self.db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        if version is None or version[0] != CACHE_VERSION:
            self.db.execute("DROP TABLE IF EXISTS files")
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (CACHE_VERSION,))
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
            "record TEXT)"
        )
        self.db.commit()

    def lookup(self, keys: list[str], stamps: list[tuple[int, int]]) -> Iterator[tuple[int, tuple]]:
        for start in range(0, len(keys), 500):
            batch = keys[start : start + 500]
            marks = ",".join("?" * len(batch))
            query = f"SELECT path, size, mtime_ns, record FROM files WHERE path IN ({marks})"
            found = {row[0]: row[1:] for row in self.db.execute(query, batch)}
            for offset, key in enumerate(batch):
                hit = found.get(key)
                if hit is not None and hit[:2] == stamps[start + offset]:
                    ok, text, size, mode, sums = json.loads(hit[2])
                    yield start + offset, (ok, text, size, mode, tuple(sums))

    def store(self, rows: list[tuple[str, int, int, tuple]]) -> None:
        # committed per chunk, so an interrupted scan resumes from here
        self.db.executemany(
            "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)",
            [(key, size, mtime, json.dumps(record)) for key, size, mtime, record in rows],
        )
        self.db.commit()

    def close(self) -> None:
        self.db.close()
