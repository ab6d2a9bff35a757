#!/usr/bin/env bun
/**
 * Chaos run (issue 3): a registry process and N node processes on loopback,
 * then random kill -9, SIGTERM, SIGSTOP/SIGCONT and restarts of nodes, and
 * kill -9 + restart (same port) of the registry, for a bounded time. Then it
 * stops disturbing, waits for things to settle, and checks two facts:
 *   1. the registry's list is exactly the set of live node processes
 *      (each once, at the port the process listens on), and
 *   2. every live node's own view of its peers is the registry's list minus
 *      itself.
 * Every node is a real `client.ts` process: 50 idle Bun processes fit two
 * cores and ~2 GB (about 35 MB each, asleep between heartbeats), and only
 * processes can be frozen and killed for real. The registry's list comes from its --json events
 * (every change to it is one); a node's view is asked for with SIGUSR1, which
 * makes client.ts print a `view` event.
 *
 *   bun scripts/chaos.ts --duration 20 --nodes 50 --seed 7
 *
 * Exit 0 when both facts hold, 1 otherwise, 2 on a bad command line; with
 * --json the last stdout line is the report as one JSON object (event
 * "chaos-report").
 */
import { intArg } from "../cli.ts";
import { killAllOnExit, mulberry32, runScript, spawnScript, withDeadline, type Proc } from "../harness.ts";

interface ChaosOptions {
  durationMs: number;
  nodes: number;
  /** Seeds the choice of actions and victims (process timing still varies between runs). */
  seed: number;
  /** Registry heartbeat; a node is evicted after 3 missed beats. */
  heartbeatMs: number;
  /** How long the system gets to agree after the last action. */
  settleMs: number;
}

interface ChaosReport {
  ok: boolean;
  seed: number;
  actions: Record<Action, number>;
  /** Live node processes at the end, and the registry's list. */
  live: number;
  listed: number;
  /** Live nodes whose view equalled the registry's list minus themselves. */
  viewsAgreeing: number;
  /** Time from the last action to agreement, ms (null if never). */
  settledMs: number | null;
  problems: string[];
}

type Action = "kill" | "term" | "freeze" | "start" | "restart-same" | "registry-restart";

/** Runs the chaos and the final check; always kills every process it started. */
async function runChaos(options: ChaosOptions): Promise<ChaosReport> {
  const run = new ChaosRun(options);
  try {
    return await run.execute();
  } finally {
    await run.cleanup();
  }
}

// --- internal ----------------------------------------------------------------

const MISSES = 3;
const NODE_FLAGS = ["--listen", "127.0.0.1", "--reconnect-max", "500", "--greet-timeout", "1000", "--greet-retries", "1"];
/** Most node processes being spawned at once: a Bun start costs ~0.1 s of CPU and there are two cores. */
const SPAWN_CONCURRENCY = 6;
const START_DEADLINE_MS = 20_000;

interface Slot {
  index: number;
  proc?: Proc;
  /** From the process's `listening` event; undefined while it starts. */
  id?: string;
  port?: number;
  frozen?: Timer;
  /** Set before we end a process on purpose, so its exit is not reported as a crash. */
  ending?: boolean;
  lastId?: string;
  lastPort?: number;
}

class ChaosRun {
  private readonly rand: () => number;
  private readonly t0 = performance.now();
  private readonly slots: Slot[];
  private readonly all = new Set<Proc>();
  private readonly pending = new Set<Promise<unknown>>();
  private readonly problems: string[] = [];
  private readonly actions: Record<Action, number> = { kill: 0, term: 0, freeze: 0, start: 0, "restart-same": 0, "registry-restart": 0 };
  private registry!: Proc;
  private registryPort = 0;
  private registryDown = false;
  private lastRegistryRestart = 0;
  private spawning = 0;
  private cleaningUp = false;
  private midpoint = Infinity;
  private spawnWaiters: (() => void)[] = [];

  constructor(private readonly o: ChaosOptions) {
    this.rand = mulberry32(this.o.seed);
    this.slots = Array.from({ length: this.o.nodes }, (_, index) => ({ index }));
  }

