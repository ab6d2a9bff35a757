/**
 * Sockets: one NDJSON connection with a write queue (Bun's `write` does not
 * buffer), the handler table that feeds it, dialing with a deadline, listening
 * on every address of a name, and the address helpers both roles share. Every
 * socket of the project is opened here.
 */
import { X509Certificate, createPrivateKey } from "node:crypto";
import { lookup } from "node:dns/promises";
import { mkdtempSync, readFileSync, readdirSync, rmSync, statSync } from "node:fs";
import { isIP } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as v from "valibot";
import { ConnectionCaps, type Backlogged, type ByteBudget, type CapTicket } from "./limits.ts";
import { DEFAULTS, LineSplitter, Peer, encode, type ErrorCode, type Message } from "./protocol.ts";

const encoder = new TextEncoder();

/** What one connection may hold and read: the limits a role gives its connections. */
export interface ConnLimits {
  maxLineBytes: number;
  /** Unsent bytes this connection may hold before it is dropped as a slow consumer (default DEFAULTS.maxQueueBytes). */
  maxQueueBytes?: number;
  /** Unsent bytes all connections together may hold (see ByteBudget). */
  budget?: ByteBudget;
  /** Lines handled per read before other connections get a turn (default: no bound). */
  maxLinesPerRead?: number;
}

/**
 * One TCP connection speaking NDJSON. Bun's `write` sends what the kernel takes
 * and drops the rest, so unsent bytes are queued here and flushed on `drain`;
 * once anything is queued, everything after it queues too, to keep order.
 * Queued buffers are counted against a shared budget; a buffer queued on many
 * connections (a fan-out write) is shared, not copied.
 */
export class Conn<S = unknown> implements Backlogged {
  /** Remote address with IPv4-mapped IPv6 normalised; copied at open because Bun clears it at close. */
  readonly remoteAddress: string;
  readonly remotePort: number;
  closed = false;
  /** Role-specific session state. */
  state: S;
  /** Set when this layer itself ends the connection over a limit, so the owner can report it on close. */
  limitHit: { code: ErrorCode; message: string; detail?: string } | undefined;
  /** Who the other end proved to be with a TLS client certificate; undefined without one (plain TCP, or TLS without client certificates). */
  peer: PeerIdentity | undefined;
  readonly splitter: LineSplitter;
  private queue: { buf: Uint8Array; off: number }[] = [];
  private queuedBytes = 0;
  private sentTotal = 0;
  private ending = false;
  private paused = false;
  private holds = 0;
  private linesThisRead = 0;
  private readonly maxQueueBytes: number;
  private readonly maxLinesPerRead: number;
  private readonly budget: ByteBudget | undefined;

  constructor(
    readonly socket: Bun.Socket<Conn<S>>,
    state: S,
    limits: ConnLimits,
    onLine: (conn: Conn<S>, line: string) => void,
  ) {
    this.remoteAddress = normalizeHost(socket.remoteAddress ?? "");
    this.remotePort = socket.remotePort ?? 0;
    this.state = state;
    this.maxQueueBytes = limits.maxQueueBytes ?? DEFAULTS.maxQueueBytes;
    this.maxLinesPerRead = limits.maxLinesPerRead ?? Infinity;
    this.budget = limits.budget;
    this.splitter = new LineSplitter(
      limits.maxLineBytes,
      (line) => {
        onLine(this, line);
        // One connection must not keep the loop to itself: past the bound, the rest waits a turn.
        if (++this.linesThisRead >= this.maxLinesPerRead && !this.closed) {
          this.hold();
          setImmediate(() => this.release());
        }
      },
      () => {
        this.limitHit = { code: "line-too-long", message: `line exceeds ${limits.maxLineBytes} bytes` };
        this.fail(this.limitHit.code, this.limitHit.message);
      },
    );
  }

  /** Sends a message (or pre-encoded lines). Returns false if the connection is gone. */
  send(msg: Message | string | Uint8Array): boolean {
    if (this.closed || this.ending) return false;
    const data = typeof msg === "object" && !(msg instanceof Uint8Array) ? encode(msg) : msg;
    const len = typeof data === "string" ? Buffer.byteLength(data) : data.byteLength;
    this.sentTotal += len;
    if (this.queue.length) return this.enqueue(typeof data === "string" ? encoder.encode(data) : data, 0);
    const n = this.socket.write(data);
    if (n < 0) return false;
    if (n < len) return this.enqueue(typeof data === "string" ? encoder.encode(data) : data, n);
    return true;
  }

  /** Bytes waiting for the kernel. */
  get pendingBytes(): number {
    return this.queuedBytes;
  }

  /** Bytes handed to `send` so far; with `pendingBytes`, tells whether a given message has left. */
  get sentBytes(): number {
    return this.sentTotal;
  }

  /** The `drain` handler: writes what was queued, then finishes a pending end(). */
  flush(): void {
    while (this.queue.length) {
      const head = this.queue[0]!;
      const rest = head.buf.byteLength - head.off;
      const n = this.socket.write(head.off ? head.buf.subarray(head.off) : head.buf);
      if (n < 0) return;
      this.queuedBytes -= Math.min(n, rest);
      if (n < rest) {
        head.off += n;
        return;
      }
      this.queue.shift();
      this.budget?.release(head.buf);
    }
    this.budget?.backlogged.delete(this);
    if (this.ending) this.socket.end();
  }

  /**
   * Stops reading: lines after the current one wait, unread, until as many
   * `release`s as `hold`s. Only if more bytes arrive meanwhile is the socket
   * paused, so the peer's further bytes stay in the kernel; the common case
   * costs no syscall.
   */
  hold(): void {
    this.holds++;
    this.splitter.hold();
  }

  /** Reads what was held, then resumes the socket unless a line held it again. */
  release(): void {
    if (this.holds === 0 || --this.holds > 0 || this.closed) return;
    this.linesThisRead = 0;
    if (this.splitter.release() && !this.splitter.holding && this.paused) {
      this.paused = false;
      this.socket.resume();
    }
  }

  /** Feeds a chunk from the socket to the splitter (the `data` handler). */
  read(chunk: Uint8Array): void {
    if (this.splitter.holding) {
      if (!this.paused) {
        this.paused = true;
        this.socket.pause();
      }
    } else this.linesThisRead = 0;
    this.splitter.push(chunk);
  }

  /** Closes after everything queued has been handed to the kernel. */
  end(): void {
    if (this.closed || this.ending) return;
    this.ending = true;
    if (!this.queue.length) this.socket.end();
  }

  /** Sends an error and closes. */
  fail(code: ErrorCode, message: string): void {
    this.send({ type: "error", code, message });
    this.end();
  }

  /** Closes at once, dropping anything unsent (RST). */
  destroy(): void {
    this.ending = true; // nothing more is sent
    this.dropQueue();
    if (!this.closed) this.socket.terminate();
  }

  /** Drops the connection because it does not read what it is sent. */
  dropSlow(why: string): void {
    this.limitHit = { code: "slow-consumer", message: why };
    this.destroy();
  }

