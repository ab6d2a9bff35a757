/**
 * The registry's sessions: one per node connection. They read its lines
 * within rate limits, register it through admission and membership, answer
 * pings, syncs and lists, keep its deadlines, and turn membership changes into
 * pushes (the fan-out) and the registry's events. registry.ts wires them to a
 * listener; the list itself is membership.ts's.
 */
import { Admission, type Holding } from "./admission.ts";
import type { CommonEvent } from "./cli.ts";
import { BucketMap, ByteBudget, ConnectionCaps, TokenBucket, type CapTicket, type Rate } from "./limits.ts";
import { SessionDeadlines, type Clock, type DeadlineLimits, type Expiry, type Watched } from "./liveness.ts";
import { addressOf, peerOf, type Change, type Member, type Membership, type StoreState } from "./membership.ts";
import { formatAddress, lineHandlers, type Conn } from "./net.ts";
import { PING_LINE, PONG_LINE, PROTOCOL_VERSION, ToRegistry, decode, type ErrorCode, type LeaveReason, type Register } from "./protocol.ts";

export type RegistryEvent =
  | { event: "listening"; host: string; port: number; boot: string }
  /** `registry`: the id of the registry whose session holds it (with a shared store, maybe another). */
  | { event: "node-registered"; id: string; host: string; port: number; name?: string; source: string; registry: string; nodes: number; seq: number }
  | { event: "node-left"; id: string; host: string; port: number; name?: string; reason: LeaveReason; nodes: number; seq: number }
  | { event: "pair-greeted"; a: string; b: string }
  | { event: "mesh-complete"; nodes: number; pairs: number; ms: number }
  /** A connection was refused and closed, or cut over a limit; `detail` (never sent to the client) says more. */
  | { event: "error"; code: ErrorCode; message: string; remote: string; detail?: string }
  | { event: "http-listening"; url: string }
  /** The shared store was lost (this registry serves its own sessions alone) or is back; once per change. */
  | { event: "store"; state: StoreState; reason?: string }
  | { event: "stopped" }
  /** `warning` once at start (a token sent in clear on a port other hosts reach); on SIGHUP (CLI only) `tls-reloaded` or `tls-reload-failed`. */
  | CommonEvent;

export interface RegistryStats {
  nodes: number;
  joins: number;
  leaves: Record<LeaveReason, number>;
  registrations: number;
  rejected: Partial<Record<ErrorCode, number>>;
  seq: number;
  pairsGreeted: number;
  pairsExpected: number;
  /** Registration latency (register received -> reply sent) percentiles, ms, over a recent window. */
  latencyMs: { p50: number; p90: number; p99: number; max: number; count: number; /** Of every registration since start. */ sum: number };
  startedAt: number;
  /** Time the mesh last became complete after the last join, ms since the join (null while incomplete). */
  meshCompleteMs: number | null;
  /** Unsent bytes held for all sessions now (shared buffers counted once), and the budget. */
  unsentBytes: number;
  maxUnsentBytes: number;
  /** `sync` requests answered by a snapshot still on its way. */
  coalescedSyncs: number;
  /** Wrong tokens (in `register` or `list`), and requests refused because their address sent too many. */
  authFailures: number;
  authBlocked: number;
  /** Time the registry's own event loop was stalled, ms in all (left out of every deadline). */
  stalledMs: number;
  /** This registry's id: unique per process, the `registry` of the nodes it holds. */
  registry: string;
  /** Registered sessions this registry holds (`nodes` counts every registry's, with a shared store). */
  sessions: number;
  /** The shared store's state (always "ok" without one), and why it is degraded. */
  store: StoreState;
  storeError?: string;
}

/** What the sessions need to know of the registry's settings. */
export interface SessionSettings extends DeadlineLimits {
  maxLineBytes: number;
  maxQueueBytes: number;
  maxQueueTotalBytes: number;
  maxConnsPerAddress: number;
  maxConns: number;
  rateSessionLines: number;
  rateAddressLines: number;
  rateSessionSyncs: number;
  rateAddressLists: number;
}

