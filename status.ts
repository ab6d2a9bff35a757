/**
 * The registry's optional HTTP side (`--http <port>`): a JSON and Prometheus
 * status API and one live page that shows the mesh forming. Built on
 * Bun.serve behind a connection gate (gate.ts serveGated); it only reads the
 * registry through its public handle, and every client gets a bounded share:
 * connections are capped in all and per source address, `/events` streams in
 * number and in unsent bytes, and what a request costs the registry is built
 * at most once per `cacheMs` however many ask.
 *
 *   GET /         the live page (status.html)
 *   GET /events   Server-Sent Events: a snapshot, then joins, leaves and greeted pairs
 *   GET /peers    JSON: the live nodes
 *   GET /stats    JSON: counters, latency percentiles, mesh completeness
 *   GET /metrics  the same figures in the Prometheus text format
 *   GET /healthz  200 while the registry runs, 503 once it stopped
 */
import { createHash } from "node:crypto";
import { HTTP_LIMITS } from "./limits.ts";
import type { LeaveReason } from "./protocol.ts";
import { formatAddress, normalizeHost, tcp, type Transport } from "./net.ts";
import { serveGated, type GateStats } from "./gate.ts";
import type { NodeInfo, Registry, RegistryEvent, RegistryStats } from "./registry.ts";
// A text import is part of the module graph: it works from any cwd, in the
// Docker image and in a `bun build --compile` binary alike.
import pageSource from "./status.html" with { type: "text" };

export interface StatusServerOptions {
  /** 0 lets the OS pick. */
  port?: number;
  /** `::` (all interfaces, falling back to 0.0.0.0), an IP, or `localhost` (127.0.0.1 and ::1). */
  host?: string;
  /** Where the port is opened (default plain TCP; a TLS transport serves HTTPS). */
  transport?: Transport;
  /** Open connections in all, and per source address (0 = no cap). */
  maxConns?: number;
  maxConnsPerAddress?: number;
  /** A request head must be complete this long after connecting or after its first byte. */
  requestTimeoutMs?: number;
  /** A connection that moves no byte either way this long is closed (event streams send keep-alives, so they stay). */
  idleTimeoutMs?: number;
  /** Open event streams; more get 503. */
  maxStreams?: number;
  /** Unsent bytes across all event streams; past it the streams furthest behind are dropped. */
  streamBudgetBytes?: number;
  /** Unsent bytes one event-stream client may fall behind by before it is dropped (it reconnects to a fresh snapshot). */
  maxClientBacklogBytes?: number;
  /** Comment line sent on idle event streams so proxies keep them open (at most half the idle timeout). */
  keepAliveMs?: number;
  /** /peers, /stats, /metrics and the snapshot are rebuilt at most this often. */
  cacheMs?: number;
  /** Window of the registrations-per-second figure. */
  rateWindowSeconds?: number;
  /** Largest mesh for which the event stream carries individual greeted pairs (the page's matrix). */
  matrixLimit?: number;
}

