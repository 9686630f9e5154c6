#!/usr/bin/env bash
# Every GPU figure of issue 17 in one command on one GPU, under 5 minutes (GPU_BENCH_BUDGET):
#   1. tools/bench_train.py --variants, preset B at 64x64, ZeRO 0: eager/compiled x padded/packed
#      on the real mix (FSDD, SST-2, CIFAR-10), with the ratios to eager + padded
#      -> docs/benchmarks.md section train-variants-cuda;
#   2. the grid: presets B and L x 64x64 and 128x128 x ZeRO 0 and 2, bf16, compiled, packed,
#      1 process, on the same mix: step time, MFU, tokens/s, peak memory, data wait, useful_frac
#      -> section train-cuda-packed.
# Each cell is a real `evav train` run with a time cap; the whole script shares one budget, and a
# cell with too little of it left is listed as skipped rather than run (the 128x128 L cells are
# last). Figures come back in $OUT: benchmarks.md (the whole page as the GPU machine rewrote it),
# one NAME.section file per section, and the two bench logs.
#
# Once, on a machine with pip's network (here), from the repository root:
#     tools/gpu_bench.sh --prepare
# It puts into .whl/ (ignored by git) the wheels the GPU image lacks, for CPython 3.12 x86-64:
# deepspeed (py3-none-any, built from its sdist or pip's cache), av, hjson, pydantic with
# pydantic-core, annotated-types, typing-inspection and typing-extensions (about 45 MB); and into
# runs/gpu_bench_src/ (ignored) the raw inputs of the real mix, the first 300 training inputs of
# each dataset from ../shared/datasets (which does not travel to the GPU machine), in the
# datasets' own layouts (about 2.5 MB).
#
# Then, through the device tool, one call (the carried folders must be named):
#     run(command="bash tools/gpu_bench.sh", carry=[".whl", "runs/gpu_bench_src"], timeout_s=420)
# and here, to put the new sections into the checkout's page (other sections untouched):
#     tools/gpu_bench.sh --merge FILES_AT      # FILES_AT: the folder the run's files came back to
#
# On another GPU machine with evav's packages installed, `bash tools/gpu_bench.sh` alone is
# enough (wheels are installed only when deepspeed, av, hjson or pydantic is missing; without
# runs/gpu_bench_src it reads ../shared/datasets, or trains on synthetic shards if that is
# absent too). Environment: GPU_BENCH_BUDGET (seconds, default 290), GPU_BENCH_CELL_S (one run
# at most, default 90), PYTHON (default python3), GPU_BENCH_WORK (shards, runs and compiled
# kernels; default /tmp/gpu_bench).
#
# Time: 12 runs (4 variants + 8 grid cells), each a fresh process: start-up (CUDA, DeepSpeed,
# the engine, 4 loader workers), a cold torch.compile for the first run of each preset and size
# (tens of seconds; the packed batches' varying row count can recompile once or twice), then
# 12 steps. An estimate, not a measurement (nothing of this was run on a GPU yet): 8-11 minutes
# for everything, so under the default 290 s the variants and the 64x64 grid come first and
# the 128x128 cells are likely to be listed as skipped. For every figure in one call:
#     run(command="GPU_BENCH_BUDGET=560 bash tools/gpu_bench.sh", carry=[...], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."

LIMIT=300 # inputs per dataset (bench_train.py --limit)
SRC=runs/gpu_bench_src
WHEELS=.whl

prepare() {
  local py=${PYTHON:-.venv/bin/python}
  mkdir -p "$WHEELS"
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" \
    av==18.1.0 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing-extensions==4.16.0
  # deepspeed publishes only an sdist: its wheel is pure Python (ops are JIT-built on the GPU)
  "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" deepspeed==0.19.8
  local ds=../shared/datasets
  [ -d "$ds" ] || { echo "gpu_bench: $ds is absent: no real mix to carry" >&2; exit 2; }
  rm -rf "$SRC" && mkdir -p "$SRC/fsdd/recordings" "$SRC/sst2" "$SRC/cifar10/train/airplane"
  # LIMIT inputs of each training split, the first in the builders' order (FSDD: takes 5-49
  # train; CIFAR-10 sorted by class then file, so all airplane; SST-2: the first rows of
  # train.tsv). Not the files the CPU runs' stratified seeded `--limit` takes from the whole
  # datasets: the same counts, modalities and frame sizes, which is what throughput depends on.
  "${PYTHON:-.venv/bin/python}" - "$ds" "$SRC" "$LIMIT" <<'EOF'
import re, shutil, sys
from pathlib import Path
ds, src, limit = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
wavs = [w for w in sorted((ds / "fsdd/recordings").glob("*.wav"))
        if int(re.match(r"\d+_\w+?_(\d+)$", w.stem).group(1)) >= 5][:limit]
for w in wavs:
    shutil.copy(w, src / "fsdd/recordings")
jpgs = [f for c in sorted((ds / "cifar10/train").iterdir()) for f in sorted(c.iterdir())][:limit]
for f in jpgs:
    (src / "cifar10/train" / f.parent.name).mkdir(parents=True, exist_ok=True)
    shutil.copy(f, src / "cifar10/train" / f.parent.name)
lines = (ds / "sst2/train.tsv").read_text(encoding="utf-8").split("\n")
(src / "sst2/train.tsv").write_text("\n".join(lines[: limit + 1]) + "\n", encoding="utf-8")
print(f"gpu_bench: {len(wavs)} wav, {len(jpgs)} jpg, {limit} sentences in {src}")
EOF
  du -sh "$WHEELS" "$SRC"
  echo "gpu_bench: now run(command=\"bash tools/gpu_bench.sh\", carry=[\"$WHEELS\", \"$SRC\"])"
}

