/**
 * Limits and access control (issue 5): every limit answers with its error code
 * and a message that says which limit, the registry keeps serving a real node
 * while the limit is being hit, the shared-secret token is checked and never
 * shows up in what the registry reports, advertised addresses cannot be
 * spoofed unless the operator allows it, and a node survives a hostile
 * registry. Attackers are raw sockets; connections that must count as another
 * host are bound to 127.0.0.2, 127.0.0.3, ... (all of 127/8 is loopback).
 */
import { afterEach, describe, expect, test } from "bun:test";
import { RegistrationError, startNode, type NodeEvent } from "../client.ts";
import { BucketMap, ByteBudget, TokenBucket } from "../limits.ts";
import type { Registry } from "../registry.ts";
import { EventLog, Fixtures, RawClient, freePort, spawnNode, spawnRegistry, spawnScript, waitUntil, watchedTransport, withDeadline, type Proc, type WireMessage } from "../harness.ts";

const f = new Fixtures();
afterEach(() => f.cleanup());

describe("budgets, without sockets", () => {
  const holder = (pendingBytes: number, log: string[], name: string) => ({ pendingBytes, dropSlow: (why: string) => void log.push(`${name}: ${why}`) });

  test("a buffer held by many connections counts once, until the last lets it go", () => {
    const b = new ByteBudget(1_000);
    const shared = new Uint8Array(600);
    const [x, y] = [holder(600, [], "x"), holder(600, [], "y")];
    b.retain(shared, x);
    b.retain(shared, y);
    expect(b.total).toBe(600);
    b.release(shared);
    expect(b.total).toBe(600);
    b.release(shared);
    expect(b.total).toBe(0);
  });

  test("over the budget, the largest backlogs are dropped until it fits; the others are left alone", () => {
    const log: string[] = [];
    const b = new ByteBudget(1_000);
    const conns = [holder(100, log, "small"), holder(700, log, "large"), holder(400, log, "middle")];
    const bufs = conns.map((c) => {
      const buf = new Uint8Array(c.pendingBytes);
      b.retain(buf, c);
      return buf;
    });
    // A dropped connection releases its buffers, as Conn.destroy does.
    conns[1]!.dropSlow = (why) => {
      log.push(`large: ${why}`);
      b.release(bufs[1]!);
    };
    b.enforce();
    expect(log.map((l) => l.split(":")[0])).toEqual(["large"]);
    expect(b.total).toBe(500);
    expect(b.dropped).toBe(1);
  });

  test("a token bucket allows its burst, then its rate; a rate of 0 is no limit", () => {
    let now = 0;
    const t = new TokenBucket(10, 5, () => now);
    expect(Array.from({ length: 12 }, () => t.take()).filter(Boolean).length).toBe(10);
    expect(t.waitMs()).toBe(200);
    now += 1_000;
    expect(Array.from({ length: 10 }, () => t.take()).filter(Boolean).length).toBe(5);
    const free = new TokenBucket(0, 0, () => now);
    expect(Array.from({ length: 1_000 }, () => free.take()).every(Boolean)).toBe(true);
  });

  test("buckets per address are separate, and forgotten once refilled", () => {
    let now = 0;
    const m = new BucketMap({ perSecond: 1, burst: 2 }, () => now);
    expect([m.take("a"), m.take("a"), m.take("a"), m.take("b")]).toEqual([true, true, false, true]);
    expect(m.size).toBe(2);
    now += 5_000;
    m.sweep();
    expect(m.size).toBe(0);
  });
});

