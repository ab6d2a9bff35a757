/**
 * One client must not be able to hurt the others (issue 11): each attack
 * found against the registry and a node's listener, at small scale, on real
 * sockets. Attackers are raw sockets, bound to 127.0.0.2, 127.0.0.3, ...
 * where they must count as other hosts (all of 127/8 is loopback). Each test
 * asserts the property that matters: honest nodes are not evicted, refused
 * or replaced; memory stays within its budget; the probe says nothing about
 * other ports; no spelling of the unspecified address gets listed.
 */
import { afterEach, describe, expect, test } from "bun:test";
import { Admission } from "../admission.ts";
import { EventLog, Fixtures, ManualClock, RawClient, freePort, probeResponder, spawnNode, spawnRegistry, spawnScript, waitUntil, watchedTransport, withDeadline, type Accepted, type Proc } from "../harness.ts";
import type { NodeEvent } from "../client.ts";
import { MemoryMembership } from "../membership.ts";
import { tcp } from "../net.ts";
import type { Registry } from "../registry.ts";

const f = new Fixtures();
afterEach(() => f.cleanup());

describe("identity: nobody replaces a live node", () => {
  test("a newcomer claiming a live node's id from its own listener is refused id-in-use; the victim keeps its place and hears nothing", async () => {
    const { reg } = await f.registry({});
    const victimLog = new EventLog<NodeEvent>();
    const victim = await f.node(reg.port, { onEvent: victimLog.push });
    // The attacker's listener answers every probe, for any id: the newcomer's own probe passes.
    const lure = probeResponder();
    f.defer(() => lure.stop());
    const attacker = await f.raw(reg.port);
    await attacker.send({ type: "register", v: 1, id: victim.id, port: lure.port });
    const err = await attacker.waitFor("error", 5_000, "the attacker's refusal");
    expect(err.code).toBe("id-in-use");
    expect(String(err.message)).toContain(victim.id);
    expect(reg.nodes().map((n) => `${n.id}:${n.port}`)).toEqual([`${victim.id}:${victim.port}`]);
    expect(victim.registered).toBe(true);
    expect(victimLog.named("error")).toEqual([]);
    expect(victimLog.named("disconnected")).toEqual([]);
  });

  test("with the probe off, a live node's id and its address are both kept: id-in-use", async () => {
    const { reg } = await f.registry({ probe: false });
    const holder = await f.raw(reg.port);
    await holder.send({ type: "register", v: 1, id: "holder", port: 41_001 });
    await holder.waitFor("registered", 5_000);
    for (const claim of [
      { id: "holder", port: 41_002 },
      { id: "other", port: 41_001 },
    ]) {
      const c = await f.raw(reg.port);
      await c.send({ type: "register", v: 1, ...claim });
      expect((await c.waitFor("error", 5_000, `refusal of ${claim.id}`)).code).toBe("id-in-use");
    }
    expect(reg.nodes().map((n) => `${n.id}:${n.port}`)).toEqual(["holder:41001"]);
    expect(holder.errorCodes()).toEqual([]);
  });

  test("a holder whose session closed is replaced at once; one that missed a beat is replaced and told so", async () => {
    const clock = new ManualClock();
    const { reg, log } = await f.registry({ probe: false, clock, heartbeatMs: 1_000, heartbeatMisses: 100 });
    const first = await f.raw(reg.port);
    await first.send({ type: "register", v: 1, id: "n1", port: 41_011 });
    await first.waitFor("registered", 5_000);
    first.destroy();
    await log.waitForWhere("node-left", (e) => e.id === "n1", 5_000, "the closed session's node to leave");
    const second = await f.raw(reg.port);
    await second.send({ type: "register", v: 1, id: "n1", port: 41_012 });
    await second.waitFor("registered", 5_000);

    // Silent for more than one and a half beats on the registry's clock: it missed one.
    clock.advance(1_600);
    const third = await f.raw(reg.port);
    await third.send({ type: "register", v: 1, id: "n1", port: 41_013 });
    await third.waitFor("registered", 5_000);
    expect((await second.waitFor("error", 5_000, "the silent holder's notice")).code).toBe("replaced");
    expect(reg.nodes().map((n) => `${n.id}:${n.port}`)).toEqual(["n1:41013"]);
  });

  test("a live holder whose address no longer answers as it is replaced after one probe of that address", async () => {
    const { reg } = await f.registry({});
    const old = probeResponder();
    const holder = await f.raw(reg.port);
    await holder.send({ type: "register", v: 1, id: "moved", port: old.port });
    await holder.waitFor("registered", 5_000);
    old.stop(); // the node's process is gone, its registry session is not (a host that froze mid-crash)
    const fresh = probeResponder();
    f.defer(() => fresh.stop());
    const probesBefore = fresh.probes();
    const again = await f.raw(reg.port);
    await again.send({ type: "register", v: 1, id: "moved", port: fresh.port });
    await again.waitFor("registered", 5_000);
    expect(fresh.probes()).toBe(probesBefore + 1);
    expect((await holder.waitFor("error", 5_000, "the old session's notice")).code).toBe("replaced");
    expect(reg.nodes().map((n) => `${n.id}:${n.port}`)).toEqual([`moved:${fresh.port}`]);
  });

  test("filling a live node's listener does not clear its place: the busy probe proves nothing, and the newcomer is told unavailable", async () => {
    const { reg } = await f.registry({});
    const victimLog = new EventLog<NodeEvent>();
    const victim = await f.node(reg.port, { onEvent: victimLog.push, maxInboundConns: 4 });
    for (let i = 0; i < 4; i++) await f.raw(victim.port, "127.0.0.2");
    // The cap is full once one more connection is turned away.
    const extra = await f.raw(victim.port, "127.0.0.3");
    expect((await extra.waitFor("error", 5_000, "the listener's refusal")).code).toBe("too-many-connections");
    const lure = probeResponder("127.0.0.4");
    f.defer(() => lure.stop());
    const attacker = await f.raw(reg.port, "127.0.0.4");
    await attacker.send({ type: "register", v: 1, id: victim.id, port: lure.port });
    const err = await attacker.waitFor("error", 5_000, "the attacker's refusal");
    expect(err.code).toBe("unavailable");
    expect(reg.nodes().map((n) => `${n.id}:${n.port}`)).toEqual([`${victim.id}:${victim.port}`]);
    expect(victimLog.named("error")).toEqual([]);
    expect(victimLog.named("disconnected")).toEqual([]);
  });

  test("a node restarted at its old address while its old session lingers is told unavailable, and gets in once that session misses a beat", async () => {
    const clock = new ManualClock();
    const { reg } = await f.registry({ clock, heartbeatMs: 1_000, heartbeatMisses: 100 });
    const old = probeResponder();
    const holder = await f.raw(reg.port);
    await holder.send({ type: "register", v: 1, id: "stable", port: old.port });
    await holder.waitFor("registered", 5_000);
    old.stop(); // the old process is gone; its session is not (a host that froze mid-crash)
    const log = new EventLog<NodeEvent>();
    const restarted = f.node(reg.port, { id: "stable", port: old.port, onEvent: log.push });
    const refusal = await log.waitFor("error", 5_000, "the restarted node's first refusal");
    expect(refusal.code).toBe("unavailable");
    // One and a half beats of silence on the registry's clock: the old session missed one.
    clock.advance(1_600);
    const node = await restarted;
    expect(node.registered).toBe(true);
    expect((await holder.waitFor("error", 5_000, "the old session's notice")).code).toBe("replaced");
    expect(reg.nodes().map((n) => `${n.id}:${n.port}`)).toEqual([`stable:${old.port}`]);
  });

  test("processes: a second live node with the same --id is refused and exits 1; the first carries on; after kill -9 the id is free at once", async () => {
    const reg = f.track(await spawnRegistry());
    const first = f.track(await spawnNode(reg.port, ["--id", "twin", "--listen", "127.0.0.1"]));
    const second = f.track(await spawnNodeRaw(reg.port, ["--id", "twin", "--listen", "127.0.0.1"]));
    const err = await second.log.waitFor("error", 15_000, "the second twin's refusal");
    expect(err.code).toBe("id-in-use");
    expect(await withDeadline(second.exited(), 15_000, "the second twin to exit")).toBe(1);
    expect(first.log.named("error")).toEqual([]);
    expect(reg.log.named("node-left")).toEqual([]);

    await first.kill("SIGKILL");
    const third = f.track(await spawnNode(reg.port, ["--id", "twin", "--listen", "127.0.0.1"]));
    expect(third.log.named("error")).toEqual([]);
    await reg.log.waitForWhere("node-registered", (e) => e.port === third.port, 10_000, "the restarted twin listed");
  }, 60_000);
});

