/**
 * Shared by the benchmark orchestrator (run.ts) and its child processes:
 * spawning children under a raised fd limit and talking to them over
 * stdin/stdout JSON lines, the child side of that channel, and statistics.
 * Every child exits when its stdin closes, so a dead orchestrator leaves no
 * load generator or registry behind.
 */
import { join, resolve } from "node:path";

export const ROOT = join(import.meta.dir, "..");

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

export type Msg = Record<string, unknown>;

/** A child process speaking JSON lines: requests carry an id, replies echo it; other lines are events. */
export class Child {
  readonly events: Msg[] = [];
  readonly stderr: string[] = [];
  private nextId = 1;
  private pending = new Map<number, { resolve: (m: Msg) => void; reject: (e: Error) => void }>();
  private waiters = new Set<{ pred: (m: Msg) => boolean; resolve: (m: Msg) => void }>();
  private exitedFlag = false;
  readonly exited: Promise<number>;
  /** The process's own pid as it reported it (differs from `pid` under a `timeout` wrapper). */
  realPid: number | undefined;

  constructor(
    readonly label: string,
    readonly proc: Bun.Subprocess<"pipe", "pipe", "pipe">,
  ) {
    children.add(this);
    void readLines(proc.stdout, (line) => this.onLine(line));
    void readLines(proc.stderr, (line) => {
      this.stderr.push(line);
      if (this.stderr.length > 50) this.stderr.shift();
    });
    this.exited = proc.exited.then((code) => {
      this.exitedFlag = true;
      children.delete(this);
      const err = new Error(`${this.label} exited (${code}) ${this.stderr.slice(-5).join(" | ")}`);
      for (const p of this.pending.values()) p.reject(err);
      this.pending.clear();
      return code;
    });
  }

  get pid(): number {
    return this.proc.pid;
  }

  get alive(): boolean {
    return !this.exitedFlag;
  }

  /** Sends a command and waits for its reply; a reply with `error` rejects. */
  request(cmd: Msg, timeoutMs: number): Promise<Msg> {
    if (!this.alive) return Promise.reject(new Error(`${this.label} is not running`));
    const id = this.nextId++;
    const reply = new Promise<Msg>((resolve, reject) => this.pending.set(id, { resolve, reject }));
    this.proc.stdin.write(JSON.stringify({ ...cmd, id }) + "\n");
    this.proc.stdin.flush();
    return deadline(reply, timeoutMs, `${this.label}: reply to ${String(cmd.cmd)}`).then((m) => {
      if (m.error) throw new Error(`${this.label}: ${String(cmd.cmd)} failed: ${String(m.error)}`);
      return m;
    });
  }

  /** The first event (past or future) matching `pred`. */
  waitFor(pred: (m: Msg) => boolean, timeoutMs: number, what: string): Promise<Msg> {
    const seen = this.events.find(pred);
    if (seen) return Promise.resolve(seen);
    const w = { pred, resolve: (_: Msg) => {} };
    const p = new Promise<Msg>((resolve) => (w.resolve = resolve));
    this.waiters.add(w);
    const exited = this.exited.then((code) => {
      throw new Error(`${this.label} exited (${code}) while waiting for ${what}: ${this.stderr.slice(-5).join(" | ")}`);
    });
    return deadline(Promise.race([p, exited]), timeoutMs, `${this.label}: ${what}`).finally(() => this.waiters.delete(w));
  }

  /** Signals the process itself (not a wrapper around it). */
  signal(sig: NodeJS.Signals): void {
    if (!this.alive) return;
    if (this.realPid !== undefined) {
      try {
        process.kill(this.realPid, sig);
      } catch {
        // already gone
      }
    } else this.proc.kill(sig);
  }

  /** Closes stdin (the child exits on its own, writing a profile if it has one), then kills it if it lingers. */
  async close(graceMs = 3000): Promise<void> {
    if (!this.alive) return;
    try {
      this.proc.stdin.end();
    } catch {
      // already closed
    }
    const gone = await deadline(this.exited, graceMs, "exit").then(
      () => true,
      () => false,
    );
    if (!gone) await this.kill();
  }

  /** SIGCONT (a stopped process holds SIGKILL pending) then SIGKILL, and wait. */
  async kill(): Promise<void> {
    if (this.alive) {
      this.signal("SIGCONT");
      this.signal("SIGKILL");
      this.proc.kill("SIGKILL");
    }
    await this.exited;
  }

  private onLine(line: string): void {
    let m: Msg;
    try {
      m = JSON.parse(line) as Msg;
    } catch {
      this.stderr.push(`stdout: ${line}`);
      return;
    }
    if (this.realPid === undefined && typeof m.pid === "number") this.realPid = m.pid;
    if (typeof m.id === "number" && this.pending.has(m.id)) {
      const p = this.pending.get(m.id)!;
      this.pending.delete(m.id);
      p.resolve(m);
      return;
    }
    this.events.push(m);
    if (this.events.length > 100_000) this.events.splice(0, 50_000);
    for (const w of this.waiters) {
      if (w.pred(m)) {
        this.waiters.delete(w);
        w.resolve(m);
      }
    }
  }
}

const children = new Set<Child>();

/** The file-descriptor limit children get: the hard limit, capped at 65536. */
export async function fdLimit(): Promise<number> {
  const p = Bun.spawn(["sh", "-c", "ulimit -Hn"], { stdout: "pipe", stderr: "ignore" });
  const text = (await new Response(p.stdout).text()).trim();
  await p.exited;
  return text === "unlimited" ? 65536 : Math.min(65536, Number(text) || 1024);
}

