#!/usr/bin/env bun
/**
 * The contact registry ("D"): lists the nodes whose registry session is
 * alive, hands each new node the others, and pushes every join and leave to
 * every session. `bun registry.ts [host] [port]`; see README.md and
 * docs/PROTOCOL.md.
 *
 * Its parts: membership.ts holds the list, admission.ts decides who gets on
 * it, liveness.ts keeps the deadlines; here the sessions tie them to sockets
 * and the fan-out pushes changes out.
 */
import { defineCommand, runMain, type ArgsDef } from "citty";
import { Admission, type Holding } from "./admission.ts";
import { UsageError, createPrinter, describeCommon, isWarning, portsRecorder, readSettings, reloadOnHangup, renderHelp, runCli, stopOnSignals, tlsFromFlags, type CommonEvent, type Level } from "./cli.ts";
import { BucketMap, ByteBudget, ConnectionCaps, HTTP_LIMITS, TokenBucket, fitCapsToFdLimit, readFdUsage, type CapTicket, type Rate } from "./limits.ts";
import { SessionDeadlines, systemClock, type Clock, type Expiry, type Watched } from "./liveness.ts";
import { MemoryMembership, addressOf, peerOf, type Change, type Member, type Membership, type StoreState } from "./membership.ts";
import { formatAddress, isLoopbackHost, lineHandlers, parsePort, tcp, type Conn, type Transport } from "./net.ts";
import { type TlsTransport } from "./tls.ts";
import { GATE_FDS_PER_CONN, GATE_MAX_REFUSING } from "./gate.ts";
import { DEFAULTS, MAX_TIMER_MS, PING_LINE, PONG_LINE, PROTOCOL_VERSION, ToRegistry, decode, randomId, type ErrorCode, type LeaveReason, type Peer, type Register } from "./protocol.ts";

export interface RegistryOptions {
  /** Bind address; `localhost` binds 127.0.0.1 and ::1, `::` falls back to 0.0.0.0. */
  host?: string;
  port?: number;
  heartbeatMs?: number;
  heartbeatMisses?: number;
  registerTimeoutMs?: number;
  /** Dial each registering node back before listing it. */
  probe?: boolean;
  probeTimeoutMs?: number;
  maxLineBytes?: number;
  maxNodes?: number;
  /** Open connections allowed from one source address (0 = no cap). */
  maxConnsPerAddress?: number;
  /** Open connections in all, registered or not (0 = no cap). */
  maxConns?: number;
  /** Unsent bytes per session before it is dropped as a slow consumer. */
  maxQueueBytes?: number;
  /** Unsent bytes all sessions together may hold; over it, the largest backlogs are dropped (0 = no budget). */
  maxQueueTotalBytes?: number;
  /** Lines per second one session may send, in bursts of ten seconds' worth (0 = no limit). */
  rateSessionLines?: number;
  /** Lines per second all sessions from one source address may send (0 = no limit). */
  rateAddressLines?: number;
  /** `sync` requests per second one session may send (0 = no limit). */
  rateSessionSyncs?: number;
  /** Probes per second registrations from one source address may cause (0 = no limit). */
  rateAddressProbes?: number;
  /** Wrong tokens per minute from one source address before its registrations are refused for a while (0 = no limit). */
  authFailuresPerMinute?: number;
  /** `list` requests per second from one source address (0 = no limit). */
  rateAddressLists?: number;
  /** Shared secret nodes must present in `register`. */
  token?: string;
  /** Let nodes advertise a host other than the one they connect from. */
  allowAdvertise?: boolean;
  /** Receives every event (the CLI prints them). */
  onEvent?: (e: RegistryEvent) => void;
  /** Where sockets are opened (default plain TCP; `tls(...)` for TLS on the registry port, and with a mesh CA mutual TLS for it and the probe). */
  transport?: Transport;
  /** The list (default: in this process). */
  membership?: Membership;
  /** Drives every deadline (default: the system's monotonic clock). */
  clock?: Clock;
}

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

