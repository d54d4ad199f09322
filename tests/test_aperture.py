"""Apertures: surviving fractions against closed forms, Cheetah 0.8.4's Aperture, screens and
moments of the survivors, broadcasting over settings, smooth edges (gradcheck, a fitted aperture),
lattice files, and the fused-matrix path against explicit element-by-element tracking."""

import math

import numpy as np
import pytest
import torch

import sim
from sim.lattice import load_lattice_text

F64 = torch.float64
P0C = 50e6
pytestmark = pytest.mark.usefixtures("one_thread")


def T(value):
    return torch.as_tensor(value, dtype=F64)


def gaussian(n, sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=F64) * T(sigma)


def phi(u):
    return 0.5 * (1 + math.erf(u / math.sqrt(2)))


def binomial_tolerance(p, n, k=4.5):
    return k * math.sqrt(p * (1 - p) / n) + 1e-12


def track(items, particles, settings=None):
    return sim.Lattice.from_list(items)(sim.ParticleBeam(particles, P0C), settings)


# -- counting in closed form -------------------------------------------------------------------

def test_gaussian_rectangular_with_offsets_matches_erf():
    """x at the aperture after a drift L: sigma^2 = sx^2 + L^2 spx^2; survival is a product of
    normal-distribution differences per plane, for K offsets at once (settings broadcast)."""
    n, length = 200_000, 2.0
    sigma = (1e-3, 0.4e-3, 0.6e-3, 0.2e-3, 1e-3, 1e-3)
    offsets_x = T([0.0, 5e-4, -1.2e-3])
    offsets_y = T([2e-4, -3e-4, 0.0])
    a, b = 1.1e-3, 0.7e-3
    out = track([{"type": "Drift", "name": "D", "length": length},
                 {"type": "Aperture", "name": "A", "x_max": a, "y_max": b}],
                gaussian(n, sigma), {"A.x_offset": offsets_x, "A.y_offset": offsets_y})
    sx = math.hypot(sigma[0], length * sigma[1])
    sy = math.hypot(sigma[2], length * sigma[3])
    fraction = out.beam.surviving_fraction()
    assert fraction.shape == (3,)
    for k in range(3):
        x0, y0 = float(offsets_x[k]), float(offsets_y[k])
        p = (phi((x0 + a) / sx) - phi((x0 - a) / sx)) * (phi((y0 + b) / sy) - phi((y0 - b) / sy))
        assert abs(float(fraction[k]) - p) < binomial_tolerance(p, n), (k, float(fraction[k]), p)


def test_gaussian_elliptical_matches_chi_square():
    """A centred ellipse with half axes c sigma_x, c sigma_y keeps 1 - exp(-c^2/2) of a Gaussian beam
    (chi-square, 2 degrees of freedom); c scanned over K = 3 settings of both half axes."""
    n = 200_000
    sigma = (1.5e-3, 1e-4, 0.5e-3, 1e-4, 1e-3, 1e-3)
    c = T([0.5, 1.0, 2.0])
    out = track([{"type": "Aperture", "name": "A", "shape": "elliptical"}], gaussian(n, sigma, seed=1),
                {"A.x_max": c * sigma[0], "A.y_max": c * sigma[2]})
    fraction = out.beam.surviving_fraction()
    for k in range(3):
        p = 1 - math.exp(-float(c[k]) ** 2 / 2)
        assert abs(float(fraction[k]) - p) < binomial_tolerance(p, n), (k, float(fraction[k]), p)


def test_uniform_beam_elliptical_with_offsets_keeps_area_ratio():
    """A uniform beam on [-h, h]^2 through an ellipse inside it keeps pi a b / (2h)^2, wherever the
    ellipse sits."""
    n, h = 200_000, 2e-3
    g = torch.Generator().manual_seed(2)
    particles = torch.zeros(n, 6, dtype=F64)
    particles[:, [0, 2]] = (torch.rand(n, 2, generator=g, dtype=F64) * 2 - 1) * h
    a, b = 1.0e-3, 0.6e-3
    for x0, y0 in ((0.0, 0.0), (0.8e-3, -1.2e-3), (-0.9e-3, 0.5e-3)):
        out = track([{"type": "Aperture", "name": "A", "shape": "elliptical", "x_max": a, "y_max": b,
                      "x_offset": x0, "y_offset": y0}], particles)
        p = math.pi * a * b / (2 * h) ** 2
        assert abs(float(out.beam.surviving_fraction()) - p) < binomial_tolerance(p, n)


