"""Maximum-entropy reconstruction (MENT-Flow's penalty method) on a case with a known answer.

A 4D Gaussian beam is seen through one quadrupole at two strengths only. Each image gives the joint
distribution of (x, y) at the screen, u_k = P_k X for setting k; the four rows of P = [P_1; P_2] are
independent, so the data fix the two 2D marginals of u = P X and nothing else. Of all beams with
those marginals, the one of largest entropy makes u_1 and u_2 independent:
H* = H(u_1) + H(u_2) - log|det P|, above the true beam's entropy by -1/2 sum log(1 - rho^2) over the
planes (rho: the correlation of a plane's two projections).
"""

import math

import numpy as np
import pytest
import torch
import yaml

import sim
from psr.training.callbacks import PenaltySchedule
from psr.outputs.entropy import knn_entropy
from psr.cli import fit_cli
from psr.training.reconstruction import PhaseSpaceReconstruction
from psr.data.simulate import simulate
from psr.data.synthetic import SyntheticBeam
from models import GaussianBeam, MLPBeamGenerator, NormalizingFlowBeam

P0C = 60e6
LATTICE = [
    {"type": "Quadrupole", "name": "Q1", "length": 0.1, "k1": 0.0},
    {"type": "Drift", "name": "D1", "length": 2.0},
    {"type": "Screen", "name": "YAG", "resolution": [96, 96], "pixel_size": [6e-5, 6e-5]},
]
K1 = [-5.0, 10.0]
TWISS = {"emittance_x": 1.7e-8, "beta_x": 6.0, "alpha_x": 1.5, "emittance_y": 1.3e-8, "beta_y": 4.0, "alpha_y": -1.0}


def gaussian_entropy(covariance: torch.Tensor) -> float:
    return 0.5 * (covariance.shape[0] * math.log(2 * math.pi * math.e) + torch.logdet(covariance).item())


def known_entropies() -> tuple[float, float]:
    """(entropy of the true beam, largest entropy consistent with the two images) [nats, Bmad units]."""
    covariance = torch.zeros(4, 4, dtype=torch.float64)
    for i, plane in enumerate("xy"):
        emit, beta, alpha = (TWISS[f"{key}_{plane}"] for key in ("emittance", "beta", "alpha"))
        covariance[2 * i:2 * i + 2, 2 * i:2 * i + 2] = emit * torch.tensor([[beta, -alpha], [-alpha, (1 + alpha**2) / beta]])
    lattice = sim.Lattice.from_list(LATTICE[:2]).to(torch.float64)
    rows = []
    for k1 in K1:
        m = torch.eye(6, dtype=torch.float64)
        for element in lattice.elements:
            overrides = {"k1": torch.tensor(k1, dtype=torch.float64)} if element.name == "Q1" else None
            m = element.transfer_map(P0C, "electron", m, overrides) @ m
        rows += [m[0, :4], m[2, :4]]
    p = torch.stack(rows)
    projected = [p[i:i + 2] @ covariance @ p[i:i + 2].T for i in (0, 2)]
    h_max = sum(gaussian_entropy(c) for c in projected) - torch.linalg.slogdet(p)[1].item()
    return gaussian_entropy(covariance), h_max


@pytest.fixture(scope="module")
def two_setting_scan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("maxent")
    (folder / "lattice.yaml").write_text(yaml.safe_dump(LATTICE))
    return simulate(str(folder / "scan.h5"), str(folder / "lattice.yaml"), {"Q1.k1": K1}, p0c=P0C,
                    beam=SyntheticBeam(**TWISS), n_particles=100_000, seed=2)


