/**
 * A flood of idle and half-open connections against a registry process,
 * bounded by the per-address cap and the registration deadline, while real
 * nodes register and meet as usual. The flood comes from 127.0.0.2-5 and the
 * real nodes from 127.0.0.1, so the test also shows that one address
 * exhausting its cap does not starve another. Afterwards every socket the
 * flood cost the registry is closed again (counted in /proc/PID/fd). The
 * same against a mutual-TLS registry port, with handshakes that never end.
 *
 * Then issue 11's attackers (harness.ts `Attack`), all at once, each from an
 * address of its own, against a registry with a token, a short heartbeat and
 * a small unsent-bytes budget, while real nodes register: nobody honest is
 * refused or evicted, the budget holds, the registry runs on.
 */
import { afterEach, expect, test } from "bun:test";
import { readdirSync, readlinkSync } from "node:fs";
import { startNode, type NodeEvent, type PeerNode } from "../client.ts";
import { EventLog, Fixtures, RawClient, clientHello, rssBytes, spawnRegistry, startAttackers, testCerts, waitUntil, type AttackKind } from "../harness.ts";

const CAP = 20;
const PER_ADDRESS = 3 * CAP;
const REGISTER_TIMEOUT_MS = 1500;
const REAL_NODES = 5;

const f = new Fixtures();
afterEach(() => f.cleanup());

type Kind = "idle" | "partial" | "trickle" | "half-closed";
const ATTACKERS: [Kind, string][] = [
  ["idle", "127.0.0.2"],
  ["partial", "127.0.0.3"],
  ["trickle", "127.0.0.4"],
  ["half-closed", "127.0.0.5"],
];

test("idle, half-sent, trickling and half-closed floods are capped per address and cut at the deadline; real nodes register meanwhile; the registry ends with no leftover sockets", async () => {
  const registry = f.track(await spawnRegistry(["--register-timeout", String(REGISTER_TIMEOUT_MS), "--max-conns-per-ip", String(CAP)]));
  // Warm up (one registration and its probe) before counting the registry's sockets.
  const warm = await startNode({ registryHost: "127.0.0.1", registryPort: registry.port, listenHost: "127.0.0.1" });
  await warm.stop();
  await registry.log.waitForWhere("node-left", (e) => e.id === warm.id, 10_000);
  const baseline = socketCount(registry.pid);

  // The flood: every connection opened at once, per address.
  const flood = new Map<Kind, RawClient[]>();
  const opening = ATTACKERS.map(async ([kind, from]) => {
    const conns = await Promise.all(Array.from({ length: PER_ADDRESS }, () => RawClient.connect(registry.port, { localAddress: from, timeoutMs: 10_000 })));
    for (const c of conns) f.defer(() => c.destroy());
    flood.set(kind, conns);
    for (const c of conns) void attack(kind, c);
  });

  // Real nodes register while the flood is open, from an address the flood does not use.
  const logs = Array.from({ length: REAL_NODES }, () => new EventLog<NodeEvent>());
  const nodes: PeerNode[] = [];
  const starting = logs.map(async (log) => {
    // Cleaned up from its start, so a node that misses the deadline is stopped all the same.
    const n = await startNode({ registryHost: "127.0.0.1", registryPort: registry.port, listenHost: "127.0.0.1", onEvent: log.push, waitForRegistration: false });
    f.defer(() => n.stop());
    await log.waitFor("registered", 20_000, "a real node to register during the flood");
    nodes.push(n);
  });
  await Promise.all([...opening, ...starting]);
  expect(nodes.every((n) => n.registered)).toBe(true);
  const ids = nodes.map((n) => n.id);
  await waitUntil(() => nodes.every((n) => ids.every((id) => id === n.id || n.met().includes(id))), 20_000, "the real nodes to meet each other");

  // Every flood connection is closed by the registry, with the reason it was given.
  for (const [kind, conns] of flood) {
    await Promise.all(conns.map((c) => c.waitClosed(15_000, `the registry to close every ${kind} connection`)));
  }
  const capEvents = registry.log.named("error").filter((e) => e.code === "too-many-connections");
  for (const [kind, from] of ATTACKERS) {
    const conns = flood.get(kind)!;
    const codes = conns.map((c) => c.errorCodes().join(",") || "(none)");
    const refused = codes.filter((c) => c === "too-many-connections").length;
    const timedOut = codes.filter((c) => c === "registration-timeout").length;
    if (kind === "half-closed") {
      // The registry closes on the client's FIN; before that, only the cap can have answered.
      expect(codes.every((c) => c === "(none)" || c === "too-many-connections")).toBe(true);
    } else {
      expect({ kind, unexplained: codes.filter((c) => c !== "too-many-connections" && c !== "registration-timeout") }).toEqual({ kind, unexplained: [] });
      // The first CAP connections are admitted (nothing closes before the deadline), so at least CAP time out.
      expect(timedOut).toBeGreaterThanOrEqual(CAP);
      expect(refused).toBeGreaterThanOrEqual(1);
    }
    // The registry reported each refusal for this address, and only for it.
    expect(capEvents.filter((e) => e.remote.startsWith(`${from}:`)).length).toBe(refused);
  }
  expect(capEvents.some((e) => e.remote.startsWith("127.0.0.1:"))).toBe(false);

  // With the real nodes gone too, the registry holds no more sockets than before the flood.
  await Promise.all(nodes.map((n) => n.stop()));
  await waitUntil(() => socketCount(registry.pid) <= baseline, 10_000, `registry sockets back to ${baseline}`);

  // The per-address counts are back to zero: an address gets its full cap again, and no more.
  const again = await Promise.all(Array.from({ length: CAP }, () => RawClient.connect(registry.port, { localAddress: "127.0.0.2" })));
  for (const c of again) f.defer(() => c.destroy());
  const extra = await RawClient.connect(registry.port, { localAddress: "127.0.0.2" });
  f.defer(() => extra.destroy());
  expect((await extra.waitFor((m) => m.type === "error", 5_000, "the cap to refuse the extra connection")).code).toBe("too-many-connections");
  for (const c of again) await c.write('{"type":"sync"}\n');
  const answers = await Promise.all(again.map((c) => c.waitFor((m) => m.type === "error", 5_000, "an admitted connection's answer")));
  expect(answers.every((m) => m.code === "unexpected-message")).toBe(true);
  expect(registry.proc.exitCode).toBeNull();
}, 60_000);

