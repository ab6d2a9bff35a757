/**
 * A registry under test, in its own process: startRegistry on 127.0.0.1 with
 * the options given as JSON in argv[2], no event printing (the library's cost,
 * not the log's), except the events named in `events`, printed with a wall
 * clock time. With `store` (a redis:// URL) the list is shared through it, as
 * `--store` does. Prints {"event":"listening","port":N,"pid":N} first.
 *
 * Commands on stdin: {"cmd":"stats"} -> CPU time, RSS, heap, registry stats;
 * {"cmd":"gc"} -> full GC first, then the same.
 */
import type { RegistryOptions, startRegistry as Start } from "../registry.ts";
import { cpuMs, emit, selfRss, serveCommands, wallMs } from "./lib.ts";

// BENCH_REGISTRY=/path/to/registry.ts measures another version (before/after comparisons).
const { startRegistry } = (await import(process.env.BENCH_REGISTRY || "../registry.ts")) as { startRegistry: typeof Start };

const opts = JSON.parse(process.argv[2] ?? "{}") as RegistryOptions & { events?: string[]; store?: string };
const wanted = new Set(opts.events ?? []);
const store = opts.store;
delete opts.events;
delete opts.store;
// Loaded only when asked for: the memory registry's RSS is measured without it.
const membership = store ? await (await import("../redis.ts")).openStore(store, { registryId: crypto.randomUUID().slice(0, 8) }) : undefined;

const registry = await startRegistry({
  port: 0,
  ...opts,
  membership,
  host: "127.0.0.1",
  onEvent: wanted.size
    ? (e) => {
        if (wanted.has(e.event)) emit({ ...e, t: wallMs() });
      }
    : undefined,
});

emit({ event: "listening", port: registry.port, pid: process.pid, t: wallMs() });

serveCommands(async (cmd) => {
  if (cmd.cmd === "gc") Bun.gc(true);
  if (cmd.cmd === "stats" || cmd.cmd === "gc") {
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
      t: wallMs(),
    };
  }
  throw new Error(`unknown command ${String(cmd.cmd)}`);
});
