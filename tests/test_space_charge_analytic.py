"""Cross-checks of the analytic space-charge references in tests/space_charge_analytic.py."""

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.integrate import quad
from scipy.special import elliprf, erfi

sys.path.insert(0, str(Path(__file__).resolve().parent))
import space_charge_analytic as sca  # noqa: E402

MC2_E = 510_998.95  # electron rest energy [eV]
MC2_P = 938_272_088.16  # proton rest energy [eV]
P0C_P = np.sqrt((MC2_P + 1e6) ** 2 - MC2_P**2)  # 1 MeV kinetic-energy proton [eV]


def test_form_factor_is_carlson_rd():
    """The interior coefficient equals the lambda-integral of the problem statement."""
    axes = np.array([1.3, 0.7, 4.1])
    coef = sca.ellipsoid_field_coefficients(axes, 1.0) / sca.COULOMB
    for i in range(3):
        j, k = [m for m in range(3) if m != i]

        def integrand(lam):
            return 1.5 / ((axes[i] ** 2 + lam) ** 1.5 * np.sqrt((axes[j] ** 2 + lam) * (axes[k] ** 2 + lam)))

        ref = sum(quad(integrand, lo, hi, epsabs=0, epsrel=1e-12, limit=200)[0] for lo, hi in ((0, 20), (20, np.inf)))
        assert coef[i] == pytest.approx(ref, rel=1e-9)


def test_gauss_law_inside_and_sphere():
    """div E = rho/eps0 inside (sum of R_D = 3/(a b c)); a sphere gives Q r / (4 pi eps0 R^3)."""
    axes = np.array([2.0, 0.5, 7.0])
    Q = 3e-9
    rho_over_eps0 = Q / (4 / 3 * np.pi * axes.prod()) / sca.epsilon_0
    assert sca.ellipsoid_field_coefficients(axes, Q).sum() == pytest.approx(rho_over_eps0, rel=1e-12)
    R = 1.7
    pts = np.array([[0.3, -0.2, 0.5], [1.0, 2.0, -3.0], [0.0, 0.0, 40.0]])
    r = np.linalg.norm(pts, axis=1, keepdims=True)
    coulomb = np.where(r < R, sca.COULOMB * Q * pts / R**3, sca.COULOMB * Q * pts / r**3)
    assert np.allclose(sca.uniform_ellipsoid_field(pts, [R, R, R], Q), coulomb, rtol=1e-12, atol=0)


def test_exterior_field_continuous_and_far_field():
    axes = np.array([1.0, 2.0, 3.0])
    rng = np.random.default_rng(1)
    d = rng.standard_normal((50, 3))
    surface = d / np.sqrt(np.sum(d**2 / axes**2, axis=1, keepdims=True))
    e_in = sca.uniform_ellipsoid_field(surface * (1 - 1e-9), axes, 1.0)
    e_out = sca.uniform_ellipsoid_field(surface * (1 + 1e-9), axes, 1.0)
    assert np.allclose(e_in, e_out, rtol=1e-7, atol=0)
    far = d / np.linalg.norm(d, axis=1, keepdims=True) * 1e4
    point = sca.COULOMB * far / 1e12
    assert np.allclose(sca.uniform_ellipsoid_field(far, axes, 1.0), point, rtol=1e-6, atol=0)


def test_field_matches_direct_coulomb_sum():
    """Independent check: sum of point charges sampled uniformly in the ellipsoid (outside points)."""
    sigma = np.array([1.0, 2.0, 3.0]) / np.sqrt(5)
    src = sca.sample_uniform_ellipsoid(100_000, sigma, seed=2)[:, 0::2]
    rng = np.random.default_rng(3)
    d = rng.standard_normal((12, 3))
    pts = 1.3 * d / np.sqrt(np.sum(d**2 / np.array([1.0, 4.0, 9.0]), axis=1, keepdims=True))
    diff = pts[:, None, :] - src[None, :, :]
    direct = sca.COULOMB / len(src) * np.sum(diff / np.linalg.norm(diff, axis=2, keepdims=True) ** 3, axis=1)
    ana = sca.uniform_ellipsoid_field(pts, np.sqrt(5) * sigma, 1.0)
    assert np.allclose(direct, ana, atol=0.02 * np.abs(ana).max(), rtol=0)


