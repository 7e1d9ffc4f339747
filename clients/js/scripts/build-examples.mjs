// Bundles the React example (examples/react/app.jsx → examples/react/dist/app.js) with esbuild, against
// the freshly built client in dist/. The React-free example needs no build: it imports dist/index.js.
import { build } from "esbuild";
import { fileURLToPath } from "node:url";
import path from "node:path";

const here = path.dirname(fileURLToPath(import.meta.url));
const pkg = path.resolve(here, "..");
const examples = path.resolve(pkg, "../../examples");

await build({
  entryPoints: [path.join(examples, "react/app.jsx")],
  outfile: path.join(examples, "react/dist/app.js"),
  bundle: true,
  format: "esm",
  target: "es2022",
  jsx: "automatic",
  minify: true,
  legalComments: "none",
  logLevel: "warning",
  define: { "process.env.NODE_ENV": '"production"' },
  // The example lives outside the package: React comes from the package's node_modules, and
  // `@kck/client` is the package itself.
  nodePaths: [path.join(pkg, "node_modules")],
  plugins: [
    {
      name: "kck-client",
      setup(b) {
        b.onResolve({ filter: /^@kck\/client(\/react)?$/ }, (args) => ({
          path: path.join(pkg, "dist", args.path.endsWith("/react") ? "react.js" : "index.js"),
        }));
      },
    },
  ],
});
