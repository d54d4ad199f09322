"""Nonlinear space charge of the rms-equivalent Gaussian ellipsoid (sim/space_charge_gaussian.py): the sphere's and
the long round bunch's closed forms, Coulomb's far field, rotations, the rms-equivalent linear part, PIC, configs."""

import math

import pytest
import torch

import sim
from sim.space_charge import COULOMB
from sim.space_charge_gaussian import gaussian_field
from sim.space_charge_linear import linear_field_matrix

F64 = torch.float64


def test_gaussian_sphere_in_closed_form():
    """E_r = Q / (4 pi eps0 r^2) (erf(r / (sqrt2 s)) - sqrt(2/pi) (r/s) exp(-r^2 / 2 s^2)), inside and outside."""
    s, q = 0.7e-3, 2e-11
    radius = torch.tensor([0.05, 0.5, 1.0, 2.0, 4.0, 8.0], dtype=F64) * s
    direction = torch.tensor([0.48, -0.6, 0.64], dtype=F64)
    field = gaussian_field(radius[:, None] * direction, torch.eye(3, dtype=F64) * s**2, q)
    u = radius / s
    expected = COULOMB * q / radius**2 * (torch.erf(u / math.sqrt(2)) - math.sqrt(2 / math.pi) * u * torch.exp(-u**2 / 2))
    torch.testing.assert_close(field, expected[:, None] * direction, rtol=1e-4, atol=0)


def test_long_round_bunch_is_the_2d_field():
    """sz >> s: E_r = lambda / (2 pi eps0 r) (1 - exp(-r^2 / 2 s^2)) with lambda = Q / (sqrt(2 pi) sz) at z = 0."""
    s, sz, q = 0.4e-3, 2.0, 1e-9
    radius = torch.tensor([0.3, 1.0, 2.5, 5.0], dtype=F64) * s
    field = gaussian_field(torch.stack([radius, torch.zeros_like(radius), torch.zeros_like(radius)], -1),
                           torch.diag(torch.tensor([s, s, sz], dtype=F64) ** 2), q)
    line = q / (math.sqrt(2 * math.pi) * sz)
    expected = 2 * COULOMB * line / radius * (1 - torch.exp(-radius**2 / (2 * s**2)))
    torch.testing.assert_close(field[:, 0], expected, rtol=1e-3, atol=0)
    assert field[:, 1:].abs().max() < 1e-9 * field[:, 0].abs().max()


def test_far_field_is_coulomb_and_rotations_rotate_it():
    cov = torch.tensor([[1.0, 0.3, 0.1], [0.3, 0.5, 0.0], [0.1, 0.0, 30.0]], dtype=F64) * 1e-8
    far = torch.tensor([[0.02, 0.0, 0.0], [0.0, 0.012, 0.016], [-0.008, 0.004, -0.018]], dtype=F64)  # 25-40 rms
    coulomb = COULOMB * 1e-11 * far / far.norm(dim=1, keepdim=True) ** 3
    error = (gaussian_field(far, cov, 1e-11) - coulomb).norm(dim=1) / coulomb.norm(dim=1)
    assert error.max() < 3e-3  # the bunch's quadrupole moment: ~ (size / distance)^2 ~ 1e-3
    c, s = math.cos(0.4), math.sin(0.4)
    rotation = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=F64) @ torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]],
                                                                                         dtype=F64)
    points = torch.randn(50, 3, dtype=F64, generator=torch.Generator().manual_seed(1)) * 2e-4
    torch.testing.assert_close(gaussian_field(points @ rotation.T, rotation @ cov @ rotation.T, 1e-11),
                               gaussian_field(points, cov, 1e-11) @ rotation.T, rtol=1e-6, atol=1e-6)


def test_rms_equivalent_part_is_the_linear_model():
    """<E r^T> S^-1 over a Gaussian bunch of covariance S is sim.space_charge_linear's K (Sacherer)."""
    cov = torch.tensor([[1.0, 0.3, 0.1], [0.3, 0.5, 0.0], [0.1, 0.0, 30.0]], dtype=F64) * 1e-8
    r = torch.randn(400_000, 3, dtype=F64, generator=torch.Generator().manual_seed(0)) @ torch.linalg.cholesky(cov).T
    e = gaussian_field(r, cov, 1e-11)
    k = (e.T @ r / len(r)) @ torch.linalg.inv(r.T @ r / len(r))
    reference = linear_field_matrix(cov, 1e-11)
    assert ((k - reference).norm() / reference.norm()) < 0.01


