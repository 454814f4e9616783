import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from timm.data import auto_augment
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from mugs.data.transforms import (
    MultiCropAugmentation,
    RandomGaussianBlur,
    SeededRandAugment,
    collate_multicrop,
    posterize_or_black,
    strong_transform,
    weak_transform,
)


def _rgb(size: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _seed(s: int) -> None:
    random.seed(s)
    torch.manual_seed(s)


def _aug(**kwargs) -> MultiCropAugmentation:
    return MultiCropAugmentation(**{"global_size": 32, "local_size": 16, "n_local": 2, **kwargs})


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("n_local", [2, 0])
@pytest.mark.parametrize("image", [_rgb(64), _rgb(28).convert("L")], ids=["rgb64", "gray28"])
def test_crop_count_order_shapes(image, n_local):
    _seed(0)
    crops, weak = _aug(n_local=n_local)(image)
    assert isinstance(weak, bool)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 4 + [(3, 16, 16)] * n_local
    assert all(c.dtype == torch.float32 for c in crops)


def test_grayscale_input_gives_three_equal_channels():
    # A grey source stays grey through the weak views (jitter and grayscale keep R = G = B), so after
    # converting to RGB the three channels differ only by the per-channel normalisation.
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    _seed(3)
    crops, _ = _aug(weak_prob=1.0, mean=mean, std=std)(_rgb(28).convert("L"))
    for c in crops[:4]:
        assert torch.allclose(c[0], c[1], atol=1e-6) and torch.allclose(c[1], c[2], atol=1e-6)


def test_weak_prob_one_replays_weak_views():
    aug, img = _aug(weak_prob=1.0), _rgb(64)
    for s in range(5):
        _seed(s)
        crops, weak = aug(img)
        assert weak is True
        _seed(s)
        expected = [aug.weak_global1(img), aug.weak_global2(img)]
        random.random()  # the student's weak/strong draw
        expected += [aug.weak_global1(img), aug.weak_global2(img)]
        for _ in range(aug.n_local):
            random.random()
            expected.append(aug.weak_local(img))
        _assert_same(crops, expected)
        # fresh draws, not copies of the teacher views
        assert not torch.equal(crops[0], crops[2])


def test_weak_prob_zero_replays_strong_student_views():
    aug, img = _aug(weak_prob=0.0), _rgb(64)
    for s in range(5):
        _seed(s)
        crops, weak = aug(img)
        assert weak is False
        _seed(s)
        expected = [aug.weak_global1(img), aug.weak_global2(img)]
        random.random()
        expected += [aug.strong_global(img), aug.strong_global(img)]
        for _ in range(aug.n_local):
            random.random()
            expected.append(aug.strong_local(img))
        _assert_same(crops, expected)
        # the replay discriminates: the weak views drawn from the same state differ
        _seed(s)
        aug.weak_global1(img), aug.weak_global2(img)
        random.random()
        assert not torch.equal(crops[2], aug.weak_global1(img))


def test_weak_prob_half_flag_frequency():
    aug, img = _aug(weak_prob=0.5, n_local=0), _rgb(28)
    _seed(0)
    flags = [aug(img)[1] for _ in range(60)]
    assert 15 <= sum(flags) <= 45


def test_weak_prob_half_draws_each_local_independently():
    aug, img = _aug(weak_prob=0.5, n_local=8), _rgb(64)
    _seed(11)
    crops, weak = aug(img)
    _seed(11)
    expected = [aug.weak_global1(img), aug.weak_global2(img)]
    assert weak == (random.random() < 0.5)
    if weak:
        expected += [aug.weak_global1(img), aug.weak_global2(img)]
    else:
        expected += [aug.strong_global(img), aug.strong_global(img)]
    local_is_weak = []
    for _ in range(aug.n_local):
        local_is_weak.append(random.random() < 0.5)
        expected.append((aug.weak_local if local_is_weak[-1] else aug.strong_local)(img))
    _assert_same(crops, expected)
    assert 0 < sum(local_is_weak) < aug.n_local


def test_seeding_is_bit_identical_and_ignores_numpy_state():
    aug, img = _aug(weak_prob=0.5, n_local=4, erasing_prob=1.0), _rgb(64)
    np.random.seed(1)
    _seed(42)
    first, weak1 = aug(img)
    np.random.seed(2)  # timm's own RandAugment would pick different ops here
    _seed(42)
    second, weak2 = aug(img)
    assert weak1 == weak2
    _assert_same(first, second)
    _seed(43)
    third, _ = aug(img)
    assert not torch.equal(first[0], third[0])


def test_strong_rand_augment_is_reproducible_where_timm_is_not():
    hparams = {"translate_const": 14, "img_mean": (124, 116, 104)}
    ra, img = SeededRandAugment("rand-m9-mstd0.5-inc1", hparams), _rgb(32)
    outs = []
    for np_seed in (1, 2):
        np.random.seed(np_seed)
        _seed(7)
        outs.append([np.asarray(ra(img)) for _ in range(20)])
    assert all(np.array_equal(a, b) for a, b in zip(*outs, strict=True))


def test_posterize_zero_bits_is_black():
    img = _rgb(8)
    assert np.asarray(posterize_or_black(img, 0)).max() == 0
    assert np.array_equal(np.asarray(posterize_or_black(img, 3)), np.asarray(ImageOps.posterize(img, 3)))
    assert posterize_or_black(img, 8) is img


def test_rand_augment_posterize_op_at_magnitude_10():
    ra = SeededRandAugment("rand-m10-inc1", {"img_mean": (124, 116, 104)})
    op = next(o for o in ra.ops if o.name == "PosterizeIncreasing")
    op.prob = 1.0
    assert np.asarray(op(_rgb(8))).max() == 0
    # timm's own table is untouched, so other users of timm keep Pillow's behaviour
    assert auto_augment.NAME_TO_OP["PosterizeIncreasing"] is auto_augment.posterize


def test_strong_transform_survives_magnitude_10_posterize():
    strong = strong_transform(16, (0.05, 1.0), rand_augment="rand-m10-inc1", erasing_prob=0.25)
    ra = next(t for t in strong.transforms if isinstance(t, SeededRandAugment))
    op = next(o for o in ra.ops if o.name == "PosterizeIncreasing")
    bits_seen = []
    safe_fn = op.aug_fn

    def counting(img, bits, **kwargs):
        bits_seen.append(bits)
        return safe_fn(img, bits, **kwargs)

    op.aug_fn = counting
    img = _rgb(24)
    _seed(0)
    for _ in range(300):
        assert strong(img).shape == (3, 16, 16)
    assert len(bits_seen) >= 5 and set(bits_seen) == {0}


def test_erasing_precedes_normalisation():
    # magnitude 0: no geometric op moves pixels, so the fill colour (which follows ``mean``) never shows
    # and the two runs differ only by normalisation, erased pixels included.
    kwargs = {"rand_augment": "rand-m0-inc1", "erasing_prob": 1.0}
    raw = strong_transform(32, (0.25, 1.0), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **kwargs)
    norm = strong_transform(32, (0.25, 1.0), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), **kwargs)
    img = _rgb(40)
    _seed(5)
    x = raw(img)
    _seed(5)
    y = norm(img)
    erased = (x < 0) | (x > 1)
    assert erased.sum() > 10
    assert torch.allclose(y, (x - 0.5) / 0.25, atol=1e-5)


