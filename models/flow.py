"""Beams with a log-density: a normalizing flow (normflows) and a parametric Gaussian.

Both return particles from fixed base samples (a deterministic function of the weights, like
`MLPBeamGenerator`) and, from `sample_with_log_density`, the log-density of each particle in
physical Bmad coordinates, which the entropy estimate -mean(log density) needs.
"""

import math
from collections.abc import Sequence

import normflows as nf
import torch
from torch import nn

from .generator import draw_base_samples, per_coordinate_scale, resample_stream


COUPLINGS = ("spline", "affine")
AFFINE_BOUND = 3.0  # largest shift and log-scale of one affine coupling layer (normalized units)


def _normalization(n_dim: int, scale, covariance) -> torch.Tensor:
    """Lower-triangular L (n_dim, n_dim) with L L^T the covariance estimate (from `covariance`, or a
    diagonal from `scale`: one value or one per coordinate)."""
    if covariance is not None:
        covariance = torch.as_tensor(covariance, dtype=torch.float64)
        if covariance.shape != (n_dim, n_dim):
            raise ValueError(f"covariance must be {n_dim} x {n_dim}, got {tuple(covariance.shape)}")
        try:
            return torch.linalg.cholesky(covariance).float()
        except RuntimeError:
            raise ValueError("covariance must be symmetric positive definite") from None
    return torch.diag(per_coordinate_scale(scale, n_dim))


