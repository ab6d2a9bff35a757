/**
 * The wire protocol shared by registry.ts and client.ts: message schemas, error
 * codes, limits, NDJSON framing and a backpressure-safe connection over Bun's
 * TCP sockets. docs/PROTOCOL.md is the normative description; this file is the
 * one implementation of it. Nothing here listens: the scripts do that.
 */
import * as v from "valibot";
import { lookup } from "node:dns/promises";
import { isIP } from "node:net";
import { createConsola, type ConsolaInstance } from "consola";

/** Protocol version carried by every opening message (`register`, `hello`, `probe`). */
export const PROTOCOL_VERSION = 1;

/** Defaults for every limit and timer; most have a flag and an env var (README, docs/PROTOCOL.md list which). */
export const DEFAULTS = {
  registryPort: 8080,
  /** Longest line the registry or a node's listener accepts, in bytes (newline excluded). */
  maxLineBytes: 16 * 1024,
  /** Longest line a node accepts from its registry: a `registered` reply lists every node. */
  maxReplyBytes: 64 * 1024 * 1024,
  /** A node pings this often; the registry states it in `registered`. */
  heartbeatMs: 2_000,
  /** Missed beats after which either side gives the other up. */
  heartbeatMisses: 3,
  /** A new connection must complete `register` within this time, whatever it sends. */
  registerTimeoutMs: 5_000,
  /** Dial-back check of a registering node's address. */
  probeTimeoutMs: 1_000,
  maxNodes: 50_000,
  /** Open connections the registry accepts in all, registered or not. */
  maxConns: 60_000,
  maxConnsPerAddress: 1_024,
  /** Greeting dials: connect + reply deadline, parallel dials, extra attempts. */
  greetTimeoutMs: 2_000,
  greetConcurrency: 64,
  greetRetries: 2,
  /** A peer connection to a node's listener must finish within this time. */
  inboundTimeoutMs: 5_000,
  maxInboundConns: 512,
  /** Reconnect backoff to the registry: full jitter between 0 and min(cap, base*2^n). */
  reconnectBaseMs: 100,
  reconnectMaxMs: 2_000,
  /** Unsent bytes one connection may hold before it is dropped as a slow consumer. */
  maxQueueBytes: 32 * 1024 * 1024,
} as const;

// --- schemas -----------------------------------------------------------------

const Id = v.pipe(v.string(), v.regex(/^[A-Za-z0-9._:-]{1,64}$/, "must be 1-64 of A-Z a-z 0-9 . _ : -"));
// Control characters would let a name forge lines or escape sequences in people's logs.
const Name = v.pipe(v.string(), v.maxLength(64), v.regex(/^[^\p{Cc}]*$/u, "must not contain control characters"));
const Host = v.pipe(v.string(), v.minLength(1), v.maxLength(253));
const Port = v.pipe(v.number(), v.integer(), v.minValue(1), v.maxValue(65535));
const Version = v.pipe(v.number(), v.integer());
const Seq = v.pipe(v.number(), v.integer(), v.minValue(0));

/** A node as the registry lists it. */
export const Peer = v.object({ id: Id, host: Host, port: Port, name: v.optional(Name) });
export type Peer = v.InferOutput<typeof Peer>;

/** Why a node left the list. */
export const LeaveReason = v.picklist(["closed", "timeout", "leave", "replaced"]);
export type LeaveReason = v.InferOutput<typeof LeaveReason>;

