/**
 * INTERIM, delete once registry.ts and client.ts write $PORTS_FILE (see
 * healthcheck.ts): the image's previous health check, used only while no
 * ports record exists. It finds the role's process and the TCP ports it
 * listens on from /proc, then: registry with a status server, GET /healthz;
 * every other port, a TCP connect (which a frozen process still accepts: the
 * kernel completes the handshake).
 */
import { readFileSync, readdirSync, readlinkSync } from "node:fs";
import { isIP } from "node:net";

const TIMEOUT_MS = 2_000;

/** Runs the check for whichever role runs in this container. */
export async function check(): Promise<{ ok: boolean; text: string }> {
  const proc = findRoleProcess();
  if (!proc) return fallback("no registry.ts or client.ts process found");
  let listening: Listener[];
  try {
    listening = listeningSockets(proc.pid);
  } catch (e) {
    return fallback(`cannot read /proc/${proc.pid}: ${(e as Error).message}`);
  }
  if (!listening.length) return { ok: false, text: `${proc.role} (pid ${proc.pid}) listens on no TCP port` };
  const httpPort = proc.role === "registry" ? configuredHttpPort(proc.argv) : undefined;
  if (httpPort !== undefined && !listening.some((l) => l.port === httpPort)) {
    return { ok: false, text: `registry status server is not listening on port ${httpPort}` };
  }
  const results = await Promise.all(
    listening.map((l) => (l.port === httpPort ? getHealthz(loopbackFor(l.address), l.port) : tcpProbe(loopbackFor(l.address), l.port))),
  );
  const ok = results.every((r) => r.ok);
  return { ok, text: `${proc.role} (pid ${proc.pid}): ${results.map((r) => r.text).join(", ")}` };
}

// --- internal ----------------------------------------------------------------

interface Listener {
  address: string;
  port: number;
}

interface Result {
  ok: boolean;
  text: string;
}

async function fallback(why: string): Promise<Result> {
  const http = process.env.REGISTRY_HTTP_PORT;
  const r = http ? await getHealthz(["127.0.0.1"], Number(http)) : await tcpProbe(["127.0.0.1"], Number(process.env.REGISTRY_PORT || 8080));
  return { ok: r.ok, text: `${why}; from the environment: ${r.text}` };
}

/** The lowest pid whose command line runs registry.ts or client.ts (the container's main process). */
function findRoleProcess(): { pid: number; role: "registry" | "client"; argv: string[] } | undefined {
  const pids = readdirSync("/proc")
    .filter((d) => /^\d+$/.test(d))
    .map(Number)
    .filter((p) => p !== process.pid)
    .sort((a, b) => a - b);
  for (const pid of pids) {
    let argv: string[];
    try {
      argv = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").filter(Boolean);
    } catch {
      continue; // gone meanwhile, or not ours to read
    }
    const i = argv.findIndex((a) => /(^|\/)(registry|client)\.ts$/.test(a));
    if (i < 0) continue;
    const role = argv[i]!.endsWith("registry.ts") ? "registry" : "client";
    return { pid, role, argv: argv.slice(i + 1) };
  }
  return undefined;
}

/** TCP sockets in LISTEN state that the process holds, matched by socket inode. */
function listeningSockets(pid: number): Listener[] {
  const inodes = new Set<string>();
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`));
      if (m) inodes.add(m[1]!);
    } catch {
      // closed meanwhile
    }
  }
  const out: Listener[] = [];
  for (const [file, v6] of [
    ["tcp", false],
    ["tcp6", true],
  ] as const) {
    let text: string;
    try {
      text = readFileSync(`/proc/${pid}/net/${file}`, "utf8");
    } catch {
      continue; // no IPv6 in this kernel
    }
    for (const line of text.split("\n").slice(1)) {
      const f = line.trim().split(/\s+/);
      // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
      if (f.length < 10 || f[3] !== "0A" || !inodes.has(f[9]!)) continue;
      const [addrHex, portHex] = f[1]!.split(":");
      const port = parseInt(portHex!, 16);
      if (!out.some((l) => l.port === port)) out.push({ address: decodeAddress(addrHex!, v6), port });
    }
  }
  return out;
}

/** /proc/net/tcp{,6} addresses: 32-bit words in host (little-endian) byte order. */
function decodeAddress(hex: string, v6: boolean): string {
  const bytes: number[] = [];
  for (let w = 0; w < hex.length; w += 8) {
    const word = hex.slice(w, w + 8);
    for (let b = 6; b >= 0; b -= 2) bytes.push(parseInt(word.slice(b, b + 2), 16));
  }
  if (!v6) return bytes.join(".");
  if (bytes.slice(0, 10).every((b) => b === 0) && bytes[10] === 0xff && bytes[11] === 0xff) return bytes.slice(12).join(".");
  const groups: string[] = [];
  for (let i = 0; i < 16; i += 2) groups.push(((bytes[i]! << 8) | bytes[i + 1]!).toString(16));
  return groups.join(":").replace(/^0(:0)+$/, "::");
}

/** Where to reach a listener from inside its container; unspecified addresses mean loopback. */
function loopbackFor(address: string): string[] {
  if (address === "0.0.0.0") return ["127.0.0.1"];
  if (address === "::") return ["127.0.0.1", "::1"]; // dual-stack; ::1 if the socket is IPv6-only
  return [address];
}

/** --http N / --http=N on the registry's command line, else REGISTRY_HTTP_PORT (the flag wins, as in registry.ts). */
function configuredHttpPort(argv: string[]): number | undefined {
  let text: string | undefined;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === "--http") text = argv[i + 1];
    else if (a.startsWith("--http=")) text = a.slice("--http=".length);
  }
  text ||= process.env.REGISTRY_HTTP_PORT || undefined;
  const n = Number(text);
  return text && Number.isInteger(n) && n > 0 && n < 65536 ? n : undefined;
}

async function tcpProbe(hosts: string[], port: number): Promise<Result> {
  let last = "";
  for (const host of hosts) {
    try {
      await connectOnce(host, port);
      return { ok: true, text: `tcp ${port} accepts` };
    } catch (e) {
      last = (e as Error).message;
    }
  }
  return { ok: false, text: `tcp ${port}: ${last}` };
}

async function getHealthz(hosts: string[], port: number): Promise<Result> {
  let last = "";
  for (const host of hosts) {
    const url = `http://${isIP(host) === 6 ? `[${host}]` : host}:${port}/healthz`;
    try {
      const res = await fetch(url, { signal: AbortSignal.timeout(TIMEOUT_MS) });
      await res.body?.cancel();
      if (res.ok) return { ok: true, text: `/healthz ${res.status}` };
      return { ok: false, text: `/healthz on ${port} answered ${res.status}` };
    } catch (e) {
      last = (e as Error).message;
    }
  }
  return { ok: false, text: `/healthz on ${port}: ${last}` };
}

/** Connects and closes at once; rejects on refusal or after the deadline (Bun has no connect timeout). */
async function connectOnce(hostname: string, port: number): Promise<void> {
  const opened = Bun.connect({
    hostname,
    port,
    socket: {
      open: (s) => void s.end(),
      data: () => {},
      connectError: () => {},
    },
  });
  let timer: Timer | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no connection within ${TIMEOUT_MS}ms`)), TIMEOUT_MS);
  });
  try {
    await Promise.race([opened, timeout]);
  } catch (e) {
    opened.then((s) => s.terminate(), () => {});
    throw e;
  } finally {
    clearTimeout(timer);
  }
}

