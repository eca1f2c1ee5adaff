// drover's web UI end to end: the real server and agent, headless Chromium, no reloads.
// Each step awaits what the UI shows (Playwright's auto-waiting locators), never a fixed sleep.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { ADMIN_ACCESS, ADMIN_SECRET, Harness, screenshot } from './harness.mjs';

const harness = new Harness();
let page;
/** Ids the steps share: the UI shows them, later steps use them. */
const ids = {};

before(async () => {
  await harness.startServer({
    // A failing process ends quickly: three attempts, at most 300 ms apart.
    DROVER_PROCESS_MAX_ATTEMPTS: '3',
    DROVER_PROCESS_RETRY_MAX_WAIT_MILLIS: '300',
    DROVER_AGENT_PING_INTERVAL_MILLIS: '1000',
    DROVER_RESOURCE_CHANGE_INTERVAL_MILLIS: '200',
  });
  await harness.startAgent();
  const browser = await harness.launchBrowser();
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  context.setDefaultTimeout(20000);
  page = await context.newPage();
  page.on('pageerror', (error) => console.log(`page error: ${error.message}`));
  page.on('console', (message) => {
    if (message.type() === 'error') console.log(`console error: ${message.text()}`);
  });
});

after(async () => {
  await harness.stop();
});

/** The sidebar link to a page. */
function nav(name) {
  return page.getByRole('navigation', { name: 'Main' }).getByRole('link', { name });
}

test('logs in with an API key through the form', async () => {
  await page.goto(`${harness.url}/`);
  await page.getByLabel('Access key', { exact: true }).waitFor();
  await screenshot(page, 'login');

  await page.getByLabel('Access key', { exact: true }).fill(ADMIN_ACCESS);
  await page.getByLabel('Secret key', { exact: true }).fill('not-the-secret');
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.getByRole('alert').filter({ hasText: 'That key was refused' }).waitFor();

  await page.getByLabel('Secret key', { exact: true }).fill(ADMIN_SECRET);
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.getByRole('heading', { name: 'Processes', level: 1 }).waitFor();
  // From here on nothing reloads the page: this mark would be lost.
  await page.evaluate(() => { window.noReloadMark = 'still here'; });
  await page.locator('.live[data-state="open"]').waitFor();
  // The key is in session storage only, never in a cookie or the URL.
  assert.equal(await page.evaluate(() => document.cookie), '');
  assert.ok(!page.url().includes(ADMIN_SECRET));
});

test('hosts show the agent active, its last ping and facts', async () => {
  await nav('Hosts').click();
  const host = page.locator('article.host').first();
  await host.locator('.host-title .badge[data-state="active"]').waitFor();
  await host.locator('.agentline .badge[data-state="active"]').waitFor();
  // agent.ping events arrive every second: the last ping is a relative time, not "waiting".
  await host.locator('.agentline .last-ping time').waitFor();
  await host.getByText('CPUs', { exact: true }).waitFor();
  ids.host = await host.getAttribute('id');
  assert.match(ids.host, /^1h\d+$/);
  await screenshot(page, 'hosts');
});

