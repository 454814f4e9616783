import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from timm.data import auto_augment
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from mugs.data.transforms import (
    NO_ERASING,
    CropFinisher,
    MultiCropAugmentation,
    MultiCropBatch,
    MultiCropViews,
    RandomErasingPatch,
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


def _pixels(view) -> torch.Tensor:
    """A view's uint8 crop: strong views also carry their erasing box."""
    return view[0] if isinstance(view, tuple) else view


def _assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(_pixels(x), _pixels(y))


@pytest.mark.parametrize("n_local", [2, 0])
@pytest.mark.parametrize("image", [_rgb(64), _rgb(28).convert("L")], ids=["rgb64", "gray28"])
def test_crop_count_order_shapes(image, n_local):
    _seed(0)
    views = _aug(n_local=n_local)(image)
    assert isinstance(views.weak, bool)
    assert [tuple(c.shape) for c in views.crops] == [(3, 32, 32)] * 4 + [(3, 16, 16)] * n_local
    assert all(c.dtype == torch.uint8 for c in views.crops)
    assert len(views.erase_boxes) == len(views.erase_noise) == len(views.crops)
    assert views.erase_boxes[:2] == [NO_ERASING] * 2  # the teacher's views are weak


def test_grayscale_input_gives_three_equal_channels():
    # A grey source stays grey through the weak views (jitter and grayscale keep R = G = B)
    _seed(3)
    views = _aug(weak_prob=1.0)(_rgb(28).convert("L"))
    for c in views.crops:
        assert torch.equal(c[0], c[1]) and torch.equal(c[1], c[2])


def test_weak_prob_one_replays_weak_views():
    aug, img = _aug(weak_prob=1.0), _rgb(64)
    for s in range(5):
        _seed(s)
        crops, boxes, _, weak = aug(img)
        assert weak is True and boxes == [NO_ERASING] * len(crops)
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
        crops, _, _, weak = aug(img)
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
    flags = [aug(img).weak for _ in range(60)]
    assert 15 <= sum(flags) <= 45


def test_weak_prob_half_draws_each_local_independently():
    aug, img = _aug(weak_prob=0.5, n_local=8), _rgb(64)
    _seed(11)
    crops, _, _, weak = aug(img)
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
    first = aug(img)
    np.random.seed(2)  # timm's own RandAugment would pick different ops here
    _seed(42)
    second = aug(img)
    assert (first.weak, first.erase_boxes) == (second.weak, second.erase_boxes)
    assert any(box != NO_ERASING for box in first.erase_boxes)
    _assert_same(first.crops, second.crops)
    _assert_same(first.erase_noise, second.erase_noise)
    _seed(43)
    third = aug(img)
    assert not torch.equal(first.crops[0], third.crops[0])


def test_strong_rand_augment_is_reproducible_where_timm_is_not():
    hparams = {"translate_const": 14, "img_mean": (124, 116, 104)}
    ra, img = SeededRandAugment("rand-m9-mstd0.5-inc1", hparams), _rgb(32)
    outs = []
    for np_seed in (1, 2):
        np.random.seed(np_seed)
        _seed(7)
        outs.append([np.asarray(ra(img)) for _ in range(20)])
    assert all(np.array_equal(a, b) for a, b in zip(*outs, strict=True))


def _chosen_ops(ra: SeededRandAugment, draws: int) -> list[list[str]]:
    """The names of the ops ``ra`` picks in each of ``draws`` calls (whether or not each then applies)."""
    picked: list[str] = []

    def recording(op):
        return lambda img: (picked.append(op.name), img)[1]

    ra.ops = [recording(op) for op in ra.ops]
    _seed(0)
    choices = []
    for _ in range(draws):
        picked.clear()
        ra(_rgb(4))
        choices.append(list(picked))
    return choices


def test_rand_augment_picks_distinct_ops_uniformly_as_the_authors_fork():
    """The authors' fork draws its ops without replacement; timm (and ``timm_choice``) with."""
    config, hparams = "rand-m9-mstd0.5-inc1", {"translate_const": 14, "img_mean": (124, 116, 104)}
    draws = 3000
    choices = _chosen_ops(SeededRandAugment(config, hparams), draws)
    assert all(len(names) == 2 and names[0] != names[1] for names in choices)
    counts = np.unique(np.array(choices).ravel(), return_counts=True)[1]
    assert len(counts) == 15
    expected = 2 * draws / 15
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 36.1, counts  # 14 degrees of freedom: p = 0.001
    timm_choices = _chosen_ops(SeededRandAugment(config, hparams, timm_choice=True), draws)
    repeats = sum(names[0] == names[1] for names in timm_choices) / draws
    assert 0.04 < repeats < 0.095  # 1 / 15 with replacement


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
        assert strong(img)[0].shape == (3, 16, 16)
    assert len(bits_seen) >= 5 and set(bits_seen) == {0}


def _timm_erasing(prob: float) -> RandomErasing:
    return RandomErasing(prob, mode="pixel", max_count=1, num_splits=0, device="cpu")


@pytest.mark.parametrize("size", [(32, 32), (16, 40), (3, 3)])
def test_erasing_patch_is_timms_random_erasing_draw(size):
    # the same box and noise from the same Python and torch states, which both leave in the same place
    height, width = size
    ours, timms = RandomErasingPatch(0.5), _timm_erasing(0.5)
    erased = 0
    for seed in range(200):
        _seed(seed)
        _, box, noise = ours(torch.zeros(3, height, width, dtype=torch.uint8))
        after_ours = random.random(), torch.rand(())
        _seed(seed)
        filled = timms(torch.zeros(3, height, width))
        assert (random.random(), torch.rand(())) == after_ours
        if box == NO_ERASING:
            assert not filled.any() and noise.numel() == 0
            continue
        erased += noise.numel() > 0
        top, left, box_h, box_w = box
        expected = torch.zeros(3, height, width)
        expected[:, top : top + box_h, left : left + box_w] = noise
        assert torch.equal(filled, expected)
    assert erased > (60 if height > 3 else -1)


def _finished_per_crop(strong, mean, std) -> T.Compose:
    """The strong view finished crop by crop in the loader, as before the finisher existed."""
    return T.Compose([*strong.transforms[:-2], T.ToTensor(), _timm_erasing(1.0), T.Normalize(mean, std)])


def test_finisher_is_bit_identical_to_finishing_each_crop():
    mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 0.125)
    strong = strong_transform(32, (0.05, 1.0), erasing_prob=1.0, mean=mean)
    per_crop = _finished_per_crop(strong, mean, std)
    images = [_rgb(48, seed=i) for i in range(6)]
    views, expected = [], []
    for i, image in enumerate(images):
        _seed(i)
        crop, box, noise = strong(image)
        views.append((MultiCropViews([crop], [box], [noise], False), i))
        _seed(i)
        expected.append(per_crop(image))
    batch = collate_multicrop(views)
    assert batch.erase_noise[0].numel() > 0 and not bool(batch.erase_boxes[0][:, 2].eq(0).all())
    (finished,) = CropFinisher(mean, std, torch.device("cpu"))(batch)
    assert torch.equal(finished, torch.stack(expected))