/** A refused client that does not read its error is cut this long after. */
export const CLOSING_GRACE_MS = 2_000;

/** Fan-out pacing: after a flush of t ms, at least this many t of other work (fan-out <= 1/(1+PUSH_PACING) of the loop). */
const PUSH_PACING = 4;

const PING_CHUNK = Buffer.from(PING_LINE + "\n");
const PONG_BYTES = Buffer.from(PONG_LINE);

/** Lines handled per read of one connection before the others get a turn. */
const MAX_LINES_PER_READ = 64;

/**
 * Lines over a rate limit a session may send before it is closed: they drain
 * a bucket of 100 refilled at 10 a second, so a short burst passes and a
 * sustained flood, at any rate above the limit, is closed within seconds.
 */
const STRIKES = { burst: 100, perSecond: 10 };

/** A session over a limit is told so at most this often; every excess line is still counted. */
const RATE_NOTICE_MS = 1_000;

interface Session extends Watched {
  conn: Conn<Session>;
  caps?: CapTicket;
  /** The registration this session holds, while it is listed. */
  member?: Member;
  leaveReason?: LeaveReason;
  lines: TokenBucket;
  syncs: TokenBucket;
  /** Lines over a rate limit: when this is empty, the session is closed. */
  strikes: TokenBucket;
  /** When it was last answered `rate-limited`. */
  noticedAt: number;
  /** `sentBytes` at the end of the last snapshot queued: while the connection has not written that far, a sync waits for it. */
  snapshotEnd: number;
}

/**
 * The registry's sessions: one per node connection. Reads its lines (within
 * rate limits), registers it through admission and membership, answers pings
 * and syncs, and turns membership changes into pushes and events.
 */
export class Sessions {
  readonly handlers: Bun.SocketHandler<Conn<Session>>;
  private readonly conns = new Set<Conn<Session>>();
  /** Local sessions by the ticket of the registration they hold. */
  private readonly byTicket = new Map<string, Conn<Session>>();
  /** Local sessions by the ticket of the registration they are joining with, until the join settles. */
  private readonly joining = new Map<string, Conn<Session>>();
  private readonly caps: ConnectionCaps;
  private readonly budget: ByteBudget;
  private readonly addressLines: BucketMap;
  private readonly addressLists: BucketMap;
  private readonly deadlines: SessionDeadlines<Session>;
  private readonly fanout: FanOut;
  private readonly snapshots: SnapshotCache;
  private registrations = 0;
  private stopping = false;

  constructor(
    private readonly s: SessionSettings,
    private readonly membership: Membership,
    private readonly admission: Admission,
    private readonly counters: Counters,
    private readonly emit: (e: RegistryEvent) => void,
    private readonly clock: Clock,
    private readonly registryId: string,
  ) {
    this.caps = new ConnectionCaps(s.maxConnsPerAddress, s.maxConns);
    this.budget = new ByteBudget(s.maxQueueTotalBytes);
    this.addressLines = new BucketMap(perSecond(s.rateAddressLines), () => clock.now());
    this.addressLists = new BucketMap(perSecond(s.rateAddressLists), () => clock.now());
    this.fanout = new FanOut(this.conns);
    this.snapshots = new SnapshotCache(membership);
    this.deadlines = new SessionDeadlines(clock, s, () => this.states(), (session, why) => this.expire(session, why));
    membership.subscribe((c) => this.onChange(c));
    this.handlers = lineHandlers<Session>({
      maxLineBytes: s.maxLineBytes,
      maxQueueBytes: s.maxQueueBytes,
      budget: this.budget,
      maxLinesPerRead: MAX_LINES_PER_READ,
      state: (socket) => this.newSession(socket.data),
      // A ping alone in its chunk is answered without splitting or decoding: with
      // 10,000 nodes that is 5,000 lines a second.
      exact: {
        bytes: PING_CHUNK,
        handle: (conn) => {
          const s = conn.state;
          if (s.phase !== "registered" || !this.allowLine(s)) return false;
          conn.send(PONG_BYTES);
          return true;
        },
      },
      // The sign of life is a line arriving (its end, 0x0a), not a line handled: one held
      // back by a rate limit may be handled long after its sender is gone, and meanwhile
      // the socket is not read, so its close goes unseen too.
      received: (conn, chunk) => {
        if (conn.state.phase === "registered" && chunk.includes(0x0a)) conn.state.lastSeen = this.deadlines.clock.now();
      },
      open: (conn) => this.onOpen(conn),
      line: (conn, line) => this.onLine(conn, line),
      close: (conn) => this.onClose(conn),
    });
  }

