/**
 * Per-client budgets, in one place: how many connections one source address
 * and everyone together may hold. Every cap says why it refused, so the
 * caller can answer with a clear error. And how many connections fit into
 * the process's file-descriptor limit at all.
 */
import { readFileSync, readdirSync } from "node:fs";

/** Open connections per source address and in all (0 = no cap). */
export class ConnectionCaps {
  private perAddress = new Map<string, number>();
  private admitted = 0;

  constructor(
    private readonly maxPerAddress: number,
    private readonly maxTotal: number,
  ) {}

  /** Connections admitted and still open. */
  get count(): number {
    return this.admitted;
  }

  /**
   * Counts a new connection from `address`. Returns why it is over a cap, or
   * undefined if admitted. Either way the caller calls `release` with the
   * returned ticket when the connection closes.
   */
  admit(address: string): { refused?: string; ticket: CapTicket } {
    const n = (this.perAddress.get(address) ?? 0) + 1;
    this.perAddress.set(address, n);
    if (this.maxPerAddress && n > this.maxPerAddress) {
      return { refused: `more than ${this.maxPerAddress} connections from ${address}`, ticket: { address, admitted: false } };
    }
    // The per-address cap does not stop many addresses at once (one IPv6 /64 holds plenty).
    if (this.maxTotal && this.admitted >= this.maxTotal) {
      return { refused: `registry holds its maximum of ${this.maxTotal} connections`, ticket: { address, admitted: false } };
    }
    this.admitted++;
    return { ticket: { address, admitted: true } };
  }

  release(ticket: CapTicket): void {
    const n = (this.perAddress.get(ticket.address) ?? 1) - 1;
    if (n > 0) this.perAddress.set(ticket.address, n);
    else this.perAddress.delete(ticket.address);
    if (ticket.admitted) this.admitted--;
  }
}

export interface CapTicket {
  address: string;
  admitted: boolean;
}

/**
 * The status server's budgets (registry `--http-*` flags): it shares the
 * registry's file descriptors, memory and event loop, so a browser, a
 * scraper or an attacker on the HTTP port gets a bounded share of them.
 */
export const HTTP_LIMITS = {
  /** Open HTTP connections in all. */
  maxConns: 256,
  /** Open HTTP connections per source address. */
  maxConnsPerAddress: 32,
  /** Open `/events` streams. */
  maxStreams: 64,
  /** Unsent bytes across all `/events` streams; the slowest streams are dropped past it. */
  streamBudgetBytes: 64 * 1024 * 1024,
  /** Unsent bytes one `/events` stream may fall behind by before it is dropped. */
  streamBacklogBytes: 8 * 1024 * 1024,
  /** A request's head must be complete this long after connecting (or after its first byte). */
  requestTimeoutMs: 10_000,
  /** A connection that moves no byte in either direction this long is closed. */
  idleTimeoutMs: 30_000,
} as const;

// --- file descriptors ----------------------------------------------------------

/** One kind of connection the process holds: its cap (0 = no cap) and the file descriptors each one costs. */
export interface FdDemand {
  cap: number;
  fdsEach: number;
}

export interface FdFit {
  /** The caps to use, in the order asked; the asked ones unless `lowered`. */
  caps: number[];
  lowered: boolean;
  /** Descriptors kept out of the caps: those open already, `fixed`, and the margin. */
  reserved: number;
}

/**
 * Kept free for what the caps do not count: the process's own files, the
 * registry's probes and name lookups, connections being refused. A sixteenth
 * of the limit, at least 128.
 */
export function fdMargin(limit: number): number {
  return Math.max(128, Math.ceil(limit / 16));
}

/**
 * Fits connection caps into a file-descriptor limit. If everything the caps
 * allow, plus what is open now, `fixed` and the margin, exceeds `limit`, every
 * cap is scaled by the same factor (at least 1 each). A cap of 0 ("no cap")
 * cannot be kept under a limit: it counts as wanting the whole limit and
 * comes back as the share that fits.
 */
export function fitCapsToFdLimit(limit: number, openNow: number, demands: readonly FdDemand[], fixed = 0): FdFit {
  const asked = demands.map((d) => d.cap);
  if (!Number.isFinite(limit)) return { caps: asked, lowered: false, reserved: openNow + fixed };
  const reserved = openNow + fixed + fdMargin(limit);
  const room = Math.max(0, limit - reserved);
  const wanted = demands.map((d) => d.cap || Math.ceil(limit / d.fdsEach));
  const need = demands.reduce((sum, d, i) => sum + wanted[i]! * d.fdsEach, 0);
  if (need <= room) return { caps: asked, lowered: false, reserved };
  const factor = room / need;
  return { caps: wanted.map((w) => Math.max(1, Math.floor(w * factor))), lowered: true, reserved };
}

/** The soft "Max open files" of a /proc/PID/limits text: Infinity for unlimited, undefined if the line is missing or unreadable. */
export function parseFdLimit(limitsText: string): number | undefined {
  const m = /^Max open files\s+(\S+)/m.exec(limitsText);
  if (!m) return undefined;
  if (m[1] === "unlimited") return Infinity;
  return /^\d+$/.test(m[1]!) ? Number(m[1]) : undefined;
}

/**
 * This process's file-descriptor limit and how many it holds now, from /proc
 * (Linux). Bun raises the soft limit to the hard one at start, so this is
 * what the process really has. Undefined where /proc is missing.
 */
export function readFdUsage(): { limit: number; open: number } | undefined {
  try {
    const limit = parseFdLimit(readFileSync("/proc/self/limits", "utf8"));
    if (limit === undefined) return undefined;
    return { limit, open: readdirSync("/proc/self/fd").length };
  } catch {
    return undefined;
  }
}
