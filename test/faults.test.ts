/**
 * Membership under faults (issue 3): crashed, frozen and departing nodes, a
 * frozen and a restarted registry, unreachable and duplicate addresses, and
 * sequence gaps. Registry and nodes run as real processes wherever a signal
 * is the fault; in-process (or as a raw socket) where the test must control
 * exactly what one side says.
 */
import { afterEach, describe, expect, test } from "bun:test";
import { startRegistry } from "../registry.ts";
import { startNode, type NodeEvent } from "../client.ts";
import { PROTOCOL_VERSION, type Peer } from "../protocol.ts";
import { EventLog, RawClient, disposeAll, exec, freePort, readLines, same, spawnNode, spawnRegistry, spawnScript, waitUntil, withDeadline, type NodeLine, type Proc, type RegistryLine } from "../harness.ts";

/** Short timings: a beat every 500 ms, eviction after 3 missed beats (1.5 s: a loaded CI machine can stall a process for less). */
const HEARTBEAT_MS = 500;
const MISSES = 3;
const REGISTRY_ARGS = ["--heartbeat", String(HEARTBEAT_MS), "--heartbeat-misses", String(MISSES)];
const NODE_ARGS = ["--listen", "127.0.0.1", "--reconnect-max", "300", "--greet-timeout", "2000", "--greet-retries", "1"];
/** Deadline for anything that should happen within a few beats; generous because two cores are shared. */
const SOON = 10_000;

/** Everything a test started; killed (SIGCONT first, then SIGKILL) after each test, pass or fail. */
const fixtures: AsyncDisposable[] = [];
afterEach(async () => {
  await disposeAll(fixtures.splice(0));
});

function track<T extends AsyncDisposable>(x: T): T {
  fixtures.push(x);
  return x;
}