/**
 * Starts `bun <script> <args>` from the project root with the fd soft limit
 * raised to the hard limit (max 65536) and stdin/stdout/stderr piped.
 * `timeoutMs` is a safety net: Bun kills the child when it expires.
 */
export function spawnChild(
  label: string,
  script: string,
  args: string[],
  opts: { timeoutMs?: number; bunArgs?: string[]; env?: Record<string, string>; hardTimeoutS?: number } = {},
): Child {
  const raise = 'h=$(ulimit -Hn); [ "$h" = unlimited ] && h=65536; [ "$h" -gt 65536 ] && h=65536; ulimit -n "$h"; exec "$0" "$@"';
  const bunArgs = opts.bunArgs ?? [];
  // A process we SIGSTOP cannot notice its stdin closing; coreutils `timeout`
  // kills it even if this orchestrator is gone.
  const hard = opts.hardTimeoutS && Bun.which("timeout") ? ["timeout", "-s", "KILL", String(opts.hardTimeoutS)] : [];
  const proc = Bun.spawn(["sh", "-c", raise, ...hard, process.execPath, ...bunArgs, resolve(ROOT, script), ...args], {
    cwd: ROOT,
    stdin: "pipe",
    stdout: "pipe",
    stderr: "pipe",
    env: { ...process.env, NO_COLOR: "1", NODE_ENV: "production", ...opts.env },
    timeout: opts.timeoutMs ?? 600_000,
    killSignal: "SIGKILL",
  });
  return new Child(label, proc);
}

/** Kills every child still running (SIGCONT first, for stopped ones); synchronous, safe in exit handlers. */
export function killAllChildren(): void {
  for (const c of children) {
    try {
      c.signal("SIGCONT");
      c.signal("SIGKILL");
      c.proc.kill("SIGKILL");
    } catch {
      // already gone
    }
  }
}

/** Asks every child to exit (stdin closed; profiles get written), kills what is left after `graceMs`. */
export async function closeAllChildren(graceMs: number): Promise<void> {
  await Promise.allSettled(Array.from(children, (c) => c.close(graceMs)));
}

export async function killAllChildrenAndWait(): Promise<void> {
  const all = Array.from(children);
  killAllChildren();
  await Promise.allSettled(all.map((c) => c.exited));
}

/** Rejects with a message naming `what` if `p` has not settled within `ms`. */
export function deadline<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: Timer | undefined;
  const t = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

/**
 * The child side of the channel: calls `handle` for every command line on
 * stdin and prints its result with the command's id (or `error`); exits when
 * stdin closes, i.e. when the orchestrator is gone.
 */
export function serveCommands(handle: (cmd: Msg) => Promise<Msg> | Msg): void {
  void readLines(Bun.stdin.stream(), (line) => {
    let cmd: Msg;
    try {
      cmd = JSON.parse(line) as Msg;
    } catch {
      return;
    }
    Promise.resolve()
      .then(() => handle(cmd))
      .then(
        (r) => emit({ ...r, id: cmd.id }),
        (e) => emit({ id: cmd.id, error: (e as Error).message }),
      );
  }).then(() => process.exit(0));
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

/** Resident set size from /proc (VmRSS), bytes; falls back to memoryUsage. */
export async function rssBytes(pid = process.pid): Promise<number> {
  try {
    const text = await Bun.file(`/proc/${pid}/status`).text();
    const m = /VmRSS:\s+(\d+) kB/.exec(text);
    if (m) return Number(m[1]) * 1024;
  } catch {
    // not Linux
  }
  return pid === process.pid ? process.memoryUsage().rss : 0;
}

async function readLines(stream: ReadableStream<Uint8Array>, onLine: (line: string) => void): Promise<void> {
  const decoder = new TextDecoder();
  let rest = "";
  const reader = stream.getReader();
  try {
    for (;;) {
      const { done, value: chunk } = await reader.read();
      if (done) break;
      rest += decoder.decode(chunk, { stream: true });
      let nl: number;
      while ((nl = rest.indexOf("\n")) >= 0) {
        const line = rest.slice(0, nl);
        rest = rest.slice(nl + 1);
        if (line.trim()) onLine(line);
      }
    }
  } catch {
    // stream torn down with the process
  }
  if (rest.trim()) onLine(rest);
}

/** Sleeps between benchmark phases only (never as synchronisation). */
export function pause(ms: number): Promise<void> {
  return Bun.sleep(ms);
}

/**
 * A listener that answers the registry's dial-back probe and nothing else:
 * what a simulated node needs to be listed with the probe on.
 */
export function probeListener(hostname: string): Bun.TCPSocketListener<undefined> {
  return Bun.listen<undefined>({
    hostname,
    port: 0,
    socket: {
      data(s, chunk) {
        try {
          const m = JSON.parse(chunk.toString().trim()) as { id: string; nonce: string };
          s.write(`{"type":"probe-ok","id":${JSON.stringify(m.id)},"nonce":${JSON.stringify(m.nonce)}}\n`);
        } catch {
          s.end(); // not a probe
        }
        // The prober cuts the connection once it has the answer; closing first here
        // would leave this side in TIME_WAIT on a 4-tuple the next dial may reuse.
      },
      error(s) {
        s.terminate();
      },
    },
  });
}
