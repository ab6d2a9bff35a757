#!/usr/bin/env bun
/**
 * Load and measurement clients for test/status-load.test.ts, in a process of
 * their own so that the test process's work does not slow them (or their
 * clocks). Each prints `{"event":"ready"}`, runs until SIGTERM, then prints
 * `{"event":"result",...}` and exits.
 *
 *   bun test/load-client.ts peers <http-port> <loops>   GET /peers in <loops> loops, whole bodies read
 *   bun test/load-client.ts ping <registry-port>        a registered session pinging 25 ms apart, each round trip timed
 */
const [mode, portText, loopsText] = process.argv.slice(2);
const port = Number(portText);
let running = true;
const done = Promise.withResolvers<void>();
process.once("SIGTERM", () => {
  running = false;
  done.resolve();
});
const say = (e: Record<string, unknown>) => process.stdout.write(JSON.stringify(e) + "\n");

if (mode === "peers") {
  let requests = 0;
  let bytes = 0;
  const statuses: Record<number, number> = {};
  const started = performance.now();
  const loops = Array.from({ length: Number(loopsText) }, async () => {
    while (running) {
      const res = await fetch(`http://127.0.0.1:${port}/peers`);
      bytes += (await res.arrayBuffer()).byteLength;
      statuses[res.status] = (statuses[res.status] ?? 0) + 1;
      requests++;
    }
  });
  say({ event: "ready" });
  await done.promise;
  await Promise.all(loops);
  say({ event: "result", requests, bytes, ms: performance.now() - started, statuses });
} else if (mode === "ping") {
  // Its listening port answers the registry's probe as "pinger".
  const listener = Bun.listen({
    hostname: "127.0.0.1",
    port: 0,
    socket: {
      data(s, chunk) {
        const m = JSON.parse(chunk.toString().split("\n")[0]!) as { nonce?: string };
        s.write(JSON.stringify({ type: "probe-ok", id: "pinger", nonce: m.nonce }) + "\n");
        s.end();
      },
    },
  });
  const samples: number[] = [];
  let rx = "";
  let onPong: (() => void) | undefined;
  const registered = Promise.withResolvers<void>();
  const session = await Bun.connect({
    hostname: "127.0.0.1",
    port,
    socket: {
      data(_s, chunk) {
        rx += chunk.toString();
        let nl: number;
        while ((nl = rx.indexOf("\n")) >= 0) {
          const line = rx.slice(0, nl);
          rx = rx.slice(nl + 1);
          if (line.startsWith('{"type":"registered"')) registered.resolve();
          else if (line === '{"type":"pong"}') onPong?.();
        }
      },
    },
  });
  session.write(`{"type":"register","v":1,"id":"pinger","port":${listener.port}}\n`);
  await registered.promise;
  say({ event: "ready" });
  while (running) {
    const t = performance.now();
    await new Promise<void>((resolve) => {
      onPong = resolve;
      session.write('{"type":"ping"}\n');
    });
    samples.push(performance.now() - t);
    await Bun.sleep(25); // pacing the samples, not waiting for anything
  }
  session.write('{"type":"leave"}\n');
  say({ event: "result", samples });
} else {
  process.stderr.write("usage: bun test/load-client.ts peers <http-port> <loops> | ping <registry-port>\n");
  process.exit(2);
}
process.exit(0);
