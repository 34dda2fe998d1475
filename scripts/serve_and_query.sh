#!/usr/bin/env bash
# Serves a TF Serving model config file (the one `mlops.registry promote` writes) with this
# project's model server, sends one gRPC Predict by version label through the client, prints
# the answer (its model_spec.version is the registry version) and stops the server. The last
# serving step of `make run`.
#
#   scripts/serve_and_query.sh runs/models/models.config digits production
#
# The request holds the first two images of scikit-learn's digits, as 64 raw pixel values each.
set -euo pipefail

if [[ $# -ne 3 ]]; then
  echo "usage: scripts/serve_and_query.sh MODEL_CONFIG_FILE MODEL_NAME VERSION_LABEL" >&2
  exit 2
fi
config="$1"
name="$2"
label="$3"
python="${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}"
tmp=$(mktemp -d)
server=""
trap '[[ -n "$server" ]] && { kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }; rm -rf "$tmp"' EXIT

port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$python" -m serving.server --port="$port" --rest_api_port=0 --model_config_file="$config" \
  > "$tmp/server.log" 2>&1 &
server=$!

"$python" -c 'import json, sys; from sklearn import datasets
d = datasets.load_digits()
json.dump({"inputs": d.data[:2].tolist()}, open(sys.argv[1], "w"))
print("request: the first 2 digits of sklearn, true labels", d.target[:2].tolist())' "$tmp/request.json"

# The server opens its port once the labelled versions are loaded and warmed up: wait up to 90 s.
for _ in $(seq 180); do
  if (exec 3<> "/dev/tcp/127.0.0.1/$port") 2> /dev/null; then
    break
  fi
  if ! kill -0 "$server" 2>/dev/null; then
    echo "serve_and_query.sh: the server exited; its log:" >&2
    cat "$tmp/server.log" >&2
    exit 1
  fi
  sleep 0.5
done
echo "gRPC Predict to 127.0.0.1:$port, model $name, version label $label (from $config):"
"$python" -m serving.client --server="127.0.0.1:$port" --model="$name" --version_label="$label" \
  --input="$tmp/request.json"