def test_weak_views_normalise_with_given_mean_std():
    img = _rgb(40)
    raw = weak_transform(32, (0.25, 1.0), blur_prob=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    norm = weak_transform(32, (0.25, 1.0), blur_prob=1.0, mean=(0.2, 0.4, 0.6), std=(0.5, 0.25, 0.125))
    _seed(1)
    x = raw(img)
    _seed(1)
    y = norm(img)
    assert x.min() >= 0.0 and x.max() <= 1.0
    mean, std = torch.tensor([0.2, 0.4, 0.6])[:, None, None], torch.tensor([0.5, 0.25, 0.125])[:, None, None]
    assert torch.allclose(y, (x - mean) / std, atol=1e-5)


def test_weak_global2_solarizes_and_global1_does_not():
    aug = _aug()
    kinds = [type(t) for t in aug.weak_global1.transforms], [type(t) for t in aug.weak_global2.transforms]
    assert T.RandomSolarize not in kinds[0] and T.RandomSolarize in kinds[1]


def test_blur_draws_its_radius_from_python_random_and_matches_pil() -> None:
    img = _rgb(20)
    _seed(3)
    blurred = RandomGaussianBlur(1.0)(img)
    random.seed(3)
    random.random()  # the apply draw
    expected = img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
    assert np.array_equal(np.asarray(blurred), np.asarray(expected))
    assert not np.array_equal(np.asarray(blurred), np.asarray(img))
    assert RandomGaussianBlur(0.0)(img) is img


def test_blur_probability_is_respected() -> None:
    random.seed(0)
    blur = RandomGaussianBlur(0.1)
    img = _rgb(8)
    applied = sum(blur(img) is not img for _ in range(2000))
    assert 150 < applied < 250


def test_blur_on_16px_crop():
    t = weak_transform(16, (0.05, 0.25), blur_prob=1.0, mean=(0.0,) * 3, std=(1.0,) * 3)
    (blur,) = [b for b in t.transforms if isinstance(b, RandomGaussianBlur)]
    assert blur.prob == 1.0 and blur.sigma == (0.1, 2.0)
    _seed(0)
    assert t(_rgb(20)).shape == (3, 16, 16)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        _aug(weak_prob=1.5)
    with pytest.raises(ValueError):
        _aug(n_local=-1)


class _Images(Dataset):
    def __init__(self, transform):
        self.images = [_rgb(48, seed=i) for i in range(3)]
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), 10 + i


def test_collate_multicrop():
    dataset = _Images(_aug(weak_prob=0.5))
    _seed(0)
    items = [dataset[i] for i in range(3)]
    crops, flags, labels = collate_multicrop(items)
    assert [tuple(c.shape) for c in crops] == [(3, 3, 32, 32)] * 4 + [(3, 3, 16, 16)] * 2
    assert flags.dtype == torch.bool and flags.tolist() == [weak for (_, weak), _ in items]
    assert labels.dtype == torch.int64 and labels.tolist() == [10, 11, 12]
    for b, ((item_crops, _), _) in enumerate(items):
        for pos, crop in enumerate(item_crops):
            assert torch.equal(crops[pos][b], crop)
    with pytest.raises(ValueError):
        collate_multicrop([])


def test_collate_through_dataloader():
    loader = DataLoader(_Images(_aug(n_local=0)), batch_size=2, collate_fn=collate_multicrop)
    crops, flags, labels = next(iter(loader))
    assert len(crops) == 4 and crops[0].shape == (2, 3, 32, 32)
    assert flags.shape == (2,) and labels.tolist() == [10, 11]
