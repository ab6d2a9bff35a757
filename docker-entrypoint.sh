#!/bin/sh
# Entrypoint of the contact-registry image: the first argument picks the role,
# the rest goes to that role's script unchanged.
#   registry [host] [port] [flags]        bun registry.ts ...
#   client <registry-host> <port> [flags] bun client.ts ...
#   list <registry-host> <port> [flags]   bun client.ts list ...
#   --help | --version                    this usage | the package version
# `exec` makes bun the container's main process, so `docker stop` (SIGTERM)
# reaches the script's own shutdown handler: a node says `leave`, the
# registry tells its nodes it is stopping.
set -eu

usage() {
  cat <<'EOF'
contact-registry image: the first argument is the role.

  registry [host] [port] [flags]        run the contact registry
                                        (default host :: falling back to 0.0.0.0, port 8080)
  client <registry-host> <port> [flags] run a peer node
  list <registry-host> <port> [--json]  print the registry's nodes, then exit
  registry --help | client --help       every flag and environment variable of a role
  --version                             the version of contact-registry and of Bun

Examples:
  docker run -d --name registry --network mesh contact-registry registry
  docker run -d --network mesh contact-registry client registry 8080 --json

Secrets: set REGISTRY_TOKEN_FILE to a file (for example a compose secret at
/run/secrets/registry_token) instead of REGISTRY_TOKEN, to keep the token out of
the container's environment listing.

Ports: the registry listens on 8080 (REGISTRY_PORT), its status page on
REGISTRY_HTTP_PORT when set; a node on a port the OS picks (NODE_PORT to fix
one, for example to publish it). The image declares none of them.
EOF
}

# A *_FILE variable fills its variable from a file; an explicit variable wins.
if [ -n "${REGISTRY_TOKEN_FILE:-}" ] && [ -z "${REGISTRY_TOKEN:-}" ]; then
  if [ ! -r "$REGISTRY_TOKEN_FILE" ]; then
    echo "error: REGISTRY_TOKEN_FILE=$REGISTRY_TOKEN_FILE is not a readable file (the image runs as user bun, uid 1000)" >&2
    exit 2
  fi
  REGISTRY_TOKEN=$(cat "$REGISTRY_TOKEN_FILE")
  export REGISTRY_TOKEN
fi
unset REGISTRY_TOKEN_FILE

role="${1-}"
case "$role" in
  registry | client)
    shift
    # A record left by an earlier run of this container would point the
    # HEALTHCHECK at a port that is no longer ours.
    if [ -n "${PORTS_FILE:-}" ]; then rm -f "$PORTS_FILE"; fi
    exec bun "/app/$role.ts" "$@"
    ;;
  list)
    shift
    exec bun /app/client.ts list "$@"
    ;;
  -h | --help | help)
    usage
    exit 0
    ;;
  -v | --version | version)
    exec bun -e 'console.log(`contact-registry ${require("/app/package.json").version} (bun ${Bun.version})`)'
    ;;
  "")
    usage >&2
    exit 2
    ;;
  *)
    echo "error: unknown role \"$role\": the first argument must be \"registry\", \"client\" or \"list\"" >&2
    echo "run with --help for usage" >&2
    exit 2
    ;;
esac