def _standard_normal_log_density(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (z.square().sum(-1) + z.shape[-1] * math.log(2 * math.pi))


def as_particles(coords: torch.Tensor) -> torch.Tensor:
    """(N, n) -> (N, 6) Bmad coordinates, those after the first n set to 0 (n = 4: z = pz = 0)."""
    missing = 6 - coords.shape[-1]
    return coords if missing == 0 else torch.cat([coords, coords.new_zeros(coords.shape[0], missing)], -1)


class NormalizingFlowBeam(nn.Module):
    """A beam from a normalizing flow: base normal samples through `n_layers` rational-quadratic
    spline coupling layers (normflows; sampling is their fast direction) with learned linear mixing
    (LU) between them, then x = mean + L u with L L^T a covariance estimate, so the splines (which act
    on [-tail_bound, tail_bound]) work in units of the beam's size.

    n_dim: 4 (x, px, y, py; z = pz = 0) or 6. scale [m, 1]: one value or one per coordinate (a diagonal
    covariance estimate), or covariance: a full (n_dim, n_dim) estimate. hidden_width, num_blocks:
    the coupling networks. seed: the base samples (and the stream of resampled ones). resample: in
    training mode draw fresh base samples at every call (MENT-Flow does: fixed samples let a
    maximum-entropy fit shape the particles to the pixel noise of the measured images, which lowers
    its entropy); evaluation mode always
    uses the fixed samples. coupling: "spline" (rational-quadratic splines, the more flexible) or
    "affine" (Real NVP shift and scale, bounded per layer by tanh; ~8x faster on a CPU, use more layers).
    """

    def __init__(self, n_particles: int = 10_000, n_dim: int = 6, n_layers: int = 6, hidden_width: int = 64,
                 num_blocks: int = 2, num_bins: int = 8, tail_bound: float = 4.0,
                 scale: float | Sequence[float] = 1e-3, covariance=None, mean: Sequence[float] | None = None,
                 seed: int = 0, resample: bool = False, coupling: str = "spline"):
        super().__init__()
        if n_dim not in (2, 4, 6):
            raise ValueError(f"n_dim must be 2, 4 or 6, got {n_dim}")
        if n_particles < 2 or n_layers < 1:
            raise ValueError(f"n_particles must be >= 2 and n_layers >= 1, got {n_particles}, {n_layers}")
        self.n_dim, self.seed, self.resample = n_dim, seed, resample
        self._rng: torch.Generator | None = None
        if coupling not in COUPLINGS:
            raise ValueError(f"unknown coupling {coupling!r}; use one of {COUPLINGS}")
        layers = []
        for i in range(n_layers):
            if coupling == "spline":
                layers.append(nf.flows.CoupledRationalQuadraticSpline(
                    n_dim, num_blocks, hidden_width, num_bins=num_bins, tail_bound=tail_bound, reverse_mask=bool(i % 2)))
            else:
                half = n_dim // 2
                net = nf.nets.MLP([half] + [hidden_width] * (num_blocks + 1) + [2 * (n_dim - half)], leaky=0.01,
                                  output_fn="tanh", output_scale=AFFINE_BOUND, init_zeros=True)
                layers += [nf.flows.AffineCouplingBlock(net, scale_map="exp"), nf.flows.Permute(n_dim, mode="swap")]
            layers.append(nf.flows.LULinearPermute(n_dim))
        self.flows = nn.ModuleList(layers)
        self.register_buffer("cholesky", _normalization(n_dim, scale, covariance))
        mean = torch.zeros(n_dim) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        if mean.shape != (n_dim,):
            raise ValueError(f"mean must have {n_dim} values, got {tuple(mean.shape)}")
        self.register_buffer("mean", mean)
        self.register_buffer("base_samples", self._draw(n_particles, seed))

    def _draw(self, n: int, seed: int) -> torch.Tensor:
        return draw_base_samples(n, self.n_dim, seed)

    @property
    def n_particles(self) -> int:
        return self.base_samples.shape[0]

    def sample_with_log_density(self, n_particles: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Particles (N, n_dim) in physical units and their log-density [log of 1/(m^k)] (N,), one pass."""
        z = self.base_samples
        if self.resample and self.training:
            self._rng = resample_stream(self._rng, self.seed, z.device)
            z = torch.randn(n_particles or self.n_particles, self.n_dim, generator=self._rng,
                            device=z.device, dtype=z.dtype)
        elif n_particles is not None and n_particles != self.n_particles:
            z = self._draw(n_particles, self.seed + 1).to(z)
        log_q = _standard_normal_log_density(z)
        for flow in self.flows:
            z, log_det = flow(z)
            log_q = log_q - log_det
        x = self.mean + z @ self.cholesky.T
        return x, log_q - torch.log(torch.diagonal(self.cholesky).abs()).sum()

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density (N,) of points x (N, n_dim) in physical units (the flows run backwards)."""
        z = torch.linalg.solve_triangular(self.cholesky, (x - self.mean).T, upper=False).T
        log_det = -torch.log(torch.diagonal(self.cholesky).abs()).sum()
        for flow in reversed(self.flows):
            z, ld = flow.inverse(z)
            log_det = log_det + ld
        return _standard_normal_log_density(z) + log_det

    def forward(self, n_particles: int | None = None) -> torch.Tensor:
        """Particles (N, 6) in Bmad coordinates."""
        return as_particles(self.sample_with_log_density(n_particles)[0])


class GaussianBeam(nn.Module):
    """A Gaussian beam: learned mean and Cholesky factor (positive diagonal through exp), particles
    mean + L z from fixed base samples z. Its entropy is known in closed form (`entropy`).

    n_dim 4 (z = pz = 0) or 6; scale [m, 1]: the initial rms sizes (one value or one per coordinate).
    """

    def __init__(self, n_particles: int = 10_000, n_dim: int = 6, scale: float | Sequence[float] = 1e-3,
                 seed: int = 0):
        super().__init__()
        if n_dim not in (2, 4, 6):
            raise ValueError(f"n_dim must be 2, 4 or 6, got {n_dim}")
        self.n_dim, self.seed = n_dim, seed
        scale = per_coordinate_scale(scale, n_dim)
        self.mean = nn.Parameter(torch.zeros(n_dim))
        self.log_diagonal = nn.Parameter(torch.log(scale))
        self.lower = nn.Parameter(torch.zeros(n_dim, n_dim))  # strictly lower part, in units of the scale
        self.register_buffer("scale", scale)
        self.register_buffer("base_samples", draw_base_samples(n_particles, n_dim, seed))

    @property
    def cholesky(self) -> torch.Tensor:
        strict = torch.tril(self.lower, diagonal=-1) * self.scale.unsqueeze(0)
        return strict + torch.diag(torch.exp(self.log_diagonal))

    def entropy(self) -> torch.Tensor:
        """Differential entropy [nats] in physical units: n/2 log(2 pi e) + log det L."""
        return 0.5 * self.n_dim * math.log(2 * math.pi * math.e) + self.log_diagonal.sum()

    def sample_with_log_density(self, n_particles: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.base_samples
        if n_particles is not None and n_particles != z.shape[0]:
            z = draw_base_samples(n_particles, self.n_dim, self.seed + 1).to(z)
        log_q = _standard_normal_log_density(z) - self.log_diagonal.sum()
        return self.mean + z @ self.cholesky.T, log_q

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density (N,) of points x (N, n_dim) in physical units."""
        z = torch.linalg.solve_triangular(self.cholesky, (x - self.mean).T, upper=False).T
        return _standard_normal_log_density(z) - self.log_diagonal.sum()

    def forward(self, n_particles: int | None = None) -> torch.Tensor:
        return as_particles(self.sample_with_log_density(n_particles)[0])