/** Every error code; stable across versions. All but `slow-consumer` (the peer is not reading) are sent on the wire. */
export const ErrorCode = v.picklist([
  "bad-json", // the line is not JSON
  "bad-message", // JSON, but not a valid message (schema)
  "line-too-long", // a line over the size limit; the connection is closed
  "unsupported-version", // `v` is not a version we speak
  "unexpected-message", // a valid message at the wrong point of the session
  "unauthorized", // missing or wrong token
  "address-not-allowed", // advertised host is not the one the node connects from
  "unreachable", // the registry could not dial the node back
  "registry-full", // max nodes reached
  "too-many-connections", // connection caps (per source address, in all)
  "registration-timeout", // no `register` in time
  "heartbeat-timeout", // no traffic for the heartbeat bound
  "replaced", // the same node id, or another id at the same address, registered on another connection
  "wrong-node", // a probe reached a node with another id
  "shutting-down", // the registry is stopping
  "slow-consumer", // too many unsent bytes queued for this connection
]);
export type ErrorCode = v.InferOutput<typeof ErrorCode>;

// node -> registry
export const Register = v.object({
  type: v.literal("register"),
  v: Version,
  id: Id,
  port: Port,
  host: v.optional(Host),
  name: v.optional(Name),
  token: v.optional(v.pipe(v.string(), v.maxLength(1024))),
});
export const Ping = v.object({ type: v.literal("ping") });
export const Leave = v.object({ type: v.literal("leave") });
export const Sync = v.object({ type: v.literal("sync") });
export const Receipt = v.object({ type: v.literal("receipt"), ids: v.pipe(v.array(Id), v.maxLength(1024)) });

// registry -> node
export const Registered = v.object({
  type: v.literal("registered"),
  v: Version,
  boot: Id,
  seq: Seq,
  heartbeat: v.pipe(v.number(), v.integer(), v.minValue(1)),
  timeout: v.pipe(v.number(), v.integer(), v.minValue(1)),
  self: Peer,
  peers: v.array(Peer),
});
export const Joined = v.object({ type: v.literal("joined"), seq: Seq, peer: Peer });
export const Left = v.object({ type: v.literal("left"), seq: Seq, id: Id, reason: LeaveReason });
export const Snapshot = v.object({ type: v.literal("snapshot"), boot: Id, seq: Seq, peers: v.array(Peer) });
export const Pong = v.object({ type: v.literal("pong") });

// node <-> node (and the registry's probe, on a node's listener)
export const Hello = v.object({ type: v.literal("hello"), v: Version, id: Id, host: Host, port: Port, name: v.optional(Name) });
export const Welcome = v.object({ type: v.literal("welcome"), v: Version, id: Id, name: v.optional(Name) });
export const Probe = v.object({ type: v.literal("probe"), v: Version, id: Id, nonce: Id });
export const ProbeOk = v.object({ type: v.literal("probe-ok"), id: Id, nonce: Id });

// either direction
export const ErrorMessage = v.object({ type: v.literal("error"), code: ErrorCode, message: v.string() });

/** What a registry accepts on a session. */
export const ToRegistry = v.variant("type", [Register, Ping, Leave, Sync, Receipt]);
export type ToRegistry = v.InferOutput<typeof ToRegistry>;
/** What a node accepts on its registry session. */
export const FromRegistry = v.variant("type", [Registered, Joined, Left, Snapshot, Pong, ErrorMessage]);
export type FromRegistry = v.InferOutput<typeof FromRegistry>;
/** What a node's listener accepts. */
export const ToListener = v.variant("type", [Hello, Probe]);
export type ToListener = v.InferOutput<typeof ToListener>;
/** What a greeter (or the registry's prober) accepts back from a listener. */
export const FromListener = v.variant("type", [Welcome, ProbeOk, ErrorMessage]);
export type FromListener = v.InferOutput<typeof FromListener>;

export type Message = ToRegistry | FromRegistry | ToListener | FromListener;

/** A ping encoded once: the registry matches it byte for byte before parsing anything. */
export const PING_LINE = '{"type":"ping"}';
export const PONG_LINE = '{"type":"pong"}\n';

/** One NDJSON line for a message. */
export function encode(msg: Message): string {
  return JSON.stringify(msg) + "\n";
}

export type Decoded<T> = { ok: true; msg: T } | { ok: false; code: ErrorCode; message: string };

