/**
 * Node to node: the greeter says `hello` to each peer the registry listed
 * when this node joined, and the listener answers the `hello` of nodes that
 * join later and the registry's `probe`. Each peer identity is met once: a
 * retried or repeated greeting is acknowledged but counted once.
 */
import { ConnectionCaps, type CapTicket } from "./limits.ts";
import { formatAddress, lineHandlers, type Conn, type Listening, type Transport } from "./net.ts";
import { identityMismatch } from "./tls.ts";
import { DEFAULTS, FromListener, PROTOCOL_VERSION, ToListener, decode, type Peer } from "./protocol.ts";

export type GreetingEvent =
  /** Once: plain TCP reached this node's TLS listener (a registry without --tls-client-ca probes that way). */
  | { event: "warning"; message: string }
  /** A greeting this node sent was acknowledged. */
  | { event: "greeted"; peer: string; address: string; name?: string; tries: number }
  /** This node received a greeting (once per sender). */
  | { event: "greeting"; peer: string; address: string; name?: string }
  | { event: "greet-failed"; peer: string; address: string; reason: string; tries: number };

/** Who this node is, as it introduces itself. */
export interface Identity {
  id: string;
  name?: string;
}

/**
 * Peers met, either way. Anyone can send `hello` with a fresh id, so the set
 * is bounded: past the cap, ids no longer listed are forgotten (a forgotten
 * peer that comes back is at worst greeted a second time).
 */
export class Met {
  private readonly ids = new Set<string>();

  constructor(
    private readonly isListed: (id: string) => boolean,
    private readonly max = MAX_MET,
  ) {}

  has(id: string): boolean {
    return this.ids.has(id);
  }

  add(id: string): void {
    this.ids.add(id);
    if (this.ids.size <= this.max) return;
    for (const known of this.ids) if (!this.isListed(known)) this.ids.delete(known);
  }

  list(): string[] {
    return Array.from(this.ids);
  }
}

export interface GreeterSettings {
  greetTimeoutMs: number;
  greetConcurrency: number;
  greetRetries: number;
}

/** Greets peers: a bounded number at once, each with a deadline and a bounded number of jittered retries. */
export class Greeter {
  private readonly queue: Peer[] = [];
  private readonly pending = new Set<string>();
  private readonly conns = new Set<Conn<GreetState>>();
  private active = 0;
  private stopped = false;

  constructor(
    private readonly s: GreeterSettings,
    private readonly transport: Transport,
    private readonly me: Identity,
    /** The address this node is listed under, once known (it goes in `hello`). */
    private readonly listedAs: () => { host: string; port: number },
    private readonly met: Met,
    private readonly isListed: (id: string) => boolean,
    private readonly onMet: (id: string) => void,
    private readonly emit: (e: GreetingEvent) => void,
  ) {}

  /** Queues a greeting, unless the peer is this node, already met, or already queued. */
  greet(peer: Peer): void {
    if (this.stopped || peer.id === this.me.id || this.met.has(peer.id) || this.pending.has(peer.id)) return;
    this.pending.add(peer.id);
    this.queue.push(peer);
    this.pump();
  }

  stop(): void {
    this.stopped = true;
    this.queue.length = 0;
    for (const c of this.conns) c.destroy();
  }

  private pump(): void {
    while (this.active < this.s.greetConcurrency && this.queue.length && !this.stopped) {
      const peer = this.queue.shift()!;
      this.active++;
      this.greetWithRetries(peer).finally(() => {
        this.active--;
        this.pending.delete(peer.id);
        this.pump();
      });
    }
  }

  private async greetWithRetries(peer: Peer): Promise<void> {
    const address = formatAddress(peer.host, peer.port);
    const attempts = this.s.greetRetries + 1;
    let reason = "";
    for (let tries = 1; tries <= attempts; tries++) {
      if (this.stopped || this.met.has(peer.id)) return;
      if (tries > 1 && !this.isListed(peer.id)) return; // it left meanwhile: nobody to greet
      try {
        await this.greetOnce(peer);
        if (this.stopped) return;
        this.met.add(peer.id);
        this.emit({ event: "greeted", peer: peer.id, address, name: peer.name, tries });
        this.onMet(peer.id);
        return;
      } catch (e) {
        reason = (e as Error).message;
      }
      if (tries < attempts) await Bun.sleep(50 * 2 ** tries * (0.5 + Math.random()));
    }
    if (!this.stopped) this.emit({ event: "greet-failed", peer: peer.id, address, reason, tries: attempts });
  }

