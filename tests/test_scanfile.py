"""Scan data files (contract v1, psr.scanfile): round trips, the shared example, every validation error."""

import copy
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

import psr.data.scanfile
import sim
from psr.data.scanfile import ScanData, ScanFileError, ScreenData, read_scan, validate_scan, write_scan

SHARED_EXAMPLE = Path(__file__).parents[2] / "shared/data/gpsr_example_4d.h5"
K = 5

LATTICE = [
    {"type": "Quadrupole", "name": "Q1", "length": 0.1, "k1": 0.0},
    {"type": "Drift", "name": "D1", "length": 1.0},
    {"type": "Screen", "name": "OTR", "resolution": (12, 8), "pixel_size": (1e-3, 2e-3), "center": (1e-4, -2e-4)},
    {"type": "Quadrupole", "name": "Q2", "length": 0.1, "k1": 1.0},
    {"type": "Drift", "name": "D2", "length": 0.5},
    {"type": "Screen", "name": "YAG", "resolution": [10, 10], "pixel_size": [5e-4, 5e-4], "psf_sigma": [1e-4, 1e-4]},
]


def make_scan(seed=0) -> ScanData:
    """A valid scan: two screens (YAG with 3 shots per setting), background, mask, ground truth."""
    rng = np.random.default_rng(seed)
    otr = rng.random((K, 8, 12)).astype(np.float32)
    otr[1] = np.nan  # OTR not measured at setting 1
    yag = rng.random((K, 3, 10, 10)).astype(np.float32)
    yag[2, 1] = np.nan  # one missing shot
    truth = rng.standard_normal((300, 6)) * np.array([1e-3, 1e-4, 1e-3, 1e-4, 1e-3, 1e-3])
    return ScanData(
        lattice=copy.deepcopy(LATTICE),
        settings=np.stack([np.linspace(-5, 5, K), np.linspace(1, 2, K)], axis=-1),
        setting_names=["Q1.k1", "Q2.k1"],
        screens={
            "OTR": ScreenData(otr, pixel_size=(1e-3, 2e-3), center=(1e-4, -2e-4),
                              background=rng.random((8, 12)).astype(np.float32) * 0.1,
                              mask=(rng.random((8, 12)) > 0.2).astype(np.float32)),
            "YAG": ScreenData(yag, pixel_size=(5e-4, 5e-4)),
        },
        p0c=43.36e6, species="electron", charge=1e-9, ground_truth=truth,
    )


def assert_same_scan(a: ScanData, b: ScanData):
    assert sim.Lattice.from_list(a.lattice).to_list() == sim.Lattice.from_list(b.lattice).to_list()
    np.testing.assert_array_equal(a.settings, b.settings)
    assert b.settings.dtype == np.float64
    assert list(a.setting_names) == list(b.setting_names)
    assert (a.p0c, a.species, a.charge) == (b.p0c, b.species, b.charge)
    assert a.screens.keys() == b.screens.keys()
    for name in a.screens:
        sa, sb = a.screens[name], b.screens[name]
        assert sb.images.dtype == np.float32
        np.testing.assert_array_equal(sa.images, sb.images)  # NaNs compare equal
        assert tuple(sa.pixel_size) == tuple(sb.pixel_size) and tuple(sa.center) == tuple(sb.center)
        for key in ("background", "mask"):
            if getattr(sa, key) is None:
                assert getattr(sb, key) is None
            else:
                np.testing.assert_array_equal(getattr(sa, key), getattr(sb, key))
    if a.ground_truth is None:
        assert b.ground_truth is None
    else:
        scale = np.abs(a.ground_truth).max(axis=0)
        assert np.all(np.abs(b.ground_truth - a.ground_truth) <= 1e-12 * scale)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------- good files


@pytest.fixture(scope="module")
def shared_example():
    if not SHARED_EXAMPLE.is_file():
        pytest.skip(f"shared example {SHARED_EXAMPLE} absent")
    return read_scan(SHARED_EXAMPLE)


