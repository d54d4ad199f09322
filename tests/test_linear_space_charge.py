"""Linear space charge of the rms-equivalent Gaussian ellipsoid (sim/space_charge_linear.py): closed forms,
the 2D limit, the PIC field of a Gaussian bunch, the 6x6 section map against particle tracking, and the
SectionMap that carries it."""

import math

import pytest
import torch

import sim
from models.elements import SectionMap
from sim.space_charge import COULOMB
from sim.space_charge_linear import LinearSpaceCharge, linear_field_matrix, section_matrix

SECTION = [{"type": "Quadrupole", "name": "Q1", "length": 0.1, "k1": 0.0}, {"type": "Drift", "name": "D1", "length": 1.5}]
SIZES = torch.tensor([1e-3, 1e-4, 1e-3, 1e-4, 1e-3, 1e-3], dtype=torch.float64)


def test_sphere_in_closed_form():
    """A Gaussian sphere of rms s: <x E_x> / <x^2> = Q / (4 pi eps0) / (6 sqrt(pi) s^3)."""
    s, q = 0.7e-3, 2e-11
    k = linear_field_matrix(torch.eye(3, dtype=torch.float64) * s**2, q)
    expected = COULOMB * q / (6 * math.sqrt(math.pi) * s**3)
    torch.testing.assert_close(k, torch.eye(3, dtype=torch.float64) * expected, rtol=1e-8, atol=0)


def test_long_bunch_tends_to_the_2d_field():
    """sz >> sx, sy: k_x = Q <rho_z> / (4 pi eps0 sx (sx + sy)) with <rho_z> = 1 / (2 sqrt(pi) sz) the mean line
    density a particle sees (2D rms-equivalent field, the same for every elliptical distribution)."""
    sx, sy, sz, q = 1e-3, 0.5e-3, 2.0, 1e-9
    k = linear_field_matrix(torch.diag(torch.tensor([sx, sy, sz], dtype=torch.float64) ** 2), q)
    line = q / (2 * math.sqrt(math.pi) * sz)
    torch.testing.assert_close(k[0, 0], torch.tensor(COULOMB * line / (sx * (sx + sy)), dtype=torch.float64), rtol=2e-3, atol=0)
    torch.testing.assert_close(k[1, 1], torch.tensor(COULOMB * line / (sy * (sx + sy)), dtype=torch.float64), rtol=2e-3, atol=0)


def test_rotated_bunch_gets_the_rotated_field():
    """K(R S R^T) = R K(S) R^T (no principal axes are computed), also for a round bunch (degenerate axes)."""
    angle = 0.4
    c, s = math.cos(angle), math.sin(angle)
    rotation = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64) @ \
        torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=torch.float64)
    for sigma in ([1e-3, 0.3e-3, 4e-3], [1e-3, 1e-3, 4e-3]):
        cov = torch.diag(torch.tensor(sigma, dtype=torch.float64) ** 2)
        torch.testing.assert_close(linear_field_matrix(rotation @ cov @ rotation.T, 1e-11),
                                   rotation @ linear_field_matrix(cov, 1e-11) @ rotation.T, rtol=1e-9, atol=1e-3)
    cov = (rotation @ torch.diag(torch.tensor([1e-3, 1e-3, 4e-3], dtype=torch.float64) ** 2) @ rotation.T).requires_grad_()
    assert torch.autograd.gradcheck(lambda c: linear_field_matrix(c, 1e-11) * 1e-6, (cov,), eps=1e-12, atol=1e-3)


def test_gaussian_bunch_matches_the_pic_field():
    """<r_i E_i> / <r_i^2> of the 3D PIC field (64^3) of a Gaussian ellipsoid: the linear model's diagonal
    within 2 % (the rms-equivalent field is exactly the Gaussian's)."""
    generator = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.5e-3, 1.5e-3, 6e-3], dtype=torch.float64)
    positions = torch.randn(200_000, 3, generator=generator, dtype=torch.float64) * sigma
    particles = torch.zeros(1, 200_000, 6, dtype=torch.float64)
    particles[0, :, 0::2] = positions
    p0c = 1.0  # [eV]: gamma = 1, rest frame = lab frame
    field = sim.SpaceCharge(grid_shape=(64, 64, 64)).field(particles, p0c, "electron", 1e-11)[0]
    k = linear_field_matrix(torch.diag(sigma**2), 1e-11)
    pic = (positions * field).mean(0) / positions.square().mean(0)
    torch.testing.assert_close(pic, k.diagonal(), rtol=0.02, atol=0)


def beam(n=4000, seed=1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator, dtype=torch.float64) * SIZES + torch.tensor([1e-4, 2e-5, -1e-4, 0, 0, 0])
    x[:, 1] += 0.3 * x[:, 0] * 0.1  # converging in x, coupled in y-z
    x[:, 4] += 0.2 * x[:, 2]
    return x


