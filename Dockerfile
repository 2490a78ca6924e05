FROM python:3.11-slim
# jemalloc: `sluice serve` runs on it when installed (proxy/allocator.py): RSS goes back
# to idle after a burst of held streams, where CPython's allocator keeps its arenas.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libjemalloc2 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY policies ./policies
RUN pip install --no-cache-dir .
ENV SLUICE_HOST=0.0.0.0 SLUICE_PORT=8080 SLUICE_CONFIG=/app/policies/default.yaml
# Relative paths (the batch queue's SQLite file without Redis, `server.jobs.sqlite_path`)
# land in a volume: a 202 for a batch must survive the container being replaced.
RUN mkdir /data
VOLUME /data
WORKDIR /data
EXPOSE 8080
ENTRYPOINT ["sluice"]
CMD ["serve"]
