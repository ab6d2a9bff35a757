/**
 * What the numbers were measured on, and how busy the machine was with work
 * that is not ours: the benchmark is meant to be read on a noisy machine, so
 * it measures the noise too. CPU accounting comes from /proc (Linux); on other
 * systems the noise figures are left out.
 */
import { availableParallelism, cpus, loadavg, release, totalmem } from "node:os";
import { readdirSync, readFileSync } from "node:fs";

export interface MachineInfo {
  cpu: string;
  cores: number;
  ramBytes: number;
  os: string;
  kernel: string;
  bun: string;
  loadavg: number[];
}

export async function machineInfo(): Promise<MachineInfo> {
  let os = process.platform as string;
  try {
    const text = await Bun.file("/etc/os-release").text();
    os = /^PRETTY_NAME="?([^"\n]*)"?/m.exec(text)?.[1] ?? os;
  } catch {
    // not Linux
  }
  return {
    cpu: cpus()[0]?.model.trim() ?? "unknown",
    cores: availableParallelism(),
    ramBytes: totalmem(),
    os,
    kernel: `${process.platform} ${release()}`,
    bun: `${Bun.version} (${Bun.revision.slice(0, 9)})`,
    loadavg: loadavg(),
  };
}

/**
 * Samples the machine's busy CPU time and our own (this process, its live
 * descendants, and the reaped ones through cutime/cstime), so that
 * busy - ours = the CPU other processes took while we measured. Phase marks
 * split that by benchmark phase.
 */
export class NoiseMeter {
  private marks: { name: string; at: number; busy: number; ours: number; steal: number }[] = [];
  private baseline: { cores: number; ms: number } | undefined;
  private available = true;

  /** Measures the machine's load before we add any (`ms` of idle sampling), then starts. */
  async start(ms = 1000): Promise<void> {
    const a = sampleMachine();
    if (!a) {
      this.available = false;
      return;
    }
    await Bun.sleep(ms);
    const b = sampleMachine()!;
    this.baseline = { cores: (b.busy - a.busy) / TICKS / (ms / 1000), ms };
  }

  mark(name: string): void {
    if (!this.available) return;
    const m = sampleMachine()!;
    this.marks.push({ name, at: performance.now(), busy: m.busy, steal: m.steal, ours: oursTicks() });
  }

  async stop(): Promise<Record<string, unknown>> {
    if (!this.available || this.marks.length < 2) return { available: false };
    const phases = [];
    for (let i = 0; i + 1 < this.marks.length; i++) {
      const a = this.marks[i]!;
      const b = this.marks[i + 1]!;
      const secs = (b.at - a.at) / 1000;
      phases.push({
        phase: a.name,
        seconds: secs,
        ourCores: (b.ours - a.ours) / TICKS / secs,
        otherCores: Math.max(0, b.busy - a.busy - (b.ours - a.ours)) / TICKS / secs,
        stealCores: (b.steal - a.steal) / TICKS / secs,
      });
    }
    const first = this.marks[0]!;
    const last = this.marks[this.marks.length - 1]!;
    const secs = (last.at - first.at) / 1000;
    return {
      available: true,
      before: this.baseline,
      otherCores: Math.max(0, last.busy - first.busy - (last.ours - first.ours)) / TICKS / secs,
      stealCores: (last.steal - first.steal) / TICKS / secs,
      phases,
      loadavgEnd: loadavg(),
    };
  }
}

/** The machine's busy CPU time and ours at one moment, for `otherCores` between two readings (undefined off Linux). */
export interface CpuReading {
  at: number;
  busy: number;
  ours: number;
}

export function cpuReading(): CpuReading | undefined {
  const m = sampleMachine();
  return m && { at: performance.now(), busy: m.busy, ours: oursTicks() };
}

/** Cores that processes other than ours kept busy between two readings. */
export function otherCores(a: CpuReading | undefined, b: CpuReading | undefined): number | undefined {
  if (!a || !b || b.at <= a.at) return undefined;
  return Math.max(0, b.busy - a.busy - (b.ours - a.ours)) / TICKS / ((b.at - a.at) / 1000);
}

// --- internal ----------------------------------------------------------------

/** USER_HZ: /proc reports CPU time in 1/100 s on every Linux we run on. */
const TICKS = 100;

/** Busy ticks: user+nice+system (softirq left out: our own loopback traffic lands there). */
function sampleMachine(): { busy: number; steal: number } | undefined {
  try {
    const line = readFileSync("/proc/stat", "utf8").split("\n", 1)[0]!;
    const f = line.trim().split(/\s+/).slice(1).map(Number);
    return { busy: f[0]! + f[1]! + f[2]!, steal: f[7] ?? 0 };
  } catch {
    return undefined;
  }
}

/** Our CPU ticks: this process and reaped children (cutime/cstime), plus live descendants. */
function oursTicks(): number {
  const self = procStat(process.pid);
  if (!self) return 0;
  let total = self.utime + self.stime + self.cutime + self.cstime;
  for (const pid of descendants(process.pid)) {
    const s = procStat(pid);
    if (s) total += s.utime + s.stime;
  }
  return total;
}

function procStat(pid: number): { ppid: number; utime: number; stime: number; cutime: number; cstime: number } | undefined {
  try {
    const text = readFileSync(`/proc/${pid}/stat`, "utf8");
    const f = text.slice(text.lastIndexOf(")") + 2).split(" ");
    // After the command: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    return { ppid: Number(f[1]), utime: Number(f[11]), stime: Number(f[12]), cutime: Number(f[13]), cstime: Number(f[14]) };
  } catch {
    return undefined;
  }
}

function descendants(root: number): number[] {
  const parent = new Map<number, number>();
  for (const name of readdirSync("/proc")) {
    const pid = Number(name);
    if (!Number.isInteger(pid)) continue;
    const s = procStat(pid);
    if (s) parent.set(pid, s.ppid);
  }
  const out: number[] = [];
  const kids = new Map<number, number[]>();
  for (const [pid, pp] of parent) {
    if (!kids.has(pp)) kids.set(pp, []);
    kids.get(pp)!.push(pid);
  }
  const stack = [root];
  while (stack.length) {
    for (const k of kids.get(stack.pop()!) ?? []) {
      out.push(k);
      stack.push(k);
    }
  }
  return out;
}
