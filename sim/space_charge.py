"""3D space charge: particle-in-cell with integrated Green's functions on a doubled grid.

The bunch field is solved in the bunch rest frame, where it is electrostatic: the rest-frame
longitudinal coordinate is z' = gamma z, transverse ones are unchanged. Charge is deposited on a
grid that follows the beam (cloud-in-cell), convolved (FFT, open boundaries by zero-padding to twice
the grid, Hockney's method) with the Green's functions of the three field components integrated over
a cell (Qiang et al., PRSTAB 9, 044204 (2006); erratum PRSTAB 10, 129901 (2007)), and gathered back
to the particles with the same cloud-in-cell weights. Back in the lab, over a path length ds:

    dpx = |q| E'_x ds / (gamma^2 beta^2 m c^2)     (the magnetic force cancels all but 1/gamma^2)
    dpy = |q| E'_y ds / (gamma^2 beta^2 m c^2)
    dpz = |q| E'_z ds / (gamma beta^2 m c^2)

with E' [V/m] the rest-frame field of a bunch of charge |Q| and m c^2, q in eV and e. Only
magnitudes enter, so a single-species bunch always repels, whatever sign its charge is given with.
"""

import math
from collections import OrderedDict

import torch

from .species import get_species
from .tracking import reference

EPSILON_0 = 8.8541878128e-12  # F/m
COULOMB = 1.0 / (4.0 * math.pi * EPSILON_0)  # V m / C
SPACING_RATIO = 2.0 ** (1.0 / 8.0)  # cell sizes are rounded up to powers of this, so kernels can be reused
_KERNEL_CACHE_BYTES = 512 * 2**20  # least recently used kernels are dropped beyond this


