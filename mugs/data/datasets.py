"""Training and evaluation input read from the manifests of ``mugs prepare``, never from a directory walk.

Every item is checked against the size and SHA-256 recorded at preparation, so a run uses exactly the
images that were validated and hashed (hashing costs about 1% of decoding a JPEG).  The split keeps
its paths and hashes in flat numpy buffers rather than Python lists: data-loader workers forked from
the main process then share those pages instead of copying them as reference counts change.
"""

from __future__ import annotations

import hashlib
import io
import json
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from mugs.data.sources import DataError, read_idx, to_rgb

# Decoded IDX arrays of this process, keyed by absolute path: loaded on first use, so a dataset pickled
# to spawned workers carries no pixels, and forked workers inherit the parent's array copy-on-write.
_ARRAYS: dict[str, np.ndarray] = {}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; run `mugs prepare` first") from None
    except ValueError as error:
        raise DataError(f"{path} is not valid JSON ({error}); rerun `mugs prepare`") from None


def read_stats(prepared_dir: str | Path) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel ``(mean, std)`` of the train split, on the [0, 1] scale."""
    stats = _read_json(Path(prepared_dir) / "stats.json")
    return tuple(stats["mean"]), tuple(stats["std"])


@dataclass(frozen=True)
class ManifestColumns:
    """The rows of a manifest as flat arrays: labels, coarse labels (-1 where a row has none), sizes
    (int64), the SHA-256 digests end to end (uint8, 32 per row) and the UTF-8 paths end to end with
    each one's end offset. Built row by row into growing buffers, so no Python object per row is ever
    held: a list of 1.28 M dicts first cost 1.29 GB more than these arrays.
    """

    labels: np.ndarray
    coarse: np.ndarray
    sizes: np.ndarray
    digests: np.ndarray
    path_bytes: np.ndarray
    path_ends: np.ndarray

    @classmethod
    def from_rows(cls, rows: Iterable[dict[str, Any]]) -> ManifestColumns:
        labels, coarse, sizes, ends = array("q"), array("q"), array("q"), array("q")
        digests, paths = bytearray(), bytearray()
        for row in rows:
            labels.append(row["label"])
            coarse.append(-1 if row.get("coarse") is None else row["coarse"])
            sizes.append(row["size"])
            digests += bytes.fromhex(row["sha256"])
            paths += row["path"].encode("utf-8", "surrogateescape")
            ends.append(len(paths))
        # numpy views of the buffers, not copies
        return cls(
            *(np.frombuffer(column, np.int64) for column in (labels, coarse, sizes)),
            np.frombuffer(digests, np.uint8),
            np.frombuffer(paths, np.uint8),
            np.frombuffer(ends, np.int64),
        )

    @classmethod
    def read(cls, manifest_path: Path) -> ManifestColumns:
        """The columns of a ``manifest-<split>.jsonl``, read line by line."""
        with open(manifest_path, encoding="utf-8") as f:
            return cls.from_rows(json.loads(line) for line in f if line.strip())


class ManifestDataset(Dataset):
    """The images of one prepared split; item ``i`` is ``(transform(rgb PIL image), label)``.

    Attributes: ``classes``, ``labels`` (int64), ``coarse_classes`` and ``coarse_labels`` (``None`` when
    the source defines no coarse grouping), ``root`` (the dataset directory the paths are relative to).
    """

    def __init__(
        self,
        root: Path,
        manifest: ManifestColumns,
        classes: list[str],
        coarse_classes: list[str] | None,
        transform: Callable | None = None,
    ) -> None:
        self.root = root
        self.classes = classes
        self.coarse_classes = coarse_classes
        self.transform = transform
        self.labels = manifest.labels
        self.coarse_labels = None if coarse_classes is None else manifest.coarse
        self.sizes = manifest.sizes
        self._digests = manifest.digests
        self._path_bytes = manifest.path_bytes
        self._path_ends = manifest.path_ends

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, index: int) -> str:
        """The manifest path of item ``index`` (relative to :attr:`root`)."""
        start = int(self._path_ends[index - 1]) if index else 0
        return self._path_bytes[start : self._path_ends[index]].tobytes().decode("utf-8", "surrogateescape")

    def _check(self, index: int, data: bytes) -> None:
        expected = self._digests[32 * index : 32 * index + 32].tobytes()
        if len(data) != self.sizes[index] or hashlib.sha256(data).digest() != expected:
            raise DataError(
                f"{self.root / self.path(index)} differs from what `mugs prepare` recorded "
                f"(size {len(data)} vs {self.sizes[index]} or content); rerun `mugs prepare`"
            )

    def load(self, index: int) -> Image.Image:
        """The RGB image of item ``index``, verified against the manifest."""
        path = self.root / self.path(index)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise DataError(f"cannot read {path}: {error.strerror or error}; rerun `mugs prepare`") from None
        self._check(index, data)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_rgb(image)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.load(index)
        return (self.transform(image) if self.transform is not None else image), int(self.labels[index])


class ArrayManifestDataset(ManifestDataset):
    """A prepared split of an IDX source (Fashion-MNIST): manifest paths are ``<idx file>#<row>`` and the
    pixels come from the decoded array, grayscale replicated to RGB.
    """

    def __init__(
        self,
        root: Path,
        manifest: ManifestColumns,
        classes: list[str],
        coarse_classes: list[str] | None,
        transform: Callable | None = None,
    ) -> None:
        super().__init__(root, manifest, classes, coarse_classes, transform)
        parts = [self.path(i).rpartition("#") for i in range(len(self))]  # 70,000 rows at most
        files = {file for file, _, _ in parts}
        if len(files) != 1:
            raise DataError(f"a manifest under {root} mixes IDX files {sorted(files)}")
        self.image_file = files.pop()
        self.rows = np.array([int(row) for _, _, row in parts], dtype=np.int64)

    def _array(self) -> np.ndarray:
        key = str((self.root / self.image_file).absolute())
        if key not in _ARRAYS:
            _ARRAYS[key] = read_idx(Path(key))
        return _ARRAYS[key]

    def load(self, index: int) -> Image.Image:
        pixels = self._array()[self.rows[index]]
        self._check(index, pixels.tobytes())
        return Image.fromarray(pixels, "L").convert("RGB")


def open_split(
    prepared_dir: str | Path,
    split: str,
    transform: Callable | None = None,
    *,
    root: str | Path | None = None,
) -> ManifestDataset:
    """The ``train``, ``val`` or ``test`` split written by ``mugs prepare`` into ``prepared_dir``.

    ``root`` overrides the dataset directory recorded at preparation (a relative one is resolved from
    the current directory), e.g. when the data was copied to a node-local disk.
    """
    prepared_dir = Path(prepared_dir)
    if not (prepared_dir / "summary.json").is_file():
        raise DataError(f"{prepared_dir} holds no prepared data (no summary.json); run `mugs prepare` first")
    summary = _read_json(prepared_dir / "summary.json")
    manifest_path = prepared_dir / f"manifest-{split}.jsonl"
    if not manifest_path.is_file():
        raise DataError(
            f"{manifest_path} does not exist (prepared splits: {', '.join(summary['splits'])}); "
            "run `mugs prepare` first"
        )
    classes = _read_json(prepared_dir / "classes.json")
    data_root = Path(root if root is not None else summary["root"])
    if not data_root.is_dir():
        raise DataError(
            f"the dataset directory {data_root} that {prepared_dir} was prepared from does not exist "
            "(run from the directory `mugs prepare` ran in, or pass root=)"
        )
    kind = ArrayManifestDataset if summary["source"] == "fashion-mnist" else ManifestDataset
    manifest = ManifestColumns.read(manifest_path)
    return kind(data_root, manifest, classes["classes"], classes["coarse_classes"], transform)
