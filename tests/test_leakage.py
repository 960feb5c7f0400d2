"""Leakage metrics: exact small cases, a naive SSIM reference, matching, label accuracy."""

import itertools
import math

import pytest
import torch

from phalanx.errors import PhalanxError
from phalanx.leakage import best_match, gaussian_window, label_accuracy, mse, psnr, score, ssim


def const(v, shape=(1, 1, 12, 12)):
    return torch.full(shape, float(v))


def test_mse_and_psnr_of_constant_images():
    a, b = const(0.25), const(0.75)
    assert mse(a, b).item() == pytest.approx(0.25)
    assert psnr(a, b).item() == pytest.approx(10 * math.log10(1 / 0.25))  # 6.0206 dB


def test_psnr_of_a_known_mse():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 10, 10, generator=g) * 0.8
    y = x + 0.1  # MSE = 0.01 exactly -> 20 dB
    assert torch.allclose(mse(x, y), torch.full((3,), 0.01, dtype=torch.float64))
    assert torch.allclose(psnr(x, y), torch.full((3,), 20.0, dtype=torch.float64))
    assert psnr(x, y, data_range=255.0)[0].item() == pytest.approx(20 + 20 * math.log10(255))


def test_identical_images():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert torch.isinf(psnr(x, x)).all()
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))


def test_ssim_of_constant_images_matches_the_formula():
    a, b = 0.3, 0.6
    c1 = 0.01 ** 2
    # sigmas and covariance vanish: SSIM = (2ab + C1) / (a^2 + b^2 + C1) * (C2 / C2)
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert ssim(const(a), const(b)).item() == pytest.approx(expected, rel=1e-9)


def naive_ssim(x, y, size, sigma=1.5, k1=0.01, k2=0.03):
    """Loop over every valid window position (Wang et al. 2004), one channel."""
    w = gaussian_window(size, sigma)
    c1, c2 = k1 ** 2, k2 ** 2
    vals = []
    H, W = x.shape
    for i in range(H - size + 1):
        for j in range(W - size + 1):
            px, py = x[i:i + size, j:j + size].double(), y[i:i + size, j:j + size].double()
            mx, my = (w * px).sum(), (w * py).sum()
            vx = (w * (px - mx) ** 2).sum()
            vy = (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return torch.stack(vals).mean()


@pytest.mark.parametrize("hw,window", [((9, 9), 7), ((16, 14), 11), ((8, 8), 11)])
def test_ssim_matches_a_naive_loop(hw, window):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(*hw, generator=g)
    y = (x + 0.2 * torch.randn(*hw, generator=g)).clamp(0, 1)
    size = min(window, *hw)
    size -= (size + 1) % 2
    got = ssim(x[None, None], y[None, None], window=window).item()
    assert got == pytest.approx(naive_ssim(x, y, size).item(), rel=1e-9)
    assert -1 <= got < 1


def test_ssim_averages_channels():
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(1, 2, 12, 12, generator=g), torch.rand(1, 2, 12, 12, generator=g)
    per = [ssim(x[:, c:c + 1], y[:, c:c + 1]).item() for c in range(2)]
    assert ssim(x, y).item() == pytest.approx(sum(per) / 2)


def test_best_match_recovers_a_permutation():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(5, 1, 6, 6, generator=g)
    p = torch.tensor([3, 0, 4, 1, 2])
    rec = x[p] + 0.01 * torch.randn(5, 1, 6, 6, generator=g)
    for method in ("hungarian", "greedy"):
        perm = best_match(x, rec, method)
        assert torch.allclose(rec[perm], x, atol=0.05)


def test_hungarian_is_optimal_and_never_worse_than_greedy():
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        x, r = torch.rand(4, 1, 3, 3, generator=g), torch.rand(4, 1, 3, 3, generator=g)

        def total(perm):
            return float(mse(x, r[list(perm)]).sum())

        brute = min(total(p) for p in itertools.permutations(range(4)))
        assert total(best_match(x, r).tolist()) == pytest.approx(brute)
        assert total(best_match(x, r, "greedy").tolist()) >= brute - 1e-12


def test_label_accuracy():
    assert label_accuracy(torch.tensor([1, 1, 2]), torch.tensor([2, 1, 2])) == pytest.approx(2 / 3)
    assert label_accuracy(torch.tensor([1, 2, 3]), torch.tensor([3, 2, 1])) == 1.0
    assert label_accuracy(torch.tensor([1, 2, 3]), torch.tensor([3, 2, 1]), ordered=True) == pytest.approx(1 / 3)
    with pytest.raises(PhalanxError, match="expected 3 predicted labels, got 2"):
        label_accuracy(torch.tensor([1, 2, 3]), torch.tensor([1, 2]))


def test_score_matches_and_clamps():
    g = torch.Generator().manual_seed(6)
    x = torch.rand(3, 1, 8, 8, generator=g)
    rec = x[[2, 0, 1]].clone()
    rec[0, 0, 0, 0] = 5.0  # out of range: clamped to 1 before scoring
    s = score(x, rec, torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1]))
    assert s.perm.tolist() == [1, 2, 0]
    assert s.label_acc == 1.0
    assert torch.isinf(s.psnr[0]) and torch.isinf(s.psnr[1])
    assert s.mse[2].item() == pytest.approx((1.0 - x[2, 0, 0, 0].item()) ** 2 / 64)


def test_bad_inputs_name_the_problem():
    with pytest.raises(PhalanxError, match="same shape"):
        mse(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(PhalanxError, match="finite"):
        psnr(torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), float("nan")))
    with pytest.raises(PhalanxError, match="odd integer"):
        ssim(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), window=4)
