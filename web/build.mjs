// Builds the viewer into dist/: bundles src/main.js (with the pinned mqtt package) into
// dist/app.js with esbuild and copies public/ (index.html, style.css) next to it.
// Output depends only on the sources and package-lock.json (no timestamps, no hashes).
import { build } from "esbuild";
import { cp, mkdir, rm } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const dist = process.env.RTCAM_WEB_OUT || join(here, "dist");

await rm(dist, { recursive: true, force: true });
await mkdir(dist, { recursive: true });
await build({
  entryPoints: [join(here, "src/main.js")],
  bundle: true,
  format: "esm",
  platform: "browser",
  target: ["es2020", "chrome100", "firefox100", "safari15"],
  minify: true,
  legalComments: "linked", // third-party licences go to app.js.LEGAL.txt
  outfile: join(dist, "app.js"),
  logLevel: "warning",
});
await cp(join(here, "public"), dist, { recursive: true });
// The bundled mqtt package's own licence travels with the bundle.
await cp(join(here, "node_modules/mqtt/LICENSE.md"), join(dist, "mqtt.LICENSE.md"));
console.log(`rtcam viewer built in ${dist}`);
