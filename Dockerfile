# The mlsli image: the datasource (gunicorn) by default; the loader runs the same image with
# another command (see docker-compose.yml). Slim Python, hashed lock file, non-root.
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so code changes do not reinstall them: requirements.lock pins and hashes
# every package requirements.txt pulls in (`make lock`), and leaves out the embedded
# PostgreSQL (requirements-embedded.txt), which a container with DATABASE_URL never starts.
# Every one has a binary wheel for this base image: no compiler needed.
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock

COPY datasource ./datasource
COPY loader ./loader

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin mlsli \
    && mkdir -p /app/.data \
    && chown mlsli:mlsli /app/.data
USER mlsli

# DATABASE_URL must point at a PostgreSQL server (compose sets it); the image has no embedded
# PostgreSQL to fall back on.
ENV DATA_DIR=/app/.data \
    PORT=8080
EXPOSE 8080

HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=5 \
    CMD ["python", "-c", "import os, sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8080') + '/', timeout=4); sys.exit(0 if r.status == 200 else 1)"]

# Two workers with four threads each suit a small (2-core) machine: panels are short queries
# that mostly wait on PostgreSQL. A panel taking longer than the timeout is a bug to report.
CMD ["sh", "-c", "export PROMETHEUS_MULTIPROC_DIR=\"${PROMETHEUS_MULTIPROC_DIR:-/tmp/mlsli-prometheus}\" && exec gunicorn --workers 2 --threads 4 --timeout 60 -c datasource/gunicorn_conf.py --bind 0.0.0.0:${PORT} --access-logfile - 'datasource:create_app()'"]
