// The admin console: plain JavaScript, no framework, no build step. Every page is drawn
// from the path (/console/keys, /console/keys/<name>, /console/identities[/<id>] — in
// identities.js —, /console/audit, /console/sign-in);
// every change goes to /console/api/v1/* with the session's CSRF token. Text from the
// server is only ever set as text (never parsed as HTML).
'use strict';

const TYPES = ['GENERIC', 'ONBOARDING', 'GCP', 'AWS'];
const ROLES = ['client', 'edge', 'admin'];
const ACTIONS = ['key.create', 'key.delete', 'key.roll', 'key.update', 'key.set_role', 'key.leaked', 'key.seed',
  'policy.update', 'assertion_key.create', 'assertion_key.retire', 'auth.failed', 'console.sign_in', 'console.sign_out'];
const API = '/console/api/v1';

let session = null; // {name, role, csrfToken, idleTimeoutSeconds} while signed in
const main = document.getElementById('main');

// ---- small DOM helpers ----------------------------------------------------------------

/** An element with attributes (`on*` functions become listeners) and children. */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on') && typeof value === 'function') el.addEventListener(name.slice(2), value);
    else if (value === true) el.setAttribute(name, '');
    else el.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [name, value] of Object.entries(attrs || {})) el.setAttribute(name, String(value));
  for (const child of children.flat()) {
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function announce(text) {
  const region = document.getElementById('announce');
  region.textContent = '';
  setTimeout(() => { region.textContent = text; }, 50);
}

// What a revocation promises: a line at the top of the page, until the next one.
function promise(what, by) {
  let line = document.getElementById('promise');
  if (!line) {
    line = h('p', { id: 'promise', class: 'notice', role: 'status' });
    main.prepend(line);
  }
  line.textContent = `${what}: refused at every edge location by ${when(by)}.`;
}

function when(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

/** A text field or select with its label, hint and error line, tied by ids. */
function field(id, label, control, hint) {
  control.id = id;
  const described = [hint ? `${id}-hint` : null, `${id}-error`].filter(Boolean).join(' ');
  control.setAttribute('aria-describedby', described);
  return h('div', { class: 'field' },
    h('label', { for: id }, label),
    control,
    hint ? h('span', { class: 'hint', id: `${id}-hint` }, hint) : null,
    h('p', { class: 'error', id: `${id}-error`, 'aria-live': 'polite' }));
}

function setError(id, message) {
  const line = document.getElementById(`${id}-error`);
  const control = document.getElementById(id);
  if (line) line.textContent = message || '';
  if (control && control.matches('input, select')) {
    if (message) control.setAttribute('aria-invalid', 'true');
    else control.removeAttribute('aria-invalid');
  }
}

// ---- the API ---------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body, extra) {
  const headers = { Accept: 'application/json', ...(extra || {}) };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (method !== 'GET' && session) headers['X-CSRF-Token'] = session.csrfToken;
  let response;
  try {
    response = await fetch(path, {
      method, headers, credentials: 'same-origin',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(0, 'network', 'The control plane cannot be reached. Check your connection and try again.');
  }
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (response.ok) return data;
  const message = (data && data.message) || `${response.status} ${response.statusText}`;
  if (response.status === 401 && path !== '/console/sign-in') {
    // No message on the first visit (no session yet), one when a session ended.
    signedOut(path === '/console/session' ? '' : message);
  }
  const retry = response.headers.get('Retry-After');
  const suffix = response.status === 429 && retry ? ` (try again in ${retry} s)` : '';
  throw new ApiError(response.status, data && data.error, message + suffix);
}

const enc = encodeURIComponent;

/** Runs `work` with `button` disabled, so a second click or Enter sends nothing twice. */
async function busy(button, work) {
  if (button.disabled) return;
  button.disabled = true;
  button.setAttribute('aria-busy', 'true');
  try { await work(); } finally {
    button.disabled = false;
    button.removeAttribute('aria-busy');
  }
}

// ---- navigation ------------------------------------------------------------------------

// After a navigation the new page's heading takes the focus (screen readers announce it);
// not on the first load.
let focusHeading = false;

function go(path, replace) {
  if (replace) history.replaceState(null, '', path);
  else history.pushState(null, '', path);
  focusHeading = true;
  render();
}

document.addEventListener('click', (event) => {
  const link = event.target.closest('a[data-nav]');
  if (!link || event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
  event.preventDefault();
  go(link.getAttribute('href'));
});
window.addEventListener('popstate', () => { focusHeading = true; render(); });

let afterSignIn = '/console/keys';
let signedOutMessage = '';

function signedOut(message) {
  session = null;
  signedOutMessage = message || '';
  if (!location.pathname.startsWith('/console/sign-in')) {
    afterSignIn = location.pathname + location.search;
    go('/console/sign-in', true);
  }
}

function showBar() {
  const bar = document.getElementById('bar');
  bar.hidden = !session;
  document.getElementById('who').textContent = session ? `Signed in as ${session.name}` : '';
  for (const link of bar.querySelectorAll('a[data-nav]')) {
    const current = location.pathname.startsWith(link.getAttribute('href'));
    if (current) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
}

function page(title, ...content) {
  document.title = `${title} · Metlo keys console`;
  const heading = h('h1', { tabindex: '-1' }, title);
  main.replaceChildren(heading, ...content);
  showBar();
  if (focusHeading) heading.focus();
  focusHeading = false;
}

async function render() {
  const path = location.pathname.replace(/\/+$/, '') || '/console';
  if (path === '/console/sign-in') return signInPage();
  if (!session) {
    try {
      session = await api('GET', '/console/session');
    } catch (e) {
      if (e.status !== 401) {
        page('Console unavailable', h('p', { class: 'error', role: 'alert' }, e.message));
      }
      return;
    }
  }
  if (path === '/console' || path === '/console/keys') return keysPage();
  if (path === '/console/audit') return auditPage();
  if (path === '/console/identities') return identitiesPage();
  const match = path.match(/^\/console\/keys\/([^/]+)$/);
  let name = null;
  try { name = match && decodeURIComponent(match[1]); } catch (e) { name = null; }
  if (name) return keyPage(name);
  const identity = path.match(/^\/console\/identities\/([^/]+)$/);
  let externalId = null;
  try { externalId = identity && decodeURIComponent(identity[1]); } catch (e) { externalId = null; }
  if (externalId) return identityPage(externalId);
  page('Not found', h('p', {}, 'No console page here. ', h('a', { href: '/console/keys', 'data-nav': '' }, 'Go to the keys.')));
}

// ---- sign in and out -------------------------------------------------------------------

function signInPage() {
  const key = h('input', { type: 'password', name: 'key', autocomplete: 'off', spellcheck: 'false', required: true });
  const form = h('form', { class: 'panel', novalidate: true },
    field('key', 'Admin key', key, 'Paste an admin API key. It is exchanged for a session and not kept in the browser.'),
    h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Sign in')));
  const submit = form.querySelector('button[type=submit]');
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    busy(submit, () => signIn());
  });
  const signIn = async () => {
    setError('key', '');
    const value = key.value.trim();
    if (!value) { setError('key', 'Enter an admin key.'); key.focus(); return; }
    try {
      session = await api('POST', '/console/sign-in', { key: value });
    } catch (e) {
      setError('key', e.message);
      key.focus();
      return;
    }
    key.value = '';
    signedOutMessage = '';
    const next = afterSignIn.startsWith('/console/sign-in') ? '/console/keys' : afterSignIn;
    go(next, true);
    announce(`Signed in as ${session.name}`);
  };
  session = null;
  const wrap = h('div', { class: 'signin' },
    signedOutMessage ? h('p', { class: 'error', role: 'alert' }, signedOutMessage) : null, form);
  page('Sign in to the keys console', wrap);
  main.querySelector('h1').classList.add('signin');
  key.focus();
}

document.getElementById('sign-out').addEventListener('click', async () => {
  try {
    await api('POST', '/console/sign-out');
  } catch (e) {
    if (e.status !== 401) { announce(e.message); return; }
  }
  session = null;
  signedOutMessage = 'Signed out.';
  afterSignIn = '/console/keys';
  go('/console/sign-in', true);
});

// ---- keys ------------------------------------------------------------------------------

/** Which field of the create form an API error is about. */
/** Roles whose new secrets outlive a session: the console asks for the admin key again. */
const MINTS = ['admin', 'edge', 'legacy'];
/** Roles whose keys carry API traffic: only they have permissions, credits, an identity. */
const SERVES_TRAFFIC = ['client', 'legacy'];

/** The header that gives the session's key again (and clears the field: it is not kept). */
function confirmHeader(minting, input) {
  if (!minting) return undefined;
  const key = input.value.trim();
  input.value = '';
  return { 'X-Metlo-Confirm-Key': key };
}

function errorField(e) {
  const m = e.message.toLowerCase();
  if (e.code === 'limit_reached') return 'create-form';
  if (m.includes('admin key again')) return 'new-confirm';
  if (m.includes('meta')) return 'new-meta';
  if (m.includes('identit')) return 'new-identity';
  if (m.includes('permission')) return 'new-permissions';
  if (m.includes('name')) return 'new-name';
  if (m.includes('keyfor') || m.includes('type')) return 'new-type';
  if (m.includes('role')) return 'new-role';
  if (m.includes('expires')) return 'new-expires';
  if (m.includes('ratelimit') || m.includes('requests') || m.includes('period')) return 'new-requests';
  return 'create-form';
}

function secretPanel(title, apiKey, note) {
  const input = h('input', { type: 'text', readonly: true, value: apiKey, 'aria-label': 'The new API key', class: 'mono' });
  const copied = h('span', { class: 'success', 'aria-live': 'polite' });
  const copy = h('button', {
    type: 'button',
    onclick: async () => {
      input.select();
      try {
        await navigator.clipboard.writeText(apiKey);
        copied.textContent = 'Copied to the clipboard.';
      } catch (e) {
        copied.textContent = 'Selected: press Ctrl+C (⌘C) to copy.';
      }
    },
  }, 'Copy');
  const panel = h('section', { class: 'secret', 'aria-labelledby': 'secret-title', id: 'secret' },
    h('h2', { id: 'secret-title' }, title),
    h('p', {}, h('strong', {}, 'Copy this key now: it is shown only this once. '), note),
    h('div', { class: 'row' }, input, copy),
    h('div', { class: 'actions' }, copied,
      h('button', {
        type: 'button', class: 'secondary',
        onclick: () => { panel.remove(); document.getElementById('list-title').focus(); },
      }, 'Done, I have copied it')));
  return panel;
}

function createForm(onCreated) {
  const name = h('input', { type: 'text', maxlength: 128, autocomplete: 'off', required: true });
  const type = h('select', {}, TYPES.map((t) => h('option', { value: t }, t)));
  const role = h('select', {}, ROLES.map((r) => h('option', { value: r }, r)));
  const expires = h('input', { type: 'datetime-local' });
  const requests = h('input', { type: 'number', min: 1, step: 1, inputmode: 'numeric' });
  const period = h('input', { type: 'number', min: 1, max: 86400, step: 1, value: 60, inputmode: 'numeric' });
  const meta = h('input', { type: 'text', autocomplete: 'off', spellcheck: 'false', class: 'mono' });
  const permissions = h('input', { type: 'text', autocomplete: 'off', spellcheck: 'false', class: 'mono' });
  const identity = h('input', { type: 'text', maxlength: 255, autocomplete: 'off', spellcheck: 'false' });
  const identityField = field('new-identity', 'Identity (optional)', identity, 'The external ID of the identity it belongs to: it shares its credits and limits.');
  const credits = creditsFields('new', 'Credits (optional)', 'Each request admitted at the edge spends 1 (or its route’s cost). Empty: not metered.');
  const confirmKey = h('input', { type: 'password', autocomplete: 'off', spellcheck: 'false', class: 'mono' });
  const confirmField = field('new-confirm', 'Your admin key, to confirm', confirmKey,
    'An admin or edge key outlives this session: give the key you signed in with again.');
  // Credits and identities are for keys that serve traffic.
  const traffic = credits.fields.slice(0, 2).concat([identityField]);
  const showConfirm = () => {
    confirmField.hidden = !MINTS.includes(role.value);
    for (const f of traffic) f.hidden = !SERVES_TRAFFIC.includes(role.value);
    credits.reset();
  };
  role.addEventListener('change', showConfirm);
  showConfirm();
  const form = h('form', { class: 'panel', 'aria-labelledby': 'create-title', novalidate: true },
    h('h2', { id: 'create-title' }, 'Create a key'),
    h('div', { class: 'fields' },
      field('new-name', 'Name', name, 'Unique, up to 128 characters.'),
      field('new-type', 'Type', type),
      field('new-role', 'Role', role, 'client: API traffic; edge: the Worker; admin: this console and the API.'),
      field('new-expires', 'Expires (optional)', expires, 'Your local time. Empty: never.'),
      field('new-requests', 'Rate limit: requests (optional)', requests, 'Empty: no limit.'),
      field('new-period', 'per seconds', period),
      field('new-meta', 'Metadata (optional)', meta, 'A JSON object sent to the origin with each request, e.g. {"tenant":"acme"}.'),
      field('new-permissions', 'Permissions (optional)', permissions, 'Client keys: what the route policy lets them call, e.g. orders:read, orders:write.'),
      identityField, credits.fields,
      confirmField),
    h('p', { class: 'error', id: 'create-form-error', role: 'alert' }),
    h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Create key')));
  const submit = form.querySelector('button[type=submit]');
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    busy(submit, () => create());
  });
  const create = async () => {
    for (const id of ['new-name', 'new-type', 'new-role', 'new-expires', 'new-requests', 'new-period', 'new-meta', 'new-permissions', 'new-identity', ...credits.ids, 'new-confirm', 'create-form']) setError(id, '');
    const body = { name: name.value, keyFor: type.value, role: role.value };
    if (!name.value.trim()) { setError('new-name', 'Enter a name for the key.'); name.focus(); return; }
    if (expires.value) {
      const at = new Date(expires.value);
      if (Number.isNaN(at.getTime())) { setError('new-expires', 'Enter a date and time.'); return; }
      body.expiresAt = at.toISOString().replace(/\.\d{3}Z$/, 'Z');
    }
    if (requests.value) {
      body.rateLimit = { requests: Number(requests.value), periodSeconds: Number(period.value) };
    }
    if (meta.value.trim()) {
      try {
        body.meta = JSON.parse(meta.value);
      } catch (e) {
        setError('new-meta', 'This is not JSON: write an object such as {"tenant":"acme"}.');
        meta.focus();
        return;
      }
    }
    if (permissions.value.trim()) body.permissions = permissionList(permissions.value);
    if (SERVES_TRAFFIC.includes(role.value)) {
      if (identity.value.trim()) body.identity = identity.value.trim();
      try {
        const c = credits.read();
        if (c) body.credits = c;
      } catch (e) { showFieldError(e, e.id); return; }
    }
    const minting = MINTS.includes(role.value);
    if (minting && !confirmKey.value.trim()) {
      setError('new-confirm', 'Enter the admin key you signed in with.');
      confirmKey.focus();
      return;
    }
    try {
      const created = await api('POST', `${API}/keys/create`, body, confirmHeader(minting, confirmKey));
      form.reset();
      showConfirm();
      onCreated(created);
    } catch (e) {
      const id = credits.errorField(e.message) || errorField(e);
      setError(id, e.message);
      const control = document.getElementById(id);
      if (control && control.focus && id !== 'create-form') control.focus();
    }
  };
  return form;
}

/** Permissions as typed: separated by commas or spaces. */
function permissionList(text) {
  return text.split(/[\s,]+/).filter(Boolean);
}

function permissionsText(list) {
  return list && list.length ? list.join(', ') : '—';
}

function rateText(limit) {
  return limit ? `${limit.requests} / ${limit.periodSeconds} s` : '—';
}

function keysPage() {
  const filterName = h('input', { type: 'search', autocomplete: 'off' });
  const filterType = h('select', {}, h('option', { value: '' }, 'All types'), TYPES.map((t) => h('option', { value: t }, t)));
  const tbody = h('tbody');
  const count = h('p', { class: 'muted', 'aria-live': 'polite' });
  const more = h('button', { type: 'button', class: 'secondary', hidden: true }, 'Load more keys');
  const listError = h('p', { class: 'error', role: 'alert' });
  const secretSlot = h('div');
  let keys = [];
  let cursor = null;

  const showSecret = (panel) => {
    secretSlot.replaceChildren(panel);
    panel.querySelector('input').focus();
  };

  const draw = () => {
    const shown = keys;
    // A redraw removes the focused row's button: give the focus back to the same button
    // of the redrawn row (or the list's heading), not to the page's body.
    const before = document.activeElement;
    const oldRow = tbody.contains(before) ? before.closest('tr') : null;
    const place = oldRow ? [...oldRow.querySelectorAll('button')].indexOf(before) : -1;
    tbody.replaceChildren(...shown.map(row));
    if (oldRow) {
      const newRow = [...tbody.rows].find((r) => r.dataset.key === oldRow.dataset.key);
      const same = newRow ? newRow.querySelectorAll('button')[place] : null;
      (same || document.getElementById('list-title')).focus();
    }
    const filtered = filterName.value.trim() || filterType.value;
    count.textContent = `${shown.length} key${shown.length === 1 ? '' : 's'}${filtered ? ' matching' : ''}`
      + (cursor ? ' shown, more to load' : '');
    more.hidden = !cursor;
  };

  let loads = 0;
  const load = async (reset) => {
    listError.textContent = '';
    const mine = ++loads; // only the latest request's answer is drawn
    try {
      // Filtered by the server, so a filter finds keys not loaded yet.
      const params = new URLSearchParams({ limit: '100' });
      if (filterName.value.trim()) params.set('name', filterName.value.trim());
      if (filterType.value) params.set('type', filterType.value);
      if (!reset && cursor) params.set('cursor', cursor);
      const pageOfKeys = await api('GET', `${API}/keys/list?${params}`);
      if (mine !== loads) return;
      keys = reset ? pageOfKeys.keys : keys.concat(pageOfKeys.keys);
      cursor = pageOfKeys.nextCursor || null;
      draw();
    } catch (e) {
      listError.textContent = `Could not load the keys: ${e.message}`;
    }
  };

  const row = (k) => {
    const link = h('a', { href: `/console/keys/${enc(k.name)}`, 'data-nav': '' }, k.name);
    const toggle = h('button', {
      type: 'button', class: 'secondary small',
      'aria-label': `${k.enabled ? 'Disable' : 'Enable'} ${k.name}`,
      onclick: async () => {
        try {
          const updated = await api('PATCH', `${API}/keys/${enc(k.name)}`, { enabled: !k.enabled });
          announce(`${k.name} ${k.enabled ? 'disabled' : 'enabled'}`);
          if (updated.refusedEverywhereBy) promise(`${k.name} disabled`, updated.refusedEverywhereBy);
          await load(true);
        } catch (e) { listError.textContent = `${k.name}: ${e.message}`; }
      },
    }, k.enabled ? 'Disable' : 'Enable');
    return h('tr', { 'data-key': k.name },
      h('td', {}, link),
      h('td', { class: 'mono nowrap' }, k.identifier),
      h('td', {}, k.for),
      h('td', {}, k.role),
      h('td', { class: 'nowrap' }, when(k.created)),
      h('td', { class: 'nowrap' }, when(k.expiresAt)),
      h('td', { class: 'nowrap' }, k.lastUsed ? when(k.lastUsed) : 'never'),
      h('td', {}, h('span', { class: k.enabled ? 'tag' : 'tag off' }, k.enabled ? 'enabled' : 'disabled')),
      h('td', {}, rateText(k.rateLimit)),
      h('td', { class: 'mono' }, permissionsText(k.permissions)),
      h('td', {}, h('div', { class: 'actions' },
        h('button', { type: 'button', class: 'secondary small', 'aria-label': `Roll ${k.name}`, onclick: () => rollDialog(k, showSecret, () => load(true)) }, 'Roll'),
        toggle,
        h('button', { type: 'button', class: 'danger small', 'aria-label': `Delete ${k.name}`, onclick: () => deleteDialog(k, () => load(true)) }, 'Delete'))));
  };

  let typing = null;
  filterName.addEventListener('input', () => {
    clearTimeout(typing);
    typing = setTimeout(() => load(true), 250);
  });
  filterType.addEventListener('change', () => load(true));
  more.addEventListener('click', () => load(false));

  const table = h('div', { class: 'table-wrap', role: 'region', 'aria-label': 'Keys', tabindex: '0' },
    h('table', {},
      h('thead', {}, h('tr', {}, ['Name', 'Identifier', 'Type', 'Role', 'Created', 'Expires', 'Last used', 'Status', 'Rate limit', 'Permissions', 'Actions']
        .map((c) => h('th', { scope: 'col' }, c)))),
      tbody));
  page('API keys',
    secretSlot,
    createForm((created) => {
      showSecret(secretPanel(`Key “${created.name}” created`, created.apiKey,
        `Its public identifier is ${created.identifier}.`));
      announce(`Key ${created.name} created`);
      load(true);
    }),
    h('section', { 'aria-labelledby': 'list-title' },
      h('h2', { id: 'list-title', tabindex: '-1' }, 'Keys'),
      h('div', { class: 'fields' },
        field('filter-name', 'Filter by name', filterName),
        field('filter-type', 'Filter by type', filterType)),
      count, listError, table, h('div', { class: 'actions' }, more)));
  load(true);
}

function dialog(title, ...content) {
  const d = h('dialog', { 'aria-labelledby': 'dialog-title' }, h('h2', { id: 'dialog-title' }, title), ...content);
  d.addEventListener('close', () => d.remove());
  document.body.append(d);
  d.showModal();
  return d;
}

function rollDialog(k, showSecret, reload) {
  const overlap = h('input', { type: 'number', min: 0, max: 604800, step: 1, value: 0, inputmode: 'numeric' });
  const own = session && k.name === session.name;
  const minting = MINTS.includes(k.role);
  const confirmKey = h('input', { type: 'password', autocomplete: 'off', spellcheck: 'false', class: 'mono' });
  const form = h('form', { method: 'dialog', novalidate: true },
    h('p', {}, `Issue a new secret for “${k.name}”. The current secret keeps working for the overlap, then is refused everywhere.`),
    own ? h('p', { class: 'error' }, 'This is the key you are signed in with: your session ends when its current secret does. Copy the new key to sign in again.') : null,
    field('roll-overlap', 'Overlap in seconds (0 to 604800)', overlap),
    minting ? field('roll-confirm', 'Your admin key, to confirm', confirmKey,
      `A new ${k.role} secret outlives this session: give the key you signed in with again.`) : null,
    h('div', { class: 'actions' },
      h('button', { type: 'submit' }, 'Roll key'),
      h('button', { type: 'button', class: 'secondary', onclick: () => d.close() }, 'Cancel')));
  const d = dialog(`Roll ${k.name}`, form);
  const submit = form.querySelector('button[type=submit]');
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    busy(submit, async () => {
      setError('roll-overlap', '');
      setError('roll-confirm', '');
      if (minting && !confirmKey.value.trim()) {
        setError('roll-confirm', 'Enter the admin key you signed in with.');
        confirmKey.focus();
        return;
      }
      try {
        const rolled = await api('POST', `${API}/keys/${enc(k.name)}/roll`, { overlapSeconds: Number(overlap.value || 0) },
          confirmHeader(minting, confirmKey));
        d.close();
        showSecret(secretPanel(`Key “${rolled.name}” rolled`, rolled.apiKey,
          `The previous secret (${rolled.previousIdentifier}) works until ${when(rolled.previousValidUntil)}; every edge location refuses it by ${when(rolled.refusedEverywhereBy)}.`));
        announce(`Key ${rolled.name} rolled`);
        // Rolling the session's own key may end the session: keep the new key on screen
        // rather than reloading into a sign-in page.
        if (!own) reload();
      } catch (e) {
        const id = minting && e.message.includes('admin key again') ? 'roll-confirm' : 'roll-overlap';
        setError(id, e.message);
        document.getElementById(id).focus();
      }
    });
  });
  overlap.focus();
}

function deleteDialog(k, reload) {
  const typed = h('input', { type: 'text', autocomplete: 'off', spellcheck: 'false' });
  const confirm = h('button', { type: 'submit', class: 'danger', disabled: true }, 'Delete key');
  typed.addEventListener('input', () => { confirm.disabled = typed.value !== k.name; });
  const form = h('form', { method: 'dialog', novalidate: true },
    h('p', {}, 'Deleting a key refuses it everywhere and cannot be undone.'),
    field('delete-confirm', `Type the key’s name (${k.name}) to confirm`, typed),
    h('div', { class: 'actions' }, confirm,
      h('button', { type: 'button', class: 'secondary', onclick: () => d.close() }, 'Cancel')));
  const d = dialog(`Delete ${k.name}?`, form);
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    if (typed.value !== k.name) { setError('delete-confirm', 'The name does not match.'); return; }
    busy(confirm, async () => {
      try {
        const deleted = await api('DELETE', `${API}/keys/${enc(k.name)}/delete`);
        d.close();
        announce(`Key ${k.name} deleted`);
        promise(`Key “${k.name}” deleted`, deleted.refusedEverywhereBy);
        reload();
      } catch (e) {
        setError('delete-confirm', e.message);
      }
    });
  });
  typed.focus();
}

