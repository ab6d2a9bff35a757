#!/usr/bin/env bun
/**
 * Seeded, reproducible fuzzing of the two servers a network can reach: the
 * registry and a node's greeting listener. Both run as real processes; this
 * process sends them thousands of random and mutated frames (truncated JSON,
 * huge numbers, deep nesting, wrong types, binary garbage, very long lines,
 * valid messages in the wrong order), split at random points across writes,
 * over many connections, while real nodes register and greet each other.
 * Meanwhile issue 11's attackers (harness.ts `Attack`: sync spam from
 * non-readers, a ping flood, a /peers flood, churn, slow consumers, token
 * guesses) run against the same registry, each from an address of its own.
 * At the end neither server may have crashed, their memory and the
 * registry's unsent bytes must have stayed within bounds, every real node
 * must have registered and met the others without losing its session, and
 * every attacker must have been answered by the limit meant for it.
 *
 *   bun scripts/fuzz.ts --iterations 20000 --seed 42
 *
 * With --tls both run in mutual TLS, and each connection is a handshake-level
 * attack (garbage records, a real ClientHello mutated, cut short or
 * trickled, plain text on the TLS port) or carries its frames inside TLS.
 *
 * The seed is printed; the same seed replays the same frames. Exit 0 when
 * nothing was found, 1 otherwise, 2 on a bad command line; with --json the
 * last stdout line is the result as one JSON object (event "fuzz-result").
 */
import * as v from "valibot";
import { startNode, type PeerNode } from "../client.ts";
import { UsageError, intArg } from "../cli.ts";
import type { Transport } from "../net.ts";
import {
  ATTACK_KINDS,
  RawClient,
  clientHello,
  freePort,
  killAllOnExit,
  mulberry32,
  probeResponder,
  rssBytes,
  runScript,
  spawnNode,
  spawnRegistry,
  startAttackers,
  testCerts,
  waitUntil,
  withDeadline,
  type Attack,
  type AttackCounts,
  type AttackKind,
  type JsonEvent,
  type KeyPair,
  type Proc,
  type TestCerts,
} from "../harness.ts";
import { DEFAULTS, PROTOCOL_VERSION, Register } from "../protocol.ts";

interface FuzzOptions {
  /** Frames to send in all (split between the registry and the node's listener). */
  iterations: number;
  seed: number;
  /** Connections open at once. */
  concurrency: number;
  /** Real nodes started (in this process) while the fuzz runs; each must register. */
  realNodes: number;
  /** Allowed growth of either server's resident memory over its idle baseline, MiB. */
  maxRssGrowthMiB: number;
  /** Attackers run during the fuzz (none: frames only). */
  attackers: AttackKind[];
  /** Both servers in mutual TLS, attacked at the handshake too (see TlsFuzz). */
  tls?: boolean;
  /** Progress and summary lines. */
  log: (line: string) => void;
}

/** How long a connection waits for the server to close it after its last write, ms. */
const LINGER_MS = 250;

interface FuzzResult {
  ok: boolean;
  seed: number;
  problems: string[];
  frames: number;
  framesByKind: Record<string, number>;
  connections: { registry: number; listener: number };
  /** Error codes the servers answered with, per target. */
  replies: { registry: Record<string, number>; listener: Record<string, number> };
  /** Successful registrations of fuzz frames (the fuzzer answers the registry's probe). */
  fuzzRegistrations: number;
  rssMiB: { registry: RssFigures; node: RssFigures };
  realNodes: { started: number; registered: number };
  /** What each attacker did and was answered, and the registry's unsent bytes (peak of /stats, and its budget). */
  attacks: Partial<Record<AttackKind, AttackCounts>>;
  unsentBytes: { peak: number; budget: number };
  /** With --tls: how the connections were played (see TLS_ATTACKS). */
  tlsAttacks?: Record<string, number>;
  ms: number;
}

/** The registry's token: fuzz registrations and real nodes carry it, the token guesser does not. */
const TOKEN = "fuzz-token";
/** The registry's unsent-bytes budget, small so that the non-readers meet it. */
const BUDGET_BYTES = 16 * 1024 * 1024;

interface RssFigures {
  baseline: number;
  peak: number;
  final: number;
}

/** Runs one fuzz session against fresh registry and node processes. Never throws for a finding: see `problems`. */
async function runFuzz(o: FuzzOptions): Promise<FuzzResult> {
  const result = await new FuzzRun(o).execute();
  o.log(summary(result));
  return result;
}

// --- internal ----------------------------------------------------------------

class FuzzRun {
  private readonly started = performance.now();
  private readonly problems: string[] = [];
  private readonly rand: () => number;
  private readonly gen: FrameGenerator;
  private frames = 0;
  private readonly framesByKind: Record<string, number> = {};
  private readonly connections = { registry: 0, listener: 0 };
  private readonly replies = { registry: {} as Record<string, number>, listener: {} as Record<string, number> };
  private readonly real = { nodes: [] as PeerNode[], starts: [] as Promise<void>[], events: [] as JsonEvent[], registered: 0 };
  // The fuzzer answers the registry's probe itself, so that fuzz registrations
  // can succeed and the frames after them reach a registered session.
  private readonly responder = probeResponder();
  private readonly rss = new RssSampler();
  private registry: (Proc & { port: number }) | undefined;
  private node: (Proc & { id: string; port: number }) | undefined;
  private attacks: Attackers | undefined;
  private tls: TlsFuzz | undefined;

