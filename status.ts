export function startStatusServer(..._a: unknown[]): { url: string } { throw new Error("not yet"); }
