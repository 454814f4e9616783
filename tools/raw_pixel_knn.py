"""Raw-pixel kNN baseline on a prepared split: the pixels themselves as features (grey level, flattened),
with the same vote as the learned features (cosine, exp(sim/T)).

    python tools/raw_pixel_knn.py --prepared results/data --k 20 --temperature 0.07
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from mugs.data.datasets import open_split
from mugs.evaluation.features import FeatureSet
from mugs.evaluation.knn import knn_evaluate


def pixel_features(prepared: str, split: str) -> FeatureSet:
    dataset = open_split(prepared, split)
    pixels = np.stack(
        [np.asarray(dataset[i][0].convert("L"), dtype=np.float32).ravel() for i in range(len(dataset))]
    )
    coarse = None if dataset.coarse_labels is None else torch.as_tensor(dataset.coarse_labels)
    return FeatureSet(
        torch.from_numpy(pixels),
        torch.as_tensor(dataset.labels),
        coarse,
        dataset.classes,
        dataset.coarse_classes,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", default="results/data")
    parser.add_argument("--split", default="test")
    parser.add_argument("--k", type=int, nargs="+", default=[20])
    parser.add_argument("--temperature", type=float, default=0.07)
    args = parser.parse_args()
    result = knn_evaluate(
        pixel_features(args.prepared, "train"),
        pixel_features(args.prepared, args.split),
        ks=args.k,
        temperature=args.temperature,
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