  constructor(private readonly o: FuzzOptions) {
    this.rand = mulberry32(o.seed);
    this.gen = new FrameGenerator(this.rand, DEFAULTS.maxLineBytes);
  }

  async execute(): Promise<FuzzResult> {
    const o = this.o;
    o.log(`fuzz: seed ${o.seed}, ${o.iterations} frames, ${o.concurrency} connections at once`);
    try {
      const tls = (this.tls = o.tls ? await TlsFuzz.create(o.seed, o.realNodes) : undefined);
      // A short registration deadline so half-sent frames are also cut by the registry, not only by us.
      const args = ["--register-timeout", "1000", "--max-queue-total", String(BUDGET_BYTES), "--http", "0", ...(tls?.registryArgs ?? [])];
      const registry = (this.registry = await spawnRegistry(args, { REGISTRY_TOKEN: TOKEN }));
      const node = (this.node = await spawnNode(registry.port, ["--listen", "127.0.0.1", ...(tls?.nodeArgs ?? [])], { REGISTRY_TOKEN: TOKEN }));
      const probed = this.responder.port;
      this.gen.targets = { nodeId: node.id, registerPorts: [probed, probed, probed, node.port, registry.port, freePort()], token: TOKEN };
      const http = String((await registry.log.waitFor("http-listening", 10_000, "the status server")).url);
      this.attacks = new Attackers(o.attackers, registry.port, http);
      this.rss.watch("registry", registry.pid);
      this.rss.watch("node", node.pid);
      await this.attacks.start();
      await this.fuzz();
      await this.attacks.stop();
      await this.check(registry, node);
      this.problems.push(...this.attacks.problems());
    } catch (e) {
      this.problems.push(`fuzz run failed: ${(e as Error).message}`);
    } finally {
      await this.attacks?.stop();
      await Promise.allSettled(this.real.nodes.map((n) => n.stop()));
      this.rss.stop();
      this.responder.stop();
      await Promise.allSettled([this.node?.[Symbol.asyncDispose](), this.registry?.[Symbol.asyncDispose]()]);
      await this.tls?.[Symbol.asyncDispose]();
    }
    return {
      ok: this.problems.length === 0,
      seed: o.seed,
      problems: this.problems,
      frames: this.frames,
      framesByKind: this.framesByKind,
      connections: this.connections,
      replies: this.replies,
      fuzzRegistrations: this.responder.probes(),
      rssMiB: this.rss.figures() as FuzzResult["rssMiB"],
      realNodes: { started: this.real.starts.length, registered: this.real.registered },
      attacks: this.attacks?.counts() ?? {},
      unsentBytes: this.attacks?.unsent ?? { peak: 0, budget: 0 },
      ...(this.tls ? { tlsAttacks: this.tls.attacks } : {}),
      ms: Math.round(performance.now() - this.started),
    };
  }

  /** Every frame, over `concurrency` connections at a time; the real nodes start at even intervals meanwhile. */
  private async fuzz(): Promise<void> {
    const o = this.o;
    const nodeEvery = Math.max(1, Math.floor(o.iterations / (o.realNodes + 1)));
    const progressEvery = Math.max(1, Math.floor(o.iterations / 10));
    let nextProgress = progressEvery;
    const worker = async () => {
      for (let plan = this.nextPlan(); plan; plan = this.nextPlan()) {
        const port = plan.target === "registry" ? this.registry!.port : this.node!.port;
        this.connections[plan.target]++;
        const codes = this.tls ? await this.tls.play(port, plan) : await playConnection(port, plan, LINGER_MS);
        for (const c of codes) this.replies[plan.target][c] = (this.replies[plan.target][c] ?? 0) + 1;
        while (this.real.starts.length < o.realNodes && this.frames >= (this.real.starts.length + 1) * nodeEvery) this.startRealNode();
        if (this.frames >= nextProgress) {
          o.log(`fuzz: ${this.frames}/${o.iterations} frames`);
          nextProgress += progressEvery;
        }
      }
    };
    this.rss.sample();
    const sampler = setInterval(() => this.rss.sample(), 100);
    try {
      await Promise.all(Array.from({ length: o.concurrency }, worker));
    } finally {
      clearInterval(sampler);
    }
    while (this.real.starts.length < o.realNodes) this.startRealNode();
    await Promise.all(this.real.starts);
    this.rss.sample();
  }

  /**
   * Each connection's frames are drawn when a worker takes it, in one
   * sequence from the PRNG: a seed replays the same frames whatever the
   * timing, and only the connections in flight hold their bytes.
   */
  private nextPlan(): ConnPlan | undefined {
    if (this.frames >= this.o.iterations) return undefined;
    const target: Target = this.rand() < 0.6 ? "registry" : "listener";
    const count = Math.min(this.o.iterations - this.frames, 1 + Math.floor(this.rand() * this.rand() * 8));
    const plan = this.gen.connection(target, count);
    for (const k of plan.kinds) this.framesByKind[k] = (this.framesByKind[k] ?? 0) + 1;
    this.frames += count;
    return plan;
  }

