"""psr vs GPSR 0.2.0: one 6D training epoch (20 images of 200 x 200 px, 10,000 particles) on the
same data, in one process.

The data are GPSR's: its own 6D beamline (scan quadrupole, vertical TDC, dipole off/on, two screens;
`gpsr6d_peer.py`) images a ground-truth beam. psr gets the same beamline as a lattice file (the dipole
and the drift after it set per setting, as GPSR does), the same 20 images in a scan file, and checks
first that its own simulation of the truth reproduces GPSR's images (centroids and rms sizes).
Then both train: one epoch = one pass over the 20 images = one optimizer step for both (GPSR's
examples load its 10 dataset items, each with both screens, in one batch; psr takes the whole scan
as one batch). Epoch wall times come from a Lightning callback, warm-up epochs dropped.

GPSR is timed with Cheetah's KDE screens (its image diagnostic) and with Cheetah's cloud-in-cell
screens; psr with its cloud-in-cell and KDE screens, tracking the TDC and dipole particle by particle
(kick_drift, as GPSR does) and, as configs/gpsr_6d.yaml does, by their first-order maps. GPSR must
be installed (see gpsr6d_peer.py). Run on an idle machine: two cores shared with anything else make
the numbers meaningless.

    python benchmarks/bench_6d_epoch.py [--epochs 5] [--warmup 2] [--particles 10000]
"""

import argparse
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpsr6d_peer as peer  # noqa: E402

import sim  # noqa: E402
from models import MLPBeamGenerator  # noqa: E402
from psr.data.datamodule import ScanDataModule  # noqa: E402
from psr.training.reconstruction import PhaseSpaceReconstruction  # noqa: E402
from psr.data.scanfile import ScanData, ScreenData, write_scan  # noqa: E402

SETTING_NAMES = ["Q_SCAN.k1", "TDC.voltage", "B1.angle", "B1.length", "B1.e2", "D3.length"]


def psr_lattice_items(geo: dict, method: str) -> list[dict]:
    """GPSR's 6D beamline as a psr lattice file (element names as in gpsr where it has them)."""
    w, h = geo["screen_resolution"]
    screen = {"type": "Screen", "resolution": [w, h], "pixel_size": [geo["pixel_size"]] * 2, "method": method}
    if method == "kde":
        screen["kde_bandwidth"] = geo["kde_bandwidth"]
    return [
        {"type": "Quadrupole", "name": "Q_SCAN", "length": geo["l_quad"]},
        {"type": "Drift", "name": "D1", "length": geo["drift_quad_tdc"]},
        {"type": "TransverseDeflectingCavity", "name": "TDC", "length": geo["l_tdc"],
         "frequency": geo["tdc_frequency"], "phase": geo["tdc_phase"], "tilt": geo["tdc_tilt"]},
        {"type": "Drift", "name": "D2", "length": geo["drift_tdc_bend"]},
        {"type": "Dipole", "name": "B1", "length": geo["l_bend"], "e1": geo["dipole_e1"], "tracking": "kick_drift"},
        {"type": "Drift", "name": "D3", "length": geo["l3"]},
        {**screen, "name": "SCREEN_1"},
        {**screen, "name": "SCREEN_2"},
    ]


def psr_settings(geo: dict) -> tuple[np.ndarray, np.ndarray]:
    """(20, 6) settings table in GPSR's order and the (20,) dipole-on flags."""
    grid = geo["settings"]  # (20, 3): k1, V, G
    angle = geo["dipole_angle"].reshape(-1)
    table = np.stack([grid[:, 0], grid[:, 1], angle, geo["dipole_arc_length"].reshape(-1), angle,
                      geo["drift_bend_screen"].reshape(-1)], axis=-1)
    dipole_on = np.abs(angle) > 1e-6
    return table, dipole_on


def scan_from_gpsr_images(geo: dict, images, method: str) -> ScanData:
    """GPSR's images (screen 1: dipole off, screen 2: dipole on) as a psr scan file, NaN where unread."""
    table, dipole_on = psr_settings(geo)
    n_k1, n_tdc = geo["settings_shape"][:2]
    screens = {}
    for index, (name, on) in enumerate((("SCREEN_1", False), ("SCREEN_2", True))):
        per_setting = np.full((table.shape[0], *images[index].shape[-2:]), np.nan, dtype=np.float32)
        stack = images[index].reshape(n_k1 * n_tdc, *images[index].shape[-2:])
        per_setting[dipole_on == on] = stack  # gpsr's order: k1, tdc, dipole (dipole fastest)
        screens[name] = ScreenData(images=per_setting, pixel_size=(geo["pixel_size"],) * 2, center=(0.0, 0.0))
    return ScanData(lattice=psr_lattice_items(geo, method), settings=table, setting_names=SETTING_NAMES,
                    screens=screens, p0c=geo["p0c"], species="electron", charge=1e-10)