/** What a connection to the TLS port does: never says anything, stops in the middle of its ClientHello, trickles one, or sends garbage records. */
type Handshake = "silent" | "half-hello" | "slow-hello" | "garbage";
const HANDSHAKERS: [Handshake, string][] = [
  ["silent", "127.0.0.2"],
  ["half-hello", "127.0.0.3"],
  ["slow-hello", "127.0.0.4"],
  ["garbage", "127.0.0.5"],
];

test("on the TLS port, handshakes that never end are capped per address and cut at the handshake deadline; mutual-TLS nodes register meanwhile; sockets and memory come back", async () => {
  await using certs = await testCerts(["node-0", "node-1", "node-2", "node-3", "node-4", "warm"]);
  const registry = f.track(await spawnRegistry([...certs.registryArgs(true), "--register-timeout", String(REGISTER_TIMEOUT_MS), "--max-conns-per-ip", String(CAP)]));
  const join = (id: string, log?: EventLog) =>
    startNode({ registryHost: "127.0.0.1", registryPort: registry.port, listenHost: "127.0.0.1", transport: certs.nodeTransport(id), onEvent: log?.push, waitForRegistration: false });
  const warm = await join("warm");
  await registry.log.waitForWhere("node-registered", (e) => e.id === "warm", 10_000);
  await warm.stop();
  await registry.log.waitForWhere("node-left", (e) => e.id === "warm", 10_000);
  const baseline = { sockets: socketCount(registry.pid), rss: rssBytes(registry.pid) ?? 0 };

  const hello = await clientHello();
  const flood = await Promise.all(
    HANDSHAKERS.map(async ([kind, from]) => {
      const conns = await Promise.all(Array.from({ length: PER_ADDRESS }, () => RawClient.connect(registry.port, { localAddress: from, timeoutMs: 10_000 })));
      for (const c of conns) f.defer(() => c.destroy());
      for (const c of conns) void shake(kind, c, hello);
      return { kind, from, conns };
    }),
  );
  const ids = ["node-0", "node-1", "node-2", "node-3", "node-4"];
  const logs = ids.map(() => new EventLog<NodeEvent>());
  const nodes: PeerNode[] = await Promise.all(ids.map((id, i) => join(id, logs[i])));
  for (const n of nodes) f.defer(() => n.stop());
  await Promise.all(logs.map((l) => l.waitFor("registered", 20_000, "a mutual-TLS node to register during the flood")));
  await waitUntil(() => nodes.every((n) => ids.every((id) => id === n.id || n.met().includes(id))), 20_000, "the real nodes to meet each other");

  // Cut by the handshake deadline (1.5 s here: the registration deadline is shorter than 3 s); the attackers never give up.
  for (const { kind, conns } of flood) await Promise.all(conns.map((c) => c.waitClosed(15_000, `the registry to cut every ${kind} connection`)));
  const errors = registry.log.named("error");
  for (const { kind, from, conns } of flood) {
    const mine = errors.filter((e) => e.remote.startsWith(`${from}:`)).map((e) => e.code);
    const cut = kind === "garbage" ? "handshake-failed" : "handshake-timeout";
    // One report per connection: the cap refused the excess before any handshake; the rest were cut.
    expect({ kind, reports: mine.length, other: mine.filter((c) => c !== cut && c !== "too-many-connections") }).toEqual({ kind, reports: conns.length, other: [] });
    expect(mine.filter((c) => c === cut).length).toBeGreaterThanOrEqual(CAP);
    expect(mine).toContain("too-many-connections");
  }
  expect(errors.some((e) => e.remote.startsWith("127.0.0.1:"))).toBe(false);
  expect(logs.flatMap((l) => l.named("error"))).toEqual([]);

  await Promise.all(nodes.map((n) => n.stop()));
  await waitUntil(() => socketCount(registry.pid) <= baseline.sockets, 10_000, `registry sockets back to ${baseline.sockets}`);
  // Each refused handshake holds TLS state until it is cut: what it costs must not stay.
  expect(((rssBytes(registry.pid) ?? 0) - baseline.rss) / 2 ** 20).toBeLessThan(64);
  expect(registry.proc.exitCode).toBeNull();
}, 60_000);