describe("memory: what a client does not read is bounded", () => {
  test("non-readers asking for snapshots get one at a time, shared; honest nodes carry on", async () => {
    // A long heartbeat: the non-readers here never ping, and a loaded machine must not evict them first.
    const { reg, log } = await f.registry({ probe: false, rateSessionSyncs: 0, heartbeatMs: 60_000 });
    await fillers(reg, 300);
    const honest = await Promise.all([0, 1, 2].map(() => f.node(reg.port)));
    const readers: RawClient[] = [];
    for (let i = 0; i < 20; i++) {
      const c = await f.raw(reg.port, `127.0.0.${2 + (i % 8)}`);
      await c.send({ type: "register", v: 1, id: `mute-${i}`, port: 42_000 + i });
      await c.waitFor("registered", 5_000);
      c.pause();
      readers.push(c);
    }
    // 200 syncs each, about 12 MB of snapshots if each were answered by a copy of its own.
    let peak = 0;
    for (const c of readers) {
      await c.write('{"type":"sync"}\n'.repeat(200));
      peak = Math.max(peak, reg.stats().unsentBytes);
    }
    await waitUntil(() => reg.stats().coalescedSyncs > 0, 10_000, "syncs to be coalesced");
    const s = reg.stats();
    // Every queued snapshot is the same buffer: the total is about one snapshot, not twenty.
    const snapshotBytes = JSON.stringify(reg.nodes()).length;
    expect(Math.max(peak, s.unsentBytes)).toBeLessThan(4 * snapshotBytes);
    expect(honest.every((n) => n.registered)).toBe(true);
    expect(log.named("node-left").filter((e) => honest.some((n) => n.id === e.id))).toEqual([]);
  }, 60_000);

  test("over the budget, the largest backlogs are dropped as slow consumers; nodes that read are not", async () => {
    const budget = 256 * 1024;
    const watched = watchedTransport();
    // A long heartbeat: the mutes never ping, and a loaded machine must not evict them before the budget does.
    const options = { probe: false, maxQueueTotalBytes: budget, rateSessionLines: 0, rateAddressLines: 0, rateSessionSyncs: 0, heartbeatMs: 60_000 };
    const { reg, log } = await f.registry({ ...options, transport: watched.transport });
    await fillers(reg, 300);
    const honest = await Promise.all([0, 1, 2].map(() => f.node(reg.port)));
    const mutes: { c: RawClient; end: Accepted; sent: number }[] = [];
    for (let i = 0; i < 4; i++) {
      const c = await f.raw(reg.port, `127.0.0.${2 + i}`);
      await c.send({ type: "register", v: 1, id: `mute-${i}`, port: 43_000 + i });
      await c.waitFor("registered", 5_000);
      c.pause();
      mutes.push({ c, end: await watched.of(c), sent: 0 });
    }
    const say = async (m: (typeof mutes)[number], text: string) => {
      await m.c.write(text);
      m.sent += text.length;
      await waitUntil(() => m.end.read >= m.sent || m.end.conn.closed, 10_000, "the registry to read it");
    };
    // Loopback buffers hold megabytes: snapshots first, until the registry holds bytes for each mute itself.
    for (const m of mutes) {
      m.sent = m.end.read;
      while (m.end.conn.pendingBytes === 0 && !m.end.conn.closed) await say(m, '{"type":"sync"}\n');
    }
    // Then answers of their own (one error each, ~330 bytes: the error quotes the value, clipped), far over the budget in all.
    const bad = JSON.stringify({ type: "receipt", ids: "A".repeat(400) }) + "\n";
    let peak = 0;
    const dropped = () => log.named("error").filter((e) => e.code === "slow-consumer").length;
    // Loopback send buffers keep growing while they can: go on until the budget has dropped all four.
    const deadline = performance.now() + 40_000;
    while (dropped() < 4 && performance.now() < deadline) {
      for (const m of mutes) if (!m.end.conn.closed) await say(m, bad.repeat(2_000));
      peak = Math.max(peak, reg.stats().unsentBytes);
    }
    const state = { dropped: dropped(), peak, pending: mutes.map((m) => (m.end.conn.closed ? "dropped" : m.end.conn.pendingBytes)) };
    expect(state).toMatchObject({ dropped: 4 });
    // The budget is enforced on every enqueue: the total never stays over it.
    expect(peak).toBeLessThanOrEqual(budget);
    expect(reg.stats().rejected["slow-consumer"]).toBe(4);
    expect(honest.every((n) => n.registered)).toBe(true);
    expect(log.named("node-left").filter((e) => honest.some((n) => n.id === e.id))).toEqual([]);
  }, 60_000);
});

