"""Particle-by-particle (nonlinear) tracking pieces in Bmad coordinates: the exact drift, frame
changes for offset and tilted elements, and the second-order drift-kick-drift integrator.

Coordinates travel as a tuple (x, px, y, py, z, pz) of tensors (..., N); element parameters come as
tensors of the settings shape (...) and are given a trailing particle axis with `per_particle`.
"""

import torch

from .species import get_species


def per_particle(value: torch.Tensor) -> torch.Tensor:
    """A settings-shaped parameter (...) as (..., 1), to broadcast against particles (..., N)."""
    return value.unsqueeze(-1)


def reference(p0c, species, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p0c [eV], E0 [eV], mass [eV]) as tensors of `like`'s dtype; p0c may be a settings tensor (...)."""
    mass = torch.as_tensor(get_species(species).mass_eV, dtype=like.dtype, device=like.device)
    p0c = torch.as_tensor(p0c, dtype=like.dtype, device=like.device)
    return p0c, torch.sqrt(p0c**2 + mass**2), mass


def beta_over_beta0_minus_one(pz: torch.Tensor, p0c: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """beta/beta0 - 1 of particles with pz, without cancellation: m^2 (P^2 - 1) / (E (P E0 + E)),
    with P = 1 + pz and energies in units of p0c. p0c, mass: (..., 1) or scalars."""
    m = mass / p0c
    e0 = torch.sqrt(1 + m**2)
    e = torch.sqrt((1 + pz) ** 2 + m**2)
    return m**2 * pz * (2 + pz) / (e * ((1 + pz) * e0 + e))


def exact_drift(coords: tuple, length: torch.Tensor, p0c: torch.Tensor, mass: torch.Tensor) -> tuple:
    """Field-free drift of `length` (..., 1) [m], exact in all coordinates.

    With P = 1 + pz and p_s = sqrt(P^2 - px^2 - py^2): x += L px/p_s, y += L py/p_s,
    z += L (beta/beta0 - P/p_s) (path length and speed both enter).
    """
    x, px, y, py, z, pz = coords
    P = 1 + pz
    q = (px**2 + py**2) / P**2  # transverse fraction of the momentum squared
    root = torch.sqrt(1 - q)  # p_s / P
    x = x + length * px / (P * root)
    y = y + length * py / (P * root)
    # P/p_s - 1 = q / (root (1 + root))
    z = z + length * (beta_over_beta0_minus_one(pz, p0c, mass) - q / (root * (1 + root)))
    return x, px, y, py, z, pz


def to_element_frame(coords: tuple, x_offset, y_offset, tilt) -> tuple:
    """Lab to element frame: subtract the element's offsets [m], then rotate by its tilt [rad] about s.
    Parameters (..., 1)."""
    x, px, y, py, z, pz = coords
    c, s = torch.cos(tilt), torch.sin(tilt)
    x, y = x - x_offset, y - y_offset
    return x * c + y * s, px * c + py * s, -x * s + y * c, -px * s + py * c, z, pz


def to_lab_frame(coords: tuple, x_offset, y_offset, tilt) -> tuple:
    """Inverse of `to_element_frame`."""
    x, px, y, py, z, pz = coords
    c, s = torch.cos(tilt), torch.sin(tilt)
    return x * c - y * s + x_offset, px * c - py * s, x * s + y * c + y_offset, px * s + py * c, z, pz


def drift_kick_drift(coords: tuple, length, num_steps: int, drift, kick) -> tuple:
    """Second-order symplectic integrator: num_steps x (drift L/2n, kick L/n, drift L/2n).

    drift(coords, step) and kick(coords, step) advance the coordinates; steps are (..., 1) [m].
    Consecutive half drifts are merged.
    """
    step = length / num_steps
    coords = drift(coords, 0.5 * step)
    for index in range(num_steps):
        coords = kick(coords, step)
        coords = drift(coords, step if index < num_steps - 1 else 0.5 * step)
    return coords


def unbind(particles: torch.Tensor) -> tuple:
    return particles.unbind(-1)


def stack(coords: tuple) -> torch.Tensor:
    return torch.stack(torch.broadcast_tensors(*coords), dim=-1)


__all__ = [
    "beta_over_beta0_minus_one", "drift_kick_drift", "exact_drift", "per_particle", "reference",
    "stack", "to_element_frame", "to_lab_frame", "unbind",
]