  private startRealNode(): void {
    const n = this.real.starts.length;
    // Held from its start, not from its registration, so a node that misses the deadline is still stopped.
    const registered = Promise.withResolvers<void>();
    const p = startNode({
      registryHost: "127.0.0.1",
      registryPort: this.registry!.port,
      listenHost: "127.0.0.1",
      name: `real-${n}`,
      token: TOKEN,
      transport: this.tls?.nodeTransport(n),
      waitForRegistration: false,
      onEvent: (e) => {
        this.real.events.push({ ...e, node: n });
        if (e.event === "registered") registered.resolve();
      },
    }).then((peer) => {
      this.real.nodes.push(peer);
      peer.done.catch((e: unknown) => registered.reject(e));
      return registered.promise;
    });
    this.real.starts.push(
      withDeadline(p, 30_000, `real node ${n} to register`).then(
        () => void this.real.registered++,
        (e) => void this.problems.push(`real node ${n} failed to register: ${(e as Error).message}`),
      ),
    );
  }

  /** Liveness: both servers still run, the mesh of real nodes (plus the fuzzed node) completes, memory stayed bounded. */
  private async check(registry: Proc, node: Proc & { id: string }): Promise<void> {
    const problems = this.problems;
    const realNodes = this.real.nodes;
    for (const p of [registry, node]) {
      if (!p.running) problems.push(`${p.label} exited (${p.proc.exitCode ?? p.proc.signalCode}); stderr: ${p.stderr.slice(-5).join(" | ")}`);
    }
    const lost = node.log.named("disconnected");
    if (lost.length) problems.push(`the fuzzed node lost its registry session ${lost.length} time(s): ${String(lost[0]?.reason)}`);
    const ids = [node.id, ...realNodes.map((n) => n.id)];
    if (realNodes.length === this.o.realNodes && !problems.length) {
      const missing = () => {
        const out: string[] = [];
        for (const n of realNodes) for (const other of ids) if (other !== n.id && !n.met().includes(other)) out.push(`${n.id}->${other}`);
        const met = new Set([...node.log.named("greeting"), ...node.log.named("greeted")].map((e) => String(e.peer)));
        for (const n of realNodes) if (!met.has(n.id)) out.push(`${node.id}->${n.id}`);
        return out;
      };
      await waitUntil(() => missing().length === 0, 20_000, "the real nodes to meet", 20).catch(() =>
        problems.push(`real nodes did not all meet: missing ${missing().slice(0, 10).join(", ")}`),
      );
    }
    const failedGreets = this.real.events.filter((e) => e.event === "greet-failed" && ids.includes(String(e.peer)));
    if (failedGreets.length) problems.push(`real nodes failed to greet each other: ${JSON.stringify(failedGreets[0])}`);
    for (const [label, f] of Object.entries(this.rss.figures())) {
      if (f.peak - f.baseline > this.o.maxRssGrowthMiB) {
        problems.push(`${label} memory grew from ${f.baseline} MiB to ${f.peak} MiB (allowed growth ${this.o.maxRssGrowthMiB} MiB)`);
      }
    }
    for (const target of ["registry", "listener"] as const) {
      if (!Object.keys(this.replies[target]).length && this.connections[target]) problems.push(`the ${target} never answered a fuzz frame`);
    }
    this.tls?.check(registry, problems);
  }
}

type Target = "registry" | "listener";

interface ConnPlan {
  target: Target;
  kinds: string[];
  /** The frames' bytes, already cut into the writes that carry them. */
  writes: Uint8Array[];
  /** Yield to the event loop between writes, so the cuts reach the server as separate segments. */
  spaced: boolean;
  close: "linger" | "end" | "destroy";
}

interface Targets {
  nodeId: string;
  /** Ports a fuzz `register` may name: the probe responder (so some succeed) and ports that fail the probe. */
  registerPorts: number[];
  /** The registry's token, put into every register it would accept: wrong tokens from our address would get it blocked for the real nodes too. */
  token: string;
}

const enc = new TextEncoder();

/** Builds frames from a PRNG; every choice goes through `rand`, so a seed fixes the output. */
class FrameGenerator {
  targets: Targets = { nodeId: "x", registerPorts: [1], token: "" };
  private readonly kinds: [string, number, (t: Target) => Uint8Array][] = [
    ["valid", 18, (t) => this.line(this.valid(t))],
    ["wrong-type", 14, (t) => this.line(this.wrongType(t))],
    ["huge-number", 7, (t) => this.hugeNumber(t)],
    ["truncated", 10, (t) => this.truncated(t)],
    ["deep-nesting", 5, (t) => this.deepNesting(t)],
    ["binary", 10, () => this.binary()],
    ["long-line", 4, (t) => this.longLine(t)],
    ["mutated", 16, (t) => this.mutated(t)],
    ["odd-json", 12, (t) => this.oddJson(t)],
    ["cross-role", 4, (t) => this.line(this.crossRole(t))],
  ];
  private readonly totalWeight = this.kinds.reduce((s, k) => s + k[1], 0);

