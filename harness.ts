/**
 * The one harness for tests, scripts, benchmarks and the demo: processes
 * with their --json events parsed, waits for an event (never for time) under
 * a deadline that names what was awaited, a raw NDJSON client over TCP or
 * TLS, a probe responder, the seeded PRNG, and the mesh check. It drives the
 * product from outside (processes, sockets, start functions); nothing in the
 * product imports it.
 */
import { defineCommand, runMain, type ArgsDef, type CommandMeta, type ParsedArgs } from "citty";
import net from "node:net";
import nodeTls from "node:tls";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { makeCerts, type CertSet } from "./certs.ts";
import { checkFlags, runCli } from "./cli.ts";
import { command as nodeCommand, startNode, type NodeEvent, type NodeOptions, type PeerNode } from "./client.ts";
import type { Clock } from "./liveness.ts";
import { PROTOCOL_VERSION } from "./protocol.ts";
import { tcp, type Conn, type Transport } from "./net.ts";
import { tls, type TlsTransport } from "./tls.ts";
import { command as registryCommand, startRegistry, type CliEvent, type Registry, type RegistryEvent, type RegistryOptions } from "./registry.ts";

/** The project root: where the scripts are started from. */
export const ROOT = import.meta.dir;

/** An event as a script prints it with --json; typed loosely, since it comes back from a pipe. */
export type JsonEvent = { event: string } & Record<string, unknown>;

/** A message as a raw client saw it: parsed JSON, or `{ type: "(not json)", line }`. */
export type WireMessage = { type?: unknown } & Record<string, unknown>;

// --- waits -------------------------------------------------------------------

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
 * Waits until `cond` holds, checking it every `everyMs`: for state that has
 * no event of its own (a registry's list, a process table, a container's
 * health). A throw from `cond` ends the wait with it.
 */
export async function waitUntil(cond: () => boolean | Promise<boolean>, ms: number, what: string, everyMs = 5): Promise<void> {
  const deadline = performance.now() + ms;
  while (!(await cond())) {
    if (performance.now() > deadline) throw new Error(`timed out after ${ms}ms waiting for ${what}`);
    await Bun.sleep(everyMs);
  }
}

