"""Neural lattice elements (models/elements.py): physics at the start, broadcasting over settings, lattice
files with weights files, clear errors, and a residual element that learns what the physics misses."""

import pytest
import torch

import sim
from models import ResidualElement, SectionMap, element_types
from psr.data.lattices import build_lattice

QUAD = {"type": "Quadrupole", "length": 0.1}


@pytest.fixture(scope="module")
def particles():
    torch.manual_seed(0)
    return torch.randn(3000, 6, dtype=torch.float64) * torch.tensor([1e-3, 1e-4, 1e-3, 1e-4, 1e-3, 1e-3],
                                                                      dtype=torch.float64)


def test_untrained_residual_element_is_its_physics(particles, one_thread):
    k1 = torch.linspace(-10, 10, 5, dtype=torch.float64)
    element = ResidualElement("Q1", QUAD, input_scales=[10.0]).double()
    physical = sim.Quadrupole(name="Q1", length=0.1).double()
    out, _ = element.track(particles, 60e6, sim.get_species("electron"), {"k1": k1})
    expected, _ = physical.track(particles, 60e6, sim.get_species("electron"), {"k1": k1})
    assert out.shape == (5, 3000, 6)
    assert torch.equal(out, expected)


def test_section_map_starts_as_the_section_and_takes_gradients(particles, one_thread):
    section = [{"type": "Drift", "name": "D1", "length": 1.5}]
    element = SectionMap("SC", section, reference_rms=[1e-3, 1e-4, 1e-3, 1e-4, 1e-3, 1e-3]).double()
    batch = torch.stack([particles, 2 * particles])  # two beams (settings)
    out, _ = element.track(batch, 5e6, sim.get_species("electron"))
    drift = sim.Lattice.from_list(section).double()
    expected = drift(sim.ParticleBeam(batch, p0c=5e6)).beam.particles
    assert torch.allclose(out, expected, rtol=0, atol=1e-15)
    out.square().sum().backward()
    assert element.network[-1].weight.grad.abs().sum() > 0


def test_section_map_with_shape_condition(tmp_path, particles, one_thread):
    """shape_condition feeds the network the bunch's normalized fourth moments of the positions (log 3 and log 1
    for a Gaussian, log 1.8 along a uniform bunch's edges: what tells a halo or a hollow beam from a Gaussian of
    the same covariance); untrained the map is still the section's; its weights are refused by a map without it,
    and a non-boolean is one error."""
    from models.elements import log_fourth_moments

    torch.manual_seed(1)
    gaussian = torch.randn(400_000, 3, dtype=torch.float64)
    uniform = (torch.rand(400_000, 3, dtype=torch.float64) - 0.5) * 12 ** 0.5
    torch.testing.assert_close(log_fourth_moments(gaussian).exp(), torch.tensor([3.0, 3, 3, 1, 1, 1], dtype=torch.float64),
                               rtol=0.02, atol=0)
    torch.testing.assert_close(log_fourth_moments(uniform).exp(), torch.tensor([1.8, 1.8, 1.8, 1, 1, 1], dtype=torch.float64),
                               rtol=0.01, atol=0)
    section = [{"type": "Drift", "name": "D1", "length": 1.5}]
    rms = [1e-3, 1e-4, 1e-3, 1e-4, 1e-3, 1e-3]
    element = SectionMap("SC", section, reference_rms=rms, shape_condition=True).double()
    out, _ = element.track(particles, 5e6, sim.get_species("electron"))
    expected = sim.Lattice.from_list(section).double()(sim.ParticleBeam(particles, p0c=5e6)).beam.particles
    assert torch.allclose(out, expected, rtol=0, atol=1e-15)
    assert element.network[0].in_features == SectionMap("SC", section, reference_rms=rms).network[0].in_features + 6
    saved = element.save_weights(tmp_path / "shape.pt")
    assert SectionMap("SC", section, reference_rms=rms, shape_condition=True, weights=str(saved)).spec()["shape_condition"]
    with pytest.raises(ValueError, match="trained for another element or section .*shape_condition"):
        SectionMap("SC", section, reference_rms=rms, weights=str(saved))
    with pytest.raises(ValueError, match="shape_condition must be true or false"):
        SectionMap("SC", section, reference_rms=rms, shape_condition="yes")


