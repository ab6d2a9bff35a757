#!/usr/bin/env bun
/**
 * The contact registry ("D"): lists the nodes whose registry session is
 * alive, hands each new node the others, and pushes every join and leave to
 * every session. `bun registry.ts [host] [port]`; see README.md and
 * docs/PROTOCOL.md.
 *
 * Its parts: membership.ts holds the list, admission.ts decides who gets on
 * it, liveness.ts keeps the deadlines, sessions.ts ties them to the node
 * connections and pushes the changes out; here they are wired together, and
 * the command line comes last.
 */
import { defineCommand, runMain, type ArgsDef } from "citty";
import { Admission } from "./admission.ts";
import { UsageError, VERSION, createPrinter, describeCommon, isWarning, portsRecorder, readSettings, reloadOnHangup, renderHelp, runCli, stopOnSignals, tlsFromFlags, type Level } from "./cli.ts";
import { GATE_FDS_PER_CONN, GATE_MAX_REFUSING } from "./gate.ts";
import { HTTP_LIMITS, fitCapsToFdLimit, readFdUsage } from "./limits.ts";
import { systemClock, type Clock } from "./liveness.ts";
import { MemoryMembership, type Membership } from "./membership.ts";
import { formatAddress, isLoopbackHost, parsePort, tcp, type Transport } from "./net.ts";
import { DEFAULTS, MAX_TIMER_MS, randomId, type Peer } from "./protocol.ts";
import { CLOSING_GRACE_MS, Counters, Sessions, type RegistryEvent, type RegistryStats } from "./sessions.ts";
import type { TlsTransport } from "./tls.ts";

export type { RegistryEvent, RegistryStats } from "./sessions.ts";

export interface RegistryOptions {
  /** Bind address; `localhost` binds 127.0.0.1 and ::1, `::` falls back to 0.0.0.0. */
  host?: string;
  port?: number;
  heartbeatMs?: number;
  heartbeatMisses?: number;
  registerTimeoutMs?: number;
  /** Dial each registering node back before listing it. */
  probe?: boolean;
  probeTimeoutMs?: number;
  maxLineBytes?: number;
  maxNodes?: number;
  /** Open connections allowed from one source address (0 = no cap). */
  maxConnsPerAddress?: number;
  /** Open connections in all, registered or not (0 = no cap). */
  maxConns?: number;
  /** Unsent bytes per session before it is dropped as a slow consumer. */
  maxQueueBytes?: number;
  /** Unsent bytes all sessions together may hold; over it, the largest backlogs are dropped (0 = no budget). */
  maxQueueTotalBytes?: number;
  /** Lines per second one session may send, in bursts of ten seconds' worth (0 = no limit). */
  rateSessionLines?: number;
  /** Lines per second all sessions from one source address may send (0 = no limit). */
  rateAddressLines?: number;
  /** `sync` requests per second one session may send (0 = no limit). */
  rateSessionSyncs?: number;
  /** Probes per second registrations from one source address may cause (0 = no limit). */
  rateAddressProbes?: number;
  /** Wrong tokens per minute from one source address before its registrations and list requests are refused for a while (0 = no limit). */
  authFailuresPerMinute?: number;
  /** `list` requests per second from one source address (0 = no limit). */
  rateAddressLists?: number;
  /** Shared secret nodes must present in `register`. */
  token?: string;
  /** Let nodes advertise a host other than the one they connect from. */
  allowAdvertise?: boolean;
  /** Receives every event (the CLI prints them). */
  onEvent?: (e: RegistryEvent) => void;
  /** Where sockets are opened (default plain TCP; `tls(...)` for TLS on the registry port, and with a mesh CA mutual TLS for it and the probe). */
  transport?: Transport;
  /** The list (default: in this process). */
  membership?: Membership;
  /** Drives every deadline (default: the system's monotonic clock). */
  clock?: Clock;
}

export type NodeInfo = Peer & {
  /** Address the node connected from. */
  source: string;
  /** Id of the registry whose session holds it. */
  registry: string;
  joinedAt: number;
};

