// The detail pages (container, service, stack), Stacks, Settings, API keys, the "not found"
// page, the confirmation before removing what runs, Processes' first tab and Done times, and
// long names at 1400×900: the real server and agent, headless Chromium. Every "live" step
// changes something through the API after the page loaded and waits for the page to show it,
// with a mark on `window` that a reload would lose.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { Harness, login, screenshot } from './harness.mjs';

const harness = new Harness('pages');
let page;
const ids = {};
/** A valid name of the longest length the API takes: 255 characters, no control character. */
const LONG = 'a-very-long-name-'.repeat(15);
assert.equal(LONG.length, 255);

before(async () => {
  await harness.startServer({
    DROVER_PROCESS_MAX_ATTEMPTS: '3',
    DROVER_PROCESS_RETRY_MAX_WAIT_MILLIS: '300',
    DROVER_AGENT_PING_INTERVAL_MILLIS: '1000',
    DROVER_RESOURCE_CHANGE_INTERVAL_MILLIS: '200',
  });
  await harness.startAgent();
  const browser = await harness.launchBrowser();
  const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  context.setDefaultTimeout(20000);
  page = await context.newPage();
  page.on('pageerror', (error) => console.log(`page error: ${error.message}`));
  page.on('console', (message) => {
    if (message.type() === 'error') console.log(`console error: ${message.text()}`);
  });
  await login(page, harness.url);
  const hosts = await harness.api('GET', 'hosts');
  await waitFor(async () => (await harness.api('GET', 'hosts')).data.some((h) => h.state === 'active'), 'an active host');
  ids.host = (hosts.data[0] || (await harness.api('GET', 'hosts')).data[0]).id;
});

after(async () => {
  await harness.stop();
});

