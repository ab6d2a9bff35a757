/**
 * The Membership contract, the same cases against the list in memory and the
 * list shared through a private redis-server; then what only a shared store
 * has: several mirrors of one list, two registries racing for one id, a store
 * that dies or restarts empty, a registry killed while its lease runs.
 */
import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { RedisClient } from "bun";
import { MemoryMembership, peerOf, type Change, type JoinResult, type Member, type Membership } from "../membership.ts";
import { openStore, storeUrl, type RedisMembership, type StoreOptions } from "../redis.ts";
import { EventLog, RedisServer, redisUnavailable, spawnScript, waitUntil, withDeadline } from "../harness.ts";

if (redisUnavailable) console.log(`SKIP redis: ${redisUnavailable}`);

const WAIT_MS = 5_000;
let server: RedisServer | undefined;
let prefixes = 0;
const opened: Membership[] = [];

beforeAll(async () => {
  if (!redisUnavailable) server = await RedisServer.start();
});
afterEach(async () => {
  await Promise.allSettled(opened.splice(0).map((m) => m.close()));
});
afterAll(async () => {
  await server?.kill();
});

/** A fresh key prefix: each test gets a list of its own on the shared server. */
function freshPrefix(): string {
  return `t${++prefixes}:`;
}

async function openRedis(url: string, registryId: string, prefix: string, options: Partial<StoreOptions> = {}): Promise<RedisMembership> {
  const m = await openStore(url, { registryId, prefix, ...options });
  opened.push(m);
  return m;
}

const kinds: { name: string; skip: boolean; open: () => Promise<Membership> }[] = [
  {
    name: "memory",
    skip: false,
    open: async () => {
      const m = new MemoryMembership("boot-1");
      opened.push(m);
      return m;
    },
  },
  { name: "redis", skip: redisUnavailable !== null, open: () => openRedis(server!.url, "r1", freshPrefix()) },
];

let tickets = 0;
function member(id: string, port: number, registry = "r1", name?: string): Member {
  return { id, host: "127.0.0.1", port, ...(name ? { name } : {}), source: "127.0.0.1", registry, joinedAt: Date.now(), ticket: `t${++tickets}` };
}

/** A change a membership announces, named by its kind. */
type Recorded = Change extends infer C ? (C extends { kind: infer K } ? C & { event: K } : never) : never;

/** Every change a membership announces, as events a test can wait for. */
function record(m: Membership): EventLog<Recorded> {
  const log = new EventLog<Recorded>();
  m.subscribe((c) => log.push({ event: c.kind, ...c } as Recorded));
  return log;
}

async function recorded(open: () => Promise<Membership>): Promise<{ m: Membership; log: EventLog }> {
  const m = await open();
  return { m, log: record(m) };
}

/** Lists `first`, checks that `second` cannot take its id or address unless allowed to, then lets it. */
async function claim(m: Membership, first: Member, second: Member): Promise<JoinResult> {
  await m.join(first, []);
  expect(await m.join(second, [])).toEqual({ ok: false, holder: first });
  expect(m.get(first.id)).toEqual(first);
  return m.join(second, [first]);
}

function peers(list: string): unknown[] {
  return JSON.parse(`[${list}]`);
}

/** joined/left as `seq kind id ticket`, the order a mirror applied them in. */
function history(log: EventLog): string[] {
  return log.events
    .filter((e) => e.event === "joined" || e.event === "left")
    .map((e) => `${e.seq} ${e.event} ${(e.member as Member).id} ${(e.member as Member).ticket}`);
}

