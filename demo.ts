#!/usr/bin/env bun
/**
 * The newcomer's tour: starts a registry and a handful of nodes as real
 * processes on loopback, shows each join and greeting as it happens, draws the
 * mesh once it is complete, then stops everything cleanly.
 * `bun demo.ts [--nodes 5]` (or `npm run demo`).
 */
import { intArg } from "./cli.ts";
import { disposeAll, greetingsOf, killAllOnExit, meshProblems, runScript, spawnNode, spawnRegistry, waitUntil, type NodeLine, type NodeProc, type Proc } from "./harness.ts";

async function demo(n: number, deadlineMs: number, procs: Proc[]): Promise<boolean> {
  const say = (text: string) => process.stdout.write(`${text}\n`);
  const registry = await spawnRegistry();
  procs.push(registry);
  say(`registry  listening on 127.0.0.1:${registry.port}`);

  const names = Array.from({ length: n }, (_, i) => `node-${i + 1}`);
  const nodes: NodeProc[] = [];
  for (const name of names) {
    const node = await spawnNode(registry.port, ["--name", name]);
    procs.push(node);
    nodes.push(node);
    const reg = node.log.events.find((e) => e.event === "registered")!;
    say(`${name.padEnd(9)} listening on port ${node.port}, registered as ${reg.address}, given ${reg.peers} peer(s)`);
  }

  const byId = new Map(nodes.map((p, i) => [p.id, names[i]!]));
  const expected = (n * (n - 1)) / 2;
  const count = (event: NodeLine["event"]) => nodes.reduce((sum, p) => sum + p.log.named(event).length, 0);
  await waitUntil(() => count("greeted") >= expected, deadlineMs, `${expected} greetings`);
  // Count receptions too: a greeting is complete when the receiver logged it.
  await waitUntil(() => count("greeting") >= expected, deadlineMs, `${expected} receptions`);

  for (const [i, p] of nodes.entries()) {
    const who = p.log.named("greeted").map((e) => byId.get(e.peer) ?? e.peer);
    if (who.length) say(`${names[i]!.padEnd(9)} greeted ${who.join(", ")}`);
  }
  say("");
  const { greeted, received } = greetingsOf(nodes);
  const problems = meshProblems(nodes.map((p) => p.id), greeted, received);
  if (problems.length) say(`mesh NOT complete: ${problems.join("; ")}`);
  else say(`every pair greeted exactly once: ${expected} greetings among ${n} nodes`);
  say("row greeted column (G), column greeted row (g):");
  say(`          ${names.map((_, i) => String(i + 1).padStart(5)).join("")}`);
  for (const [i, p] of nodes.entries()) {
    const sent = new Set(greeted.get(p.id));
    const got = new Set(received.get(p.id));
    const row = nodes.map((q) => (q === p ? "·" : sent.has(q.id) ? "G" : got.has(q.id) ? "g" : "?"));
    say(`${names[i]!.padEnd(10)}${row.map((c) => c.padStart(5)).join("")}`);
  }

  say("");
  const last = nodes.pop()!;
  const lastName = byId.get(last.id);
  const code = await last.kill("SIGTERM");
  await waitUntil(() => nodes.every((p) => p.log.named("peer-left").some((e) => e.peer === last.id)), deadlineMs, "peer-left everywhere");
  say(`${lastName} stopped (exit ${code}); every other node was told it left`);

  for (const p of nodes) await p.kill("SIGTERM");
  const rc = await registry.kill("SIGTERM");
  say(`all nodes stopped; registry stopped (exit ${rc})`);
  return !problems.length && code === 0 && rc === 0;
}

if (import.meta.main) {
  killAllOnExit(); // Ctrl-C during the tour stops its processes too
  await runScript(
    { name: "demo", description: "Start a registry and N nodes on loopback, watch the mesh form, stop cleanly." },
    {
      nodes: { type: "string", description: "How many nodes", default: "5" },
      timeout: { type: "string", description: "Give up after this many seconds", default: "60" },
    },
    async (args) => {
      const procs: Proc[] = [];
      try {
        return (await demo(intArg("nodes", args.nodes, 2), intArg("timeout", args.timeout, 1) * 1000, procs)) ? 0 : 1;
      } finally {
        await disposeAll(procs);
      }
    },
  );
}
