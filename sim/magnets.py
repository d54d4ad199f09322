"""Drift, quadrupole, sextupole, solenoid: transfer maps and particle tracking in Bmad coordinates
(x, px, y, py, z, pz)."""

import math

import torch

from .element import LinearElement, eye_like, lorentz_gamma, may_be_nonzero
from .tracking import beta_over_beta0_minus_one, drift_kick_drift, exact_drift, per_particle, reference

_N_SERIES = 12  # terms of the power series used for |k1 L^2| < 1: error below 1/(2*_N_SERIES)!


def _series(u: torch.Tensor, a: int) -> torch.Tensor:
    """sum_n (-u)^n / (2n + a)!, the power series shared by the functions below (|u| < 1)."""
    series = torch.zeros_like(u)
    term = torch.full_like(u, 1.0 / math.factorial(a))
    for n in range(_N_SERIES):
        series = series + term
        term = term * (-u) / ((2 * n + a + 1) * (2 * n + a + 2))
    return series


def _entire(u: torch.Tensor, a: int, closed) -> torch.Tensor:
    """Series for |u| < 1, closed(u, sqrt|u|) elsewhere, without NaN gradients from the unused branch."""
    small = u.abs() < 1.0
    safe = torch.where(small, torch.ones_like(u), u)
    return torch.where(small, _series(u, a), closed(safe, safe.abs().sqrt()))


def _cos(u, root):
    return torch.where(u > 0, torch.cos(root), torch.cosh(root))


def _sinc(u, root):
    return torch.where(u > 0, torch.sin(root), torch.sinh(root)) / root


def cos_like(u: torch.Tensor) -> torch.Tensor:
    """C(u) = cos(sqrt(u)) for u >= 0, cosh(sqrt(-u)) for u < 0; smooth (and exact) through u = 0."""
    return _entire(u, 0, _cos)


def sinc_like(u: torch.Tensor) -> torch.Tensor:
    """S(u) = sin(sqrt(u))/sqrt(u) for u >= 0, sinh(sqrt(-u))/sqrt(-u) for u < 0; S(0) = 1."""
    return _entire(u, 1, _sinc)


def one_minus_cos_over_u(u: torch.Tensor) -> torch.Tensor:
    """(1 - C(u)) / u, equal to 1/2 at u = 0."""
    return _entire(u, 2, lambda v, root: (1 - _cos(v, root)) / v)


def one_minus_sinc_over_u(u: torch.Tensor) -> torch.Tensor:
    """(1 - S(u)) / u, equal to 1/6 at u = 0."""
    return _entire(u, 3, lambda v, root: (1 - _sinc(v, root)) / v)


