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

test(
  "chaos: after random kills, freezes and restarts of nodes and registry, list and views agree with the live set",
  async () => {
    const args = ["--duration", "5", "--nodes", "10", "--seed", "1", "--heartbeat", "300", "--settle", "20", "--json"];
    run = spawnScript("scripts/chaos.ts", args, { label: "chaos" });
    const code = await withDeadline(run.exited(), 55_000, "the chaos run to end");
    if (code !== 0) console.log(run.stderr.join("\n")); // the narrative is what makes a failure debuggable
    const report = (await run.log.waitFor("chaos-report", 0, "its report line")) as any; // checked field by field below
    expect(report.problems).toEqual([]);
    expect(report.ok).toBe(true);
    expect(code).toBe(0);
    // The run must actually have disturbed something, or agreement proves nothing.
    expect(report.actions.kill).toBeGreaterThan(0);
    expect(report.actions["registry-restart"]).toBeGreaterThan(0);
    expect(report.live).toBeGreaterThan(1);
    expect(report.listed).toBe(report.live);
    expect(report.viewsAgreeing).toBe(report.live);
  },
  { timeout: 60_000 },
);

test.skipIf(redisUnavailable !== null)(
  "chaos with 3 registries on one store: after kills, freezes and restarts of nodes, registries and the store, every list and view agrees",
  async () => {
    const args = ["--duration", "8", "--nodes", "10", "--registries", "3", "--seed", "1", "--heartbeat", "300", "--settle", "25", "--json"];
    run = spawnScript("scripts/chaos.ts", args, { label: "chaos" });
    const code = await withDeadline(run.exited(), 70_000, "the chaos run to end");
    if (code !== 0) console.log(run.stderr.join("\n"));
    const report = (await run.log.waitFor("chaos-report", 0, "its report line")) as any; // checked field by field below
    expect(report.problems).toEqual([]);
    expect(report.ok).toBe(true);
    expect(code).toBe(0);
    expect(report.actions.kill).toBeGreaterThan(0);
    expect(report.actions["registry-restart"]).toBeGreaterThan(0);
    expect(report.actions["store-restart"]).toBeGreaterThan(0);
    expect(report.live).toBeGreaterThan(1);
    expect(report.listed).toBe(report.live);
    expect(report.viewsAgreeing).toBe(report.live);
  },
  { timeout: 75_000 },
);
