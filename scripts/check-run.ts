/**
 * What the check scripts (docker-test.ts, pack-test.ts) share: one line per
 * check (`ok`, `FAIL`, `skip`, the last two counted apart so CI can tell a
 * skip from a pass), and a summary line.
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

/** What a command printed and how it ended (the harness's `exec`). */
export type { Exec } from "../harness.ts";

/** The last lines of a command's output, for a failure message. */
export function tail(text: string, lines = 6): string {
  return text.trim().split("\n").slice(-lines).join("\n");
}