  constructor(
    private readonly rand: () => number,
    private readonly maxLine: number,
  ) {}

  connection(target: Target, count: number): ConnPlan {
    const kinds: string[] = [];
    const parts: Uint8Array[] = [];
    // Many connections open with a valid first frame, so later frames meet a session past its first line.
    if (count > 1 && this.rand() < 0.4) {
      kinds.push("valid");
      parts.push(this.line(this.valid(target, true)));
      count--;
    }
    for (let i = 0; i < count; i++) {
      let r = this.rand() * this.totalWeight;
      const kind = this.kinds.find((k) => (r -= k[1]) < 0) ?? this.kinds[0]!;
      kinds.push(kind[0]);
      parts.push(target === "registry" ? this.tameRegister(kind[2](target)) : kind[2](target));
    }
    const bytes = Buffer.concat(parts);
    const cuts = new Set<number>();
    const pieces = Math.floor(this.rand() * this.rand() * 8);
    for (let i = 0; i < pieces; i++) cuts.add(1 + Math.floor(this.rand() * Math.max(1, bytes.byteLength - 1)));
    const sorted = [...cuts].filter((c) => c < bytes.byteLength).sort((a, b) => a - b);
    const writes: Uint8Array[] = [];
    let at = 0;
    for (const c of sorted) {
      writes.push(bytes.subarray(at, c));
      at = c;
    }
    writes.push(bytes.subarray(at));
    const c = this.rand();
    return { target, kinds, writes, spaced: this.rand() < 0.5, close: c < 0.6 ? "linger" : c < 0.8 ? "end" : "destroy" };
  }

  private int(n: number): number {
    return Math.floor(this.rand() * n);
  }

