// Containers, volumes, services and stacks: lists with state and `transitioning` progress
// updated live from `resource.change`, and actions that show the process they started at once.

import { LABELS, perform } from '../actions.js';
import { all, latestProcess, post, put, seesProcesses } from '../api.js';
import {
  badge, debounce, ellipsis, emptyRow, h, idTag, processesHref, replace, resourceHref, splitCommand, timeEl, toast, transition,
} from '../dom.js';

const KINDS = {
  containers: {
    title: 'Containers',
    type: 'container',
    sub: 'Each container runs on a host as a supervised process of its agent. Starting, stopping, restarting and removing are processes you can follow live.',
    actions: ['start', 'stop', 'restart', 'remove'],
    formTitle: 'Run a container',
  },
  volumes: {
    title: 'Volumes',
    type: 'volume',
    sub: 'A volume is a directory on its host, created and removed by the agent.',
    actions: ['activate', 'deactivate', 'remove'],
    formTitle: 'Create a volume',
  },
  services: {
    title: 'Services',
    type: 'service',
    sub: 'A service keeps a number of containers from its launch configuration: the server creates or removes containers when its scale changes, and starts again those that stop.',
    actions: ['activate', 'deactivate', 'remove'],
    formTitle: 'Create a service',
  },
  stacks: {
    title: 'Stacks',
    type: 'stack',
    sub: 'A stack groups services: activating, deactivating or removing it does so to each of its services.',
    actions: ['activate', 'deactivate', 'remove'],
    formTitle: 'Create a stack',
  },
};

/** Kinds with a page of their own per resource. */
const DETAIL = new Set(['containers', 'services', 'stacks']);

