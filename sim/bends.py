"""Sector bending magnet: linear transfer map in Bmad coordinates, with edge focusing."""

import torch

from .element import LinearElement, eye_like, lorentz_gamma, may_be_nonzero
from .magnets import cos_like, gradient_kick, one_minus_cos_over_u, one_minus_sinc_over_u, sinc_like, tilted
from .tracking import beta_over_beta0_minus_one, drift_kick_drift, per_particle, reference


def edge_map(h: torch.Tensor, edge: torch.Tensor, fringe_phase: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Thin edge of a bend with curvature h [1/m] and pole-face angle `edge` [rad].

    px += h tan(edge) x;  py -= h tan(edge - psi) y, with psi the fringe-field correction.
    """
    shape = torch.broadcast_shapes(h.shape, edge.shape, fringe_phase.shape)
    m = eye_like(shape, like)
    m[..., 1, 0] = h * torch.tan(edge)
    m[..., 3, 2] = -h * torch.tan(edge - fringe_phase)
    return m


class Dipole(LinearElement):
    """Sector bend: `length` [m] of arc, bending `angle` [rad], pole-face angles `e1`, `e2` [rad],
    optional gradient `k1` [1/m^2], `tilt` [rad], and fringe field `fringe_integral` (FINT) over the
    full `gap` [m].

    A positive angle bends the reference orbit towards -x (Bmad), so a particle with more
    momentum (pz > 0) ends up at +x: R16 = h L^2 (1 - C)/u > 0. With h = angle/L, u = (k1 + h^2) L^2:
    x-plane [[C, L S, h L^2 (1-C)/u], [-(k1 + h^2) L S, C, h L S]], y-plane a quadrupole of -k1,
    z -= h L S x + h L^2 (1-C)/u px, z += (L/gamma0^2 - h^2 L^3 (1-S)/u) pz.
    Edges: px += h tan(e) x, py -= h tan(e - psi) y, psi = FINT gap h (1 + sin^2 e) / cos e.

    kick_drift: the exact motion on a circle in the uniform field (any angle, any energy offset),
    with the same linear edge kicks; with k1 != 0 the body is split into `num_steps` exact bends
    around thin gradient kicks (px -= k1 ds x, py += k1 ds y).
    """

    parameters_defaults = {"length": 0.0, "angle": 0.0, "e1": 0.0, "e2": 0.0, "k1": 0.0, "tilt": 0.0,
                           "fringe_integral": 0.0, "gap": 0.0}
    tracking_methods = ("linear", "kick_drift")
    non_negative = ("length", "fringe_integral", "gap")

    def __init__(self, name=None, **values):
        super().__init__(name, **values)
        if bool(((self.length == 0) & (self.angle != 0)).any()):
            raise ValueError(f"Dipole {self.name}: a bend with an angle needs a positive length")

    sliced_parameters = ("length", "angle")

    def slice_overrides(self, overrides, like, fraction, entrance, exit):
        p = super().slice_overrides(overrides, like, fraction, entrance, exit)
        if not (entrance and exit) and may_be_nonzero(p["fringe_integral"] * p["gap"]):
            raise ValueError(f"Dipole {self.name}: a dipole with a fringe field (fringe_integral * gap) "
                             "cannot be sliced for space charge yet; set fringe_integral to 0 or turn space charge off")
        if not entrance:
            p["e1"] = torch.zeros_like(p["e1"])
        if not exit:
            p["e2"] = torch.zeros_like(p["e2"])
        return p

    def transfer_map(self, p0c, species, like, overrides=None):
        p = self.parameter_values(overrides, like)
        length, angle, k1, gamma = torch.broadcast_tensors(p["length"], p["angle"], p["k1"],
                                                           lorentz_gamma(p0c, species, like))
        h = _curvature(length, angle)
        kx2 = k1 + h**2
        u = kx2 * length**2
        c, s = cos_like(u), length * sinc_like(u)
        dispersion = h * length**2 * one_minus_cos_over_u(u)
        m = eye_like(length.shape, like)
        m[..., 0, 0], m[..., 0, 1], m[..., 0, 5] = c, s, dispersion
        m[..., 1, 0], m[..., 1, 1], m[..., 1, 5] = -kx2 * s, c, h * s
        uy = -k1 * length**2
        cy, sy = cos_like(uy), length * sinc_like(uy)
        m[..., 2, 2], m[..., 2, 3], m[..., 3, 2], m[..., 3, 3] = cy, sy, k1 * sy, cy
        m[..., 4, 0], m[..., 4, 1] = -h * s, -dispersion
        m[..., 4, 5] = length / gamma**2 - h**2 * length**3 * one_minus_sinc_over_u(u)
        entrance = edge_map(h, p["e1"], _fringe_phase(p, h, p["e1"]), like)
        exit_ = edge_map(h, p["e2"], _fringe_phase(p, h, p["e2"]), like)
        return tilted(exit_ @ m @ entrance, p["tilt"], like)

    def track_body(self, coords, p, p0c, species):
        p0c, _, mass = reference(p0c, species, coords[0])
        p0c = per_particle(p0c)
        length, angle = torch.broadcast_tensors(p["length"], p["angle"])
        h = _curvature(length, angle)
        coords = _edge_kick(coords, per_particle(h), per_particle(p["e1"]), per_particle(_fringe_phase(p, h, p["e1"])))
        length, angle = per_particle(length), per_particle(angle)
        k1 = per_particle(p["k1"])
        if bool((p["k1"] == 0).all()) and not p["k1"].requires_grad:
            coords = exact_bend(coords, length, angle, p0c, mass)
        else:
            def body(c, step):
                return exact_bend(c, step, angle * step / length.clamp_min(1e-300), p0c, mass)

            coords = drift_kick_drift(coords, length, self.num_steps, body, gradient_kick(k1))
        return _edge_kick(coords, per_particle(h), per_particle(p["e2"]), per_particle(_fringe_phase(p, h, p["e2"])))


def _curvature(length: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """h = angle / length [1/m], 0 for a zero-length element."""
    return torch.where(length > 0, angle / torch.where(length > 0, length, torch.ones_like(length)), 0.0)


def _fringe_phase(p: dict, h: torch.Tensor, edge: torch.Tensor) -> torch.Tensor:
    """psi = FINT gap h (1 + sin^2 e) / cos e [rad], the vertical edge-focusing correction."""
    return p["fringe_integral"] * p["gap"] * h * (1 + torch.sin(edge) ** 2) / torch.cos(edge)


def _edge_kick(coords: tuple, h, edge, fringe_phase) -> tuple:
    """The linear edge kick of `edge_map` applied to particles."""
    x, px, y, py, z, pz = coords
    return x, px + h * torch.tan(edge) * x, y, py - h * torch.tan(edge - fringe_phase) * y, z, pz


def exact_bend(coords: tuple, length, angle, p0c, mass) -> tuple:
    """Exact body of a sector bend without gradient: arc `length` [m], `angle` [rad] (all (..., 1)).

    In the bend plane a particle moves on a circle of radius p_n / h (p_n = sqrt((1+pz)^2 - py^2),
    h = angle / length) from the entrance face to the exit face, which meet at the centre of the
    reference arc. With phi1 = asin(px / p_n) the entrance angle to the reference orbit:
    px_out = p_n sin(phi1 + angle) - (1 + h x) sin(angle), and, free of 1/h,
    x_out = x cos(angle) - L angle (1 - cos angle)/angle^2
            + (1 + h x) L sinc(angle) (sin(phi1 + angle) + sin phi2) / (cos phi2 + cos(phi1 + angle)),
    with phi2 = asin(px_out / p_n). The horizontal arc length is chord / sinc(turn / 2), turn =
    phi1 + angle - phi2; y and z follow from it (z also from the particle's speed).
    """
    x, px, y, py, z, pz = coords
    rel_p = 1 + pz
    p_n = torch.sqrt(rel_p**2 - py**2)
    h = torch.where(length > 0, angle / torch.where(length > 0, length, torch.ones_like(length)), 0.0)
    a2 = angle**2
    sin_a, cos_a = torch.sin(angle), torch.cos(angle)
    sinc_a = sinc_like(a2)
    sagitta = length * angle * one_minus_cos_over_u(a2)  # rho (1 - cos angle)
    phi1 = torch.asin(px / p_n)
    s_in = torch.sin(phi1 + angle)
    px_out = p_n * s_in - (1 + h * x) * sin_a
    phi2 = torch.asin(px_out / p_n)
    s_out = px_out / p_n
    x_out = x * cos_a - sagitta + (1 + h * x) * length * sinc_a * (s_in + s_out) / (torch.cos(phi2) + torch.cos(phi1 + angle))
    chord_x = x_out * cos_a - x - sagitta
    chord_y = length * sinc_a + x_out * sin_a
    turn = phi1 + angle - phi2
    arc = torch.sqrt(chord_x**2 + chord_y**2) / sinc_like((0.5 * turn) ** 2)
    y_out = y + py * arc / p_n
    z_out = z + length * beta_over_beta0_minus_one(pz, p0c, mass) + (length - rel_p * arc / p_n)
    return x_out, px_out, y_out, py, z_out, pz