  async execute(): Promise<ChaosReport> {
    const o = this.o;
    this.say(`seed ${o.seed}: ${o.nodes} nodes, ${o.durationMs / 1000}s of chaos, heartbeat ${o.heartbeatMs}ms x ${MISSES}`);
    this.registry = await this.startRegistry(0);
    this.registryPort = Number(this.registry.log.named("listening")[0]!.port);
    this.say(`registry listening on 127.0.0.1:${this.registryPort} (pid ${this.registry.pid})`);
    await Promise.all(this.slots.map((s) => this.startNode(s, false)));
    this.say(`${this.liveSlots().length} nodes started`);

    const end = performance.now() + o.durationMs;
    this.midpoint = end - o.durationMs / 2;
    while (performance.now() < end) {
      this.act();
      await Bun.sleep(100 + this.rand() * 400); // pacing of the disturbance, not synchronisation
    }
    const lastActionAt = performance.now();
    this.say("chaos over: thawing frozen nodes, waiting for pending starts and restarts");
    for (const s of this.slots) if (s.frozen) this.thaw(s);
    while (this.pending.size) await Promise.allSettled([...this.pending]);

    const agreedAt = await this.awaitAgreement(lastActionAt + o.settleMs);
    const settled = agreedAt !== null;
    const settledMs = settled ? Math.max(0, Math.round(agreedAt - lastActionAt)) : null;
    const final = await this.check();
    // Checked again after the stability window: agreement that did not last is a finding too.
    this.problems.push(...final.problems);
    this.say(
      `found: ${final.live} live nodes, registry lists ${final.listed}, ${final.viewsAgreeing}/${final.live} views agree` +
        (settled ? `; agreed ${settledMs}ms after the last action (and still did ${this.stableWindowMs}ms later)` : "; NO agreement"),
    );
    for (const p of this.problems.slice(0, 30)) this.say(`problem: ${p}`);
    if (this.problems.length > 30) this.say(`... and ${this.problems.length - 30} more problems`);
    const ok = settled && this.problems.length === 0;
    this.say(ok ? "OK: the registry's list and every node's view agree with the live set" : "FAILED");
    return { ok, seed: o.seed, actions: { ...this.actions }, live: final.live, listed: final.listed, viewsAgreeing: final.viewsAgreeing, settledMs, problems: [...this.problems] };
  }

  async cleanup(): Promise<void> {
    this.cleaningUp = true;
    await Promise.allSettled([...this.all].map((p) => p[Symbol.asyncDispose]()));
  }

  /** One random disturbance. Weights keep the population near N and the registry mostly up. */
  private act(): void {
    const live = this.liveSlots();
    const empty = this.slots.filter((s) => !s.proc);
    const canRestartRegistry = !this.registryDown && performance.now() - this.lastRegistryRestart > 4 * this.o.heartbeatMs * MISSES;
    const weights: [Action | "idle", number][] = [
      ["kill", live.length > 1 ? 3 : 0],
      ["term", live.length > 1 ? 1 : 0],
      ["freeze", live.length > 1 ? 1 : 0],
      ["start", empty.length ? 2 + (8 * empty.length) / this.o.nodes : 0],
      ["restart-same", empty.some((s) => s.lastId) ? 2 : 0],
      ["registry-restart", canRestartRegistry ? 0.4 : 0],
      ["idle", 1],
    ];
    // Every run restarts the registry at least once, however the dice fall.
    const due = canRestartRegistry && this.actions["registry-restart"] === 0 && performance.now() > this.midpoint;
    const action = due ? "registry-restart" : pick(weights, this.rand);
    if (action === "idle") return;
    const awake = live.filter((s) => !s.frozen);
    const victim = (from: Slot[]) => from[Math.floor(this.rand() * from.length)];
    switch (action) {
      case "kill":
      case "term": {
        // A frozen node can be killed, but not asked to stop: it could not say goodbye.
        const s = victim(action === "kill" ? live : awake);
        if (!s) return;
        this.count(action);
        this.say(`${action === "kill" ? "kill -9" : "SIGTERM"} node#${s.index} ${s.id} (pid ${s.proc!.pid})${s.frozen ? " while frozen" : ""}`);
        clearTimeout(s.frozen);
        s.frozen = undefined;
        this.end(s, action === "kill" ? "SIGKILL" : "SIGTERM");
        return;
      }
      case "freeze": {
        const s = victim(awake);
        if (!s) return;
        this.count("freeze");
        const ms = Math.round(this.o.heartbeatMs * MISSES * (0.3 + this.rand() * 2.7));
        this.say(`SIGSTOP node#${s.index} ${s.id} for ${ms}ms`);
        s.proc!.signal("SIGSTOP");
        s.frozen = setTimeout(() => this.thaw(s), ms);
        return;
      }
      case "start":
      case "restart-same": {
        const same = action === "restart-same";
        const candidates = same ? empty.filter((s) => s.lastId) : empty;
        const s = candidates[Math.floor(this.rand() * candidates.length)]!;
        this.count(action);
        this.track(this.startNode(s, same));
        return;
      }
      case "registry-restart":
        this.count("registry-restart");
        this.track(this.restartRegistry());
        return;
    }
  }

