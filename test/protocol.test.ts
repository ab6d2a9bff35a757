/**
 * The wire format without sockets: NDJSON framing under every way TCP can cut
 * a stream, the schemas (each accepts its documented example, rejects bad
 * input with a code and a field path), and the address parsers.
 */
import { describe, expect, test } from "bun:test";
import { join } from "node:path";
import type * as v from "valibot";
import {
  ErrorMessage,
  FromListener,
  FromRegistry,
  Hello,
  Joined,
  Leave,
  Left,
  LineSplitter,
  List,
  PING_LINE,
  PONG_LINE,
  Ping,
  Pong,
  Probe,
  ProbeOk,
  Receipt,
  Register,
  Registered,
  Snapshot,
  Sync,
  ToListener,
  ToRegistry,
  Welcome,
  decode,
  encode,
  type ErrorCode,
  type Message,
} from "../protocol.ts";
import { normalizeHost, parseHostPort, parsePort } from "../net.ts";
import { settingsFrom } from "../cli.ts";
import { ROOT } from "../harness.ts";

const utf8 = new TextEncoder();

/** Every message type of the protocol, from the schemas themselves. */
const ALL_TYPES = new Set(
  [ToRegistry, FromRegistry, ToListener, FromListener].flatMap((u) => u.options.map((o) => o.entries.type.literal as string)),
);

/** Documented examples (docs/PROTOCOL.md), as values; the tables below reuse them. */
const examples = {
  register: {
    type: "register",
    v: 1,
    id: "9f86d081884c7d65",
    port: 40000,
    host: "192.0.2.10",
    name: "alice",
    token: "s3cret",
  } satisfies Message,
  registered: {
    type: "registered",
    v: 1,
    boot: "5f3e9a1c0b7d2e44",
    seq: 2,
    heartbeat: 2000,
    timeout: 6000,
    self: { id: "9f86d081884c7d65", host: "192.0.2.10", port: 40000, name: "alice" },
    peers: [{ id: "2c26b46b68ffc68f", host: "192.0.2.7", port: 40001 }],
  } satisfies Message,
  hello: { type: "hello", v: 1, id: "9f86d081884c7d65", host: "192.0.2.10", port: 40000, name: "alice" } satisfies Message,
};

