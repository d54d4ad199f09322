"""openPMD-beamphysics particle I/O (psr.data.openpmd): layout, Bmad conversion, interoperability with beamphysics."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import sim
from psr.data.openpmd import read_openpmd, write_openpmd

pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # beamphysics import (matplotlib)

SHARED_EXAMPLE = Path(__file__).parents[2] / "shared/data/gpsr_example_4d.h5"
C_LIGHT = 299_792_458.0


def bmad_beam(n=2000, seed=0, pz_spread=1e-3, z_mean=3e-4):
    rng = np.random.default_rng(seed)
    scale = np.array([1e-3, 2e-4, 2e-3, 3e-4, 1e-3, pz_spread])
    particles = rng.standard_normal((n, 6)) * scale
    particles[:, 4] += z_mean
    return particles


def assert_bmad_close(actual, expected, rtol=1e-12):
    """Equal to `rtol` relative to each coordinate's scale."""
    scale = np.abs(expected).max(axis=0)
    assert np.all(np.abs(actual - expected) <= rtol * scale), np.abs(actual - expected).max(axis=0) / scale


# ----------------------------------------------------------------------------- the shared example


@pytest.fixture(scope="module")
def shared_example():
    if not SHARED_EXAMPLE.is_file():
        pytest.skip(f"shared example {SHARED_EXAMPLE} absent")
    return SHARED_EXAMPLE


@pytest.mark.parametrize("where", ["ground_truth", "ground_truth/electron"])
def test_shared_ground_truth_emittances(shared_example, where):
    with h5py.File(shared_example, "r") as handle:
        beam = read_openpmd(handle[where])
    assert beam.species == "electron"
    assert beam.particles.shape == (10_000, 6) and beam.particles.dtype == np.float64
    assert beam.charge == pytest.approx(1e-9)
    assert beam.p0c == pytest.approx(43.36e6, rel=1e-3)
    # t-coordinates (one time, positions z vary): z_bmad = z - mean z
    assert abs(beam.particles[:, 4].mean()) < 1e-15
    truth = sim.ParticleBeam(torch.as_tensor(beam.particles), p0c=beam.p0c)
    assert float(truth.emittance("x", normalized=True)) == pytest.approx(1.699e-4, rel=5e-3)
    assert float(truth.emittance("y", normalized=True)) == pytest.approx(9.075e-4, rel=5e-3)


# --------------------------------------------------------------------------------- layout, round trip


def test_file_layout(tmp_path):
    particles = bmad_beam(100)
    write_openpmd(tmp_path / "beam.h5", particles, p0c=10e6, charge=1e-12)
    with h5py.File(tmp_path / "beam.h5", "r") as handle:
        attrs = {k: v.decode() for k, v in handle.attrs.items()}
        assert attrs == {"basePath": "/", "particlesPath": "particles", "dataType": "openPMD",
                         "openPMD": "2.0.0", "openPMDextension": "BeamPhysics;SpeciesType"}
        bunch = handle["particles/electron"]
        assert bunch.attrs["speciesType"] == b"electron"
        assert bunch.attrs["numParticles"] == 100
        assert bunch.attrs["totalCharge"] == pytest.approx(1e-12)
        assert bunch.attrs["chargeUnitSI"] == 1.0
        for name in ("position/x", "position/y", "momentum/x", "momentum/y", "momentum/z", "time"):
            assert isinstance(bunch[name], h5py.Dataset) and bunch[name].shape == (100,)
        assert bunch["momentum/x"].attrs["unitSymbol"] == "eV/c"
        assert bunch["momentum/x"].attrs["unitSI"] == pytest.approx(5.344285992678308e-28)
        assert list(bunch["momentum/x"].attrs["unitDimension"]) == [1, 1, -1, 0, 0, 0, 0]
        assert bunch["time"].attrs["unitSymbol"] == "s"
        # constant components: groups with attrs value and shape
        for name, value in (("position/z", 0.0), ("weight", 1e-14), ("particleStatus", 1)):
            assert isinstance(bunch[name], h5py.Group)
            assert bunch[name].attrs["value"] == pytest.approx(value)
            assert tuple(bunch[name].attrs["shape"]) == (100,)
        assert bunch["weight"].attrs["unitSymbol"] == "C"