  private async greetOnce(peer: Peer): Promise<void> {
    const deadline = Promise.withResolvers<void>();
    // The deadline can pass while the dial is still under way (a TLS handshake counts against both),
    // before anything awaits it: unobserved, that rejection would end the process.
    deadline.promise.catch(() => {});
    const timer = setTimeout(() => deadline.reject(new Error(`no welcome within ${this.s.greetTimeoutMs}ms`)), this.s.greetTimeoutMs);
    let conn: Conn<GreetState> | undefined;
    try {
      conn = await this.transport.dial(peer.host, peer.port, greetHandlers, this.s.greetTimeoutMs, { node: peer.id });
      this.conns.add(conn);
      conn.state = { expect: peer.id, done: deadline };
      const { host, port } = this.listedAs();
      const { id, name } = this.me;
      conn.send({ type: "hello", v: PROTOCOL_VERSION, id, host: host || "unknown", port, ...(name ? { name } : {}) });
      await deadline.promise;
    } finally {
      clearTimeout(timer);
      if (conn) {
        this.conns.delete(conn);
        // A reset, not a close, as the registry's probe does: the welcome is in, nothing more is
        // due either way, and a full mesh would otherwise leave a socket in TIME_WAIT per greeting.
        conn.destroy();
      }
    }
  }
}

export interface ListenerSettings {
  listenHost: string;
  port: number;
  maxLineBytes: number;
  inboundTimeoutMs: number;
  maxInboundConns: number;
  /** Open inbound connections from one source address. */
  maxInboundPerAddress: number;
}

/**
 * The node's listening port: answers `hello` with `welcome` and the
 * registry's `probe` with `probe-ok`, one request per connection. A `hello`
 * counts as a greeting only from a node the registry lists under that id at
 * that address: anyone can claim an id, so a hello from an id not (yet)
 * listed is answered and kept aside, and reported once the registry lists
 * that node at the address the hello claims (its `joined` often arrives
 * just after its greeting). With mutual TLS a `hello` must name the node the
 * connection's certificate names, and the greeter checks the certificate of
 * the node it dials.
 */
export class Listener {
  readonly port: number;
  private readonly listeners: Listening["listeners"];
  private readonly caps: ConnectionCaps;
  /**
   * Hellos from nodes not listed yet, by id and then by claimed address: a
   * false claim sent first must not shadow the real node's. Bounded in all.
   */
  private readonly pending = new Map<string, Map<string, { name?: string }>>();
  private pendingClaims = 0;
  private warnedPlainText = false;

  constructor(
    s: ListenerSettings,
    transport: Transport,
    private readonly me: Identity,
    private readonly met: Met,
    /** The peer the registry lists under `id`, if any. */
    private readonly listed: (id: string) => Peer | undefined,
    private readonly emit: (e: GreetingEvent) => void,
  ) {
    this.caps = new ConnectionCaps(s.maxInboundPerAddress, s.maxInboundConns, "node");
    const handlers = lineHandlers<InboundState>({
      maxLineBytes: s.maxLineBytes,
      state: () => ({ timer: undefined, answered: false }),
      open: (conn) => {
        const { refused, ticket } = this.caps.admit(conn.remoteAddress);
        conn.state.caps = ticket;
        if (refused) return conn.fail("too-many-connections", refused);
        conn.state.timer = setTimeout(() => conn.destroy(), s.inboundTimeoutMs);
      },
      line: (conn, line) => this.onLine(conn, line),
      close: (conn) => {
        if (conn.state.caps) this.caps.release(conn.state.caps);
        clearTimeout(conn.state.timer);
        if (conn.limitHit?.code === "tls-required") this.plainTextReached(conn.remoteAddress);
      },
    });
    const listening = transport.listen(s.listenHost, s.port, handlers);
    this.listeners = listening.listeners;
    this.port = listening.port;
  }

  /** The registry lists `peer` (now, or again): a greeting it sent before is reported now. */
  onListed(peer: Peer): void {
    const claims = this.pending.get(peer.id);
    if (!claims) return;
    // The registry has said who that is: the other claims to the id are false.
    this.pending.delete(peer.id);
    this.pendingClaims -= claims.size;
    const address = formatAddress(peer.host, peer.port);
    const claim = claims.get(address);
    if (claim) this.greeted(peer.id, address, claim.name);
  }

