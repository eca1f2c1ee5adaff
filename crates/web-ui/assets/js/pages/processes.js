// Processes: Running / Delayed / Ready / Done, live. "When something is wrong, look at the
// processes first": what runs now, what waits for its next attempt and why, what ended how.

import { ApiError, get, session } from '../api.js';
import {
  badge, debounce, duration, emptyRow, h, idTag, millis, processBadge, replace, resourceHref, timeEl, typeOfId,
} from '../dom.js';

const TABS = [
  { id: 'running', label: 'Running', hint: 'claimed by a server node, working now (often waiting for an agent)' },
  { id: 'delayed', label: 'Delayed', hint: 'an attempt failed, or it waits for a host or an agent; the next try is scheduled' },
  { id: 'ready', label: 'Ready', hint: 'waiting for a worker (or for the process ahead of it on the same resource)' },
  { id: 'done', label: 'Done', hint: 'ended: succeeded, failed for good, or canceled' },
];
const RESULTS = ['SUCCESS', 'FAILURE', 'CANCELED'];
const PAGE = 50;
const ID = /^\d+[a-z]+\d+$/i;
const TYPES = ['container', 'instance', 'volume', 'host', 'agent', 'stack', 'service', 'externalHandler'];

/**
 * The API filters a "resource" box means: "1i5", "container", "container 1i5",
 * "container:1i5". An id always goes with its type (the one its prefix names): "1i5" never
 * matches host 1h5 or stack 1st5.
 */
export function resourceFilter(text) {
  const out = {};
  for (const word of text.trim().split(/[\s:/]+/).filter(Boolean)) {
    const lower = word.toLowerCase();
    if (ID.test(word)) out.resourceId = lower;
    else if (TYPES.map((t) => t.toLowerCase()).includes(lower)) {
      out.resourceType = lower === 'instance' ? 'container' : TYPES.find((t) => t.toLowerCase() === lower);
    } else out.invalid = word;
  }
  if (out.resourceId && !out.invalid) {
    const implied = typeOfId(out.resourceId);
    if (!implied) out.invalid = out.resourceId;
    else if (out.resourceType && out.resourceType !== implied) out.mismatch = `${out.resourceId} is a ${implied} id, not a ${out.resourceType} one`;
    else out.resourceType = implied;
  }
  return out;
}

/** The first tab with work in it (in tab order), from processSummary's rows; Running if none. */
export function firstBusyTab(rows) {
  const totals = { running: 0, delayed: 0, ready: 0, done: 0 };
  for (const row of rows || []) {
    totals.running += row.running || 0;
    totals.delayed += row.delay || 0;
    totals.ready += row.ready || 0;
    totals.done += row.done || 0;
  }
  return (TABS.find((tab) => totals[tab.id] > 0) || TABS[0]).id;
}

