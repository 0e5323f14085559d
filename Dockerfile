# syntax=docker/dockerfile:1
# syncd container image: docker build -t ghcr.io/example/syncd:0.1.0 .
# Deployed by deploy/kubernetes/deployment.yaml.

# Both stages must use the same Python: the venv's interpreter is a symlink to it.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
# Extras baked into the image: "otlp" exports traces. The image talks to a Chroma server
# over HTTP; add "embedded" for in-process Chroma and "local-model" for an in-process
# sentence-transformers embedder (each a much larger image).
ARG SYNCD_EXTRAS=otlp
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/syncd
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY syncd ./syncd
# pip compiles the bytecode here, so the read-only final image never needs to.
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/syncd/bin/pip install ".[${SYNCD_EXTRAS}]"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="syncd" \
      org.opencontainers.image.description="Change-data-capture daemon that mirrors MongoDB collections into Chroma" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/syncd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ANONYMIZED_TELEMETRY=False \
    HF_HOME=/var/lib/syncd/cache/huggingface
# A fixed numeric id, so Kubernetes' runAsNonRoot can check it without /etc/passwd.
RUN groupadd --system --gid 10001 syncd \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/syncd \
       --no-create-home --shell /usr/sbin/nologin syncd \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/syncd \
    && install -d -m 0755 /etc/syncd
COPY --from=builder /opt/syncd /opt/syncd
# Relative paths in syncd.toml (embedded Chroma, file checkpoints, span log) land here.
WORKDIR /var/lib/syncd
USER 10001:10001
# /metrics, /healthz, /readyz (set telemetry.listen to 0.0.0.0:9464 in a container).
EXPOSE 9464
# SIGTERM starts a graceful drain; give the container more than shutdown_timeout_s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["syncd"]
CMD ["run", "--config", "/etc/syncd/syncd.toml"]