# -- against Cheetah ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["rectangular", "elliptical"])
def test_survivors_match_cheetah(shape):
    """Cheetah 0.8.4 segment (quadrupole, drift, aperture; drift_kick_drift) imported with
    Lattice.from_cheetah: the same particles survive, and the weighted centroids agree. Offsets
    (Cheetah has none): psr's aperture at (x0, y0) keeps what Cheetah's keeps of the beam moved by
    (-x0, -y0)."""
    cheetah = pytest.importorskip("cheetah")
    bmadx = pytest.importorskip("cheetah.utils.bmadx")
    bmad = gaussian(20_000, (1e-3, 1e-4, 1e-3, 1e-4, 1e-3, 1e-3), seed=3)
    mass = T(sim.get_species("electron").mass_eV)
    species = cheetah.Species("psr_electron", num_elementary_charges=T(-1.0), mass_eV=mass, dtype=F64)

    def cheetah_survival(beam_bmad, x_max, y_max):
        segment = cheetah.Segment([
            cheetah.Quadrupole(length=T(0.1), k1=T(8.0), tracking_method="drift_kick_drift", dtype=F64),
            cheetah.Drift(length=T(1.0), tracking_method="drift_kick_drift", dtype=F64),
            cheetah.Aperture(x_max=T(x_max), y_max=T(y_max), shape=shape, name="A", dtype=F64)])
        coords, energy = bmadx.bmad_to_cheetah_coords(beam_bmad, T(P0C), mass)
        out = segment.track(cheetah.ParticleBeam(coords, energy=energy, species=species, dtype=F64))
        return segment, out

    segment, theirs = cheetah_survival(bmad, 1.2e-3, 0.8e-3)
    lattice = sim.Lattice.from_cheetah(segment)
    assert isinstance(lattice.elements[-1], sim.Aperture) and lattice.elements[-1].shape == shape
    ours = lattice(sim.ParticleBeam(bmad, P0C)).beam
    survived = theirs.survival_probabilities.bool()
    assert 0.2 < survived.double().mean() < 0.9
    assert torch.equal(ours.weights.bool(), survived)
    assert torch.allclose(ours.mean()[0], theirs.mu_x, rtol=0, atol=1e-15)
    assert torch.allclose(ours.mean()[2], theirs.mu_y, rtol=0, atol=1e-15)

    x0, y0 = 4e-4, -3e-4
    shifted = ours.particles.clone()  # the beam at the aperture (tracked above), moved
    shifted[:, 0] -= x0
    shifted[:, 2] -= y0
    aperture = cheetah.Aperture(x_max=T(1.2e-3), y_max=T(0.8e-3), shape=shape, dtype=F64)
    coords, energy = bmadx.bmad_to_cheetah_coords(shifted, T(P0C), mass)
    moved = aperture.track(cheetah.ParticleBeam(coords, energy=energy, species=species, dtype=F64))
    with_offsets = lattice.to_list()
    with_offsets[-1].update(x_offset=x0, y_offset=y0)
    ours = sim.Lattice.from_list(with_offsets)(sim.ParticleBeam(bmad, P0C)).beam
    assert torch.equal(ours.weights.bool(), moved.survival_probabilities.bool())
    assert not torch.equal(ours.weights.bool(), survived)


# -- screens and moments of the survivors ------------------------------------------------------

LINE = [
    {"type": "Quadrupole", "name": "Q1", "length": 0.1, "k1": 0.0},
    {"type": "Drift", "name": "D1", "length": 1.0},
    {"type": "Aperture", "name": "A1", "shape": "elliptical", "x_max": 1.5e-3, "y_max": 1.0e-3,
     "x_offset": 2e-4, "y_offset": -1e-4},
    {"type": "Quadrupole", "name": "Q2", "length": 0.1, "k1": 5.0},
    {"type": "Drift", "name": "D2", "length": 1.5},
    {"type": "Screen", "name": "S", "resolution": [32, 24], "pixel_size": [3e-4, 3e-4], "psf_sigma": [2e-4, 2e-4]},
]
K1 = T([-10.0, 0.0, 10.0])
X_MAX = T([1.0e-3, 1.5e-3, 2.5e-3])