/** Whether two lists hold the same items in the same order: the test of a list polled until it is what was expected. */
export function same(a: string[], b: string[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

/**
 * A test of an item. Declared as a method, whose parameter is bivariant, so
 * a log of one role's events passes where a log of any events is taken.
 */
type Pred<T> = { test(item: T): boolean }["test"];

/**
 * The members of `T` whose `K` can be `V`. Not `Extract<T, { [k in K]: V }>`:
 * that is `never` for a loosely typed item (`event: string`), where every
 * item can match.
 */
export type Having<T, K extends PropertyKey, V> = T extends { [k in K]?: infer X } ? (V extends X ? T : never) : never;

/** Whether an item's `key` field is `value`: the one place that field is trusted to say which member of `T` an item is. */
function having<T, K extends keyof T, V extends T[K]>(key: K, value: V): (i: T) => i is Having<T, K, V> {
  return (i): i is Having<T, K, V> => i[key] === value;
}

/**
 * Items that arrive over time (a process's events, a connection's messages),
 * and waits for them, past or future, under a deadline. Once the source ends
 * (the process exited, the connection closed), a wait for what is not there
 * fails at once, saying why. A wait or filter by a value of the key field
 * (`waitFor("pong")`) accepts only values `T` has, and yields the members
 * of `T` that have it.
 */
export class Feed<T extends object, K extends keyof T & string> {
  readonly items: T[] = [];
  private ended: string | undefined;
  private readonly wakers = new Set<() => void>();

  /** `key` is the field a string predicate names: `waitFor("pong")` is `waitFor((m) => m.type === "pong")`. */
  constructor(private readonly key: K) {
    // Bound, so it can be passed as a callback (`onEvent: log.push`); a method
    // rather than an arrow property, so a log of one role's events still
    // passes where a log of any events is taken (method parameters are bivariant).
    this.push = this.push.bind(this);
  }

  /** Adds an item. */
  push(item: T): void {
    this.items.push(item);
    this.wake();
  }

  /** No more items will come; `why` goes into the message of every wait that cannot be met. */
  end(why: string): void {
    this.ended ??= why;
    this.wake();
  }

  /** Items whose key field is `value`, in order. */
  named<V extends T[K] & string>(value: V): Having<T, K, V>[] {
    return this.items.filter(having(this.key, value));
  }

  /** Resolves with the first item (already seen or still to come) matching `pred`. */
  waitFor<V extends T[K] & string>(value: V, timeoutMs?: number, what?: string): Promise<Having<T, K, V>>;
  waitFor(pred: Pred<T> | (T[K] & string), timeoutMs?: number, what?: string): Promise<T>;
  async waitFor(pred: Pred<T> | (T[K] & string), timeoutMs = 10_000, what?: string): Promise<T> {
    return (await this.waitForCount(pred, 1, timeoutMs, what ?? this.label(pred)))[0]!;
  }

  /** Resolves with the first item of key `value` for which `where` holds: a predicate that sees the fields that value's items have. */
  async waitForWhere<V extends T[K] & string>(value: V, where: Pred<Having<T, K, V>>, timeoutMs = 10_000, what?: string): Promise<Having<T, K, V>> {
    const is = having<T, K, V>(this.key, value);
    const found = await this.waitForCount((i) => is(i) && where(i), 1, timeoutMs, what ?? `a matching ${this.label(value)}`);
    return found.filter(is)[0]!;
  }

  /** Resolves with all matching items once there are at least `count`. */
  waitForCount<V extends T[K] & string>(value: V, count: number, timeoutMs?: number, what?: string): Promise<Having<T, K, V>[]>;
  waitForCount(pred: Pred<T> | (T[K] & string), count: number, timeoutMs?: number, what?: string): Promise<T[]>;
  async waitForCount(pred: Pred<T> | (T[K] & string), count: number, timeoutMs = 10_000, what?: string): Promise<T[]> {
    const p = typeof pred === "string" ? having<T, K, typeof pred>(this.key, pred) : pred;
    const label = what ?? `${count} x ${this.label(pred)}`;
    const result = Promise.withResolvers<T[]>();
    const check = () => {
      const found = this.items.filter(p);
      if (found.length >= count) result.resolve(found);
      else if (this.ended !== undefined) result.reject(new Error(`${this.ended} before ${label} (${found.length} of ${count}); last: ${this.tail()}`));
    };
    this.wakers.add(check);
    check();
    try {
      return await withDeadline(result.promise, timeoutMs, label);
    } finally {
      this.wakers.delete(check);
    }
  }

  private label(pred: Pred<T> | string): string {
    return typeof pred === "string" ? `${this.key} ${pred}` : "a matching item";
  }

  private tail(): string {
    return JSON.stringify(this.items.slice(-4)).slice(0, 2000);
  }

  private wake(): void {
    for (const w of [...this.wakers]) w();
  }
}

/**
 * A role's events, from a process's stdout or an in-process `onEvent`: `E`
 * is the role's event union where it is known, so predicates and fields are
 * checked; the loose default is for code that takes any process's events.
 */
export class EventLog<E extends { event: string } = JsonEvent> extends Feed<E, "event"> {
  constructor() {
    super("event");
  }

  get events(): E[] {
    return this.items;
  }
}

/** A line a role's command prints with --json: the event, and when it was printed. */
export type Printed<E> = E & { time: string };

/** What a registry process prints: its own events and its command line's (`fd-limit`, ...). */
export type RegistryLine = Printed<CliEvent>;

/** What a node process prints. */
export type NodeLine = Printed<NodeEvent>;

// --- processes ---------------------------------------------------------------

/** Processes started here that have not exited: what `killAll` kills. */
export const children = new Set<Proc>();

/**
 * A running script: its --json lines become events in `log`, anything else
 * it prints lands in `stderr` (stdout lines prefixed "stdout: "). Its log
 * ends when it exits, so a wait for an event that never came fails then.
 */
export class Proc<E extends { event: string } = JsonEvent> implements AsyncDisposable {
  readonly log = new EventLog<E>();
  readonly stderr: string[] = [];
  private readonly done: Promise<number>;

  constructor(
    readonly proc: Bun.Subprocess<"ignore" | "pipe", "pipe", "pipe">,
    readonly label: string,
  ) {
    children.add(this);
    const out = readLines(proc.stdout, (line) => this.onLine(line));
    const err = readLines(proc.stderr, (line) => this.stderr.push(line));
    this.done = Promise.all([proc.exited, out, err]).then(([code]) => {
      children.delete(this);
      this.log.end(`${label} exited (${code}; stderr: ${this.stderr.slice(-5).join(" | ") || "none"})`);
      return code;
    });
  }

  get pid(): number {
    return this.proc.pid;
  }

  get running(): boolean {
    return this.proc.exitCode === null && this.proc.signalCode === null;
  }

  /** Sends a signal to the script (not to a wrapper it runs under). */
  signal(signal: NodeJS.Signals): void {
    if (this.running) this.proc.kill(signal);
  }

  /** Sends a signal (default SIGKILL, as killNow does it) and waits for the exit. */
  async kill(signal: NodeJS.Signals = "SIGKILL"): Promise<number> {
    if (signal === "SIGKILL") this.killNow();
    else this.signal(signal);
    return this.exited();
  }

  /** SIGCONT first (a stopped process holds SIGKILL pending on some kernels' views of ps), then SIGKILL, to a wrapper too; does not wait. */
  killNow(): void {
    this.signal("SIGCONT");
    this.signal("SIGKILL");
    if (this.running) this.proc.kill("SIGKILL");
  }

  /** Asks the process to stop (SIGTERM: it cleans up after itself), kills it if it has not exited after `graceMs`. */
  async stop(graceMs = 5_000): Promise<number> {
    this.signal("SIGTERM");
    return withDeadline(this.exited(), graceMs, `${this.label} to exit on SIGTERM`).catch(() => {
      this.killNow();
      return this.exited();
    });
  }

  /** The exit code, once the process exited and its output was read to the end. */
  exited(): Promise<number> {
    return this.done;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.kill();
  }

  /** A parsed stdout line; subclasses may take some for themselves. */
  protected onJson(m: E): void {
    this.log.push(m);
  }

  private onLine(line: string): void {
    let m: unknown;
    try {
      m = JSON.parse(line);
    } catch {
      m = undefined;
    }
    if (m && typeof m === "object") this.onJson(m as E); // what the script prints is trusted to be its role's events
    else this.stderr.push(`stdout: ${line}`);
  }
}

/** Kills every process started here that still runs; synchronous, so it works in an exit handler. */
export function killAll(): void {
  for (const p of children) p.killNow();
}

/** Bun leaves children running when their parent dies: kill them when this process exits or is interrupted. */
export function killAllOnExit(): void {
  process.on("exit", killAll);
  for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
    process.once(signal, () => {
      killAll();
      process.exit(130);
    });
  }
}

/**
 * Runs one of our scripts (demo, chaos, fuzz, bench, Docker check) as a citty
 * command: --help from `args`, an unknown flag or a bad value exits 2 with a
 * usage error, any other error exits 1, and what `main` resolves to is the
 * exit code.
 */
export async function runScript<const A extends ArgsDef>(meta: CommandMeta, args: A, main: (args: ParsedArgs<A>) => Promise<number>): Promise<void> {
  const run = ({ args: parsed, rawArgs }: { args: ParsedArgs<A>; rawArgs: string[] }) =>
    runCli(async () => {
      checkFlags(rawArgs, args as Record<string, { type?: string }>);
      process.exit(await main(parsed));
    });
  await runMain(defineCommand({ meta, args, run }));
}

/**
 * Calls `onPart` for every `separator`-delimited, non-blank part of a text
 * stream (lines by default). A stream torn down midway (its process killed,
 * its request aborted) just ends, without its unfinished last part.
 */
export async function readLines(stream: ReadableStream<Uint8Array>, onPart: (part: string) => void, separator = "\n"): Promise<void> {
  const decoder = new TextDecoder();
  const reader = stream.getReader();
  let rest = "";
  for (;;) {
    let chunk: Awaited<ReturnType<typeof reader.read>>;
    try {
      chunk = await reader.read();
    } catch {
      return;
    }
    if (chunk.done) break;
    rest += decoder.decode(chunk.value, { stream: true });
    let at: number;
    while ((at = rest.indexOf(separator)) >= 0) {
      const part = rest.slice(0, at);
      rest = rest.slice(at + separator.length);
      if (part.trim()) onPart(part);
    }
  }
  if (rest.trim()) onPart(rest);
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

export interface SpawnOptions {
  /** The script's own settings: only these reach it (see spawnBun). */
  env?: Record<string, string>;
  label?: string;
  /** A command the script runs under, e.g. `ip netns exec NS` (which execs, so the pid stays bun's). */
  prefix?: string[];
  /** Flags for bun itself, before the script. */
  bunArgs?: string[];
  stdin?: "ignore" | "pipe";
  /** Bun kills the process after this long: a safety net, not a deadline to wait for. */
  timeoutMs?: number;
}

/**
 * Starts `bun <script> ...args` from the project root with stdout/stderr
 * piped. The scripts' own settings (REGISTRY_*, NODE_*, LOG_JSON,
 * CONSOLA_LEVEL) come only from `env`: one exported in the developer's shell
 * (a NODE_ID, a REGISTRY_TOKEN) must not change what a test starts.
 */
export function spawnBun(script: string, args: string[], o: SpawnOptions = {}): Bun.Subprocess<"ignore" | "pipe", "pipe", "pipe"> {
  const inherited = Object.fromEntries(Object.entries(process.env).filter(([k]) => !OWN_SETTINGS.has(k)));
  return Bun.spawn([...(o.prefix ?? []), process.execPath, ...(o.bunArgs ?? []), join(ROOT, script), ...args], {
    cwd: ROOT,
    stdin: o.stdin ?? "ignore",
    stdout: "pipe",
    stderr: "pipe",
    env: { ...inherited, NO_COLOR: "1", ...o.env },
    ...(o.timeoutMs ? { timeout: o.timeoutMs, killSignal: "SIGKILL" } : {}),
  });
}

/** `bun <script> ...args` as a Proc (see spawnBun); `E`, what the script prints, is the caller's word. */
export function spawnScript<E extends { event: string } = JsonEvent>(script: string, args: string[], o: SpawnOptions = {}): Proc<E> {
  return new Proc<E>(spawnBun(script, args, o), o.label ?? script);
}

/** A registry process, and the port it listens on. */
export type RegistryProc = Proc<RegistryLine> & { port: number };

/** A node process, its id and the port it listens on. */
export type NodeProc = Proc<NodeLine> & { id: string; port: number };

/** A registry process on 127.0.0.1 and a free port; resolves once it listens. */
export async function spawnRegistry(args: string[] = [], env: Record<string, string> = {}): Promise<RegistryProc> {
  const p = spawnScript<RegistryLine>("registry.ts", ["127.0.0.1", "0", "--json", ...args], { env, label: "registry" });
  const e = await p.log.waitFor("listening", 15_000, "registry to listen").catch(async (err) => {
    await p[Symbol.asyncDispose]();
    throw new Error(`${(err as Error).message}; stderr: ${p.stderr.join("\n")}`);
  });
  return Object.assign(p, { port: e.port });
}

/** A node process; resolves once it is registered (its `listening` event gives id and port). */
export async function spawnNode(
  registryPort: number,
  args: string[] = [],
  env: Record<string, string> = {},
  registryHost = "127.0.0.1",
): Promise<NodeProc> {
  const p = spawnScript<NodeLine>("client.ts", [registryHost, String(registryPort), "--json", ...args], { env, label: "node" });
  try {
    const l = await p.log.waitFor("listening", 15_000, "node to listen");
    await p.log.waitFor("registered", 15_000, "node to register");
    return Object.assign(p, { id: l.id, port: l.port });
  } catch (err) {
    await p[Symbol.asyncDispose]();
    throw new Error(`${(err as Error).message}; stderr: ${p.stderr.join("\n")}`);
  }
}

// --- several registries --------------------------------------------------------

/** A registry process sharing a store, with its status server: `http` is its base URL, `id` its registry id. */
export type StoreRegistry = RegistryProc & { http: string; id: string };

/**
 * A registry on 127.0.0.1 sharing the list through `store` (a redis:// URL),
 * with its status server on a free port; resolves once both listen.
 */
export async function spawnStoreRegistry(store: string, args: string[] = [], env: Record<string, string> = {}): Promise<StoreRegistry> {
  const p = await spawnRegistry(["--store", store, "--http", "0", "--http-host", "127.0.0.1", ...args], env);
  return withStatus(p);
}

/** Adds the status server's URL and the registry's id to a registry process started with --http. */
export async function withStatus<P extends Proc<RegistryLine>>(p: P): Promise<P & { http: string; id: string }> {
  try {
    const e = await p.log.waitFor("http-listening", 15_000, "the status server to listen");
    const http = e.url;
    const stats = (await statusJson(http, "/stats")) as { registry: string };
    return Object.assign(p, { http, id: stats.registry });
  } catch (err) {
    await p[Symbol.asyncDispose]();
    throw err;
  }
}

/** GET a status endpoint (`base` is the status server's URL) and parse it; rejects on a non-2xx answer or after `timeoutMs`. */
export async function statusJson(base: string, path: string, timeoutMs = 5_000): Promise<Record<string, unknown>> {
  const res = await fetch(new URL(path.replace(/^\//, ""), base), { signal: AbortSignal.timeout(timeoutMs) });
  if (!res.ok) throw new Error(`GET ${path}: ${res.status} ${await res.text()}`);
  return (await res.json()) as Record<string, unknown>;
}

/** A registry's list as its /peers has it: id -> the listed peer (with `registry`, the id of the registry holding it). */
export async function listed(base: string): Promise<Map<string, { host: string; port: number; registry: string }>> {
  const body = (await statusJson(base, "/peers")) as { peers: { id: string; host: string; port: number; registry: string }[] };
  return new Map(body.peers.map((p) => [p.id, p]));
}

/**
 * A node process's view as it prints it on SIGUSR1 (client.ts's `view`
 * event): whether it is registered, and its peers' ids, sorted.
 */
export async function askView(p: Proc<NodeLine>, timeoutMs = 5_000): Promise<{ registered: boolean; peers: string[] }> {
  const before = p.log.named("view").length;
  p.signal("SIGUSR1");
  const views = await p.log.waitForCount("view", before + 1, timeoutMs, `${p.label} to print its view`);
  const v = views[before]!;
  return { registered: v.registered, peers: v.peers.slice().sort() };
}

/** Disposes every fixture even if some fail; for finally blocks and afterEach. */
export async function disposeAll(items: Iterable<AsyncDisposable | undefined>): Promise<void> {
  await Promise.allSettled(Array.from(items, (i) => i?.[Symbol.asyncDispose]()));
}

/** What a command printed and how it ended. */
export interface Exec {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a command to its end (killed after `timeoutMs`, exit code 124 then); never throws. */
export async function exec(cmd: string[], timeoutMs: number, env?: Record<string, string | undefined>, cwd?: string): Promise<Exec> {
  const p = Bun.spawn(cmd, { cwd, stdin: "ignore", stdout: "pipe", stderr: "pipe", timeout: timeoutMs, killSignal: "SIGKILL", env });
  const [stdout, stderr, code] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
  if (p.signalCode) return { code: 124, stdout, stderr: `${stderr}\n(${cmd.slice(0, 3).join(" ")} killed after ${timeoutMs}ms)` };
  return { code, stdout, stderr };
}

/** A process's resident set size from /proc, in bytes (undefined off Linux or once it exited). */
export function rssBytes(pid: number): number | undefined {
  try {
    const m = /VmRSS:\s+(\d+)\s+kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) * 1024 : undefined;
  } catch {
    return undefined;
  }
}

// --- the mesh ----------------------------------------------------------------

/**
 * What breaks the full-mesh property: every pair of `ids` greeted exactly
 * once and no greeting outside `ids` (`greeted`: greeter -> whom it greeted);
 * given what each node logged receiving (`received`: receiver -> who greeted
 * it), the same of those, and both ends telling of the same greetings.
 */
export function meshProblems(ids: string[], greeted: Map<string, string[]>, received?: Map<string, string[]>): string[] {
  const arrows = (m: Map<string, string[]>, sent: boolean) =>
    [...m].flatMap(([self, others]) => others.map((o) => (sent ? [self, o] : [o, self]) as [string, string]));
  const sent = arrows(greeted, true);
  const problems = pairProblems(ids, sent, "greeted");
  if (received) {
    const got = arrows(received, false);
    problems.push(...pairProblems(ids, got, "greeting"));
    const text = (a: [string, string][]) => a.map(([from, to]) => `${from}->${to}`).sort();
    const [s, g] = [text(sent), text(got)];
    if (s.join() !== g.join()) {
      problems.push(`the two ends disagree: greeted only [${s.filter((x) => !g.includes(x))}], logged only [${g.filter((x) => !s.includes(x))}]`);
    }
  }
  return problems;
}

function pairProblems(ids: string[], arrows: [string, string][], what: string): string[] {
  const problems: string[] = [];
  const known = new Set(ids);
  const count = new Map<string, number>();
  for (const [from, to] of arrows) {
    if (!known.has(from) || !known.has(to)) problems.push(`${what} ${from}->${to}: outside the mesh`);
    const key = [from, to].sort().join("~");
    count.set(key, (count.get(key) ?? 0) + 1);
  }
  for (let i = 0; i < ids.length; i++) {
    for (let j = i + 1; j < ids.length; j++) {
      const key = [ids[i]!, ids[j]!].sort().join("~");
      const n = count.get(key) ?? 0;
      if (n !== 1) problems.push(`${what} ${key}: ${n} times`);
    }
  }
  return problems;
}

/** The greetings that node processes logged: `greeted` (sent) and `greeting` (received), by node id. */
export function greetingsOf(nodes: { id: string; log: EventLog<NodeLine> }[]): { greeted: Map<string, string[]>; received: Map<string, string[]> } {
  const peers = (log: EventLog<NodeLine>, event: "greeted" | "greeting") => log.named(event).map((e) => e.peer);
  return {
    greeted: new Map(nodes.map((n) => [n.id, peers(n.log, "greeted")])),
    received: new Map(nodes.map((n) => [n.id, peers(n.log, "greeting")])),
  };
}

// --- sockets -----------------------------------------------------------------

/**
 * A raw NDJSON TCP client for precise and hostile tests: writes exactly the
 * bytes it is given, splits what it receives on 0x0A itself, and lets a test
 * wait for a message under a deadline. On node:net, whose `localAddress` is
 * documented (Bun.connect takes one too, but only outside its types: see
 * bench/lib.ts fromAddress): binding 127.0.0.2, 127.0.0.3, ... makes
 * connections a server counts as coming from different hosts. With
 * `collect: false` it only counts bytes (bulk clients that must keep reading
 * but whose traffic is not under test).
 */
export class RawClient implements AsyncDisposable {
  private readonly feed = new Feed<WireMessage, "type">("type");
  bytesReceived = 0;
  closed = false;
  private parts: Buffer[] = [];
  private readonly closedSignal = Promise.withResolvers<void>();

  private constructor(
    private readonly socket: net.Socket,
    private readonly collect: boolean,
  ) {
    socket.setNoDelay(true);
    socket.on("data", (chunk: Buffer) => this.onData(chunk));
    socket.on("error", () => {}); // a reset shows as the close that follows
    socket.on("close", () => {
      this.closed = true;
      this.feed.end("connection closed");
      this.closedSignal.resolve();
    });
  }

  /**
   * A raw server for tests that play the other side (a fake registry, a peer
   * that never answers): each accepted connection is a RawClient, handed to
   * `onConnection` and kept in `connections`; disposing resets them all.
   */
  static async serve(onConnection: (c: RawClient) => void = () => {}): Promise<RawServer> {
    const connections: RawClient[] = [];
    const server = net.createServer((socket) => {
      const c = new RawClient(socket, true);
      connections.push(c);
      onConnection(c);
    });
    await withDeadline(new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve)), 5_000, "a raw server to listen");
    return {
      port: (server.address() as net.AddressInfo).port,
      connections,
      async [Symbol.asyncDispose]() {
        await Promise.allSettled(connections.map((c) => c[Symbol.asyncDispose]()));
        server.close();
      },
    };
  }

  /**
   * Connects to `host:port` (default 127.0.0.1), optionally from a given
   * local address. With `tls` it speaks TLS, presenting that certificate (`{}`:
   * none) and resolving once the handshake is done; it checks nothing of the
   * server's, since what a raw client tests is how the server treats it.
   */
  static async connect(port: number, o: { host?: string; localAddress?: string; collect?: boolean; timeoutMs?: number; tls?: Partial<KeyPair> } = {}): Promise<RawClient> {
    const where = { host: o.host ?? "127.0.0.1", port, ...(o.localAddress ? { localAddress: o.localAddress } : {}) };
    const pair = o.tls?.cert && o.tls.key ? { cert: readFileSync(o.tls.cert), key: readFileSync(o.tls.key) } : {};
    const socket = o.tls ? nodeTls.connect({ ...where, rejectUnauthorized: false, ...pair }) : net.connect(where);
    const client = new RawClient(socket, o.collect ?? true);
    const connected = new Promise<RawClient>((resolve, reject) => {
      socket.once(o.tls ? "secureConnect" : "connect", () => resolve(client));
      socket.once("error", reject);
    });
    return withDeadline(connected, o.timeoutMs ?? 5_000, `raw connection to port ${port}`).catch((e) => {
      socket.destroy();
      throw e;
    });
  }

  /** Everything received so far, in order. */
  get messages(): WireMessage[] {
    return this.feed.items;
  }

  /** Messages of this type, in order. */
  named(type: string): WireMessage[] {
    return this.feed.named(type);
  }

  /** The `code` of every error message received. */
  errorCodes(): string[] {
    return this.feed.named("error").map((m) => String(m.code));
  }

  /** Writes bytes or text as is (add the "\n" yourself); resolves once they are handed to the kernel, false if the socket failed or closed. */
  write(data: string | Uint8Array): Promise<boolean> {
    if (this.closed || this.socket.destroyed) return Promise.resolve(false);
    return new Promise((resolve) => {
      try {
        this.socket.write(data, (err) => resolve(!err));
      } catch {
        resolve(false);
      }
    });
  }

  /** One JSON message plus newline. */
  send(msg: object): Promise<boolean> {
    return this.write(JSON.stringify(msg) + "\n");
  }

  /** Sends `register` and waits for the reply; fails with the registry's error if there is one. */
  async register(id: string, port: number, extra: Record<string, unknown> = {}, timeoutMs = 10_000): Promise<WireMessage> {
    void this.send({ type: "register", v: PROTOCOL_VERSION, id, port, ...extra });
    const m = await this.waitFor((m) => m.type === "registered" || m.type === "error", timeoutMs, `the reply to register ${id}`);
    if (m.type !== "registered") throw new Error(`register ${id} refused: ${JSON.stringify(m)}`);
    return m;
  }

  /** Writes one byte per loop turn, so the peer reads the data in many small chunks. */
  async writeSlowly(data: string | Uint8Array): Promise<void> {
    const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
    for (const b of bytes) {
      void this.write(Uint8Array.of(b));
      await new Promise((r) => setImmediate(r));
    }
  }

  /** First message (already received or still to come) matching `pred`; rejects early if the connection closes first. */
  waitFor(pred: Pred<WireMessage> | string, timeoutMs = 10_000, what?: string): Promise<WireMessage> {
    return this.feed.waitFor(pred, timeoutMs, what);
  }

  /** All matching messages once there are `count`; rejects early if the connection closes first. */
  waitForCount(pred: Pred<WireMessage> | string, count: number, timeoutMs = 10_000, what?: string): Promise<WireMessage[]> {
    return this.feed.waitForCount(pred, count, timeoutMs, what);
  }

  /** Resolves when the peer (or we) closed the connection. */
  waitClosed(timeoutMs = 10_000, what = "the connection to close"): Promise<void> {
    return withDeadline(this.closedSignal.promise, timeoutMs, what);
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
    return this.socket.localPort ?? 0;
  }

  /** Local address of this connection (what the other side sees as its remote address). */
  get localAddress(): string {
    return (this.socket.localAddress ?? "").replace(/^::ffff:/, "");
  }

  /** Half-closes: sends FIN, keeps reading. */
  end(): void {
    this.socket.end();
  }

  /** Closes with a reset, as a crashed peer would. */
  destroy(): void {
    if (!this.closed) this.socket.resetAndDestroy();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.destroy();
    await this.waitClosed(2_000).catch(() => {});
  }

  private onData(chunk: Buffer): void {
    this.bytesReceived += chunk.byteLength;
    if (!this.collect) return;
    let start = 0;
    for (let nl = chunk.indexOf(10); nl >= 0; nl = chunk.indexOf(10, start)) {
      this.parts.push(chunk.subarray(start, nl));
      start = nl + 1;
      const line = Buffer.concat(this.parts).toString("utf8").replace(/\r$/, "");
      this.parts = [];
      if (!line) continue;
      try {
        this.feed.push(JSON.parse(line) as WireMessage);
      } catch {
        this.feed.push({ type: "(not json)", line });
      }
    }
    if (start < chunk.byteLength) this.parts.push(Buffer.from(chunk.subarray(start)));
  }
}

/** The first message a bare TLS client presenting `pair` (or no certificate) gets back after sending `msg`. */
export async function tlsAnswer(port: number, pair: KeyPair | undefined, msg: object): Promise<WireMessage> {
  await using c = await RawClient.connect(port, { tls: pair ?? {} });
  void c.send(msg);
  // Awaited here: returned as is, the promise would outlive `c`, disposed on the way out.
  return await c.waitFor(() => true, 5_000, `an answer over TLS on port ${port}`);
}

/** See RawClient.serve. */
export interface RawServer extends AsyncDisposable {
  port: number;
  connections: RawClient[];
}

/**
 * A listener that answers the registry's dial-back probe for any id, as the
 * node with that id would, and counts the probes: what a simulated node needs
 * to be listed with the probe on. Anything else (a greeting) gets an error
 * and the connection is closed.
 */
export function probeResponder(hostname = "127.0.0.1"): { port: number; probes(): number; stop(): void } {
  let probes = 0;
  const l = Bun.listen<string | undefined>({
    hostname,
    port: 0,
    socket: {
      data(s, chunk) {
        const text = (s.data ?? "") + chunk.toString();
        const nl = text.indexOf("\n");
        if (nl < 0) {
          s.data = text;
          if (text.length > 64 * 1024) s.end();
          return;
        }
        let m: { type?: unknown; id?: unknown; nonce?: unknown } | undefined;
        try {
          m = JSON.parse(text.slice(0, nl)) as typeof m;
        } catch {
          // not a probe: answered below
        }
        s.data = text.slice(nl + 1);
        if (m?.type === "probe") {
          probes++;
          // The prober cuts the connection once it has the answer; closing first here
          // would leave this side in TIME_WAIT on a 4-tuple the next dial may reuse.
          s.write(JSON.stringify({ type: "probe-ok", id: m.id, nonce: m.nonce }) + "\n");
        } else {
          s.end(JSON.stringify({ type: "error", code: "wrong-node", message: "a probe responder answers probes only" }) + "\n");
        }
      },
      error(s) {
        s.terminate();
      },
    },
  });
  return { port: l.port, probes: () => probes, stop: () => l.stop(true) };
}

/**
 * A loopback port nothing listens on right now (bound, then released): free
 * for a server to bind, and refusing connects until one does. Another process
 * may take it meanwhile, so a caller that binds it must be ready to retry.
 */
export function freePort(): number {
  const l = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  const port = l.port;
  l.stop(true);
  return port;
}

// --- attackers ---------------------------------------------------------------
// Issue 11's attacks on the registry, each from a source address of its own
// and kept up until stopped: a connection the registry closes is opened again,
// as a determined attacker would. The flood test, the fuzzer and the
// benchmark's "Under attack" phase all run these.

/** What an attacker does over and over. */
export type AttackKind = "sync-spam" | "ping-flood" | "peers-flood" | "churn" | "slow-consumers" | "token-guess";

export const ATTACK_KINDS: readonly AttackKind[] = ["sync-spam", "ping-flood", "peers-flood", "churn", "slow-consumers", "token-guess"];

export interface AttackOptions {
  kind: AttackKind;
  /** The registry's port; for peers-flood, its status server's. */
  port: number;
  /** The attacker's source address (127.0.0.x), so that per-address limits see another host. */
  from: string;
  /** Connections held at once (sync-spam, slow-consumers, ping-flood) or loops run at once (the others). */
  width: number;
  /** `sync` requests each non-reader sends at once (sync-spam; 190 in the attack that once evicted 3,099 nodes). */
  syncs?: number;
  /** The registry's token, for the attackers that register (token-guess sends wrong ones). */
  token?: string;
  /** The registry probes (default): each connection registers the port of a listener on `from` that answers it. */
  probe?: boolean;
}

/** What an attacker did and how the registry answered. */
export interface AttackCounts {
  connections: number;
  registered: number;
  /** Connections the registry closed (the attacker itself closes none before it stops). */
  closedByRegistry: number;
  /** Protocol lines sent: register, sync, ping, leave. */
  lines: number;
  /** HTTP responses read in full (peers-flood). */
  responses: number;
  bytesReceived: number;
  /** Error codes received (a non-reader reads none after it registered). */
  codes: Record<string, number>;
  /** Rounds that failed without an answer: connect refused or timed out, a broken HTTP response. */
  failures: number;
}

const PING = '{"type":"ping"}\n';
const SYNC = '{"type":"sync"}\n';

/** One attacker: `width` workers, each repeating its kind's round until `stop`. */
export class Attack implements AsyncDisposable {
  readonly counts: AttackCounts = { connections: 0, registered: 0, closedByRegistry: 0, lines: 0, responses: 0, bytesReceived: 0, codes: {}, failures: 0 };
  /** Resolves once every worker has made its first attempt: the attack is in place. */
  readonly ready: Promise<void>;
  readonly kind: AttackKind;
  private stopped = false;
  private readonly stopSignal = Promise.withResolvers<void>();
  private readonly open = new Set<{ destroy(): void }>();
  private readonly listeners: ReturnType<typeof probeResponder>[] = [];
  private readonly workers: Promise<void>[];
  private inPlace = 0;
  private readonly allInPlace = Promise.withResolvers<void>();
  private ids = 0;

  constructor(private readonly o: AttackOptions) {
    this.kind = o.kind;
    this.ready = this.allInPlace.promise;
    this.workers = Array.from({ length: o.width }, (_, i) => this.work(i));
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.stopSignal.resolve();
    for (const c of this.open) c.destroy();
    await Promise.allSettled(this.workers);
    for (const l of this.listeners) l.stop();
    this.allInPlace.resolve();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.stop();
  }

  private async work(i: number): Promise<void> {
    let placed = false;
    const placedNow = () => {
      if (placed) return;
      placed = true;
      if (++this.inPlace === this.o.width) this.allInPlace.resolve();
    };
    while (!this.stopped) {
      try {
        await this.round(i, placedNow);
      } catch {
        this.counts.failures++;
        await Bun.sleep(20); // the attacker's pace after a failure, not a wait for anything
      }
      placedNow();
    }
  }

  private round(i: number, placed: () => void): Promise<void> {
    switch (this.o.kind) {
      case "sync-spam":
        // The burst again every second while the connection lasts, so the attack is kept up.
        return this.nonReader(i, placed, SYNC.repeat(this.o.syncs ?? 190), 1_000);
      case "slow-consumers":
        // Within every rate limit: a ping and a sync a second, as a node resyncing each beat would.
        return this.nonReader(i, placed, PING + SYNC, 1_000);
      case "ping-flood":
        return this.pingFlood(i, placed);
      case "churn":
        return this.churn(i, placed);
      case "token-guess":
        return this.churn(i, placed, `guess-${this.ids}`);
      case "peers-flood":
        return this.peers(placed);
    }
  }

  /** Registers, stops reading, sends `burst` every `everyMs` until the registry closes the connection. */
  private async nonReader(i: number, placed: () => void, burst: string, everyMs: number): Promise<void> {
    const c = await this.connect();
    try {
      if (!(await this.register(c, i))) return;
      c.pause();
      const lines = burst.split("\n").length - 1;
      while (!c.closed && !this.stopped && (await c.write(burst))) {
        this.counts.lines += lines;
        placed();
        await Promise.race([c.waitClosed(everyMs).catch(() => {}), this.stopSignal.promise]);
      }
    } finally {
      this.done(c);
    }
  }

  /** Registers, then writes pings as fast as the socket takes them. */
  private async pingFlood(i: number, placed: () => void): Promise<void> {
    const c = await this.connect();
    try {
      if (!(await this.register(c, i))) return;
      placed();
      const chunk = PING.repeat(5_000);
      while (!c.closed && !this.stopped && (await c.write(chunk))) this.counts.lines += 5_000;
      await this.untilClosed(c); // a failed write comes before the close
    } finally {
      this.done(c);
    }
  }

  /** Registers (with `token`, a wrong one for token-guess) and leaves at once, or takes the refusal. */
  private async churn(i: number, placed: () => void, token = this.o.token): Promise<void> {
    const c = await this.connect();
    try {
      if (await this.register(c, i, token)) {
        await c.send({ type: "leave" });
        this.counts.lines++;
      }
      placed();
      await this.untilClosed(c);
    } finally {
      this.done(c);
    }
  }

  /** GET /peers on one keep-alive connection, each response read in full before the next request. */
  private async peers(placed: () => void): Promise<void> {
    const http = new HttpConn(this.o.port, this.o.from);
    this.open.add(http);
    this.counts.connections++;
    try {
      await http.connected;
      let counted = 0;
      while (!this.stopped && (await http.get("/peers"))) {
        this.counts.responses++;
        this.counts.bytesReceived += http.bytesReceived - counted;
        counted = http.bytesReceived;
        placed();
      }
      if (http.closed && !this.stopped) this.counts.closedByRegistry++;
    } finally {
      this.open.delete(http);
      http.destroy();
    }
  }

  private async connect(): Promise<RawClient> {
    const c = await RawClient.connect(this.o.port, { localAddress: this.o.from, timeoutMs: 5_000 });
    this.counts.connections++;
    this.open.add(c);
    return c;
  }

  /** Registers `c`; true once listed. */
  private async register(c: RawClient, i: number, token = this.o.token): Promise<boolean> {
    const id = `${this.o.kind}-${this.o.from}-${i}-${++this.ids}`.slice(0, 64);
    this.counts.lines++;
    const listed = await c.register(id, this.portFor(i), token === undefined ? {} : { token }, 15_000).then(() => true, () => false);
    if (listed) this.counts.registered++;
    return listed;
  }

  /** A port of ours on `from` for worker i: with the probe on, a listener that answers it for any id. */
  private portFor(i: number): number {
    if (this.o.probe === false) return 20_000 + i;
    while (this.listeners.length <= i) this.listeners.push(probeResponder(this.o.from));
    return this.listeners[i]!.port;
  }

  private async untilClosed(c: RawClient): Promise<void> {
    await Promise.race([c.waitClosed(600_000).catch(() => {}), this.stopSignal.promise]);
  }

  private done(c: RawClient): void {
    this.open.delete(c);
    if (c.closed && !this.stopped) this.counts.closedByRegistry++;
    for (const code of c.errorCodes()) this.counts.codes[code] = (this.counts.codes[code] ?? 0) + 1;
    this.counts.bytesReceived += c.bytesReceived;
    c.destroy();
  }
}

/**
 * One attacker of each kind in `widths` (all kinds by default, small
 * widths), the first from 127.0.0.`firstHost`, the next from the address
 * after it, and so on. The status-server flood needs `httpPort`.
 */
export function startAttackers(o: { port: number; httpPort?: number; token?: string; firstHost?: number; widths?: Partial<Record<AttackKind, number>> }): Attack[] {
  const widths = o.widths ?? { "sync-spam": 16, "ping-flood": 1, "peers-flood": 2, churn: 2, "slow-consumers": 16, "token-guess": 1 };
  let host = o.firstHost ?? 2;
  return ATTACK_KINDS.filter((kind) => widths[kind] && (kind !== "peers-flood" || o.httpPort)).map(
    (kind) => new Attack({ kind, port: kind === "peers-flood" ? o.httpPort! : o.port, from: `127.0.0.${host++}`, width: widths[kind]!, token: o.token }),
  );
}

/** A keep-alive HTTP/1.1 connection from a chosen local address (fetch cannot bind one); responses need a Content-Length. */
class HttpConn {
  readonly connected: Promise<void>;
  closed = false;
  bytesReceived = 0;
  private pending: Buffer = Buffer.alloc(0);
  private wake: () => void = () => {};
  private readonly socket: net.Socket;

  constructor(port: number, localAddress: string) {
    this.socket = net.connect({ host: "127.0.0.1", port, localAddress });
    this.socket.on("data", (d: Buffer) => {
      this.pending = this.pending.byteLength ? Buffer.concat([this.pending, d]) : d;
      this.bytesReceived += d.byteLength;
      this.wake();
    });
    this.socket.on("error", () => {}); // the close that follows ends every wait
    this.socket.on("close", () => {
      this.closed = true;
      this.wake();
    });
    const up = new Promise<void>((resolve, reject) => {
      this.socket.once("connect", resolve);
      this.socket.once("close", () => reject(new Error("closed before it connected")));
    });
    this.connected = withDeadline(up, 5_000, `an HTTP connection to port ${port}`);
  }

  /** Sends one GET and reads its response; false once the connection closed. */
  async get(path: string): Promise<boolean> {
    if (this.closed) return false;
    this.socket.write(`GET ${path} HTTP/1.1\r\nHost: registry\r\n\r\n`);
    let body = -1;
    let length = 0;
    for (;;) {
      if (body < 0) {
        const end = this.pending.indexOf("\r\n\r\n");
        if (end >= 0) {
          body = end + 4;
          length = Number(/content-length:\s*(\d+)/i.exec(this.pending.subarray(0, end).toString())?.[1] ?? Number.NaN);
          if (!Number.isFinite(length)) throw new Error("a response without Content-Length");
        }
      }
      if (body >= 0 && this.pending.byteLength >= body + length) {
        this.pending = this.pending.subarray(body + length);
        return true;
      }
      if (this.closed) return false;
      await new Promise<void>((resolve) => (this.wake = resolve));
    }
  }

  destroy(): void {
    this.socket.destroy();
  }
}

// --- randomness --------------------------------------------------------------

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

/** A connection a listener accepted, seen from the server's side: its Conn, and the bytes it has read so far. */
export interface Accepted {
  conn: Conn<unknown>;
  read: number;
}

/**
 * Plain TCP that records every connection its listeners accept and every
 * chunk they read, before the role does: the boundary a test observes
 * instead of patching prototypes. A line is answered while it is read, so
 * once `read` covers a line, its answer has been written or queued.
 */
export function watchedTransport(onData?: (chunk: Uint8Array) => void) {
  const accepted: Accepted[] = [];
  const byConn = new Map<unknown, Accepted>();
  const transport: Transport = {
    ...tcp,
    listen: (host, port, handlers) =>
      tcp.listen(host, port, {
        ...handlers,
        open(socket) {
          handlers.open?.(socket);
          const a = { conn: socket.data as Conn<unknown>, read: 0 };
          accepted.push(a);
          byConn.set(socket.data, a);
        },
        data(socket, chunk) {
          onData?.(chunk);
          const a = byConn.get(socket.data);
          if (a) a.read += chunk.byteLength;
          handlers.data?.(socket, chunk);
        },
      }),
  };
  return {
    transport,
    accepted,
    /**
     * The server's end of `client`'s connection, once accepted: matched by
     * address and port (clients bound to different loopback addresses may
     * share a port number).
     */
    async of(client: RawClient, timeoutMs = 10_000): Promise<Accepted> {
      const [address, port] = [client.localAddress, client.localPort];
      let found: Accepted | undefined;
      const match = (a: Accepted) => a.conn.remoteAddress === address && a.conn.remotePort === port;
      await waitUntil(() => (found = accepted.find(match)) !== undefined, timeoutMs, `the connection from ${address} port ${port} to be accepted`);
      return found!;
    },
  };
}

// --- TLS ----------------------------------------------------------------------

/** A certificate and its key, as PEM file paths. */
export type KeyPair = { cert: string; key: string };

/**
 * Certificates for one test or run, made by certs.ts in a temporary
 * directory that disposing removes: the mesh's CA, registry and node
 * certificates, and a stranger's (another CA, node certificates for the same
 * ids): valid certificates, but not the mesh's.
 */
export interface TestCerts extends AsyncDisposable {
  dir: string;
  mesh: CertSet;
  stranger: CertSet;
  /** The mesh certificate of node `id` (one of the ids asked for). */
  node(id: string): KeyPair;
  /** A certificate for `id`, signed by the mesh CA, that expired yesterday. */
  expired(id: string): Promise<KeyPair>;
  /** The registry's TLS flags; with `mesh`, mutual TLS. */
  registryArgs(mesh: boolean): string[];
  /** A node's TLS flags: the CA, and for a mesh node its certificate. */
  nodeArgs(id?: string): string[];
  /** The registry's transport; with `mesh`, mutual TLS. */
  registryTransport(mesh: boolean, handshakeTimeoutMs?: number): TlsTransport;
  /** A node's transport: TLS to the registry, and with `id` mutual TLS as that node. */
  nodeTransport(id?: string, handshakeTimeoutMs?: number): TlsTransport;
}

export async function testCerts(ids: string[] = ["node-0", "node-1", "node-2"]): Promise<TestCerts> {
  const dir = mkdtempSync(join(tmpdir(), "contact-registry-certs-"));
  try {
    const [mesh, stranger] = await Promise.all([makeCerts(join(dir, "mesh"), { ids, days: 2 }), makeCerts(join(dir, "stranger"), { ids, days: 2 })]);
    const node = (id: string): KeyPair => {
      const n = mesh.nodes.find((x) => x.id === id);
      if (!n) throw new Error(`no certificate for ${id}: testCerts made ${ids.join(", ")}`);
      return n;
    };
    return {
      dir,
      mesh,
      stranger,
      node,
      expired: (id) => expiredCert(mesh, join(dir, `expired-${id}`), id),
      registryArgs: (m) => ["--tls-cert", mesh.registry!.cert, "--tls-key", mesh.registry!.key, ...(m ? ["--tls-client-ca", mesh.ca] : [])],
      nodeArgs: (id) => ["--tls-ca", mesh.ca, ...(id ? ["--tls-cert", node(id).cert, "--tls-key", node(id).key] : [])],
      registryTransport: (m, handshakeTimeoutMs) => tls({ ...mesh.registry!, meshCa: m ? mesh.ca : undefined, handshakeTimeoutMs }),
      nodeTransport: (id, handshakeTimeoutMs) => tls({ ca: mesh.ca, ...(id ? { ...node(id), meshCa: mesh.ca } : {}), handshakeTimeoutMs }),
      async [Symbol.asyncDispose]() {
        rmSync(dir, { recursive: true, force: true });
      },
    };
  } catch (e) {
    rmSync(dir, { recursive: true, force: true });
    throw e;
  }
}

/**
 * The first bytes a real TLS client sends (its ClientHello, as Bun's TLS
 * sends it), caught by a plain listener: raw material for attacks on
 * handshakes that look real as far as they go.
 */
export async function clientHello(): Promise<Buffer> {
  const hello = Promise.withResolvers<Buffer>();
  const l = Bun.listen({
    hostname: "127.0.0.1",
    port: 0,
    socket: {
      data(s, chunk) {
        hello.resolve(Buffer.from(chunk));
        s.terminate();
      },
    },
  });
  try {
    Bun.connect({ hostname: "127.0.0.1", port: l.port, tls: { serverName: "localhost" }, socket: { data() {}, error() {} } }).catch(() => {});
    return await withDeadline(hello.promise, 5_000, "a TLS client's ClientHello");
  } finally {
    l.stop(true);
  }
}

/** A node certificate signed by the set's CA whose validity ended a day ago (openssl takes negative days). */
async function expiredCert(set: CertSet, base: string, id: string): Promise<KeyPair> {
  const pair = { cert: `${base}.pem`, key: `${base}.key` };
  writeFileSync(`${base}.ext`, `subjectAltName=URI:urn:node:${id}\nextendedKeyUsage=serverAuth,clientAuth\n`);
  const steps = [
    ["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", `/CN=${id}`, "-keyout", pair.key, "-out", `${base}.csr`],
    ["openssl", "x509", "-req", "-in", `${base}.csr`, "-CA", set.ca, "-CAkey", set.caKey, "-set_serial", "7", "-days", "-1", "-extfile", `${base}.ext`, "-out", pair.cert],
  ];
  for (const cmd of steps) {
    const r = await exec(cmd, 10_000);
    if (r.code !== 0) throw new Error(`${cmd.slice(0, 2).join(" ")} failed: ${r.stderr.trim()}`);
  }
  return pair;
}

// --- time ---------------------------------------------------------------------

/** A clock that moves only when told; timers fire in time order as it passes them. */
export class ManualClock implements Clock {
  private t = 1_000;
  private timers = new Set<{ ms: number; next: number; fn: () => void }>();

  now(): number {
    return this.t;
  }

  every(ms: number, fn: () => void): () => void {
    const timer = { ms, next: this.t + ms, fn };
    this.timers.add(timer);
    return () => this.timers.delete(timer);
  }

  /** Moves time forward, firing each timer every time it comes due. */
  advance(ms: number): void {
    const end = this.t + ms;
    for (;;) {
      const due = [...this.timers].filter((x) => x.next <= end).sort((a, b) => a.next - b.next)[0];
      if (!due) break;
      this.t = due.next;
      due.next += due.ms;
      due.fn();
    }
    this.t = end;
  }

  /** Jumps forward without firing anything: the process was frozen, then one late tick runs. */
  freeze(ms: number): void {
    this.t += ms;
    for (const x of this.timers) {
      if (x.next > this.t) continue;
      x.next = this.t + x.ms;
      x.fn();
    }
  }
}

// --- Redis ---------------------------------------------------------------------
// A private redis-server for one test file or script: Debian's binary on a free
// loopback port, nothing written to disk, killed afterwards also when a test
// fails. Tests that need it print one `SKIP redis: ...` line when it is missing.

/** Why Redis tests cannot run here, or null. */
export const redisUnavailable: string | null = Bun.which("redis-server")
  ? null
  : "redis-server is not on PATH (Debian: apt-get install redis-server)";

export class RedisServer {
  private proc: Bun.Subprocess<"ignore", "pipe", "pipe"> | undefined;
  private output: string[] = [];

  private constructor(
    readonly port: number,
    /** Address it binds (a namespace host's, for tests across hosts). */
    readonly host: string,
    /** A command it runs under, e.g. `ip netns exec NS`. */
    private readonly prefix: string[],
    /** Its certificate and key: it then speaks TLS only (rediss://), with no client certificates asked for. */
    private readonly tls: KeyPair | undefined,
  ) {}

  get url(): string {
    return `${this.tls ? "rediss" : "redis"}://${this.host.includes(":") ? `[${this.host}]` : this.host}:${this.port}`;
  }

  get running(): boolean {
    return this.proc !== undefined && this.proc.exitCode === null && this.proc.signalCode === null;
  }

  /** The server process's pid while it runs (for its CPU time and RSS). */
  get pid(): number | undefined {
    return this.running ? this.proc!.pid : undefined;
  }

  /** Starts a server on a free port (a few tries: the port is free when picked, not necessarily when bound). */
  static async start(o: { host?: string; prefix?: string[]; tls?: KeyPair } = {}): Promise<RedisServer> {
    let lastError: unknown;
    for (let i = 0; i < 5; i++) {
      const server = new RedisServer(freePort(), o.host ?? "127.0.0.1", o.prefix ?? [], o.tls);
      try {
        await server.restart();
        return server;
      } catch (e) {
        lastError = e;
        await server.kill();
      }
    }
    throw lastError;
  }

  /** Starts (again) on the same port, empty: what a store restarted without persistence looks like. */
  async restart(): Promise<void> {
    if (this.running) throw new Error(`redis-server on ${this.port} is still running`);
    this.output = [];
    const port = this.tls
      ? ["--port", "0", "--tls-port", String(this.port), "--tls-cert-file", this.tls.cert, "--tls-key-file", this.tls.key, "--tls-auth-clients", "no"]
      : ["--port", String(this.port)];
    const proc = Bun.spawn(
      // Protected mode would refuse every client but loopback ones (a namespace host's registries).
      [...this.prefix, "redis-server", ...port, "--bind", this.host, "--protected-mode", "no", "--save", "", "--appendonly", "no", "--loglevel", "notice"],
      { stdin: "ignore", stdout: "pipe", stderr: "pipe" },
    );
    this.proc = proc;
    const ready = Promise.withResolvers<void>();
    void readLines(proc.stdout, (line) => {
      this.output.push(line);
      if (line.includes("Ready to accept connections")) ready.resolve();
    });
    void proc.exited.then((code) => ready.reject(new Error(`redis-server exited ${code}: ${this.output.slice(-3).join(" | ")}`)));
    await withDeadline(ready.promise, 10_000, `redis-server on port ${this.port} to accept connections`);
  }

  /** kill -9: every connection to it closes at once. */
  async kill(): Promise<void> {
    const proc = this.proc;
    if (!proc || !this.running) return;
    proc.kill("SIGCONT");
    proc.kill("SIGKILL");
    await proc.exited;
  }

  /** SIGSTOP / SIGCONT: connections stay open, nothing answers (a partition, as far as clients can tell). */
  freeze(frozen: boolean): void {
    this.proc?.kill(frozen ? "SIGSTOP" : "SIGCONT");
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.kill();
  }
}

// --- fixtures ------------------------------------------------------------------

/**
 * What one test starts, stopped after it even when it fails: call `cleanup`
 * in afterEach. Registries and nodes run in process on loopback (nodes
 * reconnect fast: 50 ms base, 200 ms cap); raw clients may bind a local
 * address of 127/8 to count as another host.
 */
export class Fixtures {
  private readonly cleanups: (() => unknown)[] = [];

  /** Runs `fn` at cleanup; the last deferred runs first. */
  defer(fn: () => unknown): void {
    this.cleanups.push(fn);
  }

  track<T extends AsyncDisposable>(x: T): T {
    this.defer(() => x[Symbol.asyncDispose]());
    return x;
  }

  async registry(options: RegistryOptions = {}): Promise<{ reg: Registry; log: EventLog<RegistryEvent> }> {
    const log = new EventLog<RegistryEvent>();
    const reg = await startRegistry({ host: "127.0.0.1", port: 0, onEvent: log.push, ...options });
    this.defer(() => reg.stop());
    return { reg, log };
  }

  async node(registryPort: number, options: Partial<NodeOptions> = {}): Promise<PeerNode> {
    const node = await startNode({ registryHost: "127.0.0.1", registryPort, listenHost: "127.0.0.1", reconnectBaseMs: 50, reconnectMaxMs: 200, ...options });
    this.defer(() => node.stop());
    return node;
  }

  async raw(port: number, localAddress?: string): Promise<RawClient> {
    const c = await RawClient.connect(port, { localAddress });
    this.defer(() => c.destroy());
    return c;
  }

  async cleanup(): Promise<void> {
    for (const fn of this.cleanups.splice(0).reverse()) await Promise.resolve().then(fn).catch(() => {});
  }
}