/** Parses one line against a schema, or says precisely what is wrong with it. */
export function decode<S extends v.GenericSchema>(schema: S, line: string): Decoded<v.InferOutput<S>> {
  let raw: unknown;
  try {
    raw = JSON.parse(line);
  } catch (e) {
    return { ok: false, code: "bad-json", message: `invalid JSON: ${(e as Error).message}` };
  }
  const r = v.safeParse(schema, raw);
  if (r.success) return { ok: true, msg: r.output };
  const issue = r.issues[0];
  const path = issue.path?.map((p) => String(p.key)).join(".");
  return { ok: false, code: "bad-message", message: path ? `${path}: ${issue.message}` : issue.message };
}

// --- framing -----------------------------------------------------------------

/**
 * Splits a TCP byte stream into lines. Splitting happens on the byte 0x0A,
 * which never occurs inside a multi-byte UTF-8 sequence, and a line is decoded
 * only once it is whole, so characters split across chunks survive. A partial
 * line longer than the limit is reported as soon as it grows past it, so a
 * peer that never sends a newline cannot make us buffer without bound.
 */
export class LineSplitter {
  private parts: Uint8Array[] = [];
  private partBytes = 0;
  /** Once over the limit the stream is out of sync: no later byte can be trusted to start a line. */
  private overflowed = false;
  private static readonly decoder = new TextDecoder();

  constructor(
    private readonly maxLineBytes: number,
    private readonly onLine: (line: string) => void,
    private readonly onOverflow: () => void,
  ) {}

  /** True when nothing is buffered: the next chunk starts a line. */
  get idle(): boolean {
    return this.parts.length === 0 && !this.overflowed;
  }

  /** Feeds one chunk; returns false once the stream has overflowed (drop the rest). */
  push(chunk: Uint8Array): boolean {
    if (this.overflowed) return false;
    let start = 0;
    for (;;) {
      const nl = chunk.indexOf(10, start);
      if (nl < 0) break;
      let bytes = chunk.subarray(start, nl);
      if (this.parts.length) {
        this.parts.push(bytes);
        bytes = concat(this.parts, this.partBytes + bytes.byteLength);
        this.parts = [];
        this.partBytes = 0;
      }
      start = nl + 1;
      let end = bytes.byteLength;
      if (end && bytes[end - 1] === 13) end--; // tolerate CRLF
      if (end > this.maxLineBytes) return this.overflow(); // the CR, like the LF, is not part of the line
      if (end) this.onLine(LineSplitter.decoder.decode(bytes.subarray(0, end)));
    }
    if (start < chunk.byteLength) {
      const rest = chunk.subarray(start);
      this.partBytes += rest.byteLength;
      if (this.partBytes > this.maxLineBytes + 1) return this.overflow();
      this.parts.push(rest.slice()); // the chunk's memory is not ours to keep
    }
    return true;
  }

  private overflow(): false {
    this.overflowed = true;
    this.parts = [];
    this.partBytes = 0;
    this.onOverflow();
    return false;
  }
}

function concat(parts: Uint8Array[], total: number): Uint8Array {
  const out = new Uint8Array(total);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.byteLength;
  }
  return out;
}

// --- connections -------------------------------------------------------------

const encoder = new TextEncoder();

/**
 * One TCP connection speaking NDJSON. Bun's `write` sends what the kernel takes
 * and drops the rest, so unsent bytes are queued here and flushed on `drain`;
 * once anything is queued, everything after it queues too, to keep order.
 */
export class Conn<S = unknown> {
  /** Remote address with IPv4-mapped IPv6 normalised; copied at open because Bun clears it at close. */
  readonly remoteAddress: string;
  readonly remotePort: number;
  closed = false;
  /** Role-specific session state. */
  state: S;
  private queue: Uint8Array[] = [];
  private queuedBytes = 0;
  private ending = false;
  readonly splitter: LineSplitter;
  /** Set when this layer itself ends the connection over a limit, so the owner can report it on close. */
  limitHit: { code: ErrorCode; message: string } | undefined;

