"""`SpaceCharge(compensate=True)`: the field of a Gaussian bunch against its closed form, with and without
the smoothing compensation of the cloud-in-cell deposit, the cell-integrated kernel and the gather."""

import math

import pytest
import torch

import sim
from sim.space_charge import COULOMB

SIGMA, CHARGE, P0C = 1e-3, 1e-11, 1e3  # m, C, eV (protons: gamma ~ 1, rest frame = lab frame)


def gaussian_bunch(n: int, seed: int) -> torch.Tensor:
    positions = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * SIGMA
    particles = torch.zeros(n, 6, dtype=torch.float64)
    particles[:, [0, 2, 4]] = positions
    return particles


def gaussian_field(positions: torch.Tensor) -> torch.Tensor:
    """E [V/m] of a spherical Gaussian charge Q of rms SIGMA: Q / (4 pi eps0 r^2) (erf(r / (sqrt2 s)) -
    sqrt(2 / pi) r / s exp(-r^2 / 2 s^2)), radial."""
    r = positions.norm(dim=1, keepdim=True)
    enclosed = torch.erf(r / (math.sqrt(2) * SIGMA)) - math.sqrt(2 / math.pi) * r / SIGMA * torch.exp(-r**2 / (2 * SIGMA**2))
    return COULOMB * CHARGE * enclosed * positions / r**3


def core_strength(space_charge: sim.SpaceCharge, particles: torch.Tensor) -> tuple[float, float]:
    """(field strength relative to the closed form: the least-squares factor, relative rms error) over the
    particles within 2.5 rms of the centre."""
    field = space_charge.field(particles[None], P0C, "proton", CHARGE)[0]
    positions = particles[:, [0, 2, 4]]
    exact = gaussian_field(positions)
    core = positions.norm(dim=1) < 2.5 * SIGMA
    field, exact = field[core], exact[core]
    factor = float((field * exact).sum() / (exact * exact).sum())
    error = float((field - exact).norm(dim=1).square().mean().sqrt() / exact.norm(dim=1).square().mean().sqrt())
    return factor, error


@pytest.mark.parametrize("grid, extent", [((16, 16, 16), 3.0), ((32, 32, 32), None)])
def test_compensation_makes_a_gaussian_core_field_right(grid, extent):
    """Without the compensation the core field is several percent weak (16^3 over +-3 rms: 8.4 %; 32^3
    over the bounding box: 3.8 %); with it within 1 % (-0.4 %, +0.1 %)."""
    particles = gaussian_bunch(100_000, seed=11)
    plain, plain_error = core_strength(sim.SpaceCharge(grid, extent=extent), particles)
    compensated, error = core_strength(sim.SpaceCharge(grid, extent=extent, compensate=True), particles)
    assert plain < 0.97
    assert abs(compensated - 1) < 0.01
    assert error < 0.6 * plain_error and error < 0.03


def test_compensation_filter_and_gradients():
    """The filter is 1 at k = 0 (the total charge, so the far field, is kept) and 2^3 at the doubled grid's
    highest frequency; the field stays differentiable (same autograd path, only the cached kernels change)."""
    filter_ = sim.space_charge.smoothing_compensation((8, 8, 8), "cpu")
    assert filter_[0, 0, 0] == 1 and filter_.shape == (9, 9, 9)
    assert torch.allclose(filter_[-1, -1, -1], torch.tensor(8.0, dtype=torch.float64))
    particles = gaussian_bunch(4000, seed=2).requires_grad_(True)
    field = sim.SpaceCharge((8, 8, 8), compensate=True).field(particles[None], P0C, "proton", CHARGE)
    field.square().sum().backward()
    assert particles.grad is not None and particles.grad.abs().sum() > 0


def test_compensate_in_configs():
    space_charge = sim.SpaceCharge.from_config({"grid_shape": [16, 16, 16], "max_step": 0.25, "compensate": True})
    assert space_charge.compensate and "compensate=True" in repr(space_charge)
    assert not sim.SpaceCharge.from_config({"grid_shape": [16, 16, 16]}).compensate
    with pytest.raises(ValueError, match="compensate must be true or false"):
        sim.SpaceCharge(compensate="yes")
