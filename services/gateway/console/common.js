// Shared by the console pages: the JSON API client, the session (the API key lives only in the
// server's HttpOnly cookie), DOM building that inserts every value as text, and formatting.

export class Unauthorized extends Error {}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Calls the gateway's JSON API on this origin; the session cookie goes along by itself. */
export async function api(path, { method = 'GET', body } = {}) {
  const headers = { Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const res = await fetch(path, {
    method,
    headers,
    credentials: 'same-origin',
    cache: 'no-store',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (res.status === 401) throw new Unauthorized('not signed in');
  if (!res.ok) {
    let message = `${res.status} ${res.statusText}`;
    try {
      const err = await res.json();
      if (err && err.error && err.error.message) message = err.error.message;
    } catch (_) {
      // not JSON: keep the status line
    }
    throw new ApiError(res.status, message);
  }
  if (res.status === 204) return null;
  return res.json();
}

/** An element; string and number children become text nodes, never markup. */
export function el(tag, attrs = {}, ...children) {
  const svg = ['svg', 'g', 'line', 'polyline', 'circle', 'text', 'title', 'desc', 'rect', 'path'].includes(tag);
  const node = svg ? document.createElementNS('http://www.w3.org/2000/svg', tag) : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === 'style' || name.startsWith('on')) throw new Error(`el(): ${name} is not allowed`);
    node.setAttribute(name, value === true ? '' : String(value));
  }
  append(node, ...children);
  return node;
}

export function append(node, ...children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

const CHANNELS = {
  CHANNEL_WEB: 'Web',
  CHANNEL_MOBILE_APP: 'Mobile app',
  CHANNEL_EMAIL: 'Email',
  CHANNEL_SMS: 'SMS',
  CHANNEL_CHAT: 'Chat',
  CHANNEL_VOICE: 'Voice',
  CHANNEL_SOCIAL: 'Social',
  CHANNEL_IN_STORE: 'In store',
  CHANNEL_OTHER: 'Other',
  web: 'Web',
  mobile_app: 'Mobile app',
  email: 'Email',
  sms: 'SMS',
  chat: 'Chat',
  voice: 'Voice',
  social: 'Social',
  in_store: 'In store',
  other: 'Other',
};

export function channelName(channel) {
  if (!channel) return 'Unknown';
  return CHANNELS[channel] || String(channel);
}

/** An enum value's name without its prefix, in words: CASE_STATUS_OPEN -> "open". */
export function enumWords(value, prefix) {
  if (!value) return '';
  let text = String(value);
  if (prefix && text.startsWith(prefix)) text = text.slice(prefix.length);
  return text.toLowerCase().replaceAll('_', ' ');
}

export function fmtTime(iso) {
  if (!iso) return '';
  const when = new Date(iso);
  if (Number.isNaN(when.getTime())) return String(iso);
  return when.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'short' });
}

export function fmtDuration(seconds) {
  const s = Math.round(Number(seconds) || 0);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(s % 60).padStart(2, '0')}s`;
  return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, '0')}m`;
}

export function fmtNumber(value, digits = 1) {
  if (value === undefined || value === null || value === '') return '—';
  const n = Number(value);
  if (Number.isNaN(n)) return String(value);
  return n.toLocaleString(undefined, { maximumFractionDigits: digits });
}

/** A google.protobuf.Value as JSON renders it, shown as text. */
export function fmtValue(value) {
  if (value === undefined || value === null) return '—';
  if (typeof value === 'object') return JSON.stringify(value);
  return String(value);
}

/** Shows `node` and hides the others of `nodes`. */
export function showOnly(nodes, node) {
  for (const n of nodes) n.hidden = n !== node;
}

/**
 * Wires the sign-in form and the sign-out button present on a page. `onSignedIn` runs once the
 * session cookie is valid (at load or after signing in); `onSignedOut` when it is not.
 * The key is read from the form, sent in the POST body, and the field is emptied at once.
 */
export function session({ signInSection, appSection, onSignedIn, onSignedOut }) {
  const form = signInSection.querySelector('form');
  const keyField = form.querySelector('input[name="apiKey"]');
  const message = signInSection.querySelector('.form-error');
  const sections = [signInSection, appSection];
  const toggle = (signedInNow) => {
    for (const node of document.querySelectorAll('[data-signed-in]')) node.hidden = !signedInNow;
  };

  const signedOut = (why) => {
    showOnly(sections, signInSection);
    toggle(false);
    message.textContent = why || '';
    if (onSignedOut) onSignedOut();
    keyField.focus();
  };
  const signedIn = () => {
    showOnly(sections, appSection);
    toggle(true);
    message.textContent = '';
    onSignedIn();
  };

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const apiKey = keyField.value.trim();
    keyField.value = '';
    if (!apiKey) {
      message.textContent = 'Enter an API key.';
      return;
    }
    message.textContent = 'Signing in…';
    try {
      await api('/api/v1/session', { method: 'POST', body: { apiKey } });
      signedIn();
    } catch (err) {
      signedOut(err instanceof Unauthorized ? 'That API key was refused.' : `Could not sign in: ${err.message}`);
    }
  });

  for (const button of document.querySelectorAll('[data-action="sign-out"]')) {
    button.addEventListener('click', async () => {
      try {
        await api('/api/v1/session', { method: 'DELETE' });
      } catch (_) {
        // signed out either way
      }
      signedOut('Signed out.');
    });
  }

  api('/api/v1/session').then(signedIn, (err) =>
    signedOut(err instanceof Unauthorized ? '' : `The gateway did not answer: ${err.message}`),
  );
  return { signedOut };
}

/** An EventSource that calls `onChange(data, type)` for each named event, parsed JSON. */
export function listen(url, types, onChange, onState) {
  const source = new EventSource(url, { withCredentials: false });
  for (const type of types) {
    source.addEventListener(type, (event) => {
      let data = null;
      try {
        data = JSON.parse(event.data);
      } catch (_) {
        data = null;
      }
      onChange(data, type, event.lastEventId);
    });
  }
  if (onState) {
    source.addEventListener('open', () => onState('live'));
    source.addEventListener('error', () => onState(source.readyState === EventSource.CLOSED ? 'closed' : 'reconnecting'));
  }
  return source;
}