function signOutDialog(name, done) {
  const confirm = h('button', { type: 'submit', class: 'danger' }, 'End sessions');
  const form = h('form', { method: 'dialog', novalidate: true },
    h('p', {}, `End every console session opened with “${name}” (any of its secrets), on every device. The key itself keeps working.`),
    h('p', { class: 'error', id: 'sign-out-everywhere-error', role: 'alert' }),
    h('div', { class: 'actions' }, confirm,
      h('button', { type: 'button', class: 'secondary', onclick: () => d.close() }, 'Cancel')));
  const d = dialog(`Sign “${name}” out everywhere?`, form);
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    busy(confirm, async () => {
      try {
        const result = await api('DELETE', `${API}/keys/${enc(name)}/sessions`);
        d.close();
        done(result.ended);
      } catch (e) {
        setError('sign-out-everywhere', e.message);
      }
    });
  });
  confirm.focus();
}

// ---- one key: its usage ----------------------------------------------------------------

const OUTCOMES = [['rateLimited', 'rate limited'], ['creditsExhausted', 'out of credits'],
  ['forbidden', 'forbidden by the route policy'], ['disabled', 'disabled or revoked'], ['expired', 'expired']];

/** Refused requests in one of the usage answers' `refused` objects. */
function refusedTotal(refused) {
  return OUTCOMES.reduce((sum, [k]) => sum + ((refused && refused[k]) || 0), 0);
}