describe("LineSplitter", () => {
  test("one byte at a time yields the same lines as one chunk", () => {
    const text = '{"type":"ping"}\n{"type":"register","v":1,"id":"a","port":1}\nlast\n';
    const { lines, overflows, push } = splitter(1024);
    for (const b of utf8.encode(text)) expect(push(Uint8Array.of(b))).toBe(true);
    expect(lines).toEqual(['{"type":"ping"}', '{"type":"register","v":1,"id":"a","port":1}', "last"]);
    expect(overflows()).toBe(0);
  });

  test("two lines in one chunk", () => {
    const { lines, push } = splitter(1024);
    push(utf8.encode("first\nsecond\n"));
    expect(lines).toEqual(["first", "second"]);
  });

  test("one line over three chunks, emitted only when whole", () => {
    const { lines, push } = splitter(1024);
    push(utf8.encode('{"type":'));
    push(utf8.encode('"pi'));
    expect(lines).toEqual([]);
    push(utf8.encode('ng"}\n'));
    expect(lines).toEqual(['{"type":"ping"}']);
  });

  test("a partial line waits for the next chunk and the rest of that chunk is kept", () => {
    const { lines, push } = splitter(1024);
    push(utf8.encode("a\nb"));
    expect(lines).toEqual(["a"]);
    push(utf8.encode("c\nd\ne"));
    expect(lines).toEqual(["a", "bc", "d"]);
    push(utf8.encode("\n"));
    expect(lines).toEqual(["a", "bc", "d", "e"]);
  });

  // Every cut position inside each character: a decoder working per chunk would produce U+FFFD.
  const chars = [
    ["é (2 bytes)", "é"],
    ["€ (3 bytes)", "€"],
    ["🙂 (4 bytes)", "🙂"],
  ] as const;
  test.each(chars)("multi-byte UTF-8 %s split inside the character survives", (_label, ch) => {
    const line = `{"name":"caf${ch}${ch}"}`;
    const bytes = utf8.encode(line + "\n");
    const charStart = utf8.encode(`{"name":"caf`).byteLength;
    const charLen = utf8.encode(ch).byteLength;
    for (let cut = charStart + 1; cut < charStart + charLen; cut++) {
      const { lines, push } = splitter(1024);
      push(bytes.subarray(0, cut));
      push(bytes.subarray(cut));
      expect(lines).toEqual([line]);
    }
    // and byte by byte, so every character of the line is cut somewhere
    const { lines, push } = splitter(1024);
    for (const b of bytes) push(Uint8Array.of(b));
    expect(lines).toEqual([line]);
    expect(lines[0]).not.toContain("\uFFFD");
  });

  test("CRLF line endings are tolerated, also with CR and LF in different chunks", () => {
    const { lines, push } = splitter(1024);
    push(utf8.encode("one\r\ntwo\r"));
    push(utf8.encode("\nthree\n"));
    expect(lines).toEqual(["one", "two", "three"]);
  });

  test("empty lines (LF or CRLF alone) are skipped", () => {
    const { lines, push } = splitter(1024);
    push(utf8.encode("\n\n\r\na\n\n"));
    push(utf8.encode("\n"));
    push(utf8.encode("b\n"));
    expect(lines).toEqual(["a", "b"]);
  });

  test("a line of exactly the cap is accepted, one byte more overflows", () => {
    const cap = 16;
    const ok = splitter(cap);
    expect(ok.push(utf8.encode("x".repeat(cap) + "\n"))).toBe(true);
    expect(ok.lines).toEqual(["x".repeat(cap)]);
    expect(ok.overflows()).toBe(0);

    // The CR of a CRLF is part of the line ending, not of the line.
    const crlf = splitter(cap);
    expect(crlf.push(utf8.encode("c".repeat(cap) + "\r\n"))).toBe(true);
    expect(crlf.lines).toEqual(["c".repeat(cap)]);

    const over = splitter(cap);
    expect(over.push(utf8.encode("x".repeat(cap + 1) + "\n"))).toBe(false);
    expect(over.lines).toEqual([]);
    expect(over.overflows()).toBe(1);
  });

  test("a partial line is reported as overflow as soon as it passes the cap, without a newline", () => {
    const cap = 64;
    const { lines, overflows, push } = splitter(cap);
    let fed = 0;
    let result = true;
    // Small chunks and never a newline: a peer that would make us buffer forever.
    while (result && fed < cap * 4) {
      result = push(utf8.encode("yyyy"));
      fed += 4;
    }
    expect(result).toBe(false);
    expect(overflows()).toBe(1);
    // The cap (plus one byte of room for a CR) is where it stops, not somewhere later.
    expect(fed).toBeGreaterThan(cap);
    expect(fed).toBeLessThanOrEqual(cap + 1 + 4);
    expect(lines).toEqual([]);
  });

  test("nothing is emitted after an overflow, in the same chunk or later ones", () => {
    const cap = 8;
    const { lines, overflows, push } = splitter(cap);
    expect(push(utf8.encode("ok\n" + "z".repeat(cap + 5) + "\nafter\n"))).toBe(false);
    expect(lines).toEqual(["ok"]);
    expect(overflows()).toBe(1);
    push(utf8.encode("later\n"));
    push(utf8.encode('{"type":"ping"}\n'));
    expect(lines).toEqual(["ok"]);
    expect(overflows()).toBe(1);
  });
});

