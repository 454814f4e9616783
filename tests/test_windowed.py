import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from mugs.data.transforms import SeededRandAugment, strong_transform
from mugs.data.windowed import DeferredImage, WindowedResizedCrop

_BICUBIC = T.InterpolationMode.BICUBIC
_HPARAMS = {"translate_const": 100, "img_mean": (124, 116, 104)}


def _photo(width: int = 150, height: int = 110, seed: int = 0) -> Image.Image:
    """Smooth structure and fine texture, so that resampling differences would show."""
    rng = np.random.default_rng(seed)
    noise = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return Image.blend(noise, noise.filter(ImageFilter.GaussianBlur(4)), 0.7)


def _pipelines(config: str, size: int, scale: tuple[float, float], *, every_op: bool, hparams=_HPARAMS):
    eager, windowed = SeededRandAugment(config, hparams), SeededRandAugment(config, hparams, deferred=True)
    if every_op:  # each chosen op applies, so chains of several ops of every kind are frequent
        for op in eager.ops + windowed.ops:
            op.prob = 1.0
    crop = {"size": size, "scale": scale, "interpolation": _BICUBIC}
    return (
        T.Compose([eager, T.RandomResizedCrop(**crop)]),
        T.Compose([windowed, WindowedResizedCrop(**crop)]),
    )


def _run(transform, image: Image.Image, seed: int) -> tuple[np.ndarray, tuple]:
    random.seed(seed)
    torch.manual_seed(seed)
    pixels = np.asarray(transform(image))
    return pixels, (random.random(), float(torch.rand(())))


@pytest.mark.parametrize(
    ("config", "size", "scale", "every_op"),
    [
        ("rand-m9-mstd0.5-inc1", 24, (0.05, 0.25), False),  # the paper's local crops
        ("rand-m9-mstd0.5-inc1", 56, (0.25, 1.0), False),  # and global crops
        ("rand-n3-m9-mstd0.5-inc1", 32, (0.05, 1.0), True),  # three ops every time
        ("rand-n2-m10-inc1", 16, (0.01, 0.05), True),  # the largest shears and rotations, tiny boxes
        ("rand-n2-m0-inc1", 32, (0.5, 1.0), True),  # rotation by 0 degrees: PIL copies the image
    ],
)
def test_windowed_rand_augment_equals_running_it_on_the_whole_image(config, size, scale, every_op):
    eager, windowed = _pipelines(config, size, scale, every_op=every_op)
    image = _photo()
    for seed in range(150):
        expected, state_after_eager = _run(eager, image, seed)
        got, state_after_windowed = _run(windowed, image, seed)
        assert state_after_windowed == state_after_eager  # the same draws, in the same order
        assert np.array_equal(got, expected), seed


def test_nearest_resampling_and_whole_image_ops_fall_back_to_the_whole_image():
    hparams = {**_HPARAMS, "interpolation": Image.Resampling.NEAREST}
    eager, windowed = _pipelines("rand-n3-m9-mstd0.5-inc1", 32, (0.05, 1.0), every_op=True, hparams=hparams)
    image = _photo(seed=1)
    for seed in range(60):
        assert np.array_equal(_run(windowed, image, seed)[0], _run(eager, image, seed)[0]), seed


def test_deferred_ops_compute_only_the_window(monkeypatch):
    ra = SeededRandAugment("rand-n1-m9-inc1", _HPARAMS, deferred=True)
    (shear,) = [op for op in ra.ops if op.name == "ShearX"]
    shear.prob = 1.0
    image = _photo()
    random.seed(0)
    deferred = shear(image)
    assert isinstance(deferred, DeferredImage) and deferred.size == image.size
    calls = []
    original = Image.Image.transform

    def recording(self, size, *args, **kwargs):
        calls.append((self.size, size))
        return original(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "transform", recording)
    window = deferred.render((40, 30, 60, 50))
    monkeypatch.undo()
    assert window.size == (20, 20)
    # one affine transform, from the image's corner to the box's: 60 × 50 of 150 × 110 pixels, reading
    # at most 0.3 × 50 columns further (a shear of at most 0.3) and the kernel's reach of 3
    ((source_size, output_size),) = calls
    assert output_size == (60, 50)
    assert source_size[0] <= 60 + 15 + 4 and source_size[1] <= 50 + 4
    assert np.array_equal(np.asarray(window), np.asarray(deferred.full().crop((40, 30, 60, 50))))


def test_the_strong_view_pickles_for_spawned_workers():
    strong = strong_transform(24, (0.05, 0.25), erasing_prob=1.0)
    copy = pickle.loads(pickle.dumps(strong))
    image = _photo()
    views = []
    for transform in (strong, copy):
        random.seed(3)
        torch.manual_seed(3)
        views.append(transform(image))
    (crop, box, noise), (crop_copy, box_copy, noise_copy) = views
    assert torch.equal(crop, crop_copy) and box == box_copy and torch.equal(noise, noise_copy)


def test_plain_images_get_random_resized_crop():
    crop = WindowedResizedCrop(24, scale=(0.1, 0.5), interpolation=_BICUBIC)
    reference = T.RandomResizedCrop(24, scale=(0.1, 0.5), interpolation=_BICUBIC)
    image = _photo()
    for seed in range(20):
        assert np.array_equal(_run(crop, image, seed)[0], _run(reference, image, seed)[0])