@pytest.mark.parametrize("p0c,mc2", [(5e6, MC2_E), (P0C_P, MC2_P), (50e6, MC2_E)])
def test_sphere_closed_form_matches_ellipsoid_ode(p0c, mc2):
    gamma, _ = sca.gamma_beta(p0c, mc2)
    R0, Q = 1e-3, 1e-9
    s = np.array([0.0, 0.05, 0.3, 1.0, 3.0])
    r = sca.uniform_sphere_radius(s, R0, Q, p0c, mc2)
    rms = sca.uniform_ellipsoid_rms(s, np.array([R0, R0, R0 / gamma]) / np.sqrt(5), Q, p0c, mc2)
    assert np.allclose(rms[:, 0] * np.sqrt(5), r, rtol=1e-6, atol=0)
    assert np.allclose(rms[:, 1] * np.sqrt(5), r, rtol=1e-6, atol=0)
    assert np.allclose(rms[:, 2] * np.sqrt(5) * gamma, r, rtol=1e-6, atol=0)


def test_sphere_limits():
    """Early: r = R0 + K0 s^2 / (2 R0^2); late: r' -> sqrt(2 K0 / R0)."""
    R0, Q, p0c = 1e-3, 1e-9, 5e6
    k0 = sca.coulomb_length(Q, p0c, MC2_E)
    s_small = 1e-3 * R0**1.5 / np.sqrt(k0)
    r = sca.uniform_sphere_radius([s_small], R0, Q, p0c, MC2_E)[0]
    assert r - R0 == pytest.approx(k0 * s_small**2 / (2 * R0**2), rel=1e-5)
    s_big = 1e8 * R0**1.5 / np.sqrt(k0)
    r1, r2 = sca.uniform_sphere_radius([s_big, 1.01 * s_big], R0, Q, p0c, MC2_E)
    assert (r2 - r1) / (0.01 * s_big) == pytest.approx(np.sqrt(2 * k0 / R0), rel=1e-4)


def test_ellipsoid_energy_conservation():
    """Rest frame: 1/2 sum (d sigma'_i/ds)^2 + (3/5) K0 R_F(5 sigma'^2) is constant."""
    p0c, Q = 5e6, 1e-9
    gamma, _ = sca.gamma_beta(p0c, MC2_E)
    k0 = sca.coulomb_length(Q, p0c, MC2_E)
    sigma0 = np.array([1e-3, 0.5e-3, 0.3e-3])
    scale = np.array([1.0, 1.0, gamma])
    s, h = np.array([0.0, 0.4, 1.0, 2.0]), 1e-5
    sig = sca.uniform_ellipsoid_rms(np.concatenate([s, s + h, np.maximum(s - h, 0)]), sigma0, Q, p0c, MC2_E)
    n = len(s)
    rest = sig[:n] * scale
    slope = (sig[n : 2 * n] - sig[2 * n :]) / (2 * h) * scale
    slope[0] = 0.0
    energy = 0.5 * np.sum(slope**2, axis=1) + 0.6 * k0 * elliprf(*(5 * rest.T**2))
    assert np.allclose(energy, energy[0], rtol=1e-6, atol=0)
    assert np.all(np.diff(sig[:n], axis=0) > 0)


def test_long_ellipsoid_field_is_cylinder_field():
    """Centre of a long ellipsoid (c >> a, b): lambda' = 3Q/(4c), E_x = lambda' x / (pi eps0 a (a+b))."""
    a, b, c, Q = 1.0e-3, 0.6e-3, 5.0, 1e-9
    lam = 3 * Q / (4 * c)
    coef = sca.ellipsoid_field_coefficients([a, b, c], Q)
    cyl = lam / (np.pi * sca.epsilon_0) / (a + b) * np.array([1 / a, 1 / b])
    assert np.allclose(coef[:2], cyl, rtol=1e-5, atol=0)


@pytest.mark.parametrize("p0c,mc2", [(5e6, MC2_E), (P0C_P, MC2_P)])
def test_kv_perveance_matches_long_cold_ellipsoid(p0c, mc2):
    """Lab: ellipsoid x'' coefficient = 2K/(a(a+b)), and the transverse envelopes agree."""
    gamma, _ = sca.gamma_beta(p0c, mc2)
    sigma0 = np.array([1e-3, 0.6e-3, 1.0])  # lab rms; sz >> sx
    Q = 1e-9
    a0, b0, c_lab = np.sqrt(5) * sigma0
    lam = 3 * Q / (4 * c_lab)  # lab central line density [C/m]
    K = sca.generalized_perveance(lam, p0c, mc2)
    k0 = sca.coulomb_length(Q, p0c, mc2)
    kx = k0 * sca.ellipsoid_field_coefficients([a0, b0, gamma * c_lab], 1.0)[0] / sca.COULOMB
    assert kx == pytest.approx(2 * K / (a0 * (a0 + b0)), rel=1e-4)
    s_end = 3.0 / np.sqrt(kx)  # sx grows ~4x while the long axis stays put
    s = np.linspace(0, s_end, 6)
    ell = sca.uniform_ellipsoid_rms(s, sigma0, Q, p0c, mc2)
    kv = sca.kv_envelope(s, a0, b0, 0.0, 0.0, 0.0, 0.0, lam, p0c, mc2)
    assert ell[-1, 0] > 3 * sigma0[0]
    assert np.allclose(ell[:, :2] * np.sqrt(5), kv, rtol=1e-4, atol=0)


