# syntax=docker/dockerfile:1
# Build stage: build the wheel and install it with its dependencies into a virtualenv.
FROM python:3.12-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m venv /opt/receiver \
 && /opt/receiver/bin/pip install --no-compile . \
 && /opt/receiver/bin/python -m compileall -q /opt/receiver/lib

# Runtime stage: the virtualenv only, run as an unprivileged user.
FROM python:3.12-slim-bookworm
ENV PATH=/opt/receiver/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FLESPI_RECEIVER_SERVER__HOST=0.0.0.0 \
    FLESPI_RECEIVER_SERVER__PORT=8080 \
    FLESPI_RECEIVER_LOG__FORMAT=json
RUN groupadd --system --gid 10001 receiver \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin receiver
COPY --from=build /opt/receiver /opt/receiver
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
# /healthz answers while the process serves; readiness needs no credentials either
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
STOPSIGNAL SIGTERM
CMD ["flespi-receiver", "serve"]
