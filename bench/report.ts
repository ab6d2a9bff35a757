import type { Msg } from "./lib.ts";
export async function writeReport(results: Msg, paths: { md: string; svg: string; svgRef: string }): Promise<void> {
  await Bun.write(paths.md, "# stub\n\n```json\n" + JSON.stringify(results, null, 1) + "\n```\n");
}
