/**
 * Sockets: one NDJSON connection with a write queue (Bun's `write` does not
 * buffer), the handler table that feeds it, dialing with a deadline, listening
 * on every address of a name, and the address helpers both roles share. Every
 * socket of the project is opened here.
 */
import { lookup } from "node:dns/promises";
import { mkdtempSync, readdirSync, rmSync, statSync } from "node:fs";
import { isIP } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ConnectionCaps, type Backlogged, type ByteBudget, type CapTicket } from "./limits.ts";
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
  limitHit: { code: ErrorCode; message: string } | undefined;
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
    options?: ErrorOptions,
  ) {
    super(message, options);
  }
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
      const socket = await connectWithTimeout(addr, port, handlers, left);
      return socket.data;
    } catch (e) {
      last = e;
    }
  }
  const code = (last as { code?: string } | undefined)?.code ?? "ETIMEDOUT";
  const why = last ? (last as Error).message : "timed out";
  throw new DialError(`cannot connect to ${formatAddress(host, port)}: ${why} (${code})`, code, { cause: last });
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
export function listenAll<S>(
  host: string,
  port: number,
  socket: Bun.SocketHandler<Conn<S>>,
): { listeners: Bun.TCPSocketListener<Conn<S>>[]; port: number } {
  const h = normalizeHost(host);
  const listen = (hostname: string, p: number) => {
    try {
      return Bun.listen<Conn<S>>({ hostname, port: p, socket });
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
  listen<S>(host: string, port: number, handlers: Bun.SocketHandler<Conn<S>>): Listening<S>;
  /** Connects with a deadline to each address `host` resolves to in turn (see dial). */
  dial<S>(host: string, port: number, handlers: Bun.SocketHandler<Conn<S>>, timeoutMs: number): Promise<Conn<S>>;
}

export interface Listening<S> {
  listeners: Bun.TCPSocketListener<Conn<S>>[];
  port: number;
}

/** Plain TCP. */
export const tcp: Transport = { listen: listenAll, dial };

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
  let listening: Listening<GateEnd>;
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
    // A TLS transport will have to send this after its handshake instead (a write in `open` can be lost there).
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