def fit(scan, tmp_path, name, extra):
    cli = fit_cli([
        "fit", "--config", "configs/quad_scan_4d_maxent.yaml", f"--data.path={scan}", "--data.val_every=0",
        "--data.steps_per_epoch=100", "--trainer.max_epochs=8", "--model.generator.init_args.n_particles=4000",
        "--model.generator.init_args.scale=[3e-4,1e-4,3e-4,1e-4]", f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.logger.init_args.name={name}", "--trainer.enable_progress_bar=false",
        "--model.prior=null", "--trainer.callbacks.init_args.stop_when_met=true",
        *extra])  # the known maximum is that of the plain (flat-prior) entropy; stop where D is met
    model, data = cli.model, cli.datamodule
    model.train()  # fresh particles for every draw, as in training
    with torch.no_grad():
        predicted = model.predict_images(data.settings, model.beam(100_000))["YAG"]
        per_image = (predicted - data.images["YAG"]).abs().sum((-1, -2)).numpy()
        entropy = model.relative_entropy(200_000)[1].item()
    return per_image, entropy, cli


def test_max_entropy_fit_reaches_the_known_maximum(two_setting_scan, tmp_path):
    h_true, h_max = known_entropies()
    assert h_max - h_true > 1.0  # the two images leave the beam far from determined
    plain_images, h_plain, _ = fit(two_setting_scan, tmp_path, "plain",
                                   ["--model.entropy_penalty=null", "--trainer.callbacks=[]"])
    threshold = 1.05 * float(plain_images.mean())
    maxent_images, h_maxent, cli = fit(two_setting_scan, tmp_path, "maxent",
                                       [f"--trainer.callbacks.init_args.threshold={threshold}"])
    print(f"\nentropy [nats]: truth {h_true:.3f}, maximum {h_max:.3f}, plain fit {h_plain:.3f}, "
          f"max-ent fit {h_maxent:.3f}; per-image l1 (100k particles): plain {plain_images}, max-ent {maxent_images}")
    # both reproduce every image to the noise floor (100k measured and 100k model particles)
    assert (maxent_images < 1.1 * plain_images + 0.01).all(), (maxent_images, plain_images)
    assert (maxent_images < 0.2).all(), maxent_images
    # the max-ent beam has the larger entropy, most of the way from the truth to the known maximum
    assert h_maxent > h_plain, (h_maxent, h_plain)
    assert h_true + 0.7 * (h_max - h_true) < h_maxent < h_max + 0.1, (h_true, h_max, h_maxent)
    # the GPSR-style MLP generator's plain fit (no density: the kNN estimate), and the kNN estimate of
    # the max-ent beam's own particles agreeing with its log-density estimate
    mlp = fit_cli(["fit", "--config", "configs/quad_scan_4d.yaml", f"--data.path={two_setting_scan}",
                   "--data.val_every=0", "--data.steps_per_epoch=100", "--trainer.max_epochs=4",
                   "--model.generator.init_args.n_particles=5000", "--model.generator.init_args.scale=[3e-4,1e-4,3e-4,1e-4]",
                   f"--trainer.logger.init_args.save_dir={tmp_path}",
                   "--trainer.enable_progress_bar=false"])
    h_mlp = knn_entropy(mlp.model.generator().detach()[:, :4])
    cli.model.eval()
    with torch.no_grad():
        h_maxent_knn = knn_entropy(cli.model.generator(20_000)[:, :4])
    print(f"MLP plain fit (kNN) {h_mlp:.3f}; max-ent fit by kNN {h_maxent_knn:.3f}")
    assert abs(h_maxent_knn - h_maxent) < 0.1, (h_maxent_knn, h_maxent)
    assert h_maxent > h_mlp, (h_maxent, h_mlp)
    schedule = next(c for c in cli.trainer.callbacks if isinstance(c, PenaltySchedule))
    penalties = [stage["penalty"] for stage in schedule.stages]
    assert penalties == sorted(penalties) and len(penalties) >= 1


