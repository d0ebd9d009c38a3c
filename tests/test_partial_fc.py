"""PartialFC: exactness against an independent reference, sharding, sampling, feature selection."""

import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning.losses import ArcFaceLoss, CosFaceLoss, SubCenterArcFaceLoss
from scipy import stats

from support import run_workers
from unicom.engine.device import exact_float32
from unicom.errors import InputError
from unicom.losses import AdaCos, AdaFace, ArcFace, CosFace, CurricularFace, DynMArcFace, LiArcFace, PartialFC, shard_range


def _close(actual, expected, tol=1e-5):
    """|a − e| <= tol · max(1, max|e|): 1e-5 relative to the tensor's scale."""
    scale = max(1.0, float(expected.abs().max()))
    assert float((actual - expected).abs().max()) <= tol * scale


def _embeddings(batch, dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=generator)


# -- exactness against pytorch-metric-learning ------------------------------------------


def _assert_same_as_reference(pfc, reference, x, labels):
    """Loss and gradients of ``pfc`` equal those of a pml loss holding W = prototypesᵀ."""
    reference.W.data = pfc.prototypes.data.t().clone()
    x = x.clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    loss, loss_ref = pfc(x, labels), reference(x_ref, labels)
    loss.backward()
    loss_ref.backward()
    _close(loss.detach(), loss_ref.detach())
    _close(x.grad, x_ref.grad)
    _close(pfc.prototypes.grad, reference.W.grad.t())


@pytest.mark.parametrize("margin", [0.3, 0.5])
def test_full_partial_fc_equals_pml_arcface(margin):
    batch, dim, classes = 24, 64, 100
    labels = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(1))
    _assert_same_as_reference(
        PartialFC(dim, classes, ArcFace(margin, 64.0), seed=3),
        ArcFaceLoss(classes, dim, margin=math.degrees(margin), scale=64),
        _embeddings(batch, dim),
        labels,
    )


def test_full_partial_fc_equals_pml_in_the_fallback_region():
    # embeddings pointing away from their class prototype: θ + m > π for every row, with
    # cos θ clear of −1 (where arccos has no finite gradient and rounding decides the result)
    dim, classes = 16, 10
    pfc = PartialFC(dim, classes, ArcFace(0.5, 64.0), seed=0)
    away = -torch.nn.functional.normalize(pfc.prototypes.detach(), dim=1)
    x = away + 0.05 * torch.nn.functional.normalize(_embeddings(classes, dim, seed=1), dim=1)  # seed 0 drew the prototypes
    cos = torch.nn.functional.cosine_similarity(x, pfc.prototypes.detach(), dim=1)
    assert (cos > -0.9999).all() and (torch.arccos(cos) + 0.5 > math.pi).all()
    _assert_same_as_reference(pfc, ArcFaceLoss(classes, dim, margin=math.degrees(0.5), scale=64), x, torch.arange(classes))


def test_rows_of_zero_and_tiny_norm_get_the_gradient_of_f_normalize():
    # the embeddings are normalised inside the cosines, with their backward written out:
    # rows of norm 0 and under 1e-12 (divided by 1e-12, as F.normalize does) against pml, row by row
    dim, classes = 16, 12
    pfc = PartialFC(dim, classes, CosFace(0.35, 64.0), seed=4)
    reference = CosFaceLoss(classes, dim, margin=0.35, scale=64)
    reference.W.data = pfc.prototypes.data.t().clone()
    x = _embeddings(6, dim, seed=2)
    x[1] = 0.0
    x[4] *= 1e-13 / float(x[4].norm())
    labels = torch.tensor([0, 5, 3, 3, 11, 7])
    x, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    pfc(x, labels).backward()
    reference(x_ref, labels).backward()
    for row in range(6):
        torch.testing.assert_close(x.grad[row], x_ref.grad[row], rtol=1e-4, atol=1e-5 * float(x_ref.grad[row].abs().max()))
    assert float(x.grad[4].abs().max()) > 1e9  # the tiny row's gradient is that of x / 1e-12


