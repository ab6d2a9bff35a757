#!/usr/bin/env bun
/**
 * A peer node ("C"): listens on a port the OS picks, registers that port with
 * the registry, greets every node the registry lists, and answers the
 * greetings of nodes that join later. Its registration lasts as long as its
 * registry session; it reconnects and registers again if that session drops.
 * `bun client.ts <registry-host> <registry-port>`; see README.md.
 */
import { defineCommand, runMain } from "citty";
import {
  DEFAULTS,
  FromListener,
  FromRegistry,
  MAX_TIMER_MS,
  PROTOCOL_VERSION,
  ToListener,
  decode,
  randomId,
  type ErrorCode,
  type Peer,
} from "./protocol.ts";
import {
  dial,
  formatAddress,
  lineHandlers,
  listenAll,
  parseHostPort,
  parsePort,
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

export interface NodeOptions {
  registryHost: string;
  registryPort: number;
  /** Address to listen on for greetings; `::` (all, falling back to 0.0.0.0) by default. */
  listenHost?: string;
  /** Listening port; 0 (default) lets the OS pick. */
  port?: number;
  /** `host[:port]` to register instead of what the registry sees (NAT, port mapping). */
  advertise?: string;
  /** Stable identity; random per process by default. */
  id?: string;
  name?: string;
  token?: string;
  greetTimeoutMs?: number;
  greetConcurrency?: number;
  greetRetries?: number;
  connectTimeoutMs?: number;
  /** Deadline for the registry's answer to `register`; past it the node dials again. */
  registerTimeoutMs?: number;
  reconnectBaseMs?: number;
  reconnectMaxMs?: number;
  maxLineBytes?: number;
  maxReplyBytes?: number;
  inboundTimeoutMs?: number;
  maxInboundConns?: number;
  onEvent?: (e: EventRecord) => void;
  /** Resolve startNode only after the first registration (default true). */
  waitForRegistration?: boolean;
}

export interface PeerNode {
  readonly id: string;
  /** Port this node listens on. */
  readonly port: number;
  /** True while the registry session is registered. */
  readonly registered: boolean;
  /** This node's view of the other live nodes. */
  peers(): Peer[];
  /** Ids of the peers this node has exchanged a greeting with, either way. */
  met(): string[];
  /** Resolves when the node has stopped; rejects if it stopped on a fatal registry error. */
  readonly done: Promise<void>;
  /** Says `leave` to the registry, stops listening, and resolves once closed. */
  stop(): Promise<void>;
  /** Stops without saying goodbye (tests of crash handling). */
  kill(): void;
  [Symbol.asyncDispose](): Promise<void>;
}

/** A registration refused for a reason retrying will not fix. */
export class RegistrationError extends Error {
  override name = "RegistrationError";
  constructor(
    readonly code: ErrorCode,
    message: string,
  ) {
    super(`${code}: ${message}`);
  }
}

/** Registry refusals that retrying cannot fix; anything else is retried with backoff. */
const FATAL: ReadonlySet<string> = new Set(["unauthorized", "address-not-allowed", "unsupported-version", "unreachable", "bad-message", "bad-json"]);

/** Starts a node; by default resolves once it is registered. */
export async function startNode(options: NodeOptions): Promise<PeerNode> {
  const o = {
    listenHost: options.listenHost ?? "::",
    port: options.port ?? 0,
    greetTimeoutMs: options.greetTimeoutMs ?? DEFAULTS.greetTimeoutMs,
    greetConcurrency: options.greetConcurrency ?? DEFAULTS.greetConcurrency,
    greetRetries: options.greetRetries ?? DEFAULTS.greetRetries,
    connectTimeoutMs: options.connectTimeoutMs ?? 3_000,
    // Twice the registry's own deadline for `register`, so a registry busy probing is not abandoned early.
    registerTimeoutMs: options.registerTimeoutMs ?? 2 * DEFAULTS.registerTimeoutMs,
    reconnectBaseMs: options.reconnectBaseMs ?? DEFAULTS.reconnectBaseMs,
    reconnectMaxMs: options.reconnectMaxMs ?? DEFAULTS.reconnectMaxMs,
    maxLineBytes: options.maxLineBytes ?? DEFAULTS.maxLineBytes,
    maxReplyBytes: options.maxReplyBytes ?? DEFAULTS.maxReplyBytes,
    inboundTimeoutMs: options.inboundTimeoutMs ?? DEFAULTS.inboundTimeoutMs,
    maxInboundConns: options.maxInboundConns ?? DEFAULTS.maxInboundConns,
  };
  const id = options.id ?? randomId();
  const name = options.name || undefined;
  const emit = options.onEvent ?? (() => {});
  const advertised = options.advertise ? parseHostPort(options.advertise) : {};

  const view = new Map<string, Peer>();
  const met = new Set<string>();
  let self: Peer | undefined;
  let boot: string | undefined;
  let seq = 0;
  let syncing = false;
  let session: Conn<RegistryState> | undefined;
  let registered = false;
  let everRegistered = false;
  let stopped = false;
  let attempt = 0;
  let lastHeard = 0;
  let heartbeat: Timer | undefined;
  let reconnectTimer: Timer | undefined;
  const firstRegistration = Promise.withResolvers<void>();
  const done = Promise.withResolvers<void>();
  done.promise.catch(() => {}); // observed through `done` by whoever cares
  firstRegistration.promise.catch(() => {});

  // --- listener: greetings from later nodes, probes from the registry ---
  let inbound = 0;
  const listenerHandlers = lineHandlers<InboundState>({
    maxLineBytes: o.maxLineBytes,
    state: () => ({ timer: undefined }),
    open(conn) {
      inbound++;
      if (inbound > o.maxInboundConns) return conn.fail("too-many-connections", `more than ${o.maxInboundConns} open greeting connections`);
      conn.state.timer = setTimeout(() => conn.destroy(), o.inboundTimeoutMs);
    },
    line(conn, line) {
      const r = decode(ToListener, line);
      if (!r.ok) return conn.fail(r.code, r.message);
      const m = r.msg;
      if (m.v !== PROTOCOL_VERSION) return conn.fail("unsupported-version", `protocol version ${m.v} is not supported; this node speaks ${PROTOCOL_VERSION}`);
      if (m.type === "probe") {
        if (m.id !== id) return conn.fail("wrong-node", `this is node ${id}, not ${m.id}`);
        conn.send({ type: "probe-ok", id, nonce: m.nonce });
        return conn.end();
      }
      conn.send(name ? { type: "welcome", v: PROTOCOL_VERSION, id, name } : { type: "welcome", v: PROTOCOL_VERSION, id });
      conn.end();
      if (m.id === id || met.has(m.id)) return; // a retried greeting is acknowledged again but counted once
      remember(m.id);
      emit({ event: "greeting", peer: m.id, address: formatAddress(m.host, m.port), name: m.name });
    },
    close(conn) {
      inbound--;
      clearTimeout(conn.state.timer);
    },
  });
  const { listeners, port } = listenAll(o.listenHost, o.port, listenerHandlers);
  emit({ event: "listening", id, name, host: o.listenHost, port });

  // --- registry session ---
  const registryHandlers = lineHandlers<RegistryState>({
    maxLineBytes: o.maxReplyBytes,
    state: () => ({ current: false }),
    line(conn, line) {
      if (!conn.state.current) return;
      lastHeard = performance.now();
      const r = decode(FromRegistry, line);
      if (!r.ok) {
        emit({ event: "error", code: r.code, message: `from registry: ${r.message}` });
        return;
      }
      onRegistryMessage(conn, r.msg);
    },
    close(conn) {
      conn.state.onClose?.();
      if (!conn.state.current) return;
      conn.state.current = false;
      session = undefined;
      clearInterval(heartbeat);
      const was = registered;
      registered = false;
      if (stopped) return;
      const limit = conn.limitHit ? `${conn.limitHit.code}: ${conn.limitHit.message}` : undefined;
      emit({ event: "disconnected", reason: limit ?? conn.state.lastError ?? "connection closed", registered: was });
      if (conn.state.fatal) return fail(conn.state.fatal);
      scheduleReconnect();
    },
  });

  function onRegistryMessage(conn: Conn<RegistryState>, m: FromRegistry): void {
    switch (m.type) {
      case "registered": {
        const again = everRegistered;
        const newBoot = boot !== undefined && boot !== m.boot;
        registered = everRegistered = true;
        attempt = 0;
        self = m.self;
        boot = m.boot;
        seq = m.seq;
        syncing = false;
        applySnapshot(m.peers, again ? (newBoot ? "restart" : "sync") : undefined);
        startHeartbeat(conn, m.heartbeat, m.timeout);
        emit({ event: "registered", peers: m.peers.length, boot: m.boot, address: formatAddress(m.self.host, m.self.port), again });
        firstRegistration.resolve();
        for (const p of m.peers) greet(p);
        sendReceipt(Array.from(met));
        return;
      }
      case "joined":
        if (!acceptSeq(conn, m.seq) || m.peer.id === id) return;
        if (!view.has(m.peer.id)) emit({ event: "peer-joined", peer: m.peer.id, address: formatAddress(m.peer.host, m.peer.port), name: m.peer.name });
        view.set(m.peer.id, m.peer);
        return;
      case "left":
        if (!acceptSeq(conn, m.seq)) return;
        if (view.delete(m.id)) emit({ event: "peer-left", peer: m.id, reason: m.reason });
        return;
      case "snapshot":
        if (m.boot !== boot) return conn.destroy(); // a registry we did not register with: start over
        seq = m.seq;
        syncing = false;
        applySnapshot(m.peers, "sync");
        return;
      case "pong":
        return;
      case "error":
        conn.state.lastError = `${m.code}: ${m.message}`;
        emit({ event: "error", code: m.code, message: m.message });
        // Fatal only before the first registration (a configuration error); once this node has been
        // listed, a refusal comes from a registry that restarted or is briefly wrong (a dial-back probe
        // that timed out under load), and giving up would lose a live node: retry with backoff.
        // `replaced` reaches only a node whose *current* session was taken over (a session this node
        // gave up on is no longer read), so another live process holds this id or address: retrying
        // would take it back, and the two would evict each other for as long as both run.
        if ((!everRegistered && FATAL.has(m.code)) || m.code === "replaced") {
          conn.state.fatal = new RegistrationError(m.code, m.message);
          conn.end(); // no reason to wait for the registry to hang up
        }
        return;
    }
  }

  /** True if a push is the next one; on a gap, asks for a fresh snapshot instead of drifting. */
  function acceptSeq(conn: Conn<RegistryState>, s: number): boolean {
    if (!registered || syncing || s <= seq) return false;
    if (s !== seq + 1) {
      syncing = true;
      emit({ event: "resync", expected: seq + 1, got: s });
      conn.send({ type: "sync" });
      return false;
    }
    seq = s;
    return true;
  }

  /** Replaces the view; `reason` set means report the differences as joins and leaves. */
  function applySnapshot(peers: Peer[], reason: string | undefined): void {
    const next = new Map(peers.filter((p) => p.id !== id).map((p) => [p.id, p] as const));
    if (reason) {
      for (const old of view.keys()) if (!next.has(old)) emit({ event: "peer-left", peer: old, reason });
      for (const p of next.values()) if (!view.has(p.id)) emit({ event: "peer-joined", peer: p.id, address: formatAddress(p.host, p.port), name: p.name });
    }
    view.clear();
    for (const [k, p] of next) view.set(k, p);
  }

  function startHeartbeat(conn: Conn<RegistryState>, intervalMs: number, timeoutMs: number): void {
    // Timers take at most 2^31-1 ms and turn anything larger into 1 ms: a registry's absurd figure must not become a ping loop.
    intervalMs = Math.min(intervalMs, MAX_TIMER_MS);
    timeoutMs = Math.min(timeoutMs, MAX_TIMER_MS);
    clearInterval(heartbeat);
    lastHeard = performance.now();
    heartbeat = setInterval(() => {
      if (performance.now() - lastHeard > timeoutMs) {
        conn.state.lastError = `registry silent for ${timeoutMs}ms`;
        conn.destroy();
        return;
      }
      conn.send({ type: "ping" });
    }, intervalMs);
    heartbeat.unref();
  }

  async function connect(): Promise<void> {
    reconnectTimer = undefined;
    if (stopped) return;
    let conn: Conn<RegistryState>;
    try {
      conn = await dial(options.registryHost, options.registryPort, registryHandlers, o.connectTimeoutMs);
    } catch (e) {
      if (stopped) return;
      emit({ event: "disconnected", reason: (e as Error).message, registered: false });
      return scheduleReconnect();
    }
    if (stopped) return conn.destroy();
    conn.state.current = true;
    session = conn;
    lastHeard = performance.now();
    conn.send({
      type: "register",
      v: PROTOCOL_VERSION,
      id,
      port: advertised.port ?? port,
      ...(advertised.host ? { host: advertised.host } : {}),
      ...(name ? { name } : {}),
      ...(options.token ? { token: options.token } : {}),
    });
    // Heartbeats start only once registered: without this, a registry that accepts and never
    // answers (frozen, or a link lost without FIN) would hold the node unregistered forever.
    setTimeout(() => {
      if (!conn.state.current || registered) return;
      conn.state.lastError = `no answer to register within ${o.registerTimeoutMs}ms`;
      conn.destroy();
    }, o.registerTimeoutMs).unref();
  }

  function scheduleReconnect(): void {
    if (stopped || reconnectTimer) return;
    // Full jitter keeps a fleet of nodes from reconnecting in lockstep after a registry restart.
    const cap = Math.min(o.reconnectMaxMs, o.reconnectBaseMs * 2 ** Math.min(attempt, 20));
    const delay = Math.round(Math.random() * cap);
    attempt++;
    emit({ event: "reconnecting", inMs: delay, capMs: cap, attempt });
    reconnectTimer = setTimeout(connect, delay);
  }

  /**
   * Records a peer as met. Anyone can send `hello` with a fresh id, so the set
   * is bounded: past the cap, ids no longer in the view are forgotten (a
   * forgotten peer that comes back is at worst greeted a second time).
   */
  function remember(peerId: string): void {
    met.add(peerId);
    if (met.size <= MAX_MET) return;
    for (const known of met) if (!view.has(known)) met.delete(known);
  }

  // --- greetings ---
  const queue: Peer[] = [];
  const pending = new Set<string>();
  const greetConns = new Set<Conn<GreetState>>();
  let active = 0;

  function greet(peer: Peer): void {
    if (peer.id === id || met.has(peer.id) || pending.has(peer.id)) return;
    pending.add(peer.id);
    queue.push(peer);
    pump();
  }

  function pump(): void {
    while (active < o.greetConcurrency && queue.length && !stopped) {
      const peer = queue.shift()!;
      active++;
      greetWithRetries(peer).finally(() => {
        active--;
        pending.delete(peer.id);
        pump();
      });
    }
  }

  async function greetWithRetries(peer: Peer): Promise<void> {
    const address = formatAddress(peer.host, peer.port);
    let reason = "";
    for (let tries = 1; tries <= o.greetRetries + 1; tries++) {
      if (stopped || met.has(peer.id)) return;
      if (tries > 1 && !view.has(peer.id)) return; // it left meanwhile: nobody to greet
      try {
        await greetOnce(peer);
        if (stopped) return;
        remember(peer.id);
        emit({ event: "greeted", peer: peer.id, address, name: peer.name, tries });
        sendReceipt([peer.id]);
        return;
      } catch (e) {
        reason = (e as Error).message;
      }
      if (tries <= o.greetRetries) await Bun.sleep(50 * 2 ** tries * (0.5 + Math.random()));
    }
    if (!stopped) emit({ event: "greet-failed", peer: peer.id, address, reason, tries: o.greetRetries + 1 });
  }

  async function greetOnce(peer: Peer): Promise<void> {
    const deadline = Promise.withResolvers<void>();
    const timer = setTimeout(() => deadline.reject(new Error(`no welcome within ${o.greetTimeoutMs}ms`)), o.greetTimeoutMs);
    let conn: Conn<GreetState> | undefined;
    try {
      conn = await dial(peer.host, peer.port, greetHandlers, o.greetTimeoutMs);
      greetConns.add(conn);
      conn.state = { expect: peer.id, done: deadline };
      const me = self ?? { id, host: "", port };
      conn.send({ type: "hello", v: PROTOCOL_VERSION, id, host: me.host || "unknown", port: me.port, ...(name ? { name } : {}) });
      await deadline.promise;
    } finally {
      clearTimeout(timer);
      if (conn) {
        greetConns.delete(conn);
        conn.end();
      }
    }
  }

  // Receipts tell the registry which pairs have met (status page, mesh completeness).
  let receipts: string[] = [];
  let receiptScheduled = false;
  function sendReceipt(ids: string[]): void {
    if (!ids.length) return;
    receipts.push(...ids);
    if (receiptScheduled) return;
    receiptScheduled = true;
    setImmediate(() => {
      receiptScheduled = false;
      const all = receipts;
      receipts = [];
      if (!registered || !session) return;
      for (let i = 0; i < all.length; i += RECEIPT_CHUNK) session.send({ type: "receipt", ids: all.slice(i, i + RECEIPT_CHUNK) });
    });
  }

  function fail(error: RegistrationError): void {
    firstRegistration.reject(error);
    void shutdown(false).then(() => done.reject(error));
  }

  async function shutdown(sayGoodbye: boolean): Promise<void> {
    if (stopped) return;
    stopped = true;
    clearInterval(heartbeat);
    clearTimeout(reconnectTimer);
    for (const l of listeners) l.stop(true);
    for (const c of greetConns) c.destroy();
    queue.length = 0;
    const s = session;
    if (s && !s.closed) {
      if (sayGoodbye && registered) {
        const closed = Promise.withResolvers<void>();
        const timer = setTimeout(closed.resolve, 1000);
        const prevClose = s.state.onClose;
        s.state.onClose = () => {
          prevClose?.();
          closed.resolve();
        };
        s.send({ type: "leave" });
        await closed.promise; // the registry ends the session after `leave`
        clearTimeout(timer);
      }
      s.destroy();
    }
    registered = false;
  }

  const node: PeerNode = {
    id,
    port,
    get registered() {
      return registered;
    },
    peers: () => Array.from(view.values()),
    met: () => Array.from(met),
    done: done.promise,
    async stop() {
      await shutdown(true);
      emit({ event: "stopped" });
      done.resolve();
    },
    kill() {
      stopped = true;
      clearInterval(heartbeat);
      clearTimeout(reconnectTimer);
      session?.destroy();
      for (const l of listeners) l.stop(true);
      for (const c of greetConns) c.destroy();
      done.resolve();
    },
    [Symbol.asyncDispose]() {
      return this.stop();
    },
  };

  void connect();
  if (options.waitForRegistration !== false) {
    try {
      await firstRegistration.promise;
    } catch (e) {
      await shutdown(false);
      throw e;
    }
  }
  return node;
}

// --- internal ----------------------------------------------------------------

/** Peers remembered as met before those that left are forgotten: twice the registry's default node cap. */
const MAX_MET = 2 * DEFAULTS.maxNodes;

/** Ids per receipt line: 200 ids of up to 64 chars stay under the registry's default line limit. */
const RECEIPT_CHUNK = 200;

interface RegistryState {
  /** False once a newer session replaced this one or the node stopped. */
  current: boolean;
  lastError?: string;
  fatal?: RegistrationError;
  onClose?: () => void;
}

interface InboundState {
  timer: Timer | undefined;
}

interface GreetState {
  expect: string;
  done: PromiseWithResolvers<void>;
}

const greetHandlers = lineHandlers<GreetState>({
  maxLineBytes: DEFAULTS.maxLineBytes,
  state: () => ({ expect: "", done: Promise.withResolvers<void>() }),
  line(conn, line) {
    const { expect, done } = conn.state;
    const r = decode(FromListener, line);
    if (!r.ok) return done.reject(new Error(`bad reply: ${r.message}`));
    const m = r.msg;
    if (m.type === "welcome" && m.id === expect) return done.resolve();
    if (m.type === "welcome") return done.reject(new Error(`reached node ${m.id}, expected ${expect}`));
    if (m.type === "error") return done.reject(new Error(`${m.code}: ${m.message}`));
    done.reject(new Error(`unexpected reply ${m.type}`));
  },
  close(conn) {
    conn.state.done.reject(new Error("closed before welcome"));
  },
});

function describe(e: EventRecord): string {
  const who = (p: unknown, n: unknown) => `${p}${n ? ` (${n})` : ""}`;
  switch (e.event) {
    case "listening":
      return `node ${who(e.id, e.name)} listening on port ${e.port}`;
    case "registered":
      return `registered as ${e.address}${e.again ? " again" : ""}; given ${e.peers} peer${e.peers === 1 ? "" : "s"}`;
    case "greeted":
      return `greeted ${who(e.peer, e.name)} at ${e.address}`;
    case "greeting":
      return `greeting from ${who(e.peer, e.name)} at ${e.address}`;
    case "peer-joined":
      return `peer ${who(e.peer, e.name)} joined at ${e.address}`;
    case "peer-left":
      return `peer ${e.peer} left (${e.reason})`;
    case "greet-failed":
      return `could not greet ${e.peer} at ${e.address} after ${e.tries} tries: ${e.reason}`;
    case "disconnected":
      return `registry session lost: ${e.reason}`;
    case "reconnecting":
      return `reconnecting to the registry in ${e.inMs}ms`;
    case "resync":
      return `missed membership updates (expected seq ${e.expected}, got ${e.got}); resyncing`;
    case "error":
      return `${e.code}: ${e.message}`;
    case "stopped":
      return "node stopped";
    default:
      return `${e.event} ${JSON.stringify({ ...e, event: undefined })}`;
  }
}

export const command = defineCommand({
  meta: { name: "client", version: "0.1.0", description: "Peer node: registers with a contact registry and greets the other nodes." },
  args: {
    "registry-host": { type: "positional", required: false, description: "Registry host [env REGISTRY_HOST]" },
    "registry-port": { type: "positional", required: false, description: "Registry port [env REGISTRY_PORT]" },
    json: { type: "boolean", description: "One JSON event per line on stdout [env LOG_JSON=1]" },
    listen: { type: "string", description: "Address to listen on for greetings [env NODE_LISTEN, default ::, all interfaces]" },
    port: { type: "string", description: "Port to listen on [env NODE_PORT, default 0: the OS picks]" },
    advertise: { type: "string", description: "host[:port] to register instead of the address the registry sees [env NODE_ADVERTISE]" },
    name: { type: "string", description: "Human-readable name shown to peers [env NODE_NAME]" },
    id: { type: "string", description: "Stable node id [env NODE_ID, default random]" },
    token: { type: "string", description: "Shared secret the registry requires [env REGISTRY_TOKEN]" },
    "greet-timeout": { type: "string", description: `Per-greeting deadline in ms [env NODE_GREET_TIMEOUT_MS, default ${DEFAULTS.greetTimeoutMs}]` },
    "greet-concurrency": { type: "string", description: `Greetings in flight at once [env NODE_GREET_CONCURRENCY, default ${DEFAULTS.greetConcurrency}]` },
    "greet-retries": { type: "string", description: `Extra attempts per greeting [env NODE_GREET_RETRIES, default ${DEFAULTS.greetRetries}]` },
    "reconnect-max": { type: "string", description: `Cap of the reconnect backoff in ms [env NODE_RECONNECT_MAX_MS, default ${DEFAULTS.reconnectMaxMs}]` },
    "register-timeout": { type: "string", description: `Deadline for the registry's answer to register, ms [env NODE_REGISTER_TIMEOUT_MS, default ${2 * DEFAULTS.registerTimeoutMs}]` },
    "max-reply": { type: "string", description: `Longest line accepted from the registry, bytes [env NODE_MAX_REPLY_BYTES, default ${DEFAULTS.maxReplyBytes}]` },
    "max-line": { type: "string", description: `Longest line the greeting listener accepts, bytes [env NODE_MAX_LINE, default ${DEFAULTS.maxLineBytes}]` },
    "inbound-timeout": { type: "string", description: `Lifetime of an inbound greeting connection, ms [env NODE_INBOUND_TIMEOUT_MS, default ${DEFAULTS.inboundTimeoutMs}]` },
    "max-inbound": { type: "string", description: `Open inbound greeting connections at most [env NODE_MAX_INBOUND, default ${DEFAULTS.maxInboundConns}]` },
  },
  async run({ args, rawArgs }) {
    await runCli(async () => {
      checkFlags(rawArgs, command.args as Record<string, { type?: string }>);
      const { text: flag, int: num, on } = settingsFrom(args);
      const registryHost = flag("registry-host", "REGISTRY_HOST");
      const portText = flag("registry-port", "REGISTRY_PORT");
      if (!registryHost) throw new UsageError("missing the registry address: bun client.ts <registry-host> <registry-port>");
      if (portText === undefined) throw new UsageError("missing the registry port: bun client.ts <registry-host> <registry-port>");
      const registryPort = parsePort(portText, false);
      if (registryPort === undefined) throw new UsageError(`registry port must be a number from 1 to 65535, got "${portText}"`);
      const listenPortText = flag("port", "NODE_PORT");
      const port = listenPortText === undefined ? 0 : parsePort(listenPortText);
      if (port === undefined) throw new UsageError(`--port must be a number from 0 to 65535, got "${listenPortText}"`);
      const advertise = flag("advertise", "NODE_ADVERTISE");
      if (advertise !== undefined) {
        try {
          parseHostPort(advertise);
        } catch (e) {
          throw new UsageError(`--advertise: ${(e as Error).message}`);
        }
      }
      const json = on("json", "LOG_JSON");
      const print = createPrinter("node", json, describe);
      const node = await startNode({
        registryHost,
        registryPort,
        listenHost: flag("listen", "NODE_LISTEN"),
        port,
        advertise,
        name: flag("name", "NODE_NAME"),
        id: flag("id", "NODE_ID"),
        token: flag("token", "REGISTRY_TOKEN"),
        greetTimeoutMs: num("greet-timeout", "NODE_GREET_TIMEOUT_MS", 1, MAX_TIMER_MS),
        greetConcurrency: num("greet-concurrency", "NODE_GREET_CONCURRENCY", 1),
        greetRetries: num("greet-retries", "NODE_GREET_RETRIES"),
        reconnectMaxMs: num("reconnect-max", "NODE_RECONNECT_MAX_MS", 1, MAX_TIMER_MS),
        maxLineBytes: num("max-line", "NODE_MAX_LINE", 64),
        inboundTimeoutMs: num("inbound-timeout", "NODE_INBOUND_TIMEOUT_MS", 1, MAX_TIMER_MS),
        maxInboundConns: num("max-inbound", "NODE_MAX_INBOUND", 1),
        registerTimeoutMs: num("register-timeout", "NODE_REGISTER_TIMEOUT_MS", 1, MAX_TIMER_MS),
        maxReplyBytes: num("max-reply", "NODE_MAX_REPLY_BYTES", 1024),
        onEvent: print,
        // Signals must stop the node even while its registry is still out of reach;
        // a refused first registration still ends the process through `done`.
        waitForRegistration: false,
      });
      const shutdown = async () => {
        await node.stop();
        process.exit(0);
      };
      process.once("SIGTERM", shutdown);
      process.once("SIGINT", shutdown);
      // Lets a harness (scripts/chaos.ts) read this node's view without replaying its whole history.
      process.on("SIGUSR1", () => print({ event: "view", registered: node.registered, peers: node.peers().map((p) => p.id) }));
      await node.done;
    });
  },
});

if (import.meta.main) await runMain(command);
