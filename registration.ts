/**
 * A node's registration: its session with a registry. It connects (to one of
 * its registries, failing over to the next), registers, keeps the heartbeat,
 * applies pushes in `seq` order and resyncs on a gap or a new boot, reports
 * what the node has met in receipts, and says when a refusal is final.
 * client.ts wires it to the greeter and the listener.
 */
import * as v from "valibot";
import type { Identity, Met } from "./greetings.ts";
import { Backoff, Heartbeat, type Clock } from "./liveness.ts";
import { formatAddress, lineHandlers, resolveWithin, type Conn, type Transport } from "./net.ts";
import { ErrorCode, FromRegistry, MAX_TIMER_MS, PROTOCOL_VERSION, decode, type Peer } from "./protocol.ts";
/** What the registry session reports. */
export type SessionEvent =
  /** `registry`: the address of the registry that took the registration. */
  | { event: "registered"; peers: number; boot: string; address: string; again: boolean; registry: string }
  | { event: "peer-joined"; peer: string; address: string; name?: string }
  | { event: "peer-left"; peer: string; reason: string }
  | { event: "disconnected"; reason: string; registered: boolean }
  | { event: "reconnecting"; inMs: number; capMs: number; attempt: number }
  | { event: "resync"; expected: number; got: number }
  | { event: "error"; code: ErrorCode; message: string };

/** The node was not registered within `giveUpAfterMs`. */
export class GaveUpError extends Error {
  override name = "GaveUpError";
}

/** A registration refused for a reason retrying will not fix. */
export class RegistrationError extends Error {
  override name = "RegistrationError";
  constructor(
    readonly code: ErrorCode,
    message: string,
  ) {
    super(`${code}: ${message}`);
  }
}

/** What the registration needs of the node's settings. */
export interface RegistrationSettings {
  /** Where the registries are: the first given, then the others. */
  registries: { host: string; port: number }[];
  advertise: { host?: string; port?: number };
  token?: string;
  connectTimeoutMs: number;
  registerTimeoutMs: number;
  reconnectBaseMs: number;
  reconnectMaxMs: number;
  maxReplyBytes: number;
  giveUpAfterMs?: number;
}

/**
 * Registry refusals that retrying cannot fix, before a first registration:
 * anything else (`unavailable`, `rate-limited`, `registry-full`, ...) is retried with backoff.
 * The TLS ones come on the wire (`tls-required`, the client certificate's) or
 * from this node's own check of the registry (its certificate, a port without TLS).
 */
const FATAL: ReadonlySet<string> = new Set([
  "unauthorized",
  "address-not-allowed",
  "unsupported-version",
  "unreachable",
  "id-in-use",
  "bad-message",
  "bad-json",
  "tls-required",
  "tls-unsupported",
  "certificate-required",
  "bad-certificate",
  "identity-mismatch",
]);

/** Ids per receipt line: 200 ids of up to 64 chars stay under the registry's default line limit. */
const RECEIPT_CHUNK = 200;

interface SessionState {
  /** False once a newer session replaced this one or the node stopped. */
  current: boolean;
  /** The registry's address, as dialed. */
  registry: string;
  lastError?: string;
  fatal?: RegistrationError;
  onClose?: () => void;
}

/**
 * The node's registry session: connects (and reconnects with backoff),
 * registers, keeps the heartbeat, applies pushes in `seq` order and resyncs
 * on a gap or a new boot, and reports what it met in receipts.
 */
export class RegistrySession {
  registered = false;
  private readonly first = Promise.withResolvers<void>();
  private readonly handlers: Bun.SocketHandler<Conn<SessionState>>;
  private readonly backoff: Backoff;
  private conn: Conn<SessionState> | undefined;
  private everRegistered = false;
  private stopped = false;
  private self: Peer | undefined;
  private boot: string | undefined;
  private seq = 0;
  private syncing = false;
  private heartbeat: Heartbeat | undefined;
  private reconnectTimer: Timer | undefined;
  private receipts: string[] = [];
  private receiptScheduled = false;
  private giveUp: Timer | undefined;
  private lastFailure = "";
  /** The registry address dialed last: the next attempt starts after it (failover); none yet, at random. */
  private lastDialed: string | undefined;

