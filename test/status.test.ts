/**
 * The status API against a real in-process registry and real nodes on
 * loopback: every JSON and Prometheus figure is parsed and compared with what
 * the registry itself reports, and the event stream is read as a browser
 * would read it.
 */
import { afterEach, describe, expect, test } from "bun:test";
import { createHash } from "node:crypto";
import { startNode, type PeerNode } from "../client.ts";
import { startRegistry, type Registry, type RegistryEvent } from "../registry.ts";
import { startStatusServer, type StatusServer, type StatusServerOptions } from "../status.ts";
import { EventLog, disposeAll, readLines, waitUntil, withDeadline, type JsonEvent } from "../harness.ts";

const T = 30_000;
let fixtures: (AsyncDisposable | undefined)[] = [];

afterEach(async () => {
  await disposeAll(fixtures);
  fixtures = [];
});

describe("status API", () => {
  test("GET /peers lists exactly the registry's live nodes", async () => {
    const { registry, server, nodes } = await mesh(3);
    const body = await getJson(server, "/peers");
    expect(body.count).toBe(3);
    expect(sortById(body.peers)).toEqual(sortById(registry.nodes().map(expectedPeer)));
    expect(body.peers.map((p: { name: string }) => p.name).sort()).toEqual(["n0", "n1", "n2"]);
    expect(body.peers.map((p: { registry: string }) => p.registry)).toEqual([registry.id, registry.id, registry.id]);

    await nodes[1]!.stop();
    await waitUntil(() => registry.nodes().length === 2, 5_000, "registry to drop the stopped node");
    const after = await getJson(server, "/peers");
    expect(after.peers.map((p: { id: string }) => p.id).sort()).toEqual([nodes[0]!.id, nodes[2]!.id].sort());
  }, T);

  test("GET /stats matches the registry's counters and mesh state", async () => {
    const { registry, server, nodes, log } = await mesh(3, { rateWindowSeconds: 3600 });
    const s = registry.stats();
    const body = await getJson(server, "/stats");
    expect(body.boot).toBe(registry.boot);
    expect(body.nodes).toBe(3);
    expect({ registry: body.registry, sessions: body.sessions, store: body.store }).toEqual({ registry: registry.id, sessions: 3, store: "ok" });
    expect(body.joins).toBe(s.joins);
    expect(body.leaves).toEqual({ closed: 0, timeout: 0, leave: 0, replaced: 0 });
    expect(body.mesh).toEqual({ pairsGreeted: 3, pairsExpected: 3, complete: true, timeToFullMeshMs: s.meshCompleteMs });
    expect(typeof body.mesh.timeToFullMeshMs).toBe("number");
    expect(body.registrationLatencyMs).toEqual(s.latencyMs);
    expect(body.registrationLatencyMs.count).toBe(3);
    // Three joins in a window far longer than the test, averaged over at least one second.
    expect(body.registrationsPerSecond).toBeGreaterThan(0);
    expect(body.registrationsPerSecond).toBeLessThanOrEqual(3);
    expect(body.registrationsPerSecondWindowSeconds).toBe(3600);

    await nodes[0]!.stop();
    await log.waitForWhere("node-left", (e) => e.id === nodes[0]!.id, 5_000, "node-left");
    const after = await getJson(server, "/stats");
    expect(after.nodes).toBe(2);
    expect(after.leaves.leave).toBe(1);
    expect(after.mesh).toMatchObject({ pairsGreeted: 1, pairsExpected: 1, complete: true });
  }, T);

  test("GET /metrics is valid Prometheus text with the registry's figures", async () => {
    const { registry, server, nodes, log } = await mesh(3);
    await nodes[2]!.stop();
    await log.waitForWhere("node-left", (e) => e.id === nodes[2]!.id, 5_000, "node-left");

    const res = await get(server, "/metrics");
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toStartWith("text/plain; version=0.0.4");
    const m = parseExposition(await res.text());
    const s = registry.stats();

    expect(m.type.get("contact_registry_nodes")).toBe("gauge");
    expect(m.type.get("contact_registry_joins_total")).toBe("counter");
    expect(m.type.get("contact_registry_leaves_total")).toBe("counter");
    expect(m.type.get("contact_registry_registration_latency_seconds")).toBe("summary");
    for (const [name, type] of m.type) {
      if (type === "counter") expect(name).toEndWith("_total");
      expect(m.help.get(name)?.length ?? 0).toBeGreaterThan(0);
    }

    expect(m.value("contact_registry_nodes")).toBe(2);
    expect(m.value("contact_registry_joins_total")).toBe(3);
    expect(m.value("contact_registry_leaves_total", { reason: "leave" })).toBe(1);
    expect(m.value("contact_registry_leaves_total", { reason: "timeout" })).toBe(0);
    expect(m.value("contact_registry_pairs_greeted")).toBe(s.pairsGreeted);
    expect(m.value("contact_registry_pairs_expected")).toBe(1);
    expect(m.value("contact_registry_mesh_complete")).toBe(1);
    expect(m.value("contact_registry_info", { boot: registry.boot })).toBe(1);
    expect(m.value("contact_registry_registration_latency_seconds_count")).toBe(s.latencyMs.count);
    expect(m.value("contact_registry_registration_latency_seconds_sum")).toBeCloseTo(s.latencyMs.sum / 1000, 6);
    expect(m.value("contact_registry_registration_latency_seconds", { quantile: "0.5" })).toBeCloseTo(s.latencyMs.p50 / 1000, 6);
    expect(m.value("contact_registry_registration_latency_seconds", { quantile: "0.99" })).toBeCloseTo(s.latencyMs.p99 / 1000, 6);
    expect(m.value("contact_registry_time_to_full_mesh_seconds")).toBeCloseTo((s.meshCompleteMs ?? NaN) / 1000, 6);
    expect(m.value("contact_registry_start_time_seconds")).toBeCloseTo(s.startedAt / 1000, 3);
    expect(m.value("contact_registry_status_clients")).toBe(0);
  }, T);

  test("GET /healthz is ok while the registry runs and 503 once it stopped", async () => {
    const { registry, server } = await mesh(1);
    const ok = await get(server, "/healthz");
    expect(ok.status).toBe(200);
    expect(await ok.json()).toEqual({ status: "ok", boot: registry.boot, registry: registry.id, nodes: 1, sessions: 1 });
    await registry.stop();
    const down = await get(server, "/healthz");
    expect(down.status).toBe(503);
    expect((await down.json()).status).toBe("stopped");
  }, T);

  test("GET / serves the page, whose script the CSP allows by hash", async () => {
    const { server } = await mesh(0);
    const res = await get(server, "/");
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toBe("text/html; charset=utf-8");
    const html = await res.text();
    const script = /<script>([\s\S]*?)<\/script>/.exec(html)?.[1];
    expect(script).toBeDefined();
    const hash = createHash("sha256").update(script!).digest("base64");
    expect(res.headers.get("content-security-policy")).toContain(`script-src 'sha256-${hash}'`);
    expect(html).toContain('id="matrix"');

    const head = await fetch(server.url, { method: "HEAD" });
    expect(head.status).toBe(200);
    expect(await head.text()).toBe("");
  }, T);

  test("unknown paths are 404 and other methods 405", async () => {
    const { server } = await mesh(0);
    const missing = await get(server, "/nope");
    expect(missing.status).toBe(404);
    expect((await missing.json()).endpoints).toContain("/metrics");
    for (const method of ["POST", "PUT", "DELETE"]) {
      const res = await fetch(new URL("/stats", server.url), { method });
      expect(res.status).toBe(405);
      expect(res.headers.get("allow")).toBe("GET, HEAD");
      await res.body?.cancel();
    }
  }, T);

  test("a busy port is a clear error, not a crash", async () => {
    const { registry, server } = await mesh(0);
    expect(() => startStatusServer(registry, { host: "127.0.0.1", port: server.port })).toThrow(`HTTP port ${server.port} is already in use`);
    expect((await get(server, "/healthz")).status).toBe(200);
  }, T);
});