describe("LineSplitter hold and release (a registry reads nothing while it checks a registration)", () => {
  /** A splitter whose consumer holds after every line starting with "hold". */
  function holding(cap = 1024) {
    const lines: string[] = [];
    const s: LineSplitter = new LineSplitter(cap, (line) => {
      lines.push(line);
      if (line.startsWith("hold")) s.hold();
    }, () => lines.push("(overflow)"));
    return { lines, s };
  }

  test("lines after a hold wait, in order, and come out on release", () => {
    const { lines, s } = holding();
    s.push(utf8.encode("hold-1\na\nb"));
    expect(lines).toEqual(["hold-1"]);
    expect(s.idle).toBe(false);
    s.push(utf8.encode("c\nd\n"));
    expect(lines).toEqual(["hold-1"]);
    expect(s.release()).toBe(true);
    expect(lines).toEqual(["hold-1", "a", "bc", "d"]);
    expect(s.holding).toBe(false);
    expect(s.idle).toBe(true);
  });

  test("a line read during release may hold again; what follows still waits, in order", () => {
    const { lines, s } = holding();
    s.push(utf8.encode("hold-1\nx\nhold-2\ny\n"));
    s.push(utf8.encode("z\n"));
    s.release();
    expect(lines).toEqual(["hold-1", "x", "hold-2"]);
    expect(s.holding).toBe(true);
    s.release();
    expect(lines).toEqual(["hold-1", "x", "hold-2", "y", "z"]);
  });

  test("the line cap still applies to what was held", () => {
    const { lines, s } = holding(8);
    s.push(utf8.encode("hold\n" + "q".repeat(20) + "\nlater\n"));
    expect(s.release()).toBe(false);
    expect(lines).toEqual(["hold", "(overflow)"]);
  });
});

describe("decode", () => {
  test("an error quoting a long value is clipped: what a client sends does not come back at its size", () => {
    const r = decode(ToRegistry, JSON.stringify({ type: "receipt", ids: "A".repeat(16_000) }));
    expect(r.ok).toBe(false);
    if (!r.ok) {
      expect(r.code).toBe("bad-message");
      expect(r.message.length).toBeLessThanOrEqual(300);
      expect(r.message).toStartWith("ids: Invalid type: Expected Array");
      expect(r.message).toEndWith("…");
    }
  });

  test.each([
    ["not JSON at all", "hello"],
    ["truncated JSON", '{"type":'],
    ["binary garbage", "\u0000\u0001\u00ff\u00fe"],
    ["single quotes", "{'type':'ping'}"],
  ])("%s -> bad-json", (_label, line) => {
    expectRefused(decode(ToRegistry, line), "bad-json", "invalid JSON");
  });

  test.each([
    ["register.port is a string", ToRegistry, { type: "register", v: 1, id: "a", port: "8080" }, "port"],
    ["register.port out of range", ToRegistry, { type: "register", v: 1, id: "a", port: 70000 }, "port"],
    ["register.port not an integer", ToRegistry, { type: "register", v: 1, id: "a", port: 80.5 }, "port"],
    ["register.v missing", ToRegistry, { type: "register", id: "a", port: 1 }, "v"],
    ["register.id with a space", ToRegistry, { type: "register", v: 1, id: "a b", port: 1 }, "id"],
    ["register.id too long", ToRegistry, { type: "register", v: 1, id: "a".repeat(65), port: 1 }, "id"],
    ["register.name too long", ToRegistry, { type: "register", v: 1, id: "a", port: 1, name: "n".repeat(65) }, "name"],
    ["receipt.ids[1] invalid", ToRegistry, { type: "receipt", ids: ["ok", "not ok"] }, "ids.1"],
    ["registered.peers[0].port a string", FromRegistry, { ...examples.registered, peers: [{ id: "b", host: "h", port: "1" }] }, "peers.0.port"],
    ["registered.self.id missing", FromRegistry, { ...examples.registered, self: { host: "h", port: 1 } }, "self.id"],
    ["left.reason unknown", FromRegistry, { type: "left", seq: 1, id: "a", reason: "bored" }, "reason"],
    ["error.code unknown", FromRegistry, { type: "error", code: "nope", message: "x" }, "code"],
    ["hello.host empty", ToListener, { ...examples.hello, host: "" }, "host"],
    ["welcome.id a number", FromListener, { type: "welcome", v: 1, id: 7 }, "id"],
  ] as const)("%s -> bad-message naming %s", (_label, schema, value, path) => {
    expectRefused(decode(schema as v.GenericSchema, JSON.stringify(value)), "bad-message", `${path}: `);
  });

  test.each([
    ["to the registry", ToRegistry, { type: "hello", v: 1, id: "a", host: "h", port: 1 }],
    ["to the registry, made-up type", ToRegistry, { type: "frobnicate" }],
    ["from the registry", FromRegistry, { type: "register", v: 1, id: "a", port: 1 }],
    ["to a listener", ToListener, { type: "register", v: 1, id: "a", port: 1 }],
    ["from a listener", FromListener, { type: "ping" }],
    ["without any type", ToRegistry, { v: 1, id: "a", port: 1 }],
  ] as const)("a type not accepted %s -> bad-message about `type`", (_label, schema, value) => {
    expectRefused(decode(schema as v.GenericSchema, JSON.stringify(value)), "bad-message", "type: ");
  });

  test.each([
    ["null", "null"],
    ["a number", "42"],
    ["a string", '"register"'],
  ])("JSON that is not an object (%s) -> bad-message", (_label, line) => {
    expectRefused(decode(ToRegistry, line), "bad-message");
  });

  test("unknown extra fields are ignored (forward compatibility)", () => {
    const r = decode(ToRegistry, JSON.stringify({ ...examples.register, future: { x: 1 } }));
    expect(r.ok).toBe(true);
    if (r.ok) expect(r.msg).toEqual(examples.register);
  });
});