test('a container started from the UI shows its process in Running, then in Done, without a reload', async () => {
  await nav('Containers').click();
  await page.getByLabel('Name', { exact: true }).fill('web-1');
  await page.getByLabel('Command', { exact: true }).fill('sleep 300');
  // A slow agent: the start stays Running until it is thawed.
  harness.freezeAgent();
  await page.getByRole('button', { name: 'Run' }).click();
  const row = page.locator('tr[data-name="web-1"]');
  await row.locator('.badge[data-state="starting"]').waitFor();
  ids.web = await row.getAttribute('data-id');
  assert.match(ids.web, /^1i\d+$/);
  // The action shows its process at once.
  await page.locator('.toast').filter({ hasText: 'web-1' }).getByRole('link').first().waitFor();

  // The start is claimed and waits for the frozen agent: Processes opens on Running, the
  // first tab with work in it.
  for (let i = 0; i < 200; i += 1) {
    const summary = await harness.api('GET', 'processsummary');
    if (summary.data.some((row) => row.processName === 'instance.start' && row.running)) break;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  await nav('Processes').click();
  await page.getByRole('tab', { name: /Running/, selected: true }).waitFor();
  const running = page.locator(`#process-panel tr[data-process="instance.start"]`).filter({ has: page.locator(`a.id:text-is("${ids.web}")`) });
  await running.waitFor();
  await running.locator('.badge[data-state="running"]').waitFor();
  await page.getByRole('tab', { name: /Running \(1\)/ }).waitFor();
  await screenshot(page, 'processes-running');

  harness.thawAgent();
  await running.waitFor({ state: 'detached' });
  await page.getByRole('tab', { name: /Done/ }).click();
  const done = page.locator(`#process-panel tr[data-process="instance.start"]`).filter({ has: page.locator(`a.id:text-is("${ids.web}")`) });
  await done.locator('.badge', { hasText: 'SUCCESS' }).waitFor();
  // The Done tab counts what ended (processSummary's done), updated live too.
  await page.getByRole('tab', { name: /Done \([1-9]\d*\)/ }).waitFor();
  assert.equal(await page.evaluate(() => window.noReloadMark), 'still here');
  await screenshot(page, 'processes-done');
});

test('a process that cannot succeed fails at once and shows the agent\'s error', async () => {
  await nav('Containers').click();
  await page.getByLabel('Name', { exact: true }).fill('broken');
  await page.getByLabel('Command', { exact: true }).fill('/nonexistent/drover-ui-test --flag');
  await page.getByRole('button', { name: 'Run' }).click();
  const row = page.locator('tr[data-name="broken"]');
  await row.waitFor();
  ids.broken = await row.getAttribute('data-id');
  // The agent marks a missing executable permanent: one attempt, then the container is in
  // error with a message that says why (no retries over a minute).
  await row.locator('.badge[data-state="error"]').waitFor();
  await row.getByText(/failed permanently/).waitFor();

  await nav('Processes').click();
  await page.getByRole('tab', { name: /Done/ }).click();
  await page.getByLabel('Result', { exact: true }).selectOption('FAILURE');
  await page.getByLabel('Resource', { exact: true }).fill(ids.broken);
  const failed = page.locator('#process-panel tr[data-process="instance.start"]');
  await failed.locator('.badge', { hasText: 'FAILURE' }).waitFor();
  await failed.locator('td.num', { hasText: /^1$/ }).waitFor();
  await failed.locator('td.error-cell', { hasText: 'cannot run' }).waitFor();
  assert.match(page.url(), /result=FAILURE/);
  await screenshot(page, 'processes-failed');

  await failed.getByRole('link', { name: 'instance.start' }).click();
  await page.getByRole('heading', { name: 'instance.start', level: 1 }).waitFor();
  await page.locator('.callout.red', { hasText: 'Failed for good after 1 attempt (PERMANENT)' }).waitFor();
  const attempts = page.locator('tr[data-execution]');
  await attempts.first().waitFor();
  assert.equal(await attempts.count(), 1);
  await attempts.first().locator('td > .badge', { hasText: 'PERMANENT' }).waitFor();
  await attempts.first().getByText(/cannot run "\/nonexistent\/drover-ui-test"/).first().waitFor();
  assert.equal(await page.getByRole('button', { name: 'Replay this process', exact: true }).isEnabled(), true);
  assert.equal(await page.getByRole('button', { name: 'Cancel this process', exact: true }).isEnabled(), false);
  await screenshot(page, 'process-detail');
});

test('container actions run live and show their process', async () => {
  await nav('Containers').click();
  const row = page.locator(`tr[data-id="${ids.web}"]`);
  await row.locator('.badge[data-state="running"]').waitFor();
  await page.getByRole('button', { name: 'Stop web-1', exact: true }).click();
  await page.locator('.toast', { hasText: 'instance.stop' }).waitFor();
  await row.getByRole('link', { name: /instance\.stop/ }).waitFor();
  await row.locator('.badge[data-state="stopped"]').waitFor();
  await page.getByRole('button', { name: 'Start web-1', exact: true }).click();
  await row.locator('.badge[data-state="running"]').waitFor();
  await screenshot(page, 'containers');
  assert.equal(await page.evaluate(() => window.noReloadMark), 'still here');
});

test('volumes and services: create, activate, scale', async () => {
  await nav('Volumes').click();
  await page.getByLabel('Name', { exact: true }).fill('data-1');
  await page.getByRole('button', { name: 'Create' }).click();
  const volume = page.locator('tr[data-name="data-1"]');
  await volume.locator('.badge[data-state="active"]').waitFor();
  await screenshot(page, 'volumes');

  await nav('Services').click();
  await page.getByLabel('Name', { exact: true }).fill('web');
  await page.getByLabel('Command', { exact: true }).fill('sleep 600');
  await page.getByRole('button', { name: 'Create' }).click();
  const service = page.locator('tr[data-name="web"]');
  await service.locator('.badge[data-state="active"]').waitFor();
  await page.getByRole('button', { name: 'Scale web up', exact: true }).click();
  await page.locator('.toast', { hasText: 'service.update' }).waitFor();
  await page.waitForFunction(() => document.querySelector('tr[data-name="web"] input[type=number]')?.value === '2');
  await service.locator('.badge[data-state="active"]').waitFor();
  await screenshot(page, 'services');
});

test('events: a live tail with a name filter and a pause button', async () => {
  await nav('Events').click();
  await page.getByLabel('Subscribe to a name').fill('ui.test');
  await page.getByRole('button', { name: 'Subscribe', exact: true }).click();
  await page.locator('.chip', { hasText: 'ui.test' }).waitFor();
  // The socket resubscribes with the new name; "Live" again means the server confirmed it.
  await page.locator('.live[data-state="open"]').waitFor();
  await harness.api('POST', 'publish', { name: 'ui.test', data: { hello: 'ui' } });
  await page.locator('details.ev[data-name="ui.test"]').first().waitFor();
  await page.locator('details.ev[data-name="agent.ping"]').first().waitFor();

  await page.getByLabel('Filter by event name').fill('ui.test');
  await page.waitForFunction(() => [...document.querySelectorAll('details.ev')].every((el) => el.dataset.name === 'ui.test'));

  await page.getByRole('button', { name: 'Pause the event stream', exact: true }).click();
  const before = await page.locator('details.ev').count();
  await harness.api('POST', 'publish', { name: 'ui.test', data: { paused: true } });
  await page.getByText(/Paused: \d+ new events? held/).waitFor();
  assert.equal(await page.locator('details.ev').count(), before);
  await page.getByRole('button', { name: 'Resume the event stream', exact: true }).click();
  await page.waitForFunction((n) => document.querySelectorAll('details.ev').length > n, before);
  await page.locator('details.ev[data-name="ui.test"]').first().locator('summary').click();
  await page.locator('details.ev[open] pre.json').waitFor();

  await page.getByLabel('Filter by event name').fill('');
  // A container action shows up in the tail as it happens: state.change, then resource.change.
  await harness.api('POST', `containers/${ids.web}?action=restart`, {});
  await page.locator(`details.ev[data-name="state.change"]`).filter({ hasText: ids.web }).first().waitFor();
  await page.locator(`details.ev[data-name="process.change"]`).filter({ hasText: ids.web }).first().waitFor();
  await page.locator(`details.ev[data-name="resource.change"]`).filter({ hasText: 'web-1' }).first().waitFor();
  await screenshot(page, 'events');
});

test('the cluster page shows this server as a live node holding the leader duty', async () => {
  await nav('Cluster').click();
  const row = page.locator('tbody tr').filter({ hasText: 'this page' });
  await row.locator('.badge', { hasText: 'alive' }).waitFor();
  await row.locator('.badge', { hasText: 'leader' }).waitFor();
  await row.locator('time').waitFor();
  await screenshot(page, 'cluster');
});

test('every page is usable at large-screen width', async () => {
  await page.setViewportSize({ width: 2560, height: 1440 });
  await nav('Processes').click();
  await page.getByRole('heading', { name: 'Unfinished, by process' }).waitFor();
  await screenshot(page, 'processes-2560');
  await nav('Hosts').click();
  await page.locator('article.host').first().waitFor();
  await screenshot(page, 'hosts-2560');
  // Every control has an accessible name.
  for (const target of ['processes', 'containers', 'services', 'events', 'cluster']) {
    await nav(target.charAt(0).toUpperCase() + target.slice(1)).click();
    await page.locator('h1').first().waitFor();
    await page.waitForFunction(() => !document.querySelector('#app[aria-busy]'));
    const unnamed = await page.evaluate(() => {
      const missing = [];
      for (const el of document.querySelectorAll('button, input, select, textarea, a[href]')) {
        if (el.closest('[hidden]')) continue;
        const labelled = el.getAttribute('aria-label') || el.getAttribute('aria-labelledby') ||
          (el.labels && el.labels.length) || (el.textContent || '').trim() || el.getAttribute('title');
        if (!labelled) missing.push(el.outerHTML.slice(0, 120));
      }
      return missing;
    });
    assert.deepEqual(unnamed, [], `controls without an accessible name on ${target}`);
  }
  assert.equal(await page.evaluate(() => window.noReloadMark), 'still here');
});

test('an attempt shows its external handler steps', async () => {
  // A global pre-listener nobody answers: each attempt sends it twice (a retry), times out and
  // fails; the process detail lists that step with its handler, phase and result.
  const handler = await harness.api('POST', 'externalhandlers', {
    name: 'ui-audit', priority: 10, retries: 1, timeoutMillis: 300,
    processConfigs: [{ name: 'pre.instance.start' }],
  });
  try {
    const created = await harness.api('POST', 'containers', { name: 'audited', command: ['sleep', '600'] });
    await nav('Processes').click();
    await page.getByRole('tab', { name: /Done/ }).click();
    await page.getByLabel('Result', { exact: true }).selectOption('FAILURE');
    await page.getByLabel('Resource', { exact: true }).fill(created.id);
    const failed = page.locator('#process-panel tr[data-process="instance.start"]')
      .filter({ has: page.locator(`a.id:text-is("${created.id}")`) });
    await failed.locator('.badge', { hasText: 'FAILURE' }).waitFor();
    await failed.getByRole('link', { name: 'instance.start' }).click();
    await page.getByRole('heading', { name: 'instance.start', level: 1 }).waitFor();
    const step = page.locator('tr[data-execution] li.step[data-handler="ui-audit"]').first();
    await step.waitFor();
    assert.equal(await step.getAttribute('data-phase'), 'pre');
    assert.equal(await step.getAttribute('data-result'), 'timeout');
    await step.getByText('pre.instance.start;handler=ui-audit').waitFor();
    await step.getByText('sent 2×').waitFor();
    await page.locator('tr[data-execution] li.step[data-phase="error"]').first().getByText(/did not answer/).waitFor();
    await screenshot(page, 'process-external-steps');
  } finally {
    await harness.api('DELETE', `externalhandlers/${handler.id}`);
  }
  assert.equal(await page.evaluate(() => window.noReloadMark), 'still here');
});