describe("registry limits", () => {
  test("a line over --max-line is answered line-too-long and closed; the boundary length is read; a real node registers meanwhile", async () => {
    const { reg, log } = await f.registry({ maxLineBytes: 1024 });
    const unfinished = await f.raw(reg.port);
    await unfinished.write("x".repeat(2000));
    const finished = await f.raw(reg.port);
    await finished.write(`{"type":"register","pad":"${"y".repeat(1100)}"}\n`);
    for (const c of [unfinished, finished]) {
      const err = await c.waitFor((m) => m.type === "error", 5_000, "line-too-long");
      expect(err).toMatchObject({ type: "error", code: "line-too-long" });
      expect(String(err.message)).toContain("1024");
      await c.waitClosed(5_000);
    }
    // Exactly at the limit: read and judged on its content (a ping before register).
    const exact = await f.raw(reg.port);
    const ping = `{"type":"ping","pad":"`;
    await exact.write(ping + "z".repeat(1024 - ping.length - 2) + '"}\n');
    expect((await exact.waitFor((m) => m.type === "error", 5_000, "reply to a 1024-byte line")).code).toBe("unexpected-message");

    const node = await f.node(reg.port);
    expect(node.registered).toBe(true);
    // The registry reports the overflow like every other refusal.
    await log.waitForWhere("error", (e) => e.code === "line-too-long", 5_000, "line-too-long event");
    expect(reg.stats().rejected["line-too-long"]).toBe(2);
  });

  test("--max-nodes: a node past the limit gets registry-full, keeps retrying, and gets in once a slot frees", async () => {
    const { reg } = await f.registry({ maxNodes: 2 });
    const a = await f.node(reg.port);
    const b = await f.node(reg.port);
    const over = await f.raw(reg.port);
    await over.write(JSON.stringify({ type: "register", v: 1, id: "one-too-many", port: 1 }) + "\n");
    const err = await over.waitFor((m) => m.type === "error", 5_000, "registry-full");
    expect(err.code).toBe("registry-full");
    expect(String(err.message)).toContain("maximum of 2 nodes");
    await over.waitClosed(5_000);

    const waitingLog = new EventLog<NodeEvent>();
    const waiting = await f.node(reg.port, { onEvent: waitingLog.push, waitForRegistration: false });
    await waitingLog.waitForWhere("error", (e) => e.code === "registry-full", 10_000, "registry-full for the third node");
    expect(waiting.registered).toBe(false);
    expect(a.registered && b.registered).toBe(true);
    await a.stop();
    await waitingLog.waitFor("registered", 15_000, "the third node to get the freed slot");
    expect(new Set(reg.nodes().map((n) => n.id))).toEqual(new Set([b.id, waiting.id]));
  });

  test("--register-timeout: silent, half-line and byte-trickling connections are all cut at the deadline (trickling does not extend it)", async () => {
    const { reg, log } = await f.registry({ registerTimeoutMs: 300 });
    const silent = await f.raw(reg.port);
    const partial = await f.raw(reg.port);
    await partial.write('{"type":"register","v":1,"id":"slow');
    const trickle = await f.raw(reg.port);
    // One byte at a time for as long as the connection lives; an idle timer reset by traffic would never fire.
    const body = JSON.stringify({ type: "register", v: 1, id: "trickle", port: 1, name: "t".repeat(60) });
    void (async () => {
      for (let i = 0; !trickle.closed; i = (i + 1) % body.length) {
        await trickle.write(body[i]!);
        await Bun.sleep(20); // the trickler's pace, not a wait for anything
      }
    })();
    const node = await f.node(reg.port);
    for (const c of [silent, partial, trickle]) {
      const err = await c.waitFor((m) => m.type === "error", 10_000, "registration-timeout");
      expect(err.code).toBe("registration-timeout");
      expect(String(err.message)).toContain("300ms");
      await c.waitClosed(5_000);
    }
    expect(node.registered).toBe(true);
    expect(log.named("error").filter((e) => e.code === "registration-timeout").length).toBe(3);
  });

  test("--max-conns-per-ip: the connection past the cap gets too-many-connections; other addresses, and the same one after closes, still get in", async () => {
    // A registration deadline far past the test: the held connections must stay open until it destroys them.
    const { reg, log } = await f.registry({ maxConnsPerAddress: 3, probe: false, registerTimeoutMs: 60_000 });
    const held = await Promise.all([1, 2, 3].map(() => f.raw(reg.port, "127.0.0.2")));
    const over = await f.raw(reg.port, "127.0.0.2");
    const err = await over.waitFor((m) => m.type === "error", 5_000, "too-many-connections");
    expect(err.code).toBe("too-many-connections");
    expect(String(err.message)).toContain("more than 3 connections from 127.0.0.2");
    await over.waitClosed(5_000);
    await log.waitForWhere("error", (e) => e.code === "too-many-connections" && e.remote.startsWith("127.0.0.2:"), 5_000);

    // Another source address is not affected, and neither is a real node.
    const other = await f.raw(reg.port, "127.0.0.3");
    await other.write(JSON.stringify({ type: "register", v: 1, id: "from-3", port: 4000 }) + "\n");
    expect((await other.waitFor((m) => m.type === "registered" || m.type === "error", 5_000, "register from 127.0.0.3")).type).toBe("registered");
    const node = await f.node(reg.port);
    expect(node.registered).toBe(true);

    // The three held connections were admitted, not refused.
    for (const c of held) expect(c.closed).toBe(false);
    for (const c of held) c.destroy();
    // The count goes back down: a fresh connection from the same address is admitted again.
    await waitUntil(() => log.named("error").length >= 1 && held.every((c) => c.closed), 5_000, "held connections closed");
    let admitted: RawClient | undefined;
    await waitUntil(async () => {
      const c = await f.raw(reg.port, "127.0.0.2");
      await c.write('{"type":"sync"}\n');
      const m = await c.waitFor((m) => m.type === "error", 5_000, "reply from the registry");
      if (m.code === "unexpected-message") admitted = c;
      return admitted !== undefined;
    }, 10_000, "127.0.0.2 admitted again after its connections closed");
    expect(admitted).toBeDefined();
  });

  test("a registered node that stops reading is dropped once its unsent backlog passes the queue cap; others carry on", async () => {
    const watched = watchedTransport();
    const { reg, log } = await f.registry({ probe: false, heartbeatMs: 60_000, maxQueueBytes: 64 * 1024, rateSessionSyncs: 0, transport: watched.transport });
    // A list whose snapshot is larger than the cap: ~400 peers of ~200 bytes.
    await registerFillers(reg, 400);
    const slow = await f.raw(reg.port);
    await slow.send({ type: "register", v: 1, id: "slow-reader", port: 30_000 });
    await slow.waitFor("registered", 5_000);
    slow.pause();
    const end = await watched.of(slow);
    // Snapshots until the kernel's buffers are full and the registry holds bytes itself (a sync
    // waits for the last snapshot while that is queued); then every join and leave it is pushed
    // queues behind it, until the backlog passes the cap.
    let sent = end.read;
    let churn = 0;
    while (!log.named("error").some((e) => e.code === "slow-consumer")) {
      if (end.conn.pendingBytes === 0) {
        await slow.write('{"type":"sync"}\n');
        sent += 16;
        await waitUntil(() => end.read >= sent || end.conn.closed, 10_000, "the registry to read the sync");
      } else {
        const c = await f.raw(reg.port);
        await c.send({ type: "register", v: 1, id: `churn-${churn++}-`.padEnd(64, "c"), port: 40_000 + (churn % 20_000), name: "m".repeat(64) });
        await c.waitFor("registered", 5_000);
        c.destroy();
        await c.waitClosed(5_000);
      }
    }
    const left = await log.waitForWhere("node-left", (e) => e.id === "slow-reader", 10_000, "the slow reader to be dropped");
    expect(left.reason).toBe("closed");
    const why = log.named("error").find((e) => e.code === "slow-consumer")!;
    expect(String(why.message)).toContain("over 65536 bytes unsent: the peer does not read");
    expect(reg.stats().rejected["slow-consumer"]).toBe(1);
    const node = await f.node(reg.port);
    expect(node.registered).toBe(true);
    expect(reg.nodes().some((n) => n.id === "slow-reader")).toBe(false);
  }, 60_000);
});

