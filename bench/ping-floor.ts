/**
 * The floor under the Redis store, for the "ha" phase: the list in memory, as
 * on one registry, with one PING to a redis-server before each join is
 * decided. Against the memory list it shows what one round trip to the store
 * costs a registration on this machine; against the Redis store, what its
 * scripts, its log and the leave's own round trip cost on top.
 */
import { RedisClient } from "bun";
import { MemoryMembership, type JoinResult, type Member } from "../membership.ts";
import { randomId } from "../protocol.ts";

export class PingFloor extends MemoryMembership {
  private constructor(private readonly client: RedisClient) {
    super(randomId());
  }

  static async open(url: string): Promise<PingFloor> {
    const client = new RedisClient(url, { autoReconnect: false, enableOfflineQueue: false });
    await client.connect();
    return new PingFloor(client);
  }

  override async join(member: Member, replaces: readonly Member[]): Promise<JoinResult> {
    await this.client.send("PING", []);
    return super.join(member, replaces);
  }

  override async close(): Promise<void> {
    this.client.close();
    await super.close();
  }
}