@pytest.mark.parametrize("max_step", [0.1, 0.4])
def test_section_matrix_is_particle_tracking(max_step):
    """The 6x6 maps carried with the covariance give exactly the particles tracked with LinearSpaceCharge."""
    x, k = beam(), torch.linspace(-20, 24, 5, dtype=torch.float64)
    lattice = sim.Lattice.from_list(SECTION, space_charge=LinearSpaceCharge(max_step))
    tracked = lattice(sim.ParticleBeam(x, p0c=5e6, charge=1e-11), {"Q1.k1": k}).beam.particles
    plain = sim.Lattice.from_list(SECTION)(sim.ParticleBeam(x, p0c=5e6), {"Q1.k1": k}).beam.particles
    mean, centred = x.mean(0), x - x.mean(0)
    r_sc, r_0 = section_matrix(lattice.elements, lattice.split_settings({"Q1.k1": k}), centred.T @ centred / len(x),
                               5e6, "electron", 1e-11, max_step)
    mapped = centred @ r_sc.transpose(-1, -2) + (mean @ r_0.transpose(-1, -2)).unsqueeze(-2)
    size = tracked.std(-2, keepdim=True)
    assert ((mapped - tracked).abs() / size).max() < 1e-10
    assert ((plain - tracked).std(-2) / tracked.std(-2))[:, 0].max() > 0.03  # space charge matters here


def test_linear_space_charge_is_near_pic_for_a_gaussian_bunch():
    """A cold 5 MeV, 10 pC Gaussian bunch through the section, focused to a waist: rms sizes within 1.5 % of
    PIC (32^3) where space charge changes them by up to 30 %."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(20_000, 6, generator=generator, dtype=torch.float64) * \
        torch.tensor([1e-3, 1e-5, 1e-3, 1e-5, 1e-3, 1e-3], dtype=torch.float64)
    k = torch.tensor([-20.0, 0.0, 6.0, 12.0], dtype=torch.float64)
    sizes = {}
    for name, sc in (("linear", LinearSpaceCharge(0.1)), ("pic", sim.SpaceCharge((32, 32, 32), 0.1)), ("none", None)):
        lattice = sim.Lattice.from_list(SECTION, space_charge=sc)
        out = lattice(sim.ParticleBeam(x, p0c=5e6, charge=1e-11), {"Q1.k1": k}).beam.particles
        sizes[name] = out[..., [0, 2]].std(-2)
    assert (sizes["none"] / sizes["pic"] - 1).abs().max() > 0.2
    torch.testing.assert_close(sizes["linear"], sizes["pic"], rtol=0.015, atol=0)


@pytest.mark.parametrize("basis", ["cubic_positions", "cubic", "linear", "field_shapes"])
def test_section_map_with_linear_space_charge_starts_as_the_physics(basis):
    """An untrained SectionMap with space_charge tracks as LinearSpaceCharge, whatever its basis; its spec carries
    the option (a weights file of another charge is refused), and a spec without it is unchanged (older weights
    files)."""
    x, k = beam(), torch.linspace(-20, 24, 4, dtype=torch.float64)
    element = SectionMap("SC", SECTION, SIZES.tolist(), inputs=["Q1.k1"], basis=basis,
                         space_charge={"charge": 1e-11, "max_step": 0.1}).double()
    out = element.track(x, 5e6, "electron", {"Q1_k1": k})[0]
    lattice = sim.Lattice.from_list(SECTION, space_charge=LinearSpaceCharge(0.1))
    tracked = lattice(sim.ParticleBeam(x, p0c=5e6, charge=1e-11), {"Q1.k1": k}).beam.particles
    torch.testing.assert_close(out, tracked, rtol=0, atol=1e-15)
    assert element.spec()["space_charge"] == {"charge": 1e-11, "max_step": 0.1}
    assert "space_charge" not in SectionMap("SC", SECTION, SIZES.tolist(), inputs=["Q1.k1"]).spec()


def test_section_map_space_charge_errors(tmp_path):
    with pytest.raises(ValueError, match="space_charge must be"):
        SectionMap("SC", SECTION, SIZES.tolist(), space_charge={"max_step": 0.1})
    with pytest.raises(ValueError, match="max_step must be a positive"):
        SectionMap("SC", SECTION, SIZES.tolist(), space_charge={"charge": 1e-11, "max_step": -1})
    with pytest.raises(ValueError, match="drifts and magnets"):
        SectionMap("SC", [*SECTION, {"type": "RFCavity", "name": "C", "length": 0.1}], SIZES.tolist(),
                   space_charge={"charge": 1e-11})
    saved = SectionMap("SC", SECTION, SIZES.tolist(), space_charge={"charge": 1e-11}).save_weights(tmp_path / "w.pt")
    with pytest.raises(ValueError, match="trained for another element or section .*space_charge"):
        SectionMap("SC", SECTION, SIZES.tolist(), space_charge={"charge": 2e-11}, weights=str(saved))


def test_replace_refuses_a_section_map_of_another_charge():
    """model.replace: a SectionMap carrying the space charge of 10 pC in a scan of a 20 pC bunch is one clear error."""
    from psr.training.replace import replace_sections

    items = [dict(e) for e in SECTION] + [{"type": "Screen", "name": "YAG", "resolution": [8, 8], "pixel_size": [1e-4, 1e-4]}]
    entry = [{"elements": ["Q1", "D1"], "element": {"type": "SectionMap", "name": "SC", "inputs": ["Q1.k1"],
                                                     "reference_rms": SIZES.tolist(), "space_charge": {"charge": 1e-11}}}]
    replaced, routes = replace_sections(items, entry, ["Q1.k1"], 1e-11)
    assert [e["name"] for e in replaced] == ["SC", "YAG"] and routes == {"Q1.k1": "SC.Q1_k1"}
    with pytest.raises(ValueError, match=r"model.replace\[0\]: the SectionMap SC carries the space charge of a 1e-11 C "
                                         r"bunch, but the scan's bunch has 2e-11 C"):
        replace_sections(items, entry, ["Q1.k1"], 2e-11)