describe("token", () => {
  // Letters and digits only: a JSON parser's error message would quote it as an identifier.
  const TOKEN = `Secret${crypto.randomUUID().replace(/-/g, "")}`;

  test("missing or wrong token: unauthorized and closed; the right one registers; the token appears in no event", async () => {
    const { reg, log } = await f.registry({ token: TOKEN });
    const nodeLog = new EventLog<NodeEvent>();
    for (const [token, message] of [
      [undefined, "this registry requires a token"],
      ["wrong", "wrong token"],
      [TOKEN.slice(0, -1), "wrong token"],
      ["x".repeat(1024), "wrong token"],
    ] as const) {
      const e = await f.node(reg.port, { token, onEvent: nodeLog.push }).catch((e: unknown) => e);
      expect(e).toBeInstanceOf(RegistrationError);
      expect((e as RegistrationError).code).toBe("unauthorized");
      expect((e as Error).message).toContain(message);
    }
    const rawWrong = await f.raw(reg.port);
    await rawWrong.write(JSON.stringify({ type: "register", v: 1, id: "w", port: 1, token: "nope" }) + "\n");
    expect((await rawWrong.waitFor((m) => m.type === "error", 5_000, "unauthorized")).code).toBe("unauthorized");
    await rawWrong.waitClosed(5_000);

    const good = await f.node(reg.port, { token: TOKEN, onEvent: nodeLog.push });
    expect(good.registered).toBe(true);

    // The right token inside lines the registry refuses for other reasons: the refusal must not quote it.
    const carriers = [
      `{"type":"register","v":1,"id":"t1","port":1,"token":${TOKEN}}`,
      `{"type":"register","v":1,"id":"t2","port":"1","token":"${TOKEN}"}`,
      `{"type":"register","v":2,"id":"t3","port":1,"token":"${TOKEN}"}`,
      `{"type":"register","v":1,"id":"${TOKEN}!","port":1}`,
      `{"type":"${TOKEN}"}`,
      TOKEN,
    ];
    for (const line of carriers) {
      const c = await f.raw(reg.port);
      await c.write(line + "\n");
      await c.waitFor((m) => m.type === "error", 5_000, `refusal of ${line.slice(0, 40)}`);
    }
    await waitUntil(() => log.named("error").length >= 5 + carriers.length, 5_000, "every refusal reported");
    const leaked = [...log.events, ...nodeLog.events].filter((e) => JSON.stringify(e).includes(TOKEN));
    expect(leaked).toEqual([]);
    expect(log.named("error").every((e) => typeof e.code === "string" && typeof e.message === "string")).toBe(true);
  });

  test("with a token, refusals quote nothing of a client's line, and the registry's own words stay whole even when they contain the token", async () => {
    const { reg } = await f.registry({ token: "t" });
    const answer = async (line: string) => {
      const c = await f.raw(reg.port);
      await c.write(line + "\n");
      return c.waitFor("error", 5_000, `the refusal of ${line}`);
    };
    expect(await answer('{"type":"register","v":1,"id":"n","port":1}')).toMatchObject({ code: "unauthorized", message: "this registry requires a token" });
    expect(await answer('{"type":"register","v":1,"id":"n","port":"7t"}')).toMatchObject({ code: "bad-message", message: "port: Invalid type: Expected number" });
    expect(await answer('{"type":"register","token":tt}')).toMatchObject({ code: "bad-json", message: "invalid JSON: JSON Parse error: Unexpected identifier" });
  });

  test("processes: REGISTRY_TOKEN from the environment on both sides; a wrong --token exits 1 with unauthorized; no output shows the token", async () => {
    const registryProc = await spawnRegistry([], { REGISTRY_TOKEN: TOKEN });
    f.defer(() => registryProc[Symbol.asyncDispose]());
    const good = await spawnNode(registryProc.port, [], { REGISTRY_TOKEN: TOKEN });
    f.defer(() => good[Symbol.asyncDispose]());
    await registryProc.log.waitForWhere("node-registered", (e) => e.id === good.id, 10_000);

    const bad = spawnScript("client.ts", ["127.0.0.1", String(registryProc.port), "--json", "--token", "not-the-token"]);
    f.defer(() => bad[Symbol.asyncDispose]());
    expect(await withDeadline(bad.exited(), 15_000, "node with a wrong token to exit")).toBe(1);
    expect(bad.log.named("error").map((e) => e.code)).toContain("unauthorized");
    expect(bad.stderr.join("\n")).toContain("unauthorized");
    await registryProc.log.waitForWhere("error", (e) => e.code === "unauthorized", 5_000);

    const outputs = (p: Proc) => [...p.log.events.map((e) => JSON.stringify(e)), ...p.stderr];
    expect([...outputs(registryProc), ...outputs(good), ...outputs(bad)].filter((l) => l.includes(TOKEN))).toEqual([]);
  }, 30_000);
});

