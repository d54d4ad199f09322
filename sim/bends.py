"""Sector bending magnet: linear transfer map in Bmad coordinates, with edge focusing."""

import torch

from .element import LinearElement, eye_like
from .magnets import cos_like, one_minus_cos_over_u, one_minus_sinc_over_u, rotation_xy, sinc_like
from .species import relativistic_factors


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
    """

    parameters_defaults = {"length": 0.0, "angle": 0.0, "e1": 0.0, "e2": 0.0, "k1": 0.0, "tilt": 0.0,
                           "fringe_integral": 0.0, "gap": 0.0}
    non_negative = ("length", "fringe_integral", "gap")

    def __init__(self, name=None, **values):
        super().__init__(name, **values)
        if bool(((self.length == 0) & (self.angle != 0)).any()):
            raise ValueError(f"Dipole {self.name}: a bend with an angle needs a positive length")

    def transfer_map(self, p0c, species, like, overrides=None):
        p = self.parameter_values(overrides, like)
        length, angle, k1 = torch.broadcast_tensors(p["length"], p["angle"], p["k1"])
        h = torch.where(length > 0, angle / torch.where(length > 0, length, torch.ones_like(length)), 0.0)
        gamma, _ = relativistic_factors(p0c, species)
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
        fringe = p["fringe_integral"] * p["gap"] * h
        entrance = edge_map(h, p["e1"], fringe * (1 + torch.sin(p["e1"]) ** 2) / torch.cos(p["e1"]), like)
        exit_ = edge_map(h, p["e2"], fringe * (1 + torch.sin(p["e2"]) ** 2) / torch.cos(p["e2"]), like)
        m = exit_ @ m @ entrance
        tilt = p["tilt"]
        if tilt.requires_grad or bool((tilt != 0).any()):
            rot = rotation_xy(tilt, like)
            m = rot.transpose(-1, -2) @ m @ rot
        return m