describe("rates: one client cannot keep the registry to itself", () => {
  test("a ping flood is answered rate-limited, then closed; nodes joining meanwhile with the probe on all get in", async () => {
    const { reg } = await f.registry({});
    const lure = probeResponder("127.0.0.2");
    f.defer(() => lure.stop());
    const flood = await f.raw(reg.port, "127.0.0.2");
    await flood.send({ type: "register", v: 1, id: "flood", port: lure.port });
    await flood.waitFor("registered", 5_000);
    const joining = Promise.all(Array.from({ length: 5 }, () => f.node(reg.port)));
    for (let i = 0; i < 20 && !flood.closed; i++) await flood.write('{"type":"ping"}\n'.repeat(5_000));
    await flood.waitClosed(10_000, "the flood to be cut");
    expect(flood.errorCodes().every((c) => c === "rate-limited")).toBe(true);
    expect(flood.errorCodes().length).toBeGreaterThan(0);
    const nodes = await withDeadline(joining, 30_000, "five probed nodes to register");
    expect(nodes.every((n) => n.registered)).toBe(true);
    expect(reg.stats().rejected["rate-limited"]).toBeGreaterThan(0);
  }, 60_000);

  test("token guesses: an address that keeps guessing is refused for a while, even with the right token; other addresses are not", async () => {
    const token = "the-right-token";
    const { reg } = await f.registry({ probe: false, token, authFailuresPerMinute: 3 });
    const attempt = async (from: string, t: string, id: string) => {
      const c = await f.raw(reg.port, from);
      await c.send({ type: "register", v: 1, id, port: 44_000, token: t });
      return await c.waitFor((m) => m.type === "registered" || m.type === "error", 5_000, `answer to ${id}`);
    };
    for (let i = 0; i < 3; i++) expect((await attempt("127.0.0.2", `guess-${i}`, `g${i}`)).code).toBe("unauthorized");
    const blocked = await attempt("127.0.0.2", token, "g-right");
    expect(blocked.code).toBe("rate-limited");
    expect(String(blocked.message)).toContain("127.0.0.2");
    expect((await attempt("127.0.0.3", token, "elsewhere")).type).toBe("registered");
    expect(reg.stats()).toMatchObject({ authFailures: 3, authBlocked: 1 });
  });

  test("probes are rate-limited per source address", async () => {
    const { reg } = await f.registry({ rateAddressProbes: 1 });
    const dead = freePort();
    const codes: string[] = [];
    for (let i = 0; i < 11; i++) {
      const c = await f.raw(reg.port, "127.0.0.2");
      await c.send({ type: "register", v: 1, id: `p${i}`, port: dead });
      codes.push(String((await c.waitFor("error", 5_000, `refusal ${i}`)).code));
    }
    // A burst of ten seconds' worth, then the limit.
    expect(codes.slice(0, 10)).toEqual(Array(10).fill("unreachable"));
    expect(codes[10]).toBe("rate-limited");
    const other = await f.raw(reg.port, "127.0.0.3");
    await other.send({ type: "register", v: 1, id: "q", port: dead });
    expect((await other.waitFor("error", 5_000, "another address's refusal")).code).toBe("unreachable");
  });
});