def test_cosface_equals_pml_cosface():
    batch, dim, classes = 16, 32, 40
    _assert_same_as_reference(
        PartialFC(dim, classes, CosFace(0.35, 64.0), seed=5),
        CosFaceLoss(classes, dim, margin=0.35, scale=64),
        _embeddings(batch, dim),
        torch.randint(0, classes, (batch,)),
    )


def test_sub_centers_equal_pml_sub_center_arcface():
    batch, dim, classes, centers = 16, 32, 20, 3
    # both order the columns as class · centers + c
    _assert_same_as_reference(
        PartialFC(dim, classes, ArcFace(0.3, 64.0), centers=centers, seed=2),
        SubCenterArcFaceLoss(num_classes=classes, embedding_size=dim, margin=math.degrees(0.3), scale=64, sub_centers=centers),
        _embeddings(batch, dim),
        torch.randint(0, classes, (batch,)),
    )


def test_gradcheck_float64():
    dim, classes = 6, 9
    for sample_rate, feature_rate in [(1.0, 1.0), (1.0, 0.5), (0.5, 0.5)]:
        pfc = PartialFC(dim, classes, ArcFace(0.3, 4.0), sample_rate=sample_rate, feature_rate=feature_rate,
                        seed=7, sparse_gradient=False).double()
        labels = torch.tensor([0, 3, 3, 8])
        x = _embeddings(4, dim).double().requires_grad_()
        state = pfc.rng_state() or None

        def loss_of(embeddings, prototypes):
            # same random selection at every evaluation
            if state is not None:
                pfc.set_rng_state(state)
            with torch.no_grad():
                pfc.prototypes.copy_(prototypes)
            pfc.prototypes.grad = None
            return _LossWithPrototypes.apply(embeddings, prototypes, pfc, labels)

        pfc(x.detach(), labels)  # create the generators, then pin their state
        state = pfc.rng_state()
        prototypes = pfc.prototypes.detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(loss_of, (x, prototypes), eps=1e-6, atol=1e-6)


class _LossWithPrototypes(torch.autograd.Function):
    """Expose the module's parameter gradient as the gradient of an explicit input."""

    @staticmethod
    def forward(ctx, embeddings, prototypes, pfc, labels):
        with torch.enable_grad():
            e = embeddings.detach().requires_grad_()
            loss = pfc(e, labels)
            grad_e, grad_p = torch.autograd.grad(loss, (e, pfc.prototypes))
        ctx.save_for_backward(grad_e, grad_p)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad):
        grad_e, grad_p = ctx.saved_tensors
        return grad * grad_e, grad * grad_p, None, None


def test_gradcheck_of_the_module_itself_float64():
    pfc = PartialFC(5, 7, ArcFace(0.3, 4.0), seed=1).double()
    labels = torch.tensor([1, 6, 2])
    x = _embeddings(3, 5).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda e: pfc(e, labels), (x,), eps=1e-6, atol=1e-6)


# -- random negative-class selection ------------------------------------------------------


def test_sampling_keeps_every_positive_and_has_the_specified_size():
    classes, rate = 1000, 0.1
    pfc = PartialFC(16, classes, sample_rate=rate, seed=0)
    for step in range(20):
        labels = torch.randint(0, classes, (32,), generator=torch.Generator().manual_seed(step))
        pfc(_embeddings(32, 16, seed=step), labels).backward()
        selected = pfc.last_class_index
        assert selected.numel() == math.ceil(rate * classes)
        assert set(labels.tolist()) <= set(selected.tolist())
        assert torch.equal(selected, torch.unique(selected))


def test_sampling_takes_all_positives_when_they_exceed_the_rate():
    pfc = PartialFC(8, 50, sample_rate=0.1, seed=0)
    labels = torch.arange(20)  # 20 positives > ceil(0.1 · 50) = 5
    pfc(_embeddings(20, 8), labels)
    assert pfc.last_class_index.tolist() == list(range(20))