  /** The figures of /stats that the sessions' parts keep. */
  figures(): Pick<RegistryStats, "unsentBytes" | "maxUnsentBytes" | "authFailures" | "authBlocked" | "stalledMs" | "registry" | "sessions"> {
    return {
      registry: this.registryId,
      sessions: this.byTicket.size,
      unsentBytes: this.budget.total,
      maxUnsentBytes: this.budget.max,
      authFailures: this.admission.tokens.failed,
      authBlocked: this.admission.tokens.blocked,
      stalledMs: Math.round(this.deadlines.clock.stalledMs),
    };
  }

  private newSession(conn: Conn<Session>): Session {
    const now = this.deadlines.clock.now();
    const clock = () => this.clock.now();
    return {
      conn,
      phase: "new",
      openedAt: now,
      lastSeen: now,
      lines: new TokenBucket(10 * this.s.rateSessionLines, this.s.rateSessionLines, clock),
      syncs: new TokenBucket(10 * this.s.rateSessionSyncs, this.s.rateSessionSyncs, clock),
      strikes: new TokenBucket(STRIKES.burst, STRIKES.perSecond, clock),
      noticedAt: -Infinity,
      snapshotEnd: 0,
    };
  }

  private *states(): IterableIterator<Session> {
    for (const c of this.conns) yield c.state;
    // Rate-limit state of quiet addresses is forgotten on the same beat.
    this.addressLines.sweep();
    this.addressLists.sweep();
    this.admission.sweep();
  }

  private onOpen(conn: Conn<Session>): void {
    if (this.stopping) return conn.fail("shutting-down", "registry is shutting down");
    const { refused, ticket } = this.caps.admit(conn.remoteAddress);
    conn.state.caps = ticket;
    if (refused) return this.reject(conn, "too-many-connections", refused);
    this.conns.add(conn);
  }

  /** Takes a line from the session's and its address's rate limits. */
  private allowLine(s: Session): boolean {
    return s.lines.take() && this.addressLines.take(s.conn.remoteAddress);
  }

  private onLine(conn: Conn<Session>, line: string): void {
    const s = conn.state;
    if (s.phase === "closing") return;
    if (!this.allowLine(s)) return this.overRate(conn, "lines", Math.max(s.lines.waitMs(), this.addressLines.waitMs(conn.remoteAddress)));
    if (line === PING_LINE && s.phase === "registered") {
      conn.send(PONG_LINE);
      return;
    }
    const r = decode(ToRegistry, line, this.admission.quoteLines);
    if (!r.ok) {
      // Before registration a bad line ends the connection; afterwards the
      // session stays, since a live node's membership should not hinge on one bad line.
      if (s.phase !== "registered") return this.reject(conn, r.code, r.message);
      return this.answerError(conn, r.code, r.message);
    }
    const msg = r.msg;
    switch (msg.type) {
      case "register":
        if (s.phase !== "new") return this.answerError(conn, "unexpected-message", `register in phase ${s.phase}`);
        // What the node sends meanwhile is read once it has its answer.
        s.phase = "checking";
        conn.hold();
        this.register(conn, msg)
          .catch((e) => this.reject(conn, "bad-message", `internal error: ${(e as Error).message}`))
          .finally(() => conn.release());
        return;
      case "ping":
        if (s.phase !== "registered") return this.reject(conn, "unexpected-message", "ping before register");
        conn.send(PONG_LINE);
        return;
      case "leave":
        // Said goodbye: whatever follows on this connection is not read.
        s.leaveReason = "leave";
        s.phase = "closing";
        s.lastSeen = this.deadlines.clock.now();
        this.unlist(s, "leave");
        conn.end();
        return;
      case "sync":
        if (s.phase !== "registered") return this.reject(conn, "unexpected-message", "sync before register");
        return this.sync(conn);
      case "receipt":
        if (s.phase !== "registered" || !s.member) return this.reject(conn, "unexpected-message", "receipt before register");
        this.membership.receipt(s.member, msg.ids);
        return;
      case "list":
        if (s.phase !== "new") return this.answerError(conn, "unexpected-message", "list is a connection's first and only request");
        return this.list(conn, msg);
    }
  }