  /** Forgets what was queued; called when the socket closes, whoever closed it. */
  dropQueue(): void {
    if (!this.queue.length) return;
    for (const q of this.queue) this.budget?.release(q.buf);
    this.queue = [];
    this.queuedBytes = 0;
    this.budget?.backlogged.delete(this);
  }

  private enqueue(buf: Uint8Array, off: number): boolean {
    this.queue.push({ buf, off });
    this.queuedBytes += buf.byteLength - off;
    if (this.queuedBytes > this.maxQueueBytes) {
      this.dropSlow(`over ${this.maxQueueBytes} bytes unsent: the peer does not read`);
      return false;
    }
    if (this.budget) {
      this.budget.retain(buf, this);
      this.budget.enforce();
    }
    return !this.ending; // false if the budget dropped this very connection
  }
}

export interface ConnHooks<S> extends ConnLimits {
  /** Fresh state for each socket (Bun shares a listener's `data` object between sockets). */
  state(socket: Bun.Socket<Conn<S>>): S;
  open?(conn: Conn<S>): void;
  line(conn: Conn<S>, line: string): void;
  close?(conn: Conn<S>, error?: Error): void;
  /**
   * A chunk that is exactly `bytes` (one whole line with its newline, nothing
   * buffered before it) goes to `handle` without being split or decoded; if
   * `handle` returns false it takes the normal path. The heartbeat fast path:
   * a ping arrives alone in its segment.
   */
  exact?: { bytes: Buffer; handle(conn: Conn<S>): boolean };
}

/**
 * The Bun socket handler table for NDJSON connections. Handlers stay
 * synchronous and catch everything: an exception in one connection's handler
 * must never reach Bun's loop, where it would end the process.
 */
export function lineHandlers<S>(hooks: ConnHooks<S>): Bun.SocketHandler<Conn<S>> {
  const exact = hooks.exact;
  return {
    open(socket) {
      const conn = new Conn<S>(socket, undefined as S, hooks, (c, line) => {
        try {
          hooks.line(c, line);
        } catch (e) {
          c.fail("bad-message", `internal error: ${(e as Error).message}`);
        }
      });
      socket.data = conn;
      try {
        conn.state = hooks.state(socket);
        hooks.open?.(conn);
      } catch {
        conn.destroy();
      }
    },
    data(socket, chunk) {
      const conn = socket.data;
      if (conn.closed) return;
      if (exact && chunk.byteLength === exact.bytes.byteLength && conn.splitter.idle && exact.bytes.equals(chunk)) {
        try {
          if (exact.handle(conn)) return;
        } catch {
          // fall through: the normal path reports whatever is wrong
        }
      }
      conn.read(chunk);
    },
    drain(socket) {
      socket.data.flush();
    },
    close(socket, error) {
      const conn = socket.data;
      if (!conn || conn.closed) return;
      conn.closed = true;
      conn.dropQueue();
      try {
        hooks.close?.(conn, error);
      } catch {
        // a close hook has nothing left to report to
      }
    },
    error(socket) {
      socket.data?.destroy();
    },
  };
}

// --- addresses and dialing ---------------------------------------------------

/** `::ffff:10.0.0.1` -> `10.0.0.1`, `[::1]` -> `::1`, lowercase. */
export function normalizeHost(host: string): string {
  let h = host.trim().toLowerCase();
  if (h.startsWith("[") && h.endsWith("]")) h = h.slice(1, -1);
  if (h.startsWith("::ffff:") && isIP(h.slice(7)) === 4) h = h.slice(7);
  return h;
}

/**
 * The one spelling of an IP address that all its other spellings map to
 * (`0`, `0.0`, `0x0`, `::0`, `0:0:0:0:0:0:0:0`, `::ffff:7f00:1`, ...), or
 * undefined if `host` is not an IP address. Hosts are parsed the way URLs
 * parse them, which accepts the short and hex IPv4 forms the resolver accepts.
 */
export function canonicalIp(host: string): string | undefined {
  const h = normalizeHost(host);
  let c: string;
  try {
    c = new URL(h.includes(":") ? `http://[${h}]/` : `http://${h}/`).hostname;
  } catch {
    return undefined;
  }
  if (!c.startsWith("[")) return isIP(c) === 4 ? c : undefined;
  const v6 = c.slice(1, -1);
  const mapped = /^::ffff:([0-9a-f]{1,4}):([0-9a-f]{1,4})$/.exec(v6);
  if (!mapped) return v6;
  const [hi, lo] = [parseInt(mapped[1]!, 16), parseInt(mapped[2]!, 16)];
  return `${hi >> 8}.${hi & 255}.${lo >> 8}.${lo & 255}`;
}

/** What an address (as canonicalIp writes it) reaches: no host in particular, this host, or another. */
export function ipScope(ip: string): "unspecified" | "loopback" | "other" {
  if (ip.includes(":")) return ip === "::" ? "unspecified" : ip === "::1" ? "loopback" : "other";
  // 0.0.0.0/8 is "this network": a connection to 0.0.0.0 reaches this very host.
  if (ip.startsWith("0.")) return "unspecified";
  return ip.startsWith("127.") ? "loopback" : "other";
}

/** True if `host` reaches only this machine: `localhost` or a loopback address. Other names count as not loopback, unresolved. */
export function isLoopbackHost(host: string): boolean {
  const ip = canonicalIp(host);
  return ip ? ipScope(ip) === "loopback" : normalizeHost(host) === "localhost";
}

