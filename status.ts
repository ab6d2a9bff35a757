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
import { type LeaveReason } from "./protocol.ts";
import { formatAddress, normalizeHost } from "./net.ts";
import { type EventRecord } from "./cli.ts";
import type { NodeInfo, Registry, RegistryStats } from "./registry.ts";
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
  const startedAt = performance.now();
  const clients = new Set<Client>();
  // Registrations per whole second in a ring: constant work per join even at
  // thousands of joins per second (a list of timestamps would not be).
  const joinCounts = new Float64Array(o.rateWindowSeconds);
  const joinSecond = new Float64Array(o.rateWindowSeconds).fill(-Infinity);
  const log: LogEntry[] = [];
  // Leave events carry only the id; the page and the log want the name too.
  const names = new Map<string, string>();
  for (const n of registry.nodes()) if (n.name) names.set(n.id, n.name);
  let running = true;
  let nodeCount = registry.nodes().length;
  let detailed = nodeCount <= o.matrixLimit;
  let pending: string[] = [];
  let resnapshot = false;
  let countsDirty = false;
  let flushScheduled = false;

  const unsubscribe = registry.subscribe(onRegistryEvent);

  const keepAlive = setInterval(() => {
    for (const c of clients) send(c, KEEP_ALIVE);
  }, o.keepAliveMs);
  keepAlive.unref();

  let server: ReturnType<typeof Bun.serve>;
  try {
    server = listen(o.host, o.port, handle);
  } catch (e) {
    unsubscribe();
    clearInterval(keepAlive);
    throw e;
  }
  const port = server.port ?? o.port;
  const bound = normalizeHost(server.hostname ?? o.host);
  const urlHost = bound === "::" || bound === "0.0.0.0" ? "127.0.0.1" : bound;
  const url = `http://${formatAddress(urlHost, port)}/`;

  function handle(req: Request, srv: Bun.Server<undefined>): Response {
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
        return openStream(req);
      case "/peers": {
        const peers = registry.nodes().map(peerJson);
        return json({ count: peers.length, peers });
      }
      case "/stats":
        return json(statsJson(registry.stats()));
      case "/metrics":
        return new Response(metricsText(registry.stats()), {
          headers: { "Content-Type": "text/plain; version=0.0.4; charset=utf-8", "Cache-Control": "no-store" },
        });
      case "/healthz":
        return running
          ? json({ status: "ok", boot: registry.boot, nodes: registry.stats().nodes })
          : json({ status: "stopped", boot: registry.boot }, 503);
      default:
        return json({ error: `no such endpoint: ${path}`, endpoints: ENDPOINTS }, 404);
    }
  }

  function openStream(req: Request): Response {
    // Earlier events must reach existing clients before the snapshot below,
    // which already contains them, is handed to the new one.
    flush();
    let client: Client | undefined;
    const stream = new ReadableStream<Uint8Array>(
      {
        start(controller) {
          client = { controller, open: true };
          if (!running) {
            controller.enqueue(encoder.encode(`retry: 2000\n\n${sse("stopped", { boot: registry.boot })}`));
            controller.close();
            client.open = false;
            return;
          }
          clients.add(client);
          send(client, `retry: 2000\n\n${sse("snapshot", snapshot())}`);
        },
        cancel() {
          if (client) drop(client);
        },
      },
      { highWaterMark: 64 * 1024, size: (chunk) => chunk?.byteLength ?? 0 },
    );
    req.signal.addEventListener("abort", () => client && drop(client), { once: true });
    return new Response(stream, {
      headers: {
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-store",
        "X-Accel-Buffering": "no", // nginx: do not hold events back
      },
    });
  }

  function onRegistryEvent(e: EventRecord): void {
    switch (e.event) {
      case "node-registered": {
        countJoin();
        const node = {
          id: String(e.id),
          name: typeof e.name === "string" ? e.name : undefined,
          host: String(e.host),
          port: Number(e.port),
          address: formatAddress(String(e.host), Number(e.port)),
          source: String(e.source),
          joinedAt: new Date().toISOString(),
        };
        if (node.name) names.set(node.id, node.name);
        else names.delete(node.id);
        remember({ kind: "join", at: node.joinedAt, id: node.id, name: node.name, address: node.address });
        membership(Number(e.nodes));
        queue(sse("join", { node, nodes: Number(e.nodes) }));
        return;
      }
      case "node-left": {
        const id = String(e.id);
        const reason = String(e.reason) as LeaveReason;
        const name = names.get(id);
        names.delete(id);
        const entry: LogEntry = { kind: "leave", at: new Date().toISOString(), id, name, reason };
        remember(entry);
        membership(Number(e.nodes));
        queue(sse("leave", { ...entry, nodes: Number(e.nodes) }));
        return;
      }
      case "pair-greeted":
        if (detailed) queue(sse("pair", { a: String(e.a), b: String(e.b) }));
        else {
          countsDirty = true; // the counts still change
          scheduleFlush();
        }
        return;
      case "mesh-complete": {
        const entry: LogEntry = { kind: "mesh", at: new Date().toISOString(), nodes: Number(e.nodes), pairs: Number(e.pairs), ms: Number(e.ms) };
        remember(entry);
        queue(sse("mesh-complete", entry));
        return;
      }
      case "stopped":
        running = false;
        flush();
        for (const c of clients) {
          send(c, sse("stopped", { boot: registry.boot }));
          close(c);
        }
        return;
    }
  }

  /** Crossing the matrix limit either way changes what the stream carries: resend the whole picture. */
  function membership(nodes: number): void {
    nodeCount = nodes;
    const nowDetailed = nodeCount <= o.matrixLimit;
    if (nowDetailed !== detailed) {
      detailed = nowDetailed;
      resnapshot = true;
    }
  }

  function remember(entry: LogEntry): void {
    log.push(entry);
    if (log.length > STATUS_DEFAULTS.logLength) log.shift();
  }

  function queue(text: string): void {
    pending.push(text);
    countsDirty = true;
    scheduleFlush();
  }

  function scheduleFlush(): void {
    if (flushScheduled) return;
    if (!clients.size) return forget();
    flushScheduled = true;
    setImmediate(flush);
  }

  /** With nobody listening, a new client's snapshot will carry everything anyway. */
  function forget(): void {
    pending = [];
    resnapshot = false;
    countsDirty = false;
  }

  /** Events of one loop turn go to every client as one chunk, followed by the counts they lead to. */
  function flush(): void {
    flushScheduled = false;
    if (!clients.size) return forget();
    const parts = pending;
    pending = [];
    if (resnapshot) parts.push(sse("snapshot", snapshot()));
    else if (countsDirty) parts.push(sse("counts", counts(registry.stats())));
    resnapshot = countsDirty = false;
    if (!parts.length) return;
    const bytes = encoder.encode(parts.join(""));
    for (const c of clients) send(c, bytes);
  }

  function send(c: Client, data: string | Uint8Array): void {
    if (!c.open) return;
    try {
      c.controller.enqueue(typeof data === "string" ? encoder.encode(data) : data);
    } catch {
      return drop(c);
    }
    // A client that stopped reading would make us hold every event for it.
    const size = c.controller.desiredSize;
    if (size !== null && -size > o.maxClientBacklogBytes) close(c);
  }

  function close(c: Client): void {
    if (!c.open) return;
    drop(c);
    try {
      c.controller.close();
    } catch {
      // already closed by the other side
    }
  }

  function drop(c: Client): void {
    c.open = false;
    clients.delete(c);
  }

  function snapshot() {
    const s = registry.stats();
    const nodes = registry.nodes().sort((a, b) => a.joinedAt - b.joinedAt);
    return {
      boot: registry.boot,
      nodes: nodes.map(peerJson),
      // The pair list grows with the square of the mesh: only below the matrix limit.
      pairs: nodes.length <= o.matrixLimit ? registry.pairs() : null,
      matrixLimit: o.matrixLimit,
      log,
      counts: counts(s),
    };
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

  function countJoin(): void {
    const second = Math.floor(performance.now() / 1000);
    const i = second % o.rateWindowSeconds;
    if (joinSecond[i] !== second) {
      joinSecond[i] = second;
      joinCounts[i] = 0;
    }
    joinCounts[i]!++;
  }

  /** Joins in the current second and the window's previous whole seconds, per second. */
  function registrationRate(): number {
    const now = performance.now();
    const second = Math.floor(now / 1000);
    let joins = 0;
    for (let i = 0; i < o.rateWindowSeconds; i++) if (joinSecond[i]! > second - o.rateWindowSeconds) joins += joinCounts[i]!;
    // Until the server has run a full window, average over the time it has run.
    const seconds = Math.max(1, Math.min(o.rateWindowSeconds, (now - startedAt) / 1000));
    return Math.round((joins / seconds) * 1000) / 1000;
  }

  function statsJson(s: RegistryStats) {
    return {
      boot: registry.boot,
      startedAt: new Date(s.startedAt).toISOString(),
      uptimeSeconds: Math.round((Date.now() - s.startedAt) / 1000),
      nodes: s.nodes,
      joins: s.joins,
      leaves: s.leaves,
      rejected: s.rejected,
      registrationsPerSecond: registrationRate(),
      registrationsPerSecondWindowSeconds: o.rateWindowSeconds,
      registrationLatencyMs: s.latencyMs,
      mesh: {
        pairsGreeted: s.pairsGreeted,
        pairsExpected: s.pairsExpected,
        complete: s.pairsGreeted >= s.pairsExpected,
        timeToFullMeshMs: s.meshCompleteMs,
      },
      seq: s.seq,
      statusClients: clients.size,
    };
  }

  function metricsText(s: RegistryStats): string {
    const out: string[] = [];
    const family = (name: string, type: string, help: string, samples: [string, Record<string, string>, number][]) => {
      out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
      for (const [sample, labels, value] of samples) out.push(`${sample}${labelText(labels)} ${numberText(value)}`);
    };
    const one = (name: string, type: string, help: string, value: number, labels: Record<string, string> = {}) =>
      family(name, type, help, [[name, labels, value]]);
    const p = "contact_registry";
    one(`${p}_info`, "gauge", "Always 1; the boot label changes on every registry start.", 1, { boot: registry.boot });
    one(`${p}_start_time_seconds`, "gauge", "Unix time the registry started.", s.startedAt / 1000);
    one(`${p}_nodes`, "gauge", "Nodes registered now.", s.nodes);
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
    one(
      `${p}_registrations_per_second`,
      "gauge",
      `Registrations per second over the last ${o.rateWindowSeconds} seconds.`,
      registrationRate(),
    );
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
    one(`${p}_status_clients`, "gauge", "Open event streams of the status page.", clients.size);
    return out.join("\n") + "\n";
  }

  let stopped: Promise<void> | undefined;
  const handle_: StatusServer = {
    url,
    port,
    clients: () => clients.size,
    stop() {
      stopped ??= (async () => {
        unsubscribe();
        clearInterval(keepAlive);
        for (const c of clients) close(c);
        await server.stop(true);
      })();
      return stopped;
    },
    [Symbol.asyncDispose]() {
      return this.stop();
    },
  };
  return handle_;
}

// --- internal ----------------------------------------------------------------

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

function listen(host: string, port: number, fetch: (req: Request, srv: Bun.Server<undefined>) => Response) {
  const h = normalizeHost(host);
  const serve = (hostname: string) => {
    try {
      return Bun.serve({
        hostname,
        port,
        fetch,
        error: (e) => json({ error: `internal error: ${e.message}` }, 500),
      });
    } catch (e) {
      const code = (e as { code?: string }).code;
      if (code !== "EADDRINUSE") throw e;
      throw Object.assign(new Error(`HTTP port ${port} is already in use`, { cause: e }), { code });
    }
  };
  if (h === "localhost") return serve("127.0.0.1");
  if (h === "::") {
    try {
      return serve("::");
    } catch (e) {
      // No IPv6 on this host: all IPv4 interfaces instead.
      if ((e as { code?: string }).code === "EADDRINUSE") throw e;
      return serve("0.0.0.0");
    }
  }
  return serve(h);
}

function peerJson(n: NodeInfo) {
  return {
    id: n.id,
    ...(n.name ? { name: n.name } : {}),
    address: formatAddress(n.host, n.port),
    host: n.host,
    port: n.port,
    source: n.source,
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
