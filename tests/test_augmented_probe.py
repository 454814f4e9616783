"""The paper's linear probe: one backbone forward per batch feeds the whole sweep, each head trains as it
would alone, and a run stopped after any batch and restored ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import io

import pytest
import torch

from mugs.evaluation.augmented_probe import AugmentedProbe, probe_transform
from mugs.evaluation.features import FeatureSet
from mugs.evaluation.heads import SweepSettings, init_heads
from mugs.model.backbone import create_backbone
from mugs.testing.synthetic import SyntheticImages

CLASSES, LAYERS, BATCH, EPOCHS = 4, 2, 8, 2
LRS, WDS = [0.3, 3.0], [0.0, 1e-3]


class CountingBackbone(torch.nn.Module):
    """The backbone, counting the forwards that compute features."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.embed_dim = backbone.embed_dim
        self.calls = 0

    def get_intermediate_layers(self, *args, **kwargs):
        self.calls += 1
        return self.backbone.get_intermediate_layers(*args, **kwargs)


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone("vit_tiny", patch_size=7, img_size=28, depth=2).eval()


def probe(backbone, lrs=LRS, wds=WDS, epochs: int = EPOCHS) -> AugmentedProbe:
    # 36 images: 4 batches of 8 per epoch, the last 4 images dropped
    dataset = SyntheticImages(size=36, side=32, classes=CLASSES, seed=1)
    val_generator = torch.Generator().manual_seed(2)
    dim = backbone.embed_dim * (LAYERS + 1)
    val = FeatureSet(
        torch.randn(20, dim, generator=val_generator), torch.arange(20) % CLASSES, None, list("abcd"), None
    )
    return AugmentedProbe(
        backbone,
        dataset,
        probe_transform(28, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
        val,
        SweepSettings(lrs, wds, epochs, BATCH, min_lr=1e-3, seed=5),
        layers=LAYERS,
        avgpool=True,
    )


@pytest.fixture(scope="module")
def counted(backbone) -> tuple[AugmentedProbe, CountingBackbone]:
    """An uninterrupted run of the sweep, and the backbone that counted its forwards."""
    counting = CountingBackbone(backbone)
    sweep = probe(counting)
    assert sweep.fit()
    return sweep, counting


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, dict):
            assert_same_state(value, b[key])
        elif isinstance(value, list):
            assert all(torch.equal(x, y) for x, y in zip(value, b[key], strict=True)), key
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def test_one_backbone_forward_per_batch_feeds_every_head(counted) -> None:
    sweep, counting = counted
    assert sweep.sampler.iterations_per_epoch == 4
    # 4 heads, 2 epochs of 4 batches: 8 forwards, not 32; val is read from the feature cache
    assert counting.calls == EPOCHS * 4 == sweep.heads.step
    assert len(sweep.heads.pairs) == 4


def test_each_head_ends_as_the_same_head_trained_alone(backbone, counted) -> None:
    sweep, _ = counted
    initial, _ = init_heads(4, sweep.heads.weight.shape[1], CLASSES, seed=5)
    result = sweep.heads.result()
    for head, (lr, wd) in enumerate(sweep.heads.pairs):
        alone = probe(backbone, [lr], [wd])
        with torch.no_grad():
            alone.heads.weight.copy_(initial[head : head + 1])
        alone.fit()
        # equal to float32 rounding, not bit for bit: the sweep's logits [H, N, C] and weight gradient are
        # batched products over all heads, which the CPU's BLAS sums in another blocking than one head's
        # (measured: at most 2e-7 on weights of 0.2 after 8 steps); a head trained with another
        # head's lr or weight decay, or on other features, lies orders of magnitude further off
        for mine, its in (
            (sweep.heads.weight, alone.heads.weight),
            (result.weight, alone.heads.result().weight),
        ):
            torch.testing.assert_close(mine[head], its[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sweep.heads.bias[head], alone.heads.bias[0], rtol=1e-5, atol=1e-6)
        assert result.best_val_top1[head] == alone.heads.best_top1[0]
    assert not torch.equal(sweep.heads.weight[0], sweep.heads.weight[1])


# (batches trained, where the probe then stands): mid-epoch, after an epoch's last batch but before its
# val scoring, in the second epoch
@pytest.mark.parametrize(("stop_after", "position"), [(3, (0, 3)), (4, (0, 4)), (6, (1, 2))])
def test_a_run_stopped_and_restored_ends_bit_identical(
    backbone, counted, stop_after: int, position: tuple
) -> None:
    uninterrupted, _ = counted
    first = probe(backbone)
    batches = iter(range(1, 100))
    assert not first.fit(stop=lambda: next(batches) == stop_after)
    assert (first.epoch, first.iteration) == position
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)
    saved.seek(0)

    resumed = probe(backbone)  # a new process's probe: fresh heads, the state from the file
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    assert resumed.fit()
    assert_same_state(resumed.state_dict(), uninterrupted.state_dict())


def test_a_state_of_another_sweep_is_refused(backbone) -> None:
    with pytest.raises(ValueError, match="weight has shape"):
        probe(backbone, [0.1]).load_state_dict(probe(backbone).state_dict())
