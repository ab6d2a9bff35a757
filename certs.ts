/**
 * `bun run certs`: a private CA, a registry certificate and one certificate
 * per node, for TLS on the registry port and mutual TLS across the mesh.
 * Keys are EC P-256 and everything is made by the system's `openssl`, so this
 * file does no cryptography itself. A node's identity is the URI
 * `urn:node:<id>` in its subjectAltName; its CN carries the same id for people
 * reading the certificate, but only the URI counts (`nodeIdOf` in net.ts).
 */
import { defineCommand, runMain } from "citty";
import { randomBytes } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, mkdtempSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { isIP } from "node:net";
import { join } from "node:path";
import * as v from "valibot";
import { VERSION, checkFlags, intArg, runCli, UsageError } from "./cli.ts";
import { normalizeHost } from "./net.ts";
import { NODE_URI_PREFIX } from "./tls.ts";
import { Peer } from "./protocol.ts";

export type CertOptions = {
  /** Node ids; default `node-0` ... `node-<nodes-1>`. */
  ids?: string[];
  /** How many node certificates when `ids` is not given (default 3). */
  nodes?: number;
  /** DNS names the registry is reached by (default `localhost`). */
  names?: string[];
  /** Addresses the registry is reached by (default 127.0.0.1 and ::1). */
  ips?: string[];
  /** Validity of every certificate made, in days (default 365). */
  days?: number;
  /** Make a new CA even if the directory holds one. */
  newCa?: boolean;
  /** Make the registry certificate (default true); false adds node certificates only. */
  registry?: boolean;
};

/** Paths of what `makeCerts` wrote. */
export type CertSet = {
  dir: string;
  ca: string;
  caKey: string;
  /** False when an existing CA in the directory was reused. */
  caCreated: boolean;
  /** Undefined when `registry: false`. */
  registry?: { cert: string; key: string };
  nodes: { id: string; cert: string; key: string }[];
};

const MAX_DAYS = 36_500;
/** A new CA lives at least this long, and always a day longer than the leaves it signs with it, so they can be reissued from it. */
const CA_MIN_DAYS = 3_650;
/** openssl runs at most this many at once; `--nodes 200` would otherwise fork 600 processes together. */
const PARALLEL = 8;
const DNS_NAME = /^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;
// Every leaf both accepts and opens connections: the registry dials nodes for its probe, nodes dial each other.
const LEAF_EXTENSIONS = [
  "basicConstraints=critical,CA:FALSE",
  "keyUsage=critical,digitalSignature",
  "extendedKeyUsage=serverAuth,clientAuth",
  "subjectKeyIdentifier=hash",
  "authorityKeyIdentifier=keyid",
];

/**
 * Writes `ca.pem`/`ca.key` (kept and reused on later runs unless `newCa`),
 * `registry.pem`/`registry.key` and `<id>.pem`/`<id>.key` per node into `dir`.
 * Keys are mode 0600. Each file is written whole and then renamed into place,
 * so a process reloading certificates never reads half a file; existing leaf
 * files are replaced (that is how certificates are rotated). The registry
 * certificate is remade on every run: `registry: false` (`--no-registry`)
 * adds nodes without touching it, or its names.
 */