def test_shared_example(shared_example):
    scan = shared_example
    assert scan.setting_names == ["Q1.k1"]
    assert scan.settings.shape == (20, 1)
    assert scan.settings[0, 0] == pytest.approx(-25) and scan.settings[-1, 0] == pytest.approx(15)
    assert scan.screens["OTR"].images.shape == (20, 100, 100)
    assert scan.screens["OTR"].pixel_size == (1e-3, 1e-3)
    assert scan.species == "electron" and scan.p0c == pytest.approx(43.36e6, rel=1e-4)
    lattice = sim.Lattice.from_list(scan.lattice)
    assert lattice.screens["OTR"].resolution == (100, 100)
    assert yaml.safe_load(scan.lattice_yaml) == scan.lattice
    truth = sim.ParticleBeam(torch.as_tensor(scan.ground_truth), p0c=scan.p0c, species=scan.species)
    assert scan.ground_truth.shape == (10_000, 6)
    assert float(truth.emittance("x", normalized=True)) == pytest.approx(1.699e-4, rel=5e-3)
    assert float(truth.emittance("y", normalized=True)) == pytest.approx(9.075e-4, rel=5e-3)


def test_shared_example_rewrites_identically(shared_example, tmp_path):
    write_scan(tmp_path / "copy.h5", shared_example)
    assert_same_scan(shared_example, read_scan(tmp_path / "copy.h5"))


def test_round_trip(tmp_path):
    scan = make_scan()
    assert write_scan(tmp_path / "scan.h5", scan) == tmp_path / "scan.h5"
    assert leftovers(tmp_path) == ["scan.h5"]
    back = read_scan(tmp_path / "scan.h5")
    assert_same_scan(scan, back)
    assert back.screens["YAG"].images.shape == (K, 3, 10, 10)
    assert back.screens["OTR"].images.shape == (K, 8, 12)


def test_round_trip_minimal_and_other_species(tmp_path):
    scan = make_scan()
    scan.ground_truth = None
    scan.screens = {"YAG": ScreenData(np.ones((K, 10, 10), np.float32), pixel_size=(5e-4, 5e-4))}
    scan.species, scan.charge, scan.p0c = "proton", 0.0, 2e9
    write_scan(tmp_path / "scan.h5", scan)
    assert_same_scan(scan, read_scan(tmp_path / "scan.h5"))


def test_file_layout(tmp_path):
    write_scan(tmp_path / "scan.h5", make_scan())
    with h5py.File(tmp_path / "scan.h5", "r") as handle:
        assert handle.attrs["psr_format"] == "scan" and handle.attrs["psr_version"] == 1
        assert handle.attrs["p0c"] == 43.36e6 and handle.attrs["species"] == "electron"
        assert handle.attrs["charge"] == 1e-9
        assert yaml.safe_load(handle["lattice"].attrs["yaml"])[2]["resolution"] == [12, 8]
        assert handle["settings"].dtype == np.float64 and handle["settings"].shape == (K, 2)
        assert [n.decode() if isinstance(n, bytes) else n for n in handle["settings"].attrs["names"]] == ["Q1.k1", "Q2.k1"]
        otr = handle["screens/OTR"]
        assert otr["images"].dtype == np.float32
        np.testing.assert_array_equal(otr.attrs["pixel_size"], [1e-3, 2e-3])
        np.testing.assert_array_equal(otr.attrs["center"], [1e-4, -2e-4])
        assert otr["background"].shape == otr["mask"].shape == (8, 12)
        assert "background" not in handle["screens/YAG"]
        assert handle["ground_truth/electron"].attrs["numParticles"] == 300
        assert "ground_truth/electron/momentum/z" in handle


def test_lattice_yaml_accepts_numpy_and_tuples():
    scan = make_scan()
    scan.lattice[0]["k1"] = np.float64(2.5)
    scan.lattice[2]["pixel_size"] = np.array([1e-3, 2e-3])
    items = yaml.safe_load(scan.lattice_yaml)
    assert items[0]["k1"] == 2.5 and items[2]["pixel_size"] == [1e-3, 2e-3] and items[2]["resolution"] == [12, 8]


def test_small_disagreement_within_tolerance_is_accepted():
    scan = make_scan()
    scan.screens["OTR"].pixel_size = (1e-3 * (1 + 1e-12), 2e-3)
    validate_scan(scan)


