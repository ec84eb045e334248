// The console's identities and credits: the identities list with its create form, one
// identity's page (its credits, shared limits and metadata edited there, deleted there),
// and the credits fields and panel the key pages share. Loaded before app.js: these
// functions call its helpers (h, field, api, page, …) only once the page is drawn.
'use strict';

const INTERVALS = [['', 'Never'], ['daily', 'Daily'], ['monthly', 'Monthly'], ['seconds', 'Every N seconds']];

/** The credits inputs (a balance, labelled `label`, and its refill), their ids starting
 * with `prefix`.
 * `read()` gives the API's `credits` (null when the balance is empty) or throws
 * `{id, message}` for the field at fault. */
function creditsFields(prefix, label, balanceHint) {
  const number = (attrs) => h('input', { type: 'number', step: 1, inputmode: 'numeric', ...attrs });
  const remaining = number({ min: 0 });
  const interval = h('select', {}, INTERVALS.map(([v, label]) => h('option', { value: v }, label)));
  const amount = number({ min: 1 });
  const day = number({ min: 1, max: 31, value: 1 });
  const seconds = number({ min: 1, max: 31536000, value: 3600 });
  const amountField = field(`${prefix}-refill-amount`, 'Refilled to', amount, 'The balance after each refill.');
  const dayField = field(`${prefix}-refill-day`, 'On day of the month', day, '1–31: the month’s last day when shorter.');
  const secondsField = field(`${prefix}-refill-seconds`, 'Every (seconds)', seconds);
  const show = () => {
    amountField.hidden = !interval.value;
    dayField.hidden = interval.value !== 'monthly';
    secondsField.hidden = interval.value !== 'seconds';
  };
  interval.addEventListener('change', show);
  show();
  const whole = (input, id, what) => {
    const n = Number(input.value);
    if (input.value.trim() === '' || !Number.isInteger(n) || n < 0) throw { id, message: `${what} must be a whole number.` };
    return n;
  };
  return {
    ids: [`${prefix}-credits`, `${prefix}-refill`, `${prefix}-refill-amount`, `${prefix}-refill-day`, `${prefix}-refill-seconds`],
    fields: [
      field(`${prefix}-credits`, label, remaining, balanceHint),
      field(`${prefix}-refill`, 'Refill', interval, 'A refill sets the balance, whatever is left.'),
      amountField, dayField, secondsField],
    reset() { remaining.value = ''; interval.value = ''; show(); },
    read() {
      if (remaining.value.trim() === '') {
        if (interval.value) throw { id: `${prefix}-credits`, message: 'Give the balance the refills start from.' };
        return null;
      }
      const credits = { remaining: whole(remaining, `${prefix}-credits`, 'Credits') };
      if (interval.value) {
        const refill = { amount: whole(amount, `${prefix}-refill-amount`, 'The refill'), interval: interval.value };
        if (interval.value === 'monthly') refill.refillDay = whole(day, `${prefix}-refill-day`, 'The day');
        if (interval.value === 'seconds') refill.periodSeconds = whole(seconds, `${prefix}-refill-seconds`, 'The period');
        credits.refill = refill;
      }
      return credits;
    },
    /** Which of these fields an API error is about, if any (a rate limit's
     * `periodSeconds` is not: only errors that name credits are). */
    errorField(message) {
      const m = message.toLowerCase();
      if (!m.includes('credit')) return null;
      if (m.includes('refillday')) return `${prefix}-refill-day`;
      if (m.includes('periodseconds')) return `${prefix}-refill-seconds`;
      if (m.includes('refill')) return `${prefix}-refill-amount`;
      if (m.includes('credit')) return `${prefix}-credits`;
      return null;
    },
  };
}

/** Shows `e` (an API error or a `{id, message}` from a field) next to its field, or on
 * the form's own error line `fallback`; focuses the field. */
function showFieldError(e, id, fallback) {
  const target = id || fallback;
  setError(target, e.message);
  const control = document.getElementById(target);
  if (control && target !== fallback) control.focus();
}

/** The credits of a key or an identity (`base`: its API path): set, or topped up — two
 * forms, so Enter in one never submits the other. */