export type NodeInfo = Peer & {
  /** Address the node connected from. */
  source: string;
  /** Id of the registry whose session holds it. */
  registry: string;
  joinedAt: number;
};

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
  /** Wrong tokens, and registrations refused because their address sent too many. */
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

export interface Registry {
  readonly host: string;
  readonly port: number;
  /** This registry's id (unique per process); with a shared store, its lease there. */
  readonly id: string;
  /** The list's history id; carried in every reply so nodes can tell a restart. A shared store's changes when the store starts over. */
  readonly boot: string;
  nodes(): NodeInfo[];
  stats(): RegistryStats;
  /** Observe membership and greeting changes (the status page uses this). */
  subscribe(fn: (e: RegistryEvent) => void): () => void;
  /** Greeted pairs, as [id, id] with the first id the smaller. */
  pairs(): [string, string][];
  stop(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

/** Starts a registry; resolves once it listens. */
export async function startRegistry(options: RegistryOptions = {}): Promise<Registry> {
  const s = settingsOf(options);
  const clock = options.clock ?? systemClock;
  const membership: Membership = options.membership ?? new MemoryMembership(randomId(), () => clock.now());
  const transport = options.transport ?? tcp;
  const listeners = new Set<(e: RegistryEvent) => void>();
  if (options.onEvent) listeners.add(options.onEvent);
  const emit = (e: RegistryEvent) => {
    for (const fn of listeners) fn(e);
  };
  const counters = new Counters();
  // A shared store knows this registry by the id its lease has; alone, any id unique to this process will do.
  const registryId = membership.registryId ?? randomId();
  const sessions = new Sessions(s, membership, new Admission(s, membership, transport), counters, emit, clock, registryId);
  const { listeners: servers, port } = transport.listen(s.host, s.port, sessions.handlers);
  emit({ event: "listening", host: s.host, port, boot: membership.boot });
  if (membership.state === "degraded") emit({ event: "store", state: "degraded", reason: membership.lastError });
  if (s.token && !transport.encrypted && !isLoopbackHost(s.host)) {
    emit({ event: "warning", message: `the token travels in clear on ${s.host}, which other hosts reach: start the registry with --tls-cert and --tls-key` });
  }

  let stopped: Promise<void> | undefined;
  const registry: Registry = {
    host: s.host,
    port,
    id: registryId,
    get boot() {
      return membership.boot;
    },
    nodes: () =>
      Array.from(membership.members(), ({ id, host, port, name, source, registry, joinedAt }) => ({ id, host, port, name, source, registry, joinedAt })),
    stats: () => counters.stats(membership, sessions.figures()),
    subscribe(fn) {
      listeners.add(fn);
      return () => listeners.delete(fn);
    },
    pairs: () => membership.pairs(),
    stop() {
      stopped ??= (async () => {
        for (const l of servers) l.stop(false);
        // Shared: the store first lets go of this registry (lease deleted, connections closed), so
        // that the nodes told to go next replace their entries on another registry at once, as
        // updates; whatever does not come back is swept by the others within a heartbeat.
        if (membership.registryId !== undefined) await membership.close();
        await sessions.close();
        for (const l of servers) l.stop(true);
        await membership.close();
        emit({ event: "stopped" });
      })();
      return stopped;
    },
    [Symbol.asyncDispose]() {
      return this.stop();
    },
  };
  return registry;
}

// --- internal ----------------------------------------------------------------

type Settings = ReturnType<typeof settingsOf>;

function settingsOf(options: RegistryOptions) {
  const heartbeatMs = options.heartbeatMs ?? DEFAULTS.heartbeatMs;
  const heartbeatMisses = options.heartbeatMisses ?? DEFAULTS.heartbeatMisses;
  return {
    host: options.host ?? "::",
    port: options.port ?? DEFAULTS.registryPort,
    heartbeatMs,
    heartbeatTimeoutMs: heartbeatMs * heartbeatMisses,
    registerTimeoutMs: options.registerTimeoutMs ?? DEFAULTS.registerTimeoutMs,
    closingGraceMs: CLOSING_GRACE_MS,
    probe: options.probe ?? true,
    probeTimeoutMs: options.probeTimeoutMs ?? DEFAULTS.probeTimeoutMs,
    maxLineBytes: options.maxLineBytes ?? DEFAULTS.maxLineBytes,
    maxNodes: options.maxNodes ?? DEFAULTS.maxNodes,
    maxConnsPerAddress: options.maxConnsPerAddress ?? DEFAULTS.maxConnsPerAddress,
    maxConns: options.maxConns ?? DEFAULTS.maxConns,
    maxQueueBytes: options.maxQueueBytes ?? DEFAULTS.maxQueueBytes,
    maxQueueTotalBytes: options.maxQueueTotalBytes ?? DEFAULTS.maxQueueTotalBytes,
    rateSessionLines: options.rateSessionLines ?? DEFAULTS.rateSessionLines,
    rateAddressLines: options.rateAddressLines ?? DEFAULTS.rateAddressLines,
    rateSessionSyncs: options.rateSessionSyncs ?? DEFAULTS.rateSessionSyncs,
    rateAddressProbes: options.rateAddressProbes ?? DEFAULTS.rateAddressProbes,
    authFailuresPerMinute: options.authFailuresPerMinute ?? DEFAULTS.authFailuresPerMinute,
    rateAddressLists: options.rateAddressLists ?? DEFAULTS.rateAddressLists,
    token: options.token || undefined,
    allowAdvertise: options.allowAdvertise ?? false,
  };
}

/** A refused client that does not read its error is cut this long after. */
const CLOSING_GRACE_MS = 2_000;

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
class Sessions {
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
    private readonly s: Settings,
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
          s.lastSeen = this.deadlines.clock.now();
          conn.send(PONG_BYTES);
          return true;
        },
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
    s.lastSeen = this.deadlines.clock.now();
    if (line === PING_LINE && s.phase === "registered") {
      conn.send(PONG_LINE);
      return;
    }
    const r = decode(ToRegistry, line);
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
    conn.send({ type: "error", code, message: this.admission.redact(message) });
  }

