/**
 * A registry under test, in its own process: startRegistry on 127.0.0.1 with
 * the options given as JSON in argv[2], no event printing (the library's cost,
 * not the log's), except the events named in `events`, printed with a wall
 * clock time. With `store` (a redis:// URL) the list is shared through it, as
 * `--store` does (with BENCH_REGISTRY, through the redis.ts next to that
 * registry.ts); with `pingFloor` (a redis:// URL) the list is in memory and
 * each join waits for one PING to that server (bench/ping-floor.ts). Prints
 * {"event":"listening","port":N,"pid":N} first (and `httpPort` with
 * `http: true`: the status server on 127.0.0.1 too). `tls` ({cert, key,
 * meshCa?}: files) puts its port in TLS.
 *
 * With `sampleLag: true` a timer in this process measures its own lateness
 * (the event loop's stalls, whatever caused them), and RSS and unsent bytes
 * are sampled as well; `{"cmd":"window"}` returns their worst since the last
 * window and starts a new one.
 *
 * Commands on stdin: {"cmd":"stats"} -> CPU time, RSS, heap, registry stats;
 * {"cmd":"gc"} -> full GC first, then the same; {"cmd":"window"}.
 */
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { tcp, type Conn, type Transport } from "../net.ts";
import { tls, type TlsOptions } from "../tls.ts";
import type { RegistryOptions, startRegistry as Start } from "../registry.ts";
import { cpuMs, dist, emit, selfRss, serveCommands, wallMs, type Msg } from "./lib.ts";

/** The lag sampler's period, ms: fine enough to see a 20 ms turn, cheap enough not to be one. */
const TICK_MS = 10;
/** RSS and unsent bytes are read every this many ticks (stats() sorts its latency window: ~0.3 ms). */
const SAMPLE_EVERY = 10;

/**
 * The event loop's stalls as this process sees them: a timer due every
 * TICK_MS records how late it ran (a turn that took 300 ms makes it 300 ms
 * late, whatever held the loop). The socket handlers' time since the last
 * tick is added up by source (see timedTransport), so the worst stall comes
 * with what ran in it, and with what the kernel's scheduler says of the
 * event loop's thread meanwhile (/proc/thread-self/schedstat, in ns): how
 * long it ran (handlers, timers such as the fan-out, GC) and how long it was
 * runnable but waiting for a core; the rest it was blocked or idle. Every SAMPLE_EVERY ticks it also reads RSS and
 * the registry's unsent bytes, for their peaks.
 */
class LoopSampler {
  /** Handler time since the last tick, ms, by source ("127.0.0.2", "127.0.2.x"). */
  readonly handlerMs = new Map<string, number>();
  private last = performance.now();
  private lateMs: number[] = [];
  private worst: Stall = { lateMs: 0, ranMs: 0, queuedMs: 0, handlerMs: {} };
  private lastSched = schedStat();
  private windowSched = schedStat();
  private rssPeak = 0;
  private unsentPeak = 0;
  private ticks = 0;

  /** The registry's unsent bytes; set once it runs. */
  unsentBytes: () => number = () => 0;

  constructor() {
    setInterval(() => this.tick(), TICK_MS).unref();
  }

  window(): Msg {
    this.sample();
    const late = dist(this.lateMs);
    const sched = schedStat();
    // Over the whole window: how long the event loop's thread ran, and how long it was ready to run but had no core.
    const thread = { ranMs: Math.round(sched.ranMs - this.windowSched.ranMs), queuedMs: Math.round(sched.queuedMs - this.windowSched.queuedMs) };
    this.windowSched = sched;
    const w = { lagMaxMs: late.max, lagP99Ms: late.p99, lagSamples: late.n, worstStall: this.worst, thread, rssPeak: this.rssPeak, unsentPeak: this.unsentPeak };
    this.lateMs = [];
    this.worst = { lateMs: 0, ranMs: 0, queuedMs: 0, handlerMs: {} };
    this.rssPeak = 0;
    this.unsentPeak = 0;
    return w;
  }

  private tick(): void {
    const t = performance.now();
    const late = Math.max(0, t - this.last - TICK_MS);
    const sched = schedStat();
    this.lateMs.push(late);
    if (late > this.worst.lateMs) {
      const handlerMs = Object.fromEntries([...this.handlerMs].map(([k, v]) => [k, Math.round(v * 10) / 10]));
      const ranMs = Math.round((sched.ranMs - this.lastSched.ranMs) * 10) / 10;
      const queuedMs = Math.round((sched.queuedMs - this.lastSched.queuedMs) * 10) / 10;
      this.worst = { lateMs: late, ranMs, queuedMs, handlerMs };
    }
    this.lastSched = sched;
    this.handlerMs.clear();
    this.last = t;
    if (++this.ticks % SAMPLE_EVERY === 0) this.sample();
  }

  private sample(): void {
    this.rssPeak = Math.max(this.rssPeak, selfRss());
    this.unsentPeak = Math.max(this.unsentPeak, this.unsentBytes());
  }
}