  /** Answers a read-only `list` with the snapshot every `sync` gets, and closes. */
  private list(conn: Conn<Session>, msg: Extract<ToRegistry, { type: "list" }>): void {
    const source = conn.remoteAddress;
    if (msg.v !== PROTOCOL_VERSION) return this.reject(conn, "unsupported-version", `protocol version ${msg.v} is not supported; this registry speaks ${PROTOCOL_VERSION}`);
    const refused = this.admission.authorize(msg.token, source);
    if (refused) return this.reject(conn, refused.code, refused.message);
    if (!this.addressLists.take(source)) return this.reject(conn, "rate-limited", `too many list requests from ${source}; retry in a few seconds`);
    conn.state.phase = "closing";
    conn.state.lastSeen = this.deadlines.clock.now();
    conn.send(this.snapshots.line());
    conn.end();
  }

  /**
   * Answers `sync` with the list, at most one snapshot on its way per session:
   * while the last one is still queued, it answers this sync too (the pushes
   * after it follow in order), so a client that asks and never reads cannot
   * pile snapshots up. The snapshot's bytes are shared by every session.
   */
  private sync(conn: Conn<Session>): void {
    const s = conn.state;
    if (conn.sentBytes - conn.pendingBytes < s.snapshotEnd) {
      this.counters.coalescedSyncs++;
      return;
    }
    if (!s.syncs.take()) return this.overRate(conn, "sync requests", s.syncs.waitMs());
    conn.send(this.snapshots.line());
    s.snapshotEnd = conn.sentBytes;
  }

  /**
   * A line over a rate limit. It is counted, the session is told (at most once
   * a second), and its connection is not read again until the limit allows
   * a line: the rest of a flood waits in the flooder's own kernel buffers and
   * costs the registry nothing. A session that keeps at it is closed.
   */
  private overRate(conn: Conn<Session>, what: string, waitMs: number): void {
    const s = conn.state;
    if (!s.strikes.take()) return this.reject(conn, "rate-limited", `too many ${what} from this session, for too long: closing it`);
    this.counters.reject("rate-limited");
    const now = this.clock.now();
    if (now - s.noticedAt >= RATE_NOTICE_MS) {
      s.noticedAt = now;
      conn.send({ type: "error", code: "rate-limited", message: `too many ${what} from this session; slow down` });
    }
    conn.hold();
    setTimeout(() => conn.release(), Math.max(1, waitMs)).unref();
  }

