"""Generative beam models: a network maps fixed base samples to particle coordinates."""

from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "silu": nn.SiLU}


def draw_base_samples(n: int, n_dim: int, seed: int, quasi_random: bool = False) -> torch.Tensor:
    """Standard-normal base samples (n, n_dim) from `seed` (a beam model's fixed input). quasi_random: scrambled
    Sobol points through the inverse normal CDF (randomized quasi-Monte Carlo): each quantile of each coordinate
    holds its share of the samples, so their moments scatter far less from the distribution's (the variance of
    x + 0.5 x^3 over 20 draws of 20k: 0.5 % relative scatter against 4.0 %; tests/test_hard_beams.py)."""
    if not quasi_random:
        return torch.randn(n, n_dim, generator=torch.Generator().manual_seed(seed))
    uniform = torch.quasirandom.SobolEngine(n_dim, scramble=True, seed=seed).draw(n, dtype=torch.float64)
    return torch.special.ndtri(uniform.clamp(1e-12, 1 - 1e-12)).float()


def per_coordinate_scale(scale, n_dim: int) -> torch.Tensor:
    """(n_dim,) positive sizes [m for positions, 1 for momenta] from one value or one per coordinate."""
    scale = torch.as_tensor(scale, dtype=torch.float32).flatten()
    if scale.numel() == 1:
        scale = scale.expand(n_dim).clone()
    if scale.numel() != n_dim or not (scale > 0).all():
        raise ValueError(f"scale must be one positive value or {n_dim} of them, got {scale.tolist()}")
    return scale


def check_generator_arguments(n_dim: int, n_particles: int, activation: str) -> None:
    """A beam model's dimension (4 or 6), particle count (>= 2) and activation (a key of ACTIVATIONS), checked."""
    if n_dim not in (4, 6):
        raise ValueError(f"n_dim must be 4 or 6, got {n_dim}")
    if n_particles < 2:
        raise ValueError(f"n_particles must be at least 2, got {n_particles}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; use one of {sorted(ACTIVATIONS)}")


def check_longitudinal(longitudinal, n_dim: int) -> list[float] | None:
    """(sigma_z [m], sigma_pz) of a 4D beam model's fixed Gaussian z, pz, checked; None stays None."""
    if longitudinal is None:
        return None
    if n_dim != 4:
        raise ValueError("longitudinal (sigma_z, sigma_pz) is for n_dim 4; with n_dim 6 z and pz are reconstructed")
    longitudinal = [float(v) for v in longitudinal]
    if len(longitudinal) != 2 or min(longitudinal) < 0:
        raise ValueError(f"longitudinal must be (sigma_z [m], sigma_pz), both >= 0, got {longitudinal}")
    return longitudinal


def resample_stream(rng: torch.Generator | None, seed: int, device: torch.device) -> torch.Generator:
    """The random stream of a generator's fresh base draws (resample): `rng` if it is on `device`, else a new one
    seeded from `seed` + 2, so every process of a distributed fit draws the same particles whatever else used the
    global generator."""
    if rng is None or rng.device != torch.device(device):
        rng = torch.Generator(device).manual_seed(seed + 2)
    return rng


def profile_on_nodes(profile: nn.Module, s: torch.Tensor, nodes: int) -> torch.Tensor:
    """profile(s) (..., 1) of a 1-input network for s (..., 1) >= 0, evaluated at `nodes` points evenly over
    [0, max s] and interpolated linearly (its gradient in s: the interpolant's slope). With tail_skip and
    plane_profiles on 20k particles, 257 nodes take 2.3 ms off a 14 ms generator step (forward and backward), and
    the beam stays within 1e-4 of its size (tests/test_hard_beams.py)."""
    top = s.detach().max().clamp_min(1e-12)
    values = profile(torch.linspace(0, 1, nodes, dtype=s.dtype, device=s.device)[:, None] * top)[:, 0]
    position = (s[..., 0] / top * (nodes - 1)).clamp(0, nodes - 1)
    low = position.detach().floor().clamp(max=nodes - 2).long()
    weight = position - low
    return (values[low] * (1 - weight) + values[low + 1] * weight).unsqueeze(-1)


