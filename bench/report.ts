/**
 * Turns results.json into BENCHMARKS.md (bench/template.md with its
 * {{placeholders}} filled) and the concurrency-sweep chart (hand-written SVG).
 * `bun bench/report.ts [results.json] [out.md] [out.svg]` regenerates both
 * from saved results without measuring again.
 */
import { dirname, join, relative } from "node:path";
import type { Msg } from "./lib.ts";

type Cell = Msg & {
  registered: number;
  conc: number;
  off: Run;
  on: Run;
  floor: Run;
  floorDial?: Run;
};
type Run = Msg & {
  throughput: number;
  replyBytes: number;
  latencyMs: { p50: number; p99: number; max: number; n: number };
  errors: number;
  serverCpuUsPerReq?: number;
  fanoutBytesPerReg?: number;
  deliveryLagMs?: number;
  changesPerSec?: number;
  changes?: number;
  registryLatencyMs?: { p50: number; p99: number };
};

export async function writeReport(results: Msg, paths: { md: string; svg: string; svgRef: string }): Promise<void> {
  const template = await Bun.file(join(import.meta.dir, "template.md")).text();
  const sections: Record<string, string> = {
    targets: targetsTable(results),
    machine: machineSection(results),
    noise: noiseSection(results),
    registration_off: registrationOff(results),
    registration_on: registrationOn(results),
    registration_cost: registrationCost(results),
    sweep: `![Concurrency sweep: registrations per second, registry and floor](${paths.svgRef})`,
    sessions: sessionsTable(results),
    mesh: meshTable(results),
    departure: departureTable(results),
    recovery: recoveryTable(results),
    ha: haSection(results),
    reply: replySection(results),
    attack: attackSection(results),
    attackHeld: int(Number(((attackRun(results).config as Msg).attack as Msg | undefined)?.held ?? 0)),
    attackHonest: attackHonest(results),
    attackNoise: attackNoise(results),
    tls_registration: tlsRegistration(results),
    tls_mesh: tlsMesh(results),
    tlsNoise: phaseNoise(results, "tls", "the figures above include it, the floors' as much as the registry's"),
    command: String(results.command),
    durationNote: `${String((results.config as Msg).warmupMs)} ms of warm-up (discarded) and ${String((results.config as Msg).durationMs)} ms measured per cell`,
    date: String(results.date),
  };
  const md = template.replace(/\{\{(\w+)\}\}/g, (_, key: string) => sections[key] ?? `(no section ${key})`);
  await Bun.write(paths.md, md);
  await Bun.write(paths.svg, sweepSvg(results));
}

// --- targets -----------------------------------------------------------------

interface Target {
  what: string;
  measured: string;
  floor: string;
  met: boolean | null;
}

function targetsTable(r: Msg): string {
  const rows = [...registrationTargets(regCells(r)), ...sessionTargets(r), meshTarget(r), ...departureTargets(r), recoveryTarget(r), ...attackTargets(r), ...haTargets(r), ...tlsTargets(r)];
  const mark = (m: boolean | null) => (m === null ? "–" : m ? "met" : "**missed**");
  return table(
    ["Target", "Measured", "Floor / bound", "Result"],
    rows.map((t) => [t.what, t.measured, t.floor, mark(t.met)]),
  );
}

/** Throughput and p99 against the floor (probe off) and the floor with dial-back (probe on), for the cells the targets name. */
function registrationTargets(cells: Cell[]): Target[] {
  const rows: Target[] = [];
  const cell = (n: number, c: number) => cells.find((x) => x.registered === n && x.conc === c);
  const want: [number, number][] = [
    [0, 1],
    [0, 16],
    [0, 256],
    [1000, 1],
    [1000, 16],
  ];
  for (const [n, c] of want) {
    const x = cell(n, c);
    const label = `${n.toLocaleString("en-US")} registered, concurrency ${c}`;
    if (!x) {
      rows.push({ what: `Throughput >= 70% of floor: ${label}`, measured: "not in this run", floor: "", met: null });
      continue;
    }
    const throughput = (probe: string, floorName: string, run: Run, floor: Run, extra = "") => {
      const ratio = run.throughput / floor.throughput;
      return { what: `Throughput >= 70% of ${floorName}, probe ${probe}: ${label}`, measured: `${int(run.throughput)}/s (${ratio.toFixed(2)}x${extra})`, floor: `${int(floor.throughput)}/s`, met: ratio >= 0.7 };
    };
    const p99 = (probe: string, floorName: string, run: Run, floor: Run) => {
      const ratio = run.latencyMs.p99 / floor.latencyMs.p99;
      return { what: `p99 <= 2x ${floorName} p99, probe ${probe}: ${label}`, measured: `${ms(run.latencyMs.p99)} ms (${ratio.toFixed(2)}x)`, floor: `${ms(floor.latencyMs.p99)} ms`, met: ratio <= 2 };
    };
    rows.push(throughput("off", "floor", x.off, x.floor));
    if (x.floorDial) rows.push(throughput("on", "floor+dial", x.on, x.floorDial, `; ${(x.on.throughput / x.floor.throughput).toFixed(2)}x of the bare floor`));
    rows.push(p99("off", "floor", x.off, x.floor));
    if (x.floorDial) rows.push(p99("on", "floor+dial", x.on, x.floorDial));
  }
  const big = cell(10_000, 1);
  rows.push(
    big
      ? {
          what: "10,000 registered: reply served from the cached serialisation (time per registration, c=1)",
          measured: `${kb(big.off.replyBytes)} reply, p50 ${ms(big.off.latencyMs.p50)} ms`,
          floor: `p50 ${ms(big.floor.latencyMs.p50)} ms (same size)`,
          met: null,
        }
      : { what: "10,000 registered: reply time", measured: "not in this run", floor: "", met: null },
  );
  return rows;
}

function sessionTargets(r: Msg): Target[] {
  const sess = (r.sessions as Msg | undefined)?.rows as Msg[] | undefined;
  const s10 = sess?.find((x) => x.nodes === 10_000);
  if (!s10) return [{ what: "10,000 registered nodes: RSS and heartbeat CPU", measured: "not in this run", floor: "", met: null }];
  return [
    { what: "10,000 registered nodes: RSS < 150 MB", measured: `${mbs(Number(s10.rss))} MB`, floor: `${mbs(Number(s10.floorRss))} MB`, met: Number(s10.rss) < 150e6 },
    {
      what: "10,000 registered nodes: heartbeat CPU < 5% of a core",
      measured: `${Number(s10.heartbeatCpuPct).toFixed(2)}%`,
      floor: `${Number(s10.floorCpuPct).toFixed(2)}%`,
      met: Number(s10.heartbeatCpuPct) < 5,
    },
  ];
}

