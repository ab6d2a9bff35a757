/**
 * Per-client budgets, in one place: how many connections one source address
 * and everyone together may hold. Every cap says why it refused, so the
 * caller can answer with a clear error.
 */

/** Open connections per source address and in all (0 = no cap). */
export class ConnectionCaps {
  private perAddress = new Map<string, number>();
  private admitted = 0;

  constructor(
    private readonly maxPerAddress: number,
    private readonly maxTotal: number,
    /** Who holds them, for the refusal: "registry", "node". */
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
