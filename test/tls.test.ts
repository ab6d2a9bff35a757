/**
 * net.ts's TLS transport on real sockets, in-process: what each side is told
 * when plain text meets TLS either way, the handshake deadline, mutual TLS
 * (which certificate gets in, with which identity, and the code of each
 * refusal), a node dial's identity check, and reloading files. First, the
 * undocumented Bun behaviour the transport's listener stands on.
 */
import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { copyFileSync, writeFileSync } from "node:fs";
import net from "node:net";
import { join } from "node:path";
import { Fixtures, RawClient, testCerts, tlsAnswer, waitUntil, withDeadline, type TestCerts } from "../harness.ts";
import { DialError, lineHandlers, tcp, type Conn, type Transport } from "../net.ts";
import { tls } from "../tls.ts";

let certs: TestCerts;
beforeAll(async () => {
  certs = await testCerts();
}, 30_000);
afterAll(() => certs?.[Symbol.asyncDispose]());

const f = new Fixtures();
afterEach(() => f.cleanup());

/** What a listener saw: each accepted connection's certified peer and lines, and why each one closed. */
interface Served {
  port: number;
  accepted: Conn<unknown>[];
  lines: string[];
  /** The `limitHit` of each closed connection (undefined: closed without one). */
  closed: ({ code: string; message: string; detail?: string } | undefined)[];
}

/** Listens on 127.0.0.1 with `transport`; answers each line with a pong, then keeps the connection. */
function serve(transport: Transport): Served {
  const served: Served = { port: 0, accepted: [], lines: [], closed: [] };
  const handlers = lineHandlers<object>({
    maxLineBytes: 1024,
    state: () => ({}),
    open: (c) => void served.accepted.push(c),
    line: (c, line) => {
      served.lines.push(line);
      c.send({ type: "pong" });
    },
    close: (c) => void served.closed.push(c.limitHit),
  });
  const l = transport.listen("127.0.0.1", 0, handlers);
  f.defer(() => l.listeners.forEach((x) => x.stop(true)));
  served.port = l.port;
  return served;
}

/** Dials, says ping, resolves with the first line back (or how the dial failed). */
async function ask(transport: Transport, port: number, o: { host?: string; node?: string } = {}): Promise<string> {
  const reply = Promise.withResolvers<string>();
  const handlers = lineHandlers<object>({ maxLineBytes: 1024, state: () => ({}), line: (_, l) => reply.resolve(l), close: () => reply.resolve("(closed)") });
  let conn: Conn<object>;
  try {
    conn = await transport.dial(o.host ?? "127.0.0.1", port, handlers, 5_000, o.node === undefined ? undefined : { node: o.node });
  } catch (e) {
    return `${(e as DialError).code}: ${(e as Error).message}`;
  }
  f.defer(() => conn.destroy());
  conn.send('{"type":"ping"}\n');
  return withDeadline(reply.promise, 5_000, "an answer");
}

const PONG = '{"type":"pong"}';

describe("Bun's server-side upgradeTLS (undocumented: the TLS listener stands on it)", () => {
  test("a plain listener upgrades each socket: the TLS side opens inside the call, the raw side sees the ClientHello, options swapped later serve the new certificate", async () => {
    const pem = (p: string) => Bun.file(p).text();
    let options = { cert: await pem(certs.mesh.registry!.cert), key: await pem(certs.mesh.registry!.key), isServer: true };
    const order: string[] = [];
    const l = Bun.listen<{ first: boolean }>({
      hostname: "127.0.0.1",
      port: 0,
      socket: {
        open(raw) {
          raw.data = { first: true };
          order.push("upgrade");
          raw.upgradeTLS({
            tls: options as Bun.TLSOptions,
            data: { first: false },
            socket: { open: () => void order.push("tls open"), handshake: (s) => void s.write("hi\n"), data() {} },
          });
          order.push("upgraded");
        },
        data(raw, chunk) {
          if (raw.data.first) order.push(`raw first byte ${chunk[0]}`);
          raw.data.first = false;
        },
      },
    });
    f.defer(() => l.stop(true));
    const serverName = async () => {
      const got = Promise.withResolvers<string>();
      await Bun.connect({
        hostname: "127.0.0.1",
        port: l.port,
        tls: { ca: await pem(certs.mesh.ca), serverName: "localhost", rejectUnauthorized: false },
        socket: {
          handshake: (s) => got.resolve(String(s.getPeerCertificate()?.subject?.CN)),
          data: (s) => void s.end(),
          close: () => got.resolve("(closed)"),
        },
      });
      return withDeadline(got.promise, 5_000, "the server's certificate");
    };
    expect(await serverName()).toBe("registry");
    expect(order).toEqual(["upgrade", "tls open", "upgraded", "raw first byte 22"]);
    options = { cert: await pem(certs.node("node-1").cert), key: await pem(certs.node("node-1").key), isServer: true };
    expect(await serverName()).toBe("node-1");
  });

  test("the raw side of an upgraded socket can still answer a plain-text client in plain text", async () => {
    const options = { cert: await Bun.file(certs.mesh.registry!.cert).text(), key: await Bun.file(certs.mesh.registry!.key).text(), isServer: true };
    const l = Bun.listen<undefined>({
      hostname: "127.0.0.1",
      port: 0,
      socket: {
        open: (raw) => void raw.upgradeTLS({ tls: options as Bun.TLSOptions, socket: { data() {} } }),
        data(raw) {
          raw.write("plain answer\n");
          raw.end();
        },
      },
    });
    f.defer(() => l.stop(true));
    await using c = await RawClient.connect(l.port);
    await c.write("hello\n");
    await c.waitClosed(5_000);
    expect(c.messages).toEqual([{ type: "(not json)", line: "plain answer" }]);
  });
});

