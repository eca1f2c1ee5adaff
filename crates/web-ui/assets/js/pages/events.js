// Events: a live tail of the event stream this key may see, with a filter by event name, a
// pause button, and more names to subscribe to (routing is by exact name).

import { BASE_NAMES, live } from '../live.js';
import { debounce, h, idTag, jsonBlock, replace, resourceHref } from '../dom.js';

const MAX = 500;
const NAME = /^[A-Za-z0-9._\-]+$/;
/** Names added on this page, kept for the tab's session. */
const EXTRA_KEY = 'drover.events.extra';

const CLASS = { 'resource.change': 'rc', 'state.change': 'sc', 'process.change': 'pc', 'agent.ping': 'ap', ping: 'pg' };

function clock(ms) {
  const d = new Date(ms);
  const pad = (n, w = 2) => String(n).padStart(w, '0');
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

/** One line that says what the event means. */
function summary(event) {
  const data = event.data || {};
  switch (event.name) {
    case 'state.change':
      // Without a previous state it is progress within the same state.
      return `${data.previousState ? `${data.previousState} → ` : ''}${data.state}${data.transitioning === 'yes' ? (data.previousState ? ' (transitioning)' : ' (progress)') : ''}`;
    case 'resource.change': {
      const r = data.resource || {};
      const t = r.transitioning === 'yes' ? ` · ${r.transitioningMessage || 'in progress'}${r.transitioningProgress != null ? ` ${r.transitioningProgress}%` : ''}` : '';
      return `${r.name ? `${r.name}: ` : ''}${r.state || ''}${t}${r.transitioning === 'error' ? ` · ${r.transitioningMessage || 'error'}` : ''}`;
    }
    case 'process.change':
      return `${data.processName || 'process'} calls the agent: ${data.command || ''}`;
    case 'agent.ping':
      return 'answered a ping';
    case 'ping':
      return 'keep-alive from the server';
    default: {
      const text = event.data === undefined ? '' : JSON.stringify(event.data);
      return text.length > 160 ? `${text.slice(0, 160)}…` : text;
    }
  }
}

function loadExtra() {
  try {
    const value = JSON.parse(sessionStorage.getItem(EXTRA_KEY) || '[]');
    return Array.isArray(value) ? value.filter((n) => typeof n === 'string' && NAME.test(n)) : [];
  } catch {
    return [];
  }
}

export function mount(root) {
  const state = { events: [], held: [], paused: false, filter: '', extra: loadExtra(), counts: new Map(), total: 0 };
  live.setExtra(state.extra);

  const list = h('div', { class: 'events-list', role: 'log', 'aria-label': 'Event stream', 'aria-live': 'off' });
  const filter = h('input', { id: 'events-filter', type: 'search', class: 'mono', placeholder: 'state.change', autocomplete: 'off' });
  const pause = h('button', { type: 'button', 'aria-pressed': 'false', 'aria-label': 'Pause the event stream' }, 'Pause');
  const clear = h('button', { type: 'button', 'aria-label': 'Clear the event list' }, 'Clear');
  const held = h('span', { class: 'muted', role: 'status', style: 'font-size:.85rem' });
  const addName = h('input', { id: 'events-add', class: 'mono', placeholder: 'hello.world', autocomplete: 'off' });
  const addButton = h('button', { type: 'submit' }, 'Subscribe');
  const addError = h('p', { class: 'form-error', role: 'alert' });
  const names = h('div', { class: 'chips', 'aria-label': 'Subscribed event names' });
  const counts = h('div', { class: 'chips', 'aria-label': 'Events seen by name' });

  replace(root,
    h('header', { class: 'page-head' },
      h('div', null, h('h1', null, 'Events'),
        h('p', { class: 'sub' }, 'The live event stream this key may see. Routing is by exact name: add a name to subscribe to it too.')),
      h('div', { class: 'head-actions' }, held, pause, clear)),
    h('div', { class: 'content' },
      h('section', { class: 'card', 'aria-label': 'Subscription and filter' },
        h('div', { class: 'body', style: 'display:flex;flex-direction:column;gap:.9rem' },
          h('div', { class: 'toolbar' },
            h('label', { class: 'field', for: 'events-filter', style: 'flex:1 1 260px' }, 'Filter by event name', filter),
            h('form', { class: 'toolbar', 'aria-label': 'Subscribe to an event name', onsubmit: (e) => { e.preventDefault(); subscribe(); } },
              h('label', { class: 'field', for: 'events-add' }, 'Subscribe to a name', addName), addButton)),
          addError,
          h('div', { class: 'toolbar' }, h('span', { class: 'muted', style: 'font-size:.8rem' }, 'Subscribed:'), names),
          h('div', { class: 'toolbar' }, h('span', { class: 'muted', style: 'font-size:.8rem' }, 'Seen:'), counts))),
      h('section', { class: 'card', 'aria-label': 'Events, newest first' }, list)));

  function renderNames() {
    replace(names, BASE_NAMES.map((n) => h('span', { class: 'chip' }, n)),
      h('span', { class: 'chip', title: 'The server sends it on every socket' }, 'ping', h('span', { class: 'k' }, 'keep-alive')),
      state.extra.map((n) => {
        const remove = h('button', { type: 'button', 'aria-label': `Unsubscribe from ${n}` }, '×');
        remove.addEventListener('click', () => {
          state.extra = state.extra.filter((x) => x !== n);
          sessionStorage.setItem(EXTRA_KEY, JSON.stringify(state.extra));
          live.setExtra(state.extra);
          renderNames();
        });
        return h('span', { class: 'chip' }, n, remove);
      }));
  }

  function renderCounts() {
    replace(counts, [...state.counts.entries()].sort((a, b) => b[1] - a[1]).map(([n, c]) => {
      const chip = h('button', { type: 'button', class: 'chip', 'aria-label': `Show only ${n} (${c} seen)` }, n, h('span', { class: 'k' }, String(c)));
      chip.addEventListener('click', () => {
        filter.value = filter.value === n ? '' : n;
        state.filter = filter.value;
        renderList();
      });
      return chip;
    }));
  }

  function matches(event) {
    return !state.filter || (event.name || '').toLowerCase().includes(state.filter.toLowerCase());
  }

  /** One event: a line that opens to its JSON. */
  function row(event, isNew) {
    const name = event.name || '(no name)';
    const details = h('details', { class: `ev${isNew ? ' new' : ''}`, dataset: { name } },
      h('summary', null,
        h('span', { class: 't', title: new Date(event.time || Date.now()).toISOString() }, clock(event.time || Date.now())),
        h('span', { class: `n ${CLASS[name] || ''}` }, name),
        h('span', null, event.resourceId ? idTag(event.resourceId, resourceHref(event.resourceType, event.resourceId)) : h('span', { class: 'muted' }, '—')),
        h('span', { class: 's' }, summary(event)),
        h('span', { class: 'more', 'aria-hidden': 'true' }, 'JSON')));
    // The JSON is built when opened: a busy stream stays cheap.
    details.addEventListener('toggle', () => {
      if (details.open && !details.querySelector('pre')) details.append(jsonBlock(event));
    });
    return details;
  }

  function renderList() {
    const shown = state.events.filter(matches);
    replace(list, shown.length ? shown.map(row)
      : h('div', { class: 'empty' }, h('strong', null, state.events.length ? 'No event matches the filter.' : 'Waiting for events…'),
        state.events.length ? null : 'Start, stop or remove a container to see its events.'));
  }

  function add(event) {
    state.events.unshift(event);
    if (state.events.length > MAX) state.events.length = MAX;
    if (!matches(event)) return;
    const first = list.firstElementChild;
    if (first && first.classList.contains('empty')) list.replaceChildren();
    list.prepend(row(event, true));
    while (list.children.length > MAX) list.lastElementChild.remove();
  }

  function subscribe() {
    const name = addName.value.trim();
    addError.textContent = '';
    if (!name) return;
    if (!NAME.test(name)) {
      addError.textContent = 'An event name has letters, digits, ".", "_" and "-" only.';
      return;
    }
    if (!state.extra.includes(name) && !BASE_NAMES.includes(name) && name !== 'ping') state.extra.push(name);
    sessionStorage.setItem(EXTRA_KEY, JSON.stringify(state.extra));
    live.setExtra(state.extra);
    addName.value = '';
    renderNames();
  }

  function setPaused(paused) {
    state.paused = paused;
    pause.setAttribute('aria-pressed', String(paused));
    pause.textContent = paused ? 'Resume' : 'Pause';
    pause.setAttribute('aria-label', paused ? 'Resume the event stream' : 'Pause the event stream');
    if (!paused) {
      for (const event of state.held.reverse()) add(event);
      state.held = [];
    }
    held.textContent = paused ? 'Paused: new events are held.' : '';
  }

  filter.addEventListener('input', () => {
    state.filter = filter.value.trim();
    renderList();
  });
  pause.addEventListener('click', () => setPaused(!state.paused));
  clear.addEventListener('click', () => {
    state.events = [];
    state.held = [];
    state.counts.clear();
    renderCounts();
    renderList();
    if (state.paused) held.textContent = 'Paused: new events are held.';
  });

  renderNames();
  renderCounts();
  renderList();
  const countsChanged = debounce(renderCounts, 100, 400);

  return {
    title: 'Events',
    onEvent(event) {
      if (event.name === 'live.open') return;
      if (!event.time) event.time = Date.now();
      state.counts.set(event.name, (state.counts.get(event.name) || 0) + 1);
      countsChanged();
      if (state.paused) {
        state.held.push(event);
        if (state.held.length > MAX) state.held.shift();
        held.textContent = `Paused: ${state.held.length} new event${state.held.length === 1 ? '' : 's'} held.`;
        return;
      }
      add(event);
    },
    unmount() {
      countsChanged.cancel();
      live.setExtra([]);
    },
  };
}
