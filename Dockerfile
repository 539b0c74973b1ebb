# swarmgate container image: a static-ish release binary on debian-slim, run as a
# non-root user. Configuration comes from environment variables (SWARMGATE_*) and a
# mounted file (SWARMGATE_CONFIG, default /etc/swarmgate/swarmgate.toml). The only path
# written at run time is the ACME storage volume, /var/lib/swarmgate/acme.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY .cargo ./.cargo
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin swarmgate

FROM debian:bookworm-slim
# curl answers the HEALTHCHECK; versions float so Debian security updates arrive.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/swarmgate swarmgate \
    && mkdir -p /var/lib/swarmgate/acme /var/lib/swarmgate/certs /etc/swarmgate \
    && chown -R swarmgate:swarmgate /var/lib/swarmgate
COPY --from=build /src/target/release/swarmgate /usr/local/bin/swarmgate
COPY config/examples/container.toml /etc/swarmgate/swarmgate.toml
ENV SWARMGATE_CONFIG=/etc/swarmgate/swarmgate.toml
WORKDIR /var/lib/swarmgate
VOLUME ["/var/lib/swarmgate/acme"]
USER 10001:10001
# Unprivileged ports: publish them as 80 and 443 (see config/swarm-stack.yml).
EXPOSE 8080 8443 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:9901/healthz"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/swarmgate"]
CMD ["run"]
