/**
 * The benchmark's "ha" phase: several registries sharing the list through a
 * private redis-server (started here, one per part, killed after it).
 *
 *   registration  round trips on a registry with the Redis store next to one
 *                 with the memory list and one whose joins each wait for a
 *                 PING (the floor of one round trip), at each concurrency
 *                 (probe off), rounds alternating; and where the difference
 *                 goes (CPU per registration of each party, store commands)
 *   propagation   a registration on registry A to the `joined` push at a
 *                 node of registry B, next to the same on one registry
 *   failover      kill -9 of a registry holding N simulated nodes that fail
 *                 over as client.ts does: until all are registered on the
 *                 other registry and every session has the last change
 *   storeRestart  kill -9 of the store, restarted empty: until both
 *                 registries are back and list every node
 *   scale         3 registries x N sessions pinging at the default interval:
 *                 RSS and heartbeat CPU per registry, the store's memory,
 *                 CPU and commands per second
 *
 * run.ts hands in its process helpers (HaKit): the registries, holders and
 * load generator are the same processes as in the other phases.
 */
import { RedisClient } from "bun";
import { RawClient, RedisServer, redisUnavailable, rssBytes, waitUntil } from "../harness.ts";
import { DEFAULTS } from "../protocol.ts";
import { dist, fmt, mb, wallMs, type Msg } from "./lib.ts";
import { cpuReading, otherCores } from "./machine.ts";
import type { Child, Fleet, RegistryProc } from "./run.ts";

export interface HaKit {
  quick: boolean;
  concs: number[];
  /** Other registry.ts versions (with the redis.ts next to each) measured with the Redis store in the same registration rounds. */
  compare: string[];
  startRegistry(label: string, opts: Msg, env?: Record<string, string>): Promise<RegistryProc>;
  startReady(label: string, script: string, args: string[], event: string): Promise<{ child: Child; ready: Msg }>;
  fleet(tag: string, port: number, probe: boolean, pingMs?: number, failover?: number[]): Fleet;
  registryCell(reg: RegistryProc, fleet: Fleet, lg: Child, c: number, prefix: string): Promise<Msg>;
  /** Ends every child process of the part that ran. */
  closeChildren(): Promise<void>;
  log(text: string): void;
}

const SIZES = {
  quick: { rounds: 1, propagation: 30, failover: 200, stay: 20, restart: 100, scale: 300, cpuWindowMs: 2_000 },
  full: { rounds: 5, propagation: 300, failover: 1_000, stay: 100, restart: 1_000, scale: 5_000, cpuWindowMs: 6_000 },
};

type Part = "registration" | "propagation" | "failover" | "storeRestart" | "scale";

/** Runs every part (a failed part is recorded and the rest still run); `out` fills as they finish. */
export async function haPhase(kit: HaKit, out: Msg): Promise<Msg> {
  if (redisUnavailable) {
    kit.log(`ha: skipped: ${redisUnavailable}`);
    return Object.assign(out, { skipped: redisUnavailable });
  }
  const size = SIZES[kit.quick ? "quick" : "full"];
  const parts: [Part, () => Promise<Msg>][] = [
    ["registration", () => registration(kit, size.rounds)],
    ["propagation", () => propagation(kit, size.propagation)],
    ["failover", () => failover(kit, size.failover, size.stay)],
    ["storeRestart", () => storeRestart(kit, size.restart)],
    ["scale", () => scale(kit, size.scale, size.cpuWindowMs)],
  ];
  for (const [name, run] of parts) {
    try {
      out[name] = await run();
    } catch (e) {
      out[name] = { error: (e as Error).message };
      kit.log(`ha ${name} FAILED: ${(e as Error).message}`);
    } finally {
      await kit.closeChildren();
    }
  }
  return out;
}

// --- parts ---------------------------------------------------------------------

// Every simulated node and load-generator connection comes from 127.0.0.1: the per-address caps and rates, meant for one
// host each, would measure themselves.
const FIXED = { maxConnsPerAddress: 0, rateAddressLines: 0, rateSessionLines: 0, rateAddressProbes: 0 };

/** One registry measured in the registration rounds: its list, and the private redis-server behind it, if any. */
interface Contender {
  name: string;
  reg: RegistryProc;
  store?: StoreProbe;
  runs: Msg[];
}

