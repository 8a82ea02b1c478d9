#!/usr/bin/env bash
# Build a TensorRT engine from an ONNX model with trtexec, keeping the layer information that
# tools/engine_report.py checks against the precisions the export intended. Run with --help for usage.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: build_engine.sh model.onnx [engine] [options] [-- extra trtexec args]

Builds a TensorRT engine with trtexec. Precision flags follow the model and the TensorRT version:
  Q/DQ model (has QuantizeLinear nodes), TensorRT 8/10: --int8 --fp16
  float model, TensorRT 8/10:                           --fp16
  TensorRT 11 and later:                                --stronglyTyped (precisions come from the ONNX itself)

Writes, next to the engine (default: model.engine beside model.onnx):
  <engine prefix>.trtexec.log      everything trtexec printed (build and timing)
  <engine prefix>.layers.json      per-layer information (--exportLayerInfo, --profilingVerbosity=detailed)
  <engine prefix>.profile.json     per-layer timings (--exportProfile)
  <engine prefix>.times.json       per-inference timings (--exportTimes)
If trtexec fails, the files it wrote are removed, the log is kept and its exit code is returned.

options:
  --batch N              engine for batch N: --minShapes/--optShapes/--maxShapes=<input>:Nx3xHxW
                         (needs a dynamic-batch ONNX: export_onnx.py --dynamic-batch; H and W are read from
                         the ONNX with python + onnx, or given with --img-size)
  --img-size N           input height and width when they cannot be read from the ONNX
  --workspace MiB        builder workspace limit (--memPoolSize=workspace:MiB)
  --timing-cache FILE    load/save trtexec's timing cache (--timingCacheFile); speeds up rebuilds
  --dry-run              print the trtexec command and build nothing (trtexec --help is still run to read
                         the TensorRT version, unless TRT_MAJOR is set)
  -h, --help             this help
  -- ARGS                passed to trtexec unchanged, after the flags above

environment:
  TRTEXEC     trtexec to use (default: trtexec on PATH, else /usr/src/tensorrt/bin/trtexec)
  TRT_MAJOR   TensorRT major version, when it cannot be read from 'trtexec --help'
  PYTHON      python with the onnx package, for --batch (default: the repository's .venv, else python3)
EOF
}

die() {  # one line on stderr, exit code 2 (bad input, as the project's Python scripts do)
    printf 'error: build_engine.sh: %s\n' "$*" >&2
    exit 2
}

positive_int() {  # positive_int FLAG VALUE
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}

# ------------------------------------------------------------------------------------------------ arguments
onnx=""
engine=""
batch=""
img_size=""
workspace=""
timing_cache=""
dry_run=0
extra=()
while (($#)); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --dry-run) dry_run=1 ;;
        --batch | --img-size | --workspace | --timing-cache)
            (($# >= 2)) || die "$1 needs a value (see --help)"
            case "$1" in
                --batch) batch="$2" ;;
                --img-size) img_size="$2" ;;
                --workspace) workspace="$2" ;;
                --timing-cache) timing_cache="$2" ;;
            esac
            shift ;;
        --batch=*) batch="${1#*=}" ;;
        --img-size=*) img_size="${1#*=}" ;;
        --workspace=*) workspace="${1#*=}" ;;
        --timing-cache=*) timing_cache="${1#*=}" ;;
        --) shift; extra=("$@"); break ;;
        -*) die "unknown option '$1'; trtexec options go after '--' (see --help)" ;;
        *)
            if [[ -z "$onnx" ]]; then onnx="$1"
            elif [[ -z "$engine" ]]; then engine="$1"
            else die "unexpected argument '$1' (usage: build_engine.sh model.onnx [engine] [options])"
            fi ;;
    esac
    shift
done

[[ -n "$onnx" ]] || die "no ONNX model given (usage: build_engine.sh model.onnx [engine] [options]; see --help)"
[[ -f "$onnx" && -r "$onnx" ]] \
    || die "ONNX model '$onnx' does not exist or is not readable; export one with export_onnx.py"
[[ -z "$batch" ]] || positive_int --batch "$batch"
[[ -z "$img_size" ]] || positive_int --img-size "$img_size"
[[ -z "$workspace" ]] || positive_int --workspace "$workspace"
if [[ -n "$img_size" ]] && ((img_size % 32)); then
    die "--img-size must be a multiple of 32, got $img_size"
fi