/** `host:port`, with brackets around IPv6 (of the hosts we write, only an IPv6 address contains a colon). */
export function formatAddress(host: string, port: number): string {
  return host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`;
}

/** Parses `host`, `host:port`, `[v6]` or `[v6]:port`; a bare IPv6 literal is a host. */
export function parseHostPort(text: string): { host?: string; port?: number } {
  const t = text.trim();
  let host: string | undefined = t;
  let portText: string | undefined;
  const bracket = /^\[([^\]]+)\](?::(\d*))?$/.exec(t);
  if (bracket) [host, portText] = [bracket[1], bracket[2]];
  else if (isIP(t) !== 6 && t.includes(":")) {
    const i = t.lastIndexOf(":");
    [host, portText] = [t.slice(0, i), t.slice(i + 1)];
  }
  const port = portText === undefined || portText === "" ? undefined : parsePort(portText, false);
  if (portText && port === undefined) throw new Error(`invalid port in "${text}"`);
  return { host: host ? normalizeHost(host) : undefined, port };
}

/** A port number from text, or undefined. */
export function parsePort(text: string, allowZero = true): number | undefined {
  if (!/^\d{1,5}$/.test(text.trim())) return undefined;
  const n = Number(text);
  return n <= 65535 && (allowZero || n > 0) ? n : undefined;
}

/** Every address a host name resolves to (IP literals pass through), IPv6 and IPv4 alike. */
export async function resolveHost(host: string): Promise<string[]> {
  const h = normalizeHost(host);
  if (isIP(h)) return [h];
  const found = await lookup(h, { all: true, verbatim: true });
  return [...new Set(found.map((a) => normalizeHost(a.address)))];
}

/** Every address a name resolves to, within a deadline (none if it fails): a name's resolver may hang, the caller's patience must not. */
export async function resolveWithin(host: string, timeoutMs: number): Promise<string[]> {
  let timer: Timer | undefined;
  const late = new Promise<string[]>((resolve) => (timer = setTimeout(() => resolve([]), timeoutMs)));
  try {
    const found = await Promise.race([resolveHost(host), late]);
    return found.map((a) => canonicalIp(a) ?? a);
  } catch {
    return [];
  } finally {
    clearTimeout(timer);
  }
}

export class DialError extends Error {
  override name = "DialError";
  constructor(
    message: string,
    readonly code: string,
    options?: ErrorOptions & { final?: boolean },
  ) {
    super(message, options);
    this.final = options?.final ?? false;
  }

  /** The other end answered and was refused (its certificate, its protocol): no other address of the host is tried. */
  readonly final: boolean;
}

/**
 * Connects with a deadline (Bun has no connect timeout) to each address the
 * host resolves to in turn, so `localhost` works whether the other side
 * listens on ::1, 127.0.0.1 or both.
 */
export async function dial<S>(
  host: string,
  port: number,
  handlers: Bun.SocketHandler<Conn<S>>,
  timeoutMs: number,
): Promise<Conn<S>> {
  return dialEach(host, port, timeoutMs, (addr, left) => connectWithTimeout(addr, port, handlers, left));
}

/** Tries `connect` on each address of `host` until one succeeds, the deadline passes, or a refusal is final. */
async function dialEach<S>(
  host: string,
  port: number,
  timeoutMs: number,
  connect: (addr: string, leftMs: number) => Promise<Bun.Socket<Conn<S>>>,
): Promise<Conn<S>> {
  const deadline = performance.now() + timeoutMs;
  let addrs: string[];
  try {
    addrs = await resolveHost(host);
  } catch (e) {
    throw new DialError(`cannot resolve ${host}: ${(e as Error).message}`, "ENOTFOUND", { cause: e });
  }
  let last: unknown;
  for (const addr of addrs) {
    const left = deadline - performance.now();
    if (left <= 0) break;
    try {
      const socket = await connect(addr, left);
      return socket.data;
    } catch (e) {
      last = e;
      if (e instanceof DialError && e.final) break;
    }
  }
  const code = (last as { code?: string } | undefined)?.code ?? "ETIMEDOUT";
  const why = last ? (last as Error).message : "timed out";
  throw new DialError(`cannot connect to ${formatAddress(host, port)}: ${why} (${code})`, code, { cause: last, final: last instanceof DialError && last.final });
}

async function connectWithTimeout<S>(
  hostname: string,
  port: number,
  socket: Bun.SocketHandler<Conn<S>>,
  ms: number,
): Promise<Bun.Socket<Conn<S>>> {
  const p = Bun.connect<Conn<S>>({ hostname, port, socket });
  let timer: Timer | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new DialError(`connect timeout after ${Math.round(ms)}ms`, "ETIMEDOUT")), ms);
  });
  try {
    return await Promise.race([p, timeout]);
  } catch (e) {
    p.then((s) => s.terminate(), () => {}); // a late success is closed, a late failure swallowed
    const code = (e as { code?: string }).code;
    throw code ? e : new DialError((e as Error).message, "ECONNREFUSED", { cause: e });
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Listens on a host the way a user means it: `localhost` binds both 127.0.0.1
 * and ::1 (Bun's listen and connect can resolve it to different families), and
 * `::` falls back to 0.0.0.0 on hosts without IPv6. Returns the listeners
 * (all on one port) and the port.
 */
export function listenAll<T>(
  host: string,
  port: number,
  socket: Bun.SocketHandler<T>,
): { listeners: Bun.TCPSocketListener<T>[]; port: number } {
  const h = normalizeHost(host);
  const listen = (hostname: string, p: number) => {
    try {
      return Bun.listen<T>({ hostname, port: p, socket });
    } catch (e) {
      // Bun says only "Failed to listen at ::"; say which port and why, keep `code` for callers.
      const code = (e as { code?: string }).code;
      const why =
        code === "EADDRINUSE" ? `port ${p} is already in use on ${hostname}`
        : code === "EADDRNOTAVAIL" ? `${hostname} is not an address of this host`
        : code === "EACCES" ? `no permission to listen on port ${p}`
        : `cannot listen on ${hostname} port ${p}: ${(e as Error).message}`;
      throw Object.assign(new Error(why, { cause: e }), { code });
    }
  };
  if (h === "localhost") {
    const first = listen("127.0.0.1", port);
    const listeners = [first];
    try {
      listeners.push(listen("::1", first.port));
    } catch {
      // IPv4-only host, or ::1 taken: 127.0.0.1 alone still serves `localhost`
    }
    return { listeners, port: first.port };
  }
  if (h === "::") {
    try {
      const l = listen("::", port);
      return { listeners: [l], port: l.port };
    } catch (e) {
      if ((e as { code?: string }).code === "EADDRINUSE") throw e;
      const l = listen("0.0.0.0", port);
      return { listeners: [l], port: l.port };
    }
  }
  const l = listen(h, port);
  return { listeners: [l], port: l.port };
}

/** Every socket of the project is opened through one of these: plain TCP, or TLS (the same calls with certificates). */
export interface Transport {
  /** Listens on every address of `host` (see listenAll). */
  listen<S>(host: string, port: number, handlers: Bun.SocketHandler<Conn<S>>): Listening;
  /**
   * Connects with a deadline to each address `host` resolves to in turn (see
   * dial). `peer` says who is expected to answer: a node, by its id (a
   * greeting, a probe), or else the registry, whose certificate must carry
   * `name` (default `host`: give the name when dialing an address it resolved to).
   */
  dial<S>(host: string, port: number, handlers: Bun.SocketHandler<Conn<S>>, timeoutMs: number, peer?: DialPeer): Promise<Conn<S>>;
  /** Whether it speaks TLS: on its listeners (given a certificate), and always to the registry it dials, the token in `register` included. */
  readonly encrypted: boolean;
  /** What this side's own certificate proves (a node's id comes from it), if it has one. */
  readonly identity?: PeerIdentity;
}

/** Who a dial expects at the other end: a node, by id; or the registry, by the name its certificate must carry. */
export type DialPeer = { node: string; name?: undefined } | { name: string; node?: undefined };

export interface Listening {
  listeners: { stop(closeActiveConnections?: boolean): void }[];
  port: number;
}

/** Plain TCP. A TLS client that reaches it is told so in plain text and closed (`tls-unsupported`). */
export const tcp: Transport = { listen: listenPlain, dial: (host, port, handlers, timeoutMs) => dial(host, port, handlers, timeoutMs), encrypted: false };

/** The first byte of a TLS handshake record: what a ClientHello starts with (then 0x03, the major version). */
const TLS_HANDSHAKE = 0x16;

function listenPlain<S>(host: string, port: number, handlers: Bun.SocketHandler<Conn<S>>): Listening {
  const unread = new WeakSet<object>();
  return listenAll<Conn<S>>(host, port, {
    ...handlers,
    open(socket) {
      unread.add(socket);
      handlers.open?.(socket);
    },
    data(socket, chunk) {
      if (unread.delete(socket) && chunk[0] === TLS_HANDSHAKE && chunk[1] === 3) return refuseTlsClient(socket.data);
      handlers.data?.(socket, chunk);
    },
  });
}

/**
 * A TLS client on a plain port. The line is for people (`nc`, logs); a TLS
 * client reads it as a broken record and fails at once with
 * WRONG_VERSION_NUMBER, which our dialer reports as `tls-unsupported`,
 * instead of waiting for a handshake that never comes.
 */
function refuseTlsClient(conn: Conn<unknown>): void {
  conn.limitHit = { code: "tls-unsupported", message: "a TLS client on a port that speaks plain TCP" };
  conn.fail("tls-unsupported", "this port speaks plain TCP, not TLS");
}

// --- TLS ---------------------------------------------------------------------

/** What precedes the id in a node certificate's subjectAltName URI. */
export const NODE_URI_PREFIX = "urn:node:";

/**
 * The node id a certificate proves: the one subjectAltName URI
 * `urn:node:<id>`, given as Bun's `getPeerCertificate().subjectaltname`
 * string. None, or more than one, is no identity. Bun quotes a value that
 * contains a comma, so a crafted entry cannot pass for a second one.
 */
export function nodeIdOf(subjectaltname: string | undefined): string | undefined {
  if (!subjectaltname) return undefined;
  const ids = subjectaltname
    .split(", ")
    .filter((entry) => entry.startsWith(`URI:${NODE_URI_PREFIX}`))
    .map((entry) => entry.slice(`URI:${NODE_URI_PREFIX}`.length));
  if (ids.length !== 1 || !v.is(Peer.entries.id, ids[0])) return undefined;
  return ids[0];
}

/** Who the other end of a connection proved to be with its certificate. */
export interface PeerIdentity {
  /** The node id the certificate names (`nodeIdOf`); undefined for a certificate that names none, like the registry's. */
  node: string | undefined;
  /** The certificate's subject, for messages. */
  subject: string;
}

/** Why `id` (in a `register` or a `hello`) is not the node a connection's certificate proved: the text of `identity-mismatch`. */
export function identityMismatch(id: string, peer: PeerIdentity): string {
  if (peer.node === undefined) return `this connection's certificate (${peer.subject}) names no node: a node's certificate carries the URI ${NODE_URI_PREFIX}<id>`;
  return `this connection's certificate is for node ${peer.node}, not ${id}`;
}