merge() {
  "${PYTHON:-.venv/bin/python}" - "$1" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, ".")
from tools.benchlib import write_section
for f in sorted(Path(sys.argv[1]).glob("*.section")):
    write_section(f.stem, f.read_text())
    print(f"gpu_bench: section {f.stem} written to docs/benchmarks.md")
EOF
}

case "${1:-}" in
  --prepare) prepare; exit ;;
  --merge) merge "${2:?usage: tools/gpu_bench.sh --merge FOLDER}"; exit ;;
  "") ;;
  *) echo "usage: tools/gpu_bench.sh [--prepare | --merge FOLDER]" >&2; exit 2 ;;
esac

T0=$SECONDS
BUDGET=${GPU_BENCH_BUDGET:-290}
CELL=${GPU_BENCH_CELL_S:-90} # one run at most (a cut run keeps its figures from 2 timed steps)
PY=${PYTHON:-python3}
WORK=${GPU_BENCH_WORK:-/tmp/gpu_bench}
OUT=${OUT:-runs/gpu_bench_out}
mkdir -p "$WORK" "$OUT"
export PYTHONUNBUFFERED=1
left() { echo $((BUDGET - (SECONDS - T0))); }

# 1. packages: the GPU image has torch, numpy, Pillow, PyYAML, safetensors, einops, ninja, ...
if ! "$PY" -c "import deepspeed, av, hjson, pydantic" 2>/dev/null; then
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || {
    echo "gpu_bench: deepspeed/av missing and no $WHEELS/*.whl: run tools/gpu_bench.sh --prepare here and carry $WHEELS" >&2
    exit 2
  }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import torch, deepspeed, av; assert torch.cuda.is_available(), 'no GPU'; \
print('gpu_bench:', torch.cuda.get_device_name(0), 'torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'av', av.__version__)"

# DeepSpeed's fused Adam is JIT-built (nvcc) on its first use: start it now, alongside the
# shard builds and the first run's start-up (the trainer waits on the same build lock)
"$PY" -c "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()" \
  >"$WORK/fused_adam.log" 2>&1 &
JIT=$!

# 2. the raw real mix: the carried subset, else the shared datasets (bench_train falls back to
# synthetic shards, and says so, when neither is there)
DATASETS=$SRC
[ -d "$DATASETS" ] || DATASETS=../shared/datasets
echo "gpu_bench: datasets $DATASETS; $(left) s of $BUDGET left"

COMMON=(--device cuda --mix real --datasets "$DATASETS" --limit "$LIMIT" --clip-frames 16
  --warmup 4 --steps 8 --workers 4 --work "$WORK" --write) # on the device copy of the page
status=0
# 3. eager/compiled x padded/packed, preset B at 64x64 (half of what is left, at least 150 s)
V=$(($(left) / 2))
V=$((V < 150 ? 150 : V))
"$PY" tools/bench_train.py "${COMMON[@]}" --variants --presets B --sizes 64 --zero 0 \
  --timeout "$CELL" --budget "$V" 2>&1 | tee "$OUT/variants.log" || status=1

# 4. the grid: B, L x 64, 128 x ZeRO 0, 2, compiled, packed (what is left, less 10 s to finish)
G=$(($(left) - 10))
G=$((G < 1 ? 1 : G)) # 1 s: every cell is listed as skipped (0 would mean no cap)
"$PY" tools/bench_train.py "${COMMON[@]}" --presets B,L --sizes 64,128 --zero 0,2 --procs 1 \
  --compile on --pad-to pack --no-flash-check --timeout "$CELL" --budget "$G" \
  --section train-cuda-packed 2>&1 | tee "$OUT/grid.log" || status=1

kill "$JIT" 2>/dev/null || true
cp docs/benchmarks.md "$OUT/benchmarks.md"
"$PY" - "$OUT" <<'EOF'
import re, sys
from pathlib import Path
text = Path("docs/benchmarks.md").read_text()
for name in ("train-variants-cuda", "train-cuda-packed"):
    m = re.search(rf"<!-- bench:{name} -->\n(.*?)\n<!-- /bench:{name} -->", text, re.S)
    if m:
        Path(sys.argv[1], f"{name}.section").write_text(m.group(1) + "\n")
EOF
echo "gpu_bench: done in $((SECONDS - T0)) s (budget $BUDGET s); files in $OUT"
exit $status