@pytest.mark.parametrize("method", ["cic", "kde"])
def test_screen_images_are_images_of_the_survivors(method):
    """Images with the aperture (settings of Q1 and A1 scanned together) equal, setting by setting,
    the images of only the surviving particles tracked through the line without the aperture; a
    screen read at some settings only (screen_rows) gets the same rows."""
    particles = gaussian(4000, (1e-3, 2e-4, 0.8e-3, 2e-4, 1e-3, 1e-3), seed=4)
    settings = {"Q1.k1": K1, "A1.x_max": X_MAX}
    line = [dict(item, method=method, kde_bandwidth=1e-4) if item["type"] == "Screen" else item for item in LINE]
    out = track(line, particles, settings)
    images = out.images["S"]
    without = [item for item in line if item["type"] != "Aperture"]
    for k in range(3):
        alive = out.beam.weights[k].bool()
        assert 0.1 < alive.double().mean() < 0.95
        expected = track(without, particles[alive], {"Q1.k1": K1[k]}).images["S"]
        assert torch.allclose(images[k], expected, rtol=0, atol=1e-14)
        assert abs(float(images[k].sum()) - float(expected.sum())) < 1e-14
    rows = sim.Lattice.from_list(line)(sim.ParticleBeam(particles, P0C), settings,
                                      screen_rows={"S": torch.tensor([True, False, True])}).images["S"]
    assert torch.allclose(rows, images[[0, 2]], rtol=0, atol=1e-15)


def test_weighted_moments_equal_numpy_on_survivors():
    particles = gaussian(5000, (1e-3, 2e-4, 0.8e-3, 2e-4, 1e-3, 1e-3), seed=5)
    out = track(LINE, particles, {"Q1.k1": K1, "A1.x_max": X_MAX})
    beam = out.beam
    assert beam.particles.shape == (3, 5000, 6) and beam.weights.shape == (3, 5000)
    for k in range(3):
        alive = beam.weights[k].bool().numpy()
        survivors = beam.particles[k].numpy()[alive]
        cov = np.cov(survivors.T, bias=True)
        assert np.allclose(beam.mean()[k].numpy(), survivors.mean(0), rtol=0, atol=1e-15)
        assert np.allclose(beam.cov()[k].numpy(), cov, rtol=1e-12, atol=0)
        emit_x = math.sqrt(np.linalg.det(cov[:2, :2]))
        emit_4d = math.sqrt(np.linalg.det(cov[:4, :4]))
        assert abs(float(beam.emittance("x")[k]) / emit_x - 1) < 1e-10
        assert abs(float(beam.emittance("4d")[k]) / emit_4d - 1) < 1e-10
        full = np.cov(beam.particles[k].numpy().T, bias=True)  # the clipped beam is smaller
        assert emit_x < 0.99 * math.sqrt(np.linalg.det(full[:2, :2]))


def test_fused_matrices_equal_explicit_element_tracking():
    """The lattice reads x, y at the aperture from the fused matrix of Q1 and D1; tracking the
    particles element by element and cutting them at the aperture gives the same beam and images."""
    particles = gaussian(3000, (1e-3, 2e-4, 0.8e-3, 2e-4, 1e-3, 1e-3), seed=6)
    lattice = sim.Lattice.from_list(LINE)
    out = lattice(sim.ParticleBeam(particles, P0C), {"Q1.k1": K1})
    coords, weights = particles, None
    for element in lattice.elements:
        if isinstance(element, sim.Aperture):
            weights = element.survival(coords[..., 0], coords[..., 2])
        elif not isinstance(element, sim.Screen):
            coords, _ = element.track(coords, P0C, "electron", {"k1": K1} if element.name == "Q1" else None)
    assert weights.shape == (3, 3000) and 0.2 < float(weights.mean()) < 0.9
    assert torch.equal(out.beam.weights, weights)
    assert torch.allclose(out.beam.particles, coords, rtol=0, atol=1e-15)
    image = lattice.screens["S"].image(coords, weights / weights.sum(-1, keepdim=True))
    assert torch.allclose(out.images["S"], image, rtol=0, atol=1e-14)