def check_same_physics(geo: dict, truth: torch.Tensor, images) -> float:
    """psr's images of the truth against GPSR's: worst centroid / rms difference in pixels."""
    table, dipole_on = psr_settings(geo)
    lattice = sim.Lattice.from_list(psr_lattice_items(geo, "cic")).double()
    values = {name: torch.as_tensor(table[:, i]) for i, name in enumerate(SETTING_NAMES)}
    with torch.no_grad():
        ours = lattice(sim.ParticleBeam(truth, geo["p0c"]), values).images
    worst = 0.0
    n_k1, n_tdc = geo["settings_shape"][:2]
    for index, (name, on) in enumerate((("SCREEN_1", False), ("SCREEN_2", True))):
        theirs = images[index].reshape(n_k1 * n_tdc, *images[index].shape[-2:])
        mine = ours[name].numpy()[dipole_on == on]
        for a, b in ((mine, theirs),):
            for axis in (-2, -1):
                pa, pb = a.sum(axis), b.sum(axis)
                i = np.arange(pa.shape[-1])
                wa, wb = pa / pa.sum(-1, keepdims=True), pb / pb.sum(-1, keepdims=True)
                ma, mb = (wa * i).sum(-1), (wb * i).sum(-1)
                sa = np.sqrt((wa * (i - ma[:, None]) ** 2).sum(-1))
                sb = np.sqrt((wb * (i - mb[:, None]) ** 2).sum(-1))
                worst = max(worst, np.abs(ma - mb).max(), np.abs(sa - sb).max())
    return float(worst)


def time_psr_epochs(scan: ScanData, n_particles: int, epochs: int, warmup: int,
                    tracking: dict | None = None) -> list[float]:
    """Train psr on the scan for warmup + epochs epochs of one full-batch step; epoch wall times [s]."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "scan.h5"
        write_scan(path, scan)
        data = ScanDataModule(str(path), val_every=0, steps_per_epoch=1)
        model = PhaseSpaceReconstruction(MLPBeamGenerator(n_particles, n_dim=6, hidden_width=32, hidden_layers=3,
                                                          scale=[1e-3, 1e-4, 1e-3, 1e-4, 1e-3, 1e-3]),
                                          warmup_steps=0, tracking=tracking)
        timer = peer._EpochTimer()
        trainer = L.Trainer(max_epochs=warmup + epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                            num_sanity_val_steps=0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*number of training batches.*")
            trainer.fit(model, datamodule=data)
    return timer.times[warmup:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--particles", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    geo = peer.gpsr_geometry()
    truth = peer.make_truth_particles(50_000, seed=0)
    images = peer.simulate_gpsr_images(truth, geo)
    print(f"data: GPSR's images of a 50k-particle truth, 2 x {images[0].shape[:2]} settings of {images[0].shape[-2:]} px")
    print(f"psr's images of the same truth vs GPSR's: worst centroid/rms difference {check_same_physics(geo, truth, images):.2f} px")

    results = {}
    results["GPSR (Cheetah, KDE screens)"] = statistics.median(
        peer.time_gpsr_epochs(images, geo, args.particles, args.epochs, args.warmup))
    results["GPSR (Cheetah, CIC screens)"] = statistics.median(
        peer.time_gpsr_epochs(images, {**geo, "screen_method": "cloud-in-cell"}, args.particles, args.epochs,
                              args.warmup))
    runs = {"psr (CIC screens)": ("cic", None), "psr (KDE screens)": ("kde", None),
            "psr (CIC, linear TDC + dipole)": ("cic", {"TDC": "linear", "B1": "linear"})}
    for name, (method, tracking) in runs.items():
        times = time_psr_epochs(scan_from_gpsr_images(geo, images, method), args.particles, args.epochs, args.warmup,
                                tracking)
        results[name] = statistics.median(times)
    reference = results["GPSR (Cheetah, KDE screens)"]
    print(f"\none 6D epoch (20 images {geo['screen_resolution']}, {args.particles} particles, median of {args.epochs}):")
    for name, seconds in results.items():
        print(f"  {name:32s} {seconds * 1e3:9.1f} ms   GPSR (KDE) / this = {reference / seconds:6.1f}x   "
              f"GPSR (CIC) / this = {results['GPSR (Cheetah, CIC screens)'] / seconds:5.1f}x")


if __name__ == "__main__":
    main()