/** "3 refused: 2 rate limited, 1 expired", or nothing refused. */
function refusedText(refused) {
  const parts = OUTCOMES.filter(([k]) => refused && refused[k]).map(([k, label]) => `${refused[k]} ${label}`);
  return parts.length ? `${refusedTotal(refused)} refused at the edge: ${parts.join(', ')}.` : 'None refused at the edge.';
}

/** Requests per hour as bars (admitted, and refused stacked above in another colour),
 * drawn by hand: 24 or 168 pairs of rectangles need no chart library. */
function usageChart(usage) {
  const width = 720; const height = 220; const left = 44; const bottom = 28; const top = 12;
  const hours = usage.hours;
  const peak = Math.max(1, ...hours.map((x) => x.requests + refusedTotal(x.refused)));
  const plotW = width - left - 8; const plotH = height - top - bottom;
  const slot = plotW / hours.length;
  const bars = hours.flatMap((x, i) => {
    const refused = refusedTotal(x.refused);
    const barH = (x.requests / peak) * plotH;
    const refusedH = (refused / peak) * plotH;
    const start = new Date(x.start);
    const at = { x: (left + i * slot + slot * 0.1).toFixed(2), width: Math.max(1, slot * 0.8).toFixed(2) };
    const label = `${start.toLocaleString()}: ${x.requests} request${x.requests === 1 ? '' : 's'}${refused ? `, ${refused} refused` : ''}`;
    return [svg('rect', {
      class: 'bar-rect', ...at, y: (top + plotH - barH).toFixed(2), height: barH.toFixed(2), 'data-requests': x.requests,
    }, svg('title', {}, label)),
    svg('rect', {
      class: 'bar-refused', ...at, y: (top + plotH - barH - refusedH).toFixed(2), height: refusedH.toFixed(2), 'data-refused': refused,
    }, svg('title', {}, label))];
  });
  const labelEvery = hours.length > 48 ? 24 : 6;
  const labels = hours.map((x, i) => (i % labelEvery === 0
    ? svg('text', { x: (left + i * slot).toFixed(2), y: height - 8 },
      hours.length > 48 ? new Date(x.start).toLocaleDateString() : new Date(x.start).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' }))
    : null)).filter(Boolean);
  return svg('svg', {
    class: 'usage', viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-labelledby': 'chart-title chart-summary',
  },
  svg('line', { class: 'axis', x1: left, y1: top + plotH, x2: width - 8, y2: top + plotH }),
  svg('line', { class: 'axis', x1: left, y1: top, x2: left, y2: top + plotH }),
  svg('text', { x: 4, y: top + 10 }, String(peak)),
  svg('text', { x: 4, y: top + plotH }, '0'),
  ...labels, ...bars);
}

/** A grant as the API shows it: what was granted, and the refill. */
function creditsText(c) {
  if (!c) return '—';
  const r = c.refill;
  const refill = !r ? '' : `, refilled to ${r.amount} ${r.interval === 'daily' ? 'daily'
    : r.interval === 'monthly' ? `monthly on day ${r.refillDay || 1}` : `every ${r.periodSeconds} s`}`;
  return `${c.granted} granted${c.added ? ` (${c.added} added)` : ''}${refill}; what is left is counted at the edge`;
}

/** The "Requests per hour" section: span buttons, a summary, the chart. `path`: the
 * usage route; `who`: how the summary names whose requests; `missing`: the 404's words. */
function usageSection(path, who, missing) {
  const chartSlot = h('div');
  const summary = h('p', { id: 'chart-summary', 'aria-live': 'polite' });
  const error = h('p', { class: 'error', role: 'alert' });
  let span = 24;
  const load = async () => {
    error.textContent = '';
    const to = new Date();
    const from = new Date(to.getTime() - (span - 1) * 3600 * 1000);
    const params = new URLSearchParams({ from: from.toISOString(), to: to.toISOString() });
    try {
      const usage = await api('GET', `${path}?${params}`);
      summary.textContent = `${usage.total} request${usage.total === 1 ? '' : 's'}${who} in the ${span === 24 ? 'last 24 hours' : 'last 7 days'} (hourly, up to the last flush). ${refusedText(usage.refused)}`;
      summary.dataset.total = String(usage.total);
      summary.dataset.refused = String(refusedTotal(usage.refused));
      chartSlot.replaceChildren(usageChart(usage));
    } catch (e) {
      error.textContent = e.status === 404 ? missing : `Could not load the usage: ${e.message}`;
      chartSlot.replaceChildren();
    }
  };
  const buttons = [24, 168].map((hours) => h('button', {
    type: 'button', 'aria-pressed': String(hours === span), 'data-hours': hours,
    onclick: () => { span = hours; for (const b of buttons) b.setAttribute('aria-pressed', String(Number(b.dataset.hours) === span)); load(); },
  }, hours === 24 ? 'Last 24 hours' : 'Last 7 days'));
  const section = h('section', { 'aria-labelledby': 'chart-title' },
    h('h2', { id: 'chart-title' }, 'Requests per hour'),
    h('div', { class: 'chart-controls', role: 'group', 'aria-label': 'Time span' }, buttons),
    summary, error, h('figure', { class: 'chart' }, chartSlot));
  return { section, load, error };
}

function keyPage(name) {
  const details = h('dl', { class: 'meta' });
  const usage = usageSection(`${API}/keys/${enc(name)}/usage`, '', `There is no key named “${name}”.`);

  const show = (k) => {
    details.replaceChildren(...[
      ['Identifier', k.identifier], ['Type', k.for], ['Role', k.role], ['Created', when(k.created)],
      ['Expires', when(k.expiresAt)], ['Last used', k.lastUsed ? when(k.lastUsed) : 'never'],
      ['Status', k.enabled ? 'enabled' : 'disabled'], ['Rate limit', rateText(k.rateLimit)],
      ['Metadata', k.meta ? JSON.stringify(k.meta) : '—'],
      ['Permissions', permissionsText(k.permissions)],
      ['Credits', creditsText(k.credits)],
      ['Identity', k.identity
        ? h('a', { href: `/console/identities/${enc(k.identity)}`, 'data-nav': '' }, k.identity) : '—'],
    ].flatMap(([term, value]) => [h('dt', {}, term), h('dd', { 'data-term': term }, value)]));
    for (const panel of [permissionsEdit, creditsEdit, identityEdit]) panel.hidden = !SERVES_TRAFFIC.includes(k.role);
  };
  // The edit forms' fields as loaded (each form refills its own after a save, so unsaved
  // edits in the others stay).
  const fill = (k) => {
    permissionsInput.value = permissionsOf(k);
    identityInput.value = identityOf(k);
  };

  // A form that PATCHes one field of the key (client keys only) and refills it as saved.
  const oneFieldEdit = (id, title, input, hint, toBody, fromKey) => {
    const form = h('form', { class: 'panel', 'aria-labelledby': `${id}-title`, novalidate: true, hidden: true },
      h('h2', { id: `${id}-title` }, title),
      field(`edit-${id}`, title, input, hint),
      h('div', { class: 'actions' }, h('button', { type: 'submit' }, `Save ${title.toLowerCase()}`)));
    form.addEventListener('submit', (event) => {
      event.preventDefault();
      busy(form.querySelector('button[type=submit]'), async () => {
        setError(`edit-${id}`, '');
        try {
          const updated = await api('PATCH', `${API}/keys/${enc(name)}`, toBody());
          show(updated);
          input.value = fromKey(updated);
          announce(`${title} of ${name} saved`);
        } catch (e) {
          setError(`edit-${id}`, e.message);
          input.focus();
        }
      });
    });
    return form;
  };
  const permissionsOf = (k) => (k.permissions || []).join(', ');
  const identityOf = (k) => k.identity || '';

  // Permissions: the whole set is replaced.
  const permissionsInput = h('input', { type: 'text', autocomplete: 'off', spellcheck: 'false', class: 'mono' });
  const permissionsEdit = oneFieldEdit('permissions', 'Permissions', permissionsInput,
    'Separated by commas or spaces; empty: none. Applies at the edge within the revocation bound.',
    () => ({ permissions: permissionList(permissionsInput.value) }), permissionsOf);
  const creditsEdit = creditsPanel(`${API}/keys/${enc(name)}`, 'key-credits', show);
  creditsEdit.hidden = true;
  // The identity it belongs to (empty: none).
  const identityInput = h('input', { type: 'text', maxlength: 255, autocomplete: 'off', spellcheck: 'false' });
  const identityEdit = oneFieldEdit('identity', 'Identity', identityInput,
    'The external ID of the identity it belongs to. Empty: none.',
    () => ({ identity: identityInput.value.trim() || null }), identityOf);

  const loadDetails = async () => {
    // GET /keys/list and /keys/onboarding are the lists: keys of those names are found
    // in the list.
    if (name !== 'list' && name !== 'onboarding') {
      const k = await api('GET', `${API}/keys/${enc(name)}`);
      show(k);
      fill(k);
      return;
    }
    let cursor = '';
    for (;;) {
      const found = await api('GET', `${API}/keys/list?${new URLSearchParams({ limit: '1000', cursor })}`);
      const k = found.keys.find((x) => x.name === name);
      if (k) { show(k); fill(k); return; }
      if (!found.nextCursor) return;
      cursor = found.nextCursor;
    }
  };

  const signedOutLine = h('p', { id: 'sessions-ended', 'aria-live': 'polite' });
  const signOut = h('button', { type: 'button', class: 'secondary', id: 'sign-out-everywhere' }, 'Sign out everywhere');
  signOut.addEventListener('click', () => signOutDialog(name, (ended) => {
    const text = `${ended} console session${ended === 1 ? '' : 's'} ended.`;
    signedOutLine.textContent = text;
    signedOutLine.dataset.ended = String(ended);
    announce(text);
    // Our own session was one of them.
    if (session && session.name === name) signedOut('You signed this key out everywhere, this console included: sign in again.');
  }));

  page(name,
    h('p', {}, h('a', { href: '/console/keys', 'data-nav': '' }, '← All keys')),
    details,
    permissionsEdit, creditsEdit, identityEdit,
    h('div', { class: 'actions' }, signOut), signedOutLine,
    usage.section);
  loadDetails().catch((e) => {
    if (e.status !== 404) usage.error.textContent = `Could not load the key: ${e.message}`;
  });
  usage.load();
}

// ---- the audit log ---------------------------------------------------------------------

function auditPage() {
  const params = new URLSearchParams(location.search);
  const action = h('input', { type: 'text', list: 'audit-actions', autocomplete: 'off', value: params.get('action') || '' });
  const actor = h('input', { type: 'text', autocomplete: 'off', value: params.get('actor') || '' });
  const tbody = h('tbody');
  const error = h('p', { class: 'error', role: 'alert' });
  const older = h('button', { type: 'button', class: 'secondary older', hidden: true }, 'Older entries');
  const newest = h('button', { type: 'button', class: 'secondary newest', hidden: true }, 'Newest entries');
  let before = null;

  const load = async () => {
    error.textContent = '';
    const q = new URLSearchParams({ limit: '50' });
    if (action.value.trim()) q.set('action', action.value.trim());
    if (actor.value.trim()) q.set('actor', actor.value.trim());
    if (before) q.set('before', String(before));
    try {
      const entries = await api('GET', `${API}/audit?${q}`);
      tbody.replaceChildren(...entries.entries.map((e) => h('tr', {},
        h('td', {}, when(e.at)), h('td', {}, e.actor || '—'), h('td', { class: 'mono' }, e.action),
        h('td', {}, e.target || '—'), h('td', { class: 'mono' }, e.ip || '—'),
        h('td', { class: 'mono' }, e.detail && Object.keys(e.detail).length ? JSON.stringify(e.detail) : ''))));
      if (!entries.entries.length) tbody.replaceChildren(h('tr', {}, h('td', { colspan: 6 }, 'No entries.')));
      older.hidden = !entries.nextBefore;
      older.dataset.before = entries.nextBefore || '';
      newest.hidden = !before;
    } catch (e) {
      error.textContent = `Could not load the audit log: ${e.message}`;
    }
  };

  const form = h('form', { class: 'panel', role: 'search', 'aria-label': 'Filter the audit log' },
    h('div', { class: 'fields' },
      field('audit-action', 'Action', action, 'For example key.create or auth.failed.'),
      field('audit-actor', 'Actor (key name)', actor)),
    h('datalist', { id: 'audit-actions' }, ACTIONS.map((a) => h('option', { value: a }))),
    h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Filter')));
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    before = null;
    const q = new URLSearchParams();
    if (action.value.trim()) q.set('action', action.value.trim());
    if (actor.value.trim()) q.set('actor', actor.value.trim());
    history.replaceState(null, '', `/console/audit${q.toString() ? `?${q}` : ''}`);
    load();
  });
  older.addEventListener('click', () => { before = Number(older.dataset.before); load(); });
  newest.addEventListener('click', () => { before = null; load(); });

  page('Audit log', form, error,
    h('div', { class: 'table-wrap', role: 'region', 'aria-label': 'Audit entries', tabindex: '0' },
      h('table', {},
        h('thead', {}, h('tr', {}, ['Time', 'Actor', 'Action', 'Key', 'IP', 'Detail'].map((c) => h('th', { scope: 'col' }, c)))),
        tbody)),
    h('div', { class: 'actions' }, newest, older));
  load();
}

render();