for (const kind of kinds) {
  describe.skipIf(kind.skip)(`membership contract: ${kind.name}`, () => {
    test("join lists the member and announces it under the next seq", async () => {
      const { m, log } = await recorded(kind.open);
      const a = member("a", 7001);
      expect(await m.join(a, [])).toEqual({ ok: true, seq: 1 });
      expect({ seq: m.seq, size: m.size, byId: m.get("a"), byAddress: m.at("127.0.0.1:7001"), all: [...m.members()] }).toEqual({
        seq: 1,
        size: 1,
        byId: a,
        byAddress: a,
        all: [a],
      });
      expect(log.named("joined")).toEqual([{ event: "joined", kind: "joined", seq: 1, member: a, replaced: undefined }]);
    });

    test("peerList: every member's peer JSON, without the one named", async () => {
      const m = await kind.open();
      const [a, b, c] = [member("a", 7001, "r1", "alpha"), member("b", 7002), member("c", 7003)];
      for (const x of [a, b, c]) await m.join(x, []);
      expect(peers(m.peerList())).toEqual([peerOf(a), peerOf(b), peerOf(c)]);
      expect(peers(m.peerList("c"))).toEqual([peerOf(a), peerOf(b)]);
      expect(peers(m.peerList("b"))).toEqual([peerOf(a), peerOf(c)]);
      expect(peers(m.peerList("nobody"))).toEqual([peerOf(a), peerOf(b), peerOf(c)]);
    });

    test("the same id again: refused naming the holder, unless the caller lets it go; then updated in place", async () => {
      const { m, log } = await recorded(kind.open);
      const [a1, a2] = [member("a", 7001), member("a", 7002)];
      expect(await claim(m, a1, a2)).toEqual({ ok: true, seq: 2 });
      expect({ size: m.size, byId: m.get("a"), old: m.at("127.0.0.1:7001"), now: m.at("127.0.0.1:7002") }).toEqual({
        size: 1,
        byId: a2,
        old: undefined,
        now: a2,
      });
      expect(log.named("joined").at(-1)).toEqual({ event: "joined", kind: "joined", seq: 2, member: a2, replaced: a1 });
      expect(log.named("left")).toEqual([]);
    });

    test("another id at the same address: refused unless replaced; the old one leaves as replaced first", async () => {
      const { m, log } = await recorded(kind.open);
      const [a, b] = [member("a", 7001), member("b", 7001)];
      expect(await claim(m, a, b)).toEqual({ ok: true, seq: 3 });
      expect({ a: m.get("a"), at: m.at("127.0.0.1:7001"), size: m.size }).toEqual({ a: undefined, at: b, size: 1 });
      expect(history(log)).toEqual([`1 joined a ${a.ticket}`, `2 left a ${a.ticket}`, `3 joined b ${b.ticket}`]);
      expect(log.named("left")[0]!.reason).toBe("replaced");
    });

    test("leave takes only the same registration (ticket)", async () => {
      const { m, log } = await recorded(kind.open);
      const a = member("a", 7001);
      await m.join(a, []);
      expect(await m.leave({ ...a, ticket: "an-older-one" }, "closed")).toBe(false);
      expect(m.get("a")).toEqual(a);
      expect(await m.leave(a, "leave")).toBe(true);
      expect(await m.leave(a, "leave")).toBe(false);
      expect({ size: m.size, seq: m.seq, at: m.at("127.0.0.1:7001") }).toEqual({ size: 0, seq: 2, at: undefined });
      expect(log.named("left")).toEqual([{ event: "left", kind: "left", seq: 2, member: a, reason: "leave" }]);
    });

    test("every join and leave takes the next seq, announced in order", async () => {
      const { m, log } = await recorded(kind.open);
      const live = new Map<string, Member>();
      // A fixed mix of joins, re-registrations and leaves.
      for (let i = 0; i < 30; i++) {
        const id = `n${i % 7}`;
        const old = live.get(id);
        if (old && i % 3 === 0) {
          expect(await m.leave(old, "closed")).toBe(true);
          live.delete(id);
        } else {
          const next = member(id, 8000 + i);
          expect((await m.join(next, old ? [old] : [])).ok).toBe(true);
          live.set(id, next);
        }
      }
      const seqs = log.events.filter((e) => e.event === "joined" || e.event === "left").map((e) => e.seq);
      expect(seqs).toEqual(Array.from({ length: 30 }, (_, i) => i + 1));
      expect(m.seq).toBe(30);
      expect(new Set([...m.members()].map((x) => x.ticket))).toEqual(new Set([...live.values()].map((x) => x.ticket)));
    });

    test("changes made at the same moment are decided one by one, in the order they were made", async () => {
      const { m, log } = await recorded(kind.open);
      const [a, b, c] = [member("a", 7001), member("b", 7001), member("c", 7002)];
      await m.join(a, []);
      // Not awaited one by one: a shared store sends them together, in one script call.
      const results = await Promise.all([m.join(b, []), m.leave(a, "closed"), m.join(b, []), m.join(c, []), m.leave({ ...c, ticket: "another" }, "closed")]);
      expect(results).toEqual([{ ok: false, holder: a }, true, { ok: true, seq: 3 }, { ok: true, seq: 4 }, false]);
      expect(history(log)).toEqual([`1 joined a ${a.ticket}`, `2 left a ${a.ticket}`, `3 joined b ${b.ticket}`, `4 joined c ${c.ticket}`]);
      expect([...m.members()]).toEqual([b, c]);
    });

    test("receipts: greeted pairs, mesh completeness, and links gone with a member", async () => {
      const { m, log } = await recorded(kind.open);
      const [a, b, c, d] = [member("a", 7001), member("b", 7002), member("c", 7003), member("d", 7004)];
      for (const x of [a, b, c, d]) await m.join(x, []);
      expect(m.mesh()).toEqual({ greeted: 0, expected: 6, completeMs: null });
      // Itself and unknown ids do not count.
      m.receipt(a, ["b", "c", "a", "nobody"]);
      await log.waitForCount("greeted", 2, WAIT_MS);
      // An outdated registration's receipt is ignored; the next receipt's greeting shows it was processed after.
      m.receipt({ ...b, ticket: "an-older-one" }, ["c"]);
      m.receipt(d, ["a"]);
      await log.waitForCount("greeted", 3, WAIT_MS);
      expect(m.pairs().sort()).toEqual([
        ["a", "b"],
        ["a", "c"],
        ["a", "d"],
      ]);
      m.receipt(c, ["b", "d"]);
      m.receipt(b, ["d", "a"]);
      const complete = await log.waitFor("mesh-complete", WAIT_MS);
      expect({ nodes: complete.nodes, pairs: complete.pairs }).toEqual({ nodes: 4, pairs: 6 });
      expect(log.named("greeted").map((e) => `${e.a}-${e.b}`)).toEqual(["a-b", "a-c", "d-a", "c-b", "c-d", "b-d"]);
      expect(m.mesh()).toMatchObject({ greeted: 6, expected: 6 });
      await m.leave(d, "closed");
      expect(m.pairs().sort()).toEqual([
        ["a", "b"],
        ["a", "c"],
        ["b", "c"],
      ]);
      expect(m.mesh()).toMatchObject({ greeted: 3, expected: 3 });
    });

    test("isConnected: this registry is", async () => {
      const m = await kind.open();
      expect(await m.isConnected("r1")).toBe(true);
      expect(m.state).toBe("ok");
    });
  });
}

