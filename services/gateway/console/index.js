// The agent console: look a customer up by anything the caller gives, see everything about them,
// and have the view refresh by itself when the profile changes (the screen pop).

import { sparkline } from './chart.js';
import {
  ApiError,
  Unauthorized,
  api,
  channelName,
  clear,
  el,
  enumWords,
  fmtDuration,
  fmtNumber,
  fmtTime,
  fmtValue,
  listen,
  session,
} from './common.js';

const $ = (id) => document.getElementById(id);
/** Traits an agent wants first, in this order; the others follow alphabetically. */
const KEY_TRAITS = ['email', 'phone', 'city', 'state', 'postcode', 'address', 'lifecycle_stage', 'date_of_birth'];
const SCORES = [
  ['nps', 'NPS', (v) => fmtNumber(v, 0)],
  ['csat', 'CSAT', (v) => `${fmtNumber(v, 0)}%`],
  ['cesMean', 'CES (mean)', (v) => fmtNumber(v, 1)],
  ['fcr', 'FCR', (v) => `${fmtNumber(v, 0)}%`],
  ['ahtSeconds', 'AHT', (v) => fmtDuration(v)],
  ['sentiment', 'Sentiment', (v) => fmtNumber(v, 2)],
];
const PROFILE_EVENTS = ['created', 'updated', 'merged', 'split', 'erased', 'message'];

const state = { q: '', profileId: '', stream: null, refresh: 0, generation: 0 };

function say(text) {
  $('status').textContent = text;
}

function stopStream() {
  if (state.stream) state.stream.close();
  state.stream = null;
  $('live').textContent = '';
}

function watch(profileId) {
  if (state.stream && state.profileId === profileId) return;
  stopStream();
  state.profileId = profileId;
  const url = `/api/v1/streams/profiles?profile=${encodeURIComponent(profileId)}`;
  state.stream = listen(
    url,
    PROFILE_EVENTS,
    (change, type) => {
      if (type === 'erased') {
        stopStream();
        clearCustomer();
        say('This customer was erased.');
        return;
      }
      scheduleRefresh(change);
    },
    (where) => {
      const words = { live: 'Live: updates appear here', reconnecting: 'Reconnecting…', closed: 'Live updates stopped' };
      $('live').textContent = words[where] || '';
      $('live').dataset.state = where;
    },
  );
}

function scheduleRefresh() {
  clearTimeout(state.refresh);
  state.refresh = setTimeout(() => load(state.q, { quiet: true }), 250);
}

function clearCustomer() {
  $('customer').hidden = true;
  for (const id of ['traits', 'identifiers', 'scores', 'sentiment', 'cases', 'computed', 'evaluations', 'alerts', 'channels']) {
    clear($(id));
  }
  clear($('interactions').tBodies[0]);
  clear($('activity').tBodies[0]);
}

function traitValue(traits, key) {
  const found = traits.find((t) => t.key === key);
  return found ? found.value : undefined;
}

function renderProfile(profile) {
  const traits = profile.traits || [];
  const first = traitValue(traits, 'first_name');
  const last = traitValue(traits, 'last_name');
  const name = [first, last].filter(Boolean).join(' ') || traitValue(traits, 'name') || 'Unnamed customer';
  $('customer-name').textContent = String(name);
  $('customer-summary').textContent =
    `Profile ${profile.profileId} · ${profile.eventCount || 0} events · first seen ${fmtTime(profile.firstSeen)}` +
    ` · last seen ${fmtTime(profile.lastSeen)}`;

  const ordered = [
    ...KEY_TRAITS.map((k) => traits.find((t) => t.key === k)).filter(Boolean),
    ...traits
      .filter((t) => !KEY_TRAITS.includes(t.key) && t.key !== 'first_name' && t.key !== 'last_name')
      .sort((a, b) => a.key.localeCompare(b.key)),
  ];
  const dl = clear($('traits'));
  for (const t of ordered) {
    dl.append(el('dt', {}, t.key.replaceAll('_', ' ')));
    dl.append(el('dd', { 'data-trait': t.key }, fmtValue(t.value), el('span', { class: 'muted small' }, ` ${t.source || ''}`)));
  }
  if (!ordered.length) dl.append(el('dd', { class: 'muted' }, 'No traits yet.'));

  const ids = clear($('identifiers'));
  for (const i of profile.identifiers || []) {
    ids.append(
      el(
        'li',
        {},
        el('span', { class: 'tag' }, i.type),
        ' ',
        el('span', { class: 'mono' }, i.value),
        el('span', { class: 'muted small' }, ` since ${fmtTime(i.firstSeen)}${i.source ? ` via ${i.source}` : ''}`),
      ),
    );
  }

  const computed = clear($('computed'));
  for (const c of profile.computedTraits || []) {
    computed.append(el('dt', {}, c.key.replaceAll('_', ' ')));
    computed.append(el('dd', {}, fmtValue(c.value), el('span', { class: 'muted small' }, ` n=${c.sampleSize || 0}`)));
  }
  if (!(profile.computedTraits || []).length) computed.append(el('dd', { class: 'muted' }, 'None defined.'));
}

