#!/usr/bin/env bun
/**
 * Chaos run (issue 3): a registry process and N node processes on loopback,
 * then random kill -9, SIGTERM, SIGSTOP/SIGCONT and restarts of nodes, and
 * kill -9 + restart (same port) of the registry, for a bounded time. With
 * --registries 2 or more, the registries share a private redis-server, every
 * node is given all of them, and registries are also frozen, and the store is
 * killed (restarted empty) and frozen. Then it stops disturbing, waits for
 * things to settle, and checks two facts:
 *   1. every registry's list is exactly the set of live node processes
 *      (each once, at the port the process listens on), and
 *   2. every live node's own view of its peers is that list minus itself.
 * Every node is a real `client.ts` process: 50 idle Bun processes fit two
 * cores and ~2 GB (about 35 MB each, asleep between heartbeats), and only
 * processes can be frozen and killed for real. A registry's list comes from its
 * /peers (each runs its status server); a node's view is asked for with
 * SIGUSR1, which makes client.ts print a `view` event.
 *
 *   bun scripts/chaos.ts --duration 20 --nodes 50 --seed 7
 *   bun scripts/chaos.ts --duration 30 --nodes 30 --registries 3
 *
 * Exit 0 when both facts hold, 1 otherwise, 2 on a bad command line; with
 * --json the last stdout line is the report as one JSON object (event
 * "chaos-report").
 */
import { intArg } from "../cli.ts";
import { RedisServer, askView, killAllOnExit, listed, mulberry32, redisUnavailable, runScript, same, spawnScript, withDeadline, withStatus, type NodeLine, type Proc, type RegistryLine } from "../harness.ts";

interface ChaosOptions {
  durationMs: number;
  nodes: number;
  /** Registry processes; 2 or more share a private redis-server. */
  registries: number;
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
  /** Live node processes at the end, and the registries' lists (the shortest). */
  live: number;
  listed: number;
  /** Live nodes whose view equalled the registry's list minus themselves. */
  viewsAgreeing: number;
  /** Time from the last action to agreement, ms (null if never). */
  settledMs: number | null;
  problems: string[];
}

type Action = "kill" | "term" | "freeze" | "start" | "restart-same" | "registry-restart" | "registry-freeze" | "store-restart" | "store-freeze";

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

/** A registry process; restarted on the same port, its status server on a new one. */
interface RegistrySlot {
  index: number;
  proc?: Proc<RegistryLine>;
  port: number;
  http: string;
  down: boolean;
  frozen?: Timer;
}

interface Slot {
  index: number;
  proc?: Proc<NodeLine>;
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
  private readonly actions: Record<Action, number> = {
    kill: 0,
    term: 0,
    freeze: 0,
    start: 0,
    "restart-same": 0,
    "registry-restart": 0,
    "registry-freeze": 0,
    "store-restart": 0,
    "store-freeze": 0,
  };
  private readonly registries: RegistrySlot[];
  private store: RedisServer | undefined;
  private storeBusy = false;
  private lastRegistryRestart = 0;
  private lastStoreAction = 0;
  private spawning = 0;
  private cleaningUp = false;
  private midpoint = Infinity;
  private spawnWaiters: (() => void)[] = [];

  constructor(private readonly o: ChaosOptions) {
    this.rand = mulberry32(this.o.seed);
    this.slots = Array.from({ length: this.o.nodes }, (_, index) => ({ index }));
    this.registries = Array.from({ length: this.o.registries }, (_, index) => ({ index, port: 0, http: "", down: false }));
  }

  private get shared(): boolean {
    return this.registries.length > 1;
  }