describe("node faults (processes)", () => {
  test("kill -9 of a node: the registry drops it (closed) and the others get peer-left", async () => {
    const reg = track(await spawnRegistry(REGISTRY_ARGS));
    const [a, b, c] = await startNodes(reg.port, 3);

    await b.kill("SIGKILL");
    await reg.log.waitForWhere("node-left", (e) => e.id === b.id, SOON, "registry to drop the killed node");
    for (const n of [a, c]) {
      const left = await n.log.waitForWhere("peer-left", (e) => e.peer === b.id, SOON, `${n.id} to see ${b.id} leave`);
      expect(left.reason).toBe("closed");
    }
    expect(registryLeft(reg, b.id)).toEqual(["closed"]);
    expect(registryList(reg)).toEqual(sorted([a.id, c.id]));
  });

  test("SIGSTOP of a node: evicted by heartbeat (timeout); SIGCONT makes it re-register exactly once", async () => {
    const reg = track(await spawnRegistry(REGISTRY_ARGS));
    const [a, b, c] = await startNodes(reg.port, 3);
    await c.log.waitForCount("greeted", 2, SOON, "the last node to greet both others");

    b.signal("SIGSTOP");
    // How soon is for bench/ (departure), not for a test on a shared machine; here: evicted, and by the heartbeat.
    await reg.log.waitForWhere("node-left", (e) => e.id === b.id, SOON, "heartbeat eviction of the frozen node");
    expect(registryLeft(reg, b.id)).toEqual(["timeout"]);
    for (const n of [a, c]) {
      const left = await n.log.waitForWhere("peer-left", (e) => e.peer === b.id, SOON, `${n.id} to see the frozen node leave`);
      expect(left.reason).toBe("timeout");
    }
    expect(registryList(reg)).toEqual(sorted([a.id, c.id]));

    b.signal("SIGCONT");
    const again = await b.log.waitForWhere("registered", (e) => e.again === true, SOON, "the thawed node to register again");
    expect(again.boot).toBe(registryBoot(reg));
    for (const n of [a, c]) await n.log.waitForWhere("peer-joined", (e) => e.peer === b.id, SOON, `${n.id} to see it rejoin`);
    expect(registryList(reg)).toEqual(sorted([a.id, b.id, c.id]));
    expect(reg.log.events.filter((e) => e.event === "node-registered" && e.id === b.id)).toHaveLength(2);
    // A later node's greeting reaching b marks a point after any greeting b would have sent on re-registering.
    const d = track(await spawnNode(reg.port, NODE_ARGS));
    for (const n of [b, c]) await n.log.waitForWhere("greeting", (e) => e.peer === d.id, SOON, `${n.id} to answer a new node`);
    // It already met both peers: re-registration must not greet them again.
    expect(b.log.named("greeted")).toHaveLength(1);
    expect(c.log.named("greeting").map((e) => e.peer)).toEqual([d.id]);
  });

  test("SIGTERM and SIGINT of a node: it says leave and exits 0; SIGTERM of the registry exits 0", async () => {
    const reg = track(await spawnRegistry(REGISTRY_ARGS));
    const [a, b, c] = await startNodes(reg.port, 3);

    for (const [n, sig] of [[a, "SIGTERM"], [b, "SIGINT"]] as const) {
      n.signal(sig);
      expect(await withDeadline(n.exited(), SOON, `${n.id} to exit on ${sig}`)).toBe(0);
      await n.log.waitFor("stopped", 0, `${n.id} to print stopped`);
      await reg.log.waitForWhere("node-left", (e) => e.id === n.id, SOON, `registry to drop ${n.id}`);
      expect(registryLeft(reg, n.id)).toEqual(["leave"]);
      const left = await c.log.waitForWhere("peer-left", (e) => e.peer === n.id, SOON, `c to see ${n.id} leave`);
      expect(left.reason).toBe("leave");
    }
    expect(registryList(reg)).toEqual([c.id]);

    reg.signal("SIGTERM");
    expect(await withDeadline(reg.exited(), SOON, "registry to exit on SIGTERM")).toBe(0);
    await reg.log.waitFor("stopped", 0, "registry to print stopped");
    // The remaining node is told, and goes on trying to reconnect rather than dying.
    await c.log.waitFor("disconnected", SOON, "the node to notice the registry stopped");
    await c.log.waitFor("reconnecting", SOON, "the node to try again");
    expect(c.proc.exitCode).toBeNull();
  });

  test("a node without its registry retries with capped exponential backoff, and SIGTERM still exits 0", async () => {
    const port = freePort();
    const n = track(spawnScript<NodeLine>("client.ts", ["127.0.0.1", String(port), "--json", ...NODE_ARGS], { label: "node" }));
    const tries = (await n.log.waitForCount("reconnecting", 6, SOON, "six reconnect attempts")).slice(0, 6);
    // Full jitter: each delay lies in [0, min(cap, base * 2^attempt)], base 100 ms, cap --reconnect-max 300.
    expect(tries.map((e) => e.attempt)).toEqual([1, 2, 3, 4, 5, 6]);
    expect(tries.map((e) => e.capMs)).toEqual([100, 200, 300, 300, 300, 300]);
    for (const e of tries) expect(e.inMs).toBeLessThanOrEqual(e.capMs);
    // Jitter, not zero: six uniform draws all under 1 ms would be a one-in-10^13 event.
    expect(tries.some((e) => e.inMs > 0)).toBe(true);
    expect(n.log.named("registered")).toEqual([]);
    n.signal("SIGTERM");
    expect(await withDeadline(n.exited(), SOON, "the node to exit on SIGTERM")).toBe(0);
  });
});