  private count(action: Action): void {
    this.actions[action]++;
  }

  private thaw(s: Slot): void {
    clearTimeout(s.frozen);
    s.frozen = undefined;
    if (!s.proc) return;
    this.say(`SIGCONT node#${s.index} ${s.id}`);
    s.proc.signal("SIGCONT");
  }

  /** Ends a node on purpose; the slot is free once the process is gone. */
  private end(s: Slot, signal: "SIGKILL" | "SIGTERM"): void {
    const proc = s.proc!;
    s.ending = true;
    proc.signal(signal);
    this.track(
      withDeadline(proc.exited(), 10_000, `node#${s.index} to exit on ${signal}`).then(
        (code) => {
          if (signal === "SIGTERM" && code !== 0) this.problems.push(`node#${s.index} ${s.id} exited ${code} on SIGTERM (expected 0)`);
        },
        (e) => {
          this.problems.push((e as Error).message);
          proc.signal("SIGKILL");
        },
      ),
    );
  }

  private async startNode(s: Slot, sameIdentity: boolean): Promise<void> {
    const args = ["127.0.0.1", String(this.registryPort), "--json", ...NODE_FLAGS];
    if (sameIdentity) args.push("--id", s.lastId!, "--port", String(s.lastPort));
    await this.spawnSlot();
    try {
      const proc = spawnScript("client.ts", args, { label: `node#${s.index}` });
      s.proc = proc;
      s.id = s.port = undefined;
      s.ending = false;
      this.all.add(proc);
      // The slot is free for a restart only after the exit: a same-port restart needs the port.
      void proc.exited().then((code) => this.onNodeExit(s, proc, code));
      const l = await proc.log.waitFor("listening", START_DEADLINE_MS, `node#${s.index} to listen`);
      s.id = s.lastId = String(l.id);
      s.port = s.lastPort = Number(l.port);
      if (sameIdentity) this.say(`restart node#${s.index} as ${s.id} on its old port ${s.port} (pid ${proc.pid})`);
      else if (this.actions.start + this.actions["restart-same"] > 0) this.say(`start node#${s.index} ${s.id} (pid ${proc.pid})`);
    } catch (e) {
      // An early exit was judged by onNodeExit; what is left is a process that never started listening.
      if (s.proc?.running) {
        this.problems.push(`node#${s.index}: ${(e as Error).message}`);
        s.ending = true;
        s.proc.signal("SIGKILL");
      }
    } finally {
      this.spawnDone();
    }
  }

  private onNodeExit(s: Slot, proc: Proc, code: number): void {
    if (s.proc !== proc) return;
    s.proc = undefined;
    clearTimeout(s.frozen);
    s.frozen = undefined;
    const intended = s.ending;
    s.ending = false;
    if (intended || this.cleaningUp) return;
    // A restart on the old port can lose the port to another socket meanwhile; that is the test bed, not the code under test.
    if (proc.stderr.some((l) => /already in use|EADDRINUSE|Failed to listen/.test(l))) {
      this.say(`node#${s.index} could not reuse port ${s.lastPort}; the slot stays empty`);
      s.lastId = undefined;
      return;
    }
    this.problems.push(`node#${s.index} ${s.id ?? "(starting)"} exited by itself with code ${code}: ${proc.stderr.slice(-3).join(" | ") || "(no stderr)"}`);
  }

