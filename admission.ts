/**
 * Admission: who may register, and under which address. The checks run in
 * the order docs/PROTOCOL.md gives (version, identity, token, host, capacity, probe);
 * the first that fails is the answer. Then it decides which registrations a
 * newcomer may replace: never a live one (the identity rule).
 */
import { createHash, timingSafeEqual } from "node:crypto";
import { BucketMap } from "./limits.ts";
import { addressOf, type Member, type Membership } from "./membership.ts";
import { canonicalIp, formatAddress, ipScope, lineHandlers, normalizeHost, resolveWithin, type Conn, type PeerIdentity, type Transport } from "./net.ts";
import { identityMismatch } from "./tls.ts";
import { DEFAULTS, FromListener, PROTOCOL_VERSION, decode, randomId, type ErrorCode, type Register } from "./protocol.ts";

export interface AdmissionSettings {
  /** Shared secret nodes must present. */
  token?: string;
  /** Accept advertised hosts other than the connection's source. */
  allowAdvertise: boolean;
  maxNodes: number;
  /** Dial each registering node back before listing it. */
  probe: boolean;
  probeTimeoutMs: number;
  /** Probes per second one source address may cause (0 = no limit). */
  rateAddressProbes: number;
  /** Failed tokens one source address may send per minute (0 = no limit). */
  authFailuresPerMinute: number;
}

/** `detail` is for the registry's own log only: what a refused client is told stays the same whatever went wrong. */
export type Refusal = { ok: false; code: ErrorCode; message: string; detail?: string };
/** Where the node will be listed, or why not. */
export type Verdict = { ok: true; host: string } | Refusal;
/** A listed registration's session as its registry sees it. */
export type Holding = "gone" | "silent" | "live";

export class Admission {
  /** Tokens refused, and registrations refused because their address guessed too often. */
  readonly tokens = { failed: 0, blocked: 0 };
  private readonly tokenDigest: Buffer | undefined;
  private readonly probes: BucketMap;
  private readonly authFailures: BucketMap;

  constructor(
    private readonly s: AdmissionSettings,
    private readonly membership: Membership,
    private readonly transport: Transport,
    now: () => number = () => performance.now(),
  ) {
    this.tokenDigest = s.token ? sha256(s.token) : undefined;
    this.probes = new BucketMap({ perSecond: s.rateAddressProbes, burst: 10 * s.rateAddressProbes }, now);
    const perMinute = s.authFailuresPerMinute;
    this.authFailures = new BucketMap({ perSecond: perMinute / 60, burst: perMinute }, now);
  }

  /**
   * Checks a `register` from `source`, made on a connection whose client
   * certificate proved `peer` (mutual TLS); resolves to the host to list it
   * under, or a refusal.
   */
  async check(msg: Register, source: string, peer?: PeerIdentity): Promise<Verdict> {
    if (msg.v !== PROTOCOL_VERSION) {
      return refuse("unsupported-version", `protocol version ${msg.v} is not supported; this registry speaks ${PROTOCOL_VERSION}`);
    }
    if (peer && peer.node !== msg.id) return refuse("identity-mismatch", identityMismatch(msg.id, peer));
    const auth = this.authorize(msg.token, source);
    if (auth) return auth;
    const host = msg.host === undefined ? source : await this.advertised(msg.host, source);
    if (typeof host !== "string") return host;
    const address = formatAddress(host, msg.port);
    const known = this.membership.get(msg.id) ?? this.membership.at(address);
    if (!known && this.membership.size >= this.s.maxNodes) {
      return refuse("registry-full", `registry holds its maximum of ${this.s.maxNodes} nodes`);
    }
    if (this.s.probe) {
      const failed = await this.probeFor(source, host, msg.port, msg.id);
      if (failed) return failed;
    }
    return { ok: true, host };
  }

