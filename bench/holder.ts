/**
 * Simulated nodes that stay registered: each holds a registry session open,
 * reads the membership pushes (tracking the last seq it saw, without parsing
 * JSON) and, if asked, pings at the node's interval. With `probe`, each node
 * has its own listener that answers the registry's dial-back probe; without,
 * nodes register distinct ports from `portBase` (below the ephemeral range, so
 * they never collide with a real listener). With `failover` (ports of more
 * registries sharing the list), a session that closes after registering does
 * what a node does (client.ts): after a jittered wait of up to the backoff's
 * first step it dials the next registry and registers again under its id.
 *
 * With `sources`, session i connects from sources[i % n] (loopback addresses
 * such as 127.0.2.1), as nodes on that many hosts would, and its listener
 * listens there: per-address limits then see a spread of hosts, not one.
 *
 * `bun bench/holder.ts '{"port":P,"prefix":"h0-","portBase":1024,"probe":false,"pingMs":0}'`
 * Commands: {"cmd":"grow","to":N,"conc":C} -> time to register up to N nodes;
 * {"cmd":"stats"}; {"cmd":"waitSeq","seq":S,"timeoutMs":T} -> when every session has seen seq S.
 */
import { probeResponder, waitUntil } from "../harness.ts";
import { emit, fromAddress, selfHostIs, serveCommands, wallMs } from "./lib.ts";

interface Opts {
  port: number;
  prefix: string;
  portBase: number;
  probe: boolean;
  pingMs: number;
  failover?: number[];
  sources?: string[];
}

interface Session {
  i: number;
  /** Index into the registries (o.port, then o.failover) this session dials. */
  at: number;
  registered: boolean;
  closed: boolean;
  lastSeq: number;
  got: number;
  tail: Buffer | null;
  done?: (ok: boolean) => void;
}

const HOST = "127.0.0.1";
const o = JSON.parse(process.argv[2] ?? "{}") as Opts;
const sources = o.sources?.length ? o.sources : undefined;
const sessions: Session[] = [];
const sockets: (Bun.Socket<Session> | undefined)[] = [];
const listenerPorts: number[] = [];
let closedAfterRegistration = 0;
/** Sessions registered again after their registry closed them, and when the last one was (wall clock). */
let failedOver = 0;
let lastFailoverAt = 0;
const registries = [o.port, ...(o.failover ?? [])];
/** Bytes received after registration: the membership fan-out this fleet was sent. */
let pushBytes = 0;
let lastError = "";
const SEQ = Buffer.from('"seq":');

const handlers: Bun.SocketHandler<Session> = {
  open(s) {
    const n = s.data;
    const port = o.probe ? listenerPorts[n.i]! : o.portBase + n.i;
    s.write(`{"type":"register","v":1,"id":"${o.prefix}${n.i}","port":${port}}\n`);
  },
  data(s, chunk) {
    const n = s.data;
    if (!n.registered) {
      if (n.got === 0 && !chunk.subarray(0, 20).toString().startsWith('{"type":"registered"')) {
        lastError = chunk.subarray(0, Math.min(300, chunk.byteLength)).toString();
        n.done?.(false);
        s.end();
        return;
      }
      if (n.got === 0 && sources && !selfHostIs(chunk, sourceOf(n.i))) {
        lastError = `not registered from ${sourceOf(n.i)}: this Bun ignores localAddress`;
        n.done?.(false);
        s.end();
        return;
      }
      const nl = chunk.indexOf(10);
      if (nl < 0) {
        if (n.got === 0) n.lastSeq = headSeq(chunk);
        n.got += chunk.byteLength;
        return;
      }
      if (n.got === 0) n.lastSeq = headSeq(chunk);
      n.got += nl + 1;
      n.registered = true;
      n.done?.(true);
      if (n.at > 0) {
        failedOver++;
        lastFailoverAt = wallMs();
      }
      chunk = chunk.subarray(nl + 1);
      if (!chunk.byteLength) return;
    }
    onPushes(n, chunk);
  },
  close(s) {
    const n = s.data;
    n.closed = true;
    if (n.registered) closedAfterRegistration++;
    else n.done?.(false);
    if (n.registered && registries.length > 1) setTimeout(() => reconnect(n), Math.random() * 100);
  },
  error(s) {
    s.terminate();
  },
};

// Pings spread over the interval, as independent nodes would send them.
const TICK = 50;
if (o.pingMs > 0) {
  const slots = Math.max(1, Math.round(o.pingMs / TICK));
  let tick = 0;
  setInterval(() => {
    const slot = tick++ % slots;
    for (let i = slot; i < sockets.length; i += slots) {
      const s = sockets[i];
      if (s && s.data.registered && !s.data.closed) s.write('{"type":"ping"}\n');
    }
  }, TICK);
}