describe("the probe is no port scanner", () => {
  test("closed, silent, HTTP and SSH ports get the same refusal text; only the registry's own log says which", async () => {
    const { reg, log } = await f.registry({ probeTimeoutMs: 300 });
    const silent = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
    const banner = (text: string) =>
      Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { open: (s) => void s.write(text), data: (s) => void s.end() } });
    const ssh = banner("SSH-2.0-OpenSSH_9.2\r\n");
    const http = banner("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
    f.defer(() => [silent, ssh, http].forEach((l) => l.stop(true)));
    const texts: string[] = [];
    const codes: string[] = [];
    for (const port of [freePort(), silent.port, ssh.port, http.port]) {
      const c = await f.raw(reg.port);
      await c.send({ type: "register", v: 1, id: "scan", port });
      const err = await c.waitFor("error", 5_000, `refusal for port ${port}`);
      codes.push(String(err.code));
      texts.push(String(err.message).replace(`127.0.0.1:${port}`, "<address>"));
    }
    // The code says only whether to retry: silence may pass, an answer from someone else will not.
    expect(codes).toEqual(["unreachable", "unavailable", "unreachable", "unreachable"]);
    expect(new Set(texts).size).toBe(1);
    expect(texts[0]).toContain("no node answered as scan at <address>");
    expect(texts[0]).not.toMatch(/SSH|HTTP|refused|timed|answer within/i);
    // The operator still learns what happened.
    const details = log.named("error").map((e) => e.detail ?? "");
    expect(details.some((d) => /refused|ECONNREFUSED/i.test(d))).toBe(true);
    expect(details.some((d) => /no answer within/.test(d))).toBe(true);
  });
});

