"""Natural-scene statistics shared by brisque / niqe: resize, MSCN, neighbour products, AGGD fits."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from qsched.score import nss


def test_half_size_cubic_sizes_round_half_to_even_like_opencv() -> None:
    for (h, w), expected in {(36, 36): (18, 18), (35, 33): (18, 16), (34, 37): (17, 18)}.items():
        assert nss.half_size_cubic(np.zeros((h, w))).shape == expected


def test_half_size_cubic_is_exact_on_ramps_inside_and_replicates_edges() -> None:
    ramp = np.tile(np.arange(10.0), (4, 1))  # value = column index
    half = nss.half_size_cubic(ramp)
    # sample i sits at 2i + 0.5; the symmetric 4-tap kernel reproduces a linear ramp exactly
    assert half[0, 1:-1].tolist() == [2.5, 4.5, 6.5]
    # the first sample reads column -1 as column 0: -3/32 * 0 + 19/32 * (0 + 1) - 3/32 * 2
    assert half[0, 0] == pytest.approx(19 / 32 - 6 / 32)
    assert np.all(nss.half_size_cubic(np.full((7, 9), 0.3)) == pytest.approx(0.3))


def test_mscn_separable_and_2d_windows_agree_and_flat_images_give_zero() -> None:
    image = np.random.default_rng(0).random((20, 24))
    kernel = nss.gaussian_kernel_2d(7, 7 / 6)
    window = nss.gaussian_window(3, 7 / 6)
    assert np.allclose(kernel, np.outer(window, window), atol=1e-15)
    assert np.allclose(nss.mscn(image, kernel, 1 / 255), nss.mscn(image, window, 1 / 255), atol=1e-10)
    single = nss.mscn(image.astype(np.float32), window.astype(np.float32), 1.0)
    assert single.dtype == np.float32
    assert np.all(nss.mscn(np.zeros((9, 9)), kernel, 1 / 255) == 0)


def test_paired_products_with_and_without_wrap() -> None:
    x = np.arange(12.0).reshape(3, 4)
    h, v, d1, d2 = nss.paired_products(x, wrap=False)
    assert (h.shape, v.shape, d1.shape, d2.shape) == ((3, 3), (2, 4), (2, 3), (2, 3))
    assert h[0, 0] == 0 * 1 and v[0, 0] == 0 * 4 and d1[0, 0] == 0 * 5 and d2[0, 0] == 4 * 1
    wh, wv, wd1, wd2 = nss.paired_products(x, wrap=True)
    assert all(p.shape == x.shape for p in (wh, wv, wd1, wd2))
    assert wh[1, 1] == 5 * 4 and wv[1, 1] == 5 * 1 and wd1[1, 1] == 5 * 0 and wd2[1, 1] == 5 * 2
    assert wh[0, 0] == 0 * 3  # wraps around the row


@pytest.mark.parametrize("solver", ["root", "grid"])
def test_fit_aggd_recovers_the_shape_of_generalised_gaussians(solver: str) -> None:
    rng = np.random.default_rng(1)
    for alpha in (0.8, 2.0):
        sample = stats.gennorm.rvs(alpha, size=200_000, random_state=rng)
        fit = nss.fit_aggd(sample, solver=solver)
        assert fit.alpha == pytest.approx(alpha, rel=0.03)
        assert fit.mean == pytest.approx(0.0, abs=0.02)
    skewed = np.where(rng.random(100_000) < 0.5, -1.0, 3.0) * np.abs(rng.normal(size=100_000))
    fit = nss.fit_aggd(skewed, solver=solver)
    assert fit.left_std == pytest.approx(1.0, rel=0.02) and fit.right_std == pytest.approx(3.0, rel=0.02)
    assert fit.mean > 0


def test_fit_aggd_on_undefined_statistics() -> None:
    zeros = np.zeros(50)
    assert np.isnan(nss.fit_aggd(zeros, solver="root").alpha)
    assert nss.fit_aggd(zeros, solver="grid").alpha == pytest.approx(0.2)  # scikit-video's argmin over NaN
    with pytest.raises(ValueError, match="solver must be 'grid' or 'root'"):
        nss.fit_aggd(zeros, solver="newton")