function meshTarget(r: Msg): Target {
  const m500 = (((r.mesh as Msg | undefined)?.rows as Msg[] | undefined) ?? []).find((x) => x.n === 500);
  if (!m500) return { what: "500-node full mesh < 10 s", measured: "not in this run", floor: "", met: null };
  return {
    what: "500-node full mesh (124,750 greetings) < 10 s in one process",
    measured: `${secs(Number(m500.meshMs))} s${m500.complete ? "" : " (INCOMPLETE)"}`,
    floor: "",
    met: Boolean(m500.complete) && Number(m500.meshMs) < 10_000,
  };
}

function departureTargets(r: Msg): Target[] {
  const dep = r.departure as Msg | undefined;
  if (!dep || dep.error) return [{ what: "Departure", measured: dep?.error ? `failed: ${String(dep.error)}` : "not in this run", floor: "", met: null }];
  const kill = (dep.kill as Msg).pushedMs as Msg;
  const fr = dep.freeze as Msg;
  const pushed = fr.pushedMs as Msg;
  return [
    { what: "kill -9: close detected and pushed < 50 ms at p99", measured: `p99 ${ms(Number(kill.p99))} ms (max ${ms(Number(kill.max))})`, floor: "", met: Number(kill.p99) < 50 },
    {
      what: "SIGSTOP: frozen node evicted within its heartbeat bound",
      measured: `max ${int(Number(pushed.max))} ms`,
      floor: `bound ${int(Number(fr.boundMs))} ms`,
      met: Number(pushed.max) <= Number(fr.boundMs),
    },
  ];
}

function recoveryTarget(r: Msg): Target {
  const rec = r.recovery as Msg | undefined;
  if (!rec || rec.error) return { what: "Recovery", measured: rec?.error ? `failed: ${String(rec.error)}` : "not in this run", floor: "", met: null };
  const worst = Math.max(...(rec.trials as Msg[]).map((t) => Number(t.fromRestartMs)));
  return {
    what: `${String(rec.nodes)} nodes all back within 2 s of a registry restart`,
    measured: `worst ${int(worst)} ms of ${(rec.trials as Msg[]).length}`,
    floor: "",
    met: Number(rec.nodes) >= 100 ? worst <= 2000 : null,
  };
}

/** Issue 11's targets, per attacker: nobody honest evicted or refused, honest p99 within 3x the no-attack window, RSS within the budget. */
function attackTargets(r: Msg): Target[] {
  const a = r.attack as Msg | undefined;
  const rows = (a?.rows as Msg[] | undefined) ?? [];
  const none = rows.find((x) => x.name === "none");
  if (!a || !none) return [{ what: "Under attack", measured: a?.error ? `failed: ${String(a.error)}` : "not in this run", floor: "", met: null }];
  return rows.map((x) => {
    const v = attackVerdict(a, none, x);
    return {
      what: x === none ? "Under attack, no attacker: no honest node evicted or refused" : `Under attack, ${String(x.name)}: nobody honest evicted or refused, p99 <= 3x, RSS within budget`,
      measured: `${v.refused} refused, ${v.evicted} evicted; p99 ${ms(v.p99)} ms${x === none ? "" : ` (${(v.p99 / v.baseP99).toFixed(2)}x)`}; RSS ${mbs(v.rss)} MB`,
      floor: x === none ? "" : `p99 <= ${ms(3 * v.baseP99)} ms; RSS <= ${mbs(v.rssBound)} MB`,
      met: v.met,
    };
  });
}

/** One attack window against its targets; the RSS bound is the no-attack peak plus the unsent-bytes budget. */
function attackVerdict(a: Msg, none: Msg, x: Msg) {
  const h = x.honest as Msg;
  const refused = Number(h.attempts) - Number(h.registered);
  const evicted = Number(x.heldEvicted) + (Number(a.held) - Number(x.heldRegistered));
  const p99 = Number((h.latencyMs as Msg).p99);
  const baseP99 = Number(((none.honest as Msg).latencyMs as Msg).p99);
  const rss = Number(x.rssPeak);
  const rssBound = Number(none.rssPeak) + Number(a.budget);
  const quiet = refused === 0 && evicted === 0;
  const met = x === none ? quiet : quiet && p99 <= 3 * baseP99 && rss <= rssBound && Number(x.unsentPeak) <= Number(a.budget);
  return { refused, evicted, p99, baseP99, rss, rssBound, met };
}

/** Several registries: the store's cost to a registration, propagation, failover, a store restart. */
function haTargets(r: Msg): Target[] {
  const ha = r.ha as Msg | undefined;
  if (!ha || ha.skipped || ha.error) {
    const why = ha?.skipped ? `skipped: ${String(ha.skipped)}` : ha?.error ? `failed: ${String(ha.error)}` : "not in this run";
    return [{ what: "Several registries (Redis store)", measured: why, floor: "", met: null }];
  }
  const rows: Target[] = [];
  for (const c of ((ha.registration as Msg | undefined)?.cells as Msg[] | undefined) ?? []) {
    const [mem, red, floor] = [c.memory as Run, c.redis as Run, c.pingFloor as (Run & Msg) | undefined];
    rows.push({
      what: `Redis store >= 0.5x the memory list's registrations/s, concurrency ${String(c.conc)}`,
      measured: `${int(red.throughput)}/s (${Number(c.ratio).toFixed(2)}x), p99 ${ms(red.latencyMs.p99)} ms${floor ? `; one bare round trip per join: ${Number(floor.ratio).toFixed(2)}x` : ""}`,
      floor: `${int(mem.throughput)}/s, p99 ${ms(mem.latencyMs.p99)} ms`,
      met: Number(c.ratio) >= 0.5,
    });
  }
  const prop = ha.propagation as Msg | undefined;
  if (prop && !prop.error) {
    const [across, alone] = [(prop.across as Msg).fromReply as Msg, (prop.alone as Msg).fromReply as Msg];
    rows.push({ what: "Join propagation registry A → a node of B: p99 < 10 ms", measured: `p99 ${ms(Number(across.p99))} ms`, floor: `one registry: p99 ${ms(Number(alone.p99))} ms`, met: Number(across.p99) < 10 });
  }
  const f = ha.failover as Msg | undefined;
  if (f && !f.error) {
    const full = Number(f.nodes) >= 1000;
    rows.push({ what: `Failover of ${int(Number(f.nodes))} nodes after kill -9 of their registry < 3 s`, measured: `${int(Number(f.viewsWholeMs))} ms`, floor: "", met: full ? Number(f.viewsWholeMs) < 3000 : null });
  }
  const sr = ha.storeRestart as Msg | undefined;
  if (sr && !sr.error) {
    rows.push({ what: "Store restarted empty: every registry's list whole within 2 s", measured: `${int(Number(sr.wholeMs))} ms (${int(Number(sr.nodes))} nodes)`, floor: "", met: Number(sr.wholeMs) < 2000 });
  }
  return rows;
}