def test_round_trip_exact(tmp_path):
    particles = bmad_beam()
    write_openpmd(tmp_path / "beam.h5", particles, p0c=43e6, species="electron", charge=2e-10)
    beam = read_openpmd(tmp_path / "beam.h5", p0c=43e6, t_ref=0.0)
    assert_bmad_close(beam.particles, particles)
    assert (beam.p0c, beam.species, beam.charge) == (43e6, "electron", pytest.approx(2e-10))
    np.testing.assert_allclose(beam.weights, 1e-13)
    # defaults: p0c = mean momentum, t_ref = mean time (the z centroid is then lost)
    default = read_openpmd(tmp_path / "beam.h5")
    assert default.p0c == pytest.approx(43e6 * (1 + particles[:, 5].mean()), rel=1e-12)
    assert abs(np.average(default.particles[:, 4], weights=None)) < 1e-6 * particles[:, 4].std()


def test_write_into_groups_and_torch_input(tmp_path):
    particles = torch.as_tensor(bmad_beam(50), dtype=torch.float32).requires_grad_()
    with h5py.File(tmp_path / "two.h5", "w") as handle:
        write_openpmd(handle.create_group("truth"), particles, p0c=5e6, species="proton", charge=1e-15)
        write_openpmd(handle.create_group("other"), particles, p0c=5e6, species="positron")
    with h5py.File(tmp_path / "two.h5", "r") as handle:
        assert list(handle["truth"]) == ["proton"] and list(handle["other"]) == ["positron"]
        for group in (handle["truth"], handle["truth/proton"]):
            beam = read_openpmd(group, p0c=5e6, t_ref=0.0)
            assert beam.species == "proton" and beam.charge == pytest.approx(1e-15)
            assert_bmad_close(beam.particles, particles.detach().double().numpy(), rtol=1e-9)
        with pytest.raises(ValueError, match="not openPMD particle data"):
            read_openpmd(handle)  # the file root holds two unrelated groups, no openPMD attributes


def test_open_file_target_gets_root_attributes(tmp_path):
    with h5py.File(tmp_path / "beam.h5", "w") as handle:
        write_openpmd(handle, bmad_beam(20), p0c=1e6)
    with h5py.File(tmp_path / "beam.h5", "r") as handle:
        assert handle.attrs["particlesPath"] == b"particles"
        assert "particles/electron/position/x" in handle
        assert read_openpmd(handle).particles.shape == (20, 6)
        assert read_openpmd(handle["particles"]).particles.shape == (20, 6)


def test_constant_components_unit_scaling_and_offsets(tmp_path):
    """A hand-made bunch: positions in mm, momenta in SI, time constant (t-coordinates), offsets."""
    n, p0c = 4, 1e9
    ev = 1.602176634e-19 / C_LIGHT
    with h5py.File(tmp_path / "hand.h5", "w") as handle:
        handle.attrs.update({"basePath": "/", "particlesPath": "bunch/"})  # not the usual "particles"
        g = handle.create_group("bunch/proton")
        g.attrs["speciesType"] = "proton"
        g.attrs["totalCharge"] = 3.0
        g.attrs["chargeUnitSI"] = 1e-12
        g["position/x"] = np.array([1.0, -1.0, 2.0, 0.0])
        g["position/x"].attrs["unitSI"] = 1e-3
        g["position/z"] = np.array([0.1, 0.2, 0.3, 0.4])
        g["position/z"].attrs["unitSI"] = 1e-3
        g.create_group("position/y").attrs.update({"value": 0.5, "shape": (n,), "unitSI": 1e-3})
        g.create_group("positionOffset/y").attrs.update({"value": 1e-3, "shape": (n,), "unitSI": 1.0})
        g["momentum/x"] = np.array([1e6, 0.0, -1e6, 0.0]) * ev
        g["momentum/x"].attrs["unitSI"] = 1.0
        g.create_group("momentum/y").attrs.update({"value": 0.0, "shape": (n,)})
        g["momentum/z"] = np.array([1.0, 1.01, 0.99, 1.0]) * p0c * ev
        g["momentum/z"].attrs["unitSI"] = 1.0
        g.create_group("time").attrs.update({"value": 1e-9, "shape": (n,), "unitSI": 1.0})
    beam = read_openpmd(tmp_path / "hand.h5", p0c=p0c)
    assert beam.species == "proton" and beam.charge == pytest.approx(3e-12)
    np.testing.assert_allclose(beam.particles[:, 0], [1e-3, -1e-3, 2e-3, 0.0], rtol=1e-12)
    np.testing.assert_allclose(beam.particles[:, 2], 1.5e-3, rtol=1e-12)
    p = np.sqrt((np.array([1e6, 0, -1e6, 0])) ** 2 + (np.array([1.0, 1.01, 0.99, 1.0]) * p0c) ** 2)
    np.testing.assert_allclose(beam.particles[:, 1], [1e-3, 0, -1e-3, 0], rtol=1e-9)
    np.testing.assert_allclose(beam.particles[:, 5], p / p0c - 1, atol=1e-12)
    np.testing.assert_allclose(beam.particles[:, 4], np.array([0.1, 0.2, 0.3, 0.4]) * 1e-3 - 0.25e-3, atol=1e-15)
    np.testing.assert_allclose(beam.weights, 0.75e-12)  # no weight record: totalCharge / N


