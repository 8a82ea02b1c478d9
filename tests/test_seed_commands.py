"""The seed's own command lines (YOLOv6's tools/partial_quantization README), typed exactly as its users type them,
on the bundled model: the sensitivity analysis, the partial quantization without an evaluation set, and the
trtexec line printed after the export, checked against build_engine.sh --dry-run and run against a fake trtexec."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO
from tests.test_build_engine import BANNERS, FAKE_TRTEXEC
from utils.data.synthetic import generate_synthetic_coco

SEED_SENSITIVITY = ("python sensitivity_analyse.py --weights yolov6s_reopt.pt --batch-size 32 --batch-number 4 "
                    "--data-root train_data_path")
SEED_PARTIAL = ("python partial_quant.py --weights yolov6s_reopt.pt --calib-weights yolov6s_repot_calib.pt "
                "--sensitivity-file yolov6s_reopt_sensivitiy_128_calib.txt --quant-boundary 55 --export-batch-size 1")


def _run_line(line: str, cwd, env=None) -> subprocess.CompletedProcess:
    """A pasted command line: ``python script.py`` runs the repository's script with this interpreter."""
    argv = shlex.split(line)
    if argv[0] == "python":
        argv = [sys.executable, str(REPO / argv[1]), *argv[2:]]
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.skipif(shutil.which("bash") is None, reason="build_engine.sh needs bash")
def test_the_seeds_three_command_lines_as_written(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copyfile(REPO / "assets" / "yolov6n_synthetic.pt", work / "yolov6s_reopt.pt")  # the user's checkpoint
    info = generate_synthetic_coco(tmp_path / "data", num_train=8, num_val=0, img_size=320, seed=5)
    shutil.copytree(info["train"]["img_dir"], work / "train_data_path")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}

    _run_line(SEED_SENSITIVITY, work, env)
    ranking = work / "runs" / "sensitivity" / "yolov6s_reopt"
    # the seed names its outputs itself; ours go to the output folder, and the user passes them on under any name
    shutil.copyfile(ranking / "calibrated.pt", work / "yolov6s_repot_calib.pt")
    shutil.copyfile(ranking / "sensitivity_sqnr.txt", work / "yolov6s_reopt_sensivitiy_128_calib.txt")

    partial = _run_line(SEED_PARTIAL, work, env)
    report = json.loads((work / "runs" / "partial" / "yolov6s_reopt" / "partial_quant.json").read_text())
    assert report["map_measured"] is False and report["partial_map"] is None
    assert report["int8_layers"] == 56 and report["rule"] == "quant-boundary 55"
    assert "mAP not measured" in partial.stdout
    onnx = work / "runs" / "partial" / "yolov6s_reopt" / "yolov6s_reopt_partial_bs1.onnx"
    assert onnx.is_file()

    printed = {version: line.split("): ", 1)[1] for line in partial.stdout.splitlines()
               if "or with trtexec (" in line for version in [line.split("(", 1)[1].split(")", 1)[0]]}
    assert printed == report["trtexec"] and set(printed) == {"TensorRT 8.4-10", "TensorRT 11"}

    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "trtexec"
    fake.write_text(FAKE_TRTEXEC)
    fake.chmod(0o755)
    for version, major in (("TensorRT 8.4-10", 10), ("TensorRT 11", 11)):
        record = tmp_path / f"calls{major}.txt"
        fake_env = {**env, "TRTEXEC": str(fake), "FAKE_RECORD": str(record), "FAKE_CODE": BANNERS[major],
                    "PATH": f"{bindir}{os.pathsep}{env['PATH']}"}
        dry = subprocess.run([str(REPO / "build_engine.sh"), report["onnx"], "--workspace", "4096", "--dry-run"],
                             cwd=work, env=fake_env, capture_output=True, text=True, timeout=60)
        assert dry.returncode == 0, dry.stderr
        planned = shlex.split(next(line for line in dry.stdout.splitlines() if "--onnx=" in line))
        line = shlex.split(printed[version])
        assert line[0] == "trtexec" and set(line[1:]) <= set(planned[1:]), (line, planned)
        subprocess.run(line, cwd=work, env=fake_env, check=True, capture_output=True, timeout=60)  # as printed
        assert onnx.with_suffix(".engine").is_file()
        onnx.with_suffix(".engine").unlink()