  /**
   * The registrations a newcomer may replace: whatever holds its id (the node
   * registering again) or its address (a node restarted on the same port),
   * provided that registration's session is gone or silent, or its address
   * refuses the probe or answers as someone else. A live, answering holder
   * keeps its place: `id-in-use`. When that cannot be told (the probe got no
   * answer, or a busy one; the holder is at the newcomer's own address),
   * `unavailable`: once the holder misses a beat, a retry gets in.
   */
  async replaceable(member: Member, holding: (m: Member) => Holding | Promise<Holding>, source: string): Promise<Member[] | Refusal> {
    const byId = this.membership.get(member.id);
    const byAddress = this.membership.at(addressOf(member));
    const out: Member[] = [];
    for (const holder of byAddress && byAddress !== byId ? [byId, byAddress] : [byId]) {
      if (!holder) continue;
      if ((await holding(holder)) === "live") {
        const taken = holder.id === member.id ? `node ${holder.id} is registered and alive at ${addressOf(holder)}` : `${addressOf(holder)} is held by live node ${holder.id}`;
        // The same id at the same address: the node restarted while its old session lingers (a host
        // that froze mid-crash), or someone else claims it. A probe would reach whoever listens there
        // now, and tell the two apart no better; the old session's next missed beat will.
        if (holder.id === member.id && addressOf(holder) === addressOf(member)) {
          return refuse("unavailable", `${taken} on a session that has not lapsed; if that node has just restarted, retry after a heartbeat`);
        }
        if (!this.s.probe) return refuse("id-in-use", taken);
        // Alive by its heartbeats, but a crashed host's session can linger: does its address still answer as it?
        const gone = await this.probeFor(source, holder.host, holder.port, holder.id);
        if (!gone) return refuse("id-in-use", taken);
        if (gone.code === "rate-limited") return gone;
        // Only a refusal or another answer shows it gone. Silence or a full listener may be load,
        // or someone holding the holder's listener busy to take its place.
        if (gone.code === "unavailable") return refuse("unavailable", `${taken}, as far as can be told now; retry in a few seconds`);
      }
      out.push(holder);
    }
    return out;
  }

  /**
   * Whether a refusal may quote a client's line (a field's value, what the
   * parser choked on): not with a token, which the line may hold. Cutting the
   * quote always, rather than the token where it occurs, tells a client
   * nothing about the token and garbles no message.
   */
  get quoteLines(): boolean {
    return !this.tokenDigest;
  }

  /** Forgets the rate-limit buckets that have refilled; call now and then. */
  sweep(): void {
    this.probes.sweep();
    this.authFailures.sweep();
  }

  /** Token check, with guesses throttled per source address: undefined if `token` may pass. */
  authorize(token: string | undefined, source: string): Refusal | undefined {
    if (!this.tokenDigest) return undefined;
    const waitMs = this.authFailures.waitMs(source);
    if (waitMs > 0) {
      this.tokens.blocked++;
      return refuse("rate-limited", `too many wrong tokens from ${source}; retry in ${Math.ceil(waitMs / 1000)} s`);
    }
    if (token !== undefined && timingSafeEqual(sha256(token), this.tokenDigest)) return undefined;
    this.tokens.failed++;
    this.authFailures.take(source);
    return refuse("unauthorized", token === undefined ? "this registry requires a token" : "wrong token");
  }

  /** The host a node advertises, if it may use it. */
  private async advertised(host: string, source: string): Promise<string | Refusal> {
    const wanted = canonicalIp(host) ?? normalizeHost(host);
    const addresses = canonicalIp(wanted) ? [wanted] : await resolveWithin(wanted, this.s.probeTimeoutMs);
    if (addresses.some((a) => ipScope(a) === "unspecified")) {
      return refuse("address-not-allowed", `cannot advertise ${host}: it is the unspecified address, which names no host in particular`);
    }
    if (!this.s.allowAdvertise && wanted !== source && !addresses.includes(source)) {
      return refuse(
        "address-not-allowed",
        `advertised host ${wanted} is not the address this connection comes from (${source}); the registry must be started with --allow-advertise to accept it`,
      );
    }
    if (ipScope(source) !== "loopback" && addresses.some((a) => ipScope(a) === "loopback")) {
      return refuse("address-not-allowed", `cannot advertise ${host}: it is a loopback address, which every other node would take for itself`);
    }
    return wanted;
  }

