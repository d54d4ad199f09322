"""Nonlinear space charge of the bunch's rms-equivalent Gaussian ellipsoid (no grid).

Each particle gets the exact rest-frame field of a Gaussian bunch with the bunch's charge Q, mean and 3x3
position covariance S (rest-frame positions r = (x, y, gamma z) relative to the mean):

    E(r) = Q / (4 pi eps0) / sqrt(2 pi) * int_0^inf (S + l I)^-1 r exp(-r^T (S + l I)^-1 r / 2) det(S + l I)^(-1/2) dl

(from 1/|r| = (2 / sqrt(pi)) int_0^inf exp(-s^2 r^2) ds convolved with the Gaussian; for S -> 0 it is Coulomb's
field, and <E r^T> S^-1 is sim.space_charge_linear's rms-equivalent linear field). Unlike the linear field it
falls off outside the core, so it gives the emittance growth of a bunch that is Gaussian, and most of that of
one that is nearly so. The integral is a trapezoid sum over ln l (no eigen-decomposition in the gradient:
round beams are fine). Kicks as sim.SpaceCharge's (same lab-frame factors).
"""

import math

import torch

from .space_charge import COULOMB
from .space_charge_linear import LinearSpaceCharge

LOG_STEP = 0.75  # trapezoid spacing in ln l (field within 1e-4 of the converged sum)
LOG_BELOW, LOG_ABOVE = 10.0, 12.0  # from the smallest eigenvalue of S times e^-10 to the largest times e^12


class GaussianSpaceCharge(LinearSpaceCharge):
    """Space charge of the rms-equivalent Gaussian ellipsoid, its full nonlinear field: same interface as
    sim.SpaceCharge (`kick`, `max_step` [m] between kicks in a second-order split)."""

    @staticmethod
    def bunch_field(centred: torch.Tensor, cov: torch.Tensor, charge: float) -> torch.Tensor:
        return gaussian_field(centred, cov, charge)


def gaussian_field(r: torch.Tensor, cov: torch.Tensor, charge: float) -> torch.Tensor:
    """Field [V/m] (..., N, 3) at positions r (..., N, 3) [m] relative to the centre of a Gaussian bunch of
    charge [C] and covariance cov (..., 3, 3) [m^2] (module docstring)."""
    dtype = r.dtype
    cov64 = cov.double()
    eye = torch.eye(3, dtype=cov64.dtype, device=cov.device)
    with torch.no_grad():  # the quadrature's range only
        eig = torch.linalg.eigvalsh(cov64).clamp_min(torch.finfo(torch.float64).tiny)
        lo, hi = torch.log(eig[..., 0]) - LOG_BELOW, torch.log(eig[..., -1]) + LOG_ABOVE
        nodes = int(math.ceil(float((hi - lo).max()) / LOG_STEP)) + 1
        u = torch.linspace(0, 1, nodes, dtype=cov64.dtype, device=cov.device)
        lam = (lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * u).exp()  # (..., nodes)
        trapezoid = torch.ones(nodes, dtype=cov64.dtype, device=cov.device)
        trapezoid[0] = trapezoid[-1] = 0.5
        dl = lam * trapezoid * ((hi - lo) / (nodes - 1)).unsqueeze(-1)  # dl = l d(ln l)
    a = cov64.unsqueeze(-3) + lam[..., None, None] * eye  # (..., nodes, 3, 3)
    inverse = torch.linalg.inv(a)
    weight = COULOMB * charge / math.sqrt(2 * math.pi) * dl / torch.linalg.det(a).sqrt()  # (..., nodes)
    inverse, weight = inverse.to(dtype), weight.to(dtype)
    mr = torch.einsum("...kij,...nj->...nki", inverse, r)  # (..., N, nodes, 3)
    q = (mr * r.unsqueeze(-2)).sum(-1)  # (..., N, nodes)
    return torch.einsum("...nk,...nki->...ni", torch.exp(-0.5 * q) * weight.unsqueeze(-2), mr)
