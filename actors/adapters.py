"""Remote adapters for taps.loop: a drafter behind gRPC as a Proposer, the verifier actor as a
Verifier. The router runs the same decode loop as the in-process engine over these."""

from __future__ import annotations

import asyncio

from actors.grpc_client import DrafterError
from taps.loop import DraftInput, ProposerError, VerifierUnavailable
from taps.scheduler import Load
from taps.tree import DraftTree
from taps.verify import PrefillJob, PrefillResult, VerifyJob, VerifyResult


class GrpcProposer:
    """One drafter replica (a DrafterClient) for one request; a late or failing call raises
    ProposerError, so the drafter sits the step out."""

    def __init__(self, name: str, client, deadline_s: float):
        self.name, self.client, self.deadline_s = name, client, deadline_s

    async def propose(self, inp: DraftInput) -> DraftTree:
        try:
            tree, _ = await asyncio.wait_for(
                self.client.draft(inp.request_id, inp.tokens, inp.hidden, inp.tree, timeout_s=self.deadline_s,
                                  start=inp.start), timeout=self.deadline_s)
        except DrafterError as e:
            raise ProposerError(self.name, str(e), lost=getattr(e.code, "name", "") == "NOT_FOUND") from e
        except (asyncio.TimeoutError, OSError) as e:
            raise ProposerError(self.name, f"no answer within {self.deadline_s:.2f} s ({type(e).__name__})") from e
        return tree

    async def release(self, request_id: str) -> None:
        await asyncio.wait_for(self.client.release(request_id), timeout=2.0)


class ActorVerifier:
    """The VerifierActor (a Ray actor handle) as a Verifier. The actor gathers the calls of every
    router replica into ticks; each answer carries the actor's load, which the tree policy reads."""

    def __init__(self, handle):
        self.handle = handle
        self._load: Load | None = None

    async def _call(self, method, job):
        import ray

        try:
            result, load = await method.remote(job)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            raise VerifierUnavailable(str(e)) from e
        self._load = Load(**load) if load else None
        return result

    async def prefill(self, job: PrefillJob) -> PrefillResult:
        return await self._call(self.handle.prefill, job)

    async def verify(self, job: VerifyJob) -> VerifyResult:
        return await self._call(self.handle.verify, job)

    async def release(self, request_id: str) -> None:
        self.handle.release.remote(request_id)

    def load(self) -> Load | None:
        return self._load