def test_reader_errors(tmp_path):
    with h5py.File(tmp_path / "bad.h5", "w") as handle:
        handle.create_group("nothing").attrs["yaml"] = "[]"
        species = handle.create_group("two")
        for name in ("electron", "positron"):
            write_openpmd(species, bmad_beam(5), p0c=1e6, species=name)
        broken = handle.create_group("broken")
        write_openpmd(broken, bmad_beam(5), p0c=1e6)
        del broken["electron/momentum/z"]
        odd = handle.create_group("odd")
        write_openpmd(odd, bmad_beam(5), p0c=1e6)
        odd["electron"].attrs["speciesType"] = "muon"
    with h5py.File(tmp_path / "bad.h5", "r") as handle:
        with pytest.raises(ValueError, match="not openPMD particle data"):
            read_openpmd(handle["nothing"])
        with pytest.raises(ValueError, match="several species"):
            read_openpmd(handle["two"])
        with pytest.raises(ValueError, match="'momentum/z' missing"):
            read_openpmd(handle["broken"])
        with pytest.raises(ValueError, match="unknown species 'muon'"):
            read_openpmd(handle["odd"])
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="cannot open as HDF5"):
        read_openpmd(tmp_path / "text.h5")


@pytest.mark.parametrize("bad, match", [
    (np.zeros((5, 5)), r"shape \(N, 6\)"),
    (np.full((5, 6), np.nan), "NaN"),
    (np.array([[0, 1.5, 0, 0, 0, 0.0]]), "no forward momentum"),
])
def test_failed_write_leaves_no_file(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        write_openpmd(tmp_path / "beam.h5", bad, p0c=1e6)
    assert list(tmp_path.iterdir()) == []


def test_bad_reference_or_charge_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match="p0c must be a positive"):
        write_openpmd(tmp_path / "beam.h5", bmad_beam(5), p0c=-1.0)
    with pytest.raises(ValueError, match="charge is a magnitude"):
        write_openpmd(tmp_path / "beam.h5", bmad_beam(5), p0c=1e6, charge=-1e-9)
    with pytest.raises(ValueError, match="unknown species"):
        write_openpmd(tmp_path / "beam.h5", bmad_beam(5), p0c=1e6, species="muon")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ beamphysics interop