def test_classes_per_step_counts_distinct_labels_by_enumeration():
    """2 of 3 uniform labels: 9 equally likely batches, 3 with one distinct label, 6 with two."""
    import itertools

    from unicom.losses import classes_per_step

    batches = list(itertools.product(range(3), repeat=2))
    expected = sum(len(set(b)) for b in batches) / len(batches)
    assert expected == 15 / 9
    assert classes_per_step(3, 2, 1.0).positives == pytest.approx(expected)


def test_classes_per_step_samples_per_shard():
    """10 classes over 3 ranks hold 4, 3, 3; at r1 = 0.3 they sample ceil(1.2) + ceil(0.9) + ceil(0.9) = 4."""
    from unicom.losses import classes_per_step

    selection = classes_per_step(10, 2, 0.3, world_size=3)
    assert selection.sampled == 4 and not selection.all_classes
    assert classes_per_step(10, 2, 0.95).all_classes  # ceil(9.5) = 10: r1 keeps every class


def test_a_small_k_and_r1_leave_the_batchs_positives_only():
    """k = 136, batch 32, r1 = 0.1: ceil(13.6) = 14 sampled, ~28.6 distinct labels; the
    selection of PartialFC itself then takes exactly the positives, as many as predicted."""
    from unicom.losses import classes_per_step

    selection = classes_per_step(136, 32, 0.1)
    assert selection.sampled == 14 and selection.positives_only
    assert selection.positives == pytest.approx(136 * (1 - (135 / 136) ** 32))
    pfc = PartialFC(8, 136, sample_rate=0.1, seed=0)
    counts = []
    for step in range(300):
        labels = torch.randint(0, 136, (32,), generator=torch.Generator().manual_seed(step))
        positives = torch.unique(labels)
        selected = pfc.select_classes(labels, torch.ones_like(labels, dtype=torch.bool))
        if positives.numel() >= 14:
            assert torch.equal(selected, positives)
        counts.append(selected.numel())
    assert sum(counts) / len(counts) == pytest.approx(selection.used, abs=0.5)


def test_negatives_are_sampled_uniformly():
    classes, rate, steps = 200, 0.1, 600
    pfc = PartialFC(8, classes, sample_rate=rate, seed=11, check_inputs=False)
    labels = torch.tensor([0, 1])
    counts = np.zeros(classes)
    x = _embeddings(2, 8)
    with torch.no_grad():
        for _ in range(steps):
            pfc(x, labels)
            counts[pfc.last_class_index.numpy()] += 1
    assert counts[0] == counts[1] == steps
    negatives = counts[2:]
    # each step draws ceil(0.1·200) − 2 = 18 negatives from 198 classes
    assert negatives.sum() == steps * (math.ceil(rate * classes) - 2)
    _, p_value = stats.chisquare(negatives)
    assert p_value > 1e-3


def test_only_selected_prototypes_get_a_gradient_and_it_is_sparse():
    pfc = PartialFC(16, 300, sample_rate=0.2, seed=0)
    labels = torch.randint(0, 300, (8,))
    pfc(_embeddings(8, 16), labels).backward()
    grad = pfc.prototypes.grad
    assert grad.is_sparse
    rows = grad.coalesce().indices()[0]
    assert torch.equal(rows.sort().values, pfc.last_class_index)


def test_sparse_and_dense_gradients_agree():
    kwargs = dict(embedding_size=16, num_classes=200, sample_rate=0.3, feature_rate=0.5, seed=4)
    sparse, dense = PartialFC(**kwargs), PartialFC(**kwargs, sparse_gradient=False)
    labels = torch.randint(0, 200, (10,))
    x1 = _embeddings(10, 16).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    l1, l2 = sparse(x1, labels), dense(x2, labels)
    l1.backward()
    l2.backward()
    assert torch.equal(sparse.last_class_index, dense.last_class_index)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(sparse.prototypes.grad.to_dense(), dense.prototypes.grad)