function renderInteractions(interactions, contacts) {
  const body = clear($('interactions').tBodies[0]);
  for (const i of interactions) {
    const outcome = [i.disposition ? enumWords(i.disposition) : '', i.transferred ? 'transferred' : '', i.abandoned ? 'abandoned' : '']
      .filter(Boolean)
      .join(', ');
    body.append(
      el(
        'tr',
        { 'data-channel': i.channel || '' },
        el('td', {}, fmtTime(i.startTime)),
        el('td', {}, channelName(i.channel)),
        el('td', {}, i.reason ? enumWords(i.reason) : '—'),
        el('td', { class: 'mono' }, i.agentId || '—'),
        el('td', {}, outcome || '—'),
        el('td', {}, fmtDuration(i.handleSeconds), (i.legs || 1) > 1 ? el('span', { class: 'muted small' }, ` ${i.legs} legs`) : null),
        el('td', { class: 'mono' }, i.caseId ? `${i.caseId} (${enumWords(i.caseStatus, 'CASE_STATUS_')})` : ''),
      ),
    );
  }
  if (!interactions.length) body.append(el('tr', {}, el('td', { colspan: 7, class: 'muted' }, 'No interactions.')));
  if (contacts) {
    $('h-interactions').textContent =
      `Recent interactions · ${contacts.last7Days || 0} in 7 days, ${contacts.last30Days || 0} in 30 days`;
  }
}

function describe(ev) {
  const e = ev.event || {};
  if (e.track) return e.track.event || 'track';
  if (e.interaction) {
    const i = e.interaction;
    return [enumWords(i.reason), i.disposition ? `→ ${enumWords(i.disposition)}` : '', i.agentId ? `(${i.agentId})` : '']
      .filter(Boolean)
      .join(' ');
  }
  if (e.surveyResponse) {
    const s = e.surveyResponse;
    return `${enumWords(s.type, 'SURVEY_TYPE_').toUpperCase()} ${s.score ?? ''}${s.comment ? ` “${s.comment}”` : ''}`;
  }
  if (e.message) return `${enumWords(e.message.author, 'AUTHOR_')}: ${e.message.text || ''}`;
  if (e.identify) return `identified (${Object.keys(e.identify.traits || {}).join(', ') || 'no traits'})`;
  return ev.kind || '';
}

function renderActivity(events) {
  const body = clear($('activity').tBodies[0]);
  const seen = new Map();
  for (const ev of events) {
    seen.set(ev.channel, (seen.get(ev.channel) || 0) + 1);
    body.append(
      el(
        'tr',
        { 'data-channel': ev.channel || '', 'data-kind': ev.kind || '' },
        el('td', {}, fmtTime(ev.eventTime)),
        el('td', {}, channelName(ev.channel)),
        el('td', {}, (ev.kind || '').replaceAll('_', ' ')),
        el('td', { class: 'what' }, describe(ev)),
        el('td', { class: 'muted' }, (ev.event && ev.event.source) || ''),
      ),
    );
  }
  if (!events.length) body.append(el('tr', {}, el('td', { colspan: 5, class: 'muted' }, 'No activity.')));
  const chips = clear($('channels'));
  for (const [channel, count] of seen) {
    chips.append(el('span', { class: 'chip', 'data-channel': channel || '' }, `${channelName(channel)} · ${count}`));
  }
}

function renderCases(cases) {
  const list = clear($('cases'));
  for (const c of cases) {
    list.append(
      el(
        'li',
        {},
        el('strong', { class: 'mono' }, c.caseId),
        ` ${enumWords(c.status, 'CASE_STATUS_')} · ${enumWords(c.reason)}`,
        el('span', { class: 'muted small' }, ` opened ${fmtTime(c.openTime)}, updated ${fmtTime(c.updateTime)}`),
      ),
    );
  }
  if (!cases.length) list.append(el('li', { class: 'muted' }, 'No open cases.'));
}

function scoreText(score, format) {
  if (!score || score.value === undefined) return ['—', 'no answers yet'];
  const n = `n=${score.sampleSize || 0}`;
  const ci = score.ciLow !== undefined && score.ciHigh !== undefined ? `, 95% CI ${format(score.ciLow)} to ${format(score.ciHigh)}` : '';
  return [format(score.value), n + ci];
}

