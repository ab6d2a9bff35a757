#!/usr/bin/env bun
/**
 * The contact registry ("D"): keeps, in RAM, the nodes whose registry session
 * is alive, hands each new node the others, and pushes every join and leave to
 * every session. `bun registry.ts [host] [port]`; see README.md and
 * docs/PROTOCOL.md.
 */
import { defineCommand, runMain } from "citty";
import { timingSafeEqual, createHash } from "node:crypto";
import {
  DEFAULTS,
  FromListener,
  MAX_TIMER_MS,
  PING_LINE,
  PONG_LINE,
  PROTOCOL_VERSION,
  ToRegistry,
  decode,
  randomId,
  type ErrorCode,
  type LeaveReason,
  type Peer,
} from "./protocol.ts";
import {
  dial,
  formatAddress,
  lineHandlers,
  listenAll,
  normalizeHost,
  parsePort,
  resolveHost,
  type Conn,
} from "./net.ts";
import {
  UsageError,
  checkFlags,
  createPrinter,
  runCli,
  settingsFrom,
  type EventRecord,
} from "./cli.ts";

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
  /** Shared secret nodes must present in `register`. */
  token?: string;
  /** Let nodes advertise a host other than the one they connect from. */
  allowAdvertise?: boolean;
  /** Receives every event (the CLI prints them). */
  onEvent?: (e: EventRecord) => void;
}

export interface NodeInfo extends Peer {
  /** Address the node connected from. */
  source: string;
  joinedAt: number;
}

export interface RegistryStats {
  nodes: number;
  joins: number;
  leaves: Record<LeaveReason, number>;
  registrations: number;
  rejected: Partial<Record<ErrorCode, number>>;
  seq: number;
  pairsGreeted: number;
  pairsExpected: number;
  /** Registration latency (register received -> reply sent) percentiles, ms, over a recent window. */
  latencyMs: { p50: number; p90: number; p99: number; max: number; count: number; /** Of every registration since start. */ sum: number };
  startedAt: number;
  /** Time the mesh last became complete after the last join, ms since the join (null while incomplete). */
  meshCompleteMs: number | null;
}