export interface Registry {
  readonly host: string;
  readonly port: number;
  /** This registry's id (unique per process); with a shared store, its lease there. */
  readonly id: string;
  /** The list's history id; carried in every reply so nodes can tell a restart. A shared store's changes when the store starts over. */
  readonly boot: string;
  nodes(): NodeInfo[];
  stats(): RegistryStats;
  /** Observe membership and greeting changes (the status page uses this). */
  subscribe(fn: (e: RegistryEvent) => void): () => void;
  /** Greeted pairs, as [id, id] with the first id the smaller. */
  pairs(): [string, string][];
  stop(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

/** Starts a registry; resolves once it listens. */
export async function startRegistry(options: RegistryOptions = {}): Promise<Registry> {
  const s = settingsOf(options);
  const clock = options.clock ?? systemClock;
  const membership: Membership = options.membership ?? new MemoryMembership(randomId(), () => clock.now());
  const transport = options.transport ?? tcp;
  const listeners = new Set<(e: RegistryEvent) => void>();
  if (options.onEvent) listeners.add(options.onEvent);
  const emit = (e: RegistryEvent) => {
    for (const fn of listeners) fn(e);
  };
  const counters = new Counters();
  // A shared store knows this registry by the id its lease has; alone, any id unique to this process will do.
  const registryId = membership.registryId ?? randomId();
  const sessions = new Sessions(s, membership, new Admission(s, membership, transport), counters, emit, clock, registryId);
  const { listeners: servers, port } = transport.listen(s.host, s.port, sessions.handlers);
  emit({ event: "listening", host: s.host, port, boot: membership.boot });
  if (membership.state === "degraded") emit({ event: "store", state: "degraded", reason: membership.lastError });
  if (s.token && !transport.encrypted && !isLoopbackHost(s.host)) {
    emit({ event: "warning", message: `the token travels in clear on ${s.host}, which other hosts reach: start the registry with --tls-cert and --tls-key` });
  }

  let stopped: Promise<void> | undefined;
  const registry: Registry = {
    host: s.host,
    port,
    id: registryId,
    get boot() {
      return membership.boot;
    },
    nodes: () =>
      Array.from(membership.members(), ({ id, host, port, name, source, registry, joinedAt }) => ({ id, host, port, name, source, registry, joinedAt })),
    stats: () => counters.stats(membership, sessions.figures()),
    subscribe(fn) {
      listeners.add(fn);
      return () => listeners.delete(fn);
    },
    pairs: () => membership.pairs(),
    stop() {
      stopped ??= (async () => {
        for (const l of servers) l.stop(false);
        // Shared: the store first lets go of this registry (lease deleted, connections closed), so
        // that the nodes told to go next replace their entries on another registry at once, as
        // updates; whatever does not come back is swept by the others within a heartbeat.
        if (membership.registryId !== undefined) await membership.close();
        await sessions.close();
        for (const l of servers) l.stop(true);
        await membership.close();
        emit({ event: "stopped" });
      })();
      return stopped;
    },
    [Symbol.asyncDispose]() {
      return this.stop();
    },
  };
  return registry;
}

// --- internal ----------------------------------------------------------------

/** Every setting, defaults filled in: what the sessions, admission and the listener need. */
function settingsOf(options: RegistryOptions) {
  const heartbeatMs = options.heartbeatMs ?? DEFAULTS.heartbeatMs;
  const heartbeatMisses = options.heartbeatMisses ?? DEFAULTS.heartbeatMisses;
  return {
    host: options.host ?? "::",
    port: options.port ?? DEFAULTS.registryPort,
    heartbeatMs,
    heartbeatTimeoutMs: heartbeatMs * heartbeatMisses,
    registerTimeoutMs: options.registerTimeoutMs ?? DEFAULTS.registerTimeoutMs,
    closingGraceMs: CLOSING_GRACE_MS,
    probe: options.probe ?? true,
    probeTimeoutMs: options.probeTimeoutMs ?? DEFAULTS.probeTimeoutMs,
    maxLineBytes: options.maxLineBytes ?? DEFAULTS.maxLineBytes,
    maxNodes: options.maxNodes ?? DEFAULTS.maxNodes,
    maxConnsPerAddress: options.maxConnsPerAddress ?? DEFAULTS.maxConnsPerAddress,
    maxConns: options.maxConns ?? DEFAULTS.maxConns,
    maxQueueBytes: options.maxQueueBytes ?? DEFAULTS.maxQueueBytes,
    maxQueueTotalBytes: options.maxQueueTotalBytes ?? DEFAULTS.maxQueueTotalBytes,
    rateSessionLines: options.rateSessionLines ?? DEFAULTS.rateSessionLines,
    rateAddressLines: options.rateAddressLines ?? DEFAULTS.rateAddressLines,
    rateSessionSyncs: options.rateSessionSyncs ?? DEFAULTS.rateSessionSyncs,
    rateAddressProbes: options.rateAddressProbes ?? DEFAULTS.rateAddressProbes,
    authFailuresPerMinute: options.authFailuresPerMinute ?? DEFAULTS.authFailuresPerMinute,
    rateAddressLists: options.rateAddressLists ?? DEFAULTS.rateAddressLists,
    token: options.token || undefined,
    allowAdvertise: options.allowAdvertise ?? false,
  };
}

// --- command line ------------------------------------------------------------

/** What the command line prints besides the registry's own events. */
export type CliEvent =
  | RegistryEvent
  /** The connection caps needed more file descriptors than the process may open, and were lowered. */
  | { event: "fd-limit"; limit: number; reserved: number; lowered: { flag: string; from: number; to: number }[] }
  /** Readable log only: the mesh has not completed `ms` after the last join or leave. */
  | { event: "mesh-incomplete"; nodes: number; greeted: number; pairs: number; ms: number };

function describe(e: CliEvent): string {
  const who = (id: string, name: string | undefined) => `${id}${name ? ` (${name})` : ""}`;
  switch (e.event) {
    case "listening":
      return `registry listening on ${formatAddress(e.host, e.port)} (boot ${e.boot})`;
    case "node-registered":
      return `node ${who(e.id, e.name)} joined at ${formatAddress(e.host, e.port)}, ${e.nodes} registered`;
    case "node-left":
      return `node ${who(e.id, e.name)} left (${e.reason}), ${e.nodes} registered`;
    case "pair-greeted":
      return `${e.a} and ${e.b} have greeted each other`;
    case "mesh-complete":
      return `mesh complete: ${e.nodes} nodes, ${e.pairs} pair${e.pairs === 1 ? "" : "s"}, ${e.ms} ms after the last join`;
    case "mesh-incomplete":
      return `mesh incomplete: ${e.greeted} of ${e.pairs} pairs greeted among ${e.nodes} nodes, ${e.ms / 1000} s after the last join or leave (the pairs are on the status page; a node's greet-failed says why)`;
    case "error":
      return `${e.remote} ${e.code}: ${e.message}${e.detail ? ` (${e.detail})` : ""}`;
    case "http-listening":
      return `status page on ${e.url}`;
    case "store":
      return e.state === "degraded"
        ? `store out of reach (${e.reason ?? "unknown"}): serving this registry's own nodes alone, retrying`
        : "store reachable again: list reconciled, nodes resynced";
    case "fd-limit": {
      const lowered = e.lowered.map((l) => `--${l.flag} ${l.from === 0 ? "0 (no cap)" : l.from} -> ${l.to}`).join(", ");
      return `file-descriptor limit ${e.limit} is too low for the connection caps (${e.reserved} kept for files and outgoing sockets): lowered ${lowered}; raise it with \`ulimit -n\` (Docker: --ulimit nofile=N)`;
    }
    case "stopped":
      return "registry stopped";
    case "warning":
    case "tls-reloaded":
    case "tls-reload-failed":
      return describeCommon(e);
  }
}

function level(e: CliEvent): Level {
  if (e.event === "pair-greeted") return "debug";
  if (e.event === "error" || e.event === "fd-limit" || e.event === "mesh-incomplete" || (e.event === "store" && e.state === "degraded") || isWarning(e)) return "warn";
  return e.event === "listening" ? "success" : "info";
}

/**
 * Fits the connection caps into the process's file-descriptor limit, so a
 * flood meets a cap before the process runs out of descriptors (EMFILE would
 * refuse everyone, and fail the probes). Lowers them, and says so once, when
 * they do not fit.
 */
function fitToFdLimit<C extends { maxConns: number; httpMaxConns?: number }>(caps: C, print: (e: CliEvent) => void): C {
  const fds = readFdUsage();
  if (!fds) return caps;
  const http = caps.httpMaxConns;
  const demands = [{ cap: caps.maxConns, fdsEach: 1 }, ...(http === undefined ? [] : [{ cap: http, fdsEach: GATE_FDS_PER_CONN }])];
  const fit = fitCapsToFdLimit(fds.limit, fds.open, demands, http === undefined ? 0 : GATE_MAX_REFUSING);
  if (!fit.lowered) return caps;
  const lowered = [{ flag: "max-conns", from: caps.maxConns, to: fit.caps[0]! }];
  if (http !== undefined) lowered.push({ flag: "http-max-conns", from: http, to: fit.caps[1]! });
  print({ event: "fd-limit", limit: fds.limit, reserved: fit.reserved, lowered });
  return { ...caps, maxConns: fit.caps[0]!, ...(http === undefined ? {} : { httpMaxConns: fit.caps[1]! }) };
}

/** How long the mesh must stay complete before the readable log says so: a fleet joining one by one would otherwise log it after every join. */
const MESH_QUIET_MS = 1_000;

/** A mesh still incomplete this long after the last join or leave is said to be: past a greeting's every retry (3 × 2 s by default). */
const MESH_STUCK_MS = 10_000;

/**
 * The readable log's one line per settled mesh: a `mesh-complete` is held
 * until no node has joined or left for a second; a mesh that has not
 * completed 10 s after the last join or leave is reported incomplete, once.
 */
function settledMesh(print: (e: CliEvent) => void, mesh: () => { nodes: number; pairsGreeted: number; pairsExpected: number }): (e: CliEvent) => void {
  let held: Timer | undefined;
  let stuck: Timer | undefined;
  return (e) => {
    if (e.event === "mesh-complete") {
      clearTimeout(held);
      clearTimeout(stuck);
      held = setTimeout(() => print(e), MESH_QUIET_MS);
      held.unref();
      return;
    }
    if (e.event === "node-registered" || e.event === "node-left") {
      clearTimeout(held);
      clearTimeout(stuck);
      stuck = setTimeout(() => {
        const m = mesh();
        if (m.pairsGreeted < m.pairsExpected) print({ event: "mesh-incomplete", nodes: m.nodes, greeted: m.pairsGreeted, pairs: m.pairsExpected, ms: MESH_STUCK_MS });
      }, MESH_STUCK_MS);
      stuck.unref();
    }
    print(e);
  };
}

const flags = {
  host: { type: "positional", required: false, description: "Address to listen on; `localhost` = 127.0.0.1 and ::1 [env REGISTRY_HOST, default ::]" },
  port: { type: "positional", required: false, description: `TCP port [env REGISTRY_PORT, default ${DEFAULTS.registryPort}]` },
  json: { type: "boolean", description: "One JSON event per line on stdout [env LOG_JSON=1]" },
  token: { type: "string", valueHint: "secret", description: "Shared secret nodes must present [env REGISTRY_TOKEN]" },
  heartbeat: { type: "string", valueHint: "ms", description: `Heartbeat interval in ms, announced to nodes [env REGISTRY_HEARTBEAT_MS, default ${DEFAULTS.heartbeatMs}]` },
  "heartbeat-misses": { type: "string", valueHint: "n", description: `Missed beats before eviction [env REGISTRY_HEARTBEAT_MISSES, default ${DEFAULTS.heartbeatMisses}]` },
  probe: { type: "boolean", description: "Dial each node back before listing it; --no-probe to skip [env REGISTRY_PROBE=0 to skip]" },
  "probe-timeout": { type: "string", valueHint: "ms", description: `Probe deadline in ms [env REGISTRY_PROBE_TIMEOUT_MS, default ${DEFAULTS.probeTimeoutMs}]` },
  "allow-advertise": { type: "boolean", description: "Accept advertised hosts other than the connection's source [env REGISTRY_ALLOW_ADVERTISE=1]" },
  "register-timeout": { type: "string", valueHint: "ms", description: `Deadline for a new connection to register, ms [env REGISTRY_REGISTER_TIMEOUT_MS, default ${DEFAULTS.registerTimeoutMs}]` },
  "max-line": { type: "string", valueHint: "bytes", description: `Longest accepted line in bytes [env REGISTRY_MAX_LINE, default ${DEFAULTS.maxLineBytes}]` },
  "max-nodes": { type: "string", valueHint: "n", description: `Most nodes listed at once [env REGISTRY_MAX_NODES, default ${DEFAULTS.maxNodes}]` },
  "max-conns-per-ip": { type: "string", valueHint: "n", description: `Open connections per source address, 0 = no cap [env REGISTRY_MAX_CONNS_PER_IP, default ${DEFAULTS.maxConnsPerAddress}]` },
  "max-conns": { type: "string", valueHint: "n", description: `Open connections in all, 0 = no cap [env REGISTRY_MAX_CONNS, default ${DEFAULTS.maxConns}]` },
  "max-queue": { type: "string", valueHint: "bytes", description: `Unsent bytes per connection before it is dropped as a slow consumer [env REGISTRY_MAX_QUEUE_BYTES, default ${DEFAULTS.maxQueueBytes}]` },
  "max-queue-total": { type: "string", valueHint: "bytes", description: `Unsent bytes all connections together may hold; over it the largest backlogs are dropped, 0 = no budget [env REGISTRY_MAX_QUEUE_TOTAL_BYTES, default ${DEFAULTS.maxQueueTotalBytes}]` },
  "rate-session": { type: "string", valueHint: "per s", description: `Lines per second one session may send, bursts of 10 s worth, 0 = no limit [env REGISTRY_RATE_SESSION, default ${DEFAULTS.rateSessionLines}]` },
  "rate-address": { type: "string", valueHint: "per s", description: `Lines per second all sessions of one source address may send, 0 = no limit [env REGISTRY_RATE_ADDRESS, default ${DEFAULTS.rateAddressLines}]` },
  "rate-sync": { type: "string", valueHint: "per s", description: `sync requests per second per session, 0 = no limit [env REGISTRY_RATE_SYNC, default ${DEFAULTS.rateSessionSyncs}]` },
  "rate-probe": { type: "string", valueHint: "per s", description: `Probes per second for registrations from one source address, 0 = no limit [env REGISTRY_RATE_PROBE, default ${DEFAULTS.rateAddressProbes}]` },
  "rate-list": { type: "string", valueHint: "per s", description: `list requests per second from one source address, 0 = no limit [env REGISTRY_RATE_LIST, default ${DEFAULTS.rateAddressLists}]` },
  "auth-failures": { type: "string", valueHint: "per min", description: `Wrong tokens per minute from one source address before its registrations and list requests are refused for a while, 0 = no limit [env REGISTRY_AUTH_FAILURES, default ${DEFAULTS.authFailuresPerMinute}]` },
  store: {
    type: "string",
    valueHint: "url",
    description:
      "Share the list with other registries: redis://[user:password@]host:port[/db] or rediss:// (TLS), Redis >= 7 or Valkey >= 7.2; `memory` keeps it in this process [env REGISTRY_STORE, default memory; a password not in the URL: env REGISTRY_STORE_PASSWORD]",
  },
  http: { type: "string", valueHint: "port", description: "Serve the status API and live page on this port [env REGISTRY_HTTP_PORT]" },
  "http-host": { type: "string", valueHint: "address", description: "Address for the status page; `localhost` = 127.0.0.1 and ::1 [env REGISTRY_HTTP_HOST, default: same as host]" },
  "http-max-conns": { type: "string", valueHint: "n", description: `Open status-server connections in all, 0 = no cap [env REGISTRY_HTTP_MAX_CONNS, default ${HTTP_LIMITS.maxConns}]` },
  "http-max-conns-per-ip": { type: "string", valueHint: "n", description: `Open status-server connections per source address, 0 = no cap [env REGISTRY_HTTP_MAX_CONNS_PER_IP, default ${HTTP_LIMITS.maxConnsPerAddress}]` },
  "http-max-streams": { type: "string", valueHint: "n", description: `Open /events streams [env REGISTRY_HTTP_MAX_STREAMS, default ${HTTP_LIMITS.maxStreams}]` },
  "http-stream-budget": { type: "string", valueHint: "bytes", description: `Unsent bytes across all /events streams; past it the streams furthest behind are dropped [env REGISTRY_HTTP_STREAM_BUDGET_BYTES, default ${HTTP_LIMITS.streamBudgetBytes}]` },
  "http-request-timeout": { type: "string", valueHint: "ms", description: `A request's head must arrive within this many ms of connecting [env REGISTRY_HTTP_REQUEST_TIMEOUT_MS, default ${HTTP_LIMITS.requestTimeoutMs}]` },
  "http-idle-timeout": { type: "string", valueHint: "ms", description: `Status-server connections that move no byte this many ms are closed [env REGISTRY_HTTP_IDLE_TIMEOUT_MS, default ${HTTP_LIMITS.idleTimeoutMs}]` },
  "tls-cert": { type: "string", valueHint: "file", description: "Certificate (PEM) served on the registry port, which then speaks TLS only [env REGISTRY_TLS_CERT]" },
  "tls-key": { type: "string", valueHint: "file", description: "The key of --tls-cert (PEM) [env REGISTRY_TLS_KEY]" },
  "tls-client-ca": {
    type: "string",
    valueHint: "file",
    description: "CA certificate (PEM) of the mesh: nodes must present a certificate it signed, for their id; the probe is mutual TLS too [env REGISTRY_TLS_CLIENT_CA]",
  },
  "http-tls-cert": {
    type: "string",
    valueHint: "file",
    description: "Certificate (PEM) for HTTPS on the status server [env REGISTRY_HTTP_TLS_CERT, default: --tls-cert, so a TLS registry serves HTTPS]",
  },
  "http-tls-key": { type: "string", valueHint: "file", description: "The key of --http-tls-cert (PEM) [env REGISTRY_HTTP_TLS_KEY, default: --tls-key]" },
  "http-tls-client-ca": {
    type: "string",
    valueHint: "file",
    description: "CA certificate (PEM): the status server then requires a client certificate it signed, the mesh's ports' rule (e.g. the mesh CA; curl --cert) [env REGISTRY_HTTP_TLS_CLIENT_CA, default: none, browsers welcome]",
  },
  "ports-file": { type: "string", valueHint: "file", description: "Append what it listens on to this file, one JSON line each (the Docker HEALTHCHECK reads it) [env PORTS_FILE]" },
} satisfies ArgsDef;

/** TLS on the registry port when a certificate is given; with a client CA, mutual TLS for it and the probe. */
function registryTransport(f: { cert?: string; key?: string; clientCa?: string }, handshakeTimeoutMs: number): TlsTransport | undefined {
  if (f.cert === undefined && f.key === undefined) {
    if (f.clientCa !== undefined) throw new UsageError("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS first");
    return undefined;
  }
  return tlsFromFlags({ cert: f.cert, key: f.key, meshCa: f.clientCa, handshakeTimeoutMs });
}

/**
 * HTTPS for the status server: its own certificate, or the registry's. A
 * browser has no mesh certificate, so client certificates are asked for only
 * with --http-tls-client-ca, even when the registry port is mutual TLS.
 */
function statusTransport(f: { cert?: string; key?: string; clientCa?: string }, registry: { cert?: string; key?: string }, http: boolean): TlsTransport | undefined {
  if (!http && (f.cert !== undefined || f.key !== undefined || f.clientCa !== undefined)) {
    throw new UsageError("--http-tls-cert, --http-tls-key and --http-tls-client-ca need --http: they are the status server's");
  }
  const cert = f.cert ?? registry.cert;
  const key = f.key ?? registry.key;
  if (!http || (cert === undefined && key === undefined)) {
    if (f.clientCa !== undefined) throw new UsageError("--http-tls-client-ca needs HTTPS on the status server: --http-tls-cert and --http-tls-key, or a TLS registry's");
    return undefined;
  }
  return tlsFromFlags({ cert, key, meshCa: f.clientCa });
}

const help = {
  usage: ["bun registry.ts [host] [port] [options]"],
  description: "Contact registry: lists the running peer nodes and tells each about the others (docs/PROTOCOL.md).",
  required: [],
  examples: [
    "bun registry.ts localhost 8080                 # this machine only (127.0.0.1 and ::1)",
    "bun registry.ts 0.0.0.0 8080 --http 8081       # all IPv4 interfaces, status page on 8081",
    "REGISTRY_TOKEN=$(openssl rand -hex 16) bun registry.ts :: 8080",
    "bun registry.ts :: 8080 --store redis://10.0.0.5:6379   # one of several registries sharing a list",
  ],
};

export const command = defineCommand({
  meta: { name: "registry", version: VERSION, description: "Contact registry: lists running peer nodes and tells them about each other." },
  args: flags,
  async run({ args, rawArgs }) {
    await runCli(async () => {
      const settings = readSettings(args, rawArgs, flags);
      const { text: flag, on } = settings;
      const portText = flag("port", "REGISTRY_PORT");
      const port = portText === undefined ? DEFAULTS.registryPort : parsePort(portText);
      if (port === undefined) throw new UsageError(`port must be a number from 0 to 65535, got "${portText}"`);
      const httpText = flag("http", "REGISTRY_HTTP_PORT");
      const httpPort = httpText === undefined ? undefined : parsePort(httpText);
      if (httpText !== undefined && httpPort === undefined) throw new UsageError(`--http must be a port number, got "${httpText}"`);
      const json = on("json", "LOG_JSON");
      const record = portsRecorder(flag("ports-file", "PORTS_FILE"), "registry");
      const printer = createPrinter("registry", json, describe, level);
      let registry: Registry | undefined;
      const show = json ? printer : settledMesh(printer, () => registry?.stats() ?? { nodes: 0, pairsGreeted: 0, pairsExpected: 0 });
      const print = (e: CliEvent) => {
        record(e);
        show(e);
      };
      // Every setting is read, and a bad one refused, before anything listens.
      const store = await storeSetting(flag("store", "REGISTRY_STORE"));
      const { options, httpTransport } = registryOptions(settings, port, print);
      const http = httpPort === undefined ? undefined : httpOptions(settings, httpPort);
      const caps = fitToFdLimit({ maxConns: options.maxConns, httpMaxConns: http?.maxConns }, print);
      registry = await startRegistry({ ...options, maxConns: caps.maxConns, membership: await store?.open() });
      let status: { stop(): Promise<void> } | undefined;
      if (http) {
        const { startStatusServer } = await import("./status.ts");
        const server = startStatusServer(registry, { ...http, host: http.host ?? registry.host, maxConns: caps.httpMaxConns, transport: httpTransport });
        status = server;
        print({ event: "http-listening", url: server.url });
      }
      stopOnSignals(async () => {
        await registry.stop(); // open status pages get their `stopped` event before the server goes
        await status?.stop();
      });
      const { transport } = options;
      if (transport || httpTransport) {
        reloadOnHangup(() => {
          if (transport) print(transport.reload());
          if (httpTransport) print({ ...httpTransport.reload(), scope: "status server" });
        });
      }
    });
  },
});

type Settings = ReturnType<typeof readSettings<typeof flags>>;

/** The registry's own settings, and the transports its TLS flags ask for. */
function registryOptions({ text: flag, int: num, on }: Settings, port: number, onEvent: (e: CliEvent) => void) {
  const registerTimeoutMs = num("register-timeout", "REGISTRY_REGISTER_TIMEOUT_MS", 1, MAX_TIMER_MS);
  const tlsFiles = { cert: flag("tls-cert", "REGISTRY_TLS_CERT"), key: flag("tls-key", "REGISTRY_TLS_KEY"), clientCa: flag("tls-client-ca", "REGISTRY_TLS_CLIENT_CA") };
  const transport = registryTransport(tlsFiles, Math.min(DEFAULTS.handshakeTimeoutMs, registerTimeoutMs ?? DEFAULTS.registerTimeoutMs));
  const httpTransport = statusTransport(
    { cert: flag("http-tls-cert", "REGISTRY_HTTP_TLS_CERT"), key: flag("http-tls-key", "REGISTRY_HTTP_TLS_KEY"), clientCa: flag("http-tls-client-ca", "REGISTRY_HTTP_TLS_CLIENT_CA") },
    tlsFiles,
    flag("http", "REGISTRY_HTTP_PORT") !== undefined,
  );
  const options = {
    host: flag("host", "REGISTRY_HOST") ?? "::",
    port,
    token: flag("token", "REGISTRY_TOKEN"),
    heartbeatMs: num("heartbeat", "REGISTRY_HEARTBEAT_MS", 1, MAX_TIMER_MS),
    heartbeatMisses: num("heartbeat-misses", "REGISTRY_HEARTBEAT_MISSES", 1),
    probe: on("probe", "REGISTRY_PROBE", true),
    probeTimeoutMs: num("probe-timeout", "REGISTRY_PROBE_TIMEOUT_MS", 1, MAX_TIMER_MS),
    allowAdvertise: on("allow-advertise", "REGISTRY_ALLOW_ADVERTISE"),
    registerTimeoutMs,
    maxLineBytes: num("max-line", "REGISTRY_MAX_LINE", 64),
    maxNodes: num("max-nodes", "REGISTRY_MAX_NODES", 1),
    maxConnsPerAddress: num("max-conns-per-ip", "REGISTRY_MAX_CONNS_PER_IP"),
    maxConns: num("max-conns", "REGISTRY_MAX_CONNS") ?? DEFAULTS.maxConns,
    maxQueueBytes: num("max-queue", "REGISTRY_MAX_QUEUE_BYTES", 1024),
    maxQueueTotalBytes: num("max-queue-total", "REGISTRY_MAX_QUEUE_TOTAL_BYTES"),
    rateSessionLines: num("rate-session", "REGISTRY_RATE_SESSION"),
    rateAddressLines: num("rate-address", "REGISTRY_RATE_ADDRESS"),
    rateSessionSyncs: num("rate-sync", "REGISTRY_RATE_SYNC"),
    rateAddressProbes: num("rate-probe", "REGISTRY_RATE_PROBE"),
    authFailuresPerMinute: num("auth-failures", "REGISTRY_AUTH_FAILURES"),
    rateAddressLists: num("rate-list", "REGISTRY_RATE_LIST"),
    transport,
    onEvent,
  } satisfies RegistryOptions;
  return { options, httpTransport };
}

/** The status server's settings; only read when --http names a port. */
function httpOptions({ text: flag, int: num }: Settings, port: number) {
  return {
    port,
    host: flag("http-host", "REGISTRY_HTTP_HOST"),
    maxConns: num("http-max-conns", "REGISTRY_HTTP_MAX_CONNS") ?? HTTP_LIMITS.maxConns,
    maxConnsPerAddress: num("http-max-conns-per-ip", "REGISTRY_HTTP_MAX_CONNS_PER_IP"),
    maxStreams: num("http-max-streams", "REGISTRY_HTTP_MAX_STREAMS", 1),
    streamBudgetBytes: num("http-stream-budget", "REGISTRY_HTTP_STREAM_BUDGET_BYTES", 1024),
    requestTimeoutMs: num("http-request-timeout", "REGISTRY_HTTP_REQUEST_TIMEOUT_MS", 1, MAX_TIMER_MS),
    idleTimeoutMs: num("http-idle-timeout", "REGISTRY_HTTP_IDLE_TIMEOUT_MS", 1, MAX_TIMER_MS),
  };
}

/**
 * The list `--store` names: none for `memory` (this process alone), else one
 * shared through Redis or Valkey under an id unique to this process, opened
 * once everything else is read. A bad URL is a usage error; a store out of
 * reach at start is not: the registry serves degraded and keeps trying.
 */
async function storeSetting(store: string | undefined): Promise<{ open(): Promise<Membership> } | undefined> {
  if (store === undefined || store === "memory") return undefined;
  const { openStore, storeUrl, StoreConfigError } = await import("./redis.ts");
  const password = process.env.REGISTRY_STORE_PASSWORD || undefined;
  try {
    storeUrl(store, password);
  } catch (e) {
    if (e instanceof StoreConfigError) throw new UsageError(`--store: ${e.message}`);
    throw e;
  }
  return { open: () => openStore(store, { registryId: randomId(), password }) };
}

if (import.meta.main) await runMain(command, { showUsage: async () => void process.stdout.write(renderHelp(help, flags)) });
