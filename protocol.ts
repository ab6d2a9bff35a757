/**
 * The wire protocol shared by registry.ts and client.ts: message schemas and
 * the types inferred from them, error codes, limits and defaults, and NDJSON
 * framing. docs/PROTOCOL.md is the normative description; this file is the
 * one implementation of it. No sockets, no command line, no logging: net.ts
 * carries these lines, cli.ts reads settings and prints.
 */
import * as v from "valibot";
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
  /** Half the total: one address cannot take every slot, and a whole host of nodes greeting at once still fits. */
  maxInboundPerAddress: 256,
  /** A node's connect to its registry, the TLS handshake included; then it retries with backoff. */
  connectTimeoutMs: 3_000,
  /** Reconnect backoff to the registry: full jitter between 0 and min(cap, base*2^n). */
  reconnectBaseMs: 100,
  reconnectMaxMs: 2_000,
  /** Unsent bytes one connection may hold before it is dropped as a slow consumer. */
  maxQueueBytes: 32 * 1024 * 1024,
  /** Unsent bytes all the registry's connections may hold together. */
  maxQueueTotalBytes: 256 * 1024 * 1024,
  /** Rate limits, per second with bursts of ten seconds' worth: far above what a node sends (a ping per heartbeat, a sync per gap, receipts per greeting round). */
  rateSessionLines: 100,
  rateAddressLines: 2_000,
  rateSessionSyncs: 1,
  rateAddressProbes: 100,
  rateAddressLists: 10,
  /** Failed tokens per source address per minute before its registrations and list requests are refused for a while. */
  authFailuresPerMinute: 10,
  /** A TLS handshake must be over this long after the TCP connect: Bun sets no deadline of its own. */
  handshakeTimeoutMs: 3_000,
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