  private async restartRegistry(): Promise<void> {
    this.registryDown = true;
    const old = this.registry;
    this.say(`kill -9 registry (pid ${old.pid}, ${this.registryList().size} listed)`);
    await old.kill("SIGKILL");
    const downMs = Math.round(this.rand() * this.o.heartbeatMs * MISSES);
    await Bun.sleep(downMs); // the outage itself, not a wait for anything
    this.registry = await this.startRegistry(this.registryPort);
    this.lastRegistryRestart = performance.now();
    this.registryDown = false;
    this.say(`registry restarted on port ${this.registryPort} after ${downMs}ms down (pid ${this.registry.pid}, boot ${this.registry.log.named("listening")[0]!.boot})`);
  }

  /** Starts a registry process; retries a few times if the old port is briefly held by someone else. */
  private async startRegistry(port: number): Promise<Proc> {
    const args = ["127.0.0.1", String(port), "--json", "--heartbeat", String(this.o.heartbeatMs), "--heartbeat-misses", String(MISSES)];
    for (let attempt = 1; ; attempt++) {
      const proc = spawnScript("registry.ts", args, { label: "registry" });
      this.all.add(proc);
      try {
        await proc.log.waitFor("listening", START_DEADLINE_MS, "registry to listen");
        void proc.exited().then((code) => {
          if (proc === this.registry && !this.registryDown) this.problems.push(`registry died by itself with code ${code}: ${proc.stderr.slice(-3).join(" | ")}`);
        });
        return proc;
      } catch (e) {
        if (attempt >= 10) throw e;
        this.say(`registry restart attempt ${attempt} failed (${(e as Error).message}); retrying`);
        await Bun.sleep(200);
      }
    }
  }

  /** Agreement must hold this long (two eviction bounds) to count: a flapping membership fails. */
  private get stableWindowMs(): number {
    return 2 * this.o.heartbeatMs * MISSES;
  }

  /**
   * Polls the final check until it passes and still passes a stable window
   * later, or the deadline; returns when agreement was first seen, or null.
   */
  private async awaitAgreement(deadline: number): Promise<number | null> {
    let agreedAt: number | undefined;
    const window = this.stableWindowMs;
    while (performance.now() < deadline) {
      const c = await this.check();
      if (c.problems.length) agreedAt = undefined;
      else if (agreedAt === undefined) agreedAt = performance.now();
      else if (performance.now() - agreedAt >= window) return agreedAt;
      await Bun.sleep(c.problems.length ? 250 : window / 2);
    }
    return null;
  }

  /** Compares the live set, the registry's list and every live node's view, once. */
  private async check(): Promise<{ live: number; listed: number; viewsAgreeing: number; problems: string[] }> {
    const problems: string[] = [];
    const live = new Map<string, Slot>();
    for (const s of this.liveSlots()) live.set(s.id!, s);
    const listed = this.registryList();
    for (const [id, s] of live) {
      const entry = listed.get(id);
      if (!entry) problems.push(`registry misses live node#${s.index} ${id}`);
      else if (entry.port !== s.port) problems.push(`registry lists ${id} at port ${entry.port}, the process listens on ${s.port}`);
    }
    for (const id of listed.keys()) if (!live.has(id)) problems.push(`registry lists ${id}, which is not running`);
    const byAddress = new Map<string, string>();
    for (const [id, e] of listed) {
      const a = `${e.host}:${e.port}`;
      if (byAddress.has(a)) problems.push(`address ${a} listed twice (${byAddress.get(a)}, ${id})`);
      byAddress.set(a, id);
    }
    let viewsAgreeing = 0;
    if (!problems.length) {
      const views = await Promise.all([...live.values()].map((s) => this.askView(s)));
      const want = [...listed.keys()].sort();
      for (const v of views) {
        if (typeof v === "string") {
          problems.push(v);
          continue;
        }
        const expected = want.filter((id) => id !== v.id);
        const got = [...v.peers].sort();
        if (v.registered && same(got, expected)) {
          viewsAgreeing++;
          continue;
        }
        const missing = expected.filter((id) => !v.peers.includes(id));
        const extra = got.filter((id) => !expected.includes(id));
        const dup = got.length !== new Set(got).size ? " (duplicates)" : "";
        problems.push(`node ${v.id}${v.registered ? "" : " (not registered)"} view differs: missing [${missing.join(",")}], extra [${extra.join(",")}]${dup}`);
      }
    }
    return { live: live.size, listed: listed.size, viewsAgreeing, problems };
  }