describe("addresses", () => {
  const spellings = ["0.0.0.0", "0", "0.0", "0x0", "00", "::", "::0", "0:0:0:0:0:0:0:0", "[::]", "::ffff:0.0.0.0", "0.1.2.3"];

  test.each(spellings)("advertising %p is refused address-not-allowed, even with --allow-advertise", async (host) => {
    const { reg } = await f.registry({ probe: false, allowAdvertise: true });
    const c = await f.raw(reg.port);
    await c.send({ type: "register", v: 1, id: "nowhere", port: 45_000, host });
    const err = await c.waitFor("error", 5_000, "the refusal");
    expect(err.code).toBe("address-not-allowed");
    expect(reg.nodes()).toEqual([]);
  });

  test("a host that resolves to loopback is refused when the registration comes from another host; from this host it is fine", async () => {
    const membership = new MemoryMembership("b");
    const settings = { allowAdvertise: true, maxNodes: 10, probe: false, probeTimeoutMs: 1_000, rateAddressProbes: 0, authFailuresPerMinute: 0 };
    const admission = new Admission(settings, membership, tcp);
    for (const host of ["localhost", "127.0.0.1", "127.1", "::1", "::ffff:127.0.0.1"]) {
      const v = await admission.check({ type: "register", v: 1, id: "x", port: 1, host }, "192.0.2.10");
      expect(v).toMatchObject({ ok: false, code: "address-not-allowed" });
    }
    expect(await admission.check({ type: "register", v: 1, id: "x", port: 1, host: "localhost" }, "127.0.0.1")).toMatchObject({ ok: true });
  });
});

