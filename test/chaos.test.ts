/**
 * The short CI version of scripts/chaos.ts: 10 node processes and a registry
 * process, a few seconds of kill -9, SIGTERM, SIGSTOP and restarts (the
 * registry's included), then the registry's list must equal the live set and
 * every node's view must equal that list minus itself.
 */
import { afterEach, expect, test } from "bun:test";
import { runChaos, stopAllChaos } from "../scripts/chaos.ts";

// bun test does not cancel a test that ran past its timeout: whatever the run left behind is killed here.
afterEach(stopAllChaos);

test(
  "chaos: after random kills, freezes and restarts of nodes and registry, list and views agree with the live set",
  async () => {
    const lines: string[] = [];
    const report = await runChaos({ durationMs: 5_000, nodes: 10, seed: 1, heartbeatMs: 300, settleMs: 20_000, print: (l) => lines.push(l) });
    if (!report.ok) console.log(lines.join("\n")); // the narrative is what makes a failure debuggable
    expect(report.problems).toEqual([]);
    expect(report.ok).toBe(true);
    // The run must actually have disturbed something, or agreement proves nothing.
    expect(report.actions.kill).toBeGreaterThan(0);
    expect(report.actions["registry-restart"]).toBeGreaterThan(0);
    expect(report.live).toBeGreaterThan(1);
    expect(report.listed).toBe(report.live);
    expect(report.viewsAgreeing).toBe(report.live);
  },
  { timeout: 60_000 },
);