type TlsCell = Msg & { conc: number; plain: Run; floor: Run; tls: Run; tlsFloor: Run; resumed?: Run; resumedFloor?: Run };

function tlsCells(r: Msg): TlsCell[] {
  return (((r.tls as Msg | undefined)?.cells as TlsCell[] | undefined) ?? []).slice();
}

/** The TLS registry against the bare TLS floor at each concurrency, full handshakes and resumed; the mesh in mutual TLS. */
function tlsTargets(r: Msg): Target[] {
  const cells = tlsCells(r);
  if (!cells.length) return [{ what: "TLS registration >= 70% of the TLS floor", measured: notRun(r, "tls"), floor: "", met: null }];
  const rows: Target[] = [];
  const row = (what: string, run: Run, floor: Run) => {
    const x = run.throughput / floor.throughput;
    rows.push({ what, measured: `${int(run.throughput)}/s (${x.toFixed(2)}x)${errs(run)}`, floor: `${int(floor.throughput)}/s`, met: x >= 0.7 });
  };
  for (const c of cells) row(`TLS registration >= 70% of the TLS floor, full handshake: concurrency ${c.conc}`, c.tls, c.tlsFloor);
  for (const c of cells) if (c.resumed && c.resumedFloor) row(`TLS registration >= 70% of the TLS floor, resumed session: concurrency ${c.conc}`, c.resumed, c.resumedFloor);
  const mesh = ((r.tls as Msg).mesh as Msg[] | undefined) ?? [];
  const [plain, mutual] = [mesh.find((m) => m.mode === "plain"), mesh.find((m) => m.mode === "mutual TLS")];
  if (plain && mutual) {
    rows.push({
      what: `${int(Number(mutual.n))}-node full mesh in mutual TLS (no target: the cost of TLS, next to plain TCP)`,
      measured: `${secs(Number(mutual.meshMs))} s${mutual.complete ? "" : " (INCOMPLETE)"}`,
      floor: `plain ${secs(Number(plain.meshMs))} s`,
      met: null,
    });
  }
  return rows;
}

// --- sections ----------------------------------------------------------------

function machineSection(r: Msg): string {
  const m = r.machine as Msg;
  return [
    `- CPU: ${String(m.cpu)}, ${String(m.cores)} cores`,
    `- RAM: ${(Number(m.ramBytes) / 2 ** 30).toFixed(1)} GiB`,
    `- OS: ${String(m.os)} (${String(m.kernel)})`,
    `- Bun: ${String(m.bun)}`,
    `- File-descriptor limit given to the benchmark's processes: ${String(r.fdLimit)}`,
    `- Date: ${String(r.date)}; the whole run took ${secs(Number(r.totalMs))} s`,
    `- Command: \`${String(r.command)}\``,
  ].join("\n");
}

function noiseSection(r: Msg): string {
  const n = r.noise as Msg | undefined;
  if (!n || !n.available) return "CPU accounting from /proc was not available: the noise of this run is unknown.";
  const before = n.before as Msg | undefined;
  const lines = [
    `Before the run, other processes kept ${cores(Number(before?.cores ?? 0))} of the ${String((r.machine as Msg).cores)} cores busy. ` +
      `During it they took ${cores(Number(n.otherCores))} on average (hypervisor steal ${cores(Number(n.stealCores))}).`,
    "",
    table(
      ["Phase", "Seconds", "Our processes (cores)", "Other processes (cores)"],
      ((n.phases as Msg[]) ?? []).map((p) => [String(p.phase), secs(Number(p.seconds) * 1000), cores(Number(p.ourCores)), cores(Number(p.otherCores))]),
    ),
  ];
  return lines.join("\n");
}

function registrationOff(r: Msg): string {
  const cells = regCells(r);
  if (!cells.length) return notRun(r, "registration");
  return failedNote(r, "registration") + table(
    ["Registered", "Conc.", "Reply", "Floor req/s", "Registry req/s", "Ratio", "Floor p50 / p99 / max ms", "Registry p50 / p99 / max ms", "p99 ratio"],
    cells.map((c) => [
      int(c.registered),
      String(c.conc),
      kb(c.off.replyBytes),
      int(c.floor.throughput),
      int(c.off.throughput) + errs(c.off),
      ratio(c.off.throughput, c.floor.throughput),
      lat(c.floor),
      lat(c.off),
      ratio(c.off.latencyMs.p99, c.floor.latencyMs.p99),
    ]),
  );
}

function registrationOn(r: Msg): string {
  const cells = regCells(r).filter((c) => c.floorDial);
  if (!cells.length) return notRun(r, "registration");
  return table(
    ["Registered", "Conc.", "Floor+dial req/s", "Registry req/s", "Ratio", "vs bare floor", "Floor+dial p50 / p99 / max ms", "Registry p50 / p99 / max ms", "p99 ratio"],
    cells.map((c) => [
      int(c.registered),
      String(c.conc),
      int(c.floorDial!.throughput),
      int(c.on.throughput) + errs(c.on),
      ratio(c.on.throughput, c.floorDial!.throughput),
      ratio(c.on.throughput, c.floor.throughput),
      lat(c.floorDial!),
      lat(c.on),
      ratio(c.on.latencyMs.p99, c.floorDial!.latencyMs.p99),
    ]),
  );
}

function registrationCost(r: Msg): string {
  const cells = regCells(r);
  if (!cells.length) return notRun(r, "registration");
  const us = (x?: Run) => (x?.serverCpuUsPerReq === undefined ? "" : x.serverCpuUsPerReq.toFixed(0));
  return table(
    [
      "Registered",
      "Conc.",
      "Server CPU µs/req: floor",
      "registry off",
      "floor+dial",
      "registry on",
      "Fan-out bytes per registration",
      "Delivered to all held sessions after",
      "Membership changes/s",
    ],
    cells.map((c) => [
      int(c.registered),
      String(c.conc),
      us(c.floor),
      us(c.off),
      us(c.floorDial),
      us(c.on),
      c.registered ? kb(c.off.fanoutBytesPerReg ?? 0) : "–",
      c.registered ? `${int(c.off.deliveryLagMs ?? 0)} ms` : "–",
      c.registered ? int(c.off.changesPerSec ?? 0) : "–",
    ]),
  );
}