/** Files (PEM) and settings of a TLS transport. */
export interface TlsOptions {
  /** This side's certificate (chain) and key: served when listening, presented when dialing. Without them, listeners stay plain TCP. */
  cert?: string;
  key?: string;
  /** The CA the registry's certificate must be signed by, when dialing it; default: the system's trust store. */
  ca?: string;
  /**
   * The CA that signs the mesh (mutual TLS): every listener then requires a
   * client certificate signed by it, and a dial to a node checks that the
   * node's certificate is signed by it and names the node expected. Needs `cert` and `key`.
   */
  meshCa?: string;
  /** The name the registry's certificate must carry, when it is dialed by another name or by address (default: the host dialed). */
  serverName?: string;
  /** A TLS handshake on a listener must be over this long after the connection (Bun has no deadline of its own). */
  handshakeTimeoutMs?: number;
}

/** A TLS file that cannot be used, and why; the transport keeps what it had. */
export class TlsConfigError extends Error {
  override name = "TlsConfigError";
}

/** How a reload of the certificate files went: what the programs print on SIGHUP. */
export type TlsEvent =
  | { event: "tls-reloaded"; subject?: string; notAfter?: string; /** Whose files, when a program has more than one set (the registry's status server). */ scope?: string }
  | { event: "tls-reload-failed"; message: string; scope?: string };

export interface TlsTransport extends Transport {
  /**
   * Reads the files again and switches to them if they are whole and
   * consistent (and name the same node as before): connections opened from
   * then on use them, open ones keep theirs. On failure nothing changes.
   */
  reload(): TlsEvent;
}

/**
 * TLS, and with `meshCa` mutual TLS, over the same listen and dial as plain
 * TCP. Reads and checks every file now; throws TlsConfigError if one is unusable.
 *
 * Listeners accept plain TCP and upgrade each connection to TLS themselves
 * (Bun's server-side `upgradeTLS`, undocumented; test/tls.test.ts pins it),
 * which is what makes both of these possible: new files apply to the next
 * connection without closing the listener, and a client speaking plain text
 * is told so in plain text (`tls-required`) instead of getting a TLS alert.
 */
export function tls(options: TlsOptions): TlsTransport {
  let m = loadTls(options);
  const handshakeMs = options.handshakeTimeoutMs ?? DEFAULTS.handshakeTimeoutMs;
  return {
    encrypted: true,
    get identity() {
      return m.identity;
    },
    listen: (host, port, handlers) => (m.server ? listenTls(host, port, handlers, () => m, handshakeMs) : listenPlain(host, port, handlers)),
    dial<S>(host: string, port: number, handlers: Bun.SocketHandler<Conn<S>>, timeoutMs: number, peer?: DialPeer) {
      const node = peer?.node;
      if (node !== undefined) {
        // Without a mesh CA nodes have no certificates: greetings and probes stay plain TCP.
        if (!m.meshCas.length) return dial(host, port, handlers, timeoutMs);
        const settings: Bun.TLSOptions = { ...m.client, ca: m.meshCa, rejectUnauthorized: false };
        const cas = m.meshCas;
        return dialEach<S>(host, port, timeoutMs, (addr, left) => connectTls(addr, port, handlers, left, settings, (s, err) => checkNode(s, err, node, cas)));
      }
      // dialEach connects by address: the name to check is the one the registry was dialed by.
      const settings: Bun.TLSOptions = { ...m.client, ca: m.ca, serverName: options.serverName ?? normalizeHost(peer?.name ?? host), rejectUnauthorized: false };
      return dialEach<S>(host, port, timeoutMs, (addr, left) => connectTls(addr, port, handlers, left, settings, checkRegistry));
    },
    reload() {
      try {
        const next = loadTls(options);
        if (next.identity?.node !== m.identity?.node) {
          throw new TlsConfigError(`the new certificate names node ${next.identity?.node ?? "none"}, this one ${m.identity?.node ?? "none"}: an identity does not change while running`);
        }
        m = next;
        return { event: "tls-reloaded", subject: m.identity?.subject, notAfter: m.notAfter };
      } catch (e) {
        return { event: "tls-reload-failed", message: (e as Error).message };
      }
    },
  };
}

/** What a TLS transport holds, read from its files and checked. */
interface TlsMaterial {
  /** Options for the server side of each accepted connection; undefined without a certificate. One object per load: Bun builds one context for it. */
  server: (Bun.TLSOptions & { isServer: true }) | undefined;
  /** This side's certificate and key, presented when dialing. */
  client: Pick<Bun.TLSOptions, "cert" | "key">;
  ca: string | undefined;
  meshCa: string | undefined;
  meshCas: X509Certificate[];
  identity: PeerIdentity | undefined;
  notAfter: string | undefined;
}

