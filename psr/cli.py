"""The `psr` command: `psr fit` (LightningCLI), `psr simulate`, `psr ensemble`, `psr import`, `psr predict`,
`psr simulate-pairs` and `psr surrogate` (LightningCLI)."""

import json
import sys
import time
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from psr.data.datamodule import ScanDataModule
from psr.allocator import keep_freed_memory
from psr.preflight import check_config_files
from psr.training.reconstruction import PhaseSpaceReconstruction

TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
    "log_every_n_steps": 10,
    "enable_model_summary": False,
    "accelerator": "auto",
    "devices": 1,
}


class PsrCLI(LightningCLI):
    """LightningCLI for reconstructions; after `fit` it writes the beam, emittances and plots.

    Crash safety (psr/training/safety.py, resume.py): checkpoints (`--checkpoint.*`, a Lightning
    ModelCheckpoint) every `every_n_train_steps` steps and at each epoch end, with last.ckpt, written
    atomically; `--ckpt_path last` continues the newest run of the experiment in its own folder with
    the random state it had; a divergence guard stops a fit whose loss or weights stop being finite or
    whose beam leaves every screen, and writes the report from the last good checkpoint.
    """

    def init_parser(self, **kwargs):
        """Parsers that raise one-line InputErrors instead of printing their usage text."""
        parser = super().init_parser(**kwargs)
        parser.error = _raise_input_error
        return parser

    def instantiate_classes(self):
        """Config, scan file, output folder and memory are checked before anything is built or written."""
        from psr.preflight import check_fit_config

        self._checked_scan = check_fit_config(self.config["fit"]) if self.subcommand == "fit" else None
        super().instantiate_classes()

    def add_arguments_to_parser(self, parser):
        from psr.training.safety import CHECKPOINT_EVERY_N_STEPS, Checkpoints

        parser.add_lightning_class_args(Checkpoints, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": CHECKPOINT_EVERY_N_STEPS})

    def before_instantiate_classes(self):
        from psr.training.resume import resolve_last

        self._resume_note = resolve_last(self.config[self.subcommand]) if self.subcommand == "fit" else None
        fit_config = self.config[self.subcommand] if self.subcommand == "fit" else {}
        if fit_config.get("ckpt_path") and fit_config.get("model.init_from"):
            fit_config["model.init_from"] = None  # resuming: the checkpoint holds the generator (and the source may be gone)
        if self._resume_note:  # continuing in the run's own folder (metrics.csv is kept: before_fit)
            for message in (".*exists and is not empty.*", ".*dataloader is not resumable.*"):
                warnings.filterwarnings("ignore", message)  # every batch of an epoch is the same whole scan

    def _instantiate_trainer(self, config, callbacks):
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning.pytorch.plugins.io import CheckpointIO

        from psr.training.safety import AtomicCheckpointIO, DivergenceGuard, RandomState

        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        config = {**config, "plugins": plugins}
        return super()._instantiate_trainer(config, [RandomState(), DivergenceGuard(), *callbacks])

    def before_fit(self):
        from lightning.pytorch.loggers import CSVLogger

        from psr.data.atomic import remove_stale_temporaries
        from psr.training.resume import read_metrics_rows, restore_metrics
        from psr.training.run_folder import reserve_run_folder

        self._fit_started = time.perf_counter()
        scan = getattr(self, "_checked_scan", None)
        if scan is not None:  # read once by the checks; image and model/scan errors come before the run folder exists
            if self.datamodule.scan is None:
                self.datamodule.load(scan)
            if self.model.lattice is None:
                self.model.configure_scan(scan)
        if self.trainer.is_global_zero:
            reserve_run_folder(self.trainer.logger)
        run_dir = self.trainer.log_dir
        if not self.trainer.is_global_zero or run_dir is None:
            return
        for folder in (run_dir, f"{run_dir}/checkpoints"):
            remove_stale_temporaries(folder)
        if self._resume_note:
            print(self._resume_note)
            if isinstance(self.trainer.logger, CSVLogger):
                from psr.training.resume import checkpoint_step

                step = checkpoint_step(self.config[self.subcommand].ckpt_path)[0]
                restore_metrics(self.trainer.logger, *read_metrics_rows(f"{run_dir}/metrics.csv", step))

    def fit(self, model, **kwargs):
        """trainer.fit; a fit stopped by the divergence guard reports from its last good checkpoint."""
        from psr.training.safety import FitDiverged

        try:
            self.trainer.fit(model, **kwargs)
        except FitDiverged as err:
            self._report_divergence(err)

    def _report_divergence(self, err) -> None:
        import torch

        callback = self.trainer.checkpoint_callback
        last = Path(callback.dirpath) / "last.ckpt" if callback is not None and callback.dirpath else None
        if last is None or not last.is_file():
            raise ValueError(f"{err}; no checkpoint was written before it (--checkpoint.every_n_train_steps), "
                             "so there is no report") from None
        checkpoint = torch.load(last, map_location="cpu", weights_only=False)
        self.model.load_state_dict(checkpoint["state_dict"])
        self._write_outputs(int(checkpoint["global_step"]))
        raise ValueError(f"{err}; the report is written from the last good checkpoint {last} "
                         f"(step {checkpoint['global_step']})") from None

    def after_fit(self):
        self._write_outputs(self.trainer.global_step)

    def _write_outputs(self, step: int) -> None:
        from psr.outputs.report import format_calibration, format_emittances, report_notes, write_report

        elapsed = time.perf_counter() - self._fit_started
        run_dir = self.trainer.log_dir or "."
        if not self.trainer.is_global_zero:
            return
        if step == 0:
            raise ValueError("no optimizer step was made (trainer.max_epochs, max_steps or limit_train_batches is 0), "
                             "so there is no reconstruction to report: the run folder holds no beam")
        if getattr(self.model, "upstream", None):
            from psr.outputs.conditional_report import format_conditional, write_conditional_report

            report = write_conditional_report(self.model, self.datamodule, run_dir)
            print(f"\nfit took {elapsed:.1f} s")
            print(format_conditional(report))
        else:
            rows = write_report(self.model, self.datamodule, run_dir)
            print(f"\nfit took {elapsed:.1f} s")
            print(format_emittances(rows))
            for note in report_notes(rows):
                print(note)
        if len(self.model.calibration):
            print(format_calibration(self.model.calibration.report()))
        print(f"run folder: {run_dir}")


def _raise_input_error(message, ex=None):
    from psr.preflight import InputError, one_line

    raise InputError(one_line(message)) from None


def _quiet_training_warnings() -> None:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*IterableDataset` has `__len__`.*")  # ours: no workers


def fit_cli(args=None, run=True) -> PsrCLI:
    _quiet_training_warnings()
    keep_freed_memory()
    return PsrCLI(
        PhaseSpaceReconstruction,
        ScanDataModule,
        args=args,
        run=run,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "psr: phase-space reconstruction (subcommands below; also `psr simulate` and `psr ensemble`)"},
    )


class SurrogateCLI(LightningCLI):
    """`psr surrogate`: LightningCLI training a neural element on a pairs file; after `fit` it exports the
    element's weights file and writes surrogate.json and moments.png into the run folder."""

    def init_parser(self, **kwargs):
        parser = super().init_parser(**kwargs)
        parser.error = _raise_input_error
        return parser

    def before_fit(self):
        self.datamodule.setup("fit")  # the pairs file is checked, and the element built, before the run folder
        self.model.configure_pairs(self.datamodule.pairs)
        if self.trainer.is_global_zero:
            from psr.training.run_folder import reserve_run_folder

            reserve_run_folder(self.trainer.logger)

    def after_fit(self):
        from psr.outputs.surrogate_report import format_surrogate, write_surrogate_report

        if self.trainer.is_global_zero:
            run_dir = self.trainer.log_dir or "."
            print(format_surrogate(write_surrogate_report(self.model, self.datamodule, run_dir)))
            print(f"run folder: {run_dir}")


def surrogate_cli(args) -> SurrogateCLI:
    from psr.training.surrogate import PairsDataModule, SurrogateTraining

    if args and not args[0].startswith("-") or any(a in ("-h", "--help") for a in args[:1]):
        pass  # a subcommand (fit, validate, ...) or the help
    else:
        args = ["fit", *args]  # `psr surrogate --config ...` trains
    _quiet_training_warnings()
    return SurrogateCLI(SurrogateTraining, PairsDataModule, args=args, seed_everything_default=0,
                        trainer_defaults={**TRAINER_DEFAULTS, "logger": {
                            "class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs",
                                                                                                "name": "surrogate"}}},
                        save_config_kwargs={"overwrite": True},
                        parser_kwargs={"description": "psr surrogate: train a neural element on a pairs file"})


def simulate_pairs_cli(args) -> None:
    from jsonargparse import CLI

    from psr.data.simulate_pairs import simulate_pairs

    path = CLI(simulate_pairs, args=args, prog="psr simulate-pairs", as_positional=False)
    print(f"wrote {path}")


def simulate_cli(args) -> None:
    from jsonargparse import CLI

    from psr.data.simulate import simulate

    path = CLI(simulate, args=args, prog="psr simulate", as_positional=False)
    print(f"wrote {path}")


IMPORT_USAGE = """usage: psr import --config <name>.import.yaml [--output scan.h5]

Turn a folder of camera images and a settings table into a scan file: read PNG/TIFF/NPY frames, rotate
and flip them into the scan orientation, subtract dark frames, median filter, threshold, align shots,
crop around the beam and pool; write images, geometry and provenance (DESIGN.md, "Measured images").
--output overrides the config's output (a path relative to the current folder)."""


def import_cli(args: list[str]) -> None:
    import argparse

    from psr.data.importer import SaturationWarning, import_scan

    if not args or "-h" in args or "--help" in args:
        print(IMPORT_USAGE)
        raise SystemExit(0)
    parser = argparse.ArgumentParser(prog="psr import", usage=IMPORT_USAGE, add_help=False)
    parser.add_argument("--config", required=True)
    parser.add_argument("--output", default=None)
    parser.error = _raise_input_error
    options = parser.parse_args(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SaturationWarning)
        result = import_scan(options.config, options.output)
    for warning in caught:
        print(f"psr import: warning: {warning.message}", file=sys.stderr)
    for note in result.notes:
        print(note)
    print(f"wrote {result.path}")


PREDICT_USAGE = """usage: psr predict --run <run folder> --settings <table.csv> --output <folder> [--n_particles N]

The beams and images of a trained run (`psr fit`) at new settings: one row of the CSV table per prediction,
one column per setting (upstream settings of a conditional beam model, and any '<element>.<parameter>' of
the lattice; a scanned setting left out keeps the lattice's value). Writes <folder>/row_<i>.h5 (the beam at
row i, openPMD) and <folder>/images.h5 (screens/<NAME>: (rows, H, W) unit-sum images; settings: the table).
Upstream values outside the range the model was trained on are predicted with a warning. Without
--n_particles each beam is the one its report's emittances are of (the fit's own particles, or a draw of
model.report_particles); with it, N fresh ones (for a fit on fixed samples their tails were never fitted: their
emittances can differ from the report's by a few percent)."""


def predict_cli(args: list[str]) -> None:
    import argparse

    from psr.outputs.predict import predict

    if not args or "-h" in args or "--help" in args:
        print(PREDICT_USAGE)
        raise SystemExit(0)
    parser = argparse.ArgumentParser(prog="psr predict", usage=PREDICT_USAGE, add_help=False)
    parser.add_argument("--run", required=True)
    parser.add_argument("--settings", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--n_particles", type=int, default=None)
    parser.error = _raise_input_error
    options = parser.parse_args(args)
    if options.n_particles is not None and options.n_particles < 2:
        raise ValueError(f"--n_particles must be at least 2, got {options.n_particles}")
    folder, warnings = predict(options.run, options.settings, options.output, options.n_particles)
    for warning in warnings:
        print(f"psr predict: warning: {warning}", file=sys.stderr)
    print(f"wrote {folder}/row_<i>.h5 and {folder}/images.h5")


ENSEMBLE_USAGE = """usage: psr ensemble [--members M] [--first_seed S] [--parallel P] [--name NAME] <psr fit arguments>
       psr ensemble --member_index I --name NAME [--first_seed S] <psr fit arguments>
       psr ensemble --summarize <ensemble folder> [--members M]

Fit M reconstructions of one scan with seeds S, S+1, ... (each seeds the network and the base samples),
then write the mean and spread of emittances, phase-space projections and predicted images, with
confidence-band plots, into <save_dir>/<logger name>/<NAME>/ (members in member_<i>/).
Members run one after another in this process, or P at a time as separate `psr fit` processes, one
GPU each where there are several (default P: the number of GPUs if more than one, else 1).
--member_index I fits member I alone (seed S + I, into <NAME>/member_<I>/; e.g. one task of a SLURM
array job, itself on one or many processes, GPUs or nodes with --trainer.strategy ddp);
--summarize then writes the summary of the members member_0 ... member_<M-1> (default: all) of the folder.
Example: psr ensemble --members 5 --config configs/quad_scan_4d.yaml --trainer.max_epochs 8"""


def ensemble_cli(args: list[str]) -> None:
    import argparse

    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from psr.outputs.ensemble_summary import summarize_ensemble
    from psr.training.ensemble import member_folders, run_ensemble, run_member

    parser = argparse.ArgumentParser(prog="psr ensemble", usage=ENSEMBLE_USAGE, add_help=False)
    parser.add_argument("--members", type=int, default=None)
    parser.add_argument("--first_seed", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=None)
    parser.add_argument("--name", default=None)
    parser.add_argument("--member_index", type=int, default=None)
    parser.add_argument("--summarize", default=None)
    if not args or "-h" in args or "--help" in args:
        print(ENSEMBLE_USAGE)
        raise SystemExit(0)
    options, fit_args = parser.parse_known_args(args)
    if options.summarize is not None:
        if fit_args:
            raise ValueError(f"--summarize takes no psr fit arguments, got {fit_args}")
        folder = summarize_ensemble(member_folders(Path(options.summarize), options.members), Path(options.summarize))
    elif options.member_index is not None:
        if options.members is not None or options.parallel is not None:
            raise ValueError("--member_index fits one member: --members and --parallel do not apply")
        folder = run_member(fit_cli, fit_args, options.member_index, options.name, options.first_seed)
        if rank_zero_only.rank == 0:
            print(f"ensemble member {options.member_index}: {folder}")
        return
    else:
        member_dirs = run_ensemble(fit_cli, fit_args, options.members or 5, options.first_seed, options.parallel,
                                   options.name)
        if rank_zero_only.rank != 0:  # another process of distributed member fits: rank 0 summarizes
            return
        folder = summarize_ensemble(member_dirs, member_dirs[0].parent)
    print_ensemble_summary(folder)


def _band(row: dict, band: str, verdict: str) -> str:
    """'[low, high]' of an ensemble row's band, with whether it holds the truth where known."""
    low, high = row[band]
    held = "" if verdict not in row else (" (holds the truth)" if row[verdict] else " (misses the truth)")
    return f"[{low:.4e}, {high:.4e}]{held}"


def print_ensemble_summary(folder: Path) -> None:
    """Print an ensemble folder's summary (ensemble_emittances.json)."""
    from psr.outputs.ensemble_summary import UNDETERMINED_SPREAD
    from psr.outputs.report import format_emittances

    summary = json.loads((folder / "ensemble_emittances.json").read_text())
    rows = {key: {"reconstructed": row["mean"], **({"true": row["true"], "relative_error": row["mean_relative_error"]}
                                                   if "true" in row else {})}
            for key, row in summary["emittances"].items()}
    print(f"\nensemble of {summary['members']} (mean of members):")
    print(format_emittances(rows))
    print("relative spread (std / mean): " + ", ".join(
        f"{key} {100 * row['relative_std']:.2f} %" for key, row in summary["emittances"].items()))
    for key, row in summary["emittances"].items():
        if "band_2std" not in row:
            continue
        note = "" if row["determined"] else (
            "; not determined by this scan (its images fix too few of the beam's second moments)"
            if row.get("determined_by_scan") is False else
            f"; not determined by these data (members scatter by more than {100 * UNDETERMINED_SPREAD:g} %)")
        print(f"{key}: mean +- 2 std = {_band(row, 'band_2std', 'truth_in_band')}{note}")
        if "band_2std_with_model" in row:
            print(f"  with the space-charge model's bias {100 * row['space_charge_bias']:+.2f} %: corrected mean "
                  f"{row['corrected_mean']:.4e}, band {_band(row, 'band_2std_with_model', 'truth_in_band_with_model')}")
        if "band_2std_with_method" in row:
            print(f"  with the method's own error on hard beams{' with space charge' if summary.get('space_charge') else ''} "
                  f"(+- {100 * row['method_error']:g} %, in quadrature): "
                  f"{_band(row, 'band_2std_with_method', 'truth_in_band_with_method')}")
        if "band_95" in row:
            spread = 100 * row["band_95_factor"] * row["std"] / row["mean"]
            print(f"  95 % band ({summary['members']} members: +- {row['band_95_factor']:.2f} std"
                  f"{', from the mean to the corrected mean' if 'corrected_mean' in row else ''}) = "
                  f"{_band(row, 'band_95', 'truth_in_band_95')}: the members give it to +- {spread:.{1 if spread < 10 else 0}f} %")
    print(f"mean spread of the phase-space projections: {summary['mean_projection_spread']:.4f}")
    if summary.get("by_upstream"):
        checks = [(key, e["truth_in_band"]) for row in summary["by_upstream"] for key, e in row["emittances"].items()
                  if "truth_in_band" in e]
        print(f"at the {len(summary['by_upstream'])} upstream settings (conditional model; beam.h5 above is the first): "
              f"{sum(ok for _, ok in checks)} of {len(checks)} +-2 std bands hold the truth (ensemble_emittances.json, "
              "by_upstream)")
    if summary.get("calibration"):
        from psr.outputs.report import format_calibration

        print(format_calibration(summary["calibration"]).replace("calibration:", "calibration (members' mean):"))
    if summary.get("entropy_nats"):
        print(f"entropy: {summary['entropy_nats']['mean']:.3f} +- {summary['entropy_nats']['std']:.3f} nats")
    print(f"ensemble folder: {folder}")


def main(argv=None) -> None:
    """Entry point. Bad input (files, settings, parameters) ends with one error line and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    _quiet_startup()
    keep_freed_memory()
    try:
        if command in ("fit", "ensemble", "simulate", "simulate-pairs", "surrogate"):
            check_config_files(argv[1:])
        if command == "simulate":
            simulate_cli(argv[1:])
        elif command == "simulate-pairs":
            simulate_pairs_cli(argv[1:])
        elif command == "surrogate":
            surrogate_cli(argv[1:])
        elif command == "ensemble":
            ensemble_cli(argv[1:])
        elif command == "import":
            import_cli(argv[1:])
        elif command == "predict":
            predict_cli(argv[1:])
        elif command == "render-camera":
            from psr.data.camera import render_camera_cli

            render_camera_cli(argv[1:])
        else:
            fit_cli(argv)
        _close_process_group()
    except (ValueError, KeyError, OSError, MemoryError) as err:
        print(f"psr {command or 'fit'}: error: {_error_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None


def _close_process_group() -> None:
    """End a distributed run's process group in every process before it exits: left to the interpreter's
    shutdown, gloo's threads may abort a finished process ("terminate called without an active exception"),
    and Lightning then kills the others, rank 0 with its report half written."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _quiet_startup() -> None:
    """No tips, seed or accelerator banners from Lightning (warnings still show), no notice that the
    CLI was given its arguments from Python."""
    import logging

    warnings.filterwarnings("ignore", ".*LightningCLI's args parameter.*")
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _error_line(err: BaseException) -> str:
    """One line for an error: the message of bad input, the file of an OS error, the size of a failed allocation."""
    from psr.preflight import one_line

    if isinstance(err, KeyError) and err.args:
        return one_line(str(err.args[0]))
    if isinstance(err, MemoryError):
        return f"out of memory ({err or 'allocation failed'}): use fewer particles or settings"
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.strerror:
        return f"{err.filename or ''}: {err.strerror}".lstrip(": ")
    if isinstance(err, FileNotFoundError) and err.filename:
        return f"{err.filename}: no such file"
    return one_line(str(err))


if __name__ == "__main__":
    main()
