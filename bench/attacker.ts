/**
 * One attacker in its own process (harness.ts `Attack`), for the benchmark's
 * "Under attack" phase: `bun bench/attacker.ts '{"kind":"sync-spam","port":P,"from":"127.0.0.2","width":96}'`.
 * Prints {"event":"attacking"} once the attack is in place; exits (its
 * sockets closing with it) when its stdin closes.
 * Commands: {"cmd":"stats"} -> what it did so far and how it was answered.
 */
import { Attack, type AttackOptions } from "../harness.ts";
import { cpuMs, emit, serveCommands } from "./lib.ts";

const attack = new Attack(JSON.parse(process.argv[2] ?? "{}") as AttackOptions);

serveCommands(async (cmd) => {
  if (cmd.cmd === "stats") return { ...attack.counts, cpuMs: cpuMs() };
  throw new Error(`unknown command ${String(cmd.cmd)}`);
});
emit({ event: "ready", pid: process.pid });
await attack.ready;
emit({ event: "attacking", ...attack.counts });
