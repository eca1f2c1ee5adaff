// API keys: list, create (the secret is shown once) and remove. An admin sees every key and
// creates them for any project; a project key sees and makes its own project's. Refetched
// when `apikey.change` says one was created or removed.

import { ApiError, all, del, post, session } from '../api.js';
import {
  badge, confirmDialog, debounce, ellipsis, emptyRow, h, idTag, replace, timeEl, toast,
} from '../dom.js';

export function mount(root) {
  let disposed = false;
  let generation = 0;
  let keys = [];
  let projects = [];
  const me = session();
  const body = h('tbody');
  const error = h('div', { class: 'callout red', role: 'alert', hidden: true });
  const created = h('div', { class: 'callout blue', role: 'status', hidden: true, id: 'new-key' });

  const name = h('input', { id: 'key-name', autocomplete: 'off', placeholder: 'ci-deploy', maxlength: '255' });
  const description = h('input', { id: 'key-description', autocomplete: 'off', placeholder: 'what it is for' });
  const project = h('select', { id: 'key-project', 'aria-label': 'Project' });
  const submit = h('button', { type: 'submit', class: 'primary' }, 'Create key');
  const formError = h('p', { class: 'form-error', role: 'alert' });
  const form = h('form', { class: 'body', 'aria-labelledby': 'key-form-title', novalidate: true },
    h('div', { class: 'form-row' },
      h('label', { class: 'field', for: 'key-name' }, 'Name', name),
      h('label', { class: 'field wide', for: 'key-description' }, h('span', null, 'Description ', h('span', { class: 'hint' }, '(optional)')), description),
      me.admin ? h('label', { class: 'field', for: 'key-project' }, 'For', project) : null,
      submit),
    formError);

  replace(root,
    h('header', { class: 'page-head' },
      h('div', null, h('h1', null, 'API keys'),
        h('p', { class: 'sub' }, me.admin
          ? 'Keys authenticate clients as an account: yours (admin) or a project. The secret is shown once, when the key is made; only a hash is stored.'
          : 'Keys of this project. The secret is shown once, when the key is made; only a hash is stored.'))),
    h('div', { class: 'content' },
      error, created,
      h('section', { class: 'card', 'aria-labelledby': 'key-form-title' },
        h('header', null, h('h2', { id: 'key-form-title' }, 'Create a key')), form),
      h('section', { class: 'card', 'aria-labelledby': 'keys-title' },
        h('header', null, h('h2', { id: 'keys-title' }, 'Keys')),
        h('div', { class: 'table-wrap' }, h('table', { class: 'grid', 'aria-labelledby': 'keys-title' },
          h('thead', null, h('tr', null, h('th', { scope: 'col' }, 'Name'), h('th', { scope: 'col' }, 'Access key'),
            h('th', { scope: 'col' }, 'Account'), h('th', { scope: 'col' }, 'State'), h('th', { scope: 'col' }, 'Created'),
            h('th', { scope: 'col' }, 'Actions'))),
          body)))));

  function accountLabel(accountId) {
    const p = projects.find((x) => x.id === accountId);
    return p ? [ellipsis(p.name || p.id), ' ', idTag(accountId)] : idTag(accountId);
  }

  function row(key) {
    const mine = key.publicValue === me.access;
    const remove = h('button', { type: 'button', class: 'small danger', 'aria-label': `Remove ${key.name || key.publicValue}` }, 'Remove');
    remove.addEventListener('click', async () => {
      const ok = await confirmDialog({
        title: `Remove ${key.name || key.publicValue}?`,
        message: mine
          ? 'This is the key this page is logged in with: removing it logs you out, and every client using it is refused from now on.'
          : 'Every client using this key is refused from now on. This cannot be undone.',
        confirm: 'Remove',
      });
      if (!ok) return;
      remove.disabled = true;
      try {
        await del(`apikeys/${encodeURIComponent(key.id)}`);
        if (disposed) return;
        keys = keys.filter((k) => k.id !== key.id);
        render();
        toast(`Removed ${key.name || key.publicValue}.`);
      } catch (err) {
        toast(`Cannot remove ${key.name || key.publicValue}: ${err.message}`, { error: true });
        remove.disabled = false;
      }
    });
    return h('tr', { id: key.id, dataset: { id: key.id, access: key.publicValue, name: key.name || '' } },
      h('td', { class: 'flex' }, ellipsis(key.name || '(unnamed)', { cls: 'primary' }),
        key.description ? h('span', { class: 'secondary' }, ellipsis(key.description)) : null),
      h('td', null, h('span', { class: 'mono' }, key.publicValue), mine ? h('span', { class: 'secondary' }, 'this page\u2019s key') : null),
      h('td', null, accountLabel(key.accountId)),
      h('td', null, badge(key.state)),
      h('td', null, timeEl(key.createdTS ?? key.created)),
      h('td', null, remove));
  }

  function render() {
    const shown = keys.filter((k) => k.state !== 'removed' && k.state !== 'purged');
    replace(body, shown.length ? shown.map(row) : emptyRow(6, 'No API keys', 'Create one with the form above.'));
    if (me.admin) {
      const chosen = project.value;
      replace(project, h('option', { value: '' }, 'Myself (admin)'),
        projects.filter((p) => p.state === 'active').map((p) => h('option', { value: p.id, selected: p.id === chosen },
          `Project ${(p.name || p.id).length > 40 ? `${(p.name || p.id).slice(0, 39)}…` : p.name || p.id} (${p.id})`)));
    }
  }

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    formError.textContent = '';
    const input = {};
    if (name.value.trim()) input.name = name.value.trim();
    if (description.value.trim()) input.description = description.value.trim();
    if (me.admin && project.value) input.accountId = project.value;
    submit.disabled = true;
    try {
      const key = await post('apikeys', input);
      if (disposed) return;
      name.value = '';
      description.value = '';
      if (!keys.some((k) => k.id === key.id)) keys.push(key);
      render();
      showSecret(key);
    } catch (err) {
      formError.textContent = err.message + (err.detail ? ` (${err.detail})` : '');
    } finally {
      submit.disabled = false;
    }
  });

  /** The one time the secret is visible: in a callout with copy buttons, until dismissed. */
  function showSecret(key) {
    const copy = (text, label) => {
      const button = h('button', { type: 'button', class: 'small', 'aria-label': `Copy the ${label}` }, 'Copy');
      button.addEventListener('click', async () => {
        try {
          await navigator.clipboard.writeText(text);
          toast(`Copied the ${label}.`);
        } catch {
          toast(`Cannot copy: select the ${label} and copy it by hand.`, { error: true });
        }
      });
      return button;
    };
    const dismiss = h('button', { type: 'button', class: 'small' }, 'I have saved it');
    dismiss.addEventListener('click', () => {
      created.hidden = true;
      replace(created);
    });
    created.hidden = false;
    replace(created,
      h('strong', null, `Key ${key.name || key.publicValue} created. Save the secret now: it is not shown again.`),
      h('dl', { class: 'facts' },
        h('dt', null, 'Access key'), h('dd', null, h('code', { class: 'secret', dataset: { field: 'access' } }, key.publicValue), ' ', copy(key.publicValue, 'access key')),
        h('dt', null, 'Secret key'), h('dd', null, h('code', { class: 'secret', dataset: { field: 'secret' } }, key.secretValue), ' ', copy(key.secretValue, 'secret key'))),
      h('div', { style: 'margin-top:.6rem' }, dismiss));
  }

  async function load() {
    const mine = ++generation;
    try {
      const [list, projectList] = await Promise.all([
        all('apikeys'),
        me.admin ? all('projects').catch(() => []) : Promise.resolve([]),
      ]);
      if (disposed || mine !== generation) return;
      error.hidden = true;
      keys = list;
      projects = projectList;
      render();
    } catch (err) {
      if (disposed || mine !== generation) return;
      error.hidden = false;
      replace(error, h('strong', null, err instanceof ApiError && err.status === 403 ? 'This key may not list keys' : 'Cannot load API keys'), err.message);
    }
  }

  const refresh = debounce(load, 150, 800);
  load();
  return {
    title: 'API keys',
    onEvent(event) {
      if (event.name === 'apikey.change' || event.name === 'live.open') refresh();
    },
    unmount() {
      disposed = true;
      refresh.cancel();
    },
  };
}
