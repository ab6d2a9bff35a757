#!/usr/bin/env bun
/**
 * The image's HEALTHCHECK: `bun /app/scripts/healthcheck.ts`, exit 0 = healthy,
 * 1 = unhealthy, with one line saying why (docker inspect shows it).
 *
 * Where to look: the role's script records what it listens on in the file
 * named by PORTS_FILE (the image sets it; the entrypoint removes it before
 * starting the role): its `listening` event and, for a registry with a status
 * server, `http-listening`, one JSON line each with `role` added. A node's
 * port is picked by the OS and any port may come from the command line, so
 * the record, not the environment, says where to look.
 *
 * What to ask: the process itself, in its own protocol, so that a frozen
 * process fails (a bare TCP connect would pass: the kernel completes the
 * handshake for a stopped process). None of these leaves a line in its log.
 * - registry with a status server: GET /healthz must answer 200;
 * - registry without: a connection that says `leave` must be closed by it;
 * - node: its listener must answer a `probe` for the node's own id with `probe-ok`.
 *
 * With TLS (the role's certificate given by environment variable, as
 * compose.tls.yaml does) the check speaks TLS too and presents that
 * certificate, which a mutual-TLS port accepts. It asks this container's own
 * process on loopback, so it does not check the other end's certificate: whether
 * it answers is the question, not who it is.
 */
import { readFileSync } from "node:fs";
import * as v from "valibot";
import { dial, lineHandlers, type Conn } from "../net.ts";
import { FromListener, PROTOCOL_VERSION, decode, randomId } from "../protocol.ts";

const TIMEOUT_MS = 2_000;

/** One line of the ports file. */
const PortsRecord = v.variant("event", [
  v.object({ event: v.literal("listening"), role: v.picklist(["registry", "node"]), host: v.string(), port: v.number(), id: v.optional(v.string()) }),
  v.object({ event: v.literal("http-listening"), url: v.string() }),
]);
type PortsRecord = v.InferOutput<typeof PortsRecord>;
type Listening = Extract<PortsRecord, { event: "listening" }>;

export interface Result {
  ok: boolean;
  text: string;
}

/** Runs the check for whichever role runs in this container. */
export async function check(portsFile = process.env.PORTS_FILE): Promise<Result> {
  const records = portsFile ? readRecords(portsFile) : [];
  const listening = records.findLast((r): r is Listening => r.event === "listening");
  if (!listening) return { ok: false, text: portsFile ? `no listening record in ${portsFile} yet` : "PORTS_FILE is not set: nothing says where the role listens" };
  const http = records.findLast((r) => r.event === "http-listening");
  const tls = ownCertificate(listening.role);
  if (listening.role === "registry") {
    return http ? getHealthz(http.url, tls) : closesOnLeave(loopback(listening.host), listening.port, tls);
  }
  if (!listening.id) return { ok: false, text: `node record in ${portsFile} has no id` };
  return answersProbe(loopback(listening.host), listening.port, listening.id, tls);
}

// --- internal ----------------------------------------------------------------

/** Valid records of the file, in order; a missing file or a half-written last line reads as fewer records. */
function readRecords(file: string): PortsRecord[] {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch {
    return [];
  }
  return text.split("\n").flatMap((line) => {
    try {
      const r = v.safeParse(PortsRecord, JSON.parse(line));
      return r.success ? [r.output] : [];
    } catch {
      return [];
    }
  });
}

type KeyPair = { cert: string; key: string };

/** The role's own certificate and key, when it runs TLS; a node's listener speaks TLS only with one. */
function ownCertificate(role: "registry" | "node"): KeyPair | undefined {
  const env = (name: string) => process.env[name] || undefined;
  const [cert, key] = role === "registry" ? [env("REGISTRY_TLS_CERT"), env("REGISTRY_TLS_KEY")] : [env("NODE_TLS_CERT"), env("NODE_TLS_KEY")];
  return cert && key ? { cert, key } : undefined;
}

/** A bind address as a place to connect to from inside the container. */
function loopback(host: string): string {
  return host === "::" || host === "0.0.0.0" || host === "" ? "localhost" : host;
}

async function getHealthz(url: string, own: KeyPair | undefined): Promise<Result> {
  const target = new URL("healthz", url).href;
  try {
    // Over HTTPS the certificate is the registry's own, for names that need not include this loopback
    // address. Its own certificate gets it past --http-tls-client-ca, which may ask for one.
    const cert = own ? { cert: Bun.file(own.cert), key: Bun.file(own.key) } : {};
    const res = await fetch(target, { signal: AbortSignal.timeout(TIMEOUT_MS), tls: { rejectUnauthorized: false, ...cert } });
    await res.body?.cancel();
    return { ok: res.ok, text: `registry: /healthz ${res.status} (${target})` };
  } catch (e) {
    return { ok: false, text: `registry: ${target}: ${(e as Error).message}` };
  }
}

