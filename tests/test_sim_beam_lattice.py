"""ParticleBeam statistics against known covariances, emittance conservation through a lattice,
lattice files (round trip, YAML/JSON) and the errors a user gets for bad lattices and settings."""

import json
import math

import pytest
import torch
import yaml

import sim

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def twiss_block(beta, alpha, emit):
    gamma = (1 + alpha**2) / beta
    return emit * torch.tensor([[beta, -alpha], [-alpha, gamma]], dtype=F64)


def particles_with_covariance(cov: torch.Tensor, n: int, mean=None, seed=0) -> torch.Tensor:
    """Gaussian particles whose sample (population) covariance is exactly `cov` and mean exactly `mean`."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 6, generator=gen, dtype=F64)
    z = z - z.mean(0)
    white = torch.linalg.cholesky(z.T @ z / n)
    z = z @ torch.linalg.inv(white).T  # sample covariance now exactly the identity
    p = z @ torch.linalg.cholesky(cov).T
    return p + (torch.zeros(6, dtype=F64) if mean is None else torch.as_tensor(mean, dtype=F64))


X_TWISS, Y_TWISS, Z_BLOCK = (4.0, -1.5, 2e-8), (9.0, 2.0, 3e-8), torch.tensor([[1e-6, 2e-7], [2e-7, 1e-6]], dtype=F64)


def uncoupled_cov():
    cov = torch.zeros(6, 6, dtype=F64)
    cov[0:2, 0:2] = twiss_block(*X_TWISS)
    cov[2:4, 2:4] = twiss_block(*Y_TWISS)
    cov[4:6, 4:6] = Z_BLOCK
    return cov


def coupled_cov():
    """An x-y-z coupled covariance: a random symplectic-ish mix of the uncoupled one (any SPD matrix works)."""
    gen = torch.Generator().manual_seed(11)
    a = torch.eye(6, dtype=F64) + 0.3 * torch.randn(6, 6, generator=gen, dtype=F64)
    scale = uncoupled_cov().diagonal().sqrt()
    mix = a * scale[:, None] / scale[None, :]
    return mix @ uncoupled_cov() @ mix.T


# ----------------------------------------------------------------------------------- beam statistics


def test_mean_and_cov_are_exact():
    cov = coupled_cov()
    mean = [1e-3, -2e-5, 3e-4, 0.0, 1e-4, 2e-3]
    beam = sim.ParticleBeam(particles_with_covariance(cov, 3000, mean), p0c=50e6)
    torch.testing.assert_close(beam.mean(), torch.tensor(mean, dtype=F64), atol=1e-15, rtol=1e-10)
    torch.testing.assert_close(beam.cov(), cov, atol=1e-20, rtol=1e-9)


@pytest.mark.parametrize("p0c,species", [(50e6, "electron"), (2e9, "proton"), (0.4e6, "positron")])
def test_emittances_of_uncoupled_beam(p0c, species):
    """Geometric emittances are the twiss emittances; 4d and 6d are their products; normalized
    multiplies by beta*gamma = p0c / (m c^2) per plane."""
    beam = sim.ParticleBeam(particles_with_covariance(uncoupled_cov(), 4000), p0c=p0c, species=species)
    ex, ey, ez = X_TWISS[2], Y_TWISS[2], math.sqrt(float(torch.linalg.det(Z_BLOCK)))
    bg = p0c / sim.get_species(species).mass_eV
    expected = {"x": ex, "y": ey, "z": ez, "4d": ex * ey, "6d": ex * ey * ez}
    planes = {"x": 1, "y": 1, "z": 1, "4d": 2, "6d": 3}
    for plane, value in expected.items():
        assert float(beam.emittance(plane)) == pytest.approx(value, rel=1e-9), plane
        assert float(beam.emittance(plane, normalized=True)) == pytest.approx(value * bg ** planes[plane], rel=1e-9)
    for plane, (beta, alpha, emit) in (("x", X_TWISS), ("y", Y_TWISS)):
        twiss = beam.twiss(plane)
        assert float(twiss["beta"]) == pytest.approx(beta, rel=1e-9)
        assert float(twiss["alpha"]) == pytest.approx(alpha, rel=1e-9)
        assert float(twiss["emittance"]) == pytest.approx(emit, rel=1e-9)


def test_emittances_of_coupled_beam():
    cov = coupled_cov()
    beam = sim.ParticleBeam(particles_with_covariance(cov, 4000), p0c=50e6)
    det = lambda idx: math.sqrt(float(torch.linalg.det(cov[idx][:, idx])))  # noqa: E731
    assert float(beam.emittance("x")) == pytest.approx(det([0, 1]), rel=1e-9)
    assert float(beam.emittance("y")) == pytest.approx(det([2, 3]), rel=1e-9)
    assert float(beam.emittance("4d")) == pytest.approx(det([0, 1, 2, 3]), rel=1e-9)
    assert float(beam.emittance("6d")) == pytest.approx(det(list(range(6))), rel=1e-9)
    # coupling: the 4d emittance is smaller than the product of the projected ones
    assert float(beam.emittance("4d")) < 0.99 * float(beam.emittance("x") * beam.emittance("y"))


def test_emittance_of_batched_beam_and_bad_plane():
    p = particles_with_covariance(uncoupled_cov(), 2000)
    beam = sim.ParticleBeam(torch.stack([p, 2 * p, 3 * p]), p0c=50e6)
    ex = beam.emittance("x")
    assert ex.shape == (3,)
    torch.testing.assert_close(ex, X_TWISS[2] * torch.tensor([1.0, 4.0, 9.0], dtype=F64), rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="unknown plane 'w'"):
        beam.emittance("w")
    with pytest.raises(ValueError, match="unknown plane '4d'"):
        beam.twiss("4d")


def test_beam_construction_errors():
    with pytest.raises(ValueError, match=r"shape \(\.\.\., N, 6\)"):
        sim.ParticleBeam(torch.zeros(10, 5), p0c=1e6)
    with pytest.raises(ValueError, match="p0c must be positive"):
        sim.ParticleBeam(torch.zeros(10, 6), p0c=-1.0)
    with pytest.raises(ValueError, match="unknown species 'muon'"):
        sim.ParticleBeam(torch.zeros(10, 6), p0c=1e6, species="muon")


def test_relativistic_factors():
    m = sim.get_species("electron").mass_eV
    gamma, beta = sim.relativistic_factors(m, "electron")  # p = m c -> beta gamma = 1
    assert gamma == pytest.approx(math.sqrt(2), rel=1e-14) and beta == pytest.approx(1 / math.sqrt(2), rel=1e-14)
    gamma, beta = sim.relativistic_factors(938.27208816e6 * 3, "proton")
    assert beta * gamma == pytest.approx(3.0, rel=1e-12)


# ------------------------------------------------------------------------------ through a lattice

FODO = [
    {"type": "Quadrupole", "name": "Q1", "length": 0.1, "k1": 12.0},
    {"type": "Drift", "name": "D1", "length": 0.8},
    {"type": "Quadrupole", "name": "Q2", "length": 0.1, "k1": -12.0},
    {"type": "Drift", "name": "D2", "length": 0.8},
    {"type": "Screen", "name": "S1", "resolution": [32, 24], "pixel_size": [2e-4, 2e-4]},
    {"type": "Quadrupole", "name": "Q3", "length": 0.2, "k1": 5.0, "tilt": 0.0},
    {"type": "Drift", "name": "D3", "length": 1.5},
]


@pytest.mark.parametrize("cov", [uncoupled_cov, coupled_cov])
def test_emittance_conserved_through_lattice(cov):
    beam = sim.ParticleBeam(particles_with_covariance(cov(), 2000), p0c=30e6)
    lattice = sim.Lattice.from_list(FODO)
    k1 = torch.tensor([-20.0, -5.0, 0.0, 7.0, 25.0], dtype=F64)
    out = lattice(beam, settings={"Q1.k1": k1}).beam
    assert out.particles.shape == (5, 2000, 6)
    for plane in ("4d", "6d") + (("x", "y", "z") if cov is uncoupled_cov else ("z",)):
        torch.testing.assert_close(out.emittance(plane), beam.emittance(plane).expand(5), rtol=1e-9, atol=0)
    # and the beam did change: the x rms varies over the scan
    sx = out.cov()[:, 0, 0].sqrt()
    assert float(sx.max() / sx.min()) > 1.5


def test_tilted_quadrupole_couples_but_conserves_4d():
    """A skew quadrupole moves emittance between x and y (projected ones change) but not the 4d one."""
    beam = sim.ParticleBeam(particles_with_covariance(uncoupled_cov(), 2000), p0c=30e6)
    lattice = sim.Lattice.from_list(FODO)
    out = lattice(beam, settings={"Q3.tilt": torch.tensor(math.pi / 4, dtype=F64)}).beam
    assert abs(float(out.emittance("x") / beam.emittance("x")) - 1) > 0.05
    assert float(out.emittance("4d")) == pytest.approx(float(beam.emittance("4d")), rel=1e-9)


def test_drift_moves_rms_as_expected():
    """sigma_x^2 after a drift L = s11 + 2 L s12 + L^2 s22 (independent of the map code)."""
    cov = uncoupled_cov()
    beam = sim.ParticleBeam(particles_with_covariance(cov, 1000), p0c=30e6)
    length = 2.3
    out = sim.Lattice([sim.Drift(name="D", length=length)])(beam).beam
    s11, s12, s22 = cov[0, 0], cov[0, 1], cov[1, 1]
    assert float(out.cov()[0, 0]) == pytest.approx(float(s11 + 2 * length * s12 + length**2 * s22), rel=1e-9)
    assert float(out.cov()[1, 1]) == pytest.approx(float(s22), rel=1e-9)


def test_every_screen_sees_the_beam_tracked_to_it():
    """Screens in the middle and at the end image the beam tracked up to them (the lattice applies
    only the x, y rows of the accumulated map at a screen), and the final beam is the full map."""
    lattice = sim.Lattice.from_list(FODO + [{"type": "Screen", "name": "S2", "resolution": [20, 16],
                                             "pixel_size": [5e-4, 5e-4], "method": "kde"}])
    beam = sim.ParticleBeam(particles_with_covariance(uncoupled_cov(), 1000), p0c=30e6)
    k1 = torch.tensor([-6.0, 0.0, 9.0], dtype=F64)
    out = lattice(beam, settings={"Q2.k1": k1, "Q3.tilt": torch.tensor(0.4, dtype=F64)})
    first = sim.Lattice.from_list(FODO[:4])(beam, settings={"Q2.k1": k1}).beam
    whole = sim.Lattice.from_list(FODO)(beam, settings={"Q2.k1": k1, "Q3.tilt": torch.tensor(0.4, dtype=F64)}).beam
    assert out.images["S1"].shape == (3, 24, 32) and out.images["S2"].shape == (3, 16, 20)
    torch.testing.assert_close(out.images["S1"], lattice["S1"].image(first.particles), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out.images["S2"], lattice["S2"].image(whole.particles), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out.beam.particles, whole.particles, atol=1e-15, rtol=1e-12)
    # by hand: the x rms at S1 from the covariance and the product of the closed-form maps
    m = torch.eye(6, dtype=F64)
    for element in sim.Lattice.from_list(FODO[:4]).elements:
        m = element.transfer_map(30e6, "electron", m, {"k1": k1[2]} if element.name == "Q2" else None) @ m
    assert float(first.cov()[2, 0, 0]) == pytest.approx(float((m @ uncoupled_cov() @ m.T)[0, 0]), rel=1e-9)


def test_screen_first_and_lazy_final_beam():
    """A screen before any magnet images the input beam; out.beam is made on first access, once."""
    lattice = sim.Lattice.from_list([{"type": "Screen", "name": "S0", "resolution": [16, 16], "pixel_size": [2e-4, 2e-4]},
                                     {"type": "Drift", "name": "D", "length": 1.0}])
    beam = sim.ParticleBeam(particles_with_covariance(uncoupled_cov(), 500), p0c=30e6)
    out = lattice(beam)
    torch.testing.assert_close(out.images["S0"], lattice["S0"].image(beam.particles), atol=0, rtol=0)
    assert "not computed" in repr(out)
    final = out.beam
    assert final is out.beam and "not computed" not in repr(out)
    torch.testing.assert_close(final.particles[:, 0], beam.particles[:, 0] + beam.particles[:, 1], atol=1e-18, rtol=1e-12)


# ---------------------------------------------------------------------------------- lattice files

FULL = [
    {"type": "Quadrupole", "name": "Q1", "length": 0.1, "k1": 4.5, "tilt": 0.25},
    {"type": "Drift", "name": "D1", "length": 1.25},
    {"type": "Quadrupole", "name": "Q2", "length": 0.1, "k1": -3.0, "tilt": 0.0},
    {"type": "Screen", "name": "OTR1", "resolution": [40, 30], "pixel_size": [1e-4, 1.5e-4], "center": [1e-4, -2e-4],
     "psf_sigma": [5e-5, 6e-5], "kde_bandwidth": 0.0, "method": "cic"},
    {"type": "Drift", "name": "D2", "length": 0.5},
    {"type": "Screen", "name": "YAG", "resolution": [20, 20], "pixel_size": [3e-4, 3e-4], "center": [0.0, 0.0],
     "psf_sigma": [0.0, 0.0], "kde_bandwidth": 1e-4, "method": "kde"},
]


def _beam():
    gen = torch.Generator().manual_seed(0)
    return sim.ParticleBeam(torch.randn(500, 6, generator=gen, dtype=F64) * 3e-4, p0c=20e6)


def _same_tracking(a, b, settings=None):
    beam = _beam()
    ra, rb = a(beam, settings=settings), b(beam, settings=settings)
    assert ra.images.keys() == rb.images.keys()
    torch.testing.assert_close(ra.beam.particles, rb.beam.particles, atol=0, rtol=0)
    for name in ra.images:
        torch.testing.assert_close(ra.images[name], rb.images[name], atol=0, rtol=0)


def test_to_list_round_trip():
    lattice = sim.Lattice.from_list(FULL)
    items = lattice.to_list()
    assert [i["name"] for i in items] == [i["name"] for i in FULL]
    for got, want in zip(items, FULL):
        assert got.keys() >= want.keys(), (got, want)
        defaults = sim.ELEMENT_TYPES[want["type"]].parameters_defaults
        for key in got.keys() - want.keys():  # parameters left at their defaults are written too
            assert got[key] == defaults[key], key
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-15), key
            else:
                assert got[key] == value, key
    again = sim.Lattice.from_list(items)
    assert again.to_list() == items
    _same_tracking(lattice, again, {"Q2.k1": torch.tensor([-3.0, 2.0], dtype=F64)})
    # the to_list output is plain data: it survives YAML and JSON
    assert yaml.safe_load(yaml.safe_dump(items)) == items
    assert json.loads(json.dumps(items)) == items


def test_from_list_fills_defaults_and_names():
    lattice = sim.Lattice.from_list([{"type": "Drift", "length": 1.0}, {"type": "Quadrupole", "length": 0.1}])
    items = lattice.to_list()
    assert items[0] == {"type": "Drift", "name": "Drift_0", "length": 1.0}
    assert items[1] == {"type": "Quadrupole", "name": "Quadrupole_1", "length": 0.1, "k1": 0.0, "tilt": 0.0,
                        "x_offset": 0.0, "y_offset": 0.0}


def test_from_file_yaml_and_json(tmp_path):
    text = """