export async function makeCerts(dir: string, opts: CertOptions = {}): Promise<CertSet> {
  const o = checkOptions(opts);
  if (!Bun.which("openssl")) throw new Error("openssl was not found on PATH (Debian: apt-get install openssl)");
  mkdirSync(dir, { recursive: true });
  const stage = mkdtempSync(join(dir, ".certs-"));
  const final = (name: string) => join(dir, name);
  try {
    const caCreated = o.newCa || !hasCa(dir);
    if (caCreated) await makeCa(stage, Math.max(CA_MIN_DAYS, o.days + 1));
    else await checkCaOutlives(dir, o.days);
    const caDir = caCreated ? stage : dir;
    const registry = { file: "registry", cn: "registry", san: [...o.names.map((n) => `DNS:${n}`), ...o.ips.map((ip) => `IP:${ip}`)] };
    const leaves = [
      ...(o.registry ? [registry] : []),
      ...o.ids.map((id) => ({ file: id, cn: id, san: [`URI:${NODE_URI_PREFIX}${id}`] })),
    ];
    await inBatches(leaves, PARALLEL, (l) => makeLeaf(stage, caDir, l.file, l.cn, l.san, o.days));
    // The CA goes in last: a reader that sees the new ca.pem finds leaves it signed.
    for (const l of leaves) moveInto(stage, dir, l.file);
    if (caCreated) moveInto(stage, dir, "ca");
    return {
      dir,
      ca: final("ca.pem"),
      caKey: final("ca.key"),
      caCreated,
      registry: o.registry ? { cert: final("registry.pem"), key: final("registry.key") } : undefined,
      nodes: o.ids.map((id) => ({ id, cert: final(`${id}.pem`), key: final(`${id}.key`) })),
    };
  } finally {
    rmSync(stage, { recursive: true, force: true });
  }
}

// --- internal ----------------------------------------------------------------

type Checked = { ids: string[]; names: string[]; ips: string[]; days: number; newCa: boolean; registry: boolean };

function checkOptions(opts: CertOptions): Checked {
  const days = opts.days ?? 365;
  if (!Number.isInteger(days) || days < 1 || days > MAX_DAYS) throw new UsageError(`days must be an integer from 1 to ${MAX_DAYS}, got ${days}`);
  const ids = opts.ids ?? Array.from({ length: opts.nodes ?? 3 }, (_, i) => `node-${i}`);
  for (const id of ids) {
    const r = v.safeParse(Peer.entries.id, id);
    if (!r.success) throw new UsageError(`node id "${id}" ${r.issues[0].message}`);
    // The CA and registry files share the directory with node files.
    if (id === "ca" || id === "registry") throw new UsageError(`node id "${id}" would overwrite ${id}.pem`);
  }
  if (new Set(ids).size !== ids.length) throw new UsageError("node ids must be unique");
  const names = opts.names ?? ["localhost"];
  for (const n of names) if (n.length > 253 || !DNS_NAME.test(n)) throw new UsageError(`"${n}" is not a DNS name`);
  const ips = (opts.ips ?? ["127.0.0.1", "::1"]).map(normalizeHost);
  for (const ip of ips) if (!isIP(ip)) throw new UsageError(`"${ip}" is not an IP address`);
  const registry = opts.registry ?? true;
  if (registry && !names.length && !ips.length) throw new UsageError("the registry certificate needs at least one name or address");
  return { ids, names, ips, days, newCa: opts.newCa ?? false, registry };
}

function hasCa(dir: string): boolean {
  const cert = existsSync(join(dir, "ca.pem"));
  const key = existsSync(join(dir, "ca.key"));
  if (cert !== key) throw new Error(`${join(dir, cert ? "ca.pem" : "ca.key")} is there without its ${cert ? "key" : "certificate"}: restore it or pass --new-ca`);
  return cert;
}

async function makeCa(stage: string, days: number): Promise<void> {
  await openssl(stage, ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "ca.key"]);
  chmodSync(join(stage, "ca.key"), 0o600);
  // A random suffix tells two CAs apart in error messages ("issuer: contact-registry CA 3f2a...").
  const subject = `/CN=contact-registry CA ${randomBytes(4).toString("hex")}`;
  await openssl(stage, [
    "req", "-x509", "-new", "-key", "ca.key", "-subj", subject, "-days", String(days), "-sha256",
    "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
    "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    "-out", "ca.pem",
  ]);
}

/** A leaf that outlives its CA fails verification once the CA expires: refuse to make one. */
async function checkCaOutlives(dir: string, days: number): Promise<void> {
  try {
    await openssl(dir, ["x509", "-in", "ca.pem", "-noout", "-checkend", String(days * 86_400)]);
  } catch {
    throw new Error(`the CA in ${dir} expires within ${days} days: pass --new-ca, or fewer --days`);
  }
}

