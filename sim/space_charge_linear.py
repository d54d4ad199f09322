"""Linear space charge of the bunch's rms-equivalent Gaussian ellipsoid (no grid).

Each particle gets the field K (r - <r>) of the rest-frame positions r = (x, y, gamma z), where K is the
rms-equivalent linear field of a Gaussian bunch with the same 3x3 position covariance S and charge Q,
K = <E r^T> S^-1 (Sacherer's rms-equivalent force: it drives the rms envelope as the real field does for
an ellipsoidal bunch):

    K = Q / (4 pi eps0) * (2 / sqrt(pi)) * int_0^inf (4 S + t I)^-1 det(4 S + t I)^(-1/2) dt

(in the principal axes of S: k_i = Q/(4 pi eps0) (2/sqrt(pi)) int dt / ((4 s_i^2 + t) prod_j (4 s_j^2 + t)^(1/2)),
for a sphere of rms s: Q / (4 pi eps0) / (6 sqrt(pi) s^3)). The integral is a trapezoid sum over ln t, so no
eigen-decomposition enters the gradient (round beams are fine). Kicks as sim.SpaceCharge's (same lab-frame
factors): only the field differs. No grid; as 6x6 section maps (section_matrix) a step of the shipped
space-charge fit costs 43 ms instead of PIC's 441 ms (benchmarks/sc_surrogate.py); it misses the nonlinear part of the field (emittance growth of non-uniform bunches), which a neural correction
(models.SectionMap) can learn.
"""

import math

import torch

from .space_charge import COULOMB, apply_field, kick_factors
from .tracking import reference

LOG_NODES = 128  # trapezoid nodes over ln t, from 4 s_min^2 e^-26 to 4 s_max^2 e^18 (relative error < 1e-9)


class LinearSpaceCharge:
    """Linear space charge of the rms-equivalent Gaussian ellipsoid: same interface as sim.SpaceCharge
    (`kick`, `max_step` [m] between kicks in a second-order split)."""

    checkpoint = False

    def __init__(self, max_step: float = 0.1):
        if not (isinstance(max_step, (int, float)) and math.isfinite(max_step) and max_step > 0):
            raise ValueError(f"{type(self).__name__}: max_step must be a positive length in metres, got {max_step!r}")
        self.max_step = float(max_step)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_step={self.max_step})"

    def kick(self, particles: torch.Tensor, p0c, species, charge: float, length) -> torch.Tensor:
        """Particles (..., N, 6) after the kick of a step of `length` [m], bunch charge `charge` [C]."""
        if charge == 0:
            return particles
        _, energy, mass = reference(p0c, species, particles)
        field = self.field(particles, energy / mass, abs(charge))  # (..., N, 3) rest-frame E' [V/m]
        return apply_field(particles, field, p0c, species, length)

    @classmethod
    def field(cls, particles: torch.Tensor, gamma, charge: float) -> torch.Tensor:
        """Rest-frame field [V/m] (..., N, 3) at each particle of particles (..., N, 6); gamma: () or (...)."""
        gamma = torch.as_tensor(gamma, dtype=particles.dtype, device=particles.device)
        positions = torch.stack((particles[..., 0], particles[..., 2], particles[..., 4] * gamma.unsqueeze(-1)), -1)
        centred = positions - positions.mean(-2, keepdim=True)
        cov = centred.transpose(-1, -2) @ centred / positions.shape[-2]  # (..., 3, 3) [m^2]
        return cls.bunch_field(centred, cov, charge)

    @staticmethod
    def bunch_field(centred: torch.Tensor, cov: torch.Tensor, charge: float) -> torch.Tensor:
        """Field [V/m] (..., N, 3) at rest-frame positions (..., N, 3) relative to the mean of a bunch of
        covariance cov (..., 3, 3) [m^2] and charge [C]."""
        return centred @ linear_field_matrix(cov, charge).transpose(-1, -2)


def linear_field_matrix(cov: torch.Tensor, charge: float) -> torch.Tensor:
    """K (..., 3, 3) [V/m^2] of the rms-equivalent linear field E = K r of a Gaussian bunch of charge [C]
    with position covariance cov (..., 3, 3) [m^2] (module docstring).

    With A = 4 cov and its invariants a1 = tr A, a2 = (a1^2 - tr A^2) / 2, a3 = det A, Cayley-Hamilton gives
    (A + t I)^-1 = (A^2 - (a1 + t) A + (t^2 + a1 t + a2) I) / p(t), p(t) = det(A + t I) = t^3 + a1 t^2 + a2 t + a3,
    so the matrix integral is three scalar ones, J_m = int t^m p(t)^(-3/2) dt (m = 0, 1, 2). Computed in float64
    (the three terms cancel to the small eigenvalues' share of an elongated bunch) and returned in cov's dtype."""
    dtype, cov = cov.dtype, cov.double()
    a = 4 * cov
    a_sq = a @ a
    a1 = a.diagonal(dim1=-2, dim2=-1).sum(-1)
    a2 = 0.5 * (a1**2 - a_sq.diagonal(dim1=-2, dim2=-1).sum(-1))
    a3 = torch.linalg.det(a)
    with torch.no_grad():  # the quadrature's range only
        eig = torch.linalg.eigvalsh(a).clamp_min(torch.finfo(cov.dtype).tiny)
        lo, hi = torch.log(eig[..., 0]) - 26, torch.log(eig[..., -1]) + 18
        u = torch.linspace(0, 1, LOG_NODES, dtype=cov.dtype, device=cov.device)
        t = (lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * u).exp()  # (..., nodes)
        trapezoid = torch.full((LOG_NODES,), 1.0, dtype=cov.dtype, device=cov.device)
        trapezoid[0] = trapezoid[-1] = 0.5
        dw = (t * trapezoid) * ((hi - lo) / (LOG_NODES - 1)).unsqueeze(-1)  # dt = t d(ln t)
    p = ((t + a1.unsqueeze(-1)) * t + a2.unsqueeze(-1)) * t + a3.unsqueeze(-1)
    w = dw / p.clamp_min(torch.finfo(cov.dtype).tiny) ** 1.5
    j0, j1, j2 = w.sum(-1), (w * t).sum(-1), (w * t * t).sum(-1)
    eye = torch.eye(3, dtype=cov.dtype, device=cov.device)
    k = (a_sq * j0[..., None, None] - a * (a1 * j0 + j1)[..., None, None]
         + eye * (j2 + a1 * j1 + a2 * j0)[..., None, None])
    return (COULOMB * charge * (2 / math.sqrt(math.pi)) * k).to(dtype)


