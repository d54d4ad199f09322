"""`psr import` and image preprocessing (psr/data/images.py, preprocess.py, importer*.py), each against a known answer."""

import json
from pathlib import Path

import h5py
import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import torch
import yaml

import sim
from psr.data import preprocess as pp
from psr.data.checks import InputError
from psr.data.images import read_frames
from psr.data.importer import SaturationWarning, import_scan
from psr.data.scanfile import read_scan

LATTICE = [{"type": "Quadrupole", "name": "Q1", "length": 0.1, "k1": 0.0}, {"type": "Drift", "name": "D1", "length": 1.0},
           {"type": "Screen", "name": "YAG"}, {"type": "Drift", "name": "D2", "length": 0.5}, {"type": "Screen", "name": "OTR"}]
BELLA = Path(__file__).resolve().parents[1] / "data" / "bella_htu.import.yaml"


def gaussian(shape, row, col, sigma, peak=1000.0):
    """A Gaussian spot (H, W) centred at (row, col) [pixels]."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return peak * np.exp(-((rows - row) ** 2 + (cols - col) ** 2) / (2 * sigma**2))


def setup(folder: Path, frames: dict, table: list[dict], **config):
    """Write image files {name: array}, a settings.csv, the lattice and an import config; returns the config path."""
    for name, array in frames.items():
        if name.endswith(".npy"):
            np.save(folder / name, array)
        elif name.endswith((".tif", ".tiff")):
            tifffile.imwrite(folder / name, array, photometric="minisblack")
        else:
            iio.imwrite(folder / name, array)
    columns = list(table[0])
    lines = [",".join(columns)] + [",".join(str(row[c]) for c in columns) for row in table]
    (folder / "settings.csv").write_text("\n".join(lines) + "\n")
    (folder / "beam.lattice.yaml").write_text(yaml.safe_dump(LATTICE, sort_keys=False))
    base = {"output": "scan.h5", "lattice": "beam.lattice.yaml", "p0c": 50.0e6, "species": "electron", "charge": 0.0,
            "table": "settings.csv", "screens": {"YAG": {"pixel_size": [10e-6, 10e-6]}},
            "preprocess": {"crop": "auto", "pool": 1, "margin": 0.1}}
    for key, value in config.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    path = folder / "scan.import.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def simple(folder, n=3, **config):
    """n settings of Q1.k1, one 16-bit PNG each with a Gaussian spot."""
    frames = {f"f{i}.png": gaussian((40, 50), 20, 25, 3 + i).astype(np.uint16) for i in range(n)}
    table = [{"file": f"f{i}.png", "Q1.k1": float(i)} for i in range(n)]
    return setup(folder, frames, table, **config)


# --- reading -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, dtype, full_scale", [("a.png", np.uint8, 255), ("a.png", np.uint16, 65535),
                                                     ("a.tif", np.uint16, 65535), ("a.npy", np.float32, None)])
def test_read_2d_files_exactly(tmp_path, name, dtype, full_scale):
    image = (np.arange(12 * 7).reshape(12, 7) * (3 if dtype == np.uint8 else 700)).astype(dtype)
    setup(tmp_path, {name: image}, [{"file": name, "Q1.k1": 0}])
    frames = read_frames(tmp_path / name)
    assert frames.frames.shape == (1, 12, 7) and frames.full_scale == full_scale
    np.testing.assert_array_equal(frames.frames[0], image.astype(np.float64))


def test_read_3d_npy_stack_and_multipage_tiff(tmp_path):
    stack = np.random.default_rng(0).integers(0, 4000, size=(3, 6, 5)).astype(np.uint16)
    np.save(tmp_path / "s.npy", stack)
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack")
    for name in ("s.npy", "s.tif"):
        frames = read_frames(tmp_path / name)
        np.testing.assert_array_equal(frames.frames, stack.astype(np.float64))
        assert frames.full_scale == 65535


# --- preprocessing steps -----------------------------------------------------------------------------

@pytest.mark.parametrize("rotate", [0, 90, 180, 270])
@pytest.mark.parametrize("flip", ["none", "x", "y"])
def test_orientation_moves_a_bright_pixel_where_expected(rotate, flip):
    height, width, r, c = 5, 8, 1, 6
    frame = np.zeros((height, width))
    frame[r, c] = 1
    # numpy.rot90 turns counter-clockwise: row 0 of the result is the frame's last column
    expected, shape = {0: ((r, c), (height, width)), 90: ((width - 1 - c, r), (width, height)),
                       180: ((height - 1 - r, width - 1 - c), (height, width)), 270: ((c, height - 1 - r), (width, height))}[rotate]
    if flip == "x":
        expected = (expected[0], shape[1] - 1 - expected[1])
    elif flip == "y":
        expected = (shape[0] - 1 - expected[0], expected[1])
    out = pp.orient(frame, rotate, flip)
    assert out.shape == shape and tuple(np.argwhere(out)[0]) == expected
    assert pp.oriented_pixel_size((1.0, 2.0), rotate) == ((2.0, 1.0) if rotate in (90, 270) else (1.0, 2.0))


def test_dark_frames_averaged_and_subtracted():
    rng = np.random.default_rng(1)
    pattern = 50 + 20 * rng.random((30, 40))  # fixed-pattern pedestal of the camera
    beam = gaussian((30, 40), 15, 20, 4)
    darks = pattern + rng.normal(0, 2, size=(16, 30, 40))
    frame = beam + pattern + rng.normal(0, 2, size=(30, 40))
    residual = pp.subtract_dark(frame, darks) - beam
    assert abs(residual.mean()) < 0.2 and residual.std() < 2.5  # only the noise of one frame + 1/16 of one is left
    assert np.abs(frame - beam).mean() > 50


def test_median_filter_removes_hot_pixels():
    image = gaussian((40, 40), 20, 20, 6)
    hot = image.copy()
    hot[[3, 10, 30, 22], [5, 33, 8, 19]] = 60000
    filtered = pp.median_filter(hot, 3)
    assert filtered.max() < 1.01 * image.max()
    assert np.abs(filtered - image).max() < 0.06 * image.max()  # the smooth beam is nearly unchanged
    assert pp.median_filter(hot, 0) is hot


@pytest.mark.parametrize("method", ["triangle", "otsu"])
def test_threshold_removes_known_background(method):
    rng = np.random.default_rng(2)
    sigma, background, noise = 6.0, 200.0, 5.0
    beam = gaussian((120, 120), 60, 60, sigma, peak=3000)
    image = background + beam + rng.normal(0, noise, beam.shape)
    level = pp.threshold_value(image, method)
    assert background + 3 * noise < level < background + 3000
    out = pp.apply_threshold(image, method)
    rows, cols = np.mgrid[:120, :120]
    far = (rows - 60) ** 2 + (cols - 60) ** 2 > (5 * sigma) ** 2
    assert (out[far] == 0).all() and out.min() == 0
    row, col = pp.centroid(out)
    assert abs(row - 60) < 0.1 and abs(col - 60) < 0.1
    # the beam's rms size is that of the noise-free beam minus (level - background), within 2 %
    def rms(image):
        return np.sqrt((image.sum(axis=0) * (np.arange(120) - 60.0) ** 2).sum() / image.sum())

    assert abs(rms(out) / rms(np.clip(beam - (level - background), 0, None)) - 1) < 0.02
    if method == "triangle":  # just above the noise: the beam loses little of its rms size
        assert level < background + 10 * noise and abs(rms(out) / sigma - 1) < 0.08


def test_threshold_fraction_of_maximum_and_off():
    image = gaussian((30, 30), 15, 15, 4) + 10
    np.testing.assert_allclose(pp.apply_threshold(image, 0.2), np.clip(image - 0.2 * image.max(), 0, None))
    np.testing.assert_array_equal(pp.apply_threshold(image - 20, 0), np.clip(image - 20, 0, None))


def test_auto_crop_region_holds_the_beam_with_margin():
    sigma, margin = 5.0, 0.15
    images = np.stack([gaussian((100, 150), 40, 70, sigma), gaussian((100, 150), 60, 80, sigma)])
    images[0, 95, 5] = 1e-6  # a faint speck far away does not widen the region
    x0, x1, y0, y1 = pp.beam_region(images, margin=margin, tail=1e-4)
    q = 3.719 * sigma  # 1e-4 of a Gaussian lies beyond 3.719 sigma; pixel j spans [j - 1/2, j + 1/2]
    for (lo, hi), (start, stop) in ((( 70 - q, 80 + q), (x0, x1)), ((40 - q, 60 + q), (y0, y1))):
        first, end = round(lo), round(hi) + 1  # the pixels holding the quantiles, end exclusive
        grow = np.ceil(margin * (end - first))
        assert (start, stop) == (first - grow, end + grow)


def test_pool_conserves_sum_and_trims_far_ends():
    image = np.random.default_rng(3).random((2, 11, 9))
    pooled = pp.pool(image, 3)
    assert pooled.shape == (2, 3, 3)
    np.testing.assert_allclose(pooled.sum(axis=(1, 2)), image[:, :9, :9].sum(axis=(1, 2)))
    np.testing.assert_allclose(pooled[0, 1, 2], image[0, 3:6, 6:9].sum())
    assert pp.pool_factor(450, 180, "auto", 200) == 3 and pp.pool_region([5, 16, 0, 9], 3) == [5, 14, 0, 9]


# --- import end to end --------------------------------------------------------------------------------

def test_import_writes_images_settings_and_provenance(tmp_path):
    config = simple(tmp_path, preprocess={"pool": 2})
    result = import_scan(config)
    scan = read_scan(result.path)
    assert scan.setting_names == ["Q1.k1"] and scan.settings[:, 0].tolist() == [0.0, 1.0, 2.0]
    screen = scan.screens["YAG"]
    assert screen.images.ndim == 3 and screen.images.shape[0] == 3
    assert screen.pixel_size == (20e-6, 20e-6)  # pooled by 2
    raw = [gaussian((40, 50), 20, 25, 3 + i).astype(np.uint16).astype(float) for i in range(3)]
    for k in range(3):  # nearly all of the spot lies in the auto region: pooling and cropping keep the sum
        assert abs(screen.images[k].sum() / raw[k].sum() - 1) < 1e-3
    assert scan.provenance["import_yaml"] == config.read_text()
    versions = json.loads(scan.provenance["versions"])
    assert versions["numpy"] == np.__version__ and "scikit-image" in versions
    with h5py.File(result.path) as handle:
        assert handle["provenance"].attrs["import_yaml"] == config.read_text()


def test_calibration_of_raw_readings(tmp_path):
    frames = {f"f{i}.png": gaussian((30, 30), 15, 15, 3).astype(np.uint16) for i in range(3)}
    table = [{"file": f"f{i}.png", "I_amps": current} for i, current in enumerate((1.0, 1.5, 2.5))]
    config = setup(tmp_path, frames, table, calibration={"Q1.k1": {"column": "I_amps", "scale": 2.05, "offset": 0.066}})
    scan = read_scan(import_scan(config).path)
    np.testing.assert_allclose(scan.settings[:, 0], [2.05 * 1.0 + 0.066, 2.05 * 1.5 + 0.066, 2.05 * 2.5 + 0.066], rtol=1e-15)


@pytest.mark.parametrize("rotate, flip", [(0, "none"), (90, "x"), (270, "y")])
def test_geometry_puts_a_spot_at_its_physical_position(tmp_path, rotate, flip):
    x_spot, y_spot, pixel, (height, width) = 0.5e-3, -0.3e-3, 20e-6, (90, 120)
    # the camera's view in the contract orientation: pixel (i, j) at x = (j - (W-1)/2) dx, y = (i - (H-1)/2) dy
    view = gaussian((height, width), y_spot / pixel + (height - 1) / 2, x_spot / pixel + (width - 1) / 2, 3.0, peak=3e4)
    raw = view[:, ::-1] if flip == "x" else view[::-1] if flip == "y" else view  # undo the flip, then the rotation
    raw = np.rot90(raw, -rotate // 90)
    config = setup(tmp_path, {"cam.npy": raw}, [{"file": "cam.npy", "Q1.k1": 0.0}],
                   screens={"YAG": {"pixel_size": [pixel, pixel], "rotate": rotate, "flip": flip}}, preprocess={"pool": 3})
    scan = read_scan(import_scan(config).path)
    screen = sim.Lattice.from_list(scan.lattice).screens["YAG"]
    xs, ys = (c.numpy() for c in screen.pixel_centres(torch.zeros(1, dtype=torch.float64)))
    image = scan.screens["YAG"].images[0].astype(np.float64)
    x_mean = (image.sum(axis=0) @ xs) / image.sum()
    y_mean = (image.sum(axis=1) @ ys) / image.sum()
    assert abs(x_mean - x_spot) < 0.02 * pixel and abs(y_mean - y_spot) < 0.02 * pixel
    assert np.allclose(screen.pixel_size.numpy(), 3 * pixel) and image.shape[-1] < width // 3


def test_shots_aligned_on_their_mean_and_settings_centred(tmp_path):
    jitter = {0: [(0, 0), (2, -3), (-1.5, 1.25)], 1: [(4, 1), (1, -2), (-2, 0.5)]}
    frames, table = {}, []
    for k, offsets in jitter.items():
        stack = np.stack([gaussian((60, 70), 30 + dr + 3 * k, 35 + dc, 4) for dr, dc in offsets])
        frames[f"set{k}.npy"] = stack
        table.append({"file": f"set{k}.npy", "Q1.k1": float(k)})
    for mode in ("shots", "settings"):
        scan = read_scan(import_scan(setup(tmp_path, frames, table, preprocess={"align": mode, "crop": [0, 70, 0, 60]})).path)
        images = scan.screens["YAG"].images
        assert images.shape == (2, 3, 60, 70) and scan.screens["YAG"].aligned == mode
        centroids = np.array([[pp.centroid(image) for image in shots] for shots in images.astype(np.float64)])
        for k, offsets in jitter.items():
            mean = np.array([30 + 3 * k, 35.0]) + np.mean(offsets, axis=0)
            target = mean if mode == "shots" else np.array([31.5, 35.0]) + np.mean(sum(jitter.values(), []), axis=0)
            np.testing.assert_allclose(centroids[k], np.broadcast_to(target, (3, 2)), atol=0.01)


def test_several_screens_and_an_unmeasured_setting(tmp_path):
    frames = {f"{s}{i}.png": gaussian((30, 40), 15, 20, 3 + i).astype(np.uint16) for s in "ab" for i in range(3)}
    table = [{"file": f"a{i}.png", "screen": "YAG", "Q1.k1": float(i)} for i in range(3)]
    table += [{"file": f"b{i}.png", "screen": "OTR", "Q1.k1": float(i)} for i in (0, 2)]
    config = setup(tmp_path, frames, table, screens={"OTR": {"pixel_size": [5e-6, 5e-6]}})
    scan = read_scan(import_scan(config).path)
    otr = scan.screens["OTR"].images
    assert np.isnan(otr[1]).all() and not np.isnan(otr[[0, 2]]).any()
    assert scan.screens["YAG"].images.shape[0] == 3 and scan.screens["OTR"].pixel_size == (5e-6, 5e-6)


def test_saturation_warns_or_refuses(tmp_path):
    image = gaussian((30, 30), 15, 15, 3, peak=400).clip(0, 255).astype(np.uint8)
    assert (image == 255).sum() > 0
    config = setup(tmp_path, {"s.png": image}, [{"file": "s.png", "Q1.k1": 0}])
    with pytest.warns(SaturationWarning, match=r"s\.png: \d+ pixel\(s\) at the camera's full scale 255"):
        import_scan(config)
    config = setup(tmp_path, {"s.png": image}, [{"file": "s.png", "Q1.k1": 0}], output="refused.h5",
                   preprocess={"saturation": "error"})
    with pytest.raises(InputError, match=r"s\.png: \d+ pixel\(s\) at the camera's full scale"):
        import_scan(config)
    assert not (tmp_path / "refused.h5").exists()


# --- bad input: one line naming the file or row, nothing written ------------------------------------------

def _bad(tmp_path, case):
    if case == "missing file":
        return simple(tmp_path), lambda: (tmp_path / "f1.png").unlink(), r"settings\.csv line 3 \(f1\.png\): image file .* does not exist"
    if case == "not an image":
        return simple(tmp_path), lambda: (tmp_path / "f2.png").write_text("hello"), r"f2\.png: not a readable image"
    if case == "sizes differ":
        return simple(tmp_path), lambda: iio.imwrite(tmp_path / "f1.png", np.ones((20, 20), np.uint16)), \
            r"line 3 \(f1\.png\): image .* is 20x20 .*f0\.png on screen YAG is 40x50"
    if case == "unknown column":
        return simple(tmp_path, calibration={"Q1.length": {"column": "I_amps"}}), None, r"calibration\.Q1\.length: column 'I_amps' is not in the table"
    if case == "unknown setting":
        frames = {"f0.png": gaussian((30, 30), 15, 15, 3).astype(np.uint16)}
        return setup(tmp_path, frames, [{"file": "f0.png", "Q9.k1": 1.0}]), None, r"settings\.csv: setting 'Q9\.k1': no element named 'Q9'"
    if case == "empty image":
        return simple(tmp_path), lambda: iio.imwrite(tmp_path / "f2.png", np.zeros((40, 50), np.uint16)), \
            r"line 4 \(f2\.png\): image .* is empty after preprocessing"
    if case == "missing key":
        return simple(tmp_path, p0c=None), None, r"missing key\(s\) \['p0c'\]"
    if case == "unknown key":
        return simple(tmp_path, preprocess={"medain": 3}), None, r"preprocess: unknown key\(s\) \['medain'\]"
    if case == "bad rotate":
        return simple(tmp_path, screens={"YAG": {"pixel_size": [1e-5, 1e-5], "rotate": 45}}), None, r"screens\.YAG\.rotate must be one of"
    if case == "bad flip":
        return simple(tmp_path, screens={"YAG": {"pixel_size": [1e-5, 1e-5], "flip": "xy"}}), None, r"screens\.YAG\.flip must be one of"
    raise AssertionError(case)


BAD = ["missing file", "not an image", "sizes differ", "unknown column", "unknown setting", "empty image",
       "missing key", "unknown key", "bad rotate", "bad flip"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_clear_line_and_nothing_is_written(tmp_path, case):
    config, spoil, message = _bad(tmp_path, case)
    if spoil:
        spoil()
    with pytest.raises(InputError, match=message) as err:
        import_scan(config)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "scan.h5").exists() and not list(tmp_path.glob(".scan.h5.*"))


def test_cli_import_and_its_errors(tmp_path, capsys):
    from psr.cli import main

    config = simple(tmp_path)
    main(["import", "--config", str(config), "--output", str(tmp_path / "other.h5")])
    assert "wrote" in capsys.readouterr().out and read_scan(tmp_path / "other.h5").settings.shape == (3, 1)
    (tmp_path / "f0.png").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["import", "--config", str(config)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("psr import: error: ") and "f0.png" in error and "\n" not in error


# --- the real BELLA HTU images (../shared/data/bella_htu) ----------------------------------------------

def test_bella_import(tmp_path):
    config = yaml.safe_load(BELLA.read_text())
    table = BELLA.parent / config["table"]
    if not table.is_file():
        pytest.skip(f"shared data {table} is not beside this checkout")
    scan = read_scan(import_scan(BELLA, output=tmp_path / "bella.h5").path)
    currents = np.loadtxt(table, delimiter=",", skiprows=1, usecols=1)
    np.testing.assert_allclose(scan.settings[:, 0], 0.2998 * (2.9016 * currents + 0.093) / 0.105, rtol=1e-12)
    screen = scan.screens["CAM"]
    assert screen.images.shape[0] == 11 and screen.images.ndim == 3 and max(screen.images.shape[1:]) <= 200
    factor = screen.pixel_size[0] / 24.4e-6
    assert factor == pytest.approx(round(factor)) and round(factor) >= 2 and screen.pixel_size[0] == screen.pixel_size[1]
    assert (screen.images.reshape(11, -1).sum(axis=1) > 0).all() and scan.provenance["import_yaml"] == BELLA.read_text()