describe("advertised addresses", () => {
  test("advertising another host is refused by default with address-not-allowed; --allow-advertise accepts it; 0.0.0.0 never", async () => {
    const strict = await f.registry({});
    const e = await f.node(strict.reg.port, { listenHost: "127.0.0.5", advertise: "127.0.0.5" }).catch((e: unknown) => e);
    expect(e).toBeInstanceOf(RegistrationError);
    expect((e as RegistrationError).code).toBe("address-not-allowed");
    expect((e as Error).message).toContain("127.0.0.5");
    expect((e as Error).message).toContain("--allow-advertise");
    // Naming the host it really connects from is no spoof.
    const honest = await f.node(strict.reg.port, { advertise: "127.0.0.1" });
    expect(strict.reg.nodes().map((n) => n.host)).toEqual(["127.0.0.1"]);
    expect(honest.registered).toBe(true);

    const open = await f.registry({ allowAdvertise: true });
    const moved = await f.node(open.reg.port, { listenHost: "127.0.0.5", advertise: "127.0.0.5" });
    const listed = open.reg.nodes().find((n) => n.id === moved.id);
    expect(listed).toMatchObject({ host: "127.0.0.5", source: "127.0.0.1" });
    const unspecified = await f.node(open.reg.port, { listenHost: "127.0.0.6", advertise: "0.0.0.0" }).catch((e: unknown) => e);
    expect((unspecified as RegistrationError).code).toBe("address-not-allowed");
  });
});