  stop(): void {
    for (const l of this.listeners) l.stop(true);
  }

  /**
   * Said once: a registry with TLS but no client CA probes nodes in plain TCP,
   * and the refusal the node then gets (`unreachable`) cannot say why.
   */
  private plainTextReached(from: string): void {
    if (this.warnedPlainText) return;
    this.warnedPlainText = true;
    this.emit({
      event: "warning",
      message: `plain TCP from ${from} reached this node's TLS listener: if that was the registry's probe, a mesh with node certificates needs the registry started with --tls-client-ca`,
    });
  }

  private onLine(conn: Conn<InboundState>, line: string): void {
    // One request per connection: what follows the first line is not read.
    if (conn.state.answered) return;
    conn.state.answered = true;
    const { id, name } = this.me;
    const r = decode(ToListener, line);
    if (!r.ok) return conn.fail(r.code, r.message);
    const m = r.msg;
    if (m.v !== PROTOCOL_VERSION) return conn.fail("unsupported-version", `protocol version ${m.v} is not supported; this node speaks ${PROTOCOL_VERSION}`);
    if (m.type === "probe") {
      if (m.id !== id) return conn.fail("wrong-node", `this is node ${id}, not ${m.id}`);
      conn.send({ type: "probe-ok", id, nonce: m.nonce });
      return conn.end();
    }
    // With mutual TLS a hello speaks for the node its certificate names, and no other.
    if (conn.peer && conn.peer.node !== m.id) return conn.fail("identity-mismatch", identityMismatch(m.id, conn.peer));
    conn.send(name ? { type: "welcome", v: PROTOCOL_VERSION, id, name } : { type: "welcome", v: PROTOCOL_VERSION, id });
    conn.end();
    if (m.id === id || this.met.has(m.id)) return; // a retried greeting is acknowledged again but counted once
    const address = formatAddress(m.host, m.port);
    const peer = this.listed(m.id);
    if (peer) {
      if (formatAddress(peer.host, peer.port) === address) this.greeted(m.id, address, m.name);
      return;
    }
    if (this.pending.get(m.id)?.has(address)) return; // a repeated claim is kept once
    if (this.pendingClaims >= MAX_PENDING) {
      // The id first claimed loses its oldest claim: near enough to the oldest of all, without a scan.
      const [oldId, oldClaims] = this.pending.entries().next().value!;
      oldClaims.delete(oldClaims.keys().next().value!);
      if (!oldClaims.size) this.pending.delete(oldId);
      this.pendingClaims--;
    }
    // Looked up after the eviction, which may have emptied and removed this id's claims.
    const claims = this.pending.get(m.id) ?? new Map<string, { name?: string }>();
    this.pending.set(m.id, claims.set(address, { name: m.name }));
    this.pendingClaims++;
  }

  private greeted(peer: string, address: string, name: string | undefined): void {
    this.met.add(peer);
    this.emit({ event: "greeting", peer, address, name });
  }
}

// --- internal ----------------------------------------------------------------

/** Peers remembered as met before those that left are forgotten: twice the registry's default node cap. */
const MAX_MET = 2 * DEFAULTS.maxNodes;

/** Hellos from nodes not listed yet, kept until the registry lists them: enough for a burst of joins, bounded against made-up ids and addresses. */
const MAX_PENDING = 1024;

interface InboundState {
  timer: Timer | undefined;
  caps?: CapTicket;
  /** The connection's one request has been read. */
  answered: boolean;
}

interface GreetState {
  expect: string;
  done: PromiseWithResolvers<void>;
}

const greetHandlers = lineHandlers<GreetState>({
  maxLineBytes: DEFAULTS.maxLineBytes,
  state: () => ({ expect: "", done: Promise.withResolvers<void>() }),
  line(conn, line) {
    const { expect, done } = conn.state;
    const r = decode(FromListener, line);
    if (!r.ok) return done.reject(new Error(`bad reply: ${r.message}`));
    const m = r.msg;
    if (m.type === "welcome" && m.id === expect) return done.resolve();
    if (m.type === "welcome") return done.reject(new Error(`reached node ${m.id}, expected ${expect}`));
    if (m.type === "error") return done.reject(new Error(`${m.code}: ${m.message}`));
    done.reject(new Error(`unexpected reply ${m.type}`));
  },
  close(conn) {
    conn.state.done.reject(new Error("closed before welcome"));
  },
});
