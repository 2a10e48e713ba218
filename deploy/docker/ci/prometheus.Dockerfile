# CI only (docker-compose.ci.yml): Prometheus from Debian's prometheus package, in place of
# the official prom/prometheus image when no registry is reachable. The entry point is the
# binary, as there, so docker-compose.yml's command line and health check (wget) apply.
ARG BASE_IMAGE=smart-tuner/debian-base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus wget \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus && chown prometheus:prometheus /prometheus
WORKDIR /prometheus
USER prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
