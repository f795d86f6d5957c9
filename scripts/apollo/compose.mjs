// Compose subgraph SDLs with Apollo's own composition (@apollo/composition 2.x).
//
// Input (stdin, JSON): {"subgraphs": [{"name": "patient", "url": "http://...", "sdl": "..."}, ...]}
// Output (stdout, JSON): {"errors": [{"code", "message"}], "hints": [{"code", "message"}],
//                         "supergraphSdl": "..." | null}
// Exit status: 0 when the output was written (whether or not composition succeeded), 2 on bad input.
import { composeServices } from "@apollo/composition";
import { parse } from "graphql";

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return Buffer.concat(chunks).toString("utf8");
}

function describe(error) {
  return { code: error.extensions?.code ?? null, message: error.message };
}

let input;
try {
  input = JSON.parse(await readStdin());
  if (!Array.isArray(input.subgraphs) || input.subgraphs.length === 0) throw new Error("no subgraphs");
} catch (error) {
  process.stderr.write(`compose.mjs: expected {"subgraphs": [{name, url, sdl}]} on stdin: ${error.message}\n`);
  process.exit(2);
}

let result;
try {
  const services = input.subgraphs.map((s) => ({
    name: s.name,
    url: s.url ?? `http://${s.name}.invalid/graphql`,
    typeDefs: parse(s.sdl),
  }));
  result = composeServices(services);
} catch (error) {
  result = { errors: [error], hints: [] };
}

const output = {
  errors: (result.errors ?? []).map(describe),
  hints: (result.hints ?? []).map((h) => ({ code: h.definition?.code ?? null, message: h.message })),
  supergraphSdl: result.errors ? null : (result.supergraphSdl ?? null),
};
process.stdout.write(JSON.stringify(output) + "\n");
