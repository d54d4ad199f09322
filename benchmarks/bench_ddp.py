"""One reconstruction in one process against the same fit over W processes (Lightning ddp, gloo on CPU).

Runs `psr fit` on the shipped 4D example (20k particles, 8 training settings) for `--steps` steps,
once in one process and once over `--devices` processes (one torch thread each, so the two runs use
the same cores), and prints the time of each fit (psr's "fit took": for the distributed fit it
includes starting the other processes, which Lightning does inside trainer.fit), the largest
relative difference of the train_loss curves and of the final emittances. With `--precision 64-true` both fits run in float64,
which separates float32 rounding (amplified by the fit's own dynamics) from any real difference.

    python benchmarks/bench_ddp.py [--steps 100] [--devices 2] [--precision 32-true] [--config ...]
"""

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(folder: Path, version: str, args, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "psr.cli", "fit", "--config", args.config, f"--trainer.max_steps={args.steps}",
               "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
               f"--trainer.precision={args.precision}", f"--trainer.logger.init_args.save_dir={folder}",
               f"--trainer.logger.init_args.version={version}", *extra]
    done = subprocess.run(command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)),
                          capture_output=True, text=True, check=True)
    run_dir = Path(re.search(r"run folder: (.*)", done.stdout).group(1).strip())
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    return {"seconds": float(re.search(r"fit took ([\d.]+) s", done.stdout).group(1)),
            "loss": {int(r["step"]): float(r["train_loss"]) for r in rows if r.get("train_loss")},
            "emittances": json.loads((run_dir / "emittances.json").read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quad_scan_4d.yaml")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--precision", default="32-true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        single = run(Path(tmp), "single", args, [])
        ddp = run(Path(tmp), "ddp", args, ["--trainer.strategy=ddp", f"--trainer.devices={args.devices}"])
    loss = {k: abs(ddp["loss"][k] - v) / abs(v) for k, v in single["loss"].items()}
    first = next((k for k in sorted(loss) if loss[k] > 1e-5), None)
    print(f"{args.config}, {args.steps} steps, {args.precision}, load average {os.getloadavg()[0]:.1f}")
    print(f"fit: 1 process {single['seconds']:.1f} s, {args.devices} processes {ddp['seconds']:.1f} s")
    print(f"train_loss: max relative difference {max(loss.values()):.2e} over {len(loss)} steps; "
          f"first step above 1e-5: {first}")
    for key, row in single["emittances"].items():
        if not isinstance(row, dict) or "reconstructed" not in row:
            continue
        a, b = row["reconstructed"], ddp["emittances"][key]["reconstructed"]
        print(f"{key}: {a:.6e} vs {b:.6e} (relative difference {abs(b - a) / abs(a):.1e})")


if __name__ == "__main__":
    main()
