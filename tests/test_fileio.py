"""Tests for utils/fileio.py and run_cli's handling of paths that cannot be written: one line, exit 2, nothing
half-written."""
from __future__ import annotations

import pytest

import export_onnx
from tests.helpers import one_line_error
from utils.errors import InputError
from utils.fileio import atomic_output, atomic_write_text, ensure_folder


def test_a_folder_that_cannot_be_made_is_an_input_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot create the folder .*choose another output location"):
        ensure_folder(blocker / "sub")
    with pytest.raises(InputError, match="cannot create the folder"):
        atomic_write_text(blocker / "sub" / "out.json", "{}")
    assert ensure_folder(tmp_path / "a" / "b").is_dir()


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_export_to_an_impossible_folder_is_one_line(calibrated, tmp_path, capsys):
    from utils.quant.calibration import save_calibrated

    weights = save_calibrated(tmp_path / "calibrated.pt", calibrated)
    line = one_line_error(export_onnx, ["--weights", str(weights), "--img-size", "64", "--output",
                                        "/proc/forbidden/model.onnx"], capsys)
    assert "/proc/forbidden" in line