/**
 * Memory list vs Redis store, same cells, one registry each: what the store
 * adds to a registration. Next to them the PING floor (memory list, one
 * round trip to a redis-server per join): what a round trip alone costs on
 * this machine; and with --compare, other versions on the Redis store. (Every
 * other registry on the store applies each change too, on its own machine: on
 * this one it would only take CPU from the registry measured.) Each cell runs
 * `rounds` times, the contenders alternating and their order reversed every
 * other round; the ratio is the median of the rounds' own ratios (each
 * Redis round against the memory round next to it), so that a burst of other
 * work on a shared machine skews one round, not the ratio.
 */
async function registration(kit: HaKit, rounds: number): Promise<Msg> {
  const opts = { ...FIXED, heartbeatMs: 60_000, probe: false };
  const servers = await Promise.all([0, 1, ...kit.compare].map(() => RedisServer.start()));
  try {
    const [floorServer, redisServer, ...compareServers] = servers as [RedisServer, RedisServer, ...RedisServer[]];
    const [memory, floor, redis, lg, ...others] = await Promise.all([
      kit.startRegistry("registry(memory)", opts),
      kit.startRegistry("registry(ping floor)", { ...opts, pingFloor: floorServer.url }),
      kit.startRegistry("registry(redis)", { ...opts, store: redisServer.url }),
      kit.startReady("loadgen", "bench/loadgen.ts", [], "ready"),
      ...kit.compare.map((module, i) => kit.startRegistry(`registry(${module})`, { ...opts, store: compareServers[i]!.url }, { BENCH_REGISTRY: module })),
    ]);
    const contenders: Contender[] = [
      { name: "memory", reg: memory, runs: [] },
      { name: "pingFloor", reg: floor, store: new StoreProbe(floorServer), runs: [] },
      { name: "redis", reg: redis, store: new StoreProbe(redisServer), runs: [] },
      ...kit.compare.map((module, i) => ({ name: module, reg: others[i]!, store: new StoreProbe(compareServers[i]!), runs: [] })),
    ];
    const none = kit.fleet("none", memory.port, false);
    const cells: Msg[] = [];
    try {
      for (const c of kit.concs) {
        for (const x of contenders) x.runs = [];
        for (let round = 0; round < rounds; round++) {
          const order = round % 2 ? [...contenders].reverse() : contenders;
          for (const x of order) x.runs.push(await measure(kit, x, none, lg.child, c, `h${contenders.indexOf(x)}c${c}r${round}-`));
        }
        const cell = summarize(c, contenders);
        cells.push(cell);
        kit.log(cellLine(cell));
      }
    } finally {
      for (const x of contenders) x.store?.close();
    }
    return { cells, rounds };
  } finally {
    await Promise.all(servers.map((x) => x.kill()));
  }
}

/** One cell of one contender: the registration round trips, and every party's CPU (and the store's commands) per registration. */
async function measure(kit: HaKit, x: Contender, fleet: Fleet, lg: Child, c: number, prefix: string): Promise<Msg> {
  const before = await x.store?.sample();
  const machineBefore = cpuReading();
  const run = await kit.registryCell(x.reg, fleet, lg, c, prefix);
  const machineAfter = cpuReading();
  const after = await x.store?.sample();
  const regs = Math.max(1, Number(run.completedTotal));
  const store = before && after ? { storeCommandsPerReg: (after.commands - before.commands) / regs, storeCpuUsPerReg: ((after.cpuMs - before.cpuMs) * 1000) / regs } : {};
  return { ...run, ...store, loadgenCpuUsPerReg: (Number(run.cpuMs) * 1000) / regs, otherCores: otherCores(machineBefore, machineAfter) };
}

