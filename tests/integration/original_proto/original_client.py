"""A client of the original API, run as its own process: it knows nothing of jobworker.

Usage: original_client.py GENERATED_DIR ADDRESS CERT KEY CA
Runs ``sh -c 'echo hello; echo oops >&2; exit 7'``, streams its output, reads its status,
stops it (already finished) and a long one (running), and prints what it saw as JSON.
"""

import json
import sys
from pathlib import Path

import grpc

generated, address, cert, key, ca = sys.argv[1:6]
sys.path.insert(0, generated)

import jobworker_original_pb2 as pb  # noqa: E402
import jobworker_original_pb2_grpc as pb_grpc  # noqa: E402

TIMEOUT = 20.0
credentials = grpc.ssl_channel_credentials(
    root_certificates=Path(ca).read_bytes(),
    private_key=Path(key).read_bytes(),
    certificate_chain=Path(cert).read_bytes(),
)
with grpc.secure_channel(address, credentials) as channel:
    stub = pb_grpc.JobServiceStub(channel)
    script = "echo hello; echo oops >&2; exit 7"
    job_id = stub.StartJob(
        pb.StartJobRequest(command="sh", args=["-c", script]), timeout=TIMEOUT
    ).job_id
    chunks = [
        [chunk.stream, chunk.data.decode()]
        for chunk in stub.StreamOutput(pb.JobRequest(job_id=job_id), timeout=TIMEOUT)
    ]
    status = stub.GetStatus(pb.JobRequest(job_id=job_id), timeout=TIMEOUT)
    stop_finished = stub.StopJob(pb.JobRequest(job_id=job_id), timeout=TIMEOUT)
    sleeper = stub.StartJob(
        pb.StartJobRequest(command="sleep", args=["60"]), timeout=TIMEOUT
    ).job_id
    running = stub.GetStatus(pb.JobRequest(job_id=sleeper), timeout=TIMEOUT)
    stop_running = stub.StopJob(pb.JobRequest(job_id=sleeper), timeout=TIMEOUT)
    stopped = stub.GetStatus(pb.JobRequest(job_id=sleeper), timeout=TIMEOUT)

print(
    json.dumps(
        {
            "job_id": job_id,
            "chunks": chunks,
            "status": [status.job_id, status.status, status.exit_code],
            "stop_finished": [stop_finished.success, stop_finished.message],
            "running": running.status,
            "stop_running": [stop_running.success, stop_running.message],
            "stopped": [stopped.status, stopped.exit_code],
        }
    )
)