function loadTls(o: TlsOptions): TlsMaterial {
  if (!o.cert !== !o.key) throw new TlsConfigError("a certificate needs its key, and a key its certificate: give both");
  if (o.meshCa && !o.cert) throw new TlsConfigError("mutual TLS needs this side's own certificate and key");
  const ca = o.ca === undefined ? undefined : readPem(o.ca, "CA certificate");
  if (ca !== undefined) certificatesIn(ca, o.ca!);
  const meshCa = o.meshCa === undefined ? undefined : readPem(o.meshCa, "CA certificate");
  const meshCas = meshCa === undefined ? [] : certificatesIn(meshCa, o.meshCa!);
  if (!o.cert || !o.key) return { server: undefined, client: {}, ca, meshCa, meshCas, identity: undefined, notAfter: undefined };
  const cert = readPem(o.cert, "certificate");
  const key = readPem(o.key, "key");
  const leaf = certificatesIn(cert, o.cert)[0]!;
  let privateKey: ReturnType<typeof createPrivateKey>;
  try {
    privateKey = createPrivateKey(key);
  } catch (e) {
    throw new TlsConfigError(`${o.key} holds no usable private key: ${(e as Error).message}`);
  }
  if (!leaf.checkPrivateKey(privateKey)) throw new TlsConfigError(`${o.key} is not the key of the certificate in ${o.cert}`);
  const dates = datesProblem(leaf);
  if (dates) throw new TlsConfigError(`the certificate in ${o.cert} ${dates}`);
  if (meshCas.length && !signedByOne(leaf, meshCas)) throw new TlsConfigError(`the certificate in ${o.cert} is not signed by the CA in ${o.meshCa}`);
  const server = { cert, key, isServer: true as const, ...(meshCa ? { ca: meshCa, requestCert: true, rejectUnauthorized: false } : {}) };
  const identity = { node: nodeIdOf(leaf.subjectAltName), subject: leaf.subject.replace(/\n/g, ", ") };
  return { server, client: { cert, key }, ca, meshCa, meshCas, identity, notAfter: new Date(leaf.validTo).toISOString() };
}

function readPem(path: string, what: string): string {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    const code = (e as { code?: string }).code;
    throw new TlsConfigError(`cannot read the ${what} file ${path}: ${code === "ENOENT" ? "no such file" : (e as Error).message}`);
  }
  if (!text.includes("-----BEGIN ")) throw new TlsConfigError(`${path} is not a PEM file (no -----BEGIN line): expected a ${what}`);
  return text;
}

/** Every certificate in a PEM text (a CA file may hold several). */
function certificatesIn(pem: string, path: string): X509Certificate[] {
  const blocks = pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  if (!blocks.length) throw new TlsConfigError(`${path} holds no certificate`);
  return blocks.map((b) => {
    try {
      return new X509Certificate(b);
    } catch (e) {
      throw new TlsConfigError(`${path} holds a certificate that cannot be read: ${(e as Error).message}`);
    }
  });
}

function signedByOne(cert: X509Certificate, cas: X509Certificate[]): boolean {
  return cas.some((ca) => cert.checkIssued(ca) && cert.verify(ca.publicKey));
}

function datesProblem(cert: X509Certificate, now = Date.now()): string | undefined {
  if (now > Date.parse(cert.validTo)) return `expired on ${new Date(cert.validTo).toISOString()}`;
  if (now < Date.parse(cert.validFrom)) return `is not valid before ${new Date(cert.validFrom).toISOString()}`;
  return undefined;
}

/** Plain words for the verification errors a mesh meets, with the code for searching. */
const VERIFY_REASONS: Record<string, string> = {
  CERT_HAS_EXPIRED: "the certificate has expired",
  CERT_NOT_YET_VALID: "the certificate is not valid yet",
  SELF_SIGNED_CERT_IN_CHAIN: "it is signed by a CA that is not trusted here",
  UNABLE_TO_VERIFY_LEAF_SIGNATURE: "it is signed by a CA that is not trusted here",
  UNABLE_TO_GET_ISSUER_CERT: "it is signed by a CA that is not trusted here",
  UNABLE_TO_GET_ISSUER_CERT_LOCALLY: "it is signed by a CA that is not trusted here",
  DEPTH_ZERO_SELF_SIGNED_CERT: "it is self-signed",
  ERR_TLS_CERT_ALTNAME_INVALID: "it is not issued for the name dialed (see --tls-server-name)",
};

/** An error about the peer's certificate (the connection itself stands), not about the handshake. */
function isVerifyError(err: Error | null): boolean {
  const code = (err as { code?: string } | null)?.code;
  return code !== undefined && (code in VERIFY_REASONS || /CERT/.test(code));
}

function verifyReason(err: Error | null | undefined): string {
  const code = (err as { code?: string } | null | undefined)?.code;
  if (!code) return err?.message ?? "it could not be verified";
  return `${VERIFY_REASONS[code] ?? err!.message} (${code})`;
}

/** The registry is checked the way a browser checks a site: chain to a trusted CA, dates, and the name. */
function checkRegistry(s: Bun.Socket<unknown>, err: Error | null): DialError | undefined {
  if (!err && s.authorized) return undefined;
  return new DialError(`the registry's certificate is not trusted: ${verifyReason(err)}`, "bad-certificate", { final: true });
}

/**
 * A node's certificate names an id, not an address, so the name check is the
 * one complaint tolerated; the chain and dates are checked here again, since
 * that complaint hides whether anything else was wrong.
 */
function checkNode(s: Bun.Socket<unknown>, err: Error | null, expected: string, cas: X509Certificate[]): DialError | undefined {
  const code = (err as { code?: string } | null)?.code;
  const cert = s.getPeerX509Certificate() as X509Certificate | undefined;
  const refuse = (why: string) => new DialError(`node ${expected}'s certificate is refused: ${why}`, "bad-certificate", { final: true });
  if ((err && code !== "ERR_TLS_CERT_ALTNAME_INVALID") || !cert) return refuse(verifyReason(err));
  if (!signedByOne(cert, cas)) return refuse("it is signed by a CA that is not trusted here");
  const dates = datesProblem(cert);
  if (dates) return refuse(`it ${dates}`);
  const id = nodeIdOf(s.getPeerCertificate()?.subjectaltname);
  if (id !== expected) return new DialError(`reached a certificate for ${id === undefined ? "no node" : `node ${id}`}, expected node ${expected}`, "identity-mismatch", { final: true });
  return undefined;
}

/** What a failed client handshake means: an answer in plain text is a port without TLS. */
function handshakeFailure(err: Error | null): DialError {
  const text = err?.message ?? "";
  if (/WRONG_VERSION_NUMBER|HTTP_REQUEST|PACKET_LENGTH_TOO_LONG/i.test(text)) {
    return new DialError("it does not speak TLS (it answered in plain text)", "tls-unsupported", { final: true });
  }
  const code = (err as { code?: string } | null)?.code ?? "EPROTO";
  if (code === "ECONNRESET") return new DialError("the connection was closed during the TLS handshake", code);
  return new DialError(`the TLS handshake failed: ${text || code}`, code, { final: true });
}

