# syntax=docker/dockerfile:1
# Ringside image: `docker build -t ghcr.io/fightclub/ringside:0.1.0 .` (BuildKit, the default
# builder since Docker 23: the install step bind-mounts the wheels from the build stage, so they
# never land in a layer of the final image).
#
# The base is pinned by version and by the digest of its multi-platform index, as published in
# docker-library/repo-info (repos/python/remote/3.11.16-slim-bookworm.md, build of 2026-09-01).
# Update both together, e.g. `docker buildx imagetools inspect python:3.11.16-slim-bookworm`.
ARG PYTHON_IMAGE=python:3.11.16-slim-bookworm@sha256:c425d915a89a6dcd3183b1797ad9bd8878caff5a417f6371c8df93c8ea8b727f

# ---- build: the sidecar's wheel and a wheel of every dependency. On linux/amd64 every
# dependency publishes a binary wheel for CPython 3.11, so no compiler is needed in this stage
# either; on a platform where one does not, add gcc here (never in the runtime stage).
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY sidecar ./sidecar
# `.[redis]` is the local tree: the sidecar's own wheel is never looked up on an index
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[redis]'

# ---- runtime: the wheels installed offline, no compiler, no pip cache, a numeric non-root user
FROM ${PYTHON_IMAGE}
ARG RINGSIDE_VERSION=0.1.0
LABEL org.opencontainers.image.title="ringside" \
      org.opencontainers.image.description="OpenAI-compatible LLM gateway sidecar" \
      org.opencontainers.image.version="${RINGSIDE_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# bytecode is compiled once by pip at install time; at run time the root filesystem is
# read-only (k8s/base), so Python must not try to write __pycache__
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# the redis extra too: the same image serves the sidecar (sqlite) and the gateway (redis)
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels "ringside[redis]==${RINGSIDE_VERSION}" \
 && groupadd --system --gid 10001 ringside \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/ringside --shell /usr/sbin/nologin ringside \
 && mkdir -p /var/lib/ringside /etc/ringside \
 && chown 10001:10001 /var/lib/ringside
# a config that starts with no keys and no network (mock provider, loopback only): replaced by
# the ConfigMap mounted over /etc/ringside in Kubernetes, or by `-v ...:/etc/ringside:ro`
COPY config/demo.yaml /etc/ringside/ringside.yaml
USER 10001:10001
# the only writable state: the sqlite store (storage.sqlite_path under this directory)
WORKDIR /var/lib/ringside
VOLUME ["/var/lib/ringside"]
# 8787 api (loopback in the sidecar shape, 0.0.0.0 in the gateway shape), 8788 admin
EXPOSE 8787 8788
ENTRYPOINT ["ringside"]
CMD ["serve", "--config", "/etc/ringside/ringside.yaml"]
