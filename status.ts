/**
 * The registry's optional HTTP side (`--http <port>`): a JSON and Prometheus
 * status API and one live page that shows the mesh forming. Built on
 * Bun.serve; it only reads the registry through its public handle, so a slow
 * or broken browser can never disturb the registry's TCP sessions.
 *
 *   GET /         the live page (status.html)
 *   GET /events   Server-Sent Events: a snapshot, then joins, leaves and greeted pairs
 *   GET /peers    JSON: the live nodes
 *   GET /stats    JSON: counters, latency percentiles, mesh completeness
 *   GET /metrics  the same figures in the Prometheus text format
 *   GET /healthz  200 while the registry runs, 503 once it stopped
 */
import { createHash } from "node:crypto";
import type { LeaveReason } from "./protocol.ts";
import { formatAddress, normalizeHost, serveHttp } from "./net.ts";
import type { NodeInfo, Registry, RegistryEvent, RegistryStats } from "./registry.ts";
// A text import is part of the module graph: it works from any cwd, in the
// Docker image and in a `bun build --compile` binary alike.
import pageSource from "./status.html" with { type: "text" };

export interface StatusServerOptions {
  /** 0 lets the OS pick. */
  port?: number;
  /** `::` (all interfaces, falling back to 0.0.0.0), an IP, or `localhost` (= 127.0.0.1). */
  host?: string;
  /** Comment line sent on idle event streams so proxies keep them open. */
  keepAliveMs?: number;
  /** Window of the registrations-per-second figure. */
  rateWindowSeconds?: number;
  /** Largest mesh for which the event stream carries individual greeted pairs (the page's matrix). */
  matrixLimit?: number;
  /** Unsent bytes an event-stream client may fall behind by before it is dropped (it reconnects to a fresh snapshot). */
  maxClientBacklogBytes?: number;
}

