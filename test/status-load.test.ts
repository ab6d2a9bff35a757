/**
 * HTTP load must not cost the registry its nodes (issue 11, item 5): a
 * registry process with its status server and a few thousand listed nodes
 * (raw sessions, each with its own listener answering the probe and the
 * greetings) takes real node processes, probe on, one after another (each
 * stopped once registered), first without HTTP load, then while four loops
 * GET /peers, an /events subscriber never reads, and an idle flood from ::1
 * holds its per-address cap. None is refused or evicted, the caps hold
 * (connections past them get 503), RSS stays bounded, and the page works for
 * a client that behaves. The /peers loops and a ping prober run in processes
 * of their own (test/load-client.ts). Timings are measured, never asserted:
 * `STATUS_LOAD_REPORT=1 bun test test/status-load.test.ts` prints them.
 */
import { afterEach, expect, test } from "bun:test";
import { readFileSync, readdirSync } from "node:fs";
import { lineHandlers, type Conn } from "../net.ts";
import { PROTOCOL_VERSION } from "../protocol.ts";
import { RawClient, disposeAll, rssBytes, spawnNode, spawnRegistry, spawnScript, waitUntil, withDeadline, type NodeLine, type Proc, type WireMessage } from "../harness.ts";

const LISTED = 2_000;
const JOINERS = 10; // real node processes per phase
const FLOOD = 40; // the per-address cap of the status server
const HTTP_CAP = 64;
const STREAM_BUDGET = 1024 * 1024;

let fixtures: (AsyncDisposable | { stop(): unknown } | undefined)[] = [];
afterEach(async () => {
  const all = fixtures.reverse();
  fixtures = [];
  await disposeAll(all.map((f) => (f && "stop" in f ? { [Symbol.asyncDispose]: async () => void (await f.stop()) } : f)));
});

test(`with ${LISTED} nodes listed, GET /peers loops, a stalled /events and an idle flood neither refuse nor evict a node, and the caps hold`, async () => {
  const registry = await spawnRegistry(
    [
      ["--http", "0", "--http-host", "localhost"],
      ["--heartbeat", "5000", "--max-conns-per-ip", "0", "--max-conns", "10000"],
      // The listed nodes are simulated from this one address: its per-address limits would be theirs, not the load's.
      ["--rate-probe", "0", "--rate-address", "0"],
      ["--http-max-conns", String(HTTP_CAP), "--http-max-conns-per-ip", String(FLOOD)],
      ["--http-max-streams", "8", "--http-stream-budget", String(STREAM_BUDGET), "--http-request-timeout", "60000"],
    ].flat(),
  );
  fixtures.push(registry);
  const http = Number(new URL((await registry.log.waitFor("http-listening", 10_000)).url).port);
  expect(registry.log.named("fd-limit")).toEqual([]); // the caps asked for fit: they are the ones under test

  const bulkStarted = performance.now();
  const bulk = await listMany(registry, LISTED);
  const bulkMs = performance.now() - bulkStarted;
  const pinger = setInterval(() => {
    for (const c of bulk) c.write('{"type":"ping"}\n');
  }, 2_000);
  fixtures.push({ stop: () => clearInterval(pinger) });

  const quiet = await phase(registry);

  // The load.
  const loader = spawnScript("test/load-client.ts", ["peers", String(http), "4"], { label: "peers loops" });
  fixtures.push(loader);
  await loader.log.waitFor("ready", 10_000, "the /peers loops");
  const stalled = await RawClient.connect(http, { collect: false });
  fixtures.push(stalled);
  stalled.write("GET /events HTTP/1.1\r\nHost: x\r\n\r\n");
  stalled.pause();
  const flood = await Promise.all(Array.from({ length: FLOOD }, () => RawClient.connect(http, { host: "::1" })));
  fixtures.push(...flood);
  const refused = await Promise.all(Array.from({ length: 5 }, () => RawClient.connect(http, { host: "::1" })));
  fixtures.push(...refused);
  for (const r of refused) await r.waitFor((m) => text(m).startsWith("HTTP/1.1 503 "), 10_000, "a 503 past the per-address cap");
  expect(flood.every((c) => !c.closed && c.messages.length === 0)).toBe(true);

  const loaded = await phase(registry);
  // The page, for a client that behaves, while the load goes on.
  const page = await fetch(`http://127.0.0.1:${http}/`, { headers: { Connection: "close" } });
  expect(page.status).toBe(200);
  expect(await page.text()).toContain('id="matrix"');
  const picture = await firstSnapshot(http);
  expect(picture.nodes.length).toBe(LISTED);
  const stats = await (await fetch(`http://127.0.0.1:${http}/stats`, { headers: { Connection: "close" } })).json();
  const served = await result(loader);

  // Nobody refused or evicted: every joiner registered (phase() waited for it), no timeout, no refusal.
  expect(registry.log.named("node-left").filter((e) => e.reason !== "leave")).toEqual([]);
  expect(registry.log.named("error")).toEqual([]);
  expect(stats.nodes).toBe(LISTED);
  expect(stats.leaves.leave).toBe(2 * JOINERS + 2); // every joiner and both probers said goodbye
  expect(stats.leaves.timeout).toBe(0);
  // The caps held: the flood got its cap and no more; the stalled stream cost at most the budget.
  expect(stats.statusServer.refused).toBeGreaterThanOrEqual(5);
  expect(stats.statusServer.connections).toBeLessThanOrEqual(HTTP_CAP);
  expect(stats.statusServer.streamBytesQueued).toBeLessThanOrEqual(STREAM_BUDGET);
  expect(Number(served.requests)).toBeGreaterThan(0);
  expect(Object.keys(served.statuses as object)).toEqual(["200"]);
  // RSS: the load may not grow the registry by more than the budgets allow (plus room for the collector's timing).
  expect(loaded.rssMaxMb - quiet.rssMaxMb).toBeLessThan(100);

  if (process.env.STATUS_LOAD_REPORT) {
    const report = {
      listed: LISTED,
      bulkRegistrationsPerSecond: Math.round(LISTED / (bulkMs / 1000)),
      quiet: summary(quiet),
      loaded: summary(loaded),
      peersRequests: served.requests, peersBodyBytes: (await (await fetch(`http://127.0.0.1:${http}/peers`, { headers: { Connection: "close" } })).arrayBuffer()).byteLength,
      peersPerSecond: Math.round(Number(served.requests) / (Number(served.ms) / 1000)),
      peersMBPerSecond: Math.round(Number(served.bytes) / 1e6 / (Number(served.ms) / 1000)),
      statusServer: stats.statusServer,
      registryFds: fdCount(registry.pid),
    };
    process.stderr.write(`status load: ${JSON.stringify(report, null, 2)}\n`);
  }
}, 120_000);