# ------------------------------------------------------------------------------- invalid scan data


def _set(obj, attr, value):
    setattr(obj, attr, value)


def _nan_inside(scan):
    scan.screens["OTR"].images[3, 2, 5] = np.nan


def _nan_inside_shot(scan):
    scan.screens["YAG"].images[0, 2, 4, 4] = np.nan


BAD_SCANS = {
    "settings_1d": (lambda s: _set(s, "settings", s.settings[:, 0]), r"/settings must be 2-D"),
    "settings_k_mismatch": (lambda s: _set(s, "settings", s.settings[:-1]),
                            r"/screens/OTR/images has 5 setting\(s\) but /settings has 4"),
    "no_settings": (lambda s: _set(s, "settings", s.settings[:0]), r"holds no settings"),
    "names_count": (lambda s: _set(s, "setting_names", ["Q1.k1"]), r"2 column\(s\) but 1 name"),
    "repeated_names": (lambda s: _set(s, "setting_names", ["Q1.k1", "Q1.k1"]), r"names repeat"),
    "unknown_element": (lambda s: _set(s, "setting_names", ["Q1.k1", "Q9.k1"]),
                        r"unknown setting name: .*no element named 'Q9'"),
    "unknown_parameter": (lambda s: _set(s, "setting_names", ["Q1.k1", "Q2.k2"]),
                          r"unknown setting name: .*Quadrupole Q2 has no parameter 'k2'"),
    "malformed_name": (lambda s: _set(s, "setting_names", ["Q1.k1", "Q2k1"]),
                       r"unknown setting name: .*must look like '<element name>.<parameter>'"),
    "nan_setting": (lambda s: s.settings.__setitem__((2, 1), np.nan), r"/settings contains NaN or infinite values \(setting\(s\) \[2\]\)"),
    "inf_setting": (lambda s: s.settings.__setitem__((0, 0), np.inf), r"/settings contains NaN or infinite"),
    "nan_inside_image": (_nan_inside, r"/screens/OTR/images: NaN pixels inside measured image\(s\) at setting \[3\]"),
    "nan_inside_shot": (_nan_inside_shot, r"/screens/YAG/images: NaN pixels inside measured image\(s\) at \(setting, shot\) \[\(0, 2\)\]"),
    "all_nan": (lambda s: s.screens["OTR"].images.fill(np.nan), r"/screens/OTR/images: no image was measured"),
    "negative_pixels": (lambda s: s.screens["OTR"].images.__setitem__((0, 0, 0), -0.5), r"/screens/OTR/images contain negative pixels"),
    "infinite_pixels": (lambda s: s.screens["OTR"].images.__setitem__((0, 0, 0), np.inf), r"/screens/OTR/images contain infinite"),
    "image_shape_transposed": (lambda s: _set(s.screens["OTR"], "images", np.ones((K, 12, 8), np.float32)),
                               r"/screens/OTR/images are 12x8 \(H x W\) but the lattice's Screen OTR has resolution \[12, 8\]"),
    "image_not_3d_or_4d": (lambda s: _set(s.screens["OTR"], "images", np.ones((K, 96), np.float32)),
                           r"/screens/OTR/images must be \(K, H, W\) or \(K, S, H, W\)"),
    "pixel_size_mismatch": (lambda s: _set(s.screens["OTR"], "pixel_size", (1e-3, 1e-3)),
                            r"/screens/OTR: pixel_size \[0.001, 0.001\] disagrees with the lattice's Screen OTR pixel_size"),
    "pixel_size_slightly_off": (lambda s: _set(s.screens["OTR"], "pixel_size", (1e-3 * (1 + 1e-7), 2e-3)),
                                r"/screens/OTR: pixel_size .* disagrees"),
    "pixel_size_one_value": (lambda s: _set(s.screens["OTR"], "pixel_size", (1e-3,)), r"/screens/OTR: pixel_size .* disagrees"),
    "center_mismatch": (lambda s: _set(s.screens["YAG"], "center", (0.0, 1e-3)), r"/screens/YAG: center \[0.0, 0.001\] disagrees"),
    "screen_not_in_lattice": (lambda s: s.screens.__setitem__("CAM", s.screens["YAG"]),
                              r"/screens/CAM: the lattice has no Screen named 'CAM'; its screens: \['OTR', 'YAG'\]"),
    "screen_is_a_quadrupole": (lambda s: s.screens.__setitem__("Q1", s.screens["YAG"]),
                               r"/screens/Q1: the lattice has no Screen named 'Q1' \(Q1 is a Quadrupole\)"),
    "no_screens": (lambda s: _set(s, "screens", {}), r"/screens holds no screen"),
    "background_shape": (lambda s: _set(s.screens["OTR"], "background", np.zeros((12, 8))),
                         r"/screens/OTR/background must have shape \(H, W\) = \(8, 12\), got \(12, 8\)"),
    "mask_shape": (lambda s: _set(s.screens["YAG"], "mask", np.ones((10,))), r"/screens/YAG/mask must have shape"),
    "background_nan": (lambda s: s.screens["OTR"].background.__setitem__((0, 0), np.nan), r"/screens/OTR/background contains NaN"),
    "p0c_zero": (lambda s: _set(s, "p0c", 0.0), r"p0c must be a positive momentum in eV, got 0.0"),
    "p0c_negative": (lambda s: _set(s, "p0c", -1e6), r"p0c must be a positive momentum"),
    "p0c_not_a_number": (lambda s: _set(s, "p0c", "high"), r"p0c must be a number"),
    "unknown_species": (lambda s: _set(s, "species", "muon"), r"unknown species 'muon'"),
    "negative_charge": (lambda s: _set(s, "charge", -1e-9), r"charge is a magnitude in coulombs and must be >= 0"),
    "lattice_unknown_type": (lambda s: s.lattice.append({"type": "Wiggler", "name": "W1"}),
                             r"/lattice is not a valid lattice: .*unknown element type 'Wiggler'"),
    "lattice_negative_length": (lambda s: s.lattice[1].__setitem__("length", -1.0),
                                r"/lattice is not a valid lattice: .*D1: length must be >= 0"),
    "lattice_unknown_parameter": (lambda s: s.lattice[0].__setitem__("k9", 1.0),
                                  r"/lattice is not a valid lattice: .*unknown parameter"),
    "lattice_duplicate_names": (lambda s: s.lattice.append({"type": "Drift", "name": "D1", "length": 1.0}),
                                r"/lattice is not a valid lattice: .*unique"),
    "lattice_not_a_list": (lambda s: _set(s, "lattice", {"type": "Drift"}), r"/lattice is not a valid lattice: .*must be a list"),
    "ground_truth_shape": (lambda s: _set(s, "ground_truth", np.zeros((10, 5))), r"/ground_truth: particles must have shape \(N, 6\)"),
    "ground_truth_nan": (lambda s: s.ground_truth.__setitem__((0, 0), np.nan), r"/ground_truth: particles contain NaN"),
}


