"""GPSR half of the 6D benchmark: time one training epoch of GPSR (peer code, PyPI
``gpsr==0.2.0``) on 20 images of 200 x 200 px with 10,000 particles, on the CPU.

Install (gpsr and zuko without their dependencies, the rest pinned so that pip cannot
replace the installed torch / cheetah)::

    pip install --no-deps gpsr==0.2.0 zuko==1.4.0
    printf 'torch==2.13.0\\ncheetah-accelerator==0.8.4\\n' > /tmp/gpsr_constraints.txt
    pip install -c /tmp/gpsr_constraints.txt scikit-image tensorboard scipy matplotlib
    python -c "import torch, gpsr, cheetah; print(torch.__version__, cheetah.__version__)"
    # -> 2.13.0+cpu 0.8.4

Notes
- gpsr==0.2.0 pins zuko==1.4.0 (only used by its normalizing-flow generators, imported
  lazily); both are benchmark-only dependencies, not added to pyproject.toml.
- gpsr 0.2.0 builds its dipole with ``tracking_method="bmadx"``; cheetah 0.8.4 renamed it
  ``"drift_kick_drift"`` and, instead of failing, warns and silently keeps ``"linear"``.
  ``build_gpsr_lattice`` silences that warning and sets ``"drift_kick_drift"`` after
  construction, which is what gpsr's authors meant (Bmad-X tracking through the dipole).
- gpsr hard-codes the TDC tilt to ``3.14 / 2`` (not pi/2); its examples use
  ``theta_on = -20 * 3.14 / 180``.  Both are kept as-is so the lattice is gpsr's own.
- gpsr computes the dipole arc length as ``arcsin(l_bend * G) / G``, so "dipole off"
  cannot be G = 0 (0/0); a tiny G (1e-10 1/m, angle 3e-11 rad) stands in for it.
- Geometry follows gpsr's 6D examples (docs/examples/example_reconstruction_6d_flow.py,
  AWA beamline): l_quad 0.11, l_tdc 0.01, f 1.3 GHz, phase 0, l_bend 0.3018, l1 0.790702,
  l2 0.631698, l3 0.889 m, energy 43.36e6 eV.  Screens: cheetah ``Screen`` 200 x 200 px,
  70 um pixels, ``method="kde"`` (bandwidth one pixel), as gpsr's KDE image diagnostic;
  ``--screen-method cloud-in-cell`` (cheetah's default) is ~20x faster per epoch here.
- Timings are meaningless while other jobs share the 2 cores (OpenMP contention: 10-40x).

    python benchmarks/gpsr6d_peer.py [--epochs 3] [--warmup 1] [--particles 10000]
"""

import argparse
import math
import statistics
import time
import warnings

import lightning as L
import numpy as np
import torch
from cheetah import ParticleBeam, Screen
from cheetah.particles import Species
from cheetah.utils import bmadx
from gpsr.beams import NNParticleBeamGenerator
from gpsr.datasets import SixDReconstructionDataset
from gpsr.modeling import GPSR, GPSR6DLattice
from gpsr.train import LitGPSR

ENERGY = 43.36e6  # eV; gpsr's examples pass this as `energy` of NNParticleBeamGenerator
MC2 = float(Species("electron").mass_eV)  # eV
G_OFF = 1e-10  # 1/m: "dipole off" (G = 0 would give arc length 0/0 in gpsr)
BATCH_SIZE = 10  # gpsr's 6D examples: DataLoader(dset, batch_size=10)


