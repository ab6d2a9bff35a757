/**
 * Per-client budgets, in one place: how many connections one source address
 * and everyone together may hold. Every cap says why it refused, so the
 * caller can answer with a clear error.
 */

/** Open connections per source address and in all (0 = no cap). */
export class ConnectionCaps {
  private perAddress = new Map<string, number>();
  private admitted = 0;

  constructor(
    private readonly maxPerAddress: number,
    private readonly maxTotal: number,
  ) {}

  /** Connections admitted and still open. */
  get count(): number {
    return this.admitted;
  }

  /**
   * Counts a new connection from `address`. Returns why it is over a cap, or
   * undefined if admitted. Either way the caller calls `release` with the
   * returned ticket when the connection closes.
   */
  admit(address: string): { refused?: string; ticket: CapTicket } {
    const n = (this.perAddress.get(address) ?? 0) + 1;
    this.perAddress.set(address, n);
    if (this.maxPerAddress && n > this.maxPerAddress) {
      return { refused: `more than ${this.maxPerAddress} connections from ${address}`, ticket: { address, admitted: false } };
    }
    // The per-address cap does not stop many addresses at once (one IPv6 /64 holds plenty).
    if (this.maxTotal && this.admitted >= this.maxTotal) {
      return { refused: `registry holds its maximum of ${this.maxTotal} connections`, ticket: { address, admitted: false } };
    }
    this.admitted++;
    return { ticket: { address, admitted: true } };
  }

  release(ticket: CapTicket): void {
    const n = (this.perAddress.get(ticket.address) ?? 1) - 1;
    if (n > 0) this.perAddress.set(ticket.address, n);
    else this.perAddress.delete(ticket.address);
    if (ticket.admitted) this.admitted--;
  }
}

export interface CapTicket {
  address: string;
  admitted: boolean;
}