def kick_matrix(cov: torch.Tensor, p0c, species, charge: float, length) -> torch.Tensor:
    """(..., 6, 6): the linear space-charge kick of a step of `length` [m] as a matrix acting on coordinates
    relative to the bunch's mean, for a bunch of 6x6 covariance cov (..., 6, 6) and charge [C]."""
    _, energy, mass = reference(p0c, species, cov)
    gamma = energy / mass
    scale = torch.stack(torch.broadcast_tensors(torch.ones_like(gamma), torch.ones_like(gamma), gamma), -1)
    positions = cov[..., 0::2, 0::2] * scale.unsqueeze(-1) * scale.unsqueeze(-2)  # rest frame (x, y, gamma z)
    field = linear_field_matrix(positions, abs(charge)) * scale.unsqueeze(-2)  # E' per lab coordinate (x, y, z)
    transverse, longitudinal = kick_factors(p0c, species, cov, length)
    factor = torch.stack(torch.broadcast_tensors(transverse, transverse, longitudinal), -1).unsqueeze(-1)
    kick = torch.zeros(*field.shape[:-2], 6, 6, dtype=cov.dtype, device=cov.device)
    kick[..., 1::2, 0::2] = factor * field
    return torch.eye(6, dtype=cov.dtype, device=cov.device) + kick


def section_matrix(elements: list, grouped: dict, cov: torch.Tensor, p0c, species, charge: float,
                   max_step: float, kicks: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Transfer matrices (R_sc, R_0) (..., 6, 6) of a section of matrix elements (drifts, magnets) with the
    linear space charge of a bunch of 6x6 covariance cov (..., 6, 6) entering it: R_sc maps coordinates
    relative to the mean, R_0 (no space charge) the mean. Exactly what tracking the particles with
    LinearSpaceCharge(max_step) gives (the kick is linear in the offset from the mean), at the cost of 6x6
    matrices: the covariance is carried along, slice by slice (half slice, kick, half slice), in float64.
    kicks: a list that gets, for each kick in order, the map (..., 6, 6) from the entrance to where it acts and the
    kick's matrix (..., 6, 6)."""
    dtype, cov = cov.dtype, cov.double()  # 6x6 matrices: float64 costs nothing and keeps the kicks' small terms
    eye = torch.eye(6, dtype=cov.dtype, device=cov.device)
    r_sc, r_0 = eye, eye
    for element in elements:
        overrides = grouped.get(element.name)
        if not element.is_matrix(overrides, cov):
            raise ValueError(f"linear space charge: {type(element).__name__} {element.name} is not a matrix element "
                             "(only aligned elements with linear tracking)")
        length = element.parameter_values(overrides, cov)["length"]
        longest = float(length.detach().max()) if length.numel() else 0.0
        n = max(1, math.ceil(longest / max_step - 1e-9)) if longest > 0 else 0
        if n == 0:
            m = element.transfer_map(p0c, species, cov, overrides)
            r_sc, r_0, cov = m @ r_sc, m @ r_0, m @ cov @ m.transpose(-1, -2)
            continue
        halves = {}  # half-slice matrices by (entrance face, exit face): three per element
        for face in ((True, False), (False, False), (False, True)):
            halves[face] = element.transfer_map(p0c, species, cov,
                                                element.slice_overrides(overrides, cov, 0.5 / n, *face))
        for piece in range(n):
            m1, m2 = halves[(piece == 0, False)], halves[(False, piece == n - 1)]
            cov = m1 @ cov @ m1.transpose(-1, -2)
            k = kick_matrix(cov, p0c, species, charge, length / n)
            if kicks is not None:
                kicks.append(((m1 @ r_sc).to(dtype), k.to(dtype)))
            step = m2 @ k @ m1
            cov = m2 @ (k @ cov @ k.transpose(-1, -2)) @ m2.transpose(-1, -2)
            r_sc = step @ r_sc
        r_0 = element.transfer_map(p0c, species, cov, overrides) @ r_0  # the mean: the whole element at once
    return r_sc.to(dtype), r_0.to(dtype)