describe("liveness the registry cannot fake", () => {
  test("a registry whose event loop stalls for longer than the heartbeat timeout evicts nobody when it resumes", async () => {
    const { reg, log } = await f.registry({ probe: false, heartbeatMs: 100, heartbeatMisses: 3 });
    const sessions: RawClient[] = [];
    for (let i = 0; i < 5; i++) {
      const c = await f.raw(reg.port);
      await c.send({ type: "register", v: 1, id: `quiet-${i}`, port: 46_000 + i });
      await c.waitFor("registered", 5_000);
      sessions.push(c);
    }
    // The stall itself: nothing in this process runs for 1.5 s, five times the timeout; the
    // sessions are silent all along, so only the registry's own lateness can excuse them.
    Bun.sleepSync(1_500);
    // The first sweep after the stall has run once a ping is answered (timers run before reads here).
    for (const c of sessions) await c.send({ type: "ping" });
    for (const c of sessions) await c.waitFor("pong", 5_000);
    expect(log.named("node-left")).toEqual([]);
    expect(reg.stats().stalledMs).toBeGreaterThan(1_000);
    expect(reg.nodes().length).toBe(5);
  });

  test("lines held back by a rate limit are no sign of life: a sync spammer that dies with its backlog unread is removed on time", async () => {
    // 20 syncs a second: the backlog is handled a line every 50 ms, well within the timeout (600 ms).
    const { reg, log } = await f.registry({ probe: false, heartbeatMs: 200, heartbeatMisses: 3, rateSessionSyncs: 20 });
    const spam = await f.raw(reg.port, "127.0.0.2");
    await spam.send({ type: "register", v: 1, id: "spam", port: 46_100 });
    await spam.waitFor("registered", 5_000);
    spam.pause();
    // The registry answers a burst of these, then handles them at their rate from what it read.
    await spam.write('{"type":"sync"}\n'.repeat(300));
    await waitUntil(() => (reg.stats().rejected["rate-limited"] ?? 0) > 0, 5_000, "the syncs to go over their rate");
    // More while it holds those: it stops reading the socket, and so does not see the spammer's end either.
    await spam.write('{"type":"sync"}\n'.repeat(300));
    spam.end();
    // Within the heartbeat timeout of its last bytes, not once its backlog is worked off (25 s).
    const left = await log.waitForWhere("node-left", (e) => e.id === "spam", 5_000, "the dead spammer to be removed");
    expect(left.reason).toBe("timeout");
    expect(reg.nodes()).toEqual([]);
  });
});