function sessionsTable(r: Msg): string {
  const s = r.sessions as Msg | undefined;
  if (!s || !(s.rows as Msg[] | undefined)?.length) return notRun(r, "sessions");
  const rows = s.rows as Msg[];
  return [
    failedNote(r, "sessions") +
    `Registry RSS with no sessions: ${mbs(Number(s.baseRss))} MB (floor: ${mbs(Number(s.floorBaseRss))} MB). Heartbeat every ${String(s.heartbeatMs)} ms.`,
    "",
    table(
      ["Nodes", "Time to register all", "RSS", "RSS after full GC", "Bytes per session", "Floor RSS (bytes/session)", "Heartbeat CPU", "Floor CPU, same pings", "Pings/s", "Evicted"],
      rows.map((x, i) => [
        int(Number(x.nodes)),
        // Each row grows the fleet from the previous row's count.
        i
          ? `${int(rows.slice(0, i + 1).reduce((a, y) => a + Number(y.registerMs), 0))} ms (${int(Number(rows[i - 1]!.nodes))} → ${int(Number(x.nodes))}: ${int(Number(x.registerMs))} ms)`
          : `${int(Number(x.registerMs))} ms`,
        `${mbs(Number(x.rss))} MB`,
        `${mbs(Number(x.rssAfterGc))} MB`,
        int(Number(x.bytesPerSession)),
        `${mbs(Number(x.floorRss))} MB (${int(Number(x.floorBytesPerSession))})`,
        `${Number(x.heartbeatCpuPct).toFixed(2)}%`,
        `${Number(x.floorCpuPct).toFixed(2)}%`,
        int(Number(x.pingsPerSec)),
        String(x.evicted),
      ]),
    ),
  ].join("\n");
}

function meshTable(r: Msg): string {
  const m = r.mesh as Msg | undefined;
  if (!m || !(m.rows as Msg[] | undefined)?.length) return notRun(r, "mesh");
  return failedNote(r, "mesh") + table(MESH_HEAD, (m.rows as Msg[]).map(meshRow));
}

const MESH_HEAD = ["Nodes", "Greetings", "All joined after", "Full mesh after", "Greetings/s", "Failed greetings", "Complete"];

/** One mesh formation (bench/nodes-proc.ts `mesh`) as a table row under MESH_HEAD. */
function meshRow(x: Msg): string[] {
  return [
    int(Number(x.n)),
    int(Number(x.pairs)),
    `${int(Number(x.joinedMs))} ms`,
    `${int(Number(x.meshMs))} ms`,
    int(Number(x.greetingsPerSec)),
    String(x.failed),
    x.complete ? "yes" : "**no**",
  ];
}

function tlsRegistration(r: Msg): string {
  const cells = tlsCells(r);
  if (!cells.length) return notRun(r, "tls");
  const us = (x?: Run) => (x?.serverCpuUsPerReq === undefined ? "" : x.serverCpuUsPerReq.toFixed(0));
  const rows: string[][] = [];
  for (const c of cells) {
    const lines: [string, Run, Run][] = [
      ["plain TCP", c.plain, c.floor],
      ["TLS, full handshake", c.tls, c.tlsFloor],
      ...(c.resumed && c.resumedFloor ? [["TLS, resumed session", c.resumed, c.resumedFloor] as [string, Run, Run]] : []),
    ];
    for (const [what, run, floor] of lines) {
      rows.push([String(c.conc), what, int(floor.throughput), int(run.throughput) + errs(run), ratio(run.throughput, floor.throughput), lat(floor), lat(run), `${us(floor)} / ${us(run)}`]);
    }
  }
  return failedNote(r, "tls") + table(["Conc.", "Connection", "Floor req/s", "Registry req/s", "Ratio", "Floor p50 / p99 / max ms", "Registry p50 / p99 / max ms", "Server CPU µs/req: floor / registry"], rows);
}

function tlsMesh(r: Msg): string {
  const rows = ((r.tls as Msg | undefined)?.mesh as Msg[] | undefined) ?? [];
  if (!rows.length) return notRun(r, "tls");
  return table(["Mode", ...MESH_HEAD], rows.map((x) => [String(x.mode), ...meshRow(x)]));
}

function departureTable(r: Msg): string {
  const d = r.departure as Msg | undefined;
  if (!d || d.error) return notRun(r, "departure");
  const k = d.kill as Msg;
  const f = d.freeze as Msg;
  const row = (name: string, x: Msg) => [name, String(x.n), ms(Number(x.min)), ms(Number(x.p50)), ms(Number(x.p90)), ms(Number(x.p99)), ms(Number(x.max))];
  return [
    table(
      ["Event (ms after the signal)", "Samples", "min", "p50", "p90", "p99", "max"],
      [
        row("kill -9 → registry sees the close", k.detectedMs as Msg),
        row(`kill -9 → \`peer-left\` at the other nodes`, k.pushedMs as Msg),
        row("SIGSTOP → registry evicts (heartbeat)", f.detectedMs as Msg),
        row(`SIGSTOP → \`peer-left\` at the other nodes`, f.pushedMs as Msg),
      ],
    ),
    "",
    `kill -9: ${String(k.trials)} trials, each seen by ${String(d.observers)} nodes. SIGSTOP: ${String(f.trials)} nodes frozen at moments spread over one heartbeat interval; ` +
      `heartbeat ${String(f.heartbeatMs)} ms x ${String(f.misses)} misses, checked every ${String(f.sweepMs)} ms, ` +
      `so the bound is ${String(f.heartbeatMs)} x ${String(f.misses)} + ${String(f.sweepMs)} = ${String(f.boundMs)} ms after the last ping (at most that after the freeze). ` +
      `Leave reasons seen: ${(f.reasons as string[]).join(", ")}.`,
  ].join("\n");
}

function recoveryTable(r: Msg): string {
  const rec = r.recovery as Msg | undefined;
  if (!rec || rec.error) return notRun(r, "recovery");
  return [
    table(
      ["Trial", "Registry listening again after the kill", "All nodes registered, after the restart", "…after the kill"],
      (rec.trials as Msg[]).map((t, i) => [String(i + 1), `${int(Number(t.restartMs))} ms`, `${int(Number(t.fromRestartMs))} ms`, `${int(Number(t.fromKillMs))} ms`]),
    ),
    "",
    `${String(rec.nodes)} in-process nodes in one process; reconnect backoff with full jitter between 0 and min(${String(rec.reconnectMaxMs)}, ${String(rec.reconnectBaseMs)} x 2^attempt) ms.`,
  ].join("\n");
}