def test_kv_limits():
    p0c, lam = 5e6, 1e-9 / 0.01
    # no space charge: free drift from a waist
    s = np.linspace(0, 2, 5)
    env = sca.kv_envelope(s, 1e-3, 2e-3, 0, 0, 4e-6, 1e-6, 0.0, p0c, MC2_E)
    assert np.allclose(env[:, 0], np.sqrt(1e-6 + (4e-6 * s / 1e-3) ** 2), rtol=1e-9)
    assert np.allclose(env[:, 1], np.sqrt(4e-6 + (1e-6 * s / 2e-3) ** 2), rtol=1e-9)
    # cold round beam: a'' = K/a  =>  s = a0 sqrt(pi/(2K)) erfi(sqrt(ln(a/a0)))
    K = sca.generalized_perveance(lam, p0c, MC2_E)
    s = np.linspace(0, 1, 6)
    env = sca.kv_envelope(s, 1e-3, 1e-3, 0, 0, 0, 0, lam, p0c, MC2_E)
    assert np.allclose(env[:, 0], env[:, 1], rtol=1e-12)
    s_back = 1e-3 * np.sqrt(np.pi / (2 * K)) * erfi(np.sqrt(np.log(env[:, 0] / 1e-3)))
    assert np.allclose(s_back, s, rtol=1e-7, atol=1e-9)
    # K = 2 I / (I0 beta^3 gamma^3), I0 = 4 pi eps0 mc^3 / e (Alfven-type current, 17.045 kA for e-)
    gamma, beta = sca.gamma_beta(p0c, MC2_E)
    I0 = 4 * np.pi * sca.epsilon_0 * MC2_E * sca.C_LIGHT
    assert I0 == pytest.approx(17045, rel=1e-3)
    assert K == pytest.approx(2 * lam * beta * sca.C_LIGHT / (I0 * beta**3 * gamma**3), rel=1e-12)


def test_samplers():
    sigma = np.array([1e-3, 2e-3, 0.5e-3])
    ell = sca.sample_uniform_ellipsoid(200_000, sigma, seed=4)
    assert ell.shape == (200_000, 6) and np.all(ell[:, 1::2] == 0)
    assert np.allclose(ell[:, 0::2].std(axis=0), sigma, rtol=5e-3)
    rr = np.sum((ell[:, 0::2] / (np.sqrt(5) * sigma)) ** 2, axis=1)
    assert rr.max() <= 1 + 1e-12 and np.mean(rr < 0.25) == pytest.approx(0.125, abs=3e-3)
    a, b, ex, ey, L = 2e-3, 1e-3, 8e-6, 4e-6, 0.1
    kv = sca.sample_kv(200_000, a, b, ex, ey, L, seed=5)
    x, px, y, py, z, pz = kv.T
    assert np.allclose((x / a) ** 2 + (a * px / ex) ** 2 + (y / b) ** 2 + (b * py / ey) ** 2, 1, rtol=1e-12)
    assert np.all(pz == 0) and np.abs(z).max() <= L / 2 and z.std() == pytest.approx(L / np.sqrt(12), rel=5e-3)
    for u, up, edge, emit in ((x, px, a, ex), (y, py, b, ey)):
        assert u.std() == pytest.approx(edge / 2, rel=5e-3)
        rms_emit = np.sqrt(np.mean(u**2) * np.mean(up**2) - np.mean(u * up) ** 2)
        assert rms_emit == pytest.approx(emit / 4, rel=5e-3)
    # projection onto (x, y) is the uniform ellipse: a quarter lies inside the half-size ellipse
    assert np.mean((x / a) ** 2 + (y / b) ** 2 < 0.25) == pytest.approx(0.25, abs=3e-3)