def test_sampled_loss_equals_full_softmax_over_the_sampled_classes():
    """r1 < 1 is the exact margin softmax restricted to S (checked against pml on W[:, S])."""
    dim, classes = 32, 400
    pfc = PartialFC(dim, classes, ArcFace(0.3, 64.0), sample_rate=0.1, seed=9)
    labels = torch.randint(0, classes, (12,))
    x = _embeddings(12, dim)
    loss = pfc(x, labels)
    selected = pfc.last_class_index
    reference = ArcFaceLoss(selected.numel(), dim, margin=math.degrees(0.3), scale=64)
    reference.W.data = pfc.prototypes.data[selected].t().clone()
    remapped = torch.searchsorted(selected, labels)
    _close(loss.detach(), reference(x, remapped).detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_sampled_step_equals_pml_over_the_sampled_classes():
    """The CUDA kernels of a step (sampling, sparse gradient, the margin's and the softmax's
    backward) against pml on the CPU over the classes the GPU sampled; then under bf16 autocast."""
    dim, classes, batch = 64, 2000, 48
    pfc = PartialFC(dim, classes, ArcFace(0.3, 64.0), sample_rate=0.1, seed=9, check_inputs=False).cuda()
    labels = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(2))
    x = _embeddings(batch, dim).cuda().requires_grad_()
    pfc(x.detach(), labels.cuda())  # makes the selection's generators, then their state is kept
    state = pfc.rng_state()
    with exact_float32():  # not TF32, which a training test of this process may have allowed
        loss = pfc(x, labels.cuda())
        loss.backward()
    selected = pfc.last_class_index.cpu()
    reference = ArcFaceLoss(selected.numel(), dim, margin=math.degrees(0.3), scale=64)
    reference.W.data = pfc.prototypes.detach().cpu()[selected].t().clone()
    x_ref = x.detach().cpu().requires_grad_()
    loss_ref = reference(x_ref, torch.searchsorted(selected, labels))
    loss_ref.backward()
    _close(loss.detach().cpu(), loss_ref.detach())
    _close(x.grad.cpu(), x_ref.grad)
    grad = pfc.prototypes.grad.coalesce()
    assert torch.equal(grad.indices()[0].cpu(), selected)
    _close(grad.values().cpu(), reference.W.grad.t())
    pfc.prototypes.grad = None
    pfc.set_rng_state(state, device="cuda")
    x_low = x.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = pfc(x_low, labels.cuda())
    low.backward()
    assert torch.equal(pfc.last_class_index.cpu(), selected)
    assert low.dtype == torch.float32 and abs(low.item() - loss.item()) < 0.05 * loss.item()
    assert torch.nn.functional.cosine_similarity(x_low.grad.flatten(), x.grad.flatten(), dim=0) > 0.99


# -- random feature selection -------------------------------------------------------------


def test_feature_selection_size_and_zero_gradient_elsewhere():
    dim, rate = 40, 0.3
    pfc = PartialFC(dim, 30, sample_rate=0.5, feature_rate=rate, seed=0)
    x = _embeddings(6, dim).requires_grad_()
    pfc(x, torch.randint(0, 30, (6,))).backward()
    kept = pfc.last_feature_index
    assert kept.numel() == round(rate * dim)
    mask = torch.zeros(dim, dtype=torch.bool)
    mask[kept] = True
    assert torch.all(x.grad[:, ~mask] == 0)
    assert torch.all(x.grad[:, mask].abs().sum(0) > 0)  # one mask for every sample
    grad = pfc.prototypes.grad.coalesce().values()
    assert torch.all(grad[:, ~mask] == 0)


def test_feature_selection_is_cosine_in_the_sub_space():
    dim, classes = 20, 15
    pfc = PartialFC(dim, classes, ArcFace(0.3, 64.0), feature_rate=0.5, seed=1)
    labels = torch.randint(0, classes, (9,))
    x = _embeddings(9, dim)
    loss = pfc(x, labels)
    kept = pfc.last_feature_index
    reference = ArcFaceLoss(classes, kept.numel(), margin=math.degrees(0.3), scale=64)
    reference.W.data = pfc.prototypes.data[:, kept].t().clone()
    _close(loss.detach(), reference(x[:, kept], labels).detach())


