/**
 * Test fixtures: real registry and node processes with their --json events
 * parsed, in-process event collectors, and waiting for an event (never for
 * time) under a deadline that names what was awaited.
 */
import { join } from "node:path";
import { command as nodeCommand } from "../client.ts";
import type { EventRecord } from "../cli.ts";
import { command as registryCommand } from "../registry.ts";

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

export async function readLines(stream: ReadableStream<Uint8Array>, onLine: (line: string) => void): Promise<void> {
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

/**
 * The scripts' environment variables, read from the `[env NAME` of their flags'
 * descriptions (what --help and the README show), so a new flag is covered
 * without a second list; Node's and Bun's own NODE_ENV, NODE_OPTIONS stay.
 */
const OWN_SETTINGS = new Set([
  "CONSOLA_LEVEL",
  ...[registryCommand, nodeCommand].flatMap((c) =>
    Object.values((c.args ?? {}) as Record<string, { description?: string }>).flatMap((a) =>
      [...String(a.description).matchAll(/\benv ([A-Z_]+)/g)].map((m) => m[1]!),
    ),
  ),
]);

/**
 * Starts `bun <script> ...args` from the project root with stdout/stderr piped,
 * after `prefix` if given (`ip netns exec NS`, which execs, so the pid stays bun's).
 * The scripts' own settings (REGISTRY_*, NODE_*, LOG_JSON, CONSOLA_LEVEL) come
 * only from `env`: one exported in the developer's shell (a NODE_ID, a
 * REGISTRY_TOKEN) must not change what a test starts.
 */
export function spawnScript(script: string, args: string[], env: Record<string, string> = {}, label = script, prefix: string[] = []): Proc {
  const inherited = Object.fromEntries(Object.entries(process.env).filter(([k]) => !OWN_SETTINGS.has(k)));
  const proc = Bun.spawn([...prefix, process.execPath, join(ROOT, script), ...args], {
    cwd: ROOT,
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
    env: { ...inherited, NO_COLOR: "1", ...env },
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

/** A message as a raw client saw it: parsed JSON, or `{ type: "(not json)", line }`. */
export type WireMessage = { type?: unknown } & Record<string, unknown>;

/**
 * A raw NDJSON TCP client for precise and hostile tests: writes exactly the
 * bytes it is given (queued on partial writes, flushed on drain), splits what
 * it receives on 0x0A itself, and lets a test wait for a message under a
 * deadline. With `collect: false` it only counts bytes (bulk clients that
 * must keep reading but whose traffic is not under test).
 */
export class RawClient implements AsyncDisposable {
  readonly messages: WireMessage[] = [];
  bytesReceived = 0;
  closed = false;
  private socket!: Bun.Socket<RawClient>;
  private parts: Uint8Array[] = [];
  private out: Uint8Array[] = [];
  private listeners = new Set<() => void>();
  private readonly closedSignal = Promise.withResolvers<void>();
  private static readonly decoder = new TextDecoder();

  private constructor(readonly collect: boolean) {}

  static async connect(port: number, opts: { host?: string; collect?: boolean; timeoutMs?: number } = {}): Promise<RawClient> {
    const client = new RawClient(opts.collect ?? true);
    await withDeadline(
      Bun.connect<RawClient>({ hostname: opts.host ?? "127.0.0.1", port, data: client, socket: rawHandlers }),
      opts.timeoutMs ?? 5_000,
      `raw connection to port ${port}`,
    );
    return client;
  }

  /** Writes bytes or text as is (add the "\n" yourself). False once closed. */
  write(data: string | Uint8Array): boolean {
    if (this.closed) return false;
    const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
    if (this.out.length) {
      this.out.push(bytes);
      return true;
    }
    const n = this.socket.write(bytes);
    if (n < 0) return false;
    if (n < bytes.byteLength) this.out.push(bytes.subarray(n));
    return true;
  }

  /** One JSON message plus newline. */
  send(msg: object): boolean {
    return this.write(JSON.stringify(msg) + "\n");
  }

  /** Writes one byte per loop turn, so the peer reads the data in many small chunks. */
  async writeSlowly(data: string | Uint8Array): Promise<void> {
    const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
    for (const b of bytes) {
      this.write(Uint8Array.of(b));
      await new Promise((r) => setImmediate(r));
    }
  }

  /** First message (already received or still to come) matching `pred`; rejects early if the connection closes first. */
  waitFor(pred: ((m: WireMessage) => boolean) | string, timeoutMs = 10_000, what?: string): Promise<WireMessage> {
    const p = typeof pred === "string" ? (m: WireMessage) => m.type === pred : pred;
    const label = what ?? (typeof pred === "string" ? `message ${pred}` : "matching message");
    return withDeadline(
      new Promise<WireMessage>((resolve, reject) => {
        const check = () => {
          const found = this.messages.find(p);
          if (found) {
            this.listeners.delete(check);
            resolve(found);
          } else if (this.closed) {
            this.listeners.delete(check);
            reject(new Error(`connection closed before ${label}; got: ${JSON.stringify(this.messages).slice(0, 2000)}`));
          }
        };
        this.listeners.add(check);
        check();
      }),
      timeoutMs,
      label,
    );
  }

  /** Resolves when the peer (or we) closed the connection. */
  waitClosed(timeoutMs = 10_000): Promise<void> {
    return withDeadline(this.closedSignal.promise, timeoutMs, "connection to close");
  }

  /** Stops reading: the peer's writes back up into the kernel buffers, then its own queue. */
  pause(): void {
    this.socket.pause();
  }

  resume(): void {
    this.socket.resume();
  }

  /** Local port of this connection (what the other side sees as its remote port). */
  get localPort(): number {
    return this.socket.localPort;
  }

  /** Closes with a reset, as a crashed peer would. */
  destroy(): void {
    if (!this.closed) this.socket.terminate();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.destroy();
    await this.waitClosed(2_000).catch(() => {});
  }

  /** @internal */ attach(socket: Bun.Socket<RawClient>): void {
    this.socket = socket;
  }

  /** @internal */ onData(chunk: Uint8Array): void {
    this.bytesReceived += chunk.byteLength;
    if (!this.collect) return;
    let start = 0;
    for (let nl = chunk.indexOf(10); nl >= 0; nl = chunk.indexOf(10, start)) {
      this.parts.push(chunk.subarray(start, nl));
      start = nl + 1;
      const line = RawClient.decoder.decode(Buffer.concat(this.parts)).replace(/\r$/, "");
      this.parts = [];
      if (!line) continue;
      try {
        this.messages.push(JSON.parse(line) as WireMessage);
      } catch {
        this.messages.push({ type: "(not json)", line });
      }
    }
    if (start < chunk.byteLength) this.parts.push(chunk.slice(start));
    this.notify();
  }

  /** @internal */ onDrain(): void {
    while (this.out.length) {
      const head = this.out[0]!;
      const n = this.socket.write(head);
      if (n < 0) return;
      if (n < head.byteLength) {
        this.out[0] = head.subarray(n);
        return;
      }
      this.out.shift();
    }
  }

  /** @internal */ onClose(): void {
    this.closed = true;
    this.closedSignal.resolve();
    this.notify();
  }

  private notify(): void {
    for (const fn of [...this.listeners]) fn();
  }
}

const rawHandlers: Bun.SocketHandler<RawClient> = {
  open(socket) {
    socket.data.attach(socket);
    socket.setNoDelay(true);
  },
  data(socket, chunk) {
    socket.data.onData(chunk);
  },
  drain(socket) {
    socket.data.onDrain();
  },
  close(socket) {
    socket.data.onClose();
  },
  error(socket) {
    socket.terminate();
  },
};

/** mulberry32: a tiny, fast 32-bit PRNG; good enough to pick fuzz inputs and chaos actions and fully determined by its seed. */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
