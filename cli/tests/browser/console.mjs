// Drives the lead's console in headless Chromium (Debian's package) the way a lead
// would: reads each page, resolves a conflict by clicking, watches a need change while
// a phone syncs (no reload), accepts a quarantined phone's held changes, downloads an
// export. Writes a screenshot of every page to OUT. Talks to the Rust test on
// stdout/stdin: prints "WAITING <what>" and waits for a line "GO" before checking.
//
// Usage: node console.mjs URL OUT
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";
import { mkdirSync } from "node:fs";

const [url, out] = process.argv.slice(2);
mkdirSync(out, { recursive: true });
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const fail = (msg) => { throw new Error(msg); };
const step = (msg) => console.log(`STEP ${msg}`);
async function waitFor(what) {
  console.log(`WAITING ${what}`);
  const { value, done } = await lines.next();
  if (done || value.trim() !== "GO") fail(`expected GO for ${what}, got ${value}`);
}

let code = 0;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
         "--no-first-run", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1024, height: 900 } });
  page.setDefaultTimeout(20000);
  const nav = (name) => page.getByRole("navigation", { name: "Pages" }).getByRole("link", { name });

  // Today: the link with the key sets the session cookie and lands on the day.
  await page.goto(url);
  if (!page.url().endsWith("/today")) fail(`landed on ${page.url()}`);
  await page.getByRole("heading", { name: "Tasks by status" }).waitFor();
  await page.getByRole("heading", { name: "On duty" }).waitFor();
  const total = await page.locator("tfoot td").first().innerText();
  if (!/\d/.test(total)) fail(`no tally total: ${total}`);
  if (!(await page.locator("#sync").innerText()).includes("Online")) {
    await page.locator("#sync[data-state=online]").waitFor();
  }
  await page.screenshot({ path: `${out}/today.png`, fullPage: true });
  step("today");

  // Conflicts: keep one value with a click.
  await nav("Conflicts").click();
  const keep = page.getByRole("button", { name: /^Keep "/ }).first();
  await keep.waitFor();
  await page.screenshot({ path: `${out}/conflicts.png`, fullPage: true });
  const kept = (await keep.getAttribute("aria-label")).replace(/^Keep "|"$/g, "");
  await keep.click();
  await page.getByText("No conflicting edits").waitFor();
  console.log(`KEPT ${kept}`);
  step("conflicts");

  // Needs: most urgent first; a phone changes a need's status and syncs, and the row
  // changes here without a reload.
  await nav("Needs").click();
  const row = page.locator("tr[data-need]").first();
  await row.waitFor();
  const need = await row.getAttribute("data-need");
  const before = await row.getAttribute("data-status");
  await page.screenshot({ path: `${out}/needs.png`, fullPage: true });
  console.log(`NEED ${need} ${before}`);
  await page.evaluate(() => { window.__reloaded = false; window.addEventListener("beforeunload", () => { window.__reloaded = true; }); });
  await waitFor("need-change");
  await page.locator(`tr[data-need="${need}"][data-status="in_progress"]`).waitFor();
  if (await page.evaluate(() => window.__reloaded)) fail("the page reloaded instead of updating");
  await page.screenshot({ path: `${out}/needs-live.png`, fullPage: true });
  step("needs");

  // The lead assigns the need from the page, with the keyboard.
  const assign = page.locator(`tr[data-need="${need}"] input[name=value]`);
  await assign.focus();
  await page.keyboard.type("bao");
  await page.keyboard.press("Enter");
  await page.locator(`tr[data-need="${need}"]`).getByText("bao", { exact: true }).waitFor();
  step("assign");

  // Devices: the quarantined phone is listed; accept its held changes.
  await nav("Devices").click();
  const held = page.locator("tr[data-held]").first();
  await held.waitFor();
  const device = await held.getAttribute("data-held");
  await page.screenshot({ path: `${out}/devices.png`, fullPage: true });
  await page.getByRole("button", { name: `Accept ${device}'s changes` }).click();
  await page.getByText("Nothing is held").waitFor();
  console.log(`ACCEPTED ${device}`);
  step("devices");

  // Export: every document, three formats; the CSV of the day downloads.
  await nav("Export").click();
  const csv = page.getByRole("link", { name: "CSV" }).first();
  await csv.waitFor();
  await page.screenshot({ path: `${out}/export.png`, fullPage: true });
  const href = await csv.getAttribute("href");
  const res = await page.request.get(new URL(href, page.url()).toString());
  if (res.status() !== 200 || (await res.body()).length === 0) fail(`export answered ${res.status()}`);
  step("export");

  // A write from anywhere but the console's own pages is refused.
  const forged = await page.request.post(new URL("/conflicts/resolve", page.url()).toString(), {
    headers: { Origin: "http://evil.example" },
    form: { doc: "ledger/x/2026-01-01", conflict: "x", choice: "0" },
  });
  if (forged.status() !== 403) fail(`a cross-origin write answered ${forged.status()}`);
  // And a tablet: the pages fit 768 px.
  await page.setViewportSize({ width: 768, height: 1024 });
  await nav("Needs").click();
  await page.locator("tr[data-need]").first().waitFor();
  await page.screenshot({ path: `${out}/needs-tablet.png`, fullPage: true });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth + 1);
  if (overflow) fail("the needs page is wider than a tablet");
  step("security and tablet");
  console.log("DONE");
} catch (e) {
  console.log(`FAIL ${String(e.message || e).split("\n")[0]}`);
  code = 1;
} finally {
  await browser.close();
}
// stdin (the test's answers) would keep node alive.
process.exit(code);
