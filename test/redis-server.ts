/**
 * A private redis-server for one test file: Debian's binary on a free loopback
 * port, nothing written to disk, killed afterwards also when a test fails.
 * Tests that need it print one `SKIP redis: ...` line when it is missing.
 */
import { readLines, withDeadline } from "./helpers.ts";

/** Why Redis tests cannot run here, or null. */
export const redisUnavailable: string | null = Bun.which("redis-server")
  ? null
  : "redis-server is not on PATH (Debian: apt-get install redis-server)";

export class RedisServer {
  private proc: Bun.Subprocess<"ignore", "pipe", "pipe"> | undefined;
  private output: string[] = [];

  private constructor(readonly port: number) {}

  get url(): string {
    return `redis://127.0.0.1:${this.port}`;
  }

  get running(): boolean {
    return this.proc !== undefined && this.proc.exitCode === null && this.proc.signalCode === null;
  }

  /** Starts a server on a free port (a few tries: the port is free when picked, not necessarily when bound). */
  static async start(): Promise<RedisServer> {
    let lastError: unknown;
    for (let i = 0; i < 5; i++) {
      const server = new RedisServer(freePort());
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
    const proc = Bun.spawn(
      ["redis-server", "--port", String(this.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--loglevel", "notice"],
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

function freePort(): number {
  const l = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  const port = l.port;
  l.stop(true);
  return port;
}