- {type: Quadrupole, name: Q1, length: 0.1, k1: 0.0}
- {type: Drift, name: D1, length: 1.0}
- {type: Screen, name: OTR1, resolution: [100, 100], pixel_size: [1.0e-3, 1.0e-3]}
"""
    path = tmp_path / "lattice.yaml"
    path.write_text(text)
    lattice = sim.Lattice.from_file(path)
    assert [type(e).__name__ for e in lattice.elements] == ["Quadrupole", "Drift", "Screen"]
    assert lattice["OTR1"].resolution == (100, 100)
    assert lattice["D1"].length.item() == 1.0
    assert list(lattice.screens) == ["OTR1"]
    json_path = tmp_path / "lattice.json"
    json_path.write_text(json.dumps(sim.Lattice.from_list(FULL).to_list()))
    _same_tracking(sim.Lattice.from_file(str(json_path)), sim.Lattice.from_list(FULL))
    yaml_path = tmp_path / "full.yaml"
    yaml_path.write_text(yaml.safe_dump(FULL))
    assert sim.Lattice.from_file(yaml_path).to_list() == sim.Lattice.from_list(FULL).to_list()


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("items,match", [
    ([{"type": "Sextapole", "name": "S1", "length": 0.1}], r"unknown element type 'Sextapole'"),
    ([{"type": "Drift", "name": "D1", "length": -0.5}], r"D1: length must be >= 0"),
    ([{"type": "Quadrupole", "name": "Q1", "length": -0.1, "k1": 2.0}], r"Q1: length must be >= 0"),
    ([{"type": "Quadrupole", "name": "Q1", "length": 0.1, "k": 2.0}], r"Q1.*unknown parameter\(s\) \['k'\]"),
    ([{"type": "Drift", "name": "D1", "lenght": 1.0}], r"D1.*unknown parameter\(s\) \['lenght'\]"),
    ([{"type": "Drift", "name": "D1", "length": 1.0}, {"type": "Drift", "name": "D1", "length": 2.0}],
     r"element names must be unique; repeated: \['D1'\]"),
    ([{"type": "Drift", "name": "D1", "length": float("nan")}], r"D1: length must be finite"),
    ([{"type": "Screen", "name": "S", "pixel_size": [0.0, 1e-3]}], r"S: pixel_size must be positive"),
    ([{"type": "Screen", "name": "S", "method": "histogram"}], r"S: unknown method 'histogram'"),
    ([{"type": "Screen", "name": "S", "psf_sigma": [-1e-4, 0.0]}], r"S: psf_sigma must be >= 0"),
    ([{"name": "D1", "length": 1.0}], r"lattice entry 0 must be a mapping with a 'type'"),
    ({"type": "Drift"}, r"a lattice must be a list of elements"),
    ([{"type": "Drift", "name": "D1", "length": "long"}], r"D1: length must be a number or a list of numbers, got 'long'"),
])
def test_bad_lattices_raise_clear_errors(items, match):
    with pytest.raises(ValueError, match=match):
        sim.Lattice.from_list(items)


def test_exponent_floats_in_files(tmp_path):
    """`1e-3` (no dot: PyYAML's YAML 1.1 would read a string, JSON writers produce it) is a float."""
    path = tmp_path / "exp.yaml"
    path.write_text("- {type: Screen, name: S, resolution: [10, 8], pixel_size: [1e-4, 2E-4], psf_sigma: [5e-05, 0]}\n"
                    "- {type: Drift, name: D, length: 1e0}\n")
    lattice = sim.Lattice.from_file(path)
    assert lattice["S"].pixel_size.tolist() == [1e-4, 2e-4] and lattice["S"].psf_sigma.tolist() == [5e-5, 0.0]
    assert lattice["D"].length.item() == 1.0


def test_bad_lattice_files(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("type: Drift\nlength: 1.0\n")
    with pytest.raises(ValueError, match="a lattice file must hold a list of elements"):
        sim.Lattice.from_file(path)
    path.write_text("- {type: Drift, name: D1, length: -1.0}\n")
    with pytest.raises(ValueError, match="D1: length must be >= 0"):
        sim.Lattice.from_file(path)


@pytest.mark.parametrize("name,error,match", [
    ("Q9.k1", KeyError, r"setting 'Q9.k1': no element named 'Q9'"),
    ("Q1.k7", KeyError, r"setting 'Q1.k7': Quadrupole Q1 has no parameter 'k7'"),
    ("D1.k1", KeyError, r"setting 'D1.k1': Drift D1 has no parameter 'k1'"),
    ("Q1k1", ValueError, r"setting name 'Q1k1' must look like '<element name>.<parameter>'"),
])
def test_unknown_settings_raise_clear_errors(name, error, match):
    lattice = sim.Lattice.from_list(FULL)
    with pytest.raises(error, match=match):
        lattice(_beam(), settings={name: torch.tensor([1.0, 2.0], dtype=F64)})


def test_getitem_unknown_element():
    with pytest.raises(KeyError, match="no element named 'Q7'"):
        sim.Lattice.from_list(FULL)["Q7"]


def test_screen_rows_image_a_screen_only_where_it_is_read():
    lattice = sim.Lattice.from_list([
        {"type": "Quadrupole", "name": "Q", "length": 0.1},
        {"type": "Drift", "name": "D", "length": 1.0},
        {"type": "Screen", "name": "A", "resolution": [16, 12], "pixel_size": [1e-3, 1e-3]},
        {"type": "Screen", "name": "B", "resolution": [16, 12], "pixel_size": [1e-3, 1e-3]},
    ])
    beam = _beam()
    k1 = torch.tensor([-3.0, 0.0, 2.0, 5.0], dtype=F64)
    full = lattice(beam, {"Q.k1": k1}).images
    mask = torch.tensor([True, False, False, True])
    part = lattice(beam, {"Q.k1": k1}, screen_rows={"A": mask, "B": torch.tensor([2])}).images
    torch.testing.assert_close(part["A"], full["A"][mask], atol=0, rtol=0)
    torch.testing.assert_close(part["B"], full["B"][[2]], atol=0, rtol=0)
    with pytest.raises(KeyError, match=r"screen_rows names unknown screen\(s\) \['C'\]"):
        lattice(beam, {"Q.k1": k1}, screen_rows={"C": mask})