describe("GET /events", () => {
  test("a snapshot, then a join, its greetings and its leave; the subscription ends with the client", async () => {
    const { registry, server, nodes } = await mesh(2);
    const stream = openEvents(server);
    const snap = (await stream.log.waitFor("snapshot", 5_000)).data as Snapshot;
    expect(snap.nodes.map((n) => n.id).sort()).toEqual(nodes.map((n) => n.id).sort());
    expect(snap.pairs).toEqual(registry.pairs());
    expect(snap.counts).toMatchObject({ nodes: 2, pairsGreeted: 1, pairsExpected: 1, complete: true });
    expect(snap.log.filter((e) => e.kind === "join")).toHaveLength(2);
    await waitUntil(() => server.clients() === 1, 5_000, "the server to count the client");

    const third = await node(registry, "late");
    const join = await stream.log.waitForWhere("join", (e) => data(e).node.id === third.id, 5_000, "join event");
    expect(data(join).node).toMatchObject({ name: "late", address: `127.0.0.1:${third.port}` });
    // Both older nodes greet the newcomer; the stream names each pair once.
    await stream.log.waitForCount((e) => e.event === "pair" && [data(e).a, data(e).b].includes(third.id), 2, 5_000, "two pair events");
    await stream.log.waitForWhere("counts", (e) => data(e).pairsGreeted === 3 && data(e).complete === true, 5_000, "complete counts");

    await third.stop();
    const leave = await stream.log.waitForWhere("leave", (e) => data(e).id === third.id, 5_000, "leave event");
    expect(data(leave)).toMatchObject({ reason: "leave", name: "late", nodes: 2 });

    await stream.close();
    await waitUntil(() => server.clients() === 0, 5_000, "the server to drop the closed stream");
  }, T);

  test("nodes are numbered by the server in join order, the same for every page, with a gap where one left", async () => {
    const { registry, server, nodes } = await mesh(2);
    const first = openEvents(server);
    await first.log.waitFor("snapshot", 5_000);
    const third = await node(registry, "third");
    const joined = await first.log.waitForWhere("join", (e) => data(e).node.id === third.id, 5_000, "the third node's join");
    expect(data(joined).node.number).toBe(3);
    await nodes[0]!.stop();
    await first.log.waitFor("leave", 5_000);
    // A page opened now sees the same numbers, and the first node's is not given again.
    const later = openEvents(server);
    const snap = (await later.log.waitFor("snapshot", 5_000)).data as Snapshot;
    const numbers = Object.fromEntries(snap.nodes.map((n) => [n.id, (n as { number?: number }).number]));
    expect(numbers).toEqual({ [nodes[1]!.id]: 2, [third.id]: 3 });
    const fourth = await node(registry, "fourth");
    const joinedLater = await later.log.waitForWhere("join", (e) => data(e).node.id === fourth.id, 5_000, "the fourth node's join");
    expect(data(joinedLater).node.number).toBe(4);
    await Promise.all([first.close(), later.close()]);
  }, T);

  test("idle streams get keep-alive comments", async () => {
    const { server } = await mesh(0, { keepAliveMs: 50 });
    const stream = openEvents(server);
    await stream.log.waitFor("snapshot", 5_000);
    await waitUntil(() => stream.comments.includes("keep-alive"), 5_000, "a keep-alive comment");
    await stream.close();
  }, T);

  test("crossing the matrix limit resends the picture with and without pairs", async () => {
    const { registry, server, nodes } = await mesh(2, { matrixLimit: 2 });
    const stream = openEvents(server);
    const first = (await stream.log.waitFor("snapshot", 5_000)).data as Snapshot;
    expect(first.pairs).toHaveLength(1);

    const third = await node(registry, "over");
    const big = await stream.log.waitForWhere("snapshot", (e) => (data(e) as Snapshot).nodes.length === 3, 5_000, "snapshot above the limit");
    expect((big.data as Snapshot).pairs).toBeNull();

    await third.stop();
    const small = await stream.log.waitForWhere("snapshot", (e) => (data(e) as Snapshot).nodes.length === 2, 5_000, "snapshot back under the limit");
    expect((small.data as Snapshot).pairs).toEqual(registry.pairs());
    expect((small.data as Snapshot).nodes.map((n) => n.id).sort()).toEqual(nodes.map((n) => n.id).sort());
    await stream.close();
  }, T);

  test("a stopping registry ends the stream with a stopped event", async () => {
    const { registry, server } = await mesh(1);
    const stream = openEvents(server);
    await stream.log.waitFor("snapshot", 5_000);
    await registry.stop();
    await stream.log.waitFor("stopped", 5_000);
    await withDeadline(stream.ended, 5_000, "the stream to end");
    expect(server.clients()).toBe(0);
  }, T);
});