/** A cell's contenders: each one's median round (by throughput) with the medians of its CPU figures, and the ratios to the memory list. */
function summarize(conc: number, contenders: Contender[]): Msg {
  const memory = contenders[0]!.runs;
  const cell: Msg = { conc, rounds: Object.fromEntries(contenders.map((x) => [x.name, x.runs.map((r) => Number(r.throughput))])) };
  const compare: Msg[] = [];
  for (const x of contenders) {
    const summary = {
      ...median(x.runs),
      ...Object.fromEntries(["serverCpuUsPerReq", "loadgenCpuUsPerReg", "storeCpuUsPerReg", "storeCommandsPerReg", "otherCores"].map((k) => [k, medianOf(x.runs.map((r) => Number(r[k])))])),
      // Each round against the memory round measured next to it.
      ratio: medianOf(x.runs.map((r, i) => Number(r.throughput) / Number(memory[i]!.throughput))),
    };
    if (x.name === "memory" || x.name === "pingFloor" || x.name === "redis") cell[x.name] = summary;
    else compare.push({ module: x.name, ...summary });
  }
  cell.ratio = (cell.redis as Msg).ratio;
  if (compare.length) cell.compare = compare;
  return cell;
}

function cellLine(cell: Msg): string {
  const f = (x: Msg) => `${fmt(Number(x.throughput))}/s p99 ${fmt(p99(x))} ms, ${fmt(Number(x.serverCpuUsPerReq))} µs CPU`;
  const store = (x: Msg) => `store ${Number(x.storeCommandsPerReg).toFixed(1)} commands, ${fmt(Number(x.storeCpuUsPerReg))} µs CPU`;
  const [mem, floor, red] = [cell.memory as Msg, cell.pingFloor as Msg, cell.redis as Msg];
  const others = ((cell.compare as Msg[] | undefined) ?? []).map((x) => ` | ${String(x.module)} ${f(x)} (${Number(x.ratio).toFixed(2)}x; ${store(x)})`).join("");
  return (
    `ha registration c=${String(cell.conc)}: memory ${f(mem)} | ping floor ${f(floor)} (${Number(floor.ratio).toFixed(2)}x) | ` +
    `redis ${f(red)} (${Number(red.ratio).toFixed(2)}x; ${store(red)})${others}`
  );
}

/** Registration on A, `joined` at an observer on B; then the same with one registry (memory list). */
async function propagation(kit: HaKit, samples: number): Promise<Msg> {
  await using store = await RedisServer.start();
  const opts = { ...FIXED, heartbeatMs: 60_000, probe: false };
  const [a, b, one] = await Promise.all([
    kit.startRegistry("registry(A)", { ...opts, store: store.url }),
    kit.startRegistry("registry(B)", { ...opts, store: store.url }),
    kit.startRegistry("registry(one)", opts),
  ]);
  const across = await joinToPush(a.port, b.port, samples, "ab");
  const alone = await joinToPush(one.port, one.port, samples, "one");
  kit.log(`ha propagation A->B: p50 ${fmt(across.fromReply.p50)} p99 ${fmt(across.fromReply.p99)} ms | one registry: p50 ${fmt(alone.fromReply.p50)} p99 ${fmt(alone.fromReply.p99)} ms`);
  return { samples, across, alone };
}

/** kill -9 of registry A holding `n` simulated nodes; `stay` more sit on B and watch. */
async function failover(kit: HaKit, n: number, stay: number): Promise<Msg> {
  await using store = await RedisServer.start();
  const hb = DEFAULTS.heartbeatMs;
  const [a, b] = await Promise.all([kit.startRegistry("registry(A)", { ...FIXED, store: store.url }), kit.startRegistry("registry(B)", { ...FIXED, store: store.url })]);
  const moving = kit.fleet("fm", a.port, true, hb, [b.port]);
  const staying = kit.fleet("fs", b.port, true, hb);
  await Promise.all([moving.growTo(n), staying.growTo(stay)]);
  await waitUntil(async () => Number((await b.child.request({ cmd: "stats" }, 5_000)).nodes) === n + stay, 20_000, "B to list every node", 20);

  const killedAt = wallMs();
  a.child.signal("SIGKILL");
  let moved = 0;
  await waitUntil(
    async () => (moved = sum(await Promise.all(moving.children.map((h) => h.request({ cmd: "stats" }, 5_000))), "failedOver")) >= n,
    20_000,
    `${n} nodes to register with B`,
    20,
  ).catch((e: Error) => {
    throw new Error(`${e.message} (${moved} did)`);
  });
  const movedAt = Math.max(...(await Promise.all(moving.children.map((h) => h.request({ cmd: "stats" }, 5_000)))).map((r) => Number(r.lastFailoverAt)));
  const after = await b.child.request({ cmd: "stats" }, 5_000);
  const whole = await Promise.all([...moving.children, ...staying.children].map((h) => h.request({ cmd: "waitSeq", seq: Number(after.seq), timeoutMs: 10_000 }, 15_000)));
  if (!whole.every((r) => r.reached)) throw new Error(`not every session reached seq ${String(after.seq)}`);
  const wholeAt = Math.max(...whole.map((r) => Number(r.t)));
  const r = { nodes: n, observers: stay, registeredMs: movedAt - killedAt, viewsWholeMs: wholeAt - killedAt, listed: Number(after.nodes), swept: Number((after.leaves as Msg).timeout) };
  kit.log(`ha failover of ${n}: all registered with B ${fmt(r.registeredMs)} ms after kill -9, every view whole at ${fmt(r.viewsWholeMs)} ms (${r.swept} swept)`);
  return r;
}

