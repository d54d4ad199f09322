"""Analytic space-charge references (numpy + scipy only) for testing ``sim/space_charge.py``.

Model (Bmad-like, lab frame, SI units, energies in eV): a bunch of total charge magnitude
``Q`` [C] of one species (charge number ``charge_number``, rest energy ``mc2`` [eV]) moves
with reference momentum ``p0c`` [eV].  Space charge is the electrostatic field E' [V/m] of
the bunch in its rest frame (z' = gamma z, x' = x, y' = y, open boundaries); with the rest
frame non-relativistic and s = beta gamma c t' the lab equations of motion are

    x'' = |q| E'_x / (gamma^2 beta^2 mc2),  y'' = |q| E'_y / (gamma^2 beta^2 mc2),
    z'' = |q| E'_z / (gamma^3 beta^2 mc2)          (' = d/ds, always repulsive).

A uniform ellipsoid of rest-frame semi-axes (a1, a2, a3) has the linear interior field
E'_i = Q x_i / (4 pi eps0) * R_D(a_j^2, a_k^2, a_i^2), R_D = Carlson's symmetric integral,
because R_D(x, y, z) = 3/2 int_0^inf dt (t+x)^-1/2 (t+y)^-1/2 (t+z)^-3/2.
"""

import numpy as np
from scipy.constants import c as C_LIGHT  # noqa: F401 (used by test_space_charge_analytic)
from scipy.constants import epsilon_0
from scipy.integrate import solve_ivp
from scipy.optimize import brentq
from scipy.special import elliprd

SQRT5 = np.sqrt(5.0)
COULOMB = 1.0 / (4.0 * np.pi * epsilon_0)  # [V m / C]


def gamma_beta(p0c, mc2):
    """(gamma, beta) for momentum p0c [eV] and rest energy mc2 [eV]."""
    energy = np.hypot(p0c, mc2)
    return energy / mc2, p0c / energy


def coulomb_length(Q, p0c, mc2, charge_number=1.0):
    """K0 = |q| Q / (4 pi eps0 gamma^2 beta^2 mc2) [m]: x'' = K0 * (4 pi eps0 / Q) E'_x."""
    gamma, beta = gamma_beta(p0c, mc2)
    return abs(charge_number) * abs(Q) * COULOMB / (gamma**2 * beta**2 * mc2)


def generalized_perveance(line_density, p0c, mc2, charge_number=1.0):
    """K = |q| lambda / (2 pi eps0 gamma^3 beta^2 mc2) [1]; lambda = lab line charge [C/m].

    Equals 2 I / (I0 beta^3 gamma^3) with I = lambda beta c, I0 = 4 pi eps0 mc^3 / e.
    """
    gamma, beta = gamma_beta(p0c, mc2)
    return abs(charge_number) * abs(line_density) * 2.0 * COULOMB / (gamma**3 * beta**2 * mc2)


def ellipsoid_field_coefficients(semi_axes, Q):
    """d E'_i / d x_i [V/m^2] inside a uniform ellipsoid (rest-frame semi-axes [m], charge Q [C])."""
    a2 = np.asarray(semi_axes, dtype=float) ** 2
    rd = [elliprd(a2[1], a2[2], a2[0]), elliprd(a2[0], a2[2], a2[1]), elliprd(a2[0], a2[1], a2[2])]
    return abs(Q) * COULOMB * np.array(rd)


def uniform_ellipsoid_field(points, semi_axes, Q):
    """Rest-frame field E' [V/m], shape (n, 3), of a uniform ellipsoid at points (n, 3) [m].

    Outside, E'_i = Q x_i/(4 pi eps0) R_D(a_j^2+l, a_k^2+l, a_i^2+l) with l > 0 the root of
    sum x_i^2 / (a_i^2 + l) = 1 (confocal ellipsoid through the point); inside, l = 0.
    """
    pts = np.atleast_2d(np.asarray(points, dtype=float))
    a2 = np.asarray(semi_axes, dtype=float) ** 2
    r2 = np.sum(pts**2, axis=1)
    lam = np.maximum(r2 - a2.max(), 0.0)  # f(lam) >= 0 here; f convex decreasing: Newton from left
    outside = np.sum(pts**2 / a2, axis=1) > 1.0
    for _ in range(200):
        terms = pts**2 / (a2 + lam[:, None])
        f = terms.sum(axis=1) - 1.0
        df = -(terms / (a2 + lam[:, None])).sum(axis=1)
        step = np.where(outside, -f / np.where(df < 0, df, -1.0), 0.0)
        lam = lam + step
        if np.all(np.abs(step) <= 1e-15 * (lam + a2.min())):
            break
    b2 = a2 + lam[:, None]
    rd = np.stack([elliprd(b2[:, 1], b2[:, 2], b2[:, 0]), elliprd(b2[:, 0], b2[:, 2], b2[:, 1]),
                   elliprd(b2[:, 0], b2[:, 1], b2[:, 2])], axis=1)
    return abs(Q) * COULOMB * pts * rd


