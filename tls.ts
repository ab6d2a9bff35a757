/**
 * TLS, as a Transport next to plain TCP: the registry's port speaks TLS, and
 * with a mesh CA every connection is mutual TLS, where a node's id is the one
 * its certificate names (`urn:node:<id>`). Files are checked when loaded and
 * on every reload (SIGHUP); a connection is handed to the role only once the
 * other end has been checked.
 */
import { X509Certificate, createPrivateKey } from "node:crypto";
import { readFileSync } from "node:fs";
import * as v from "valibot";
import { Conn, DialError, TLS_HANDSHAKE, dial, dialEach, listenAll, listenPlain, normalizeHost, type DialPeer, type Listening, type PeerIdentity, type Transport } from "./net.ts";
import { DEFAULTS, Peer, encode } from "./protocol.ts";
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
  return listenAll(host, port, rawSide(secureSide(handlers), material, handshakeMs));
}

function settle(h: Handshaking): void {
  h.settled = true;
  clearTimeout(h.timer);
}

/** The TLS side of an accepted connection: the role's handlers, reached only once the handshake (and in a mesh, the client's certificate) has passed. */
function secureSide<S>(handlers: Bun.SocketHandler<Conn<S>>): Bun.SocketHandler<Conn<S>> {
  const sides = new WeakMap<object, Handshaking>();
  return {
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
}

/**
 * The raw side of an accepted connection: upgrades it to TLS with the current
 * material (rotation takes effect at the next connection), keeps the
 * handshake deadline, and answers a plain-text client in plain text.
 */
function rawSide<S>(secure: Bun.SocketHandler<Conn<S>>, material: () => TlsMaterial, handshakeMs: number): Bun.SocketHandler<Handshaking> {
  return {
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
}