function creditsPanel(base, prefix, onSaved) {
  const set = creditsFields(prefix, 'Balance', 'Replaces what is left at the edge. Empty: no credits (not metered).');
  const add = h('input', { type: 'number', min: 1, step: 1, inputmode: 'numeric' });
  const form = h('form', { novalidate: true, 'aria-label': 'Set credits' },
    h('div', { class: 'fields' }, set.fields),
    h('p', { class: 'error', id: `${prefix}-form-error`, role: 'alert' }),
    h('div', { class: 'actions' }, h('button', { type: 'submit', 'data-action': 'set' }, 'Set credits')));
  const topUp = h('form', { class: 'topup', novalidate: true, 'aria-label': 'Add credits' },
    field(`${prefix}-add`, 'Add credits', add, 'A top-up: added to what is left, kept until the next refill.'),
    h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'secondary', 'data-action': 'add' }, 'Add credits')));
  const panel = h('section', { class: 'panel', 'aria-labelledby': `${prefix}-title` },
    h('h2', { id: `${prefix}-title` }, 'Credits'), form, topUp);
  const clear = () => { for (const id of [...set.ids, `${prefix}-add`, `${prefix}-form-error`]) setError(id, ''); };
  const send = async (method, path, body, what) => {
    try {
      onSaved(await api(method, path, body));
      announce(what);
      return true;
    } catch (e) {
      showFieldError(e, method === 'POST' ? `${prefix}-add` : set.errorField(e.message), `${prefix}-form`);
      return false;
    }
  };
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    busy(form.querySelector('[data-action=set]'), async () => {
      clear();
      let credits;
      try { credits = set.read(); } catch (e) { showFieldError(e, e.id, `${prefix}-form`); return; }
      if (await send('PATCH', base, { credits }, credits ? 'Credits set' : 'Credits removed')) set.reset();
    });
  });
  topUp.addEventListener('submit', (event) => {
    event.preventDefault();
    busy(topUp.querySelector('[data-action=add]'), async () => {
      clear();
      const n = Number(add.value);
      if (add.value.trim() === '' || !Number.isInteger(n) || n < 1) {
        showFieldError({ message: 'Give a whole number of credits, 1 or more.' }, `${prefix}-add`);
        return;
      }
      if (await send('POST', `${base}/credits`, { add: n }, `${n} credits added`)) add.value = '';
    });
  });
  return panel;
}

/** Shared limits as typed: "rpm: 600/60, burst: 20/1" (name: requests/seconds). */
function parseLimits(text) {
  return text.split(',').map((s) => s.trim()).filter(Boolean).map((part) => {
    const m = part.match(/^([^:=\s]+)\s*[:=]\s*(\d+)\s*\/\s*(\d+)\s*s?$/);
    if (!m) throw { message: `“${part}” is not a limit: write name: requests/seconds, e.g. rpm: 600/60.` };
    return { name: m[1], requests: Number(m[2]), periodSeconds: Number(m[3]) };
  });
}

function limitsText(limits) {
  return (limits || []).map((l) => `${l.name}: ${l.requests}/${l.periodSeconds}`).join(', ');
}

/** Metadata as typed: empty → null, else a JSON object. */
function parseMeta(text) {
  if (!text.trim()) return null;
  try { return JSON.parse(text); } catch (e) {
    throw { message: 'This is not JSON: write an object such as {"plan":"pro"}.' };
  }
}

// ---- the identities --------------------------------------------------------------------