def test_feature_selection_changes_every_step_and_resumes_from_rng_state():
    pfc = PartialFC(64, 10, feature_rate=0.5, seed=0)
    x, labels = _embeddings(4, 64), torch.tensor([0, 1, 2, 3])
    pfc(x, labels)
    first = pfc.last_feature_index.clone()
    state = pfc.rng_state()
    pfc(x, labels)
    second = pfc.last_feature_index.clone()
    assert not torch.equal(first, second)
    pfc.set_rng_state(state)
    pfc(x, labels)
    assert torch.equal(pfc.last_feature_index, second)


# -- mixed precision ----------------------------------------------------------------------


def test_bf16_autocast_gives_float32_loss_close_to_float32():
    pfc = PartialFC(64, 500, sample_rate=0.2, feature_rate=0.5, seed=0)
    labels = torch.randint(0, 500, (16,))
    x = _embeddings(16, 64)
    pfc(x, labels)
    state = pfc.rng_state()
    full = pfc(x, labels)
    pfc.set_rng_state(state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = pfc(x.bfloat16(), labels)
    assert low.dtype == torch.float32
    assert abs(low.item() - full.item()) < 0.05 * full.item()


# -- input errors -------------------------------------------------------------------------


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([0, 10]), "labels range from 0 to 10"),
    (torch.tensor([-1, 3]), "labels range from -1 to 3"),
])
def test_labels_out_of_range(labels, message):
    pfc = PartialFC(8, 10)
    with pytest.raises(InputError, match=message):
        pfc(_embeddings(2, 8), labels)