/** A registry closes a connection that says `leave` before registering, and logs nothing for it. */
async function closesOnLeave(host: string, port: number, tls: KeyPair | undefined): Promise<Result> {
  const closed = Promise.withResolvers<void>();
  const r = await exchange(host, port, tls, '{"type":"leave"}\n', { line: () => {}, close: () => closed.resolve() }, closed.promise);
  return { ok: r.ok, text: `registry on port ${port}: ${r.ok ? "closed the connection after leave" : r.text}` };
}

/** A node's listener answers a probe for its own id with probe-ok and the nonce. */
async function answersProbe(host: string, port: number, id: string, tls: KeyPair | undefined): Promise<Result> {
  const nonce = randomId();
  const answer = Promise.withResolvers<void>();
  const onLine = (_conn: Conn<null>, line: string) => {
    const m = decode(FromListener, line);
    if (!m.ok) return answer.reject(new Error(`unreadable answer: ${m.message}`));
    if (m.msg.type === "probe-ok" && m.msg.id === id && m.msg.nonce === nonce) return answer.resolve();
    answer.reject(new Error(`answered ${line}`));
  };
  const probe = JSON.stringify({ type: "probe", v: PROTOCOL_VERSION, id, nonce }) + "\n";
  const r = await exchange(host, port, tls, probe, { line: onLine, close: () => answer.reject(new Error("closed without an answer")) }, answer.promise);
  return { ok: r.ok, text: `node ${id} on port ${port}: ${r.ok ? "answered probe-ok" : r.text}` };
}

/** Dials, sends one line and waits for `done`, all within TIMEOUT_MS. */
async function exchange(
  host: string,
  port: number,
  tls: KeyPair | undefined,
  line: string,
  hooks: { line(conn: Conn<null>, line: string): void; close(): void },
  done: Promise<unknown>,
): Promise<Result> {
  done.catch(() => {}); // it may settle before it is awaited
  let timer: Timer | undefined;
  const late = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`no answer within ${TIMEOUT_MS}ms`)), TIMEOUT_MS)));
  let conn: Conn<null> | undefined;
  try {
    const handlers = lineHandlers<null>({ state: () => null, maxLineBytes: 16 * 1024, line: hooks.line, close: hooks.close });
    conn = await Promise.race([tls ? dialOwnTls(host, port, handlers, tls) : dial(host, port, handlers, TIMEOUT_MS), late]);
    conn.send(line);
    await Promise.race([done, late]);
    return { ok: true, text: "" };
  } catch (e) {
    return { ok: false, text: (e as Error).message };
  } finally {
    clearTimeout(timer);
    conn?.destroy();
  }
}

/** A TLS connection to this container's own port, presenting `pair`; the role's handlers see it once the handshake is done. */
async function dialOwnTls(host: string, port: number, handlers: Bun.SocketHandler<Conn<null>>, pair: KeyPair): Promise<Conn<null>> {
  const ready = Promise.withResolvers<Conn<null>>();
  const socket = await Bun.connect<Conn<null>>({
    hostname: host,
    port,
    tls: { cert: Bun.file(pair.cert), key: Bun.file(pair.key), rejectUnauthorized: false },
    socket: {
      ...handlers,
      open() {},
      handshake(s, ok, err) {
        // Not checking the other end, a complaint about its certificate is no failure; a broken handshake is.
        if (!ok && !/CERT|UNABLE_TO/.test((err as { code?: string } | null)?.code ?? "")) return ready.reject(new Error(`TLS handshake failed: ${err?.message}`));
        handlers.open?.(s);
        ready.resolve(s.data);
      },
      close(s, e) {
        ready.reject(new Error("closed during the TLS handshake"));
        if (s.data) handlers.close?.(s, e);
      },
    },
  });
  return ready.promise.catch((e: unknown) => {
    socket.terminate();
    throw e;
  });
}

if (import.meta.main) {
  const result = await check().catch((e: unknown) => ({ ok: false, text: `check failed: ${(e as Error).message}` }));
  process.stdout.write(`${result.ok ? "healthy" : "unhealthy"}: ${result.text}\n`);
  process.exit(result.ok ? 0 : 1);
}