describe("schemas", () => {
  // [name, message schema, union it travels in, documented example]
  const cases: [string, v.GenericSchema, v.GenericSchema, Message][] = [
    ["register", Register, ToRegistry, examples.register],
    ["register (minimal)", Register, ToRegistry, { type: "register", v: 1, id: "n1", port: 1 }],
    ["ping", Ping, ToRegistry, { type: "ping" }],
    ["leave", Leave, ToRegistry, { type: "leave" }],
    ["sync", Sync, ToRegistry, { type: "sync" }],
    ["receipt", Receipt, ToRegistry, { type: "receipt", ids: ["9f86d081884c7d65", "2c26b46b68ffc68f"] }],
    ["list", List, ToRegistry, { type: "list", v: 1 }],
    ["registered", Registered, FromRegistry, examples.registered],
    ["joined", Joined, FromRegistry, { type: "joined", seq: 5, peer: { id: "2c26b46b68ffc68f", host: "192.0.2.7", port: 40001 } }],
    ["left", Left, FromRegistry, { type: "left", seq: 6, id: "2c26b46b68ffc68f", reason: "closed" }],
    ["snapshot", Snapshot, FromRegistry, { type: "snapshot", boot: "5f3e9a1c0b7d2e44", seq: 6, peers: [] }],
    ["pong", Pong, FromRegistry, { type: "pong" }],
    ["error (from the registry)", ErrorMessage, FromRegistry, { type: "error", code: "line-too-long", message: "line exceeds 16384 bytes" }],
    ["hello", Hello, ToListener, examples.hello],
    ["probe", Probe, ToListener, { type: "probe", v: 1, id: "9f86d081884c7d65", nonce: "a3f1c2d4e5b60789" }],
    ["welcome", Welcome, FromListener, { type: "welcome", v: 1, id: "2c26b46b68ffc68f", name: "bob" }],
    ["probe-ok", ProbeOk, FromListener, { type: "probe-ok", id: "9f86d081884c7d65", nonce: "a3f1c2d4e5b60789" }],
    ["error (from a listener)", ErrorMessage, FromListener, { type: "error", code: "wrong-node", message: "this is node x, not y" }],
  ];

  test.each(cases)("%s: its example is accepted and encode() round-trips through decode()", (_name, schema, union, example) => {
    const line = encode(example);
    expect(line.endsWith("\n")).toBe(true);
    expect(line.indexOf("\n")).toBe(line.length - 1); // one message, one line
    for (const s of [schema, union]) {
      const r = decode(s, line.slice(0, -1));
      expect(r).toEqual({ ok: true, msg: example });
    }
  });

  test("every message type of the unions has an example above", () => {
    const covered = new Set<string>(cases.map(([, , , m]) => m.type));
    expect([...covered].sort()).toEqual([...ALL_TYPES].sort());
  });

  // The page a compatible implementation is written from must not show a message our code rejects.
  test("every JSON example in docs/PROTOCOL.md decodes, and together they cover every message type", async () => {
    const doc = await Bun.file(join(ROOT, "docs/PROTOCOL.md")).text();
    const blocks = Array.from(doc.matchAll(/```json\n([\s\S]*?)```/g), (m) => m[1]!.trim());
    expect(blocks.length).toBeGreaterThanOrEqual(15);
    const types = new Set<string>();
    for (const block of blocks) {
      expect(block).not.toContain("\n"); // "shown on one line, exactly as sent"
      const accepted = [ToRegistry, FromRegistry, ToListener, FromListener].map((u) => decode(u, block)).find((r) => r.ok);
      if (!accepted?.ok) throw new Error(`docs/PROTOCOL.md example rejected by every schema: ${block}`);
      types.add(accepted.msg.type);
    }
    expect([...types].sort()).toEqual([...ALL_TYPES].sort());
  });

  test("the error example in docs/PROTOCOL.md is the message decode() really produces", async () => {
    const doc = await Bun.file(join(ROOT, "docs/PROTOCOL.md")).text();
    const shown = /\{"type":"error","code":"bad-message","message":"(port: [^"]*)"\}/.exec(doc)?.[1];
    expect(shown).toBeDefined();
    const r = decode(ToRegistry, JSON.stringify({ ...examples.register, port: 70000 }));
    expect(r).toEqual({ ok: false, code: "bad-message", message: shown! });
  });

  test("the pre-encoded ping and pong lines are valid messages", () => {
    expect(decode(ToRegistry, PING_LINE)).toEqual({ ok: true, msg: { type: "ping" } });
    expect(PONG_LINE.endsWith("\n")).toBe(true);
    expect(decode(FromRegistry, PONG_LINE.trimEnd())).toEqual({ ok: true, msg: { type: "pong" } });
  });

  test("a non-ASCII name survives encode, byte-wise framing and decode", () => {
    const msg: Message = { ...examples.register, name: "Zoë 🙂 東京" };
    const bytes = utf8.encode(encode(msg));
    const { lines, push } = splitter(1024);
    for (const b of bytes) push(Uint8Array.of(b));
    expect(lines.length).toBe(1);
    expect(decode(ToRegistry, lines[0]!)).toEqual({ ok: true, msg });
  });
});

