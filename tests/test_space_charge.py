"""3D space charge against analytic physics (tests/space_charge_analytic.py), symmetry, signs,
slicing and gradients."""

import math

import numpy as np
import pytest
import torch

import sim
from sim.space_charge import COULOMB
from space_charge_analytic import (kv_envelope, sample_kv, sample_uniform_ellipsoid, uniform_ellipsoid_rms,
                                   uniform_sphere_radius)

ELECTRON, PROTON = 510_998.95, 938_272_088.16


def drift(length: float, grid=(32, 32, 32), max_step=0.05) -> sim.Lattice:
    return sim.Lattice.from_list([{"type": "Drift", "name": "D", "length": length}],
                                 space_charge=sim.SpaceCharge(grid, max_step))


def rms(particles: torch.Tensor) -> np.ndarray:
    return particles[..., [0, 2, 4]].std(-2).numpy()


def test_field_of_a_uniform_sphere_is_coulombs():
    """Inside a uniform sphere E = Q r / (4 pi eps0 R^3); the net field of a mirror-symmetric bunch is 0."""
    n, radius, charge = 100_000, 1e-3, 1e-9
    half = torch.as_tensor(sample_uniform_ellipsoid(n // 2, [radius / math.sqrt(5)] * 3, seed=3))
    particles = torch.cat([half, -half])  # symmetric under (x, y, z) -> -(x, y, z)
    field = sim.SpaceCharge((32, 32, 32)).field(particles[None], 1e3, "proton", charge)[0]  # gamma ~ 1
    r = particles[:, [0, 2, 4]]
    exact = COULOMB * charge * r / radius**3
    inner = r.norm(dim=1) < 0.8 * radius  # CIC smooths the edge over a cell
    error = (field - exact)[inner].norm(dim=1).square().mean().sqrt() / exact[inner].norm(dim=1).square().mean().sqrt()
    assert error < 0.03
    net = field.mean(0).norm() / field.norm(dim=1).square().mean().sqrt()
    assert net < 1e-3


def test_extent_keeps_the_grid_on_the_core_of_a_bunch_with_outliers():
    """A uniform sphere plus one particle 100 radii away: the bounding-box grid is too coarse to see the
    core; a grid of +-3 rms sizes resolves it (the outlier sits on the grid's face)."""
    n, radius, charge = 40_000, 1e-3, 1e-9
    core = torch.as_tensor(sample_uniform_ellipsoid(n, [radius / math.sqrt(5)] * 3, seed=7))
    particles = torch.cat([core, torch.tensor([[0.1, 0, 0, 0, 0, 0]], dtype=core.dtype)])
    exact = COULOMB * charge * core[:, [0, 2, 4]] / radius**3
    inner = core[:, [0, 2, 4]].norm(dim=1) < 0.8 * radius

    def error(space_charge):
        field = space_charge.field(particles[None], 1e3, "proton", charge)[0, :n]
        return float((field - exact)[inner].norm(dim=1).mean() / exact[inner].norm(dim=1).mean())

    assert error(sim.SpaceCharge((32, 32, 32))) > 0.3
    assert error(sim.SpaceCharge((32, 32, 32), extent=3.0)) < 0.05
    with pytest.raises(ValueError, match="extent must be a positive number"):
        sim.SpaceCharge(extent=0)


@pytest.mark.parametrize("species", ["electron", "positron", "proton"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_bunch_always_repels_and_keeps_its_centroid(species, sign):
    half = torch.as_tensor(sample_uniform_ellipsoid(10_000, [1e-3, 0.5e-3, 2e-3], seed=4))
    particles = torch.cat([half, -half])
    sc = sim.SpaceCharge((16, 16, 16))
    kicked = sc.kick(particles, 10e6, species, sign * 1e-9, 0.1)
    dp = kicked - particles
    for position, momentum in ((0, 1), (2, 3), (4, 5)):
        assert (dp[:, momentum] * particles[:, position]).mean() > 0  # pushed outwards in every plane
        rms_kick = dp[:, momentum].square().mean().sqrt()
        assert dp[:, momentum].mean().abs() < 1e-3 * rms_kick  # no net kick
    reference = sc.kick(particles, 10e6, species, 1e-9, 0.1)
    torch.testing.assert_close(kicked, reference, rtol=0, atol=0)  # only |charge| matters
    assert dp[:, [0, 2, 4]].abs().max() == 0  # a kick changes momenta only


def test_cold_ellipsoid_expands_as_the_envelope_equations_say():
    """A cold uniform ellipsoid (5 MeV electrons, 1 nC) drifting 1 m: rms sizes against the 3D envelope
    equations with the elliptic-integral form factor (x grows by 80 %)."""
    sigma = [1.0e-3, 0.7e-3, 1.5e-3]
    particles = torch.as_tensor(sample_uniform_ellipsoid(60_000, sigma, seed=1))
    out = drift(1.0, max_step=0.1)(sim.ParticleBeam(particles, 5e6, "electron", 1e-9)).beam.particles
    expected = uniform_ellipsoid_rms([1.0], sigma, 1e-9, 5e6, ELECTRON)[0]
    assert expected[0] / sigma[0] > 1.5
    np.testing.assert_allclose(rms(out), expected, rtol=0.01)


def test_cold_sphere_coulomb_explosion_in_closed_form():
    """Protons at 2 MeV kinetic energy, a sphere in the rest frame: r(s) from the closed-form explosion."""
    p0c = math.sqrt((PROTON + 2e6) ** 2 - PROTON**2)
    gamma = (PROTON + 2e6) / PROTON
    radius = 1e-3
    sigma = [radius / math.sqrt(5)] * 2 + [radius / math.sqrt(5) / gamma]
    particles = torch.as_tensor(sample_uniform_ellipsoid(60_000, sigma, seed=2))
    out = drift(0.2, max_step=0.02)(sim.ParticleBeam(particles, p0c, "proton", 2e-11)).beam.particles
    expected = uniform_sphere_radius([0.2], radius, 2e-11, p0c, PROTON)[0] / math.sqrt(5)
    assert expected / sigma[0] > 1.5
    np.testing.assert_allclose(rms(out), [expected, expected, expected / gamma], rtol=0.01)


def test_coasting_kv_beam_follows_its_envelope():
    """A long KV cylinder (length 60x its radius) of 5 MeV electrons: the central slice follows the KV
    envelope equations with the generalized perveance of its line density."""
    a, emit, length, charge = 1e-3, 0.5e-6, 0.12, 4e-9
    particles = torch.as_tensor(sample_kv(200_000, a, a, emit, emit, length, seed=5))
    out = drift(1.0, grid=(16, 16, 64), max_step=0.1)(sim.ParticleBeam(particles, 5e6, "electron", charge)).beam.particles
    centre = particles[:, 4].abs() < length / 10
    edge = kv_envelope([1.0], a, a, 0.0, 0.0, emit, emit, charge / length, 5e6, ELECTRON)[0]
    free = kv_envelope([1.0], a, a, 0.0, 0.0, emit, emit, 0.0, 5e6, ELECTRON)[0]
    assert edge[0] / free[0] > 1.3  # space charge dominates the growth
    got = out[centre][:, [0, 2]].std(0).numpy() * 2
    np.testing.assert_allclose(got, edge, rtol=0.01)


def test_slices_compose_to_the_element():
    """Half-slices from slice_overrides tracked in a row equal the whole element (no charge)."""
    torch.manual_seed(0)
    particles = torch.randn(200, 6, dtype=torch.float64) * torch.tensor([1e-3, 1e-4, 1e-3, 1e-4, 1e-3, 1e-3])
    items = [
        {"type": "Quadrupole", "name": "Q", "length": 0.3, "k1": 4.0, "tracking": "kick_drift", "num_steps": 6},
        {"type": "Quadrupole", "name": "QL", "length": 0.3, "k1": -3.0},
        {"type": "Solenoid", "name": "S", "length": 0.4, "ks": 2.0},
        {"type": "Dipole", "name": "B", "length": 0.5, "angle": 0.3, "e1": 0.1, "e2": 0.2},
        {"type": "Dipole", "name": "BK", "length": 0.5, "angle": 0.3, "e1": 0.1, "e2": 0.2, "k1": 0.5,
         "tracking": "kick_drift", "num_steps": 6},
        {"type": "TransverseDeflectingCavity", "name": "T", "length": 0.3, "voltage": 1e6, "frequency": 3e9,
         "phase": 0.2, "num_steps": 6},
        {"type": "RFCavity", "name": "RF", "length": 0.6, "voltage": 2e6, "frequency": 1.3e9, "phase": 0.3,
         "num_steps": 6},
    ]
    for item in items:
        whole = sim.Lattice.from_list([item])
        element = whole.elements[0]
        pieces = dict(item, num_steps=1) if "num_steps" in item else item
        sliced = sim.Lattice.from_list([pieces]).elements[0]
        x, p0c = particles, 10e6
        for i in range(6):
            overrides = sliced.slice_overrides(None, x, 1 / 6, i == 0, i == 5)
            x, p0c = sliced.track(x, p0c, "electron", overrides)
        expected, p0c_whole = element.track(particles, 10e6, "electron")
        torch.testing.assert_close(x, expected, rtol=1e-10, atol=1e-15, msg=item["name"])
        assert float(p0c) == pytest.approx(float(p0c_whole), rel=1e-12)


def test_space_charge_on_without_charge_changes_nothing():
    particles = torch.as_tensor(sample_uniform_ellipsoid(1000, [1e-3] * 3, seed=0))
    items = [{"type": "Quadrupole", "name": "Q", "length": 0.2, "k1": 3.0}, {"type": "Drift", "name": "D", "length": 1.0}]
    plain = sim.Lattice.from_list(items)(sim.ParticleBeam(particles, 5e6)).beam.particles
    with_sc = sim.Lattice.from_list(items, space_charge=sim.SpaceCharge())(sim.ParticleBeam(particles, 5e6)).beam.particles
    torch.testing.assert_close(with_sc, plain, rtol=0, atol=0)


def test_bad_space_charge_settings():
    with pytest.raises(ValueError, match="grid_shape must be three integers >= 4"):
        sim.SpaceCharge((32, 32))
    with pytest.raises(ValueError, match="max_step must be a positive length"):
        sim.SpaceCharge(max_step=0.0)
    with pytest.raises(TypeError, match="space_charge must be a sim.SpaceCharge"):
        sim.Lattice.from_list([{"type": "Drift", "name": "D", "length": 1.0}], space_charge={"grid_shape": [8, 8, 8]})
    fringe = sim.Lattice.from_list([{"type": "Dipole", "name": "B", "length": 0.3, "angle": 0.1,
                                     "fringe_integral": 0.5, "gap": 0.02}], space_charge=sim.SpaceCharge())
    with pytest.raises(ValueError, match="Dipole B: a dipole with a fringe field"):
        fringe(sim.ParticleBeam(torch.zeros(10, 6), 5e6, charge=1e-9))
    nan = torch.full((10, 6), float("nan"))
    with pytest.raises(ValueError, match="not finite"):
        drift(0.1)(sim.ParticleBeam(nan, 5e6, charge=1e-9))


def test_gradients_match_finite_differences():
    """d(rms size after a quadrupole and a drift with space charge)/d(k1, particles), float64."""
    particles = torch.as_tensor(sample_uniform_ellipsoid(4000, [1e-3, 1e-3, 1e-3], seed=6))
    items = [{"type": "Quadrupole", "name": "Q", "length": 0.1}, {"type": "Drift", "name": "D", "length": 0.5}]
    lattice = sim.Lattice.from_list(items, space_charge=sim.SpaceCharge((8, 8, 8), 0.1))

    def size(k1, coords):
        out = lattice(sim.ParticleBeam(coords, 5e6, "electron", 1e-9), {"Q.k1": k1}).beam.particles
        return out[:, 0].square().mean() + 0.5 * out[:, 4].square().mean()

    k1 = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    coords = particles.clone().requires_grad_(True)
    g_k1, g_coords = torch.autograd.grad(size(k1, coords), (k1, coords))
    h = 1e-6
    with torch.no_grad():
        fd_k1 = (size(k1 + h, particles) - size(k1 - h, particles)) / (2 * h)
    assert float(g_k1) == pytest.approx(float(fd_k1), rel=1e-5)
    for i, j in ((0, 0), (17, 4), (333, 1), (2000, 5)):
        step = torch.zeros_like(particles)
        step[i, j] = 1e-9
        with torch.no_grad():
            fd = (size(k1, particles + step) - size(k1, particles - step)) / 2e-9
        assert float(g_coords[i, j]) == pytest.approx(float(fd), rel=1e-4, abs=1e-6 * float(g_coords.abs().max()))


def test_cached_quarter_spectra_unfold_to_the_full_green_function_ffts():
    """The cache keeps i^-1 times frequencies 0..n of x and y of each kernel's spectrum; unfolded, it
    must equal the FFT of the integrated Green's functions on the doubled grid computed here directly
    (which must be purely imaginary)."""
    from sim.space_charge import _field_antiderivative, _unfold_kernel, integrated_green_ffts

    shape, h = (6, 8, 5), (1e-3, 2e-3, 1.5e-3)
    half = integrated_green_ffts(shape, h, torch.zeros(1, dtype=torch.float64))
    assert half.shape == (3, 7, 9, 6)
    axes = [(torch.arange(-n, n + 1, dtype=torch.float64) - 0.5) * s for n, s in zip(shape, h)]
    u, v, w = torch.meshgrid(*axes, indexing="ij")
    g = torch.stack([_field_antiderivative(a, b, c).diff(dim=0).diff(dim=1).diff(dim=2)
                     for a, b, c in ((u, v, w), (v, w, u), (w, u, v))])
    for k in range(3):  # offset -n along the field axis lies outside every grid-to-grid distance
        g[k].select(k, 0).zero_()
    full = torch.fft.rfftn(torch.roll(g, shifts=tuple(-n for n in shape), dims=(1, 2, 3)), dim=(1, 2, 3))
    scale = full.abs().max()
    assert full.real.abs().max() < 1e-12 * scale
    torch.testing.assert_close(_unfold_kernel(half), full.imag, rtol=0, atol=1e-12 * float(scale))