strip_suffix() {  # path without the file name's extension: runs/s.onnx -> runs/s (a dot in a folder name stays)
    local base="${1##*/}"
    if [[ "$base" == ?*.* ]]; then printf '%s\n' "${1%.*}"; else printf '%s\n' "$1"; fi
}
prefix="$(strip_suffix "$onnx")"
engine="${engine:-${prefix}.engine}"
out_prefix="$(strip_suffix "$engine")"  # log and reports sit beside the engine, named after it
log="${out_prefix}.trtexec.log"
layers_json="${out_prefix}.layers.json"
profile_json="${out_prefix}.profile.json"
times_json="${out_prefix}.times.json"
export_info="${prefix}.json"  # what export_onnx.py writes next to the ONNX

# ------------------------------------------------------------------------------------------------ trtexec and version
find_trtexec() {
    local found
    if [[ -n "${TRTEXEC:-}" ]]; then
        found="$(command -v -- "$TRTEXEC" || true)"
        [[ -n "$found" && -f "$found" && -x "$found" ]] \
            || die "TRTEXEC=$TRTEXEC is not an executable file; point it at trtexec (or unset it)"
        printf '%s\n' "$found"
    elif command -v trtexec >/dev/null 2>&1; then
        command -v trtexec
    elif [[ -x /usr/src/tensorrt/bin/trtexec ]]; then
        printf '%s\n' /usr/src/tensorrt/bin/trtexec
    else
        die "trtexec not found (not on PATH, not at /usr/src/tensorrt/bin/trtexec):" \
            "install TensorRT, or set TRTEXEC=/path/to/trtexec"
    fi
}

