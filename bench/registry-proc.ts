/**
 * A registry under test, in its own process: startRegistry on 127.0.0.1 with
 * the options given as JSON in argv[2], no event printing (the library's cost,
 * not the log's), except the events named in `events`, printed with a wall
 * clock time; `tls` ({cert, key, meshCa?}: files) puts its port in TLS.
 * Prints {"event":"listening","port":N,"pid":N} first.
 *
 * Commands on stdin: {"cmd":"stats"} -> CPU time, RSS, heap, registry stats;
 * {"cmd":"gc"} -> full GC first, then the same.
 */
import { tls, type TlsOptions } from "../net.ts";
import type { RegistryOptions, startRegistry as Start } from "../registry.ts";
import { cpuMs, emit, selfRss, serveCommands, wallMs } from "./lib.ts";

// BENCH_REGISTRY=/path/to/registry.ts measures another version (before/after comparisons).
const { startRegistry } = (await import(process.env.BENCH_REGISTRY || "../registry.ts")) as { startRegistry: typeof Start };

const opts = JSON.parse(process.argv[2] ?? "{}") as RegistryOptions & { events?: string[]; tls?: TlsOptions };
const wanted = new Set(opts.events ?? []);
const transport = opts.tls ? tls(opts.tls) : undefined;
delete opts.events;
delete opts.tls;

const registry = await startRegistry({
  port: 0,
  ...opts,
  transport,
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
