"""End to end: simulate a small non-Gaussian quad scan, reconstruct it through the CLI, compare with the truth."""

import json

import h5py
import numpy as np
import pytest
import yaml

from psr.cli import fit_cli
from psr.data.scanfile import read_scan
from psr.data.simulate import simulate
from psr.data.synthetic import SyntheticBeam

LATTICE = [
    {"type": "Quadrupole", "name": "Q1", "length": 0.1, "k1": 0.0},
    {"type": "Drift", "name": "D1", "length": 2.0},
    {"type": "Screen", "name": "YAG", "resolution": [64, 64], "pixel_size": [1.5e-4, 1.5e-4],
     "psf_sigma": [1.5e-4, 1.5e-4]},
]


@pytest.fixture(scope="module")
def small_scan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scan")
    lattice = folder / "lattice.yaml"
    lattice.write_text(yaml.safe_dump(LATTICE))
    beam = SyntheticBeam(emittance_x=1.7e-8, beta_x=6.0, alpha_x=1.5, emittance_y=1.3e-8, beta_y=4.0,
                         alpha_y=-1.0, nonlinear_xy=0.5, nonlinear_pxy=0.3)
    path = simulate(str(folder / "scan.h5"), str(lattice), {"Q1.k1": list(np.linspace(-10, 20, 12))},
                    p0c=60e6, beam=beam, n_particles=20_000, charge=1e-10, seed=3)
    return path


def test_simulated_scan_has_truth_and_images(small_scan):
    scan = read_scan(small_scan)
    assert scan.settings.shape == (12, 1)
    assert scan.screens["YAG"].images.shape == (12, 64, 64)
    assert scan.ground_truth.shape == (20_000, 6)
    # the truth is strongly non-Gaussian: the x-y banana correlates x with y^2
    gt = scan.ground_truth
    corr = np.corrcoef(gt[:, 0], gt[:, 2] ** 2)[0, 1]
    assert corr > 0.3


def test_fit_recovers_emittances(small_scan, tmp_path):
    cli = fit_cli(args=[
        "fit", "--config", "configs/quad_scan_4d.yaml",
        f"--data.path={small_scan}", "--data.steps_per_epoch=50", "--trainer.max_epochs=12",
        "--model.generator.init_args.n_particles=5000",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
    ])
    run_dir = cli.trainer.log_dir
    rows = json.loads(open(f"{run_dir}/emittances.json").read())
    for plane in ("x", "y"):
        assert abs(rows[f"norm_emit_{plane}"]["relative_error"]) < 0.05, rows
    for name in ("beam.h5", "images_YAG.png", "phase_space.png", "loss.png", "config.yaml"):
        assert (tmp_path / "quad_scan_4d").exists()
        assert __import__("os").path.exists(f"{run_dir}/{name}"), name
    with h5py.File(f"{run_dir}/beam.h5") as handle:
        assert handle.attrs["openPMD"] == b"2.0.0"


def test_beam_past_the_screen_edge_warns():
    from psr.data.datamodule import prepare_images
    from psr.data.scanfile import ScreenData

    images = np.zeros((2, 20, 20), dtype=np.float32)
    images[:, 8:12, 8:12] = 1.0
    prepare_images(ScreenData(images=images, pixel_size=(1e-3, 1e-3)), "S")  # well inside: silent
    images[1, :, 0] = 1.0
    with pytest.warns(UserWarning, match=r"screen S: .*image\(s\) \[1\]"):
        prepare_images(ScreenData(images=images, pixel_size=(1e-3, 1e-3)), "S")


def test_shots_are_averaged_and_missing_shots_ignored():
    from psr.data.datamodule import prepare_images
    from psr.data.scanfile import ScreenData

    images = np.zeros((3, 2, 10, 10), dtype=np.float32)
    images[:, 0, 4, 4] = 1.0
    images[:, 1, 5, 5] = 3.0
    images[1, 1] = np.nan  # one shot missing at setting 1
    images[2] = np.nan  # setting 2 not measured at all
    prepared, measured = prepare_images(ScreenData(images=images, pixel_size=(1e-3, 1e-3)), "S")
    assert measured.tolist() == [True, True, False]
    np.testing.assert_allclose(prepared[0, 4, 4], 0.25)  # (1 + 0) / 2 over (1 + 3) / 2
    np.testing.assert_allclose(prepared[1, 4, 4], 1.0)  # only the first shot counts
    assert prepared[2].sum() == 0


def test_simulate_from_an_openpmd_beam_file(tmp_path):
    from psr.data.openpmd import write_openpmd

    truth = SyntheticBeam(emittance_x=2e-8, beta_x=3.0, emittance_y=1e-8, beta_y=2.0).sample(3000, seed=5).numpy()
    write_openpmd(tmp_path / "truth.h5", truth, p0c=60e6, charge=1e-10)
    lattice = tmp_path / "lattice.yaml"
    lattice.write_text(yaml.safe_dump(LATTICE))
    path = simulate(str(tmp_path / "scan.h5"), str(lattice), {"Q1.k1": [0.0, 5.0]}, p0c=60e6,
                    beam_file=str(tmp_path / "truth.h5"), charge=1e-10)
    scan = read_scan(path)
    np.testing.assert_allclose(scan.ground_truth[:, :4], truth[:, :4], rtol=0, atol=1e-15)
    # the image centroid follows the beam: k1 = 0 leaves the centroid where the drift puts it
    image = scan.screens["YAG"].images[0]
    xs = (np.arange(64) - 31.5) * 1.5e-4
    centroid = (image.sum(axis=0) * xs).sum() / image.sum()
    expected = truth[:, 0].mean() + 2.1 * truth[:, 1].mean()
    assert abs(centroid - expected) < 2e-6
