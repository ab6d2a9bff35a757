#!/usr/bin/env bun
/**
 * The benchmark: `bun run bench` (full, about 7 minutes on 2 cores) or
 * `bun bench/run.ts --quick` (CI smoke, under 30 s, thresholds not asserted).
 * Every measured party runs in its own process: the registry
 * (registry-proc.ts), the floor (floor.ts), the load generator (loadgen.ts),
 * the simulated registered nodes (holder.ts), in-process node fleets
 * (nodes-proc.ts), for the attack phase honest nodes (honest.ts) and each
 * attacker (attacker.ts), and for the "ha" phase (ha.ts) private
 * redis-servers. Loopback only. Writes results.json, BENCHMARKS.md and
 * sweep.svg (full run: bench/results.json, ./BENCHMARKS.md, bench/sweep.svg;
 * quick run: a temp directory unless --out is given).
 * `--help` lists the flags: a narrower sweep for profiling one cell, CPU
 * profiles, other registry versions measured in the same cells, the budget,
 * some of the attackers only, one phase measured again into the results
 * already there (--merge).
 */
import { mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { UsageError, intArg } from "../cli.ts";
import { Proc, ROOT, children, exec, killAll, killAllOnExit, runScript, spawnBun, testCerts, waitUntil, withDeadline, type AttackOptions } from "../harness.ts";
import { DEFAULTS } from "../protocol.ts";
import { haPhase } from "./ha.ts";
import { dist, fmt, mb, wallMs, type Msg } from "./lib.ts";
import { NoiseMeter, machineInfo } from "./machine.ts";
import { writeReport } from "./report.ts";

/** Everything sized here; the full run is what BENCHMARKS.md reports. */
const SIZES = {
  quick: {
    budgetMs: 90_000,
    counts: [0, 300],
    concs: [1, 16, 256],
    warmupMs: 100,
    durationMs: 300,
    held: [300, 1000],
    cpuWindowMs: 2_000,
    mesh: [20, 50],
    meshTimeoutMs: 15_000,
    observers: 3,
    killTrials: 4,
    freezeVictims: 3,
    freezeHeartbeatMs: 300,
    recoveryNodes: 20,
    recoveryTrials: 1,
    attack: {
      held: 300,
      heldSources: 6,
      windowMs: 1_500,
      honestPerSec: 20,
      honestSources: 10,
      syncConns: 16,
      syncs: 190,
      peersLoops: 2,
      churnLoops: 2,
      slowConsumers: 20,
    },
    tlsConcs: [1, 16],
    tlsResume: false,
    tlsMesh: 20,
    tlsMeshTimeoutMs: 20_000,
  },
  full: {
    budgetMs: 540_000,
    counts: [0, 1_000, 10_000],
    concs: [1, 16, 256],
    warmupMs: 300,
    durationMs: 1_500,
    held: [1_000, 10_000],
    cpuWindowMs: 6_000,
    mesh: [50, 200, 500],
    meshTimeoutMs: 40_000,
    observers: 5,
    killTrials: 20,
    freezeVictims: 8,
    freezeHeartbeatMs: DEFAULTS.heartbeatMs,
    recoveryNodes: 100,
    recoveryTrials: 3,
    attack: {
      held: 3_000,
      heldSources: 30,
      windowMs: 8_000,
      honestPerSec: 20,
      honestSources: 50,
      syncConns: 96,
      syncs: 190,
      peersLoops: 4,
      churnLoops: 8,
      slowConsumers: 200,
    },
    tlsConcs: [1, 16, 256],
    tlsResume: true,
    tlsMesh: 200,
    tlsMeshTimeoutMs: 120_000,
  },
};

/** Source addresses the sessions phase spreads its held nodes over. */
const SESSION_SOURCES = 50;

type Phase = "registration" | "sessions" | "mesh" | "departure" | "recovery" | "attack" | "ha" | "tls";
const PHASES: Phase[] = ["registration", "sessions", "mesh", "departure", "recovery", "attack", "ha", "tls"];

// Set once from the command line, before any phase runs.
let QUICK = false;
let CFG: (typeof SIZES)["quick"] = SIZES.full;
let PROFILE: string | undefined;
let COMPARE: string[] = [];
/** Keep the other phases' results from the results.json already there. */
let MERGE = false;
/** Attackers of the "attack" phase to run (after the window with none); all by default. */
let ATTACKERS: string[] | undefined;

const results: Msg = {};
let failed = false;
let overBudget = false;

async function main(out: string | undefined, only: string[] | undefined): Promise<number> {
  // Over the budget: stop the phase in progress (its children die, so its waits
  // fail at once), skip the rest, still write what was measured; exit hard if
  // even that hangs.
  const watchdog = setTimeout(() => {
    overBudget = true;
    log(`over the time budget of ${CFG.budgetMs} ms: stopping, writing what was measured`);
    killAll();
    setTimeout(() => {
      killAll();
      process.exit(1);
    }, 30_000).unref();
  }, CFG.budgetMs);
  const started = performance.now();
  const noise = new NoiseMeter();
  await noise.start(QUICK ? 300 : 1000);
  results.machine = await machineInfo();
  results.config = { quick: QUICK, ...CFG };
  results.command = QUICK ? "bun bench/run.ts --quick" : "bun run bench";
  results.date = new Date().toISOString();
  results.fdLimit = await fdLimit();
  log(`bench ${QUICK ? "(quick) " : ""}on ${(results.machine as Msg).cpu} x${(results.machine as Msg).cores}, fd limit ${results.fdLimit}`);

  const phases: Record<Phase, () => Promise<Msg>> = { registration, sessions, mesh, departure, recovery, attack, ha, tls };
  for (const phase of PHASES) {
    if (only && !only.includes(phase)) continue;
    if (overBudget) {
      failed = true;
      results[phase] = { error: "skipped: the run went over its time budget" };
      continue;
    }
    noise.mark(phase);
    const t = performance.now();
    try {
      results[phase] = { ...(results[phase] as Msg | undefined), ...(await phases[phase]()) };
    } catch (e) {
      failed = true;
      // Keep what the phase measured before it failed (it publishes rows as it goes).
      results[phase] = { ...(results[phase] as Msg | undefined), error: (e as Error).message };
      log(`${phase} FAILED: ${(e as Error).message}`);
    } finally {
      await closeAllChildren(PROFILE ? 10_000 : 1_000);
    }
    log(`${phase} done in ${((performance.now() - t) / 1000).toFixed(1)} s`);
  }
  noise.mark("end");
  results.noise = await noise.stop();
  results.totalMs = performance.now() - started;
  clearTimeout(watchdog);

  const paths = out
    ? { dir: out, json: join(out, "results.json"), md: join(out, "BENCHMARKS.md"), svg: join(out, "sweep.svg"), svgRef: "sweep.svg" }
    : {
        dir: join(ROOT, "bench"),
        json: join(ROOT, "bench", "results.json"),
        md: join(ROOT, "BENCHMARKS.md"),
        svg: join(ROOT, "bench", "sweep.svg"),
        svgRef: "bench/sweep.svg",
      };
  mkdirSync(paths.dir, { recursive: true });
  const written = MERGE ? await mergedInto(paths.json, only ?? PHASES) : results;
  await Bun.write(paths.json, JSON.stringify(written, null, 2) + "\n");
  await writeReport(written, paths);
  log(`wrote ${paths.json}, ${paths.md}, ${paths.svg} in ${(results.totalMs as number / 1000).toFixed(1)} s total`);
  return failed ? 1 : 0;
}

/**
 * --merge: the phases of this run replace theirs in the results.json already
 * there, the rest stays; `merged` lists the runs merged in so (the latest
 * last), each with its phases, date, command, machine, configuration and
 * noise, for the report. A run whose phases were all measured again drops out.
 */
async function mergedInto(json: string, phases: string[]): Promise<Msg> {
  const old = JSON.parse(await Bun.file(json).text()) as Msg;
  const compare = COMPARE.length ? ` --compare ${COMPARE.join(",")}` : "";
  const run = { phases, date: results.date, command: `bun bench/run.ts --only ${phases.join(",")} --merge${compare}`, machine: results.machine, config: results.config, noise: results.noise, totalMs: results.totalMs };
  // Each phase keeps its own run too; `merged` lists the runs merged in so far (the latest last), dropping one whose phases were all measured again.
  const earlier = (Array.isArray(old.merged) ? old.merged : old.merged ? [old.merged] : []) as Msg[];
  const kept = earlier.filter((m) => (m.phases as string[]).some((p) => !phases.includes(p)));
  return { ...old, ...Object.fromEntries(phases.map((p) => [p, { ...(results[p] as Msg), run }])), merged: [...kept, run] };
}

// --- phases ------------------------------------------------------------------

/** 1 and 6: registration round trips, registry (probe off and on) next to the floor, per (registered, concurrency) cell. */
async function registration(): Promise<Msg> {
  const fd = Number(results.fdLimit);
  const perHolder = Math.max(100, Math.min(5_000, Math.floor((fd - 300) / 2)));
  const counts = CFG.counts.filter((n) => n + 600 <= fd);
  const skipped = CFG.counts.filter((n) => !counts.includes(n));
  // Every registration here comes from 127.0.0.1 (one load generator, one host): per-address caps and rates off.
  const regOpts = { heartbeatMs: 60_000, maxConnsPerAddress: 0, rateAddressProbes: 0, rateAddressLines: 0 };
  const [off, on, floor, lg] = await Promise.all([
    startRegistryProc("registry(probe off)", { ...regOpts, probe: false }),
    startRegistryProc("registry(probe on)", { ...regOpts, probe: true }),
    startReady("floor", "bench/floor.ts", [], "listening"),
    startReady("loadgen", "bench/loadgen.ts", [], "ready"),
  ]);
  const floorPort = Number(floor.ready.port);
  await lg.child.request({ cmd: "listeners", count: Math.max(...CFG.concs) }, 20_000);
  const fleets = { off: new Fleet("off", off.port, false, perHolder), on: new Fleet("on", on.port, true, perHolder) };
  const others = await Promise.all(
    COMPARE.map(async (module, i) => {
      const reg = await startRegistryProc(`registry(${module})`, { ...regOpts, probe: false }, { BENCH_REGISTRY: module });
      return { module, reg, fleet: new Fleet(`c${i}-`, reg.port, false, perHolder) };
    }),
  );

  const cells: Msg[] = [];
  results.registration = { cells };
  const growth: Msg[] = [];
  for (const n of counts) {
    const t = performance.now();
    await Promise.all([fleets.off.growTo(n), fleets.on.growTo(n), ...others.map((o) => o.fleet.growTo(n))]);
    growth.push({ n, ms: performance.now() - t });
    for (const c of CFG.concs) {
      const cell: Msg = { registered: n, conc: c };
      cell.off = await registryCell(off, fleets.off, lg.child, c, `f${n}c${c}-`);
      cell.floor = await floorCell(floor.child, floorPort, lg.child, c, Number((cell.off as Msg).replyBytes), false, `x${n}c${c}-`);
      cell.on = await registryCell(on, fleets.on, lg.child, c, `p${n}c${c}-`);
      cell.floorDial = await floorCell(floor.child, floorPort, lg.child, c, Number((cell.on as Msg).replyBytes), true, `y${n}c${c}-`);
      if (others.length) {
        cell.compare = [];
        for (const [i, o] of others.entries()) {
          (cell.compare as Msg[]).push({ module: o.module, ...(await registryCell(o.reg, o.fleet, lg.child, c, `c${i}n${n}c${c}-`)) });
        }
      }
      cells.push(cell);
      log(cellLine(cell));
    }
  }
  return { cells, skipped, growth, perHolder };
}

/**
 * 2: sessions held at the default heartbeat: RSS, bytes per session, heartbeat
 * CPU and time to register, next to the floor holding as many sessions with
 * the same pings (its CPU window runs at the same time as the registry's).
 */
async function sessions(): Promise<Msg> {
  const fd = Number(results.fdLimit);
  const perHolder = Math.max(100, Math.min(5_000, Math.floor((fd - 300) / 2)));
  const counts = CFG.held.filter((n) => n + 600 <= fd);
  const hb = DEFAULTS.heartbeatMs;
  const [reg, floor] = await Promise.all([
    startRegistryProc("registry(sessions)", { maxConnsPerAddress: 0 }),
    startReady("floor", "bench/floor.ts", [], "listening"),
  ]);
  // Nodes on many hosts, as per-address limits expect them: 10,000 from one address would be refused by its probe rate.
  const fleet = new Fleet("s", reg.port, true, perHolder, hb, addresses("127.0.3.", SESSION_SOURCES));
  const floorFleet = new Fleet("fl", Number(floor.ready.port), false, perHolder, hb);
  const base = await reg.child.request({ cmd: "gc" }, 10_000);
  const floorBase = await floor.child.request({ cmd: "stats" }, 10_000);
  const rows: Msg[] = [];
  results.sessions = { rows, baseRss: Number(base.rss), floorBaseRss: Number(floorBase.rss), heartbeatMs: hb };
  for (const n of counts) {
    const t = performance.now();
    await fleet.growTo(n);
    const registerMs = performance.now() - t;
    await floorFleet.growTo(n);
    const check = await reg.child.request({ cmd: "stats" }, 10_000);
    if (Number(check.nodes) !== n) throw new Error(`registry holds ${String(check.nodes)} nodes, expected ${n}`);
    // Let the registration burst settle (GC, queued pushes), then measure a window of heartbeats only.
    await Bun.sleep(QUICK ? 300 : 1_000);
    const [a, fa] = await Promise.all([reg.child.request({ cmd: "stats" }, 10_000), floor.child.request({ cmd: "stats" }, 10_000)]);
    await Bun.sleep(CFG.cpuWindowMs); // the measuring window itself
    const [b, fb] = await Promise.all([reg.child.request({ cmd: "stats" }, 10_000), floor.child.request({ cmd: "stats" }, 10_000)]);
    const g = await reg.child.request({ cmd: "gc" }, 20_000);
    const pct = (x: Msg, y: Msg) => ((Number(y.cpuMs) - Number(x.cpuMs)) / (Number(y.t) - Number(x.t))) * 100;
    const row = {
      nodes: n,
      registerMs,
      rss: Number(b.rss),
      rssAfterGc: Number(g.rss),
      heapUsed: Number(g.heapUsed),
      bytesPerSession: (Number(b.rss) - Number(base.rss)) / n,
      bytesPerSessionAfterGc: (Number(g.rss) - Number(base.rss)) / n,
      heartbeatCpuPct: pct(a, b),
      floorCpuPct: pct(fa, fb),
      floorRss: Number(fb.rss),
      floorBytesPerSession: (Number(fb.rss) - Number(floorBase.rss)) / n,
      pingsPerSec: n / (hb / 1000),
      windowMs: Number(b.t) - Number(a.t),
      evicted: Number((g.leaves as Msg).timeout),
    };
    rows.push(row);
    log(
      `sessions ${n}: registered in ${fmt(registerMs)} ms, RSS ${mb(row.rss)} MB (${mb(row.rssAfterGc)} after GC; floor ${mb(row.floorRss)}), ` +
        `heartbeat CPU ${row.heartbeatCpuPct.toFixed(2)}% (floor ${row.floorCpuPct.toFixed(2)}%)`,
    );
  }
  return { baseRss: Number(base.rss), floorBaseRss: Number(floorBase.rss), rows, heartbeatMs: hb };
}

/** 3: full mesh of in-process nodes joining one after another. */
async function mesh(): Promise<Msg> {
  const reg = await startRegistryProc("registry(mesh)", { maxConnsPerAddress: 0 });
  const rows: Msg[] = [];
  results.mesh = { rows };
  for (const n of CFG.mesh) {
    const nodes = await startReady("nodes", "bench/nodes-proc.ts", [], "ready");
    const r = await nodes.child.request({ cmd: "mesh", n, registryPort: reg.port, timeoutMs: CFG.meshTimeoutMs }, CFG.meshTimeoutMs + 30_000);
    await nodes.child.close();
    rows.push(r);
    log(`mesh ${n}: ${r.complete ? "complete" : "INCOMPLETE"} in ${fmt(Number(r.meshMs))} ms (${fmt(Number(r.greetingsPerSec))} greetings/s, ${String(r.failed)} failed)`);
    // The next fleet starts against an empty registry.
    await waitUntil(async () => Number((await reg.child.request({ cmd: "stats" }, 5_000)).nodes) === 0, 10_000, "registry to empty", 2);
  }
  return { rows };
}

/** 4: kill -9 of a node process -> peer-left at the others; SIGSTOP -> eviction by heartbeat. */
async function departure(): Promise<Msg> {
  const hb = CFG.freezeHeartbeatMs;
  const misses = DEFAULTS.heartbeatMisses;
  const reg = await startRegistryProc("registry(departure)", { maxConnsPerAddress: 0, heartbeatMs: hb, events: ["node-left"] });
  const obs = await startReady("observers", "bench/nodes-proc.ts", [], "ready");
  await obs.child.request({ cmd: "start", n: CFG.observers, registryPort: reg.port, events: ["peer-joined", "peer-left"] }, 30_000);

  // A victim is a process running one node (startNode), which reports its own pid.
  const spawnVictims = async (count: number) => {
    const vs = Array.from({ length: count }, (_, i) => spawnChild(`victim${i}`, "bench/nodes-proc.ts", [], { timeoutMs: 120_000, hardTimeoutS: 120 }));
    const ids: string[] = [];
    for (const v of vs) {
      await v.log.waitFor("ready", 20_000, "victim ready");
      const r = await v.request({ cmd: "start", n: 1, registryPort: reg.port }, 20_000);
      ids.push(String((r.ids as string[])[0]));
    }
    for (const id of ids) await obs.child.log.waitForCount((m) => m.event === "peer-joined" && m.peer === id, CFG.observers, 10_000, `observers to see ${id}`);
    return vs.map((child, i) => ({ child, id: ids[i]! }));
  };

  // kill -9, one at a time, so each close is detected and pushed on its own.
  const killPushed: number[] = [];
  const killDetected: number[] = [];
  const batch = Math.min(10, CFG.killTrials);
  for (let done = 0; done < CFG.killTrials; done += batch) {
    const victims = await spawnVictims(Math.min(batch, CFG.killTrials - done));
    for (const v of victims) {
      const t0 = wallMs();
      v.child.signal("SIGKILL");
      const seen = await obs.child.log.waitForCount((m) => m.event === "peer-left" && m.peer === v.id, CFG.observers, 10_000, `peer-left ${v.id}`);
      for (const e of seen) killPushed.push(Number(e.t) - t0);
      const d = await reg.child.log.waitFor((m) => m.event === "node-left" && m.id === v.id, 5_000, "node-left");
      killDetected.push(Number(d.t) - t0);
      await v.child.exited();
    }
  }
  log(`kill -9: pushed p50 ${fmt(dist(killPushed).p50)} p99 ${fmt(dist(killPushed).p99)} ms`);

  // SIGSTOP: the victims are frozen at moments spread over one heartbeat
  // interval, so the trials sample every phase of the ping cycle and the sweep.
  const sweepMs = Math.max(50, Math.min(hb / 2, DEFAULTS.registerTimeoutMs / 4, 1000));
  const boundMs = hb * misses + sweepMs;
  const victims = await spawnVictims(CFG.freezeVictims);
  const stoppedAt = new Map<string, number>();
  for (const [i, v] of victims.entries()) {
    if (i) await Bun.sleep(hb / victims.length); // spreads the freezes over one interval
    stoppedAt.set(v.id, wallMs());
    v.child.signal("SIGSTOP");
  }
  const evictPushed: number[] = [];
  const evictDetected: number[] = [];
  const reasons = new Set<string>();
  for (const v of victims) {
    const e = await obs.child.log.waitFor((m) => m.event === "peer-left" && m.peer === v.id, boundMs + 10_000, `eviction of ${v.id}`);
    reasons.add(String(e.reason));
    evictPushed.push(Number(e.t) - stoppedAt.get(v.id)!);
    const d = await reg.child.log.waitFor((m) => m.event === "node-left" && m.id === v.id, 5_000, "node-left");
    evictDetected.push(Number(d.t) - stoppedAt.get(v.id)!);
  }
  for (const v of victims) await v.child.kill();
  log(`SIGSTOP: evicted p50 ${fmt(dist(evictPushed).p50)} max ${fmt(dist(evictPushed).max)} ms (bound ${boundMs} ms)`);
  return {
    observers: CFG.observers,
    kill: { trials: CFG.killTrials, pushedMs: dist(killPushed), detectedMs: dist(killDetected) },
    freeze: {
      trials: CFG.freezeVictims,
      heartbeatMs: hb,
      misses,
      sweepMs,
      boundMs,
      pushedMs: dist(evictPushed),
      detectedMs: dist(evictDetected),
      reasons: Array.from(reasons),
    },
  };
}

/** 7: several registries on one Redis store (bench/ha.ts); what it measures so far is kept if it fails. */
async function ha(): Promise<Msg> {
  const out: Msg = {};
  results.ha = out;
  const perHolder = Math.max(100, Math.min(5_000, Math.floor((Number(results.fdLimit) - 300) / 2)));
  let fleets = 0;
  return haPhase(
    {
      quick: QUICK,
      concs: CFG.concs,
      compare: COMPARE,
      startRegistry: (label, opts, env) => startRegistryProc(label, opts, env),
      startReady,
      // Fleets on one shared list must not register the same addresses: each gets its own port range.
      fleet: (tag, port, probe, pingMs = 0, failover = []) => new Fleet(tag, port, probe, perHolder, pingMs, undefined, failover, 1024 + (fleets++ % 6) * 5_000),
      registryCell,
      closeChildren: () => closeAllChildren(PROFILE ? 10_000 : 1_000),
      log,
    },
    out,
  );
}

/** 5: kill -9 of the registry, a new one on the same port, until every node is registered again. */
async function recovery(): Promise<Msg> {
  let reg = await startRegistryProc("registry(recovery)", { maxConnsPerAddress: 0 });
  const port = reg.port;
  const nodes = await startReady("nodes", "bench/nodes-proc.ts", [], "ready");
  const n = CFG.recoveryNodes;
  await nodes.child.request({ cmd: "start", n, registryPort: port, events: ["registered"] }, 60_000);
  const trials: Msg[] = [];
  for (let i = 0; i < CFG.recoveryTrials; i++) {
    const mark = nodes.child.log.events.length;
    const killedAt = wallMs();
    await reg.child.kill();
    reg = await startRegistryProc("registry(recovery)", { maxConnsPerAddress: 0, port });
    const listeningAt = Number(reg.ready.t);
    const back = new Map<number, number>();
    await waitUntil(
      () => {
        for (const e of nodes.child.log.events.slice(mark)) if (e.event === "registered" && e.again) back.set(Number(e.node), Number(e.t));
        return back.size >= n;
      },
      30_000,
      `${n} nodes to register again`,
      2,
    );
    const last = Math.max(...back.values());
    const trial = { restartMs: listeningAt - killedAt, fromRestartMs: last - listeningAt, fromKillMs: last - killedAt, nodes: back.size };
    trials.push(trial);
    log(`recovery ${i + 1}: registry back after ${fmt(trial.restartMs)} ms, all ${n} nodes ${fmt(trial.fromRestartMs)} ms later`);
    const s = await reg.child.request({ cmd: "stats" }, 5_000);
    if (Number(s.nodes) !== n) throw new Error(`registry holds ${String(s.nodes)} nodes after recovery, expected ${n}`);
  }
  return { nodes: n, trials, reconnectMaxMs: DEFAULTS.reconnectMaxMs, reconnectBaseMs: DEFAULTS.reconnectBaseMs };
}

/**
 * 7: under attack. Honest registrations (probe on, a fresh connection each,
 * from addresses of their own) next to held sessions that read and ping,
 * with no attacker, then with each attacker in turn from an address of its
 * own, all against one registry (status server on, defaults otherwise).
 */
async function attack(): Promise<Msg> {
  const A = CFG.attack;
  const reg = await startRegistryProc("registry(attack)", { http: true, sampleLag: true });
  const fleet = new Fleet("a", reg.port, true, A.held, DEFAULTS.heartbeatMs, addresses("127.0.2.", A.heldSources));
  const t = performance.now();
  await fleet.growTo(A.held);
  const growMs = performance.now() - t;
  const honestOpts = { sources: addresses("127.0.1.", A.honestSources), slots: 4 };
  const honest = await startReady("honest", "bench/honest.ts", [JSON.stringify(honestOpts)], "ready");
  const base = await reg.child.request({ cmd: "gc" }, 10_000);
  const rows: Msg[] = [];
  const info = { held: A.held, heldSources: A.heldSources, honestSources: A.honestSources, growMs, budget: Number(base.maxUnsentBytes), baseRss: Number(base.rss), rows };
  results.attack = info;
  log(`attack: ${A.held} held sessions registered in ${fmt(growMs)} ms, registry RSS ${mb(Number(base.rss))} MB after GC`);
  for (const sc of scenarios(reg.port, Number(reg.ready.httpPort))) {
    const row = await attackWindow(reg, fleet, honest.child, sc);
    rows.push(row);
    log(attackLine(row));
  }
  return info;
}

interface Scenario {
  name: string;
  opts?: AttackOptions;
}

/** No attacker, then each attacker of issue 11, each from an address of its own. */
function scenarios(port: number, httpPort: number): Scenario[] {
  const A = CFG.attack;
  const all: Scenario[] = [
    { name: "sync-spam", opts: { kind: "sync-spam", port, from: "127.0.0.2", width: A.syncConns, syncs: A.syncs } },
    { name: "ping-flood", opts: { kind: "ping-flood", port, from: "127.0.0.3", width: 1 } },
    { name: "peers-flood", opts: { kind: "peers-flood", port: httpPort, from: "127.0.0.4", width: A.peersLoops } },
    { name: "churn", opts: { kind: "churn", port, from: "127.0.0.5", width: A.churnLoops } },
    { name: "slow-consumers", opts: { kind: "slow-consumers", port, from: "127.0.0.6", width: A.slowConsumers } },
  ];
  return [{ name: "none" }, ...all.filter((x) => !ATTACKERS || ATTACKERS.includes(x.name))];
}

/** One measured window: the attacker in place, honest registrations for windowMs, then what the registry and the held sessions went through. */
async function attackWindow(reg: RegistryProc, fleet: Fleet, honest: Child, sc: Scenario): Promise<Msg> {
  const A = CFG.attack;
  const atk = sc.opts ? spawnChild(`attacker ${sc.name}`, "bench/attacker.ts", [JSON.stringify(sc.opts)]) : undefined;
  try {
    if (atk) await atk.log.waitFor("attacking", 30_000, `the ${sc.name} attacker in place`);
    const stats = () => atk?.request({ cmd: "stats" }, 10_000);
    const [before, held0, atk0] = await Promise.all([reg.child.request({ cmd: "window" }, 10_000), fleet.sessions(), stats()]);
    const run = { cmd: "run", port: reg.port, ratePerSec: A.honestPerSec, durationMs: A.windowMs, prefix: `h-${sc.name}-`, timeoutMs: 10_000 };
    const h = await honest.request(run, A.windowMs + 30_000);
    const [after, atk1] = await Promise.all([reg.child.request({ cmd: "window" }, 10_000), stats()]);
    // The held sessions, still under attack, get every change of the window.
    const d = await fleet.delivered(Number(after.seq), QUICK ? 5_000 : 15_000);
    const held1 = await fleet.sessions();
    const ms = Number(after.t) - Number(before.t);
    return {
      name: sc.name,
      attacker: sc.opts,
      attack: atk0 && atk1 ? { ...delta(atk0, atk1), windowMs: ms } : undefined,
      attackTotal: atk1,
      honest: h,
      heldEvicted: held1.closed - held0.closed,
      heldRegistered: held1.registered,
      deliveryLagMs: d.ms,
      delivered: d.reached,
      lagMaxMs: after.lagMaxMs,
      lagP99Ms: after.lagP99Ms,
      worstStall: after.worstStall,
      thread: after.thread,
      stalledMs: Number(after.stalledMs) - Number(before.stalledMs),
      rssPeak: after.rssPeak,
      unsentPeak: after.unsentPeak,
      cpuPct: ((Number(after.cpuMs) - Number(before.cpuMs)) / ms) * 100,
      rejected: delta(before.rejected as Msg, after.rejected as Msg),
      leaves: delta(before.leaves as Msg, after.leaves as Msg),
      windowMs: ms,
    };
  } finally {
    await atk?.close();
    // The next window starts clean: the attacker's sessions gone, their backlog freed.
    let last: Msg = {};
    await waitUntil(
      async () => {
        last = await reg.child.request({ cmd: "stats" }, 10_000);
        return Number(last.nodes) === A.held && Number(last.unsentBytes) < 1e6;
      },
      30_000,
      `the registry to settle after ${sc.name}`,
      100,
    ).catch((e: Error) => {
      throw new Error(`${e.message} (${A.held} held sessions; last stats: ${JSON.stringify(last)})`);
    });
  }
}

function attackLine(r: Msg): string {
  const h = r.honest as Msg;
  const l = h.latencyMs as Msg;
  const refused = Number(h.attempts) - Number(h.registered);
  const a = r.attack as Msg | undefined;
  const did = a ? ` | attacker: ${fmt(Number(a.lines) / (Number(a.windowMs) / 1000))} lines/s, ${fmt(Number(a.responses))} responses, codes ${JSON.stringify(a.codes)}` : "";
  return (
    `attack ${String(r.name)}: honest p50 ${fmt(Number(l.p50))} p99 ${fmt(Number(l.p99))} max ${fmt(Number(l.max))} ms (${String(h.registered)}/${String(h.attempts)}` +
    `${refused ? `, REFUSED ${JSON.stringify(h.refused)}` : ""}), held evicted ${String(r.heldEvicted)}, stall ${fmt(Number(r.lagMaxMs))} ms, ` +
    `(${stallText(r.worstStall as Msg | undefined)}), ` +
    `RSS ${mb(Number(r.rssPeak))} MB, unsent ${mb(Number(r.unsentPeak))} MB, CPU ${fmt(Number(r.cpuPct))}%${did}`
  );
}

function stallText(w: Msg | undefined): string {
  return w ? `ran ${fmt(Number(w.ranMs))} ms, waited for a core ${fmt(Number(w.queuedMs))} ms, handlers ${JSON.stringify(w.handlerMs)}` : "";
}

/** `prefix` + 1..n: loopback addresses (all of 127/8 is loopback on Linux). */
function addresses(prefix: string, n: number): string[] {
  return Array.from({ length: n }, (_, i) => `${prefix}${i + 1}`);
}

/** b - a for every number in b, nested objects too (counters taken before and after a window). */
function delta(a: Msg | undefined, b: Msg): Msg {
  const out: Msg = {};
  for (const [k, v] of Object.entries(b)) {
    if (typeof v === "number") out[k] = v - Number(a?.[k] ?? 0);
    else if (v && typeof v === "object") out[k] = delta(a?.[k] as Msg | undefined, v as Msg);
  }
  return out;
}

/**
 * 8: TLS. Registration round trips on a fresh connection each, probe off, at
 * no registered nodes: plain registry and floor, TLS registry and a bare TLS
 * floor (Bun.listen's own `tls`) with full handshakes, and with resumed
 * sessions; then mesh formation in mutual TLS next to plain TCP.
 */
async function tls(): Promise<Msg> {
  await using certs = await testCerts(Array.from({ length: CFG.tlsMesh }, (_, i) => `node-${i}`));
  const { cert, key } = certs.mesh.registry!;
  // Thousands of registrations a second from one address: its line rate limit would answer them instead.
  const regOpts = { heartbeatMs: 60_000, maxConnsPerAddress: 0, probe: false, rateAddressLines: 0 };
  const [plain, secure, floor, tlsFloor, lg] = await Promise.all([
    startRegistryProc("registry(plain)", regOpts),
    startRegistryProc("registry(tls)", { ...regOpts, tls: { cert, key } }),
    startReady("floor", "bench/floor.ts", [], "listening"),
    startReady("floor(tls)", "bench/floor.ts", [cert, key], "listening"),
    startReady("loadgen", "bench/loadgen.ts", [], "ready"),
  ]);
  await lg.child.request({ cmd: "listeners", count: Math.max(...CFG.tlsConcs) }, 20_000);
  const ca = await Bun.file(certs.mesh.ca).text();
  const handshake = (resume: boolean) => ({ ca, serverName: "localhost", resume });
  const none = (tag: string, port: number) => new Fleet(tag, port, false, 1);
  const floorPort = (f: typeof floor) => Number(f.ready.port);
  const cells: Msg[] = [];
  results.tls = { cells };
  for (const c of CFG.tlsConcs) {
    const cell: Msg = { conc: c };
    cell.plain = await registryCell(plain, none("p", plain.port), lg.child, c, `tp${c}-`);
    const bytes = Number((cell.plain as Msg).replyBytes);
    cell.floor = await floorCell(floor.child, floorPort(floor), lg.child, c, bytes, false, `tf${c}-`);
    cell.tls = await registryCell(secure, none("t", secure.port), lg.child, c, `tt${c}-`, handshake(false));
    cell.tlsFloor = await floorCell(tlsFloor.child, floorPort(tlsFloor), lg.child, c, bytes, false, `tx${c}-`, handshake(false));
    if (CFG.tlsResume) {
      cell.resumed = await registryCell(secure, none("r", secure.port), lg.child, c, `tr${c}-`, handshake(true));
      cell.resumedFloor = await floorCell(tlsFloor.child, floorPort(tlsFloor), lg.child, c, bytes, false, `ty${c}-`, handshake(true));
    }
    cells.push(cell);
    log(tlsCellLine(cell));
  }
  await closeAllChildren(1_000);
  const meshRows: Msg[] = [];
  (results.tls as Msg).mesh = meshRows;
  for (const mode of ["plain", "mutual TLS"] as const) {
    const reg = await startRegistryProc(`registry(mesh, ${mode})`, { maxConnsPerAddress: 0, ...(mode === "plain" ? {} : { tls: { cert, key, meshCa: certs.mesh.ca } }) });
    const nodes = await startReady("nodes", "bench/nodes-proc.ts", [], "ready");
    const cmd = { cmd: "mesh", n: CFG.tlsMesh, registryPort: reg.port, timeoutMs: CFG.tlsMeshTimeoutMs, ...(mode === "plain" ? {} : { certs: certs.mesh.dir }) };
    const r = await nodes.child.request(cmd, CFG.tlsMeshTimeoutMs + 60_000);
    meshRows.push({ mode, ...r });
    log(`mesh ${CFG.tlsMesh} ${mode}: ${r.complete ? "complete" : "INCOMPLETE"} in ${fmt(Number(r.meshMs))} ms (${fmt(Number(r.greetingsPerSec))} greetings/s, ${String(r.failed)} failed)`);
    await closeAllChildren(1_000);
  }
  return { cells, mesh: meshRows };
}

function tlsCellLine(cell: Msg): string {
  const f = (m: Msg | undefined) => (m ? `${fmt(Number(m.throughput))}/s${Number(m.errors) ? ` ERR ${String(m.errors)}` : ""}` : "-");
  const x = (a: Msg | undefined, b: Msg | undefined) => (a && b ? `${(Number(a.throughput) / Number(b.throughput)).toFixed(2)}x` : "-");
  const t = cell.tls as Msg;
  const tf = cell.tlsFloor as Msg;
  return `tls c=${String(cell.conc)}: plain ${f(cell.plain as Msg)} (floor ${f(cell.floor as Msg)}) | TLS ${f(t)} (TLS floor ${f(tf)}, ${x(t, tf)}) | resumed ${f(cell.resumed as Msg | undefined)} (floor ${f(cell.resumedFloor as Msg | undefined)}, ${x(cell.resumed as Msg | undefined, cell.resumedFloor as Msg | undefined)})`;
}

// --- children ----------------------------------------------------------------

/** A child speaking JSON lines (bench/lib.ts serveCommands): requests carry an id, replies echo it; other lines are events. */
export class Child extends Proc {
  private nextId = 1;
  private readonly pending = new Map<number, PromiseWithResolvers<Msg>>();
  /** The process's own pid as it reported it (differs from `pid` under a `timeout` wrapper). */
  private realPid: number | undefined;

  constructor(label: string, proc: Bun.Subprocess<"ignore" | "pipe", "pipe", "pipe">) {
    super(proc, label);
    void this.exited().then((code) => {
      for (const p of this.pending.values()) p.reject(new Error(`${label} exited (${code}) ${this.stderr.slice(-5).join(" | ")}`));
      this.pending.clear();
    });
  }

  /** Sends a command and waits for its reply; a reply with `error` rejects. */
  async request(cmd: Msg, timeoutMs: number): Promise<Msg> {
    if (!this.running) throw new Error(`${this.label} is not running`);
    const id = this.nextId++;
    const reply = Promise.withResolvers<Msg>();
    this.pending.set(id, reply);
    const stdin = this.proc.stdin as Bun.FileSink;
    stdin.write(JSON.stringify({ ...cmd, id }) + "\n");
    stdin.flush();
    const m = await withDeadline(reply.promise, timeoutMs, `${this.label}: reply to ${String(cmd.cmd)}`);
    if (m.error) throw new Error(`${this.label}: ${String(cmd.cmd)} failed: ${String(m.error)}`);
    return m;
  }

  override signal(signal: NodeJS.Signals): void {
    if (this.realPid === undefined) return super.signal(signal);
    try {
      if (this.running) process.kill(this.realPid, signal);
    } catch {
      // already gone
    }
  }

  /** Closes stdin (the child exits on its own, writing a profile if it has one), then kills it if it lingers. */
  async close(graceMs = 3_000): Promise<void> {
    if (!this.running) return;
    try {
      (this.proc.stdin as Bun.FileSink).end();
    } catch {
      // already closed
    }
    await withDeadline(this.exited(), graceMs, "exit").catch(() => this.kill());
  }

  protected override onJson(m: Msg & { event: string }): void {
    if (this.realPid === undefined && typeof m.pid === "number") this.realPid = m.pid;
    const reply = typeof m.id === "number" ? this.pending.get(m.id) : undefined;
    if (!reply) return super.onJson(m);
    this.pending.delete(m.id as number);
    reply.resolve(m);
  }
}

/**
 * Starts `bun <script> <args>` as a Child with the fd soft limit raised to
 * the hard limit (max 65536). `timeoutMs` is a safety net: Bun kills the
 * child when it expires.
 */
function spawnChild(label: string, script: string, args: string[], o: { timeoutMs?: number; bunArgs?: string[]; env?: Record<string, string>; hardTimeoutS?: number } = {}): Child {
  const raise = 'h=$(ulimit -Hn); [ "$h" = unlimited ] && h=65536; [ "$h" -gt 65536 ] && h=65536; ulimit -n "$h"; exec "$0" "$@"';
  // A process we SIGSTOP cannot notice its stdin closing; coreutils `timeout`
  // kills it even if this orchestrator is gone.
  const hard = o.hardTimeoutS && Bun.which("timeout") ? ["timeout", "-s", "KILL", String(o.hardTimeoutS)] : [];
  const env = { NODE_ENV: "production", ...o.env };
  return new Child(label, spawnBun(script, args, { prefix: ["sh", "-c", raise, ...hard], bunArgs: o.bunArgs, stdin: "pipe", env, timeoutMs: o.timeoutMs ?? 600_000 }));
}

/** Asks every child to exit (stdin closed; profiles get written), kills what is left after `graceMs`. */
async function closeAllChildren(graceMs: number): Promise<void> {
  await Promise.allSettled(Array.from(children, (c) => (c instanceof Child ? c.close(graceMs) : c.kill())));
}

/** The file-descriptor limit children get: the hard limit, capped at 65536. */
async function fdLimit(): Promise<number> {
  const text = (await exec(["sh", "-c", "ulimit -Hn"], 5_000)).stdout.trim();
  return text === "unlimited" ? 65536 : Math.min(65536, Number(text) || 1024);
}

// --- helpers -----------------------------------------------------------------

/** Simulated registered nodes on one registry, spread over holder processes (fd limit). */
export class Fleet {
  private holders: Child[] = [];
  constructor(
    readonly tag: string,
    readonly port: number,
    readonly probe: boolean,
    readonly perHolder: number,
    readonly pingMs = 0,
    /** Loopback addresses the sessions connect from, spread evenly (default: 127.0.0.1 only). */
    readonly sources?: string[],
    /** Ports of more registries sharing the list: a session its registry closes registers with the next. */
    readonly failover: number[] = [],
    /** First port the simulated nodes register (without the probe): fleets on one shared list need their own. */
    readonly portBase = 1024,
  ) {}

  get children(): Child[] {
    return this.holders;
  }

  async growTo(n: number): Promise<void> {
    const need = Math.ceil(n / this.perHolder);
    while (this.holders.length < need) {
      const k = this.holders.length;
      const opts = { port: this.port, prefix: `${this.tag}${k}-`, portBase: this.portBase + k * this.perHolder, probe: this.probe, pingMs: this.pingMs, sources: this.sources, failover: this.failover };
      const h = spawnChild(`holder ${this.tag}${k}`, "bench/holder.ts", [JSON.stringify(opts)]);
      await h.log.waitFor("ready", 20_000, "holder ready");
      this.holders.push(h);
    }
    const rs = await Promise.all(
      this.holders.map((h, k) => h.request({ cmd: "grow", to: Math.max(0, Math.min(this.perHolder, n - k * this.perHolder)), conc: 32 }, 180_000)),
    );
    const errors = rs.reduce((a, r) => a + Number(r.errors), 0);
    if (errors) throw new Error(`${errors} simulated nodes failed to register: ${rs.map((r) => r.lastError).join(" ")}`);
  }

  /** Sessions registered and still open, and those closed after registering (evicted, in a fleet that never leaves). */
  async sessions(): Promise<{ registered: number; closed: number }> {
    const rs = await Promise.all(this.holders.map((h) => h.request({ cmd: "stats" }, 10_000)));
    return { registered: rs.reduce((a, r) => a + Number(r.registered), 0), closed: rs.reduce((a, r) => a + Number(r.closed), 0) };
  }

  /** Bytes of pushes the fleet has received so far. */
  async pushBytes(): Promise<number> {
    const rs = await Promise.all(this.holders.map((h) => h.request({ cmd: "stats" }, 10_000)));
    return rs.reduce((a, r) => a + Number(r.pushBytes), 0);
  }

  /** Waits until every held session has seen `seq`; returns the time that took. */
  async delivered(seq: number, timeoutMs: number): Promise<{ ms: number; reached: boolean }> {
    if (!this.holders.length) return { ms: 0, reached: true };
    const rs = await Promise.all(this.holders.map((h) => h.request({ cmd: "waitSeq", seq, timeoutMs }, timeoutMs + 5_000)));
    return { ms: Math.max(...rs.map((r) => Number(r.ms))), reached: rs.every((r) => r.reached) };
  }
}

async function registryCell(reg: RegistryProc, fleet: Fleet, lg: Child, c: number, prefix: string, tls?: Msg): Promise<Msg> {
  const before = await reg.child.request({ cmd: "stats" }, 10_000);
  const pushBefore = await fleet.pushBytes();
  const r = await lg.request(cellCmd(reg.port, c, prefix, tls), cellTimeout(fleet.children.length ? 10_000 : 0));
  const after = await reg.child.request({ cmd: "stats" }, 10_000);
  const changes = Number(after.seq) - Number(before.seq);
  // With sessions listening: how long until every one of them has every change of this cell.
  const d = await fleet.delivered(Number(after.seq), QUICK ? 5_000 : 15_000);
  const registrations = Number(after.registrations) - Number(before.registrations);
  return {
    ...r,
    changes,
    deliveryLagMs: d.ms,
    delivered: d.reached,
    changesPerSec: changes / ((Number(r.wallMs) + d.ms) / 1000),
    serverCpuUsPerReq: ((Number(after.cpuMs) - Number(before.cpuMs)) * 1000) / Math.max(1, Number(r.completedTotal)),
    fanoutBytesPerReg: registrations ? ((await fleet.pushBytes()) - pushBefore) / registrations : 0,
    registryLatencyMs: after.latencyMs,
    rejected: after.rejected,
  };
}

async function floorCell(floor: Child, port: number, lg: Child, c: number, bytes: number, dial: boolean, prefix: string, tls?: Msg): Promise<Msg> {
  await floor.request({ cmd: "reply", bytes: Math.round(bytes || 200), dial }, 5_000);
  const before = await floor.request({ cmd: "stats" }, 10_000);
  const r = await lg.request(cellCmd(port, c, prefix, tls), cellTimeout(0));
  const after = await floor.request({ cmd: "stats" }, 10_000);
  return { ...r, serverCpuUsPerReq: ((Number(after.cpuMs) - Number(before.cpuMs)) * 1000) / Math.max(1, Number(r.completedTotal)) };
}

function cellCmd(port: number, conc: number, prefix: string, tls?: Msg): Msg {
  return { cmd: "run", port, conc, warmupMs: CFG.warmupMs, durationMs: CFG.durationMs, prefix, ...(tls ? { tls } : {}) };
}

function cellTimeout(registered: number): number {
  return CFG.warmupMs + CFG.durationMs + 45_000 + registered;
}

export interface RegistryProc {
  child: Child;
  port: number;
  ready: Msg;
}

async function startRegistryProc(label: string, opts: Msg, env: Record<string, string> = {}): Promise<RegistryProc> {
  const bunArgs = PROFILE ? ["--cpu-prof", "--cpu-prof-md", `--cpu-prof-dir=${PROFILE}`] : [];
  for (let attempt = 0; ; attempt++) {
    const child = spawnChild(label, "bench/registry-proc.ts", [JSON.stringify({ port: 0, ...opts })], { bunArgs, env });
    try {
      const ready = await child.log.waitFor("listening", 20_000, `${label} listening`);
      return { child, port: Number(ready.port), ready };
    } catch (e) {
      // A restart on a fixed port can race the old socket's teardown: retry a few times.
      if (attempt >= 4 || !opts.port) throw e;
      await Bun.sleep(100);
    }
  }
}

async function startReady(label: string, script: string, args: string[], event: string): Promise<{ child: Child; ready: Msg }> {
  const child = spawnChild(label, script, args);
  const ready = await child.log.waitFor(event, 20_000, `${label} ${event}`);
  return { child, ready };
}

function cellLine(cell: Msg): string {
  const f = (m: Msg) => `${fmt(Number(m.throughput))}/s p99 ${fmt(Number((m.latencyMs as Msg).p99))}ms${Number(m.errors) ? ` ERR ${String(m.errors)}` : ""}`;
  const off = cell.off as Msg;
  const on = cell.on as Msg;
  const fl = cell.floor as Msg;
  const fd = cell.floorDial as Msg;
  const x = (m: Msg, base = fl) => `${(Number(m.throughput) / Number(base.throughput)).toFixed(2)}x`;
  const cmp = ((cell.compare as Msg[] | undefined) ?? []).map((m) => ` | ${String(m.module)} ${f(m)} (${x(m)})`).join("");
  return (
    `n=${String(cell.registered)} c=${String(cell.conc)}: floor ${f(fl)} | off ${f(off)} (${x(off)}) | ` +
    `floor+dial ${f(fd)} | on ${f(on)} (${x(on, fd)}) | reply ${fmt(Number(off.replyBytes))} B${cmp}`
  );
}

function log(text: string): void {
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${text}\n`);
}

if (import.meta.main) {
  killAllOnExit();
  process.on("uncaughtException", (e) => {
    process.stderr.write(`bench: ${e.stack ?? e.message}\n`);
    killAll();
    process.exit(1);
  });
  const option = (description: string) => ({ type: "string", description }) as const;
  await runScript(
    { name: "bench", description: "Measure the registry next to a floor in separate processes; write results.json, BENCHMARKS.md and sweep.svg." },
    {
      quick: { type: "boolean", description: "CI smoke run (under 30 s, thresholds not asserted), written to a temp directory unless --out" },
      out: option("Directory for results.json, BENCHMARKS.md and sweep.svg (default: the repo, or a temp directory with --quick)"),
      only: option(`Phases to run, comma-separated: ${PHASES.join(", ")}`),
      counts: option("Registered counts of the registration sweep, e.g. 0,1000"),
      concs: option("Concurrencies of the registration sweep, e.g. 1,16"),
      profile: option("Directory for Bun CPU profiles of the registries, written when they exit"),
      compare: option("Other registry.ts versions measured in the same registration cells (probe off), comma-separated; in the ha phase with the redis.ts next to each, on the Redis store"),
      "budget-ms": option("The run's time limit, ms (default 540000; 90000 with --quick)"),
      merge: { type: "boolean", description: "Keep the other phases' results of the results.json already there (with --only)" },
      attackers: option("Attackers of the attack phase, comma-separated (default all): sync-spam, ping-flood, peers-flood, churn, slow-consumers"),
    },
    async (args) => {
      QUICK = Boolean(args.quick);
      const list = (name: string, text: string | undefined) => text?.split(",").map((x) => intArg(name, x));
      CFG = {
        ...SIZES[QUICK ? "quick" : "full"],
        ...(args.counts === undefined ? {} : { counts: list("counts", args.counts)! }),
        ...(args.concs === undefined ? {} : { concs: list("concs", args.concs)! }),
        ...(args["budget-ms"] === undefined ? {} : { budgetMs: intArg("budget-ms", args["budget-ms"], 1) }),
      };
      const only = args.only?.split(",");
      for (const phase of only ?? []) if (!PHASES.includes(phase as Phase)) throw new UsageError(`--only: no phase "${phase}" (phases: ${PHASES.join(", ")})`);
      PROFILE = args.profile;
      COMPARE = args.compare?.split(",").filter(Boolean) ?? [];
      ATTACKERS = args.attackers?.split(",").filter(Boolean);
      MERGE = Boolean(args.merge);
      if (MERGE && !only) throw new UsageError("--merge needs --only: the phases to measure again");
      return main(args.out ?? (QUICK ? join(tmpdir(), "contact-registry-bench-quick") : undefined), only);
    },
  );
}
