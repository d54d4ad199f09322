"""`model.prior: auto`: a Gaussian from the images' second moments normalizes the flow and, widened,
is the maximum-entropy prior, so a max-ent fit of a beam of any size stays physical (issue 11)."""

import lightning as L
import numpy as np
import pytest
import torch
import yaml

import sim
from models import GaussianBeam, NormalizingFlowBeam
from psr.data.datamodule import ScanDataModule
from psr.data.simulate import simulate
from psr.data.synthetic import SyntheticBeam
from psr.training.callbacks import PenaltySchedule
from psr.training.prior import fit_second_moments, image_moments
from psr.training.reconstruction import PhaseSpaceReconstruction

P0C = 60e6
TWISS = {"emittance_x": 1.7e-8, "beta_x": 6.0, "alpha_x": 1.5, "emittance_y": 1.3e-8, "beta_y": 4.0, "alpha_y": -1.0}


def test_second_moment_fit_recovers_a_gaussian_beam():
    """Two screens (the second read at half of the settings, with a PSF and coarse pixels): the fitted
    mean and covariance are those of the true beam's particles."""
    lattice = sim.Lattice.from_list([
        {"type": "Quadrupole", "name": "Q1", "length": 0.1, "k1": 0.0},
        {"type": "Drift", "name": "D1", "length": 1.0},
        {"type": "Screen", "name": "A", "resolution": [120, 120], "pixel_size": [5e-5, 5e-5]},
        {"type": "Drift", "name": "D2", "length": 1.5},
        {"type": "Screen", "name": "B", "resolution": [100, 90], "pixel_size": [1.5e-4, 1.2e-4],
         "psf_sigma": [2e-4, 1e-4], "center": [3e-4, -2e-4]},
    ]).to(torch.float64)
    truth = SyntheticBeam(**TWISS, offset=[2e-4, -1e-5, -1e-4, 2e-5, 0, 0]).sample(200_000, seed=3)
    k1 = torch.linspace(-8.0, 16.0, 12, dtype=torch.float64)
    with torch.no_grad():
        images = lattice(sim.ParticleBeam(truth, P0C), {"Q1.k1": k1}).images
    measured = {"A": torch.ones(12, dtype=torch.bool), "B": torch.arange(12) % 2 == 0}
    mean, cov = fit_second_moments(lattice, ["Q1.k1"], k1[:, None], images, measured, P0C, n_dim=4)
    true_cov, rms = torch.cov(truth[:, :4].T), truth[:, :4].std(0)
    assert torch.allclose(cov.diagonal().sqrt() / rms, torch.ones(4, dtype=torch.float64), atol=0.02), cov.diagonal().sqrt() / rms
    correlation_error = (cov - true_cov) / rms[:, None] / rms[None, :]
    assert correlation_error.abs().max() < 0.03, correlation_error
    assert ((mean - truth[:, :4].mean(0)).abs() < 0.02 * rms).all(), (mean, truth[:, :4].mean(0))


def test_second_moment_fit_of_the_shipped_6d_scan():
    """6D, two screens each read at half of the settings, TDC and dipole tracked particle by particle
    (kick_drift, linearized by the fit): the non-Gaussian truth's rms sizes and correlations."""
    data = ScanDataModule("data/gpsr_6d.h5", val_every=8)
    data.setup()
    model = PhaseSpaceReconstruction(NormalizingFlowBeam(n_particles=10, n_dim=6, n_layers=1), entropy_penalty=1.0,
                                     prior="auto")
    model.configure_scan(data.scan)
    rows = torch.as_tensor(data.train_index)
    _, cov = fit_second_moments(model.lattice, model.setting_names, data.settings[rows],
                                {n: img[rows] for n, img in data.images.items()},
                                {n: flag[rows] for n, flag in data.measured.items()}, model.p0c, model.species, 6)
    truth = torch.as_tensor(data.scan.ground_truth)
    true_cov, rms = torch.cov(truth.T), truth.std(0)
    assert ((cov.diagonal().sqrt() / rms - 1).abs() < 0.04).all(), cov.diagonal().sqrt() / rms
    # the bent screen's images reach its frame, which the background cut then trims (0.075 without it)
    assert ((cov - true_cov) / rms[:, None] / rms[None, :]).abs().max() < 0.12


def test_background_noise_is_removed_before_the_moments():
    """Pixel noise over the whole screen (clipped at zero, as a camera gives) would swamp the second
    moments; after the background cut the rms sizes are those of the noise-free image within 10 %."""
    screen = sim.Screen(name="S", resolution=(80, 80), pixel_size=(1e-4, 1e-4))
    generator = torch.Generator().manual_seed(0)
    beam = torch.randn(100_000, 2, generator=generator, dtype=torch.float64) * torch.tensor([6e-4, 4e-4], dtype=torch.float64)
    clean = screen.image_xy(beam[:, 0], beam[:, 1])[None]
    noisy = (clean + 0.01 * clean.max() * torch.randn(clean.shape, generator=generator, dtype=torch.float64)).clamp(min=0)
    _, cov_clean = image_moments(clean, screen)
    _, cov_raw = image_moments_raw(noisy, screen)
    _, cov_noisy = image_moments(noisy, screen)
    assert (cov_raw.diagonal(dim1=-2, dim2=-1) > 1.3 * cov_clean.diagonal(dim1=-2, dim2=-1)).all()  # swamped
    ratio = (cov_noisy.diagonal(dim1=-2, dim2=-1) / cov_clean.diagonal(dim1=-2, dim2=-1)).sqrt()
    assert ((ratio > 0.9) & (ratio < 1.05)).all(), ratio  # rms sizes; the cut trims the tails a little


