# syntax=docker/dockerfile:1
# One image for every Tessera service. The chart runs `tessera serve <service>`, `tessera migrate`
# and `tessera health ...` from it:  docker run IMAGE serve identity
# The final stage holds the Python runtime and a virtualenv, nothing to build with; it runs as a
# non-root user and writes nothing outside /tmp, so it runs with readOnlyRootFilesystem (the
# chart mounts an emptyDir on /tmp).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Every dependency ships a manylinux wheel, so this stage needs no compiler either; it exists to
# keep the sources, the wheel build and pip itself (removed from the venv) out of the final image.
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY tessera/ tessera/
COPY services/ services/
COPY bench/ bench/
# The generated protos are committed in tessera/v1/, so no protoc runs here. Byte-code is
# compiled now: the running container cannot write it.
RUN /opt/venv/bin/pip install --no-cache-dir . \
 && /opt/venv/bin/pip uninstall --yes pip \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 tessera \
 && useradd --system --uid 10001 --gid tessera --home-dir /tmp --no-create-home --shell /usr/sbin/nologin tessera
# Same base image and path as the build stage, so the venv's interpreter links stay valid.
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_STATE_HOME=/tmp/.state \
    TESSERA_DATA_DIR=/tmp/tessera
WORKDIR /tmp
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# gRPC: ingest, identity, profile, metrics; 9464: Prometheus (TESSERA_PROMETHEUS_PORT).
EXPOSE 50051 50052 50053 50054 9464
ENTRYPOINT ["tessera"]
CMD ["serve", "ingest"]