class SpaceCharge:
    """Space-charge settings of a lattice, and the 3D kick.

    grid_shape: cells (nx, ny, nz) of the grid that covers the bunch (its bounding box; cell sizes
    rounded up by at most 9 % to a ladder of values so the Green's functions can be cached).
    max_step: longest path [m] between two kicks; the lattice slices every element to at most this
    and kicks in a second-order split (half step, kick, half step).
    extent: None (default): the grid spans the bunch's bounding box. A number k: at most the mean
    +- k rms sizes in each direction (for bunches with far outliers, which would otherwise coarsen
    the grid); particles outside are deposited at and take their field from the nearest grid face.
    compensate: True: the kernels' spectra are multiplied by prod_i (1 + sin^2(k_i h_i / 2)) (k_i the doubled
    grid's wavenumbers, h_i the cell sizes), which undoes to second order in k h the smoothing of the
    cloud-in-cell deposit and gather and the cell-integrated kernel; no cost per kick (the kernels are
    cached). A Gaussian bunch's field in its core (within 2.5 rms) comes out 8.4 % weak on 16^3 cells
    over +-3 rms and 3.8 % weak on 32^3 over the bounding box without it; 0.4 % weak and 0.1 % strong with it
    (tests/test_space_charge_compensation.py). False (default): the shipped data were made without it.
    checkpoint: True (default): each kick keeps only the particles' positions and its field grid for
    the backward pass and recomputes the rest there (cloud-in-cell weights, charge grid, FFT buffers);
    and the lattice tracks an element's n slices in groups of ~sqrt(2 n) of which only the incoming
    particles are kept, each group tracked again in the backward pass (memory ~sqrt(n) instead of n,
    about one more forward pass of time). False: autograd keeps every intermediate (same gradients).
    """

    def __init__(self, grid_shape=(32, 32, 32), max_step: float = 0.05, extent: float | None = None,
                 checkpoint: bool = True, compensate: bool = False):
        grid_shape = tuple(int(n) for n in grid_shape)
        if len(grid_shape) != 3 or min(grid_shape) < 4:
            raise ValueError(f"SpaceCharge: grid_shape must be three integers >= 4, got {grid_shape}")
        if not (isinstance(max_step, (int, float)) and math.isfinite(max_step) and max_step > 0):
            raise ValueError(f"SpaceCharge: max_step must be a positive length in metres, got {max_step!r}")
        self.grid_shape = grid_shape
        if extent is not None and not (isinstance(extent, (int, float)) and math.isfinite(extent) and extent > 0):
            raise ValueError(f"SpaceCharge: extent must be a positive number of rms sizes or None, got {extent!r}")
        self.max_step = float(max_step)
        self.extent = None if extent is None else float(extent)
        if not isinstance(checkpoint, bool):
            raise ValueError(f"SpaceCharge: checkpoint must be true or false, got {checkpoint!r}")
        self.checkpoint = checkpoint
        if not isinstance(compensate, bool):
            raise ValueError(f"SpaceCharge: compensate must be true or false, got {compensate!r}")
        self.compensate = compensate
        self._kernels: OrderedDict = OrderedDict()

    @classmethod
    def from_config(cls, config: dict | None, where: str = "space_charge"):
        """From a config mapping {grid_shape, max_step, extent, checkpoint, compensate} (None: no space charge);
        `where` names the option in the error for an unknown key. Optional key `solver`: "pic" (default, this
        class), "gaussian" (sim.GaussianSpaceCharge: the nonlinear field of the rms-equivalent Gaussian
        ellipsoid) or "linear" (sim.LinearSpaceCharge: its linear part); those two take only max_step."""
        if config is None:
            return None
        if not isinstance(config, dict):
            raise ValueError(f"{where} must be a mapping {{grid_shape, max_step, ...}} or null, got {config!r}")
        config = dict(config)
        solver = config.pop("solver", "pic")
        if solver in ("gaussian", "linear"):
            unknown = set(config) - {"max_step"}
            if unknown:
                raise ValueError(f"{where}: solver {solver} takes only max_step, got {sorted(unknown)}")
            from .space_charge_gaussian import GaussianSpaceCharge
            from .space_charge_linear import LinearSpaceCharge

            try:
                return (GaussianSpaceCharge if solver == "gaussian" else LinearSpaceCharge)(**config)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
        if solver != "pic":
            raise ValueError(f"{where}.solver must be pic, gaussian or linear, got {solver!r}")
        unknown = set(config) - {"grid_shape", "max_step", "extent", "checkpoint", "compensate"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; use grid_shape, max_step, extent, checkpoint, "
                             "compensate (or solver)")
        return cls(**config)

    def __repr__(self) -> str:
        extent = "" if self.extent is None else f", extent={self.extent}"
        checkpoint = "" if self.checkpoint else ", checkpoint=False"
        compensate = ", compensate=True" if self.compensate else ""
        return f"SpaceCharge(grid_shape={self.grid_shape}, max_step={self.max_step}{extent}{checkpoint}{compensate})"

    def kick(self, particles: torch.Tensor, p0c, species, charge: float, length) -> torch.Tensor:
        """Particles (..., N, 6) after the space-charge kick of a step of `length` [m] (a number or a
        settings tensor), for a bunch of total charge `charge` [C] (its magnitude is used)."""
        if charge == 0:
            return particles
        batch_shape, n = particles.shape[:-2], particles.shape[-2]
        flat = particles.reshape(-1, n, 6)
        field = self.field(flat, p0c, species, abs(charge))  # (B, N, 3) rest-frame E' [V/m]
        return apply_field(particles, field.reshape(*batch_shape, n, 3), p0c, species, length)

    def field(self, particles: torch.Tensor, p0c, species, charge: float) -> torch.Tensor:
        """Rest-frame electric field [V/m] (B, N, 3) at each particle of particles (B, N, 6), for a
        bunch of total charge `charge` [C] > 0 spread evenly over the N particles."""
        positions = self.rest_positions(particles, p0c, species)  # (B, N, 3)
        origin, spacing, keys = self._grid(positions)
        kernels = self._kernel_ffts(keys, spacing, positions)  # B cached (3, nx + 1, ny + 1, nz + 1)
        weight = charge / positions.shape[-2]
        if self.checkpoint:
            return _LeanField.apply(positions, origin, spacing, kernels, weight, self.grid_shape, self.extent)
        g, fields = self._grid_fields(positions, origin, spacing, kernels, weight)
        return _Gather.apply(fields, g)

    def _grid_fields(self, positions, origin, spacing, kernels, weight: float):
        """The particles' grid coordinates (B, N, 3) and the fields (B, 3, nx, ny, nz) [V/m] of their charge
        (each `weight` [C]) on the grids of origin and cell sizes (B, 3) [m]."""
        g = _grid_coordinates(positions, origin, spacing, self.grid_shape, self.extent)
        rho = _Deposit.apply(g, weight, self.grid_shape, positions.shape[0])  # (B, nx, ny, nz) [C]
        rho = rho / spacing.prod(-1).reshape(-1, 1, 1, 1)  # C / m^3
        return g, _solve(rho, _stack(kernels), self.grid_shape)

    def rest_positions(self, particles: torch.Tensor, p0c, species) -> torch.Tensor:
        """Rest-frame positions (B, N, 3) [m] (x, y, gamma z) of particles (B, N, 6)."""
        _, energy, mass = reference(p0c, species, particles)
        gamma = energy / mass
        gamma = gamma.reshape(-1, 1) if gamma.ndim else gamma
        return torch.stack((particles[..., 0], particles[..., 2], particles[..., 4] * gamma), -1)

    @torch.no_grad()
    def field_grid(self, positions: torch.Tensor, charge: float):
        """The rest-frame field on the grid of bunches at rest-frame positions (B, N, 3) [m] (`rest_positions`) of
        total charge `charge` [C] > 0 (no gradient): fields (B, 3, nx, ny, nz) [V/m] at the nodes, the grids'
        origins (B, 3) [m] and cell sizes (B, 3) [m]. `field_at` interpolates it (at these positions: `field`'s)."""
        origin, spacing, keys = self._grid(positions)
        kernels = self._kernel_ffts(keys, spacing, positions)
        _, fields = self._grid_fields(positions, origin, spacing, kernels, charge / positions.shape[-2])
        return fields, origin, spacing

    def field_at(self, fields: torch.Tensor, origin: torch.Tensor, spacing: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        """A grid's field (B, 3, nx, ny, nz) [V/m] of `field_grid` (origins, cell sizes (B, 3) [m]) interpolated
        (cloud-in-cell) at rest-frame positions (B, N, 3) [m]: (B, N, 3); particles beyond the grid take the
        nearest face's field. Differentiable in the positions and the origin, not the field."""
        g = _grid_coordinates(positions, origin, spacing, self.grid_shape, 1.0)  # any extent: clamp onto the grid
        return _Gather.apply(fields.detach(), g)

    def _grid(self, positions: torch.Tensor):
        """Origin (B, 3), cell sizes (B, 3) and cache keys of grids that cover each bunch's bounding box
        (particles at least half a cell inside): cell sizes rounded up to powers of SPACING_RATIO."""
        columns = positions.detach().transpose(-1, -2).contiguous()  # (B, 3, N): fast contiguous reductions
        # the extremes differentiably by gathering them (autograd keeps only their indices)
        lo_grad, hi_grad = (positions.gather(-2, index.unsqueeze(-2)).squeeze(-2)
                            for index in (columns.argmin(-1), columns.argmax(-1)))
        if self.extent is not None:  # two passes: std_mean's one-pass algorithm is several times slower
            mean = columns.mean(-1)
            std = ((columns - mean.unsqueeze(-1)).square().sum(-1) / (columns.shape[-1] - 1)).sqrt()
            lo_grad = torch.maximum(lo_grad, mean - self.extent * std)
            hi_grad = torch.minimum(hi_grad, mean + self.extent * std)
        with torch.no_grad():
            lo, hi = lo_grad.detach(), hi_grad.detach()
            if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
                raise ValueError("space charge: particle coordinates are not finite (NaN or inf)")
            shape = torch.tensor(self.grid_shape, dtype=positions.dtype, device=positions.device)
            needed = (hi - lo) / (shape - 2)
            floor = needed.amax(-1, keepdim=True) * 1e-6 + torch.finfo(positions.dtype).tiny  # flat bunches
            exponent = torch.ceil(torch.log(torch.maximum(needed, floor)) / math.log(SPACING_RATIO))
            spacing = SPACING_RATIO**exponent
        # the grid's centre follows the bunch differentiably (gradients then match finite differences
        # of the discrete model); the cell sizes are piecewise constant
        origin = 0.5 * (lo_grad + hi_grad) - 0.5 * (shape - 1) * spacing
        keys = [tuple(int(e) for e in row) for row in exponent.tolist()]
        return origin, spacing, keys

    def _kernel_ffts(self, keys, spacing, like: torch.Tensor) -> list[torch.Tensor]:
        """FFTs of the integrated Green's functions, B tensors (3, nx + 1, ny + 1, nz + 1), from the cache
        when the cell sizes were seen before."""
        out = []
        for key, h in zip(keys, spacing):
            full_key = (key, like.dtype, like.device)
            if full_key in self._kernels:
                self._kernels.move_to_end(full_key)
            else:
                kernel = integrated_green_ffts(self.grid_shape, h.tolist(), like, self.compensate)
                self._kernels[full_key] = kernel
                while len(self._kernels) > 1 and len(self._kernels) * _nbytes(kernel) > _KERNEL_CACHE_BYTES:
                    self._kernels.popitem(last=False)
            out.append(self._kernels[full_key])
        return out


def kick_factors(p0c, species, like: torch.Tensor, length) -> tuple[torch.Tensor, torch.Tensor]:
    """(transverse, longitudinal) [1/(V/m)], settings shape: the momentum kicks per rest-frame field of a step of
    `length` [m] (module docstring): |q| ds / (gamma^2 beta^2 m c^2) and |q| ds / (gamma beta^2 m c^2)."""
    p0c_t, energy, mass = reference(p0c, species, like)
    gamma, beta2 = energy / mass, (p0c_t / energy) ** 2
    step = abs(get_species(species).charge_e) * torch.as_tensor(length, dtype=like.dtype, device=like.device)
    return step / (gamma**2 * beta2 * mass), step / (gamma * beta2 * mass)


def apply_field(particles: torch.Tensor, field: torch.Tensor, p0c, species, length) -> torch.Tensor:
    """Particles (..., N, 6) kicked by the rest-frame field (..., N, 3) [V/m] over a step of `length` [m]."""
    transverse, longitudinal = (f.unsqueeze(-1) for f in kick_factors(p0c, species, particles, length))
    x, px, y, py, z, pz = particles.unbind(-1)
    return torch.stack((x, px + transverse * field[..., 0], y, py + transverse * field[..., 1],
                        z, pz + longitudinal * field[..., 2]), -1)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _field_antiderivative(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """F with d^3F/(da db dc) = a / r^3, r = |(a, b, c)|: the field of a unit charge along a, integrated
    over a box by its 8 corners. F = -(b ln(c + r) + c ln(b + r) - a atan(b c / (a r))); the logs are
    taken in a form without cancellation for negative arguments (corners never lie on an axis)."""
    r = torch.sqrt(a * a + b * b + c * c)

    def log_plus(u, rest2):  # ln(u + r), for u < 0 as ln(rest2 / (r - u)) with rest2 = r^2 - u^2
        return torch.where(u >= 0, torch.log(u.abs() + r), torch.log(rest2 / (r - u.clamp_max(0))))

    return -(b * log_plus(c, a * a + b * b) + c * log_plus(b, a * a + c * c) - a * torch.atan(b * c / (a * r)))


def integrated_green_ffts(grid_shape, spacing, like: torch.Tensor, compensate: bool = False) -> torch.Tensor:
    """FFTs of the field Green's functions on the doubled grid, each integrated over a source cell of
    `spacing` (hx, hy, hz) [m] (units: m; times rho [C/m^3] / (4 pi eps0) = V/m), divided by i (they
    are purely imaginary): real, and only frequencies 0..n of x and y, (3, nx + 1, ny + 1, nz + 1)
    (`_unfold_kernel` gives the (3, 2nx, 2ny, nz + 1) spectra). Float64 inside, `like`'s dtype out.
    compensate: times the filter of `SpaceCharge`'s `compensate` (`smoothing_compensation`)."""
    axes = []
    for n, h in zip(grid_shape, spacing):
        offsets = torch.arange(-n, n + 1, dtype=torch.float64, device=like.device)  # corner k - 1/2, k = -n..n
        axes.append((offsets - 0.5) * h)
    u, v, w = torch.meshgrid(*axes, indexing="ij")
    kernels = []
    for a, b, c in ((u, v, w), (v, w, u), (w, u, v)):  # E_x, E_y, E_z: the field direction first
        f = _field_antiderivative(a, b, c)
        g = f.diff(dim=0).diff(dim=1).diff(dim=2)  # (2n+1)^3 corners -> (2n)^3 cells, offsets -n..n-1
        kernels.append(g)
    g = torch.stack(kernels)
    for k in range(3):  # offset -n along the field's own axis: never used inside the grid; zero makes g odd
        g[k].select(k, 0).zero_()
    g = torch.roll(g, shifts=tuple(-n for n in grid_shape), dims=(1, 2, 3))  # offset 0 first (FFT order)
    # each kernel is real, odd along its field axis and even along the other two, so its FFT is i times
    # a real array: only that (half the bytes of the complex FFT) is kept
    hat = torch.fft.rfftn(g, dim=(1, 2, 3)).imag
    nx, ny = grid_shape[:2]
    half = hat[:, : nx + 1, : ny + 1]  # the rest follows by symmetry (`_unfold_kernel`)
    if compensate:
        half = half * smoothing_compensation(grid_shape, like.device)
    return half.to(torch.float32 if like.dtype != torch.float64 else torch.float64).contiguous()


def smoothing_compensation(grid_shape, device) -> torch.Tensor:
    """The filter (nx + 1, ny + 1, nz + 1) prod_i (1 + sin^2(k_i h_i / 2)) at the kept frequencies m_i = 0..n_i of
    the doubled grid (k_i h_i = pi m_i / n_i): the inverse, to second order in k h, of the spectrum
    1 - (k h)^2 / 4 per axis of cloud-in-cell deposit, cell-integrated kernel and cloud-in-cell gather together
    (fitted: the factor 1 makes a Gaussian bunch's core field right within 0.5 % from 16 to 32 cells)."""
    factors = [1 + torch.sin(math.pi * torch.arange(n + 1, dtype=torch.float64, device=device) / (2 * n)) ** 2
               for n in grid_shape]
    return factors[0].view(-1, 1, 1) * factors[1].view(1, -1, 1) * factors[2].view(1, 1, -1)


def _unfold_kernel(half: torch.Tensor) -> torch.Tensor:
    """The kernel spectra (3, 2nx, 2ny, nz + 1) from their first nx + 1 and ny + 1 frequencies
    (3, nx + 1, ny + 1, nz + 1): odd along each component's own axis, even along the others."""
    signs = half.new_tensor([[-1.0, 1.0, 1.0], [1.0, -1.0, 1.0]]).view(2, 3, 1, 1, 1)  # x, y axis
    for axis, sign in ((1, signs[0]), (2, signs[1])):
        n = half.shape[axis] - 1
        half = torch.cat((half, sign * half.narrow(axis, 1, n - 1).flip(axis)), axis)
    return half


def _times_i_kernel(spectrum: torch.Tensor, kernels: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """spectrum * (sign * i * kernels): the product with the FFT of a kernel from `integrated_green_ffts`
    (sign -1: with its complex conjugate)."""
    pair = torch.view_as_real(spectrum)  # (..., 2): real, imaginary
    scaled = kernels * sign
    return torch.complex(-pair[..., 1] * scaled, pair[..., 0] * scaled)


def _stack(kernels: list[torch.Tensor]) -> torch.Tensor:
    """Kernels (B or 1, 3, 2nx, 2ny, nz + 1) unfolded from the cached halves (one when all B are the same)."""
    if all(k is kernels[0] for k in kernels):
        return _unfold_kernel(kernels[0]).unsqueeze(0)
    unfolded = {id(k): _unfold_kernel(k) for k in kernels}
    return torch.stack([unfolded[id(k)] for k in kernels])


def _solve(rho: torch.Tensor, kernels: torch.Tensor, grid_shape) -> torch.Tensor:
    """Fields (B, 3, nx, ny, nz) [V/m] of charge densities rho (B, nx, ny, nz) [C/m^3]: convolution
    with the kernels' Green's functions on the doubled grid (open boundaries)."""
    nx, ny, nz = grid_shape
    size, dims = (2 * nx, 2 * ny, 2 * nz), (-3, -2, -1)
    rho_hat = torch.fft.rfftn(rho, s=size, dim=dims)
    fields = torch.fft.irfftn(_times_i_kernel(rho_hat.unsqueeze(1), kernels), s=size, dim=dims)
    return fields[..., :nx, :ny, :nz] * COULOMB


def _solve_adjoint(grad_fields: torch.Tensor, kernels: torch.Tensor, grid_shape) -> torch.Tensor:
    """The transpose of `_solve`: gradient (B, nx, ny, nz) with respect to rho from one with respect
    to the fields (B, 3, nx, ny, nz) (correlation with the real Green's functions: conjugate kernels)."""
    nx, ny, nz = grid_shape
    size, dims = (2 * nx, 2 * ny, 2 * nz), (-3, -2, -1)
    grad_hat = torch.fft.rfftn(grad_fields, s=size, dim=dims)
    grad_rho = torch.fft.irfftn(_times_i_kernel(grad_hat, kernels, -1.0).sum(1), s=size, dim=dims)
    return grad_rho[..., :nx, :ny, :nz] * COULOMB


def _grid_coordinates(positions, origin, spacing, grid_shape, extent):
    """Positions in units of cells from the grid origin (B, N, 3) (differentiable); with an `extent`,
    outliers are moved onto the grid's faces."""
    g = (positions - origin.unsqueeze(-2)) / spacing.unsqueeze(-2)
    if extent is not None:
        g = torch.minimum(g.clamp_min(0), torch.tensor(grid_shape, dtype=g.dtype, device=g.device) - 1)
    return g


def _cells(g: torch.Tensor, grid_shape, batch: int):
    """The flat indices (8, B*N) of each particle's cloud-in-cell corners (corner 4 dx + 2 dy + dz from
    the lower one) and the fractions f (3, B*N) of its position (x, y, z) in the lower corner's cell."""
    nx, ny, nz = grid_shape
    limit = torch.tensor(grid_shape, dtype=g.dtype, device=g.device) - 2
    lower = torch.minimum(torch.floor(g).clamp_min(0), limit)
    f = (g - lower).reshape(-1, 3).T.contiguous()
    cx, cy, cz = lower.long().unbind(-1)
    b = torch.arange(batch, device=g.device).unsqueeze(-1)
    base = (((b * nx + cx) * ny + cy) * nz + cz).reshape(1, -1)
    offsets = torch.tensor([dx * ny * nz + dy * nz + dz for dx in (0, 1) for dy in (0, 1) for dz in (0, 1)],
                           device=g.device).unsqueeze(-1)
    return base + offsets, f


def _corner_weights(f: torch.Tensor) -> torch.Tensor:
    """Cloud-in-cell weights (8, B*N) of the corners of `_cells`: products of (1 - f, f) along x, y, z."""
    wx, wy, wz = (torch.stack((1 - fa, fa)) for fa in f)
    return (wx[:, None, None] * wy[None, :, None] * wz[None, None, :]).reshape(8, -1)


def _corner_values(tables: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """Flat grid quantities `tables` (C, M) at each particle's 8 corners: (C, dx, dy, dz, B*N), one gather."""
    return tables.index_select(1, corners.reshape(-1)).view(tables.shape[0], 2, 2, 2, -1)


def _trilinear(v: torch.Tensor, f: torch.Tensor, derivatives: bool = False):
    """Corner values v (C, 2, 2, 2, B*N) interpolated to the fractions f (3, B*N): (C, B*N), axis by
    axis; with `derivatives`, also the derivatives with respect to (fx, fy, fz), each (C, B*N)."""
    fx, fy, fz = f
    a = torch.lerp(v[:, :, :, 0], v[:, :, :, 1], fz)  # (C, dx, dy, B*N)
    b = torch.lerp(a[:, :, 0], a[:, :, 1], fy)  # (C, dx, B*N)
    value = torch.lerp(b[:, 0], b[:, 1], fx)
    if not derivatives:
        return value
    along_z = v[:, :, :, 1] - v[:, :, :, 0]
    along_z = torch.lerp(along_z[:, :, 0], along_z[:, :, 1], fy)
    along_y = a[:, :, 1] - a[:, :, 0]
    return value, (b[:, 1] - b[:, 0], torch.lerp(along_y[:, 0], along_y[:, 1], fx),
                   torch.lerp(along_z[:, 0], along_z[:, 1], fx))


def _interpolate(tables: torch.Tensor, corners: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Flat grid quantities `tables` (C, M) interpolated (trilinear) to the particles: (C, B*N)."""
    return _trilinear(_corner_values(tables, corners), f)


def _deposit(corners, f, weight: float, size: int, like: torch.Tensor) -> torch.Tensor:
    """Flat cloud-in-cell grid (size,) of particles of charge `weight` in the cells of `_cells`."""
    charges = f.new_full((1, f.shape[1]), weight)
    return _scatter_tables(charges, corners, f, like.new_empty(1, size))[0]


def _weighted_corner_sum(tables: torch.Tensor, corners: torch.Tensor, per_particle: torch.Tensor) -> torch.Tensor:
    """sum_c per_particle[c] * tables[c] at each particle's corners (1, 2, 2, 2, B*N), per_particle (C, B*N):
    interpolation is linear in the corner values, so the derivatives of this one sum are those of the
    C interpolated tables weighted by per_particle (one derivative pass instead of C)."""
    v = _corner_values(tables, corners)
    total = v[0] * per_particle[0]
    for channel, factor in zip(v[1:], per_particle[1:]):
        total = total + channel * factor
    return total.unsqueeze(0)


def _position_gradient(corner_sum: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Gradient (3, B*N) with respect to the grid coordinates of a corner sum (1, 2, 2, 2, B*N) of
    `_weighted_corner_sum`, interpolated."""
    _, derivatives = _trilinear(corner_sum, f, derivatives=True)
    return torch.cat(derivatives)


def _scatter_tables(grad: torch.Tensor, corners: torch.Tensor, f: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gradient (C, M) with respect to flat tables `like` (C, M) interpolated to the particles, from the
    gradient (C, B*N) of the interpolated values: the transpose of the gather, a cloud-in-cell deposit
    (`_deposit` is this with one channel of charges)."""
    weights, index = _corner_weights(f), corners.reshape(-1)
    out = torch.zeros_like(like)
    for table, channel in zip(out, grad):  # one channel at a time: contiguous (8, B*N) products
        table.scatter_add_(0, index, (weights * channel).reshape(-1))
    return out


def _per_particle(flat: torch.Tensor, batch: int) -> torch.Tensor:
    """(3, B*N) -> (B, N, 3) (a view)."""
    return flat.T.reshape(batch, -1, 3)


class _Deposit(torch.autograd.Function):
    """Cloud-in-cell charge (B, nx, ny, nz) of particles at grid coordinates g (B, N, 3), each of
    charge `weight`. Backward: the gradient with respect to g, by interpolating the incoming grid
    gradient's derivatives (no per-corner temporaries are saved)."""

    @staticmethod
    def forward(ctx, g, weight: float, grid_shape, batch: int):
        corners, f = _cells(g, grid_shape, batch)
        grid = _deposit(corners, f, weight, batch * math.prod(grid_shape), g)
        ctx.save_for_backward(g)
        ctx.meta = (weight, grid_shape, batch)
        return grid.view(batch, *grid_shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        weight, grid_shape, batch = ctx.meta
        corners, f = _cells(g, grid_shape, batch)
        corner_sum = _corner_values(grad.reshape(1, -1), corners) * weight
        return _per_particle(_position_gradient(corner_sum, f), batch), None, None, None


class _Gather(torch.autograd.Function):
    """Fields (B, 3, nx, ny, nz) interpolated to particles at grid coordinates g (B, N, 3): (B, N, 3),
    with the same cloud-in-cell weights as the deposit (so a particle exerts no force on itself)."""

    @staticmethod
    def forward(ctx, fields, g):
        batch, grid_shape = fields.shape[0], tuple(fields.shape[2:])
        corners, f = _cells(g, grid_shape, batch)
        tables = fields.transpose(0, 1).reshape(3, -1)
        ctx.save_for_backward(tables, g)
        ctx.meta = (batch, grid_shape)
        return _per_particle(_interpolate(tables, corners, f), batch)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        tables, g = ctx.saved_tensors
        batch, grid_shape = ctx.meta
        corners, f = _cells(g, grid_shape, batch)
        source = grad.reshape(-1, 3).T  # (3, B*N)
        grad_fields = grad_g = None
        if ctx.needs_input_grad[0]:
            grad_fields = _scatter_tables(source, corners, f, tables).view(3, batch, *grid_shape).transpose(0, 1)
        if ctx.needs_input_grad[1]:
            grad_g = _per_particle(_position_gradient(_weighted_corner_sum(tables, corners, source), f), batch)
        return grad_fields, grad_g


class _LeanField(torch.autograd.Function):
    """The field (B, N, 3) [V/m] at particles at rest-frame positions (B, N, 3) [m], on grids of origin
    (B, 3) and cell sizes `spacing` (B, 3) [m], with B cached kernels: deposit, solve and gather in one
    step that keeps only the positions and the field grid (3, B*nx*ny*nz) for the backward pass; the
    cloud-in-cell weights are recomputed there and the solve is transposed by hand (`_solve_adjoint`)."""

    @staticmethod
    def forward(ctx, positions, origin, spacing, kernels, weight: float, grid_shape, extent):
        batch, cells = positions.shape[0], math.prod(grid_shape)
        g = _grid_coordinates(positions, origin, spacing, grid_shape, extent)
        corners, f = _cells(g, grid_shape, batch)
        rho = _deposit(corners, f, weight, batch * cells, g).view(batch, *grid_shape)
        rho = rho / spacing.prod(-1).reshape(-1, 1, 1, 1)
        unique = list({id(k): k for k in kernels}.values())  # saved once each (they live in the cache)
        fields = _solve(rho, _stack(kernels), grid_shape)
        tables = fields.transpose(0, 1).reshape(3, -1)
        values = _per_particle(_interpolate(tables, corners, f), batch)
        ctx.save_for_backward(positions, origin, spacing, tables, *unique)
        ctx.meta = (weight, grid_shape, extent, [next(i for i, u in enumerate(unique) if u is k) for k in kernels])
        return values

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        positions, origin, spacing, tables, *unique = ctx.saved_tensors
        weight, grid_shape, extent, which = ctx.meta
        batch = positions.shape[0]
        g = _grid_coordinates(positions, origin, spacing, grid_shape, None)
        scale = 1 / spacing.unsqueeze(-2)
        if extent is not None:  # as autograd differentiates clamp_min(0), then minimum(., n - 1)
            upper = torch.tensor(grid_shape, dtype=g.dtype, device=g.device) - 1
            inside = g.clamp_min(0)
            scale = scale * (g >= 0) * torch.where(inside == upper, 0.5, (inside < upper).to(g.dtype))
            g = torch.minimum(inside, upper)
        corners, f = _cells(g, grid_shape, batch)
        source = grad.reshape(-1, 3).T  # (3, B*N)
        grad_fields = _scatter_tables(source, corners, f, tables).view(3, batch, *grid_shape).transpose(0, 1)
        grad_rho = _solve_adjoint(grad_fields, _stack([unique[i] for i in which]), grid_shape)
        grad_rho = grad_rho / spacing.prod(-1).reshape(-1, 1, 1, 1)
        # the gather's and the deposit's position gradients in one pass: both are corner sums
        corner_sum = _weighted_corner_sum(tables, corners, source)
        corner_sum = torch.add(corner_sum, _corner_values(grad_rho.reshape(1, -1), corners), alpha=weight)
        grad_positions = _per_particle(_position_gradient(corner_sum, f), batch) * scale  # g = (positions - origin) / h
        grad_origin = -grad_positions.sum(-2) if ctx.needs_input_grad[1] else None
        return grad_positions, grad_origin, None, None, None, None, None
