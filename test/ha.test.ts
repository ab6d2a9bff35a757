/**
 * Several registries sharing one list through a private redis-server, as
 * processes at default timers: a full mesh spread over three registries, a
 * registry killed with its nodes failing over, the store killed and restarted
 * empty, and two registries getting the same id at the same moment.
 * Without redis-server: one SKIP line, and skipped.
 */
import { afterEach, describe, expect, test } from "bun:test";
import {
  RawClient,
  RedisServer,
  askView,
  disposeAll,
  greetingsOf,
  listed,
  meshProblems,
  probeResponder,
  redisUnavailable,
  spawnNode,
  spawnStoreRegistry,
  statusJson,
  testCerts,
  waitUntil,
  withDeadline,
  type NodeLine,
  type NodeProc,
  type Proc,
  type StoreRegistry,
} from "../harness.ts";
import { DEFAULTS } from "../protocol.ts";
import { STORE_DEFAULTS } from "../redis.ts";

if (redisUnavailable) console.log(`SKIP redis: ${redisUnavailable}`);


const TEST_MS = 60_000;
const WAIT_MS = 20_000;
/** The bound for a dead node on a dead registry: lease TTL + the heartbeat timeout (defaults). */
const DEAD_NODE_BOUND_MS = STORE_DEFAULTS.leaseMs + DEFAULTS.heartbeatMs * DEFAULTS.heartbeatMisses;

const fixtures: AsyncDisposable[] = [];
afterEach(async () => {
  await disposeAll(fixtures.splice(0).reverse());
});

async function store(): Promise<RedisServer> {
  const s = await RedisServer.start();
  fixtures.push(s);
  return s;
}

async function registries(url: string, n: number): Promise<StoreRegistry[]> {
  const regs = await Promise.all(Array.from({ length: n }, () => spawnStoreRegistry(url)));
  fixtures.push(...regs);
  return regs;
}

/** Nodes given every registry (the first as the positional pair, the rest as --registry): each picks one at random. */
async function nodes(regs: StoreRegistry[], n: number): Promise<NodeProc[]> {
  const more = regs.slice(1).flatMap((r) => ["--registry", `127.0.0.1:${r.port}`]);
  const out = await Promise.all(Array.from({ length: n }, () => spawnNode(regs[0]!.port, more)));
  fixtures.push(...out);
  return out;
}

/** The registry a node's last registration went to, by the address its `registered` event names. */
function registryOf(node: NodeProc, regs: StoreRegistry[]): StoreRegistry {
  const at = String(node.log.named("registered").at(-1)?.registry);
  const r = regs.find((x) => at === `127.0.0.1:${x.port}`);
  if (!r) throw new Error(`${node.id} registered with ${at}, none of ours`);
  return r;
}

/** What keeps the registries' lists and the nodes' views from agreeing with the live nodes; empty when they all do. */
async function disagreements(regs: StoreRegistry[], live: NodeProc[]): Promise<string[]> {
  const want = live.map((n) => n.id).sort();
  const problems: string[] = [];
  for (const r of regs) {
    const ids = [...(await listed(r.http)).keys()].sort();
    if (ids.join() !== want.join()) problems.push(`registry ${r.id} lists [${ids}], live are [${want}]`);
  }
  if (problems.length) return problems;
  for (const n of live) {
    const v = await askView(n);
    const expected = want.filter((id) => id !== n.id);
    if (!v.registered || v.peers.join() !== expected.join()) problems.push(`node ${n.id}${v.registered ? "" : " (not registered)"} sees [${v.peers}]`);
  }
  return problems;
}

async function agree(regs: StoreRegistry[], live: NodeProc[], ms: number, what: string): Promise<void> {
  let last: string[] = [];
  await waitUntil(async () => (last = await disagreements(regs, live)).length === 0, ms, what, 50).catch((e: Error) => {
    throw new Error(`${e.message}: ${last.join("; ")}`);
  });
}

/** Waits for every pair of `all` to have greeted (both ends logged it); the mesh must then be exact. */
async function meshFormed(all: NodeProc[]): Promise<void> {
  const pairs = (all.length * (all.length - 1)) / 2;
  const count = (event: NodeLine["event"]) => all.reduce((sum, n) => sum + n.log.named(event).length, 0);
  await waitUntil(() => count("greeted") >= pairs && count("greeting") >= pairs, WAIT_MS, `${pairs} greetings, both ends`, 20);
}

function meshOf(all: NodeProc[]): string[] {
  const { greeted, received } = greetingsOf(all);
  return meshProblems(
    all.map((n) => n.id),
    greeted,
    received,
  );
}

