// One stack: its services with their scale and running containers, and its last processes, live.

import { all, get } from '../api.js';
import {
  badge, debounce, ellipsis, emptyRow, h, idTag, replace, resourceHref, timeEl, transition,
} from '../dom.js';
import { detailHead, fact, processesCard, showError } from './detail.js';

export function mount(root, { id }) {
  let disposed = false;
  let generation = 0;
  let stack = null;
  let services = [];
  let containers = [];

  const head = detailHead({
    type: 'stack', listHref: '/stacks', listLabel: 'Stacks',
    actions: ['activate', 'deactivate', 'remove'],
    onDone: (updated) => render(updated),
  });
  const error = h('div', { class: 'callout red', role: 'alert', hidden: true });
  const facts = h('dl', { class: 'facts' });
  const servicesBody = h('tbody');
  const processes = processesCard('stack', id);

  replace(root, head.el,
    h('div', { class: 'content' },
      error,
      h('div', { class: 'detail-grid' },
        h('div', { class: 'col' },
          h('section', { class: 'card', 'aria-labelledby': 'stack-services-title' },
            h('header', null, h('h2', { id: 'stack-services-title' }, 'Services'),
              h('a', { href: '/services', style: 'font-size:.85rem' }, 'Create a service in this stack on Services →')),
            h('div', { class: 'table-wrap' }, h('table', { class: 'grid', 'aria-labelledby': 'stack-services-title' },
              h('thead', null, h('tr', null, h('th', { scope: 'col' }, 'Name'), h('th', { scope: 'col' }, 'State'),
                h('th', { scope: 'col', class: 'num' }, 'Scale'), h('th', { scope: 'col', class: 'num' }, 'Running'),
                h('th', { scope: 'col' }, 'Command'), h('th', { scope: 'col' }, 'Created'))),
              servicesBody))),
          processes.el),
        h('div', { class: 'col side' },
          h('section', { class: 'card', 'aria-labelledby': 'stack-facts-title' },
            h('header', null, h('h2', { id: 'stack-facts-title' }, 'Stack')), h('div', { class: 'body' }, facts))))));

  function render(s) {
    stack = s;
    head.update(s);
    document.title = `${s.name || s.id} · drover`;
    const mine = services.filter((x) => x.state !== 'removed' && x.state !== 'purged');
    replace(facts,
      fact('Id', idTag(s.id)),
      fact('State', [badge(s.state), transition(s)]),
      fact('Services', String(mine.length)),
      fact('Description', s.description ? ellipsis(s.description) : null),
      fact('Created', timeEl(s.createdTS ?? s.created)));
    replace(servicesBody, mine.length ? mine.map((x) => {
      const command = x.launchConfig && x.launchConfig.command ? [].concat(x.launchConfig.command).join(' ') : '';
      return h('tr', { dataset: { id: x.id, name: x.name || '' } },
        h('td', { class: 'flex' }, ellipsis(x.name || '(unnamed)', { cls: 'primary', href: resourceHref('service', x.id) }), h('span', { class: 'secondary' }, idTag(x.id))),
        h('td', null, badge(x.state), transition(x)),
        h('td', { class: 'num' }, String(x.scale ?? 0)),
        h('td', { class: 'num' }, String(containers.filter((c) => c.serviceId === x.id && c.state === 'running').length)),
        h('td', { class: 'flex' }, command ? ellipsis(command, { cls: 'cmd' }) : h('span', { class: 'muted' }, '—')),
        h('td', null, timeEl(x.createdTS ?? x.created)));
    }) : emptyRow(6, 'No services in this stack', 'Create one on the Services page and choose this stack.'));
  }

  async function load() {
    const mine = ++generation;
    try {
      const [s, list, running] = await Promise.all([
        get(`stacks/${encodeURIComponent(id)}`),
        all(`services?stackId=${encodeURIComponent(id)}&state_ne=purged`),
        all('containers?state=running'),
      ]);
      if (disposed || mine !== generation) return;
      services = list;
      containers = running;
      error.hidden = true;
      render(s);
    } catch (err) {
      if (disposed || mine !== generation) return;
      showError(error, err, 'stack');
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
      if (resource && resource.type === 'stack' && resource.id === id) {
        render(resource);
        processes.load();
        return;
      }
      if ((event.resourceId === id && ['state.change', 'process.change'].includes(event.name)) ||
        (['state.change', 'resource.change'].includes(event.name) && (event.resourceType === 'service' || event.resourceType === 'container'))) refresh();
    },
    unmount() {
      disposed = true;
      refresh.cancel();
    },
  };
}