export function mount(root, { kind }) {
  const spec = KINDS[kind];
  let disposed = false;
  let generation = 0;
  const state = {
    items: [], hosts: [], stacks: [], containers: [], services: [], showRemoved: false, filter: '',
    processes: new Map(), // resource id → {id, processName} of the last action started here
  };

  const tbody = h('tbody');
  const error = h('div', { class: 'callout red', role: 'alert', hidden: true });
  const search = h('input', { id: `${kind}-search`, type: 'search', placeholder: 'name or id', autocomplete: 'off' });
  const removed = h('input', { id: `${kind}-removed`, type: 'checkbox' });
  const form = buildForm();
  const columns = headers();

  replace(root,
    h('header', { class: 'page-head' },
      h('div', null, h('h1', null, spec.title), h('p', { class: 'sub' }, spec.sub))),
    h('div', { class: 'content' },
      error,
      form,
      h('section', { class: 'card', 'aria-labelledby': `${kind}-title` },
        h('header', null,
          h('h2', { id: `${kind}-title` }, `All ${spec.title.toLowerCase()}`),
          h('div', { class: 'toolbar' },
            h('label', { class: 'sr-only', for: `${kind}-search` }, `Filter ${spec.title.toLowerCase()}`), search,
            h('label', { class: 'check', for: `${kind}-removed` }, removed, 'Show removed'))),
        h('div', { class: 'table-wrap' }, h('table', { class: 'grid', 'aria-labelledby': `${kind}-title` },
          h('thead', null, h('tr', null, columns.map((c) => h('th', { scope: 'col', class: c.num ? 'num' : null }, c.label)))),
          tbody)))));

  // ---- Form ---------------------------------------------------------------------------
  function buildForm() {
    const err = h('p', { class: 'form-error', role: 'alert' });
    const submit = h('button', { type: 'submit', class: 'primary' }, kind === 'containers' ? 'Run' : 'Create');
    const name = h('input', { id: `${kind}-new-name`, name: 'name', autocomplete: 'off', placeholder: { containers: 'web-1', volumes: 'data', services: 'web', stacks: 'shop' }[kind], required: kind !== 'containers' });
    const fields = [h('label', { class: 'field', for: `${kind}-new-name` }, 'Name', name)];
    let command = null;
    let host = null;
    let env = null;
    let scale = null;
    let stack = null;
    if (kind === 'containers' || kind === 'services') {
      command = h('input', { id: `${kind}-new-command`, name: 'command', class: 'mono', autocomplete: 'off', placeholder: 'sleep 300', required: kind === 'containers' });
      fields.push(h('label', { class: 'field wide', for: `${kind}-new-command` }, 'Command', command));
    }
    if (kind === 'containers' || kind === 'volumes') {
      host = h('select', { id: `${kind}-new-host`, name: 'host', 'aria-label': 'Host' }, h('option', { value: '' }, 'Any active host'));
      fields.push(h('label', { class: 'field', for: `${kind}-new-host` }, 'Host', host));
    }
    if (kind === 'containers') {
      env = h('input', { id: 'containers-new-env', name: 'environment', class: 'mono', autocomplete: 'off', placeholder: 'A=1 B=two' });
      fields.push(h('label', { class: 'field', for: 'containers-new-env' }, h('span', null, 'Environment ', h('span', { class: 'hint' }, '(optional)')), env));
    }
    if (kind === 'services') {
      scale = h('input', { id: 'services-new-scale', name: 'scale', type: 'number', min: '0', max: '1000', value: '1' });
      stack = h('select', { id: 'services-new-stack', name: 'stack', 'aria-label': 'Stack' }, h('option', { value: '' }, 'No stack'));
      fields.push(h('label', { class: 'field narrow', for: 'services-new-scale' }, 'Scale', scale));
      fields.push(h('label', { class: 'field', for: 'services-new-stack' }, 'Stack', stack));
    }
    const el = h('section', { class: 'card', 'aria-labelledby': `${kind}-form-title` },
      h('header', null, h('h2', { id: `${kind}-form-title` }, spec.formTitle)),
      h('form', { class: 'body', 'aria-labelledby': `${kind}-form-title`, novalidate: true },
        h('div', { class: 'form-row' }, fields, submit), err));
    el.querySelector('form').addEventListener('submit', async (event) => {
      event.preventDefault();
      err.textContent = '';
      const body = {};
      if (name.value.trim()) body.name = name.value.trim();
      if (kind !== 'containers' && !body.name) {
        err.textContent = 'Give it a name.';
        return;
      }
      if (command) {
        const words = splitCommand(command.value);
        if (kind === 'containers') {
          if (!words.length) {
            err.textContent = 'A container needs a command: its first word is the program the agent runs.';
            return;
          }
          body.command = words;
        } else if (words.length) {
          body.launchConfig = { command: words };
        }
      }
      if (host && host.value) body.requestedHostId = host.value;
      if (env && env.value.trim()) {
        body.environment = {};
        for (const pair of splitCommand(env.value)) {
          const at = pair.indexOf('=');
          if (at < 1) {
            err.textContent = `Environment entries are NAME=value; "${pair}" is not.`;
            return;
          }
          body.environment[pair.slice(0, at)] = pair.slice(at + 1);
        }
      }
      if (scale) body.scale = Number(scale.value || 0);
      if (stack && stack.value) body.stackId = stack.value;
      submit.disabled = true;
      try {
        const created = await post(kind, body);
        name.value = '';
        if (command) command.value = '';
        if (env) env.value = '';
        upsert(created);
        await showProcess(created, kind === 'containers' ? 'Running' : 'Creating');
      } catch (error2) {
        err.textContent = error2.message + (error2.detail ? ` (${error2.detail})` : '');
      } finally {
        submit.disabled = false;
      }
    });
    // Option labels are cut: a 255-character name must not widen the form.
    const short = (text) => (text.length > 60 ? `${text.slice(0, 59)}…` : text);
    el.fill = () => {
      if (host) {
        const chosen = host.value;
        replace(host, h('option', { value: '' }, 'Any active host'),
          state.hosts.filter((x) => x.state !== 'removed').map((x) => h('option', { value: x.id, selected: x.id === chosen, title: x.name || x.hostname || x.id }, `${short(x.name || x.hostname || x.id)} (${x.id}, ${x.state})`)));
      }
      if (stack) {
        const chosen = stack.value;
        replace(stack, h('option', { value: '' }, 'No stack'),
          state.stacks.filter((x) => x.state !== 'removed').map((x) => h('option', { value: x.id, selected: x.id === chosen, title: x.name || x.id }, `${short(x.name || x.id)} (${x.id})`)));
      }
    };
    return el;
  }

  // ---- Table --------------------------------------------------------------------------
  function headers() {
    const name = {
      label: 'Name',
      flex: true,
      cell: (r) => [
        ellipsis(r.name || '(unnamed)', { cls: 'primary', href: DETAIL.has(kind) ? resourceHref(spec.type, r.id) : undefined }),
        h('span', { class: 'secondary' }, idTag(r.id)),
      ],
    };
    const stateCol = { label: 'State', cell: (r) => [badge(r.state), transition(r)] };
    const hostCol = { label: 'Host', cell: (r) => r.hostId ? [hostName(r.hostId), ' ', idTag(r.hostId, resourceHref('host', r.hostId))] : h('span', { class: 'muted' }, r.requestedHostId ? `requested ${r.requestedHostId}` : 'not placed') };
    const created = { label: 'Created', cell: (r) => timeEl(r.createdTS ?? r.created) };
    const actions = { label: 'Actions', cell: actionCell };
    const command = (words) => (words && [].concat(words).length
      ? ellipsis([].concat(words).join(' '), { cls: 'cmd' }) : h('span', { class: 'muted' }, '—'));
    if (kind === 'containers') {
      return [name, stateCol, hostCol, { label: 'Command', flex: true, cell: (r) => command(r.command) }, created, actions];
    }
    if (kind === 'volumes') {
      return [name, stateCol, hostCol,
        { label: 'Path', flex: true, cell: (r) => r.path ? ellipsis(r.path, { cls: 'cmd' }) : h('span', { class: 'muted' }, '—') },
        created, actions];
    }
    if (kind === 'stacks') {
      return [name, stateCol,
        { label: 'Services', num: true, cell: (r) => String(state.services.filter((x) => x.stackId === r.id && x.state !== 'removed').length) },
        created, actions];
    }
    return [name, stateCol,
      { label: 'Stack', cell: (r) => stackCell(r.stackId) },
      { label: 'Scale', cell: scaleCell },
      { label: 'Running', num: true, cell: (r) => String(r.currentScale ?? state.containers.filter((c) => c.serviceId === r.id && c.state === 'running').length) },
      { label: 'Reconciler', flex: true, cell: (r) => r.reconcileMessage ? ellipsis(r.reconcileMessage, { cls: 'muted' }) : h('span', { class: 'muted' }, '—') },
      { label: 'Command', flex: true, cell: (r) => command(r.launchConfig && r.launchConfig.command) },
      created, actions];
  }

  /** A service's stack by name, linked to its page (the id when it is not loaded). */
  function stackCell(id) {
    if (!id) return h('span', { class: 'muted' }, '—');
    const stack = state.stacks.find((x) => x.id === id);
    return stack && stack.name ? ellipsis(stack.name, { cls: 'short', href: resourceHref('stack', id) }) : idTag(id, resourceHref('stack', id));
  }

  function hostName(id) {
    const host = state.hosts.find((x) => x.id === id);
    return host ? ellipsis(host.name || host.hostname || '', { cls: 'host-name' }) : null;
  }

  function actionCell(r) {
    const label = r.name || r.id;
    const buttons = spec.actions.map((action) => {
      const allowed = Boolean(r.actions && r.actions[action]);
      const button = h('button', {
        type: 'button', class: `small${action === 'remove' ? ' danger' : ''}`, disabled: !allowed,
        'aria-label': `${LABELS[action]} ${label}`, title: allowed ? `${LABELS[action]} ${label}` : `${LABELS[action]} is not possible while ${r.state}`,
      }, LABELS[action]);
      button.addEventListener('click', () => act(r, action, button));
      return button;
    });
    const last = state.processes.get(r.id);
    return h('div', null,
      h('div', { class: 'actions' }, buttons),
      seesProcesses() ? h('div', { style: 'margin-top:.35rem;font-size:.8rem' },
        last ? h('a', { href: `/processes/${last.id}`, class: 'mono' }, `${last.processName} ${last.id}`) : null,
        last ? ' · ' : null,
        h('a', { href: processesHref(spec.type, r.id) }, 'processes')) : null);
  }

  function scaleCell(r) {
    const input = h('input', { type: 'number', min: '0', max: '1000', value: String(r.scale ?? 0), 'aria-label': `Scale of ${r.name || r.id}` });
    const canUpdate = Boolean(r.actions && r.actions.update);
    const apply = async (value) => {
      const n = Math.max(0, Math.min(1000, Number(value)));
      if (!Number.isFinite(n) || n === (r.scale ?? 0)) return;
      try {
        const updated = await put(`services/${encodeURIComponent(r.id)}`, { scale: n });
        upsert(updated);
        await showProcess(updated, `Scaling to ${n}`);
      } catch (err) {
        toast(`Cannot scale ${r.name || r.id}: ${err.message}`, { error: true });
        input.value = String(r.scale ?? 0);
      }
    };
    const minus = h('button', { type: 'button', 'aria-label': `Scale ${r.name || r.id} down`, disabled: !canUpdate || !r.scale }, '−');
    const plus = h('button', { type: 'button', 'aria-label': `Scale ${r.name || r.id} up`, disabled: !canUpdate }, '+');
    minus.addEventListener('click', () => apply((r.scale ?? 0) - 1));
    plus.addEventListener('click', () => apply((r.scale ?? 0) + 1));
    input.addEventListener('change', () => apply(input.value));
    input.disabled = !canUpdate;
    return h('div', { class: 'stepper', title: canUpdate ? 'Change the scale' : `Scaling is not possible while ${r.state}` }, minus, input, plus);
  }

  function rowFor(r) {
    return h('tr', { id: r.id, dataset: { id: r.id, name: r.name || '' } }, columns.map((c) => h('td', { class: c.num ? 'num' : c.flex ? 'flex' : null }, c.cell(r))));
  }

  function shown() {
    const q = state.filter.toLowerCase();
    return state.items
      .filter((r) => state.showRemoved || (r.state !== 'removed' && r.state !== 'purged'))
      .filter((r) => !q || (r.name || '').toLowerCase().includes(q) || r.id.toLowerCase() === q)
      .sort((a, b) => (b.createdTS ?? 0) - (a.createdTS ?? 0));
  }

  function render() {
    const rows = shown();
    if (!rows.length) {
      replace(tbody, emptyRow(columns.length,
        state.items.length ? `No ${spec.title.toLowerCase()} match.` : `No ${spec.title.toLowerCase()} yet.`,
        state.items.length ? null : `${spec.formTitle} with the form above.`));
    } else {
      replace(tbody, rows.map(rowFor));
    }
    form.fill();
    scrollToHash();
  }

  /** Puts a changed resource into the list and redraws only its row. */
  function upsert(resource) {
    const at = state.items.findIndex((r) => r.id === resource.id);
    if (at >= 0) state.items[at] = resource;
    else state.items.push(resource);
    const old = tbody.querySelector(`tr[data-id="${CSS.escape(resource.id)}"]`);
    if (old && shown().some((r) => r.id === resource.id)) {
      if (old.contains(document.activeElement) && document.activeElement.tagName === 'INPUT') return;
      const row = rowFor(resource);
      if (old.classList.contains('focus')) row.classList.add('focus');
      old.replaceWith(row);
    } else {
      render();
    }
  }

  async function act(r, action, button) {
    button.disabled = true;
    const updated = await perform(spec.type, r, action);
    if (disposed) return;
    if (updated) {
      upsert(updated);
      await showProcess(updated, LABELS[action]);
    } else {
      button.disabled = false;
    }
  }

  /** Finds the process an action started and shows it in a toast and in the row. */
  async function showProcess(resource, verb) {
    const process = await latestProcess(spec.type, resource.id);
    if (process) {
      state.processes.set(resource.id, { id: process.id, processName: process.processName });
      upsert(state.items.find((r) => r.id === resource.id) || resource);
      toast(`${verb} ${resource.name || resource.id}: process ${process.processName} `, { link: { href: `/processes/${process.id}`, text: process.id } });
    } else {
      toast(`${verb} ${resource.name || resource.id}.`);
    }
  }

  let scrolled = false;
  function scrollToHash(force) {
    const target = location.hash.slice(1);
    if (!target || (scrolled && !force)) return;
    const el = document.getElementById(target);
    if (!el) return;
    scrolled = true;
    el.classList.add('focus');
    el.scrollIntoView({ block: 'center' });
  }

  async function load() {
    const mine = ++generation;
    try {
      const wants = [all(state.showRemoved ? kind : `${kind}?state_ne=purged`)];
      const none = Promise.resolve([]);
      wants.push(kind === 'containers' || kind === 'volumes' ? all('hosts') : none);
      wants.push(kind === 'services' ? all('stacks') : none);
      wants.push(kind === 'services' ? all('containers?state_ne=removed') : none);
      wants.push(kind === 'stacks' ? all('services?state_ne=purged') : none);
      const [items, hosts, stacks, containers, services] = await Promise.all(wants);
      if (disposed || mine !== generation) return;
      error.hidden = true;
      Object.assign(state, { items, hosts, stacks, containers, services });
      render();
    } catch (err) {
      if (disposed || mine !== generation) return;
      error.hidden = false;
      replace(error, h('strong', null, `Cannot load ${spec.title.toLowerCase()}`), err.message);
    }
  }

  search.addEventListener('input', () => {
    state.filter = search.value.trim();
    render();
  });
  removed.addEventListener('change', () => {
    state.showRemoved = removed.checked;
    load();
  });

  const refresh = debounce(load, 150, 800);
  load();
  return {
    title: spec.title,
    onHash() {
      for (const el of root.querySelectorAll('.focus')) el.classList.remove('focus');
      scrollToHash(true);
    },
    onEvent(event) {
      if (event.name === 'live.open') {
        refresh();
        return;
      }
      const resource = event.name === 'resource.change' && event.data && event.data.resource;
      if (resource && resource.type === spec.type && state.items.some((r) => r.id === resource.id)) {
        upsert(resource);
        return;
      }
      const type = event.resourceType;
      if ((event.name === 'resource.change' || event.name === 'state.change') &&
        (type === spec.type || (kind === 'services' && (type === 'container' || type === 'stack')) ||
          (kind === 'stacks' && type === 'service') || ((kind === 'containers' || kind === 'volumes') && type === 'host'))) {
        refresh();
      }
    },
    unmount() {
      disposed = true;
      refresh.cancel();
    },
  };
}
