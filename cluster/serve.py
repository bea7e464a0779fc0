"""`taps serve`: the main job. Starts local Ray (a real head with the job server), the embedded
Redis registry, the verifier and drafters, and the OpenAI-compatible HTTP server; Ctrl-C stops it all."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("taps.serve")


# Serve kills a proxy that is not ready within 5 s (health checks: 10 s), and its request router
# gives a replica 0.1 s to report its queue length (then warns and retries); on a busy 2-core machine
# a Python process can need longer. Generous defaults, still overridable.
PATIENT_SERVE_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
                     "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "1.0"}


def use_patient_serve_env() -> None:
    """Set PATIENT_SERVE_ENV (unless already set) before ray.init, so Ray's processes inherit it."""
    for k, v in PATIENT_SERVE_ENV.items():
        os.environ.setdefault(k, v)


def load_config(path: str | None) -> dict:
    if not path:
        return {}
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    # accept a full Serve config file too: take the first application's args
    if "applications" in data:
        data = data["applications"][0].get("args", {}) or {}
    return data


def config_from_args(args) -> dict:
    from taps.runtime import shipped_drafters

    cfg = load_config(getattr(args, "config", None))
    if getattr(args, "verifier", None):
        cfg["verifier"] = args.verifier
    if getattr(args, "dtype", None):  # given on the command line: it wins over the file
        cfg["dtype"] = args.dtype
    if getattr(args, "drafter_dtype", None):
        cfg["drafter_dtype"] = args.drafter_dtype
    if getattr(args, "api_key", None):
        cfg["api_key"] = args.api_key
    if getattr(args, "admin_key", None):
        cfg["admin_key"] = args.admin_key
    if getattr(args, "threads", 0):
        cfg["threads"] = args.threads
    tree = cfg.setdefault("tree", {})
    for key, attr in (("depth", "tree_depth"), ("top_k", "tree_top_k"), ("total_tokens", "tree_tokens")):
        if getattr(args, attr, None) is not None:
            tree[key] = getattr(args, attr)  # given on the command line: it wins over the file
    if getattr(args, "tree", None):
        tree["mode"] = args.tree
    if getattr(args, "drafters", None):
        entries = []
        for item in args.drafters.split(","):
            name, _, path = item.strip().partition("=")
            entries.append({"name": name, "checkpoint": path or None})
        cfg["drafters"] = entries
    if "drafters" not in cfg:
        ddir = Path(args.drafter_dir) if getattr(args, "drafter_dir", None) else None
        from taps.runtime import default_drafter_dir

        base = ddir or default_drafter_dir()
        shipped = shipped_drafters(base)
        # the paper's pair and the weightless lookup drafter start with the server; every other
        # shipped drafter is registered and starts on the first request that names it
        pair = [n for n in ("math", "chat") if n in shipped] or shipped[:2]
        cfg["drafters"] = ([{"name": n, "checkpoint": str(base / n)} for n in pair] + [{"name": "lookup"}]
                           if pair else [{"name": "math"}, {"name": "chat"}])
        others = [n for n in shipped if n not in pair]
        cfg.setdefault("lazy_drafters", [{"name": n, "checkpoint": str(base / n)} for n in others])
        if others:
            log.info("starting drafters %s; also registered, started by the first request naming them: %s",
                     ", ".join(d["name"] for d in cfg["drafters"]), ", ".join(others))
    names = [d["name"] for d in cfg["drafters"]]
    if "default_drafters" not in cfg and {"math", "chat"} <= set(names):
        cfg["default_drafters"] = ["math", "chat"]  # the paper's pair; others are used when a request names them
    return cfg


class _Interrupted(BaseException):
    """Raised in the main thread by SIGINT / SIGTERM, wherever start-up is."""


def main(args) -> int:
    import ray
    from ray import serve

    from cluster.app import NAMESPACE, build_app
    from cluster.config import AppConfig
    from cluster.fleet import check_placement, placement_plan
    from taps.lookup import is_lookup

    cfg = config_from_args(args)
    for d in cfg["drafters"]:
        if not d.get("checkpoint") and not is_lookup(d["name"]):  # lookup: n-gram drafter without weights
            log.warning("drafter %r has no checkpoint: serving a RANDOM-INIT (untrained) drafter", d["name"])
    app = build_app(cfg)  # validates the config before anything starts
    use_patient_serve_env()
    stopping = threading.Event()

    def on_signal(signum, _frame):
        if stopping.is_set():
            return
        stopping.set()
        raise _Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    local = not os.environ.get("RAY_ADDRESS")
    if local:
        _become_subreaper()
    rc = 0
    try:
        if local:
            ray.init(address="local", namespace=NAMESPACE, include_dashboard=True, dashboard_host="127.0.0.1",
                     dashboard_port=8265)
        else:
            ray.init(address=os.environ["RAY_ADDRESS"], namespace=NAMESPACE)
        short = check_placement(placement_plan(AppConfig.model_validate(cfg)), free=ray.available_resources())
        if short:
            print(f"taps serve: {short}", file=sys.stderr, flush=True)
            return 1
        serve.start(http_options={"host": args.host, "port": args.port})
        t0 = time.monotonic()
        serve.run(app, name="taps", route_prefix="/", blocking=False)
        print(f"TAPS-Serve ready on http://{args.host}:{args.port} (OpenAI API under /v1) in "
              f"{time.monotonic() - t0:.0f} s; Ray dashboard and job server on http://127.0.0.1:8265; Ctrl-C stops",
              flush=True)
        print(defaults_line(AppConfig.model_validate(cfg), _verifier_info()), flush=True)
        while not stopping.wait(1.0):
            pass
    except _Interrupted:
        pass
    except Exception as e:  # noqa: BLE001 - start-up failed: one line, then everything stops
        print(f"taps serve: start-up failed: {_last_line(e)}", file=sys.stderr, flush=True)
        rc = 1
    finally:
        stopping.set()
        _shutdown(local)
    return rc


