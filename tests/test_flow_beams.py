"""Beams with a log-density: the entropy estimate -mean(log density) against closed-form Gaussian
entropies, the flow's density against its samples, and the Gaussian beam."""

import math

import normflows as nf
import pytest
import torch

from models import GaussianBeam, NormalizingFlowBeam


def gaussian_entropy(covariance: torch.Tensor) -> float:
    n = covariance.shape[0]
    return 0.5 * (n * math.log(2 * math.pi * math.e) + torch.logdet(covariance.double()).item())


def random_covariance(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    sizes = torch.tensor([1e-3, 1e-4] * (n // 2), dtype=torch.float64)
    return sizes[:, None] * (a @ a.T / n + 0.5 * torch.eye(n, dtype=torch.float64)) * sizes[None, :]


@pytest.mark.parametrize("n_dim", [2, 4, 6])
def test_entropy_estimate_of_a_gaussian_flow_matches_the_closed_form(n_dim):
    """A flow of random linear (LU) layers (the splines taken out) is a Gaussian with
    covariance L A A^T L^T (A: the layers' product, L: the normalization from a full covariance
    estimate). -mean(log density) of its own samples matches the closed-form entropy within 2 % of the
    entropy in units of the beam's size (and within 0.02 nats)."""
    torch.manual_seed(n_dim)
    estimate_covariance = random_covariance(n_dim, seed=n_dim)
    flow = NormalizingFlowBeam(n_particles=200_000, n_dim=n_dim, n_layers=3, hidden_width=16,
                               covariance=estimate_covariance)
    flow.flows = torch.nn.ModuleList(nf.flows.LULinearPermute(n_dim) for _ in range(3))  # linear layers only
    with torch.no_grad():
        for p in flow.flows.parameters():
            p.add_(0.3 * torch.randn_like(p))
        probe = torch.cat([torch.zeros(1, n_dim), torch.eye(n_dim)])
        for layer in flow.flows:  # the flow is linear: push the unit vectors through it
            probe, _ = layer(probe)
        a = (probe[1:] - probe[:1]).T.double()
        covariance = flow.cholesky.double() @ a @ a.T @ flow.cholesky.double().T
        _, log_density = flow.sample_with_log_density()
    estimate, exact = -log_density.double().mean().item(), gaussian_entropy(covariance)
    normalized = exact - 0.5 * torch.logdet(estimate_covariance).item()
    assert abs(estimate - exact) < min(0.02 * abs(normalized), 0.02), (estimate, exact, normalized)


def test_flow_fitted_to_a_gaussian_estimates_its_entropy():
    """Maximum likelihood on 4000 samples of a correlated 2D Gaussian, normalized by a diagonal
    estimate only: the fitted flow's entropy estimate is within 2 % of the closed form (normalized)."""
    torch.manual_seed(0)
    covariance = random_covariance(2, seed=2)
    data = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), covariance).sample((4000,)).float()
    flow = NormalizingFlowBeam(n_particles=20_000, n_dim=2, n_layers=2, hidden_width=16, scale=data.std(0).tolist())
    optimizer = torch.optim.Adam(flow.parameters(), lr=5e-3)
    for _ in range(150):
        optimizer.zero_grad()
        (-flow.log_density(data).mean()).backward()
        optimizer.step()
    with torch.no_grad():
        _, log_density = flow.sample_with_log_density()
    estimate, exact = -log_density.mean().item(), gaussian_entropy(covariance)
    normalized = exact - torch.log(data.std(0).double()).sum().item()
    assert abs(estimate - exact) < 0.02 * abs(normalized), (estimate, exact, normalized)


@pytest.mark.parametrize("coupling", ["spline", "affine"])
def test_flow_log_density_is_a_normalized_density_of_its_samples(coupling):
    """The density the flow reports integrates to 1 (importance check against a wide Gaussian) and its
    inverse maps samples back (log_density(x) equals the density reported while sampling)."""
    torch.manual_seed(1)
    flow = NormalizingFlowBeam(n_particles=4000, n_dim=2, n_layers=2, hidden_width=16, scale=[1e-3, 1e-4],
                               coupling=coupling)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_((0.3 if coupling == "spline" else 0.15) * torch.randn_like(p))  # a non-Gaussian flow
        x, log_density = flow.sample_with_log_density()
        torch.testing.assert_close(flow.log_density(x), log_density, rtol=1e-4, atol=1e-3)
        wide = torch.distributions.Normal(torch.zeros(2), torch.tensor([4e-3, 4e-4]))
        points = wide.sample((200_000,))
        integral = torch.exp(flow.log_density(points) - wide.log_prob(points).sum(-1)).mean()
    assert integral.item() == pytest.approx(1.0, abs=0.03)


def test_gaussian_beam_entropy_and_samples():
    beam = GaussianBeam(n_particles=100_000, n_dim=6, scale=[1e-3, 1e-4, 2e-3, 1e-4, 1e-3, 1e-3])
    with torch.no_grad():
        beam.lower.normal_(0, 0.3)
        x, log_density = beam.sample_with_log_density()
    covariance = beam.cholesky.detach() @ beam.cholesky.detach().T
    assert beam.entropy().item() == pytest.approx(gaussian_entropy(covariance), abs=1e-4)
    assert -log_density.mean().item() == pytest.approx(beam.entropy().item(), abs=0.02)
    torch.testing.assert_close(torch.cov(x.T.double()), covariance.double(), rtol=0.03, atol=1e-3 * covariance.abs().max().item())
    assert beam().shape == (100_000, 6) and GaussianBeam(10, n_dim=4)().shape == (10, 6)


def test_bad_flow_settings():
    with pytest.raises(ValueError, match="n_dim must be 2, 4 or 6"):
        NormalizingFlowBeam(n_dim=5)
    with pytest.raises(ValueError, match="covariance must be symmetric positive definite"):
        NormalizingFlowBeam(n_dim=2, covariance=[[1.0, 2.0], [2.0, 1.0]])
    with pytest.raises(ValueError, match="scale must be one positive value or 4"):
        NormalizingFlowBeam(n_dim=4, scale=[1e-3, 1e-3])
    with pytest.raises(ValueError, match="unknown coupling"):
        NormalizingFlowBeam(n_dim=4, coupling="glow")


def test_resampling_flow_draws_fresh_particles_only_in_training():
    flow = NormalizingFlowBeam(n_particles=500, n_dim=4, n_layers=1, hidden_width=8, resample=True, coupling="affine")
    first, second = flow(), flow()
    assert first.shape == (500, 6) and not torch.equal(first, second)
    flow.eval()
    torch.testing.assert_close(flow(), flow())


@pytest.mark.parametrize("n_dim", [2, 4, 6])
def test_knn_entropy_matches_the_closed_form(n_dim):
    """The sample-only (Kozachenko-Leonenko) estimate used for generators without a density: within
    2 % of the entropy in units of the beam size, for correlated Gaussians of 20k particles."""
    from psr.outputs.entropy import knn_entropy

    covariance = random_covariance(n_dim, seed=10 + n_dim)
    samples = torch.distributions.MultivariateNormal(torch.zeros(n_dim, dtype=torch.float64), covariance).sample((20_000,))
    exact = gaussian_entropy(covariance)
    normalized = exact - 0.5 * torch.logdet(covariance).item()
    assert abs(knn_entropy(samples) - exact) < 0.02 * normalized


def test_knn_entropy_rejects_bad_particles():
    from psr.outputs.entropy import knn_entropy

    with pytest.raises(ValueError, match="NaN"):
        knn_entropy(torch.tensor([[0.0, 1.0], [float("nan"), 2.0]] * 5))
    with pytest.raises(ValueError, match="singular"):
        knn_entropy(torch.cat([torch.randn(100, 1), torch.zeros(100, 1)], 1))