def uniform_ellipsoid_rms(s, sigma0, Q, p0c, mc2, charge_number=1.0):
    """Lab rms sizes [m], shape (len(s), 3), of a cold uniform ellipsoid drifting to s [m].

    sigma0 = lab rms (sx, sy, sz) [m] at s = 0 with zero momenta (semi-axes sqrt(5) sigma).
    Linear fields keep it a cold uniform ellipsoid: sigma_i'' = K0 R_D(..) sigma_i with the
    rest-frame semi-axes (sqrt5 sx, sqrt5 sy, sqrt5 gamma sz); the gamma^2 vs gamma^3 of the
    lab equations cancels against z' = gamma z, so all three axes share the coefficient.
    """
    s = np.atleast_1d(np.asarray(s, dtype=float))
    gamma, _ = gamma_beta(p0c, mc2)
    k0 = coulomb_length(Q, p0c, mc2, charge_number)
    scale = np.array([1.0, 1.0, gamma])

    def rhs(_, y):
        sig = y[:3]
        a2 = 5.0 * (scale * sig) ** 2
        rd = np.array([elliprd(a2[1], a2[2], a2[0]), elliprd(a2[0], a2[2], a2[1]),
                       elliprd(a2[0], a2[1], a2[2])])
        return np.concatenate([y[3:], k0 * rd * sig])

    y0 = np.concatenate([np.asarray(sigma0, dtype=float), np.zeros(3)])
    return _integrate(rhs, s, y0, 3, 1e-14 * np.min(sigma0))


def _integrate(rhs, s, y0, n_out, atol):
    """Positions y[:n_out] of the ODE y' = rhs at s >= 0 (DOP853, rtol 1e-11)."""
    if np.any(s < 0):
        raise ValueError("s must be >= 0")
    if s.max(initial=0.0) == 0.0:
        return np.tile(np.asarray(y0[:n_out], dtype=float), (s.size, 1))
    sol = solve_ivp(rhs, (0.0, s.max()), y0, method="DOP853", dense_output=True,
                    rtol=1e-11, atol=atol)
    return sol.sol(s)[:n_out].T


def uniform_sphere_radius(s, R0, Q, p0c, mc2, charge_number=1.0):
    """Rest-frame radius [m] (= lab transverse radius) of a cold uniform sphere at s >= 0 [m].

    Rest-frame sphere of radius R0 (lab semi-axes R0, R0, R0/gamma).  The outer shell obeys
    r'' = K0 / r^2 (K0 from coulomb_length); energy conservation gives, with u = r/R0,
    s = R0^(3/2) / sqrt(2 K0) * [sqrt(u (u - 1)) + arccosh(sqrt(u))], inverted by brentq.
    """
    s = np.atleast_1d(np.asarray(s, dtype=float))
    k0 = coulomb_length(Q, p0c, mc2, charge_number)
    unit = R0**1.5 / np.sqrt(2.0 * k0)

    def s_of_u(u):
        return unit * (np.sqrt(u * (u - 1.0)) + np.arccosh(np.sqrt(u)))

    out = np.empty(s.size)
    for i, si in enumerate(np.abs(s)):
        if si == 0.0:
            out[i] = R0
            continue
        hi = 2.0
        while s_of_u(hi) < si:
            hi *= 2.0
        u = brentq(lambda u: s_of_u(u) - si, 1.0, hi, xtol=1e-15, rtol=4 * np.finfo(float).eps)
        out[i] = R0 * u
    return out


def kv_envelope(s, a0, b0, da0, db0, emit_x, emit_y, line_density, p0c, mc2, charge_number=1.0):
    """KV edge radii (a, b) [m], shape (len(s), 2), of a coasting beam in a drift.

    a'' = 2K/(a+b) + emit_x^2/a^3, b'' = 2K/(a+b) + emit_y^2/b^3, K from
    generalized_perveance(line_density [C/m, lab], p0c, mc2).  a0, b0 edge radii (2 x rms) [m],
    da0, db0 their slopes [rad], emit_x, emit_y edge emittances (4 x rms geometric) [m rad].
    """
    s = np.atleast_1d(np.asarray(s, dtype=float))
    k = generalized_perveance(line_density, p0c, mc2, charge_number)

    def rhs(_, y):
        a, b, da, db = y
        return [da, db, 2 * k / (a + b) + emit_x**2 / a**3, 2 * k / (a + b) + emit_y**2 / b**3]

    return _integrate(rhs, s, np.array([a0, b0, da0, db0], dtype=float), 2, 1e-14 * min(a0, b0))


def sample_uniform_ellipsoid(n, sigma, seed=0):
    """(n, 6) Bmad coordinates (x, px, y, py, z, pz) [m, 1]: zero momenta, positions uniform in
    the ellipsoid of semi-axes sqrt(5) * sigma (so the rms sizes are sigma) [m]."""
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    pos = d * rng.random((n, 1)) ** (1.0 / 3.0) * SQRT5 * np.asarray(sigma, dtype=float)
    out = np.zeros((n, 6))
    out[:, 0::2] = pos
    return out


def sample_kv(n, a, b, emit_x, emit_y, length, seed=0):
    """(n, 6) Bmad coordinates of a KV beam at a waist: (x, x', y, y') uniform on the 4D
    hypershell (x/a)^2 + (a x'/emit_x)^2 + (y/b)^2 + (b y'/emit_y)^2 = 1 (edge radii a, b [m],
    edge emittances [m rad]; px = x' paraxially), z uniform on [-length/2, length/2] [m], pz = 0.
    """
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((n, 4))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    out = np.zeros((n, 6))
    out[:, 0], out[:, 1] = a * u[:, 0], emit_x / a * u[:, 1]
    out[:, 2], out[:, 3] = b * u[:, 2], emit_y / b * u[:, 3]
    out[:, 4] = (rng.random(n) - 0.5) * length
    return out
