"""Cost of crash safety in `psr fit` on the shipped 4D example (configs/quad_scan_4d.yaml, 20k particles):
time per checkpoint (trainer.save_checkpoint: the guard's check of the weights, torch.save to a temporary
file, fsync, rename), per step of the divergence guard and of the random-state capture, against the
time of a training step.

    python benchmarks/bench_crash_safety.py [--steps 200] [--every 10]
"""

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import lightning as L

from psr.cli import fit_cli
from psr.training.safety import DivergenceGuard, RandomState

TIMES: dict[str, list[float]] = defaultdict(list)


def timed(name, function):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            TIMES[name].append(time.perf_counter() - start)
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=10)
    options = parser.parse_args()
    L.Trainer.save_checkpoint = timed("checkpoint", L.Trainer.save_checkpoint)
    DivergenceGuard.on_train_batch_end = timed("guard", DivergenceGuard.on_train_batch_end)
    RandomState.on_train_batch_end = timed("random state", RandomState.on_train_batch_end)
    RandomState.on_train_batch_start = timed("random state", RandomState.on_train_batch_start)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        cli = fit_cli(["--config", "configs/quad_scan_4d.yaml", f"--trainer.max_steps={options.steps}",
                       f"--checkpoint.every_n_train_steps={options.every}", "--trainer.enable_progress_bar=false",
                       f"--trainer.logger.init_args.save_dir={folder}"], run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        total = time.perf_counter() - start
        size = (Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt").stat().st_size
    steps = cli.trainer.global_step
    saves = TIMES["checkpoint"]
    print(f"{steps} steps in {total:.1f} s ({1e3 * total / steps:.1f} ms per step, everything included)")
    print(f"checkpoint: {len(saves)} files of {size / 1e3:.0f} kB, {1e3 * sum(saves) / len(saves):.1f} ms each "
          f"(two files per save: the step checkpoint and last.ckpt); every {options.every} steps: "
          f"{1e3 * sum(saves) / steps:.2f} ms per step")
    for name in ("guard", "random state"):
        print(f"{name}: {1e3 * sum(TIMES[name]) / steps:.3f} ms per step")


if __name__ == "__main__":
    main()
