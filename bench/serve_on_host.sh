#!/usr/bin/env bash
# On a GPU host: start a Ray head, serve an application, run the HTTP benchmarks against it, stop.
#   bench/serve_on_host.sh OUT_DIR SERVE_YAML [WHEELHOUSE]
# WHEELHOUSE (from ../shared/gpu-host/make-wheelhouse.sh) is installed into /tmp/site first when
# given (air-gapped hosts). Benchmark sizes come from LATENCY_ARGS and LONG_ARGS.
set -uo pipefail
out=${1:?usage: serve_on_host.sh OUT_DIR SERVE_YAML [WHEELHOUSE]}
spec=${2:?usage: serve_on_host.sh OUT_DIR SERVE_YAML [WHEELHOUSE]}
wheelhouse=${3:-}
mkdir -p "$out"
if [ -n "$wheelhouse" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheelhouse"/*.whl || exit 1
  python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/site')" "$wheelhouse/ray-slim.zip"
  chmod +x /tmp/site/ray/core/src/ray/gcs/gcs_server /tmp/site/ray/core/src/ray/raylet/raylet
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
fi
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
[ -f ~/.ray/auth_token ] || python3 -m ray.scripts.scripts get-auth-token --generate > /dev/null
python3 -m ray.scripts.scripts start --head --port=6379 --metrics-export-port=8089 --include-dashboard=false \
  --disable-usage-stats > "$out/ray-start.log" 2>&1 || { tail -20 "$out/ray-start.log"; exit 1; }
python3 -m ray.serve.scripts run "$spec" --address=127.0.0.1:6379 > "$out/serve.log" 2>&1 &
serve_pid=$!
for _ in $(seq 1 180); do
  curl -sf -m 5 127.0.0.1:8000/health > /dev/null && break
  kill -0 $serve_pid 2>/dev/null || { echo "serve run exited"; tail -40 "$out/serve.log"; exit 1; }
  sleep 2
done
curl -sf 127.0.0.1:8000/v1/models | tee "$out/models.json"; echo
python3 bench/latency.py --out "$out/latency.json" ${LATENCY_ARGS:-} 2>&1 | tee "$out/latency.log"
python3 bench/long_context.py --out "$out/long_context.json" ${LONG_ARGS:-} 2>&1 | tee "$out/long_context.log"
curl -s 127.0.0.1:8089/metrics | grep '^ray_nmoe_' > "$out/metrics.txt"
kill -TERM $serve_pid; wait $serve_pid 2>/dev/null
python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1
grep -c . "$out/metrics.txt"