describe("registry faults (processes)", () => {
  test("SIGSTOP of the registry: nodes notice by heartbeat; SIGCONT brings every node back exactly once", async () => {
    const reg = track(await spawnRegistry(REGISTRY_ARGS));
    const nodes = await startNodes(reg.port, 2);

    reg.signal("SIGSTOP");
    for (const n of nodes) {
      const d = await n.log.waitForWhere("disconnected", (e) => e.registered === true, SOON, `${n.id} to notice the frozen registry`);
      expect(d.reason).toContain("silent");
    }
    reg.signal("SIGCONT");
    for (const n of nodes) await n.log.waitForWhere("registered", (e) => e.again === true, SOON, `${n.id} to register again`);
    await waitUntil(() => same(registryList(reg), sorted(nodes.map((n) => n.id))), SOON, "registry list to equal the live nodes");
    // Exactly once: one registration before the freeze and one after, per node, and no entry replaced by a duplicate.
    for (const n of nodes) expect(reg.log.events.filter((e) => e.event === "node-registered" && e.id === n.id)).toHaveLength(2);
    expect(reg.log.events.filter((e) => e.event === "node-left" && e.reason === "replaced")).toEqual([]);
  });

  test("kill -9 of the registry and restart on the same port: all nodes back once, a new node greets them all", async () => {
    const first = track(await spawnRegistry(REGISTRY_ARGS));
    const port = first.port;
    const old = await startNodes(port, 3);
    await old[2]!.log.waitForCount("greeted", 2, SOON, "the mesh of the first three");
    const greetedBefore = old.map((n) => n.log.named("greeted").length);
    expect(greetedBefore).toEqual([0, 1, 2]);

    await first.kill("SIGKILL");
    for (const n of old) await n.log.waitFor("disconnected", SOON, `${n.id} to notice the registry died`);

    const second = track(spawnScript<RegistryLine>("registry.ts", ["127.0.0.1", String(port), "--json", ...REGISTRY_ARGS], { label: "registry2" }));
    const listening = await second.log.waitFor("listening", SOON, "the restarted registry to listen");
    expect(listening.port).toBe(port);
    const boot = listening.boot;
    expect(boot).not.toBe(registryBoot(first));
    for (const n of old) {
      await n.log.waitForWhere("registered", (e) => e.again === true && e.boot === boot, SOON, `${n.id} to re-register`);
    }
    const ids = sorted(old.map((n) => n.id));
    await waitUntil(() => same(registryList(second), ids), SOON, "the new registry to list every live node");
    expect(sorted(second.log.named("node-registered").map((e) => e.id))).toEqual(ids); // each exactly once

    const late = track(await spawnNode(port, NODE_ARGS));
    const greeted = await late.log.waitForCount("greeted", 3, SOON, "the late node to greet every live node");
    expect(sorted(greeted.map((e) => e.peer))).toEqual(ids);
    expect(late.log.named("greet-failed")).toEqual([]);
    for (const n of old) await n.log.waitForWhere("greeting", (e) => e.peer === late.id, SOON, `${n.id} to be greeted`);
    // Old pairs had met before the restart; re-registering must not greet them again.
    expect(old.map((n) => n.log.named("greeted").length)).toEqual(greetedBefore);
    expect(registryList(second)).toEqual(sorted([...ids, late.id]));
  });
});