  private pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)]!;
  }

  private line(obj: unknown): Uint8Array {
    return enc.encode(JSON.stringify(obj) + (this.rand() < 0.05 ? "\r\n" : "\n"));
  }

  private id(): string {
    const alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-";
    const n = 1 + this.int(this.rand() < 0.1 ? 70 : 16);
    let s = "";
    for (let i = 0; i < n; i++) s += alphabet[this.int(alphabet.length)];
    return s;
  }

  private text(): string {
    const pool = ["a", "Z", "0", " ", "é", "中", "😀", "\u0000", "\n", "\\", '"', "\u202e", "\ud800", "\uffff", "<script>"];
    let s = "";
    const n = this.int(this.rand() < 0.1 ? 300 : 20);
    for (let i = 0; i < n; i++) s += this.pick(pool);
    return s;
  }

  private value(depth = 0): unknown {
    switch (this.int(depth > 2 ? 7 : 9)) {
      case 0:
        return this.int(70000);
      case 1:
        return this.pick([0, -1, 1.5, 2 ** 53 + 2, -(2 ** 31), 1e308, -1e-308, 65536, 65535, 1]);
      case 2:
        return this.text();
      case 3:
        return this.id();
      case 4:
        return this.rand() < 0.5;
      case 5:
        return null;
      case 6:
        return "";
      case 7:
        return Array.from({ length: this.int(5) }, () => this.value(depth + 1));
      default: {
        const o: Record<string, unknown> = {};
        for (let i = this.int(4); i > 0; i--) o[this.id()] = this.value(depth + 1);
        return o;
      }
    }
  }

  /** A well-formed message for the target; sent in any order, so most are valid but unexpected. */
  private valid(target: Target, opening = false): Record<string, unknown> {
    if (target === "listener") {
      if (this.rand() < 0.5) {
        const id = this.rand() < 0.5 ? this.targets.nodeId : this.id().slice(0, 64);
        return { type: "probe", v: PROTOCOL_VERSION, id, nonce: this.id().slice(0, 64) };
      }
      return { type: "hello", v: PROTOCOL_VERSION, id: this.id().slice(0, 64), host: "127.0.0.1", port: 1 + this.int(65535), ...(this.rand() < 0.3 ? { name: this.text().slice(0, 60) } : {}) };
    }
    const k = opening ? 0 : this.int(6);
    switch (k) {
      case 0:
      case 1:
        return {
          type: "register",
          v: PROTOCOL_VERSION,
          id: this.id().slice(0, 64),
          port: this.pick(this.targets.registerPorts),
          ...(this.rand() < 0.2 ? { name: this.text().slice(0, 60) } : {}),
          ...(this.rand() < 0.2 ? { host: this.pick(["127.0.0.1", "127.0.0.2", "::1", "0.0.0.0", "127.0.0.9"]) } : {}),
          // The right token: a wrong one from our address would get the real nodes, who share it, refused (guesses come from the token-guess attacker).
          ...(this.targets.token ? { token: this.targets.token } : this.rand() < 0.1 ? { token: this.text() } : {}),
        };
      case 2:
        return { type: "ping" };
      case 3:
        return { type: "sync" };
      case 4:
        return { type: "receipt", ids: Array.from({ length: this.int(10) }, () => this.id().slice(0, 64)) };
      default:
        return { type: "leave" };
    }
  }

  private crossRole(target: Target): Record<string, unknown> {
    return this.pick([
      { type: "registered", v: 1, boot: "b", seq: 1, heartbeat: 1, timeout: 1, self: { id: "a", host: "127.0.0.1", port: 1 }, peers: [] },
      { type: "joined", seq: 1, peer: { id: "a", host: "127.0.0.1", port: 1 } },
      { type: "welcome", v: 1, id: "a" },
      { type: "probe-ok", id: "a", nonce: "n" },
      { type: "error", code: "unauthorized", message: "x" },
      { type: "pong" },
      this.valid(target === "registry" ? "listener" : "registry"),
    ]);
  }

  private wrongType(target: Target): Record<string, unknown> {
    const m = this.valid(target);
    const keys = [...Object.keys(m), "type", "v", "extra"];
    for (let i = 1 + this.int(2); i > 0; i--) m[this.pick(keys)] = this.value();
    return m;
  }

  private hugeNumber(target: Target): Uint8Array {
    const m = JSON.stringify(this.valid(target));
    const big = this.pick(["1e400", "-1e400", "123456789012345678901234567890", "1" + "0".repeat(400), "0.0000000000000000000001", "-0", "1E+999999", "9".repeat(5000)]);
    const out = /"(v|port|seq)":\d+/.test(m) ? m.replace(/"(v|port|seq)":\d+/, `"$1":${big}`) : m.replace(/}$/, `,"n":${big}}`);
    return enc.encode(out + "\n");
  }

  private truncated(target: Target): Uint8Array {
    const m = JSON.stringify(this.valid(target));
    const cut = m.slice(0, this.int(m.length));
    return enc.encode(this.rand() < 0.7 ? cut + "\n" : cut);
  }

  private deepNesting(target: Target): Uint8Array {
    // Up to 100k levels: past the line limit for the defaults, but within a node's reply limit.
    const depth = this.rand() < 0.5 ? this.int(this.maxLine) : 100_000;
    const open = this.pick(["[", '{"a":', "[{", '{"type":']);
    const close = open === "[" ? "]" : open === "[{" ? "" : "}";
    const prefix = this.rand() < 0.5 ? "" : target === "registry" ? '{"type":"register","v":1,"id":' : '{"type":"hello","v":1,"id":';
    const body = open.repeat(Math.ceil(depth / open.length)) + (this.rand() < 0.5 ? close.repeat(Math.ceil(depth / open.length)) : "");
    return enc.encode(prefix + body + "\n");
  }

  private binary(): Uint8Array {
    const n = this.int(this.rand() < 0.1 ? 20_000 : 200);
    const out = new Uint8Array(n + 1);
    for (let i = 0; i < n; i++) out[i] = this.rand() < 0.1 ? this.pick([0, 0xff, 0xc0, 0xed, 0xa0, 0x80, 13]) : this.int(256);
    out[n] = 10;
    return out;
  }

  private longLine(target: Target): Uint8Array {
    // Right at the limit (off by a few either way), or far past it.
    const n = this.rand() < 0.6 ? this.maxLine - 3 + this.int(7) : 64 * 1024 + this.int(4 * 1024 * 1024);
    const head = JSON.stringify(this.valid(target)).slice(0, -1) + ',"pad":"';
    const fill = Math.max(0, n - head.length - 2);
    const body = head + "x".repeat(fill) + '"}';
    return enc.encode(this.rand() < 0.8 ? body + "\n" : body);
  }

  private mutated(target: Target): Uint8Array {
    const bytes = Array.from(enc.encode(JSON.stringify(this.valid(target))));
    for (let i = 1 + this.int(4); i > 0; i--) {
      const at = this.int(bytes.length + 1);
      switch (this.int(5)) {
        case 0:
          bytes[at] = this.int(256);
          break;
        case 1:
          bytes.splice(at, 1);
          break;
        case 2:
          bytes.splice(at, 0, this.pick([34, 44, 58, 91, 93, 123, 125, 92, 48, 10]));
          break;
        case 3: {
          const len = this.int(20);
          bytes.splice(at, 0, ...bytes.slice(at, at + len));
          break;
        }
        default:
          bytes.splice(at, this.int(10));
      }
    }
    bytes.push(10);
    return Uint8Array.from(bytes);
  }

  private oddJson(target: Target): Uint8Array {
    const m = JSON.stringify(this.valid(target));
    const odd = this.pick([
      "",
      " ",
      "\r",
      "null",
      "[]",
      "{}",
      '"register"',
      "true",
      "\ufeff" + m,
      m.replace("{", '{"__proto__":{"type":"register","admin":true},'),
      m.replace("{", '{"constructor":{"prototype":{"x":1}},'),
      m.replace("{", '{"type":"ping",'),
      m.replace(/"type":"(\w+)"/, '"type":"$1","type":"register"'),
      m.replace(/"/g, "'"),
      m.replace(/:/g, ": \t\n "),
      m + m,
      m + "garbage",
      m.replace(/"(\w+)":/, '"\\u0074ype":'),
      '{"type":"\\ud800"}',
      '{"type":"register","v":1,"id":"a","port":1,"port":2}',
      "NaN",
      '{"type":"register","v":Infinity}',
    ]);
    return enc.encode(odd + "\n");
  }

  /**
   * A register the registry would accept could name any port, and the registry
   * would then probe that port and the nodes greet it. Keep fuzz traffic on our
   * own sockets: valid registers are rewritten to a port of this test and an IP
   * literal (a host name would make the registry resolve it through DNS).
   */
  private tameRegister(frame: Uint8Array): Uint8Array {
    if (frame.byteLength > this.maxLine + 2 || !frame.includes(10)) return frame;
    const text = new TextDecoder().decode(frame);
    let changed = false;
    const lines = text.split("\n").map((line) => {
      let raw: unknown;
      try {
        raw = JSON.parse(line);
      } catch {
        return line;
      }
      const r = v.safeParse(Register, raw);
      if (!r.success) return line;
      changed = true;
      const host = r.output.host === undefined || /^[\d.:]+$/.test(r.output.host) ? r.output.host : "127.0.0.1";
      return JSON.stringify({ ...r.output, host, port: this.pick(this.targets.registerPorts), token: this.targets.token });
    });
    return changed ? enc.encode(lines.join("\n")) : frame;
  }
}

