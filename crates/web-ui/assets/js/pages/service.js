// One service: its scale (changed here), its stack, its launch configuration, the containers
// the server keeps for it and its last processes, live.

import { announce } from '../actions.js';
import { all, get, put } from '../api.js';
import {
  badge, debounce, ellipsis, emptyRow, h, idTag, replace, resourceHref, timeEl, toast, transition,
} from '../dom.js';
import { detailHead, fact, mapTable, processesCard, showError } from './detail.js';

export function mount(root, { id }) {
  let disposed = false;
  let generation = 0;
  let service = null;
  let stack = null;
  let containers = [];

  const head = detailHead({
    type: 'service', listHref: '/services', listLabel: 'Services',
    actions: ['activate', 'deactivate', 'remove'],
    onDone: (updated) => render(updated),
  });
  const error = h('div', { class: 'callout red', role: 'alert', hidden: true });
  const facts = h('dl', { class: 'facts' });
  const launch = h('div', { class: 'body' });
  const containersBody = h('tbody');
  const stats = h('div', { class: 'stats' });
  const scaleInput = h('input', { id: 'service-scale', type: 'number', min: '0', max: '1000', 'aria-label': 'Scale' });
  const minus = h('button', { type: 'button', 'aria-label': 'Scale down' }, '−');
  const plus = h('button', { type: 'button', 'aria-label': 'Scale up' }, '+');
  const processes = processesCard('service', id);

  replace(root, head.el,
    h('div', { class: 'content' },
      error, stats,
      h('div', { class: 'detail-grid' },
        h('div', { class: 'col' },
          h('section', { class: 'card', 'aria-labelledby': 'service-containers-title' },
            h('header', null, h('h2', { id: 'service-containers-title' }, 'Containers'),
              h('div', { class: 'toolbar' }, h('label', { class: 'check', for: 'service-scale' }, 'Scale'),
                h('div', { class: 'stepper' }, minus, scaleInput, plus))),
            h('div', { class: 'table-wrap' }, h('table', { class: 'grid', 'aria-labelledby': 'service-containers-title' },
              h('thead', null, h('tr', null, h('th', { scope: 'col' }, 'Name'), h('th', { scope: 'col' }, 'State'),
                h('th', { scope: 'col' }, 'Host'), h('th', { scope: 'col' }, 'Created'))),
              containersBody))),
          processes.el),
        h('div', { class: 'col side' },
          h('section', { class: 'card', 'aria-labelledby': 'service-facts-title' },
            h('header', null, h('h2', { id: 'service-facts-title' }, 'Service')), h('div', { class: 'body' }, facts)),
          h('section', { class: 'card', 'aria-labelledby': 'service-launch-title' },
            h('header', null, h('h2', { id: 'service-launch-title' }, 'Launch configuration')), launch)))));

  async function scaleTo(value) {
    if (!service) return;
    const n = Math.max(0, Math.min(1000, Math.trunc(Number(value))));
    if (!Number.isFinite(n) || n === (service.scale ?? 0)) {
      scaleInput.value = String(service.scale ?? 0);
      return;
    }
    try {
      const updated = await put(`services/${encodeURIComponent(id)}`, { scale: n });
      if (disposed) return;
      render(updated);
      await announce('service', updated, `Scaling to ${n}`);
    } catch (err) {
      toast(`Cannot scale ${service.name || id}: ${err.message}`, { error: true });
      scaleInput.value = String(service.scale ?? 0);
    }
  }
  minus.addEventListener('click', () => scaleTo((service?.scale ?? 0) - 1));
  plus.addEventListener('click', () => scaleTo((service?.scale ?? 0) + 1));
  scaleInput.addEventListener('change', () => scaleTo(scaleInput.value));

  function render(s) {
    service = s;
    head.update(s);
    document.title = `${s.name || s.id} · drover`;
    const canUpdate = Boolean(s.actions && s.actions.update);
    if (document.activeElement !== scaleInput) scaleInput.value = String(s.scale ?? 0);
    scaleInput.disabled = !canUpdate;
    minus.disabled = !canUpdate || !s.scale;
    plus.disabled = !canUpdate;

    const live = containers.filter((c) => c.state !== 'removed' && c.state !== 'purged');
    const running = live.filter((c) => c.state === 'running').length;
    replace(stats,
      h('div', { class: 'stat' }, h('div', { class: 'label' }, 'Scale'), h('div', { class: 'value', dataset: { stat: 'scale' } }, String(s.scale ?? 0))),
      h('div', { class: `stat${running < (s.scale ?? 0) && s.state === 'active' ? ' warn' : ''}` }, h('div', { class: 'label' }, 'Running'), h('div', { class: 'value', dataset: { stat: 'running' } }, String(running))),
      h('div', { class: 'stat' }, h('div', { class: 'label' }, 'Containers'), h('div', { class: 'value' }, String(live.length))));

    replace(facts,
      fact('Id', idTag(s.id)),
      fact('State', [badge(s.state), transition(s)]),
      fact('Stack', s.stackId ? [stack && stack.id === s.stackId && stack.name ? ellipsis(stack.name, { href: resourceHref('stack', s.stackId) }) : null, ' ', idTag(s.stackId, resourceHref('stack', s.stackId))] : null),
      fact('Reconciler', s.reconcileMessage ? ellipsis(s.reconcileMessage) : null),
      fact('Created', timeEl(s.createdTS ?? s.created)));

    const config = s.launchConfig || {};
    replace(launch, h('dl', { class: 'facts' },
      fact('Command', config.command && [].concat(config.command).length ? ellipsis([].concat(config.command).join(' '), { cls: 'cmd' }) : null),
      fact('Working dir', config.workingDir ? ellipsis(config.workingDir, { cls: 'cmd' }) : null),
      fact('Environment', mapTable(config.environment, 'Environment')),
      fact('Labels', mapTable(config.labels, 'Labels'))));

    replace(containersBody, live.length ? live.map((c) => h('tr', { dataset: { id: c.id, name: c.name || '' } },
      h('td', { class: 'flex' }, ellipsis(c.name || '(unnamed)', { cls: 'primary', href: resourceHref('container', c.id) }), h('span', { class: 'secondary' }, idTag(c.id))),
      h('td', null, badge(c.state), transition(c)),
      h('td', null, c.hostId ? idTag(c.hostId, resourceHref('host', c.hostId)) : h('span', { class: 'muted' }, 'not placed')),
      h('td', null, timeEl(c.createdTS ?? c.created))))
      : emptyRow(4, 'No containers', s.state === 'active' ? 'Raise the scale to start some.' : 'Activate the service to start its containers.'));
  }

  async function load() {
    const mine = ++generation;
    try {
      const s = await get(`services/${encodeURIComponent(id)}`);
      const [stackNow, mineContainers] = await Promise.all([
        s.stackId ? get(`stacks/${encodeURIComponent(s.stackId)}`).catch(() => null) : null,
        all(`containers?serviceId=${encodeURIComponent(id)}&state_ne=purged`),
      ]);
      if (disposed || mine !== generation) return;
      stack = stackNow;
      containers = mineContainers;
      error.hidden = true;
      render(s);
    } catch (err) {
      if (disposed || mine !== generation) return;
      showError(error, err, 'service');
    }
    processes.load();
  }

  const refresh = debounce(load, 120, 600);
  load();
  return {
    title: id,
    onEvent(event) {
      if (event.name === 'live.open') {
        refresh();
        return;
      }
      const resource = event.name === 'resource.change' && event.data && event.data.resource;
      if (resource && resource.type === 'service' && resource.id === id) {
        render(resource);
        processes.load();
        return;
      }
      if (resource && resource.type === 'container' && resource.serviceId === id) {
        const at = containers.findIndex((c) => c.id === resource.id);
        if (at >= 0) containers[at] = resource;
        else containers.push(resource);
        if (service) render(service);
        return;
      }
      if ((event.resourceId === id && ['state.change', 'process.change'].includes(event.name)) ||
        (event.resourceType === 'container' && ['state.change', 'resource.change'].includes(event.name) && containers.some((c) => c.id === event.resourceId)) ||
        (service && event.resourceType === 'stack' && event.resourceId === service.stackId)) refresh();
    },
    unmount() {
      disposed = true;
      refresh.cancel();
    },
  };
}
