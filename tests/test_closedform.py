"""Closed-form heads: ridge (LOO lambda, temperature), ridge from moments (GCV), LDA, NCM."""

from __future__ import annotations

import pytest
import torch

from taps_cl.routing.closedform import (
    LinearHead,
    class_moments,
    fit_scale,
    lda_head,
    ncm_head,
    one_hot,
    ridge_from_moments,
    ridge_head,
)


def gaussian_classes(n_per: int, num_classes: int, dim: int, sep: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    centres = sep * torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    y = torch.arange(num_classes).repeat_interleave(n_per)
    z = centres[y] + torch.randn(len(y), dim, generator=gen, dtype=torch.float64)
    return z, y


def test_ridge_matches_normal_equations_at_fixed_lambda():
    z, y = gaussian_classes(20, 3, 8, 1.0)
    head = ridge_head(z, y, 3, lam=0.7, temperature=False)
    zc, t = z - z.mean(0), one_hot(y, 3)
    w = torch.linalg.solve(
        zc.T @ zc + head.param * torch.eye(8, dtype=torch.float64), zc.T @ (t - t.mean(0))
    )
    torch.testing.assert_close(head.weight, w.T)
    torch.testing.assert_close(head.bias, t.mean(0) - w.T @ z.mean(0))


def test_ridge_loo_lambda_is_the_press_minimiser_and_head_classifies():
    z, y = gaussian_classes(30, 4, 16, 1.5)
    zt, yt = gaussian_classes(30, 4, 16, 1.5, seed=0)
    head = ridge_head(z, y, 4)
    assert head.kind == "ridge" and head.param > 0 and 0 < head.scale <= 30
    assert float((head.logits(zt).argmax(1) == yt).double().mean()) > 0.9

    # brute-force leave-one-out at the chosen lambda equals the closed form's choice being good
    def press(lam):
        err = 0.0
        for i in range(len(y)):
            keep = torch.arange(len(y)) != i
            h = ridge_head(z[keep], y[keep], 4, lam=lam, temperature=False)
            err += float(((h.logits(z[i : i + 1]) - one_hot(y[i : i + 1], 4)) ** 2).sum())
        return err

    lam = head.param
    assert press(lam) <= min(press(lam * 10), press(lam / 10)) + 1e-9


def test_ridge_from_moments_equals_direct_solution_and_gcv_picks_a_grid_point():
    z, y = gaussian_classes(25, 3, 10, 1.0)
    t = one_hot(y, 3)
    g, c = z.T @ z, z.T @ t
    w, reg = ridge_from_moments(g, c, len(y), float((t * t).sum()), lam=2.0)
    torch.testing.assert_close(
        w, torch.linalg.solve(g + 2.0 * torch.eye(10, dtype=torch.float64), c)
    )
    assert reg == 2.0
    w2, reg2 = ridge_from_moments(g, c, len(y), float((t * t).sum()))
    assert reg2 > 0 and torch.isfinite(w2).all()


def test_lda_head_is_a_log_posterior_up_to_a_constant():
    z, y = gaussian_classes(40, 3, 5, 2.0)
    count, mean, scatter = class_moments(z, y, 3)
    head = lda_head(count, mean, scatter, shrinkage=0.0)
    sigma = scatter / (len(y) - 3)
    dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=sigma)
    logp = dist.log_prob(z[:, None, :]) + torch.log(count.double() / count.sum())
    diff = torch.log_softmax(head.logits(z), 1) - torch.log_softmax(logp, 1)
    assert float(diff.abs().max()) < 1e-8


def test_lda_unseen_class_is_never_chosen_and_bad_input_raises():
    z, y = gaussian_classes(10, 2, 4, 2.0)
    count, mean, scatter = class_moments(z, y, 3)  # class 2 unseen
    head = lda_head(count, mean, scatter)
    assert int((head.logits(z).argmax(1) == 2).sum()) == 0
    with pytest.raises(ValueError, match="more samples"):
        lda_head(torch.tensor([1, 1]), mean[:2], scatter)
    with pytest.raises(ValueError, match="labels"):
        ridge_head(z, y.float(), 2)
    with pytest.raises(ValueError, match="NaN"):
        ridge_head(z * float("nan"), y, 2)


def test_fit_scale_recovers_a_known_temperature():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(3.0 * scores, 1), 1, generator=gen).flatten()
    assert abs(fit_scale(scores, labels) - 3.0) < 0.3
    assert fit_scale(10 * one_hot(torch.arange(3), 3), torch.arange(3), max_scale=5.0) <= 5.0


def test_ncm_and_scaled_head_fit_an_nn_linear():
    z, y = gaussian_classes(10, 3, 6, 3.0)
    _, mean, _ = class_moments(z, y, 3)
    head = ncm_head(mean)
    unit = torch.nn.functional.normalize(z, dim=1)
    w, b = head.scaled()
    linear = torch.nn.Linear(6, 3)
    with torch.no_grad():
        linear.weight.copy_(w)
        linear.bias.copy_(b)
    torch.testing.assert_close(linear(unit.float()), head.logits(unit).float())
    with pytest.raises(ValueError, match="scale"):
        LinearHead(head.weight, head.bias, 0.0)


def test_one_class_ridge_is_a_constant_head():
    z, _ = gaussian_classes(6, 1, 4, 1.0)
    head = ridge_head(z, torch.zeros(6, dtype=torch.int64), 1)
    assert head.weight.shape == (1, 4) and float(head.weight.abs().max()) == 0.0
    torch.testing.assert_close(head.logits(z), torch.full((6, 1), head.scale, dtype=torch.float64))
