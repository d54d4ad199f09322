"""Run folders: one for each fit, even for fits started at once; the checkpoint a run folder holds."""

import re
from pathlib import Path


def reserve_run_folder(logger) -> None:
    """Give a CSVLogger without a version the next free save_dir/name/version_N, made with an exclusive mkdir:
    Lightning picks max(N) + 1 by listing the folder, so two fits started together got the same N and wrote
    over each other's beam and report. Other loggers, and a version set in the config, are left as they are."""
    from lightning.pytorch.loggers import CSVLogger

    if not isinstance(logger, CSVLogger) or logger._version is not None:
        return
    root = Path(logger.root_dir)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name))]
    version = max(taken, default=-1) + 1
    while True:
        try:
            (root / f"version_{version}").mkdir()
            break
        except FileExistsError:
            version += 1
    logger._version = version


def find_checkpoint(run: Path) -> Path:
    """checkpoints/last.ckpt of a run folder, else its newest checkpoint; a ValueError when it has none."""
    folder = run / "checkpoints"
    last = folder / "last.ckpt"
    if last.is_file():
        return last
    found = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if not found:
        raise ValueError(f"run folder {run}: holds no trained model (no checkpoint in {folder})")
    return found[-1]