def rotation_xy(angle: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Matrix (..., 6, 6) taking lab coordinates into a frame rotated by `angle` [rad] about s.

    x' = x cos + y sin, y' = -x sin + y cos (same for px, py).
    """
    c, s = torch.cos(angle), torch.sin(angle)
    rot = eye_like(angle.shape, like)
    for a, b in ((0, 2), (1, 3)):
        rot[..., a, a] = c
        rot[..., a, b] = s
        rot[..., b, a] = -s
        rot[..., b, b] = c
    return rot


def tilted(m: torch.Tensor, tilt: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The map m (..., 6, 6) of a magnet rotated by `tilt` [rad] about s: R(-tilt) m R(tilt)."""
    if not may_be_nonzero(tilt):
        return m
    rot = rotation_xy(tilt, like)
    return rot.transpose(-1, -2) @ m @ rot


def drift_map(length: torch.Tensor, p0c, species, like: torch.Tensor) -> torch.Tensor:
    """Drift matrix (..., 6, 6): x += L px, y += L py, z += L pz / gamma0^2."""
    length, gamma = torch.broadcast_tensors(length, lorentz_gamma(p0c, species, like))
    m = eye_like(length.shape, like)
    m[..., 0, 1] = length
    m[..., 2, 3] = length
    m[..., 4, 5] = length / gamma**2
    return m


def gradient_kick(k1: torch.Tensor):
    """Thin quadrupole kick of a step ds: px -= k1 ds x, py += k1 ds y (k1 (..., 1) [1/m^2])."""
    def kick(coords, step):
        x, px, y, py, z, pz = coords
        return x, px - k1 * step * x, y, py + k1 * step * y, z, pz

    return kick


class Drift(LinearElement):
    """Field-free drift of `length` [m].

    linear: x += L px, y += L py, z += L pz / gamma0^2 (first order in Bmad coordinates).
    kick_drift: the exact drift (`sim.tracking.exact_drift`), for large angles and energy spreads.
    """

    parameters_defaults = {"length": 0.0}
    tracking_methods = ("linear", "kick_drift")

    def transfer_map(self, p0c, species, like, overrides=None):
        return drift_map(self.parameter_values(overrides, like)["length"], p0c, species, like)

    def track_body(self, coords, p, p0c, species):
        p0c, _, mass = reference(p0c, species, coords[0])
        return exact_drift(coords, per_particle(p["length"]), per_particle(p0c), mass)


class Quadrupole(LinearElement):
    """Thick quadrupole: `length` [m], `k1` [1/m^2] (> 0 focuses x for the reference species), `tilt`
    [rad], misalignment `x_offset`, `y_offset` [m].

    linear: with C(u) = cos(sqrt u), S(u) = sin(sqrt u)/sqrt u (continued analytically to u < 0),
    x-plane [[C(k1 L^2), L S(k1 L^2)], [-k1 L S(k1 L^2), C(k1 L^2)]]; y-plane the same with -k1;
    z += L pz / gamma0^2. A tilt rotates the magnet about s: M = R(-tilt) M0 R(tilt).
    chromatic: the same thick map per particle with k = k1 / (1 + pz), x' = px / (1 + pz), the
    path-length terms z -= (1/2) int (x'^2 + y'^2) ds and the exact speed term L (beta/beta0 - 1)
    (Bmad's standard quadrupole; Cheetah calls it drift_kick_drift).
    kick_drift: `num_steps` of exact drift + thin kick (px -= k1 ds x, py += k1 ds y), symplectic.
    """

    parameters_defaults = {"length": 0.0, "k1": 0.0, "tilt": 0.0, "x_offset": 0.0, "y_offset": 0.0}
    tracking_methods = ("linear", "chromatic", "kick_drift")

    def transfer_map(self, p0c, species, like, overrides=None):
        p = self.parameter_values(overrides, like)
        length, k1, tilt = p["length"], p["k1"], p["tilt"]
        length, k1, gamma = torch.broadcast_tensors(length, k1, lorentz_gamma(p0c, species, like))
        m = eye_like(length.shape, like)
        for offset, k in ((0, k1), (2, -k1)):
            u = k * length**2
            c, s = cos_like(u), sinc_like(u)
            m[..., offset, offset] = c
            m[..., offset, offset + 1] = length * s
            m[..., offset + 1, offset] = -k * length * s
            m[..., offset + 1, offset + 1] = c
        m[..., 4, 5] = length / gamma**2
        return tilted(m, tilt, like)

    def track_body(self, coords, p, p0c, species):
        p0c, _, mass = reference(p0c, species, coords[0])
        length, k1, p0c = per_particle(p["length"]), per_particle(p["k1"]), per_particle(p0c)
        if self.tracking == "kick_drift":
            drift = lambda c, step: exact_drift(c, step, p0c, mass)  # noqa: E731
            return drift_kick_drift(coords, length, self.num_steps, drift, gradient_kick(k1))
        x, px, y, py, z, pz = coords
        rel_p = 1 + pz
        k = k1 / rel_p
        x, px, dzx = _chromatic_plane(x, px, k, length, rel_p)
        y, py, dzy = _chromatic_plane(y, py, -k, length, rel_p)
        z = z + dzx + dzy + length * beta_over_beta0_minus_one(pz, p0c, mass)
        return x, px, y, py, z, pz


def _chromatic_plane(x, px, k, length, rel_p):
    """One plane of the chromatic thick quadrupole: focusing k [1/m^2] for this particle's momentum.

    x(s) = C x0 + S x0', x'(s) = -k S x0 + C x0' with x0' = px0 / rel_p, and the path-length change
    dz = -(1/2) int_0^L x'^2 ds = -k x0^2 (L - C S)/4 + k x0 x0' S^2/2 - x0'^2 (L + C S)/4,
    where C = cos(sqrt(k) L), S = sin(sqrt(k) L)/sqrt(k) (continued to k < 0).
    """
    u = k * length**2
    c, s = cos_like(u), length * sinc_like(u)
    slope = px / rel_p
    dz = -k * x**2 * (length - c * s) / 4 + k * x * slope * s**2 / 2 - slope**2 * (length + c * s) / 4
    return c * x + s * slope, (-k * s * x + c * slope) * rel_p, dz


class Sextupole(LinearElement):
    """Sextupole: `length` [m], `k2` [1/m^3], `tilt` [rad], misalignment `x_offset`, `y_offset` [m].

    kick_drift (default): `num_steps` of exact drift + thin kick px -= (k2/2) (x^2 - y^2) ds,
    py += k2 x y ds (Bmad's sign: k2 > 0 focuses x for x > 0). linear: its first-order map, a drift.
    """

    parameters_defaults = {"length": 0.0, "k2": 0.0, "tilt": 0.0, "x_offset": 0.0, "y_offset": 0.0}
    tracking_methods = ("kick_drift", "linear")

    def transfer_map(self, p0c, species, like, overrides=None):
        return drift_map(self.parameter_values(overrides, like)["length"], p0c, species, like)

    def track_body(self, coords, p, p0c, species):
        p0c, _, mass = reference(p0c, species, coords[0])
        k2, p0c = per_particle(p["k2"]), per_particle(p0c)

        def kick(c, step):
            x, px, y, py, z, pz = c
            return x, px - 0.5 * k2 * step * (x**2 - y**2), y, py + k2 * step * x * y, z, pz

        drift = lambda c, step: exact_drift(c, step, p0c, mass)  # noqa: E731
        return drift_kick_drift(coords, per_particle(p["length"]), self.num_steps, drift, kick)


class Solenoid(LinearElement):
    """Solenoid: `length` [m], strength `ks` = B_s / (B rho) [1/m] (Bmad's ks; Cheetah's k = ks/2).

    With K = ks/2, C = cos(K L), S = sin(K L) and S_K = sin(K L)/K (L at K = 0):
    [[C^2, C S_K, S C, S S_K], [-K S C, C^2, -K S^2, S C],
     [-S C, -S S_K, C^2, C S_K], [K S^2, -S C, -K S C, C^2]] on (x, px, y, py): a focusing rotation,
    turning a particle at +x towards -y for ks > 0; z += L pz / gamma0^2. Misalignment `x_offset`,
    `y_offset` [m]. Linear tracking only.
    """

    parameters_defaults = {"length": 0.0, "ks": 0.0, "x_offset": 0.0, "y_offset": 0.0}

    def transfer_map(self, p0c, species, like, overrides=None):
        p = self.parameter_values(overrides, like)
        length, k, gamma = torch.broadcast_tensors(p["length"], 0.5 * p["ks"], lorentz_gamma(p0c, species, like))
        phase = k * length
        c, s = torch.cos(phase), torch.sin(phase)
        s_k = length * sinc_like(phase**2)
        m = eye_like(length.shape, like)
        rows = (
            (c * c, c * s_k, s * c, s * s_k),
            (-k * s * c, c * c, -k * s * s, s * c),
            (-s * c, -s * s_k, c * c, c * s_k),
            (k * s * s, -s * c, -k * s * c, c * c),
        )
        for i, row in enumerate(rows):
            for j, value in enumerate(row):
                m[..., i, j] = value
        m[..., 4, 5] = length / gamma**2
        return m