describe("addresses", () => {
  test.each([
    ["::ffff:1.2.3.4", "1.2.3.4"],
    ["::FFFF:10.0.0.1", "10.0.0.1"],
    ["[::1]", "::1"],
    ["::1", "::1"],
    ["  127.0.0.1 ", "127.0.0.1"],
    ["LocalHost", "localhost"],
    ["[FE80::1]", "fe80::1"],
    ["::ffff:zzz", "::ffff:zzz"], // not an IPv4 tail: left alone
  ])("normalizeHost(%p) = %p", (input, expected) => {
    expect(normalizeHost(input)).toBe(expected);
  });

  test.each([
    ["localhost", { host: "localhost", port: undefined }],
    ["localhost:8080", { host: "localhost", port: 8080 }],
    ["10.1.2.3:1", { host: "10.1.2.3", port: 1 }],
    ["[::1]:8080", { host: "::1", port: 8080 }],
    ["[::1]", { host: "::1", port: undefined }],
    ["::1", { host: "::1", port: undefined }],
    ["fe80::1:2", { host: "fe80::1:2", port: undefined }], // bare IPv6: all of it is the host
    ["[::ffff:1.2.3.4]:9", { host: "1.2.3.4", port: 9 }],
    ["example.org:65535", { host: "example.org", port: 65535 }],
  ])("parseHostPort(%p)", (input, expected) => {
    expect(parseHostPort(input)).toEqual(expected);
  });

  test.each(["host:abc", "host:0", "host:65536", "[::1]:x", "host:-1"])("parseHostPort(%p) throws naming the text", (input) => {
    expect(() => parseHostPort(input)).toThrow(input);
  });

  test.each([
    ["0", true, 0],
    ["0", false, undefined],
    ["1", false, 1],
    ["8080", true, 8080],
    [" 80 ", true, 80],
    ["65535", true, 65535],
    ["65536", true, undefined],
    ["-1", true, undefined],
    ["8e1", true, undefined],
    ["0x50", true, undefined],
    ["", true, undefined],
    ["abc", true, undefined],
    ["123456", true, undefined],
  ] as const)("parsePort(%p, allowZero=%p) = %p", (text, allowZero, expected) => {
    expect(parsePort(text, allowZero)).toBe(expected);
  });
});

