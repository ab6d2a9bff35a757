/**
 * Honest nodes registering while the registry is under attack: a paced,
 * open-loop stream of registrations (one started every 1/rate s whether or
 * not the last one was answered, so a stalled registry cannot slow the
 * stream and hide its own latency), each on a fresh connection from a
 * loopback address of its own (127.0.1.x: hosts the attackers do not share),
 * with a listener on that address answering the registry's probe. Latency
 * is from the connect call to the reply's newline; anything but `registered`
 * counts as refused, by code.
 *
 * `bun bench/honest.ts '{"sources":["127.0.1.1",...],"slots":4}'`: `slots`
 * listeners per address; a slot (address and port) is reused only after a
 * full round, long after its last registration closed.
 * Commands: {"cmd":"run","port":P,"ratePerSec":R,"durationMs":D,"prefix":"x","timeoutMs":T}.
 */
import { probeResponder } from "../harness.ts";
import { dist, emit, fromAddress, selfHostIs, serveCommands, type Msg } from "./lib.ts";

interface Opts {
  sources: string[];
  slots: number;
}

interface Attempt {
  got: number;
  host: string;
  done: (outcome: string, at: number) => void;
  line: string;
}

const REGISTERED = '{"type":"registered"';
const o = JSON.parse(process.argv[2] ?? "{}") as Opts;
const slots = o.sources.flatMap((host) => Array.from({ length: o.slots }, () => ({ host, port: probeResponder(host).port })));
let nextSlot = 0;

const handlers: Bun.SocketHandler<Attempt> = {
  open(s) {
    s.write(s.data.line);
  },
  data(s, chunk) {
    const a = s.data;
    const first = a.got === 0;
    a.got += chunk.byteLength;
    if (first && !chunk.subarray(0, REGISTERED.length).toString().startsWith(REGISTERED)) {
      const code = /"code":"([^"]+)"/.exec(chunk.subarray(0, 300).toString())?.[1] ?? "not-registered";
      return finish(s, code);
    }
    if (first && !selfHostIs(chunk, a.host)) return finish(s, "wrong-source-address");
    if (chunk.indexOf(10) >= 0) finish(s, "registered");
  },
  close(s) {
    s.data.done("closed-before-reply", performance.now());
  },
  error(s) {
    s.terminate();
  },
};

/** Ends an attempt: RST, as the load generator does (no TIME_WAIT), once its outcome is known. */
function finish(s: Bun.Socket<Attempt>, outcome: string): void {
  s.data.done(outcome, performance.now());
  s.terminate();
}

serveCommands(async (cmd) => {
  if (cmd.cmd === "run") return run(cmd);
  throw new Error(`unknown command ${String(cmd.cmd)}`);
});
emit({ event: "ready", pid: process.pid, slots: slots.length });

async function run(cmd: Msg): Promise<Msg> {
  const port = Number(cmd.port);
  const rate = Number(cmd.ratePerSec);
  const durationMs = Number(cmd.durationMs);
  const timeoutMs = Number(cmd.timeoutMs ?? 10_000);
  const prefix = String(cmd.prefix);
  const lat: number[] = [];
  const outcomes: Record<string, number> = {};
  const pending: Promise<void>[] = [];
  const started = performance.now();
  const count = Math.max(1, Math.round((rate * durationMs) / 1000));
  for (let i = 0; i < count; i++) {
    // Open loop: attempt i starts at i/rate s, late or not.
    const wait = started + (i * 1000) / rate - performance.now();
    if (wait > 0) await Bun.sleep(wait);
    pending.push(
      attempt(port, `${prefix}${i}`, timeoutMs).then(({ outcome, ms }) => {
        outcomes[outcome] = (outcomes[outcome] ?? 0) + 1;
        if (outcome === "registered") lat.push(ms);
      }),
    );
  }
  await Promise.all(pending);
  const refused = Object.fromEntries(Object.entries(outcomes).filter(([k]) => k !== "registered"));
  return { attempts: count, registered: outcomes.registered ?? 0, refused, latencyMs: dist(lat), wallMs: performance.now() - started };
}

function attempt(port: number, id: string, timeoutMs: number): Promise<{ outcome: string; ms: number }> {
  const slot = slots[nextSlot++ % slots.length]!;
  const result = Promise.withResolvers<{ outcome: string; ms: number }>();
  const t0 = performance.now();
  let settled = false;
  const timer = setTimeout(() => a.done("timeout", performance.now()), timeoutMs);
  const a: Attempt = {
    got: 0,
    host: slot.host,
    line: `{"type":"register","v":1,"id":"${id}","port":${slot.port}}\n`,
    done(outcome, at) {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      result.resolve({ outcome, ms: at - t0 });
    },
  };
  Bun.connect<Attempt>({ hostname: "127.0.0.1", port, socket: handlers, data: a, ...fromAddress(slot.host) }).then(
    (s) => {
      if (settled) s.terminate();
    },
    (e: Error & { code?: string }) => a.done(`connect: ${e.code ?? e.message}`, performance.now()),
  );
  return result.promise;
}
