#!/usr/bin/env bash
# Regenerate the committed protobuf/gRPC code and stubs from proto/.
# Pinned generator versions keep the output byte-identical; CI runs this and fails on a diff.
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import importlib.metadata as md, sys
want = {"grpcio-tools": "1.85.1", "mypy-protobuf": "5.1.0"}
bad = {k: md.version(k) for k in want if md.version(k) != want[k]}
if bad:
    sys.exit(f"gen_proto: need {want}, found {bad}: pip install -r tools/proto-requirements.txt")
PY
python -m grpc_tools.protoc -Iproto \
  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
  proto/jobworker/v1/jobworker.proto proto/jobworker/v1/node.proto
touch jobworker/v1/__init__.py
