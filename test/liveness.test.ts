/**
 * liveness.ts without sockets: registration and heartbeat deadlines, the
 * node's heartbeat, and the reconnect backoff, driven by a clock the test
 * moves by hand (docs/PROTOCOL.md, "Heartbeats and liveness" and "Leaving,
 * reconnecting, restarts").
 */
import { describe, expect, test } from "bun:test";
import { ManualClock } from "../harness.ts";
import { Backoff, Heartbeat, SessionDeadlines, StallClock, type Expiry, type Watched } from "../liveness.ts";

const LIMITS = { heartbeatMs: 2_000, heartbeatTimeoutMs: 6_000, registerTimeoutMs: 5_000, closingGraceMs: 2_000 };
/** The sweep runs every min(heartbeat / 2, registration deadline / 4, 1 s): a deadline is noticed within one sweep. */
const SWEEP_MS = 1_000;

function deadlines(clock: ManualClock) {
  const sessions = new Set<Watched>();
  const expired: [Watched, Expiry][] = [];
  const d = new SessionDeadlines(clock, LIMITS, () => sessions, (s, why) => {
    expired.push([s, why]);
    sessions.delete(s);
  });
  const session = (phase: Watched["phase"]) => {
    const now = d.clock.now();
    const s: Watched = { phase, openedAt: now, lastSeen: now };
    sessions.add(s);
    return s;
  };
  return { d, session, expired };
}

describe("registration deadline", () => {
  test("a connection that has not registered is expired once the deadline passes, not before", () => {
    const clock = new ManualClock();
    const { session, expired } = deadlines(clock);
    const s = session("new");
    clock.advance(LIMITS.registerTimeoutMs - 100);
    expect(expired).toEqual([]);
    clock.advance(SWEEP_MS + 100); // the sweep after the deadline
    expect(expired).toEqual([[s, "registration-timeout"]]);
  });

  test("traffic before registering does not extend it", () => {
    const clock = new ManualClock();
    const { d, session, expired } = deadlines(clock);
    const s = session("new");
    for (let i = 0; i < 10; i++) {
      clock.advance(600);
      s.lastSeen = d.clock.now();
    }
    expect(expired).toEqual([[s, "registration-timeout"]]);
  });

  test("a session being checked is not expired by the registration deadline", () => {
    const clock = new ManualClock();
    const { session, expired } = deadlines(clock);
    session("checking");
    clock.advance(3 * LIMITS.registerTimeoutMs);
    expect(expired).toEqual([]);
  });
});

describe("heartbeat deadline", () => {
  test("a registered session that keeps sending stays; one silent past the timeout is evicted", () => {
    const clock = new ManualClock();
    const { d, session, expired } = deadlines(clock);
    const alive = session("registered");
    const silent = session("registered");
    for (let t = 0; t < 20_000; t += LIMITS.heartbeatMs) {
      clock.advance(LIMITS.heartbeatMs);
      alive.lastSeen = d.clock.now();
    }
    expect(expired).toEqual([[silent, "heartbeat-timeout"]]);
  });

  test("the registry's own stall is not counted: a frozen loop does not evict the sessions it could not read", () => {
    const clock = new ManualClock();
    const { d, session, expired } = deadlines(clock);
    const s = session("registered");
    clock.advance(1_000);
    clock.freeze(30_000); // nothing ran for 30 s, then the sweep came first
    expect(expired).toEqual([]);
    expect(d.clock.stalledMs).toBe(30_000 - SWEEP_MS);
    // Silence after the stall counts again.
    clock.advance(LIMITS.heartbeatTimeoutMs + 1_000);
    expect(expired).toEqual([[s, "heartbeat-timeout"]]);
  });

  test("a refused connection that does not read its error is cut after the grace period", () => {
    const clock = new ManualClock();
    const { session, expired } = deadlines(clock);
    const s = session("closing");
    clock.advance(LIMITS.closingGraceMs - 100);
    expect(expired).toEqual([]);
    clock.advance(SWEEP_MS + 100);
    expect(expired).toEqual([[s, "closing"]]);
  });

  test("stop() ends the sweeps", () => {
    const clock = new ManualClock();
    const { d, session, expired } = deadlines(clock);
    session("new");
    d.stop();
    clock.advance(60_000);
    expect(expired).toEqual([]);
  });
});

describe("StallClock", () => {
  test("ticks on time, or late within the slack, count no stall", () => {
    const clock = new ManualClock();
    const sc = new StallClock(clock, 500);
    const start = sc.now();
    clock.freeze(500);
    expect(sc.tick()).toBe(0);
    clock.freeze(900); // 400 ms late: within the slack of one tick
    expect(sc.tick()).toBe(0);
    expect(sc.now() - start).toBe(1_400);
  });

  test("a late tick adds its lateness to the stalled total, which now() leaves out", () => {
    const clock = new ManualClock();
    const sc = new StallClock(clock, 500);
    const start = sc.now();
    clock.freeze(10_500);
    expect(sc.tick()).toBe(10_000);
    expect(sc.now() - start).toBe(500);
  });
});

describe("node heartbeat", () => {
  test("pings every interval while the registry is heard; gives it up after the timeout of silence", () => {
    const clock = new ManualClock();
    const events: string[] = [];
    const hb = new Heartbeat(clock, 2_000, 6_000, () => events.push("ping"), (ms) => events.push(`silent ${ms}`));
    clock.advance(2_000);
    hb.heard();
    clock.advance(2_000);
    hb.heard();
    expect(events).toEqual(["ping", "ping"]);
    clock.advance(8_000);
    expect(events).toEqual(["ping", "ping", "ping", "ping", "ping", "silent 6000"]);
    hb.stop();
    clock.advance(10_000);
    expect(events.length).toBe(6);
  });

  test("a node that was itself frozen does not blame the registry for the silence", () => {
    const clock = new ManualClock();
    const events: string[] = [];
    new Heartbeat(clock, 2_000, 6_000, () => events.push("ping"), () => events.push("silent"));
    clock.freeze(60_000);
    expect(events).toEqual(["ping"]);
  });
});

describe("reconnect backoff", () => {
  test("full jitter between 0 and min(cap, base * 2^n), attempts counted from 1, reset by a registration", () => {
    let r = 1;
    const b = new Backoff(100, 2_000, () => r);
    const caps = Array.from({ length: 8 }, () => b.next());
    expect(caps.map((x) => x.capMs)).toEqual([100, 200, 400, 800, 1_600, 2_000, 2_000, 2_000]);
    expect(caps.map((x) => x.delayMs)).toEqual(caps.map((x) => x.capMs));
    expect(caps.map((x) => x.attempt)).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
    r = 0;
    expect(b.next().delayMs).toBe(0);
    b.reset();
    r = 0.5;
    expect(b.next()).toEqual({ delayMs: 50, capMs: 100, attempt: 1 });
  });

  test("the exponent stops growing, so a node retrying for days never overflows", () => {
    const b = new Backoff(100, 2_000, () => 0.5);
    for (let i = 0; i < 10_000; i++) b.next();
    expect(b.next()).toEqual({ delayMs: 1_000, capMs: 2_000, attempt: 10_001 });
  });
});
