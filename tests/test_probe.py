"""Linear probe and kNN classification on small synthetic features with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from unicom.errors import InputError
from unicom.evaluate.probe import classification_scores, knn_accuracy, knn_classify, linear_probe


def at_angles(degrees) -> np.ndarray:
    radians = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


def test_scores_accuracy_and_mean_per_class():
    scores = classification_scores([0, 0, 1, 1], [0, 0, 0, 1])
    assert scores["accuracy"] == pytest.approx(3 / 4)
    assert scores["mean_per_class"] == pytest.approx((2 / 3 + 1) / 2)


def test_knn_votes_are_weighted_by_similarity_over_temperature():
    # one class-0 neighbour at 0 degrees against two class-1 neighbours at 20 and 25 degrees
    train = at_angles([0, 20, 25, 180])
    labels = [0, 1, 1, 2]
    query = at_angles([0])
    # T = 0.07: exp(1/.07) = 1.6e6 outweighs exp(cos20/.07) + exp(cos25/.07) = 1.1e6
    assert knn_classify(train, labels, query, k=3, temperature=0.07).tolist() == [0]
    # T = 1: e^1 = 2.7 loses to e^0.94 + e^0.91 = 5.0, the majority wins
    assert knn_classify(train, labels, query, k=3, temperature=1.0).tolist() == [1]


def brute_force_knn(train, labels, test, k, temperature):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    predictions = []
    for q in test:
        similarities = train.astype(np.float64) @ q
        nearest = sorted(range(len(train)), key=lambda i: (-similarities[i], i))[:k]
        votes = {}
        for i in nearest:
            votes[labels[i]] = votes.get(labels[i], 0.0) + np.exp(similarities[i] / temperature)
        predictions.append(min(votes, key=lambda c: (-votes[c], c)))
    return np.asarray(predictions)


def test_knn_equals_a_brute_force_vote():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 8))
    labels = rng.integers(0, 5, 300)
    train = (centres[labels] + 1.2 * rng.standard_normal((300, 8))).astype(np.float32)
    test_labels = rng.integers(0, 5, 60)
    test = (centres[test_labels] + 1.2 * rng.standard_normal((60, 8))).astype(np.float32)
    expected = brute_force_knn(train, labels, test, k=20, temperature=0.07)
    predictions = knn_classify(train, labels, test)
    np.testing.assert_array_equal(predictions, expected)
    result = knn_accuracy(train, labels, test, test_labels)
    assert result["accuracy"] == pytest.approx(np.mean(expected == test_labels))
    assert 0.5 < result["accuracy"] < 1  # a meaningful, not trivial, task


def test_knn_keeps_original_label_values():
    train = at_angles([0, 5, 90, 95])
    predictions = knn_classify(train, [40, 40, 7, 7], at_angles([2, 92]), k=2)
    assert predictions.tolist() == [40, 7]


def test_knn_with_more_neighbours_than_training_features_says_what_to_change():
    with pytest.raises(InputError, match=r"k=20 neighbours .* 3 features: use a k of at most 3 .*--knn-k.*--no-knn"):
        knn_classify(at_angles([0, 5, 90]), [0, 0, 1], at_angles([2]))


def blobs(n_per_class, separation, seed):
    rng = np.random.default_rng(seed)
    centres = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=np.float64) * separation
    labels = np.repeat(np.arange(3), n_per_class)
    x = centres[labels] + rng.standard_normal((len(labels), 4))
    return x.astype(np.float32), labels


def test_linear_probe_separates_separable_classes():
    x, y = blobs(40, 12.0, seed=1)
    x_test, y_test = blobs(10, 12.0, seed=2)
    result = linear_probe(x, y, x_test, y_test)
    assert result["accuracy"] == 1.0 and result["mean_per_class"] == 1.0


def test_linear_probe_refits_on_train_plus_val_with_the_chosen_c():
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(60, 1.5, seed=3)
    x_test, y_test = blobs(50, 1.5, seed=4)
    result = linear_probe(x, y, x_test, y_test)
    unit = lambda z: z / np.linalg.norm(z, axis=1, keepdims=True)  # noqa: E731  (the probe fits directions)
    reference = LogisticRegression(C=result["C"], solver="lbfgs", max_iter=1000).fit(unit(x), y)
    assert result["accuracy"] == pytest.approx(np.mean(reference.predict(unit(x_test)) == y_test))
    assert 0.5 < result["accuracy"] < 1


def test_linear_probe_fits_the_l2_normalised_features_whatever_their_norms():
    # features as a backbone gives them (norms from 0.5 to 20, the class in the direction):
    # the probe sees the directions, as kNN and the retrieval metrics do
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(60, 1.5, seed=3)
    x_test, y_test = blobs(50, 1.5, seed=4)
    rng = np.random.default_rng(0)
    scaled, scaled_test = (z * rng.uniform(0.5, 20, (len(z), 1)).astype(np.float32) for z in (x, x_test))
    result = linear_probe(scaled, y, scaled_test, y_test, log10_c=[0])
    unit = lambda z: z / np.linalg.norm(z, axis=1, keepdims=True)  # noqa: E731
    reference = LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000).fit(unit(x), y)
    assert result["accuracy"] == pytest.approx(np.mean(reference.predict(unit(x_test)) == y_test))
    assert result == linear_probe(unit(x), y, unit(x_test), y_test, log10_c=[0])


def test_linear_probe_search_halves_the_step_around_the_best_c():
    x, y = blobs(60, 1.5, seed=3)
    x_test, y_test = blobs(20, 1.5, seed=4)
    result = linear_probe(x, y, x_test, y_test)
    tried = [np.log10(c) for c, _ in result["search"]]
    assert np.allclose(tried[:7], [-6, -4, -2, 0, 2, 4, 6])
    # then pairs at +-1, +-1/2, +-1/4, +-1/8 decade around the running best
    steps = sorted({round(abs(a - b), 6) for a in tried[7:] for b in tried if 0 < abs(a - b) <= 1})
    assert {1.0, 0.5, 0.25, 0.125} <= set(steps)
    assert len(tried) <= 7 + 8
    best = max(result["search"], key=lambda t: (t[1], -t[0]))
    assert result["C"] == best[0] and result["validation"]["accuracy"] == best[1]


def test_linear_probe_fixed_grid_and_mean_per_class_selection():
    x, y = blobs(30, 3.0, seed=5)
    result = linear_probe(x, y, x, y, metric="mean_per_class", log10_c=[-2, 0, 2])
    assert [np.log10(c) for c, _ in result["search"]] == pytest.approx([-2, 0, 2])
    assert set(result["validation"]) == {"mean_per_class"}


@pytest.mark.parametrize("seed", range(5))
def test_a_class_of_one_image_stays_in_the_fitted_part(seed):
    # class 1 has a single image; drawn into the validation split it would leave the fit
    # part one class, which LogisticRegression cannot fit
    from sklearn.linear_model import LogisticRegression

    x, y = at_angles([0, 5, 10, 15, 20, 180]), np.array([0, 0, 0, 0, 0, 1])
    x_test, y_test = at_angles([3, 178]), np.array([0, 1])
    result = linear_probe(x, y, x_test, y_test, seed=seed)
    reference = LogisticRegression(C=result["C"], solver="lbfgs", max_iter=1000).fit(x, y)
    assert result["accuracy"] == np.mean(reference.predict(x_test) == y_test)
    assert len(result["search"]) > 7


def test_labels_far_apart_are_classes_like_any_others():
    # labels are values, not a range to allocate: 4e9 and 7 are two classes
    x, y = blobs(20, 12.0, seed=7)
    far = np.asarray([7, 4_000_000_000, 123_456_789_012])[y]
    result = linear_probe(x, far, x, far, log10_c=[0])
    assert result["accuracy"] == linear_probe(x, y, x, y, log10_c=[0])["accuracy"] == 1.0


def test_a_train_split_of_single_images_cannot_be_validated():
    with pytest.raises(InputError, match="every class of the train split has a single image.*--no-probe"):
        linear_probe(at_angles([0, 90, 180]), [0, 1, 2], at_angles([0]), [0])


def test_probe_inputs_are_checked():
    x, y = blobs(5, 3.0, seed=6)
    with pytest.raises(InputError, match="single class"):
        linear_probe(x, np.zeros(len(x), dtype=int), x, y)
    with pytest.raises(InputError, match="k=20 neighbours"):
        knn_classify(x[:10], y[:10], x)