function identitiesPage() {
  const externalId = h('input', { type: 'text', maxlength: 255, autocomplete: 'off', spellcheck: 'false', required: true });
  const credits = creditsFields('identity', 'Credits (optional)', 'Shared by all its keys. Empty: not metered.');
  const limits = h('input', { type: 'text', autocomplete: 'off', spellcheck: 'false', class: 'mono' });
  const meta = h('input', { type: 'text', autocomplete: 'off', spellcheck: 'false', class: 'mono' });
  const ids = ['identity-external-id', ...credits.ids, 'identity-limits', 'identity-meta', 'identity-form'];
  const form = h('form', { class: 'panel', 'aria-labelledby': 'identity-create-title', novalidate: true },
    h('h2', { id: 'identity-create-title' }, 'Create an identity'),
    h('div', { class: 'fields' },
      field('identity-external-id', 'External ID', externalId, 'Your id for the customer or user: up to 255 visible characters.'),
      credits.fields,
      field('identity-limits', 'Shared limits (optional)', limits, 'Up to 5, each keys’ requests together: rpm: 600/60, burst: 20/1.'),
      field('identity-meta', 'Metadata (optional)', meta, 'A JSON object.')),
    h('p', { class: 'error', id: 'identity-form-error', role: 'alert' }),
    h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Create identity')));
  const tbody = h('tbody');
  const listError = h('p', { class: 'error', role: 'alert' });
  const more = h('button', { type: 'button', class: 'secondary', hidden: true }, 'Load more identities');
  let cursor = null;

  const load = async (reset) => {
    listError.textContent = '';
    try {
      const params = new URLSearchParams({ limit: '100' });
      if (!reset && cursor) params.set('cursor', cursor);
      const found = await api('GET', `${API}/identities?${params}`);
      const rows = found.identities.map((i) => h('tr', { 'data-identity': i.externalId },
        h('td', {}, h('a', { href: `/console/identities/${enc(i.externalId)}`, 'data-nav': '' }, i.externalId)),
        h('td', { class: 'nowrap' }, when(i.created)),
        h('td', {}, creditsText(i.credits)),
        h('td', { class: 'mono' }, limitsText(i.rateLimits) || '—')));
      if (reset) tbody.replaceChildren(...rows); else tbody.append(...rows);
      if (!tbody.rows.length) tbody.replaceChildren(h('tr', {}, h('td', { colspan: 4 }, 'No identities yet.')));
      cursor = found.nextCursor || null;
      more.hidden = !cursor;
    } catch (e) {
      listError.textContent = `Could not load the identities: ${e.message}`;
    }
  };
  more.addEventListener('click', () => load(false));

  form.addEventListener('submit', (event) => {
    event.preventDefault();
    busy(form.querySelector('button[type=submit]'), async () => {
      for (const id of ids) setError(id, '');
      const body = { externalId: externalId.value };
      try {
        if (!externalId.value.trim()) throw { id: 'identity-external-id', message: 'Enter the identity’s external ID.' };
        const c = credits.read();
        if (c) body.credits = c;
        try { if (limits.value.trim()) body.rateLimits = parseLimits(limits.value); } catch (e) { e.id = 'identity-limits'; throw e; }
        try { const m = parseMeta(meta.value); if (m !== null) body.meta = m; } catch (e) { e.id = 'identity-meta'; throw e; }
      } catch (e) { showFieldError(e, e.id, 'identity-form'); return; }
      try {
        const made = await api('POST', `${API}/identities`, body);
        announce(`Identity ${made.externalId} created`);
        go(`/console/identities/${enc(made.externalId)}`);
      } catch (e) {
        const m = e.message.toLowerCase();
        const id = credits.errorField(e.message) || (m.includes('externalid') ? 'identity-external-id'
          : m.includes('limit') ? 'identity-limits' : m.includes('meta') ? 'identity-meta' : null);
        showFieldError(e, id, 'identity-form');
      }
    });
  });

  page('Identities', form,
    h('section', { 'aria-labelledby': 'identities-title' },
      h('h2', { id: 'identities-title' }, 'Identities'), listError,
      h('div', { class: 'table-wrap', role: 'region', 'aria-label': 'Identities', tabindex: '0' },
        h('table', {},
          h('thead', {}, h('tr', {}, ['External ID', 'Created', 'Credits', 'Shared limits'].map((c) => h('th', { scope: 'col' }, c)))),
          tbody)),
      h('div', { class: 'actions' }, more)));
  load(true);
}

// ---- one identity ----------------------------------------------------------------------

function identityPage(externalId) {
  const base = `${API}/identities/${enc(externalId)}`;
  const details = h('dl', { class: 'meta' });
  const keys = h('ul', { class: 'identity-keys' });
  const usage = usageSection(`${base}/usage`, ' by its keys', `There is no identity “${externalId}”.`);
  const limits = h('input', { type: 'text', autocomplete: 'off', spellcheck: 'false', class: 'mono' });
  const meta = h('input', { type: 'text', autocomplete: 'off', spellcheck: 'false', class: 'mono' });

  const show = (i) => {
    details.replaceChildren(...[
      ['Created', when(i.created)], ['Credits', creditsText(i.credits)], ['Shared limits', limitsText(i.rateLimits) || '—'],
      ['Metadata', i.meta ? JSON.stringify(i.meta) : '—'],
    ].flatMap(([term, value]) => [h('dt', {}, term), h('dd', { 'data-term': term }, value)]));
  };
  // The edit form's fields as saved (not on a credits change: unsaved edits stay).
  const fill = (i) => {
    limits.value = limitsText(i.rateLimits);
    meta.value = i.meta ? JSON.stringify(i.meta) : '';
  };

  // Limits and metadata: both replaced, as typed (empty: none).
  const edit = h('form', { class: 'panel', 'aria-labelledby': 'identity-edit-title', novalidate: true },
    h('h2', { id: 'identity-edit-title' }, 'Shared limits and metadata'),
    h('div', { class: 'fields' },
      field('edit-limits', 'Shared limits', limits, 'Up to 5: rpm: 600/60, burst: 20/1. Empty: none.'),
      field('edit-meta', 'Metadata', meta, 'A JSON object. Empty: none.')),
    h('p', { class: 'error', id: 'identity-edit-form-error', role: 'alert' }),
    h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Save')));
  edit.addEventListener('submit', (event) => {
    event.preventDefault();
    busy(edit.querySelector('button[type=submit]'), async () => {
      for (const id of ['edit-limits', 'edit-meta', 'identity-edit-form']) setError(id, '');
      const body = {};
      try {
        try { body.rateLimits = parseLimits(limits.value); } catch (e) { e.id = 'edit-limits'; throw e; }
        try { body.meta = parseMeta(meta.value); } catch (e) { e.id = 'edit-meta'; throw e; }
        if (!body.rateLimits.length) body.rateLimits = null;
        const saved = await api('PATCH', base, body);
        show(saved);
        fill(saved);
        announce(`${externalId} saved`);
      } catch (e) {
        const m = e.message.toLowerCase();
        showFieldError(e, e.id || (m.includes('meta') ? 'edit-meta' : m.includes('limit') ? 'edit-limits' : null),
          'identity-edit-form');
      }
    });
  });

  const remove = h('button', { type: 'button', class: 'danger' }, 'Delete identity');
  remove.addEventListener('click', () => deleteIdentityDialog(externalId));

  const load = async () => {
    const i = await api('GET', base);
    show(i);
    fill(i);
    const owned = await api('GET', `${base}/keys`);
    keys.replaceChildren(...(owned.keys.length ? owned.keys.map((k) => h('li', {},
      h('a', { href: `/console/keys/${enc(k.name)}`, 'data-nav': '' }, k.name))) : [h('li', {}, 'No keys.')]));
  };
  page(externalId,
    h('p', {}, h('a', { href: '/console/identities', 'data-nav': '' }, '← All identities')),
    details,
    h('section', { 'aria-labelledby': 'keys-title' }, h('h2', { id: 'keys-title' }, 'Its keys'), keys),
    creditsPanel(base, 'identity-credits', show),
    edit,
    h('div', { class: 'actions' }, remove),
    usage.section);
  load().catch((e) => {
    usage.error.textContent = e.status === 404 ? `There is no identity “${externalId}”.` : `Could not load the identity: ${e.message}`;
  });
  usage.load();
}

function deleteIdentityDialog(externalId) {
  const typed = h('input', { type: 'text', autocomplete: 'off', spellcheck: 'false' });
  const cascade = h('input', { type: 'checkbox', id: 'delete-cascade' });
  const confirm = h('button', { type: 'submit', class: 'danger', disabled: true }, 'Delete identity');
  typed.addEventListener('input', () => { confirm.disabled = typed.value !== externalId; });
  const form = h('form', { method: 'dialog', novalidate: true },
    h('p', {}, 'Deleting an identity cannot be undone. While keys belong to it, it is deleted only with them.'),
    field('delete-confirm', `Type its external ID (${externalId}) to confirm`, typed),
    h('div', { class: 'check' }, cascade, h('label', { for: 'delete-cascade' }, 'Delete its keys too (refused everywhere)')),
    h('div', { class: 'actions' }, confirm,
      h('button', { type: 'button', class: 'secondary', onclick: () => d.close() }, 'Cancel')));
  const d = dialog(`Delete ${externalId}?`, form);
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    if (typed.value !== externalId) { setError('delete-confirm', 'The external ID does not match.'); return; }
    busy(confirm, async () => {
      try {
        await api('DELETE', `${API}/identities/${enc(externalId)}${cascade.checked ? '?cascade=true' : ''}`);
        d.close();
        announce(`Identity ${externalId} deleted`);
        go('/console/identities');
      } catch (e) {
        setError('delete-confirm', e.status === 409
          ? `${e.message.split(':')[0]}: tick “Delete its keys too” to delete them with it.` : e.message);
      }
    });
  });
  typed.focus();
}
