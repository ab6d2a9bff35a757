/**
 * Test fixture: the store side of a registry, alone in its own process, so a
 * test can kill -9 it. `bun test/store-holder.ts URL PREFIX REGISTRY COUNT`
 * opens the store, lists COUNT members (ids REGISTRY-0, REGISTRY-1, ...),
 * prints {"event":"ready"} and holds them, heartbeat and all, until killed.
 */
import { openStore } from "../redis.ts";

const [url = "", prefix = "", registryId = "", count = "0"] = process.argv.slice(2);
const store = await openStore(url, { registryId, prefix, heartbeatMs: 100, leaseMs: 1_500 });
for (let i = 0; i < Number(count); i++) {
  const id = `${registryId}-${i}`;
  const r = await store.join(
    { id, host: "127.0.0.1", port: 20_000 + i, source: "127.0.0.1", registry: registryId, joinedAt: Date.now(), ticket: crypto.randomUUID() },
    [],
  );
  if (!r.ok) throw new Error(`${id} is held by ${r.holder.registry}`);
}
console.log(JSON.stringify({ event: "ready", state: store.state, seq: store.seq }));
setInterval(() => {}, 60_000);