def _verifier_info() -> dict:
    import ray

    from cluster.app import NAMESPACE

    try:
        return ray.get(ray.get_actor("taps-verifier", namespace=NAMESPACE).info.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - the line then says what the config asked for
        return {}


def defaults_line(cfg, info: dict) -> str:
    """What a request without a `taps` field gets: strategy, drafters, tree mode, numerics mode."""
    from taps.runtime import numerics_mode

    drafters = cfg.default_drafters or [d.name for d in cfg.drafters]
    dtype = info.get("dtype", cfg.dtype)
    if cfg.tree.mode == "auto":
        tree = ("tree auto (per request and step: the merged tree, one drafter, or no draft, whichever "
                "measures fastest)")
    else:
        t = cfg.tree
        tree = f"tree fixed (depth {t.depth}, top-k {t.top_k}, {t.total_tokens} nodes per drafter every step)"
    strategy = cfg.strategy if cfg.strategy == "none" or cfg.strategy.startswith("single:") else \
        f"{cfg.strategy} over {', '.join(drafters) or 'every ready drafter'}"
    tuner = info.get("thread_tuner_options")
    threads = (f"{' or '.join(map(str, tuner))} threads per tick, whichever measures faster" if tuner
               else f"{info.get('torch_threads', '?')} threads")
    return (f"default for requests without a `taps` field: {strategy}; {tree}; numerics: "
            f"{numerics_mode(dtype)} ({dtype} verifier engine, {threads})")


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _shutdown(local: bool, limit_s: float = 8.0) -> None:
    """Stop everything `taps serve` started, within `limit_s` whatever hangs (then the process exits)."""
    import ray
    from ray import serve

    import psutil

    print("shutting down ...", file=sys.stderr, flush=True)
    timer = threading.Timer(limit_s, lambda: os._exit(130))
    timer.daemon = True
    timer.start()
    # a local cluster's processes are ours: listed now, while Ray's agents are still our descendants
    # (a start interrupted inside ray.init leaves its raylet's agents behind otherwise, for ~40 s)
    ours = psutil.Process().children(recursive=True) if local else []
    try:
        if not ray.is_initialized():
            return
        if not local:  # a shared cluster: remove our application, leave the cluster running
            try:
                serve.delete("taps", _blocking=False)
            except Exception:  # noqa: BLE001 - best effort
                log.warning("could not delete the Serve application")
        # the actors are detached (they outlive a replica): stop them too
        from cluster.app import NAMESPACE

        names = ray.util.list_named_actors()  # this driver's namespace: taps
        for name in [n for n in names if n.startswith("taps-drafter-")] + ["taps-verifier", "taps-registry"]:
            try:
                ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            except ValueError:
                pass
        ray.shutdown()  # a local cluster started here stops with its driver
    finally:
        _stop_processes(ours, grace_s=2.0)
        timer.cancel()


def _become_subreaper() -> None:
    """Linux: processes orphaned below this one (Ray's agents when their raylet goes first) are
    re-parented to it instead of init, so shutdown still finds and stops them."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        except (OSError, AttributeError):
            log.debug("no PR_SET_CHILD_SUBREAPER; orphans of an interrupted start may outlive it")


def _stop_processes(procs, grace_s: float) -> None:
    """SIGTERM these processes and every descendant still running (orphans included, see
    _become_subreaper), then SIGKILL whatever outlives `grace_s`."""
    import psutil

    me = psutil.Process()
    deadline = time.monotonic() + grace_s
    alive = {p.pid: p for p in procs}
    while True:
        alive.update({p.pid: p for p in me.children(recursive=True)})
        alive = {pid: p for pid, p in alive.items() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}
        if not alive:
            break
        late = time.monotonic() > deadline
        for p in alive.values():
            try:
                p.kill() if late else p.terminate()
            except psutil.Error:
                pass
        psutil.wait_procs(list(alive.values()), timeout=0.3)
        if late:
            break
    for p in me.children():  # reap
        try:
            p.wait(0)
        except (psutil.Error, psutil.TimeoutExpired):
            pass
