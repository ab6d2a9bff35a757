/**
 * The floor: a bare Bun.listen server that answers every line with one fixed
 * reply, no parsing, no state. Whatever the registry costs beyond this is the
 * registry's own cost. The reply starts like a `registered` line (the load
 * generator checks that) and is padded to the size the orchestrator asks for,
 * which is the size of the registry's reply in the same cell. A heartbeat
 * ping is answered with a pong, as the registry does, so a fleet of held
 * sessions can be measured against it too. With `dial`, each line first
 * gets the least possible dial-back (connect to the port it names, one line
 * each way): the floor for a registry running its address probe.
 *
 * `bun bench/floor.ts [CERT.pem KEY.pem]`: with a certificate, the same over
 * Bun's own TLS listener (`tls` option): the floor for a TLS registry.
 * Prints {"event":"listening","port":N}; commands on stdin:
 * {"cmd":"reply","bytes":N,"dial":false}, {"cmd":"stats"} (CPU time, RSS).
 */
import { cpuMs, emit, selfRss, serveCommands, wallMs } from "./lib.ts";

interface Sock {
  queue: Uint8Array[];
}

let reply = makeReply(200);
/** Dial the sender's listener back (as the registry's probe does) before replying. */
let dial = false;
// A heartbeat gets the registry's answer, so held sessions cost what they cost the
// registry. (protocol.ts PING_LINE / PONG_LINE, not imported: the floor loads nothing.)
const PING = Buffer.from('{"type":"ping"}');
const PONG = Buffer.from('{"type":"pong"}\n');

const [certFile, keyFile] = process.argv.slice(2);
const server = Bun.listen<Sock>({
  hostname: "127.0.0.1",
  port: 0,
  ...(certFile && keyFile ? { tls: { cert: Bun.file(certFile), key: Bun.file(keyFile) } } : {}),
  socket: {
    open(s) {
      s.data = { queue: [] };
    },
    data(s, chunk) {
      // Lines are never split here: the load generator and the holders send
      // each line in one write, well under a segment.
      let start = 0;
      let at = chunk.indexOf(10);
      while (at >= 0) {
        if (at - start === PING.byteLength && PING.equals(chunk.subarray(start, at))) send(s, PONG);
        else if (dial) dialThenReply(s, chunk.subarray(start, at).toString());
        else send(s, reply);
        start = at + 1;
        at = chunk.indexOf(10, start);
      }
    },
    drain(s) {
      const q = s.data.queue;
      while (q.length) {
        const head = q[0]!;
        const n = s.write(head);
        if (n < 0) return;
        if (n < head.byteLength) {
          q[0] = head.subarray(n);
          return;
        }
        q.shift();
      }
    },
    error(s) {
      s.terminate();
    },
  },
});

emit({ event: "listening", port: server.port, pid: process.pid });

serveCommands(async (cmd) => {
  if (cmd.cmd === "reply") {
    reply = makeReply(Number(cmd.bytes));
    dial = Boolean(cmd.dial);
    return { bytes: reply.byteLength, dial };
  }
  if (cmd.cmd === "stats") return { cpuMs: cpuMs(), rss: selfRss(), t: wallMs() };
  throw new Error(`unknown command ${String(cmd.cmd)}`);
});

interface Dial {
  line: string;
  done: () => void;
  answered: boolean;
}

// The least a dial-back can cost: connect to the port named in the line, send
// one probe line, wait for one line back, cut the connection (RST, as the
// registry's probe does). No parsing beyond finding the port and id.
const dialHandlers: Bun.SocketHandler<Dial> = {
  open(p) {
    p.write(p.data.line);
  },
  data(p, chunk) {
    if (p.data.answered || chunk.indexOf(10) < 0) return;
    p.data.answered = true;
    p.terminate();
    p.data.done();
  },
  close(p) {
    if (!p.data.answered) {
      p.data.answered = true;
      p.data.done();
    }
  },
  error(p) {
    p.terminate();
  },
};

function dialThenReply(s: Bun.Socket<Sock>, line: string): void {
  const port = Number(/"port":(\d+)/.exec(line)?.[1] ?? 0);
  const id = /"id":"([^"]*)"/.exec(line)?.[1] ?? "x";
  const data: Dial = { line: `{"type":"probe","v":1,"id":"${id}","nonce":"floorfloorfloor0"}\n`, done: () => send(s, reply), answered: false };
  Bun.connect<Dial>({ hostname: "127.0.0.1", port, socket: dialHandlers, data }).catch(() => {
    if (!data.answered) {
      data.answered = true;
      data.done();
    }
  });
}

function send(s: Bun.Socket<Sock>, b: Uint8Array): void {
  if (s.data.queue.length) {
    s.data.queue.push(b);
    return;
  }
  const n = s.write(b);
  if (n >= 0 && n < b.byteLength) s.data.queue.push(b.subarray(n));
}

function makeReply(bytes: number): Buffer {
  const head = '{"type":"registered","pad":"';
  const tail = '"}\n';
  const pad = Math.max(0, Math.round(bytes) - head.length - tail.length);
  return Buffer.from(head + "x".repeat(pad) + tail);
}
