"""Synthetic camera (psr/data/camera.py, `psr render-camera`) -> `psr import` -> `psr fit`, and the fit of images
centred at import (align: settings; psr/training/alignment.py)."""

import json

import numpy as np
import pytest
import torch
import yaml

import sim
from psr.cli import fit_cli, main
from psr.data import preprocess as pp
from psr.data.camera import overlap_matrix, render_camera
from psr.data.importer import import_scan
from psr.data.scanfile import read_scan
from psr.data.simulate import simulate
from psr.data.synthetic import SyntheticBeam
from psr.training.alignment import centre_on, image_centroids, shift_images

LATTICE = [{"type": "Quadrupole", "name": "Q1", "length": 0.1, "k1": 0.0}, {"type": "Drift", "name": "D1", "length": 2.0},
           {"type": "Screen", "name": "YAG", "resolution": [64, 64], "pixel_size": [1.5e-4, 1.5e-4],
            "psf_sigma": [1.5e-4, 1.5e-4]}]
CAMERA = dict(resolution=(320, 240), rotate=90, flip="none", peak_counts=50000.0, pedestal=100.0, pedestal_pattern=5.0,
              read_noise=5.0, hot_pixels=20, saturated_frames=2, saturation=1.5, shots=3, darks=4,
              preprocess={"max_pixels": 80})
QUIET = dict(peak_counts=6e4, gain=1e-4, pedestal=0.0, pedestal_pattern=0.0, read_noise=0.0, hot_pixels=0,
             saturated_frames=0, shots=1, darks=0, preprocess={"median": 0, "threshold": 0})


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """8 settings of a non-Gaussian 4D beam (x-y banana, nonlinear x-py), with the ground truth."""
    folder = tmp_path_factory.mktemp("clean")
    (folder / "lattice.yaml").write_text(yaml.safe_dump(LATTICE))
    beam = SyntheticBeam(emittance_x=1.7e-8, beta_x=6.0, alpha_x=1.5, emittance_y=1.3e-8, beta_y=4.0, alpha_y=-1.0,
                         nonlinear_xy=0.5, nonlinear_pxy=0.3)
    return simulate(str(folder / "scan.h5"), str(folder / "lattice.yaml"), {"Q1.k1": list(np.linspace(-8, 20, 8))},
                    p0c=60e6, beam=beam, n_particles=20_000, charge=1e-10, seed=3)


def moments(path) -> np.ndarray:
    """(K, 4): centroid x, y and rms x, y [m] of every setting's (shot-averaged) image, from the screen geometry."""
    scan = read_scan(path)
    screen = sim.Lattice.from_list(scan.lattice).screens["YAG"]
    xs, ys = (c.numpy() for c in screen.pixel_centres(torch.zeros(1, dtype=torch.float64)))
    images = np.asarray(scan.screens["YAG"].images, dtype=np.float64)
    images = images.mean(axis=1) if images.ndim == 4 else images
    px, py = images.sum(axis=1), images.sum(axis=2)
    px, py = px / px.sum(axis=1, keepdims=True), py / py.sum(axis=1, keepdims=True)
    mx, my = px @ xs, py @ ys
    return np.stack([mx, my, np.sqrt(px @ xs**2 - mx**2), np.sqrt(py @ ys**2 - my**2)], axis=1)


def test_overlap_resampling_conserves_intensity_and_position():
    edges_in, edges_out = np.linspace(-1.0, 1.0, 9), np.linspace(-1.5, 1.5, 61)
    density = np.array([0, 1, 3, 5, 4, 2, 1, 0], dtype=float)
    out = overlap_matrix(edges_out, edges_in) @ density
    assert out.sum() == pytest.approx(density.sum(), rel=1e-12)
    mean = lambda values, edges: values @ (edges[:-1] + edges[1:]) / 2 / values.sum()  # noqa: E731
    assert mean(out, edges_out) == pytest.approx(mean(density, edges_in), abs=1e-12)