describe("store URL", () => {
  test.each([
    ["http://127.0.0.1:6379", "must start with redis:// or rediss://"],
    ["redis://127.0.0.1:6379/x", "only in a database number"],
    ["redis://127.0.0.1:6379/0?x=1", "only in a database number"],
    ["not a url", "is not a URL"],
  ])("%s is refused clearly", (url, message) => {
    expect(() => storeUrl(url)).toThrow(message);
  });

  test("the password comes from the URL, else from the option", () => {
    expect(storeUrl("rediss://:inurl@h:6380/2", "opt").href).toBe("rediss://:inurl@h:6380/2");
    expect(storeUrl("redis://h:6379", "p@ss w/rd").password).toBe("p%40ss%20w%2Frd");
  });
});

describe.skipIf(redisUnavailable !== null)("several registries on one store", () => {
  test("two mirrors apply every change, theirs and the other's, in the same seq order", async () => {
    const prefix = freshPrefix();
    const [a, b] = [await openRedis(server!.url, "A", prefix), await openRedis(server!.url, "B", prefix)];
    const [logA, logB] = [record(a), record(b)];
    const live = new Map<string, { m: Member; on: RedisMembership }>();
    // Rounds of concurrent changes from both sides, so that their scripts interleave in the store.
    for (let round = 0; round < 10; round++) {
      await Promise.all(
        ["A", "B"].flatMap((reg) =>
          [0, 1, 2].map(async (k) => {
            const id = `${reg}${k}`;
            const on = reg === "A" ? a : b;
            const old = live.get(id);
            if (old && round % 2 === 0) {
              live.delete(id);
              expect(await on.leave(old.m, "closed")).toBe(true);
              return;
            }
            const next = member(id, 9000 + round * 10 + k + (reg === "A" ? 0 : 5), reg);
            live.set(id, { m: next, on });
            expect((await on.join(next, old ? [old.m] : [])).ok).toBe(true);
          }),
        ),
      );
    }
    const last = Math.max(a.seq, b.seq);
    await logA.waitFor((e) => "seq" in e && e.seq === last, WAIT_MS, `A to apply seq ${last}`);
    await logB.waitFor((e) => "seq" in e && e.seq === last, WAIT_MS, `B to apply seq ${last}`);
    expect(history(logA)).toEqual(history(logB));
    expect(history(logA).map((h) => Number(h.split(" ")[0]))).toEqual(Array.from({ length: last }, (_, i) => i + 1));
    expect(a.peerList()).toBe(b.peerList());
    expect(new Set([...a.members()].map((x) => x.ticket))).toEqual(new Set([...live.values()].map((x) => x.m.ticket)));
  });

  test("greetings are global: a receipt on one registry shows in the other's pairs and mesh", async () => {
    const prefix = freshPrefix();
    const [a, b] = [await openRedis(server!.url, "A", prefix), await openRedis(server!.url, "B", prefix)];
    const logB = record(b);
    const [x, y] = [member("x", 7001, "A"), member("y", 7002, "B")];
    await a.join(x, []);
    await b.join(y, []);
    a.receipt(x, ["y"]);
    await logB.waitFor("mesh-complete", WAIT_MS, "B to see the mesh complete");
    expect(b.pairs()).toEqual([["x", "y"]]);
    expect(b.mesh()).toMatchObject({ greeted: 1, expected: 1 });
  });

  test("two registries joining one id (or one address) at the same moment: exactly one wins", async () => {
    const prefix = freshPrefix();
    const [a, b] = [await openRedis(server!.url, "A", prefix), await openRedis(server!.url, "B", prefix)];
    for (let i = 0; i < 20; i++) {
      // Even rounds race for an id, odd rounds for an address.
      const [ma, mb] = i % 2 === 0 ? [member(`race${i}`, 10_000 + i, "A"), member(`race${i}`, 11_000 + i, "B")] : [member(`ra${i}`, 10_000 + i, "A"), member(`rb${i}`, 10_000 + i, "B")];
      const [ra, rb] = await Promise.all([a.join(ma, []), b.join(mb, [])]);
      expect([ra.ok, rb.ok].filter(Boolean).length).toBe(1);
      const [winner, loser] = ra.ok ? [ma, rb] : [mb, ra];
      expect(loser).toEqual({ ok: false, holder: winner });
      await waitUntil(() => a.seq === b.seq, WAIT_MS, "both mirrors to catch up");
      expect([a.at(`127.0.0.1:${winner.port}`), b.at(`127.0.0.1:${winner.port}`)]).toEqual([winner, winner]);
    }
    expect([a.size, b.size]).toEqual([20, 20]);
  });

  test("a registry killed: at once no longer connected, its nodes may re-register elsewhere, the rest go after its lease", async () => {
    const prefix = freshPrefix();
    const a = await openRedis(server!.url, "A", prefix, { heartbeatMs: 100, leaseMs: 1_500 });
    const log = record(a);
    await using holder = spawnScript("test/store-holder.ts", [server!.url, prefix, "K", "3"], { label: "store-holder" });
    await holder.log.waitFor("ready", 10_000, "the holder to list its members");
    await waitUntil(() => a.size === 3, WAIT_MS, "A to see K's three members");
    expect(await a.isConnected("K")).toBe(true);
    await holder.kill();
    await withDeadline(
      (async () => {
        while (await a.isConnected("K"));
      })(),
      WAIT_MS,
      "K to show as disconnected",
    );
    // A node of the dead registry registers again on A: it replaces its entry at once, as an update.
    const old = a.get("K-0")!;
    const moved = { ...member("K-0", old.port, "A") };
    expect(await a.join(moved, [old])).toEqual({ ok: true, seq: 4 });
    const lefts = await log.waitForCount("left", 2, WAIT_MS, "K's other two members to be swept");
    expect(lefts.map((e) => [(e.member as Member).id, e.reason]).sort()).toEqual([
      ["K-1", "timeout"],
      ["K-2", "timeout"],
    ]);
    expect([...a.members()]).toEqual([moved]);
  });
});