  /** Refuses a connection: tells it why, counts and reports it, and closes it. */
  private reject(conn: Conn<Session>, code: ErrorCode, rawMessage: string, detail?: string): void {
    const message = this.admission.redact(rawMessage);
    this.counters.reject(code);
    conn.state.phase = "closing";
    conn.state.lastSeen = this.deadlines.clock.now();
    const remote = formatAddress(conn.remoteAddress, conn.remotePort);
    this.emit({ event: "error", code, message, remote, ...(detail ? { detail: this.admission.redact(detail) } : {}) });
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
class Counters {
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

// --- command line ------------------------------------------------------------

/** What the command line prints besides the registry's own events. */
type CliEvent =
  | RegistryEvent
  /** The connection caps needed more file descriptors than the process may open, and were lowered. */
  | { event: "fd-limit"; limit: number; reserved: number; lowered: { flag: string; from: number; to: number }[] };

function describe(e: CliEvent): string {
  const who = (id: string, name: string | undefined) => `${id}${name ? ` (${name})` : ""}`;
  switch (e.event) {
    case "listening":
      return `registry listening on ${formatAddress(e.host, e.port)} (boot ${e.boot})`;
    case "node-registered":
      return `node ${who(e.id, e.name)} joined at ${formatAddress(e.host, e.port)}, ${e.nodes} registered`;
    case "node-left":
      return `node ${who(e.id, e.name)} left (${e.reason}), ${e.nodes} registered`;
    case "pair-greeted":
      return `${e.a} and ${e.b} have greeted each other`;
    case "mesh-complete":
      return `mesh complete: ${e.nodes} nodes, ${e.pairs} pairs, ${e.ms} ms after the last join`;
    case "error":
      return `${e.remote} ${e.code}: ${e.message}${e.detail ? ` (${e.detail})` : ""}`;
    case "http-listening":
      return `status page on ${e.url}`;
    case "store":
      return e.state === "degraded"
        ? `store out of reach (${e.reason ?? "unknown"}): serving this registry's own nodes alone, retrying`
        : "store reachable again: list reconciled, nodes resynced";
    case "fd-limit": {
      const lowered = e.lowered.map((l) => `--${l.flag} ${l.from === 0 ? "0 (no cap)" : l.from} -> ${l.to}`).join(", ");
      return `file-descriptor limit ${e.limit} is too low for the connection caps (${e.reserved} kept for files and outgoing sockets): lowered ${lowered}; raise it with \`ulimit -n\` (Docker: --ulimit nofile=N)`;
    }
    case "stopped":
      return "registry stopped";
    case "warning":
    case "tls-reloaded":
    case "tls-reload-failed":
      return describeCommon(e);
  }
}

function level(e: CliEvent): Level {
  if (e.event === "pair-greeted") return "debug";
  if (e.event === "error" || e.event === "fd-limit" || (e.event === "store" && e.state === "degraded") || isWarning(e)) return "warn";
  return e.event === "listening" ? "success" : "info";
}

/**
 * Fits the connection caps into the process's file-descriptor limit, so a
 * flood meets a cap before the process runs out of descriptors (EMFILE would
 * refuse everyone, and fail the probes). Lowers them, and says so once, when
 * they do not fit.
 */
function fitToFdLimit<C extends { maxConns: number; httpMaxConns?: number }>(caps: C, print: (e: CliEvent) => void): C {
  const fds = readFdUsage();
  if (!fds) return caps;
  const http = caps.httpMaxConns;
  const demands = [{ cap: caps.maxConns, fdsEach: 1 }, ...(http === undefined ? [] : [{ cap: http, fdsEach: GATE_FDS_PER_CONN }])];
  const fit = fitCapsToFdLimit(fds.limit, fds.open, demands, http === undefined ? 0 : GATE_MAX_REFUSING);
  if (!fit.lowered) return caps;
  const lowered = [{ flag: "max-conns", from: caps.maxConns, to: fit.caps[0]! }];
  if (http !== undefined) lowered.push({ flag: "http-max-conns", from: http, to: fit.caps[1]! });
  print({ event: "fd-limit", limit: fds.limit, reserved: fit.reserved, lowered });
  return { ...caps, maxConns: fit.caps[0]!, ...(http === undefined ? {} : { httpMaxConns: fit.caps[1]! }) };
}

/** How long the mesh must stay complete before the readable log says so: a fleet joining one by one would otherwise log it after every join. */
const MESH_QUIET_MS = 1_000;

/** The readable log's one line per settled mesh: a `mesh-complete` is held until no node has joined or left for a second. */
function settledMesh(print: (e: CliEvent) => void): (e: CliEvent) => void {
  let held: Timer | undefined;
  return (e) => {
    if (e.event === "mesh-complete") {
      clearTimeout(held);
      held = setTimeout(() => print(e), MESH_QUIET_MS);
      held.unref();
      return;
    }
    if (e.event === "node-registered" || e.event === "node-left") clearTimeout(held);
    print(e);
  };
}

const flags = {
  host: { type: "positional", required: false, description: "Address to listen on; `localhost` = 127.0.0.1 and ::1 [env REGISTRY_HOST, default ::]" },
  port: { type: "positional", required: false, description: `TCP port [env REGISTRY_PORT, default ${DEFAULTS.registryPort}]` },
  json: { type: "boolean", description: "One JSON event per line on stdout [env LOG_JSON=1]" },
  token: { type: "string", valueHint: "secret", description: "Shared secret nodes must present [env REGISTRY_TOKEN]" },
  heartbeat: { type: "string", valueHint: "ms", description: `Heartbeat interval in ms, announced to nodes [env REGISTRY_HEARTBEAT_MS, default ${DEFAULTS.heartbeatMs}]` },
  "heartbeat-misses": { type: "string", valueHint: "n", description: `Missed beats before eviction [env REGISTRY_HEARTBEAT_MISSES, default ${DEFAULTS.heartbeatMisses}]` },
  probe: { type: "boolean", description: "Dial each node back before listing it; --no-probe to skip [env REGISTRY_PROBE=0 to skip]" },
  "probe-timeout": { type: "string", valueHint: "ms", description: `Probe deadline in ms [env REGISTRY_PROBE_TIMEOUT_MS, default ${DEFAULTS.probeTimeoutMs}]` },
  "allow-advertise": { type: "boolean", description: "Accept advertised hosts other than the connection's source [env REGISTRY_ALLOW_ADVERTISE=1]" },
  "register-timeout": { type: "string", valueHint: "ms", description: `Deadline for a new connection to register, ms [env REGISTRY_REGISTER_TIMEOUT_MS, default ${DEFAULTS.registerTimeoutMs}]` },
  "max-line": { type: "string", valueHint: "bytes", description: `Longest accepted line in bytes [env REGISTRY_MAX_LINE, default ${DEFAULTS.maxLineBytes}]` },
  "max-nodes": { type: "string", valueHint: "n", description: `Most nodes listed at once [env REGISTRY_MAX_NODES, default ${DEFAULTS.maxNodes}]` },
  "max-conns-per-ip": { type: "string", valueHint: "n", description: `Open connections per source address, 0 = no cap [env REGISTRY_MAX_CONNS_PER_IP, default ${DEFAULTS.maxConnsPerAddress}]` },
  "max-conns": { type: "string", valueHint: "n", description: `Open connections in all, 0 = no cap [env REGISTRY_MAX_CONNS, default ${DEFAULTS.maxConns}]` },
  "max-queue": { type: "string", valueHint: "bytes", description: `Unsent bytes per connection before it is dropped as a slow consumer [env REGISTRY_MAX_QUEUE_BYTES, default ${DEFAULTS.maxQueueBytes}]` },
  "max-queue-total": { type: "string", valueHint: "bytes", description: `Unsent bytes all connections together may hold; over it the largest backlogs are dropped, 0 = no budget [env REGISTRY_MAX_QUEUE_TOTAL_BYTES, default ${DEFAULTS.maxQueueTotalBytes}]` },
  "rate-session": { type: "string", valueHint: "per s", description: `Lines per second one session may send, bursts of 10 s worth, 0 = no limit [env REGISTRY_RATE_SESSION, default ${DEFAULTS.rateSessionLines}]` },
  "rate-address": { type: "string", valueHint: "per s", description: `Lines per second all sessions of one source address may send, 0 = no limit [env REGISTRY_RATE_ADDRESS, default ${DEFAULTS.rateAddressLines}]` },
  "rate-sync": { type: "string", valueHint: "per s", description: `sync requests per second per session, 0 = no limit [env REGISTRY_RATE_SYNC, default ${DEFAULTS.rateSessionSyncs}]` },
  "rate-probe": { type: "string", valueHint: "per s", description: `Probes per second for registrations from one source address, 0 = no limit [env REGISTRY_RATE_PROBE, default ${DEFAULTS.rateAddressProbes}]` },
  "rate-list": { type: "string", valueHint: "per s", description: `list requests per second from one source address, 0 = no limit [env REGISTRY_RATE_LIST, default ${DEFAULTS.rateAddressLists}]` },
  "auth-failures": { type: "string", valueHint: "per min", description: `Wrong tokens per minute from one source address before its registrations are refused for a while, 0 = no limit [env REGISTRY_AUTH_FAILURES, default ${DEFAULTS.authFailuresPerMinute}]` },
  store: {
    type: "string",
    valueHint: "url",
    description:
      "Share the list with other registries: redis://[user:password@]host:port[/db] or rediss:// (TLS), Redis >= 7 or Valkey >= 7.2; `memory` keeps it in this process [env REGISTRY_STORE, default memory; a password not in the URL: env REGISTRY_STORE_PASSWORD]",
  },
  http: { type: "string", valueHint: "port", description: "Serve the status API and live page on this port [env REGISTRY_HTTP_PORT]" },
  "http-host": { type: "string", valueHint: "address", description: "Address for the status page; `localhost` = 127.0.0.1 and ::1 [env REGISTRY_HTTP_HOST, default: same as host]" },
  "http-max-conns": { type: "string", valueHint: "n", description: `Open status-server connections in all, 0 = no cap [env REGISTRY_HTTP_MAX_CONNS, default ${HTTP_LIMITS.maxConns}]` },
  "http-max-conns-per-ip": { type: "string", valueHint: "n", description: `Open status-server connections per source address, 0 = no cap [env REGISTRY_HTTP_MAX_CONNS_PER_IP, default ${HTTP_LIMITS.maxConnsPerAddress}]` },
  "http-max-streams": { type: "string", valueHint: "n", description: `Open /events streams [env REGISTRY_HTTP_MAX_STREAMS, default ${HTTP_LIMITS.maxStreams}]` },
  "http-stream-budget": { type: "string", valueHint: "bytes", description: `Unsent bytes across all /events streams; past it the streams furthest behind are dropped [env REGISTRY_HTTP_STREAM_BUDGET_BYTES, default ${HTTP_LIMITS.streamBudgetBytes}]` },
  "http-request-timeout": { type: "string", valueHint: "ms", description: `A request's head must arrive within this many ms of connecting [env REGISTRY_HTTP_REQUEST_TIMEOUT_MS, default ${HTTP_LIMITS.requestTimeoutMs}]` },
  "http-idle-timeout": { type: "string", valueHint: "ms", description: `Status-server connections that move no byte this many ms are closed [env REGISTRY_HTTP_IDLE_TIMEOUT_MS, default ${HTTP_LIMITS.idleTimeoutMs}]` },
  "tls-cert": { type: "string", valueHint: "file", description: "Certificate (PEM) served on the registry port, which then speaks TLS only [env REGISTRY_TLS_CERT]" },
  "tls-key": { type: "string", valueHint: "file", description: "The key of --tls-cert (PEM) [env REGISTRY_TLS_KEY]" },
  "tls-client-ca": {
    type: "string",
    valueHint: "file",
    description: "CA certificate (PEM) of the mesh: nodes must present a certificate it signed, for their id; the probe is mutual TLS too [env REGISTRY_TLS_CLIENT_CA]",
  },
  "http-tls-cert": {
    type: "string",
    valueHint: "file",
    description: "Certificate (PEM) for HTTPS on the status server [env REGISTRY_HTTP_TLS_CERT, default: --tls-cert, so a TLS registry serves HTTPS]",
  },
  "http-tls-key": { type: "string", valueHint: "file", description: "The key of --http-tls-cert (PEM) [env REGISTRY_HTTP_TLS_KEY, default: --tls-key]" },
  "ports-file": { type: "string", valueHint: "file", description: "Append what it listens on to this file, one JSON line each (the Docker HEALTHCHECK reads it) [env PORTS_FILE]" },
} satisfies ArgsDef;

/** TLS on the registry port when a certificate is given; with a client CA, mutual TLS for it and the probe. */
function registryTransport(f: { cert?: string; key?: string; clientCa?: string }, handshakeTimeoutMs: number): TlsTransport | undefined {
  if (f.cert === undefined && f.key === undefined) {
    if (f.clientCa !== undefined) throw new UsageError("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS first");
    return undefined;
  }
  return tlsFromFlags({ cert: f.cert, key: f.key, meshCa: f.clientCa, handshakeTimeoutMs });
}

/**
 * HTTPS for the status server: its own certificate, or the registry's. A
 * browser has no mesh certificate, so this is TLS without client
 * certificates even when the registry port is mutual TLS.
 */
function statusTransport(f: { cert?: string; key?: string }, registry: { cert?: string; key?: string }, http: boolean): TlsTransport | undefined {
  if (!http && (f.cert !== undefined || f.key !== undefined)) throw new UsageError("--http-tls-cert and --http-tls-key need --http: they are the status server's");
  const cert = f.cert ?? registry.cert;
  const key = f.key ?? registry.key;
  if (!http || (cert === undefined && key === undefined)) return undefined;
  return tlsFromFlags({ cert, key });
}

const help = {
  usage: ["bun registry.ts [host] [port] [options]"],
  description: "Contact registry: lists the running peer nodes and tells each about the others (docs/PROTOCOL.md).",
  required: [],
  examples: [
    "bun registry.ts localhost 8080                 # this machine only (127.0.0.1 and ::1)",
    "bun registry.ts 0.0.0.0 8080 --http 8081       # all IPv4 interfaces, status page on 8081",
    "REGISTRY_TOKEN=$(openssl rand -hex 16) bun registry.ts :: 8080",
    "bun registry.ts :: 8080 --store redis://10.0.0.5:6379   # one of several registries sharing a list",
  ],
};

export const command = defineCommand({
  meta: { name: "registry", version: "0.1.0", description: "Contact registry: lists running peer nodes and tells them about each other." },
  args: flags,
  async run({ args, rawArgs }) {
    await runCli(async () => {
      const { text: flag, int: num, on } = readSettings(args, rawArgs, flags);
      const portText = flag("port", "REGISTRY_PORT");
      const port = portText === undefined ? DEFAULTS.registryPort : parsePort(portText);
      if (port === undefined) throw new UsageError(`port must be a number from 0 to 65535, got "${portText}"`);
      const httpText = flag("http", "REGISTRY_HTTP_PORT");
      const httpPort = httpText === undefined ? undefined : parsePort(httpText);
      if (httpText !== undefined && httpPort === undefined) throw new UsageError(`--http must be a port number, got "${httpText}"`);
      const json = on("json", "LOG_JSON");
      const record = portsRecorder(flag("ports-file", "PORTS_FILE"), "registry");
      const printer = createPrinter("registry", json, describe, level);
      const show = json ? printer : settledMesh(printer);
      const print = (e: CliEvent) => {
        record(e);
        show(e);
      };
      // Every setting is read, and a bad one refused, before anything listens.
      const store = await storeSetting(flag("store", "REGISTRY_STORE"));
      const registerTimeoutMs = num("register-timeout", "REGISTRY_REGISTER_TIMEOUT_MS", 1, MAX_TIMER_MS);
      const tlsFiles = { cert: flag("tls-cert", "REGISTRY_TLS_CERT"), key: flag("tls-key", "REGISTRY_TLS_KEY"), clientCa: flag("tls-client-ca", "REGISTRY_TLS_CLIENT_CA") };
      const transport = registryTransport(tlsFiles, Math.min(DEFAULTS.handshakeTimeoutMs, registerTimeoutMs ?? DEFAULTS.registerTimeoutMs));
      const httpTransport = statusTransport(
        { cert: flag("http-tls-cert", "REGISTRY_HTTP_TLS_CERT"), key: flag("http-tls-key", "REGISTRY_HTTP_TLS_KEY") },
        tlsFiles,
        httpPort !== undefined,
      );
      const options = {
        host: flag("host", "REGISTRY_HOST") ?? "::",
        port,
        token: flag("token", "REGISTRY_TOKEN"),
        heartbeatMs: num("heartbeat", "REGISTRY_HEARTBEAT_MS", 1, MAX_TIMER_MS),
        heartbeatMisses: num("heartbeat-misses", "REGISTRY_HEARTBEAT_MISSES", 1),
        probe: on("probe", "REGISTRY_PROBE", true),
        probeTimeoutMs: num("probe-timeout", "REGISTRY_PROBE_TIMEOUT_MS", 1, MAX_TIMER_MS),
        allowAdvertise: on("allow-advertise", "REGISTRY_ALLOW_ADVERTISE"),
        registerTimeoutMs,
        maxLineBytes: num("max-line", "REGISTRY_MAX_LINE", 64),
        maxNodes: num("max-nodes", "REGISTRY_MAX_NODES", 1),
        maxConnsPerAddress: num("max-conns-per-ip", "REGISTRY_MAX_CONNS_PER_IP"),
        maxConns: num("max-conns", "REGISTRY_MAX_CONNS") ?? DEFAULTS.maxConns,
        maxQueueBytes: num("max-queue", "REGISTRY_MAX_QUEUE_BYTES", 1024),
        maxQueueTotalBytes: num("max-queue-total", "REGISTRY_MAX_QUEUE_TOTAL_BYTES"),
        rateSessionLines: num("rate-session", "REGISTRY_RATE_SESSION"),
        rateAddressLines: num("rate-address", "REGISTRY_RATE_ADDRESS"),
        rateSessionSyncs: num("rate-sync", "REGISTRY_RATE_SYNC"),
        rateAddressProbes: num("rate-probe", "REGISTRY_RATE_PROBE"),
        authFailuresPerMinute: num("auth-failures", "REGISTRY_AUTH_FAILURES"),
        rateAddressLists: num("rate-list", "REGISTRY_RATE_LIST"),
        transport,
        onEvent: print,
      } satisfies RegistryOptions;
      const http = httpPort === undefined ? undefined : {
        port: httpPort,
        host: flag("http-host", "REGISTRY_HTTP_HOST"),
        maxConns: num("http-max-conns", "REGISTRY_HTTP_MAX_CONNS") ?? HTTP_LIMITS.maxConns,
        maxConnsPerAddress: num("http-max-conns-per-ip", "REGISTRY_HTTP_MAX_CONNS_PER_IP"),
        maxStreams: num("http-max-streams", "REGISTRY_HTTP_MAX_STREAMS", 1),
        streamBudgetBytes: num("http-stream-budget", "REGISTRY_HTTP_STREAM_BUDGET_BYTES", 1024),
        requestTimeoutMs: num("http-request-timeout", "REGISTRY_HTTP_REQUEST_TIMEOUT_MS", 1, MAX_TIMER_MS),
        idleTimeoutMs: num("http-idle-timeout", "REGISTRY_HTTP_IDLE_TIMEOUT_MS", 1, MAX_TIMER_MS),
      };
      const caps = fitToFdLimit({ maxConns: options.maxConns, httpMaxConns: http?.maxConns }, print);
      const registry = await startRegistry({ ...options, maxConns: caps.maxConns, membership: await store?.open() });
      let status: { stop(): Promise<void> } | undefined;
      if (http) {
        const { startStatusServer } = await import("./status.ts");
        const server = startStatusServer(registry, { ...http, host: http.host ?? registry.host, maxConns: caps.httpMaxConns, transport: httpTransport });
        status = server;
        print({ event: "http-listening", url: server.url });
      }
      stopOnSignals(async () => {
        await registry.stop(); // open status pages get their `stopped` event before the server goes
        await status?.stop();
      });
      if (transport || httpTransport) {
        reloadOnHangup(() => {
          if (transport) print(transport.reload());
          if (httpTransport) print({ ...httpTransport.reload(), scope: "status server" });
        });
      }
    });
  },
});

/**
 * The list `--store` names: none for `memory` (this process alone), else one
 * shared through Redis or Valkey under an id unique to this process, opened
 * once everything else is read. A bad URL is a usage error; a store out of
 * reach at start is not: the registry serves degraded and keeps trying.
 */
async function storeSetting(store: string | undefined): Promise<{ open(): Promise<Membership> } | undefined> {
  if (store === undefined || store === "memory") return undefined;
  const { openStore, storeUrl, StoreConfigError } = await import("./redis.ts");
  const password = process.env.REGISTRY_STORE_PASSWORD || undefined;
  try {
    storeUrl(store, password);
  } catch (e) {
    if (e instanceof StoreConfigError) throw new UsageError(`--store: ${e.message}`);
    throw e;
  }
  return { open: () => openStore(store, { registryId: randomId(), password }) };
}

if (import.meta.main) await runMain(command, { showUsage: async () => void process.stdout.write(renderHelp(help, flags)) });