def test_gaussian_bunch_matches_the_pic_field():
    """The PIC field (64^3, compensated) of a sampled Gaussian ellipsoid within 3 % rms inside 2.5 sigma."""
    generator = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.5e-3, 1.5e-3, 6e-3], dtype=F64)
    particles = torch.zeros(1, 200_000, 6, dtype=F64)
    particles[0, :, 0::2] = torch.randn(200_000, 3, generator=generator, dtype=F64) * sigma
    p0c = 1.0  # [eV]: gamma = 1, rest frame = lab frame
    pic = sim.SpaceCharge(grid_shape=(64, 64, 64), compensate=True).field(particles, p0c, "electron", 1e-11)[0]
    gauss = sim.GaussianSpaceCharge.field(particles[0], 1.0, 1e-11)
    core = ((particles[0, :, 0::2] / sigma) ** 2).sum(-1) < 2.5**2
    for i in range(3):
        assert ((pic[core, i] - gauss[core, i]).norm() / gauss[core, i].norm()) < 0.03, i


def test_config_and_lattice():
    """`solver: gaussian` in a space-charge config; bad keys fail with one line; tracking repels, gradients flow."""
    kicks = sim.SpaceCharge.from_config({"solver": "gaussian", "max_step": 0.2})
    assert isinstance(kicks, sim.GaussianSpaceCharge) and kicks.max_step == 0.2
    assert isinstance(sim.SpaceCharge.from_config({"solver": "linear"}), sim.LinearSpaceCharge)
    assert isinstance(sim.SpaceCharge.from_config({"solver": "pic", "grid_shape": [8, 8, 8]}), sim.SpaceCharge)
    with pytest.raises(ValueError, match="solver gaussian takes only max_step"):
        sim.SpaceCharge.from_config({"solver": "gaussian", "grid_shape": [8, 8, 8]}, "model.space_charge")
    with pytest.raises(ValueError, match="model.space_charge.solver must be pic, gaussian or linear"):
        sim.SpaceCharge.from_config({"solver": "fmm"}, "model.space_charge")
    with pytest.raises(ValueError, match="max_step must be a positive length"):
        sim.SpaceCharge.from_config({"solver": "gaussian", "max_step": -1})
    lattice = sim.Lattice.from_list([{"type": "Drift", "name": "D", "length": 1.0}], space_charge=kicks)
    p = (torch.randn(2000, 6, dtype=F64, generator=torch.Generator().manual_seed(2)) * 1e-4).requires_grad_()
    out = lattice(sim.ParticleBeam(p, p0c=5e6, species="electron", charge=1e-11)).beam.particles
    free = sim.Lattice.from_list([{"type": "Drift", "name": "D", "length": 1.0}])(
        sim.ParticleBeam(p, p0c=5e6, species="electron")).beam.particles
    assert out[:, 0].std() > 1.01 * free[:, 0].std()  # the bunch's own field widens it
    out[:, 0].square().sum().backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_held_gaussian_kicks():
    """model.space_charge_every with solver gaussian: the Gaussian kicks at a refresh step, held per particle after."""
    from models.lagged import LaggedSpaceCharge

    solver = sim.GaussianSpaceCharge(max_step=0.25)
    lagged = LaggedSpaceCharge.lagging(solver, 2)
    assert lagged.max_step == 0.25 and "GaussianSpaceCharge" in repr(lagged)
    p = torch.randn(3000, 6, dtype=F64, generator=torch.Generator().manual_seed(3)) * 1e-4
    with torch.enable_grad():
        lagged.start_step()
        first = lagged.kick(p, 5e6, "electron", 1e-11, 0.25)
        lagged.end_step()
        lagged.start_step()
        held = lagged.kick(2 * p, 5e6, "electron", 1e-11, 0.25)
        lagged.end_step()
    torch.testing.assert_close(first, solver.kick(p, 5e6, "electron", 1e-11, 0.25), rtol=0, atol=1e-15)
    torch.testing.assert_close(held - 2 * p, first - p, rtol=0, atol=1e-15)


def test_model_check_reference_of_a_grid_free_solver():
    """The end-of-fit space-charge model check measures a grid-free solver against PIC (32^3, compensated)."""
    from models.lagged import LaggedSpaceCharge
    from psr.outputs.space_charge_check import reference_space_charge

    for model in (sim.GaussianSpaceCharge(max_step=0.25), LaggedSpaceCharge.lagging(sim.GaussianSpaceCharge(0.25), 100),
                  sim.LinearSpaceCharge(max_step=0.25)):
        reference = reference_space_charge(model)
        assert isinstance(reference, sim.SpaceCharge) and reference.grid_shape == (32, 32, 32)
        assert reference.compensate and reference.max_step == pytest.approx(0.1)
    pic = reference_space_charge(sim.SpaceCharge(grid_shape=(16, 16, 16), max_step=0.25))
    assert pic.grid_shape == (32, 32, 32) and not pic.compensate