  constructor(
    readonly socket: Bun.Socket<Conn<S>>,
    state: S,
    maxLineBytes: number,
    onLine: (conn: Conn<S>, line: string) => void,
    private readonly maxQueueBytes: number = DEFAULTS.maxQueueBytes,
  ) {
    this.remoteAddress = normalizeHost(socket.remoteAddress ?? "");
    this.remotePort = socket.remotePort ?? 0;
    this.state = state;
    this.splitter = new LineSplitter(
      maxLineBytes,
      (line) => onLine(this, line),
      () => {
        this.limitHit = { code: "line-too-long", message: `line exceeds ${maxLineBytes} bytes` };
        this.fail(this.limitHit.code, this.limitHit.message);
      },
    );
  }

  /** Sends a message (or pre-encoded lines). Returns false if the connection is gone. */
  send(msg: Message | string | Uint8Array): boolean {
    if (this.closed || this.ending) return false;
    const data = typeof msg === "object" && !(msg instanceof Uint8Array) ? encode(msg) : msg;
    if (this.queue.length) return this.enqueue(typeof data === "string" ? encoder.encode(data) : data);
    const n = this.socket.write(data);
    if (n < 0) return false;
    const len = typeof data === "string" ? Buffer.byteLength(data) : data.byteLength;
    if (n < len) return this.enqueue((typeof data === "string" ? encoder.encode(data) : data).subarray(n));
    return true;
  }

  /** Bytes waiting for the kernel. */
  get pendingBytes(): number {
    return this.queuedBytes;
  }

  /** The `drain` handler: writes what was queued, then finishes a pending end(). */
  flush(): void {
    while (this.queue.length) {
      const head = this.queue[0]!;
      const n = this.socket.write(head);
      if (n < 0) return;
      if (n < head.byteLength) {
        this.queue[0] = head.subarray(n);
        this.queuedBytes -= n;
        return;
      }
      this.queue.shift();
      this.queuedBytes -= head.byteLength;
    }
    if (this.ending) this.socket.end();
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
    if (!this.closed) this.socket.terminate();
  }

  private enqueue(bytes: Uint8Array): boolean {
    this.queue.push(bytes);
    this.queuedBytes += bytes.byteLength;
    if (this.queuedBytes > this.maxQueueBytes) {
      this.limitHit = { code: "slow-consumer", message: `over ${this.maxQueueBytes} bytes unsent: the peer does not read` };
      this.queue = [];
      this.queuedBytes = 0;
      this.destroy();
      return false;
    }
    return true;
  }
}