describe("addresses (in-process registry, raw sockets)", () => {
  test("an unreachable address in the list: one greet-failed for it, greeted for the rest, round finishes", async () => {
    const reg = track(await startRegistry({ host: "127.0.0.1", port: 0, probe: false, heartbeatMs: 60_000 }));
    const refused = freePort();
    await using silent = await RawClient.serve();
    await using fakeA = await RawClient.connect(reg.port);
    await fakeA.register("fake-refused", refused);
    await using fakeB = await RawClient.connect(reg.port);
    await fakeB.register("fake-silent", silent.port);
    expect(fakeA.named("registered")).toHaveLength(1);
    expect(fakeB.named("registered")).toHaveLength(1);

    const real = [];
    for (let i = 0; i < 2; i++) real.push(track(await startNode({ registryHost: "127.0.0.1", registryPort: reg.port, listenHost: "127.0.0.1", greetRetries: 0, greetTimeoutMs: 300 })));
    const log = new EventLog<NodeEvent>();
    // Long enough that greeting a real peer on a busy machine does not fail; the silent fake still fails in ~2 s.
    const greetTimeoutMs = 1000;
    const greetRetries = 1;
    const node = track(await startNode({ registryHost: "127.0.0.1", registryPort: reg.port, listenHost: "127.0.0.1", greetTimeoutMs, greetRetries, onEvent: log.push }));

    // A round is over when each listed peer has a greeted or a greet-failed. Bound: every try timing out, plus backoff.
    const bound = (greetRetries + 1) * greetTimeoutMs + 400 * greetRetries + SOON;
    await log.waitForCount((e) => e.event === "greeted" || e.event === "greet-failed", 4, bound, "the greeting round to finish");
    const failed = log.named("greet-failed");
    expect(sorted(failed.map((e) => e.peer))).toEqual(["fake-refused", "fake-silent"]);
    for (const f of failed) {
      expect(f.tries).toBe(greetRetries + 1);
      expect(f.reason).not.toBe("");
    }
    expect(failed.find((e) => e.peer === "fake-silent")!.reason).toContain("no welcome");
    expect(sorted(log.named("greeted").map((e) => e.peer))).toEqual(sorted(real.map((n) => n.id)));
    expect(node.registered).toBe(true);
    expect(sorted(node.peers().map((p) => p.id))).toEqual(sorted(["fake-refused", "fake-silent", ...real.map((n) => n.id)]));
  });

  test("a peer whose connection opens only after the greeting gave up: greet-failed, and the late connection is closed without harm", async () => {
    // The peer is a frozen process whose accept queue is full, so the kernel drops the greeting's SYN
    // and the dial's deadline passes; thawed, it drains the queue and the retransmitted SYN opens the
    // connection after the greeter has given up on it.
    const unhandled: unknown[] = [];
    const onUnhandled = (e: unknown) => void unhandled.push(e);
    process.on("unhandledRejection", onUnhandled);
    const peer = track(stuckListener());
    try {
      const port = await peer.port;
      peer.proc.kill("SIGSTOP");
      const fillers: Promise<Bun.Socket>[] = [];
      // Until the queue is full; beyond that, further fillers wait in SYN-SENT like the greeting will.
      for (let i = 0; (await acceptQueue(port)).full === false; i++) {
        if (i >= 5_000) throw new Error(`accept queue of port ${port} never filled`);
        fillers.push(Bun.connect({ hostname: "127.0.0.1", port, socket: { data() {} } }));
        if (i % 64 === 63) await Bun.sleep(0); // let the handshakes land before asking the kernel again
      }
      const reg = track(await startRegistry({ host: "127.0.0.1", port: 0, probe: false, heartbeatMs: 60_000 }));
      await using fake = await RawClient.connect(reg.port);
      await fake.register("fake-stuck", port);
      const log = new EventLog<NodeEvent>();
      const node = track(await startNode({ registryHost: "127.0.0.1", registryPort: reg.port, listenHost: "127.0.0.1", greetTimeoutMs: 300, greetRetries: 0, onEvent: log.push }));
      const failed = await log.waitForWhere("greet-failed", (e) => e.peer === "fake-stuck", SOON, "the greeting to give up");
      expect(failed.reason).toContain("timeout");

      peer.proc.kill("SIGCONT");
      // The peer reports a close only for the late greeting connection: the fillers stay open.
      await peer.closed(SOON + 7_000); // a dropped SYN is sent again 1 s, then 3 s later
      await Promise.all(fillers.map((f) => f.then((s) => s.terminate(), () => {})));
      expect(unhandled).toEqual([]);
      expect(node.registered).toBe(true);
      expect(fake.closed).toBe(false);
      expect(log.named("greeted")).toEqual([]);
    } finally {
      process.off("unhandledRejection", onUnhandled);
    }
  });
});

/** A listener in a process of its own that prints its port, then `closed` for each connection its peer ends. */
function stuckListener() {
  const code = `const s = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {}, close() { console.log("closed"); } } }); console.log(s.port);`;
  const proc = Bun.spawn([process.execPath, "-e", code], { stdout: "pipe", stderr: "ignore" });
  const lines = new EventLog();
  void readLines(proc.stdout, (line) => lines.push({ event: line }));
  return {
    proc,
    port: lines.waitFor(() => true, SOON, "the listener's port").then((e) => Number(e.event)),
    closed: (ms: number) => lines.waitFor((e) => e.event === "closed", ms, "the late connection to reach the peer and be closed"),
    async [Symbol.asyncDispose]() {
      proc.kill("SIGCONT");
      proc.kill("SIGKILL");
      await proc.exited;
    },
  };
}

