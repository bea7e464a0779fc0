"""Remote adapter for taps.loop: a drafter behind gRPC as a Proposer. The verifier actor runs the
same decode loop as the in-process engine over these and its own local verifier."""

from __future__ import annotations

import asyncio

import torch

from actors.grpc_client import DrafterError
from taps.loop import DraftInput, ProposerError
from taps.tree import DraftTree


class GrpcProposer:
    """One drafter replica (a DrafterClient) for one request; a late or failing call raises
    ProposerError, so the drafter sits the step out."""

    def __init__(self, name: str, client, deadline_s: float):
        self.name, self.client, self.deadline_s = name, client, deadline_s

    async def propose(self, inp: DraftInput) -> DraftTree:
        hidden = inp.hidden.float() if inp.hidden.dtype == torch.float64 else inp.hidden  # the wire has no float64
        try:
            tree, _ = await asyncio.wait_for(
                self.client.draft(inp.request_id, inp.tokens, hidden, inp.tree, timeout_s=self.deadline_s,
                                  start=inp.start), timeout=self.deadline_s)
        except DrafterError as e:
            raise ProposerError(self.name, str(e), lost=getattr(e.code, "name", "") == "NOT_FOUND") from e
        except (asyncio.TimeoutError, OSError) as e:
            raise ProposerError(self.name, f"no answer within {self.deadline_s:.2f} s ({type(e).__name__})") from e
        return tree

    async def release(self, request_id: str) -> None:
        await asyncio.wait_for(self.client.release(request_id), timeout=2.0)