@pytest.mark.parametrize("rotate, flip", [(90, "none"), (270, "x"), (0, "y")])
def test_import_undoes_the_camera_mounting(clean, tmp_path, rotate, flip):
    """Noise-free frames of a rotated/flipped camera with the beam moved by a known drift: the imported images
    have the clean images' sizes, and centroids moved by exactly that drift (sub-pixel)."""
    offset = 1e-4  # x and y [m] of every setting: jitter 0, drift from the seed below, checked against the moments
    config = render_camera(str(clean), str(tmp_path), resolution=(200, 150), rotate=rotate, flip=flip, drift=offset,
                           seed=5, **QUIET)
    drifts = offset * np.random.default_rng(5).standard_normal((8, 2))  # what render_camera draws first
    got, want = moments(import_scan(config).path), moments(clean)
    np.testing.assert_allclose(got[:, :2] - want[:, :2], drifts, atol=3e-6)  # 2 % of a 150 um clean pixel
    np.testing.assert_allclose(got[:, 2:] ** 2, want[:, 2:] ** 2 + (1.5e-4) ** 2 / 12, rtol=0.01)  # + a pixel's d^2/12


def test_noise_threshold_keeps_the_tails_that_a_level_cuts():
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[:240, :320]
    sigma_x, sigma_y = 20.0, 12.0
    beam = 800.0 * np.exp(-((cols - 160) ** 2 / (2 * sigma_x**2) + (rows - 120) ** 2 / (2 * sigma_y**2)))
    frame = beam + rng.normal(0, 3.0, beam.shape)  # a dark-subtracted frame: background 0 on average

    def rms_x(image):
        profile = image.sum(axis=0)
        mean = profile @ np.arange(320) / profile.sum()
        return np.sqrt(profile @ (np.arange(320) - mean) ** 2 / profile.sum())

    mask = pp.noise_mask(frame)
    far = (cols - 160) ** 2 / sigma_x**2 + (rows - 120) ** 2 / sigma_y**2 > 7**2  # beyond 7 sigma: noise only
    assert mask[(cols - 160) ** 2 / sigma_x**2 + (rows - 120) ** 2 / sigma_y**2 < 3**2].all() and mask[far].mean() < 0.01
    assert abs(rms_x(pp.apply_threshold(frame, "noise")) / sigma_x - 1) < 0.01
    assert rms_x(pp.apply_threshold(frame, "triangle")) / sigma_x - 1 < -0.02  # a level subtracted everywhere cuts


def test_shift_and_centre_on_are_exact_and_differentiable():
    rows, cols = np.mgrid[:30, :40]
    image = torch.tensor(np.exp(-((rows - 14.0) ** 2 + (cols - 17.0) ** 2) / 18.0))[None]
    whole = shift_images(image, torch.tensor([[2.0, -3.0]], dtype=torch.float64))
    torch.testing.assert_close(whole[0, 2:, :-3], image[0, :-2, 3:])
    shifts = torch.tensor([[0.3, 1.7]], dtype=torch.float64, requires_grad=True)
    moved = shift_images(image, shifts)
    torch.testing.assert_close(image_centroids(moved) - image_centroids(image), shifts.detach(), atol=1e-5, rtol=0)
    image_centroids(moved)[0, 1].backward()
    assert shifts.grad[0, 1].item() == pytest.approx(1.0, abs=1e-3)
    target = torch.roll(image, (3, -2), dims=(1, 2))
    torch.testing.assert_close(image_centroids(centre_on(image, target)), image_centroids(target), atol=1e-3, rtol=0)


