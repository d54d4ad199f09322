"""The `psr` command line: help for every subcommand, config printing, clear errors."""

import subprocess
import sys

import pytest

from psr.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "psr.cli", *args], capture_output=True, text=True, timeout=120)


def run_in_process(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out = capsys.readouterr()
    return exit_info.value.code or 0, out.out, out.err


@pytest.mark.parametrize("args", [["--help"], ["fit", "--help"], ["simulate", "--help"], ["ensemble", "--help"]])
def test_help(capsys, args):
    code, out, err = run_in_process(capsys, *args)
    assert code == 0, err
    assert "usage" in out.lower()


def test_print_config_resolves_generator(capsys):
    code, out, err = run_in_process(capsys, "fit", "--config", "configs/quad_scan_4d.yaml", "--print_config")
    assert code == 0, err
    assert "MLPBeamGenerator" in out
    assert "data/quad_scan_4d.h5" in out


def test_unknown_option_is_rejected(capsys):
    code, out, err = run_in_process(capsys, "fit", "--config", "configs/quad_scan_4d.yaml", "--model.no_such_option=1")
    assert code != 0
    assert "no_such_option" in err


def test_simulate_rejects_unequal_setting_lists(tmp_path, capsys):
    lattice = tmp_path / "lat.yaml"
    lattice.write_text("- {type: Quadrupole, name: Q1, length: 0.1}\n- {type: Screen, name: S}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", f"--output={tmp_path / 'x.h5'}", f"--lattice={lattice}", "--p0c=1e7",
              "--settings", '{"Q1.k1": [1, 2], "Q1.tilt": [0]}',
              "--beam=psr.data.synthetic.SyntheticBeam"])
    assert exit_info.value.code == 2
    assert "different lengths" in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()


def test_fit_on_bad_scan_file_names_the_problem(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    result = run("fit", "--config", "configs/quad_scan_4d.yaml", f"--data.path={bad}", "--trainer.max_epochs=1",
                 f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}")
    assert result.returncode == 2
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines  # no banners, tips or warnings before the error in a real process
    assert lines[0].startswith("psr fit: error: ") and "not an HDF5 file" in lines[0]
    assert not (tmp_path / "runs").exists()
