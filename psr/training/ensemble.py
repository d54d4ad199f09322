"""Ensembles: M reconstructions of one scan with different seeds (`psr ensemble`); the summary of their
spread is in psr.outputs.ensemble_summary."""

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def member_arguments(fit_args: list[str], seed: int, version: str) -> list[str]:
    """`psr fit` arguments of one member: its seed (network, base samples and, with `model.calibrate`, the
    calibration's random start unless the arguments say otherwise) and its run folder."""
    return ["fit", "--model.calibration_start=random", *fit_args, f"--seed_everything={seed}", f"--model.generator.init_args.seed={seed}",
            f"--trainer.logger.init_args.version={version}"]


def run_ensemble(fit: Callable, fit_args: list[str], members: int, first_seed: int = 0,
                 parallel: int | None = None, name: str | None = None) -> list[Path]:
    """Fit `members` reconstructions (seeds first_seed, first_seed + 1, ...) and summarize them.

    fit: runs one `psr fit` in this process from its arguments and returns the LightningCLI (psr.cli.fit_cli).
    fit_args: `psr fit` arguments (a config with a CSVLogger). Members run one after another in this
    process, or `parallel` at a time as `psr fit` processes, one device each where there are several
    GPUs (default: parallel = the number of GPUs when there are several, else 1). Returns the
    members' run folders <save_dir>/<name>/<ensemble name>/member_<i>.
    """
    if members < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {members}")
    gpus = torch.cuda.device_count()
    parallel = parallel or (gpus if gpus > 1 else 1)
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    name = name or time.strftime("ensemble_%Y%m%d-%H%M%S")
    versions = [f"{name}/member_{i}" for i in range(members)]
    seeds = [first_seed + i for i in range(members)]
    first = fit(member_arguments(fit_args, seeds[0], versions[0]))  # also checks the arguments
    folder = Path(first.trainer.log_dir).parent
    rest = list(zip(seeds[1:], versions[1:]))
    if parallel == 1:
        for seed, version in rest:
            fit(member_arguments(fit_args, seed, version))
    else:
        _run_processes(fit_args, rest, parallel, gpus)
    return [folder / f"member_{i}" for i in range(members)]


def run_member(fit: Callable, fit_args: list[str], index: int, name: str, first_seed: int = 0) -> Path:
    """Fit member `index` (seed first_seed + index) of the ensemble `name` on its own, e.g. as one task of
    a SLURM array job (its fit may itself run over several processes: Lightning's ddp strategy).
    Returns its run folder <save_dir>/<logger name>/<name>/member_<index>."""
    if index < 0:
        raise ValueError(f"--member_index must be >= 0, got {index}")
    if not name:
        raise ValueError("--member_index needs --name (the ensemble's folder, the same for every member)")
    cli = fit(member_arguments(fit_args, first_seed + index, f"{name}/member_{index}"))
    return Path(cli.trainer.log_dir)


def member_folders(folder: Path, members: int | None = None) -> list[Path]:
    """The run folders member_0 ... member_<members - 1> of an ensemble folder; members None: every
    member_<i> folder in it, which must be numbered 0, 1, ... without a gap."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such ensemble folder")
    found = {int(d.name[7:]) for d in folder.glob("member_*") if d.is_dir() and d.name[7:].isdigit()}
    count = members if members is not None else max(found, default=-1) + 1
    missing = sorted(set(range(count)) - found)
    if missing:
        raise FileNotFoundError(f"{folder}: no member folder(s) {', '.join(f'member_{i}' for i in missing)} "
                                "(has every member's fit finished?)")
    return [folder / f"member_{i}" for i in range(count)]


def _run_processes(fit_args, jobs, parallel: int, gpus: int) -> None:
    """Run `psr fit` for every (seed, version), at most `parallel` at once, GPU i % gpus each."""
    running, failed = [], []
    for slot, (seed, version) in enumerate(jobs):
        while len(running) >= parallel:
            running = _reap(running, failed)
            time.sleep(0.2)
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
        command = [sys.executable, "-m", "psr.cli", *member_arguments(fit_args, seed, version),
                   "--trainer.enable_progress_bar=false"]
        running.append((version, subprocess.Popen(command, env=env)))
    while running:
        running = _reap(running, failed)
        time.sleep(0.2)
    if failed:
        raise RuntimeError(f"ensemble member run(s) failed: {failed}")


def _reap(running, failed):
    still = []
    for version, process in running:
        code = process.poll()
        if code is None:
            still.append((version, process))
        elif code:
            failed.append(f"{version} (exit code {code})")
    return still