/**
 * One TLS connection with a deadline on connect and handshake together. The
 * role's handlers see the socket only once `check` accepts the other end,
 * so nothing is written before the handshake and nothing is read from a
 * peer that was refused.
 */
function connectTls<S>(
  hostname: string,
  port: number,
  handlers: Bun.SocketHandler<Conn<S>>,
  ms: number,
  settings: Bun.TLSOptions,
  check: (s: Bun.Socket<Conn<S>>, err: Error | null) => DialError | undefined,
): Promise<Bun.Socket<Conn<S>>> {
  const done = Promise.withResolvers<Bun.Socket<Conn<S>>>();
  let phase: "handshake" | "ready" | "over" = "handshake";
  const fail = (e: DialError) => {
    if (phase !== "handshake") return;
    phase = "over";
    done.reject(e);
  };
  const socket: Bun.SocketHandler<Conn<S>> = {
    open() {}, // the role's open waits for the checked handshake
    handshake(s, ok, err) {
      if (phase !== "handshake") return;
      // Bun can report a certificate it does not like as a failed handshake, though the connection stands: `check` decides.
      const established = ok || isVerifyError(err);
      const refused = established ? check(s, err) : handshakeFailure(err);
      if (refused) {
        fail(refused);
        return s.terminate();
      }
      phase = "ready";
      handlers.open?.(s);
      done.resolve(s);
    },
    data(s, chunk) {
      if (phase === "ready") handlers.data?.(s, chunk);
    },
    drain(s) {
      if (phase === "ready") handlers.drain?.(s);
    },
    close(s, e) {
      if (phase === "ready") return handlers.close?.(s, e);
      fail(new DialError("the connection was closed during the TLS handshake", "ECONNRESET"));
    },
    error(s, e) {
      if (phase === "ready") return handlers.error?.(s, e);
      s.terminate();
    },
  };
  const connecting = Bun.connect<Conn<S>>({ hostname, port, tls: settings, socket });
  connecting.catch((e: Error & { code?: string }) => fail(new DialError(e.message, e.code ?? "ECONNREFUSED", { cause: e })));
  const timer = setTimeout(() => {
    fail(new DialError(`no TLS connection within ${Math.round(ms)}ms`, "ETIMEDOUT"));
    connecting.then((s) => s.terminate(), () => {});
  }, ms);
  return done.promise.finally(() => clearTimeout(timer));
}

/** A connection accepted on a TLS listener, while its handshake is under way. */
interface Handshaking {
  conn: Conn<unknown> | undefined;
  timer: Timer | undefined;
  /** The handshake is over, one way or the other (Bun can report it again after we cut it). */
  settled: boolean;
  /** The other end passed every check: its lines may be read. */
  ready: boolean;
  /** Nothing has been read from the raw socket yet. */
  first: boolean;
  /** Client certificates are required. */
  mesh: boolean;
}

/**
 * The server side: a plain listener that upgrades each connection with the
 * current options. The role's `open` runs at once (its connection caps and
 * deadlines count from the TCP connect, and what it sends waits in Conn's
 * queue until the handshake is done); its lines only once the handshake and
 * the client's certificate passed. Refusals are left in `limitHit` for the
 * role to report when the connection closes.
 */
function listenTls<S>(host: string, port: number, handlers: Bun.SocketHandler<Conn<S>>, material: () => TlsMaterial, handshakeMs: number): Listening {
  const sides = new WeakMap<object, Handshaking>();
  const settle = (h: Handshaking) => {
    h.settled = true;
    clearTimeout(h.timer);
  };
  const secure: Bun.SocketHandler<Conn<S>> = {
    open(s) {
      const h = s.data as unknown as Handshaking;
      sides.set(s, h);
      handlers.open?.(s);
      h.conn = s.data as Conn<unknown>;
    },
    handshake(s, ok, err) {
      const h = sides.get(s);
      if (!h || h.settled || !h.conn) return;
      settle(h);
      const conn = h.conn;
      if (!ok) {
        // A client that left without a byte (a port check, a health check) is no failure, as on a plain port.
        if (!h.first) conn.limitHit = { code: "handshake-failed", message: "the TLS handshake failed", detail: err?.message };
        return conn.destroy();
      }
      if (h.mesh) {
        const cert = s.getPeerX509Certificate() as X509Certificate | undefined;
        const refusal = !cert
          ? { code: "certificate-required" as const, message: "this port requires a client certificate signed by the mesh CA" }
          : err
            ? { code: "bad-certificate" as const, message: `the client certificate is refused: ${verifyReason(err)}`, detail: cert.subject.replace(/\n/g, ", ") }
            : undefined;
        if (refusal) {
          conn.limitHit = refusal;
          return conn.fail(refusal.code, refusal.message); // over TLS: the client's handshake has succeeded, it reads this
        }
        conn.peer = { node: nodeIdOf(s.getPeerCertificate()?.subjectaltname), subject: cert!.subject.replace(/\n/g, ", ") };
      }
      h.ready = true;
    },
    data(s, chunk) {
      if (sides.get(s)?.ready) handlers.data?.(s, chunk);
    },
    drain: handlers.drain,
    close(s, e) {
      const h = sides.get(s);
      if (h) settle(h);
      handlers.close?.(s, e);
    },
    error: handlers.error,
  };
  const raw: Bun.SocketHandler<Handshaking> = {
    open(r) {
      const m = material();
      const h: Handshaking = { conn: undefined, timer: undefined, settled: false, ready: false, first: true, mesh: m.meshCas.length > 0 };
      r.data = h;
      try {
        // `isServer` is missing from Bun's types for upgradeTLS, though the server side needs it.
        r.upgradeTLS({ tls: m.server as Bun.TLSOptions, socket: secure as unknown as Bun.SocketHandler<Handshaking>, data: h });
      } catch {
        return r.terminate(); // options are checked when loaded: not expected
      }
      h.timer = setTimeout(() => {
        if (h.settled || !h.conn) return;
        settle(h);
        h.conn.limitHit = { code: "handshake-timeout", message: `no TLS handshake within ${handshakeMs}ms` };
        h.conn.destroy();
      }, handshakeMs);
    },
    data(r, chunk) {
      // The raw side sees every byte, ciphertext included; only the first chunk says anything.
      const h = r.data;
      if (!h.first) return;
      h.first = false;
      if (chunk[0] === TLS_HANDSHAKE || h.settled) return;
      settle(h);
      if (h.conn) h.conn.limitHit = { code: "tls-required", message: "a client speaking plain TCP on a port that speaks TLS" };
      // The TLS layer has nothing to say to a client that does not speak it: tell it in its own protocol.
      r.write(encode({ type: "error", code: "tls-required", message: "this port speaks TLS: connect with TLS (a node: --tls, or --tls-ca FILE)" }));
      r.end();
    },
    close(r) {
      if (r.data) settle(r.data);
    },
    error(r) {
      r.terminate();
    },
  };
  return listenAll(host, port, raw);
}

