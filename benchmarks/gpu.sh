#!/usr/bin/env bash
# Every GPU figure that issues 17 and 19 ask for, in one run on the device machine (about 9 min on
# an H100 or H200); the logs and JSON land in $OUT (or gpu-figures/).
#
# Here, first:  ../shared/gpu/kit.sh serve soxr websockets python-multipart
# then the device tool:  run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=600)
#
#  separate       offline separation against the reference, every backend side by side; on the GPU
#                 60 s unchunked (eager), in 6 s chunks batched (as many as fit), the same from CUDA
#                 graphs, onnxruntime-CUDA; the chunked output's agreement, peak GPU memory
#  streams        the models' streaming capacity without Serve: 1 to 128 hidden-512 streams stepped
#                 together per 1024-sample block (the >= 64 streams goal, models alone), eager and
#                 from CUDA graphs
#  serve-streams  real-time /stream clients on one GPU replica (1 to 64), late blocks and the CPU that
#                 Serve's proxy and the replica spend per block
#  serve-throughput  audio-seconds per second of one GPU replica under 16 clients of 40-53 s clips:
#                 one clip at a time against their chunks batched across requests, and with CUDA graphs
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 \
  | grep -v 'already exists'
export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled
out=${OUT:-gpu-figures}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, ray, soundfile, soxr, websockets; print('torch', torch.__version__, 'cuda', \
torch.cuda.is_available(), 'ray', ray.__version__)" || exit 1

step() {  # name, seconds, command...: its log in $out, its tail here
  local name=$1
  shift
  echo "== $name"
  timeout "$@" > "$out/$name.log" 2>&1
  echo "rc $?"
  grep -v -E '^\s*$|INFO|WARNING' "$out/$name.log" | tail -30
}
step separate 180 python3 benchmarks/separate.py --skip-rss --skip-context --repeats 3 --out "$out/separate.json"
step streams 90 python3 benchmarks/evaluate.py --skip-eval --device cuda --hidden 512 --speed-seconds 20 \
  --stream-batches 1 8 32 64 128 --json "$out/streams.json"
step serve-streams 150 python3 benchmarks/serve.py --streams --device cuda --num-gpus 1 --stream-hidden 512 \
  --stream-counts 1 8 16 32 64 --stream-seconds 10 --json "$out/serve-streams.json"
step serve-throughput 120 python3 benchmarks/serve.py --throughput --device cuda --num-gpus 1 --hidden-size 512 \
  --clients 16 --seconds 20 --json "$out/serve-throughput.json"