  /**
   * Probes `id` at `host:port` on behalf of a registration from `source`.
   * Undefined if it answered; else one refusal whatever happened, so that the
   * registry cannot be used to tell closed, silent and talking ports apart.
   * Only the registry's log learns the detail. No answer in time is
   * `unavailable`, worth retrying; only the node's own answer is final.
   */
  private async probeFor(source: string, host: string, port: number, id: string): Promise<Refusal | undefined> {
    if (!this.probes.take(source)) {
      return refuse("rate-limited", `too many registrations to check from ${source}; retry in ${Math.ceil(this.probes.waitMs(source) / 1000)} s`);
    }
    const outcome = await this.probe(host, port, id);
    if (outcome.ok) return undefined;
    const address = formatAddress(host, port);
    return {
      ok: false,
      code: outcome.retryable ? "unavailable" : "unreachable",
      message: `no node answered as ${id} at ${address}; if nodes must reach this node at another address, start it with --advertise host[:port]`,
      detail: outcome.detail,
    };
  }

  /**
   * Dials a node back to check that `id` listens at `host:port`. Only the
   * node's own answer (a refusal, another id, not our protocol) is final;
   * silence may be a dropped packet, a starved node or the registry's own
   * load, and a listener at its connection cap is there, only busy.
   */
  private async probe(host: string, port: number, id: string): Promise<{ ok: true } | { ok: false; retryable: boolean; detail: string }> {
    const nonce = randomId();
    const reply = Promise.withResolvers<ProbeFailure | null>();
    const timer = setTimeout(() => reply.resolve({ retryable: true, detail: `no answer within ${this.s.probeTimeoutMs}ms` }), this.s.probeTimeoutMs);
    let conn: Conn<ProbeState> | undefined;
    try {
      conn = await this.transport.dial<ProbeState>(host, port, probeHandlers, this.s.probeTimeoutMs, { node: id });
      conn.state = { done: reply.resolve, nonce, id };
      conn.send({ type: "probe", v: PROTOCOL_VERSION, id, nonce });
      const failure = await reply.promise;
      return failure === null ? { ok: true } : { ok: false, ...failure };
    } catch (e) {
      return { ok: false, retryable: (e as { code?: string }).code === "ETIMEDOUT", detail: (e as Error).message };
    } finally {
      clearTimeout(timer);
      conn?.destroy(); // a reset, not a close: probing thousands of nodes leaves no sockets in TIME_WAIT
    }
  }
}

// --- internal ----------------------------------------------------------------

function refuse(code: ErrorCode, message: string): Refusal {
  return { ok: false, code, message };
}

interface ProbeFailure {
  retryable: boolean;
  detail: string;
}

interface ProbeState {
  done: (failure: ProbeFailure | null) => void;
  nonce: string;
  id: string;
}

const probeHandlers = lineHandlers<ProbeState>({
  maxLineBytes: DEFAULTS.maxLineBytes,
  state: () => ({ done: () => {}, nonce: "", id: "" }),
  line(conn, line) {
    const r = decode(FromListener, line);
    const s = conn.state;
    if (!r.ok) return s.done({ retryable: false, detail: `bad answer: ${r.message}` });
    const m = r.msg;
    if (m.type === "probe-ok" && m.nonce === s.nonce && m.id === s.id) return s.done(null);
    if (m.type === "error") return s.done({ retryable: m.code === "too-many-connections", detail: `${m.code}: ${m.message}` });
    s.done({ retryable: false, detail: `unexpected answer ${m.type}` });
  },
  close(conn) {
    conn.state.done({ retryable: false, detail: "connection closed before the probe was answered" });
  },
});

function sha256(text: string): Buffer {
  return createHash("sha256").update(text).digest();
}