// --- HTTP behind a connection gate ---------------------------------------------

/**
 * File descriptors one gated HTTP connection can hold: the client's socket,
 * and both ends of its unix-socket hop to the HTTP server.
 */
export const GATE_FDS_PER_CONN = 3;
/** Refused connections that may stay open at once to read their 503; past it, the next ones are closed without a word. */
export const GATE_MAX_REFUSING = 64;
/** A refused connection is closed this long after its 503 at the latest. */
const REFUSE_LINGER_MS = 1_000;
/** Unsent bytes per side of a pipe; a side only holds what one read brought in, so this is a safety bound only. */
const PIPE_QUEUE_BYTES = 4 * 1024 * 1024;

export interface GatedHttpOptions {
  /** Opens the public port: plain TCP, or TLS (which makes it HTTPS; the hop behind the gate stays local). */
  transport: Transport;
  host: string;
  port: number;
  /** Open connections in all and per source address (0 = no cap). */
  maxConns: number;
  maxConnsPerAddress: number;
  /** A request's head (request line and headers) must be complete this long after its first byte, or after connecting. */
  requestTimeoutMs: number;
  /** A connection that moves no byte in either direction this long is closed. */
  idleTimeoutMs: number;
  fetch(req: Request, srv: Bun.Server<undefined>): Response | Promise<Response>;
  error(e: Error): Response;
}

export interface GateStats {
  /** Connections admitted and open now. */
  open: number;
  /** Connections refused over a cap (answered 503, or closed when too many were being refused). */
  refused: number;
  /** Connections closed because a request head did not arrive in time. */
  requestTimeouts: number;
  /** Connections closed because nothing moved for the idle timeout. */
  idleTimeouts: number;
}

export interface GatedHttp {
  readonly port: number;
  stats(): GateStats;
  /** Stops accepting, lets what the server already wrote reach the clients (1 s at most), then closes everything. */
  stop(): Promise<void>;
}

/**
 * Serves HTTP behind a gate that counts connections, which Bun.serve cannot:
 * the public port is a byte pipe opened through `transport` (every address of
 * the host, as listenAll does) that admits each connection against
 * ConnectionCaps, answers one over a cap with a short 503 and `Connection:
 * close`, and closes connections whose request head does not arrive in time
 * or that move no byte for the idle timeout. Admitted connections are piped,
 * with backpressure both ways, to Bun.serve listening on a unix socket in a
 * private (0700) temporary directory, removed on stop. The hop behind the gate
 * is dialed at the client's first byte, so a connection that sends nothing
 * costs one descriptor, not three.
 */
export function serveGated(o: GatedHttpOptions): GatedHttp {
  removeStaleSocketDirs();
  const dir = mkdtempSync(join(tmpdir(), `${SOCKET_DIR_PREFIX}${process.pid}-`));
  const socketPath = join(dir, "http.sock");
  let server: Bun.Server<undefined>;
  let listening: Listening;
  const gate = new Gate(o, socketPath);
  try {
    // The gate keeps the time: Bun's own idle timeout (10 s) would cut a response the gate is still pacing to a
    // slow client. bun-types lists `idleTimeout` for TCP only, but Bun applies it to unix sockets too; 0 turns it off.
    const options = { unix: socketPath, fetch: o.fetch, error: o.error, idleTimeout: 0 };
    server = Bun.serve(options as unknown as Bun.Serve.Options<undefined>);
  } catch (e) {
    rmSync(dir, { recursive: true, force: true });
    throw new Error(`cannot start the HTTP server on ${socketPath}: ${(e as Error).message}`, { cause: e });
  }
  try {
    listening = o.transport.listen<GateEnd>(o.host, o.port, gate.publicSide);
  } catch (e) {
    void server.stop(true);
    rmSync(dir, { recursive: true, force: true });
    const code = (e as { code?: string }).code;
    const why = code === "EADDRINUSE" ? `HTTP port ${o.port} is already in use on ${o.host}` : `HTTP: ${(e as Error).message}`;
    throw Object.assign(new Error(why, { cause: e }), { code });
  }
  gate.start();
  let stopped: Promise<void> | undefined;
  return {
    port: listening.port,
    stats: () => gate.stats(),
    stop() {
      stopped ??= (async () => {
        for (const l of listening.listeners) l.stop(false);
        await server.stop(true);
        await gate.close(1_000);
        for (const l of listening.listeners) l.stop(true);
        rmSync(dir, { recursive: true, force: true });
      })();
      return stopped;
    },
  };
}

const SOCKET_DIR_PREFIX = "contact-registry-http-";
const STALE_DIR = new RegExp(`^${SOCKET_DIR_PREFIX}(\\d+)-`);

/**
 * A process that was killed (SIGKILL, a crash) could not remove its socket
 * directory; the next one to start removes those of this user whose process
 * is gone. The pid is in the name; a reused pid only keeps a directory longer.
 */
function removeStaleSocketDirs(): void {
  try {
    const uid = process.getuid?.();
    for (const name of readdirSync(tmpdir())) {
      const pid = Number(STALE_DIR.exec(name)?.[1]);
      if (!pid || pid === process.pid || isAlive(pid)) continue;
      const path = join(tmpdir(), name);
      if (uid === undefined || statSync(path).uid === uid) rmSync(path, { recursive: true, force: true });
    }
  } catch {
    // tidying up is best effort: never a reason not to start
  }
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as { code?: string }).code === "EPERM"; // alive, someone else's
  }
}

/** State of either side of a gated pipe. */
interface GateEnd {
  /** The other side, once both are open. */
  peer: Conn<GateEnd> | undefined;
  lastActive: number;
  /** Public side: the cap ticket, released on close. */
  ticket?: CapTicket;
  /** Public side: since when a request head has been arriving (undefined between requests). */
  headSince?: number;
  /** Public side: the last byte read was a line feed (with only CRs after it). */
  afterNewline?: boolean;
  /** Public side: bytes read before the hop to the server was open. */
  early?: Uint8Array[];
  /** Public side: when it was refused (its 503 sent). */
  refusedAt?: number;
}

class Gate {
  private readonly conns = new Set<Conn<GateEnd>>();
  private readonly refusing = new Set<Conn<GateEnd>>();
  private readonly caps: ConnectionCaps;
  private readonly counts = { refused: 0, requestTimeouts: 0, idleTimeouts: 0 };
  private sweeper: Timer | undefined;
  readonly publicSide: Bun.SocketHandler<Conn<GateEnd>>;
  private readonly serverSide: Bun.SocketHandler<Conn<GateEnd>>;