/** Polls the API (test setup only) until `check` holds; the UI steps use Playwright's waits. */
async function waitFor(check, what) {
  for (let i = 0; i < 200; i += 1) {
    if (await check()) return;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error(`timed out waiting for ${what}`);
}

async function waitState(path, state) {
  await waitFor(async () => (await harness.api('GET', path)).state === state, `${path} to be ${state}`);
}

function nav(name) {
  return page.getByRole('navigation', { name: 'Main' }).getByRole('link', { name, exact: true });
}

async function markPage() {
  await page.evaluate(() => { window.noReloadMark = 'still here'; });
}

async function assertNotReloaded() {
  assert.equal(await page.evaluate(() => window.noReloadMark), 'still here', 'the page was reloaded');
}

test('an unknown route shows the UI\'s "not found" page with a 404, not JSON', async () => {
  const response = await page.goto(`${harness.url}/no/such/page`);
  assert.equal(response.status(), 404);
  assert.match(response.headers()['content-type'], /text\/html/);
  await page.getByRole('heading', { name: 'Page not found', level: 1 }).waitFor();
  await page.getByRole('link', { name: 'Go to the start page' }).waitFor();
  // The shell is there: the sidebar still leads everywhere.
  await nav('Containers').waitFor();
  await screenshot(page, 'not-found');
  // One segment too: a mistyped page name.
  await page.goto(`${harness.url}/containerz`);
  await page.getByRole('heading', { name: 'Page not found', level: 1 }).waitFor();
  // An unknown id under a known page is the page's own "no such" answer.
  await page.goto(`${harness.url}/stacks/1st999`);
  await page.getByRole('alert').filter({ hasText: 'No such stack' }).waitFor();
});

test('stacks: create one, see another appear live, open its page from a deep link', async () => {
  await page.goto(`${harness.url}/stacks`);
  await page.getByRole('heading', { name: 'Stacks', level: 1 }).waitFor();
  await markPage();
  await page.getByLabel('Name', { exact: true }).fill('shop');
  await page.getByRole('button', { name: 'Create', exact: true }).click();
  const row = page.locator('tr[data-name="shop"]');
  await row.locator('.badge[data-state="active"]').waitFor();
  ids.stack = await row.getAttribute('data-id');
  assert.match(ids.stack, /^1st\d+$/);

  // Made through the API after the page loaded: it appears without a reload.
  const other = await harness.api('POST', 'stacks', { name: 'made-elsewhere' });
  await page.locator(`tr[data-id="${other.id}"]`).waitFor();
  await assertNotReloaded();
  await screenshot(page, 'stacks');

  // A service in the stack: the Services page names the stack, not its id.
  const service = await harness.api('POST', 'services', { name: 'web', stackId: ids.stack, scale: 1, launchConfig: { command: ['sleep', '600'] } });
  ids.service = service.id;
  await nav('Services').click();
  const serviceRow = page.locator(`tr[data-id="${ids.service}"]`);
  await serviceRow.getByRole('link', { name: 'shop', exact: true }).waitFor();
  assert.equal(await serviceRow.getByText(ids.stack, { exact: true }).count(), 0);

  // A deep link shows the stack's own page, not the list.
  await page.goto(`${harness.url}/stacks/${ids.stack}`);
  await page.getByRole('heading', { name: 'shop', level: 1 }).waitFor();
  await page.locator(`#stack-services-title`).waitFor();
  await page.locator(`tr[data-id="${ids.service}"] .badge[data-state="active"]`).waitFor();
  await markPage();
  // A service added to the stack through the API shows up live.
  const second = await harness.api('POST', 'services', { name: 'worker', stackId: ids.stack, scale: 0, launchConfig: { command: ['sleep', '600'] } });
  await page.locator(`tr[data-id="${second.id}"]`).waitFor();
  await assertNotReloaded();
  await screenshot(page, 'stack-detail');
});

test('a service\'s page: scale from the page, and a scale change made elsewhere shows live', async () => {
  await page.goto(`${harness.url}/services/${ids.service}`);
  await page.getByRole('heading', { name: 'web', level: 1 }).waitFor();
  await page.locator('.facts').getByRole('link', { name: 'shop' }).waitFor();
  await page.locator('[data-stat="running"]', { hasText: /^1$/ }).waitFor();
  await markPage();
  await page.getByRole('button', { name: 'Scale up', exact: true }).click();
  await page.locator('.toast', { hasText: 'service.update' }).waitFor();
  await page.locator('[data-stat="running"]', { hasText: /^2$/ }).waitFor();
  await page.locator('#service-containers-title').waitFor();
  assert.equal(await page.locator('table[aria-labelledby="service-containers-title"] tbody tr .badge[data-state="running"]').count(), 2);

  // Through the API: the page follows without a reload.
  await harness.api('PUT', `services/${ids.service}`, { scale: 1 });
  await page.locator('[data-stat="scale"]', { hasText: /^1$/ }).waitFor();
  await page.locator('[data-stat="running"]', { hasText: /^1$/ }).waitFor();
  await page.locator('#detail-processes-title').waitFor();
  await page.locator('tr[data-process="service.update"]').first().waitFor();
  await assertNotReloaded();
  await screenshot(page, 'service-detail');
});

test('a container\'s page: deep link, state and processes live, confirmation before removing it', async () => {
  const c = await harness.api('POST', 'containers', { name: 'web-1', command: ['sleep', '600'], environment: { GREETING: 'hello' }, labels: { tier: 'front' } });
  ids.container = c.id;
  await waitState(`containers/${c.id}`, 'running');
  await page.goto(`${harness.url}/containers/${c.id}`);
  await page.getByRole('heading', { name: 'web-1', level: 1 }).waitFor();
  await page.locator('.page-head .badge[data-state="running"]').waitFor();
  await page.getByRole('table', { name: 'Environment' }).getByText('GREETING').waitFor();
  await page.getByRole('table', { name: 'Labels' }).getByText('front').waitFor();
  await page.locator('.facts').getByRole('link', { name: ids.host }).waitFor();
  await page.locator('tr[data-process="instance.start"] .badge', { hasText: 'SUCCESS' }).waitFor();
  await markPage();

  // Stopped through the API: the page shows it, and the stop process, without a reload.
  await harness.api('POST', `containers/${c.id}?action=stop`, {});
  await page.locator('.page-head .badge[data-state="stopped"]').waitFor();
  await page.locator('tr[data-process="instance.stop"] .badge', { hasText: 'SUCCESS' }).waitFor();
  await page.getByRole('button', { name: 'Start web-1', exact: true }).click();
  await page.locator('.page-head .badge[data-state="running"]').waitFor();
  await assertNotReloaded();
  await screenshot(page, 'container-detail');

  // Removing a running container asks first; Cancel changes nothing.
  await page.getByRole('button', { name: 'Remove web-1', exact: true }).click();
  const dialog = page.getByRole('dialog', { name: 'Remove web-1?' });
  await dialog.waitFor();
  await dialog.getByText('is running').waitFor();
  await screenshot(page, 'confirm-remove');
  await dialog.getByRole('button', { name: 'Cancel' }).click();
  await dialog.waitFor({ state: 'detached' });
  assert.equal((await harness.api('GET', `containers/${c.id}`)).state, 'running');

  // From the list too; this time it is removed.
  await nav('Containers').click();
  await page.getByRole('button', { name: 'Remove web-1', exact: true }).click();
  await page.getByRole('dialog', { name: 'Remove web-1?' }).getByRole('button', { name: 'Remove', exact: true }).click();
  await waitState(`containers/${c.id}`, 'removed');
  await page.locator(`tr[data-id="${c.id}"]`).waitFor({ state: 'detached' });

  // A stopped container is removed without a question.
  const stopped = await harness.api('POST', 'containers', { name: 'idle', command: ['sleep', '600'] });
  await waitState(`containers/${stopped.id}`, 'running');
  await harness.api('POST', `containers/${stopped.id}?action=stop`, {});
  await page.locator(`tr[data-id="${stopped.id}"] .badge[data-state="stopped"]`).waitFor();
  await page.getByRole('button', { name: 'Remove idle', exact: true }).click();
  await page.locator(`tr[data-id="${stopped.id}"]`).waitFor({ state: 'detached' });
  assert.equal(await page.getByRole('dialog').count(), 0);
});

test('settings: an admin changes a value, and a change made elsewhere shows live', async () => {
  await nav('Settings').click();
  await page.getByRole('heading', { name: 'Settings', level: 1 }).waitFor();
  const row = page.locator('tr[data-name="events.purge.after.seconds"]');
  await row.locator('.badge', { hasText: 'Default' }).waitFor();
  await markPage();
  await page.getByRole('button', { name: 'Change events.purge.after.seconds', exact: true }).click();
  const input = page.getByLabel('New value of events.purge.after.seconds');
  await input.fill('not a number');
  await page.getByRole('button', { name: 'Save' }).click();
  await row.getByRole('alert').filter({ hasText: 'invalid' }).waitFor();
  await input.fill('43201');
  await page.getByRole('button', { name: 'Save' }).click();
  await row.locator('.setting-value', { hasText: '43201' }).waitFor();
  await row.locator('.badge', { hasText: 'Database' }).waitFor();
  assert.equal((await harness.api('GET', 'settings/events.purge.after.seconds')).value, '43201');

  // Changed through the API after the page loaded.
  await harness.api('PUT', 'settings/process_instance.purge.after.seconds', { value: '3601' });
  const other = page.locator('tr[data-name="process_instance.purge.after.seconds"]');
  await other.locator('.setting-value', { hasText: '3601' }).waitFor();
  await other.locator('.badge', { hasText: 'Database' }).waitFor();
  await harness.api('DELETE', 'settings/events.purge.after.seconds');
  await row.locator('.badge', { hasText: 'Default' }).waitFor();
  await assertNotReloaded();
  await screenshot(page, 'settings');
});

test('API keys: create (the secret shown once), see one made elsewhere live, remove with a confirmation', async () => {
  await nav('API keys').click();
  await page.getByRole('heading', { name: 'API keys', level: 1 }).waitFor();
  await markPage();
  await page.getByLabel('Name', { exact: true }).fill('ci-deploy');
  await page.getByRole('button', { name: 'Create key' }).click();
  const secret = page.locator('#new-key code[data-field="secret"]');
  await secret.waitFor();
  const access = await page.locator('#new-key code[data-field="access"]').textContent();
  const row = page.locator(`tr[data-access="${access}"]`);
  await row.getByText('ci-deploy').waitFor();
  // The secret works, and it is in no list.
  const key = { access, secret: await secret.textContent() };
  assert.equal((await harness.raw('GET', 'containers', undefined, key)).status, 200);
  assert.ok(!(await page.locator('table').textContent()).includes(key.secret));
  await screenshot(page, 'apikeys');

  const made = await harness.api('POST', 'apikeys', { name: 'made-elsewhere' });
  await page.locator(`tr[data-id="${made.id}"]`).waitFor();

  await row.getByRole('button', { name: 'Remove ci-deploy' }).click();
  const dialog = page.getByRole('dialog', { name: 'Remove ci-deploy?' });
  await dialog.getByRole('button', { name: 'Remove', exact: true }).click();
  await row.waitFor({ state: 'detached' });
  assert.equal((await harness.raw('GET', 'containers', undefined, key)).status, 401);
  // Removed through the API: gone from the page too.
  await harness.api('DELETE', `apikeys/${made.id}`);
  await page.locator(`tr[data-id="${made.id}"]`).waitFor({ state: 'detached' });
  await assertNotReloaded();
});

test('processes open on the first tab with work, Done shows end and duration, the resource filter is typed', async () => {
  // Nothing runs, waits or is ready now: the page opens on Done.
  await waitFor(async () => {
    const summary = await harness.api('GET', 'processsummary');
    return summary.data.every((r) => !r.running && !r.ready && !r.delay);
  }, 'no unfinished process');
  await nav('Processes').click();
  await page.getByRole('tab', { name: /Done/, selected: true }).waitFor();
  assert.match(page.url(), /tab=done/);
  const done = page.locator('#process-panel tbody tr[data-process]').first();
  await done.locator('td[data-col="ended"] time').waitFor();
  assert.match(await done.locator('td[data-col="duration"]').textContent(), /^\d+(\.\d)? ?(ms|s)|min/);
  await page.getByRole('columnheader', { name: 'Duration' }).waitFor();
  await screenshot(page, 'processes-done-times');

  // A host and a container with the same number (1h1, 1i1): the container's id lists only
  // the container's processes, not the host's.
  const number = ids.host.replace(/^1h/, '');
  await page.getByLabel('Resource', { exact: true }).fill(`1i${number}`);
  await page.waitForFunction(() => new URL(location.href).searchParams.get('resource') !== null);
  await page.locator('#process-panel tbody tr[data-process^="instance."]').first().waitFor();
  const types = await page.locator('#process-panel tbody tr[data-process] td:nth-child(2) .secondary').allTextContents();
  assert.ok(types.length > 0);
  assert.deepEqual([...new Set(types)], ['container']);
  // A type that contradicts the id is refused with a message, not widened.
  await page.getByLabel('Resource', { exact: true }).fill(`host 1i${number}`);
  await page.getByRole('alert').filter({ hasText: `1i${number} is a container id, not a host one` }).waitFor();

  // "Every process of this resource →" on a process's page keeps the type.
  await page.getByLabel('Resource', { exact: true }).fill(ids.host);
  const hostRow = page.locator('#process-panel tbody tr[data-process^="host."]').first();
  await hostRow.waitFor();
  await hostRow.getByRole('link').first().click();
  await page.getByRole('link', { name: 'Every process of this resource →' }).click();
  await page.waitForFunction(() => new URL(location.href).searchParams.get('resource') !== null);
  assert.equal(new URL(page.url()).searchParams.get('resource'), `host:${ids.host}`);
  // The list is loaded after the navigation: wait for its rows before reading them.
  await page.locator('#process-panel tbody tr[data-process^="host."]').first().waitFor();
  const listed = await page.locator('#process-panel tbody tr[data-process] td:nth-child(2) .secondary').allTextContents();
  assert.deepEqual([...new Set(listed)], ['host']);
});

test('a 255-character name does not widen any page beyond the viewport (1400×900)', async () => {
  const stack = await harness.api('POST', 'stacks', { name: LONG });
  const service = await harness.api('POST', 'services', { name: LONG, stackId: stack.id, scale: 1, launchConfig: { command: ['sleep', LONG.length.toString(), '#', LONG] } });
  const container = await harness.api('POST', 'containers', { name: LONG, command: ['sleep', '600'], labels: { [LONG]: LONG }, environment: { LONG_VALUE: LONG } });
  await harness.api('POST', 'volumes', { name: LONG });
  await harness.api('PUT', `hosts/${ids.host}`, { name: LONG });
  await harness.api('POST', 'apikeys', { name: LONG, description: LONG });
  await waitState(`containers/${container.id}`, 'running');

  const pages = [
    ['containers', '/containers', `tr[data-id="${container.id}"]`],
    ['hosts', '/hosts', `article.host[id="${ids.host}"] h2`],
    ['services', '/services', `tr[data-id="${service.id}"]`],
    ['stacks', '/stacks', `tr[data-id="${stack.id}"]`],
    ['volumes', '/volumes', 'tr[data-name]'],
    ['apikeys', '/apikeys', 'tbody tr[data-id]'],
    ['container-detail', `/containers/${container.id}`, '.page-head h1'],
    ['service-detail', `/services/${service.id}`, 'tr[data-id]'],
    ['stack-detail', `/stacks/${stack.id}`, `tr[data-id="${service.id}"]`],
  ];
  for (const [name, path, ready] of pages) {
    await page.goto(`${harness.url}${path}`);
    await page.locator(ready).first().waitFor();
    await page.locator(`[title="${LONG}"]:visible`).first().waitFor();
    const widths = await page.evaluate(() => ({
      page: document.documentElement.scrollWidth,
      viewport: window.innerWidth,
      tables: [...document.querySelectorAll('.table-wrap')].map((wrap) => [wrap.scrollWidth, wrap.clientWidth]),
      heads: [...document.querySelectorAll('.page-head, .card > header')].map((el) => [el.scrollWidth, el.clientWidth]),
    }));
    assert.ok(widths.page <= widths.viewport, `${name}: the page is ${widths.page} px wide in a ${widths.viewport} px viewport`);
    for (const [scroll, client] of widths.tables) {
      assert.ok(scroll <= client + 1, `${name}: a table is ${scroll} px wide in a ${client} px box`);
    }
    for (const [scroll, client] of widths.heads) {
      assert.ok(scroll <= client + 1, `${name}: a header is ${scroll} px wide in a ${client} px box`);
    }
    await screenshot(page, `long-names-${name}`);
  }
});

test('a project key sees its own keys and its project\'s processes, not the admin\'s', async () => {
  const project = await harness.api('POST', 'projects', { name: 'team-a' });
  const key = await harness.api('POST', `projects/${project.id}/apikeys`, { name: 'team-a-key' });
  const context = await harness.browser.newContext({ viewport: { width: 1400, height: 900 } });
  context.setDefaultTimeout(20000);
  const other = await context.newPage();
  try {
    await login(other, harness.url, key.publicValue, key.secretValue);
    const sidebar = other.getByRole('navigation', { name: 'Main' });
    await sidebar.getByRole('link', { name: 'API keys', exact: true }).click();
    await other.locator(`tr[data-access="${key.publicValue}"]`).getByText('this page\u2019s key').waitFor();
    // Only its project's keys: not the admin's.
    assert.equal(await other.locator('tbody tr[data-id]').count(), 1);
    assert.equal(await sidebar.getByRole('link', { name: 'Settings', exact: true }).count(), 0);
    await screenshot(other, 'apikeys-project');

    const c = await harness.api('POST', 'containers', { name: 'team-a-web', command: ['sleep', '600'] }, { access: key.publicValue, secret: key.secretValue });
    // Its project has no host: the start waits (Delayed, Ready for a moment between tries),
    // and the page opens on that tab, the first with work in it.
    await sidebar.getByRole('link', { name: 'Processes', exact: true }).click();
    await other.getByRole('tab', { name: /^(Delayed|Ready)/, selected: true }).waitFor();
    const mine = (name) => other.locator(`#process-panel tr[data-process="${name}"]`).filter({ has: other.locator(`a.id:text-is("${c.id}")`) });
    await other.getByRole('tab', { name: /Done/ }).click();
    await mine('instance.create').locator('.badge', { hasText: 'SUCCESS' }).waitFor();
    // Only its own project's processes: none of the admin's containers, hosts or services.
    const types = await other.locator('#process-panel tbody tr[data-process] a.id').allTextContents();
    assert.deepEqual([...new Set(types)], [c.id]);
    await screenshot(other, 'processes-project');
    // Its process's page shows the attempts; replay and cancel are for admins.
    await mine('instance.create').getByRole('link', { name: 'instance.create' }).click();
    await other.getByRole('heading', { name: 'instance.create', level: 1 }).waitFor();
    await other.locator('#facts-title').waitFor();
    await other.locator('dl.facts .badge', { hasText: 'SUCCESS' }).waitFor();
    assert.equal(await other.getByRole('alert').filter({ hasText: /./ }).count(), 0, 'the process page shows an error');
    assert.equal(await other.getByRole('button', { name: 'Replay this process' }).count(), 0);
    assert.equal(await other.getByRole('button', { name: 'Cancel this process' }).count(), 0);
  } finally {
    await context.close();
  }
});

test('a container\'s Logs panel follows stdout and stderr, and closes its socket when the page is left', async () => {
  const script = 'i=0; while [ $i -lt 3 ]; do echo "out $i"; echo "err $i" >&2; i=$((i+1)); done; exec sleep 600';
  const c = await harness.api('POST', 'containers', { name: 'talker', command: ['sh', '-c', script] });
  await waitState(`containers/${c.id}`, 'running');
  const sockets = [];
  page.on('websocket', (ws) => {
    if (ws.url().includes('/v1/logs')) sockets.push({ ws, closed: new Promise((resolve) => ws.on('close', resolve)) });
  });
  await page.goto(`${harness.url}/containers/${c.id}`);
  const log = page.getByRole('log', { name: `Log of ${c.id}` });
  await log.locator('.line.stdout', { hasText: 'out 2' }).waitFor();
  await log.locator('.line.stderr', { hasText: 'err 2' }).waitFor();
  await page.locator('.log-status[data-state="open"]').waitFor();
  assert.equal(await log.locator('.line.stdout').count(), 3);
  assert.equal(await log.locator('.line.stderr').count(), 3);
  await screenshot(page, 'container-logs');
  // Leaving the page closes the log's socket.
  assert.equal(sockets.length, 1);
  await nav('Containers').click();
  await page.getByRole('heading', { name: 'Containers', level: 1 }).waitFor();
  await Promise.race([
    sockets[0].closed,
    new Promise((resolve, reject) => setTimeout(() => reject(new Error('the log socket is still open 10 s after the page was left')), 10000)),
  ]);
});

test('a container that exits on its own shows its exit code, end time and the agent\'s message, and its log ends', async () => {
  const c = await harness.api('POST', 'containers', { name: 'quitter', command: ['sh', '-c', 'echo bye; echo oops >&2; exit 3'] });
  await waitFor(async () => {
    const now = await harness.api('GET', `containers/${c.id}`);
    return now.exitCode !== undefined && now.exitCode !== null;
  }, 'the container to end with an exit code');
  await page.goto(`${harness.url}/containers/${c.id}`);
  await markPage();
  const ended = page.locator('#container-exit');
  await ended.locator('strong', { hasText: 'Exited with code 3' }).waitFor();
  await ended.locator('time').waitFor();
  assert.ok(await ended.evaluate((el) => el.classList.contains('red')));
  await page.locator('[data-exit-code="3"]').waitFor();
  const log = page.getByRole('log', { name: `Log of ${c.id}` });
  await log.locator('.line.stdout', { hasText: 'bye' }).waitFor();
  await log.locator('.line.stderr', { hasText: 'oops' }).waitFor();
  // Nothing more will come: the server ends the stream and the panel says so.
  await page.locator('.log-status[data-state="ended"]').waitFor();
  await screenshot(page, 'container-exited');

  // Started again through the API: the page shows it running, without the old code.
  await harness.api('POST', `containers/${c.id}?action=start`, {});
  await page.locator('.page-head .badge[data-state="running"], .page-head .badge[data-state="stopped"]').first().waitFor();
  await assertNotReloaded();
});
