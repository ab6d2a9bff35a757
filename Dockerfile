# Contact registry and peer node in one image; the first argument picks the role:
#   docker run IMAGE registry [host] [port] [flags]     (default :: / 8080)
#   docker run IMAGE client <registry-host> <port> [flags]
#   docker run IMAGE registry --help | client --help
#   docker run IMAGE --help | --version                 (no role needed)
# Build:  docker build -t contact-registry .
# Classic Dockerfile syntax only (no BuildKit-only flags), so the legacy
# builder of an older engine builds it too.

ARG BUN_VERSION=1.4.4

# --- build: production dependencies, exactly as bun.lock pins them ---------
FROM oven/bun:${BUN_VERSION} AS build
WORKDIR /build
COPY package.json bun.lock ./
# --production leaves out devDependencies (typescript, bun-types,
# playwright-core); --omit=optional the npm `bun` package, which the
# installed command brings as its Bun (this image has one: a second would
# add about 100 MB); --omit=peer typescript once more, which valibot lists as
# an optional peer and Bun would otherwise install (23 MB nobody runs).
RUN bun install --frozen-lockfile --production --omit=optional --omit=peer --ignore-scripts

# --- runtime: slim base, non-root, only what runs ---------------------------
FROM oven/bun:${BUN_VERSION}-slim AS runtime
# PORTS_FILE: where the role's script records what it listens on, for the
# HEALTHCHECK (a node's port is picked by the OS).
ENV NODE_ENV=production \
    BUN_RUNTIME_TRANSPILER_CACHE_PATH=0 \
    NO_COLOR=1 \
    PORTS_FILE=/tmp/contact-registry.ports
WORKDIR /app
# Files stay owned by root: the `bun` user can read and run them, not change them.
COPY --from=build /build/node_modules ./node_modules
COPY package.json protocol.ts net.ts tls.ts gate.ts cli.ts membership.ts redis.ts admission.ts liveness.ts limits.ts greetings.ts sessions.ts registry.ts registration.ts client.ts docker-entrypoint.sh ./
# `status.*` matches status.ts alone or status.ts + status.html (a glob with
# at least one match is fine where a missing plain name would fail the build).
COPY status.* ./
COPY scripts/healthcheck*.ts ./scripts/
USER bun
# No EXPOSE: it would be declared for every container of the image, and a
# node listens on a port the OS picks (NODE_PORT fixes one). The registry
# listens on 8080 unless told otherwise, its status page on REGISTRY_HTTP_PORT
# when set; publish with -p, or declare them where the role is known (compose
# does, for its registry service).
# Registry: /healthz when the status server runs, else a connection that says
# `leave` must be closed; node: its listener must answer a probe. Each check
# asks the process in its own protocol, so a frozen one fails. See
# scripts/healthcheck.ts.
# Each check starts a bun process (~60 ms CPU): 15 s keeps a host with dozens
# of node containers from spending a core on health checks.
HEALTHCHECK --interval=15s --timeout=5s --start-period=15s --retries=3 \
  CMD ["bun", "/app/scripts/healthcheck.ts"]
ENTRYPOINT ["/bin/sh", "/app/docker-entrypoint.sh"]
CMD ["--help"]