  constructor(
    private readonly o: GatedHttpOptions,
    private readonly socketPath: string,
  ) {
    this.caps = new ConnectionCaps(o.maxConnsPerAddress, o.maxConns, "status server");
    // Handlers stay synchronous and catch everything (see lineHandlers): a throw would end the process.
    const guard = <A extends unknown[]>(fn: (socket: Bun.Socket<Conn<GateEnd>>, ...a: A) => void) =>
      (socket: Bun.Socket<Conn<GateEnd>>, ...a: A) => {
        try {
          fn(socket, ...a);
        } catch {
          socket.terminate();
        }
      };
    this.publicSide = {
      open: guard((socket) => this.onOpen(socket)),
      data: guard((socket, chunk: Buffer) => this.onClientData(socket.data, chunk)),
      drain: guard((socket) => this.onDrain(socket.data)),
      close: guard((socket) => this.onClientClose(socket.data)),
      error: (socket) => socket.terminate(),
    };
    this.serverSide = {
      open: guard((socket) => {
        socket.data = new Conn<GateEnd>(socket, { peer: undefined, lastActive: performance.now() }, { maxLineBytes: 1, maxQueueBytes: PIPE_QUEUE_BYTES }, ignoreLine);
      }),
      data: guard((socket, chunk: Buffer) => this.forward(socket.data, chunk)),
      drain: guard((socket) => this.onDrain(socket.data)),
      close: guard((socket) => {
        const up = socket.data;
        if (!up) return;
        up.closed = true;
        up.state.peer?.end(); // after what the server wrote has been sent
      }),
      error: (socket) => socket.terminate(),
    };
  }

  start(): void {
    const sweepMs = Math.min(1_000, Math.max(25, Math.min(this.o.requestTimeoutMs, this.o.idleTimeoutMs) / 4));
    this.sweeper = setInterval(() => this.sweep(), sweepMs);
    this.sweeper.unref();
  }

  stats(): GateStats {
    return { open: this.caps.count, ...this.counts };
  }

  private onOpen(socket: Bun.Socket<Conn<GateEnd>>): void {
    const now = performance.now();
    const conn = new Conn<GateEnd>(socket, { peer: undefined, lastActive: now, headSince: now }, { maxLineBytes: 1, maxQueueBytes: PIPE_QUEUE_BYTES }, ignoreLine);
    socket.data = conn;
    const { refused, ticket } = this.caps.admit(conn.remoteAddress);
    conn.state.ticket = ticket;
    if (refused) return this.refuse(conn);
    this.conns.add(conn);
  }

  /** A short 503, then a half-close, reading (and dropping) the request meanwhile so the close is not a reset. */
  private refuse(conn: Conn<GateEnd>): void {
    this.counts.refused++;
    if (this.refusing.size >= GATE_MAX_REFUSING) return conn.destroy();
    conn.state.refusedAt = performance.now();
    this.refusing.add(conn);
    // Behind a TLS transport this waits in Conn's queue until the handshake is done (a write in `open` is lost there).
    conn.send(BUSY);
    if (!conn.pendingBytes) conn.socket.shutdown();
  }

  private onClientData(conn: Conn<GateEnd>, chunk: Buffer): void {
    const s = conn.state;
    if (conn.closed || s.refusedAt !== undefined) return;
    const now = performance.now();
    s.lastActive = now;
    followHeads(s, chunk, now);
    if (s.peer) return this.forward(conn, chunk);
    // First bytes: the hop to the server opens now; until it does, this side waits.
    conn.socket.pause();
    if (s.early) return void s.early.push(chunk);
    s.early = [chunk];
    Bun.connect<Conn<GateEnd>>({ unix: this.socketPath, socket: this.serverSide }).then(
      (socket) => this.link(conn, socket.data),
      () => conn.destroy(),
    );
  }

  private link(client: Conn<GateEnd>, up: Conn<GateEnd>): void {
    if (client.closed) return up.destroy();
    up.state.peer = client;
    client.state.peer = up;
    for (const chunk of client.state.early ?? []) up.send(chunk);
    client.state.early = undefined;
    if (!up.pendingBytes) client.socket.resume();
  }

  /** Passes a chunk to the other side; while that side cannot take more, this side stops reading. */
  private forward(from: Conn<GateEnd>, chunk: Buffer): void {
    const to = from.state.peer;
    if (!to || to.closed) return;
    const client = to.state.ticket ? to : from;
    client.state.lastActive = performance.now();
    to.send(chunk);
    if (to.pendingBytes) from.socket.pause();
  }

  private onDrain(conn: Conn<GateEnd>): void {
    conn.flush();
    if (conn.pendingBytes) return;
    if (conn.state.refusedAt !== undefined) return conn.socket.shutdown();
    conn.state.lastActive = performance.now();
    const peer = conn.state.peer;
    if (peer && !peer.closed) peer.socket.resume();
  }

  private onClientClose(conn: Conn<GateEnd>): void {
    if (!conn || conn.closed) return;
    conn.closed = true;
    this.conns.delete(conn);
    this.refusing.delete(conn);
    if (conn.state.ticket) this.caps.release(conn.state.ticket);
    // Nobody is left to read the answer: the server sees its client gone (an event stream ends).
    conn.state.peer?.destroy();
  }

  private sweep(): void {
    const now = performance.now();
    for (const conn of this.refusing) if (now - conn.state.refusedAt! > REFUSE_LINGER_MS) conn.destroy();
    for (const conn of this.conns) {
      const s = conn.state;
      if (s.headSince !== undefined && now - s.headSince > this.o.requestTimeoutMs) {
        this.counts.requestTimeouts++;
        close(conn);
      } else if (now - s.lastActive > this.o.idleTimeoutMs) {
        this.counts.idleTimeouts++;
        close(conn);
      }
    }
  }

  /** Waits up to `graceMs` for open connections to finish (the server has closed its side), then closes the rest. */
  async close(graceMs: number): Promise<void> {
    clearInterval(this.sweeper);
    for (const conn of this.refusing) conn.destroy();
    for (const conn of this.conns) if (!conn.state.peer) conn.destroy();
    const deadline = performance.now() + graceMs;
    while (this.conns.size && performance.now() < deadline) await Bun.sleep(10);
    for (const conn of this.conns) conn.destroy();
  }
}

/**
 * Follows request heads in what a client sends: a head is open from its first
 * byte until a blank line (CRLF CRLF, or bare LF LF). Anything after a blank
 * line opens the next one (pipelining; a body counts too, which the status
 * server never takes).
 */
function followHeads(s: GateEnd, chunk: Uint8Array, now: number): void {
  for (let i = 0; i < chunk.length; i++) {
    const b = chunk[i]!;
    if (s.headSince === undefined) s.headSince = now;
    if (b === 10) {
      if (s.afterNewline) {
        s.headSince = undefined;
        s.afterNewline = false;
      } else s.afterNewline = true;
    } else if (b !== 13) s.afterNewline = false;
  }
}

/** Closes with a FIN when nothing is left to send, else with a reset (a peer that does not read would hold an end() forever). */
function close(conn: Conn<GateEnd>): void {
  if (conn.pendingBytes) conn.destroy();
  else conn.end();
}

function ignoreLine(): void {}

const BUSY_BODY = "too many connections; retry later\n";
const BUSY = Buffer.from(
  "HTTP/1.1 503 Service Unavailable\r\n" +
    "Content-Type: text/plain; charset=utf-8\r\n" +
    `Content-Length: ${BUSY_BODY.length}\r\n` +
    "Retry-After: 5\r\n" +
    "Connection: close\r\n\r\n" +
    BUSY_BODY,
);