def test_loss_ignores_centroids_of_a_centred_screen(clean, capsys):
    """With align: settings the mismatch of a beam does not change when the beam is moved; without, it does."""
    from models import GaussianBeam
    from psr.data.datamodule import ScanDataModule
    from psr.training.reconstruction import PhaseSpaceReconstruction

    data = ScanDataModule(str(clean), val_every=0)
    data.setup()
    batch = data.batch(np.arange(8))
    truth = torch.as_tensor(data.scan.ground_truth)
    moved = truth + torch.tensor([3e-4, 2e-5, -2e-4, 0.0, 0.0, 0.0], dtype=torch.float64)
    losses = {}
    for aligned in (None, "settings"):
        data.scan.screens["YAG"].aligned = aligned
        model = PhaseSpaceReconstruction(GaussianBeam(n_particles=10))
        model.configure_scan(data.scan)
        model.lattice = model.lattice.to(torch.float64)
        losses[aligned] = [model._loss(batch, sim.ParticleBeam(p, 60e6)).item() for p in (truth, moved)]
    assert "YAG: images centred at import (align: settings): the fit ignores" in capsys.readouterr().out
    print(losses)
    assert losses[None][1] > losses[None][0] + 0.5  # a 0.3 mm move is a large mismatch when centroids count
    # ... and only a bilinear shift's blur of images 1-2 pixels wide when centred
    assert abs(losses["settings"][1] - losses["settings"][0]) < 0.05 * (losses[None][1] - losses[None][0])


def _fit(path, folder, name) -> dict:
    cli = fit_cli(args=["fit", "--config", "configs/quad_scan_4d.yaml", f"--data.path={path}", "--seed_everything=7",
                        "--data.val_every=0", "--data.steps_per_epoch=50", "--trainer.max_epochs=5", "--model.generator.init_args.n_particles=3000",
                        f"--trainer.logger.init_args.save_dir={folder}", f"--trainer.logger.init_args.name={name}",
                        "--trainer.enable_progress_bar=false"])
    rows = json.loads(open(f"{cli.trainer.log_dir}/emittances.json").read())
    return {plane: rows[f"norm_emit_{plane}"] for plane in ("x", "y")}


def test_camera_frames_fit_like_the_clean_images(clean, tmp_path, capsys, one_thread):
    """All camera effects, 3 jittered shots, 2 saturated frames; imported (median 3, noise threshold, align shots,
    auto crop and pool); the fit matches the fit of the clean images and the truth. Then the same frames with a
    drift between settings, imported with align: settings: the fit ignores centroids and still matches."""
    config = render_camera(str(clean), str(tmp_path / "cam"), jitter=4e-5, seed=2, **CAMERA)
    with pytest.warns(UserWarning, match="saturated"):
        camera_scan = import_scan(config).path
    assert read_scan(camera_scan).screens["YAG"].images.shape[:2] == (8, 3)
    reference, camera = _fit(clean, tmp_path, "clean"), _fit(camera_scan, tmp_path, "camera")
    drifted_config = render_camera(str(clean), str(tmp_path / "drift"), jitter=4e-5, drift=3e-4, seed=2,
                                   **{**CAMERA, "preprocess": {"max_pixels": 80, "align": "settings"}})
    capsys.readouterr()
    main(["import", "--config", str(drifted_config)])
    drifted = _fit(drifted_config.with_name("camera.h5"), tmp_path, "drifted")
    assert "the fit ignores their centroids" in capsys.readouterr().out
    print({plane: (reference[plane], camera[plane]["reconstructed"], drifted[plane]["reconstructed"]) for plane in "xy"})
    # 250 steps of 3000 particles on 8 settings, pooled pixels of 160 um for a 150 um clean screen and waists of
    # 200 um: measured on 4 runs the camera fit was 5-10 % above the clean fit in x (3 % of it the saturated waist
    # frames), the drifted fit within 11 % of it; the full-size check is benchmarks/camera_pipeline.py
    for plane in ("x", "y"):
        truth, clean_fit = reference[plane]["true"], reference[plane]["reconstructed"]
        assert abs(clean_fit / truth - 1) < 0.08
        assert abs(camera[plane]["reconstructed"] / clean_fit - 1) < 0.13
        assert abs(camera[plane]["reconstructed"] / truth - 1) < 0.13
        assert abs(drifted[plane]["reconstructed"] / clean_fit - 1) < 0.13
        assert abs(drifted[plane]["reconstructed"] / truth - 1) < 0.13