function renderScores(scores) {
  const dl = clear($('scores'));
  const missing = $('scores-missing');
  const metrics = scores && scores.metrics;
  missing.hidden = Boolean(metrics);
  missing.textContent = metrics ? '' : (scores && scores.missingReason) || 'No scores.';
  const spark = clear($('sentiment'));
  if (!metrics) return;
  for (const [key, label, format] of SCORES) {
    const [value, detail] = scoreText(metrics[key], format);
    dl.append(el('dt', {}, label));
    dl.append(el('dd', { 'data-score': key }, el('strong', {}, value), el('span', { class: 'muted small' }, ` ${detail}`)));
  }
  const trend = metrics.sentimentTrend || [];
  if (!trend.length) {
    spark.append(el('p', { class: 'muted' }, 'No conversations with messages yet.'));
    return;
  }
  spark.append(sparkline(trend.map((p) => Number(p.score) || 0), 'Sentiment of recent conversations, oldest first'));
  const list = el('ol', { class: 'plain small' });
  for (const p of trend) {
    const delta = Number(p.trend) || 0;
    const arrow = delta > 0.05 ? 'improving' : delta < -0.05 ? 'worsening' : 'steady';
    list.append(el('li', {}, `${fmtTime(p.time)}: ${fmtNumber(p.score, 2)} (${arrow}, ${p.messages || 0} messages)`));
  }
  spark.append(list);
}

function renderEvaluations(evaluations) {
  const list = clear($('evaluations'));
  for (const e of evaluations) {
    const score = e.autoFailed ? `auto-failed (${e.autoFailQuestion || 'a question'})` : e.score === undefined ? 'not scored' : `${fmtNumber(e.score, 0)}/100`;
    list.append(
      el(
        'li',
        {},
        el('strong', {}, score),
        ` · ${channelName(e.channel)} · ${e.agentId || 'no agent'} · ${(e.form || '').replace('evaluationForms/', '')}`,
        e.awaitingReview ? el('span', { class: 'tag' }, `${e.awaitingReview} awaiting review`) : null,
        el('span', { class: 'muted small' }, ` ${fmtTime(e.evaluateTime)} · ${e.interactionId}`),
      ),
    );
  }
  if (!evaluations.length) list.append(el('li', { class: 'muted' }, 'No evaluations.'));
}

function renderAlerts(alerts) {
  const list = clear($('alerts'));
  const open = alerts.filter((a) => !a.acknowledgedBy && a.state !== 'ALERT_STATE_ACKNOWLEDGED');
  for (const a of open) {
    list.append(
      el(
        'li',
        { class: 'alert' },
        el('strong', {}, a.ruleDisplayName || a.rule || 'Alert'),
        ` ${a.description || ''}`,
        el('span', { class: 'muted small' }, ` ${fmtTime(a.fireTime)}${a.agentId ? ` · ${a.agentId}` : ''}`),
      ),
    );
  }
  if (!open.length) list.append(el('li', { class: 'muted' }, 'No open alerts.'));
}

/** The side panels come from their own endpoints; one failing leaves the rest of the view up. */
async function optional(path, fallback) {
  try {
    return await api(path);
  } catch (err) {
    if (err instanceof Unauthorized) throw err;
    return fallback;
  }
}

async function load(q, { quiet = false } = {}) {
  const generation = ++state.generation;
  if (!quiet) say(`Looking up ${q}…`);
  try {
    const context = await api(`/api/v1/context?q=${encodeURIComponent(q)}&interactions=20`);
    const profile = (context && context.profile) || {};
    const id = profile.profileId || (profile.name || '').replace('profiles/', '');
    const base = `/api/v1/profiles/${encodeURIComponent(id)}`;
    const [timeline, evaluations, alerts] = await Promise.all([
      optional(`${base}/timeline?pageSize=100`, { events: [] }),
      optional(`${base}/evaluations?pageSize=10`, { evaluations: [] }),
      optional(`${base}/alerts`, { alerts: [] }),
    ]);
    if (generation !== state.generation) return; // a newer lookup won
    renderProfile(profile);
    renderInteractions(context.recentInteractions || [], context.contacts);
    renderActivity((timeline && timeline.events) || []);
    renderCases(context.openCases || []);
    renderScores(context.scores);
    renderEvaluations((evaluations && evaluations.evaluations) || []);
    renderAlerts((alerts && alerts.alerts) || []);
    $('customer').hidden = false;
    $('customer').dataset.profile = id;
    say(quiet ? `Updated ${new Date().toLocaleTimeString()}` : '');
    watch(id);
  } catch (err) {
    if (generation !== state.generation) return;
    if (err instanceof Unauthorized) {
      signedOutNow('Your session has ended; sign in again.');
      return;
    }
    if (!quiet) {
      clearCustomer();
      stopStream();
    }
    say(err instanceof ApiError && err.status === 404 ? `No customer found for ${q}.` : `Lookup failed: ${err.message}`);
  }
}

let signedOutNow = () => {};

function main() {
  const gate = session({
    signInSection: $('sign-in'),
    appSection: $('app'),
    onSignedIn: () => $('q').focus(),
    onSignedOut: () => {
      stopStream();
      clearCustomer();
      state.q = '';
      say('');
    },
  });
  signedOutNow = gate.signedOut;
  $('lookup').addEventListener('submit', (event) => {
    event.preventDefault();
    const q = $('q').value.trim();
    if (!q) return;
    state.q = q;
    load(q);
  });
}

main();