def test_max_entropy_settings_are_checked():
    flow = NormalizingFlowBeam(n_particles=100, n_dim=4, n_layers=1, hidden_width=8)
    with pytest.raises(ValueError, match="log-density"):
        PhaseSpaceReconstruction(MLPBeamGenerator(n_particles=100), entropy_penalty=1.0)
    with pytest.raises(ValueError, match="entropy_penalty must be positive"):
        PhaseSpaceReconstruction(flow, entropy_penalty=0.0)
    with pytest.raises(ValueError, match="n_dim"):
        PhaseSpaceReconstruction(flow, entropy_penalty=1.0, prior=GaussianBeam(n_particles=10, n_dim=6))
    with pytest.raises(ValueError, match="only used with"):
        PhaseSpaceReconstruction(flow, prior=GaussianBeam(n_particles=10, n_dim=4))
    with pytest.raises(ValueError, match="threshold"):
        PenaltySchedule(threshold=0.0)
    with pytest.raises(ValueError, match="needs model.entropy_penalty"):
        PenaltySchedule(threshold=0.1).on_fit_start(None, PhaseSpaceReconstruction(flow))


def test_relative_entropy_to_a_gaussian_prior_is_minus_the_kl_divergence():
    """H[rho, prior] = -KL(rho || prior); for two Gaussians KL is closed-form."""
    beam = GaussianBeam(n_particles=200_000, n_dim=4, scale=[1e-3, 1e-4, 2e-3, 2e-4], seed=1)
    prior = GaussianBeam(n_particles=10, n_dim=4, scale=[2e-3, 1e-4, 1e-3, 3e-4])
    with torch.no_grad():
        beam.lower[1, 0], beam.lower[3, 2], beam.mean[0] = 0.6, -0.4, 5e-4
    model = PhaseSpaceReconstruction(beam, entropy_penalty=1.0, prior=prior)
    with torch.no_grad():
        _, estimate = model.relative_entropy()
        sigma = (beam.cholesky @ beam.cholesky.T).double()
        sigma_prior = (prior.cholesky @ prior.cholesky.T).double()
        inverse = torch.linalg.inv(sigma_prior)
        mean = beam.mean.double()
        kl = 0.5 * (torch.trace(inverse @ sigma) + mean @ inverse @ mean - 4
                    + torch.logdet(sigma_prior) - torch.logdet(sigma)).item()
    assert abs(estimate.item() + kl) < 0.02 * kl + 0.01, (estimate.item(), -kl)
    assert not any(p.requires_grad for p in prior.parameters())  # the prior stays fixed


def test_gaussian_beam_log_density_matches_its_samples():
    beam = GaussianBeam(n_particles=1000, n_dim=6, scale=1e-3)
    with torch.no_grad():
        beam.lower.normal_(0, 0.3)
        x, log_density = beam.sample_with_log_density()
        torch.testing.assert_close(beam.log_density(x), log_density, rtol=1e-4, atol=1e-3)
        reference = torch.distributions.MultivariateNormal(beam.mean, scale_tril=beam.cholesky).log_prob(x)
        torch.testing.assert_close(log_density, reference, rtol=1e-4, atol=1e-3)
    assert np.isfinite(log_density.numpy()).all()


def test_6d_max_entropy_config_runs_with_its_prior(tmp_path):
    """The shipped 6D max-ent config (flow + Gaussian prior) runs end to end; short, so no accuracy check."""
    cli = fit_cli(["fit", "--config", "configs/gpsr_6d_maxent.yaml", "--data.steps_per_epoch=20", "--trainer.max_epochs=2",
                   "--model.generator.init_args.n_particles=4000", "--trainer.callbacks.init_args.steps_per_stage=20",
                   "--trainer.callbacks.init_args.eval_particles=8000", f"--trainer.logger.init_args.save_dir={tmp_path}",
                   "--trainer.enable_progress_bar=false"])
    assert cli.model.prior is not None and cli.model.generator.n_dim == 6
    assert float(cli.model.penalty) == 80.0  # 20 -> 40 -> 80 at the ends of the two stages (D is far above threshold)
    rows = __import__("json").loads(open(f"{cli.trainer.log_dir}/emittances.json").read())
    assert math.isfinite(rows["entropy_nats"]["reconstructed"]) and "norm_emit_6d" in rows