export interface ConnHooks<S> {
  /** Fresh state for each socket (Bun shares a listener's `data` object between sockets). */
  state(socket: Bun.Socket<Conn<S>>): S;
  maxLineBytes: number;
  /** Unsent bytes allowed before the connection is dropped (default DEFAULTS.maxQueueBytes). */
  maxQueueBytes?: number;
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
      const conn = new Conn<S>(socket, undefined as S, hooks.maxLineBytes, (c, line) => {
        try {
          hooks.line(c, line);
        } catch (e) {
          c.fail("bad-message", `internal error: ${(e as Error).message}`);
        }
      }, hooks.maxQueueBytes);
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
      conn.splitter.push(chunk);
    },
    drain(socket) {
      socket.data.flush();
    },
    close(socket, error) {
      const conn = socket.data;
      if (!conn || conn.closed) return;
      conn.closed = true;
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

/** `host:port`, with brackets around IPv6. */
export function formatAddress(host: string, port: number): string {
  return isIP(host) === 6 ? `[${host}]:${port}` : `${host}:${port}`;
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

// --- output ------------------------------------------------------------------

/** An event as the scripts print it with --json (plus `time`). */
export type EventRecord = { event: string } & Record<string, unknown>;

/**
 * Turns a role's events into output: with `json`, one JSON object per line on
 * stdout (`event`, `time`, fields); otherwise readable consola lines from
 * `describe`. Errors always go to stderr in human mode.
 */
export function createPrinter(
  tag: string,
  json: boolean,
  describe: (e: EventRecord) => string,
): (e: EventRecord) => void {
  if (json) {
    return (e) => {
      const { event, ...rest } = e;
      process.stdout.write(JSON.stringify({ event, time: new Date().toISOString(), ...rest }) + "\n");
    };
  }
  const log: ConsolaInstance = createConsola({ level: process.env.CONSOLA_LEVEL ? Number(process.env.CONSOLA_LEVEL) : 3 }).withTag(tag);
  return (e) => {
    const text = describe(e);
    if (e.event === "error" || e.event === "greet-failed") log.warn(text);
    else if (e.event === "listening" || e.event === "registered") log.success(text);
    else log.info(text);
  };
}

/** Longest delay a timer can hold; larger ones fire at once, so timer flags stop there. */
export const MAX_TIMER_MS = 2 ** 31 - 1;

/**
 * Both scripts read every setting the same way: the flag wins, then its
 * environment variable, then the caller's default.
 */
export function settingsFrom<K extends string>(args: Partial<Record<K, unknown>>) {
  // Empty means unset: compose writes `VAR=` for "not given".
  const env = (name: string) => process.env[name] || undefined;
  const text = (key: K, envName: string): string | undefined => {
    const v = args[key];
    return v === undefined || v === "" ? env(envName) : String(v);
  };
  return {
    text,
    /** A whole number within [min, max], or a usage error naming the flag. */
    int: (key: K, envName: string, min = 0, max?: number): number | undefined => {
      const v = text(key, envName);
      return v === undefined ? undefined : intArg(key, v, min, max);
    },
    /** A switch: `--flag` / `--no-flag` if given, else its variable (1 or 0), else the default. */
    on: (key: K, envName: string, fallback = false): boolean => {
      const v = args[key];
      if (typeof v === "boolean") return v;
      const e = env(envName);
      return e === "1" ? true : e === "0" ? false : fallback;
    },
  };
}

/** A citty argument value as a non-negative integer, or a usage error. */
export function intArg(name: string, value: unknown, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  const text = String(value ?? "").trim();
  if (!/^\d+$/.test(text) || Number(text) < min || Number(text) > max || !Number.isSafeInteger(Number(text))) {
    const range = max === Number.MAX_SAFE_INTEGER ? `>= ${min}` : `from ${min} to ${max}`;
    throw new UsageError(`--${name} must be an integer ${range}, got "${String(value)}"`);
  }
  return Number(text);
}

/**
 * citty ignores flags it does not know; a mistyped `--tokn` silently dropping
 * the token is worse than refusing to start, so unknown flags are usage errors.
 */
export function checkFlags(rawArgs: string[], known: Record<string, { type?: string }>): void {
  for (const arg of rawArgs) {
    if (arg === "--") break;
    if (!arg.startsWith("-") || /^-\d/.test(arg)) continue;
    const name = arg.replace(/^--?/, "").split("=")[0]!;
    const def = known[name] ?? (name.startsWith("no-") ? known[name.slice(3)] : undefined);
    if (!def || def.type === "positional") throw new UsageError(`unknown option ${arg.split("=")[0]}`);
  }
}

/** A bad command line: the scripts print it and exit 2. */
export class UsageError extends Error {
  override name = "UsageError";
}

/** Runs a script's start function; a UsageError exits 2 with its message, anything else exits 1. */
export async function runCli(fn: () => Promise<void>): Promise<void> {
  try {
    await fn();
  } catch (e) {
    const usage = e instanceof UsageError;
    process.stderr.write(`${usage ? "usage error" : "error"}: ${(e as Error).message}\n`);
    if (usage) process.stderr.write("run with --help for usage\n");
    process.exit(usage ? 2 : 1);
  }
}

/** Random id: 16 hex chars from crypto. */
export function randomId(): string {
  return crypto.randomUUID().replace(/-/g, "").slice(0, 16);
}