def image_moments_raw(images, screen):
    """Moments without the background cut (for comparison)."""
    from unittest import mock

    with mock.patch("psr.training.prior.without_background", lambda x: x):
        return image_moments(images, screen)


def test_auto_prior_is_checked():
    flow = NormalizingFlowBeam(n_particles=10, n_dim=4, n_layers=1, hidden_width=8)
    with pytest.raises(ValueError, match="auto"):
        PhaseSpaceReconstruction(flow, entropy_penalty=1.0, prior="gaussian")
    with pytest.raises(ValueError, match="prior_width"):
        PhaseSpaceReconstruction(flow, entropy_penalty=1.0, prior="auto", prior_width=0.0)
    with pytest.raises(ValueError, match="only used with"):
        PhaseSpaceReconstruction(flow, prior="auto")
    model = PhaseSpaceReconstruction(flow, entropy_penalty=1.0, prior="auto")
    assert isinstance(model.prior, GaussianBeam) and model.prior.n_dim == 4
    assert "prior_derived" in model.state_dict()  # checkpoints keep the derived prior


@pytest.fixture(scope="module")
def large_beam_scan(tmp_path_factory):
    """The issue's case, small: a beam twice the shipped example's size on a screen of coarse pixels."""
    folder = tmp_path_factory.mktemp("auto_prior")
    lattice = [
        {"type": "Quadrupole", "name": "Q1", "length": 0.1, "k1": 0.0},
        {"type": "Drift", "name": "D1", "length": 2.0},
        {"type": "Screen", "name": "YAG", "resolution": [48, 48], "pixel_size": [8e-4, 8e-4], "psf_sigma": [8e-5, 8e-5]},
    ]
    (folder / "lattice.yaml").write_text(yaml.safe_dump(lattice))
    twiss = dict(TWISS, emittance_x=4 * TWISS["emittance_x"], emittance_y=4 * TWISS["emittance_y"])
    beam = SyntheticBeam(**twiss, nonlinear_xy=0.5, nonlinear_pxy=0.3)
    path = simulate(str(folder / "scan.h5"), str(folder / "lattice.yaml"), {"Q1.k1": np.linspace(-10, 20, 7).tolist()},
                    p0c=P0C, beam=beam, n_particles=50_000, seed=1)
    return path, beam.sample(50_000, seed=1)


def shipped_max_ent_model(**generator_overrides) -> tuple[PhaseSpaceReconstruction, dict]:
    """The model of configs/quad_scan_4d_maxent.yaml (generator arguments overridden) and its config."""
    config = yaml.safe_load(open("configs/quad_scan_4d_maxent.yaml"))
    model = dict(config["model"])
    generator = NormalizingFlowBeam(**{**model.pop("generator")["init_args"], **generator_overrides})
    return PhaseSpaceReconstruction(generator, **model), config


def test_max_entropy_fit_of_a_large_beam_stays_physical(large_beam_scan, tmp_path):
    """The shipped max-ent setup with a hand scale 10x too large: the auto prior replaces it, and
    200 steps later every particle is finite, moves forward and the beam has the truth's size."""
    scan, truth = large_beam_scan
    model, config = shipped_max_ent_model(n_particles=1500, scale=[1e-2, 1e-3, 1e-2, 1e-3])
    assert model.auto_prior  # the shipped config derives its prior from the data
    schedule = dict(config["trainer"]["callbacks"][0]["init_args"], eval_particles=10_000, steps_per_stage=100)
    trainer = L.Trainer(max_steps=200, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[PenaltySchedule(**schedule)], num_sanity_val_steps=0)
    trainer.fit(model, datamodule=ScanDataModule(str(scan), val_every=0, steps_per_epoch=200))
    true_rms = truth[:, :4].std(0)
    prior_rms = (model.prior.cholesky @ model.prior.cholesky.T).diagonal().sqrt().double()
    ratio = prior_rms / (model.hparams.prior_width * true_rms)
    assert ((ratio > 1 / 1.3) & (ratio < 1.3)).all(), ratio
    model.eval()
    with torch.no_grad():
        particles = model.beam(20_000).particles.double()
    px, py, pz = particles[:, 1], particles[:, 3], particles[:, 5]
    assert torch.isfinite(particles).all()
    assert ((1 + pz) ** 2 > px**2 + py**2).all()
    rms_ratio = particles[:, :4].std(0) / true_rms
    assert ((rms_ratio > 0.7) & (rms_ratio < 1.4)).all(), rms_ratio