/** A listening port's accept queue, from the kernel: full once it holds more than its backlog. */
async function acceptQueue(port: number): Promise<{ full: boolean }> {
  const out = await exec(["ss", "-Hltn", `sport = :${port}`], 5_000);
  const [queued, backlog] = out.stdout.trim().split(/\s+/).slice(1, 3).map(Number);
  return { full: queued! > backlog! };
}


describe("views (a fake registry)", () => {
  test("a sequence gap makes the node sync; a snapshot and a new boot replace its view, also one sent unsolicited on the live session", async () => {
    await using fake = await fakeRegistry();
    const log = new EventLog<NodeEvent>();
    const node = track(
      await startNode({ registryHost: "127.0.0.1", registryPort: fake.port, listenHost: "127.0.0.1", greetRetries: 0, greetTimeoutMs: 200, reconnectBaseMs: 10, reconnectMaxMs: 50, onEvent: log.push }),
    );
    // startNode resolved, so the fake has answered the first register.
    const s1 = fake.sessions[0]!;
    const p = (n: number): Peer => ({ id: `p${n}`, host: "127.0.0.1", port: 1 }); // port 1 refuses: greetings fail fast
    const ids = () => sorted(node.peers().map((x) => x.id));
    expect(ids()).toEqual(["p1"]);

    s1.send({ type: "joined", seq: 7, peer: p(3) }); // 6 is missing
    await s1.waitFor("sync", SOON, "the node to ask for a snapshot");
    const resync = await log.waitFor("resync", 0, "a resync event");
    expect(resync).toMatchObject({ expected: 6, got: 7 });
    s1.send({ type: "snapshot", boot: "boot-1", seq: 7, peers: [p(1), p(2), fake.self!] });
    await waitUntil(() => same(ids(), ["p1", "p2"]), SOON, "the snapshot to become the view");

    s1.send({ type: "joined", seq: 8, peer: p(4) }); // numbering continues from the snapshot
    await waitUntil(() => same(ids(), ["p1", "p2", "p4"]), SOON, "the next push to apply");

    // A new registry (new boot) on the next session: its list replaces the view, the differences are reported.
    fake.nextBoot = "boot-2";
    fake.nextPeers = [p(5)];
    s1.end();
    const again = await log.waitForWhere("registered", (e) => e.again === true, SOON, "the node to register again");
    expect(again.boot).toBe("boot-2");
    expect(ids()).toEqual(["p5"]);
    const restartLeaves = log.named("peer-left").filter((e) => e.reason === "restart").map((e) => e.peer);
    expect(sorted(restartLeaves)).toEqual(["p1", "p2", "p4"]);

    // Registries sharing a store send a snapshot unsolicited when the store started over: another
    // boot, numbering from there. The session stays; the view is the snapshot's, the differences reported.
    const s2 = fake.sessions[1]!;
    s2.send({ type: "snapshot", boot: "boot-3", seq: 2, peers: [p(5), p(6), fake.self!] });
    await waitUntil(() => same(ids(), ["p5", "p6"]), SOON, "the new epoch's snapshot to become the view");
    expect(log.events.filter((e) => e.event === "peer-joined" && e.peer === "p6")).toHaveLength(1);
    s2.send({ type: "joined", seq: 3, peer: p(7) }); // numbering goes on from the snapshot's seq, in the new boot
    await waitUntil(() => same(ids(), ["p5", "p6", "p7"]), SOON, "the next push of the new epoch to apply");
    expect({ sessions: fake.sessions.length, closed: s2.closed, syncs: s2.named("sync").length }).toEqual({ sessions: 2, closed: false, syncs: 0 });
  });

  test("a refusal after the node was registered once is retried, not fatal (a restarted registry may be briefly wrong)", async () => {
    await using fake = await fakeRegistry();
    const log = new EventLog<NodeEvent>();
    const node = track(
      await startNode({ registryHost: "127.0.0.1", registryPort: fake.port, listenHost: "127.0.0.1", greetRetries: 0, greetTimeoutMs: 200, reconnectBaseMs: 10, reconnectMaxMs: 50, onEvent: log.push }),
    );
    // E.g. a restarted registry whose dial-back probe timed out under load: the node's address has not changed.
    fake.nextRefusal = "unreachable";
    fake.sessions[0]!.end();
    await log.waitForWhere("error", (e) => e.code === "unreachable", SOON, "the refusal");
    await log.waitForWhere("registered", (e) => e.again === true, SOON, "the node to try again and register");
    expect(fake.sessions.map((x) => x.named("register").length)).toEqual([1, 1, 1]);
    expect(node.registered).toBe(true);
  });

  test("a registry that accepts but never answers register is given up and retried", async () => {
    await using fake = await fakeRegistry({ answer: false });
    const log = new EventLog<NodeEvent>();
    const node = track(
      await startNode({ registryHost: "127.0.0.1", registryPort: fake.port, listenHost: "127.0.0.1", registerTimeoutMs: 300, reconnectBaseMs: 10, reconnectMaxMs: 50, waitForRegistration: false, onEvent: log.push }),
    );
    await waitUntil(() => fake.sessions.length >= 2, SOON, "the node to give up on a silent registry and dial again");
    expect(node.registered).toBe(false);
    const gaveUp = await log.waitFor("disconnected", SOON, "a disconnected event");
    expect(gaveUp.reason).toContain("no answer to register");
    expect(fake.sessions[0]!.named("register")).toHaveLength(1);
  });
});