def gpsr_geometry() -> dict:
    """Every number of GPSR's 6D beamline and screens, plus the 20 settings."""
    l_quad, l_tdc, l_bend = 0.11, 0.01, 0.3018
    l1, l2, l3 = 0.790702, 0.631698, 0.889  # quad->TDC, TDC->bend, bend->screen (centres)
    theta_on = -20.0 * 3.14 / 180.0
    k1 = np.linspace(-5.0, 5.0, 5)  # 1/m^2
    volts = np.array([0.0, 2.0e6])  # V
    g = np.array([G_OFF, math.sin(theta_on) / l_bend])  # 1/m, angle = arcsin(l_bend * G)
    grid = np.stack(np.meshgrid(k1, volts, g, indexing="ij"), -1)  # (5, 2, 2, 3)
    angle = np.arcsin(l_bend * grid[..., 2])
    p0c = math.sqrt(ENERGY**2 - MC2**2)
    return {
        "energy": ENERGY, "p0c": p0c, "mc2": MC2,
        "l_quad": l_quad, "l_tdc": l_tdc, "l_bend": l_bend, "l1": l1, "l2": l2, "l3": l3,
        "drift_quad_tdc": l1 - l_quad / 2 - l_tdc / 2,
        "drift_tdc_bend": l2 - l_tdc / 2 - l_bend / 2,
        "drift_bend_screen": l3 - l_bend / 2 / np.cos(angle),  # (5, 2, 2), per setting
        "tdc_frequency": 1.3e9, "tdc_phase": 0.0, "tdc_tilt": 3.14 / 2,
        "theta_on": theta_on, "dipole_e1": 0.0,
        "dipole_angle": angle,  # (5, 2, 2); e2 = angle, arc length = angle / G
        "dipole_arc_length": angle / grid[..., 2],
        "screen_resolution": (200, 200), "pixel_size": 70e-6,
        "screen_method": "kde", "kde_bandwidth": 70e-6,
        "settings_shape": grid.shape,  # (n_k1, n_tdc, n_dipole, 3): gpsr's order
        "settings": grid.reshape(-1, 3),  # (20, 3): (k1 [1/m^2], V [V], G [1/m])
        "screen_order": ("dipole off (screen 1)", "dipole on (screen 2)"),
    }


def _screens(geo):
    px = torch.tensor(geo["pixel_size"])
    return tuple(
        Screen(resolution=geo["screen_resolution"], pixel_size=torch.stack((px, px)),
               method=geo["screen_method"], kde_bandwidth=torch.tensor(geo["kde_bandwidth"]),
               is_active=True, name=name)
        for name in ("SCREEN_1", "SCREEN_2"))


