# One image for every prefsync container (services, simulators, tools): `prefsync ...`.
# Dependencies are installed with the versions the tests ran against (deploy/constraints.txt,
# written by deploy/freeze_constraints.py).
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY deploy/constraints.txt ./constraints.txt
COPY pyproject.toml README.md ./
COPY common ./common
COPY services ./services
RUN python -m venv /opt/prefsync \
 && /opt/prefsync/bin/pip install --constraint constraints.txt .

FROM python:3.11.11-slim-bookworm
ENV PATH=/opt/prefsync/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin prefsync
COPY --from=build /opt/prefsync /opt/prefsync
USER 10001:10001
WORKDIR /tmp
EXPOSE 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=6 \
  CMD ["prefsync", "healthcheck", "http://127.0.0.1:9464/readyz"]
ENTRYPOINT ["prefsync"]
CMD ["--help"]