// --- internal ----------------------------------------------------------------

interface Snapshot {
  boot: string;
  nodes: { id: string; name?: string; address: string; joinedAt: string }[];
  pairs: [string, string][] | null;
  log: { kind: string; id?: string }[];
  counts: Record<string, unknown>;
}

/** A registry with a status server and `count` nodes that have all greeted each other. */
async function mesh(count: number, options: StatusServerOptions = {}) {
  const log = new EventLog<RegistryEvent>();
  const registry = await startRegistry({ host: "127.0.0.1", port: 0, onEvent: log.push });
  fixtures.push(registry);
  const server = startStatusServer(registry, { host: "127.0.0.1", port: 0, ...options });
  fixtures.push(server);
  const nodes: PeerNode[] = [];
  for (let i = 0; i < count; i++) nodes.push(await node(registry, `n${i}`));
  const pairs = (count * (count - 1)) / 2;
  await waitUntil(() => registry.stats().pairsGreeted === pairs, 10_000, `all ${pairs} pairs to be greeted`);
  return { log, registry, server, nodes };
}

async function node(registry: Registry, name: string): Promise<PeerNode> {
  const n = await startNode({ registryHost: "127.0.0.1", registryPort: registry.port, listenHost: "127.0.0.1", name, onEvent: () => {} });
  fixtures.push(n);
  return n;
}

