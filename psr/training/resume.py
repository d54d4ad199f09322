"""`psr fit --ckpt_path last`: continue the newest run of an experiment in its own run folder."""

import csv
import io
import re
from pathlib import Path

import torch

from psr.data.atomic import atomic_target

CSV_LOGGER_DEFAULT_NAME = "lightning_logs"


def newest_run_with_checkpoint(save_dir, name: str) -> tuple[int, Path] | None:
    """(N, path of last.ckpt) of the run folder save_dir/name/version_N with the highest N that has
    checkpoints/last.ckpt; None when no run folder has one."""
    root = Path(save_dir) / name
    runs = []
    for folder in root.glob("version_*"):
        match = re.fullmatch(r"version_(\d+)", folder.name)
        if match and (folder / "checkpoints" / "last.ckpt").is_file():
            runs.append((int(match.group(1)), folder / "checkpoints" / "last.ckpt"))
    return max(runs) if runs else None


def checkpoint_step(path) -> tuple[int, int]:
    """(global step, epoch) stored in a Lightning checkpoint."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return int(checkpoint.get("global_step", 0)), int(checkpoint.get("epoch", 0))


def resolve_last(fit_config) -> str | None:
    """Turn `ckpt_path: last` of a `psr fit` config (a jsonargparse Namespace) into the newest run's
    last.ckpt and point the logger at that run's folder, so the fit continues there. Returns the
    message to print, None when ckpt_path is not "last". ValueError when there is nothing to resume."""
    if fit_config.get("ckpt_path") != "last":
        return None
    dirpath = fit_config.get("checkpoint.dirpath") if "checkpoint" in fit_config else None
    if dirpath:
        path = Path(dirpath) / "last.ckpt"
        if not path.is_file():
            raise ValueError(f"nothing to resume (ckpt_path last): no {path} (checkpoint.dirpath); "
                             "start without --ckpt_path")
        fit_config.ckpt_path = str(path)
        return f"resuming from {path} (step {checkpoint_step(path)[0]})"
    logger = fit_config.get("trainer.logger")
    init_args = getattr(logger, "init_args", None) if logger not in (None, True, False) else None
    if init_args is None or init_args.get("save_dir") is None:
        raise ValueError("ckpt_path last needs trainer.logger with a save_dir (the runs are found under "
                         "<save_dir>/<name>/version_N), or give the checkpoint's path")
    save_dir, name = init_args.get("save_dir"), init_args.get("name") or CSV_LOGGER_DEFAULT_NAME
    found = newest_run_with_checkpoint(save_dir, name)
    if found is None:
        raise ValueError(f"nothing to resume (ckpt_path last): no run of experiment {name!r} has a checkpoint "
                         f"({Path(save_dir) / name}/version_*/checkpoints/last.ckpt); start without --ckpt_path")
    version, path = found
    init_args.version = version
    fit_config.ckpt_path = str(path)
    step, epoch = checkpoint_step(path)
    return f"resuming {path.parent.parent} from {path} (step {step}, epoch {epoch})"


def read_metrics_rows(path, before_step: int) -> tuple[list[str], list[dict]]:
    """Header and rows of a CSVLogger metrics.csv with step < before_step (rows a kill cut short are
    dropped); ([], []) without a file."""
    path = Path(path)
    if not path.is_file():
        return [], []
    reader = csv.DictReader(io.StringIO(path.read_text(errors="replace")))
    header = list(reader.fieldnames or [])
    rows = []
    for row in reader:
        if None in row or any(value is None for value in row.values()):
            continue  # a line the killed writer left incomplete
        try:
            step = int(float(row.get("step") or 0))
        except ValueError:
            continue
        if step < before_step:
            rows.append(row)
    return header, rows


def restore_metrics(logger, header: list[str], rows: list[dict]) -> None:
    """Put the resumed run's earlier metrics back into the CSVLogger's metrics.csv (which the logger
    deletes when it starts) and make the logger append to them."""
    if not header:
        return
    writer = logger.experiment
    writer.metrics_keys = sorted(set(writer.metrics_keys) | set(header))  # the columns it appends
    text = io.StringIO()
    table = csv.DictWriter(text, fieldnames=writer.metrics_keys)
    table.writeheader()
    table.writerows(rows)
    with atomic_target(writer.metrics_file_path) as tmp:
        tmp.write_text(text.getvalue())
