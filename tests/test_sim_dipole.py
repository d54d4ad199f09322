"""Sector bend: against Cheetah 0.8.4 in float64, closed forms, sign convention, symplecticity, limits."""

import math

import pytest
import torch

import sim

from test_sim_maps import BEAMS, J6, cheetah, cheetah_map_in_bmad, psr_map  # noqa: F401

F64 = torch.float64

CASES = [  # psr keyword arguments
    dict(length=0.5, angle=0.2),
    dict(length=0.5, angle=-0.3, e1=0.1, e2=-0.05),
    dict(length=1.0, angle=0.1, e1=0.05, e2=0.07, k1=2.0, tilt=0.3, fringe_integral=0.5, gap=0.02),
    dict(length=0.8, angle=1.2, e1=0.6, e2=0.6),  # large angle (closed-form branch) with edges
    dict(length=0.3, angle=1e-9),
    dict(length=0.4, angle=0.0, k1=-3.0),  # no bend: a quadrupole
]


def to_cheetah(kwargs):
    renamed = {("dipole_" + k if k in ("e1", "e2") else k): torch.tensor(v, dtype=F64) for k, v in kwargs.items()}
    return cheetah.Dipole(**renamed, dtype=F64)


@pytest.mark.parametrize("p0c, species", BEAMS)
@pytest.mark.parametrize("kwargs", CASES)
def test_dipole_matches_cheetah(p0c, species, kwargs):
    ours = psr_map(sim.Dipole("B", **kwargs), p0c, species)
    theirs = cheetah_map_in_bmad(to_cheetah(kwargs), p0c, species)
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)


def test_vectorised_angle_matches_single_settings():
    angles = torch.tensor([-0.2, 0.0, 0.1, 0.5], dtype=F64)
    bend = sim.Dipole("B", length=0.6, e1=0.05)
    batch = psr_map(bend, 1e8, "electron", {"angle": angles})
    for i, a in enumerate(angles):
        torch.testing.assert_close(batch[i], psr_map(bend, 1e8, "electron", {"angle": a}), atol=1e-15, rtol=0)


@pytest.mark.parametrize("kwargs", CASES)
def test_symplectic(kwargs):
    m = psr_map(sim.Dipole("B", **kwargs), 2e7, "electron")
    torch.testing.assert_close(m.T @ J6() @ m, J6(), atol=1e-12, rtol=0)


def test_closed_form_sector_bend():
    length, angle, p0c = 0.7, 0.25, 3e7
    rho = length / angle
    gamma, _ = sim.relativistic_factors(p0c, "electron")
    m = psr_map(sim.Dipole("B", length=length, angle=angle), p0c, "electron")
    expected = torch.tensor([
        [math.cos(angle), rho * math.sin(angle), 0, 0, 0, rho * (1 - math.cos(angle))],
        [-math.sin(angle) / rho, math.cos(angle), 0, 0, 0, math.sin(angle)],
        [0, 0, 1, length, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [-math.sin(angle), -rho * (1 - math.cos(angle)), 0, 0, 1, length / gamma**2 - (length - rho * math.sin(angle))],
        [0, 0, 0, 0, 0, 1],
    ], dtype=F64)
    torch.testing.assert_close(m, expected, atol=1e-14, rtol=0)


def test_sign_convention_positive_angle_sends_higher_momentum_outward():
    """Bmad: a positive angle bends the orbit towards -x, so pz > 0 (a stiffer particle) ends at +x,
    moving outward (px > 0); a negative angle mirrors it."""
    beam = sim.ParticleBeam(torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1e-3]], dtype=F64), p0c=1e8)
    for angle, sign in ((0.3, 1.0), (-0.3, -1.0)):
        lattice = sim.Lattice([sim.Dipole("B", length=1.0, angle=angle), sim.Drift("D", length=2.0)])
        x, px = lattice(beam).beam.particles[0, :2]
        assert math.copysign(1.0, x.item()) == sign and math.copysign(1.0, px.item()) == sign


def test_small_angle_limit_is_the_straight_magnet():
    bend = psr_map(sim.Dipole("B", length=0.5, angle=1e-12, k1=4.0), 1e8, "electron")
    quad = psr_map(sim.Quadrupole("Q", length=0.5, k1=4.0), 1e8, "electron")
    torch.testing.assert_close(bend, quad, atol=1e-11, rtol=0)


def test_angle_gradient_is_finite_at_zero():
    angle = torch.zeros((), dtype=F64, requires_grad=True)
    m = psr_map(sim.Dipole("B", length=0.5, e1=0.1, e2=0.1), 1e8, "electron", {"angle": angle})
    (grad,) = torch.autograd.grad(m[0, 5], angle)
    # R16 = h L^2 (1 - C)/u -> angle L / 2 for small angles (edges only change px), so dR16/dangle = L/2
    assert abs(grad.item() - 0.25) < 1e-12


def test_bad_dipoles():
    with pytest.raises(ValueError, match="needs a positive length"):
        sim.Dipole("B", length=0.0, angle=0.1)
    with pytest.raises(ValueError, match="gap must be >= 0"):
        sim.Dipole("B", length=1.0, angle=0.1, gap=-0.01)