/** kill -9 of the store and a restart empty; until both registries are back and list every node. */
async function storeRestart(kit: HaKit, n: number): Promise<Msg> {
  await using store = await RedisServer.start();
  const hb = DEFAULTS.heartbeatMs;
  const regs = await Promise.all([kit.startRegistry("registry(A)", { ...FIXED, probe: false, store: store.url }), kit.startRegistry("registry(B)", { ...FIXED, probe: false, store: store.url })]);
  await Promise.all(regs.map((r, i) => kit.fleet(`sr${i}-`, r.port, false, hb).growTo(n / 2)));
  const stats = () => Promise.all(regs.map((r) => r.child.request({ cmd: "stats" }, 5_000)));
  const whole = async () => (await stats()).every((s) => s.store === "ok" && Number(s.nodes) === n);
  await waitUntil(whole, 20_000, "both registries to list every node", 20);
  await store.kill();
  await waitUntil(async () => (await stats()).every((s) => s.store === "degraded"), 10_000, "both registries degraded", 20);
  const back = wallMs();
  await store.restart();
  const restartedMs = wallMs() - back;
  await waitUntil(whole, 20_000, "both registries back with every node", 5);
  const r = { nodes: n, wholeMs: wallMs() - back, restartMs: restartedMs };
  kit.log(`ha store restart (${n} nodes): both lists whole ${fmt(r.wholeMs)} ms after the store was started again`);
  return r;
}

/** 3 registries x n sessions with default pings: per-registry RSS and heartbeat CPU; the store's memory, CPU, commands/s. */
async function scale(kit: HaKit, n: number, windowMs: number): Promise<Msg> {
  await using store = await RedisServer.start();
  const hb = DEFAULTS.heartbeatMs;
  const regs = await Promise.all([0, 1, 2].map((i) => kit.startRegistry(`registry(${i})`, { ...FIXED, probe: false, store: store.url })));
  const t = performance.now();
  await Promise.all(regs.map((r, i) => kit.fleet(`sc${i}-`, r.port, false, hb).growTo(n)));
  const registerMs = performance.now() - t;
  const stats = () => Promise.all(regs.map((r) => r.child.request({ cmd: "stats" }, 10_000)));
  await waitUntil(async () => (await stats()).every((s) => Number(s.nodes) === 3 * n), 60_000, "every registry to list every node", 50);
  const probe = new StoreProbe(store);
  try {
    await Bun.sleep(kit.quick ? 300 : 1_000); // the registration burst settles (GC, queued pushes)
    const [a, sa] = await Promise.all([stats(), probe.sample()]);
    await Bun.sleep(windowMs); // the measuring window itself
    const [b, sb] = await Promise.all([stats(), probe.sample()]);
    const gc = await Promise.all(regs.map((r) => r.child.request({ cmd: "gc" }, 20_000)));
    const secs = (Number(b[0]!.t) - Number(a[0]!.t)) / 1000;
    const rows = regs.map((_, i) => ({
      sessions: Number(b[i]!.sessions),
      rss: Number(b[i]!.rss),
      rssAfterGc: Number(gc[i]!.rss),
      heartbeatCpuPct: ((Number(b[i]!.cpuMs) - Number(a[i]!.cpuMs)) / (secs * 1000)) * 100,
      evicted: Number((gc[i]!.leaves as Msg).timeout),
    }));
    const r = {
      perRegistry: n,
      registerMs,
      rows,
      store: {
        usedMemory: sb.usedMemory,
        rss: sb.rss,
        cpuPct: ((sb.cpuMs - sa.cpuMs) / (secs * 1000)) * 100,
        commandsPerSec: (sb.commands - sa.commands) / secs,
        pingsPerSec: (3 * n) / (hb / 1000),
      },
      windowMs: secs * 1000,
    };
    kit.log(
      `ha scale 3 x ${n}: registered in ${fmt(registerMs)} ms; registries RSS ${rows.map((x) => mb(x.rss)).join("/")} MB, heartbeat CPU ${rows.map((x) => x.heartbeatCpuPct.toFixed(2)).join("/")}%; ` +
        `store ${mb(r.store.usedMemory)} MB used (${mb(r.store.rss)} RSS), ${fmt(r.store.commandsPerSec)} commands/s, ${r.store.cpuPct.toFixed(2)}% CPU`,
    );
    return r;
  } finally {
    probe.close();
  }
}

