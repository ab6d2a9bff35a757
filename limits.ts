/**
 * Per-client budgets, in one place: how many connections one source address
 * and everyone together may hold, and how many fit into the process's
 * file-descriptor limit at all; rates (token buckets, per session or per
 * address); the memory all unsent bytes may take. Every limit says why it
 * refused, so the caller can answer with a clear error.
 */
import { readFileSync, readdirSync } from "node:fs";

/** Open connections per source address and in all (0 = no cap). */
export class ConnectionCaps {
  private perAddress = new Map<string, number>();
  private admitted = 0;

  constructor(
    private readonly maxPerAddress: number,
    private readonly maxTotal: number,
    /** Who holds them, for the refusal: "registry", "node", "status server". */
    private readonly holder = "registry",
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
      return { refused: `${this.holder} holds its maximum of ${this.maxTotal} connections`, ticket: { address, admitted: false } };
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

/**
 * A token bucket: `capacity` tokens, refilled at `perSecond`. A rate of 0
 * means no limit. Time comes from `now` (ms), so tests can drive it.
 */
export class TokenBucket {
  private tokens: number;
  private at: number;

  constructor(
    private readonly capacity: number,
    private readonly perSecond: number,
    private readonly now: () => number = () => performance.now(),
  ) {
    this.tokens = capacity;
    this.at = now();
  }

  /** Takes `n` tokens if there are that many; false (and nothing taken) if not. */
  take(n = 1): boolean {
    if (this.perSecond <= 0) return true;
    this.refill();
    if (this.tokens < n) return false;
    this.tokens -= n;
    return true;
  }

  /** Ms until `n` tokens are there. */
  waitMs(n = 1): number {
    if (this.perSecond <= 0) return 0;
    this.refill();
    return this.tokens >= n ? 0 : Math.ceil(((n - this.tokens) / this.perSecond) * 1000);
  }

  /** True once the bucket has refilled: it holds no memory of the past and can be forgotten. */
  get full(): boolean {
    this.refill();
    return this.tokens >= this.capacity;
  }

  private refill(): void {
    const t = this.now();
    this.tokens = Math.min(this.capacity, this.tokens + ((t - this.at) / 1000) * this.perSecond);
    this.at = t;
  }
}

/** What a rate limit allows: `perSecond` on average, bursts of `burst`; 0 per second = no limit. */
export interface Rate {
  perSecond: number;
  burst: number;
}

/**
 * One token bucket per key (a source address). Buckets that have refilled are
 * forgotten, so the map holds only the keys that were busy lately; past
 * `maxKeys` the oldest go first, which errs on the side of letting traffic in.
 */
export class BucketMap {
  private readonly buckets = new Map<string, TokenBucket>();

  constructor(
    private readonly rate: Rate,
    private readonly now: () => number = () => performance.now(),
    private readonly maxKeys = 100_000,
  ) {}

  take(key: string, n = 1): boolean {
    return this.perSecond <= 0 || this.bucket(key).take(n);
  }

  waitMs(key: string, n = 1): number {
    return this.buckets.get(key)?.waitMs(n) ?? 0;
  }

  /** Forgets the buckets that have refilled; call now and then. */
  sweep(): void {
    for (const [k, b] of this.buckets) if (b.full) this.buckets.delete(k);
  }

  get size(): number {
    return this.buckets.size;
  }

  private get perSecond(): number {
    return this.rate.perSecond;
  }

  private bucket(key: string): TokenBucket {
    let b = this.buckets.get(key);
    if (!b) {
      if (this.buckets.size >= this.maxKeys) this.buckets.delete(this.buckets.keys().next().value!);
      b = new TokenBucket(this.rate.burst, this.rate.perSecond, this.now);
      this.buckets.set(key, b);
    }
    return b;
  }
}

/** A holder of unsent bytes that the budget can drop (a connection). */
export interface Backlogged {
  /** Its own unsent bytes (a buffer shared with others counts in full here). */
  readonly pendingBytes: number;
  /** Drops it as a slow consumer. */
  dropSlow(why: string): void;
}

/**
 * The memory all unsent bytes may take, together. A buffer queued for many
 * connections (one fan-out write, one snapshot) is counted once, while any
 * of them holds it. Over budget, the connections with the largest backlogs
 * are dropped first, until the total fits: whoever does not read pays,
 * never the others.
 */
export class ByteBudget {
  private held = new Map<Uint8Array, number>();
  private bytes = 0;
  readonly backlogged = new Set<Backlogged>();
  /** Connections dropped to keep within the budget. */
  dropped = 0;

  constructor(readonly max: number) {}

  get total(): number {
    return this.bytes;
  }

  /** A connection queued `buf` (or a tail of it). */
  retain(buf: Uint8Array, by: Backlogged): void {
    const n = this.held.get(buf) ?? 0;
    this.held.set(buf, n + 1);
    if (n === 0) this.bytes += buf.byteLength;
    this.backlogged.add(by);
  }

  /** A connection is done with `buf` (written, or dropped). */
  release(buf: Uint8Array): void {
    const n = this.held.get(buf);
    if (n === undefined) return;
    if (n > 1) return void this.held.set(buf, n - 1);
    this.held.delete(buf);
    this.bytes -= buf.byteLength;
  }

  /** Drops the largest backlogs until the total fits the budget (0 = no budget). */
  enforce(): void {
    while (this.max && this.bytes > this.max && this.backlogged.size) {
      let worst: Backlogged | undefined;
      for (const c of this.backlogged) if (!worst || c.pendingBytes > worst.pendingBytes) worst = c;
      this.backlogged.delete(worst!);
      this.dropped++;
      worst!.dropSlow(`over the registry's budget of ${this.max} unsent bytes, with the largest backlog (${worst!.pendingBytes} bytes): the peer does not read`);
    }
  }
}
