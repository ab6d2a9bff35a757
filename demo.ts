#!/usr/bin/env bun
/**
 * The newcomer's tour: starts a registry and a handful of nodes as real
 * processes on loopback, shows each join and greeting as it happens, draws the
 * mesh once it is complete, then stops everything cleanly.
 * `bun demo.ts [--nodes 5]` (or `npm run demo`).
 */
import { defineCommand, runMain } from "citty";
import { intArg, runCli } from "./cli.ts";
import { disposeAll, meshProblems, spawnNode, spawnRegistry, waitUntil, type Proc } from "./test/helpers.ts";

export const command = defineCommand({
  meta: { name: "demo", description: "Start a registry and N nodes on loopback, watch the mesh form, stop cleanly." },
  args: {
    nodes: { type: "string", description: "How many nodes", default: "5" },
    timeout: { type: "string", description: "Give up after this many seconds", default: "60" },
  },
  async run({ args }) {
    await runCli(async () => {
      const n = intArg("nodes", args.nodes, 2);
      const deadlineMs = intArg("timeout", args.timeout, 1) * 1000;
      const procs: Proc[] = [];
      let ok = false;
      try {
        ok = await demo(n, deadlineMs, procs);
      } finally {
        await disposeAll(procs);
      }
      process.exit(ok ? 0 : 1);
    });
  },
});

async function demo(n: number, deadlineMs: number, procs: Proc[]): Promise<boolean> {
  const say = (text: string) => process.stdout.write(`${text}\n`);
  const registry = await spawnRegistry();
  procs.push(registry);
  say(`registry  listening on 127.0.0.1:${registry.port}`);

  const names = Array.from({ length: n }, (_, i) => `node-${i + 1}`);
  const nodes: (Proc & { id: string; port: number })[] = [];
  for (const name of names) {
    const node = await spawnNode(registry.port, ["--name", name]);
    procs.push(node);
    nodes.push(node);
    const reg = node.log.events.find((e) => e.event === "registered")!;
    say(`${name.padEnd(9)} listening on port ${node.port}, registered as ${reg.address}, given ${reg.peers} peer(s)`);
  }

  const byId = new Map(nodes.map((p, i) => [p.id, names[i]!]));
  const expected = (n * (n - 1)) / 2;
  const greeted = () => nodes.reduce((sum, p) => sum + p.log.named("greeted").length, 0);
  await waitUntil(() => greeted() >= expected, deadlineMs, `${expected} greetings`);
  // Count receptions too: a greeting is complete when the receiver logged it.
  await waitUntil(() => nodes.reduce((s, p) => s + p.log.named("greeting").length, 0) >= expected, deadlineMs, `${expected} receptions`);

  for (const [i, p] of nodes.entries()) {
    const who = p.log.named("greeted").map((e) => byId.get(String(e.peer)) ?? e.peer);
    if (who.length) say(`${names[i]!.padEnd(9)} greeted ${who.join(", ")}`);
  }
  say("");
  const problems = meshProblems(
    nodes.map((p) => p.id),
    new Map(nodes.map((p) => [p.id, p.log.named("greeted").map((e) => String(e.peer))])),
  );
  if (problems.length) say(`mesh NOT complete: ${problems.join("; ")}`);
  else say(`every pair greeted exactly once: ${expected} greetings among ${n} nodes`);
  say("row greeted column (G), column greeted row (g):");
  say(`          ${names.map((_, i) => String(i + 1).padStart(5)).join("")}`);
  for (const [i, p] of nodes.entries()) {
    const sent = new Set(p.log.named("greeted").map((e) => String(e.peer)));
    const got = new Set(p.log.named("greeting").map((e) => String(e.peer)));
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

if (import.meta.main) await runMain(command);
