"""The `psr` command: `psr fit` (LightningCLI) and `psr simulate`."""

import sys
import time
import warnings

from lightning.pytorch.cli import LightningCLI

from .datamodule import ScanDataModule
from .reconstruction import PhaseSpaceReconstruction

TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
    "log_every_n_steps": 10,
    "enable_model_summary": False,
    "accelerator": "auto",
    "devices": 1,
}


class PsrCLI(LightningCLI):
    """LightningCLI for reconstructions; after `fit` it writes the beam, emittances and plots."""

    def before_fit(self):
        self._fit_started = time.perf_counter()

    def after_fit(self):
        from .report import format_emittances, write_report

        elapsed = time.perf_counter() - self._fit_started
        run_dir = self.trainer.log_dir or "."
        if not self.trainer.is_global_zero:
            return
        rows = write_report(self.model, self.datamodule, run_dir)
        print(f"\nfit took {elapsed:.1f} s")
        print(format_emittances(rows))
        print(f"run folder: {run_dir}")


def fit_cli(args=None, run=True) -> PsrCLI:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    return PsrCLI(
        PhaseSpaceReconstruction,
        ScanDataModule,
        args=args,
        run=run,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "psr: phase-space reconstruction (subcommands below; also `psr simulate`)"},
    )


def simulate_cli(args) -> None:
    from jsonargparse import CLI

    from .simulate import simulate

    path = CLI(simulate, args=args, prog="psr simulate", as_positional=False)
    print(f"wrote {path}")


def main(argv=None) -> None:
    """Entry point. Bad input (files, settings, parameters) ends with one error line and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "simulate" if argv and argv[0] == "simulate" else (argv[0] if argv else "")
    try:
        if command == "simulate":
            simulate_cli(argv[1:])
        else:
            fit_cli(argv)
    except (ValueError, KeyError, FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"psr {command}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
