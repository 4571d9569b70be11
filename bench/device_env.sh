# Sourced by the bench/gpu_*.sh scripts: output folder, Python, and on device machines (a .whl/ folder carried
# along) the wheels their image lacks, installed once into /tmp/site.
OUT="${OUT:-bench/results}"; mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
if [ -d .whl ] && [ ! -d /tmp/site/hydra ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
fi
if [ -d /tmp/site ]; then export PYTHONPATH="/tmp/site:$PWD"; fi
