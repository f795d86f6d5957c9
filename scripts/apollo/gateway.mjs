// Serve @apollo/gateway 2.x (behind @apollo/server 5) over running subgraphs: the reference the
// differential tests and the federation benchmark compare UniHealth's own gateway with.
//
// Usage (one of --subgraphs / --supergraph):
//   node gateway.mjs --port 0 --subgraphs patient=http://127.0.0.1:4001/graphql,observation=...
//       IntrospectAndCompose: reads each subgraph's `_service { sdl }` at start and composes.
//   node gateway.mjs --port 0 --supergraph supergraph.graphql [--override observation=http://...]
//       a static supergraph SDL (compose.mjs output); --override replaces subgraph URLs.
// When it listens, it writes one JSON line to stdout: {"url": "http://127.0.0.1:PORT/graphql"}.
// Authorization, X-Facility-Id and X-Request-Id are forwarded to every subgraph request (Apollo
// forwards no header by default). Test harness settings: loopback only, no landing page, no CSRF
// preflight requirement, no stack traces in errors, Apollo telemetry and usage reporting off.
// SIGTERM/SIGINT stop it.
process.env.APOLLO_TELEMETRY_DISABLED = "1";
delete process.env.APOLLO_KEY;
delete process.env.APOLLO_GRAPH_REF;

import { readFileSync } from "node:fs";
import { ApolloServer } from "@apollo/server";
import { startStandaloneServer } from "@apollo/server/standalone";
import { ApolloServerPluginLandingPageDisabled } from "@apollo/server/plugin/disabled";
import { ApolloGateway, IntrospectAndCompose, RemoteGraphQLDataSource } from "@apollo/gateway";

const FORWARDED = ["authorization", "x-facility-id", "x-request-id"];

function parseArgs(argv) {
  const args = { port: 0, subgraphs: null, supergraph: null, override: {} };
  const pairs = (text) =>
    Object.fromEntries(
      text.split(",").filter(Boolean).map((part) => {
        const at = part.indexOf("=");
        if (at < 1) throw new Error(`expected name=url, got ${part}`);
        return [part.slice(0, at), part.slice(at + 1)];
      }),
    );
  for (let i = 2; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (value === undefined) throw new Error(`${flag} needs a value`);
    if (flag === "--port") args.port = Number(value);
    else if (flag === "--subgraphs") args.subgraphs = pairs(value);
    else if (flag === "--supergraph") args.supergraph = value;
    else if (flag === "--override") args.override = pairs(value);
    else throw new Error(`unknown option ${flag}`);
  }
  if (!args.subgraphs === !args.supergraph) throw new Error("give exactly one of --subgraphs and --supergraph");
  return args;
}

class ForwardingDataSource extends RemoteGraphQLDataSource {
  willSendRequest({ request, context }) {
    for (const name of FORWARDED) {
      const value = context?.headers?.[name];
      if (value) request.http.headers.set(name, Array.isArray(value) ? value[0] : value);
    }
  }
}

let args;
try {
  args = parseArgs(process.argv);
} catch (error) {
  process.stderr.write(`gateway.mjs: ${error.message}\n`);
  process.exit(2);
}

const gateway = new ApolloGateway({
  ...(args.subgraphs
    ? {
        supergraphSdl: new IntrospectAndCompose({
          subgraphs: Object.entries(args.subgraphs).map(([name, url]) => ({ name, url })),
        }),
      }
    : { supergraphSdl: readFileSync(args.supergraph, "utf8") }),
  buildService: ({ name, url }) => new ForwardingDataSource({ url: args.override[name] ?? url }),
});

const server = new ApolloServer({
  gateway,
  introspection: true,
  csrfPrevention: false,
  includeStacktraceInErrorResponses: false,
  plugins: [ApolloServerPluginLandingPageDisabled()],
});

const { url } = await startStandaloneServer(server, {
  listen: { host: "127.0.0.1", port: args.port },
  context: async ({ req }) => ({ headers: req.headers }),
});
process.stdout.write(JSON.stringify({ url: new URL("graphql", url).toString() }) + "\n");

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, async () => {
    await server.stop();
    process.exit(0);
  });
}