@pytest.mark.parametrize("species, p0c", [("electron", 43e6), ("proton", 2e9), ("positron", 3e6)])
def test_beamphysics_reads_our_files(tmp_path, species, p0c):
    bp = pytest.importorskip("beamphysics")
    from beamphysics.interfaces.bmad import particlegroup_to_bmad

    particles = bmad_beam(1000, pz_spread=1e-2)
    write_openpmd(tmp_path / "beam.h5", particles, p0c=p0c, species=species, charge=5e-11)
    group = bp.ParticleGroup(str(tmp_path / "beam.h5"))
    assert group.species == species
    assert group.charge == pytest.approx(5e-11)
    assert len(group) == 1000
    np.testing.assert_allclose(group.x, particles[:, 0], rtol=1e-14)
    np.testing.assert_allclose(group.y, particles[:, 2], rtol=1e-14)
    np.testing.assert_allclose(group.px, particles[:, 1] * p0c, rtol=1e-14)
    np.testing.assert_allclose(group.py, particles[:, 3] * p0c, rtol=1e-14)
    p = (1 + particles[:, 5]) * p0c
    np.testing.assert_allclose(group.pz, np.sqrt(p**2 - (particles[:, 1] * p0c) ** 2 - (particles[:, 3] * p0c) ** 2),
                               rtol=1e-14)
    np.testing.assert_allclose(group.p, p, rtol=1e-14)
    bmad = particlegroup_to_bmad(group, p0c=p0c, tref=0.0)  # beamphysics' own conversion
    coords = np.stack([bmad[k] for k in ("x", "px", "y", "py", "z", "pz")], axis=-1)
    assert_bmad_close(coords[:, [0, 1, 2, 3, 5]], particles[:, [0, 1, 2, 3, 5]], rtol=1e-12)
    # z goes through t = -z / (beta c); beamphysics' masses (CODATA 2018 electron 510998.95069 eV, proton
    # 938272089.43 eV) differ from psr's by ~1e-9, which moves beta by ~1e-9 / gamma^2
    assert_bmad_close(coords[:, 4:5], particles[:, 4:5], rtol=1e-9)


@pytest.mark.parametrize("layout", ["z", "t"])
def test_we_read_beamphysics_files(tmp_path, layout):
    bp = pytest.importorskip("beamphysics")
    from beamphysics.interfaces.bmad import particlegroup_to_bmad

    rng = np.random.default_rng(1)
    n, p0c = 500, 8e6
    data = {
        "x": rng.normal(0, 1e-3, n), "y": rng.normal(0, 1e-3, n),
        "px": rng.normal(0, 1e3, n), "py": rng.normal(0, 2e3, n), "pz": rng.normal(p0c, 1e4, n),
        "z": np.zeros(n) if layout == "z" else rng.normal(0.5, 1e-3, n),
        "t": rng.normal(2e-9, 1e-12, n) if layout == "z" else np.full(n, 3e-9),
        "status": np.ones(n, dtype=int), "weight": np.full(n, 1e-15), "species": "electron",
    }
    group = bp.ParticleGroup(data=data)
    group.write(str(tmp_path / "bp.h5"))
    beam = read_openpmd(tmp_path / "bp.h5")
    assert beam.species == "electron" and beam.charge == pytest.approx(n * 1e-15)
    assert beam.p0c == pytest.approx(group["mean_p"], rel=1e-14)
    bmad = particlegroup_to_bmad(group)
    expected = np.stack([bmad[k] for k in ("x", "px", "y", "py", "z", "pz")], axis=-1)
    if layout == "t":  # t-coordinates: z_bmad = z - mean z (beamphysics' conversion assumes z-coordinates)
        expected[:, 4] = data["z"] - data["z"].mean()
    assert_bmad_close(beam.particles, expected, rtol=1e-10)


def test_layout_matches_beamphysics_writer(tmp_path):
    """Same tree, attributes and constant-component groups as ParticleGroup.write(path) of the same bunch."""
    bp = pytest.importorskip("beamphysics")
    write_openpmd(tmp_path / "ours.h5", bmad_beam(200), p0c=20e6, charge=1e-10)
    bp.ParticleGroup(str(tmp_path / "ours.h5")).write(str(tmp_path / "theirs.h5"))

    def tree(path):
        nodes = {}
        with h5py.File(path, "r") as handle:
            nodes["/"] = {k: v for k, v in handle.attrs.items()}
            handle.visititems(lambda name, node: nodes.__setitem__(
                name, (type(node).__name__, sorted(node.attrs), getattr(node, "dtype", None))))
        return nodes

    ours, theirs = tree(tmp_path / "ours.h5"), tree(tmp_path / "theirs.h5")
    assert ours.keys() == theirs.keys()
    for name in ours:
        if name == "/":
            assert {k: (type(v), v) for k, v in ours[name].items()} == {k: (type(v), v) for k, v in theirs[name].items()}
        else:
            assert ours[name] == theirs[name], name