function attackSection(r: Msg): string {
  const a = r.attack as Msg | undefined;
  const rows = (a?.rows as Msg[] | undefined) ?? [];
  const none = rows.find((x) => x.name === "none");
  if (!a || !none) return notRun(r, "attack");
  const setup =
    `${int(Number(a.held))} held sessions (from ${String(a.heldSources)} addresses) registered in ${int(Number(a.growMs))} ms; ` +
    `registry RSS with them, after a full GC: ${mbs(Number(a.baseRss))} MB; unsent-bytes budget ${(Number(a.budget) / 2 ** 20).toFixed(0)} MiB (the default).`;
  const mark = (m: boolean) => (m ? "met" : "**missed**");
  return [
    failedNote(r, "attack") + setup,
    "",
    table(
      ["Attacker", "What it did in the window", "Honest registered", "Honest p50 / p99 / max ms", "p99 vs none", "Held evicted", "Longest stall ms (ran / waited for a core)", "Registry thread in the window: ran / waited for a core", "RSS peak", "Unsent peak", "Targets"],
      rows.map((x) => {
        const v = attackVerdict(a, none, x);
        const h = x.honest as Msg;
        return [
          String(x.name),
          attackVolume(x),
          `${int(Number(h.registered))} / ${int(Number(h.attempts))}${v.refused ? ` (refused: ${codes(h.refused as Msg)})` : ""}`,
          lat({ latencyMs: h.latencyMs } as Run),
          x === none ? "" : ratio(v.p99, v.baseP99),
          String(Number(x.heldEvicted) + (Number(a.held) - Number(x.heldRegistered))),
          stallCell(x),
          threadCell(x),
          `${mbs(v.rss)} MB`,
          `${mbs(Number(x.unsentPeak))} MB`,
          mark(v.met),
        ];
      }),
    ),
    "",
    "What the registry refused or cut in each window (its /stats counters), and how long after the window every held session had every change:",
    "",
    table(
      ["Attacker", "Registry refusals by code", "Held sessions had every change after"],
      rows.map((x) => [String(x.name), codes(x.rejected as Msg) || "none", `${int(Number(x.deliveryLagMs))} ms${x.delivered ? "" : " (**not all**)"}`]),
    ),
  ].join("\n");
}

/** The run the attack phase came from: this one, or one merged in later (--merge). */
function attackRun(r: Msg): Msg {
  return phaseRun(r, "attack");
}

/** The run a phase came from: its own (--merge keeps it with the phase), else the last one merged in with it (older results), else this one. */
function phaseRun(r: Msg, phase: string): Msg {
  const own = (r[phase] as Msg | undefined)?.run as Msg | undefined;
  if (own) return own;
  const merged = (Array.isArray(r.merged) ? r.merged : r.merged ? [r.merged] : []) as Msg[];
  return merged.findLast((m) => (m.phases as string[]).includes(phase)) ?? r;
}

function attackHonest(r: Msg): string {
  const c = (attackRun(r).config as Msg).attack as Msg | undefined;
  return c ? `${String(c.honestPerSec)} registrations a second for ${secs(Number(c.windowMs))} s per window, from ${String(c.honestSources)} addresses` : "";
}

/** How busy the machine was during this phase: the attackers share it with the registry, and so may other work. */
function attackNoise(r: Msg): string {
  const shared =
    "The attackers, the held sessions and the honest nodes run on the same machine as the registry, so part of an attacker's effect is the CPU it takes " +
    "from the registry, as it would be from an attacker on the same host; on a real network it would be on another.";
  return `${shared} ${phaseNoise(r, "attack", "the latencies and stalls above include it")}`.trim();
}

/** Which run a phase comes from when not the run above, and how busy the machine was while it ran. */
function phaseNoise(r: Msg, phase: string, effect: string): string {
  const run = phaseRun(r, phase);
  const n = run.noise as Msg | undefined;
  const p = ((n?.phases as Msg[] | undefined) ?? []).find((x) => x.phase === phase);
  if (!p) return "";
  const cores = Number((run.machine as Msg).cores);
  const other = Number(p.otherCores);
  const own = run === r ? "" : `This phase was measured in a run of its own, ${String(run.date)} (\`${String(run.command)}\`); the other sections come from the run above. `;
  const load = `${own}While this phase ran, the benchmark's own processes kept ${Number(p.ourCores).toFixed(2)} of the ${cores} cores busy and other processes ${other.toFixed(2)}.`;
  const noisy = other > 0.25 ? ` **The machine was shared with other work during this phase:** ${effect}; compare them with a run on a quiet machine.` : "";
  return `${load}${noisy}`;
}

/** The longest stall, split by what the scheduler says the loop's thread did meanwhile, and what the registry's sweep left out of deadlines. */
function stallCell(x: Msg): string {
  const w = x.worstStall as Msg | undefined;
  const split = w ? ` (${ms(Number(w.ranMs))} / ${ms(Number(w.queuedMs))})` : "";
  const left = Number(x.stalledMs) ? `; ${int(Number(x.stalledMs))} ms left out of deadlines` : "";
  return `${ms(Number(x.lagMaxMs))}${split}${left}`;
}

function threadCell(x: Msg): string {
  const t = x.thread as Msg | undefined;
  if (!t) return "";
  const secsOf = (v: unknown) => (Number(v) / 1000).toFixed(2);
  return `${secsOf(t.ranMs)} s / ${secsOf(t.queuedMs)} s of ${secsOf(x.windowMs)} s`;
}

/** What one attacker did in its window, in its own terms. */
function attackVolume(x: Msg): string {
  const a = x.attack as Msg | undefined;
  if (!a) return "–";
  const perSec = (n: unknown) => int(Number(n) / (Number(a.windowMs) / 1000));
  const cpu = `; the attacker's process used ${((Number(a.cpuMs) / Number(a.windowMs)) * 100).toFixed(0)}% of a core`;
  if (x.name === "peers-flood") return `${perSec(a.responses)} GET /peers answered/s on ${String((x.attacker as Msg).width)} connections${cpu}`;
  const total = x.attackTotal as Msg;
  const conns = `${int(Number(total.connections))} connections opened, ${int(Number(total.registered))} registered, ${int(Number(total.closedByRegistry))} closed by the registry (since it started)`;
  return `${perSec(a.lines)} lines/s written; ${conns}${cpu}`;
}

function codes(c: Msg | undefined): string {
  return Object.entries(c ?? {})
    .filter(([, n]) => Number(n) > 0)
    .map(([k, n]) => `${k} ${int(Number(n))}`)
    .join(", ");
}