function get(server: StatusServer, path: string): Promise<Response> {
  return withDeadline(fetch(new URL(path, server.url)), 5_000, `GET ${path}`);
}

async function getJson(server: StatusServer, path: string) {
  const res = await get(server, path);
  expect(res.status).toBe(200);
  expect(res.headers.get("content-type")).toBe("application/json; charset=utf-8");
  return res.json();
}

function expectedPeer(n: ReturnType<Registry["nodes"]>[number]) {
  return {
    id: n.id,
    ...(n.name ? { name: n.name } : {}),
    address: `${n.host}:${n.port}`,
    host: n.host,
    port: n.port,
    source: n.source,
    registry: n.registry,
    joinedAt: new Date(n.joinedAt).toISOString(),
  };
}

function sortById<T extends { id: string }>(list: T[]): T[] {
  return [...list].sort((a, b) => a.id.localeCompare(b.id));
}

// Event payloads are checked field by field below; typing each one would only restate status.ts.
const data = (e: JsonEvent): any => e.data;

/** Reads /events like EventSource does: blocks separated by a blank line, `event:`/`data:` fields, `:` comments. */
function openEvents(server: StatusServer) {
  const log = new EventLog();
  const comments: string[] = [];
  const abort = new AbortController();
  const ended = (async () => {
    const res = await fetch(new URL("/events", server.url), { signal: abort.signal });
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toStartWith("text/event-stream");
    await readLines(res.body!, (block) => {
      let event = "message";
      const lines: string[] = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) comments.push(line.slice(1).trim());
        else if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) lines.push(line.slice(6));
      }
      if (lines.length) log.push({ event, data: JSON.parse(lines.join("\n")) });
    }, "\n\n");
  })().catch((e) => {
    if ((e as Error).name !== "AbortError") throw e;
  });
  const stream = {
    log,
    comments,
    ended,
    async close() {
      abort.abort();
      await withDeadline(ended, 5_000, "the event stream to close");
    },
    [Symbol.asyncDispose]() {
      return this.close();
    },
  };
  fixtures.push(stream); // closed after the test even when an assertion stops it first
  return stream;
}

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/**
 * A strict reader of the text exposition format (0.0.4): every sample must
 * belong to a family declared by an earlier TYPE line, names and label syntax
 * must be valid, and no series may appear twice.
 */
function parseExposition(text: string) {
  const help = new Map<string, string>();
  const type = new Map<string, string>();
  const samples: Sample[] = [];
  const seen = new Set<string>();
  const NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
  expect(text.endsWith("\n")).toBe(true);
  for (const line of text.split("\n")) {
    if (line === "") continue;
    const meta = /^# (HELP|TYPE) (\S+) (.*)$/.exec(line);
    if (meta) {
      const [, kind, name, rest] = meta as unknown as [string, string, string, string];
      expect(name).toMatch(NAME);
      const map = kind === "HELP" ? help : type;
      if (map.has(name)) throw new Error(`second ${kind} for ${name}`);
      if (kind === "TYPE") expect(["counter", "gauge", "summary", "histogram", "untyped"]).toContain(rest);
      map.set(name, rest);
      continue;
    }
    if (line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!m) throw new Error(`not a sample line: ${line}`);
    const [, name, labelText, valueText] = m as unknown as [string, string, string | undefined, string];
    const labels: Record<string, string> = {};
    if (labelText) {
      const rest = labelText.replace(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)",?/g, (_, k: string, v: string) => {
        labels[k] = v.replace(/\\(.)/g, (_m, c: string) => (c === "n" ? "\n" : c));
        return "";
      });
      if (rest !== "") throw new Error(`bad labels in: ${line}`);
    }
    const family = type.has(name) ? name : name.replace(/_(sum|count|bucket)$/, "");
    if (!type.has(family)) throw new Error(`sample ${name} has no TYPE line before it`);
    const key = `${name}${JSON.stringify(Object.entries(labels).sort())}`;
    if (seen.has(key)) throw new Error(`duplicate series ${key}`);
    seen.add(key);
    const value = valueText === "+Inf" ? Infinity : valueText === "-Inf" ? -Infinity : Number(valueText);
    if (valueText !== "NaN" && Number.isNaN(value)) throw new Error(`bad value in: ${line}`);
    samples.push({ name, labels, value });
  }
  return {
    help,
    type,
    samples,
    /** The one sample with this name whose labels include `labels`. */
    value(name: string, labels: Record<string, string> = {}): number {
      const found = samples.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v));
      if (found.length !== 1) throw new Error(`${found.length} samples match ${name} ${JSON.stringify(labels)}`);
      return found[0]!.value;
    },
  };
}
