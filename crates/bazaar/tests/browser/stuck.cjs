// An operator meets a saga a payment provider outage left stuck, and retries it from the
// console. Run by tests/browser.rs once the outage has ended: BAZAAR_URL, BAZAAR_SAGA (the
// stuck saga's id), BAZAAR_ADMIN_PASSWORD_FILE, BAZAAR_SCREENSHOTS, CHROMIUM.
"use strict";
const fs = require("fs");
const path = require("path");
const { BASE, DESKTOP, check, text, launch, signIn, shown, scenario, run } = require("./common.cjs");

const SAGA = process.env.BAZAAR_SAGA;
const ADMIN_PASSWORD = fs.readFileSync(process.env.BAZAAR_ADMIN_PASSWORD_FILE, "utf8").trim();

async function main() {
  const browser = await launch();
  try {
    const ops = await (await browser.newContext({ viewport: DESKTOP })).newPage();
    shown.page = ops;
    await scenario("an operator sees the saga the outage left stuck, with its history", async () => {
      await signIn(ops, "admin@bazaar.local", ADMIN_PASSWORD);
      await ops.goto(`${BASE}/console`);
      await ops.getByRole("link", { name: "Sagas" }).click();
      await ops.getByRole("link", { name: SAGA }).click();
      check((await ops.locator("#saga-status").innerText()) === "stuck", "it is stuck");
      const history = await text(ops);
      check(history.includes("compensation kept failing; stuck"), `the history says why: ${history}`);
      await ops.screenshot({ path: path.join(process.env.BAZAAR_SCREENSHOTS, "console-stuck-saga.png"), fullPage: true });
    });
    await scenario("retrying it from the console finishes the compensation", async () => {
      await ops.getByRole("button", { name: "Retry compensation" }).click();
      const deadline = Date.now() + 30000;
      for (;;) {
        const status = (await ops.locator("#saga-status").innerText()).trim();
        if (status === "compensated") break;
        check(Date.now() < deadline, `the retried saga is compensated (still ${status})`);
        await ops.waitForTimeout(300);
        await ops.reload();
      }
      check((await text(ops)).includes("retried by an operator"), "the history records the operator's retry");
      check((await ops.getByRole("button", { name: "Retry compensation" }).count()) === 0, "nothing more to retry");
      await ops.goto(`${BASE}/console/sagas`);
      check((await text(ops)).includes("No saga is stuck."), "no saga is stuck any more");
    });
  } finally {
    await browser.close();
  }
}

run(main);