describe("a node's greeting listener", () => {
  test("line size, open connections and connection lifetime are bounded; a real greeting still gets through", async () => {
    const { reg } = await f.registry({});
    const targetLog = new EventLog<NodeEvent>();
    // Lifetime 2 s: long enough that the first idle connection is still open when the third arrives on a busy machine.
    const target = await f.node(reg.port, { maxLineBytes: 256, maxInboundConns: 2, inboundTimeoutMs: 2_000, onEvent: targetLog.push });

    const long = await f.raw(target.port);
    await long.write("h".repeat(300));
    expect((await long.waitFor((m) => m.type === "error", 5_000, "line-too-long")).code).toBe("line-too-long");
    await long.waitClosed(5_000);

    const idle = [await f.raw(target.port), await f.raw(target.port)];
    const third = await f.raw(target.port);
    const err = await third.waitFor((m) => m.type === "error", 5_000, "too-many-connections");
    expect(err.code).toBe("too-many-connections");
    expect(err.message).toBe("node holds its maximum of 2 connections");
    // Held connections, however quiet or slow, are cut at the lifetime bound.
    void (async () => {
      while (!idle[1]!.closed) {
        await idle[1]!.write(" ");
        await Bun.sleep(20); // the slow writer's pace, not a wait for anything
      }
    })();
    for (const c of idle) await c.waitClosed(10_000, "the inbound lifetime bound to close a held connection");

    const greeterLog = new EventLog<NodeEvent>();
    const greeter = await f.node(reg.port, { onEvent: greeterLog.push });
    await greeterLog.waitForWhere("greeted", (e) => e.peer === target.id, 10_000, "greeting of the bounded node");
    await targetLog.waitForWhere("greeting", (e) => e.peer === greeter.id, 10_000);
  });
});

