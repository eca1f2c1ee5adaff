// Settings: every tunable with its value, where the value comes from (default, environment,
// database) and what it does. An admin changes one here (PUT /v1/settings/{name}); it takes
// effect at once. Refetched when `setting.change` says one changed.

import { ApiError, all, del, put } from '../api.js';
import { badge, debounce, ellipsis, emptyRow, h, replace, toast } from '../dom.js';

const SOURCE_TONE = { Database: 'blue', Environment: 'amber', Default: 'gray' };

export function mount(root) {
  let disposed = false;
  let generation = 0;
  let rows = [];
  let editing = null; // the name of the setting whose editor is open
  const body = h('tbody');
  const error = h('div', { class: 'callout red', role: 'alert', hidden: true });
  const search = h('input', { id: 'settings-search', type: 'search', placeholder: 'name or description', autocomplete: 'off' });

  replace(root,
    h('header', { class: 'page-head' },
      h('div', null, h('h1', null, 'Settings'),
        h('p', { class: 'sub' }, 'Every tunable of the server. A value stored here takes effect at once, on every node, and wins over the environment; removing it brings back the environment\u2019s value or the default.'))),
    h('div', { class: 'content' },
      error,
      h('section', { class: 'card', 'aria-labelledby': 'settings-title' },
        h('header', null, h('h2', { id: 'settings-title' }, 'All settings'),
          h('div', { class: 'toolbar' }, h('label', { class: 'sr-only', for: 'settings-search' }, 'Filter settings'), search)),
        h('div', { class: 'table-wrap' }, h('table', { class: 'grid fixed', 'aria-labelledby': 'settings-title' },
          h('colgroup', null, h('col', { class: 'w-name' }), h('col', { class: 'w-value' }), h('col', { class: 'w-source' }), h('col')),
          h('thead', null, h('tr', null, h('th', { scope: 'col' }, 'Name'), h('th', { scope: 'col' }, 'Value'),
            h('th', { scope: 'col' }, 'Source'), h('th', { scope: 'col' }, 'Description'))),
          body)))));

  function editor(setting) {
    const input = h('input', { class: 'mono', value: String(setting.value ?? ''), 'aria-label': `New value of ${setting.name}` });
    const save = h('button', { type: 'submit', class: 'primary small' }, 'Save');
    const cancel = h('button', { type: 'button', class: 'small' }, 'Cancel');
    const err = h('p', { class: 'form-error', role: 'alert' });
    const form = h('form', { class: 'inline-edit', novalidate: true }, input, save, cancel, err);
    cancel.addEventListener('click', () => {
      editing = null;
      render();
    });
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      err.textContent = '';
      save.disabled = true;
      try {
        const updated = await put(`settings/${encodeURIComponent(setting.name)}`, { value: input.value.trim() });
        if (disposed) return;
        editing = null;
        upsert(updated);
        toast(`${setting.name} is now ${updated.value}.`);
      } catch (error2) {
        err.textContent = error2.message;
        save.disabled = false;
      }
    });
    setTimeout(() => input.focus(), 0);
    return form;
  }

  async function reset(setting, button) {
    button.disabled = true;
    try {
      const updated = await del(`settings/${encodeURIComponent(setting.name)}`);
      if (disposed) return;
      upsert(updated);
      toast(`${setting.name} is back to ${updated.value} (${updated.source.toLowerCase()}).`);
    } catch (err) {
      toast(`Cannot reset ${setting.name}: ${err.message}`, { error: true });
      button.disabled = false;
    }
  }

  function row(setting) {
    const edit = h('button', { type: 'button', class: 'small', 'aria-label': `Change ${setting.name}` }, 'Change');
    edit.addEventListener('click', () => {
      editing = setting.name;
      render();
    });
    const resetButton = setting.inDb ? h('button', { type: 'button', class: 'small ghost', 'aria-label': `Reset ${setting.name}`, title: 'Remove the stored value' }, 'Reset') : null;
    if (resetButton) resetButton.addEventListener('click', () => reset(setting, resetButton));
    const valueCell = editing === setting.name ? editor(setting)
      : h('div', { class: 'value-line' }, ellipsis(String(setting.value ?? ''), { cls: 'mono setting-value' }), edit, resetButton);
    return h('tr', { id: `setting-${setting.name}`, dataset: { name: setting.name } },
      h('td', null, ellipsis(setting.name, { cls: 'mono primary' }),
        setting.environmentVariable ? h('span', { class: 'secondary mono', title: 'Environment variable' }, ellipsis(setting.environmentVariable)) : null),
      h('td', null, valueCell,
        setting.defaultValue !== undefined && String(setting.defaultValue) !== String(setting.value)
          ? h('span', { class: 'secondary' }, 'default ', h('span', { class: 'mono' }, String(setting.defaultValue))) : null),
      h('td', null, badge(setting.source, setting.source, SOURCE_TONE[setting.source] || 'gray')),
      h('td', { class: 'desc' }, setting.description || h('span', { class: 'muted' }, '—')));
  }

  function shown() {
    const q = search.value.trim().toLowerCase();
    return rows.filter((s) => !q || s.name.toLowerCase().includes(q) || (s.description || '').toLowerCase().includes(q));
  }

  function render() {
    const list = shown();
    replace(body, list.length ? list.map(row) : emptyRow(4, rows.length ? 'No setting matches.' : 'No settings.'));
  }

  function upsert(setting) {
    const at = rows.findIndex((s) => s.name === setting.name);
    if (at >= 0) rows[at] = setting;
    else rows.push(setting);
    const old = body.querySelector(`tr[data-name="${CSS.escape(setting.name)}"]`);
    if (old && editing !== setting.name) old.replaceWith(row(setting));
    else if (!old) render();
  }

  async function load() {
    const mine = ++generation;
    try {
      const list = await all('settings');
      if (disposed || mine !== generation) return;
      error.hidden = true;
      rows = list;
      // An open editor keeps its row (and what is typed in it); the others are redrawn.
      if (editing) for (const s of rows) upsert(s);
      else render();
    } catch (err) {
      if (disposed || mine !== generation) return;
      error.hidden = false;
      replace(error, h('strong', null, err instanceof ApiError && err.status === 403 ? 'Settings are for admin keys' : 'Cannot load settings'), err.message);
    }
  }

  search.addEventListener('input', render);
  const refresh = debounce(load, 150, 800);
  load();
  return {
    title: 'Settings',
    onEvent(event) {
      if (event.name === 'setting.change' || event.name === 'live.open') refresh();
    },
    unmount() {
      disposed = true;
      refresh.cancel();
    },
  };
}