export interface Registry {
  readonly host: string;
  readonly port: number;
  /** New on every start; carried in every reply so nodes can tell a restart. */
  readonly boot: string;
  nodes(): NodeInfo[];
  stats(): RegistryStats;
  /** Observe membership and greeting changes (the status page uses this). */
  subscribe(fn: (e: EventRecord) => void): () => void;
  /** Greeted pairs, as [id, id] with the first id the smaller. */
  pairs(): [string, string][];
  stop(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

/** Starts a registry; resolves once it listens. */
export async function startRegistry(options: RegistryOptions = {}): Promise<Registry> {
  const o = {
    host: options.host ?? "::",
    port: options.port ?? DEFAULTS.registryPort,
    heartbeatMs: options.heartbeatMs ?? DEFAULTS.heartbeatMs,
    heartbeatMisses: options.heartbeatMisses ?? DEFAULTS.heartbeatMisses,
    registerTimeoutMs: options.registerTimeoutMs ?? DEFAULTS.registerTimeoutMs,
    probe: options.probe ?? true,
    probeTimeoutMs: options.probeTimeoutMs ?? DEFAULTS.probeTimeoutMs,
    maxLineBytes: options.maxLineBytes ?? DEFAULTS.maxLineBytes,
    maxNodes: options.maxNodes ?? DEFAULTS.maxNodes,
    maxConnsPerAddress: options.maxConnsPerAddress ?? DEFAULTS.maxConnsPerAddress,
    maxConns: options.maxConns ?? DEFAULTS.maxConns,
    maxQueueBytes: options.maxQueueBytes ?? DEFAULTS.maxQueueBytes,
    token: options.token || undefined,
    allowAdvertise: options.allowAdvertise ?? false,
  };
  const boot = randomId();
  const timeoutMs = o.heartbeatMs * o.heartbeatMisses;
  const listeners = new Set<(e: EventRecord) => void>();
  if (options.onEvent) listeners.add(options.onEvent);
  const emit = (e: EventRecord) => {
    for (const fn of listeners) fn(e);
  };

  const nodes = new Map<string, Entry>();
  const byAddress = new Map<string, string>(); // "host:port" -> id
  const sessions = new Set<Conn<Session>>();
  const connsPerAddress = new Map<string, number>();
  const tokenDigest = o.token ? sha256(o.token) : undefined;
  // Refusals quote what the peer sent (a parser's message, a field's value); the token must not reach an event that way.
  const redact = (text: string) =>
    o.token ? text.split(o.token).join("[token]").split(JSON.stringify(o.token).slice(1, -1)).join("[token]") : text;
  let seq = 0;
  let stopping = false;

  // The peer list as JSON fragments joined by commas: appended to on join,
  // cut on leave, so the N-th reply does not re-encode N peers.
  let peersJson: string | null = "";

  // Membership pushes go out as one write per session. A flush that took t ms
  // is followed by at least PUSH_PACING * t ms of other work, so fan-out stays
  // a bounded share of the loop: with few sessions t is microseconds and pushes
  // leave on the next turn; with thousands, many changes share each write.
  let batch: string[] = [];
  let batchScheduled = false;
  let nextFlushAt = 0;

  const stats = {
    joins: 0,
    leaves: { closed: 0, timeout: 0, leave: 0, replaced: 0 } as Record<LeaveReason, number>,
    registrations: 0,
    rejected: {} as Partial<Record<ErrorCode, number>>,
    latencies: new Float64Array(4096),
    latencyCount: 0,
    latencySumMs: 0,
    pairsGreeted: 0,
    lastJoinAt: 0,
    meshCompleteMs: null as number | null,
    startedAt: Date.now(),
  };

  const handlers = lineHandlers<Session>({
    maxLineBytes: o.maxLineBytes,
    maxQueueBytes: o.maxQueueBytes,
    state: () => ({ phase: "new", openedAt: performance.now(), lastSeen: performance.now() }),
    // A ping alone in its chunk is answered without splitting or decoding: with
    // 10,000 nodes that is 5,000 lines a second.
    exact: {
      bytes: PING_CHUNK,
      handle(conn) {
        const s = conn.state;
        if (s.phase !== "registered") return false;
        s.lastSeen = performance.now();
        conn.send(PONG_BYTES);
        return true;
      },
    },
    open(conn) {
      if (stopping) return conn.fail("shutting-down", "registry is shutting down");
      const n = (connsPerAddress.get(conn.remoteAddress) ?? 0) + 1;
      connsPerAddress.set(conn.remoteAddress, n);
      conn.state.counted = true;
      if (o.maxConnsPerAddress && n > o.maxConnsPerAddress) {
        return reject(conn, "too-many-connections", `more than ${o.maxConnsPerAddress} connections from ${conn.remoteAddress}`);
      }
      // The per-address cap does not stop many addresses at once (one IPv6 /64 holds plenty).
      if (o.maxConns && sessions.size >= o.maxConns) {
        return reject(conn, "too-many-connections", `registry holds its maximum of ${o.maxConns} connections`);
      }
      sessions.add(conn);
    },
    line: onLine,
    close(conn) {
      sessions.delete(conn);
      // The connection layer cut it over a limit (line size, unsent backlog): reported like any refusal.
      if (conn.limitHit && conn.state.phase !== "closing") {
        countReject(conn.limitHit.code);
        emit({ event: "error", ...conn.limitHit, remote: formatAddress(conn.remoteAddress, conn.remotePort) });
      }
      if (conn.state.counted) {
        const n = (connsPerAddress.get(conn.remoteAddress) ?? 1) - 1;
        if (n > 0) connsPerAddress.set(conn.remoteAddress, n);
        else connsPerAddress.delete(conn.remoteAddress);
      }
      const entry = conn.state.entry;
      if (entry && nodes.get(entry.id) === entry) removeNode(entry, conn.state.leaveReason ?? "closed");
    },
  });

  const { listeners: servers, port } = listenAll(o.host, o.port, handlers);

  // One sweep serves both deadlines: unregistered connections and heartbeats.
  const sweep = setInterval(() => {
    const now = performance.now();
    for (const conn of sessions) {
      const s = conn.state;
      if (s.phase === "registered") {
        if (now - s.lastSeen > timeoutMs) {
          s.leaveReason = "timeout";
          conn.send({ type: "error", code: "heartbeat-timeout", message: `no heartbeat for ${timeoutMs}ms` });
          conn.destroy();
        }
      } else if (s.phase === "closing") {
        // Told why and ended, but the peer does not read: cut it.
        if (now - s.lastSeen > 2_000) conn.destroy();
      } else if (now - s.openedAt > o.registerTimeoutMs && s.phase === "new") {
        reject(conn, "registration-timeout", `no register within ${o.registerTimeoutMs}ms`);
      }
    }
  }, Math.max(50, Math.min(o.heartbeatMs / 2, o.registerTimeoutMs / 4, 1000)));
  sweep.unref();

  emit({ event: "listening", host: o.host, port, boot });

  function onLine(conn: Conn<Session>, line: string): void {
    const s = conn.state;
    if (s.phase === "closing") return;
    s.lastSeen = performance.now();
    if (line === PING_LINE && s.phase === "registered") {
      conn.send(PONG_LINE);
      return;
    }
    const r = decode(ToRegistry, line);
    if (!r.ok) {
      // Before registration a bad line ends the connection; afterwards the
      // session stays, since a live node's membership should not hinge on one bad line.
      if (s.phase !== "registered") return reject(conn, r.code, r.message);
      countReject(r.code);
      conn.send({ type: "error", code: r.code, message: r.message });
      return;
    }
    const msg = r.msg;
    switch (msg.type) {
      case "register":
        if (s.phase !== "new") {
          countReject("unexpected-message");
          conn.send({ type: "error", code: "unexpected-message", message: `register in phase ${s.phase}` });
          return;
        }
        s.phase = "checking";
        register(conn, msg).catch((e) => reject(conn, "bad-message", `internal error: ${(e as Error).message}`));
        return;
      case "ping":
        if (s.phase === "registered") conn.send(PONG_LINE);
        else reject(conn, "unexpected-message", "ping before register");
        return;
      case "leave":
        s.leaveReason = "leave";
        if (s.entry && nodes.get(s.entry.id) === s.entry) removeNode(s.entry, "leave");
        s.entry = undefined;
        conn.end();
        return;
      case "sync":
        if (s.phase !== "registered") return reject(conn, "unexpected-message", "sync before register");
        conn.send(`{"type":"snapshot","boot":"${boot}","seq":${seq},"peers":[${peerList()}]}\n`);
        return;
      case "receipt":
        if (s.phase !== "registered" || !s.entry) return reject(conn, "unexpected-message", "receipt before register");
        recordReceipt(s.entry, msg.ids);
        return;
    }
  }

  async function register(conn: Conn<Session>, msg: Extract<ToRegistry, { type: "register" }>): Promise<void> {
    const started = performance.now();
    if (msg.v !== PROTOCOL_VERSION) {
      return reject(conn, "unsupported-version", `protocol version ${msg.v} is not supported; this registry speaks ${PROTOCOL_VERSION}`);
    }
    if (tokenDigest && !(msg.token !== undefined && timingSafeEqual(sha256(msg.token), tokenDigest))) {
      return reject(conn, "unauthorized", msg.token === undefined ? "this registry requires a token" : "wrong token");
    }
    const source = conn.remoteAddress;
    let host = source;
    if (msg.host !== undefined) {
      const wanted = normalizeHost(msg.host);
      if (wanted === "0.0.0.0" || wanted === "::") {
        return reject(conn, "address-not-allowed", `cannot advertise the unspecified address ${wanted}`);
      }
      if (!o.allowAdvertise && wanted !== source && !(await resolvesTo(wanted, source, o.probeTimeoutMs))) {
        return reject(
          conn,
          "address-not-allowed",
          `advertised host ${wanted} is not the address this connection comes from (${source}); the registry must be started with --allow-advertise to accept it`,
        );
      }
      host = wanted;
    }
    const address = formatAddress(host, msg.port);
    const existing = nodes.get(msg.id) ?? nodes.get(byAddress.get(address) ?? "");
    if (!existing && nodes.size >= o.maxNodes) {
      return reject(conn, "registry-full", `registry holds its maximum of ${o.maxNodes} nodes`);
    }
    if (o.probe) {
      const failure = await probe(host, msg.port, msg.id);
      if (failure) {
        return reject(
          conn,
          "unreachable",
          `could not reach you at ${address} (${failure}); if nodes must reach you at another address, start the node with --advertise host[:port]`,
        );
      }
    }
    // The session may have closed while we resolved or probed; its close
    // handler has run, so listing it now would leave an entry nobody removes.
    if (conn.closed) return;
    if (stopping) return reject(conn, "shutting-down", "registry is shutting down");

    // A node registering again (after a reconnect, or a restart on the same
    // address) replaces its old entry instead of adding a second one.
    const sameId = nodes.get(msg.id);
    if (sameId) dropSession(sameId, "replaced", `node ${msg.id} registered again on another connection`);
    const sameAddress = nodes.get(byAddress.get(address) ?? "");
    if (sameAddress && sameAddress.id !== msg.id) {
      dropSession(sameAddress, "replaced", `another node registered ${address}`);
      removeNode(sameAddress, "replaced");
    }

    const peer: Peer = msg.name ? { id: msg.id, host, port: msg.port, name: msg.name } : { id: msg.id, host, port: msg.port };
    const json = JSON.stringify(peer);
    if (sameId) removeEntryQuietly(sameId);
    const reply = `{"type":"registered","v":${PROTOCOL_VERSION},"boot":"${boot}","seq":${seq + 1},"heartbeat":${o.heartbeatMs},"timeout":${timeoutMs},"self":${json},"peers":[${peerList()}]}\n`;
    const entry: Entry = { ...peer, source, joinedAt: Date.now(), json, conn, links: new Set() };
    nodes.set(entry.id, entry);
    byAddress.set(address, entry.id);
    entry.address = address;
    if (peersJson !== null) peersJson = peersJson ? `${peersJson},${json}` : json;
    seq++;
    conn.state.phase = "registered";
    conn.state.entry = entry;
    conn.state.lastSeen = performance.now();
    conn.send(reply);
    queuePush(`{"type":"joined","seq":${seq},"peer":${json}}\n`);

    stats.joins++;
    stats.registrations++;
    stats.lastJoinAt = performance.now();
    stats.meshCompleteMs = nodes.size < 2 ? 0 : null;
    const latency = performance.now() - started;
    stats.latencies[stats.latencyCount++ % stats.latencies.length] = latency;
    stats.latencySumMs += latency;
    emit({ event: "node-registered", id: entry.id, host, port: entry.port, name: entry.name, source, nodes: nodes.size, seq });
  }

  /** Removes a node from the list and tells everyone. */
  function removeNode(entry: Entry, reason: LeaveReason): void {
    removeEntryQuietly(entry);
    seq++;
    stats.leaves[reason]++;
    queuePush(`{"type":"left","seq":${seq},"id":${JSON.stringify(entry.id)},"reason":"${reason}"}\n`);
    emit({ event: "node-left", id: entry.id, host: entry.host, port: entry.port, reason, nodes: nodes.size, seq });
    checkMesh();
  }

  function removeEntryQuietly(entry: Entry): void {
    nodes.delete(entry.id);
    if (entry.address && byAddress.get(entry.address) === entry.id) byAddress.delete(entry.address);
    for (const other of entry.links) {
      const e = nodes.get(other);
      if (e?.links.delete(entry.id)) stats.pairsGreeted--;
    }
    entry.links.clear();
    peersJson = withoutFragment(peersJson, entry.json);
  }

  /** Ends the session an entry was registered on, without touching the list. */
  function dropSession(entry: Entry, code: ErrorCode, message: string): void {
    const old = entry.conn;
    if (old.state.entry === entry) old.state.entry = undefined;
    if (!old.closed) old.fail(code, message);
  }

  function peerList(): string {
    if (peersJson === null) peersJson = Array.from(nodes.values(), (n) => n.json).join(",");
    return peersJson;
  }

  function queuePush(line: string): void {
    batch.push(line);
    if (batchScheduled) return;
    batchScheduled = true;
    const wait = nextFlushAt - performance.now();
    if (wait > 0) setTimeout(flushPushes, wait);
    else setImmediate(flushPushes);
  }

  function flushPushes(): void {
    batchScheduled = false;
    const lines = batch;
    batch = [];
    if (!lines.length) return;
    const started = performance.now();
    // Encoded once for all sessions; a node skips events at or below the seq it already has.
    const bytes = Buffer.from(lines.join(""));
    for (const conn of sessions) {
      if (conn.state.phase === "registered") conn.send(bytes);
    }
    const ended = performance.now();
    nextFlushAt = ended + (ended - started) * PUSH_PACING;
  }

  function recordReceipt(entry: Entry, ids: string[]): void {
    let added = 0;
    for (const id of ids) {
      if (id === entry.id) continue;
      const other = nodes.get(id);
      if (!other || entry.links.has(id)) continue;
      entry.links.add(id);
      other.links.add(entry.id);
      stats.pairsGreeted++;
      added++;
      emit({ event: "pair-greeted", a: entry.id, b: id });
    }
    if (added) checkMesh();
  }

  function checkMesh(): void {
    const expected = (nodes.size * (nodes.size - 1)) / 2;
    if (stats.meshCompleteMs === null && stats.pairsGreeted >= expected) {
      stats.meshCompleteMs = performance.now() - stats.lastJoinAt;
      emit({ event: "mesh-complete", nodes: nodes.size, pairs: expected, ms: Math.round(stats.meshCompleteMs) });
    }
  }

  /** Dials a node back to check the address it will be listed under. Returns why it failed, or null. */
  async function probe(host: string, port: number, id: string): Promise<string | null> {
    const nonce = randomId();
    const reply = Promise.withResolvers<string | null>();
    const timer = setTimeout(() => reply.resolve(`no answer within ${o.probeTimeoutMs}ms`), o.probeTimeoutMs);
    let conn: Conn<ProbeState> | undefined;
    try {
      conn = await dial<ProbeState>(host, port, probeHandlers, o.probeTimeoutMs);
      conn.state = { done: reply.resolve, nonce, id };
      conn.send({ type: "probe", v: PROTOCOL_VERSION, id, nonce });
      return await reply.promise;
    } catch (e) {
      return (e as Error).message;
    } finally {
      clearTimeout(timer);
      conn?.destroy();
    }
  }

  function countReject(code: ErrorCode): void {
    stats.rejected[code] = (stats.rejected[code] ?? 0) + 1;
  }

  function reject(conn: Conn<Session>, code: ErrorCode, rawMessage: string): void {
    const message = redact(rawMessage);
    countReject(code);
    conn.state.phase = "closing";
    conn.state.lastSeen = performance.now();
    emit({ event: "error", code, message, remote: formatAddress(conn.remoteAddress, conn.remotePort) });
    conn.fail(code, message);
  }

  const registry: Registry = {
    host: o.host,
    port,
    boot,
    nodes: () => Array.from(nodes.values(), ({ id, host, port, name, source, joinedAt }) => ({ id, host, port, name, source, joinedAt })),
    stats() {
      const n = Math.min(stats.latencyCount, stats.latencies.length);
      const sorted = Array.from(stats.latencies.subarray(0, n)).sort((a, b) => a - b);
      const pct = (p: number) => (n ? round(sorted[Math.min(n - 1, Math.floor(p * n))]!) : 0);
      return {
        nodes: nodes.size,
        joins: stats.joins,
        leaves: { ...stats.leaves },
        registrations: stats.registrations,
        rejected: { ...stats.rejected },
        seq,
        pairsGreeted: stats.pairsGreeted,
        pairsExpected: (nodes.size * (nodes.size - 1)) / 2,
        latencyMs: { p50: pct(0.5), p90: pct(0.9), p99: pct(0.99), max: n ? round(sorted[n - 1]!) : 0, count: stats.latencyCount, sum: round(stats.latencySumMs) },
        startedAt: stats.startedAt,
        meshCompleteMs: stats.meshCompleteMs === null ? null : round(stats.meshCompleteMs),
      };
    },
    subscribe(fn) {
      listeners.add(fn);
      return () => listeners.delete(fn);
    },
    pairs() {
      const out: [string, string][] = [];
      for (const e of nodes.values()) for (const other of e.links) if (e.id < other) out.push([e.id, other]);
      return out;
    },
    async stop() {
      if (stopping) return;
      stopping = true;
      clearInterval(sweep);
      for (const l of servers) l.stop(false);
      flushPushes();
      const closed = Array.from(sessions, (conn) => {
        conn.state.leaveReason = "closed";
        conn.fail("shutting-down", "registry is shutting down");
        return conn;
      });
      // Give clean closes a moment to complete, then cut what is left.
      const deadline = performance.now() + 1000;
      while (closed.some((c) => !c.closed) && performance.now() < deadline) await Bun.sleep(10);
      for (const c of closed) c.destroy();
      for (const l of servers) l.stop(true);
      emit({ event: "stopped" });
    },
    [Symbol.asyncDispose]() {
      return this.stop();
    },
  };
  return registry;
}

// --- internal ----------------------------------------------------------------

const PING_CHUNK = Buffer.from(PING_LINE + "\n");
const PONG_BYTES = Buffer.from(PONG_LINE);

/** Fan-out pacing: after a flush of t ms, at least this many t of other work (fan-out <= 1/(1+PUSH_PACING) of the loop). */
const PUSH_PACING = 4;

interface Session {
  phase: "new" | "checking" | "registered" | "closing";
  openedAt: number;
  lastSeen: number;
  counted?: boolean;
  entry?: Entry;
  leaveReason?: LeaveReason;
}

interface Entry extends NodeInfo {
  /** This node's entry in the peer list, encoded once. */
  json: string;
  conn: Conn<Session>;
  address?: string;
  /** Peers this node has exchanged a greeting with (both sides hold the link). */
  links: Set<string>;
}

interface ProbeState {
  done: (failure: string | null) => void;
  nonce: string;
  id: string;
}

const probeHandlers = lineHandlers<ProbeState>({
  maxLineBytes: DEFAULTS.maxLineBytes,
  state: () => ({ done: () => {}, nonce: "", id: "" }),
  line(conn, line) {
    const r = decode(FromListener, line);
    const s = conn.state;
    if (!r.ok) return s.done(`bad answer: ${r.message}`);
    const m = r.msg;
    if (m.type === "probe-ok" && m.nonce === s.nonce && m.id === s.id) return s.done(null);
    if (m.type === "error") return s.done(`${m.code}: ${m.message}`);
    s.done(`unexpected answer ${m.type}`);
  },
  close(conn) {
    conn.state.done("connection closed before the probe was answered");
  },
});

/**
 * The comma-joined peer list without one entry's fragment, cut out in place
 * instead of re-encoding the list. A fragment is found exactly: it starts with
 * its own unique id, and quotes inside JSON strings are escaped. The search
 * runs from the end, where short-lived nodes sit. Null (rebuild on next use)
 * if it is not there.
 */
function withoutFragment(list: string | null, json: string): string | null {
  if (list === null) return null;
  const i = list.lastIndexOf(json);
  if (i < 0) return null;
  const end = i + json.length;
  if (i === 0) return end === list.length ? "" : list.slice(end + 1);
  return list.slice(0, i - 1) + list.slice(end);
}

function sha256(text: string): Buffer {
  return createHash("sha256").update(text).digest();
}

/** Whether a name resolves to an address, within a deadline: the name is the client's choice, the resolver's patience is not. */
async function resolvesTo(host: string, address: string, timeoutMs: number): Promise<boolean> {
  let timer: Timer | undefined;
  const late = new Promise<string[]>((resolve) => (timer = setTimeout(() => resolve([]), timeoutMs)));
  try {
    return (await Promise.race([resolveHost(host), late])).includes(address);
  } catch {
    return false;
  } finally {
    clearTimeout(timer);
  }
}

function round(ms: number): number {
  return Math.round(ms * 1000) / 1000;
}

function describe(e: EventRecord): string {
  switch (e.event) {
    case "listening":
      return `registry listening on ${formatAddress(String(e.host), Number(e.port))} (boot ${e.boot})`;
    case "node-registered":
      return `node ${e.id}${e.name ? ` (${e.name})` : ""} joined at ${formatAddress(String(e.host), Number(e.port))}, ${e.nodes} registered`;
    case "node-left":
      return `node ${e.id} left (${e.reason}), ${e.nodes} registered`;
    case "error":
      return `${e.remote ?? ""} ${e.code}: ${e.message}`;
    case "http-listening":
      return `status page on ${e.url}`;
    case "stopped":
      return "registry stopped";
    default:
      return `${e.event} ${JSON.stringify({ ...e, event: undefined })}`;
  }
}

export const command = defineCommand({
  meta: { name: "registry", version: "0.1.0", description: "Contact registry: lists running peer nodes and tells them about each other." },
  args: {
    host: { type: "positional", required: false, description: "Address to listen on; `localhost` = 127.0.0.1 and ::1 [env REGISTRY_HOST, default ::]" },
    port: { type: "positional", required: false, description: `TCP port [env REGISTRY_PORT, default ${DEFAULTS.registryPort}]` },
    json: { type: "boolean", description: "One JSON event per line on stdout [env LOG_JSON=1]" },
    token: { type: "string", description: "Shared secret nodes must present [env REGISTRY_TOKEN]" },
    heartbeat: { type: "string", description: `Heartbeat interval in ms, announced to nodes [env REGISTRY_HEARTBEAT_MS, default ${DEFAULTS.heartbeatMs}]` },
    "heartbeat-misses": { type: "string", description: `Missed beats before eviction [env REGISTRY_HEARTBEAT_MISSES, default ${DEFAULTS.heartbeatMisses}]` },
    probe: { type: "boolean", description: "Dial each node back before listing it; --no-probe to skip [env REGISTRY_PROBE=0 to skip]" },
    "probe-timeout": { type: "string", description: `Probe deadline in ms [env REGISTRY_PROBE_TIMEOUT_MS, default ${DEFAULTS.probeTimeoutMs}]` },
    "allow-advertise": { type: "boolean", description: "Accept advertised hosts other than the connection's source [env REGISTRY_ALLOW_ADVERTISE=1]" },
    "register-timeout": { type: "string", description: `Deadline for a new connection to register, ms [env REGISTRY_REGISTER_TIMEOUT_MS, default ${DEFAULTS.registerTimeoutMs}]` },
    "max-line": { type: "string", description: `Longest accepted line in bytes [env REGISTRY_MAX_LINE, default ${DEFAULTS.maxLineBytes}]` },
    "max-nodes": { type: "string", description: `Most nodes listed at once [env REGISTRY_MAX_NODES, default ${DEFAULTS.maxNodes}]` },
    "max-conns-per-ip": { type: "string", description: `Open connections per source address, 0 = no cap [env REGISTRY_MAX_CONNS_PER_IP, default ${DEFAULTS.maxConnsPerAddress}]` },
    "max-conns": { type: "string", description: `Open connections in all, 0 = no cap [env REGISTRY_MAX_CONNS, default ${DEFAULTS.maxConns}]` },
    "max-queue": { type: "string", description: `Unsent bytes per connection before it is dropped as a slow consumer [env REGISTRY_MAX_QUEUE_BYTES, default ${DEFAULTS.maxQueueBytes}]` },
    http: { type: "string", description: "Serve the status API and live page on this port [env REGISTRY_HTTP_PORT]" },
    "http-host": { type: "string", description: "Address for the status page [env REGISTRY_HTTP_HOST, default: same as host]" },
  },
  async run({ args, rawArgs }) {
    await runCli(async () => {
      checkFlags(rawArgs, command.args as Record<string, { type?: string }>);
      const { text: flag, int: num, on } = settingsFrom(args);
      const portText = flag("port", "REGISTRY_PORT");
      const port = portText === undefined ? DEFAULTS.registryPort : parsePort(portText);
      if (port === undefined) throw new UsageError(`port must be a number from 0 to 65535, got "${portText}"`);
      const json = on("json", "LOG_JSON");
      const print = createPrinter("registry", json, describe);
      const httpText = flag("http", "REGISTRY_HTTP_PORT");
      const httpPort = httpText === undefined ? undefined : parsePort(httpText);
      if (httpText !== undefined && httpPort === undefined) throw new UsageError(`--http must be a port number, got "${httpText}"`);
      const registry = await startRegistry({
        host: flag("host", "REGISTRY_HOST") ?? "::",
        port,
        token: flag("token", "REGISTRY_TOKEN"),
        heartbeatMs: num("heartbeat", "REGISTRY_HEARTBEAT_MS", 1, MAX_TIMER_MS),
        heartbeatMisses: num("heartbeat-misses", "REGISTRY_HEARTBEAT_MISSES", 1),
        probe: on("probe", "REGISTRY_PROBE", true),
        probeTimeoutMs: num("probe-timeout", "REGISTRY_PROBE_TIMEOUT_MS", 1, MAX_TIMER_MS),
        allowAdvertise: on("allow-advertise", "REGISTRY_ALLOW_ADVERTISE"),
        registerTimeoutMs: num("register-timeout", "REGISTRY_REGISTER_TIMEOUT_MS", 1, MAX_TIMER_MS),
        maxLineBytes: num("max-line", "REGISTRY_MAX_LINE", 64),
        maxNodes: num("max-nodes", "REGISTRY_MAX_NODES", 1),
        maxConnsPerAddress: num("max-conns-per-ip", "REGISTRY_MAX_CONNS_PER_IP"),
        maxConns: num("max-conns", "REGISTRY_MAX_CONNS"),
        maxQueueBytes: num("max-queue", "REGISTRY_MAX_QUEUE_BYTES", 1024),
        onEvent: print,
      });
      let status: { stop(): Promise<void> } | undefined;
      if (httpPort !== undefined) {
        const { startStatusServer } = await import("./status.ts");
        const server = startStatusServer(registry, { port: httpPort, host: flag("http-host", "REGISTRY_HTTP_HOST") ?? registry.host });
        status = server;
        print({ event: "http-listening", url: server.url });
      }
      const shutdown = async () => {
        await registry.stop(); // open status pages get their `stopped` event before the server goes
        await status?.stop();
        process.exit(0);
      };
      process.once("SIGTERM", shutdown);
      process.once("SIGINT", shutdown);
    });
  },
});

if (import.meta.main) await runMain(command);
