"""Conditional beam models: the beam as a function of upstream machine settings (DESIGN.md "Conditional beams")."""

from collections.abc import Sequence

import torch
from torch import nn

from .generator import ACTIVATIONS, check_generator_arguments, check_longitudinal, draw_base_samples, per_coordinate_scale


class ConditionalMLPBeam(nn.Module):
    """A beam generator conditioned on upstream settings c (U values, e.g. GUN.solenoid, LASER.spot).

    Fixed standard-normal base samples b (N, n_dim), shared by every condition, are mapped to particles

        coords(c) = scale * [ b A(c)^T + phi(b) W(c) + m(c) ],

    A(c) (n_dim x n_dim) a learned linear map (a linear skip whose size and correlations follow the
    settings: emittances and Twiss), phi(b) (N, hidden_width) learned nonlinear features of the base samples
    and their cubes (S-shaped tails), an MLP shared by every condition, combined by W(c) (hidden_width x
    n_dim) into the nonlinear shape at c, and m(c) the centroid; A, W and m are linear heads on an embedding
    of the settings. The features are computed once per step for all conditions (a conditional MLP of
    every particle at every condition costs G times more). The settings enter normalized,
    (c - centre) / half_width with the centre and half width of their training range, so each input is
    of order 1 whatever its unit. The number and names of the inputs come from the scan file
    (`configure_conditions`), so one config serves any file; `psr predict` warns outside the range.

    n_dim 4 reconstructs (x, px, y, py) with z = pz = 0 (or, with longitudinal = (sigma_z [m], sigma_pz),
    fixed Gaussian z, pz); 6 all coordinates. scale: the physical size of a unit output [m, 1].
    condition_width, condition_layers: the settings' embedding network. resample: in training, fresh base
    samples at every call (the network then learns the distribution, not a fixed set of samples: with fixed
    ones it can place the few extreme samples, which carry the rms of S-shaped tails, where the images want
    them, and a fresh sample's emittance differs by a few per cent); in eval the fixed samples.
    """

    def __init__(self, n_particles: int = 5_000, n_dim: int = 4, hidden_width: int = 64, hidden_layers: int = 2,
                 activation: str = "silu", scale: float | Sequence[float] = 1e-3, seed: int = 0,
                 condition_width: int = 32, condition_layers: int = 2, longitudinal: Sequence[float] | None = None,
                 resample: bool = False):
        super().__init__()
        check_generator_arguments(n_dim, n_particles, activation)
        if min(hidden_width, hidden_layers, condition_width, condition_layers) < 1:
            raise ValueError("hidden_width, hidden_layers, condition_width and condition_layers must be >= 1")
        longitudinal = check_longitudinal(longitudinal, n_dim)
        self.n_dim, self.seed, self.longitudinal, self.resample = n_dim, seed, longitudinal, resample
        self.draws = 0  # fresh draws made (resample): each from its own seed, so a run is reproducible
        self.hidden_width, self.hidden_layers, self.activation = hidden_width, hidden_layers, activation
        self.condition_width, self.condition_layers = condition_width, condition_layers
        self.register_buffer("scale", per_coordinate_scale(scale, n_dim))
        self.register_buffer("base_samples", self._draw(n_particles, seed))
        self.register_buffer("cube_scale", self.base_samples[:, :n_dim].pow(3).std(0))
        self.condition_names: list[str] = []
        self.embedding = None  # built by configure_conditions

    def _draw(self, n: int, seed: int) -> torch.Tensor:
        return draw_base_samples(n, self.n_dim + (2 if self.longitudinal else 0), seed)

    @property
    def n_particles(self) -> int:
        return self.base_samples.shape[0]

    @property
    def configured(self) -> bool:
        return self.embedding is not None

    def configure_conditions(self, names: Sequence[str], low: Sequence[float], high: Sequence[float]) -> None:
        """Build the networks for U = len(names) settings whose training range is [low, high] (per setting).
        A setting that does not vary (low == high) is normalized with a half width of 1 (its unit)."""
        names = [str(n) for n in names]
        if not names:
            raise ValueError("a conditional beam model needs at least one upstream setting")
        low, high = (torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in (low, high))
        if low.shape != (len(names),) or high.shape != (len(names),) or (high < low).any():
            raise ValueError(f"conditions {names}: need one low <= high per setting, got {low.tolist()}, {high.tolist()}")
        half = (high - low) / 2
        half = torch.where(half > 0, half, torch.ones_like(half))
        self.condition_names = names
        self.register_buffer("condition_low", low.float())
        self.register_buffer("condition_high", high.float())
        self.register_buffer("condition_centre", ((high + low) / 2).float())
        self.register_buffer("condition_half_width", half.float())
        act, width, d = ACTIVATIONS[self.activation], self.condition_width, self.n_dim
        layers, width_in = [], len(names)
        for _ in range(self.condition_layers):
            layers += [nn.Linear(width_in, width), act()]
            width_in = width
        self.embedding = nn.Sequential(*layers)
        self.linear = nn.Linear(width, d * d)  # A(c) = A0 + linear(e): zero at the start
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.linear0 = nn.Parameter(torch.eye(d) + 0.1 * torch.randn(d, d, generator=torch.Generator().manual_seed(self.seed)))
        self.centroid = nn.Linear(width, d)
        layers, width_in = [], 2 * d
        for _ in range(self.hidden_layers):
            layers += [nn.Linear(width_in, self.hidden_width), act()]
            width_in = self.hidden_width
        self.features = nn.Sequential(*layers)
        self.shape0 = nn.Parameter(torch.zeros(self.hidden_width, d))  # W(c) = W0 + shape(e)
        self.shape = nn.Linear(width, self.hidden_width * d)
        nn.init.zeros_(self.shape.weight)
        nn.init.zeros_(self.shape.bias)
        device = self.base_samples.device
        self.to(device)

    def normalize(self, conditions: torch.Tensor) -> torch.Tensor:
        """(G, U) setting values -> (G, U) of order 1 ((c - centre) / half width)."""
        return (conditions - self.condition_centre.to(conditions)) / self.condition_half_width.to(conditions)

    def centre_conditions(self) -> torch.Tensor:
        """(1, U): the centre of the training range."""
        return self.condition_centre.unsqueeze(0)

    def forward(self, conditions: torch.Tensor | None = None, n_particles: int | None = None) -> torch.Tensor:
        """Particles (G, N, 6) at conditions (G, U) [the settings' own units]; without conditions, (N, 6) at the
        centre of the training range."""
        if not self.configured:
            raise RuntimeError("the conditional beam model has no inputs yet (configure_conditions: from the scan file)")
        squeeze = conditions is None
        conditions = self.centre_conditions() if squeeze else conditions
        if conditions.ndim != 2 or conditions.shape[1] != len(self.condition_names):
            raise ValueError(f"conditions must be (G, {len(self.condition_names)}) values of {self.condition_names}, "
                             f"got shape {tuple(conditions.shape)}")
        base = self.base_samples
        if n_particles is not None and n_particles != self.n_particles:
            base = self._draw(n_particles, self.seed + 1).to(base)
        elif self.resample and self.training and torch.is_grad_enabled():
            self.draws += 1
            base = self._draw(self.n_particles, self.seed + 1000 + self.draws).to(base)
        base, extra = base[:, :self.n_dim], base[:, self.n_dim:]
        embedded = self.embedding(self.normalize(conditions.to(base)))  # (G, E)
        d = self.n_dim
        matrix = self.linear0 + self.linear(embedded).view(-1, d, d)  # (G, d, d)
        linear = base @ matrix.transpose(-1, -2)  # (G, N, d)
        features = self.features(torch.cat([base, base**3 / self.cube_scale], -1))  # (N, H): once for every condition
        weights = self.shape0 + self.shape(embedded).view(-1, self.hidden_width, d)  # (G, H, d)
        shape = features @ weights  # (G, N, d)
        coords = (linear + shape + self.centroid(embedded).unsqueeze(1)) * self.scale
        if d == 4:
            if self.longitudinal:
                longitudinal = extra * torch.tensor(self.longitudinal, dtype=extra.dtype, device=extra.device)
                longitudinal = longitudinal.expand(coords.shape[0], -1, -1)
            else:
                longitudinal = coords.new_zeros(*coords.shape[:-1], 2)
            coords = torch.cat([coords, longitudinal], dim=-1)
        return coords[0] if squeeze else coords