// --- internal ----------------------------------------------------------------

interface Phase {
  /** listening -> registered of each joining node process, ms (its own clock: connect, register, probe, reply). */
  joinMs: number[];
  /** ping -> pong round trips of a registered session, ms. */
  pingMs: number[];
  rssMaxMb: number;
  /** The registry's CPU time over the phase, ms, and the phase's length. */
  cpuMs: number;
  ms: number;
}

let probersGone = 0;

/** Real nodes join one after another while a prober process pings; the registry's RSS and CPU are sampled meanwhile. */
async function phase(registry: Proc & { port: number }): Promise<Phase> {
  const prober = spawnScript("test/load-client.ts", ["ping", String(registry.port)], { label: "ping prober" });
  fixtures.push(prober);
  await prober.log.waitFor("ready", 10_000, "the ping prober");
  const started = performance.now();
  const cpu0 = cpuMs(registry.pid);
  // A registry gone reads as NaN, which fails the RSS check rather than passing it.
  const rssMb = () => (rssBytes(registry.pid) ?? NaN) / 2 ** 20;
  let rssMaxMb = rssMb();
  const sampler = setInterval(() => (rssMaxMb = Math.max(rssMaxMb, rssMb())), 100);
  const joinMs: number[] = [];
  try {
    for (let i = 0; i < JOINERS; i++) {
      const node = await spawnNode(registry.port, ["--listen", "127.0.0.1"]);
      fixtures.push(node);
      const at = (event: NodeLine["event"]) => Date.parse(node.log.named(event)[0]!.time);
      joinMs.push(at("registered") - at("listening"));
      // Registered is what is measured. Left running, each joiner would greet every listed node: 2,000
      // connections apiece, load on this test process, and enough churn to fill a host's conntrack table.
      node.signal("SIGTERM");
      expect(await withDeadline(node.exited(), 10_000, "a joiner to leave")).toBe(0);
    }
  } finally {
    clearInterval(sampler);
  }
  const cpu = cpuMs(registry.pid) - cpu0;
  const ms = performance.now() - started;
  const { samples } = await result(prober);
  await registry.log.waitForCount((e) => e.event === "node-left" && e.id === "pinger", ++probersGone, 10_000, "the prober to leave");
  return { joinMs, pingMs: samples as number[], rssMaxMb, cpuMs: cpu, ms };
}

