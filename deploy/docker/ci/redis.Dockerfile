# CI only (docker-compose.ci.yml): Redis from Debian's redis-server package, in place of the
# official redis:7-alpine when no registry is reachable. Same command line, same health
# check (redis-cli), data in /data as there.
ARG BASE_IMAGE=smart-tuner/debian-base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server redis-tools \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server"]