const TOKEN = "flood-test-token";
const HEARTBEAT_MS = 500;
const BUDGET = 4 * 1024 * 1024;

test("sync spam from non-readers, a ping flood, a /peers flood, churn, slow consumers and token guesses, all at once: real nodes registered before and during it are neither refused nor evicted; unsent bytes stay within the budget; the registry runs on", async () => {
  const args = ["--heartbeat", String(HEARTBEAT_MS), "--max-queue-total", String(BUDGET), "--http", "0"];
  const registry = f.track(await spawnRegistry(args, { REGISTRY_TOKEN: TOKEN }));
  const statsUrl = (await registry.log.waitFor("http-listening", 10_000)).url + "stats";
  const stats = async () => (await (await fetch(statsUrl)).json()) as Record<string, any>; // /stats as documented in PROTOCOL.md
  const baseRss = rssBytes(registry.pid)!;

  const before = await realNodes(registry.port, 3);
  const attacks = startAttackers({ port: registry.port, httpPort: Number(new URL(statsUrl).port), token: TOKEN });
  for (const a of attacks) f.defer(() => a.stop());
  await Promise.all(attacks.map((a) => a.ready));

  // The budget and memory are watched all along, not only at the end.
  let peak = { unsent: 0, max: 0, rss: 0 };
  const watching = setInterval(async () => {
    const s = await stats().catch(() => undefined);
    if (s) peak = { unsent: Math.max(peak.unsent, s.unsentBytes), max: s.maxUnsentBytes, rss: Math.max(peak.rss, rssBytes(registry.pid) ?? 0) };
  }, 50);
  f.defer(() => clearInterval(watching));

  const during = await realNodes(registry.port, 3);
  const all = [...before, ...during];
  const ids = all.map((n) => n.node.id);
  await waitUntil(() => all.every((n) => ids.every((id) => id === n.node.id || n.node.met().includes(id))), 20_000, "the real nodes to meet each other");
  // Each attacker has been answered by the mechanism meant for it, some of them more than once.
  const by = (kind: AttackKind) => attacks.find((a) => a.kind === kind)!.counts;
  await waitUntil(
    () =>
      (by("token-guess").codes["rate-limited"] ?? 0) > 0 &&
      (by("ping-flood").codes["rate-limited"] ?? 0) > 0 &&
      by("churn").registered >= 10 &&
      by("sync-spam").lines >= 2 * 16 * 190 &&
      by("peers-flood").responses >= 10 &&
      by("slow-consumers").lines >= 2 * 2 * 16,
    40_000,
    `every attacker to be answered: ${JSON.stringify(attacks.map((a) => [a.kind, a.counts]))}`,
    20,
  );
  const s = await stats();
  clearInterval(watching);
  await Promise.all(attacks.map((a) => a.stop()));

  for (const n of all) expect({ id: n.node.id, registered: n.node.registered, trouble: n.log.events.filter((e) => e.event === "error" || e.event === "disconnected") }).toEqual({ id: n.node.id, registered: true, trouble: [] });
  expect(registry.log.named("node-left").filter((e) => ids.includes(e.id))).toEqual([]);
  expect(registry.proc.exitCode).toBeNull();
  expect(peak.max).toBe(BUDGET);
  expect(peak.unsent).toBeLessThanOrEqual(BUDGET);
  // Memory: what the registry holds for the attackers beyond the budget is bounded too (sessions, buffers being written).
  expect(peak.rss - baseRss).toBeLessThan(BUDGET + 96 * 1024 * 1024);
  expect(s.authBlocked).toBeGreaterThan(0);
  expect(s.rejected["rate-limited"]).toBeGreaterThan(0);
}, 60_000);

