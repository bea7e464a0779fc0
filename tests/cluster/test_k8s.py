"""The Kubernetes manifests (k8s/): schema-valid, generated from k8s/config/values.yaml, and
consistent with what the Ray actors and the Serve app actually ask for. No cluster, no Ray."""

from __future__ import annotations

import copy
import glob
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
SHARED = Path(__file__).resolve().parents[3] / "shared"
VALIDATE = SHARED / "k8s-schemas" / "validate.py"
GPU = "nvidia.com/gpu"


def _load_generate():
    spec = importlib.util.spec_from_file_location("k8s_generate", K8S / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen = _load_generate()


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


@pytest.fixture(scope="module")
def values() -> dict:
    return gen.load_values(K8S / "config" / "values.yaml")


@pytest.fixture(scope="module")
def rayservice() -> dict:
    (svc,) = docs("rayservice.yaml")
    return svc


@pytest.fixture(scope="module")
def serve_cfg(rayservice) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def groups(svc: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def ray_containers(cluster_spec: dict):
    for g in [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]:
        yield g, g["template"]["spec"]


# --------------------------------------------------------------------------- validity and freshness

def test_validate_py_accepts_every_manifest():
    if not VALIDATE.exists():
        pytest.skip(f"shared k8s schemas not found at {VALIDATE} (the ../shared checkout is missing)")
    files = sorted(glob.glob(str(K8S / "*.yaml")))
    assert {Path(f).name for f in files} >= {"rayservice.yaml", "rayjob-train.yaml", "redis.yaml", "pvc.yaml"}
    r = subprocess.run([sys.executable, str(VALIDATE), *files], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout
    assert r.stdout.count("OK ") == sum(len(docs(Path(f).name)) for f in files)


def test_committed_manifests_match_generator():
    r = subprocess.run([sys.executable, str(K8S / "generate.py"), "--check"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, f"k8s/*.yaml is stale; run python k8s/generate.py\n{r.stdout}{r.stderr}"


def test_check_fails_on_drift_and_one_number_scales_a_specialist(tmp_path, values):
    changed = copy.deepcopy(values)
    next(s for s in changed["specialists"] if s["name"] == "math")["replicas"] = 3
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(changed))
    assert gen.main(["--values", str(path), "--out", str(K8S), "--check"]) == 1  # committed files differ
    out = tmp_path / "out"
    assert gen.main(["--values", str(path), "--out", str(out)]) == 0
    (svc,) = [d for d in yaml.safe_load_all((out / "rayservice.yaml").read_text()) if d]
    math = groups(svc)["drafter-math"]
    surge = values["drafterDefaults"]["surge"]
    assert (math["replicas"], math["minReplicas"], math["maxReplicas"]) == (3, 3, 3 + surge)
    args = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert next(d for d in args["drafters"] if d["name"] == "math")["replicas"] == 3
    assert gen.main(["--values", str(path), "--out", str(out), "--check"]) == 0


@pytest.mark.parametrize("bad", ["Law", "law_v2", "-law", ""])
def test_values_reject_names_that_cannot_name_a_worker_group(values, bad):
    changed = copy.deepcopy(values)
    changed["specialists"].append({"name": bad, "checkpoint": "/models/drafters/x", "replicas": 1})
    with pytest.raises(gen.ValuesError):
        gen.render(changed)


# --------------------------------------------------------------------------- RayService shape

def test_every_specialist_has_a_worker_group_and_a_serve_drafter(values, rayservice, serve_cfg):
    names = [s["name"] for s in values["specialists"]]
    assert {"math", "chat", "code"} <= set(names)
    by_group = groups(rayservice)
    args = serve_cfg["applications"][0]["args"]
    served = {d["name"]: d for d in args["drafters"]}
    for s in values["specialists"]:
        g = by_group[f"drafter-{s['name']}"]
        assert g["minReplicas"] == g["replicas"] == s["replicas"] <= g["maxReplicas"]
        assert served[s["name"]] == {"name": s["name"], "checkpoint": s["checkpoint"], "replicas": s["replicas"]}
        res = gen.parse_ray_resources_param(g["rayStartParams"]["resources"])
        assert res[f"drafter_{s['name']}"] == int(g["rayStartParams"]["num-gpus"])
    assert set(by_group) == {f"drafter-{n}" for n in names} | {"verifier"}
    assert len(served) == len(names)


def test_worker_group_resources_match_ray_start_params(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head_params = cluster["headGroupSpec"]["rayStartParams"]
    assert head_params["num-gpus"] == "0"
    for g, pod in ray_containers(cluster):
        (c,) = pod["containers"]
        req, lim = c["resources"]["requests"], c["resources"]["limits"]
        assert req == lim, f"{g.get('groupName', 'head')}: requests must equal limits"
        gpus = int(g["rayStartParams"]["num-gpus"])
        assert int(lim.get(GPU, 0)) == gpus, g.get("groupName", "head")
        if gpus:
            assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            assert "nodeSelector" in pod
            assert "resources" in g["rayStartParams"], "a serving GPU group must advertise its custom resource"
    verifier = groups(rayservice)["verifier"]
    assert gen.parse_ray_resources_param(verifier["rayStartParams"]["resources"]) == {"accelerator_type:A100": 1}
    assert "A100" in verifier["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]


def test_resource_param_format_is_what_the_ray_autoscaler_parses():
    text = gen.ray_resources_param({"drafter_math": 2, "drafter_math-next": 2})
    assert text == '"{\\"drafter_math\\": 2, \\"drafter_math-next\\": 2}"'
    assert gen.parse_ray_resources_param(text) == {"drafter_math": 2, "drafter_math-next": 2}


def test_actor_options_fit_their_worker_groups(values, rayservice):
    drafter_actor = pytest.importorskip("actors.drafter_actor")
    verifier_actor = pytest.importorskip("actors.verifier_actor")
    by_group = groups(rayservice)

    def fits(opts: dict, group: dict) -> bool:
        params = group["rayStartParams"]
        offered = gen.parse_ray_resources_param(params.get("resources", '"{}"'))
        wanted = dict(opts.get("resources", {}))
        if opts.get("accelerator_type"):
            wanted[f"accelerator_type:{opts['accelerator_type']}"] = 0.001  # how Ray encodes it
        return opts.get("num_gpus", 0) <= int(params["num-gpus"]) and all(
            offered.get(k, 0) >= v for k, v in wanted.items())

    for s in values["specialists"]:
        opts = drafter_actor.drafter_actor_options(s["name"], gpu=True)
        assert fits(opts, by_group[f"drafter-{s['name']}"])
        assert not fits(opts, by_group["verifier"])
        other = [n for n in by_group if n.startswith("drafter-") and n != f"drafter-{s['name']}"]
        assert not any(fits(opts, by_group[n]) for n in other), "a drafter could land on another domain's pod"
    vopts = verifier_actor.verifier_actor_options(gpu=True)
    assert fits(vopts, by_group["verifier"])
    assert not any(fits(vopts, g) for n, g in by_group.items() if n != "verifier")


def test_pods_mount_models_and_read_keys_from_the_secret(values, rayservice):
    (job,) = docs("rayjob-train.yaml")[:1]
    for cluster in (rayservice["spec"]["rayClusterConfig"], job["spec"]["rayClusterSpec"]):
        for _, pod in ray_containers(cluster):
            (c,) = pod["containers"]
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                      if "persistentVolumeClaim" in v}
            assert claims == {"models": values["models"]["claim"]}
            assert {"name": "models", "mountPath": "/models"} in c["volumeMounts"]
            env = {e["name"]: e for e in c["env"]}
            assert "REDIS_URL" in env
            for key in ("TAPS_API_KEY", "TAPS_ADMIN_KEY"):
                assert env[key]["valueFrom"]["secretKeyRef"] == {"name": values["secret"]["name"], "key": key}
            assert env["HF_HUB_OFFLINE"]["value"] == "1"
    (claim,) = docs("pvc.yaml")
    assert claim["metadata"]["name"] == values["models"]["claim"]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs("redis.yaml")}
    assert kinds == {("Deployment", values["redis"]["name"]), ("Service", values["redis"]["name"])}
    assert f"redis://{values['redis']['name']}:" in (K8S / "rayservice.yaml").read_text()
    (example,) = docs("secret.example.yaml")
    assert set(example["stringData"].values()) == {"REPLACE-ME"}, "never commit a real secret"


# --------------------------------------------------------------------------- Serve app

def test_serve_config_names_the_app_builder_with_known_args(serve_cfg):
    (app,) = serve_cfg["applications"]
    assert app["import_path"] == "cluster.app:build_app"
    args = app["args"]
    assert args["gpu"] is True and args["verifier"] == "/models/verifier"
    assert all(d["checkpoint"].startswith("/models/drafters/") for d in args["drafters"])
    config = pytest.importorskip("cluster.config")
    unknown = set(args) - set(config.AppConfig.model_fields)
    assert not unknown, f"AppConfig ignores these keys silently: {sorted(unknown)}"
    cfg = config.AppConfig.model_validate(args)
    assert [d.name for d in cfg.drafters] == [d["name"] for d in args["drafters"]]


def test_build_app_returns_a_serve_application_without_starting_ray(serve_cfg):
    app_mod = pytest.importorskip("cluster.app")
    import ray
    from ray.serve import Application

    was_running = ray.is_initialized()
    app = app_mod.build_app(serve_cfg["applications"][0]["args"])
    assert isinstance(app, Application)
    assert ray.is_initialized() == was_running


# --------------------------------------------------------------------------- training job

def test_rayjob_trains_on_gpu_workers_into_the_volume(values):
    jobs = docs("rayjob-train.yaml")
    assert len(jobs) == len(values["training"]["jobs"])
    for job, want in zip(jobs, values["training"]["jobs"]):
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True
        entry = spec["entrypoint"].split()
        assert entry[:2] == ["python", "training/train_drafter.py"]
        config = entry[entry.index("--config") + 1]
        assert config == want["config"] and (ROOT / config).exists(), config
        assert entry[entry.index("--output") + 1] == f"/models/drafters/{want['name']}"
        (workers,) = spec["rayClusterSpec"]["workerGroupSpecs"]
        gpus = int(workers["rayStartParams"]["num-gpus"])
        assert gpus >= 1 and workers["template"]["spec"]["containers"][0]["resources"]["limits"][GPU] == gpus
        assert workers["replicas"] == want["workers"]


def test_rayjob_entrypoint_flags_exist_in_the_training_cli():
    script = ROOT / "training" / "train_drafter.py"
    if not script.exists():
        pytest.skip("training/train_drafter.py not present")
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for job in docs("rayjob-train.yaml"):
        flags = re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", job["spec"]["entrypoint"])
        missing = [f for f in flags if f not in r.stdout]
        assert not missing, f"train_drafter.py does not accept {missing} (RayJob {job['metadata']['name']})"


# --------------------------------------------------------------------------- image

def test_dockerfile_builds_the_image_the_manifests_name(values):
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.M).group(1)
    pins = (ROOT / "pyproject.toml").read_text()
    ray_pin = re.search(r'"ray\[[a-z,]+\]==([0-9.]+)"', pins).group(1)
    assert values["rayVersion"] == ray_pin
    assert base.startswith(f"rayproject/ray:{ray_pin}-py311"), base
    for needed in ("pip install", "HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "WORKDIR /app"):
        assert needed in dockerfile, needed
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".git", ".venv", "runs"):
        assert any(p.strip("/").startswith(path) for p in ignored), path
    assert "README.md" not in ignored  # pyproject's readme: pip install . needs it
