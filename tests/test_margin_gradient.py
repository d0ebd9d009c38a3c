"""``margin_gradient``: the exact gradient of the margin, or the reference Partial FC code's
straight-through one (the margin applied without a gradient, d logit / d cos = s)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from unicom.losses import PartialFC
from unicom.losses.heads import HEADS, build_margin_head
from unicom.losses.margins import MarginContext

B, D, K = 12, 16, 10
COUNTS = [3, 9, 1, 4, 4, 7, 2, 8, 5, 6]  # DynM-ArcFace: training images per class


def inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=generator), torch.randint(0, K, (B,), generator=generator)


def head(name):
    options = {"scale": 16.0} if "scale" in HEADS[name].options else {}
    return build_margin_head(name, options, num_classes=K, class_counts=COUNTS)


def step(margin, mode, sample_rate=1.0, feature_rate=1.0, seed=0):
    """Loss and dense gradients of one PartialFC forward/backward; the module for its selection."""
    pfc = PartialFC(D, K, margin, sample_rate=sample_rate, feature_rate=feature_rate, seed=3, sparse_gradient=False,
                    margin_gradient=mode)
    prototypes = pfc.prototypes.detach().clone()
    embeddings, labels = inputs(seed)
    embeddings.requires_grad_()
    loss = pfc(embeddings, labels)
    loss.backward()
    return loss.detach(), embeddings.grad, pfc.prototypes.grad, prototypes, pfc


def reference_arcface_step(embeddings, weight, labels, margin, scale, classes=None, features=None):
    """One step of the reference Partial FC code (insightface arcface_torch / deepglint unicom,
    ``CombinedMarginLoss`` with m1 = 1, m3 = 0), one rank: sampled prototypes, selected
    features, normalised cosines clamped to [-1, 1], then ArcFace's margin applied in place
    under ``torch.no_grad()``, times s, softmax cross-entropy (mean over the batch)."""
    if classes is not None:  # the sampled classes; labels become positions among them
        weight = weight[classes]
        labels = torch.searchsorted(classes, labels)
    if features is not None:
        weight, embeddings = weight.index_select(1, features), embeddings.index_select(1, features)
    logits = F.linear(F.normalize(embeddings), F.normalize(weight)).clamp(-1, 1)
    rows = torch.arange(len(labels))
    with torch.no_grad():
        target = logits[rows, labels]
        target.arccos_()
        logits.arccos_()
        logits[rows, labels] = target + margin
        logits.cos_()
    logits = logits * scale
    return F.cross_entropy(logits, labels)


@pytest.mark.parametrize("sample_rate, feature_rate", [(1.0, 1.0), (0.5, 0.5)])
def test_straight_through_gives_the_reference_codes_gradients(sample_rate, feature_rate):
    margin, scale = 0.3, 16.0
    loss, grad_embeddings, grad_prototypes, weight, pfc = step(
        build_margin_head("arcface", {"margin": margin, "scale": scale}), "straight_through", sample_rate, feature_rate)

    embeddings, labels = inputs()
    embeddings.requires_grad_()
    weight.requires_grad_()
    classes = pfc.last_class_index if sample_rate < 1 else None
    reference = reference_arcface_step(embeddings, weight, labels, margin, scale, classes, pfc.last_feature_index)
    reference.backward()

    torch.testing.assert_close(loss, reference.detach(), rtol=1e-6, atol=1e-6)
    # float32 through different orders of operations; the prototypes' gradients are ~100
    torch.testing.assert_close(grad_embeddings, embeddings.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_prototypes, weight.grad, rtol=1e-4, atol=1e-5)
    # the exact gradient is another one: the option changes what is trained
    _, exact_embeddings, _, _, _ = step(build_margin_head("arcface", {"margin": margin, "scale": scale}), "exact",
                                         sample_rate, feature_rate)
    assert (exact_embeddings - grad_embeddings).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(HEADS))
def test_straight_through_keeps_every_heads_loss(name):
    exact, *_ = step(head(name), "exact", sample_rate=0.5)
    straight, *_ = step(head(name), "straight_through", sample_rate=0.5)
    assert torch.equal(exact, straight)


@pytest.mark.parametrize("name", list(HEADS))
def test_straight_through_gradient_is_the_scale_times_the_softmax_residual(name):
    """For every head: dL/dcos = s (softmax(z) - one_hot) / B with z the head's logits,
    carried to the embeddings and prototypes by autograd through the cosines alone."""
    margin = head(name)
    before = copy.deepcopy(margin)  # stateful heads (AdaCos, CurricularFace, AdaFace) update in the step
    _, grad_embeddings, grad_prototypes, weight, _ = step(margin, "straight_through")

    embeddings, labels = inputs()
    embeddings.requires_grad_()
    weight.requires_grad_()
    cosines = F.linear(F.normalize(embeddings), F.normalize(weight))
    context = MarginContext(class_ids=labels, column_classes=torch.arange(K),
                            norms=torch.linalg.vector_norm(embeddings.detach(), dim=1))
    with torch.no_grad():
        logits = before(cosines.detach(), labels, context)
    residual = torch.softmax(logits, dim=1) - F.one_hot(labels, K).float()
    cosines.backward(float(before.scale) * residual / B)

    torch.testing.assert_close(grad_embeddings, embeddings.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grad_prototypes, weight.grad, rtol=1e-4, atol=1e-7)


def test_an_unknown_margin_gradient_is_refused():
    from unicom.errors import InputError

    with pytest.raises(InputError, match="margin_gradient must be one of exact, straight_through"):
        PartialFC(D, K, margin_gradient="reference")