export interface StatusServer {
  /** Where a browser on this machine reaches the page. */
  readonly url: string;
  readonly port: number;
  /** Open event streams. */
  clients(): number;
  /** Open HTTP connections (admitted by the gate). */
  connections(): number;
  stop(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

export const STATUS_DEFAULTS = {
  ...HTTP_LIMITS,
  keepAliveMs: 15_000,
  cacheMs: 250,
  rateWindowSeconds: 10,
  matrixLimit: 128,
  maxClientBacklogBytes: HTTP_LIMITS.streamBacklogBytes,
  /** Joins and leaves a new page gets so its log is not empty. */
  logLength: 100,
} as const;

type Settings = ReturnType<typeof settingsOf>;

function settingsOf(options: StatusServerOptions) {
  const d = STATUS_DEFAULTS;
  const idleTimeoutMs = options.idleTimeoutMs ?? d.idleTimeoutMs;
  const streamBudgetBytes = options.streamBudgetBytes ?? d.streamBudgetBytes;
  return {
    port: options.port ?? 0,
    host: options.host ?? "::",
    transport: options.transport ?? tcp,
    maxConns: options.maxConns ?? d.maxConns,
    maxConnsPerAddress: options.maxConnsPerAddress ?? d.maxConnsPerAddress,
    requestTimeoutMs: options.requestTimeoutMs ?? d.requestTimeoutMs,
    idleTimeoutMs,
    maxStreams: options.maxStreams ?? d.maxStreams,
    streamBudgetBytes,
    maxClientBacklogBytes: Math.min(options.maxClientBacklogBytes ?? d.maxClientBacklogBytes, streamBudgetBytes),
    // A keep-alive must come before the idle timeout, or quiet streams would be cut.
    keepAliveMs: Math.min(options.keepAliveMs ?? d.keepAliveMs, idleTimeoutMs / 2),
    cacheMs: options.cacheMs ?? d.cacheMs,
    rateWindowSeconds: Math.max(1, Math.round(options.rateWindowSeconds ?? d.rateWindowSeconds)),
    matrixLimit: options.matrixLimit ?? d.matrixLimit,
  };
}

/** Starts the status server for a running registry. Throws (EADDRINUSE, ...) if it cannot listen. */
export function startStatusServer(registry: Registry, options: StatusServerOptions = {}): StatusServer {
  const o = settingsOf(options);
  const rate = new JoinRate(o.rateWindowSeconds);
  // The caches compare these counts: any registry event may change the figures and the page's
  // picture; only joins and leaves change the list (greetings come by the thousand while a mesh forms),
  // and a shared store coming back (the list was rebuilt from it).
  let changes = 0;
  let listChanges = 0;
  const version = () => changes;
  const feed = new PageFeed(registry, o, version);
  const unsubscribe = registry.subscribe((e) => {
    changes++;
    if (e.event === "node-registered" || e.event === "node-left" || e.event === "stopped" || e.event === "store") listChanges++;
    if (e.event === "node-registered") rate.count();
    feed.onEvent(e);
  });
  let gate: ReturnType<typeof serveGated> | undefined;
  const figures = new Throttled<Figures>(
    () => ({ s: registry.stats(), boot: registry.boot, rate: rate.perSecond(), window: o.rateWindowSeconds, feed: feed.stats(), gate: gate?.stats() ?? NO_GATE }),
    version,
    o.cacheMs,
  );
  const peers = new Throttled(() => {
    const list = registry.nodes().map(peerJson);
    return encoder.encode(jsonText({ count: list.length, peers: list }));
  }, () => listChanges, o.cacheMs);
  const handle = route(registry, feed, figures, peers);
  try {
    gate = serveGated({ ...o, fetch: handle, error: (e) => json({ error: `internal error: ${e.message}` }, 500) });
  } catch (e) {
    unsubscribe();
    feed.close();
    throw e;
  }
  const g = gate;
  const bound = normalizeHost(o.host);
  const urlHost = bound === "::" || bound === "0.0.0.0" || bound === "localhost" ? "127.0.0.1" : bound;

  let stopped: Promise<void> | undefined;
  return {
    url: `${o.transport.encrypted ? "https" : "http"}://${formatAddress(urlHost, g.port)}/`,
    port: g.port,
    clients: () => feed.size,
    connections: () => g.stats().open,
    stop() {
      stopped ??= (async () => {
        unsubscribe();
        feed.close();
        await g.stop();
      })();
      return stopped;
    },
    [Symbol.asyncDispose]() {
      return this.stop();
    },
  };
}

/** The request handler: which endpoint answers, from which cache. */
function route(registry: Registry, feed: PageFeed, figures: Throttled<Figures>, peers: Throttled<Uint8Array<ArrayBuffer>>) {
  return (req: Request, srv: Bun.Server<undefined>): Response | Promise<Response> => {
    if (req.method !== "GET" && req.method !== "HEAD") {
      return json({ error: `method ${req.method} not allowed` }, 405, { Allow: "GET, HEAD" });
    }
    const path = new URL(req.url).pathname;
    switch (path) {
      case "/":
      case "/index.html":
        return new Response(PAGE, { headers: PAGE_HEADERS });
      case "/events":
        srv.timeout(req, 0); // a quiet stream is not an idle connection (the gate keeps the time)
        return feed.open(req);
      case "/peers":
        return then(peers.get(), (body) => new Response(body, { headers: JSON_HEADERS }));
      case "/stats":
        return then(figures.get(), (f) => json(statsJson(f)));
      case "/metrics":
        return then(figures.get(), (f) => new Response(metricsText(f), { headers: METRICS_HEADERS }));
      case "/healthz": {
        // Never waits: the running state is live, the node count at most one cache interval old.
        if (!feed.running) return json({ status: "stopped", boot: registry.boot }, 503);
        // Degraded (the shared store out of reach) is still healthy: this registry serves its own
        // nodes, and restarting it would only throw their sessions away.
        const s = figures.latest().s;
        return json({ status: s.store === "ok" ? "ok" : "degraded", boot: registry.boot, registry: s.registry, nodes: s.nodes, sessions: s.sessions });
      }
      default:
        return json({ error: `no such endpoint: ${path}`, endpoints: ENDPOINTS }, 404);
    }
  };
}

function then<T, R>(value: T | Promise<T>, fn: (v: T) => R): R | Promise<R> {
  return value instanceof Promise ? value.then(fn) : fn(value);
}

// --- internal ----------------------------------------------------------------

/**
 * A value built from the registry's state at most once per `intervalMs`.
 * While nothing changed (`version`) and it is younger than the interval, it
 * is served as is; if something changed sooner, callers wait for the next
 * slot and share one build. So a loop of requests costs one build per
 * interval, and no answer predates its request.
 */
class Throttled<T> {
  private value: T | undefined;
  private builtVersion = -1;
  private builtAt = -Infinity;
  private next: Promise<T> | undefined;

  constructor(
    private readonly build: () => T,
    private readonly version: () => number,
    private readonly intervalMs: number,
  ) {}

  get(): T | Promise<T> {
    const now = performance.now();
    const age = now - this.builtAt;
    if (this.value !== undefined && this.builtVersion === this.version() && age < this.intervalMs) return this.value;
    if (age >= this.intervalMs) return this.rebuild(now);
    this.next ??= new Promise<T>((resolve, reject) => {
      setTimeout(() => {
        this.next = undefined;
        try {
          resolve(this.get()); // another caller may have rebuilt meanwhile
        } catch (e) {
          reject(e);
        }
      }, this.intervalMs - age);
    });
    return this.next;
  }

  /** Without waiting: the last value while it is younger than the interval, else a new one. */
  latest(): T {
    const now = performance.now();
    if (this.value === undefined || now - this.builtAt >= this.intervalMs) return this.rebuild(now);
    return this.value;
  }

  private rebuild(now: number): T {
    this.builtVersion = this.version();
    this.value = this.build();
    this.builtAt = now;
    return this.value;
  }
}

/** Bytes an event stream hands the HTTP server at a time: what it holds beyond that stays here, counted. */
const SLICE_BYTES = 64 * 1024;

interface Client {
  controller: ReadableStreamDefaultController<Uint8Array>;
  open: boolean;
  /** Bytes not yet handed to the HTTP server, in slices of at most SLICE_BYTES. */
  queue: Uint8Array[];
  queued: number;
  /** Ended: the stream closes once its queue has been handed on. */
  closing?: boolean;
}

/**
 * The live page's feed: Server-Sent Events to every open page. A new page
 * gets a snapshot, then the registry's events of each loop turn as one chunk,
 * followed by the counts they lead to. Below the matrix limit the stream
 * carries individual greeted pairs; crossing it either way resends the picture.
 *
 * Each stream hands Bun one slice at a time, when Bun asks (`pull`); the rest
 * waits in the client's own queue, so what a page that does not read costs is
 * counted exactly: over its backlog cap, or over the budget of all streams
 * (furthest behind first), it is dropped and its queue freed.
 */
class PageFeed {
  running = true;
  private readonly clients = new Set<Client>();
  /** Clients waiting for the next snapshot build (one per cache interval). */
  private readonly waiting = new Set<Client>();
  private waitTimer: Timer | undefined;
  private snap: { bytes: Uint8Array; version: number; at: number } | undefined;
  private readonly counts = { refused: 0, dropped: 0 };
  private readonly log: LogEntry[] = [];
  /** Leave events carry only the id; the page and the log want the name too. */
  private readonly names = new Map<string, string>();
  private detailed: boolean;
  private pending: string[] = [];
  private resnapshot = false;
  private countsDirty = false;
  private flushScheduled = false;
  private readonly stopKeepAlive: () => void;
  /** Each listed node's number, in join order, never reused: the page's rows and columns, the same in every tab. */
  private readonly numbers = new Map<string, number>();
  private nextNumber = 1;

  constructor(
    private readonly registry: Registry,
    private readonly o: Settings,
    private readonly version: () => number,
  ) {
    const nodes = registry.nodes().sort((a, b) => a.joinedAt - b.joinedAt);
    for (const n of nodes) {
      if (n.name) this.names.set(n.id, n.name);
      this.numberOf(n.id);
    }
    this.detailed = nodes.length <= o.matrixLimit;
    const keepAlive = setInterval(() => this.broadcast(KEEP_ALIVE), o.keepAliveMs);
    keepAlive.unref();
    this.stopKeepAlive = () => clearInterval(keepAlive);
  }

  get size(): number {
    return this.clients.size;
  }

  stats(): FeedStats {
    let queued = 0;
    for (const c of this.clients) queued += c.queued;
    return { streams: this.clients.size, queued, refused: this.counts.refused, dropped: this.counts.dropped };
  }

  /** A new event stream: the response for GET /events. */
  open(req: Request): Response {
    if (this.running && this.clients.size + this.waiting.size >= this.o.maxStreams) {
      this.counts.refused++;
      return json({ error: `too many event streams (${this.o.maxStreams}); retry later` }, 503, { "Retry-After": "5" });
    }
    let client: Client | undefined;
    const stream = new ReadableStream<Uint8Array>(
      {
        start: (controller) => {
          client = { controller, open: true, queue: [], queued: 0 };
          if (!this.running) {
            controller.enqueue(encoder.encode(`retry: 2000\n\n${sse("stopped", { boot: this.registry.boot })}`));
            controller.close();
            client.open = false;
            return;
          }
          this.admit(client);
        },
        pull: () => {
          if (client) this.pump(client);
        },
        cancel: () => {
          if (client) this.discard(client);
        },
      },
      { highWaterMark: SLICE_BYTES, size: (chunk) => chunk?.byteLength ?? 0 },
    );
    req.signal.addEventListener("abort", () => client && this.discard(client), { once: true });
    return new Response(stream, {
      headers: {
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-store",
        "X-Accel-Buffering": "no", // nginx: do not hold events back
      },
    });
  }
  onEvent(e: RegistryEvent): void {
    switch (e.event) {
      case "node-registered": {
        const at = new Date().toISOString();
        const address = formatAddress(e.host, e.port);
        const node = { id: e.id, number: this.numberOf(e.id), name: e.name, host: e.host, port: e.port, address, source: e.source, registry: e.registry, joinedAt: at };
        if (node.name) this.names.set(node.id, node.name);
        else this.names.delete(node.id);
        this.remember({ kind: "join", at, id: node.id, name: node.name, address: node.address });
        this.membership(e.nodes);
        return this.queue(sse("join", { node, nodes: e.nodes }));
      }
      case "node-left": {
        const name = this.names.get(e.id);
        this.names.delete(e.id);
        this.numbers.delete(e.id); // a gap in the numbering; one that comes back is a new row
        const entry: LogEntry = { kind: "leave", at: new Date().toISOString(), id: e.id, name, reason: e.reason };
        this.remember(entry);
        this.membership(e.nodes);
        return this.queue(sse("leave", { ...entry, nodes: e.nodes }));
      }
      case "pair-greeted":
        if (this.detailed) return this.queue(sse("pair", { a: e.a, b: e.b }));
        this.countsDirty = true; // the counts still change
        return this.scheduleFlush();
      case "mesh-complete": {
        const entry: LogEntry = { kind: "mesh", at: new Date().toISOString(), nodes: e.nodes, pairs: e.pairs, ms: e.ms };
        this.remember(entry);
        return this.queue(sse("mesh-complete", entry));
      }
      case "stopped": {
        this.running = false;
        this.flush();
        const last = encoder.encode(sse("stopped", { boot: this.registry.boot }));
        for (const c of [...this.clients, ...this.waiting]) {
          this.send(c, last);
          this.end(c);
        }
        return;
      }
    }
  }

  close(): void {
    this.stopKeepAlive();
    clearTimeout(this.waitTimer);
    for (const c of [...this.clients, ...this.waiting]) this.end(c);
  }

  /**
   * Starts a new client with a snapshot: the cached one while nothing has
   * changed since it was built, else a new one, built at most once per cache
   * interval; clients that come sooner wait for it together.
   */
  private admit(c: Client): void {
    const now = performance.now();
    const snap = this.snap;
    if (snap && snap.version === this.version() && now - snap.at < this.o.cacheMs) return this.join(c, snap.bytes);
    if (!snap || now - snap.at >= this.o.cacheMs) return this.join(c, this.freshSnapshot());
    this.waiting.add(c);
    this.waitTimer ??= setTimeout(() => {
      this.waitTimer = undefined;
      const waiting = [...this.waiting];
      this.waiting.clear();
      for (const w of waiting) if (w.open) this.admit(w);
    }, snap.at + this.o.cacheMs - now);
  }

  private join(c: Client, snapshot: Uint8Array): void {
    this.clients.add(c);
    this.send(c, snapshot);
    this.trim();
  }

  /** Builds the snapshot after sending what happened before it (it contains that already) to the existing clients. */
  private freshSnapshot(): Uint8Array {
    this.flush();
    const bytes = encoder.encode(`retry: 2000\n\n${sse("snapshot", this.snapshot())}`);
    this.snap = { bytes, version: this.version(), at: performance.now() };
    return bytes;
  }

  /** Crossing the matrix limit either way changes what the stream carries: resend the whole picture. */
  private membership(nodes: number): void {
    const detailed = nodes <= this.o.matrixLimit;
    if (detailed !== this.detailed) {
      this.detailed = detailed;
      this.resnapshot = true;
    }
  }

  private remember(entry: LogEntry): void {
    this.log.push(entry);
    if (this.log.length > STATUS_DEFAULTS.logLength) this.log.shift();
  }

  private queue(text: string): void {
    this.pending.push(text);
    this.countsDirty = true;
    this.scheduleFlush();
  }

  private scheduleFlush(): void {
    if (this.flushScheduled) return;
    if (!this.clients.size) return this.forget();
    this.flushScheduled = true;
    setImmediate(() => this.flush());
  }

  /** With nobody listening, a new client's snapshot will carry everything anyway. */
  private forget(): void {
    this.pending = [];
    this.resnapshot = false;
    this.countsDirty = false;
  }

  private flush(): void {
    this.flushScheduled = false;
    if (!this.clients.size) return this.forget();
    const parts = this.pending;
    this.pending = [];
    if (this.resnapshot) parts.push(sse("snapshot", this.snapshot()));
    else if (this.countsDirty) parts.push(sse("counts", counts(this.registry.stats())));
    this.resnapshot = this.countsDirty = false;
    if (parts.length) this.broadcast(encoder.encode(parts.join("")));
  }

  /** One buffer for every client (each holds views of it, not copies). */
  private broadcast(bytes: Uint8Array): void {
    for (const c of this.clients) this.send(c, bytes);
    this.trim();
  }

  private send(c: Client, bytes: Uint8Array): void {
    if (!c.open) return;
    for (let at = 0; at < bytes.byteLength; at += SLICE_BYTES) c.queue.push(bytes.subarray(at, at + SLICE_BYTES));
    c.queued += bytes.byteLength;
    // A client that stopped reading would make us hold every event for it.
    if (c.queued > this.o.maxClientBacklogBytes) return this.cut(c);
    this.pump(c);
  }

  /** Hands queued slices to Bun while its stream wants more (it asks again through `pull`). */
  private pump(c: Client): void {
    try {
      while (c.queue.length && (c.controller.desiredSize ?? 0) > 0) {
        const slice = c.queue.shift()!;
        c.queued -= slice.byteLength;
        c.controller.enqueue(slice);
      }
      if (c.closing && !c.queue.length) c.controller.close();
    } catch {
      this.discard(c); // the other side closed the stream
    }
  }

  /** Keeps the unsent bytes of all streams within the budget: the streams furthest behind go first. */
  private trim(): void {
    let total = 0;
    for (const c of this.clients) total += c.queued;
    if (total <= this.o.streamBudgetBytes) return;
    for (const c of [...this.clients].sort((a, b) => b.queued - a.queued)) {
      if (total <= this.o.streamBudgetBytes) return;
      total -= c.queued;
      this.cut(c);
    }
  }

  /** Drops a slow client: its queue is freed now; the page reconnects to a fresh snapshot once it reads again. */
  private cut(c: Client): void {
    this.counts.dropped++;
    c.queue = [];
    c.queued = 0;
    this.end(c);
  }

  /** Closes a stream once what is queued for it has been handed on. */
  private end(c: Client): void {
    if (!c.open) return;
    this.drop(c);
    c.closing = true;
    this.pump(c);
  }

  private drop(c: Client): void {
    c.open = false;
    this.clients.delete(c);
    this.waiting.delete(c);
  }

  /** The client is gone: nothing more is sent, nothing kept. */
  private discard(c: Client): void {
    this.drop(c);
    c.queue = [];
    c.queued = 0;
    c.closing = false;
  }

  /** A node's number: kept while it is listed (registering again included), the next one for a newcomer. */
  private numberOf(id: string): number {
    let n = this.numbers.get(id);
    if (n === undefined) this.numbers.set(id, (n = this.nextNumber++));
    return n;
  }

  private snapshot() {
    const nodes = this.registry.nodes().sort((a, b) => a.joinedAt - b.joinedAt);
    return {
      boot: this.registry.boot,
      nodes: nodes.map((n) => ({ ...peerJson(n), number: this.numberOf(n.id) })),
      // The pair list grows with the square of the mesh: only below the matrix limit.
      pairs: nodes.length <= this.o.matrixLimit ? this.registry.pairs() : null,
      matrixLimit: this.o.matrixLimit,
      log: this.log,
      counts: counts(this.registry.stats()),
    };
  }
}

/**
 * Registrations per whole second in a ring: constant work per join even at
 * thousands of joins per second (a list of timestamps would not be).
 */
class JoinRate {
  private readonly counts: Float64Array;
  private readonly seconds: Float64Array;
  private readonly startedAt = performance.now();

  constructor(private readonly window: number) {
    this.counts = new Float64Array(window);
    this.seconds = new Float64Array(window).fill(-Infinity);
  }

  count(): void {
    const second = Math.floor(performance.now() / 1000);
    const i = second % this.window;
    if (this.seconds[i] !== second) {
      this.seconds[i] = second;
      this.counts[i] = 0;
    }
    this.counts[i]!++;
  }

  /** Joins in the current second and the window's previous whole seconds, per second. */
  perSecond(): number {
    const now = performance.now();
    const second = Math.floor(now / 1000);
    let joins = 0;
    for (let i = 0; i < this.window; i++) if (this.seconds[i]! > second - this.window) joins += this.counts[i]!;
    // Until the server has run a full window, average over the time it has run.
    const seconds = Math.max(1, Math.min(this.window, (now - this.startedAt) / 1000));
    return Math.round((joins / seconds) * 1000) / 1000;
  }
}

/** What /stats and /metrics report. */
interface Figures {
  s: RegistryStats;
  boot: string;
  /** Registrations per second over the last `window` seconds. */
  rate: number;
  window: number;
  feed: FeedStats;
  gate: GateStats;
}

interface FeedStats {
  /** Open event streams. */
  streams: number;
  /** Bytes the open streams hold that the HTTP server has not taken yet (at most the stream budget). */
  queued: number;
  /** Event streams refused over the stream cap. */
  refused: number;
  /** Event streams dropped for falling behind (over their backlog cap or the budget of all streams). */
  dropped: number;
}

const NO_GATE: GateStats = { open: 0, refused: 0, requestTimeouts: 0, idleTimeouts: 0 };

function counts(s: RegistryStats) {
  return {
    nodes: s.nodes,
    joins: s.joins,
    leaves: sum(Object.values(s.leaves)),
    pairsGreeted: s.pairsGreeted,
    pairsExpected: s.pairsExpected,
    complete: s.pairsGreeted >= s.pairsExpected,
    timeToFullMeshMs: s.meshCompleteMs,
  };
}

function statsJson({ s, boot, rate, window, feed, gate }: Figures) {
  return {
    boot,
    startedAt: new Date(s.startedAt).toISOString(),
    uptimeSeconds: Math.round((Date.now() - s.startedAt) / 1000),
    nodes: s.nodes,
    joins: s.joins,
    leaves: s.leaves,
    rejected: s.rejected,
    registrationsPerSecond: rate,
    registrationsPerSecondWindowSeconds: window,
    registrationLatencyMs: s.latencyMs,
    mesh: {
      pairsGreeted: s.pairsGreeted,
      pairsExpected: s.pairsExpected,
      complete: s.pairsGreeted >= s.pairsExpected,
      timeToFullMeshMs: s.meshCompleteMs,
    },
    seq: s.seq,
    registry: s.registry,
    sessions: s.sessions,
    store: s.store,
    ...(s.storeError ? { storeError: s.storeError } : {}),
    statusClients: feed.streams,
    unsentBytes: s.unsentBytes,
    maxUnsentBytes: s.maxUnsentBytes,
    coalescedSyncs: s.coalescedSyncs,
    authFailures: s.authFailures,
    authBlocked: s.authBlocked,
    stalledMs: s.stalledMs,
    statusServer: {
      connections: gate.open,
      refused: gate.refused,
      requestTimeouts: gate.requestTimeouts,
      idleTimeouts: gate.idleTimeouts,
      streams: feed.streams,
      streamBytesQueued: feed.queued,
      streamsRefused: feed.refused,
      streamsDropped: feed.dropped,
    },
  };
}

function metricsText({ s, boot, rate, window, feed, gate }: Figures): string {
  const out: string[] = [];
  const family = (name: string, type: string, help: string, samples: [string, Record<string, string>, number][]) => {
    out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
    for (const [sample, labels, value] of samples) out.push(`${sample}${labelText(labels)} ${numberText(value)}`);
  };
  const one = (name: string, type: string, help: string, value: number, labels: Record<string, string> = {}) =>
    family(name, type, help, [[name, labels, value]]);
  const p = "contact_registry";
  one(`${p}_info`, "gauge", "Always 1; the boot label changes on every registry start.", 1, { boot });
  one(`${p}_start_time_seconds`, "gauge", "Unix time the registry started.", s.startedAt / 1000);
  one(`${p}_nodes`, "gauge", "Nodes registered now (with a shared store: on every registry).", s.nodes);
  one(`${p}_sessions`, "gauge", "Registered sessions this registry holds.", s.sessions, { registry: s.registry });
  one(`${p}_store_degraded`, "gauge", "1 while the shared store is out of reach and this registry serves its own nodes alone, else 0.", s.store === "ok" ? 0 : 1);
  one(`${p}_joins_total`, "counter", "Registrations accepted since start.", s.joins);
  family(
    `${p}_leaves_total`,
    "counter",
    "Nodes removed from the list since start, by reason.",
    Object.entries(s.leaves).map(([reason, n]) => [`${p}_leaves_total`, { reason }, n]),
  );
  family(
    `${p}_rejected_total`,
    "counter",
    "Protocol errors sent to connections since start, by error code.",
    Object.entries(s.rejected).map(([code, n]) => [`${p}_rejected_total`, { code }, n ?? 0]),
  );
  one(`${p}_registrations_per_second`, "gauge", `Registrations per second over the last ${window} seconds.`, rate);
  const lat = s.latencyMs;
  family(`${p}_registration_latency_seconds`, "summary", "Time from a register message to the registered reply (quantiles over the last 4096).", [
    [`${p}_registration_latency_seconds`, { quantile: "0.5" }, seconds(lat.p50)],
    [`${p}_registration_latency_seconds`, { quantile: "0.9" }, seconds(lat.p90)],
    [`${p}_registration_latency_seconds`, { quantile: "0.99" }, seconds(lat.p99)],
    [`${p}_registration_latency_seconds_sum`, {}, seconds(lat.sum)],
    [`${p}_registration_latency_seconds_count`, {}, lat.count],
  ]);
  one(`${p}_pairs_greeted`, "gauge", "Pairs of live nodes that have greeted each other.", s.pairsGreeted);
  one(`${p}_pairs_expected`, "gauge", "Pairs of live nodes: n*(n-1)/2.", s.pairsExpected);
  one(`${p}_mesh_complete`, "gauge", "1 when every pair of live nodes has greeted, else 0.", s.pairsGreeted >= s.pairsExpected ? 1 : 0);
  one(
    `${p}_time_to_full_mesh_seconds`,
    "gauge",
    "Time from the last join until every pair had greeted; NaN while the mesh is incomplete.",
    s.meshCompleteMs === null ? NaN : seconds(s.meshCompleteMs),
  );
  one(`${p}_status_clients`, "gauge", "Open event streams of the status page.", feed.streams);
  one(`${p}_status_stream_bytes_queued`, "gauge", "Bytes the event streams hold that have not been sent yet.", feed.queued);
  one(`${p}_status_clients_dropped_total`, "counter", "Event streams dropped for falling behind (over their backlog cap or the budget of all streams).", feed.dropped);
  one(`${p}_http_connections`, "gauge", "Open connections to the status server.", gate.open);
  family(`${p}_http_refused_total`, "counter", "Status-server connections refused over a connection cap, and event streams over the stream cap.", [
    [`${p}_http_refused_total`, { what: "connection" }, gate.refused],
    [`${p}_http_refused_total`, { what: "stream" }, feed.refused],
  ]);
  family(`${p}_http_timeouts_total`, "counter", "Status-server connections closed because a request head came too slowly, or nothing moved.", [
    [`${p}_http_timeouts_total`, { kind: "request" }, gate.requestTimeouts],
    [`${p}_http_timeouts_total`, { kind: "idle" }, gate.idleTimeouts],
  ]);
  one(`${p}_unsent_bytes`, "gauge", "Bytes queued for connections that have not read them yet (shared buffers counted once).", s.unsentBytes);
  one(`${p}_unsent_bytes_budget`, "gauge", "The most unsent bytes all connections may hold together; 0 = no budget.", s.maxUnsentBytes);
  one(`${p}_coalesced_syncs_total`, "counter", "sync requests answered by a snapshot already on its way.", s.coalescedSyncs);
  one(`${p}_auth_failures_total`, "counter", "Registrations and list requests with a missing or wrong token.", s.authFailures);
  one(`${p}_auth_blocked_total`, "counter", "Registrations and list requests refused because their address sent too many wrong tokens.", s.authBlocked);
  one(`${p}_stalled_seconds_total`, "counter", "Time the registry's own event loop was stalled, left out of every deadline.", s.stalledMs / 1000);
  return out.join("\n") + "\n";
}

type LogEntry =
  | { kind: "join"; at: string; id: string; name?: string; address: string }
  | { kind: "leave"; at: string; id: string; name?: string; reason: LeaveReason }
  | { kind: "mesh"; at: string; nodes: number; pairs: number; ms: number };

const ENDPOINTS = ["/", "/events", "/peers", "/stats", "/metrics", "/healthz"];
const PAGE = pageSource as unknown as string;
const encoder = new TextEncoder();
const KEEP_ALIVE = encoder.encode(": keep-alive\n\n");

// The page's one inline script is allowed by its hash, so nothing else can run there.
const PAGE_HEADERS = {
  "Content-Type": "text/html; charset=utf-8",
  "Cache-Control": "no-store",
  "X-Content-Type-Options": "nosniff",
  "Content-Security-Policy": [
    "default-src 'none'",
    `script-src ${scriptHashes(PAGE)}`,
    "style-src 'unsafe-inline'",
    "connect-src 'self'",
    "img-src 'self' data:",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
  ].join("; "),
};

function scriptHashes(html: string): string {
  const hashes = Array.from(html.matchAll(/<script>([\s\S]*?)<\/script>/g), (m) => {
    return `'sha256-${createHash("sha256").update(m[1]!).digest("base64")}'`;
  });
  return hashes.length ? hashes.join(" ") : "'none'";
}

function peerJson(n: NodeInfo) {
  return {
    id: n.id,
    ...(n.name ? { name: n.name } : {}),
    address: formatAddress(n.host, n.port),
    host: n.host,
    port: n.port,
    source: n.source,
    registry: n.registry,
    joinedAt: new Date(n.joinedAt).toISOString(),
  };
}

const JSON_HEADERS = { "Content-Type": "application/json; charset=utf-8", "Cache-Control": "no-store" };
const METRICS_HEADERS = { "Content-Type": "text/plain; version=0.0.4; charset=utf-8", "Cache-Control": "no-store" };

function json(body: unknown, status = 200, headers: Record<string, string> = {}): Response {
  return new Response(jsonText(body), { status, headers: { ...JSON_HEADERS, ...headers } });
}

function jsonText(body: unknown): string {
  return JSON.stringify(body, null, 2) + "\n";
}

function sse(event: string, data: unknown): string {
  return `event: ${event}\ndata: ${JSON.stringify(data)}\n\n`;
}

/** Milliseconds (kept to the microsecond) as seconds, without binary-fraction noise like 0.0011240000000000002. */
function seconds(ms: number): number {
  return Math.round(ms * 1000) / 1e6;
}

function sum(values: number[]): number {
  return values.reduce((a, b) => a + b, 0);
}

function labelText(labels: Record<string, string>): string {
  const entries = Object.entries(labels);
  if (!entries.length) return "";
  const esc = (v: string) => v.replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/"/g, '\\"');
  return `{${entries.map(([k, v]) => `${k}="${esc(v)}"`).join(",")}}`;
}

function numberText(n: number): string {
  if (Number.isNaN(n)) return "NaN";
  if (n === Infinity) return "+Inf";
  if (n === -Infinity) return "-Inf";
  return String(n);
}
