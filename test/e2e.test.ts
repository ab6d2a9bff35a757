/**
 * End to end with real processes: `bun registry.ts` and N `bun client.ts`
 * on loopback, checked only through their --json output and exit codes.
 * Deadlines are generous ceilings (ten bun processes starting at once on two
 * cores take seconds), never expectations.
 */
import { describe, expect, test } from "bun:test";
import { disposeAll, greetingsOf, meshProblems, spawnNode, spawnRegistry, spawnScript, waitUntil, withDeadline, type NodeLine, type NodeProc, type Proc } from "../harness.ts";


describe("full mesh of greetings between processes", () => {
  test.each([2, 5, 10])(
    "%i client.ts processes against one registry.ts: every pair greeted exactly once, acknowledged on both sides",
    async (n) => {
      const procs: Proc[] = [];
      try {
        const registry = await spawnRegistry();
        procs.push(registry);
        const nodes = await spawnNodes(registry.port, n, procs);
        const ids = nodes.map((p) => p.id);
        expect(new Set(ids).size).toBe(n);

        const pairs = (n * (n - 1)) / 2;
        const total = (event: NodeLine["event"]) => nodes.reduce((sum, p) => sum + p.log.named(event).length, 0);
        await waitUntil(() => total("greeted") >= pairs && total("greeting") >= pairs, 60_000, `${pairs} greetings sent and received`);

        // Each pair once on either side, and the two sides describe the same greetings: A greeted B exactly when B logged a greeting from A.
        const { greeted, received } = greetingsOf(nodes);
        expect(meshProblems(ids, greeted, received)).toEqual([]);

        // Each node was given exactly the nodes registered before it, so the `peers` counts are 0..n-1.
        const given = nodes.map((p) => Number(p.log.named("registered")[0]?.peers)).sort((a, b) => a - b);
        expect(given).toEqual(Array.from({ length: n }, (_, i) => i));
        for (const p of nodes) {
          expect(p.log.named("greet-failed")).toEqual([]);
          expect(p.log.named("error")).toEqual([]);
          const e = p.log.named("listening")[0]!;
          expect(e.time).toBeString();
          expect(Number.isNaN(Date.parse(e.time))).toBe(false);
        }
        expect(registry.log.named("node-registered").length).toBe(n);
      } finally {
        await disposeAll(procs);
      }
    },
    90_000,
  );
});

describe("departure", () => {
  test("a SIGTERMed node exits 0, the others get peer-left, and a later node is not given its address", async () => {
    const procs: Proc[] = [];
    try {
      const registry = await spawnRegistry();
      procs.push(registry);
      const nodes = await spawnNodes(registry.port, 4, procs);
      const [a, b, gone, d] = nodes as [NodeProc, NodeProc, NodeProc, NodeProc];
      const stay = [a, b, d];

      gone.signal("SIGTERM");
      expect(await withDeadline(gone.exited(), 20_000, "the SIGTERMed node to exit")).toBe(0);
      for (const p of stay) {
        const left = await p.log.waitForWhere("peer-left", (e) => e.peer === gone.id, 20_000, `peer-left at ${p.id}`);
        expect(left.reason).toBe("leave"); // SIGTERM is a clean stop: the node says goodbye
      }
      const regLeft = await registry.log.waitForWhere("node-left", (e) => e.id === gone.id, 20_000, "registry node-left");
      expect(regLeft.nodes).toBe(3);

      const late = await spawnNode(registry.port);
      procs.push(late);
      const reg = late.log.named("registered")[0]!;
      expect(reg.peers).toBe(3);
      const pairs = 3;
      await waitUntil(() => late.log.named("greeted").length >= pairs, 30_000, "the late node to greet the live nodes");
      expect(late.log.named("greeted").map((e) => e.peer).sort()).toEqual(stay.map((p) => p.id).sort());
      expect(late.log.events.some((e) => ("peer" in e && e.peer === gone.id) || ("address" in e && e.address === `127.0.0.1:${gone.port}`))).toBe(false);
      expect(late.log.named("greet-failed")).toEqual([]);
    } finally {
      await disposeAll(procs);
    }
  }, 90_000);

  test("a SIGKILLed node disappears too: the others get peer-left with reason closed", async () => {
    const procs: Proc[] = [];
    try {
      const registry = await spawnRegistry();
      procs.push(registry);
      const [a, killed] = (await spawnNodes(registry.port, 2, procs)) as [NodeProc, NodeProc];
      await killed.kill("SIGKILL");
      const left = await a.log.waitForWhere("peer-left", (e) => e.peer === killed.id, 20_000, "peer-left");
      expect(left.reason).toBe("closed");
      const regLeft = await registry.log.waitForWhere("node-left", (e) => e.id === killed.id, 20_000, "registry node-left");
      expect(regLeft.reason).toBe("closed");
      const late = await spawnNode(registry.port);
      procs.push(late);
      expect(late.log.named("registered")[0]!.peers).toBe(1);
    } finally {
      await disposeAll(procs);
    }
  }, 60_000);
});

