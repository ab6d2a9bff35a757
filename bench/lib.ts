/**
 * The child side of the benchmark: each process run.ts starts (registry,
 * floor, load generator, holders, node fleets) answers commands on stdin
 * with JSON lines on stdout, and exits when its stdin closes, so a dead
 * orchestrator leaves nothing behind. Also the statistics both sides use.
 *
 * The measured processes (registry-proc.ts, floor.ts) load this file and
 * nothing else of ours: the harness would add ~12 MB to the floor's RSS.
 */
import { readFileSync } from "node:fs";

export type Msg = Record<string, unknown>;

/** Wall-clock milliseconds with sub-millisecond resolution, comparable across processes. */
export function wallMs(): number {
  return performance.timeOrigin + performance.now();
}

export interface Dist {
  n: number;
  mean: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
  min: number;
}

/** Percentiles (nearest rank) of a sample; all zero for an empty one. */
export function dist(sample: ArrayLike<number>): Dist {
  const a = Float64Array.from(sample).sort();
  const n = a.length;
  if (!n) return { n: 0, mean: 0, p50: 0, p90: 0, p99: 0, max: 0, min: 0 };
  const at = (p: number) => a[Math.min(n - 1, Math.max(0, Math.ceil(p * n) - 1))]!;
  let sum = 0;
  for (const x of a) sum += x;
  return { n, mean: sum / n, p50: at(0.5), p90: at(0.9), p99: at(0.99), max: a[n - 1]!, min: a[0]! };
}

/**
 * Calls `handle` for every command line on stdin and prints its result with
 * the command's id (or `error`); commands run concurrently. Exits when stdin
 * closes, i.e. when the orchestrator is gone.
 */
export async function serveCommands(handle: (cmd: Msg) => Promise<Msg> | Msg): Promise<void> {
  for await (const line of console) {
    let cmd: Msg;
    try {
      cmd = JSON.parse(line) as Msg;
    } catch {
      continue;
    }
    Promise.resolve()
      .then(() => handle(cmd))
      .then(
        (r) => emit({ ...r, id: cmd.id }),
        (e) => emit({ id: cmd.id, error: (e as Error).message }),
      );
  }
  process.exit(0);
}

/** A figure for a log line: three significant digits or so. */
export function fmt(x: number): string {
  return !Number.isFinite(x) ? String(x) : x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2);
}

/** Bytes as megabytes, one decimal. */
export function mb(bytes: number): string {
  return (bytes / 1e6).toFixed(1);
}

/** One JSON line on stdout. */
export function emit(m: Msg): void {
  process.stdout.write(JSON.stringify(m) + "\n");
}

/** CPU time this process has used, ms (user + system). */
export function cpuMs(): number {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
}

/** This process's resident set size (VmRSS), bytes. */
export function selfRss(): number {
  try {
    return Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync("/proc/self/status", "utf8"))![1]) * 1024;
  } catch {
    return process.memoryUsage().rss; // no /proc: not Linux
  }
}

/**
 * Connect options that bind the local address (a loopback alias such as
 * 127.0.2.1), so a server counts the connection as another host's.
 * Bun.connect takes `localAddress` although its types do not list it
 * (verified on Bun 1.4.4); callers check the registry saw that address
 * (selfHostIs), so a Bun that ignores it fails loudly.
 */
export function fromAddress(address: string | undefined): { localAddress?: string } {
  return address && address !== "127.0.0.1" ? { localAddress: address } : {};
}

/** Whether a `registered` reply's first chunk lists the node under `host` (`self` comes before the peer list). */
export function selfHostIs(reply: Uint8Array, host: string): boolean {
  const text = Buffer.from(reply.buffer, reply.byteOffset, Math.min(reply.byteLength, 600)).toString();
  const at = text.indexOf('"self":');
  return at >= 0 && text.slice(at, at + 200).includes(`"host":"${host}"`);
}
