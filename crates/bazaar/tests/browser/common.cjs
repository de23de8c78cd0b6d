// What the browser scenarios share: Debian's Chromium launched headless with the flags this
// machine's closed network needs, assertions, reading a page as a person does, signing in,
// and a scenario runner that explains a failure with the page it happened on.
"use strict";
const { chromium } = require("playwright-core");

const BASE = process.env.BAZAAR_URL;
const DESKTOP = { width: 1280, height: 860 };
const PHONE = { width: 390, height: 844 };

function check(condition, what) {
  if (!condition) throw new Error(what);
}

async function text(page) {
  return (await page.locator("main").innerText()).replace(/\s+/g, " ");
}

function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
}

async function signIn(page, email, password) {
  await page.goto(`${BASE}/account/signin`);
  await page.getByLabel("Email", { exact: true }).fill(email);
  await page.getByLabel("Password", { exact: true }).fill(password);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByText(`Signed in as ${email}`).waitFor();
}

// The page a failure is explained with.
const shown = { page: null };

async function scenario(name, body) {
  const started = Date.now();
  try {
    await body();
  } catch (e) {
    const page = shown.page;
    const seen = page ? `${page.url()}: ${await text(page).catch(() => "(no page)")}` : "";
    throw new Error(`${name}: ${e.message}\n  the page showed ${seen}`);
  }
  console.log(`ok - ${name} (${Date.now() - started} ms)`);
}

function run(main) {
  main().catch((e) => {
    console.error(`not ok - ${e.stack || e}`);
    process.exit(1);
  });
}

module.exports = { BASE, DESKTOP, PHONE, check, text, launch, signIn, shown, scenario, run };