def test_lattice_file_round_trip_with_weights(tmp_path, particles, one_thread):
    items = [{"type": "ResidualElement", "name": "Q1", "element": QUAD, "input_scales": [10.0]},
             {"type": "Drift", "name": "D1", "length": 2.0}]
    lattice = build_lattice(items).double()
    with torch.no_grad():  # a trained correction
        for parameter in lattice["Q1"].network.parameters():
            parameter.normal_(0, 0.3)
    lattice["Q1"].save_weights(tmp_path / "q1.pt")
    lattice["Q1"].weights = "q1.pt"
    entries = lattice.to_list()
    assert entries[0]["weights"] == "q1.pt" and entries[0]["element"] == QUAD
    again = build_lattice(entries, base_dir=tmp_path).double()  # weights relative to the lattice's folder
    k1 = torch.tensor([-5.0, 5.0], dtype=torch.float64)
    beam = sim.ParticleBeam(particles, p0c=60e6)
    a = lattice(beam, {"Q1.k1": k1}).beam.particles
    b = again(beam, {"Q1.k1": k1}).beam.particles
    plain = sim.Lattice.from_list([{"name": "Q1", **QUAD}, items[1]]).double()(beam, {"Q1.k1": k1}).beam.particles
    assert torch.allclose(a, b, rtol=0, atol=1e-8) and not torch.allclose(a, plain, rtol=1e-3, atol=0)


def test_weights_errors(tmp_path):
    element = ResidualElement("Q1", QUAD)
    element.save_weights(tmp_path / "q1.pt")
    with pytest.raises(ValueError, match="missing.pt: no such file"):
        build_lattice([{"type": "ResidualElement", "name": "Q1", "element": QUAD, "weights": "missing.pt"}],
                      base_dir=tmp_path)
    longer = {"type": "Quadrupole", "length": 0.2}
    with pytest.raises(ValueError, match="trained for another element or section.*element"):
        build_lattice([{"type": "ResidualElement", "name": "Q1", "element": longer, "weights": "q1.pt"}],
                      base_dir=tmp_path)
    with pytest.raises(ValueError, match="holds a ResidualElement, not a SectionMap"):
        SectionMap("S", [{"type": "Drift", "length": 1.0}], [1e-3] * 6, weights=str(tmp_path / "q1.pt"))
    with pytest.raises(ValueError, match="unknown element type 'NeuralThing'"):
        sim.Lattice.from_list([{"type": "NeuralThing", "name": "N"}], element_types=element_types())


def test_residual_element_learns_what_the_physics_misses(particles, one_thread):
    """The real quadrupole is 4 % stronger and has a sextupole component; trained on pairs at 5 settings, the
    residual element tracks held-out settings 10x better than the physical model."""
    torch.manual_seed(1)
    species = sim.get_species("electron")

    def real(x, k1):
        quad = sim.Quadrupole(name="Q", length=0.1, k1=0.0).double()
        out, _ = quad.track(x, 60e6, species, {"k1": 1.04 * k1})
        sext = sim.Sextupole(name="S", length=0.0, k2=0.0).double()
        kick = torch.zeros_like(out)  # thin sextupole of k2 L = 0.02 k1 [1/m^2]: dpx = -k2L/2 (x^2 - y^2), dpy = k2L x y
        k2l = (0.02 * 100 * k1).reshape(-1, 1)
        kick[..., 1] = -0.5 * k2l * (out[..., 0] ** 2 - out[..., 2] ** 2)
        kick[..., 3] = k2l * out[..., 0] * out[..., 2]
        return out + kick

    train_k = torch.tensor([-10.0, -5.0, 0.0, 5.0, 10.0], dtype=torch.float64)
    test_k = torch.tensor([-7.5, 2.5, 7.5], dtype=torch.float64)
    element = ResidualElement("Q", QUAD, input_scales=[10.0], coordinate_scale=[1e-3, 1e-4, 1e-3, 1e-4, 1e-3, 1e-3]
                              ).double()
    target = real(particles, train_k)
    scale = element.scale.double()
    optimizer = torch.optim.Adam(element.parameters(), lr=3e-3)
    for _ in range(400):
        optimizer.zero_grad()
        out, _ = element.track(particles, 60e6, species, {"k1": train_k})
        loss = ((out - target) / scale).square().mean()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        learned, _ = element.track(particles, 60e6, species, {"k1": test_k})
        physics, _ = sim.Quadrupole(name="Q", length=0.1).double().track(particles, 60e6, species, {"k1": test_k})
        truth = real(particles, test_k)
    error_learned = ((learned - truth) / scale).square().mean().sqrt()
    error_physics = ((physics - truth) / scale).square().mean().sqrt()
    assert error_learned < error_physics / 10, (error_learned, error_physics)
