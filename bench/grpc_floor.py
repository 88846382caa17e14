"""The floor under ResolveAdapter latency on this machine: a bare grpc.aio server, no Redis, no auth.

    python -m bench.grpc_floor PORT

It answers ResolveAdapter with one fixed manifest and serves health, nothing else. bench.control_plane
drives it with the same load as the control plane, side by side in one run, so what the control
plane adds over grpcio itself on this machine shows as the difference between the two rows.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from loraplane.grpc_server import freeze_startup_heap
from loraplane.v1 import adapter_pb2
from loraplane.v1 import distribution_service_pb2 as dist_pb2
from loraplane.v1 import distribution_service_pb2_grpc as dist_grpc

MANIFEST = adapter_pb2.AdapterManifest(
    name="resolve-0", version="sha256:" + "0" * 64, size_bytes=1 << 20, rank=16,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    dtype="float32", base_model="base")


class FixedDistribution(dist_grpc.AdapterDistributionServiceServicer):
    async def ResolveAdapter(self, request, context):
        return dist_pb2.ResolveAdapterResponse(manifest=MANIFEST)


async def serve(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    dist_grpc.add_AdapterDistributionServiceServicer_to_server(FixedDistribution(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    if not server.add_insecure_port(f"127.0.0.1:{port}"):
        raise OSError(f"could not listen on 127.0.0.1:{port}")
    await server.start()
    freeze_startup_heap()  # as the control plane does, so the two differ only in what a call runs
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
