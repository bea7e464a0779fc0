"""Router helpers: gRPC client pooling and replica choice. The decode loop itself is taps.loop.decode,
run over remote adapters (actors.adapters: GrpcProposer per drafter, ActorVerifier for the verifier
actor); a drafter that fails or is late sits the step out and catches up on the next one.
"""

from __future__ import annotations

import hashlib

from actors.grpc_client import DrafterClient
from taps.loop import VerifierUnavailable

__all__ = ["ClientPool", "pick_replica", "VerifierUnavailable"]


class ClientPool:
    """One DrafterClient per address, per event loop (grpc.aio channels are loop-bound)."""

    def __init__(self):
        self._clients: dict[str, DrafterClient] = {}

    def get(self, address: str) -> DrafterClient:
        c = self._clients.get(address)
        if c is None:
            c = self._clients[address] = DrafterClient(address)
        return c

    def drop(self, address: str) -> None:
        self._clients.pop(address, None)


def pick_replica(replicas: list[dict], request_id: str) -> dict | None:
    """A request keeps one replica for its lifetime: chosen by a hash of the request id."""
    if not replicas:
        return None
    h = int(hashlib.sha256(request_id.encode()).hexdigest(), 16)
    return sorted(replicas, key=lambda r: r["address"])[h % len(replicas)]
