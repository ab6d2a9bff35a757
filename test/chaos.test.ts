/**
 * The short CI version of scripts/chaos.ts, run as the script it is: 10 node
 * processes and a registry process, a few seconds of kill -9, SIGTERM,
 * SIGSTOP and restarts (the registry's included), then the registry's list
 * must equal the live set and every node's view must equal that list minus
 * itself. Then the same with three registries sharing a private
 * redis-server, where registries are also frozen and the store is killed
 * (restarted empty) and frozen: every registry's list must equal the live set.
 */
import { afterEach, expect, test } from "bun:test";
import { redisUnavailable, spawnScript, withDeadline, type Proc } from "../harness.ts";

if (redisUnavailable) console.log(`SKIP redis: ${redisUnavailable}`);

let run: Proc | undefined;
// bun test does not cancel a test that ran past its timeout; SIGTERM makes the script kill every process it started.
afterEach(() => run?.stop());

/**
 * Runs the script to its end and checks its report: no problem, every list
 * and view agreeing with the live set, and each of `disturbed` done at least
 * once (the run must actually have disturbed something, or agreement proves nothing).
 */
async function chaos(args: string[], timeoutMs: number, disturbed: string[]): Promise<void> {
  run = spawnScript("scripts/chaos.ts", [...args, "--heartbeat", "300", "--json"], { label: "chaos" });
  const code = await withDeadline(run.exited(), timeoutMs, "the chaos run to end");
  if (code !== 0) console.log(run.stderr.join("\n")); // the narrative is what makes a failure debuggable
  const report = (await run.log.waitFor("chaos-report", 0, "its report line")) as any; // checked field by field below
  expect(report.problems).toEqual([]);
  expect(report.ok).toBe(true);
  expect(code).toBe(0);
  for (const action of disturbed) expect(report.actions[action]).toBeGreaterThan(0);
  expect(report.live).toBeGreaterThan(1);
  expect(report.listed).toBe(report.live);
  expect(report.viewsAgreeing).toBe(report.live);
}

test(
  "chaos: after random kills, freezes and restarts of nodes and registry, list and views agree with the live set",
  () => chaos(["--duration", "5", "--nodes", "10", "--seed", "1", "--settle", "20"], 55_000, ["kill", "registry-restart"]),
  { timeout: 60_000 },
);

test.skipIf(redisUnavailable !== null)(
  "chaos with 3 registries on one store: after kills, freezes and restarts of nodes, registries and the store, every list and view agrees",
  () => chaos(["--duration", "8", "--nodes", "10", "--registries", "3", "--seed", "1", "--settle", "25"], 70_000, ["kill", "registry-restart", "store-restart"]),
  { timeout: 75_000 },
);
