/**
 * HTTP behind a connection gate: Bun.serve cannot cap or refuse connections,
 * so the public port is a Transport listener that counts them (per source
 * address and in all), refuses the excess with a 503, keeps deadlines on
 * request heads and idle connections, and pipes the rest, with backpressure,
 * to Bun.serve on a private unix socket.
 */
import { mkdtempSync, readdirSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ConnectionCaps, type CapTicket } from "./limits.ts";
import { Conn, type Listening, type Transport } from "./net.ts";
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
