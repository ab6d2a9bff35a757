/**
 * In-process scale: a few hundred nodes (real sockets on loopback, one
 * process) against one registry form a full mesh: every pair greets exactly
 * once, both sides log it, and the registry's receipts agree.
 */
import { expect, test } from "bun:test";
import { startNode, type PeerNode } from "../client.ts";
import { startRegistry } from "../registry.ts";
import { meshProblems, waitUntil, type JsonEvent } from "../harness.ts";

const N = 200;

test(`${N} in-process nodes form a full mesh: every pair exactly once, and the registry counts n(n-1)/2 pairs`, async () => {
  const pairs = (N * (N - 1)) / 2;
  await using reg = await startRegistry({ host: "127.0.0.1", port: 0 });
  const ids = Array.from({ length: N }, (_, i) => `scale-${i}`);
  const greeted = new Map(ids.map((id) => [id, [] as string[]]));
  const received = new Map(ids.map((id) => [id, [] as string[]]));
  const failures: JsonEvent[] = [];
  const nodes: PeerNode[] = [];
  try {
    // Not waiting for registration inside startNode: every node is in `nodes` at once, so `finally` stops them all.
    const started = await Promise.allSettled(
      ids.map((id) =>
        startNode({
          registryHost: "127.0.0.1",
          registryPort: reg.port,
          id,
          waitForRegistration: false,
          onEvent: (e) => {
            if (e.event === "greeted") greeted.get(id)!.push(e.peer);
            else if (e.event === "greeting") received.get(id)!.push(e.peer);
            else if (e.event === "greet-failed" || e.event === "error") failures.push({ ...e, node: id });
          },
        }),
      ),
    );
    for (const r of started) if (r.status === "fulfilled") nodes.push(r.value);
    const refused = started.find((r) => r.status === "rejected");
    if (refused) throw (refused as PromiseRejectedResult).reason;

    await waitUntil(() => reg.stats().nodes === N, 60_000, `${N} nodes registered`);
    const count = (m: Map<string, string[]>) => Array.from(m.values()).reduce((s, l) => s + l.length, 0);
    await waitUntil(
      () => failures.length > 0 || (count(greeted) >= pairs && count(received) >= pairs),
      60_000,
      `${pairs} greetings sent and received`,
    );
    expect(failures).toEqual([]);

    expect(meshProblems(ids, greeted, received)).toEqual([]);
    for (const n of nodes) expect(n.met().length).toBe(N - 1);

    // Receipts reach the registry after the greetings themselves.
    await waitUntil(() => reg.stats().pairsGreeted >= pairs, 30_000, `registry to count ${pairs} greeted pairs`);
    const stats = reg.stats();
    expect(stats.pairsGreeted).toBe(pairs);
    expect(stats.pairsExpected).toBe(pairs);
    expect(stats.nodes).toBe(N);
    expect(new Set(reg.pairs().map(([a, b]) => `${a}~${b}`)).size).toBe(pairs);
  } finally {
    await Promise.allSettled(nodes.map((n) => n.stop()));
  }
}, 120_000);
