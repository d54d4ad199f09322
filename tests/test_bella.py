"""Real camera images (BELLA HTU quadrupole scan, ../shared/data/bella_htu/): `psr import` with the shipped
config, then a short `psr fit` of configs/bella_htu.yaml (every second setting held out)."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

import sim
from models import MLPBeamGenerator
from psr.cli import fit_cli, main
from psr.data.scanfile import read_scan

FRAMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "bella_htu"
pytestmark = pytest.mark.skipif(not FRAMES.is_dir(), reason="../shared/data/bella_htu is missing")


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    path = tmp_path_factory.mktemp("bella") / "bella_htu.h5"
    try:
        main(["import", "--config", "data/bella_htu.import.yaml", "--output", str(path)])
    except SystemExit as exit_info:
        assert exit_info.code in (0, None)
    return path


def row_edges(screen: dict, height: int) -> np.ndarray:
    """y [m] of the lower edge of every image row and of the top edge of the last (height + 1)."""
    return screen["center"][1] + (np.arange(height + 1) - height / 2) * screen["pixel_size"][1]


def test_aperture_sits_at_the_edge_that_clips_the_images(scan):
    """The lattice's aperture keeps y < edge; the clipped settings (last lit row the same in each) end in the row
    that holds the edge, the others end below it."""
    data = read_scan(scan)
    images = data.screens["CAM"].images
    screen = next(item for item in data.lattice if item["type"] == "Screen")
    aperture = next(item for item in data.lattice if item["type"] == "Aperture")
    edge = aperture["y_offset"] + aperture["y_max"]
    edges = row_edges(screen, images.shape[1])
    last = np.array([np.nonzero(image.sum(axis=1))[0].max() for image in images])
    clipped = last == last.max()
    assert clipped.sum() >= 3 and clipped[-1]  # the strongest settings are cut by one straight edge
    assert edges[last.max()] < edge < edges[last.max() + 1]
    assert (edges[last[~clipped] + 1] < edge).all()


def test_short_fit_predicts_held_out_images_better_than_the_untrained_beam(scan, tmp_path, one_thread):
    """200 steps of 2000 particles: finite losses and beam, held-out mismatch well under the initial beam's; the
    fit's aperture keeps the particles below the edge (counted on a beam 3x wider in y), nothing at weak settings."""
    cli = fit_cli(args=["fit", "--config", "configs/bella_htu.yaml", f"--data.path={scan}",
                        "--data.steps_per_epoch=50", "--trainer.max_epochs=4", "--model.generator.init_args.n_particles=2000",
                        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    model, data = cli.model, cli.datamodule
    with open(Path(cli.trainer.log_dir) / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    train = [float(r["train_loss"]) for r in rows if r["train_loss"]]
    val = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert len(val) == 4 and np.isfinite(train).all() and np.isfinite(val).all()
    assert list(data.val_index) == [1, 3, 5, 7, 9]

    batch = data.batch(data.val_index)
    init_args = cli.config["fit"]["model"]["generator"]["init_args"]
    torch.manual_seed(0)
    untrained = MLPBeamGenerator(**{**dict(init_args), "n_particles": 2000})
    with torch.no_grad():
        fitted_beam = model.beam()
        assert torch.isfinite(fitted_beam.particles).all()
        held_out = model._loss(batch).item()
        initial = model._loss(batch, sim.ParticleBeam(untrained(), model.p0c, model.species, model.charge)).item()
        k1 = {"EMQ3.k1": data.settings[:, 0].to(fitted_beam.particles.dtype)}
        survival = model.lattice(fitted_beam, k1).beam.surviving_fraction()
        # the fitted beam 3x wider in y: the fit's lattice keeps exactly the particles below the edge at the screen
        particles = fitted_beam.particles.clone()
        particles[:, 2:4] = 3 * (particles[:, 2:4] - particles[:, 2:4].mean(0)) + particles[:, 2:4].mean(0)
        wide = fitted_beam.with_particles(particles)
        items = [dict(item, tracking="chromatic") if item["name"] == "EMQ3" else item
                 for item in data.scan.lattice if item["type"] != "Aperture"]
        y = sim.Lattice.from_list(items)(wide, k1).beam.particles[..., 2]
        aperture = next(item for item in data.scan.lattice if item["type"] == "Aperture")
        counted = (y < aperture["y_offset"] + aperture["y_max"]).to(y.dtype).mean(-1)
        wide_survival = model.lattice(wide, k1).beam.surviving_fraction()
    print(f"train {train[-1]:.3f}, held out {held_out:.3f} (val_loss {val[-1]:.3f}), untrained beam {initial:.3f}; "
          f"survival {survival.numpy().round(3)}, 3x wider in y {wide_survival.numpy().round(3)}")
    assert abs(held_out - val[-1]) < 0.02 * val[-1]
    assert held_out < 0.6 * initial
    assert ((survival > 0) & (survival <= 1)).all() and (survival[:5] > 0.99).all()  # weak settings: far from the edge
    assert torch.allclose(wide_survival, counted) and wide_survival[-1] < 0.95 and (wide_survival > 0).all()