  constructor(
    private readonly s: RegistrationSettings,
    private readonly transport: Transport,
    private readonly clock: Clock,
    private readonly me: Identity,
    private readonly port: number,
    private readonly view: Map<string, Peer>,
    private readonly met: Met,
    /** Greets the peers a registration handed out. */
    private readonly greet: (peers: Peer[]) => void,
    /** A peer was added to the view, or updated. */
    private readonly onListed: (peer: Peer) => void,
    private readonly emit: (e: SessionEvent) => void,
    private readonly onFatal: (error: Error) => void,
  ) {
    this.first.promise.catch(() => {});
    this.backoff = new Backoff(s.reconnectBaseMs, s.reconnectMaxMs);
    this.handlers = lineHandlers<SessionState>({
      maxLineBytes: s.maxReplyBytes,
      state: () => ({ current: false, registry: "" }),
      line: (conn, line) => this.onLine(conn, line),
      close: (conn) => this.onClose(conn),
    });
  }

  /** Resolves at the first registration; rejects if the registry refuses for good first. */
  get firstRegistration(): Promise<void> {
    return this.first.promise;
  }

  start(): void {
    const ms = this.s.giveUpAfterMs;
    if (ms !== undefined) this.giveUp = setTimeout(() => this.gaveUp(ms), Math.min(ms, MAX_TIMER_MS));
    void this.connect();
  }

  private gaveUp(ms: number): void {
    if (this.everRegistered || this.stopped) return;
    this.stopWith(new GaveUpError(`not registered within ${ms}ms${this.lastFailure ? `; last: ${this.lastFailure}` : ""}`));
  }

  /** The address this node is listed under (what `hello` carries). */
  listedAs(): { host: string; port: number } {
    return this.self ?? { host: "", port: this.port };
  }

  /** Tells the registry which peers this node has met (batched per loop turn). */
  receipt(ids: string[]): void {
    if (!ids.length) return;
    this.receipts.push(...ids);
    if (this.receiptScheduled) return;
    this.receiptScheduled = true;
    setImmediate(() => {
      this.receiptScheduled = false;
      const all = this.receipts;
      this.receipts = [];
      const conn = this.conn;
      // Nothing after `leave`: a stopping node's receipts would reach a registry that already let it go.
      if (!this.registered || !conn || this.stopped) return;
      for (let i = 0; i < all.length; i += RECEIPT_CHUNK) conn.send({ type: "receipt", ids: all.slice(i, i + RECEIPT_CHUNK) });
    });
  }

