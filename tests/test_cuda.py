"""The CUDA path: tracking, screens and gradients on the GPU agree with the CPU; a fit runs on the GPU.

Skipped where no GPU is present (CI has none); run on a GPU machine with `pytest tests/test_cuda.py`.
"""

import json

import pytest
import torch

import sim
from psr.cli import fit_cli
from psr.data.synthetic import SyntheticBeam

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

TRUTH = SyntheticBeam(emittance_x=2e-9, beta_x=8.0, alpha_x=1.0, emittance_y=2e-9, beta_y=6.0,
                      nonlinear_xy=0.3, sigma_z=1e-3, sigma_pz=2e-3, chirp=-1.0, nonlinear_xz=0.2, tilt_yz=0.5)
SETTINGS = {"Q_SCAN.k1": torch.linspace(-5.0, 5.0, 4).repeat(2), "B1.angle": torch.tensor([0.0] * 4 + [0.349066] * 4)}


def track(device: str, dtype: torch.dtype, tracking: str):
    items = sim.lattice.load_lattice_text(open("data/gpsr_6d.lattice.yaml").read())
    for item in items:
        if item["type"] in ("Dipole", "TransverseDeflectingCavity"):
            item["tracking"] = tracking
    lattice = sim.Lattice.from_list(items).to(device=device, dtype=dtype)
    particles = TRUTH.sample(20_000, seed=0).to(device=device, dtype=dtype).requires_grad_(True)
    settings = {k: v.to(device=device, dtype=dtype) for k, v in SETTINGS.items()}
    out = lattice(sim.ParticleBeam(particles, 43e6, "electron"), settings)
    loss = 0.0
    for image in out.images.values():  # a weighted sum: every pixel's gradient enters
        weights = torch.linspace(0.0, 1.0, image[0].numel(), device=device, dtype=dtype).reshape(image.shape[1:])
        loss = loss + (image * weights).sum()
    (grad,) = torch.autograd.grad(loss, particles)
    return {k: v.detach().cpu() for k, v in out.images.items()}, grad.cpu()


@pytest.mark.parametrize("tracking", ["linear", "kick_drift"])
def test_cuda_matches_cpu_in_float64(tracking):
    images_cpu, grad_cpu = track("cpu", torch.float64, tracking)
    images_gpu, grad_gpu = track("cuda", torch.float64, tracking)
    for name in images_cpu:
        assert images_cpu[name].sum() > 0.5
        torch.testing.assert_close(images_gpu[name], images_cpu[name], rtol=0, atol=1e-10)
    torch.testing.assert_close(grad_gpu, grad_cpu, rtol=1e-8, atol=1e-10 * grad_cpu.abs().max().item())


def test_cuda_float32_close_to_float64():
    images64, _ = track("cuda", torch.float64, "kick_drift")
    images32, _ = track("cuda", torch.float32, "kick_drift")
    for name in images64:
        assert (images32[name].double() - images64[name]).abs().sum() < 1e-3


def fit_on_gpu(tmp_path, config: str, *overrides: str) -> dict:
    """`psr fit` of `config` on the GPU; the emittances.json rows."""
    cli = fit_cli(args=["fit", "--config", config, "--trainer.accelerator=gpu", *overrides,
                        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    assert cli.trainer.strategy.root_device.type == "cuda"
    return json.loads(open(f"{cli.trainer.log_dir}/emittances.json").read())


def test_fit_runs_on_gpu(tmp_path):
    rows = fit_on_gpu(tmp_path, "configs/gpsr_6d.yaml", "--data.steps_per_epoch=20", "--trainer.max_epochs=15",
                      "--model.generator.init_args.n_particles=20000")
    for plane in ("x", "y", "z"):  # 300 steps: far from converged, but the beam is on its way
        assert abs(rows[f"norm_emit_{plane}"]["relative_error"]) < 0.5, rows


def test_space_charge_on_cuda_matches_cpu():
    """The 3D space-charge kick (deposit, FFT convolution, gather) and its gradient, float64."""
    generator = torch.Generator().manual_seed(0)
    particles = torch.randn(50_000, 6, generator=generator, dtype=torch.float64) * 1e-3
    lattice = sim.Lattice.from_list([{"type": "Quadrupole", "name": "Q", "length": 0.2, "k1": 3.0},
                                     {"type": "Drift", "name": "D", "length": 0.5}],
                                    space_charge=sim.SpaceCharge((32, 32, 32), 0.1))
    results = []
    for device in ("cpu", "cuda"):
        x = particles.to(device).requires_grad_(True)
        k1 = torch.tensor([2.0, 4.0], dtype=torch.float64, device=device)
        out = lattice.to(device)(sim.ParticleBeam(x, 5e6, "electron", 1e-9), {"Q.k1": k1}).beam.particles
        (grad,) = torch.autograd.grad(out[..., 1].square().sum() + out[..., 5].square().sum(), x)
        results.append((out.detach().cpu(), grad.cpu()))
    (out_cpu, grad_cpu), (out_gpu, grad_gpu) = results
    torch.testing.assert_close(out_gpu, out_cpu, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(grad_gpu, grad_cpu, rtol=1e-7, atol=1e-9 * grad_cpu.abs().max().item())


def test_flow_beam_on_cuda_matches_cpu():
    """A normalizing-flow beam's particles and log-densities (fixed base samples) on the GPU equal the CPU's."""
    from models import NormalizingFlowBeam

    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        flow = NormalizingFlowBeam(n_particles=5000, n_dim=6, n_layers=3, hidden_width=16, coupling="affine").double()
        flow = flow.to(device).eval()
        x, log_density = flow.sample_with_log_density()
        results.append((x.detach().cpu(), log_density.detach().cpu()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-9, atol=1e-9)


def test_max_entropy_fit_runs_on_gpu(tmp_path):
    rows = fit_on_gpu(tmp_path, "configs/quad_scan_4d_maxent.yaml", "--data.steps_per_epoch=50", "--trainer.max_epochs=4",
                      "--trainer.callbacks.init_args.steps_per_stage=50")
    assert torch.isfinite(torch.tensor(rows["entropy_nats"]["reconstructed"]))
    assert abs(rows["norm_emit_x"]["relative_error"]) < 0.5, rows


def test_neural_elements_on_cuda_match_cpu():
    """A ResidualElement and a SectionMap (with random weights) track the same on the GPU as on the CPU."""
    from models import ResidualElement, SectionMap

    torch.manual_seed(0)
    residual = ResidualElement("Q1", {"type": "Quadrupole", "length": 0.1}, input_scales=[10.0]).double()
    section = SectionMap("SC", [{"type": "Drift", "name": "D1", "length": 1.0}], [1e-3] * 6).double()
    for element in (residual, section):
        with torch.no_grad():
            for parameter in element.parameters():
                parameter.normal_(0, 0.2)
    lattice = sim.Lattice([residual, section])
    particles = TRUTH.sample(5000, seed=1).double()
    k1 = torch.linspace(-5.0, 5.0, 3, dtype=torch.float64)
    cpu = lattice(sim.ParticleBeam(particles, 43e6), {"Q1.k1": k1}).beam.particles
    gpu = lattice.to("cuda")(sim.ParticleBeam(particles.cuda(), 43e6), {"Q1.k1": k1.cuda()}).beam.particles
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-9, atol=1e-15)