serveCommands(async (cmd) => {
  switch (cmd.cmd) {
    case "grow":
      return grow(Number(cmd.to), Number(cmd.conc ?? 32));
    case "stats":
      return stats();
    case "waitSeq": {
      const started = performance.now();
      const seq = Number(cmd.seq);
      const reached = await waitUntil(() => stats().minSeq >= seq, Number(cmd.timeoutMs ?? 10_000), `every session to see seq ${seq}`, 2).then(
        () => true,
        () => false,
      );
      return { ...stats(), reached, ms: performance.now() - started, t: wallMs() };
    }
    default:
      throw new Error(`unknown command ${String(cmd.cmd)}`);
  }
});
emit({ event: "ready", pid: process.pid });

async function grow(to: number, conc: number): Promise<Record<string, unknown>> {
  const started = performance.now();
  let errors = 0;
  let bytes = 0;
  let nextIndex = sessions.length;
  const one = async (): Promise<void> => {
    while (nextIndex < to) {
      const i = nextIndex++;
      if (o.probe) openListener(i);
      const n: Session = { i, at: 0, registered: false, closed: false, lastSeq: 0, got: 0, tail: null };
      sessions[i] = n;
      const ok = await new Promise<boolean>((resolve) => {
        n.done = resolve;
        Bun.connect<Session>({ hostname: HOST, port: o.port, socket: handlers, data: n, ...fromAddress(sourceOf(i)) }).then(
          (s) => (sockets[i] = s),
          (e: Error) => {
            lastError = `connect: ${e.message}`;
            resolve(false);
          },
        );
      });
      n.done = undefined;
      bytes += n.got;
      if (!ok) errors++;
    }
  };
  await Promise.all(Array.from({ length: conc }, one));
  return { ms: performance.now() - started, ...stats(), errors, replyBytes: bytes, lastError };
}

/** A node's failover: the next registry, the same id and port; its view starts over from the reply. */
function reconnect(old: Session): void {
  const n: Session = { i: old.i, at: (old.at + 1) % registries.length, registered: false, closed: false, lastSeq: 0, got: 0, tail: null };
  sessions[n.i] = n;
  n.done = (ok) => {
    n.done = undefined;
    if (!ok) setTimeout(() => reconnect(n), Math.random() * 100);
  };
  Bun.connect<Session>({ hostname: HOST, port: registries[n.at]!, socket: handlers, data: n, ...fromAddress(sourceOf(n.i)) }).then(
    (s) => (sockets[n.i] = s),
    () => setTimeout(() => reconnect(n), Math.random() * 100),
  );
}

function stats(): { sessions: number; registered: number; minSeq: number; maxSeq: number; closed: number; pushBytes: number; failedOver: number; lastFailoverAt: number } {
  let registered = 0;
  let minSeq = Infinity;
  let maxSeq = 0;
  for (const n of sessions) {
    if (!n || !n.registered || n.closed) continue;
    registered++;
    if (n.lastSeq < minSeq) minSeq = n.lastSeq;
    if (n.lastSeq > maxSeq) maxSeq = n.lastSeq;
  }
  return { sessions: sessions.length, registered, minSeq: registered ? minSeq : 0, maxSeq, closed: closedAfterRegistration, pushBytes, failedOver, lastFailoverAt };
}

function openListener(i: number): void {
  if (listenerPorts[i] !== undefined) return;
  listenerPorts[i] = probeResponder(sourceOf(i)).port;
}

function sourceOf(i: number): string {
  return sources ? sources[i % sources.length]! : HOST;
}

/** The seq of the `registered` reply: near its start, before the peer list. */
function headSeq(chunk: Buffer): number {
  const m = /"seq":(\d+)/.exec(chunk.subarray(0, 200).toString());
  return m ? Number(m[1]) : 0;
}

/** Advances lastSeq to the seq of the last complete push line in the stream. */
function onPushes(n: Session, chunk: Buffer): void {
  pushBytes += chunk.byteLength;
  let buf = n.tail ? Buffer.concat([n.tail, chunk]) : chunk;
  const lastNl = buf.lastIndexOf(10);
  if (lastNl < 0) {
    n.tail = buf.byteLength < 4096 ? Buffer.from(buf) : null;
    return;
  }
  n.tail = lastNl + 1 < buf.byteLength ? Buffer.from(buf.subarray(lastNl + 1)) : null;
  buf = buf.subarray(0, lastNl);
  const at = buf.lastIndexOf(SEQ);
  if (at < 0) return;
  let v = 0;
  for (let k = at + SEQ.byteLength; k < buf.byteLength; k++) {
    const c = buf[k]!;
    if (c < 48 || c > 57) break;
    v = v * 10 + (c - 48);
  }
  if (v > n.lastSeq) n.lastSeq = v;
}