# trtexec prints "&&&& RUNNING TensorRT.trtexec [TensorRT vNNNN] # <command>" first, --help included. NNNN is
# NV_TENSORRT_VERSION: major*1000 + minor*100 + patch up to TensorRT 8 (8.6.1 -> 8601), major*10000 + minor*100 +
# patch from TensorRT 10 (10.3.0 -> 100300, 11.1.0 -> 110100).
trt_version() {  # prints "MAJOR MINOR", MINOR empty when only TRT_MAJOR is known
    if [[ -n "${TRT_MAJOR:-}" ]]; then
        [[ "$TRT_MAJOR" =~ ^[1-9][0-9]*$ ]] || die "TRT_MAJOR must be a number such as 10, got '$TRT_MAJOR'"
        printf '%s \n' "$TRT_MAJOR"
        return
    fi
    local banner code
    banner="$("$trtexec" --help 2>&1 || true)"
    [[ "$banner" =~ \[TensorRT\ v([0-9]+)\] ]] \
        || die "could not read the TensorRT version from '$trtexec --help' (no '[TensorRT vNNNN]' banner);" \
               "set TRT_MAJOR=10 (or your major version)"
    code="${BASH_REMATCH[1]}"
    if ((${#code} >= 6)); then
        printf '%s %s\n' "$((10#$code / 10000))" "$((10#$code / 100 % 100))"
    else
        printf '%s %s\n' "$((10#$code / 1000))" "$((10#$code / 100 % 10))"
    fi
}

trtexec="$(find_trtexec)"  # a plain assignment, so die inside the substitution ends the script (set -e)
version="$(trt_version)"
read -r trt_major trt_minor <<<"$version"
if ((trt_major < 8)) || { ((trt_major == 8)) && [[ -n "$trt_minor" ]] && ((trt_minor < 4)); }; then
    die "TensorRT ${trt_major}.${trt_minor} found; build_engine.sh needs TensorRT >= 8.4 (--exportLayerInfo)"
fi

# ------------------------------------------------------------------------------------------------ precision flags
if LC_ALL=C grep -q QuantizeLinear "$onnx"; then qdq=1; else qdq=0; fi
if ((trt_major >= 11)); then
    precision=(--stronglyTyped)
    precision_note="strongly typed: each layer runs at the precision the ONNX gives it"
elif ((qdq)); then
    precision=(--int8 --fp16)
    precision_note="Q/DQ model: INT8 where the ONNX quantizes, FP16 elsewhere"
else
    precision=(--fp16)
    precision_note="float model: FP16"
fi

# ------------------------------------------------------------------------------------------------ input shapes
read_input_shape() {  # prints "<input name> <dims...>", -1 for a dynamic dimension
    local python="${PYTHON:-}"
    local repo_python
    repo_python="$(dirname "${BASH_SOURCE[0]}")/.venv/bin/python"
    if [[ -z "$python" ]]; then
        if [[ -x "$repo_python" ]]; then python="$repo_python"; else python=python3; fi
    fi
    "$python" - "$onnx" <<'EOF' 2>/dev/null
import sys

import onnx

model = onnx.load(sys.argv[1], load_external_data=False)
initializers = {init.name for init in model.graph.initializer}
inp = next(i for i in model.graph.input if i.name not in initializers)
dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim]
print(inp.name, *dims)
EOF
}

pick_size() {  # pick_size NAME ONNX_DIM: the ONNX's size, or --img-size where the ONNX leaves it dynamic
    if (($2 == -1)); then
        [[ -n "$img_size" ]] || die "$onnx has a dynamic input $1; pass --img-size N"
        printf '%s\n' "$img_size"
    elif [[ -n "$img_size" ]] && (($2 != img_size)); then
        die "--img-size $img_size does not match the input $1 of $onnx ($2); drop --img-size"
    else
        printf '%s\n' "$2"
    fi
}

shapes=()
if [[ -n "$batch" ]]; then
    if shape="$(read_input_shape)" && [[ -n "$shape" ]]; then
        read -r input_name n c h w rest <<<"$shape"
        [[ -n "${w:-}" && -z "${rest:-}" ]] \
            || die "input '$input_name' of $onnx is not NCHW (dims: ${shape#* }); --batch needs an image input"
        if ((n != -1 && n != batch)); then
            die "$onnx has a fixed batch of $n; re-export it with export_onnx.py --dynamic-batch, or drop --batch"
        fi
        h="$(pick_size H "$h")"
        w="$(pick_size W "$w")"
        ((c != -1)) || c=3
    else
        [[ -n "$img_size" ]] || die "could not read the input shape of $onnx with python + onnx" \
            "(pip install onnx, or set PYTHON=/path/to/python); pass --img-size N"
        input_name=images n=-1 c=3 h="$img_size" w="$img_size"
    fi
    if ((n == -1)); then  # a dynamic batch needs one optimisation profile; a fixed batch equal to N needs none
        spec="${input_name}:${batch}x${c}x${h}x${w}"
        shapes=("--minShapes=${spec}" "--optShapes=${spec}" "--maxShapes=${spec}")
    fi
fi

# ------------------------------------------------------------------------------------------------ command
cmd=("$trtexec" "--onnx=${onnx}" "--saveEngine=${engine}" "${precision[@]}" "${shapes[@]}")
[[ -z "$workspace" ]] || cmd+=("--memPoolSize=workspace:${workspace}")
[[ -z "$timing_cache" ]] || cmd+=("--timingCacheFile=${timing_cache}")
cmd+=("--profilingVerbosity=detailed" "--exportLayerInfo=${layers_json}"
      "--exportProfile=${profile_json}" "--exportTimes=${times_json}")
((trt_major >= 11)) || cmd+=("--separateProfileRun")  # always on (and the flag a no-op) from TensorRT 11
cmd+=("${extra[@]}")

echo "TensorRT ${trt_major}${trt_minor:+.${trt_minor}}, ${precision_note}"
printf '%q ' "${cmd[@]}" | sed 's/ $//'
echo
if ((dry_run)); then
    echo "dry run: nothing built"
    exit 0
fi

# ------------------------------------------------------------------------------------------------ build
mkdir -p "$(dirname "$engine")"
outputs=("$engine" "$layers_json" "$profile_json" "$times_json")
file_state() { stat -c '%i %s %y' -- "$1" 2>/dev/null || echo absent; }
before=()
for f in "${outputs[@]}"; do before+=("$(file_state "$f")"); done
remove_new_outputs() {  # what this run wrote or changed is incomplete when trtexec did not succeed
    local i
    for i in "${!outputs[@]}"; do
        if [[ "$(file_state "${outputs[$i]}")" != "${before[$i]}" ]]; then rm -f -- "${outputs[$i]}"; fi
    done
}
trap 'remove_new_outputs; exit 130' INT TERM
set +e
"${cmd[@]}" 2>&1 | tee "$log"
status=("${PIPESTATUS[@]}")
set -e
trap - INT TERM
rc="${status[0]}"
((status[1] == 0)) || echo "warning: build_engine.sh: could not write the log $log" >&2
if ((rc == 0)) && [[ ! -s "$engine" ]]; then
    echo "error: build_engine.sh: trtexec exited 0 but wrote no engine at $engine" >&2
    rc=1
fi
if ((rc != 0)); then
    remove_new_outputs
    echo "error: build_engine.sh: trtexec failed (exit code $rc), no output kept; see the log $log" >&2
    exit "$rc"
fi

echo
echo "engine:      $engine"
echo "trtexec log: $log"
echo "layer info:  $layers_json"
echo "profile:     $profile_json"
echo "next, check each layer's precision against the export:"
report=(python tools/engine_report.py --layer-info "$layers_json")
[[ ! -f "$export_info" ]] || report+=(--export-info "$export_info")
printf '%q ' "${report[@]}" | sed 's/ $//'
echo