  async execute(): Promise<ChaosReport> {
    const o = this.o;
    this.say(`seed ${o.seed}: ${o.nodes} nodes, ${o.durationMs / 1000}s of chaos, heartbeat ${o.heartbeatMs}ms x ${MISSES}`);
    if (this.shared) {
      if (redisUnavailable) throw new Error(`--registries ${o.registries} needs a store: ${redisUnavailable}`);
      this.store = await RedisServer.start();
      this.say(`store: redis-server on ${this.store.url}`);
    }
    for (const r of this.registries) {
      await this.startRegistry(r);
      this.say(`registry#${r.index} listening on 127.0.0.1:${r.port} (pid ${r.proc!.pid})`);
    }
    await Promise.all(this.slots.map((s) => this.startNode(s, false)));
    this.say(`${this.liveSlots().length} nodes started`);

    const end = performance.now() + o.durationMs;
    this.midpoint = end - o.durationMs / 2;
    while (performance.now() < end) {
      this.act();
      await Bun.sleep(100 + this.rand() * 400); // pacing of the disturbance, not synchronisation
    }
    const lastActionAt = performance.now();
    this.say("chaos over: thawing what is frozen, waiting for pending starts and restarts");
    for (const s of this.slots) if (s.frozen) this.thaw(s);
    for (const r of this.registries) if (r.frozen) this.thawRegistry(r);
    while (this.pending.size) await Promise.allSettled([...this.pending]);

    const agreedAt = await this.awaitAgreement(lastActionAt + o.settleMs);
    const settled = agreedAt !== null;
    const settledMs = settled ? Math.max(0, Math.round(agreedAt - lastActionAt)) : null;
    const final = await this.check();
    // Checked again after the stability window: agreement that did not last is a finding too.
    this.problems.push(...final.problems);
    this.say(
      `found: ${final.live} live nodes, ${this.shared ? "registries list" : "registry lists"} ${final.listed}, ${final.viewsAgreeing}/${final.live} views agree` +
        (settled ? `; agreed ${settledMs}ms after the last action (and still did ${this.stableWindowMs}ms later)` : "; NO agreement"),
    );
    for (const p of this.problems.slice(0, 30)) this.say(`problem: ${p}`);
    if (this.problems.length > 30) this.say(`... and ${this.problems.length - 30} more problems`);
    const ok = settled && this.problems.length === 0;
    this.say(ok ? "OK: every registry's list and every node's view agree with the live set" : "FAILED");
    return { ok, seed: o.seed, actions: { ...this.actions }, live: final.live, listed: final.listed, viewsAgreeing: final.viewsAgreeing, settledMs, problems: [...this.problems] };
  }

  async cleanup(): Promise<void> {
    this.cleaningUp = true;
    this.store?.freeze(false);
    await Promise.allSettled([...this.all].map((p) => p[Symbol.asyncDispose]()));
    await this.store?.kill();
  }

