/**
 * The status server's share of the registry (issue 11, item 5): connection
 * caps in all and per source address (a 503 past them), deadlines for
 * connections that send nothing or trickle, a cap and a byte budget for
 * `/events` streams, and endpoints built at most once per cache interval.
 * Real registries and real sockets on loopback; `localhost` binds 127.0.0.1
 * and ::1, so a client on ::1 counts as another source address.
 */
import { afterEach, describe, expect, test } from "bun:test";
import { startRegistry, type Registry, type RegistryOptions, type RegistryEvent } from "../registry.ts";
import { startStatusServer, type StatusServerOptions } from "../status.ts";
import { EventLog, RawClient, disposeAll, spawnScript, waitUntil, withDeadline, type WireMessage } from "../harness.ts";

const T = 30_000;
let fixtures: (AsyncDisposable | undefined)[] = [];
afterEach(async () => {
  await disposeAll(fixtures.reverse());
  fixtures = [];
});

describe("connections", () => {
  test("past the per-address cap a connection gets a short 503; another address is still served until the total cap", async () => {
    const { server } = await statusServer({ host: "localhost", maxConnsPerAddress: 3, maxConns: 4, cacheMs: 0 });
    const v4 = await Promise.all([1, 2, 3].map(() => raw(server.port, "127.0.0.1")));
    await waitUntil(() => server.connections() === 3, 5_000, "three idle connections admitted");

    const fourth = await raw(server.port, "127.0.0.1");
    await fourth.waitFor(statusLine(503), 5_000, "a 503 over the per-address cap");
    expect(fourth.messages.map(text)).toContain("Connection: close");
    await fourth.waitClosed(5_000);
    // ::1 is another source address: served.
    expect(await request(server.port, "::1", "/healthz")).toBe(200);

    const v6 = await raw(server.port, "::1");
    await waitUntil(() => server.connections() === 4, 5_000, "the fourth connection admitted");
    const overTotal = await raw(server.port, "::1");
    await overTotal.waitFor(statusLine(503), 5_000, "a 503 over the total cap");
    await overTotal.waitClosed(5_000);

    // A slot freed is a slot taken again.
    await v4[0]![Symbol.asyncDispose]();
    await waitUntil(() => server.connections() === 3, 5_000, "the closed connection released");
    const stats = await requestJson(server.port, "::1", "/stats");
    expect(stats.statusServer).toMatchObject({ refused: 2, requestTimeouts: 0, idleTimeouts: 0 });
    expect(v6.closed || v4.slice(1).some((c) => c.closed)).toBe(false);
  }, T);

  test("silence and a trickled head are cut at the request deadline, a quiet keep-alive at the idle deadline; an event stream with keep-alives stays", async () => {
    const { server } = await statusServer({ host: "127.0.0.1", requestTimeoutMs: 400, idleTimeoutMs: 800, cacheMs: 0 });
    const stream = events(server.port);
    await stream.snapshot(5_000);

    const silent = await raw(server.port);
    const trickler = await raw(server.port);
    trickler.write("GET /healthz HTTP/1.1\r\n");
    const trickle = setInterval(() => trickler.write("X"), 50); // bytes keep coming; the head never ends
    const keepAlive = await raw(server.port);
    keepAlive.write("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    await keepAlive.waitFor(statusLine(200), 5_000, "the keep-alive request answered");
    try {
      await Promise.all([silent, trickler, keepAlive].map((c) => c.waitClosed(10_000)));
    } finally {
      clearInterval(trickle);
    }
    expect(trickler.messages.filter((m) => text(m).startsWith("HTTP/"))).toEqual([]);
    // Keep-alive comments come every idle/2: four of them span two idle deadlines, and the stream is still open.
    await waitUntil(() => stream.comments() >= 4, 10_000, "four keep-alive comments");
    expect(server.clients()).toBe(1);
    const stats = await requestJson(server.port, "127.0.0.1", "/stats");
    expect(stats.statusServer).toMatchObject({ requestTimeouts: 2, idleTimeouts: 1, refused: 0, streams: 1 });
  }, T);
});

describe("event streams", () => {
  test("past the stream cap /events is 503; a closed stream frees its place", async () => {
    const { server } = await statusServer({ host: "127.0.0.1", maxStreams: 2, cacheMs: 0 });
    const a = events(server.port);
    const b = events(server.port);
    await Promise.all([a.snapshot(5_000), b.snapshot(5_000)]);
    const res = await fetch(`http://127.0.0.1:${server.port}/events`);
    expect(res.status).toBe(503);
    expect(res.headers.get("retry-after")).toBe("5");
    expect((await res.json()).error).toContain("too many event streams (2)");
    await a.close();
    await waitUntil(() => server.clients() === 1, 5_000, "the closed stream dropped");
    await events(server.port).snapshot(5_000);
    expect(server.clients()).toBe(2);
    expect((await requestJson(server.port, "127.0.0.1", "/stats")).statusServer.streamsRefused).toBe(1);
  }, T);

  test("streams that do not read are dropped over the byte budget; a page that reads keeps its stream and its picture", async () => {
    // A big picture (long names) resent on every crossing of the matrix limit fills the streams fast.
    const LISTED = 300;
    const { registry, server } = await statusServer(
      { host: "127.0.0.1", matrixLimit: LISTED, streamBudgetBytes: 512 * 1024, cacheMs: 0 },
      { probe: false, maxConnsPerAddress: 0, heartbeatMs: 60_000 },
    );
    await registerMany(registry, LISTED);
    const reader = events(server.port);
    await reader.snapshot(5_000);
    const stalled = await Promise.all([1, 2].map(() => raw(server.port, "127.0.0.1", false)));
    for (const s of stalled) {
      s.write("GET /events HTTP/1.1\r\nHost: x\r\n\r\n");
      s.pause();
    }
    await waitUntil(() => server.clients() === 3, 5_000, "three streams open");

    // Join and leave across the limit until only the reader is left (bounded: far more than kernel buffers hold).
    // What the streams hold stays within the budget all along.
    const queued: number[] = [];
    for (let i = 0; server.clients() > 1; i++) {
      if (i === 400) throw new Error(`streams not dropped after ${i} crossings; open: ${server.clients()}`);
      const c = await raw(registry.port);
      await c.register(`churn-${i}`, 20_000 + i, { name: "x".repeat(64) }, 5_000);
      await c[Symbol.asyncDispose]();
      await waitUntil(() => registry.nodes().length === LISTED, 5_000, "the churn node gone");
      queued.push((await requestJson(server.port, "127.0.0.1", "/stats")).statusServer.streamBytesQueued);
    }
    expect(Math.max(...queued)).toBeGreaterThan(256 * 1024); // the streams did fall behind
    expect(Math.max(...queued)).toBeLessThanOrEqual(512 * 1024);
    const stats = await requestJson(server.port, "127.0.0.1", "/stats");
    expect(stats.statusServer).toMatchObject({ streams: 1, streamsDropped: 2 });
    // The reader is still live: a change reaches it as a fresh picture.
    const late = await raw(registry.port);
    await late.register("late", 30_000, {}, 5_000);
    const pic = await reader.snapshot(5_000, (s) => s.nodes.some((n) => n.id === "late"));
    expect(pic.nodes).toHaveLength(LISTED + 1);
  }, 60_000);
});

describe("caches", () => {
  test("a loop of GET /peers and /stats is built at most once per cache interval, and no answer predates its request", async () => {
    const CACHE_MS = 100;
    const registry = await startRegistry({ host: "127.0.0.1", port: 0, probe: false });
    fixtures.push(registry);
    let peerBuilds = 0;
    let statBuilds = 0;
    // The real registry, with its reads counted.
    const counted: Registry = {
      ...registry,
      nodes: () => (peerBuilds++, registry.nodes()),
      stats: () => (statBuilds++, registry.stats()),
    };
    const server = startStatusServer(counted, { host: "127.0.0.1", port: 0, cacheMs: CACHE_MS });
    fixtures.push(server);
    await registerMany(registry, 20);
    const before = { peers: peerBuilds, stats: statBuilds };
    const started = performance.now();
    const loops = await Promise.all(
      [0, 1, 2, 3].map(async (i) => {
        const bodies = new Set<string>();
        for (let n = 0; n < 40; n++) bodies.add(await (await fetch(`http://127.0.0.1:${server.port}/${i % 2 ? "stats" : "peers"}`)).text());
        return bodies;
      }),
    );
    const slots = 1 + Math.ceil((performance.now() - started) / CACHE_MS);
    expect(peerBuilds - before.peers).toBeLessThanOrEqual(slots);
    expect(statBuilds - before.stats).toBeLessThanOrEqual(slots);
    expect(loops[0]!.size).toBe(1); // nothing changed: the same bytes every time

    // A change just before a request is in its answer, though the cache is younger than the interval.
    await requestJson(server.port, "127.0.0.1", "/peers");
    const c = await raw(registry.port);
    await c.register("newcomer", 40_000, {}, 5_000);
    const peers = await requestJson(server.port, "127.0.0.1", "/peers");
    expect(peers.count).toBe(21);
    expect(peers.peers.map((p: { id: string }) => p.id)).toContain("newcomer");
    expect((await requestJson(server.port, "127.0.0.1", "/stats")).nodes).toBe(21);
  }, T);
});

describe("command line", () => {
  test("a bad status-server setting is refused before anything listens", async () => {
    const p = spawnScript("registry.ts", ["127.0.0.1", "0", "--json", "--http", "0", "--http-stream-budget", "12"]);
    fixtures.push(p);
    expect(await withDeadline(p.exited(), 15_000, "the registry to exit")).toBe(2);
    expect(p.stderr.join("\n")).toContain('--http-stream-budget must be an integer >= 1024, got "12"');
    expect(p.log.named("listening")).toEqual([]);
  }, T);
});

// --- internal ----------------------------------------------------------------

async function statusServer(options: StatusServerOptions, registryOptions: RegistryOptions = {}) {
  const log = new EventLog<RegistryEvent>();
  const registry = await startRegistry({ host: "127.0.0.1", port: 0, onEvent: log.push, ...registryOptions });
  fixtures.push(registry);
  const server = startStatusServer(registry, { port: 0, ...options });
  fixtures.push(server);
  return { registry, server, log };
}

async function raw(port: number, host = "127.0.0.1", collect = true): Promise<RawClient> {
  const c = await RawClient.connect(port, { host, collect });
  fixtures.push(c);
  return c;
}

/** Raw sessions registered with the probe off; they keep reading their pushes. */
async function registerMany(registry: Registry, count: number): Promise<void> {
  const start = registry.nodes().length;
  for (let i = 0; i < count; i++) {
    const c = await raw(registry.port, "127.0.0.1", false);
    c.send({ type: "register", v: 1, id: `listed-${i}`, port: 10_000 + i, name: `listed node ${i} `.padEnd(64, "-") });
  }
  await waitUntil(() => registry.nodes().length === start + count, 15_000, `${count} nodes listed`);
}

/** The text of a line a raw client received (HTTP is not JSON, so each line arrives as `(not json)`). */
function text(m: WireMessage): string {
  return typeof m.line === "string" ? m.line : "";
}

function statusLine(code: number) {
  return (m: WireMessage) => text(m).startsWith(`HTTP/1.1 ${code} `);
}

/** One request on its own connection (`Connection: close`, so it does not stay in a pool and hold a slot). */
async function request(port: number, host: string, path: string): Promise<number> {
  const res = await withDeadline(fetch(`http://${host.includes(":") ? `[${host}]` : host}:${port}${path}`, { headers: { Connection: "close" } }), 5_000, `GET ${path}`);
  await res.arrayBuffer();
  return res.status;
}

async function requestJson(port: number, host: string, path: string) {
  const res = await withDeadline(fetch(`http://${host.includes(":") ? `[${host}]` : host}:${port}${path}`, { headers: { Connection: "close" } }), 5_000, `GET ${path}`);
  expect(res.status).toBe(200);
  return res.json();
}

interface Picture {
  nodes: { id: string }[];
}

/** A page's event stream, read as it arrives: the pictures (snapshots) it got and the keep-alive comments. */
function events(port: number) {
  const pictures: Picture[] = [];
  let comments = 0;
  const changed = new Set<() => void>();
  const abort = new AbortController();
  const done = (async () => {
    const res = await fetch(`http://127.0.0.1:${port}/events`, { signal: abort.signal });
    expect(res.status).toBe(200);
    let buffer = "";
    const decoder = new TextDecoder();
    const reader = res.body!.getReader();
    for (let r = await reader.read(); !r.done; r = await reader.read()) {
      buffer += decoder.decode(r.value, { stream: true });
      const blocks = buffer.split("\n\n");
      buffer = blocks.pop()!;
      for (const block of blocks) {
        if (block.startsWith(":")) comments++;
        const data = /^event: snapshot\ndata: (.*)$/m.exec(block)?.[1];
        if (data) pictures.push(JSON.parse(data) as Picture);
      }
      for (const fn of changed) fn();
    }
  })().catch((e) => {
    if ((e as Error).name !== "AbortError") throw e;
  });
  const stream = {
    comments: () => comments,
    /** The first picture (past or to come) that satisfies `pred`. */
    snapshot(ms: number, pred: (p: Picture) => boolean = () => true): Promise<Picture> {
      return withDeadline(
        new Promise<Picture>((resolve) => {
          const check = () => {
            const found = pictures.find(pred);
            if (found) {
              changed.delete(check);
              resolve(found);
            }
          };
          changed.add(check);
          check();
        }),
        ms,
        "a snapshot on the event stream",
      );
    },
    async close() {
      abort.abort();
      await withDeadline(done, 5_000, "the event stream to close");
    },
    [Symbol.asyncDispose]() {
      return this.close();
    },
  };
  fixtures.push(stream);
  return stream;
}