describe("a hostile registry", () => {
  test("garbage, wrong types, deep nesting, absurd numbers and an oversize line: the node reports each, reconnects, and registers when sense arrives", async () => {
    const refusing = freePort();
    const script: ((s: RawClient) => void)[] = [
      // 1: garbage of every kind, then a line past the node's reply limit (the node must hang up).
      (s) => {
        s.write(Uint8Array.from([0, 255, 254, 10]));
        s.write("not json\n");
        s.write('{"type":"registered","v":"1"}\n');
        s.write('{"type":"joined","seq":-1,"peer":{}}\n');
        s.write(`${"[".repeat(60_000)}\n`); // deep, yet under the reply limit: it reaches the parser
        s.write('{"type":"error","code":"no-such-code","message":"?"}\n');
        s.write(`{"type":"pong","x":1e999999}\n`);
        s.write("z".repeat(70_000));
      },
      // 2: a valid reply with absurd timers and a peer nobody listens at, then a sequence gap.
      (s) => {
        s.write(
          JSON.stringify({
            type: "registered",
            v: 1,
            boot: "hostile",
            seq: 5,
            heartbeat: 1e300,
            timeout: 1e300,
            self: { id: "me", host: "127.0.0.1", port: 1 },
            peers: [{ id: "ghost", host: "127.0.0.1", port: refusing }],
          }) + "\n",
        );
        s.write(JSON.stringify({ type: "joined", seq: 9, peer: { id: "gap", host: "127.0.0.1", port: refusing } }) + "\n");
      },
    ];
    const { port, conns, received } = await fakeRegistry(script);
    const log = new EventLog();
    const node = await startNode({
      registryHost: "127.0.0.1",
      registryPort: port,
      listenHost: "127.0.0.1",
      maxReplyBytes: 64 * 1024,
      // Far past the test's deadline: the first session must end because of the oversize line, not this.
      registerTimeoutMs: 60_000,
      reconnectBaseMs: 20,
      reconnectMaxMs: 100,
      greetRetries: 0,
      waitForRegistration: false,
      onEvent: log.push,
    });
    f.defer(() => node.stop());
    await log.waitFor("registered", 15_000, "registration on the second connection");
    const codes = log.named("error").map((e) => e.code);
    expect(codes).toContain("bad-json");
    expect(codes).toContain("bad-message");
    expect(String(log.named("disconnected")[0]?.reason)).toContain("line-too-long");
    expect(conns()).toBeGreaterThanOrEqual(2);
    await log.waitForWhere("greet-failed", (e) => e.peer === "ghost", 10_000);
    await log.waitFor("resync", 5_000);
    await waitUntil(() => received().some((m) => m.type === "sync"), 5_000, "the node to ask for a snapshot");
    // Timers beyond what setInterval can hold must not turn into a 1 ms ping loop.
    const pingsBefore = received().filter((m) => m.type === "ping").length;
    await Bun.sleep(200); // a window to count in; the expectation is that nothing happens in it
    expect(received().filter((m) => m.type === "ping").length - pingsBefore).toBeLessThan(5);
    expect(node.registered).toBe(true);
  });

  test("a registry that never answers: the node gives up on that session, says why, and dials again", async () => {
    const { port, conns } = await fakeRegistry([() => {}, () => {}]);
    const log = new EventLog();
    const node = await startNode({
      registryHost: "127.0.0.1",
      registryPort: port,
      listenHost: "127.0.0.1",
      registerTimeoutMs: 200,
      reconnectBaseMs: 20,
      reconnectMaxMs: 100,
      waitForRegistration: false,
      onEvent: log.push,
    });
    f.defer(() => node.stop());
    const d = await log.waitFor("disconnected", 10_000, "the node to give up on a silent registry");
    expect(d.reason).toContain("no answer to register");
    await waitUntil(() => conns() >= 2, 10_000, "a second connection");
  });

  test("a refusal that retrying cannot fix ends the node with that code", async () => {
    // Like the real registry, it closes after refusing.
    const { port } = await fakeRegistry([
      (s) => {
        void s.write('{"type":"error","code":"unauthorized","message":"go away"}\n');
        s.end();
      },
    ]);
    const e = await startNode({ registryHost: "127.0.0.1", registryPort: port, listenHost: "127.0.0.1" }).catch((e: unknown) => e);
    expect(e).toBeInstanceOf(RegistrationError);
    expect((e as RegistrationError).code).toBe("unauthorized");
  });
});

// --- internal ----------------------------------------------------------------


/** `n` raw sessions with long ids and names registered (probe off), kept open until the test ends. */
async function registerFillers(reg: Registry, n: number): Promise<void> {
  for (let i = 0; i < n; i++) {
    const c = await f.raw(reg.port);
    await c.send({ type: "register", v: 1, id: `filler-${i}-`.padEnd(64, "f"), port: 20_000 + i, name: "n".repeat(64) });
  }
  await waitUntil(() => reg.stats().nodes >= n, 20_000, `${n} fillers registered`);
}



/** A registry impostor: connection n runs script[n] on its register (the last one repeats); keeps what nodes send. */
async function fakeRegistry(script: ((s: RawClient) => void)[]): Promise<{ port: number; conns(): number; received(): WireMessage[] }> {
  const server = await RawClient.serve((s) => {
    const n = server.connections.length - 1;
    void s.waitFor("register", 60_000).then(() => script[Math.min(n, script.length - 1)]!(s), () => {});
  });
  f.defer(() => server[Symbol.asyncDispose]());
  return { port: server.port, conns: () => server.connections.length, received: () => server.connections.flatMap((c) => c.messages) };
}