function haSection(r: Msg): string {
  const ha = r.ha as Msg | undefined;
  if (!ha || ha.error) return notRun(r, "ha");
  if (ha.skipped) return `_Skipped: ${String(ha.skipped)}._`;
  const run = ha.run as Msg | undefined;
  const when = run
    ? `Measured in a run of its own (\`${String(run.command)}\`, ${String(run.date)}): other processes kept ${cores(Number((run.noise as Msg | undefined)?.otherCores ?? NaN))} of the ${String((run.machine as Msg).cores)} cores busy meanwhile.`
    : "Measured in this run.";
  return [when, "", haRegistration(ha), "", haPropagation(ha), "", haFailover(ha), "", haScale(ha)].join("\n");
}

function haRegistration(ha: Msg): string {
  const reg = ha.registration as Msg | undefined;
  if (!reg || reg.error) return `Registration: ${reg?.error ? `failed: ${String(reg.error)}` : "not measured"}.`;
  const cells = reg.cells as Msg[];
  const rounds = Number(reg.rounds ?? roundsOf(cells));
  const x = (run: Msg | undefined, k: string) => (run && Number.isFinite(Number(run[k])) ? Number(run[k]) : NaN);
  const us = (v: number) => (Number.isFinite(v) ? int(v) : "–");
  const speed = (run: Msg | undefined, withRatio = true) =>
    run ? `${int(Number(run.throughput))}/s${withRatio ? ` (${Number(run.ratio).toFixed(2)}x)` : ""}, ${lat(run as Run)}` : "–";
  const throughput = cells.map((c) => [String(c.conc), speed(c.memory as Msg, false), speed(c.pingFloor as Msg | undefined), speed(c.redis as Msg)]);
  const cpu = cells.map((c) => {
    const [mem, floor, red] = [c.memory as Msg, c.pingFloor as Msg | undefined, c.redis as Msg];
    return [
      String(c.conc),
      `${us(x(mem, "serverCpuUsPerReq"))} / ${us(x(floor, "serverCpuUsPerReq"))} / ${us(x(red, "serverCpuUsPerReq"))}`,
      `${us(x(mem, "loadgenCpuUsPerReg"))} / ${us(x(floor, "loadgenCpuUsPerReg"))} / ${us(x(red, "loadgenCpuUsPerReg"))}`,
      `${us(x(floor, "storeCpuUsPerReg"))} / ${us(x(red, "storeCpuUsPerReg"))}`,
      Number.isFinite(x(red, "storeCommandsPerReg")) ? x(red, "storeCommandsPerReg").toFixed(1) : "–",
      [mem, floor, red].map((r) => (Number.isFinite(x(r, "otherCores")) ? cores(x(r, "otherCores")) : "–")).join(" / "),
    ];
  });
  const compared = cells.flatMap((c) =>
    ((c.compare as Msg[] | undefined) ?? []).map((o) => [String(c.conc), `\`${String(o.module)}\``, speed(o), us(x(o, "serverCpuUsPerReq")), us(x(o, "storeCpuUsPerReg")), x(o, "storeCommandsPerReg").toFixed(1)]),
  );
  return [
    "**Registration** (probe off, nothing else registered; the same cells as section 1: a connection, `register`, the reply, a reset close, which the registry takes as a leave). Three registries: the memory list; the **PING floor**, the memory list with one `PING` to a redis-server before each join is decided (what one round trip to the store alone costs a registration on this machine); and the Redis store. Ratios are to the memory list:",
    "",
    table(["Conc.", "Memory list: registrations/s, p50 / p99 / max ms", "PING floor", "Redis store"], throughput),
    "",
    `Each cell ran ${rounds === 1 ? "once" : `${String(rounds)} times`}, the registries taking turns (the order reversed every other round); the table shows each one's median round, and the ratio is the median of the rounds' own ratios (each round against the memory list's round next to it). All rounds, registrations/s: ` +
      cells.map((c) => `c=${String(c.conc)}: ${roundsText(c.rounds as Msg | undefined)}`).join("; ") +
      ".",
    "",
    "CPU per registration (µs, the median of the rounds), of each party: memory list / PING floor / Redis store; the store's commands per registration count its scripts' own; the last column is how busy other processes kept the machine meanwhile (cores):",
    "",
    table(["Conc.", "Registry", "Load generator", "Store (floor / Redis)", "Store commands", "Other processes"], cpu),
    ...(compared.length
      ? ["", "Other versions on the Redis store (`--compare`), in the same rounds:", "", table(["Conc.", "Version", "Registrations/s (÷ memory), p50 / p99 / max ms", "Registry CPU µs", "Store CPU µs", "Store commands"], compared)]
      : []),
    "",
    haWhereTheTimeGoes(cells),
  ].join("\n");
}

/** The paragraph under the registration tables, from their figures. */
function haWhereTheTimeGoes(cells: Msg[]): string {
  const at = (c: number) => cells.find((x) => x.conc === c);
  const [one, busy] = [at(Math.min(...cells.map((x) => Number(x.conc)))), at(Math.max(...cells.map((x) => Number(x.conc))))];
  if (!one || !busy) return "";
  const f = (cell: Msg, who: string, k: string) => int(Number((cell[who] as Msg | undefined)?.[k]));
  const cmds = (cell: Msg) => Number((cell.redis as Msg).storeCommandsPerReg).toFixed(1);
  const floor = one.pingFloor as Msg | undefined;
  return [
    "Where the time goes: with the store, a registration's join is decided, numbered and logged by a script in the store before the reply, one round trip; its leave follows in another script call after the reply. Changes made in the same turn of the registry's event loop share one script call, so under load one call carries many registrations' joins and leaves: " +
      `${cmds(one)} store commands per registration at concurrency ${String(one.conc)}, ${cmds(busy)} at ${String(busy.conc)} (the scripts' own included). ` +
      `The registry's CPU per registration goes from ${f(busy, "memory", "serverCpuUsPerReq")} µs with the memory list to ${f(busy, "redis", "serverCpuUsPerReq")} µs with the store at concurrency ${String(busy.conc)} (sending the batch, reading its reply, applying each change to its copy of the list), and the store adds ${f(busy, "redis", "storeCpuUsPerReg")} µs of its own; ` +
      "on two cores shared by the load generator, the registry and the store, throughput follows the sum.",
    floor
      ? `At concurrency ${String(one.conc)} nothing overlaps: every registration waits for its round trip, and each message between processes wakes one that was idle. The PING floor shows what one bare round trip costs here (${Number(floor.ratio).toFixed(2)}x the memory list's throughput); the store's scripts and the leave's own exchange take the Redis store to ${Number((one.redis as Msg).ratio).toFixed(2)}x (store CPU per registration: ${f(one, "pingFloor", "storeCpuUsPerReg")} µs for the PING, ${f(one, "redis", "storeCpuUsPerReg")} µs for the scripts).`
      : "",
  ]
    .filter(Boolean)
    .join(" ");
}