  /** Asks a node process for its view (SIGUSR1 -> a `view` event); an error text if it does not answer. */
  private async askView(s: Slot): Promise<{ id: string; registered: boolean; peers: string[] } | string> {
    const proc = s.proc!;
    const before = proc.log.named("view").length;
    proc.signal("SIGUSR1");
    try {
      const views = await proc.log.waitForCount("view", before + 1, 5_000, `node#${s.index} to print its view`);
      const v = views[before]!;
      return { id: s.id!, registered: v.registered === true, peers: (v.peers as string[]) ?? [] };
    } catch (e) {
      return (e as Error).message;
    }
  }

  /** The current registry's list, rebuilt from its events (each change to the list is one). */
  private registryList(): Map<string, { host: string; port: number }> {
    const list = new Map<string, { host: string; port: number }>();
    for (const e of this.registry.log.events) {
      if (e.event === "node-registered") list.set(String(e.id), { host: String(e.host), port: Number(e.port) });
      else if (e.event === "node-left") list.delete(String(e.id));
    }
    return list;
  }

  private liveSlots(): Slot[] {
    return this.slots.filter((s) => s.proc && s.id !== undefined && !s.ending && s.proc.proc.exitCode === null && s.proc.proc.signalCode === null);
  }

  private track(p: Promise<unknown>): void {
    const q = p.catch((e) => this.problems.push((e as Error).message)).finally(() => this.pending.delete(q));
    this.pending.add(q);
  }

  private async spawnSlot(): Promise<void> {
    while (this.spawning >= SPAWN_CONCURRENCY) await new Promise<void>((r) => this.spawnWaiters.push(r));
    this.spawning++;
  }

  private spawnDone(): void {
    this.spawning--;
    this.spawnWaiters.shift()?.();
  }

  private say(text: string): void {
    const t = ((performance.now() - this.t0) / 1000).toFixed(2).padStart(7);
    process.stdout.write(`[${t}s] ${text}\n`);
  }
}

function pick<T>(weights: [T, number][], rand: () => number): T {
  const total = weights.reduce((n, [, w]) => n + w, 0);
  let r = rand() * total;
  for (const [x, w] of weights) {
    if ((r -= w) < 0) return x;
  }
  return weights[weights.length - 1]![0];
}

function same(a: string[], b: string[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

if (import.meta.main) {
  killAllOnExit();
  await runScript(
    { name: "chaos", description: "Kill, freeze and restart nodes and the registry at random, then check that the registry's list and every node's view agree with the live nodes." },
    {
      duration: { type: "string", description: "Seconds of chaos", default: "20" },
      nodes: { type: "string", description: "Node processes, 2 to 500 (more would only measure process start-up)", default: "50" },
      seed: { type: "string", description: "Seed for the choice of actions (default: random, printed)" },
      heartbeat: { type: "string", description: "Registry heartbeat in ms (eviction after 3 misses)", default: "300" },
      settle: { type: "string", description: "Seconds allowed to reach agreement after the chaos", default: "30" },
      json: { type: "boolean", description: "End with the report as one JSON line" },
    },
    async (args) => {
      const report = await runChaos({
        durationMs: intArg("duration", args.duration, 1) * 1000,
        nodes: intArg("nodes", args.nodes, 2, 500),
        seed: args.seed === undefined ? Math.floor(Math.random() * 2 ** 31) : intArg("seed", args.seed),
        heartbeatMs: intArg("heartbeat", args.heartbeat, 50),
        settleMs: intArg("settle", args.settle, 1) * 1000,
      });
      const a = report.actions;
      process.stdout.write(
        `actions: ${a.kill} kill -9, ${a.term} SIGTERM, ${a.freeze} SIGSTOP, ${a.start} fresh starts, ${a["restart-same"]} restarts with the same id and port, ${a["registry-restart"]} registry kill -9 + restart\n`,
      );
      if (args.json) process.stdout.write(JSON.stringify({ event: "chaos-report", ...report }) + "\n");
      return report.ok ? 0 : 1;
    },
  );
}