def build_gpsr_lattice(geo) -> GPSR6DLattice:
    """gpsr's GPSR6DLattice, with the dipole's deprecated 'bmadx' method renamed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Invalid tracking method 'bmadx'")
        lattice = GPSR6DLattice(
            geo["l_quad"], geo["l_tdc"], geo["tdc_frequency"], geo["tdc_phase"],
            geo["l_bend"], geo["theta_on"], geo["l1"], geo["l2"], geo["l3"], *_screens(geo))
    lattice.segment.SCAN_DIPOLE.tracking_method = "drift_kick_drift"
    return lattice


def _settings_tensor(geo) -> torch.Tensor:
    return torch.tensor(geo["settings"].reshape(geo["settings_shape"]), dtype=torch.float32)


def make_truth_particles(n: int, seed: int = 0) -> torch.Tensor:
    """6D electron beam in Bmad coordinates (x, px, y, py, z, pz), float64 (n, 6):
    Gaussian core, a converging x-px correlation, and a chirped, slightly curved pz(z)."""
    g = torch.randn(n, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = 0.6e-3 * g[:, 0]
    px = 1.0e-4 * g[:, 1] - 0.1 * x  # converging in x
    y = 0.5e-3 * g[:, 2]
    py = 1.2e-4 * g[:, 3]
    z = 0.5e-3 * g[:, 4]
    pz = -2.0 * z + 300.0 * (z**2 - 0.25e-6) + 5e-4 * g[:, 5]  # chirp + curvature
    return torch.stack((x, px, y, py, z, pz), dim=1)


def _beam_from_bmad(particles: torch.Tensor, geo) -> ParticleBeam:
    p0c = torch.tensor(geo["p0c"], dtype=torch.float64)
    coords, ref_energy = bmadx.bmad_to_cheetah_coords(
        particles.to(torch.float64), p0c, torch.tensor(geo["mc2"], dtype=torch.float64))
    return ParticleBeam(coords.float(), energy=ref_energy.float())


def simulate_gpsr_images(particles: torch.Tensor, geo) -> tuple[np.ndarray, np.ndarray]:
    """Track the truth through gpsr's lattice; return (screen 1, screen 2) images as
    float32 numpy (n_k1, n_tdc, 200, 200) each, i.e. gpsr's six_d_observations.
    Image axes: [..., iy, ix], pixel centres Screen.pixel_bin_centers (y up, x right)."""
    lattice = build_gpsr_lattice(geo)
    settings = _settings_tensor(geo)
    lattice.set_lattice_parameters(settings.flatten(end_dim=-3))  # (10, 2, 3)
    with torch.no_grad():
        obs = lattice.track_and_observe(_beam_from_bmad(particles, geo))
    shape = (*geo["settings_shape"][:2], *obs[0].shape[-2:])
    return tuple(o.reshape(shape).numpy().astype(np.float32) for o in obs)


class _EpochTimer(L.Callback):
    """Wall time and optimizer-step count of every training epoch."""

    def __init__(self):
        self.times, self.steps = [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0, self._s0 = time.perf_counter(), trainer.global_step

    def on_train_epoch_end(self, trainer, pl_module):
        self.times.append(time.perf_counter() - self._t0)
        self.steps.append(trainer.global_step - self._s0)


def time_gpsr_epochs(images, geo, n_particles=10_000, epochs=3, warmup=1,
                     return_steps=False):
    """Train GPSR (NNParticleBeamGenerator + LitGPSR, gpsr's own loss and Adam lr 1e-3)
    on `images` = (screen 1, screen 2) and return per-epoch wall times [s] (warm-up
    epochs dropped).  One GPSR "epoch" is one pass over SixDReconstructionDataset, which
    holds n_k1 * n_tdc = 10 items (each item: both dipole states / both screens); gpsr's
    6D examples load it with batch_size=10, so one epoch = ONE Adam step on all 20 images
    (forward: generate 10k particles, track 10 x 2 beamlines, KDE 20 images; backward)."""
    torch.manual_seed(0)
    settings = _settings_tensor(geo)
    obs = tuple(torch.as_tensor(np.asarray(im), dtype=torch.float32) for im in images)
    lattice = build_gpsr_lattice(geo)
    dset = SixDReconstructionDataset(settings, obs, (lattice.screen_1, lattice.screen_2))
    loader = torch.utils.data.DataLoader(dset, batch_size=BATCH_SIZE)
    model = GPSR(NNParticleBeamGenerator(n_particles, geo["energy"]), lattice)
    timer = _EpochTimer()
    trainer = L.Trainer(max_epochs=warmup + epochs, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*number of training batches.*")
        trainer.fit(LitGPSR(model), train_dataloaders=loader)
    times = timer.times[warmup:]
    return (times, timer.steps[warmup:]) if return_steps else times


def central_fraction(images: np.ndarray) -> float:
    """Smallest fraction of an image's intensity inside its central 2/3 (both axes)."""
    ny, nx = images.shape[-2:]
    inner = images[..., ny // 6: ny - ny // 6, nx // 6: nx - nx // 6].sum((-1, -2))
    return float((inner / images.sum((-1, -2))).min())


def rms_pixels(images: np.ndarray) -> np.ndarray:
    """rms width (x, y) in pixels of every image: (..., 2)."""
    out = []
    for axis in (-2, -1):  # x profile: sum over rows; y profile: sum over columns
        prof = images.sum(axis)
        i = np.arange(prof.shape[-1])
        w = prof / prof.sum(-1, keepdims=True)
        mean = (w * i).sum(-1, keepdims=True)
        out.append(np.sqrt((w * (i - mean) ** 2).sum(-1)))
    return np.stack(out, -1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--particles", type=int, default=10_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--screen-method", choices=("kde", "cloud-in-cell"), default="kde")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")

    geo = gpsr_geometry()
    geo["screen_method"] = args.screen_method
    truth = make_truth_particles(args.particles, seed=0)
    t0 = time.perf_counter()
    images = simulate_gpsr_images(truth, geo)
    print(f"simulated {2 * images[0].shape[0] * images[0].shape[1]} images "
          f"{images[0].shape[-2:]} in {time.perf_counter() - t0:.2f} s")
    for name, im in zip(geo["screen_order"], images):
        rms = rms_pixels(im)
        print(f"  {name}: rms x {rms[..., 0].min():.1f}-{rms[..., 0].max():.1f} px, "
              f"y {rms[..., 1].min():.1f}-{rms[..., 1].max():.1f} px, "
              f"min intensity inside central 2/3: {central_fraction(im):.4f}")

    times, steps = time_gpsr_epochs(images, geo, args.particles, args.epochs,
                                    args.warmup, return_steps=True)
    med = statistics.median(times)
    print("GPSR epoch times [s]: " + ", ".join(f"{t:.3f}" for t in times))
    print(f"GPSR ({args.screen_method} screens) median epoch: {med:.3f} s; optimizer steps "
          f"per epoch: {steps[0]} (batch_size {BATCH_SIZE}); per step: {med / steps[0]:.3f} s")


if __name__ == "__main__":
    main()
