#!/usr/bin/env bash
# Issue 35's GPU run, prepared as one call: CIFAR-10 through the representation path (SimCLR stage, EM with mined
# neighbours, self-labelling) with quality.py, on a lent GPU machine (torch there; no Ray, no package index).
#
# Here, before the call (from the repository root):
#   bash benchmarks/gpu_photos.sh prepare     # .whl/: pydantic, PyYAML and kornia for CPython 3.12 (11 MB);
#                                             # .data/cifar10-jpg.tar.gz (19 MB): both git-ignored, carried
# Then one device call, e.g. with carry [".whl", ".data"] and a timeout that leaves a minute to spare:
#   bash benchmarks/gpu_photos.sh cifar       # writes $OUT/cifar-<method>.json and its log
# or the representation once, then clustering runs over k from it (the issue's label-free pick of k, "on that
# representation"), in the same call: the checkpoint stays on the machine:
#   EM=0 SELFLABEL=0 bash benchmarks/gpu_photos.sh cifar && bash benchmarks/gpu_photos.sh k
#                                             # k: $OUT/selection-cifar-<method>.json, k in KS (6..16), each run
#                                             # EM epochs (and SELFLABEL) from train.representation_from
#
# quality.py needs neither Ray nor webdataset: a CIFAR-10 folder is read directly. The schedule is set by the
# environment, sized to the device's time: CONTRAST (epochs of the representation stage), EM (clustering epochs),
# SELFLABEL, METHOD (nmm, dcec or vc), PRETRAIN (dcec's own pretraining, after the representation stage; 0), OVER
# (train.over_cluster), SAMPLE (images; empty: all 50,000 of train/), LIMIT_S (seconds before the run is stopped),
# EVAL (epochs between ACC lines in the log), EXTRA (more --set values, e.g. nmm's "train.method.instance_weight=1.0",
# which kept the features from drifting during EM on CPU). Epochs of ResNet-18 on 50,000 images at 32 px are not
# measured on this code yet: the log has each epoch's seconds (--progress), so the next call can be sized from it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")

prepare() {
  local data=${DICL_SHARED_DATA:-$root/../shared/data}
  mkdir -p "$root/.whl" "$root/.data"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$root/.whl" \
    pydantic pydantic-core annotated-types typing-inspection typing-extensions pyyaml kornia kornia-rs
  cp "$data/cifar10-jpg.tar.gz" "$root/.data/"
  du -sh "$root/.whl" "$root/.data"
}

setup() {  # the wheels (where carried) and the images, once per machine
  mkdir -p /tmp/site /tmp/cifar
  if ls "$root"/.whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$root"/.whl/*.whl
    export PYTHONPATH=/tmp/site:$root
  else
    export PYTHONPATH=$root  # an environment that has the project's requirements already
  fi
  [ -d /tmp/cifar/train ] || tar -xzf "$root/.data/cifar10-jpg.tar.gz" -C /tmp/cifar  # train/<class>/*.jpg, test/
}

k() {  # selection.py over k, every run starting from the representation `cifar` kept (EM=0: the stage alone)
  local out=${OUT:-$root/outputs/gpu} method=${METHOD:-nmm}
  local rep=/tmp/dicl-checkpoints/$method-seed0.pt encoder=resnet18
  [ -f "$rep" ] || { echo "no $rep: run EM=0 SELFLABEL=0 bash $0 cifar first, on this machine" >&2; exit 2; }
  [ "$method" = nmm ] || encoder=conv
  mkdir -p "$out"
  setup
  cd "$here"
  timeout "${LIMIT_S:-540}" python3 selection.py --data /tmp/cifar/train ${SAMPLE:+--subset "$SAMPLE"} --seeds 0 \
    --space "{k: [${KS:-6, 8, 10, 12, 14, 16}]}" --out "$out/selection-cifar-$method.json" \
    --set train.method="$method" train.encoder="$encoder" train.batch_size=512 train.over_cluster="${OVER:-4}" \
    train.representation_from="$rep" train.method.neighbours=20 train.joint_epochs="${EM:-30}" \
    train.method.selflabel_epochs="${SELFLABEL:-10}" ${EXTRA:-} 2>&1 | tee "$out/selection-cifar-$method.log"
}

cifar() {
  local out=${OUT:-$root/outputs/gpu}
  local method=${METHOD:-nmm} contrast=${CONTRAST:-100} em=${EM:-30} selflabel=${SELFLABEL:-10}
  mkdir -p "$out"
  setup
  local encoder=resnet18 own=()
  [ "$method" = nmm ] || encoder=conv  # resnet18 is nmm's encoder; dcec and vc build their own conv nets
  case "$method" in  # the autoencoders' own pretraining follows the representation stage: none unless PRETRAIN says
    dcec|idec|dec) own=(train.method.pretrain_epochs="${PRETRAIN:-0}") ;;
  esac
  cd "$here"
  # the checkpoint stays on the machine: a second call while it is warm continues the run (a ResNet-18 with its Adam
  # state is over a call's carry); the ACC every EVAL epochs is in the log even where the time limit stops the run
  timeout "${LIMIT_S:-540}" python3 quality.py --data /tmp/cifar/train ${SAMPLE:+--sample "$SAMPLE"} --seeds 0 \
    --progress --eval-every "${EVAL:-20}" --checkpoint /tmp/dicl-checkpoints --out "$out/cifar-$method.json" \
    --set train.method="$method" train.encoder="$encoder" train.batch_size=512 train.over_cluster="${OVER:-4}" \
    train.checkpoint_every=5 \
    train.method.contrast_epochs="$contrast" train.method.neighbours=20 train.joint_epochs="$em" \
    train.method.selflabel_epochs="$selflabel" ${own[@]+"${own[@]}"} ${EXTRA:-} 2>&1 | tee "$out/cifar-$method.log"
}

case "${1:-}" in
  prepare) prepare ;;
  cifar) cifar ;;
  k) k ;;
  *) echo "usage: bash benchmarks/gpu_photos.sh prepare|cifar|k (see the comments at its top)" >&2; exit 2 ;;
esac