describe("command line", () => {
  test.each([
    ["registry.ts", ["--json", "--token", "--heartbeat", "--no-probe", "--max-line", "--max-nodes", "REGISTRY_PORT"]],
    ["client.ts", ["--json", "--listen", "--advertise", "--name", "--token", "--greet-timeout", "REGISTRY_HOST"]],
  ])("%s --help exits 0 and names its flags", async (script, flags) => {
    await using p = spawnScript(script, ["--help"]);
    expect(await withDeadline(p.exited(), 20_000, `${script} --help`)).toBe(0);
    const out = p.stderr.join("\n"); // Proc files non-JSON stdout lines under stderr, prefixed "stdout: "
    expect(out).toContain(`Usage: bun ${script}`);
    for (const f of flags) expect(out).toContain(f);
  }, 30_000);

  test.each([
    ["registry.ts", ["127.0.0.1", "eighty"], 'got "eighty"'],
    ["registry.ts", ["127.0.0.1", "70000"], 'got "70000"'],
    ["client.ts", ["127.0.0.1", "eighty"], 'got "eighty"'],
    ["client.ts", ["127.0.0.1", "0"], 'got "0"'],
    ["client.ts", [], "missing the registry address"],
    ["client.ts", ["127.0.0.1"], "missing the registry port"],
    ["registry.ts", ["127.0.0.1", "0", "--tokn", "x"], "unknown option --tokn"],
    ["client.ts", ["127.0.0.1", "1", "--max-line", "lots"], "--max-line"],
    ["registry.ts", ["127.0.0.1", "0", "--store", "http://127.0.0.1:6379"], "--store: store URL must start with redis:// or rediss://"],
    ["registry.ts", ["127.0.0.1", "0", "--store", "redis://127.0.0.1:6379/zero"], "only in a database number"],
    ["client.ts", ["--registry", "127.0.0.1"], '--registry must be host:port, got "127.0.0.1"'],
    ["client.ts", ["127.0.0.1", "1", "--registry", "127.0.0.1:99999"], "--registry: invalid port"],
  ] as const)("%s %p exits 2 with a clear message", async (script, args, message) => {
    // Env vars fill in missing arguments, so the test must not inherit any.
    await using p = spawnScript(script, [...args], { env: { REGISTRY_HOST: "", REGISTRY_PORT: "" } });
    expect(await withDeadline(p.exited(), 20_000, `${script} to exit`)).toBe(2);
    const err = p.stderr.join("\n");
    expect(err).toContain("usage error");
    expect(err).toContain(message);
    expect(err).not.toContain("    at "); // a message, not a stack trace
  }, 30_000);

  test.each([
    ["registry.ts", (port: number) => ["127.0.0.1", String(port)]],
    ["client.ts", (port: number) => ["127.0.0.1", "1", "--listen", "127.0.0.1", "--port", String(port)]],
  ] as const)("%s on a port already taken exits 1 naming the port, no stack trace", async (script, args) => {
    const taken = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
    try {
      await using p = spawnScript(script, args(taken.port), { env: { REGISTRY_HOST: "", REGISTRY_PORT: "" } });
      expect(await withDeadline(p.exited(), 20_000, `${script} to exit`)).toBe(1);
      const err = p.stderr.join("\n");
      expect(err).toContain(`port ${taken.port} is already in use on 127.0.0.1`);
      expect(err).not.toContain("    at ");
    } finally {
      taken.stop(true);
    }
  }, 30_000);

  test("the original usage: `bun registry.ts localhost <port>` and `bun client.ts localhost <port>`", async () => {
    const procs: Proc[] = [];
    try {
      const { registry, port } = await registryOnLocalhost(procs);
      expect(registry.log.named("listening")[0]!.port).toBe(port);
      const a = await spawnNode(port, [], {}, "localhost");
      procs.push(a);
      const b = await spawnNode(port, [], {}, "localhost");
      procs.push(b);
      await b.log.waitForWhere("greeted", (e) => e.peer === a.id, 30_000, "b to greet a");
      await a.log.waitForWhere("greeting", (e) => e.peer === b.id, 30_000, "a to log b's greeting");

      // Without --json: readable lines saying who registered and whom it greeted.
      const human = spawnScript("client.ts", ["localhost", String(port)], { label: "human" });
      procs.push(human);
      const greetedLines = () => human.stderr.filter((l) => /greeted /.test(l));
      await waitUntil(() => greetedLines().length >= 2, 30_000, "human output to show two greetings");
      const text = human.stderr.join("\n");
      expect(text).toContain("given 2 peers");
      expect(text).toContain(a.id);
      expect(text).toContain(b.id);
      expect(text).not.toContain('{"event"');
    } finally {
      await disposeAll(procs);
    }
  }, 90_000);
});

// --- internal ----------------------------------------------------------------

/** Starts n nodes at once; every one that started is in `procs` for cleanup, even if another failed. */
async function spawnNodes(registryPort: number, n: number, procs: Proc[]): Promise<NodeProc[]> {
  const results = await Promise.allSettled(Array.from({ length: n }, () => spawnNode(registryPort)));
  const nodes = results.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
  procs.push(...nodes);
  const failed = results.find((r) => r.status === "rejected");
  if (failed) throw (failed as PromiseRejectedResult).reason;
  return nodes;
}

/**
 * `bun registry.ts localhost <port>` needs a concrete port: try random high
 * ones and move on when the port is taken (the registry exits 1 saying so).
 */
async function registryOnLocalhost(procs: Proc[]): Promise<{ registry: Proc; port: number }> {
  const tried: string[] = [];
  for (let attempt = 0; attempt < 8; attempt++) {
    const port = 20_000 + Math.floor(Math.random() * 40_000);
    const registry = spawnScript("registry.ts", ["localhost", String(port), "--json"], { label: "registry" });
    procs.push(registry);
    const outcome = await withDeadline(
      Promise.race([registry.log.waitFor("listening", 30_000).then(() => "listening" as const), registry.exited().then((code) => code)]),
      30_000,
      "registry on localhost to listen or exit",
    );
    if (outcome === "listening") return { registry, port };
    const err = registry.stderr.join("\n");
    tried.push(`${port}: exit ${outcome}: ${err}`);
    if (!/already in use/.test(err)) break;
  }
  throw new Error(`could not start a registry on localhost: ${tried.join("; ")}`);
}