export interface StatusServer {
  /** Where a browser on this machine reaches the page. */
  readonly url: string;
  readonly port: number;
  /** Open event streams. */
  clients(): number;
  stop(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

export const STATUS_DEFAULTS = {
  keepAliveMs: 15_000,
  rateWindowSeconds: 10,
  matrixLimit: 64,
  maxClientBacklogBytes: 8 * 1024 * 1024,
  /** Joins and leaves a new page gets so its log is not empty. */
  logLength: 100,
} as const;

/** Starts the status server for a running registry. Throws (EADDRINUSE, ...) if it cannot listen. */
export function startStatusServer(registry: Registry, options: StatusServerOptions = {}): StatusServer {
  const o = {
    port: options.port ?? 0,
    host: options.host ?? "::",
    keepAliveMs: options.keepAliveMs ?? STATUS_DEFAULTS.keepAliveMs,
    rateWindowSeconds: Math.max(1, Math.round(options.rateWindowSeconds ?? STATUS_DEFAULTS.rateWindowSeconds)),
    matrixLimit: options.matrixLimit ?? STATUS_DEFAULTS.matrixLimit,
    maxClientBacklogBytes: options.maxClientBacklogBytes ?? STATUS_DEFAULTS.maxClientBacklogBytes,
  };
  const rate = new JoinRate(o.rateWindowSeconds);
  const feed = new PageFeed(registry, o);
  const unsubscribe = registry.subscribe((e) => {
    if (e.event === "node-registered") rate.count();
    feed.onEvent(e);
  });
  const figures = (): Figures => ({ s: registry.stats(), boot: registry.boot, rate: rate.perSecond(), window: o.rateWindowSeconds, clients: feed.size });

  const handle = (req: Request, srv: Bun.Server<undefined>): Response => {
    if (req.method !== "GET" && req.method !== "HEAD") {
      return json({ error: `method ${req.method} not allowed` }, 405, { Allow: "GET, HEAD" });
    }
    const path = new URL(req.url).pathname;
    switch (path) {
      case "/":
      case "/index.html":
        return new Response(PAGE, { headers: PAGE_HEADERS });
      case "/events":
        srv.timeout(req, 0); // a quiet stream is not an idle connection
        return feed.open(req);
      case "/peers": {
        const peers = registry.nodes().map(peerJson);
        return json({ count: peers.length, peers });
      }
      case "/stats":
        return json(statsJson(figures()));
      case "/metrics":
        return new Response(metricsText(figures()), {
          headers: { "Content-Type": "text/plain; version=0.0.4; charset=utf-8", "Cache-Control": "no-store" },
        });
      case "/healthz": {
        if (!feed.running) return json({ status: "stopped", boot: registry.boot }, 503);
        // Degraded (the shared store out of reach) is still healthy: this registry serves its own
        // nodes, and restarting it would only throw their sessions away.
        const s = registry.stats();
        return json({ status: s.store === "ok" ? "ok" : "degraded", boot: registry.boot, registry: s.registry, nodes: s.nodes, sessions: s.sessions });
      }
      default:
        return json({ error: `no such endpoint: ${path}`, endpoints: ENDPOINTS }, 404);
    }
  };

  let server: Bun.Server<undefined>;
  try {
    server = serveHttp(o.host, o.port, handle, (e) => json({ error: `internal error: ${e.message}` }, 500));
  } catch (e) {
    unsubscribe();
    feed.close();
    throw e;
  }
  const port = server.port ?? o.port;
  const bound = normalizeHost(server.hostname ?? o.host);
  const urlHost = bound === "::" || bound === "0.0.0.0" ? "127.0.0.1" : bound;

  let stopped: Promise<void> | undefined;
  const status: StatusServer = {
    url: `http://${formatAddress(urlHost, port)}/`,
    port,
    clients: () => feed.size,
    stop() {
      stopped ??= (async () => {
        unsubscribe();
        feed.close();
        await server.stop(true);
      })();
      return stopped;
    },
    [Symbol.asyncDispose]() {
      return this.stop();
    },
  };
  return status;
}

// --- internal ----------------------------------------------------------------

type Settings = { keepAliveMs: number; matrixLimit: number; maxClientBacklogBytes: number };

/**
 * The live page's feed: Server-Sent Events to every open page. A new page
 * gets a snapshot, then the registry's events of each loop turn as one chunk,
 * followed by the counts they lead to. Below the matrix limit the stream
 * carries individual greeted pairs; crossing it either way resends the picture.
 */
class PageFeed {
  running = true;
  private readonly clients = new Set<Client>();
  private readonly log: LogEntry[] = [];
  /** Leave events carry only the id; the page and the log want the name too. */
  private readonly names = new Map<string, string>();
  private detailed: boolean;
  private pending: string[] = [];
  private resnapshot = false;
  private countsDirty = false;
  private flushScheduled = false;
  private readonly stopKeepAlive: () => void;

  constructor(
    private readonly registry: Registry,
    private readonly o: Settings,
  ) {
    const nodes = registry.nodes();
    for (const n of nodes) if (n.name) this.names.set(n.id, n.name);
    this.detailed = nodes.length <= o.matrixLimit;
    const keepAlive = setInterval(() => {
      for (const c of this.clients) this.send(c, KEEP_ALIVE);
    }, o.keepAliveMs);
    keepAlive.unref();
    this.stopKeepAlive = () => clearInterval(keepAlive);
  }

  get size(): number {
    return this.clients.size;
  }

  /** A new event stream: the response for GET /events. */
  open(req: Request): Response {
    // Earlier events must reach existing clients before the snapshot below,
    // which already contains them, is handed to the new one.
    this.flush();
    let client: Client | undefined;
    const stream = new ReadableStream<Uint8Array>(
      {
        start: (controller) => {
          client = { controller, open: true };
          if (!this.running) {
            controller.enqueue(encoder.encode(`retry: 2000\n\n${sse("stopped", { boot: this.registry.boot })}`));
            controller.close();
            client.open = false;
            return;
          }
          this.clients.add(client);
          this.send(client, `retry: 2000\n\n${sse("snapshot", this.snapshot())}`);
        },
        cancel: () => {
          if (client) this.drop(client);
        },
      },
      { highWaterMark: 64 * 1024, size: (chunk) => chunk?.byteLength ?? 0 },
    );
    req.signal.addEventListener("abort", () => client && this.drop(client), { once: true });
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
        const node = { id: e.id, name: e.name, host: e.host, port: e.port, address: formatAddress(e.host, e.port), source: e.source, registry: e.registry, joinedAt: at };
        if (node.name) this.names.set(node.id, node.name);
        else this.names.delete(node.id);
        this.remember({ kind: "join", at, id: node.id, name: node.name, address: node.address });
        this.membership(e.nodes);
        return this.queue(sse("join", { node, nodes: e.nodes }));
      }
      case "node-left": {
        const name = this.names.get(e.id);
        this.names.delete(e.id);
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
      case "stopped":
        this.running = false;
        this.flush();
        for (const c of this.clients) {
          this.send(c, sse("stopped", { boot: this.registry.boot }));
          this.end(c);
        }
        return;
    }
  }

  close(): void {
    this.stopKeepAlive();
    for (const c of this.clients) this.end(c);
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
    if (!parts.length) return;
    const bytes = encoder.encode(parts.join(""));
    for (const c of this.clients) this.send(c, bytes);
  }

  private send(c: Client, data: string | Uint8Array): void {
    if (!c.open) return;
    try {
      c.controller.enqueue(typeof data === "string" ? encoder.encode(data) : data);
    } catch {
      return this.drop(c);
    }
    // A client that stopped reading would make us hold every event for it.
    const size = c.controller.desiredSize;
    if (size !== null && -size > this.o.maxClientBacklogBytes) this.end(c);
  }

  private end(c: Client): void {
    if (!c.open) return;
    this.drop(c);
    try {
      c.controller.close();
    } catch {
      // already closed by the other side
    }
  }

  private drop(c: Client): void {
    c.open = false;
    this.clients.delete(c);
  }

  private snapshot() {
    const nodes = this.registry.nodes().sort((a, b) => a.joinedAt - b.joinedAt);
    return {
      boot: this.registry.boot,
      nodes: nodes.map(peerJson),
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
  /** Open event streams. */
  clients: number;
}

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

function statsJson({ s, boot, rate, window, clients }: Figures) {
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
    statusClients: clients,
    unsentBytes: s.unsentBytes,
    maxUnsentBytes: s.maxUnsentBytes,
    coalescedSyncs: s.coalescedSyncs,
    authFailures: s.authFailures,
    authBlocked: s.authBlocked,
    stalledMs: s.stalledMs,
  };
}

function metricsText({ s, boot, rate, window, clients }: Figures): string {
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
  one(`${p}_status_clients`, "gauge", "Open event streams of the status page.", clients);
  one(`${p}_unsent_bytes`, "gauge", "Bytes queued for connections that have not read them yet (shared buffers counted once).", s.unsentBytes);
  one(`${p}_unsent_bytes_budget`, "gauge", "The most unsent bytes all connections may hold together; 0 = no budget.", s.maxUnsentBytes);
  one(`${p}_coalesced_syncs_total`, "counter", "sync requests answered by a snapshot already on its way.", s.coalescedSyncs);
  one(`${p}_auth_failures_total`, "counter", "Registrations with a missing or wrong token.", s.authFailures);
  one(`${p}_auth_blocked_total`, "counter", "Registrations refused because their address sent too many wrong tokens.", s.authBlocked);
  one(`${p}_stalled_seconds_total`, "counter", "Time the registry's own event loop was stalled, left out of every deadline.", s.stalledMs / 1000);
  return out.join("\n") + "\n";
}

interface Client {
  controller: ReadableStreamDefaultController<Uint8Array>;
  open: boolean;
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

function json(body: unknown, status = 200, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body, null, 2) + "\n", {
    status,
    headers: { "Content-Type": "application/json; charset=utf-8", "Cache-Control": "no-store", ...headers },
  });
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