export function mount(root, { navigate }) {
  const params = new URLSearchParams(location.search);
  const state = {
    // Without a tab in the URL the page opens on the first one with work in it.
    tab: TABS.some((t) => t.id === params.get('tab')) ? params.get('tab') : null,
    name: params.get('name') || '',
    resource: params.get('resource') || '',
    result: RESULTS.includes(params.get('result')) ? params.get('result') : '',
    pages: 1,
    rows: [],
    next: null,
    summary: [],
    seen: new Set(),
    loadedTab: null,
  };
  let disposed = false;
  let generation = 0;

  // ---- Elements -----------------------------------------------------------------------
  const tabButtons = {};
  const tabCounts = {};
  const tablist = h('div', { class: 'tabs', role: 'tablist', 'aria-label': 'Process state' });
  for (const tab of TABS) {
    const count = h('span', { class: 'n', 'aria-hidden': 'true' });
    tabCounts[tab.id] = count;
    const button = h('button', {
      type: 'button', role: 'tab', id: `tab-${tab.id}`, 'aria-controls': 'process-panel', title: tab.hint,
    }, tab.label, count);
    button.addEventListener('click', () => selectTab(tab.id));
    button.addEventListener('keydown', (event) => {
      const i = TABS.findIndex((t) => t.id === tab.id);
      const to = event.key === 'ArrowRight' ? TABS[(i + 1) % TABS.length] : event.key === 'ArrowLeft' ? TABS[(i + TABS.length - 1) % TABS.length] : null;
      if (to) {
        event.preventDefault();
        selectTab(to.id);
        tabButtons[to.id].focus();
      }
    });
    tabButtons[tab.id] = button;
    tablist.append(button);
  }

  const names = h('datalist', { id: 'process-names' });
  const nameInput = h('input', { id: 'filter-name', type: 'search', list: 'process-names', value: state.name, placeholder: 'instance.start', class: 'mono', autocomplete: 'off' });
  const resourceInput = h('input', { id: 'filter-resource', type: 'search', value: state.resource, placeholder: '1i5 or container', class: 'mono', autocomplete: 'off' });
  const resultSelect = h('select', { id: 'filter-result', 'aria-label': 'Result' },
    h('option', { value: '' }, 'Any result'),
    RESULTS.map((r) => h('option', { value: r, selected: r === state.result }, r.charAt(0) + r.slice(1).toLowerCase())));
  const clear = h('button', { type: 'button', class: 'ghost' }, 'Clear filters');
  const filterError = h('p', { class: 'form-error', role: 'alert' });
  const toolbar = h('div', { class: 'body' },
    h('form', { class: 'toolbar', role: 'search', 'aria-label': 'Filter processes', onsubmit: (e) => e.preventDefault() },
      h('label', { class: 'field', for: 'filter-name' }, 'Process name', nameInput),
      h('label', { class: 'field', for: 'filter-resource' }, 'Resource', resourceInput),
      h('label', { class: 'field', for: 'filter-result' }, 'Result', resultSelect),
      clear, names),
    filterError);

  const tbody = h('tbody');
  const headRow = h('tr');
  const caption = h('caption', { class: 'sr-only' });
  const more = h('button', { type: 'button', hidden: true }, 'Load more');
  const panelHint = h('p', { class: 'muted', style: 'padding: .7rem 1rem 0; font-size: .85rem' });
  const panel = h('div', { id: 'process-panel', role: 'tabpanel' },
    panelHint,
    h('div', { class: 'table-wrap' }, h('table', { class: 'grid', 'aria-describedby': 'process-caption' },
      caption,
      h('thead', null, headRow),
      tbody)),
    h('div', { class: 'body', style: 'display:flex;justify-content:center' }, more));
  caption.id = 'process-caption';

  const summaryBody = h('tbody');
  const summary = h('section', { class: 'card', 'aria-labelledby': 'summary-title' },
    h('header', null, h('h2', { id: 'summary-title' }, 'Unfinished, by process'), h('span', { class: 'muted', style: 'font-size:.8rem' }, 'from processSummary')),
    h('div', { class: 'table-wrap' }, h('table', { class: 'grid' },
      h('thead', null, h('tr', null, h('th', { scope: 'col' }, 'Process'), h('th', { scope: 'col', class: 'num' }, 'Running'),
        h('th', { scope: 'col', class: 'num' }, 'Ready'), h('th', { scope: 'col', class: 'num' }, 'Delayed'))),
      summaryBody)));

  const error = h('div', { class: 'callout red', role: 'alert', hidden: true });
  replace(root,
    h('header', { class: 'page-head' },
      h('div', null, h('h1', null, 'Processes'),
        h('p', { class: 'sub' }, 'Every operation is a durable process. When something is wrong, look here first: what runs, what waits for its next attempt and why, and how each one ended.'))),
    h('div', { class: 'content' },
      error,
      h('div', { class: 'split' },
        h('section', { class: 'card', 'aria-label': 'Process list' }, tablist, toolbar, panel),
        summary)));

  // ---- Behaviour ----------------------------------------------------------------------
  function syncUrl() {
    const q = new URLSearchParams();
    q.set('tab', state.tab);
    if (state.name) q.set('name', state.name);
    if (state.resource) q.set('resource', state.resource);
    if (state.result) q.set('result', state.result);
    const search = q.toString();
    history.replaceState(null, '', `/processes${search ? `?${search}` : ''}`);
  }

  /** Done shows when each process ended and how long it took; the others when it runs next. */
  function renderHead() {
    const done = state.tab === 'done';
    replace(headRow,
      h('th', { scope: 'col' }, 'Process'), h('th', { scope: 'col' }, 'Resource'), h('th', { scope: 'col' }, 'State'),
      h('th', { scope: 'col', class: 'num' }, 'Attempts'), h('th', { scope: 'col' }, 'Started'),
      done ? [h('th', { scope: 'col' }, 'Ended'), h('th', { scope: 'col', class: 'num' }, 'Duration')]
        : h('th', { scope: 'col' }, 'Next run'),
      h('th', { scope: 'col' }, 'Last error'));
  }

  function selectTab(id) {
    state.tab = id;
    renderHead();
    state.pages = 1;
    for (const tab of TABS) {
      const selected = tab.id === id;
      tabButtons[tab.id].setAttribute('aria-selected', String(selected));
      tabButtons[tab.id].tabIndex = selected ? 0 : -1;
    }
    panel.setAttribute('aria-labelledby', `tab-${id}`);
    const tab = TABS.find((t) => t.id === id);
    panelHint.textContent = `${tab.label}: ${tab.hint}.`;
    caption.textContent = `${tab.label} processes`;
    syncUrl();
    load();
  }

  function query() {
    const q = new URLSearchParams({ state: state.tab, limit: String(Math.min(1000, PAGE * state.pages)) });
    if (state.name) q.set('processName', state.name);
    const resource = resourceFilter(state.resource);
    if (resource.resourceType) q.set('resourceType', resource.resourceType);
    if (resource.resourceId) q.set('resourceId', resource.resourceId);
    if (state.result) q.set('result', state.result);
    return { q, invalid: resource.invalid, mismatch: resource.mismatch };
  }

  async function load() {
    if (!state.tab) return;
    const mine = ++generation;
    const { q, invalid, mismatch } = query();
    filterError.textContent = invalid ? `"${invalid}" is neither a resource id (1i5) nor a type (container, volume, host, agent, service, stack).`
      : mismatch ? `${mismatch}.` : '';
    if (invalid || mismatch) {
      // A filter that cannot match anything is not sent as a looser one.
      state.rows = [];
      state.next = null;
      render(false);
      return;
    }
    try {
      const [list, sum] = await Promise.all([get(`processinstances?${q}`), summaryOf()]);
      if (disposed || mine !== generation) return;
      error.hidden = true;
      const fresh = state.loadedTab === state.tab;
      state.loadedTab = state.tab;
      state.rows = list.data || [];
      state.next = list.pagination && list.pagination.next;
      state.summary = sum.data || [];
      render(fresh);
    } catch (err) {
      if (disposed || mine !== generation) return;
      error.hidden = false;
      replace(error, h('strong', null, 'Cannot load processes'), err.message);
    }
  }

  /** processSummary, or an empty one for a key the API does not show it to. */
  async function summaryOf() {
    try {
      return await get('processsummary');
    } catch (err) {
      if (err instanceof ApiError && err.status === 403 && !session()?.admin) return { data: [] };
      throw err;
    }
  }

  function render(fresh) {
    const totals = { running: 0, ready: 0, delayed: 0, done: 0 };
    const known = new Set();
    for (const row of state.summary) {
      totals.running += row.running || 0;
      totals.ready += row.ready || 0;
      totals.delayed += row.delay || 0;
      totals.done += row.done || 0;
      known.add(row.processName);
    }
    for (const row of state.rows) known.add(row.processName);
    for (const tab of TABS) {
      const n = totals[tab.id];
      const count = tabCounts[tab.id];
      count.textContent = n === undefined ? '' : String(n);
      count.hidden = n === undefined;
      count.className = `n${tab.id === 'running' && n ? ' hot' : ''}${tab.id === 'delayed' && n ? ' warn' : ''}`;
      tabButtons[tab.id].setAttribute('aria-label', n === undefined ? tab.label : `${tab.label} (${n})`);
    }
    replace(names, [...known].sort().map((n) => h('option', { value: n })));

    const rows = state.rows.map((p) => processRow(p, fresh && !state.seen.has(p.id)));
    state.seen = new Set(state.rows.map((p) => p.id));
    if (rows.length) replace(tbody, rows);
    else {
      const filtered = state.name || state.resource || state.result;
      const text = {
        running: 'Nothing is running now.',
        delayed: 'No process is waiting for a retry, a host or an agent.',
        ready: 'No process is waiting for a worker.',
        done: 'No process has ended yet.',
      }[state.tab];
      replace(tbody, emptyRow(state.tab === 'done' ? 8 : 7, filtered ? 'No process matches the filters.' : text,
        filtered ? 'Clear the filters to see all.' : 'This list updates live.'));
    }
    more.hidden = !state.next;

    const unfinished = state.summary.filter((row) => row.running || row.ready || row.delay);
    replace(summaryBody, unfinished.length
      ? unfinished.map((row) => h('tr', null,
        h('td', null, h('a', { href: `/processes?name=${encodeURIComponent(row.processName)}`, class: 'mono',
          onclick: (e) => { e.preventDefault(); nameInput.value = row.processName; state.name = row.processName; state.pages = 1; syncUrl(); load(); } }, row.processName)),
        h('td', { class: 'num' }, row.running ? badge('running', String(row.running), 'blue') : '0'),
        h('td', { class: 'num' }, row.ready ? badge('ready', String(row.ready)) : '0'),
        h('td', { class: 'num' }, row.delay ? badge('delayed', String(row.delay)) : '0')))
      : emptyRow(4, 'All caught up', 'No process is running, ready or delayed.'));
  }

  function processRow(p, isNew) {
    const href = `/processes/${encodeURIComponent(p.id)}`;
    const attempts = p.executionCount || 0;
    const row = h('tr', { class: `clickable${isNew ? ' flash' : ''}`, dataset: { id: p.id, process: p.processName } },
      h('td', null, h('a', { href, class: 'primary mono' }, p.processName), h('span', { class: 'secondary mono' }, p.id)),
      h('td', null, h('span', { class: 'secondary' }, p.resourceType), idTag(p.resourceId, resourceHref(p.resourceType, p.resourceId))),

      h('td', { class: 'nowrap' }, processBadge(p)),
      h('td', { class: 'num' }, attempts > 1 ? h('strong', { style: 'color: var(--amber-fg)' }, String(attempts)) : String(attempts)),
      h('td', { class: 'nowrap' }, timeEl(p.startTime || p.created)),
      state.tab === 'done' ? [
        h('td', { class: 'nowrap', dataset: { col: 'ended' } }, timeEl(p.endTime)),
        h('td', { class: 'num nowrap', dataset: { col: 'duration' } }, took(p)),
      ] : h('td', { class: 'nowrap' }, p.state === 'delayed' || p.state === 'ready' ? timeEl(p.runAfterTS ?? p.runAfter) : h('span', { class: 'muted' }, '—')),
      h('td', { class: 'error-cell' }, p.lastError ? h('span', { class: 'clip', title: p.lastError }, p.lastError) : h('span', { class: 'muted' }, '—')));
    row.addEventListener('click', (event) => {
      if (event.target.closest('a, button')) return;
      navigate(href);
    });
    return row;
  }

  /** From its start (its creation when it never started) to its end. */
  function took(p) {
    const start = millis(p.startTime) ?? millis(p.created);
    const end = millis(p.endTime);
    return start !== null && end !== null ? duration(Math.max(0, end - start)) : h('span', { class: 'muted' }, '—');
  }

  const inputChanged = debounce(() => {
    state.name = nameInput.value.trim();
    state.resource = resourceInput.value.trim();
    state.pages = 1;
    syncUrl();
    load();
  }, 250, 1000);
  nameInput.addEventListener('input', inputChanged);
  resourceInput.addEventListener('input', inputChanged);
  resultSelect.addEventListener('change', () => {
    state.result = resultSelect.value;
    state.pages = 1;
    syncUrl();
    load();
  });
  clear.addEventListener('click', () => {
    nameInput.value = '';
    resourceInput.value = '';
    resultSelect.value = '';
    Object.assign(state, { name: '', resource: '', result: '', pages: 1 });
    syncUrl();
    load();
  });
  more.addEventListener('click', () => {
    state.pages += 1;
    load();
  });

  const refresh = debounce(load, 120, 600);
  if (state.tab) selectTab(state.tab);
  else {
    summaryOf().then((sum) => {
      if (!disposed && !state.tab) selectTab(firstBusyTab(sum.data));
    }, () => {
      if (!disposed && !state.tab) selectTab('running');
    });
  }

  return {
    title: 'Processes',
    onEvent(event) {
      if (['state.change', 'process.change', 'resource.change', 'live.open'].includes(event.name)) refresh();
    },
    unmount() {
      disposed = true;
      refresh.cancel();
      inputChanged.cancel();
    },
  };
}