describe("settings (flag, then environment variable, then default)", () => {
  const VAR = "CONTACT_REGISTRY_TEST_SETTING";
  function withEnv<T>(value: string | undefined, fn: () => T): T {
    const saved = process.env[VAR];
    if (value === undefined) delete process.env[VAR];
    else process.env[VAR] = value;
    try {
      return fn();
    } finally {
      if (saved === undefined) delete process.env[VAR];
      else process.env[VAR] = saved;
    }
  }

  test.each([
    // flag (citty: true for --x, false for --no-x, absent when not given), env, default, result
    [true, "0", false, true],
    [false, "1", true, false],
    [undefined, "1", false, true],
    [undefined, "0", true, false],
    [undefined, "", true, true],
    [undefined, undefined, true, true],
    [undefined, undefined, false, false],
  ] as const)("switch: flag %p, env %p, default %p -> %p", (flag, envValue, fallback, expected) => {
    const { on } = settingsFrom({ x: flag });
    expect(withEnv(envValue, () => on("x", VAR, fallback))).toBe(expected);
  });

  test("values: the flag wins, an empty variable counts as unset, numbers are checked against their range", () => {
    expect(withEnv("7", () => settingsFrom({ n: "3" }).int("n", VAR))).toBe(3);
    expect(withEnv("7", () => settingsFrom({ n: undefined }).int("n", VAR))).toBe(7);
    expect(withEnv("", () => settingsFrom({ n: "" }).text("n", VAR))).toBeUndefined();
    expect(() => withEnv("0", () => settingsFrom({ n: undefined }).int("n", VAR, 1))).toThrow('--n must be an integer >= 1, got "0"');
    expect(() => settingsFrom({ n: "99" }).int("n", VAR, 1, 10)).toThrow("from 1 to 10");
  });
});

// --- internal ----------------------------------------------------------------

/** A LineSplitter with its output collected. */
function splitter(cap: number) {
  const lines: string[] = [];
  let overflowCount = 0;
  const s = new LineSplitter(cap, (l) => lines.push(l), () => overflowCount++);
  return { lines, overflows: () => overflowCount, push: (chunk: Uint8Array) => s.push(chunk) };
}

/** decode() refused the line with `code`, and its message starts with `prefix` when one is given. */
function expectRefused(r: ReturnType<typeof decode>, code: ErrorCode, prefix?: string): void {
  expect(r.ok).toBe(false);
  if (r.ok) return;
  expect(r.code).toBe(code);
  if (prefix !== undefined) expect(r.message).toStartWith(prefix);
}
