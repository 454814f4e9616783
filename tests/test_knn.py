"""Weighted kNN vote on hand-made banks: scores, ties, k beyond a class and beyond the bank, chunking."""

from __future__ import annotations

import math

import pytest
import torch

from mugs.evaluation.features import FeatureSet
from mugs.evaluation.knn import knn_classify, knn_evaluate, nearest_neighbours, rank_classes, vote

# Cosine similarities to the query (1, 0): 1, 0, 1/√2, -1, 3/√9.09 (row 4 is long: cosine ignores length).
BANK = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [3.0, 0.3]])
LABELS = torch.tensor([0, 1, 1, 2, 1])
SIMS = [1.0, 0.0, 1 / math.sqrt(2), -1.0, 3 / math.sqrt(9.09)]
T = 0.5
QUERY = torch.tensor([[2.0, 0.0]])


def classify(k: int, query: torch.Tensor = QUERY, **kwargs):
    return knn_classify(BANK, LABELS, query, k=k, temperature=T, num_classes=4, **kwargs)


def test_nearest_neighbours_are_cosine_and_sorted() -> None:
    [(start, sims, index)] = list(nearest_neighbours(BANK, QUERY, k=3))
    assert start == 0
    assert index.tolist() == [[0, 4, 2]]
    assert torch.allclose(sims, torch.tensor([[SIMS[0], SIMS[4], SIMS[2]]]))


def test_two_neighbours_vote_exp_sim_over_t() -> None:
    prediction = classify(2)
    # class 0: e^{1/T}; class 1: e^{0.995/T}; classes 2 and 3 get nothing
    assert prediction.classes.tolist() == [[0, 1, 2, 3]]
    expected = [math.exp(SIMS[0] / T), math.exp(SIMS[4] / T), 0.0, 0.0]
    assert torch.allclose(prediction.scores, torch.tensor([expected], dtype=torch.float64))


def test_k_larger_than_a_class_lets_other_classes_win() -> None:
    # class 0 has one member; the third neighbour (class 1) tips the vote
    prediction = classify(3)
    assert prediction.classes[0, 0] == 1
    assert prediction.scores[0, 0] == pytest.approx(math.exp(SIMS[4] / T) + math.exp(SIMS[2] / T), rel=1e-6)
    assert prediction.scores[0, 1] == pytest.approx(math.exp(SIMS[0] / T), rel=1e-6)


def test_k_larger_than_the_bank_uses_the_whole_bank() -> None:
    prediction = classify(10)
    class1 = math.exp(SIMS[1] / T) + math.exp(SIMS[2] / T) + math.exp(SIMS[4] / T)
    expected = [class1, math.exp(SIMS[0] / T), math.exp(SIMS[3] / T), 0.0]
    assert prediction.classes.tolist() == [[1, 0, 2, 3]]
    assert torch.allclose(prediction.scores, torch.tensor([expected], dtype=torch.float64))
    assert torch.equal(prediction.scores, classify(5).scores)


def test_equal_class_scores_go_to_the_lower_class_index() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    query = torch.tensor([[1.0, 1.0]])  # equidistant from both rows
    for labels in ([3, 1], [1, 3]):
        prediction = knn_classify(bank, torch.tensor(labels), query, k=2, temperature=0.1, num_classes=4)
        assert prediction.scores[0, 0] == prediction.scores[0, 1]
        assert prediction.classes[0].tolist() == [1, 3, 0, 2]


def test_rank_classes_breaks_ties_by_index_and_truncates() -> None:
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0]])
    classes, values = rank_classes(scores, 5)
    assert classes.tolist() == [[1, 2, 4, 3, 0]]
    assert values.tolist() == [[3.0, 3.0, 3.0, 2.0, 1.0]]
    assert rank_classes(scores[:, :2], 5)[0].tolist() == [[1, 0]]


def test_vote_sums_weights_per_class() -> None:
    sims = torch.tensor([[0.5, 0.2, 0.1], [0.9, 0.8, 0.0]])
    labels = torch.tensor([[2, 0, 2], [1, 1, 1]])
    scores = vote(sims, labels, temperature=0.1, num_classes=3)
    e = math.exp
    expected = torch.tensor(
        [[e(2.0), 0.0, e(5.0) + e(1.0)], [0.0, e(9.0) + e(8.0) + e(0.0), 0.0]], dtype=torch.float64
    )
    assert torch.allclose(scores, expected)


def test_chunked_search_matches_one_block() -> None:
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(53, 8, generator=generator)
    labels = torch.randint(0, 6, (53,), generator=generator)
    queries = torch.randn(31, 8, generator=generator)
    whole = knn_classify(bank, labels, queries, k=9, temperature=0.07, num_classes=6, chunk_size=1000)
    chunked = knn_classify(
        bank, labels, queries, k=9, temperature=0.07, num_classes=6, chunk_size=7, bank_chunk_size=11
    )
    assert torch.equal(whole.classes, chunked.classes)
    assert torch.allclose(whole.scores, chunked.scores, rtol=1e-5)
    # a temperature whose exp(1/T) would overflow float32 still ranks by finite scores
    cold = knn_classify(bank, labels, queries, k=9, temperature=0.005, num_classes=6)
    assert torch.isfinite(cold.scores).all()
    # brute force: the 9 largest cosines
    cos = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    top = torch.cat(
        [sims for _, sims, _ in nearest_neighbours(bank, queries, k=9, chunk_size=7, bank_chunk_size=11)]
    )
    assert torch.allclose(top, cos.topk(9, dim=1).values, atol=1e-6)


def test_knn_evaluate_counts_top1_top5_fine_and_coarse() -> None:
    # queries near rows 0, 1 and 3 of BANK; fine truths 0, 1, 3; coarse truth: 0 for {0, 1}, 1 for {2, 3}
    train = FeatureSet(BANK, LABELS, LABELS // 2, ["a", "b", "c", "d"], ["ab", "cd"])
    queries = torch.tensor([[1.0, 0.01], [0.01, 1.0], [-1.0, 0.01]])
    test = FeatureSet(
        queries, torch.tensor([0, 1, 3]), torch.tensor([0, 0, 1]), train.classes, train.coarse_classes
    )
    result = knn_evaluate(train, test, ks=[1, 200], temperature=T)
    # k=1: predictions 0, 1, 2 → fine top-1 2/3; top-5 covers every class of 4 → 1
    assert result["fine"]["1"] == {"top1": pytest.approx(2 / 3), "top5": 1.0}
    # coarse k=1: predictions 0, 0, 1 → 3/3
    assert result["coarse"]["1"]["top1"] == 1.0
    # k=200 (whole bank): class 1 holds three of five rows and wins for queries 0 and 1; query 2 → class 2
    assert result["fine"]["200"]["top1"] == pytest.approx(1 / 3)
    assert result["bank_size"] == 5 and result["queries"] == 3
