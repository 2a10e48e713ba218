# CI only (docker-compose.ci.yml): Alertmanager from Debian's prometheus-alertmanager
# package, in place of the official prom/alertmanager image when no registry is reachable.
# The entry point is the binary, as there, so docker-compose.yml's command line and health
# check (wget) apply.
ARG BASE_IMAGE=smart-tuner/debian-base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus-alertmanager wget \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /alertmanager && chown prometheus:prometheus /alertmanager
WORKDIR /alertmanager
USER prometheus
EXPOSE 9093
ENTRYPOINT ["/usr/bin/prometheus-alertmanager"]
CMD ["--config.file=/etc/alertmanager/alertmanager.yml", "--storage.path=/alertmanager"]
