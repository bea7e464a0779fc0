"""The Ray Serve application, in the shape of Ray Serve LLM's builders: `build_app(cfg)` validates
the config once and binds three deployments, each given its dependencies as handles.

    OpenAIFrontEnd  taps-frontend (ingress, autoscaled)   HTTP: schemas, auth, limits, tokenization, SSE
        -> DecodeService  taps-decode (autoscaled)       admission, strategy and drafter resolution; relays
                                                         the events of VerifierActor.generate (the decode
                                                         loop, run beside the verifier, drafters over gRPC)
        -> DrafterFleet   taps-fleet (one replica)       places every actor (verifier, drafters), the Redis
                                                         registry, lazy starts; hands the verifier's handle over

`cluster.app:build_app` is the import path for `serve deploy` / KubeRay.
"""

from __future__ import annotations

from ray import serve

from cluster.config import AppConfig
from cluster.decode import DecodeService
from cluster.fleet import NAMESPACE, DrafterFleet
from cluster.frontend import OpenAIFrontEnd, make_fastapi_app

__all__ = ["NAMESPACE", "build_app"]

# Replica processes are light (the verifier and drafters are actors): a small CPU share each, so a
# 2-CPU laptop holds them all; a replica that fails its constructor fails the application at once
# (its error names the cause) instead of being retried for minutes.
_REPLICA = {"ray_actor_options": {"num_cpus": 0.1}, "max_constructor_retry_count": 1,
            "health_check_period_s": 10}


def build_app(args: dict | None = None):
    """Validate the config once and bind the deployments (no Ray work happens here)."""
    cfg = AppConfig.model_validate(args or {})
    config = cfg.model_dump()
    scaling = {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas}
    fleet = serve.deployment(DrafterFleet, name="taps-fleet", num_replicas=1, max_ongoing_requests=1000,
                             **{**_REPLICA, "ray_actor_options": {"num_cpus": 0}}).bind(config)
    decoder = serve.deployment(
        DecodeService, name="taps-decode",
        # a replica only decodes and waits (the verifier batches): scale out when one is full
        autoscaling_config={**scaling, "target_ongoing_requests": cfg.max_concurrent},
        max_ongoing_requests=cfg.max_concurrent + cfg.max_queue + 4, **_REPLICA).bind(config, fleet)
    front = serve.deployment(
        serve.ingress(make_fastapi_app)(OpenAIFrontEnd), name="taps-frontend",
        autoscaling_config={**scaling, "target_ongoing_requests": 4 * cfg.max_concurrent},
        max_ongoing_requests=4 * (cfg.max_concurrent + cfg.max_queue) + 16, **_REPLICA).bind(config, decoder, fleet)
    return front