describe("TLS on the registry port", () => {
  test("a node reaches the registry by address and by name; without a client CA no peer identity is claimed", async () => {
    const s = serve(certs.registryTransport(false));
    const node = certs.nodeTransport();
    expect(await ask(node, s.port)).toBe(PONG);
    expect(await ask(node, s.port, { host: "localhost" })).toBe(PONG);
    expect(s.lines).toEqual(['{"type":"ping"}', '{"type":"ping"}']);
    expect(s.accepted.map((c) => c.peer)).toEqual([undefined, undefined]);
  });

  test("a node refuses a registry signed by a CA it does not trust, or certified for another name", async () => {
    const s = serve(certs.registryTransport(false));
    expect(await ask(tls({ ca: certs.stranger.ca }), s.port)).toMatch(/^bad-certificate: .*the registry's certificate is not trusted: it is signed by a CA that is not trusted here \(/);
    expect(await ask(tls({}), s.port)).toMatch(/^bad-certificate: .*not trusted/); // the system's CAs did not sign it either
    const misnamed = tls({ ca: certs.mesh.ca, serverName: "registry.example" });
    expect(await ask(misnamed, s.port)).toMatch(/^bad-certificate: .*not issued for the name dialed \(see --tls-server-name\) \(ERR_TLS_CERT_ALTNAME_INVALID\)/);
    // The dial was refused by the node: nothing it would have sent reached the registry.
    expect(s.lines).toEqual([]);
  });

  test("a plain-text client on the TLS port is told tls-required in plain text; the registry side records it", async () => {
    const s = serve(certs.registryTransport(false));
    expect(JSON.parse(await ask(tcp, s.port))).toEqual({ type: "error", code: "tls-required", message: "this port speaks TLS: connect with TLS (a node: --tls, or --tls-ca FILE)" });
    await waitUntil(() => s.closed.length === 1, 5_000, "the refused connection to close");
    expect(s.closed[0]?.code).toBe("tls-required");
    expect(s.lines).toEqual([]);
  });

  test("a TLS client on a plain port fails at once with tls-unsupported; the plain side records it", async () => {
    const s = serve(tcp);
    expect(await ask(certs.nodeTransport(), s.port)).toMatch(/^tls-unsupported: .*it does not speak TLS \(it answered in plain text\)/);
    await waitUntil(() => s.closed.length === 1, 5_000, "the refused connection to close");
    expect(s.closed[0]?.code).toBe("tls-unsupported");
    // Someone reading the port by hand gets the same in words.
    await using c = await RawClient.connect(s.port);
    await c.write(Buffer.from([0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5]));
    expect(await c.waitFor("error", 5_000)).toEqual({ type: "error", code: "tls-unsupported", message: "this port speaks plain TCP, not TLS" });
  });

  test.each([
    ["says nothing", [] as number[][]],
    ["sends half a ClientHello", [[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]]],
    ["trickles a ClientHello, a byte at a time", [[0x16], [0x03], [0x01], [0x02], [0x00], [0x01]]],
  ])("a client that %s is cut at the handshake deadline", async (_, writes) => {
    const s = serve(certs.registryTransport(false, 300));
    const c = net.connect(s.port, "127.0.0.1");
    const closed = new Promise<void>((resolve) => c.on("close", () => resolve()));
    c.on("error", () => {});
    f.defer(() => c.destroy());
    for (const w of writes) c.write(Buffer.from(w));
    await withDeadline(closed, 5_000, "the server to cut the connection");
    await waitUntil(() => s.closed.length === 1, 5_000, "the server side to close");
    expect(s.closed[0]).toEqual({ code: "handshake-timeout", message: "no TLS handshake within 300ms" });
  });

  test("a client that connects and leaves without a byte is no failure, as on a plain port", async () => {
    const s = serve(certs.registryTransport(false, 5_000));
    const c = await RawClient.connect(s.port);
    c.end();
    await c.waitClosed(4_000);
    await waitUntil(() => s.closed.length === 1, 5_000, "the server side to close");
    expect(s.closed).toEqual([undefined]);
  });

  test("handshake garbage fails the handshake at once", async () => {
    const s = serve(certs.registryTransport(false, 5_000));
    await using c = await RawClient.connect(s.port);
    await c.write(Buffer.concat([Buffer.from([0x16, 0x03, 0x01, 0x00, 0x10]), Buffer.alloc(16, 0xab)]));
    await c.waitClosed(4_000, "the server to close on garbage, well before its deadline");
    await waitUntil(() => s.closed.length === 1, 5_000, "the server side to close");
    expect(s.closed[0]?.code).toBe("handshake-failed");
  });
});

describe("mutual TLS", () => {
  test("a mesh node gets in with the identity its certificate names; the registry's own certificate names no node", async () => {
    const s = serve(certs.registryTransport(true));
    expect(await ask(certs.nodeTransport("node-0"), s.port)).toBe(PONG);
    expect(await ask(certs.registryTransport(true), s.port, { node: "anyone" })).toMatch(/^identity-mismatch: .*reached a certificate for no node, expected node anyone/);
    const listener = serve(certs.nodeTransport("node-1"));
    expect(await ask(certs.registryTransport(true), listener.port, { node: "node-1" })).toBe(PONG);
    // (The second connection to `s` was refused by its dialer, whether or not `s` had checked it by then.)
    expect([s.accepted[0]?.peer, listener.accepted[0]?.peer]).toEqual([
      { node: "node-0", subject: "CN=node-0" },
      { node: undefined, subject: "CN=registry" },
    ]);
  });

  test("without a certificate, with another CA's, or with an expired one, a client is refused with its own code, over TLS", async () => {
    const s = serve(certs.registryTransport(true));
    // Raw clients: our own transport would not even load an expired certificate.
    const answers = await Promise.all([undefined, certs.stranger.nodes[0]!, await certs.expired("node-0")].map((pair) => tlsAnswer(s.port, pair, { type: "ping" })));
    expect(answers.map((a) => a.code)).toEqual(["certificate-required", "bad-certificate", "bad-certificate"]);
    expect(answers[1]!.message).toContain("signed by a CA that is not trusted here");
    expect(answers[2]!.message).toBe("the client certificate is refused: the certificate has expired (CERT_HAS_EXPIRED)");
    expect(s.lines).toEqual([]); // what they sent after the handshake was never read
    await waitUntil(() => s.closed.length === 3, 5_000, "the three to close");
    expect(s.closed.map((x) => x?.code).sort()).toEqual(["bad-certificate", "bad-certificate", "certificate-required"]);
  });

  test("a node dialing another checks the certificate it reaches: its CA and the id it expected", async () => {
    const listener = serve(certs.nodeTransport("node-1"));
    const me = certs.nodeTransport("node-0");
    expect(await ask(me, listener.port, { node: "node-1" })).toBe(PONG);
    expect(await ask(me, listener.port, { node: "node-2" })).toMatch(/^identity-mismatch: .*reached a certificate for node node-1, expected node node-2/);
    const stranger = serve(tls({ ca: certs.stranger.ca, meshCa: certs.stranger.ca, ...certs.stranger.nodes[1]! }));
    expect(await ask(me, stranger.port, { node: "node-1" })).toMatch(/^bad-certificate: .*node node-1's certificate is refused: it is signed by a CA that is not trusted here/);
    expect(await ask(me, serve(tcp).port, { node: "node-1" })).toMatch(/^tls-unsupported: /);
    expect(listener.accepted[0]?.peer).toEqual({ node: "node-0", subject: "CN=node-0" });
  });
});

describe("loading and reloading the files", () => {
  test.each([
    ["a missing file", () => ({ cert: "/nonexistent/x.pem", key: certs.node("node-0").key }), "cannot read the certificate file /nonexistent/x.pem: no such file"],
    ["a key that is not the certificate's", () => ({ cert: certs.node("node-0").cert, key: certs.node("node-1").key }), "is not the key of the certificate in"],
    ["a certificate without its key", () => ({ cert: certs.node("node-0").cert }), "a certificate needs its key, and a key its certificate: give both"],
    ["a certificate the mesh CA did not sign", () => ({ ...certs.stranger.nodes[0]!, meshCa: certs.mesh.ca }), "is not signed by the CA in"],
    ["mutual TLS without a certificate", () => ({ meshCa: certs.mesh.ca }), "mutual TLS needs this side's own certificate and key"],
    ["a CA file that holds a key", () => ({ ca: certs.mesh.caKey }), "holds no certificate"],
  ])("%s is refused with a message that says what to fix", (_, options, message) => {
    expect(() => tls(options())).toThrow(message);
  });

  test("an expired certificate of its own is refused", async () => {
    const expired = await certs.expired("node-2");
    expect(() => tls({ ...expired })).toThrow(/^the certificate in .* expired on /);
  });

  test("reload: broken files are refused and the old ones stay; new files serve new connections while open ones carry on; the id never changes", async () => {
    const dir = join(certs.dir, "rotating");
    await Bun.write(join(dir, ".keep"), "");
    const files = { cert: join(dir, "node.pem"), key: join(dir, "node.key") };
    const install = (pair: { cert: string; key: string }) => {
      copyFileSync(pair.cert, files.cert);
      copyFileSync(pair.key, files.key);
    };
    install(certs.node("node-1"));
    const transport = tls({ ...files, meshCa: certs.mesh.ca });
    const s = serve(transport);
    const me = certs.nodeTransport("node-0");
    const reply = Promise.withResolvers<string>();
    const handlers = lineHandlers<object>({ maxLineBytes: 1024, state: () => ({}), line: (_, l) => reply.resolve(l) });
    const open = await me.dial("127.0.0.1", s.port, handlers, 5_000, { node: "node-1" });
    f.defer(() => open.destroy());

    writeFileSync(files.key, "not a key\n");
    expect(transport.reload()).toEqual({ event: "tls-reload-failed", message: expect.stringContaining(`${files.key} is not a PEM file`) });
    expect(await ask(me, s.port, { node: "node-1" })).toBe(PONG);

    install(certs.node("node-2"));
    expect(transport.reload()).toEqual({ event: "tls-reload-failed", message: "the new certificate names node node-2, this one node-1: an identity does not change while running" });

    const renewed = await certs.expired("node-1").then(() => reissue(certs, "node-1", dir));
    install(renewed);
    expect(transport.reload()).toMatchObject({ event: "tls-reloaded", subject: "CN=node-1" });
    const serials = await Promise.all([serialOf(s.port, me), serialOf(s.port, me)]);
    expect(serials[0]).toBe(serials[1]);
    expect(serials[0]).toBe(await serialOfFile(renewed.cert));
    // The connection opened before the reload still works.
    open.send('{"type":"ping"}\n');
    expect(await withDeadline(reply.promise, 5_000, "an answer on the old connection")).toBe(PONG);
  });
});

// --- internal ----------------------------------------------------------------

/** A new certificate for `id` from the mesh CA (a renewal): same id, another key and serial. */
async function reissue(c: TestCerts, id: string, dir: string): Promise<{ cert: string; key: string }> {
  const { makeCerts } = await import("../certs.ts");
  // makeCerts reuses a CA it finds in the directory: give it the mesh's.
  copyFileSync(c.mesh.ca, join(dir, "ca.pem"));
  copyFileSync(c.mesh.caKey, join(dir, "ca.key"));
  const set = await makeCerts(dir, { ids: [id], registry: false, days: 2 });
  return set.nodes[0]!;
}

/** The serial number of the certificate a node-1 listener serves now. */
async function serialOf(port: number, me: Transport): Promise<string> {
  const serial = Promise.withResolvers<string>();
  const handlers = lineHandlers<object>({ maxLineBytes: 1024, state: () => ({}), line() {} });
  const conn = await me.dial("127.0.0.1", port, handlers, 5_000, { node: "node-1" });
  serial.resolve(conn.socket.getPeerCertificate().serialNumber);
  conn.destroy();
  return serial.promise;
}

async function serialOfFile(path: string): Promise<string> {
  const { X509Certificate } = await import("node:crypto");
  return new X509Certificate(await Bun.file(path).text()).serialNumber;
}