describe("a node's listener", () => {
  test("a hello sent first for a later node's id is not that node's greeting: the real one is reported, from its listed address, once", async () => {
    const { reg } = await f.registry({});
    const aLog = new EventLog<NodeEvent>();
    const a = await f.node(reg.port, { onEvent: aLog.push });
    const fake = await f.raw(a.port);
    await fake.send({ type: "hello", v: 1, id: "late-b", host: "127.0.0.1", port: 9 });
    await fake.waitFor("welcome", 5_000);
    const b = await f.node(reg.port, { id: "late-b" });
    const g = await aLog.waitForWhere("greeting", (e) => e.peer === "late-b", 10_000, "b's greeting");
    expect(g.address).toBe(`127.0.0.1:${b.port}`);
    expect(aLog.named("greeting").filter((e) => e.peer === "late-b").length).toBe(1);
  });

  test("a hello from a node the registry lists only later is reported once it is listed", async () => {
    const { reg } = await f.registry({ probe: false });
    const aLog = new EventLog<NodeEvent>();
    const a = await f.node(reg.port, { onEvent: aLog.push });
    const early = await f.raw(a.port);
    await early.send({ type: "hello", v: 1, id: "early", host: "127.0.0.1", port: 47_000 });
    await early.waitFor("welcome", 5_000);
    expect(aLog.named("greeting")).toEqual([]);
    const session = await f.raw(reg.port);
    await session.send({ type: "register", v: 1, id: "early", port: 47_000 });
    await session.waitFor("registered", 5_000);
    const g = await aLog.waitForWhere("greeting", (e) => e.peer === "early", 10_000, "the early hello reported");
    expect(g.address).toBe("127.0.0.1:47000");
  });

  test("a false hello for an id not listed yet does not shadow the real one that follows: the real one is reported once listed", async () => {
    const { reg } = await f.registry({ probe: false });
    const aLog = new EventLog<NodeEvent>();
    const a = await f.node(reg.port, { onEvent: aLog.push });
    // The listener keeps a claim aside in the step that sends its welcome: once both are answered,
    // both are pending, the false one first, and the registry has not listed "shadowed" yet.
    for (const [from, port] of [["127.0.0.2", 47_201], ["127.0.0.1", 47_200]] as const) {
      const c = await f.raw(a.port, from);
      await c.send({ type: "hello", v: 1, id: "shadowed", host: "127.0.0.1", port });
      await c.waitFor("welcome", 5_000, `the welcome for the hello from port ${port}`);
    }
    expect(aLog.named("greeting")).toEqual([]);
    const session = await f.raw(reg.port);
    await session.send({ type: "register", v: 1, id: "shadowed", port: 47_200 });
    await session.waitFor("registered", 5_000);
    const g = await aLog.waitForWhere("greeting", (e) => e.peer === "shadowed", 3_000, "the real hello reported");
    expect(g.address).toBe("127.0.0.1:47200");
    expect(aLog.named("greeting").filter((e) => e.peer === "shadowed").length).toBe(1);
  });

  test("two hellos on one connection: the first is answered and counted, the second is not read", async () => {
    const { reg } = await f.registry({ probe: false });
    const aLog = new EventLog<NodeEvent>();
    const a = await f.node(reg.port, { onEvent: aLog.push });
    for (const [id, port] of [["h1", 47_101], ["h2", 47_102]] as const) {
      const s = await f.raw(reg.port);
      await s.send({ type: "register", v: 1, id, port });
      await s.waitFor("registered", 5_000);
    }
    await waitUntil(() => a.peers().length === 2, 5_000, "a to see h1 and h2");
    const c = await f.raw(a.port);
    await c.write(
      JSON.stringify({ type: "hello", v: 1, id: "h1", host: "127.0.0.1", port: 47_101 }) + "\n" + JSON.stringify({ type: "hello", v: 1, id: "h2", host: "127.0.0.1", port: 47_102 }) + "\n",
    );
    await c.waitClosed(5_000);
    expect(c.messages.map((m) => m.type)).toEqual(["welcome"]);
    await aLog.waitForWhere("greeting", (e) => e.peer === "h1", 5_000, "h1's greeting");
    expect(aLog.named("greeting").map((e) => e.peer)).toEqual(["h1"]);
  });

  test("open connections per source address are capped; other addresses still get through", async () => {
    const { reg } = await f.registry({});
    const a = await f.node(reg.port, { maxInboundPerAddress: 3 });
    const held: RawClient[] = [];
    for (let i = 0; i < 3; i++) held.push(await f.raw(a.port, "127.0.0.2"));
    const fourth = await f.raw(a.port, "127.0.0.2");
    const err = await fourth.waitFor("error", 5_000, "the fourth connection's refusal");
    expect(err.code).toBe("too-many-connections");
    expect(String(err.message)).toContain("127.0.0.2");
    const other = await f.raw(a.port, "127.0.0.3");
    await other.send({ type: "probe", v: 1, id: a.id, nonce: "n" });
    expect((await other.waitFor("probe-ok", 5_000)).id).toBe(a.id);
    expect(held.every((c) => !c.closed)).toBe(true);
  });
});

// --- internal ----------------------------------------------------------------





/** `n` raw sessions with long ids and names (probe off), from a spread of addresses, open until the test ends. */
async function fillers(reg: Registry, n: number): Promise<void> {
  for (let i = 0; i < n; i++) {
    const c = await f.raw(reg.port, `127.0.1.${1 + (i % 200)}`);
    await c.send({ type: "register", v: 1, id: `filler-${i}-`.padEnd(64, "f"), port: 20_000 + i, name: "n".repeat(64) });
  }
  await waitUntil(() => reg.stats().nodes >= n, 20_000, `${n} fillers registered`);
}

/** A node process that may be refused: resolves once it listens, not once it registers. */
async function spawnNodeRaw(registryPort: number, args: string[]): Promise<Proc> {
  const p = spawnScript("client.ts", ["127.0.0.1", String(registryPort), "--json", ...args]);
  await p.log.waitFor("listening", 15_000, "the node to listen");
  return p;
}
