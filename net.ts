/**
 * Sockets: one NDJSON connection with a write queue (Bun's `write` does not
 * buffer), the handler table that feeds it, dialing with a deadline, listening
 * on every address of a name, and the address helpers both roles share. Every
 * socket of the project is opened through a Transport: plain TCP here, TLS
 * in tls.ts; gate.ts puts HTTP behind one.
 */
import { lookup } from "node:dns/promises";
import { isIP } from "node:net";
import type { Backlogged, ByteBudget } from "./limits.ts";
import { DEFAULTS, LineSplitter, encode, type ErrorCode, type Message } from "./protocol.ts";

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
  /** Called for every chunk read, before its lines are handled (which a hold may put off). */
  received?(conn: Conn<S>, chunk: Uint8Array): void;
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
      hooks.received?.(conn, chunk);
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
export async function dialEach<S>(
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
    // A late success is closed unseen: the role's hooks ran `open` on it, but its dial has failed and
    // nothing awaits it, so its close must not reach them. A late failure is swallowed.
    p.then(
      (s) => {
        s.data.closed = true;
        s.terminate();
      },
      () => {},
    );
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
export const TLS_HANDSHAKE = 0x16;

/** Plain TCP listening; a TLS client is told, in plain text, that this port does not speak TLS. */
export function listenPlain<S>(host: string, port: number, handlers: Bun.SocketHandler<Conn<S>>): Listening {
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

/** Who the other end of a connection proved to be with its certificate. */
export interface PeerIdentity {
  /** The node id the certificate names (`nodeIdOf`); undefined for a certificate that names none, like the registry's. */
  node: string | undefined;
  /** The certificate's subject, for messages. */
  subject: string;
}