def test_finisher_without_erasing_is_to_tensor_and_normalize():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)
    crops = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = MultiCropBatch(
        [crops], [torch.zeros(4, 4, dtype=torch.int64)], [torch.empty(0)], torch.zeros(4), torch.arange(4)
    )
    (finished,) = CropFinisher(mean, std, torch.device("cpu"))(batch)
    reference = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    expected = torch.stack([reference(Image.fromarray(c.permute(1, 2, 0).numpy())) for c in crops])
    assert torch.equal(finished, expected)


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
    t = weak_transform(16, (0.05, 0.25), blur_prob=1.0)
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
    dataset = _Images(_aug(weak_prob=0.5, erasing_prob=0.5))
    _seed(0)
    items = [dataset[i] for i in range(3)]
    batch = collate_multicrop(items)
    assert [tuple(c.shape) for c in batch.crops] == [(3, 3, 32, 32)] * 4 + [(3, 3, 16, 16)] * 2
    assert all(c.dtype == torch.uint8 for c in batch.crops)
    assert batch.weak_flags.dtype == torch.bool and batch.weak_flags.tolist() == [v.weak for v, _ in items]
    assert batch.labels.dtype == torch.int64 and batch.labels.tolist() == [10, 11, 12]
    assert any(noise.numel() for noise in batch.erase_noise)
    for pos in range(6):
        expected_noise = torch.cat([views.erase_noise[pos].flatten() for views, _ in items])
        assert torch.equal(batch.erase_noise[pos], expected_noise)
        for b, (views, _) in enumerate(items):
            assert torch.equal(batch.crops[pos][b], views.crops[pos])
            assert tuple(batch.erase_boxes[pos][b].tolist()) == views.erase_boxes[pos]
    with pytest.raises(ValueError):
        collate_multicrop([])


def test_collate_through_dataloader():
    loader = DataLoader(_Images(_aug(n_local=0)), batch_size=2, collate_fn=collate_multicrop)
    batch = next(iter(loader))
    assert len(batch.crops) == 4 and batch.crops[0].shape == (2, 3, 32, 32)
    assert batch.weak_flags.shape == (2,) and batch.labels.tolist() == [10, 11]