/** Every error code; stable across versions. All but `slow-consumer` (the peer is not reading) and the two handshake ones (no TLS to send them over) are sent on the wire. */
export const ErrorCode = v.picklist([
  "bad-json", // the line is not JSON
  "bad-message", // JSON, but not a valid message (schema)
  "line-too-long", // a line over the size limit; the connection is closed
  "unsupported-version", // `v` is not a version we speak
  "unexpected-message", // a valid message at the wrong point of the session
  "unauthorized", // missing or wrong token
  "address-not-allowed", // advertised host is not the one the node connects from
  "unreachable", // the probe's port refused, or answered as someone else
  "unavailable", // the probe got no answer in time (silence, loss, load on either side): retry later
  "registry-full", // max nodes reached
  "too-many-connections", // connection caps (per source address, in all)
  "registration-timeout", // no `register` in time
  "heartbeat-timeout", // no traffic for the heartbeat bound
  "replaced", // the same node id, or another id at the same address, registered on another connection
  "wrong-node", // a probe reached a node with another id
  "shutting-down", // the registry is stopping
  "slow-consumer", // too many unsent bytes queued for this connection
  "rate-limited", // more requests than the rate limits allow; retry later
  "id-in-use", // a live node holds this id or address
  "tls-required", // a plain-text client on a TLS port (sent in plain text)
  "tls-unsupported", // a TLS client on a plain port (sent in plain text, which the client reads as a broken record)
  "handshake-timeout", // the TLS handshake did not finish in time; never sent
  "handshake-failed", // the TLS handshake failed; never sent
  "certificate-required", // mutual TLS: the client presented no certificate
  "bad-certificate", // mutual TLS: the client's certificate is not signed by the mesh CA, or out of its dates
  "identity-mismatch", // the id in `register` or `hello` is not the one the connection's certificate names
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
export type Register = v.InferOutput<typeof Register>;
export const Ping = v.object({ type: v.literal("ping") });
export const Leave = v.object({ type: v.literal("leave") });
export const Sync = v.object({ type: v.literal("sync") });
export const Receipt = v.object({ type: v.literal("receipt"), ids: v.pipe(v.array(Id), v.maxLength(1024)) });
/** A read-only request: the list, as a `snapshot`, without registering. */
export const List = v.object({ type: v.literal("list"), v: Version, token: v.optional(v.pipe(v.string(), v.maxLength(1024))) });

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
export const ToRegistry = v.variant("type", [Register, Ping, Leave, Sync, Receipt, List]);
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

/**
 * Parses one line against a schema, or says precisely what is wrong with it.
 * With `quote` false the message names the field and what it expects but
 * quotes nothing of the line: a line may hold a secret (the token) that no
 * error, nor any log of it, may repeat.
 */
export function decode<S extends v.GenericSchema>(schema: S, line: string, quote = true): Decoded<v.InferOutput<S>> {
  let raw: unknown;
  try {
    raw = JSON.parse(line);
  } catch (e) {
    const why = (e as Error).message;
    // The parser quotes what it choked on in double quotes ('Unexpected identifier "abc"').
    return { ok: false, code: "bad-json", message: `invalid JSON: ${quote ? why : why.replace(/ *"[^"]*"/g, "")}` };
  }
  const r = v.safeParse(schema, raw);
  if (r.success) return { ok: true, msg: r.output };
  const issue = r.issues[0];
  const path = issue.path?.map((p) => String(p.key)).join(".");
  // valibot's messages end "but received <the value>".
  const why = quote ? issue.message : issue.message.replace(/ but received [\s\S]*$/, "");
  return { ok: false, code: "bad-message", message: clip(path ? `${path}: ${why}` : why) };
}

/** Longest error text: a message quotes what it got (valibot does), and a 16 KiB field must not come back as a 16 KiB error. */
const MAX_MESSAGE = 300;

function clip(text: string): string {
  return text.length <= MAX_MESSAGE ? text : `${text.slice(0, MAX_MESSAGE - 1)}…`;
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
  /** While held, input is kept unread here, in order (see `hold`). */
  private held: Uint8Array[] = [];
  private onHold = false;
  private static readonly decoder = new TextDecoder();

  constructor(
    private readonly maxLineBytes: number,
    private readonly onLine: (line: string) => void,
    private readonly onOverflow: () => void,
  ) {}

  /** True when nothing is buffered or held: the next chunk starts a line. */
  get idle(): boolean {
    return this.parts.length === 0 && !this.overflowed && !this.onHold && this.held.length === 0;
  }

  /** Feeds one chunk; returns false once the stream has overflowed (drop the rest). */
  push(chunk: Uint8Array): boolean {
    if (this.overflowed) return false;
    if (this.onHold) {
      this.held.push(chunk.slice());
      return true;
    }
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
      if (this.onHold) {
        // Ahead of anything held before: release() feeds held chunks back one by one.
        if (start < chunk.byteLength) this.held.unshift(chunk.slice(start));
        return true;
      }
    }
    if (start < chunk.byteLength) {
      const rest = chunk.subarray(start);
      this.partBytes += rest.byteLength;
      if (this.partBytes > this.maxLineBytes + 1) return this.overflow();
      this.parts.push(rest.slice()); // the chunk's memory is not ours to keep
    }
    return true;
  }

  /** True between `hold` and `release`. */
  get holding(): boolean {
    return this.onHold;
  }

  /** Stops emitting lines after the current one; what follows is kept, unread, until `release`. */
  hold(): void {
    this.onHold = true;
  }

  /** Emits what was held, in order, until done or held again; returns false if that overflowed. */
  release(): boolean {
    this.onHold = false;
    while (!this.onHold && this.held.length) {
      if (!this.push(this.held.shift()!)) return false;
    }
    return true;
  }

  private overflow(): false {
    this.overflowed = true;
    this.parts = [];
    this.partBytes = 0;
    this.held = [];
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

/** Longest delay a timer can hold; larger ones fire at once, so timer flags stop there. */
export const MAX_TIMER_MS = 2 ** 31 - 1;

/** Random id: 16 hex chars from crypto. */
export function randomId(): string {
  return crypto.randomUUID().replace(/-/g, "").slice(0, 16);
}
