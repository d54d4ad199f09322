"""The conditional beam model against independent reconstructions at each upstream setting, with the same images.

    python benchmarks/conditional_injector.py [--run runs/conditional_injector/version_N] [--max_epochs 8]
                                              [--independent independent.json]

Without --run it first fits configs/conditional_injector.yaml (timed). Then, for every upstream setting of
data/conditional_injector.h5, it fits the shipped 4D defaults (configs/quad_scan_4d.yaml, a plain
MLPBeamGenerator) to that setting's 3 images alone, and prints, per upstream setting and summarized over the
training and the held-out settings, the emittance errors of both against the true beams. The held-out
settings' images were not seen by the conditional model; the independent fits do see them. With
--independent FILE the independent fits' emittances are read from FILE when it exists (written there
otherwise), so a new conditional run is compared without refitting the 36 settings.
"""

import argparse
import json
import re
import sys
import tempfile
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from psr.cli import main  # noqa: E402
from psr.data.scanfile import ScanData, read_scan, write_scan  # noqa: E402
from psr.outputs.conditional_report import upstream_points  # noqa: E402

KEYS = ("norm_emit_x", "norm_emit_y", "norm_emit_x_core90", "norm_emit_y_core90")


def fit(args: list[str]) -> tuple[Path, float]:
    """Run `psr fit` quietly; (run folder, seconds)."""
    started = time.perf_counter()
    buffer = StringIO()
    with redirect_stdout(buffer):
        main(["fit", *args, "--trainer.enable_progress_bar=false"])
    run = re.search(r"run folder: (\S+)", buffer.getvalue()).group(1)
    return Path(run), time.perf_counter() - started


def independent_fit(scan, rows: np.ndarray, folder: Path, max_epochs: int) -> dict:
    """Fit one upstream setting's images alone (all of them: no validation); its emittance table."""
    lattice_columns = [i for i, n in enumerate(scan.setting_names) if n not in scan.upstream]
    part = ScanData(lattice=scan.lattice, settings=scan.settings[np.ix_(rows, lattice_columns)],
                    setting_names=[scan.setting_names[i] for i in lattice_columns],
                    screens={name: type(screen)(images=screen.images[rows], pixel_size=screen.pixel_size,
                                                center=screen.center) for name, screen in scan.screens.items()},
                    p0c=scan.p0c, species=scan.species, charge=scan.charge)
    folder.mkdir(parents=True, exist_ok=True)
    path = write_scan(folder / "point.h5", part)
    run, _ = fit(["--config", str(ROOT / "configs/quad_scan_4d.yaml"), f"--data.path={path}", "--data.val_every=0",
                  f"--trainer.max_epochs={max_epochs}", f"--trainer.logger.init_args.save_dir={folder / 'runs'}"])
    table = json.loads((run / "emittances.json").read_text())
    return {key: table[key]["reconstructed"] for key in KEYS}


def main_benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a trained conditional run folder (default: fit one now)")
    parser.add_argument("--data", default=str(ROOT / "data/conditional_injector.h5"))
    parser.add_argument("--max_epochs", type=int, default=8, help="epochs (100 steps) of each independent fit")
    parser.add_argument("--limit", type=int, default=None, help="independent fits of only the first N settings")
    parser.add_argument("--independent", default=None, help="JSON of the independent fits' emittances (read/written)")
    options = parser.parse_args()
    if options.run is None:
        run, seconds = fit(["--config", str(ROOT / "configs/conditional_injector.yaml"), f"--data.path={options.data}"])
        print(f"conditional model: trained in {seconds:.0f} s ({run})")
    else:
        run = Path(options.run)
    report = json.loads((run / "emittances.json").read_text())
    scan = read_scan(options.data)
    points, groups = upstream_points(scan)
    count = len(points) if options.limit is None else min(options.limit, len(points))
    errors = {"conditional": {True: [], False: []}, "independent": {True: [], False: []}}
    cache = Path(options.independent) if options.independent else None
    stored = json.loads(cache.read_text()) if cache is not None and cache.exists() else {}
    if stored and stored.get("data") != str(Path(options.data).resolve()):
        sys.exit(f"{cache}: independent fits of {stored.get('data')}, not of {options.data}")
    fitted = {}
    print(f"{'upstream':>16s} {'held':>5s}  " + "  ".join(f"{k[10:]:>18s}" for k in KEYS) + "   (conditional / independent error)")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for g in range(count):
            row = report["points"][g]
            truth = {k: row["emittances"][k]["true"] for k in KEYS}
            conditional = {k: row["emittances"][k]["reconstructed"] for k in KEYS}
            if str(g) in stored.get("points", {}):
                alone = stored["points"][str(g)]
            else:
                alone = independent_fit(scan, np.flatnonzero(groups == g), Path(tmp) / f"p{g}", options.max_epochs)
            fitted[str(g)] = alone
            c_err = np.array([conditional[k] / truth[k] - 1 for k in KEYS])
            i_err = np.array([alone[k] / truth[k] - 1 for k in KEYS])
            errors["conditional"][row["held_out"]].append(c_err)
            errors["independent"][row["held_out"]].append(i_err)
            label = ", ".join(f"{v:.3g}" for v in points[g])
            print(f"{label:>16s} {'yes' if row['held_out'] else '':>5s}  "
                  + "  ".join(f"{100 * c:+7.2f}/{100 * i:+7.2f} %" for c, i in zip(c_err, i_err)), flush=True)
    print(f"independent fits: {time.perf_counter() - started:.0f} s for {count} upstream settings"
          + (f" (read from {cache})" if stored else ""))
    if cache is not None and not stored:
        cache.write_text(json.dumps({"data": str(Path(options.data).resolve()), "max_epochs": options.max_epochs,
                                     "points": fitted}, indent=1))
    for held in (False, True):
        for method in ("conditional", "independent"):
            table = np.abs(np.array(errors[method][held]))
            if not len(table):
                continue
            print(f"{'held-out' if held else 'training'} settings ({len(table)}), {method:11s}: mean |error| "
                  + ", ".join(f"{k[10:]} {100 * m:.2f} %" for k, m in zip(KEYS, table.mean(0)))
                  + "; max " + ", ".join(f"{100 * m:.2f} %" for m in table.max(0)))


if __name__ == "__main__":
    main_benchmark()