class KnotSteps(nn.Module):
    """A learned sum of K smooth steps a_k sigmoid((s - c_k) / w_k) of s >= 0 (a_k zero at the start), their
    positions c_k fixed at quantiles of s's base values that crowd towards its tail (1 - 2^-k for k = 1..K), each
    step's width w_k half the gap to the step below: a radial profile that can change fast where the tails are."""

    def __init__(self, s: torch.Tensor, knots: int):
        super().__init__()
        levels = 1 - 0.5 ** torch.arange(1, knots + 1, dtype=torch.float64)
        centres = torch.quantile(s.double(), levels).float()
        widths = torch.diff(centres, prepend=centres.new_zeros(1)).clamp_min(1e-3) / 2
        self.register_buffer("centres", centres)
        self.register_buffer("widths", widths)
        self.amplitudes = nn.Parameter(torch.zeros(knots))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """(..., 1) profile at s (..., 1)."""
        return (torch.sigmoid((s - self.centres) / self.widths) * self.amplitudes).sum(-1, keepdim=True)


class MLPBeamGenerator(nn.Module):
    """GPSR-style beam: fixed standard-normal base samples through an MLP, scaled to physical units.

    n_dim 4 reconstructs (x, px, y, py) and leaves z = pz = 0, or, with longitudinal = (sigma_z [m],
    sigma_pz), gives z and pz fixed uncorrelated Gaussian values of those sizes (a known bunch length
    and energy spread: 3D space charge needs a bunch length); n_dim 6 all six coordinates.
    scale: one value or one per reconstructed coordinate, the physical size of a unit network
    output [m for positions, 1 for momenta]. The base samples are drawn once from `seed`, so the
    beam is a deterministic function of the weights; calling with another particle count draws
    fresh base samples for that count. linear_skip adds a linear map of the base samples to the
    network output, so the beam's tails can grow linearly (a bounded tanh/MLP output clips them
    and underestimates rms emittances of beams with long tails). tail_skip adds a linear map (zero at
    the start) of tail features of the base samples b: b_i^3 (unit rms; S-shaped phase spaces, as
    third-order aberrations give) and b_i g(|b|^2 / n_dim), g > 0 a learned radial profile (halos), so
    tails can grow faster than linearly: a SiLU network with a linear skip grows at most linearly.
    plane_profiles adds a linear map (zero at the start) of q_k / r_k R_k(r_k) for each pair q_k of
    coordinates q = P b (P learned, starting at the identity), r_k = |q_k| and R_k > 0 a learned radius:
    a hole or a ring in one plane (hollow beams from ring-shaped laser spots; R_k(0) > 0 opens the
    hole). A continuous map of a Gaussian leaves the particles near the axis inside the hole (measured:
    the fit fills it); the linear map turns the plane where the data want it.
    centred: the beam's transverse centroid (x, px, y, py) is held at zero, the design orbit (the
    particles' mean is subtracted): for an incoming orbit known from upstream beam-position monitors.
    Where magnet offsets and screen centres are fitted (`model.calibrate`), the incoming orbit is
    otherwise one more unknown the images cannot tell apart from them.
    profile_nodes: evaluate the learned radial profiles (tail_skip, plane_profiles) at this many points and
    interpolate linearly (`profile_on_nodes`), not on every particle (None: on every particle, as fits of
    before it were made).
    resample: in training (with gradient), fresh base samples at every call, from one random stream of `seed`;
    validation, reports and `psr predict` use the fixed ones. With fixed samples the network learns a map of those
    20k particular points and places them to copy the scan's own shot noise (README "Hard beams").
    quasi_random: every base sample set (the fixed one, each fresh draw) is scrambled Sobol points made normal
    (`draw_base_samples`). With pseudo-random fresh draws the fit's emittances scatter with each draw's tails (a 20k
    draw of a beam with long tails misses its rms emittance by 1-3 %) and its cores came out 2-4 % low on the px
    tail; quasi-random draws leave far less shot noise in each step's images. Both on (quad_scan_4d.yaml), the 4D
    hard-beam family's images against the true beam improved by 25-47 % (l1 of unit-sum images, six seeds a beam).
    profile_knots: add to tail_skip's radial profile K learned steps at quantiles of the base radius that crowd
    towards the tail (`KnotSteps`; 0: none). A Gaussian core with a halo three times wider needs the profile to
    rise steeply near the core's edge; the small tanh network alone rises smoothly and, with the moment term asking
    for the halo's rms, widens the core instead (4D beamline, six seeds: image l1 0.073 with 10 knots against 0.081
    without; seed 3 0.068 / 0.081, and 0.061 with no moment term, which misses the halo's rms by 8-9 %).
    """

    def __init__(
        self,
        n_particles: int = 10_000,
        n_dim: int = 4,
        hidden_width: int = 32,
        hidden_layers: int = 2,
        activation: str = "silu",
        linear_skip: bool = True,
        scale: float | Sequence[float] = 1e-3,
        seed: int = 0,
        longitudinal: Sequence[float] | None = None,
        tail_skip: bool = False,
        centred: bool = False,
        plane_profiles: bool = False,
        profile_nodes: int | None = None,
        profile_knots: int = 0,
        resample: bool = False,
        quasi_random: bool = False,
    ):
        super().__init__()
        check_generator_arguments(n_dim, n_particles, activation)
        if not (isinstance(profile_knots, int) and not isinstance(profile_knots, bool) and 0 <= profile_knots <= 16) \
                or (profile_knots and not tail_skip):
            raise ValueError(f"profile_knots must be a whole number from 0 to 16 and, above 0, needs tail_skip (its radial "
                             f"profile gets the steps), got {profile_knots!r} with tail_skip {tail_skip!r}")
        if profile_nodes is not None and not (isinstance(profile_nodes, int) and not isinstance(profile_nodes, bool)
                                              and profile_nodes >= 2):
            raise ValueError(f"profile_nodes must be a whole number >= 2 (or null), got {profile_nodes!r}")
        self.profile_nodes = profile_nodes
        scale = per_coordinate_scale(scale, n_dim)
        longitudinal = check_longitudinal(longitudinal, n_dim)
        self.n_dim = n_dim
        self.seed = seed
        self.longitudinal = longitudinal
        self.centred = centred
        self.resample, self.quasi_random = resample, quasi_random
        self._rng: torch.Generator | None = None
        layers, width_in = [], n_dim
        for _ in range(hidden_layers):
            layers += [nn.Linear(width_in, hidden_width), ACTIVATIONS[activation]()]
            width_in = hidden_width
        layers.append(nn.Linear(width_in, n_dim))
        self.network = nn.Sequential(*layers)
        self.skip = nn.Linear(n_dim, n_dim) if linear_skip else None
        self.register_buffer("scale", scale)
        self.register_buffer("base_samples", self._draw(n_particles, seed))
        self.tail = self.radial = self.knots = None
        if tail_skip:
            self.tail = nn.Linear(2 * n_dim, n_dim, bias=False)
            nn.init.zeros_(self.tail.weight)
            self.radial = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
            self.register_buffer("cube_scale", self.base_samples[:, :n_dim].pow(3).std(0))
            self.knots = KnotSteps(self.base_samples[:, :n_dim].square().mean(-1), profile_knots) if profile_knots else None
        self.plane = self.plane_radial = None
        if plane_profiles:
            self.plane = nn.Linear(n_dim, n_dim, bias=False)
            nn.init.zeros_(self.plane.weight)
            self.plane_basis = nn.Linear(n_dim, n_dim, bias=False)
            nn.init.eye_(self.plane_basis.weight)
            self.plane_radial = nn.ModuleList(
                nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)) for _ in range(n_dim // 2))

    def _tail_features(self, base: torch.Tensor) -> torch.Tensor:
        """(N, 2 n_dim): b_i^3 (unit rms) and b_i g(|b|^2 / n_dim), g > 0 a learned radial profile."""
        s = base.square().mean(-1, keepdim=True)
        profile = self._profile(self.radial, s)
        if self.knots is not None:  # on every particle: the 4D family was measured so (on the nodes, tried: same cost)
            profile = profile + self.knots(s)
        gate = nn.functional.softplus(profile)
        return torch.cat([base**3 / self.cube_scale, base * gate], -1)

    def _plane_features(self, base: torch.Tensor) -> torch.Tensor:
        """(N, n_dim): each pair q_k of q = P b, direction q_k / r_k times R_k(r_k) > 0, a learned radius."""
        pairs = self.plane_basis(base).unflatten(-1, (-1, 2))
        radii = pairs.square().sum(-1, keepdim=True).clamp_min(1e-12).sqrt()
        new_radii = torch.stack([nn.functional.softplus(self._profile(h, radii[:, k])) for k, h in enumerate(self.plane_radial)], 1)
        return (pairs / radii * new_radii).flatten(-2)

    def _profile(self, profile: nn.Module, s: torch.Tensor) -> torch.Tensor:
        """A learned radial profile at s (N, 1): on every particle, or interpolated from profile_nodes points."""
        return profile(s) if self.profile_nodes is None else profile_on_nodes(profile, s, self.profile_nodes)

    def _draw(self, n: int, seed: int) -> torch.Tensor:
        """Base samples (n, n_dim), plus two columns for z, pz when `longitudinal` is set."""
        return draw_base_samples(n, self.n_dim + (2 if self.longitudinal else 0), seed, self.quasi_random)

    def _fresh(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """n fresh base samples (resample) with `like`'s columns, device and dtype: the stream's next normal draw, or
        (quasi_random) a scramble seeded from it."""
        self._rng = resample_stream(self._rng, self.seed, like.device)
        if not self.quasi_random:
            return torch.randn(n, like.shape[1], generator=self._rng, device=like.device, dtype=like.dtype)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self._rng, device=like.device))
        return draw_base_samples(n, like.shape[1], seed, quasi_random=True).to(like)

    @property
    def n_particles(self) -> int:
        return self.base_samples.shape[0]

    def forward(self, n_particles: int | None = None) -> torch.Tensor:
        """Particles (N, 6) in Bmad coordinates."""
        base = self.base_samples
        if self.resample and self.training and torch.is_grad_enabled():
            base = self._fresh(n_particles or self.n_particles, base)
        elif n_particles is not None and n_particles != self.n_particles:
            base = self._draw(n_particles, self.seed + 1).to(base)
        base, extra = base[:, :self.n_dim], base[:, self.n_dim:]
        coords = self.network(base)
        if self.skip is not None:
            coords = coords + self.skip(base)
        if self.tail is not None:
            coords = coords + self.tail(self._tail_features(base))
        if self.plane is not None:
            coords = coords + self.plane(self._plane_features(base))
        coords = coords * self.scale
        if self.centred:
            coords = torch.cat([coords[:, :4] - coords[:, :4].mean(0), coords[:, 4:]], -1)
        if self.n_dim == 4:
            if self.longitudinal:
                longitudinal = extra * torch.tensor(self.longitudinal, dtype=extra.dtype, device=extra.device)
            else:
                longitudinal = coords.new_zeros(coords.shape[0], 2)
            coords = torch.cat([coords, longitudinal], dim=-1)
        return coords
