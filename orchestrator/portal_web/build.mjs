// Copy the browser build of mqtt.js into static/vendor/ so the portal needs no CDN and
// Python users need no npm (the copied file is committed). Run: npm ci && npm run build
import { copyFileSync, mkdirSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const source = join(here, "node_modules", "mqtt", "dist", "mqtt.min.js");
const targetDir = join(here, "static", "vendor");
const version = JSON.parse(readFileSync(join(here, "node_modules", "mqtt", "package.json"), "utf8")).version;

mkdirSync(targetDir, { recursive: true });
copyFileSync(source, join(targetDir, "mqtt.min.js"));
console.log(`vendored mqtt.js ${version} -> static/vendor/mqtt.min.js`);
