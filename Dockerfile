# syntax=docker/dockerfile:1
# The Magnetar image: the release `magnetar` binary on debian:bookworm-slim, run as the non-root
# user magnetar (uid 10001). The command picks the role:
#
#   docker build -t magnetar:dev .
#   docker run --rm -v "$PWD/my-config:/etc/magnetar:ro" magnetar:dev broker --config /etc/magnetar/broker.toml
#   docker run --rm -v "$PWD/my-config:/etc/magnetar:ro" magnetar:dev bookie --config /etc/magnetar/bookie.toml
#   docker run -d --name magnetar -p 6650:6650/udp -p 8080:8080 magnetar:dev    # standalone
#
# Standalone (the default command) keeps everything under /var/lib/magnetar (mount a volume there
# to keep it) and makes a self-signed certificate for localhost and 127.0.0.1; copy it out for
# clients on the host: docker cp magnetar:/var/lib/magnetar/tls/cert.pem magnetar-cert.pem
# The example configurations (config/) are in /usr/share/magnetar/config. The Helm chart
# (helm/magnetar) runs this image.

# --- Build: the release binary. etcd-client's build script needs protoc. -------------------------
FROM rust:1-bookworm AS build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
ENV PROTOC=/usr/bin/protoc \
    CARGO_TERM_COLOR=never
WORKDIR /src
COPY . .
# The caches keep crates and build artifacts between builds (BuildKit); the binary is copied out
# of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p magnetar-cli \
    && install -D -m 0755 target/release/magnetar /out/magnetar

# --- Run: a small base with CA certificates, non-root. -------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 magnetar \
    && useradd --system --uid 10001 --gid magnetar --home-dir /var/lib/magnetar --no-create-home \
        --shell /usr/sbin/nologin magnetar \
    && install -d -o magnetar -g magnetar -m 0750 /var/lib/magnetar
COPY --from=build /out/magnetar /usr/local/bin/magnetar
COPY config/ /usr/share/magnetar/config/
USER 10001:10001
WORKDIR /var/lib/magnetar
# QUIC (UDP) and HTTP of the broker, bookie protocol and HTTP of the bookie.
EXPOSE 6650/udp 8080/tcp 3181/tcp 8000/tcp
ENTRYPOINT ["magnetar"]
CMD ["standalone", "--data-dir", "/var/lib/magnetar", "--quic-addr", "0.0.0.0:6650", "--http-addr", "0.0.0.0:8080"]