function roundsOf(cells: Msg[]): number {
  const r = cells[0]?.rounds as Msg | undefined;
  return ((r?.memory as number[] | undefined) ?? []).length || 1;
}

function roundsText(rounds: Msg | undefined): string {
  if (!rounds) return "one round";
  const names: Record<string, string> = { memory: "memory", pingFloor: "floor", redis: "Redis" };
  return Object.entries(rounds)
    .map(([k, v]) => `${names[k] ?? k} ${(v as number[]).map(int).join(", ")}`)
    .join("; ");
}

function haPropagation(ha: Msg): string {
  const p = ha.propagation as Msg | undefined;
  if (!p || p.error) return `Propagation: ${p?.error ? `failed: ${String(p.error)}` : "not measured"}.`;
  const row = (name: string, d: Msg) => [name, String(d.n), ms(Number(d.p50)), ms(Number(d.p90)), ms(Number(d.p99)), ms(Number(d.max))];
  const [across, alone] = [p.across as Msg, p.alone as Msg];
  return [
    `**Join propagation**: ${String(p.samples)} registrations one after another; a node registered on B (a raw session) times the \`joined\` push of each (ms):`,
    "",
    table(
      ["From", "Samples", "p50", "p90", "p99", "max"],
      [
        row("the reply on A → push at B's node", across.fromReply as Msg),
        row("`register` sent to A → push at B's node", across.fromRegister as Msg),
        row("one registry: reply → push at its node", alone.fromReply as Msg),
        row("one registry: `register` → push", alone.fromRegister as Msg),
      ],
    ),
  ].join("\n");
}

function haFailover(ha: Msg): string {
  const f = ha.failover as Msg | undefined;
  const sr = ha.storeRestart as Msg | undefined;
  const failover =
    !f || f.error
      ? `Failover: ${f?.error ? `failed: ${String(f.error)}` : "not measured"}.`
      : `**Failover**: registry A holds ${int(Number(f.nodes))} simulated nodes (bench/holder.ts, probe on, pinging at the default interval) and B ${int(Number(f.observers))} more; A is killed with -9. Each node does what client.ts does: it sees the close, waits a jittered 0–100 ms (the backoff's first step), registers with B under its id. All were registered with B ${int(Number(f.registeredMs))} ms after the kill, and every session (moved or not) had B's last change ${int(Number(f.viewsWholeMs))} ms after it; ${int(Number(f.swept))} were swept as dead (a node not back before A's lease ran out would be).`;
  const restart =
    !sr || sr.error
      ? `Store restart: ${sr?.error ? `failed: ${String(sr.error)}` : "not measured"}.`
      : `**Store restart**: two registries with ${int(Number(sr.nodes))} nodes between them; the store is killed with -9, both report degraded, it is started again, empty (${int(Number(sr.restartMs))} ms to accept connections). Both registries listed every node again ${int(Number(sr.wholeMs))} ms after it was started.`;
  return [failover, "", restart].join("\n");
}

function haScale(ha: Msg): string {
  const sc = ha.scale as Msg | undefined;
  if (!sc || sc.error) return `Scale: ${sc?.error ? `failed: ${String(sc.error)}` : "not measured"}.`;
  const st = sc.store as Msg;
  const rows = (sc.rows as Msg[]).map((x, i) => [String(i + 1), int(Number(x.sessions)), `${mbs(Number(x.rss))} MB`, `${mbs(Number(x.rssAfterGc))} MB`, `${Number(x.heartbeatCpuPct).toFixed(2)}%`, String(x.evicted)]);
  return [
    `**Scale**: 3 registries × ${int(Number(sc.perRegistry))} simulated sessions (probe off), each pinging at the default interval; registered in ${secs(Number(sc.registerMs))} s (every join pushed to every session of every registry). Then a window of ${secs(Number(sc.windowMs))} s of pings only:`,
    "",
    table(["Registry", "Sessions held", "RSS", "RSS after full GC", "Heartbeat CPU", "Evicted"], rows),
    "",
    `The store: ${mbs(Number(st.usedMemory))} MB used (${mbs(Number(st.rss))} MB RSS), ${int(Number(st.commandsPerSec))} commands/s and ${Number(st.cpuPct).toFixed(2)}% of a core during the window, while the registries answered ${int(Number(st.pingsPerSec))} pings/s: pings never reach the store (a registry renews one lease per second; the others' changes come to it as messages).`,
  ].join("\n");
}

function replySection(r: Msg): string {
  const cells = regCells(r).filter((c) => c.registered === Math.max(...regCells(r).map((x) => x.registered)) && c.registered > 0);
  if (!cells.length) return notRun(r, "registration");
  const n = cells[0]!.registered;
  const rows = cells.map((c) => [
    String(c.conc),
    kb(c.off.replyBytes),
    `${ms(c.off.latencyMs.p50)} / ${ms(c.off.latencyMs.p99)}`,
    `${ms(c.floor.latencyMs.p50)} / ${ms(c.floor.latencyMs.p99)}`,
    c.off.registryLatencyMs ? `${ms(c.off.registryLatencyMs.p50)} / ${ms(c.off.registryLatencyMs.p99)}` : "",
    int(c.off.throughput),
    int(c.floor.throughput),
    int(c.off.changesPerSec ?? 0),
    `${int(c.off.deliveryLagMs ?? 0)} ms`,
  ]);
  return [
    `With ${int(n)} nodes registered (probe off):`,
    "",
    table(
      [
        "Conc.",
        "Reply",
        "Round trip p50 / p99 ms",
        "Floor, same size, p50 / p99 ms",
        "Inside the registry p50 / p99 ms",
        "Registrations/s",
        "Floor req/s",
        "Membership changes/s",
        "All held sessions had them after",
      ],
      rows,
    ),
  ].join("\n");
}

// --- chart -------------------------------------------------------------------