/** Sends one planned connection's writes (inside TLS, presenting `tls`, if given); returns the error codes the server answered with. */
async function playConnection(port: number, plan: ConnPlan, lingerMs: number, tls?: KeyPair): Promise<string[]> {
  let conn: RawClient;
  try {
    conn = await RawClient.connect(port, { tls });
  } catch {
    return ["(connect failed)"];
  }
  try {
    for (const w of plan.writes) {
      if (conn.closed) break;
      await conn.write(w);
      if (plan.spaced) await new Promise((r) => setImmediate(r));
    }
    if (plan.close === "end") conn.end();
    if (plan.close === "destroy") conn.destroy();
    else await conn.waitClosed(lingerMs).catch(() => {});
  } finally {
    conn.destroy();
  }
  const codes = conn.errorCodes();
  return codes.length ? codes : [conn.messages.length ? "(answered)" : "(silent)"];
}

/**
 * The attackers run during the fuzz, each from an address of its own
 * (127.0.0.2, .3, ...; the fuzz frames and the real nodes come from
 * 127.0.0.1), and a watch on the registry's unsent bytes (its /stats).
 */
class Attackers {
  readonly unsent = { peak: 0, budget: 0 };
  private attacks: Attack[] = [];
  private watch: Timer | undefined;
  private stopped: Promise<void> | undefined;

  constructor(
    private readonly kinds: AttackKind[],
    private readonly port: number,
    private readonly statusUrl: string,
  ) {}

  async start(): Promise<void> {
    const widths = { "sync-spam": 8, "ping-flood": 1, "peers-flood": 1, churn: 1, "slow-consumers": 8, "token-guess": 1 };
    const chosen = Object.fromEntries(this.kinds.map((k) => [k, widths[k]]));
    this.attacks = startAttackers({ port: this.port, httpPort: Number(new URL(this.statusUrl).port), token: TOKEN, widths: chosen });
    this.watch = setInterval(() => void this.sample(), 100);
    await withDeadline(Promise.all(this.attacks.map((a) => a.ready)), 20_000, "the attackers to be in place");
  }

  stop(): Promise<void> {
    this.stopped ??= (async () => {
      clearInterval(this.watch);
      await this.sample();
      await Promise.all(this.attacks.map((a) => a.stop()));
    })();
    return this.stopped;
  }

  counts(): Partial<Record<AttackKind, AttackCounts>> {
    return Object.fromEntries(this.attacks.map((a) => [a.kind, a.counts]));
  }

  /** Each attacker met the limit meant for it, and the unsent bytes stayed within the budget. */
  problems(): string[] {
    const out: string[] = [];
    for (const a of this.attacks) {
      const c = a.counts;
      const limited = (c.codes["rate-limited"] ?? 0) > 0;
      const answered: Record<AttackKind, boolean> = {
        "sync-spam": c.registered > 0,
        "ping-flood": limited,
        "peers-flood": c.responses > 0,
        churn: c.registered > 0,
        "slow-consumers": c.registered > 0,
        "token-guess": limited && c.registered === 0,
      };
      if (!answered[a.kind]) out.push(`the ${a.kind} attacker was not answered as expected: ${JSON.stringify(c)}`);
    }
    if (this.unsent.peak > this.unsent.budget) out.push(`the registry held ${this.unsent.peak} unsent bytes, over its budget of ${this.unsent.budget}`);
    return out;
  }

  private async sample(): Promise<void> {
    try {
      const s = (await (await fetch(`${this.statusUrl}stats`)).json()) as { unsentBytes: number; maxUnsentBytes: number };
      this.unsent.peak = Math.max(this.unsent.peak, s.unsentBytes);
      this.unsent.budget = s.maxUnsentBytes;
    } catch {
      // the registry is gone or busy; check() reports a dead registry
    }
  }
}

// --- TLS ---------------------------------------------------------------------

