"""Synthetic camera, full size: the shipped 4D example scan (non-Gaussian beam) rendered as raw 16-bit frames of a
1280 x 960 camera mounted at 90 degrees (pedestal, shot and read noise, hot pixels, 2 saturated frames, 3 shots per
setting with centroid jitter, 5 dark frames), imported with `psr import`, and fitted like the clean images.

    python benchmarks/camera_pipeline.py [--epochs 16] [--folder /tmp/camera_pipeline]

Prints the normalized emittances of the clean fit, the camera fit and the truth, and their relative differences
(targets: camera within 3 % of the clean fit, within 5 % of the truth).
"""

import argparse
import json
import time
import warnings
from pathlib import Path

from psr.cli import fit_cli
from psr.data.camera import render_camera
from psr.data.importer import import_scan

ROOT = Path(__file__).resolve().parents[1]
SCAN = ROOT / "data" / "quad_scan_4d.h5"
CONFIG = ROOT / "configs" / "quad_scan_4d.yaml"


def fit(path: Path, folder: Path, name: str, epochs: int, seed: int) -> dict:
    """Fit a scan file with the shipped 4D config; returns emittances.json of the run."""
    cli = fit_cli(args=["fit", "--config", str(CONFIG), f"--data.path={path}", f"--trainer.max_epochs={epochs}",
                        f"--seed_everything={seed}", f"--trainer.logger.init_args.save_dir={folder}",
                        f"--trainer.logger.init_args.name={name}", "--trainer.enable_progress_bar=false"])
    return json.loads((Path(cli.trainer.log_dir) / "emittances.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folder", default="/tmp/camera_pipeline")
    options = parser.parse_args()
    folder = Path(options.folder)
    start = time.perf_counter()
    config = render_camera(str(SCAN), str(folder / "camera"), resolution=(1280, 960), rotate=90, flip="none",
                           peak_counts=50000.0, pedestal=100.0, pedestal_pattern=5.0, read_noise=5.0, hot_pixels=20,
                           saturated_frames=2, saturation=1.5, shots=3, jitter=30e-6, darks=5, seed=1)
    rendered = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = import_scan(config)
    imported = time.perf_counter()
    print("\n".join(result.notes))
    print(f"{sum('saturated' in str(w.message) for w in caught)} saturation warning(s)")
    clean = fit(SCAN, folder / "runs", "clean", options.epochs, options.seed)
    camera = fit(result.path, folder / "runs", "camera", options.epochs, options.seed)
    print(f"\nrender {rendered - start:.0f} s, import {imported - rendered:.0f} s, two fits {time.perf_counter() - imported:.0f} s")
    print(f"{'':12} {'clean fit':>12} {'camera fit':>12} {'truth':>12} {'camera/clean-1':>15} {'camera/truth-1':>15} "
          f"{'clean/truth-1':>14}")
    for plane in ("x", "y"):
        key = f"norm_emit_{plane}"
        c, m, t = clean[key]["reconstructed"], camera[key]["reconstructed"], clean[key]["true"]
        print(f"{key:12} {c * 1e6:10.4f}um {m * 1e6:10.4f}um {t * 1e6:10.4f}um {100 * (m / c - 1):14.2f}% "
              f"{100 * (m / t - 1):14.2f}% {100 * (c / t - 1):13.2f}%")


if __name__ == "__main__":
    main()