async function makeLeaf(stage: string, caDir: string, file: string, cn: string, san: string[], days: number): Promise<void> {
  const ext = join(stage, `${file}.ext`);
  writeFileSync(ext, [...LEAF_EXTENSIONS, `subjectAltName=${san.join(",")}`].join("\n") + "\n");
  await openssl(stage, ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", `${file}.key`]);
  chmodSync(join(stage, `${file}.key`), 0o600); // openssl 3 already does; older ones follow the umask
  await openssl(stage, ["req", "-new", "-key", `${file}.key`, "-subj", `/CN=${cn}`, "-out", `${file}.csr`]);
  await openssl(stage, [
    "x509", "-req", "-in", `${file}.csr`, "-CA", join(caDir, "ca.pem"), "-CAkey", join(caDir, "ca.key"),
    "-set_serial", `0x${randomBytes(16).toString("hex")}`, "-days", String(days), "-sha256", "-extfile", ext,
    "-out", `${file}.pem`,
  ]);
}

function moveInto(stage: string, dir: string, base: string): void {
  renameSync(join(stage, `${base}.key`), join(dir, `${base}.key`));
  renameSync(join(stage, `${base}.pem`), join(dir, `${base}.pem`));
}

async function openssl(cwd: string, args: string[]): Promise<void> {
  const proc = Bun.spawn(["openssl", ...args], { cwd, stdin: "ignore", stdout: "ignore", stderr: "pipe" });
  const [stderr, code] = await Promise.all([new Response(proc.stderr).text(), proc.exited]);
  if (code !== 0) throw new Error(`openssl ${args[0]} failed (exit ${code}): ${stderr.trim().split("\n").slice(-2).join(" / ")}`);
}

async function inBatches<T>(items: T[], size: number, fn: (item: T) => Promise<void>): Promise<void> {
  for (let i = 0; i < items.length; i += size) await Promise.all(items.slice(i, i + size).map(fn));
}

const list = (text: string | undefined) => text?.split(",").map((s) => s.trim()).filter(Boolean);

export const command = defineCommand({
  meta: { name: "certs", version: VERSION, description: "Make a private CA, a registry certificate and node certificates (EC P-256, via openssl)." },
  args: {
    out: { type: "string", description: "Directory to write to; a CA already there is reused [default certs]" },
    nodes: { type: "string", description: "Node certificates node-0 ... node-<N-1> [default 3]" },
    ids: { type: "string", description: "Comma-separated node ids instead of --nodes" },
    names: { type: "string", description: "Comma-separated DNS names of the registry [default localhost]" },
    ips: { type: "string", description: "Comma-separated addresses of the registry [default 127.0.0.1,::1]" },
    days: { type: "string", description: "Validity in days [default 365]" },
    registry: { type: "boolean", description: "Make the registry certificate; --no-registry to add node certificates only [default on]" },
    "new-ca": { type: "boolean", description: "Make a new CA even if --out holds one (certificates signed by the old one stop verifying)" },
  },
  async run({ args, rawArgs }) {
    await runCli(async () => {
      checkFlags(rawArgs, command.args as Record<string, { type?: string }>);
      if (args.ids !== undefined && args.nodes !== undefined) throw new UsageError("give --ids or --nodes, not both");
      const out = args.out || "certs";
      const set = await makeCerts(out, {
        ids: list(args.ids),
        nodes: args.nodes === undefined ? undefined : intArg("nodes", args.nodes, 0, 100_000),
        names: list(args.names),
        ips: list(args.ips),
        days: args.days === undefined ? undefined : intArg("days", args.days, 1, MAX_DAYS),
        newCa: args["new-ca"],
        registry: args.registry,
      });
      const lines = [
        `${set.caCreated ? "made" : "kept"} ${set.ca} (and ${set.caKey}: keep it private, it signs everything)`,
        ...(set.registry ? [`made ${set.registry.cert} ${set.registry.key}`] : []),
        ...set.nodes.map((n) => `made ${n.cert} ${n.key} (id ${n.id})`),
      ];
      process.stdout.write(lines.join("\n") + "\n");
    });
  },
});

if (import.meta.main) await runMain(command);