/** What a connection to a TLS port does, with its weight. */
const TLS_ATTACKS = [
  ["frames-inside", 30], // a mesh certificate, then the plan's frames inside TLS
  ["stranger", 5], // another CA's certificate, then the frames
  ["plain", 15], // the plan's frames in plain text
  ["garbage", 10], // a handshake record header, then random bytes
  ["mutated-hello", 15], // a real ClientHello with bytes changed, cut or repeated
  ["half-hello", 10], // the first part of a real ClientHello, then nothing
  ["slow-hello", 5], // a real ClientHello, a few bytes per loop turn
  ["hello-then-junk", 10], // a whole ClientHello, then the plan's frames in plain text
] as const;
type TlsAttack = (typeof TLS_ATTACKS)[number][0];

/**
 * The TLS side of a fuzz run: certificates (certs.ts, in a temporary
 * directory), the flags for the registry and the node, and how each planned
 * connection is played against a TLS port. The attack and its details are
 * drawn from the seed and the plan's own bytes, so a seed replays the same
 * attacks whatever order the connections run in.
 */
class TlsFuzz implements AsyncDisposable {
  readonly attacks: Record<string, number> = {};
  private constructor(
    private readonly seed: number,
    private readonly certs: TestCerts,
    private readonly hello: Buffer,
  ) {}

  static async create(seed: number, realNodes: number): Promise<TlsFuzz> {
    const certs = await testCerts(["fuzzed", "fuzzer", ...Array.from({ length: realNodes }, (_, i) => `real-${i}`)]);
    return new TlsFuzz(seed, certs, await clientHello());
  }

  get registryArgs(): string[] {
    return this.certs.registryArgs(true);
  }

  get nodeArgs(): string[] {
    return this.certs.nodeArgs("fuzzed");
  }

  nodeTransport(n: number): Transport {
    return this.certs.nodeTransport(`real-${n}`);
  }

  async play(port: number, plan: ConnPlan): Promise<string[]> {
    const rand = mulberry32((Bun.hash.crc32(Buffer.concat(plan.writes)) ^ this.seed) >>> 0);
    let r = rand() * TLS_ATTACKS.reduce((sum, a) => sum + a[1], 0);
    const attack: TlsAttack = (TLS_ATTACKS.find((a) => (r -= a[1]) < 0) ?? TLS_ATTACKS[0])[0];
    this.attacks[attack] = (this.attacks[attack] ?? 0) + 1;
    const hello = this.hello;
    switch (attack) {
      case "frames-inside":
        return playInsideTls(port, plan, this.certs.node("fuzzer"));
      case "stranger":
        return playInsideTls(port, plan, this.certs.stranger.nodes[0]!);
      case "plain":
        return playConnection(port, plan, LINGER_MS);
      case "garbage":
        return playBytes(port, [Buffer.concat([Buffer.from([0x16, 0x03, 1 + Math.floor(rand() * 3)]), randomBytes(rand, 2 + Math.floor(rand() * 600))])], rand);
      case "mutated-hello":
        return playBytes(port, [mutate(hello, rand)], rand);
      case "half-hello":
        return playBytes(port, [hello.subarray(0, 1 + Math.floor(rand() * (hello.byteLength - 1)))], rand);
      case "slow-hello":
        return playBytes(port, Array.from(hello.subarray(0, 1 + Math.floor(rand() * 200)), (b) => Uint8Array.of(b)), rand);
      case "hello-then-junk":
        return playBytes(port, [hello, ...plan.writes], rand);
    }
  }

  /** The registry must have cut handshakes at its deadline and answered plain text in plain text. */
  check(registry: Proc, problems: string[]): void {
    const reported = new Set(registry.log.named("error").map((e) => String(e.code)));
    for (const code of ["handshake-timeout", "handshake-failed", "tls-required"]) {
      if (!reported.has(code)) problems.push(`the TLS registry never reported ${code}`);
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.certs[Symbol.asyncDispose]();
  }
}

/** Raw bytes to a TLS port; one connection in ten then waits for the server to cut it (its handshake deadline), the rest leave after LINGER_MS. */
function playBytes(port: number, writes: Uint8Array[], rand: () => number): Promise<string[]> {
  const plan: ConnPlan = { target: "registry", kinds: [], writes, spaced: writes.length > 1, close: "linger" };
  return playConnection(port, plan, rand() < 0.1 ? 5_000 : LINGER_MS);
}

/** The plan's frames inside TLS, in one burst, then a linger: the plan's spacing and closes have always been the plain connections' alone, and a seed still replays what it did. */
function playInsideTls(port: number, plan: ConnPlan, pair: KeyPair): Promise<string[]> {
  return playConnection(port, { ...plan, spaced: false, close: "linger" }, LINGER_MS, pair);
}

function randomBytes(rand: () => number, n: number): Buffer {
  return Buffer.from(Array.from({ length: n }, () => Math.floor(rand() * 256)));
}

/** A copy of `bytes` with a few bytes changed, a piece cut out or a piece repeated. */
function mutate(bytes: Buffer, rand: () => number): Buffer {
  const out = Array.from(bytes);
  for (let i = 1 + Math.floor(rand() * 4); i > 0; i--) {
    const at = Math.floor(rand() * out.length);
    const r = rand();
    if (r < 0.6) out[at] = Math.floor(rand() * 256);
    else if (r < 0.8) out.splice(at, 1 + Math.floor(rand() * 20));
    else out.splice(at, 0, ...out.slice(at, at + 1 + Math.floor(rand() * 40)));
  }
  return Buffer.from(out);
}

class RssSampler {
  private pids = new Map<string, number>();
  private figs = new Map<string, RssFigures>();