/** Registrations per second against concurrency, one panel per registered count. */
function sweepSvg(r: Msg): string {
  const cells = regCells(r);
  const counts = [...new Set(cells.map((c) => c.registered))].sort((a, b) => a - b);
  const concs = [...new Set(cells.map((c) => c.conc))].sort((a, b) => a - b);
  const series: { name: string; color: string; dash: string; pick: (c: Cell) => number | undefined }[] = [
    { name: "floor", color: "#888888", dash: "6 4", pick: (c) => c.floor.throughput },
    { name: "registry, probe off", color: "#1f77b4", dash: "", pick: (c) => c.off.throughput },
    { name: "floor + dial-back", color: "#e6a23c", dash: "6 4", pick: (c) => c.floorDial?.throughput },
    { name: "registry, probe on", color: "#d62728", dash: "", pick: (c) => c.on.throughput },
  ];
  const W = 300;
  const H = 240;
  const pad = { l: 58, r: 12, t: 30, b: 40 };
  const width = Math.max(Math.max(1, counts.length) * W + 20, 720);
  const height = H + 70;
  const parts: string[] = [];
  parts.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="11">`,
    `<rect width="100%" height="100%" fill="white"/>`,
  );
  if (!cells.length) {
    parts.push(`<text x="20" y="40">no registration results in this run</text></svg>`);
    return parts.join("\n");
  }
  counts.forEach((n, i) => {
    const x0 = 10 + i * W;
    const pw = W - pad.l - pad.r;
    const ph = H - pad.t - pad.b;
    const mine = cells.filter((c) => c.registered === n);
    const ymax = niceMax(Math.max(1, ...mine.flatMap((c) => series.map((s) => s.pick(c) ?? 0))));
    const px = (k: number) => x0 + pad.l + (concs.length === 1 ? pw / 2 : (k / (concs.length - 1)) * pw);
    const py = (v: number) => pad.t + ph - (v / ymax) * ph;
    parts.push(`<text x="${x0 + pad.l + pw / 2}" y="16" text-anchor="middle" font-weight="bold">${int(n)} registered</text>`);
    for (let g = 0; g <= 4; g++) {
      const v = (ymax / 4) * g;
      const y = py(v);
      parts.push(`<line x1="${x0 + pad.l}" y1="${y.toFixed(1)}" x2="${x0 + pad.l + pw}" y2="${y.toFixed(1)}" stroke="#e5e5e5"/>`);
      parts.push(`<text x="${x0 + pad.l - 6}" y="${(y + 4).toFixed(1)}" text-anchor="end">${short(v)}</text>`);
    }
    concs.forEach((c, k) => parts.push(`<text x="${px(k).toFixed(1)}" y="${pad.t + ph + 16}" text-anchor="middle">${c}</text>`));
    parts.push(`<text x="${x0 + pad.l + pw / 2}" y="${pad.t + ph + 32}" text-anchor="middle" fill="#555">concurrent registrations</text>`);
    if (i === 0) parts.push(`<text x="14" y="${pad.t + ph / 2}" transform="rotate(-90 14 ${pad.t + ph / 2})" text-anchor="middle" fill="#555">registrations / s</text>`);
    for (const s of series) {
      const pts = concs
        .map((c, k) => {
          const cell = mine.find((x) => x.conc === c);
          const v = cell ? s.pick(cell) : undefined;
          return v === undefined ? undefined : `${px(k).toFixed(1)},${py(v).toFixed(1)}`;
        })
        .filter((p): p is string => p !== undefined);
      if (!pts.length) continue;
      parts.push(`<polyline points="${pts.join(" ")}" fill="none" stroke="${s.color}" stroke-width="2"${s.dash ? ` stroke-dasharray="${s.dash}"` : ""}/>`);
      for (const p of pts) {
        const [cx, cy] = p.split(",");
        parts.push(`<circle cx="${cx}" cy="${cy}" r="3" fill="${s.color}"/>`);
      }
    }
  });
  series.forEach((s, i) => {
    const x = 20 + i * 175;
    const y = H + 40;
    parts.push(`<line x1="${x}" y1="${y}" x2="${x + 28}" y2="${y}" stroke="${s.color}" stroke-width="2"${s.dash ? ` stroke-dasharray="${s.dash}"` : ""}/>`);
    parts.push(`<text x="${x + 34}" y="${y + 4}">${s.name}</text>`);
  });
  parts.push("</svg>");
  return parts.join("\n") + "\n";
}

// --- formatting ----------------------------------------------------------------

function regCells(r: Msg): Cell[] {
  const reg = r.registration as Msg | undefined;
  return ((reg?.cells as Cell[] | undefined) ?? []).slice();
}

function notRun(r: Msg, phase: string): string {
  const p = r[phase] as Msg | undefined;
  return p?.error ? `**This phase failed:** ${String(p.error)}` : "_Not measured in this run._";
}

/** A line saying the phase stopped part-way (its rows so far follow), or nothing. */
function failedNote(r: Msg, phase: string): string {
  const p = r[phase] as Msg | undefined;
  return p?.error ? `**This phase stopped part-way:** ${String(p.error)}\n\n` : "";
}

function table(head: string[], rows: string[][]): string {
  const line = (cells: string[]) => `| ${cells.join(" | ")} |`;
  return [line(head), line(head.map((h, i) => (i === 0 ? "---" : "---:"))), ...rows.map(line)].join("\n");
}

function lat(x: Run): string {
  return `${ms(x.latencyMs.p50)} / ${ms(x.latencyMs.p99)} / ${ms(x.latencyMs.max)}`;
}

function errs(x: Run): string {
  return x.errors ? ` (${x.errors} errors)` : "";
}

function ratio(a: number, b: number): string {
  return b ? `${(a / b).toFixed(2)}x` : "";
}

function int(x: number): string {
  return Number.isFinite(x) ? Math.round(x).toLocaleString("en-US") : String(x);
}

function ms(x: number): string {
  return x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2);
}

function secs(msValue: number): string {
  return (msValue / 1000).toFixed(msValue >= 10_000 ? 0 : 1);
}

function kb(bytes: number): string {
  return bytes >= 1e6 ? `${(bytes / 1e6).toFixed(2)} MB` : bytes >= 1e3 ? `${(bytes / 1e3).toFixed(1)} kB` : `${Math.round(bytes)} B`;
}

function mbs(bytes: number): string {
  return (bytes / 1e6).toFixed(1);
}

function cores(x: number): string {
  return x.toFixed(2);
}

function short(v: number): string {
  return v >= 1000 ? `${(v / 1000).toFixed(v % 1000 ? 1 : 0)}k` : String(Math.round(v));
}

function niceMax(v: number): number {
  const mag = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * mag >= v) return m * mag;
  return 10 * mag;
}

if (import.meta.main) {
  const [json = join(import.meta.dir, "results.json"), md = join(import.meta.dir, "..", "BENCHMARKS.md"), svg = join(import.meta.dir, "sweep.svg")] =
    process.argv.slice(2);
  const results = JSON.parse(await Bun.file(json).text()) as Msg;
  await writeReport(results, { md, svg, svgRef: relative(dirname(md), svg) });
  process.stderr.write(`wrote ${md} and ${svg}\n`);
}