  /** One random disturbance. */
  private act(): void {
    const action = this.pickAction();
    if (action === "idle") return;
    const live = this.liveSlots();
    const awake = live.filter((s) => !s.frozen);
    const empty = this.slots.filter((s) => !s.proc);
    const victim = <T>(from: T[]) => from[Math.floor(this.rand() * from.length)];
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
        const ms = this.freezeMs();
        this.say(`SIGSTOP node#${s.index} ${s.id} for ${ms}ms`);
        s.proc!.signal("SIGSTOP");
        s.frozen = setTimeout(() => this.thaw(s), ms);
        return;
      }
      case "start":
      case "restart-same": {
        const same = action === "restart-same";
        const s = victim(same ? empty.filter((x) => x.lastId) : empty)!;
        this.count(action);
        this.track(this.startNode(s, same));
        return;
      }
      case "registry-restart":
      case "registry-freeze": {
        const r = victim(this.registries.filter((x) => !x.down && !x.frozen))!;
        this.count(action);
        this.lastRegistryRestart = performance.now();
        if (action === "registry-restart") this.track(this.restartRegistry(r));
        else this.freezeRegistry(r);
        return;
      }
      case "store-restart":
      case "store-freeze":
        this.count(action);
        this.lastStoreAction = performance.now();
        this.track(action === "store-restart" ? this.restartStore() : this.freezeStore());
        return;
    }
  }

  /**
   * Weights keep the population near N, registries mostly up (one at a time
   * disturbed, spaced by two eviction bounds) and the store mostly reachable.
   * Every run restarts a registry at least once, and the store too when there
   * is one, however the dice fall.
   */
  private pickAction(): Action | "idle" {
    const live = this.liveSlots().length;
    const empty = this.slots.filter((s) => !s.proc);
    const spacing = 4 * this.o.heartbeatMs * MISSES;
    const now = performance.now();
    const registryQuiet = this.registries.every((r) => !r.down && !r.frozen) && now - this.lastRegistryRestart > spacing;
    const storeQuiet = this.shared && !this.storeBusy && now - this.lastStoreAction > spacing;
    if (registryQuiet && this.actions["registry-restart"] === 0 && now > this.midpoint) return "registry-restart";
    if (storeQuiet && this.actions["store-restart"] === 0 && now > this.midpoint) return "store-restart";
    return pick<Action | "idle">(
      [
        ["kill", live > 1 ? 3 : 0],
        ["term", live > 1 ? 1 : 0],
        ["freeze", live > 1 ? 1 : 0],
        ["start", empty.length ? 2 + (8 * empty.length) / this.o.nodes : 0],
        ["restart-same", empty.some((s) => s.lastId) ? 2 : 0],
        ["registry-restart", registryQuiet ? 0.4 : 0],
        ["registry-freeze", registryQuiet && this.shared ? 0.3 : 0],
        ["store-restart", storeQuiet ? 0.2 : 0],
        ["store-freeze", storeQuiet ? 0.2 : 0],
        ["idle", 1],
      ],
      this.rand,
    );
  }

  /** A freeze long enough to be noticed or not: 0.3 to 3 heartbeat timeouts. */
  private freezeMs(): number {
    return Math.round(this.o.heartbeatMs * MISSES * (0.3 + this.rand() * 2.7));
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
    const [first, ...more] = this.registries;
    const args = ["127.0.0.1", String(first!.port), ...more.flatMap((r) => ["--registry", `127.0.0.1:${r.port}`]), "--json", ...NODE_FLAGS];
    if (sameIdentity) args.push("--id", s.lastId!, "--port", String(s.lastPort));
    await this.spawnSlot();
    try {
      const proc = spawnScript<NodeLine>("client.ts", args, { label: `node#${s.index}` });
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

  private async restartRegistry(r: RegistrySlot): Promise<void> {
    r.down = true;
    this.say(`kill -9 registry#${r.index} (pid ${r.proc!.pid})`);
    await r.proc!.kill("SIGKILL");
    const downMs = Math.round(this.rand() * this.o.heartbeatMs * MISSES);
    await Bun.sleep(downMs); // the outage itself, not a wait for anything
    await this.startRegistry(r);
    this.lastRegistryRestart = performance.now();
    this.say(`registry#${r.index} restarted on port ${r.port} after ${downMs}ms down (pid ${r.proc!.pid}, boot ${r.proc!.log.named("listening")[0]!.boot})`);
  }

  private freezeRegistry(r: RegistrySlot): void {
    const ms = this.freezeMs();
    this.say(`SIGSTOP registry#${r.index} for ${ms}ms`);
    r.proc!.signal("SIGSTOP");
    r.frozen = setTimeout(() => this.thawRegistry(r), ms);
  }

  private thawRegistry(r: RegistrySlot): void {
    clearTimeout(r.frozen);
    r.frozen = undefined;
    this.say(`SIGCONT registry#${r.index}`);
    r.proc?.signal("SIGCONT");
  }

  /** kill -9 of the store, restarted empty on its port: the registries reconcile into a new epoch. */
  private async restartStore(): Promise<void> {
    this.storeBusy = true;
    try {
      this.say("kill -9 store");
      await this.store!.kill();
      const downMs = Math.round(this.rand() * this.o.heartbeatMs * MISSES);
      await Bun.sleep(downMs); // the outage itself
      await this.store!.restart();
      this.say(`store restarted empty after ${downMs}ms down`);
    } finally {
      this.storeBusy = false;
      this.lastStoreAction = performance.now();
    }
  }

  /** SIGSTOP of the store: to the registries it is a partition, found at their command deadline. */
  private async freezeStore(): Promise<void> {
    this.storeBusy = true;
    const ms = this.freezeMs();
    this.say(`SIGSTOP store for ${ms}ms`);
    this.store!.freeze(true);
    try {
      await Bun.sleep(ms); // the freeze itself
    } finally {
      this.store!.freeze(false);
      this.say("SIGCONT store");
      this.storeBusy = false;
      this.lastStoreAction = performance.now();
    }
  }

  /** Starts a registry process (on its old port, if it had one); retries a few times if the port is briefly held by someone else. */
  private async startRegistry(r: RegistrySlot): Promise<void> {
    const args = [
      "127.0.0.1",
      String(r.port),
      "--json",
      "--heartbeat",
      String(this.o.heartbeatMs),
      "--heartbeat-misses",
      String(MISSES),
      "--http",
      "0",
      "--http-host",
      "127.0.0.1",
      ...(this.store ? ["--store", this.store.url] : []),
    ];
    for (let attempt = 1; ; attempt++) {
      const proc = spawnScript<RegistryLine>("registry.ts", args, { label: `registry#${r.index}` });
      this.all.add(proc);
      try {
        const l = await proc.log.waitFor("listening", START_DEADLINE_MS, "registry to listen");
        const { http } = await withStatus(proc);
        Object.assign(r, { proc, port: Number(l.port), http, down: false });
        void proc.exited().then((code) => {
          if (proc === r.proc && !r.down && !this.cleaningUp) this.problems.push(`registry#${r.index} died by itself with code ${code}: ${proc.stderr.slice(-3).join(" | ")}`);
        });
        return;
      } catch (e) {
        if (attempt >= 10) throw e;
        this.say(`registry#${r.index} start attempt ${attempt} failed (${(e as Error).message}); retrying`);
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

  /** Compares the live set, every registry's list and every live node's view, once. */
  private async check(): Promise<{ live: number; listed: number; viewsAgreeing: number; problems: string[] }> {
    const live = new Map<string, Slot>();
    for (const s of this.liveSlots()) live.set(s.id!, s);
    const lists = await Promise.all(this.registries.map((r) => this.registryList(r)));
    const problems = lists.flatMap((l, i) => (typeof l === "string" ? [l] : listProblems(l, live, this.shared ? `registry#${i}` : "registry")));
    const shortest = Math.min(...lists.map((l) => (typeof l === "string" ? 0 : l.size)));
    let viewsAgreeing = 0;
    if (!problems.length) {
      const want = [...(lists[0] as Map<string, unknown>).keys()].sort();
      const views = await Promise.all([...live.values()].map((s) => askView(s.proc!).then((v) => ({ id: s.id!, ...v }), (e: Error) => e.message)));
      for (const v of views) {
        if (typeof v === "string") {
          problems.push(v);
          continue;
        }
        const expected = want.filter((id) => id !== v.id);
        if (v.registered && same(v.peers, expected)) {
          viewsAgreeing++;
          continue;
        }
        const missing = expected.filter((id) => !v.peers.includes(id));
        const extra = v.peers.filter((id) => !expected.includes(id));
        const dup = v.peers.length !== new Set(v.peers).size ? " (duplicates)" : "";
        problems.push(`node ${v.id}${v.registered ? "" : " (not registered)"} view differs: missing [${missing.join(",")}], extra [${extra.join(",")}]${dup}`);
      }
    }
    return { live: live.size, listed: shortest, viewsAgreeing, problems };
  }

  /** A registry's list from its /peers, or why it could not be read. */
  private async registryList(r: RegistrySlot): Promise<Map<string, { host: string; port: number }> | string> {
    if (r.down || !r.proc) return `registry#${r.index} is down`;
    return listed(r.http).catch((e: Error) => `registry#${r.index}: ${e.message}`);
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

/** What keeps one registry's list from being exactly the live nodes, each once, at their own ports. */
function listProblems(list: Map<string, { host: string; port: number }>, live: Map<string, Slot>, who: string): string[] {
  const problems: string[] = [];
  for (const [id, s] of live) {
    const entry = list.get(id);
    if (!entry) problems.push(`${who} misses live node#${s.index} ${id}`);
    else if (entry.port !== s.port) problems.push(`${who} lists ${id} at port ${entry.port}, the process listens on ${s.port}`);
  }
  for (const id of list.keys()) if (!live.has(id)) problems.push(`${who} lists ${id}, which is not running`);
  const byAddress = new Map<string, string>();
  for (const [id, e] of list) {
    const a = `${e.host}:${e.port}`;
    if (byAddress.has(a)) problems.push(`${who}: address ${a} listed twice (${byAddress.get(a)}, ${id})`);
    byAddress.set(a, id);
  }
  return problems;
}

if (import.meta.main) {
  killAllOnExit();
  await runScript(
    {
      name: "chaos",
      description:
        "Kill, freeze and restart nodes, registries and the store at random, then check that every registry's list and every node's view agree with the live nodes.",
    },
    {
      duration: { type: "string", description: "Seconds of chaos", default: "20" },
      nodes: { type: "string", description: "Node processes, 2 to 500 (more would only measure process start-up)", default: "50" },
      registries: { type: "string", description: "Registry processes, 1 to 5; 2 or more share a private redis-server (needs redis-server on PATH)", default: "1" },
      seed: { type: "string", description: "Seed for the choice of actions (default: random, printed)" },
      heartbeat: { type: "string", description: "Registry heartbeat in ms (eviction after 3 misses)", default: "300" },
      settle: { type: "string", description: "Seconds allowed to reach agreement after the chaos", default: "30" },
      json: { type: "boolean", description: "End with the report as one JSON line" },
    },
    async (args) => {
      const report = await runChaos({
        durationMs: intArg("duration", args.duration, 1) * 1000,
        nodes: intArg("nodes", args.nodes, 2, 500),
        registries: intArg("registries", args.registries, 1, 5),
        seed: args.seed === undefined ? Math.floor(Math.random() * 2 ** 31) : intArg("seed", args.seed),
        heartbeatMs: intArg("heartbeat", args.heartbeat, 50),
        settleMs: intArg("settle", args.settle, 1) * 1000,
      });
      const a = report.actions;
      process.stdout.write(
        `actions: ${a.kill} kill -9, ${a.term} SIGTERM, ${a.freeze} SIGSTOP, ${a.start} fresh starts, ${a["restart-same"]} restarts with the same id and port, ` +
          `${a["registry-restart"]} registry kill -9 + restart, ${a["registry-freeze"]} registry SIGSTOP, ${a["store-restart"]} store kill -9 + restart empty, ${a["store-freeze"]} store SIGSTOP\n`,
      );
      if (args.json) process.stdout.write(JSON.stringify({ event: "chaos-report", ...report }) + "\n");
      return report.ok ? 0 : 1;
    },
  );
}