describe.skipIf(redisUnavailable !== null)("a registry frozen", () => {
  test("still connected, but not on time once it missed a lease renewal (before the lease runs out); on time again once it thaws", async () => {
    const prefix = freshPrefix();
    const a = await openRedis(server!.url, "A", prefix, { heartbeatMs: 100, leaseMs: 1_500 });
    await using holder = spawnScript("test/store-holder.ts", [server!.url, prefix, "F", "2"], { label: "store-holder" });
    await holder.log.waitFor("ready", 10_000, "the holder to list its members");
    await waitUntil(() => a.size === 2, WAIT_MS, "A to see F's members");
    expect(await a.isConnected("F")).toBe(true);
    holder.signal("SIGSTOP");
    try {
      await waitUntil(async () => !(await a.isConnected("F")), WAIT_MS, "F to count as silent");
      // Silent long before its lease (1.5 s) runs out: its entries are still listed.
      expect(a.size).toBe(2);
    } finally {
      holder.signal("SIGCONT");
    }
    await waitUntil(() => a.isConnected("F"), WAIT_MS, "F to renew its lease again");
  });
});

describe.skipIf(redisUnavailable !== null)("the log and leases", () => {
  /** Registries A and B on a list of their own, both past A's first join. */
  async function twoMirrors() {
    const prefix = freshPrefix();
    const [a, b] = [await openRedis(server!.url, "A", prefix), await openRedis(server!.url, "B", prefix)];
    const [logA, logB] = [record(a), record(b)];
    await a.join(member("a1", 7001, "A"), []);
    await waitUntil(() => b.seq === 1, WAIT_MS, "B to apply seq 1");
    return { prefix, a, b, logA, logB };
  }

  /** A script run on the store behind the registries' backs. */
  async function evalOnStore(args: string[]): Promise<void> {
    const raw = new RedisClient(server!.url);
    try {
      await raw.send("EVAL", args);
    } finally {
      raw.close();
    }
  }

  test("a broken chain in the log (entries lost) makes every mirror reload the list and announce reset", async () => {
    const { prefix, a, b, logA, logB } = await twoMirrors();
    // An entry that does not follow the last one: what a reader finds after the log was trimmed past it.
    await evalOnStore([
      "local at = redis.call('XADD', KEYS[1], '1-*', 'p', 'lost', 'c', '{}') redis.call('SET', KEYS[2], at) return at",
      "2",
      `${prefix}log`,
      `${prefix}last`,
    ]);
    for (const log of [logA, logB]) expect(await log.waitFor("reset", WAIT_MS, "a reload")).toMatchObject({ boot: a.boot, seq: 1 });
    // And the log goes on from there.
    await b.join(member("b1", 7002, "B"), []);
    await logA.waitForWhere("joined", (e) => e.seq === 2, WAIT_MS, "A to apply B's join");
    expect(a.peerList()).toBe(b.peerList());
  });

  test("an entry that reached the log but no registry's channel is read from the log within a beat, in order, without a reload", async () => {
    const { prefix, a, b, logA, logB } = await twoMirrors();
    // Written as a script would, but published to nobody: what a lost message looks like.
    const x = member("x1", 7009, "X");
    await evalOnStore([
      "local prev = redis.call('GET', KEYS[1]) local seq = redis.call('INCR', KEYS[2]) " +
        "local at = redis.call('XADD', KEYS[3], seq .. '-0', 'p', prev, 'c', '{\"kind\":\"joined\",\"seq\":' .. seq .. ',\"member\":' .. ARGV[1] .. '}') " +
        "redis.call('SET', KEYS[1], at) return at",
      "3",
      `${prefix}last`,
      `${prefix}seq`,
      `${prefix}log`,
      JSON.stringify(x),
    ]);
    for (const log of [logA, logB]) expect(await log.waitForWhere("joined", (e) => e.seq === 2, WAIT_MS, "the unpublished entry")).toMatchObject({ member: x });
    expect([logA.named("reset"), logB.named("reset")]).toEqual([[], []]);
    // And what follows is published again as usual.
    await b.join(member("b1", 7002, "B"), []);
    await logA.waitForWhere("joined", (e) => e.seq === 3, WAIT_MS, "A to apply B's next join");
    expect(a.peerList()).toBe(b.peerList());
  });

  test("a registry whose lease ran out while it lives sees its nodes swept, and writes them back", async () => {
    const prefix = freshPrefix();
    // A beats less often than its lease lasts: what a stalled registry looks like to the others.
    const a = await openRedis(server!.url, "A", prefix, { heartbeatMs: 5_000, leaseMs: 300 });
    const b = await openRedis(server!.url, "B", prefix, { heartbeatMs: 100 });
    const logB = record(b);
    const a1 = member("a1", 7001, "A");
    await a.join(a1, []);
    const swept = await logB.waitFor("left", WAIT_MS, "B to sweep A's node");
    expect(swept).toMatchObject({ reason: "timeout", member: a1 });
    const back = await logB.waitForWhere("joined", (e) => e.seq > swept.seq, WAIT_MS, "A to write its node back");
    expect(back.member).toEqual(a1);
  });
});