@pytest.mark.parametrize("case", BAD_SCANS)
def test_validation_error(case):
    scan = make_scan()
    mutate, match = BAD_SCANS[case]
    mutate(scan)
    with pytest.raises(ScanFileError, match=match):
        validate_scan(scan, "my scan")
    with pytest.raises(ValueError, match=r"^my scan: "):  # ScanFileError is a ValueError; message names the source
        validate_scan(scan, "my scan")


@pytest.mark.parametrize("case", ["settings_k_mismatch", "nan_inside_image", "pixel_size_mismatch",
                                  "unknown_parameter", "lattice_negative_length", "unknown_species"])
def test_failed_write_leaves_nothing(tmp_path, case):
    scan = make_scan()
    BAD_SCANS[case][0](scan)
    with pytest.raises(ScanFileError, match=BAD_SCANS[case][1]):
        write_scan(tmp_path / "scan.h5", scan)
    assert leftovers(tmp_path) == []


def test_failure_while_writing_leaves_nothing_and_keeps_old_file(tmp_path, monkeypatch):
    good = make_scan()
    write_scan(tmp_path / "scan.h5", good)
    before = (tmp_path / "scan.h5").read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(psr.data.scanfile, "write_bunch", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_scan(tmp_path / "scan.h5", make_scan(seed=1))
    with pytest.raises(RuntimeError, match="disk full"):
        write_scan(tmp_path / "other.h5", make_scan(seed=1))
    assert leftovers(tmp_path) == ["scan.h5"]  # no temporary file, no half-written other.h5
    assert (tmp_path / "scan.h5").read_bytes() == before
    assert_same_scan(good, read_scan(tmp_path / "scan.h5"))


# ------------------------------------------------------------------------------- invalid files


def _del(path):
    def mutate(handle):
        del handle[path]
    return mutate


def _del_attr(path, key):
    def mutate(handle):
        del handle[path].attrs[key]
    return mutate


def _set_attr(path, key, value):
    def mutate(handle):
        handle[path].attrs[key] = value
    return mutate


BAD_FILES = {
    "no_settings": (_del("settings"), r"scan.h5: /settings missing"),
    "no_images": (_del("screens/OTR/images"), r"/screens/OTR/images missing"),
    "no_screens": (_del("screens"), r"/screens missing"),
    "no_lattice": (_del("lattice"), r"/lattice missing"),
    "no_lattice_yaml": (_del_attr("lattice", "yaml"), r"attribute 'yaml' missing on /lattice"),
    "lattice_yaml_not_a_list": (_set_attr("lattice", "yaml", "type: Drift"), r"must hold a list of elements"),
    "lattice_yaml_broken": (_set_attr("lattice", "yaml", "- {type: Drift, length: [1.0"), r"not valid YAML"),
    "no_setting_names": (_del_attr("settings", "names"), r"attribute 'names' missing on /settings"),
    "no_format": (_del_attr("/", "psr_format"), r"attribute 'psr_format' missing on /"),
    "wrong_format": (_set_attr("/", "psr_format", "beam"), r"psr_format is 'beam', expected 'scan'"),
    "no_version": (_del_attr("/", "psr_version"), r"attribute 'psr_version' missing on /"),
    "future_version": (_set_attr("/", "psr_version", 2), r"psr_version 2 is not supported"),
    "no_p0c": (_del_attr("/", "p0c"), r"attribute 'p0c' missing on /"),
    "no_species": (_del_attr("/", "species"), r"attribute 'species' missing on /"),
    "no_charge": (_del_attr("/", "charge"), r"attribute 'charge' missing on /"),
    "no_pixel_size": (_del_attr("screens/OTR", "pixel_size"), r"attribute 'pixel_size' missing on /screens/OTR"),
    "no_center": (_del_attr("screens/OTR", "center"), r"attribute 'center' missing on /screens/OTR"),
    "pixel_size_in_file_disagrees": (_set_attr("screens/YAG", "pixel_size", [5e-4, 6e-4]), r"/screens/YAG: pixel_size .* disagrees"),
    "settings_names_in_file_wrong": (_set_attr("settings", "names", ["Q1.k1", "Q3.k1"]), r"no element named 'Q3'"),
    "negative_charge_in_file": (_set_attr("/", "charge", -1.0), r"charge is a magnitude"),
    "ground_truth_broken": (_del("ground_truth/electron/position/x"),
                            r"/ground_truth is not a valid openPMD bunch: .*'position/x' missing"),
    "ground_truth_species": (_set_attr("/", "species", "positron"), r"/ground_truth holds electrons but the file's species is 'positron'"),
    "screen_is_a_dataset": (lambda h: h.create_dataset("screens/CAM", data=[1.0]), r"/screens/CAM missing \(not a group\)"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_read_error(tmp_path, case):
    path = tmp_path / "scan.h5"
    write_scan(path, make_scan())
    mutate, match = BAD_FILES[case]
    with h5py.File(path, "r+") as handle:
        mutate(handle)
    with pytest.raises(ScanFileError, match=match):
        read_scan(path)


def test_read_missing_or_foreign_file(tmp_path):
    with pytest.raises(ScanFileError, match="no such file"):
        read_scan(tmp_path / "absent.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(ScanFileError, match="not an HDF5 file"):
        read_scan(tmp_path / "text.h5")
