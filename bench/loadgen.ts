/**
 * The load generator: registration round trips over a fresh TCP connection
 * each (connect, send `register`, read the reply up to its newline, close),
 * from `conc` workers for a fixed time, against the registry or the floor.
 * It also runs the listeners the registry's dial-back probe reaches: worker w
 * registers the port of listener w, so concurrent registrations never share
 * an address.
 *
 * `bun bench/loadgen.ts`; commands on stdin:
 *   {"cmd":"listeners","count":N}                       -> {"ports":[...]}
 *   {"cmd":"run","port":P,"conc":C,"warmupMs":W,"durationMs":D,"prefix":"x"}
 */
import { probeResponder } from "../harness.ts";
import { dist, emit, serveCommands, type Msg } from "./lib.ts";

interface Req {
  w: number;
  t0: number;
  got: number;
  first: string;
  done: boolean;
}

const HOST = "127.0.0.1";
const REGISTERED = '{"type":"registered"';
const probePorts: number[] = [];

serveCommands(async (cmd) => {
  switch (cmd.cmd) {
    case "listeners":
      openProbeListeners(Number(cmd.count));
      return { ports: probePorts.slice() };
    case "run":
      return run(cmd);
    default:
      throw new Error(`unknown command ${String(cmd.cmd)}`);
  }
});
emit({ event: "ready", pid: process.pid });

function openProbeListeners(count: number): void {
  while (probePorts.length < count) {
    probePorts.push(probeResponder(HOST).port);
  }
}

function run(cmd: Msg): Promise<Msg> {
  const port = Number(cmd.port);
  const conc = Number(cmd.conc);
  const warmupMs = Number(cmd.warmupMs);
  const durationMs = Number(cmd.durationMs);
  const prefix = String(cmd.prefix);
  openProbeListeners(conc);

  const start = performance.now();
  const warmEnd = start + warmupMs;
  const end = warmEnd + durationMs;
  const lat: number[] = [];
  let okInWindow = 0;
  let okTotal = 0;
  let bytesInWindow = 0;
  let errors = 0;
  const errorSamples = new Set<string>();
  let seq = 0;
  let running = conc;
  const finished = Promise.withResolvers<void>();

  const handlers: Bun.SocketHandler<Req> = {
    open(s) {
      const id = `${prefix}${seq++}`;
      s.write(`{"type":"register","v":1,"id":"${id}","port":${probePorts[s.data.w]}}\n`);
    },
    data(s, chunk) {
      const r = s.data;
      if (r.done) return;
      if (r.first.length < REGISTERED.length) r.first += chunk.subarray(0, REGISTERED.length - r.first.length).toString();
      const nl = chunk.indexOf(10);
      if (nl < 0) {
        r.got += chunk.byteLength;
        return;
      }
      r.got += nl + 1;
      r.done = true;
      const ok = r.first === REGISTERED;
      if (!ok) noteError(chunk.subarray(0, Math.min(nl, 300)).toString());
      // RST instead of FIN: a FIN close leaves the port in TIME_WAIT for 60 s, and
      // with ~28k ephemeral ports the kernel's port search, not the server,
      // would become what is measured.
      s.terminate();
      finish(r, ok);
    },
    close(s) {
      const r = s.data;
      if (r && !r.done) {
        r.done = true;
        noteError("closed before the reply");
        finish(r, false);
      }
    },
    error(s) {
      s.terminate();
    },
  };

  function noteError(text: string): void {
    errors++;
    if (errorSamples.size < 5) errorSamples.add(text.replace(/"id":"[^"]*"/g, '"id":…'));
  }

  function next(w: number): void {
    if (performance.now() >= end) {
      if (--running === 0) finished.resolve();
      return;
    }
    const r: Req = { w, t0: performance.now(), got: 0, first: "", done: false };
    Bun.connect<Req>({ hostname: HOST, port, socket: handlers, data: r }).catch((e: Error & { code?: string }) => {
      if (r.done) return;
      r.done = true;
      noteError(`connect: ${e.code ?? e.message}`);
      // A refused or exhausted connect fails at once; do not spin on it.
      setTimeout(() => next(w), 5);
    });
  }

  function finish(r: Req, ok: boolean): void {
    const t1 = performance.now();
    if (ok) okTotal++;
    if (ok && r.t0 >= warmEnd && r.t0 < end) lat.push(t1 - r.t0);
    if (ok && t1 >= warmEnd && t1 < end) {
      okInWindow++;
      bytesInWindow += r.got;
    }
    next(r.w);
  }

  for (let w = 0; w < conc; w++) next(w);

  const hardStop = setTimeout(() => finished.resolve(), durationMs + warmupMs + 30_000);
  return finished.promise.then(() => {
    clearTimeout(hardStop);
    const seconds = durationMs / 1000;
    return {
      conc,
      completed: okInWindow,
      completedTotal: okTotal,
      throughput: okInWindow / seconds,
      replyBytes: okInWindow ? bytesInWindow / okInWindow : 0,
      latencyMs: dist(lat),
      errors,
      errorSamples: Array.from(errorSamples),
      unfinished: running,
      wallMs: performance.now() - start,
    };
  });
}