describe.skipIf(redisUnavailable !== null)("several registries on one store (processes, default timers)", () => {
  test("full mesh: 3 registries, 9 nodes spread over them; every pair greeted once, every registry lists all 9 and where each is", async () => {
    const s = await store();
    const regs = await registries(s.url, 3);
    // One node given only its registry, so that each registry holds one for certain; six pick at random.
    const pinned = await Promise.all(regs.map((r) => spawnNode(r.port)));
    fixtures.push(...pinned);
    const all = [...pinned, ...(await nodes(regs, 6))];
    await meshFormed(all);
    expect(meshOf(all)).toEqual([]);
    for (const r of regs) expect(all.filter((n) => registryOf(n, regs) === r).length).toBeGreaterThan(0);
    await agree(regs, all, WAIT_MS, "every registry to list all 9 and every view to match");
    for (const r of regs) {
      const list = await listed(r.http);
      expect(Object.fromEntries([...list].map(([id, p]) => [id, [p.port, p.registry]]))).toEqual(
        Object.fromEntries(all.map((n) => [n.id, [n.port, registryOf(n, regs).id]])),
      );
      // Greetings are global: each registry has every pair, whoever's nodes they are.
      await waitUntil(async () => ((await statusJson(r.http, "/stats")).mesh as { complete: boolean }).complete, WAIT_MS, `${r.id} to see the mesh complete`);
      const stats = await statusJson(r.http, "/stats");
      expect({ nodes: stats.nodes, mesh: stats.mesh, store: stats.store }).toMatchObject({ nodes: 9, mesh: { pairsGreeted: 36, pairsExpected: 36 }, store: "ok" });
      expect(stats.sessions).toBe(all.filter((n) => registryOf(n, regs) === r).length);
    }
  }, TEST_MS);

  test("a registry killed: its nodes fail over and are listed again, a node killed with it is removed within lease TTL + heartbeat timeout", async () => {
    const s = await store();
    const regs = await registries(s.url, 3);
    const all = await nodes(regs, 9);
    await meshFormed(all);
    // The registry holding the most nodes (at least 3 of 9) dies, and one of its nodes with it.
    const on = (r: StoreRegistry) => all.filter((n) => registryOf(n, regs) === r);
    const victim = regs.reduce((a, b) => (on(b).length > on(a).length ? b : a));
    const [doomed, ...movers] = on(victim) as [NodeProc, ...NodeProc[]];
    const survivors = regs.filter((r) => r !== victim);
    const live = all.filter((n) => n !== doomed);
    const marks = new Map<Proc, number>([...survivors, ...all].map((p) => [p, p.log.events.length]));
    const since = (p: Proc) => p.log.events.slice(marks.get(p));

    const killedAt = performance.now();
    victim.killNow();
    doomed.killNow();
    await Promise.all(
      movers.map((n) => n.log.waitForWhere("registered", (e) => e.again === true && since(n).includes(e), WAIT_MS, `${n.id} to register elsewhere`)),
    );
    for (const n of movers) expect(survivors).toContain(registryOf(n, regs));
    await agree(survivors, live, DEAD_NODE_BOUND_MS - (performance.now() - killedAt), "the survivors to list exactly the live nodes");
    const agreedMs = performance.now() - killedAt;
    expect(agreedMs).toBeLessThan(DEAD_NODE_BOUND_MS);

    for (const r of survivors) {
      const about = (id: string) => since(r).filter((e) => (e.event === "node-left" || e.event === "node-registered") && e.id === id);
      // A mover replaces its old entry as an update if it comes back before the lease runs out (the
      // others hear one `joined`), else it is swept first (`left` timeout, then `joined`).
      for (const n of movers) {
        const seen = about(n.id).map((e) => (e.event === "node-left" ? `left ${e.reason}` : "registered"));
        expect([["registered"], ["left timeout", "registered"]]).toContainEqual(seen);
      }
      expect(about(doomed.id).map((e) => `${e.event} ${e.reason}`)).toEqual(["node-left timeout"]);
    }
    // No node greeted anyone again: the pairs of all nine, the dead one included, are still exactly once.
    expect(meshOf(all)).toEqual([]);
    for (const n of live) expect(since(n).filter((e) => e.event === "error")).toEqual([]);
  }, TEST_MS);

  test("the store killed and restarted empty: registries degrade and serve alone, then every list and view is whole again", async () => {
    const s = await store();
    const regs = await registries(s.url, 2);
    const all = await nodes(regs, 6);
    await agree(regs, all, WAIT_MS, "the lists and views before the store goes");
    const bootBefore = String((await statusJson(regs[0]!.http, "/stats")).boot);
    const storeEvents = regs.map((r) => r.log.named("store").length);

    await s.kill();
    for (const r of regs) {
      await r.log.waitForWhere("store", (e) => e.state === "degraded", WAIT_MS, `${r.id} to report the store lost`);
      // Still healthy (200): it serves its own nodes. /healthz may answer from figures a cache interval old.
      await waitUntil(async () => (await statusJson(r.http, "/healthz")).status === "degraded", WAIT_MS, `${r.id}'s /healthz to say degraded`, 50);
      expect(await statusJson(r.http, "/healthz")).toMatchObject({ status: "degraded", nodes: 6 });
    }
    // Registering goes on meanwhile, on the registry the node is given.
    const late = await spawnNode(regs[0]!.port);
    fixtures.push(late);
    const registrations = all.map((n) => n.log.named("registered").length);

    await s.restart();
    for (const r of regs) await r.log.waitForWhere("store", (e) => e.state === "ok", WAIT_MS, `${r.id} to report the store back`);
    await agree(regs, [...all, late], WAIT_MS, "every list and view to be whole again");
    await waitUntil(async () => (await Promise.all(regs.map((r) => statusJson(r.http, "/stats")))).every((x) => x.store === "ok"), WAIT_MS, "/stats to say ok", 50);
    const stats = await Promise.all(regs.map((r) => statusJson(r.http, "/stats")));
    expect(stats.map((x) => [x.store, x.nodes])).toEqual([
      ["ok", 7],
      ["ok", 7],
    ]);
    // The store started over: a new boot, taken by every session as it was (nobody registered again).
    expect(stats[0]!.boot).toBe(stats[1]!.boot);
    expect(stats[0]!.boot).not.toBe(bootBefore);
    expect(all.map((n) => n.log.named("registered").length)).toEqual(registrations);
    // Exactly one degraded and one ok report each: logged once, not per retry.
    for (const [i, r] of regs.entries()) expect(r.log.named("store").slice(storeEvents[i]).map((e) => e.state)).toEqual(["degraded", "ok"]);
  }, TEST_MS);

  test("a race: two registries get a register for the same id at the same moment; exactly one entry, the other refused id-in-use", async () => {
    const s = await store();
    const regs = await registries(s.url, 2);
    const clients: RawClient[] = [];
    const probed: ReturnType<typeof probeResponder>[] = [];
    try {
      for (let round = 0; round < 8; round++) {
        const id = `race-${round}`;
        // Two addresses of its own each round: only the id is contested.
        const listeners = regs.map(() => probeResponder());
        probed.push(...listeners);
        const pair = await Promise.all(regs.map((r) => RawClient.connect(r.port)));
        clients.push(...pair);
        await Promise.all(pair.map((c, i) => c.send({ type: "register", v: 1, id, port: listeners[i]!.port })));
        const answers = await Promise.all(pair.map((c) => c.waitFor((m) => m.type === "registered" || m.type === "error", WAIT_MS, `an answer for ${id}`)));
        expect(answers.map((a) => (a.type === "error" ? `${a.code}: ${a.message}` : a.type)).sort()).toEqual([expect.stringMatching(/^id-in-use: /), "registered"]);
        const winner = answers.findIndex((a) => a.type === "registered");
        for (const r of regs) {
          await waitUntil(async () => (await listed(r.http)).has(id), WAIT_MS, `${r.id} to list ${id}`);
          const entry = (await listed(r.http)).get(id)!;
          expect([entry.port, entry.registry]).toEqual([listeners[winner]!.port, regs[winner]!.id]);
        }
      }
      for (const r of regs) expect((await listed(r.http)).size).toBe(8);
    } finally {
      await disposeAll(clients);
      for (const l of probed) l.stop();
    }
  }, TEST_MS);

  test("--store out of reach at start: the registry serves degraded, says so once, and joins the list when the store comes", async () => {
    const s = await store();
    await s.kill();
    const [r] = await registries(s.url, 1);
    await waitUntil(async () => (await statusJson(r!.http, "/healthz")).status === "degraded", WAIT_MS, "/healthz to say degraded", 50);
    const node = await spawnNode(r!.port);
    fixtures.push(node);
    await s.restart();
    await withDeadline(r!.log.waitForWhere("store", (e) => e.state === "ok", WAIT_MS), WAIT_MS, "the store to be reached");
    await agree([r!], [node], WAIT_MS, "the node listed in the store's list");
    expect(r!.log.named("store").map((e) => e.state)).toEqual(["degraded", "ok"]);
    expect(String(r!.log.named("store")[0]!.reason)).toContain(`127.0.0.1:${s.port}`);
  }, TEST_MS);

  test("rediss://: two registries share the list through a store that speaks TLS, its private CA given by NODE_EXTRA_CA_CERTS; without the CA, no connection", async () => {
    await using certs = await testCerts([]);
    const s = await RedisServer.start({ tls: certs.mesh.registry! });
    fixtures.push(s);
    expect(s.url).toStartWith("rediss://127.0.0.1:");
    const trusting = { NODE_EXTRA_CA_CERTS: certs.mesh.ca };
    const regs = await Promise.all([spawnStoreRegistry(s.url, [], trusting), spawnStoreRegistry(s.url, [], trusting)]);
    fixtures.push(...regs);
    const all = await Promise.all(regs.map((r) => spawnNode(r.port)));
    fixtures.push(...all);
    await agree(regs, all, WAIT_MS, "both registries to list both nodes");
    for (const r of regs) expect((await statusJson(r.http, "/stats")).store).toBe("ok");
    // A registry that does not trust the store's CA cannot reach it: degraded, serving only its own.
    const [doubting] = await registries(s.url, 1);
    const lost = await doubting!.log.waitForWhere("store", (e) => e.state === "degraded", WAIT_MS, "the untrusting registry to report the store unreachable");
    expect(lost.reason).toContain("TLS setting");
  }, TEST_MS);
});
