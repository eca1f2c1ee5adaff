// What the detail pages (a container, a service, a stack) share: the head with the resource's
// name, state and actions, a facts list, and the card of the resource's last processes.

import { LABELS, announce, perform } from '../actions.js';
import { ApiError, get, seesProcesses } from '../api.js';
import {
  badge, ellipsis, emptyRow, h, idTag, processBadge, processesHref, replace, timeEl, transition,
} from '../dom.js';

/** A `dt`/`dd` pair; an empty value shows a dash. */
export function fact(label, value) {
  const empty = value === null || value === undefined || value === '' || (Array.isArray(value) && !value.length);
  return [h('dt', null, label), h('dd', null, empty ? h('span', { class: 'muted' }, '—') : value)];
}

/** A map (environment, labels) as a small key/value table, each cell cut with an ellipsis. */
export function mapTable(map, label) {
  const entries = Object.entries(map || {});
  if (!entries.length) return null;
  return h('table', { class: 'kv', 'aria-label': label },
    h('tbody', null, entries.map(([key, value]) => h('tr', null,
      h('th', { scope: 'row' }, ellipsis(key, { cls: 'mono' })),
      h('td', null, ellipsis(typeof value === 'string' ? value : JSON.stringify(value), { cls: 'mono' }))))));
}

/**
 * The head of a detail page: breadcrumb, name, id, state, and a button per action; `onDone`
 * gets the resource an action answered with.
 */
export function detailHead({ type, listHref, listLabel, actions, onDone }) {
  const title = h('h1', { class: 'ellipsis' }, '…');
  const crumbName = h('span', { class: 'ellipsis crumb-name' });
  const subtitle = h('div', { class: 'sub' });
  const buttons = {};
  let current = null;
  for (const action of actions) {
    const button = h('button', { type: 'button', class: action === 'remove' ? 'danger' : null, disabled: true }, LABELS[action]);
    button.addEventListener('click', async () => {
      if (!current) return;
      const resource = current;
      button.disabled = true;
      const updated = await perform(type, resource, action);
      if (updated) {
        onDone(updated);
        await announce(type, updated, LABELS[action]);
      } else {
        update(current);
      }
    });
    buttons[action] = button;
  }
  const el = h('header', { class: 'page-head' },
    h('div', { class: 'head-main' },
      h('nav', { class: 'crumbs', 'aria-label': 'Breadcrumb' }, h('a', { href: listHref }, listLabel), ' / ', crumbName),
      title, subtitle),
    h('div', { class: 'head-actions' }, Object.values(buttons)));

  function update(resource) {
    current = resource;
    const name = resource.name || '(unnamed)';
    title.textContent = name;
    title.title = name.length > 2000 ? `${name.slice(0, 2000)}…` : name;
    crumbName.textContent = name;
    crumbName.title = title.title;
    replace(subtitle, idTag(resource.id), ' ', badge(resource.state), transition(resource));
    for (const [action, button] of Object.entries(buttons)) {
      const allowed = Boolean(resource.actions && resource.actions[action]);
      button.disabled = !allowed;
      button.setAttribute('aria-label', `${LABELS[action]} ${name}`);
      button.title = allowed ? `${LABELS[action]} ${name}` : `${LABELS[action]} is not possible while ${resource.state}`;
    }
  }
  return { el, update };
}

/** An error callout; a 404 says the resource does not exist. */
export function showError(box, err, what) {
  box.hidden = false;
  replace(box, h('strong', null, err instanceof ApiError && err.status === 404 ? `No such ${what}` : `Cannot load the ${what}`), err.message);
}

/**
 * The last processes of one resource, newest first, with a link to all of them on the
 * Processes page; nothing for a key the API does not show processes to.
 */
export function processesCard(type, id, { limit = 10 } = {}) {
  const body = h('tbody');
  const el = h('section', { class: 'card', 'aria-labelledby': 'detail-processes-title' },
    h('header', null, h('h2', { id: 'detail-processes-title' }, 'Processes'),
      h('a', { href: processesHref(type, id), style: 'font-size:.85rem' }, 'Every process of this resource →')),
    h('div', { class: 'table-wrap' }, h('table', { class: 'grid', 'aria-labelledby': 'detail-processes-title' },
      h('thead', null, h('tr', null, h('th', { scope: 'col' }, 'Process'), h('th', { scope: 'col' }, 'State'),
        h('th', { scope: 'col', class: 'num' }, 'Attempts'), h('th', { scope: 'col' }, 'Started'), h('th', { scope: 'col' }, 'Last error'))),
      body)));
  if (!seesProcesses()) {
    el.hidden = true;
    return { el, load: async () => {} };
  }
  let generation = 0;
  async function load() {
    const mine = ++generation;
    try {
      const page = await get(`processinstances?resourceType=${encodeURIComponent(type)}&resourceId=${encodeURIComponent(id)}&sort=desc&limit=${limit}`);
      if (mine !== generation) return;
      const rows = page.data || [];
      replace(body, rows.length ? rows.map((p) => h('tr', { dataset: { id: p.id, process: p.processName } },
        h('td', null, h('a', { href: `/processes/${encodeURIComponent(p.id)}`, class: 'primary mono' }, p.processName), h('span', { class: 'secondary mono' }, p.id)),
        h('td', { class: 'nowrap' }, processBadge(p)),
        h('td', { class: 'num' }, String(p.executionCount || 0)),
        h('td', { class: 'nowrap' }, timeEl(p.startTime || p.created)),
        h('td', { class: 'error-cell' }, p.lastError ? h('span', { class: 'clip', title: p.lastError }, p.lastError) : h('span', { class: 'muted' }, '—'))))
        : emptyRow(5, 'No process yet'));
    } catch (err) {
      if (mine !== generation) return;
      replace(body, emptyRow(5, 'Cannot load the processes', err.message));
    }
  }
  return { el, load };
}
