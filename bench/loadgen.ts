/**
 * The load generator: registration round trips over a fresh TCP connection
 * each (connect, send `register`, read the reply up to its newline, close),
 * from `conc` workers for a fixed time, against the registry or the floor.
 * It also runs the listeners the registry's dial-back probe reaches: worker w
 * registers the port of listener w, so concurrent registrations never share
 * an address.
 *
 * With `tls`, each round trip is a TLS connection (a full handshake, or with
 * `resume` a resumed one: each worker offers the session of its last
 * connection) and `register` goes out once the handshake is done.
 *
 * `bun bench/loadgen.ts`; commands on stdin:
 *   {"cmd":"listeners","count":N}                       -> {"ports":[...]}
 *   {"cmd":"run","port":P,"conc":C,"warmupMs":W,"durationMs":D,"prefix":"x","tls":{"ca":"PEM","serverName":"localhost","resume":false}}
 */
import { probeResponder } from "../harness.ts";
import { cpuMs, dist, emit, serveCommands, type Msg } from "./lib.ts";

/** TLS settings of a cell: the CA's PEM, the name to check, whether to resume sessions. */
interface CellTls {
  ca: string;
  serverName: string;
  resume: boolean;
}

/** One registration round trip: the worker that made it, when it began, what has arrived. */
interface Req {
  cell: Cell;
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
    case "run": {
      openProbeListeners(Number(cmd.conc));
      return new Cell(cmd).run();
    }
    default:
      throw new Error(`unknown command ${String(cmd.cmd)}`);
  }
});
emit({ event: "ready", pid: process.pid });

function openProbeListeners(count: number): void {
  while (probePorts.length < count) probePorts.push(probeResponder(HOST).port);
}

function sendRegister(s: Bun.Socket<Req>): void {
  const c = s.data.cell;
  s.write(`{"type":"register","v":1,"id":"${c.prefix}${c.seq++}","port":${probePorts[s.data.w]}}\n`);
}

const handlers: Bun.SocketHandler<Req> = {
  open: sendRegister,
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
    if (!ok) r.cell.noteError(chunk.subarray(0, Math.min(nl, 300)).toString());
    // RST instead of FIN: a FIN close leaves the port in TIME_WAIT for 60 s, and
    // with ~28k ephemeral ports the kernel's port search, not the server,
    // would become what is measured.
    s.terminate();
    r.cell.finish(r, ok);
  },
  close(s) {
    const r = s.data;
    if (r && !r.done) {
      r.done = true;
      r.cell.noteError("closed before the reply");
      r.cell.finish(r, false);
    }
  },
  error(s) {
    s.terminate();
  },
};

/** The same over TLS: `register` once the handshake is done; a worker's last session is offered again when resuming. */
const tlsHandlers: Bun.SocketHandler<Req> = {
  ...handlers,
  open(s) {
    const session = s.data.cell.sessions[s.data.w];
    if (session) s.setSession(session);
  },
  handshake(s, ok) {
    if (ok) return sendRegister(s);
    s.data.cell.noteError("TLS handshake failed");
    s.terminate();
  },
  data(s, chunk) {
    const r = s.data;
    if (!r.done && r.got === 0) {
      // The session ticket comes after the handshake: by the reply it is there.
      if (r.cell.tls?.resume) r.cell.sessions[r.w] = (s.getSession as () => Buffer | undefined)();
      if (s.isSessionReused()) r.cell.resumed++;
    }
    handlers.data!(s, chunk);
  },
};

/** One measured cell: `conc` workers, each starting its next registration when the last one is answered, until the time is up. */
class Cell {
  readonly prefix: string;
  seq = 0;
  readonly tls: CellTls | undefined;
  /** Per worker, the TLS session of its last connection (resumption). */
  readonly sessions: (Buffer | undefined)[] = [];
  /** Connections whose TLS session was resumed. */
  resumed = 0;
  private readonly port: number;
  private readonly conc: number;
  private readonly durationMs: number;
  private readonly start = performance.now();
  private readonly startCpuMs = cpuMs();
  private readonly warmEnd: number;
  private readonly end: number;
  private readonly lat: number[] = [];
  private okInWindow = 0;
  private okTotal = 0;
  private bytesInWindow = 0;
  private errors = 0;
  private readonly errorSamples = new Set<string>();
  private running: number;
  private readonly finished = Promise.withResolvers<void>();

  constructor(cmd: Msg) {
    this.port = Number(cmd.port);
    this.conc = this.running = Number(cmd.conc);
    this.prefix = String(cmd.prefix);
    this.durationMs = Number(cmd.durationMs);
    this.warmEnd = this.start + Number(cmd.warmupMs);
    this.end = this.warmEnd + this.durationMs;
    this.tls = cmd.tls as CellTls | undefined;
  }

  async run(): Promise<Msg> {
    for (let w = 0; w < this.conc; w++) this.next(w);
    const hardStop = setTimeout(() => this.finished.resolve(), this.end - this.start + 30_000);
    await this.finished.promise;
    clearTimeout(hardStop);
    return {
      conc: this.conc,
      completed: this.okInWindow,
      completedTotal: this.okTotal,
      throughput: this.okInWindow / (this.durationMs / 1000),
      replyBytes: this.okInWindow ? this.bytesInWindow / this.okInWindow : 0,
      latencyMs: dist(this.lat),
      errors: this.errors,
      errorSamples: Array.from(this.errorSamples),
      unfinished: this.running,
      ...(this.tls ? { resumed: this.resumed } : {}),
      wallMs: performance.now() - this.start,
      /** This process's CPU time over the whole cell (warm-up included, as completedTotal is). */
      cpuMs: cpuMs() - this.startCpuMs,
    };
  }

  noteError(text: string): void {
    this.errors++;
    if (this.errorSamples.size < 5) this.errorSamples.add(text.replace(/"id":"[^"]*"/g, '"id":…'));
  }

  finish(r: Req, ok: boolean): void {
    const t1 = performance.now();
    if (ok) this.okTotal++;
    if (ok && r.t0 >= this.warmEnd && r.t0 < this.end) this.lat.push(t1 - r.t0);
    if (ok && t1 >= this.warmEnd && t1 < this.end) {
      this.okInWindow++;
      this.bytesInWindow += r.got;
    }
    this.next(r.w);
  }

  private next(w: number): void {
    if (performance.now() >= this.end) {
      if (--this.running === 0) this.finished.resolve();
      return;
    }
    const r: Req = { cell: this, w, t0: performance.now(), got: 0, first: "", done: false };
    const tls = this.tls ? { ca: this.tls.ca, serverName: this.tls.serverName } : undefined;
    Bun.connect<Req>({ hostname: HOST, port: this.port, tls, socket: tls ? tlsHandlers : handlers, data: r }).catch((e: Error & { code?: string }) => {
      if (r.done) return;
      r.done = true;
      this.noteError(`connect: ${e.code ?? e.message}`);
      // A refused or exhausted connect fails at once; do not spin on it.
      setTimeout(() => this.next(w), 5);
    });
  }
}