/** `n` real nodes (in this process, from 127.0.0.1), each registered and logging its events. */
async function realNodes(registryPort: number, n: number): Promise<{ node: PeerNode; log: EventLog }[]> {
  return Promise.all(
    Array.from({ length: n }, async () => {
      const log = new EventLog<NodeEvent>();
      const node = await startNode({ registryHost: "127.0.0.1", registryPort, listenHost: "127.0.0.1", token: TOKEN, onEvent: log.push, waitForRegistration: false });
      f.defer(() => node.stop());
      await log.waitFor("registered", 20_000, "a real node to register under attack");
      return { node, log };
    }),
  );
}

// --- internal ----------------------------------------------------------------

/** What one flood connection does until the registry closes it. */
async function attack(kind: Kind, c: RawClient): Promise<void> {
  const register = JSON.stringify({ type: "register", v: 1, id: "flood", port: 1, name: "f".repeat(60) });
  switch (kind) {
    case "idle":
      return;
    case "partial":
      await c.write(register.slice(0, 20));
      return;
    case "half-closed":
      await c.write(register.slice(0, 20));
      c.end();
      return;
    case "trickle":
      for (let i = 0; !c.closed; i = (i + 1) % register.length) {
        await c.write(register[i]!);
        await Bun.sleep(50); // the attacker's pace, not a wait for anything
      }
  }
}

/** What one connection to the TLS port does until the registry cuts it. */
async function shake(kind: Handshake, c: RawClient, hello: Buffer): Promise<void> {
  switch (kind) {
    case "silent":
      return;
    case "half-hello":
      await c.write(hello.subarray(0, hello.byteLength >> 1));
      return;
    case "garbage":
      await c.write(Buffer.concat([Buffer.from([0x16, 0x03, 0x03, 0x00, 0x40]), Buffer.alloc(64, 0x5a)]));
      return;
    case "slow-hello":
      for (let i = 0; i < hello.byteLength && !c.closed; i++) {
        await c.write(hello.subarray(i, i + 1));
        await Bun.sleep(50); // the attacker's pace, not a wait for anything
      }
  }
}

/** Open sockets of a process (listeners and connections), from /proc. */
function socketCount(pid: number): number {
  let n = 0;
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      if (readlinkSync(`/proc/${pid}/fd/${fd}`).startsWith("socket:")) n++;
    } catch {
      // closed between the listing and the readlink
    }
  }
  return n;
}