  /** Stops the session; with `sayGoodbye`, says `leave` first and waits (1 s at most) for the registry to close. */
  async stop(sayGoodbye: boolean): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    this.heartbeat?.stop();
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.giveUp);
    const conn = this.conn;
    if (conn && !conn.closed) {
      if (sayGoodbye && this.registered) {
        const closed = Promise.withResolvers<void>();
        const timer = setTimeout(closed.resolve, 1000);
        conn.state.onClose = closed.resolve;
        conn.send({ type: "leave" });
        await closed.promise; // the registry ends the session after `leave`
        clearTimeout(timer);
      }
      conn.destroy();
    }
    this.registered = false;
  }

  private async connect(): Promise<void> {
    this.reconnectTimer = undefined;
    if (this.stopped) return;
    let conn: Conn<SessionState>;
    try {
      conn = await this.dialNext();
    } catch (e) {
      if (this.stopped) return;
      const message = (e as Error).message;
      // A registry that answers with a certificate this node refuses, or without TLS, is a configuration to fix:
      // reported as an error, like a refusal on the wire (and, like one, not again as the lost session).
      const code = (e as { code?: string }).code;
      const refused = v.is(ErrorCode, code);
      if (refused) this.emit({ event: "error", code, message });
      this.lastFailure = refused ? `${code}: ${message}` : message;
      this.emit({ event: "disconnected", reason: this.lastFailure, registered: false });
      if (refused && !this.everRegistered && FATAL.has(code)) return this.stopWith(new RegistrationError(code, message));
      return this.scheduleReconnect();
    }
    if (this.stopped) return conn.destroy();
    conn.state.current = true;
    conn.state.registry = this.lastDialed!;
    this.conn = conn;
    const { advertise, token } = this.s;
    const { id, name } = this.me;
    conn.send({
      type: "register",
      v: PROTOCOL_VERSION,
      id,
      port: advertise.port ?? this.port,
      ...(advertise.host ? { host: advertise.host } : {}),
      ...(name ? { name } : {}),
      ...(token ? { token } : {}),
    });
    // Heartbeats start only once registered: without this, a registry that accepts and never
    // answers (frozen, or a link lost without FIN) would hold the node unregistered forever.
    setTimeout(() => {
      if (!conn.state.current || this.registered) return;
      conn.state.lastError = `no answer to register within ${this.s.registerTimeoutMs}ms`;
      conn.destroy();
    }, this.s.registerTimeoutMs).unref();
  }

  /**
   * Dials the registries in turn, starting after the one dialed last (at
   * random the first time, to spread nodes over them), until one answers.
   * Names are resolved on every attempt: every address counts as a registry.
   */
  private async dialNext(): Promise<Conn<SessionState>> {
    const all = await this.addresses();
    const last = this.lastDialed === undefined ? -1 : all.findIndex((a) => formatAddress(a.host, a.port) === this.lastDialed);
    const first = last >= 0 ? last + 1 : this.lastDialed === undefined ? Math.floor(Math.random() * all.length) : 0;
    let error: unknown;
    for (let k = 0; k < all.length && !this.stopped; k++) {
      const a = all[(first + k) % all.length]!;
      this.lastDialed = formatAddress(a.host, a.port);
      try {
        // By address, but the registry's certificate is checked against the name it was given by.
        return await this.transport.dial(a.host, a.port, this.handlers, this.s.connectTimeoutMs, { name: a.name });
      } catch (e) {
        error = e;
      }
    }
    throw error ?? new Error("stopped");
  }

  /** Every address of every registry given, in the order given, each once, with the name it came from; names that do not resolve are left out. */
  private async addresses(): Promise<{ host: string; port: number; name: string }[]> {
    const resolved = await Promise.all(
      this.s.registries.map(async (r) => (await resolveWithin(r.host, this.s.connectTimeoutMs)).map((host) => ({ host, port: r.port, name: r.host }))),
    );
    const seen = new Set<string>();
    const out = resolved.flat().filter((a) => !seen.has(formatAddress(a.host, a.port)) && seen.add(formatAddress(a.host, a.port)));
    if (!out.length) throw new Error(`cannot resolve ${this.s.registries.map((r) => r.host).join(", ")}`);
    return out;
  }

  private onLine(conn: Conn<SessionState>, line: string): void {
    if (!conn.state.current) return;
    this.heartbeat?.heard();
    const r = decode(FromRegistry, line);
    if (!r.ok) return this.emit({ event: "error", code: r.code, message: `from registry: ${r.message}` });
    const m = r.msg;
    switch (m.type) {
      case "registered":
        return this.onRegistered(conn, m);
      case "joined":
        if (!this.acceptSeq(conn, m.seq) || m.peer.id === this.me.id) return;
        if (!this.view.has(m.peer.id)) this.emit({ event: "peer-joined", peer: m.peer.id, address: formatAddress(m.peer.host, m.peer.port), name: m.peer.name });
        this.view.set(m.peer.id, m.peer);
        this.onListed(m.peer);
        return;
      case "left":
        if (!this.acceptSeq(conn, m.seq)) return;
        if (this.view.delete(m.id)) this.emit({ event: "peer-left", peer: m.id, reason: m.reason });
        return;
      case "snapshot": {
        if (!this.registered) return;
        // Also unsolicited: registries sharing a store send one when the list was rebuilt; a new
        // boot there means the store started over, numbering with it, while this session lives on.
        const restarted = m.boot !== this.boot;
        this.boot = m.boot;
        this.seq = m.seq;
        this.syncing = false;
        this.applySnapshot(m.peers, restarted ? "restart" : "sync");
        if (restarted) this.receipt(this.met.list());
        return;
      }
      case "pong":
        return;
      case "error":
        return this.onError(conn, m.code, m.message);
    }
  }

  private onRegistered(conn: Conn<SessionState>, m: Extract<FromRegistry, { type: "registered" }>): void {
    const again = this.everRegistered;
    const newBoot = this.boot !== undefined && this.boot !== m.boot;
    this.registered = this.everRegistered = true;
    clearTimeout(this.giveUp);
    this.backoff.reset();
    this.self = m.self;
    this.boot = m.boot;
    this.seq = m.seq;
    this.syncing = false;
    this.applySnapshot(m.peers, again ? (newBoot ? "restart" : "sync") : undefined);
    // Timers take at most 2^31-1 ms and turn anything larger into 1 ms: a registry's absurd figure must not become a ping loop.
    this.heartbeat?.stop();
    this.heartbeat = new Heartbeat(
      this.clock,
      Math.min(m.heartbeat, MAX_TIMER_MS),
      Math.min(m.timeout, MAX_TIMER_MS),
      () => conn.send({ type: "ping" }),
      (ms) => {
        conn.state.lastError = `registry silent for ${ms}ms`;
        conn.destroy();
      },
    );
    this.emit({ event: "registered", peers: m.peers.length, boot: m.boot, address: formatAddress(m.self.host, m.self.port), again, registry: conn.state.registry });
    this.first.resolve();
    this.greet(m.peers);
    this.receipt(this.met.list());
  }

  private onError(conn: Conn<SessionState>, code: ErrorCode, message: string): void {
    conn.state.lastError = `${code}: ${message}`;
    this.emit({ event: "error", code, message });
    // Fatal only before the first registration (a configuration error); once this node has been
    // listed, a refusal comes from a registry that restarted or is briefly wrong (a dial-back probe
    // that timed out under load), and giving up would lose a live node: retry with backoff.
    // `replaced` reaches only a node whose *current* session was taken over (a session this node
    // gave up on is no longer read), so another live process holds this id or address: retrying
    // would take it back, and the two would evict each other for as long as both run.
    if ((!this.everRegistered && FATAL.has(code)) || code === "replaced") {
      conn.state.fatal = new RegistrationError(code, message);
      conn.end(); // no reason to wait for the registry to hang up
    }
  }

  private onClose(conn: Conn<SessionState>): void {
    conn.state.onClose?.();
    if (!conn.state.current) return;
    conn.state.current = false;
    this.conn = undefined;
    this.heartbeat?.stop();
    const was = this.registered;
    this.registered = false;
    if (this.stopped) return;
    const limit = conn.limitHit ? `${conn.limitHit.code}: ${conn.limitHit.message}` : undefined;
    this.lastFailure = limit ?? conn.state.lastError ?? "connection closed";
    this.emit({ event: "disconnected", reason: this.lastFailure, registered: was });
    const fatal = conn.state.fatal;
    if (!fatal) return this.scheduleReconnect();
    this.stopWith(fatal);
  }

  /** Ends the session for a reason retrying cannot fix (a final refusal, or the time to give up). */
  private stopWith(error: Error): void {
    this.first.reject(error);
    this.onFatal(error);
  }

  /** True if a push is the next one; on a gap, asks for a fresh snapshot instead of drifting. */
  private acceptSeq(conn: Conn<SessionState>, s: number): boolean {
    if (!this.registered || this.syncing || s <= this.seq) return false;
    if (s !== this.seq + 1) {
      this.syncing = true;
      this.emit({ event: "resync", expected: this.seq + 1, got: s });
      conn.send({ type: "sync" });
      return false;
    }
    this.seq = s;
    return true;
  }

  /** Replaces the view; `reason` set means report the differences as joins and leaves. */
  private applySnapshot(peers: Peer[], reason: string | undefined): void {
    const next = new Map(peers.filter((p) => p.id !== this.me.id).map((p) => [p.id, p] as const));
    if (reason) {
      for (const old of this.view.keys()) if (!next.has(old)) this.emit({ event: "peer-left", peer: old, reason });
      for (const p of next.values()) {
        if (!this.view.has(p.id)) this.emit({ event: "peer-joined", peer: p.id, address: formatAddress(p.host, p.port), name: p.name });
      }
    }
    this.view.clear();
    for (const [k, p] of next) this.view.set(k, p);
    for (const p of next.values()) this.onListed(p);
  }

  private scheduleReconnect(): void {
    if (this.stopped || this.reconnectTimer) return;
    const { delayMs, capMs, attempt } = this.backoff.next();
    this.emit({ event: "reconnecting", inMs: delayMs, capMs, attempt });
    this.reconnectTimer = setTimeout(() => this.connect(), delayMs);
  }
}