interface Stall {
  lateMs: number;
  ranMs: number;
  queuedMs: number;
  handlerMs: Record<string, number>;
}

/** This thread's time on a core and waiting for one, ms (zeros off Linux). */
function schedStat(): { ranMs: number; queuedMs: number } {
  try {
    const [ran, queued] = readFileSync("/proc/thread-self/schedstat", "utf8").split(" ").map(Number);
    return { ranMs: ran! / 1e6, queuedMs: queued! / 1e6 };
  } catch {
    return { ranMs: 0, queuedMs: 0 };
  }
}

/** Plain TCP whose listeners' handlers are timed, adding each call's time to `into` under its source. */
function timedTransport(into: Map<string, number>): Transport {
  const source = (addr: string) => (addr.startsWith("127.0.0.") ? addr : addr.replace(/\.\d+$/, ".x"));
  return {
    ...tcp,
    listen: (host, port, handlers) => {
      const timed = { ...handlers };
      for (const name of ["open", "data", "drain", "close"] as const) {
        const fn = handlers[name] as ((socket: Bun.Socket<Conn<unknown>>, ...rest: unknown[]) => void) | undefined;
        if (!fn) continue;
        (timed as Record<string, unknown>)[name] = (socket: Bun.Socket<Conn<unknown>>, ...rest: unknown[]) => {
          const t = performance.now();
          // Read before the call: Bun clears the remote address once a socket closed.
          const from = source(socket.data?.remoteAddress ?? socket.remoteAddress ?? "?");
          try {
            fn(socket, ...rest);
          } finally {
            into.set(from, (into.get(from) ?? 0) + performance.now() - t);
          }
        };
      }
      return tcp.listen(host, port, timed as typeof handlers);
    },
  };
}

// BENCH_REGISTRY=/path/to/registry.ts measures another version (before/after comparisons), with the redis.ts next to it.
const registryModule = process.env.BENCH_REGISTRY || "../registry.ts";
const { startRegistry } = (await import(registryModule)) as { startRegistry: typeof Start };

const opts = JSON.parse(process.argv[2] ?? "{}") as RegistryOptions & { events?: string[]; http?: boolean; sampleLag?: boolean; store?: string; pingFloor?: string; tls?: TlsOptions };
const wanted = new Set(opts.events ?? []);
const { http, sampleLag, store, pingFloor } = opts;
const secure = opts.tls ? tls(opts.tls) : undefined;
delete opts.events;
delete opts.http;
delete opts.sampleLag;
delete opts.store;
delete opts.tls;
delete opts.pingFloor;
// Loaded only when asked for: the memory registry's RSS is measured without them.
const membership = store
  ? await ((await import(join(dirname(registryModule), "redis.ts"))) as typeof import("../redis.ts")).openStore(store, { registryId: crypto.randomUUID().slice(0, 8) })
  : pingFloor
    ? await (await import("./ping-floor.ts")).PingFloor.open(pingFloor)
    : undefined;

const sampler = sampleLag ? new LoopSampler() : undefined;
const registry = await startRegistry({
  port: 0,
  ...opts,
  membership,
  ...(sampler ? { transport: timedTransport(sampler.handlerMs) } : secure ? { transport: secure } : {}),
  host: "127.0.0.1",
  onEvent: wanted.size
    ? (e) => {
        if (wanted.has(e.event)) emit({ ...e, t: wallMs() });
      }
    : undefined,
});
if (sampler) sampler.unsentBytes = () => registry.stats().unsentBytes;
// Loaded only when asked for, so that the other phases measure the registry alone.
const status = http ? (await import("../status.ts")).startStatusServer(registry, { port: 0, host: "127.0.0.1" }) : undefined;

emit({ event: "listening", port: registry.port, httpPort: status?.port, pid: process.pid, t: wallMs() });

serveCommands(async (cmd) => {
  if (cmd.cmd === "gc") Bun.gc(true);
  if (cmd.cmd === "stats" || cmd.cmd === "gc") return stats();
  if (cmd.cmd === "window") {
    if (!sampler) throw new Error("started without sampleLag");
    return { ...stats(), ...sampler.window() };
  }
  throw new Error(`unknown command ${String(cmd.cmd)}`);
});

function stats(): Msg {
  const s = registry.stats();
  const mem = process.memoryUsage();
  return {
    cpuMs: cpuMs(),
    rss: selfRss(),
    heapUsed: mem.heapUsed,
    nodes: s.nodes,
    sessions: s.sessions,
    store: s.store,
    seq: s.seq,
    registrations: s.registrations,
    rejected: s.rejected,
    leaves: s.leaves,
    latencyMs: s.latencyMs,
    unsentBytes: s.unsentBytes,
    maxUnsentBytes: s.maxUnsentBytes,
    coalescedSyncs: s.coalescedSyncs,
    stalledMs: s.stalledMs,
    t: wallMs(),
  };
}
