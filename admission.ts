/**
 * Admission: who may register, and under which address. The checks run in
 * the order docs/PROTOCOL.md gives (version, token, host, capacity, probe);
 * the first that fails is the answer. Then it decides which registrations
 * the newcomer may replace.
 */
import { createHash, timingSafeEqual } from "node:crypto";
import type { Member, Membership } from "./membership.ts";
import { addressOf } from "./membership.ts";
import { formatAddress, lineHandlers, normalizeHost, resolveHost, type Conn, type Transport } from "./net.ts";
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
}

export type Refusal = { ok: false; code: ErrorCode; message: string };
/** Where the node will be listed, or why not. */
export type Verdict = { ok: true; host: string; address: string } | Refusal;

export class Admission {
  private readonly tokenDigest: Buffer | undefined;

  constructor(
    private readonly s: AdmissionSettings,
    private readonly membership: Membership,
    private readonly transport: Transport,
  ) {
    this.tokenDigest = s.token ? sha256(s.token) : undefined;
  }

  /** Checks a `register` from `source`; resolves to the address to list it under, or a refusal. */
  async check(msg: Register, source: string): Promise<Verdict> {
    if (msg.v !== PROTOCOL_VERSION) {
      return refuse("unsupported-version", `protocol version ${msg.v} is not supported; this registry speaks ${PROTOCOL_VERSION}`);
    }
    if (this.tokenDigest && !(msg.token !== undefined && timingSafeEqual(sha256(msg.token), this.tokenDigest))) {
      return refuse("unauthorized", msg.token === undefined ? "this registry requires a token" : "wrong token");
    }
    const host = msg.host === undefined ? source : await this.advertised(msg.host, source);
    if (typeof host !== "string") return host;
    const address = formatAddress(host, msg.port);
    const known = this.membership.get(msg.id) ?? this.membership.at(address);
    if (!known && this.membership.size >= this.s.maxNodes) {
      return refuse("registry-full", `registry holds its maximum of ${this.s.maxNodes} nodes`);
    }
    if (this.s.probe) {
      const failure = await this.probe(host, msg.port, msg.id);
      if (failure) {
        return refuse(
          "unreachable",
          `could not reach you at ${address} (${failure}); if nodes must reach you at another address, start the node with --advertise host[:port]`,
        );
      }
    }
    return { ok: true, host, address };
  }

  /**
   * The registrations a newcomer may replace: whatever holds its id (the node
   * registering again) or its address (a node restarted on the same port).
   * The newest registration wins.
   */
  replaceable(member: Member): Member[] {
    const byId = this.membership.get(member.id);
    const byAddress = this.membership.at(addressOf(member));
    return [byId, byAddress].filter((m, i, all): m is Member => m !== undefined && all.indexOf(m) === i);
  }

  /** Refusals quote what the peer sent (a parser's message, a field's value); the token must not travel on that way. */
  redact(text: string): string {
    const t = this.s.token;
    return t ? text.split(t).join("[token]").split(JSON.stringify(t).slice(1, -1)).join("[token]") : text;
  }

  /** The host a node advertises, if it may use it. */
  private async advertised(host: string, source: string): Promise<string | Refusal> {
    const wanted = normalizeHost(host);
    if (wanted === "0.0.0.0" || wanted === "::") {
      return refuse("address-not-allowed", `cannot advertise the unspecified address ${wanted}`);
    }
    if (!this.s.allowAdvertise && wanted !== source && !(await resolvesTo(wanted, source, this.s.probeTimeoutMs))) {
      return refuse(
        "address-not-allowed",
        `advertised host ${wanted} is not the address this connection comes from (${source}); the registry must be started with --allow-advertise to accept it`,
      );
    }
    return wanted;
  }

  /** Dials a node back to check the address it will be listed under. Returns why it failed, or null. */
  private async probe(host: string, port: number, id: string): Promise<string | null> {
    const nonce = randomId();
    const reply = Promise.withResolvers<string | null>();
    const timer = setTimeout(() => reply.resolve(`no answer within ${this.s.probeTimeoutMs}ms`), this.s.probeTimeoutMs);
    let conn: Conn<ProbeState> | undefined;
    try {
      conn = await this.transport.dial<ProbeState>(host, port, probeHandlers, this.s.probeTimeoutMs);
      conn.state = { done: reply.resolve, nonce, id };
      conn.send({ type: "probe", v: PROTOCOL_VERSION, id, nonce });
      return await reply.promise;
    } catch (e) {
      return (e as Error).message;
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

interface ProbeState {
  done: (failure: string | null) => void;
  nonce: string;
  id: string;
}

const probeHandlers = lineHandlers<ProbeState>({
  maxLineBytes: DEFAULTS.maxLineBytes,
  state: () => ({ done: () => {}, nonce: "", id: "" }),
  line(conn, line) {
    const r = decode(FromListener, line);
    const s = conn.state;
    if (!r.ok) return s.done(`bad answer: ${r.message}`);
    const m = r.msg;
    if (m.type === "probe-ok" && m.nonce === s.nonce && m.id === s.id) return s.done(null);
    if (m.type === "error") return s.done(`${m.code}: ${m.message}`);
    s.done(`unexpected answer ${m.type}`);
  },
  close(conn) {
    conn.state.done("connection closed before the probe was answered");
  },
});

function sha256(text: string): Buffer {
  return createHash("sha256").update(text).digest();
}

/** Whether a name resolves to an address, within a deadline: the name is the client's choice, the resolver's patience is not. */
async function resolvesTo(host: string, address: string, timeoutMs: number): Promise<boolean> {
  let timer: Timer | undefined;
  const late = new Promise<string[]>((resolve) => (timer = setTimeout(() => resolve([]), timeoutMs)));
  try {
    return (await Promise.race([resolveHost(host), late])).includes(address);
  } catch {
    return false;
  } finally {
    clearTimeout(timer);
  }
}
