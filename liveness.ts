/**
 * Who is alive, measured honestly. The registry evicts a session that stayed
 * silent past its heartbeat timeout; a node gives up a registry that stayed
 * silent as long, and reconnects with backoff. Silence is counted on a clock
 * that leaves out the time this process itself was stalled (a frozen event
 * loop, a long pause, SIGSTOP), so nobody is blamed for a silence we caused:
 * the idea of memberlist's Lifeguard. The clock is passed in, so tests can
 * drive every deadline by hand.
 */

export interface Clock {
  /** Milliseconds on a monotonic clock. */
  now(): number;
  /** Calls `fn` every `ms` until the returned function is called; never keeps the process alive. */
  every(ms: number, fn: () => void): () => void;
}

export const systemClock: Clock = {
  now: () => performance.now(),
  every(ms, fn) {
    const timer = setInterval(fn, ms);
    timer.unref();
    return () => clearInterval(timer);
  },
};

/**
 * A clock that stops while this process is stalled. `tick()` is called on a
 * timer meant to fire every `tickMs`; a tick late by more than `slackMs` adds
 * its lateness to the stalled total, which `now()` leaves out.
 */
export class StallClock {
  stalledMs = 0;
  private last: number;

  constructor(
    private readonly clock: Clock,
    private readonly tickMs: number,
    private readonly slackMs = Math.max(100, tickMs),
  ) {
    this.last = clock.now();
  }

  now(): number {
    return this.clock.now() - this.stalledMs;
  }

  /** Returns the lateness counted as a stall (0 for a tick on time). */
  tick(): number {
    const t = this.clock.now();
    const late = t - this.last - this.tickMs;
    this.last = t;
    if (late <= this.slackMs) return 0;
    this.stalledMs += late;
    return late;
  }
}

/** A registry session as its deadlines see it; times are StallClock times. */
export interface Watched {
  phase: "new" | "checking" | "registered" | "closing";
  openedAt: number;
  lastSeen: number;
}

export type Expiry = "registration-timeout" | "heartbeat-timeout" | "closing";

export interface DeadlineLimits {
  heartbeatMs: number;
  /** Silence after which a registered session is evicted. */
  heartbeatTimeoutMs: number;
  /** A new connection must register within this time of connecting. */
  registerTimeoutMs: number;
  /** A refused connection that does not read its error is cut after this. */
  closingGraceMs: number;
}

/**
 * The registry's deadlines: one sweep serves registration and heartbeat
 * deadlines alike, and measures its own lateness so that a registry that was
 * stalled does not evict the sessions it could not read.
 */
export class SessionDeadlines<S extends Watched> {
  readonly clock: StallClock;
  private readonly cancel: () => void;

  constructor(
    clock: Clock,
    private readonly limits: DeadlineLimits,
    private readonly sessions: () => Iterable<S>,
    private readonly expire: (session: S, why: Expiry) => void,
  ) {
    const tickMs = Math.max(50, Math.min(limits.heartbeatMs / 2, limits.registerTimeoutMs / 4, 1000));
    this.clock = new StallClock(clock, tickMs);
    this.cancel = clock.every(tickMs, () => this.sweep());
  }

  sweep(): void {
    this.clock.tick();
    const now = this.clock.now();
    const l = this.limits;
    for (const s of this.sessions()) {
      if (s.phase === "registered") {
        if (now - s.lastSeen > l.heartbeatTimeoutMs) this.expire(s, "heartbeat-timeout");
      } else if (s.phase === "closing") {
        if (now - s.lastSeen > l.closingGraceMs) this.expire(s, "closing");
      } else if (s.phase === "new" && now - s.openedAt > l.registerTimeoutMs) {
        this.expire(s, "registration-timeout");
      }
    }
  }

  stop(): void {
    this.cancel();
  }
}

/**
 * A node's side of the heartbeat: ping every interval, and give the registry
 * up after `timeoutMs` without hearing from it (stalls of this process
 * excluded).
 */
export class Heartbeat {
  private readonly clock: StallClock;
  private readonly cancel: () => void;
  private lastHeard: number;

  constructor(
    clock: Clock,
    intervalMs: number,
    private readonly timeoutMs: number,
    ping: () => void,
    silent: (ms: number) => void,
  ) {
    this.clock = new StallClock(clock, intervalMs);
    this.lastHeard = this.clock.now();
    this.cancel = clock.every(intervalMs, () => {
      this.clock.tick();
      if (this.clock.now() - this.lastHeard > this.timeoutMs) silent(this.timeoutMs);
      else ping();
    });
  }

  heard(): void {
    this.lastHeard = this.clock.now();
  }

  stop(): void {
    this.cancel();
  }
}

/**
 * Capped exponential backoff with full jitter: the n-th delay is drawn from 0
 * to min(cap, base * 2^n), which keeps a fleet of nodes from reconnecting in
 * lockstep after a registry restart.
 */
export class Backoff {
  attempt = 0;

  constructor(
    private readonly baseMs: number,
    private readonly capMs: number,
    private readonly random: () => number = Math.random,
  ) {}

  next(): { delayMs: number; capMs: number; attempt: number } {
    const capMs = Math.min(this.capMs, this.baseMs * 2 ** Math.min(this.attempt, 20));
    const delayMs = Math.round(this.random() * capMs);
    this.attempt++;
    return { delayMs, capMs, attempt: this.attempt };
  }

  reset(): void {
    this.attempt = 0;
  }
}