  private async register(conn: Conn<Session>, msg: Register): Promise<void> {
    const started = performance.now();
    const verdict = await this.admission.check(msg, conn.remoteAddress, conn.peer);
    if (!verdict.ok) return this.reject(conn, verdict.code, verdict.message, verdict.detail);
    const member: Member = {
      id: msg.id,
      host: verdict.host,
      port: msg.port,
      ...(msg.name ? { name: msg.name } : {}),
      source: conn.remoteAddress,
      registry: this.registryId,
      joinedAt: Date.now(),
      ticket: `${this.registryId}.${++this.registrations}`,
    };
    // Another registration may slip in while this one is decided; then decide again.
    for (let attempt = 1; ; attempt++) {
      const replaces = await this.admission.replaceable(member, (m) => this.holding(m), conn.remoteAddress);
      if (!Array.isArray(replaces)) return this.reject(conn, replaces.code, replaces.message, replaces.detail);
      // The session may have closed while we resolved or probed; its close
      // handler has run, so listing it now would leave an entry nobody removes.
      if (conn.closed) return;
      if (this.stopping) return this.reject(conn, "shutting-down", "registry is shutting down");
      this.joining.set(member.ticket, conn);
      const joined = await this.membership.join(member, replaces).finally(() => this.joining.delete(member.ticket));
      if (joined.ok) break;
      if (attempt === 3) return this.reject(conn, "id-in-use", `node ${joined.holder.id} at ${addressOf(joined.holder)} registered at the same moment`);
    }
    // Usually answered already, when the list announced the join (onChange); not when a reload overtook it.
    if (conn.state.member?.ticket !== member.ticket) {
      if (conn.closed) return void this.membership.leave(member, "closed");
      this.listed(conn, member);
    }
    this.counters.registered(performance.now() - started);
  }

  /** The session now holds `member`: it is registered and gets its reply. */
  private listed(conn: Conn<Session>, member: Member): void {
    const s = conn.state;
    s.phase = "registered";
    s.member = member;
    s.lastSeen = this.deadlines.clock.now();
    this.byTicket.set(member.ticket, conn);
    const self = JSON.stringify(peerOf(member));
    const m = this.membership;
    conn.send(
      `{"type":"registered","v":${PROTOCOL_VERSION},"boot":"${m.boot}","seq":${m.seq},"heartbeat":${this.s.heartbeatMs},"timeout":${this.s.heartbeatTimeoutMs},"self":${self},"peers":[${m.peerList(member.id)}]}\n`,
    );
  }

  /**
   * Whether a listed registration's session is gone, silent (it missed a
   * beat) or live. Another registry's registration is gone when that
   * registry is gone or silent (it missed a lease renewal): nobody can tell
   * its sessions' beats then. Else it is taken for live.
   */
  private holding(m: Member): Holding | Promise<Holding> {
    const conn = this.byTicket.get(m.ticket);
    if (conn) return this.deadlines.clock.now() - conn.state.lastSeen > 1.5 * this.s.heartbeatMs ? "silent" : "live";
    if (m.registry === this.registryId) return "gone";
    return this.membership.isConnected(m.registry).then((alive) => (alive ? "live" : "gone"));
  }

  private onClose(conn: Conn<Session>): void {
    this.conns.delete(conn);
    const s = conn.state;
    // The connection layer cut it over a limit (line size, unsent backlog): reported like any refusal.
    if (conn.limitHit && s.phase !== "closing") {
      this.counters.reject(conn.limitHit.code);
      this.emit({ event: "error", ...conn.limitHit, remote: formatAddress(conn.remoteAddress, conn.remotePort) });
    }
    if (s.caps) this.caps.release(s.caps);
    this.unlist(s, s.leaveReason ?? "closed");
  }

  /** Takes this session's node off the list, if it still holds it. */
  private unlist(s: Session, reason: LeaveReason): void {
    const member = s.member;
    if (!member) return;
    s.member = undefined;
    if (this.byTicket.get(member.ticket) === s.conn) this.byTicket.delete(member.ticket);
    void this.membership.leave(member, reason);
  }