@pytest.mark.parametrize("shape", ["rectangular", "elliptical"])
def test_one_scanned_parameter_broadcasts(shape):
    """Each aperture parameter scanned alone over K settings (the particles (N, 6) not scanned, the
    other parameters scalars, edge 0 and mixed 0 / > 0) equals K separate runs."""
    particles = gaussian(3000, (1e-3,) * 6, seed=12)
    item = {"type": "Aperture", "name": "A", "shape": shape, "x_max": 1e-3, "y_max": 0.8e-3, "x_offset": 1e-4}
    scans = {"x_max": [0.5e-3, 1e-3, 2e-3], "y_max": [0.5e-3, 1e-3, 2e-3], "x_offset": [-1e-3, 0.0, 5e-4],
             "y_offset": [-1e-3, 0.0, 5e-4], "edge": [0.0, 1e-5, 1e-4]}
    for key, values in scans.items():
        out = track([item], particles, {f"A.{key}": T(values)}).beam
        assert out.particles.shape == (3, 3000, 6) and out.weights.shape == (3, 3000)
        for k, value in enumerate(values):
            alone = track([dict(item, **{key: value})], particles).beam
            assert torch.allclose(out.weights[k], alone.weights, rtol=0, atol=1e-15), (key, value)
            assert torch.allclose(out.cov()[k], alone.cov(), rtol=1e-12, atol=0)


def test_nothing_survives_gives_empty_images():
    out = track([{"type": "Aperture", "name": "A", "x_max": 1e-3, "x_offset": 1.0},
                 {"type": "Screen", "name": "S", "resolution": [8, 8]}], gaussian(500, (1e-3,) * 6))
    assert float(out.beam.surviving_fraction()) == 0 and float(out.images["S"].abs().sum()) == 0


# -- smooth edges and gradients ---------------------------------------------------------------

