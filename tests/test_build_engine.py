"""build_engine.sh against fake trtexec programs of TensorRT 8, 10 and 11: flags, output names, errors."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "build_engine.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="build_engine.sh needs bash")

# NV_TENSORRT_VERSION as trtexec prints it: major*1000+minor*100+patch up to 8.x, major*10000+... from 10.x
BANNERS = {8: "8601", 10: "100300", 11: "110100"}

FAKE_TRTEXEC = r"""#!/usr/bin/env bash
{ echo "---"; printf '%s\n' "$@"; } >> "$FAKE_RECORD"
if [[ -n "${FAKE_CODE:-}" ]]; then
    echo "&&&& RUNNING TensorRT.trtexec [TensorRT v${FAKE_CODE}] # $0 $*"
else
    echo "trtexec, no banner"
fi
[[ "${1:-}" == "--help" ]] && exit 0
[[ -n "${FAKE_NOWRITE:-}" ]] && exit "${FAKE_RC:-0}"
for arg in "$@"; do
    case "$arg" in
        --saveEngine=* | --exportLayerInfo=* | --exportProfile=* | --exportTimes=*) printf 'x' > "${arg#*=}" ;;
    esac
done
echo "&&&& PASSED TensorRT.trtexec"
exit "${FAKE_RC:-0}"
"""


@pytest.fixture
def fake(tmp_path) -> dict[str, Path]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    trtexec = bindir / "trtexec"
    trtexec.write_text(FAKE_TRTEXEC)
    trtexec.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    qdq = work / "qdq.onnx"
    qdq.write_bytes(b"\x08\x07\x12\x07pytorch:\x0aQuantizeLinear\x0aDequantizeLinear\x0aConv")
    fp = work / "float.onnx"
    fp.write_bytes(b"\x08\x07\x12\x07pytorch:\x0aConv\x0aRelu")
    return {"trtexec": trtexec, "bin": bindir, "record": tmp_path / "calls.txt", "work": work, "qdq": qdq,
            "float": fp}


def _env(fake: dict[str, Path], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRTEXEC", "TRT_MAJOR", "PYTHON", "FAKE_CODE")}
    env.update({"TRTEXEC": str(fake["trtexec"]), "FAKE_RECORD": str(fake["record"]), "FAKE_CODE": BANNERS[10]})
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def _calls(fake: dict[str, Path]) -> list[list[str]]:
    if not fake["record"].exists():
        return []
    return [chunk.splitlines() for chunk in fake["record"].read_text().split("---\n")[1:]]


def _build_args(fake: dict[str, Path]) -> list[str]:
    """Arguments of the one build call (the other call is the version query)."""
    calls = _calls(fake)
    assert calls[0] == ["--help"]
    assert len(calls) == 2, calls
    return calls[1]


def _outputs(prefix: str) -> list[str]:
    return ["--profilingVerbosity=detailed", f"--exportLayerInfo={prefix}.layers.json",
            f"--exportProfile={prefix}.profile.json", f"--exportTimes={prefix}.times.json"]


def test_script_is_executable_bash_with_strict_mode():
    text = SCRIPT.read_text()
    assert os.access(SCRIPT, os.X_OK)
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_help():
    proc = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: build_engine.sh model.onnx [engine]")
    for flag in ("--batch", "--workspace", "--timing-cache", "--dry-run", "TRTEXEC", "TRT_MAJOR"):
        assert flag in proc.stdout


@pytest.mark.parametrize("major, model, precision", [
    (8, "qdq", ["--int8", "--fp16"]),
    (8, "float", ["--fp16"]),
    (10, "qdq", ["--int8", "--fp16"]),
    (10, "float", ["--fp16"]),
    (11, "qdq", ["--stronglyTyped"]),
    (11, "float", ["--stronglyTyped"]),
])
def test_flags_per_version_and_model(fake, major, model, precision):
    proc = _run([f"{model}.onnx"], _env(fake, FAKE_CODE=BANNERS[major]), fake["work"])
    assert proc.returncode == 0, proc.stderr
    separate = ["--separateProfileRun"] if major < 11 else []  # a no-op flag from TensorRT 11
    assert _build_args(fake) == [f"--onnx={model}.onnx", f"--saveEngine={model}.engine", *precision,
                                 *_outputs(model), *separate]
    for suffix in (".engine", ".trtexec.log", ".layers.json", ".profile.json", ".times.json"):
        assert (fake["work"] / f"{model}{suffix}").exists(), suffix
    log = (fake["work"] / f"{model}.trtexec.log").read_text()
    assert f"[TensorRT v{BANNERS[major]}]" in log and "PASSED" in log
    # the command is printed ready to paste, and the next step is named
    assert f"{fake['trtexec']} --onnx={model}.onnx --saveEngine={model}.engine {' '.join(precision)}" in proc.stdout
    assert f"python tools/engine_report.py --layer-info {model}.layers.json" in proc.stdout
    assert f"TensorRT {major}." in proc.stdout


def test_export_info_sidecar_in_next_command(fake):
    (fake["work"] / "qdq.json").write_text("{}")
    proc = _run(["qdq.onnx"], _env(fake), fake["work"])
    assert proc.returncode == 0, proc.stderr
    assert "python tools/engine_report.py --layer-info qdq.layers.json --export-info qdq.json" in proc.stdout


def test_custom_engine_path_options_and_extra_args(fake, tmp_path):
    engine = tmp_path / "out dir" / "s b4.plan"
    proc = _run(["qdq.onnx", str(engine), "--workspace", "2048", "--timing-cache=cache.bin", "--",
                 "--verbose", "--noTF32"], _env(fake), fake["work"])
    assert proc.returncode == 0, proc.stderr
    prefix = str(engine.with_suffix(""))
    assert _build_args(fake) == ["--onnx=qdq.onnx", f"--saveEngine={engine}", "--int8", "--fp16",
                                 "--memPoolSize=workspace:2048", "--timingCacheFile=cache.bin", *_outputs(prefix),
                                 "--separateProfileRun", "--verbose", "--noTF32"]
    assert engine.exists() and Path(prefix + ".trtexec.log").exists()
    assert "out\\ dir/s\\ b4.plan" in proc.stdout  # shell-quoted: pasting the printed command works


def test_trtexec_found_on_path(fake):
    env = _env(fake, PATH=f"{fake['bin']}{os.pathsep}{os.environ['PATH']}")
    del env["TRTEXEC"]
    proc = _run(["float.onnx"], env, fake["work"])
    assert proc.returncode == 0, proc.stderr
    assert _build_args(fake)[:3] == ["--onnx=float.onnx", "--saveEngine=float.engine", "--fp16"]


def test_missing_trtexec(fake):
    path = "/usr/bin:/bin"
    if shutil.which("trtexec", path=path) or Path("/usr/src/tensorrt/bin/trtexec").exists():
        pytest.skip("a real trtexec is installed here")
    env = _env(fake, PATH=path)
    del env["TRTEXEC"]
    proc = _run(["qdq.onnx"], env, fake["work"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "trtexec not found" in lines[0] and "install TensorRT" in lines[0]
    assert "TRTEXEC=/path/to/trtexec" in lines[0]
    assert not (fake["work"] / "qdq.engine").exists()


def test_trtexec_by_name_and_dotted_folders(fake, tmp_path):
    env = _env(fake, TRTEXEC="trtexec", PATH=f"{fake['bin']}{os.pathsep}{os.environ['PATH']}")
    proc = _run(["float.onnx", "runs.d/engine"], env, fake["work"])
    assert proc.returncode == 0, proc.stderr
    args = _build_args(fake)
    assert args[1] == "--saveEngine=runs.d/engine"
    assert "--exportLayerInfo=runs.d/engine.layers.json" in args  # the folder's dot is no file extension
    assert (fake["work"] / "runs.d" / "engine.trtexec.log").exists()


def test_trtexec_not_executable(fake, tmp_path):
    proc = _run(["qdq.onnx"], _env(fake, TRTEXEC=str(tmp_path / "nope")), fake["work"])
    assert proc.returncode == 2 and "TRTEXEC=" in proc.stderr


@pytest.mark.parametrize("args", [["missing.onnx"], []])
def test_missing_onnx(fake, args):
    proc = _run(args, _env(fake), fake["work"])
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error:")
    assert _calls(fake) == []


def test_folder_instead_of_onnx(fake):
    (fake["work"] / "folder.onnx").mkdir()
    proc = _run(["folder.onnx"], _env(fake), fake["work"])
    assert proc.returncode == 2 and "does not exist or is not readable" in proc.stderr and _calls(fake) == []


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "--batch must be a positive integer"),
    (["--workspace", "lots"], "--workspace must be a positive integer"),
    (["--img-size", "100"], "multiple of 32"),
    (["--batch"], "--batch needs a value"),
    (["--fp16"], "unknown option '--fp16'"),
    (["a.engine", "b.engine"], "unexpected argument"),
])
def test_bad_options(fake, args, message):
    proc = _run(["qdq.onnx", *args], _env(fake), fake["work"])
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_dry_run_builds_nothing(fake):
    proc = _run(["qdq.onnx", "--dry-run"], _env(fake), fake["work"])
    assert proc.returncode == 0, proc.stderr
    assert _calls(fake) == [["--help"]]  # only the version query
    assert sorted(p.name for p in fake["work"].iterdir()) == ["float.onnx", "qdq.onnx"]
    assert "--onnx=qdq.onnx --saveEngine=qdq.engine --int8 --fp16" in proc.stdout
    assert "nothing built" in proc.stdout


def test_dry_run_with_trt_major_runs_no_trtexec(fake):
    proc = _run(["float.onnx", "--dry-run"], _env(fake, TRT_MAJOR="11"), fake["work"])
    assert proc.returncode == 0, proc.stderr
    assert _calls(fake) == []
    assert "--stronglyTyped" in proc.stdout


def test_version_not_detected(fake):
    env = _env(fake)
    del env["FAKE_CODE"]  # the fake prints no banner
    proc = _run(["qdq.onnx"], env, fake["work"])
    assert proc.returncode == 2
    assert "TensorRT version" in proc.stderr and "TRT_MAJOR" in proc.stderr
    assert len(_calls(fake)) == 1  # --help only, nothing built
    env["TRT_MAJOR"] = "10"
    proc = _run(["qdq.onnx"], env, fake["work"])
    assert proc.returncode == 0, proc.stderr
    assert "--int8" in _calls(fake)[-1]


def test_old_tensorrt_refused(fake):
    proc = _run(["qdq.onnx"], _env(fake, FAKE_CODE="8203"), fake["work"])
    assert proc.returncode == 2 and "TensorRT 8.2" in proc.stderr and ">= 8.4" in proc.stderr


def test_failed_build_keeps_only_the_log(fake):
    proc = _run(["qdq.onnx"], _env(fake, FAKE_RC="3"), fake["work"])
    assert proc.returncode == 3
    assert "exit code 3" in proc.stderr and "qdq.trtexec.log" in proc.stderr
    assert sorted(p.name for p in fake["work"].iterdir()) == ["float.onnx", "qdq.onnx", "qdq.trtexec.log"]
    assert "PASSED" in (fake["work"] / "qdq.trtexec.log").read_text()  # the log holds trtexec's output


def test_failed_rebuild_removes_what_it_wrote_and_keeps_what_it_did_not_touch(fake):
    assert _run(["qdq.onnx"], _env(fake), fake["work"]).returncode == 0
    engine = fake["work"] / "qdq.engine"
    proc = _run(["qdq.onnx"], _env(fake, FAKE_RC="1", FAKE_NOWRITE="1"), fake["work"])
    assert proc.returncode == 1
    assert engine.exists()  # trtexec failed before writing: the earlier, complete engine stays
    proc = _run(["qdq.onnx"], _env(fake, FAKE_RC="1"), fake["work"])
    assert proc.returncode == 1
    assert not engine.exists() and not (fake["work"] / "qdq.layers.json").exists()


# ------------------------------------------------------------------------------------------------ --batch
def _onnx_model(path: Path, batch: int | str, size: tuple[int, int] = (64, 96)) -> Path:
    shape = [batch, 3, *size]
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["outputs"], name="/Identity")], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("outputs", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_batch_on_dynamic_onnx(fake):
    _onnx_model(fake["work"] / "dyn.onnx", "batch")
    proc = _run(["dyn.onnx", "--batch", "8"], _env(fake, PYTHON=sys.executable), fake["work"])
    assert proc.returncode == 0, proc.stderr
    spec = "images:8x3x64x96"
    assert _build_args(fake) == ["--onnx=dyn.onnx", "--saveEngine=dyn.engine", "--fp16", f"--minShapes={spec}",
                                 f"--optShapes={spec}", f"--maxShapes={spec}", *_outputs("dyn"),
                                 "--separateProfileRun"]


def test_batch_on_fixed_batch_onnx(fake):
    _onnx_model(fake["work"] / "b1.onnx", 1)
    env = _env(fake, PYTHON=sys.executable)
    proc = _run(["b1.onnx", "--batch", "4"], env, fake["work"])
    assert proc.returncode == 2
    assert "fixed batch of 1" in proc.stderr and "--dynamic-batch" in proc.stderr
    proc = _run(["b1.onnx", "--batch", "1", "--dry-run"], env, fake["work"])  # the model's own batch: no profile
    assert proc.returncode == 0, proc.stderr
    assert "Shapes" not in proc.stdout


def test_batch_img_size_must_match_the_onnx(fake):
    _onnx_model(fake["work"] / "dyn.onnx", "batch")
    proc = _run(["dyn.onnx", "--batch", "2", "--img-size", "640"], _env(fake, PYTHON=sys.executable), fake["work"])
    assert proc.returncode == 2 and "does not match" in proc.stderr


def test_batch_without_python_needs_img_size(fake, tmp_path):
    env = _env(fake, PYTHON=str(tmp_path / "no-python"))
    proc = _run(["qdq.onnx", "--batch", "2"], env, fake["work"])
    assert proc.returncode == 2 and "--img-size" in proc.stderr and "pip install onnx" in proc.stderr
    proc = _run(["qdq.onnx", "--batch", "2", "--img-size", "320"], env, fake["work"])
    assert proc.returncode == 0, proc.stderr
    assert "--maxShapes=images:2x3x320x320" in _calls(fake)[-1]
