# qatoolbox-exporter image, (target "demo") the QAToolBox demo app used by the compose file's
# demo profile, and (target "report") the weekly report with its charting extra.
# `docker build .` builds the exporter (the last stage), which never carries matplotlib.
FROM python:3.12.8-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY exporter ./exporter
# A fixed uid/gid so that files on shared volumes (the app's metrics folders) match across
# the exporter and demo containers.
RUN pip install . \
 && groupadd --system --gid 10001 qatoolbox \
 && useradd --system --uid 10001 --gid qatoolbox --no-create-home \
            --home-dir /nonexistent --shell /usr/sbin/nologin qatoolbox \
 && install -d -o 10001 -g 10001 -m 0755 /run/qatoolbox/metrics
# ^ A fresh named volume mounted there (app-metrics) takes this owner, so the non-root app
#   and exporter containers can create and compact their metrics folders.

FROM base AS demo
# The demo's own dependencies, never the exporter's: Django, gunicorn, Celery with Redis.
RUN pip install "django>=4.2,<6" "gunicorn>=21.2,<24" "celery[redis]>=5.3,<6"
COPY examples ./examples
WORKDIR /app/examples/qatoolbox_demo
USER 10001:10001
EXPOSE 8000

FROM base AS report
# `docker build --target report -t qatoolbox-report .`: matplotlib for the charts, in this image
# only (the exporter does not need it). Used by deploy/kubernetes/report-cronjob.yaml.
RUN pip install ".[report]"
USER 10001:10001
ENTRYPOINT ["qatoolbox-exporter"]
CMD ["report", "--help"]

FROM base AS exporter
USER 10001:10001
EXPOSE 9786
# Plain HTTP: with TLS on in the web config, override this check (docs/reliability.md,
# "Scraping a protected exporter", lists a probe for each client_auth_type).
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9786/healthz', timeout=4)"]
ENTRYPOINT ["qatoolbox-exporter"]