  private onChange(c: Change): void {
    switch (c.kind) {
      case "joined": {
        const m = c.member;
        // Answered right as its join is applied: the reply's peers and seq are the list exactly at
        // that seq. With a shared list, later joins (other registries') may follow at once; a reply
        // built after them would list them too, and they would list this node: both would greet.
        const joining = this.joining.get(m.ticket);
        if (joining && !joining.closed) this.listed(joining, m);
        this.fanout.push(`{"type":"joined","seq":${c.seq},"peer":${JSON.stringify(peerOf(m))}}\n`);
        if (c.replaced) this.evict(c.replaced, `node ${m.id} registered again on another connection`);
        this.counters.joins++;
        const nodes = this.membership.size;
        this.emit({ event: "node-registered", id: m.id, host: m.host, port: m.port, name: m.name, source: m.source, registry: m.registry, nodes, seq: c.seq });
        return;
      }
      case "left": {
        const m = c.member;
        this.fanout.push(`{"type":"left","seq":${c.seq},"id":${JSON.stringify(m.id)},"reason":"${c.reason}"}\n`);
        if (c.reason === "replaced") this.evict(m, `another node registered ${addressOf(m)}`);
        this.counters.leaves[c.reason]++;
        this.emit({ event: "node-left", id: m.id, host: m.host, port: m.port, name: m.name, reason: c.reason, nodes: this.membership.size, seq: c.seq });
        return;
      }
      case "greeted":
        return this.emit({ event: "pair-greeted", a: c.a, b: c.b });
      case "mesh-complete":
        return this.emit({ event: "mesh-complete", nodes: c.nodes, pairs: c.pairs, ms: c.ms });
      case "reset":
        return this.onReset();
      case "store":
        return this.emit({ event: "store", state: c.state, ...(c.reason ? { reason: c.reason } : {}) });
    }
  }

  /**
   * The list was rebuilt under us (a shared store came back, perhaps empty: a
   * new boot): every session gets the whole of it, unsolicited. A session
   * whose registration did not survive lost its id or address to another
   * registration written back first, a live process elsewhere: it is ended
   * as `replaced`, as on one registry.
   */
  private onReset(): void {
    this.fanout.flush();
    const line = this.snapshots.line();
    for (const conn of [...this.conns]) {
      const member = conn.state.member;
      if (conn.state.phase !== "registered") continue;
      if (member && this.membership.get(member.id)?.ticket !== member.ticket) {
        this.evict(member, `node ${member.id} or its address ${addressOf(member)} was registered elsewhere while the store was out of reach`);
        continue;
      }
      conn.send(line);
    }
  }

  /** Ends the local session holding a registration that another one replaced. */
  private evict(replaced: Member, message: string): void {
    const old = this.byTicket.get(replaced.ticket);
    if (!old) return;
    this.byTicket.delete(replaced.ticket);
    old.state.member = undefined;
    if (!old.closed) old.fail("replaced", message);
  }

  private expire(s: Session, why: Expiry): void {
    const conn = s.conn;
    if (why === "heartbeat-timeout") {
      s.leaveReason = "timeout";
      conn.send({ type: "error", code: why, message: `no heartbeat for ${this.s.heartbeatTimeoutMs}ms` });
      conn.destroy();
    } else if (why === "closing") {
      conn.destroy(); // told why and ended, but the peer does not read
    } else {
      this.reject(conn, why, `no register within ${this.s.registerTimeoutMs}ms`);
    }
  }

  /** Answers a bad line on a registered session, which stays. */
  private answerError(conn: Conn<Session>, code: ErrorCode, message: string): void {
    this.counters.reject(code);
    conn.send({ type: "error", code, message });
  }

  /** Refuses a connection: tells it why, counts and reports it, and closes it. */
  private reject(conn: Conn<Session>, code: ErrorCode, message: string, detail?: string): void {
    this.counters.reject(code);
    conn.state.phase = "closing";
    conn.state.lastSeen = this.deadlines.clock.now();
    const remote = formatAddress(conn.remoteAddress, conn.remotePort);
    this.emit({ event: "error", code, message, remote, ...(detail ? { detail } : {}) });
    conn.fail(code, message);
  }

  /** Tells every session the registry is stopping, and waits (1 s at most) for them to close. */
  async close(): Promise<void> {
    this.stopping = true;
    this.deadlines.stop();
    this.fanout.flush();
    const open = Array.from(this.conns, (conn) => {
      conn.state.leaveReason = "closed";
      conn.fail("shutting-down", "registry is shutting down");
      return conn;
    });
    const deadline = performance.now() + 1000;
    while (open.some((c) => !c.closed) && performance.now() < deadline) await Bun.sleep(10);
    for (const c of open) c.destroy();
  }
}

