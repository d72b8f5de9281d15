"""Curvature (eq. 2), the factor matrix of Assumption 4.2 and ambiguous pairs (Definition 4.3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from igat_core.models.small import MLP
from igat_core.theory.curvature import (
    CurvatureConfig,
    curvature_along,
    default_radius,
    pointwise_curvature,
    summarize,
    upper_quantile,
)
from igat_core.theory.factor import factor_gram, factor_norms, logit_jacobian
from igat_core.theory.pairs import (
    PairConstants,
    ambiguous_pairs,
    estimate_constants,
    nearest_cross_class_pairs,
)


def bias_free_mlp(d: int = 6, width: int = 8, c: int = 4, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(c, d, width, depth=2, bias=False).double().eval()


def test_curvature_of_a_linear_softmax_model_matches_the_closed_form():
    torch.manual_seed(0)
    model = nn.Linear(5, 3, bias=False).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    delta = 0.3 * torch.randn(4, 5, dtype=torch.float64)
    onehot = F.one_hot(y, 3).double()
    grad = lambda v: (torch.softmax(model(v), -1) - onehot) @ model.weight  # noqa: E731
    expected = (grad(x + delta) - grad(x)).norm(dim=1) / delta.norm(dim=1)
    with torch.no_grad():
        assert torch.allclose(curvature_along(model, x, y, delta), expected, atol=1e-10)


def test_pointwise_curvature_takes_the_largest_probe_and_is_seeded():
    model = bias_free_mlp()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 4, (10,))
    config = CurvatureConfig(radius=0.1, n_random=3, batch_size=4, seed=1)
    lam = pointwise_curvature(model, x, y, config)
    assert lam.shape == (10,) and torch.all(lam >= 0)
    assert torch.equal(lam, pointwise_curvature(model, x, y, config))
    only_sign = pointwise_curvature(model, x, y, CurvatureConfig(radius=0.1, n_random=0))
    assert torch.all(lam >= only_sign - 1e-12)
    with pytest.raises(ValueError):
        pointwise_curvature(model, x, y, CurvatureConfig(radius=0.0))


def test_factor_matrix_from_its_definition_equals_j_j_transpose():
    model = bias_free_mlp()
    x = torch.randn(3, 6, dtype=torch.float64)
    w1, w2, w3 = (layer.weight for layer in model.layers if isinstance(layer, nn.Linear))
    jac = logit_jacobian(model, x)
    for b in range(3):
        a1 = torch.relu(w1 @ x[b])
        d_a1 = (w1 @ x[b] > 0).double()[:, None] * w1
        d_a2 = (w2 @ a1 > 0).double()[:, None] * (w2 @ d_a1)
        p = [w3 @ d_a2[:, k] for k in range(6)]
        gram = sum(torch.outer(pk, pk) for pk in p)
        assert torch.allclose(factor_gram(jac)[b], gram, atol=1e-10)
        full = torch.autograd.functional.jacobian(lambda v: model(v.unsqueeze(0)).squeeze(0), x[b])
        assert torch.allclose(jac[b], full, atol=1e-10)


def test_factor_norms_are_those_of_a_full_rank_factor_and_its_pseudo_inverse():
    model = bias_free_mlp(width=12, seed=3)
    x = torch.randn(5, 6, dtype=torch.float64)
    norms = factor_norms(model, x)
    gram = factor_gram(logit_jacobian(model, x))
    for b in range(5):
        evals, evecs = torch.linalg.eigh(gram[b])
        keep = evals > 1e-10 * evals.max()
        factor = evecs[:, keep] * evals[keep].sqrt()
        assert torch.allclose(factor @ factor.T, gram[b], atol=1e-9)
        assert norms.norm[b] == pytest.approx(float(torch.linalg.matrix_norm(factor, 2)), rel=1e-8)
        assert norms.norm[b] == pytest.approx(math.sqrt(float(torch.linalg.matrix_norm(gram[b], 2))), rel=1e-8)
        assert norms.pinv_norm[b] == pytest.approx(float(torch.linalg.matrix_norm(torch.linalg.pinv(factor), 2)),
                                                   rel=1e-6)
        assert int(norms.rank[b]) == int(keep.sum())


def test_a_dead_network_has_an_infinite_pseudo_inverse_bound():
    model = bias_free_mlp()
    for layer in model.layers:
        if isinstance(layer, nn.Linear):
            nn.init.zeros_(layer.weight)
    norms = factor_norms(model, torch.randn(2, 6, dtype=torch.float64))
    assert torch.all(norms.norm == 0) and torch.all(torch.isinf(norms.pinv_norm)) and torch.all(norms.rank == 0)


def test_quantiles_and_summaries_handle_infinities():
    values = torch.tensor([1.0, 2.0, 3.0, math.inf])
    assert upper_quantile(values, 0.5) == 2.0 and upper_quantile(values, 0.75) == 3.0
    assert upper_quantile(values, 1.0) == math.inf and upper_quantile(values, 0.0) == 1.0
    s = summarize(torch.tensor([1.0, 2.0, 3.0, 4.0]), quantile=0.5)
    assert s == {"mean": 2.5, "median": 2.0, "q95": 4.0, "max": 4.0, "tilde": 2.0}
    assert math.isnan(summarize(torch.zeros(0))["max"])
    assert default_radius(0.1, torch.zeros(3, 1, 8, 8)) == pytest.approx(0.8)


def test_pair_constants_follow_eq_10():
    c = PairConstants(curvature=2.0, factor_norm=3.0, pinv_norm=5.0, num_classes=4, xi=1.0)
    assert c.b == 5.0 and c.lipschitz() == pytest.approx(5.0 * math.sqrt(4 * 3.0))
    assert c.radius(3.0) == pytest.approx(1 / (3.0 * c.lipschitz()))
    assert c.j_for_radius(c.radius(3.0)) == pytest.approx(3.0)
    assert PairConstants(2.0, 3.0, 5.0, 4, b_source="factor").b == 3.0
    with pytest.raises(ValueError):
        PairConstants(1.0, 1.0, 1.0, 2, xi=2.0)


def brute_force_pairs(x: torch.Tensor, y: torch.Tensor) -> list[tuple[float, int, int]]:
    flat = x.flatten(1).double()
    return sorted((float((flat[i] - flat[j]).norm()), i, j) for i in range(len(y)) for j in range(i + 1, len(y))
                  if y[i] != y[j])


def test_nearest_cross_class_pairs_match_brute_force_in_chunks():
    torch.manual_seed(0)
    x, y = torch.rand(40, 1, 3, 3), torch.randint(0, 3, (40,))
    expected = brute_force_pairs(x, y)
    i, j, d = nearest_cross_class_pairs(x, y, k=15, chunk=7)
    assert [(round(a, 9), b, c) for a, b, c in expected[:15]] == \
        [(round(float(a), 9), int(b), int(c)) for a, b, c in zip(d, i, j)]
    within = expected[20][0]
    i, j, d = nearest_cross_class_pairs(x, y, max_distance=within, chunk=5)
    assert len(d) == sum(1 for e in expected if e[0] <= within) and torch.all(y[i] != y[j]) and torch.all(i < j)


def test_ambiguous_pairs_choose_the_largest_j_leaving_enough_pairs():
    x = torch.tensor([[0.0], [0.1], [1.0], [1.5], [3.0]]).view(5, 1, 1, 1)
    y = torch.tensor([0, 1, 0, 1, 0])
    small = PairConstants(curvature=1.0, factor_norm=1.0, pinv_norm=0.5, num_classes=1)
    found = ambiguous_pairs(x, y, small, min_pairs=2)
    assert len(found) == 2 and found.radius == pytest.approx(0.5)
    assert found.j == pytest.approx(1 / (0.5 * 0.5)) and found.definition_met
    assert found.rows(y)[0] == {"i": 0, "j": 1, "y_i": 0, "y_j": 1, "distance": pytest.approx(0.1)}
    given = ambiguous_pairs(x, y, small, j=3.0)
    assert given.radius == pytest.approx(1 / 1.5) and len(given) == 2 and given.definition_met
    large = PairConstants(curvature=10.0, factor_norm=1.0, pinv_norm=10.0, num_classes=1)
    loose = ambiguous_pairs(x, y, large, min_pairs=1)
    assert len(loose) == 1 and loose.j < 2 and not loose.definition_met
    assert not ambiguous_pairs(x, y, large, j=3.0).definition_met


def test_constants_are_the_max_over_the_family():
    models = [bias_free_mlp(seed=s) for s in range(2)]
    x, y = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 4, (12,))
    est = estimate_constants(models, x, y, 4, curvature=CurvatureConfig(0.2))
    assert est.constants.curvature == max(c["max"] for c in est.curvature)
    assert est.constants.factor_norm == max(f["max"] for f in est.factor_norm)
    assert est.constants.pinv_norm == max(p["max"] for p in est.pinv_norm)
    assert set(est.to_dict()) == {"constants", "curvature_radius", "per_model"}
