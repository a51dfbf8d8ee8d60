# One image for every fleet service (api, worker, ingest, beat, migrate, sim); see docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . .
# Installed in place (-e): the Alembic migrations and the sample firmware live beside the packages.
RUN pip install -e ".[postgres]" \
    && useradd --system --uid 10001 --home-dir /data fleet \
    && mkdir -p /data/firmware /data/beat \
    && chown -R fleet /data

USER fleet
ENV FLEET_DATA_DIR=/data \
    FLEET_FIRMWARE_DIR=/data/firmware \
    FLEET_API_HOST=0.0.0.0 \
    FLEET_API_PORT=8000
EXPOSE 8000
CMD ["fleet", "api"]