describe.skipIf(redisUnavailable !== null)("the store fails", () => {
  const fast = { heartbeatMs: 100, leaseMs: 1_000, opTimeoutMs: 300, connectTimeoutMs: 300, retryMaxMs: 200 };

  test("killed: degraded, serving alone; restarted empty: a new epoch with every registry's own entries", async () => {
    await using store = await RedisServer.start();
    const prefix = freshPrefix();
    const [a, b] = [await openRedis(store.url, "A", prefix, fast), await openRedis(store.url, "B", prefix, fast)];
    const [logA, logB] = [record(a), record(b)];
    const [a1, a2, b1] = [member("a1", 7001, "A"), member("a2", 7002, "A"), member("b1", 7003, "B")];
    await a.join(a1, []);
    await a.join(a2, []);
    await b.join(b1, []);
    await waitUntil(() => a.seq === 3 && b.seq === 3, WAIT_MS, "both mirrors at seq 3");
    const boot = a.boot;

    await store.kill();
    for (const log of [logA, logB]) {
      expect(await log.waitFor("store", WAIT_MS, "the store to be reported lost")).toMatchObject({ state: "degraded" });
    }
    expect(a.state).toBe("degraded");
    // Alone, A goes on: local seqs follow its last.
    const a3 = member("a3", 7004, "A");
    expect(await a.join(a3, [])).toEqual({ ok: true, seq: 4 });
    expect(await a.leave(a2, "closed")).toBe(true);
    expect({ a: a.seq, b: b.seq, bSees: b.get("a3") }).toEqual({ a: 5, b: 3, bSees: undefined });

    await store.restart();
    for (const log of [logA, logB]) {
      // The list is reloaded (reset, sessions resync) before the store is reported back.
      const reset = await log.waitForWhere("reset", (e) => e.boot !== boot, WAIT_MS, "a reset into the new epoch");
      const back = await log.waitForWhere("store", (e) => e.state === "ok", WAIT_MS, "the store to be reported back");
      expect(log.events.indexOf(back)).toBeGreaterThan(log.events.indexOf(reset));
    }
    const ids = (m: Membership) => [...m.members()].map((x) => x.id).sort();
    await waitUntil(() => ids(a).join() === "a1,a3,b1" && ids(b).join() === "a1,a3,b1", WAIT_MS, "both lists to hold a1, a3, b1");
    expect(a.boot).toBe(b.boot);
    expect(a.boot).not.toBe(boot);
    // What the store itself now holds, as a third registry loads it.
    const c = await openRedis(store.url, "C", prefix, fast);
    expect(ids(c)).toEqual(["a1", "a3", "b1"]);
    expect(c.get("a3")).toEqual(a3);
  });

  test("frozen (a partition): degraded at the deadline, then back in the same epoch above every seq used alone", async () => {
    await using store = await RedisServer.start();
    const prefix = freshPrefix();
    const a = await openRedis(store.url, "A", prefix, fast);
    const log = record(a);
    await a.join(member("a1", 7001, "A"), []);
    const boot = a.boot;
    store.freeze(true);
    try {
      expect(await log.waitFor("store", WAIT_MS, "the frozen store to be reported lost")).toMatchObject({ state: "degraded" });
      expect(await a.join(member("a2", 7002, "A"), [])).toEqual({ ok: true, seq: 2 });
    } finally {
      store.freeze(false);
    }
    const reset = await log.waitFor("reset", WAIT_MS, "a reset after the store thawed");
    expect({ boot: reset.boot, above: reset.seq > 2 }).toEqual({ boot, above: true });
    expect([...a.members()].map((x) => x.id).sort()).toEqual(["a1", "a2"]);
    // The next change continues from there, in the store too.
    expect(await a.join(member("a3", 7003, "A"), [])).toEqual({ ok: true, seq: reset.seq + 1 });
  });

  test("unreachable at start: degraded and serving, then the store's list once it is up", async () => {
    await using store = await RedisServer.start();
    await store.kill();
    const a = await openRedis(store.url, "A", freshPrefix(), fast);
    const log = record(a);
    expect(a.state).toBe("degraded");
    expect(a.lastError).toContain(`127.0.0.1:${store.port}`);
    expect((await a.join(member("a1", 7001, "A"), [])).ok).toBe(true);
    await store.restart();
    await log.waitForWhere("store", (e) => e.state === "ok", WAIT_MS, "the store to be reached");
    expect([...a.members()].map((x) => x.id)).toEqual(["a1"]);
  });
});