@pytest.mark.parametrize("shape", ["rectangular", "elliptical"])
def test_smooth_edge_gradcheck(shape):
    """Survival with edge > 0 is differentiable in the particles' positions and every aperture
    parameter (float64 gradcheck), also through a lattice to the survivors' emittance."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(2, 20, generator=g, dtype=F64) * 1e-3).requires_grad_(True)
    y = (torch.randn(2, 20, generator=g, dtype=F64) * 1e-3).requires_grad_(True)
    params = [T(v).requires_grad_(True) for v in ([1.0e-3, 1.4e-3], 0.8e-3, 2e-4, [-1e-4, 1e-4], 2e-4)]
    aperture = sim.Aperture("A", shape=shape)
    names = ("x_max", "y_max", "x_offset", "y_offset", "edge")

    def survival(x, y, *values):
        return aperture.survival(x, y, dict(zip(names, values)))

    assert torch.autograd.gradcheck(survival, (x, y, *params))
    open_x = T(math.inf).requires_grad_(True)  # open in x: survival 1 in x, finite gradients
    value = survival(x, y, open_x, *params[1:])
    value.sum().backward()
    assert float(value.detach().min()) < 0.5 and float(open_x.grad) == 0
    assert all(bool(torch.isfinite(t.grad).all()) for t in (x, y, *params[1:]))

    particles = gaussian(30, (1e-3, 2e-4, 0.8e-3, 2e-4, 1e-3, 1e-3), seed=8).requires_grad_(True)
    line = [dict(item, shape=shape, edge=1e-4) if item["type"] == "Aperture" else item for item in LINE[:-1]]
    lattice = sim.Lattice.from_list(line)

    def emittance(particles, x_max):
        return lattice(sim.ParticleBeam(particles, P0C), {"A1.x_max": x_max}).beam.emittance("x")

    assert torch.autograd.gradcheck(emittance, (particles, T(1.2e-3).requires_grad_(True)))


def test_smooth_edge_tends_to_hard_edge():
    particles = gaussian(20_000, (1e-3,) * 6, seed=9)
    item = {"type": "Aperture", "name": "A", "shape": "elliptical", "x_max": 1.2e-3, "y_max": 0.9e-3, "x_offset": 3e-4}
    hard = float(track([item], particles).beam.surviving_fraction())
    for edge, tolerance in ((1e-5, 2e-3), (1e-7, 2e-4)):
        soft = float(track([dict(item, edge=edge)], particles).beam.surviving_fraction())
        assert abs(soft - hard) < tolerance, (edge, soft, hard)
    # a hard edge passes no gradient to the aperture; a smooth one does
    x_max = T(1.2e-3).requires_grad_(True)
    assert not track([item], particles, {"A.x_max": x_max}).beam.surviving_fraction().requires_grad
    track([dict(item, edge=1e-4)], particles, {"A.x_max": x_max}).beam.surviving_fraction().backward()
    assert float(x_max.grad) > 0


def test_fit_recovers_aperture_from_images():
    """Images made with a hard aperture of half width 1.0 mm at x_offset 0.3 mm; a smooth-edged
    aperture starting at 2.0 mm and 0 mm is fitted to them by gradient descent on the image
    mismatch (the beam known) and lands on the true opening."""
    particles = gaussian(6000, (1e-3, 2e-4, 0.8e-3, 2e-4, 1e-3, 1e-3), seed=10)
    lattice = sim.Lattice.from_list(LINE)
    beam = sim.ParticleBeam(particles, P0C)
    target = lattice(beam, {"Q1.k1": K1, "A1.x_max": T(1.0e-3), "A1.x_offset": T(3e-4)}).images["S"]
    soft = sim.Lattice.from_list([dict(item, edge=5e-5) if item["type"] == "Aperture" else item for item in LINE])
    x_max = T(2.0e-3).requires_grad_(True)
    x_offset = T(0.0).requires_grad_(True)
    optimizer = torch.optim.Adam([x_max, x_offset], lr=5e-5)
    for _ in range(150):
        optimizer.zero_grad()
        images = soft(beam, {"Q1.k1": K1, "A1.x_max": x_max, "A1.x_offset": x_offset}).images["S"]
        (images - target).abs().sum().backward()
        optimizer.step()
    x_max, x_offset = float(x_max.detach()), float(x_offset.detach())
    assert abs(x_max - 1.0e-3) < 0.05e-3 and abs(x_offset - 3e-4) < 0.05e-3, (x_max, x_offset)


# -- lattice files and bad input ---------------------------------------------------------------

def test_lattice_file_round_trip():
    import json

    import yaml

    items = [{"type": "Drift", "name": "D", "length": 0.5},
             {"type": "Aperture", "name": "A1", "shape": "elliptical", "x_max": 1e-3, "y_max": 2e-3,
              "x_offset": 1e-4, "y_offset": -2e-4, "edge": 1e-5},
             {"type": "Aperture", "name": "EDGE", "x_max": 1.0, "x_offset": 0.8e-3 - 1.0}]  # keeps x < 0.8 mm
    lattice = sim.Lattice.from_list(items)
    entries = lattice.to_list()
    assert entries[1] == dict(items[1]) and entries[2]["y_max"] == math.inf and entries[2]["shape"] == "rectangular"
    particles = gaussian(2000, (1e-3,) * 6, seed=11)
    weights = lattice(sim.ParticleBeam(particles, P0C)).beam.weights
    assert 0.1 < float((weights > 0.5).double().mean()) < 0.9
    for text in (yaml.safe_dump(entries), json.dumps(entries)):
        again = sim.Lattice.from_list(load_lattice_text(text))
        assert again.to_list() == entries
        assert torch.equal(again(sim.ParticleBeam(particles, P0C)).beam.weights, weights)
    straight = lattice(sim.ParticleBeam(particles, P0C)).beam  # the straight edge cuts at x = 0.8 mm
    assert float(straight.particles[..., 0][weights > 0.5].max()) < 0.8e-3


@pytest.mark.parametrize("entry, message", [
    ({"shape": "round"}, "unknown shape"),
    ({"x_max": 0.0}, "x_max must be > 0"),
    ({"y_max": float("nan")}, "y_max must be > 0"),
    ({"edge": -1e-4}, "edge must be >= 0"),
    ({"x_offset": float("inf")}, "x_offset must be finite"),
    ({"radius": 1e-3}, "unknown parameter"),
])
def test_bad_aperture_entries(entry, message):
    with pytest.raises(ValueError, match=message):
        sim.Lattice.from_list([dict({"type": "Aperture", "name": "A"}, **entry)])


def test_space_charge_after_aperture_is_refused_and_weights_checked():
    lattice = sim.Lattice.from_list([{"type": "Aperture", "name": "A", "x_max": 1e-3},
                                     {"type": "Drift", "name": "D", "length": 0.1}],
                                    space_charge=sim.SpaceCharge(grid_shape=(8, 8, 8), max_step=0.05))
    beam = sim.ParticleBeam(gaussian(200, (1e-3,) * 6), P0C, charge=1e-12)
    with pytest.raises(ValueError, match="after an aperture"):
        lattice(beam)
    with pytest.raises(ValueError, match="weights"):
        sim.ParticleBeam(gaussian(10, (1e-3,) * 6), P0C, weights=torch.ones(9, dtype=F64))
