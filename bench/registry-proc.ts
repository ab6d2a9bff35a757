/**
 * A registry under test, in its own process: startRegistry on 127.0.0.1 with
 * the options given as JSON in argv[2], no event printing (the library's cost,
 * not the log's), except the events named in `events`, printed with a wall
 * clock time. Prints {"event":"listening","port":N,"pid":N} first (and
 * `httpPort` with `http: true`: the status server on 127.0.0.1 too).
 *
 * With `sampleLag: true` a timer in this process measures its own lateness
 * (the event loop's stalls, whatever caused them), and RSS and unsent bytes
 * are sampled as well; `{"cmd":"window"}` returns their worst since the last
 * window and starts a new one.
 *
 * Commands on stdin: {"cmd":"stats"} -> CPU time, RSS, heap, registry stats;
 * {"cmd":"gc"} -> full GC first, then the same; {"cmd":"window"}.
 */
import type { RegistryOptions, startRegistry as Start } from "../registry.ts";
import { cpuMs, dist, emit, selfRss, serveCommands, wallMs, type Msg } from "./lib.ts";

/** The lag sampler's period, ms: fine enough to see a 20 ms turn, cheap enough not to be one. */
const TICK_MS = 10;
/** RSS and unsent bytes are read every this many ticks (stats() sorts its latency window: ~0.3 ms). */
const SAMPLE_EVERY = 10;

/**
 * The event loop's stalls as this process sees them: a timer due every
 * TICK_MS records how late it ran (a turn that took 300 ms makes it 300 ms
 * late, whatever held the loop). Every SAMPLE_EVERY ticks it also reads RSS
 * and the registry's unsent bytes, for their peaks.
 */
class LoopSampler {
  private last = performance.now();
  private lateMs: number[] = [];
  private rssPeak = 0;
  private unsentPeak = 0;
  private ticks = 0;

  constructor(private readonly unsentBytes: () => number) {
    setInterval(() => this.tick(), TICK_MS).unref();
  }

  window(): Msg {
    this.sample();
    const late = dist(this.lateMs);
    const w = { lagMaxMs: late.max, lagP99Ms: late.p99, lagSamples: late.n, rssPeak: this.rssPeak, unsentPeak: this.unsentPeak };
    this.lateMs = [];
    this.rssPeak = 0;
    this.unsentPeak = 0;
    return w;
  }

  private tick(): void {
    const t = performance.now();
    this.lateMs.push(Math.max(0, t - this.last - TICK_MS));
    this.last = t;
    if (++this.ticks % SAMPLE_EVERY === 0) this.sample();
  }

  private sample(): void {
    this.rssPeak = Math.max(this.rssPeak, selfRss());
    this.unsentPeak = Math.max(this.unsentPeak, this.unsentBytes());
  }
}

// BENCH_REGISTRY=/path/to/registry.ts measures another version (before/after comparisons).
const { startRegistry } = (await import(process.env.BENCH_REGISTRY || "../registry.ts")) as { startRegistry: typeof Start };

const opts = JSON.parse(process.argv[2] ?? "{}") as RegistryOptions & { events?: string[]; http?: boolean; sampleLag?: boolean };
const wanted = new Set(opts.events ?? []);
const { http, sampleLag } = opts;
delete opts.events;
delete opts.http;
delete opts.sampleLag;

const registry = await startRegistry({
  port: 0,
  ...opts,
  host: "127.0.0.1",
  onEvent: wanted.size
    ? (e) => {
        if (wanted.has(e.event)) emit({ ...e, t: wallMs() });
      }
    : undefined,
});
// Loaded only when asked for, so that the other phases measure the registry alone.
const status = http ? (await import("../status.ts")).startStatusServer(registry, { port: 0, host: "127.0.0.1" }) : undefined;
const sampler = sampleLag ? new LoopSampler(() => registry.stats().unsentBytes) : undefined;

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
