/**
 * certs.ts: the files it writes are checked by openssl itself and then used
 * for real mutual TLS between a Bun listener and Bun.connect on loopback,
 * where each side reads the other's identity from the certificate.
 */
import { afterEach, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { makeCerts, type CertSet } from "../certs.ts";
import { nodeIdOf } from "../tls.ts";
import { spawnScript, withDeadline } from "../harness.ts";

const T = 30_000;
let dirs: string[] = [];
let listeners: Bun.TCPSocketListener<unknown>[] = [];

afterEach(() => {
  for (const l of listeners) l.stop(true);
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
  listeners = [];
  dirs = [];
});

function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), "certs-test-"));
  dirs.push(d);
  return d;
}

/** Runs openssl; resolves with its exit code and output. */
async function openssl(...args: string[]): Promise<{ code: number; out: string }> {
  const p = Bun.spawn(["openssl", ...args], { stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  const [out, err, code] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
  return { code, out: out + err };
}

type Pair = { cert: string; key: string };
type Side = { authorized: boolean; error?: string; cn?: string; id?: string };

/** What one end of a TLS connection learnt about the other in `handshake`. */
function side(s: Bun.Socket<unknown>, err: Error | null): Side {
  const peer = s.getPeerCertificate();
  const cn = peer?.subject?.CN;
  return { authorized: s.authorized, error: (err as NodeJS.ErrnoException | null)?.code, cn: Array.isArray(cn) ? cn.join(",") : cn, id: nodeIdOf(peer?.subjectaltname) };
}

/**
 * One TLS connection from `client` to `server` on 127.0.0.1: the server asks
 * for a client certificate and refuses unverified ones. Each side records
 * what it saw of the other; the server answers "ok" only to a verified peer.
 */
async function exchange(ca: string, server: Pair, client: Pair & { ca?: string; hostname?: string; rejectUnauthorized?: boolean }) {
  const seenByServer = Promise.withResolvers<Side>();
  const listener = Bun.listen({
    hostname: "127.0.0.1",
    port: 0,
    tls: { cert: Bun.file(server.cert), key: Bun.file(server.key), ca: Bun.file(ca), requestCert: true, rejectUnauthorized: true },
    socket: {
      data() {},
      handshake(s, _ok, err) {
        seenByServer.resolve(side(s, err));
        if (s.authorized) s.write("ok\n");
      },
    },
  });
  listeners.push(listener);
  const seenByClient = Promise.withResolvers<Side>();
  const reply = Promise.withResolvers<string>();
  await Bun.connect({
    hostname: client.hostname ?? "127.0.0.1",
    port: listener.port,
    tls: {
      ca: Bun.file(client.ca ?? ca),
      cert: Bun.file(client.cert),
      key: Bun.file(client.key),
      rejectUnauthorized: client.rejectUnauthorized ?? true,
    },
    socket: {
      handshake(s, _ok, err) {
        seenByClient.resolve(side(s, err));
      },
      data(s, d) {
        reply.resolve(d.toString());
        s.end();
      },
      close() {
        reply.resolve("closed");
      },
      error() {},
    },
  });
  const what = "TLS handshake on both sides and the server's answer";
  const [server_, client_, answer] = await withDeadline(Promise.all([seenByServer.promise, seenByClient.promise, reply.promise]), 10_000, what);
  return { server: server_, client: client_, answer };
}

describe("certs", () => {
  test("openssl verifies every certificate; keys are private P-256 keys matching their certificates", async () => {
    const dir = tempDir();
    const set = await makeCerts(dir, { nodes: 2, names: ["localhost", "registry.test"], ips: ["127.0.0.1", "::1"], days: 2 });
    expect(set.caCreated).toBe(true);
    const leaves = [set.registry!, ...set.nodes];
    const verify = await openssl("verify", "-CAfile", set.ca, ...leaves.map((l) => l.cert));
    expect(verify).toEqual({ code: 0, out: leaves.map((l) => `${l.cert}: OK\n`).join("") });

    for (const key of [set.caKey, ...leaves.map((l) => l.key)]) expect(statSync(key).mode & 0o777).toBe(0o600);
    for (const l of leaves) {
      const text = await openssl("pkey", "-in", l.key, "-noout", "-text");
      expect(text.out).toContain("NIST CURVE: P-256");
      const fromCert = await openssl("x509", "-in", l.cert, "-noout", "-pubkey");
      const fromKey = await openssl("pkey", "-in", l.key, "-pubout");
      expect(fromCert.out).toBe(fromKey.out);
    }

    const reg = await openssl("x509", "-in", set.registry!.cert, "-noout", "-subject", "-ext", "subjectAltName,extendedKeyUsage,basicConstraints");
    expect(reg.out).toContain("subject=CN = registry");
    expect(reg.out).toContain("DNS:localhost, DNS:registry.test, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1");
    expect(reg.out).toContain("TLS Web Server Authentication, TLS Web Client Authentication");
    expect(reg.out).toContain("CA:FALSE");
    const node = await openssl("x509", "-in", set.nodes[1]!.cert, "-noout", "-subject", "-ext", "subjectAltName,extendedKeyUsage");
    expect(node.out).toContain("subject=CN = node-1");
    expect(node.out).toMatch(/Subject Alternative Name: \n\s+URI:urn:node:node-1\n/);
    expect(node.out).toContain("TLS Web Server Authentication, TLS Web Client Authentication");
    const ca = await openssl("x509", "-in", set.ca, "-noout", "-ext", "basicConstraints,keyUsage");
    expect(ca.out).toContain("CA:TRUE, pathlen:0");
    expect(ca.out).toContain("Certificate Sign, CRL Sign");
  }, T);

  test("registry and node authenticate each other over real TLS, reading the node id from the certificate", async () => {
    const set = await makeCerts(tempDir(), { nodes: 2, days: 2 });
    const [n0, n1] = set.nodes as [CertSet["nodes"][0], CertSet["nodes"][0]];
    // A registry session: node-0 dials the registry by address, then by name.
    for (const hostname of ["127.0.0.1", "localhost"]) {
      const r = await exchange(set.ca, set.registry!, { ...n0, hostname });
      expect(r).toEqual({
        server: { authorized: true, error: undefined, cn: "node-0", id: "node-0" },
        client: { authorized: true, error: undefined, cn: "registry", id: undefined },
        answer: "ok\n",
      });
    }
    // The probe: the registry dials node-1's listener. A node certificate names
    // an id, not an address, so the host-name check is the one complaint.
    const probe = await exchange(set.ca, n1, { ...set.registry!, rejectUnauthorized: false });
    expect(probe).toEqual({
      server: { authorized: true, error: undefined, cn: "registry", id: undefined },
      client: { authorized: false, error: "ERR_TLS_CERT_ALTNAME_INVALID", cn: "node-1", id: "node-1" },
      answer: "ok\n",
    });
  }, T);

  test("a certificate from another CA is refused both ways", async () => {
    const ours = await makeCerts(tempDir(), { nodes: 1, days: 2 });
    const theirs = await makeCerts(tempDir(), { nodes: 1, days: 2 });
    // The stranger trusts its own CA, so it sends that root along with its certificate.
    const stranger = await exchange(ours.ca, ours.registry!, { ...theirs.nodes[0]!, ca: theirs.ca, rejectUnauthorized: false });
    expect(stranger.server).toEqual({ authorized: false, error: "SELF_SIGNED_CERT_IN_CHAIN", cn: "node-0", id: "node-0" });
    expect(stranger.answer).toBe("closed");
    // A node that trusts another CA does not accept our registry.
    const wrongTrust = await exchange(ours.ca, ours.registry!, { ...ours.nodes[0]!, ca: theirs.ca, rejectUnauthorized: false });
    expect(wrongTrust.client.authorized).toBe(false);
    expect(wrongTrust.client.error).toBe("SELF_SIGNED_CERT_IN_CHAIN");
  }, T);

  test("a later run keeps the CA, --no-registry adds nodes only, newCa replaces the CA", async () => {
    const dir = tempDir();
    const first = await makeCerts(dir, { nodes: 1, days: 2 });
    const ca = readFileSync(first.ca, "utf8");
    const registry = readFileSync(first.registry!.cert, "utf8");
    const later = await makeCerts(dir, { ids: ["late"], registry: false, days: 2 });
    expect(later.caCreated).toBe(false);
    expect(later.registry).toBeUndefined();
    expect(readFileSync(first.ca, "utf8")).toBe(ca);
    expect(readFileSync(first.registry!.cert, "utf8")).toBe(registry);
    expect((await openssl("verify", "-CAfile", first.ca, later.nodes[0]!.cert)).code).toBe(0);

    const fresh = await makeCerts(dir, { nodes: 1, days: 2, newCa: true });
    expect(fresh.caCreated).toBe(true);
    expect(readFileSync(fresh.ca, "utf8")).not.toBe(ca);
    expect((await openssl("verify", "-CAfile", fresh.ca, later.nodes[0]!.cert)).code).not.toBe(0);
    expect((await openssl("verify", "-CAfile", fresh.ca, fresh.nodes[0]!.cert)).code).toBe(0);
  }, T);

  test.each([
    [{ ids: ["bad id"] }, 'node id "bad id" must be 1-64 of A-Z a-z 0-9 . _ : -'],
    [{ ids: ["a", "a"] }, "node ids must be unique"],
    [{ ids: ["registry"] }, 'node id "registry" would overwrite registry.pem'],
    [{ names: ["under_score.test"] }, '"under_score.test" is not a DNS name'],
    [{ ips: ["10.0.0"] }, '"10.0.0" is not an IP address'],
    [{ names: [], ips: [] }, "the registry certificate needs at least one name or address"],
    [{ days: 0 }, "days must be an integer from 1 to 36500, got 0"],
  ])("refuses %p: %s", async (opts, message) => {
    const dir = tempDir();
    await expect(makeCerts(dir, opts)).rejects.toThrow(message);
  });

  test("a CA too short-lived for the leaves asked for is not reused", async () => {
    const dir = tempDir();
    await makeCerts(dir, { nodes: 0, days: 2 }); // the CA lives ten years
    await expect(makeCerts(dir, { nodes: 0, days: 20_000 })).rejects.toThrow("expires within 20000 days: pass --new-ca");
  });

  test.each([
    ["URI:urn:node:node-0", "node-0"],
    ["URI:urn:node:a.b_c:d-e, IP Address:127.0.0.1", "a.b_c:d-e"],
    ["DNS:localhost, IP Address:127.0.0.1", undefined],
    ["URI:urn:node:a, URI:urn:node:b", undefined],
    // Bun quotes a value holding a comma; the quoted text is not an entry of its own.
    ['URI:"urn:node:a\\u002c URI:urn:node:b"', undefined],
    ["URI:urn:node:", undefined],
    ["URI:urn:node:has space", undefined],
    [undefined, undefined],
  ])("nodeIdOf(%p) is %p", (san, id) => {
    expect(nodeIdOf(san)).toBe(id);
  });

  test("bun run certs writes the files; a bad flag exits 2 with a usage error", async () => {
    const dir = tempDir();
    {
      await using ok = spawnScript("certs.ts", ["--out", dir, "--ids", "a,b", "--days", "2"]);
      expect(await withDeadline(ok.exited(), 20_000, "certs to finish")).toBe(0);
      expect(ok.stderr.filter((l) => l.startsWith("stdout: made"))).toHaveLength(4);
    }
    expect((await openssl("verify", "-CAfile", join(dir, "ca.pem"), join(dir, "a.pem"), join(dir, "b.pem"), join(dir, "registry.pem"))).code).toBe(0);
    await using bad = spawnScript("certs.ts", ["--out", dir, "--nodes", "many"]);
    expect(await withDeadline(bad.exited(), 20_000, "certs to fail")).toBe(2);
    expect(bad.stderr).toContain('usage error: --nodes must be an integer from 0 to 100000, got "many"');
  }, T);
});