/** The `snapshot` line for the list as it is, encoded once per change and shared by every session that asks. */
class SnapshotCache {
  private cached: { boot: string; seq: number; bytes: Buffer } | undefined;

  constructor(private readonly membership: Membership) {}

  line(): Buffer {
    const m = this.membership;
    const c = this.cached;
    if (c && c.boot === m.boot && c.seq === m.seq) return c.bytes;
    const bytes = Buffer.from(`{"type":"snapshot","boot":"${m.boot}","seq":${m.seq},"peers":[${m.peerList()}]}\n`);
    this.cached = { boot: m.boot, seq: m.seq, bytes };
    return bytes;
  }
}

/** A rate as a token bucket wants it: bursts of ten seconds' worth. */
function perSecond(rate: number): Rate {
  return { perSecond: rate, burst: 10 * rate };
}

/**
 * Membership pushes, one write per session. A flush that took t ms is
 * followed by at least PUSH_PACING * t ms of other work, so fan-out stays a
 * bounded share of the loop: with few sessions t is microseconds and pushes
 * leave on the next turn; with thousands, many changes share each write.
 */
class FanOut {
  private batch: string[] = [];
  private scheduled = false;
  private nextFlushAt = 0;

  constructor(private readonly conns: Iterable<Conn<Session>>) {}

  push(line: string): void {
    this.batch.push(line);
    if (this.scheduled) return;
    this.scheduled = true;
    const wait = this.nextFlushAt - performance.now();
    if (wait > 0) setTimeout(() => this.flush(), wait);
    else setImmediate(() => this.flush());
  }

  flush(): void {
    this.scheduled = false;
    const lines = this.batch;
    this.batch = [];
    if (!lines.length) return;
    const started = performance.now();
    // Encoded once for all sessions; a node skips events at or below the seq it already has.
    const bytes = Buffer.from(lines.join(""));
    for (const conn of this.conns) if (conn.state.phase === "registered") conn.send(bytes);
    const ended = performance.now();
    this.nextFlushAt = ended + (ended - started) * PUSH_PACING;
  }
}

/** The registry's own counters: registrations, refusals, latencies. */
export class Counters {
  joins = 0;
  coalescedSyncs = 0;
  leaves: Record<LeaveReason, number> = { closed: 0, timeout: 0, leave: 0, replaced: 0 };
  private registrations = 0;
  private rejected: Partial<Record<ErrorCode, number>> = {};
  private latencies = new Float64Array(4096);
  private latencySumMs = 0;
  private readonly startedAt = Date.now();

  reject(code: ErrorCode): void {
    this.rejected[code] = (this.rejected[code] ?? 0) + 1;
  }

  registered(latencyMs: number): void {
    this.latencies[this.registrations++ % this.latencies.length] = latencyMs;
    this.latencySumMs += latencyMs;
  }

  stats(m: Membership, parts: ReturnType<Sessions["figures"]>): RegistryStats {
    const n = Math.min(this.registrations, this.latencies.length);
    const sorted = Array.from(this.latencies.subarray(0, n)).sort((a, b) => a - b);
    const pct = (p: number) => (n ? round(sorted[Math.min(n - 1, Math.floor(p * n))]!) : 0);
    const mesh = m.mesh();
    return {
      nodes: m.size,
      joins: this.joins,
      leaves: { ...this.leaves },
      registrations: this.registrations,
      rejected: { ...this.rejected },
      seq: m.seq,
      pairsGreeted: mesh.greeted,
      pairsExpected: mesh.expected,
      latencyMs: { p50: pct(0.5), p90: pct(0.9), p99: pct(0.99), max: n ? round(sorted[n - 1]!) : 0, count: this.registrations, sum: round(this.latencySumMs) },
      startedAt: this.startedAt,
      meshCompleteMs: mesh.completeMs === null ? null : round(mesh.completeMs),
      coalescedSyncs: this.coalescedSyncs,
      store: m.state,
      ...(m.lastError ? { storeError: m.lastError } : {}),
      ...parts,
    };
  }
}

function round(ms: number): number {
  return Math.round(ms * 1000) / 1000;
}
