# Shared by the demo scripts (sourced): interpreter, CPU fallback, output folder, quiet launcher output.
#   needs OUT (the demo's folder) set; provides PY, step, quiet, launch ENTRY ARGS...
PY=${PY:-.venv/bin/python}
if [ -z "${DS_ACCELERATOR:-}" ] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  export DS_ACCELERATOR=cpu
fi
rm -rf "$OUT" && mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }
# DeepSpeed's per-rank INFO lines, library warnings and progress bars: the demo prints its own results
quiet() { grep -vE "^\[20..-..-.. ..:..:..,...\] \[(INFO|WARNING)\]|FutureWarning|UserWarning|return func\(|No CUDA runtime|built successfully|kaiming|warnings.warn|^Processing zero|^Parsing checkpoint|^Detected checkpoint|^Reconstructed|it/s\]" || true; }
launch() {  # ENTRY ARGS...: 2 ranks (GPUs, or CPU processes with gloo)
  local entry=$1; shift
  "$PY" -m deepspeed.launcher.runner --num_gpus 2 --master_port "${MASTER_PORT:-29541}" --module "$entry" "$@" 2>&1 | quiet
}