  watch(label: string, pid: number): void {
    this.pids.set(label, pid);
  }

  sample(): void {
    for (const [label, pid] of this.pids) {
      const bytes = rssBytes(pid);
      if (bytes === undefined) continue;
      const mib = Math.round(bytes / 2 ** 20 * 10) / 10;
      const f = this.figs.get(label);
      if (!f) this.figs.set(label, { baseline: mib, peak: mib, final: mib });
      else {
        f.peak = Math.max(f.peak, mib);
        f.final = mib;
      }
    }
  }

  figures(): Record<string, RssFigures> {
    return Object.fromEntries(this.figs);
  }

  stop(): void {
    this.pids.clear();
  }
}

function attackersArg(text: string): AttackKind[] {
  if (text === "all") return [...ATTACK_KINDS];
  if (text === "none") return [];
  const kinds = text.split(",").filter(Boolean);
  for (const k of kinds) if (!ATTACK_KINDS.includes(k as AttackKind)) throw new UsageError(`--attackers: no attacker "${k}" (${ATTACK_KINDS.join(", ")}, all or none)`);
  return kinds as AttackKind[];
}

function summary(r: FuzzResult): string {
  const fmt = (o: Record<string, number>) =>
    Object.entries(o)
      .sort((a, b) => b[1] - a[1])
      .map(([k, n]) => `${k}=${n}`)
      .join(" ");
  const mem = (f: RssFigures | undefined) => (f ? `${f.baseline}->${f.peak} (final ${f.final}) MiB` : "n/a");
  return [
    `fuzz: seed ${r.seed}: ${r.frames} frames over ${r.connections.registry} registry + ${r.connections.listener} listener connections in ${r.ms} ms`,
    `  frames:     ${fmt(r.framesByKind)}`,
    ...(r.tlsAttacks ? [`  tls:        ${fmt(r.tlsAttacks)}`] : []),
    `  registry:   ${fmt(r.replies.registry)}`,
    `  listener:   ${fmt(r.replies.listener)}`,
    `  fuzz registrations that passed the probe: ${r.fuzzRegistrations}`,
    `  real nodes: ${r.realNodes.registered}/${r.realNodes.started} registered`,
    `  rss:        registry ${mem(r.rssMiB.registry)}, node ${mem(r.rssMiB.node)}`,
    `  unsent:     peak ${r.unsentBytes.peak} of a budget of ${r.unsentBytes.budget} bytes`,
    ...Object.entries(r.attacks).map(([k, c]) => `  ${`${k}:`.padEnd(16)}${c.connections} connections, ${c.registered} registered, ${c.lines} lines, ${c.responses} responses; answered ${fmt(c.codes) || "nothing"}`),
    r.ok ? "fuzz: OK" : `fuzz: FAILED\n${r.problems.map((p) => `  - ${p}`).join("\n")}`,
  ].join("\n");
}

if (import.meta.main) {
  killAllOnExit();
  await runScript(
    { name: "fuzz", description: "Seeded fuzzing of the registry and a node's listener; exits 1 on any finding." },
    {
      iterations: { type: "string", description: "Frames to send", default: "20000" },
      seed: { type: "string", description: "PRNG seed (default: random, printed)" },
      concurrency: { type: "string", description: "Connections open at once", default: "32" },
      nodes: { type: "string", description: "Real nodes that register during the run", default: "5" },
      "max-rss-growth": { type: "string", description: "Allowed memory growth of each server, MiB", default: "128" },
      attackers: { type: "string", description: `Attackers run meanwhile, comma-separated, or none [${ATTACK_KINDS.join(", ")}]`, default: "all" },
      tls: { type: "boolean", description: "Both servers in mutual TLS: attack the handshake, and send the frames inside TLS (the attackers, which speak plain TCP, do not run)" },
      json: { type: "boolean", description: "End with the result as one JSON line" },
    },
    async (args) => {
      const result = await runFuzz({
        iterations: intArg("iterations", args.iterations, 1),
        seed: args.seed === undefined ? Math.floor(Math.random() * 2 ** 32) : intArg("seed", args.seed, 0, 2 ** 32 - 1),
        concurrency: intArg("concurrency", args.concurrency, 1),
        realNodes: intArg("nodes", args.nodes),
        maxRssGrowthMiB: intArg("max-rss-growth", args["max-rss-growth"], 1),
        attackers: args.tls ? [] : attackersArg(args.attackers),
        tls: args.tls,
        log: (line) => process.stdout.write(`${line}\n`),
      });
      if (args.json) process.stdout.write(JSON.stringify({ event: "fuzz-result", ...result }) + "\n");
      return result.ok ? 0 : 1;
    },
  );
}
