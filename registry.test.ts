/**
 * The registry and a node's listener, in process, on 127.0.0.1 and port 0:
 * membership (replies, pushes, departures), hostile and malformed input, TCP
 * framing over real sockets, the dial-back probe, and a large reply to a
 * client that does not read (partial writes and the drain queue). Raw sockets
 * speak NDJSON byte for byte where the exact wire matters.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { startNode, type PeerNode, type NodeEvent } from "./client.ts";
import { PROTOCOL_VERSION } from "./protocol.ts";
import { startRegistry, type Registry, type RegistryEvent } from "./registry.ts";
import { EventLog, RawClient, freePort, waitUntil, watchedTransport, type WireMessage } from "./harness.ts";

const LOCAL = { host: "127.0.0.1", port: 0 } as const;

describe("membership", () => {
  test("the list starts empty; a registered node appears in nodes() at its source address", async () => {
    await using reg = await startRegistry({ ...LOCAL, probe: false });
    expect(reg.nodes()).toEqual([]);
    expect(reg.stats().nodes).toBe(0);

    await using a = await RawClient.connect(reg.port);
    const reply = await a.register("node-a", 40001, { name: "alice" });
    expect(reply.peers).toEqual([]);
    expect(reply.self).toEqual({ id: "node-a", host: "127.0.0.1", port: 40001, name: "alice" });
    expect(reply.v).toBe(PROTOCOL_VERSION);
    expect(reply.boot).toBe(reg.boot);
    const listed = reg.nodes();
    expect(listed.map(({ id, host, port, name, source }) => ({ id, host, port, name, source }))).toEqual([
      { id: "node-a", host: "127.0.0.1", port: 40001, name: "alice", source: "127.0.0.1" },
    ]);
  });

  test("the register reply lists every other node and never the node itself", async () => {
    await using reg = await startRegistry({ ...LOCAL, probe: false });
    await using clients = new ClientSet();
    const ids = ["n1", "n2", "n3", "n4"];
    for (const [i, id] of ids.entries()) {
      const c = await clients.connect(reg.port);
      const reply = await c.register(id, 41000 + i);
      const peers = reply.peers as { id: string; host: string; port: number }[];
      expect(peers.map((p) => p.id).sort()).toEqual(ids.slice(0, i).sort());
      expect(peers.every((p) => p.host === "127.0.0.1")).toBe(true);
      expect(peers.map((p) => p.port).sort()).toEqual(ids.slice(0, i).map((_, j) => 41000 + j).sort());
    }
    expect(reg.nodes().map((n) => n.id).sort()).toEqual(ids);
  });

  test("earlier nodes get a `joined` push for each later node, seq rising by one", async () => {
    await using reg = await startRegistry({ ...LOCAL, probe: false });
    await using clients = new ClientSet();
    const a = await clients.connect(reg.port);
    const first = await a.register("a", 42001);
    const b = await clients.connect(reg.port);
    const second = await b.register("b", 42002);
    const c = await clients.connect(reg.port);
    const third = await c.register("c", 42003);
    expect([second.seq, third.seq]).toEqual([Number(first.seq) + 1, Number(first.seq) + 2]);

    const joinB = await a.waitFor((m) => m.type === "joined" && peerId(m) === "b", 5_000, "a told of b");
    const joinC = await a.waitFor((m) => m.type === "joined" && peerId(m) === "c", 5_000, "a told of c");
    const joinCatB = await b.waitFor((m) => m.type === "joined" && peerId(m) === "c", 5_000, "b told of c");
    expect(joinB.seq).toBe(second.seq);
    expect(joinC.seq).toBe(third.seq);
    expect(joinCatB.seq).toBe(third.seq);
    expect(joinC.peer).toEqual({ id: "c", host: "127.0.0.1", port: 42003 });
    // Pushes a node must apply are exactly those after its reply's seq, in order, without gaps.
    const applied = a.messages.filter((m) => m.type === "joined" && Number(m.seq) > Number(first.seq)).map((m) => m.seq);
    expect(applied).toEqual([second.seq, third.seq]);
  });

  test("a node whose session closes is removed at once; others get `left` (closed); a later node is not given it", async () => {
    const log = new EventLog<RegistryEvent>();
    await using reg = await startRegistry({ ...LOCAL, probe: false, onEvent: log.push });
    await using clients = new ClientSet();
    const a = await clients.connect(reg.port);
    await a.register("a", 43001);
    const b = await clients.connect(reg.port);
    await b.register("b", 43002);
    const c = await clients.connect(reg.port);
    await c.register("c", 43003);

    b.destroy(); // a reset, as when the process dies
    const leftAtA = await a.waitFor((m) => m.type === "left" && m.id === "b", 5_000, "a told b left");
    expect(leftAtA.reason).toBe("closed");
    // By the time anyone is told, the list no longer has it.
    expect(reg.nodes().map((n) => n.id).sort()).toEqual(["a", "c"]);
    const leftAtC = await c.waitFor((m) => m.type === "left" && m.id === "b", 5_000, "c told b left");
    expect(leftAtC.seq).toBe(leftAtA.seq);
    expect(await log.waitForWhere("node-left", (e) => e.id === "b")).toMatchObject({ reason: "closed", nodes: 2 });

    const d = await clients.connect(reg.port);
    const reply = await d.register("d", 43004);
    const peers = reply.peers as { id: string; port: number }[];
    expect(peers.map((p) => p.id).sort()).toEqual(["a", "c"]);
    expect(peers.some((p) => p.port === 43002)).toBe(false);
  });

  test("`leave` removes the node with reason leave and the registry closes the session", async () => {
    await using reg = await startRegistry({ ...LOCAL, probe: false });
    await using clients = new ClientSet();
    const a = await clients.connect(reg.port);
    await a.register("a", 44001);
    const b = await clients.connect(reg.port);
    await b.register("b", 44002);
    b.send({ type: "leave" });
    const left = await a.waitFor((m) => m.type === "left" && m.id === "b", 5_000, "a told b left");
    expect(left.reason).toBe("leave");
    await b.waitClosed(5_000);
    expect(reg.nodes().map((n) => n.id)).toEqual(["a"]);
    expect(reg.stats().leaves.leave).toBe(1);
    expect(reg.stats().leaves.closed).toBe(0);
  });

  test("real nodes: each one's view holds the others and never itself; a killed node leaves everyone's view", async () => {
    await using reg = await startRegistry({ ...LOCAL });
    const logs = [new EventLog(), new EventLog(), new EventLog()];
    const nodes: PeerNode[] = [];
    try {
      for (const log of logs) nodes.push(await startNode({ registryHost: "127.0.0.1", registryPort: reg.port, onEvent: log.push }));
      const ids = nodes.map((n) => n.id);
      await waitUntil(() => nodes.every((n) => n.peers().length === 2), 10_000, "every node to see two peers");
      for (const n of nodes) {
        expect(n.peers().map((p) => p.id).sort()).toEqual(ids.filter((id) => id !== n.id).sort());
      }
      expect(reg.nodes().map((n) => n.id).sort()).toEqual([...ids].sort());

      nodes[1]!.kill(); // no `leave`: the session just closes
      for (const i of [0, 2]) {
        const e = await logs[i]!.waitForWhere("peer-left", (e) => e.peer === ids[1], 10_000, `node ${i} told of the kill`);
        expect(e.reason).toBe("closed");
        expect(nodes[i]!.peers().map((p) => p.id)).not.toContain(ids[1]!);
      }
      expect(reg.nodes().map((n) => n.id)).not.toContain(ids[1]!);
    } finally {
      await Promise.allSettled(nodes.map((n) => n.stop()));
    }
  });
});

describe("bad input to the registry", () => {
  let reg: Registry;
  const regLog = new EventLog<RegistryEvent>();
  beforeAll(async () => {
    reg = await startRegistry({ ...LOCAL, onEvent: regLog.push });
  });
  afterAll(() => reg?.stop());

  const garbage = Uint8Array.from([0x00, 0xff, 0xfe, 0x80, 0xc3, 0x28, 0x01, 0x7f, 0x1b, 0x5b, 0xe2, 0x82, 0x0d, 0x0a]);
  const cases: [string, string | Uint8Array, string, string][] = [
    ["invalid JSON", "this is not json\n", "bad-json", "invalid JSON"],
    ["wrong types", '{"type":"register","v":1,"id":"x","port":"8080"}\n', "bad-message", 'port: Invalid type: Expected number but received "8080"'],
    ["a field out of range", '{"type":"register","v":1,"id":"x","port":70000}\n', "bad-message", "port: Invalid value: Expected <=65535 but received 70000"],
    ["a missing field", '{"type":"register","v":1,"port":1}\n', "bad-message", "id: "],
    ["unknown type", '{"type":"frobnicate"}\n', "bad-message", "type: "],
    // The schema looks for `type` first, so an array is told its type is missing.
    ["JSON that is not an object", "[1,2,3]\n", "bad-message", 'type: Invalid type: Expected ("register" | "ping" | "leave" | "sync" | "receipt" | "list") but received undefined'],
    ["binary garbage", garbage, "bad-json", "invalid JSON"],
    ["an oversize line, never finished", "x".repeat(17 * 1024), "line-too-long", "16384"],
    ["an oversize register", JSON.stringify({ type: "register", v: 1, id: "x", port: 1, name: "n".repeat(20_000) }) + "\n", "line-too-long", "line exceeds 16384 bytes"],
    ["register with an unsupported version", '{"type":"register","v":2,"id":"x","port":1}\n', "unsupported-version", "version 2"],
    ["ping before register", '{"type":"ping"}\n', "unexpected-message", "ping before register"],
    ["sync before register", '{"type":"sync"}\n', "unexpected-message", "sync before register"],
  ];

  test.each(cases)("%s -> error, connection closed, and a good node registers right after", async (_label, bytes, code, text) => {
    const before = reg.stats().rejected[code as keyof ReturnType<Registry["stats"]>["rejected"]] ?? 0;
    {
      await using bad = await RawClient.connect(reg.port);
      bad.write(bytes);
      const err = await bad.waitFor("error", 5_000, `error ${code}`);
      expect(err.code).toBe(code);
      expect(typeof err.message).toBe("string");
      expect(String(err.message)).toContain(text);
      await bad.waitClosed(5_000);
      // Exactly one error, nothing else.
      expect(bad.messages.map((m) => m.type)).toEqual(["error"]);
    }
    expect(reg.stats().rejected[code as keyof ReturnType<Registry["stats"]>["rejected"]]).toBe(before + 1);
    // The operator sees every refusal in the registry's own events, overflows included.
    expect(regLog.named("error").filter((e) => e.code === code).length).toBe(before + 1);
    const log = new EventLog<NodeEvent>();
    await using good = await startNode({ registryHost: "127.0.0.1", registryPort: reg.port, onEvent: log.push });
    expect(good.registered).toBe(true);
    expect(reg.nodes().map((n) => n.id)).toContain(good.id);
  });

  test("a connection that never registers is told registration-timeout and closed", async () => {
    await using r = await startRegistry({ ...LOCAL, registerTimeoutMs: 200 });
    await using idle = await RawClient.connect(r.port);
    const err = await idle.waitFor("error", 5_000, "registration-timeout");
    expect(err.code).toBe("registration-timeout");
    await idle.waitClosed(5_000);
    await using good = await startNode({ registryHost: "127.0.0.1", registryPort: r.port });
    expect(r.nodes().map((n) => n.id)).toEqual([good.id]);
  });

  test("a registered session that sends bad lines gets errors but stays registered", async () => {
    await using r = await startRegistry({ ...LOCAL, probe: false });
    await using clients = new ClientSet();
    const a = await clients.connect(r.port);
    await a.register("a", 45001);
    const sent: [string, string][] = [
      ["garbage\n", "bad-json"],
      ['{"type":"receipt","ids":"not-a-list"}\n', "bad-message"],
      ['{"type":"frobnicate"}\n', "bad-message"],
      [JSON.stringify({ type: "register", v: 1, id: "a", port: 45001 }) + "\n", "unexpected-message"],
    ];
    for (const [line, code] of sent) {
      const errorsBefore = a.messages.filter((m) => m.type === "error").length;
      a.write(line);
      const errors = await waitForCount(a, (m) => m.type === "error", errorsBefore + 1);
      expect(errors.at(-1)!.code).toBe(code);
    }
    expect(a.closed).toBe(false);
    expect(r.nodes().map((n) => n.id)).toEqual(["a"]);
    a.send({ type: "ping" });
    await a.waitFor("pong", 5_000);
    // Still a member: told of a later node.
    const b = await clients.connect(r.port);
    await b.register("b", 45002);
    await a.waitFor((m) => m.type === "joined" && peerId(m) === "b", 5_000, "a told of b");
  });
});

describe("bad input to a node's listener", () => {
  let reg: Registry;
  let target: PeerNode;
  const targetLog = new EventLog<NodeEvent>();
  beforeAll(async () => {
    reg = await startRegistry({ ...LOCAL });
    target = await startNode({ registryHost: "127.0.0.1", registryPort: reg.port, onEvent: targetLog.push });
  });
  afterAll(async () => {
    await target?.stop();
    await reg?.stop();
  });

  const hello = { type: "hello", v: 1, id: "intruder", host: "127.0.0.1", port: 9 };
  const cases: [string, string | Uint8Array, string, string][] = [
    ["invalid JSON", "GET / HTTP/1.1\r\n\r\n", "bad-json", "invalid JSON"],
    ["binary garbage", Uint8Array.from([0xde, 0xad, 0xbe, 0xef, 0x00, 0xff, 0x0a]), "bad-json", "invalid JSON"],
    ["wrong types", JSON.stringify({ ...hello, port: "9" }) + "\n", "bad-message", "port: "],
    ["unknown type", JSON.stringify({ type: "register", v: 1, id: "x", port: 1 }) + "\n", "bad-message", "type: "],
    ["an oversize line", "y".repeat(20_000), "line-too-long", "line exceeds 16384 bytes"],
    ["an unsupported version", JSON.stringify({ ...hello, v: 99 }) + "\n", "unsupported-version", "99"],
    ["a probe for another node", JSON.stringify({ type: "probe", v: 1, id: "someone-else", nonce: "n1" }) + "\n", "wrong-node", "someone-else"],
  ];

  test.each(cases)("%s -> error and close; a real node still greets it afterwards", async (_label, bytes, code, text) => {
    {
      await using bad = await RawClient.connect(target.port);
      bad.write(bytes);
      const err = await bad.waitFor("error", 5_000, `error ${code}`);
      expect(err.code).toBe(code);
      expect(String(err.message)).toContain(text);
      await bad.waitClosed(5_000);
    }
    const log = new EventLog<NodeEvent>();
    await using later = await startNode({ registryHost: "127.0.0.1", registryPort: reg.port, onEvent: log.push });
    await log.waitForWhere("greeted", (e) => e.peer === target.id, 10_000, "the later node's greeting acknowledged");
    await targetLog.waitForWhere("greeting", (e) => e.peer === later.id, 10_000, "the target to log the greeting");
    // The intruder's lines were never taken for greetings.
    expect(targetLog.named("greeting").some((e) => e.peer === "intruder")).toBe(false);
  });

  test("a hello from an id the registry does not list is welcomed, but not reported as a greeting", async () => {
    for (let i = 0; i < 2; i++) {
      await using c = await RawClient.connect(target.port);
      c.send({ type: "hello", v: 1, id: "raw-greeter", host: "127.0.0.1", port: 9, name: "raw" });
      const w = await c.waitFor("welcome", 5_000);
      expect(w).toEqual({ type: "welcome", v: 1, id: target.id });
      await c.waitClosed(5_000);
    }
    // A listed node's greeting after it is reported, so the unlisted one's absence is not a matter of time.
    const log = new EventLog<NodeEvent>();
    await using later = await startNode({ registryHost: "127.0.0.1", registryPort: reg.port, onEvent: log.push });
    await targetLog.waitForWhere("greeting", (e) => e.peer === later.id, 10_000, "the listed node's greeting");
    expect(targetLog.named("greeting").filter((e) => e.peer === "raw-greeter")).toEqual([]);
  });
});

describe("framing over real sockets", () => {
  test("a register written one byte per loop turn, with a multi-byte name, is read whole", async () => {
    const chunkSizes: number[] = [];
    const watched = watchedTransport((chunk) => chunkSizes.push(chunk.byteLength));
    await using reg = await startRegistry({ ...LOCAL, probe: false, transport: watched.transport });
    await using c = await RawClient.connect(reg.port);
    const name = "Zoë 🙂 東京";
    await c.writeSlowly(JSON.stringify({ type: "register", v: 1, id: "slowpoke", port: 46001, name }) + "\n");
    const reply = await c.waitFor("registered", 5_000);
    expect(reply.self).toEqual({ id: "slowpoke", host: "127.0.0.1", port: 46001, name });
    // The registry really got the line in pieces, not as one read.
    expect(chunkSizes.length).toBeGreaterThan(1);
    expect(reg.nodes()[0]?.name).toBe(name);
  });

  test("several messages in one write are each answered, in order", async () => {
    await using reg = await startRegistry({ ...LOCAL, probe: false });
    await using c = await RawClient.connect(reg.port);
    c.write(
      JSON.stringify({ type: "register", v: 1, id: "burst", port: 46002 }) + "\n" + '{"type":"ping"}\r\n\n{"type":"sync"}\n{"type":"ping"}\n',
    );
    await waitForCount(c, (m) => m.type === "pong", 2);
    await c.waitFor("snapshot", 5_000);
    const types = c.messages.map((m) => m.type).filter((t) => t !== "joined");
    expect(types).toEqual(["registered", "pong", "snapshot", "pong"]);
    const snap = c.messages.find((m) => m.type === "snapshot")!;
    expect((snap.peers as { id: string }[]).map((p) => p.id)).toEqual(["burst"]);
  });

  test("pushes of several joins arrive in one stream and all parse, consecutive seq", async () => {
    await using reg = await startRegistry({ ...LOCAL, probe: false });
    await using clients = new ClientSet();
    const watcher = await clients.connect(reg.port);
    const base = Number((await watcher.register("watcher", 47000)).seq);
    const joiners = await Promise.all(Array.from({ length: 20 }, () => clients.connect(reg.port)));
    joiners.forEach((j, i) => j.send({ type: "register", v: 1, id: `j${i}`, port: 47001 + i }));
    const joins = await waitForCount(watcher, (m) => m.type === "joined" && Number(m.seq) > base, 20);
    expect(joins.map((m) => m.seq)).toEqual(Array.from({ length: 20 }, (_, i) => base + 1 + i));
    expect(new Set(joins.map(peerId)).size).toBe(20);
  });
});

describe("the probe", () => {
  test("a register naming a port where nothing listens is refused as unreachable, naming the address", async () => {
    const port = freePort();
    const log = new EventLog<RegistryEvent>();
    await using reg = await startRegistry({ ...LOCAL, onEvent: log.push });
    await using c = await RawClient.connect(reg.port);
    c.send({ type: "register", v: 1, id: "ghost", port });
    const err = await c.waitFor("error", 10_000, "unreachable");
    expect(err.code).toBe("unreachable");
    expect(String(err.message)).toContain(`127.0.0.1:${port}`);
    await c.waitClosed(5_000);
    expect(reg.nodes()).toEqual([]);
    expect(log.named("node-registered")).toEqual([]);
  });

  test("a listener that accepts but never answers is refused once the probe times out", async () => {
    using silent = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
    await using reg = await startRegistry({ ...LOCAL, probeTimeoutMs: 300 });
    await using c = await RawClient.connect(reg.port);
    c.send({ type: "register", v: 1, id: "mute", port: silent.port });
    // Silence is not final: the node may be starved, a packet lost. It retries.
    const err = await c.waitFor("error", 10_000, "unavailable");
    expect(err.code).toBe("unavailable");
    expect(String(err.message)).toContain(`127.0.0.1:${silent.port}`);
    expect(reg.nodes()).toEqual([]);
  });

  test("with probe: false the same register is accepted", async () => {
    const port = freePort();
    await using reg = await startRegistry({ ...LOCAL, probe: false });
    await using c = await RawClient.connect(reg.port);
    const reply = await c.register("ghost", port);
    expect(reply.self).toMatchObject({ id: "ghost", port });
    expect(reg.nodes().map((n) => n.port)).toEqual([port]);
  });
});

describe("partial writes", () => {
  // Bun's write() drops what the kernel does not take, so this is where a
  // missing or broken drain queue shows: a long reply and many megabytes of
  // snapshots to a client that stops reading, then reads it all.
  test("a ~500 KB reply, then snapshots until the registry must queue, reach a client that paused, intact and in order", async () => {
    const BULK = 3_000;
    // ~540 KB each: 50 of them stay under the 32 MiB slow-consumer cap, far over any default kernel buffering.
    const MAX_SYNCS = 50;
    const watched = watchedTransport();
    // Syncs without a rate limit: this test asks for snapshot after snapshot on purpose.
    await using reg = await startRegistry({ ...LOCAL, probe: false, maxConnsPerAddress: 10_000, rateSessionSyncs: 0, transport: watched.transport });
    await using bulk = new ClientSet();
    const name = "n".repeat(64);
    const idOf = (i: number) => `bulk-${String(i).padStart(5, "0")}-`.padEnd(64, "x");
    // In waves, so the listen backlog is never the limit; bulk clients keep reading so the registry never has to drop them.
    for (let w = 0; w < BULK; w += 250) {
      const wave = await Promise.all(Array.from({ length: Math.min(250, BULK - w) }, () => bulk.connect(reg.port, false)));
      wave.forEach((c, j) => c.send({ type: "register", v: 1, id: idOf(w + j), port: 10_000 + w + j, name }));
      await waitUntil(() => reg.stats().nodes === w + wave.length, 30_000, `${w + wave.length} bulk nodes registered`);
    }

    await using slow = await RawClient.connect(reg.port);
    slow.pause();
    const registryEnd = await watched.of(slow);
    // A line is answered while its bytes are being read: once the registry has read them all, the answer is written or queued.
    let sent = 0;
    const send = async (msg: object) => {
      const line = JSON.stringify(msg) + "\n";
      slow.write(line);
      sent += Buffer.byteLength(line);
      await waitUntil(() => registryEnd.read >= sent, 10_000, `the registry to read ${JSON.stringify(msg)}`);
    };
    await send({ type: "register", v: 1, id: "slow-reader", port: 9_999, name });
    await waitUntil(() => reg.nodes().some((n) => n.id === "slow-reader"), 10_000, "the slow reader registered");
    // Kernel buffers differ between machines: ask for more until the registry holds unsent bytes itself.
    let syncs = 0;
    while (!(registryEnd.conn.pendingBytes > 0)) {
      if (syncs === MAX_SYNCS) throw new Error(`the registry never had to queue after ${syncs} snapshots of ~540 KB`);
      await send({ type: "sync" });
      syncs++;
    }
    slow.resume();
    await waitForCount(slow, (m) => m.type === "snapshot", syncs, 30_000);
    // Everything queued reached the client through the drain path.
    expect(registryEnd.conn.pendingBytes).toBe(0);

    const reply = slow.messages.find((m) => m.type === "registered")!;
    expect(slow.messages[0]).toBe(reply);
    const peers = reply.peers as { id: string; port: number; name: string }[];
    expect(peers.length).toBe(BULK);
    expect(JSON.stringify(reply).length).toBeGreaterThan(400_000);
    expect(new Set(peers.map((p) => p.id)).size).toBe(BULK);
    expect(peers.every((p, i) => p.id === idOf(i) && p.port === 10_000 + i && p.name === name)).toBe(true);

    const snapshots = slow.messages.filter((m) => m.type === "snapshot");
    expect(snapshots.length).toBe(syncs);
    expect(slow.messages.filter((m) => m.type === "(not json)")).toEqual([]);
    for (const s of snapshots) {
      const ids = (s.peers as { id: string }[]).map((p) => p.id);
      expect(ids.length).toBe(BULK + 1); // a snapshot includes the asking node
      expect(ids.at(-1)).toBe("slow-reader");
      expect(s.seq).toBe(reply.seq);
    }
    expect(reg.nodes().some((n) => n.id === "slow-reader")).toBe(true);
  }, 90_000);
});

// --- internal ----------------------------------------------------------------

/** Raw clients closed together at scope exit. */
class ClientSet implements AsyncDisposable {
  private readonly all: RawClient[] = [];
  async connect(port: number, collect = true): Promise<RawClient> {
    const c = await RawClient.connect(port, { collect });
    this.all.push(c);
    return c;
  }
  async [Symbol.asyncDispose](): Promise<void> {
    await Promise.allSettled(this.all.map((c) => c[Symbol.asyncDispose]()));
  }
}

function waitForCount(c: RawClient, pred: (m: WireMessage) => boolean, n: number, ms = 10_000): Promise<WireMessage[]> {
  return c.waitForCount(pred, n, ms, `${n} matching messages`);
}

function peerId(m: WireMessage): unknown {
  return (m.peer as { id?: unknown } | undefined)?.id;
}