// --- helpers -------------------------------------------------------------------

/**
 * Registers `samples` raw sessions on port `from`, one at a time, and times
 * the `joined` push that an observer registered on `to` gets for each: from
 * the reply to the registering session, and from its `register`.
 */
async function joinToPush(from: number, to: number, samples: number, tag: string): Promise<{ fromReply: ReturnType<typeof dist>; fromRegister: ReturnType<typeof dist> }> {
  const observer = await RawClient.connect(to);
  const fromReply: number[] = [];
  const fromRegister: number[] = [];
  try {
    await observer.send({ type: "register", v: 1, id: `${tag}-observer`, port: 9 });
    await observer.waitFor("registered", 10_000, "the observer's registration");
    for (let k = 0; k < samples; k++) {
      const id = `${tag}-${k}`;
      const c = await RawClient.connect(from);
      try {
        const t0 = performance.now();
        await c.send({ type: "register", v: 1, id, port: 10_000 + k });
        const pushed = observer.waitFor((m) => m.type === "joined" && (m.peer as Msg).id === id, 10_000, `the joined push of ${id}`).then(() => performance.now());
        await c.waitFor("registered", 10_000, `the registration of ${id}`);
        const t1 = performance.now();
        const t2 = await pushed;
        fromReply.push(t2 - t1);
        fromRegister.push(t2 - t0);
      } finally {
        c.destroy();
      }
      await observer.waitFor((m) => m.type === "left" && m.id === id, 10_000, `the left push of ${id}`);
    }
  } finally {
    observer.destroy();
  }
  return { fromReply: dist(fromReply), fromRegister: dist(fromRegister) };
}

/** The store's own figures: commands processed, CPU time, memory. */
class StoreProbe {
  private readonly client: RedisClient;

  constructor(private readonly store: RedisServer) {
    this.client = new RedisClient(store.url);
  }

  async sample(): Promise<{ commands: number; cpuMs: number; usedMemory: number; rss: number }> {
    const info = String(await this.client.send("INFO", ["all"]));
    const field = (name: string) => Number(new RegExp(`^${name}:(\\S+)`, "m").exec(info)?.[1] ?? NaN);
    return {
      commands: field("total_commands_processed"),
      cpuMs: (field("used_cpu_sys") + field("used_cpu_user")) * 1000,
      usedMemory: field("used_memory"),
      rss: rssBytes(this.store.pid ?? 0) ?? field("used_memory_rss"),
    };
  }

  close(): void {
    this.client.close();
  }
}

/** The round with the median throughput. */
function median(runs: Msg[]): Msg {
  return runs.slice().sort((a, b) => Number(a.throughput) - Number(b.throughput))[Math.floor(runs.length / 2)]!;
}

/** The median of the numbers that are numbers (undefined if none). */
function medianOf(xs: number[]): number | undefined {
  const sorted = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  return sorted.length ? sorted[Math.floor(sorted.length / 2)] : undefined;
}

function p99(run: Msg): number {
  return Number((run.latencyMs as Msg).p99);
}

function sum(rows: Msg[], key: string): number {
  return rows.reduce((a, r) => a + Number(r[key]), 0);
}
