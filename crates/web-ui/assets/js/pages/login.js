// Log in with an API key. The key is checked against the API and kept in this tab's session
// storage only: closing the tab forgets it.

import { ApiError, request, saveSession } from '../api.js';
import { h, replace } from '../dom.js';

export function mount(root, { onLogin }) {
  const access = h('input', {
    id: 'login-access', name: 'access', autocomplete: 'username', required: true,
    class: 'mono', spellcheck: 'false', autocapitalize: 'off',
  });
  const secret = h('input', {
    id: 'login-secret', name: 'secret', type: 'password', autocomplete: 'current-password',
    required: true, class: 'mono', spellcheck: 'false',
  });
  const error = h('p', { class: 'form-error', role: 'alert', id: 'login-error' });
  const submit = h('button', { type: 'submit', class: 'primary' }, 'Log in');
  const form = h('form', { class: 'login', 'aria-labelledby': 'login-title', novalidate: true },
    h('div', { class: 'brand' }, h('img', { src: '/assets/favicon.svg', alt: '', width: '30', height: '30' }),
      h('span', { id: 'login-title' }, 'drover', h('small', null, 'Log in with an API key'))),
    h('p', null, 'Use an admin key to see everything, or a project key for one project. ', h('code', null, 'drover up'),
      ' prints one, and the server writes a generated one to ', h('code', null, 'admin-key.env'), '.'),
    h('label', { class: 'field', for: 'login-access' }, 'Access key', access),
    h('label', { class: 'field', for: 'login-secret' }, 'Secret key', secret),
    error,
    submit,
    h('p', { class: 'note muted' }, 'The key stays in this browser tab (session storage) and is sent only to this server.'));

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    error.textContent = '';
    const key = { access: access.value.trim(), secret: secret.value.trim() };
    if (!key.access || !key.secret) {
      error.textContent = 'Enter both the access key and the secret key.';
      return;
    }
    submit.disabled = true;
    submit.textContent = 'Checking…';
    try {
      await request('GET', '', undefined, key);
      // Settings are for admins: the answer says which kind of key this is.
      const allowed = async (path) => {
        try {
          await request('GET', path, undefined, key);
          return true;
        } catch (err) {
          if (err instanceof ApiError && err.status === 403) return false;
          throw err;
        }
      };
      const admin = await allowed('settings');
      // A project key gets the Processes page when the API shows it its project's processes.
      const processes = admin || await allowed('processinstances?limit=1');
      saveSession({ ...key, admin, processes });
      onLogin();
    } catch (err) {
      error.textContent = err instanceof ApiError && err.status === 401
        ? 'That key was refused: check the access key and the secret key.'
        : `Cannot log in: ${err.message}`;
      submit.disabled = false;
      submit.textContent = 'Log in';
    }
  });

  replace(root, h('div', { class: 'login-wrap' }, form));
  access.focus();
  return { title: 'Log in' };
}