// --- internal ----------------------------------------------------------------

type NodeProc = Proc & { id: string; port: number };

/** Starts nodes one after another, so each greets all earlier ones. */
async function startNodes(registryPort: number, n: 2): Promise<[NodeProc, NodeProc]>;
async function startNodes(registryPort: number, n: 3): Promise<[NodeProc, NodeProc, NodeProc]>;
async function startNodes(registryPort: number, n: number): Promise<NodeProc[]> {
  const out: NodeProc[] = [];
  for (let i = 0; i < n; i++) out.push(track(await spawnNode(registryPort, NODE_ARGS)));
  return out;
}

/** The registry's list, rebuilt from its events since its (last) start. */
function registryList(reg: Proc<RegistryLine>): string[] {
  const ids = new Set<string>();
  for (const e of reg.log.events) {
    if (e.event === "listening") ids.clear();
    else if (e.event === "node-registered") ids.add(e.id);
    else if (e.event === "node-left") ids.delete(e.id);
  }
  return sorted([...ids]);
}

function registryLeft(reg: Proc<RegistryLine>, id: string): string[] {
  return reg.log.named("node-left").filter((e) => e.id === id).map((e) => e.reason);
}

function registryBoot(reg: Proc<RegistryLine>): string | undefined {
  return reg.log.named("listening").at(-1)?.boot;
}

function sorted(xs: string[]): string[] {
  return [...xs].sort();
}

/**
 * A registry played by the test: answers each register with `registered`
 * (boot and peers as set at that moment, seq 5) unless `answer` is false, and
 * otherwise says nothing unless told to.
 */
async function fakeRegistry(opts: { answer?: boolean } = {}) {
  const state = {
    nextBoot: "boot-1",
    nextPeers: [{ id: "p1", host: "127.0.0.1", port: 1 }] as Peer[],
    /** If set, the next register is refused with this error code (once), the way the registry refuses. */
    nextRefusal: undefined as string | undefined,
    self: undefined as Peer | undefined,
  };
  const server = await RawClient.serve((s) => {
    if (opts.answer === false) return;
    void s.waitFor("register", SOON).then((m) => {
      if (state.nextRefusal) {
        void s.send({ type: "error", code: state.nextRefusal, message: "refused by the test" });
        state.nextRefusal = undefined;
        return s.end();
      }
      state.self = { id: String(m.id), host: "127.0.0.1", port: Number(m.port) };
      void s.send({ type: "registered", v: PROTOCOL_VERSION, boot: state.nextBoot, seq: 5, heartbeat: 60_000, timeout: 180_000, self: state.self, peers: state.nextPeers });
    }, () => {});
  });
  return Object.assign(state, { port: server.port, sessions: server.connections, [Symbol.asyncDispose]: () => server[Symbol.asyncDispose]() });
}