def test_wrong_dimension_and_nonfinite_rows():
    pfc = PartialFC(8, 10)
    with pytest.raises(InputError, match="dimension 7.*embedding_size=8"):
        pfc(_embeddings(2, 7), torch.tensor([0, 1]))
    x = _embeddings(5, 8)
    x[1, 0] = float("nan")
    x[3, 2] = float("inf")
    with pytest.raises(InputError, match="2 of 5 embedding rows contain NaN or Inf"):
        pfc(x, torch.arange(5))
    with pytest.raises(InputError, match="integers"):
        pfc(_embeddings(2, 8), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("kwargs", [dict(sample_rate=0.0), dict(sample_rate=1.5), dict(feature_rate=-0.1), dict(feature_rate=1.01)])
def test_rates_outside_unit_interval(kwargs):
    with pytest.raises(InputError, match="must be in \\(0, 1\\]"):
        PartialFC(8, 10, **kwargs)


def test_shard_ranges_cover_every_class_once():
    for classes, world in [(10, 3), (7, 7), (1_000_003, 8)]:
        ranges = [shard_range(classes, rank, world) for rank in range(world)]
        assert ranges[0][0] == 0
        for (start, count), (next_start, _) in zip(ranges, ranges[1:]):
            assert start + count == next_start
        assert sum(count for _, count in ranges) == classes
        assert max(c for _, c in ranges) - min(c for _, c in ranges) <= 1


# -- two processes ------------------------------------------------------------------------
# Every two-process case runs in one pair of gloo processes (started once per module).

DIM, CLASSES, BATCH = 24, 37, 6
RATE_CASES = [(1.0, 1.0), (0.3, 1.0), (0.3, 0.5)]


def _head(name):
    """Margin heads whose logits depend on more than their own shard's cosines."""
    return {
        "arcface": lambda: ArcFace(0.3, 64.0),
        "dynm": lambda: DynMArcFace(torch.arange(1, CLASSES + 1)),
        "adacos": lambda: AdaCos(CLASSES),
        "curricular": lambda: CurricularFace(),
        "adaface": lambda: AdaFace(),
        "liarcface": lambda: LiArcFace(),
    }[name]()


HEAD_CASES = ["dynm", "adacos", "curricular", "adaface", "liarcface"]
STRAIGHT_THROUGH_CASES = ["arcface", "curricular", "adaface"]  # margin_gradient="straight_through"
ERROR_CASES = {
    "batch": "batch size differs across ranks \\(rank 0: 4, rank 1: 5\\)",
    "rate": "feature_rate differs across ranks",
    "nan": "1 of 4 embedding rows contain NaN or Inf on rank 1",
}


def _global_inputs():
    generator = torch.Generator().manual_seed(123)
    x = torch.randn(2 * BATCH, DIM, generator=generator)
    labels = torch.randint(0, CLASSES, (2 * BATCH,), generator=generator)
    return x, labels


def _sharded_step(rank, sample_rate, feature_rate, head="arcface", margin_gradient="exact"):
    pfc = PartialFC(DIM, CLASSES, _head(head), sample_rate=sample_rate, feature_rate=feature_rate, seed=42,
                    margin_gradient=margin_gradient)
    x, labels = _global_inputs()
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    x_local = x[mine].clone().requires_grad_()
    loss = pfc(x_local, labels[mine])
    loss.backward()
    grad = pfc.prototypes.grad
    grad = grad.to_dense() if grad.is_sparse else grad
    return {
        "loss": loss.item(),
        "x_grad": x_local.grad.numpy(),
        "prototypes": pfc.prototypes.detach().numpy(),
        "prototype_grad": grad.numpy(),
        "classes": pfc.last_class_index.numpy(),
        "features": None if pfc.last_feature_index is None else pfc.last_feature_index.numpy(),
        "buffers": {name: b.numpy() for name, b in pfc.margin.named_buffers()},
    }


def _mismatched_step(rank, what):
    batch = 4 + (rank if what == "batch" else 0)
    rate = 0.5 if (what == "rate" and rank == 1) else 1.0
    pfc = PartialFC(8, 10, feature_rate=rate, seed=0)
    x = torch.randn(batch, 8)
    if what == "nan" and rank == 1:
        x[0, 0] = float("nan")
    try:
        pfc(x, torch.zeros(batch, dtype=torch.long))
    except InputError as error:
        return str(error)
    return "no error"


def _all_cases(rank, world_size):
    return {
        "rates": {case: _sharded_step(rank, *case) for case in RATE_CASES},
        "heads": {head: _sharded_step(rank, 0.3, 1.0, head) for head in HEAD_CASES},
        "straight_through": {head: _sharded_step(rank, 0.3, 1.0, head, "straight_through")
                             for head in STRAIGHT_THROUGH_CASES},
        "errors": {what: _mismatched_step(rank, what) for what in ERROR_CASES},
    }


@pytest.fixture(scope="module")
def two_ranks():
    results = run_workers(_all_cases, 2, timeout=120)
    assert all(status == "ok" for status, _ in results), results
    return [value for _, value in results]


class _FixedSelection(PartialFC):
    """One process holding all classes, made to use the classes the shards selected."""

    def __init__(self, *args, classes, features, **kwargs):
        super().__init__(*args, **kwargs)
        self._classes, self._features = classes, features

    def select_classes(self, local_labels, in_shard):
        return self._classes

    def select_features(self, device):
        return self._features


def _assert_single_process_agrees(ranks, sample_rate, feature_rate, head="arcface", margin_gradient="exact"):
    # the same loss on both ranks; the same feature selection
    assert ranks[0]["loss"] == pytest.approx(ranks[1]["loss"], rel=1e-6)
    if feature_rate < 1:
        assert np.array_equal(ranks[0]["features"], ranks[1]["features"])

    classes = torch.from_numpy(np.concatenate([r["classes"] for r in ranks]))
    features = None if ranks[0]["features"] is None else torch.from_numpy(ranks[0]["features"])
    single = _FixedSelection(DIM, CLASSES, _head(head), sample_rate=sample_rate, feature_rate=feature_rate,
                             seed=42, classes=None if sample_rate == 1 else classes, features=features,
                             margin_gradient=margin_gradient)
    x, labels = _global_inputs()
    x = x.requires_grad_()
    loss = single(x, labels)
    loss.backward()
    assert loss.item() == pytest.approx(ranks[0]["loss"], rel=1e-5)
    x_grad = np.concatenate([r["x_grad"] for r in ranks])
    _close(torch.from_numpy(x_grad), x.grad)
    grad = single.prototypes.grad
    grad = grad.to_dense() if grad.is_sparse else grad
    _close(torch.from_numpy(np.concatenate([r["prototype_grad"] for r in ranks])), grad)
    for name, value in single.margin.named_buffers():  # running statistics agree on every rank
        for rank in ranks:
            np.testing.assert_allclose(rank["buffers"][name], value.numpy(), rtol=1e-5)


@pytest.mark.parametrize("sample_rate, feature_rate", RATE_CASES)
def test_two_processes_equal_one_process(two_ranks, sample_rate, feature_rate):
    ranks = [rank["rates"][(sample_rate, feature_rate)] for rank in two_ranks]
    # prototypes initialised independently of the sharding
    single_init = PartialFC(DIM, CLASSES, seed=42)
    gathered = np.concatenate([r["prototypes"] for r in ranks])
    assert np.array_equal(gathered, single_init.prototypes.detach().numpy())
    _assert_single_process_agrees(ranks, sample_rate, feature_rate)


@pytest.mark.parametrize("head", HEAD_CASES)
def test_every_margin_head_gives_the_same_result_sharded(two_ranks, head):
    _assert_single_process_agrees([rank["heads"][head] for rank in two_ranks], 0.3, 1.0, head)


@pytest.mark.parametrize("head", STRAIGHT_THROUGH_CASES)
def test_the_straight_through_gradient_is_the_same_sharded(two_ranks, head):
    ranks = [rank["straight_through"][head] for rank in two_ranks]
    _assert_single_process_agrees(ranks, 0.3, 1.0, head, "straight_through")
    exact = [rank["heads"][head]["x_grad"] for rank in two_ranks] if head in HEAD_CASES else None
    if exact is not None:  # and it is not the exact one
        assert not np.allclose(np.concatenate(exact), np.concatenate([r["x_grad"] for r in ranks]), atol=1e-6)


@pytest.mark.parametrize("what", list(ERROR_CASES))
def test_errors_are_raised_on_every_rank_without_hanging(two_ranks, what):
    import re

    for rank in two_ranks:
        assert re.search(ERROR_CASES[what], rank["errors"][what]), rank["errors"][what]


def test_the_embedding_norms_reach_the_heads_that_read_them():
    """PartialFC computes the norms of the embeddings for heads that declare ``uses_norms``
    (AdaFace) and for modules that are not margin heads of this project; other heads get None."""
    seen = {}

    class Recording(ArcFace):
        def forward(self, cosines, labels, context=None):
            seen[type(self).__name__] = context.norms
            return super().forward(cosines, labels, context)

    class ReadsNorms(Recording):
        uses_norms = True

    class Foreign(torch.nn.Module):  # a head of the user's own: given everything
        scale = 16.0

        def forward(self, cosines, labels, context=None):
            seen["Foreign"] = context.norms
            return cosines.float() * self.scale

    torch.manual_seed(0)
    embeddings, labels = torch.randn(6, 8) * 3, torch.tensor([0, 4, 9, 2, 2, 7])
    for head in (Recording(), ReadsNorms(), Foreign()):
        PartialFC(8, 10, head, sample_rate=0.5, feature_rate=0.5, seed=1)(embeddings, labels)
    expected = torch.tensor([float(np.linalg.norm(row)) for row in embeddings.numpy().astype(np.float64)], dtype=torch.float64)
    assert seen["Recording"] is None
    for name in ("ReadsNorms", "Foreign"):  # of the whole embeddings, before the feature selection
        torch.testing.assert_close(seen[name].double(), expected, rtol=1e-6, atol=0)
