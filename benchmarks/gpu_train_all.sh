#!/usr/bin/env bash
# Train the five shipped networks at once on one lent GPU, each for the same wall-clock budget, and
# export their float16 weights with the runs' logs.  Written for the session's `device` tool (a bare
# machine with CUDA PyTorch, no network), where nibabel travels as a wheel and the training part of
# ../shared/data as a folder:
#
#   bash benchmarks/gpu_train_all.sh DATA_DIR OUT_DIR MINUTES [WHEEL_DIR]
#   bash benchmarks/gpu_train_all.sh .gpupack OUT_DIR MINUTES     # after python -m benchmarks.gpu_pack
#
# DATA_DIR holds covid19ctseg_dstaroff/ and covidsemiseg_infnet/ (the split's test cases may be left
# out), or is a pack of them and nibabel (benchmarks/gpu_pack.py, carried as .gpupack); OUT_DIR receives <network>.pt and runs.tar.gz (metrics.jsonl, config.json, split.json and the
# log of every run, and the GPU's utilisation every 10 s).  FROM_SHIPPED=LEG fine-tunes the shipped weights
# (a further leg, run folders benchmarks/runs/real_gpu_LEG) instead of training from scratch; NETWORKS
# picks the networks (default: all five).  Back here: copy the .pt files into napari_covidseg/weights/, unpack runs.tar.gz
# in the repository root, then `python -m benchmarks.real_data --store-in-weights`.
set -u
data=$(realpath "$1") out=$(realpath "$2") minutes=$3 wheels=${4:-}
if [ -f "$data/data.tar.xz" ]; then  # a pack from `python -m benchmarks.gpu_pack`: data and nibabel
  unpacked=/tmp/covidseg_gpupack
  rm -rf "$unpacked" && mkdir -p "$unpacked"
  python3 -c "import sys, tarfile; [tarfile.open(f).extractall(sys.argv[1]) for f in sys.argv[2:]]" \
    "$unpacked" "$data"/*.tar.xz || exit 1
  find "$unpacked/d" -name '*.nii' -print0 | xargs -0 -P "$(nproc)" gzip -1 -n || exit 1  # training reads .nii.gz
  data=$unpacked/d
  [ -d "$unpacked/site" ] && export PYTHONPATH=$unpacked/site${PYTHONPATH:+:$PYTHONPATH}
fi
networks=${NETWORKS:-unet ms_unet msa_cpp_unet chs_net qchc_unet3d}
leg=() runs=benchmarks/runs/real_gpu
if [ -n "${FROM_SHIPPED:-}" ]; then leg=(--from-shipped "$FROM_SHIPPED") runs=benchmarks/runs/real_gpu_$FROM_SHIPPED; fi
count=$(wc -w <<<"$networks")
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$wheels"/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export COVIDSEG_SHARED_DATA=$data PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, nibabel; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1
mkdir -p "$runs"
nvidia-smi dmon -s um -d 10 > "$runs/gpu_utilisation.log" 2>&1 &
dmon=$!
pids=()
for n in $networks; do
  # shellcheck disable=SC2086  # TRAIN_ARGS: extra flags, e.g. "--max-steps-per-epoch 2 --device cpu" for a dry run
  python3 -m benchmarks.train_real_weights --network "$n" --recipe gpu "${leg[@]}" --time-budget "$minutes" ${TRAIN_ARGS:-} \
    > "$runs/$n.log" 2>&1 &
  pids+=($!)
done
# a run that fails in its first minutes fails them all at once, so a lease is not spent on the rest
names=($networks)
declare -A ended
for _ in $(seq 36); do
  sleep 5
  for i in "${!pids[@]}"; do
    [ -n "${ended[$i]:-}" ] && continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    ended[$i]=1
    if ! wait "${pids[$i]}"; then
      echo "${names[$i]} failed early:"; tail -n 30 "$runs/${names[$i]}.log"; kill "${pids[@]}" 2>/dev/null; exit 1
    fi
  done
done
wait "${pids[@]}"
kill "$dmon" 2>/dev/null
for n in $networks; do
  echo "== $n"; grep -E "epoch|budget|error|Error|finished|stopped" "$runs/$n.log" | tail -4
  python3 -m benchmarks.train_real_weights --network "$n" --recipe gpu "${leg[@]}" --export --runs-sharing-gpu "$count" && cp "napari_covidseg/weights/$n.pt" "$out/"
done
tar czf "$out/runs.tar.gz" $runs/*.log $runs/*/metrics.jsonl $runs/*/config.json $runs/*/split.json 2>/dev/null
ls -la "$out"