/** Stops a load-client process and returns what it measured. */
async function result(p: Proc): Promise<Record<string, unknown>> {
  p.signal("SIGTERM");
  await withDeadline(p.exited(), 10_000, `${p.label} to exit`);
  const r = p.log.named("result")[0];
  if (!r) throw new Error(`${p.label} printed no result; stderr: ${p.stderr.join("\n")}`);
  return r;
}

/**
 * `count` registered sessions, each with a listener of its own that answers
 * the registry's probe and the joiners' hellos as that node. The sessions
 * read (and drop) their pushes; the caller pings for them. A hundred at a
 * time, each hundred registered before the next connects: more would only
 * overflow the registry's accept queue (a dropped SYN is retried after 1, 3,
 * 7 s), which is not what this test is about.
 */
async function listMany(registry: Proc & { port: number }, count: number): Promise<RawClient[]> {
  const sessions: RawClient[] = [];
  const registered = () => registry.log.named("node-registered").length;
  const base = registered();
  for (let batch = 0; batch < count; batch += 100) {
    const made = await Promise.all(
      Array.from({ length: Math.min(100, count - batch) }, async (_, j) => {
        const id = `listed-${batch + j}`;
        const listener = answerAs(id);
        fixtures.push(listener);
        const c = await RawClient.connect(registry.port, { collect: false, timeoutMs: 20_000 });
        fixtures.push(c);
        c.send({ type: "register", v: 1, id, port: listener.port, name: `listed ${batch + j}` });
        return c;
      }),
    );
    sessions.push(...made);
    const want = base + batch + made.length;
    await waitUntil(() => registered() >= want || registry.log.named("error").length > 0, 30_000, `${want - base} listed nodes`);
    expect(registry.log.named("error")).toEqual([]);
  }
  return sessions;
}

/** A node's listening port, reduced to its answers: `probe-ok` to the registry, `welcome` to a greeter. */
function answerAs(id: string): Bun.TCPSocketListener<Conn<null>> {
  const socket = lineHandlers<null>({
    maxLineBytes: 4096,
    state: () => null,
    line(conn, line) {
      const m = JSON.parse(line) as { type: string; nonce: string };
      conn.send(m.type === "probe" ? { type: "probe-ok", id, nonce: m.nonce } : { type: "welcome", v: PROTOCOL_VERSION, id });
      conn.end();
    },
  });
  return Bun.listen<Conn<null>>({ hostname: "127.0.0.1", port: 0, socket });
}

/** The first snapshot of a fresh /events stream, read as a browser would. */
async function firstSnapshot(port: number): Promise<{ nodes: { id: string }[] }> {
  const abort = new AbortController();
  try {
    const res = await fetch(`http://127.0.0.1:${port}/events`, { signal: abort.signal });
    expect(res.status).toBe(200);
    let text = "";
    const decoder = new TextDecoder();
    const reader = res.body!.getReader();
    return await withDeadline(
      (async () => {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) throw new Error("the event stream ended before a snapshot");
          text += decoder.decode(value, { stream: true });
          const m = /event: snapshot\ndata: (.*)\n\n/.exec(text);
          if (m) return JSON.parse(m[1]!);
        }
      })(),
      10_000,
      "a snapshot",
    );
  } finally {
    abort.abort();
  }
}

function text(m: WireMessage): string {
  return typeof m.line === "string" ? m.line : "";
}

/** User + system CPU time of a process, ms (fields 14 and 15 of /proc/PID/stat, in clock ticks of 10 ms). */
function cpuMs(pid: number): number {
  const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]!.split(" ");
  return (Number(fields[11]) + Number(fields[12])) * 10;
}

function fdCount(pid: number): number {
  return readdirSync(`/proc/${pid}/fd`).length;
}

function summary(p: Phase) {
  const pct = (xs: number[], q: number) => {
    const s = [...xs].sort((a, b) => a - b);
    return s.length ? Math.round(s[Math.min(s.length - 1, Math.floor(q * s.length))]! * 100) / 100 : NaN;
  };
  return {
    joinMs: { min: Math.min(...p.joinMs), median: pct(p.joinMs, 0.5), max: Math.max(...p.joinMs) },
    pingMs: { n: p.pingMs.length, p50: pct(p.pingMs, 0.5), p99: pct(p.pingMs, 0.99), max: pct(p.pingMs, 1) },
    registryRssMaxMb: Math.round(p.rssMaxMb),
    registryCpuPercentOfACore: Math.round((100 * p.cpuMs) / p.ms),
  };
}
