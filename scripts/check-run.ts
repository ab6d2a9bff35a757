/**
 * What the check scripts (docker-test.ts, pack-test.ts) share: one line per
 * check (`ok`, `FAIL`, `skip`, the last two counted apart so CI can tell a
 * skip from a pass), a summary line, and running a command to completion
 * under a deadline.
 */

/** Thrown by a check whose failure makes the following ones meaningless. */
export class Abort extends Error {}

/** Counts and prints checks; a script's own run extends it. */
export class CheckRun {
  passed = 0;
  failed = 0;
  skipped = 0;

  pass(name: string, detail = ""): void {
    this.passed++;
    process.stdout.write(`ok    ${name}${detail ? `: ${detail}` : ""}\n`);
  }

  fail(name: string, why: string): void {
    this.failed++;
    process.stdout.write(`FAIL  ${name}: ${why}\n`);
  }

  skip(name: string, why: string): void {
    this.skipped++;
    process.stdout.write(`skip  ${name}: ${why}\n`);
  }

  /** Runs a check; a thrown error is its failure. `fatal` stops the run there (an Abort). */
  protected async check(name: string, fn: () => Promise<string | void>, fatal = false): Promise<boolean> {
    try {
      this.pass(name, (await fn()) ?? "");
      return true;
    } catch (e) {
      this.fail(name, (e as Error).message);
      if (fatal) throw new Abort(name);
      return false;
    }
  }

  /** Runs `checks`; an unexpected throw is one more failure, an Abort ends the run with a note. */
  protected async runAll(checks: () => Promise<void>): Promise<void> {
    try {
      await checks();
    } catch (e) {
      if (!(e instanceof Abort)) this.fail("unexpected error", (e as Error).stack ?? String(e));
      process.stdout.write("aborted: the remaining checks need the one that failed\n");
    }
  }

  /** `<label>: N passed, N failed[, N skipped]`. */
  summary(label: string): string {
    return `${label}: ${this.passed} passed, ${this.failed} failed${this.skipped ? `, ${this.skipped} skipped` : ""}\n`;
  }
}

export interface Exec {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a command to its end, output collected; killed (code 124) past the deadline. */
export async function execFile(cmd: string[], timeoutMs: number, env?: Record<string, string | undefined>, cwd?: string): Promise<Exec> {
  const p = Bun.spawn(cmd, { cwd, stdin: "ignore", stdout: "pipe", stderr: "pipe", timeout: timeoutMs, killSignal: "SIGKILL", env });
  const [stdout, stderr, code] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
  if (p.signalCode) return { code: 124, stdout, stderr: `${stderr}\n(${cmd.slice(0, 3).join(" ")} killed after ${timeoutMs}ms)` };
  return { code, stdout, stderr };
}

/** The last lines of a command's output, for a failure message. */
export function tail(text: string, lines = 6): string {
  return text.trim().split("\n").slice(-lines).join("\n");
}
