/**
 * Test fixtures: real registry and node processes with their --json events
 * parsed, in-process event collectors, and waiting for an event (never for
 * time) under a deadline that names what was awaited.
 */
import { join } from "node:path";
import type { EventRecord } from "../protocol.ts";

export const ROOT = join(import.meta.dir, "..");

type Pred = (e: EventRecord) => boolean;

/** Collects events and lets a test wait for one, past or future, with a deadline. */
export class EventLog {
  readonly events: EventRecord[] = [];
  private waiters = new Set<{ pred: Pred; resolve: (e: EventRecord) => void }>();

  /** Pass as `onEvent` to startRegistry/startNode. */
  readonly push = (e: EventRecord): void => {
    this.events.push(e);
    for (const w of this.waiters) {
      if (w.pred(e)) {
        this.waiters.delete(w);
        w.resolve(e);
      }
    }
  };

  /** Events with this name, in order. */
  named(event: string): EventRecord[] {
    return this.events.filter((e) => e.event === event);
  }

  /** Resolves with the first event (already seen or still to come) matching `pred`. */
  waitFor(pred: Pred | string, timeoutMs = 10_000, what?: string): Promise<EventRecord> {
    const p: Pred = typeof pred === "string" ? (e) => e.event === pred : pred;
    const seen = this.events.find(p);
    if (seen) return Promise.resolve(seen);
    return withDeadline(
      new Promise<EventRecord>((resolve) => this.waiters.add({ pred: p, resolve })),
      timeoutMs,
      what ?? (typeof pred === "string" ? `event ${pred}` : "matching event"),
    );
  }

  /** Resolves once `count` events match. */
  async waitForCount(pred: Pred | string, count: number, timeoutMs = 10_000, what?: string): Promise<EventRecord[]> {
    const p: Pred = typeof pred === "string" ? (e) => e.event === pred : pred;
    await waitUntil(() => this.events.filter(p).length >= count, timeoutMs, what ?? `${count} x ${String(pred)}`);
    return this.events.filter(p);
  }
}

/** Rejects with a message naming `what` if `promise` has not settled in time. */
export async function withDeadline<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: Timer | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms}ms waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Waits until `cond` holds, checking it on every loop turn that has work and
 * at least every 5 ms; for state that has no event of its own (a registry's
 * list, a process table).
 */
export async function waitUntil(cond: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = performance.now() + ms;
  while (!cond()) {
    if (performance.now() > deadline) throw new Error(`timed out after ${ms}ms waiting for ${what}`);
    await Bun.sleep(5);
  }
}

/** A running script with its --json events. */
export class Proc {
  readonly log = new EventLog();
  readonly stderr: string[] = [];
  private stdoutDone: Promise<void>;
  private stderrDone: Promise<void>;

  constructor(readonly proc: Bun.Subprocess<"ignore", "pipe", "pipe">, readonly label: string) {
    this.stdoutDone = readLines(proc.stdout, (line) => {
      try {
        this.log.push(JSON.parse(line) as EventRecord);
      } catch {
        this.stderr.push(`stdout: ${line}`);
      }
    });
    this.stderrDone = readLines(proc.stderr, (line) => this.stderr.push(line));
  }

  get pid(): number {
    return this.proc.pid;
  }

  /** Sends a signal (default SIGKILL) and waits for the exit. */
  async kill(signal: NodeJS.Signals | number = "SIGKILL"): Promise<number> {
    this.proc.kill(signal);
    return this.exited();
  }

  signal(signal: NodeJS.Signals): void {
    this.proc.kill(signal);
  }

  async exited(): Promise<number> {
    const code = await this.proc.exited;
    await Promise.all([this.stdoutDone, this.stderrDone]);
    return code;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    if (this.proc.exitCode === null && this.proc.signalCode === null) {
      // A stopped process ignores SIGKILL until continued on some kernels' views of ps; continue it first.
      this.proc.kill("SIGCONT");
      this.proc.kill("SIGKILL");
    }
    await this.exited();
  }
}

async function readLines(stream: ReadableStream<Uint8Array>, onLine: (line: string) => void): Promise<void> {
  const decoder = new TextDecoder();
  let rest = "";
  const reader = stream.getReader();
  for (;;) {
    const { value: chunk, done } = await reader.read();
    if (done) break;
    rest += decoder.decode(chunk, { stream: true });
    let nl: number;
    while ((nl = rest.indexOf("\n")) >= 0) {
      const line = rest.slice(0, nl);
      rest = rest.slice(nl + 1);
      if (line.trim()) onLine(line);
    }
  }
  if (rest.trim()) onLine(rest);
}

/** Starts `bun <script> ...args` from the project root with stdout/stderr piped. */
export function spawnScript(script: string, args: string[], env: Record<string, string> = {}, label = script): Proc {
  const proc = Bun.spawn([process.execPath, join(ROOT, script), ...args], {
    cwd: ROOT,
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
    env: { ...process.env, NO_COLOR: "1", ...env },
  });
  return new Proc(proc, label);
}

/** A registry process on 127.0.0.1 and a free port; resolves once it listens. */
export async function spawnRegistry(args: string[] = [], env: Record<string, string> = {}): Promise<Proc & { port: number }> {
  const p = spawnScript("registry.ts", ["127.0.0.1", "0", "--json", ...args], env, "registry");
  const e = await p.log.waitFor("listening", 15_000, "registry to listen").catch(async (err) => {
    await p[Symbol.asyncDispose]();
    throw new Error(`${(err as Error).message}; stderr: ${p.stderr.join("\n")}`);
  });
  return Object.assign(p, { port: Number(e.port) });
}

/** A node process; resolves once it is registered (its `listening` event gives id and port). */
export async function spawnNode(
  registryPort: number,
  args: string[] = [],
  env: Record<string, string> = {},
  registryHost = "127.0.0.1",
): Promise<Proc & { id: string; port: number }> {
  const p = spawnScript("client.ts", [registryHost, String(registryPort), "--json", ...args], env, "node");
  try {
    const l = await p.log.waitFor("listening", 15_000, "node to listen");
    await p.log.waitFor("registered", 15_000, "node to register");
    return Object.assign(p, { id: String(l.id), port: Number(l.port) });
  } catch (err) {
    await p[Symbol.asyncDispose]();
    throw new Error(`${(err as Error).message}; stderr: ${p.stderr.join("\n")}`);
  }
}

/** Disposes every fixture even if some fail; for finally blocks and afterEach. */
export async function disposeAll(items: Iterable<AsyncDisposable | undefined>): Promise<void> {
  await Promise.allSettled(Array.from(items, (i) => i?.[Symbol.asyncDispose]()));
}

/** Asserts the full-mesh property over greeting events: every pair exactly once. */
export function meshProblems(ids: string[], greetedBy: Map<string, string[]>): string[] {
  const problems: string[] = [];
  const count = new Map<string, number>();
  for (const [from, tos] of greetedBy) {
    for (const to of tos) {
      const key = [from, to].sort().join("~");
      count.set(key, (count.get(key) ?? 0) + 1);
    }
  }
  for (let i = 0; i < ids.length; i++) {
    for (let j = i + 1; j < ids.length; j++) {
      const key = [ids[i]!, ids[j]!].sort().join("~");
      const n = count.get(key) ?? 0;
      if (n !== 1) problems.push(`${key}: ${n} greetings`);
    }
  }
  return problems;
}
