# syntax=docker/dockerfile:1
#
# One image for every role of the marketplace:
#   docker build -t ldt .
#   docker run -p 8080:8080 ldt     # `ldt up`: every service in one process, embedded
#                                   # (SQLite + in-process bus in the /var/lib/ldt volume)
#   docker run ldt serve payment    # one service
# Settings come from LDT_* variables (see README.md); LDT_HTTP_ADDR is 0.0.0.0:8080 here.

############################ build ############################
FROM rust:1-bookworm AS build
WORKDIR /src

# The whole workspace (e2e is a member, so its manifest must be there) and the patched
# dependencies in vendor/, without target/ and .git (see .dockerignore). Migrations are
# embedded into the binary at compile time.
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY e2e e2e
COPY vendor vendor

# Registry, git checkouts and target/ live in BuildKit cache mounts, so a rebuild after a
# source change recompiles only the workspace crates. The binary is copied out of the cache
# mount in the same step.
RUN --mount=type=cache,id=ldt-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=ldt-cargo-git,target=/usr/local/cargo/git \
    --mount=type=cache,id=ldt-target,target=/src/target \
    cargo build --release --locked --bin ldt \
    && install -D -m 0755 target/release/ldt /out/ldt

############################ runtime ############################
FROM debian:bookworm-slim AS runtime

# ca-certificates tracks the distribution's (security) updates: not pinned to a version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 ldt \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin ldt \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/ldt

COPY --from=build /out/ldt /usr/local/bin/ldt

# Numeric user, so Kubernetes' runAsNonRoot can check it. On RabbitMQ and PostgreSQL the
# binary writes nothing to disk (the root filesystem can be read-only); the embedded mode
# keeps its files in LDT_DATA_DIR, a volume.
USER 10001:10001
ENV LDT_HTTP_ADDR=0.0.0.0:8080 LDT_DATA_DIR=/var/lib/ldt
VOLUME ["/var/lib/ldt"]
EXPOSE 8080

# The slim image has no curl: bash's /dev/tcp sends a plain HTTP/1.0 GET /healthz to the port
# of LDT_HTTP_ADDR and checks the status line.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${LDT_HTTP_ADDR##*:} && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && read -r _ code _ <&3 && [ \"$code\" = 200 ]"]

ENTRYPOINT ["ldt"]
CMD ["up"]
